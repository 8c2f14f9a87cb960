//! Step time of the training modes on the same model (issue 6): pre-training, SFT (packed
//! rows with document masks), DPO (pairs, frozen reference), full and LoRA.
//!
//! Every step sees 8 rows × 256 tokens (DPO: 4 pairs, each row nearly full). Each variant
//! runs in a fresh process: one warm-up step, then `STEPS` timed steps; the figures are wall
//! and CPU (user + system, `getrusage`) seconds per step.
//!
//! ```text
//! cargo run --release -p eg-kernel --example modes_bench            # all variants
//! cargo run --release -p eg-kernel --example modes_bench run dpo 10 # one, in this process
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "common/mod.rs"]
mod common;
use common::{adamw, bench_options, cpu_secs};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use eg_data::{
    InMemoryDataset, Loader, LoaderOptions, Packing, PairDataset, PairLoader, PairLoaderOptions,
    Placement, PreferencePair,
};
use eg_kernel::{CausalLm, Dpo, Objective, Trainer, TrainerOptions};
use eg_model::{Llama, LoraConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SEQ: usize = 256;
const ROWS: usize = 8;
const VOCAB: usize = 4096;
const STEPS: u64 = 6;
const VARIANTS: &[&str] = &["pretrain", "sft", "dpo", "pretrain-lora", "dpo-lora"];

fn tok(i: u64, j: u64) -> u32 {
    (eg_data::order::mix64(i * 1_000_003 + j) % (VOCAB as u64 - 1)) as u32 + 1
}

fn model(lora: bool) -> Llama {
    let cfg = eg_model::builtin::config("small-llama", VOCAB, SEQ).unwrap();
    let m = Llama::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    if lora {
        m.with_lora(&LoraConfig::rank(16).alpha(32.0).targets(["all-linear"]), 2)
            .unwrap()
    } else {
        m
    }
}

fn opts(steps: u64) -> TrainerOptions {
    bench_options(steps, ROWS)
}

fn trainer(variant: &str, steps: u64) -> Trainer<Llama> {
    let lora = variant.ends_with("-lora");
    let m = model(lora);
    let opt = adamw(&m);
    if variant.starts_with("dpo") {
        let mut d = PairDataset::new();
        for i in 0..256u64 {
            d.push(PreferencePair {
                prompt: (0..100).map(|j| tok(i, j)).collect(),
                chosen: (0..150).map(|j| tok(i, 1000 + j)).collect(),
                rejected: (0..150).map(|j| tok(i, 2000 + j)).collect(),
            });
        }
        let lo = PairLoaderOptions {
            seq_len: SEQ,
            pairs_per_step: ROWS / 2,
            pad_id: 0,
            seed: 1,
            shuffle: true,
            epochs: None,
        };
        let loader = PairLoader::new(Arc::new(d), lo, Placement::SINGLE).unwrap();
        let obj: Box<dyn Objective<Llama>> = Box::new(Dpo::new(&m, 0.1).unwrap());
        return Trainer::new(m, opt, loader, opts(steps))
            .unwrap()
            .with_objective(obj);
    }
    let sft = variant == "sft";
    let mut d = InMemoryDataset::new();
    for i in 0..2048u64 {
        // SFT: chats of 60-180 tokens whose first third is prompt.
        let len = if sft { 60 + (i * 37 % 121) } else { 400 };
        let t: Vec<u32> = (0..len).map(|j| tok(i, j)).collect();
        d.push(&t, if sft { t.len() / 3 } else { 0 });
    }
    let lo = LoaderOptions {
        seq_len: SEQ,
        rows_per_step: ROWS,
        packing: if sft {
            Packing::BestFit { window: 64 }
        } else {
            Packing::Concat
        },
        eos_id: Some(0),
        seed: 1,
        ..LoaderOptions::default()
    };
    let loader = Loader::new(Arc::new(d), lo, Placement::SINGLE).unwrap();
    let obj = if sft {
        CausalLm::packed()
    } else {
        CausalLm::pretrain()
    };
    Trainer::new(m, opt, loader, opts(steps))
        .unwrap()
        .with_objective(Box::new(obj))
}

/// Runs one variant in this process; prints `wall cpu` seconds per timed step.
fn run(variant: &str, steps: u64) {
    let mut t = trainer(variant, steps + 1);
    let start = Arc::new(std::sync::Mutex::new(None::<(Instant, f64)>));
    struct Mark(Arc<std::sync::Mutex<Option<(Instant, f64)>>>);
    impl eg_kernel::Callback for Mark {
        fn on_step_end(&mut self, m: &eg_kernel::StepMetrics) {
            if m.step == 1 {
                *self.0.lock().unwrap() = Some((Instant::now(), cpu_secs()));
            }
        }
    }
    t.add_callback(Box::new(Mark(start.clone())));
    t.fit().unwrap();
    let (w0, c0) = start.lock().unwrap().unwrap();
    let wall = w0.elapsed().as_secs_f64() / steps as f64;
    let cpu = (cpu_secs() - c0) / steps as f64;
    println!("{wall} {cpu}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("run") {
        let steps = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(STEPS);
        run(&args[2], steps);
        return;
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "small-llama (hidden 256, 4 layers, vocab {VOCAB}), {ROWS} rows x {SEQ} per step, {STEPS} timed steps, {} threads, load average {}",
        eg_kernel::compute_threads(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut base = (f64::NAN, f64::NAN);
    println!("| variant | wall s/step | CPU s/step | CPU vs pretrain |");
    println!("|---|---|---|---|");
    for v in VARIANTS {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["run", v, &STEPS.to_string()])
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        let mut it = s.split_whitespace().map(|x| x.parse::<f64>().unwrap());
        let (w, c) = (it.next().unwrap(), it.next().unwrap());
        if *v == "pretrain" {
            base = (w, c);
        }
        println!("| {v} | {w:.3} | {c:.3} | {:.2}x |", c / base.1);
    }
    println!(
        "load average after: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}
