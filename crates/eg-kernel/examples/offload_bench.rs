//! Peak RSS and step time with the optimizer state in RAM vs in memory-mapped files
//! (eg-memory's `DiskStore`, issue #8). One store per process, so each peak RSS (`VmHWM`,
//! reset after the model is built) is that store's own:
//!
//! ```text
//! cargo build --release -p eg-kernel --example offload_bench
//! target/release/examples/offload_bench ram  [steps] [rows] [dir]
//! target/release/examples/offload_bench disk [steps] [rows] [dir]   # Flush::Lazy
//! target/release/examples/offload_bench eager [steps] [rows] [dir]  # Flush::Eager
//! target/release/examples/offload_bench disk 8 2 target/offload-bench 3  # checkpoint every 3
//! ```
//! The model is the ~110M Llama of `lora_bench` (hidden 768, 12 layers, 12 heads,
//! intermediate 2048, vocab 32000, tied embeddings), full fine-tuning with AdamW, so the
//! state is 2 × 4 × 110M ≈ 880 MB; sequences of 128 tokens, `rows` of them per step
//! (default 2), `steps` updates (default 8), offload files under `dir` (default
//! `target/offload-bench`); a fifth argument writes a checkpoint (background, into
//! `<dir>/checkpoints`, keep 1) every that many steps (default 0: none). Step time is the median of the steps after the first two;
//! CPU time is the process's (user + system, all threads, `/proc/self/stat`) per step over the
//! same steps. The 1-minute load average is printed with the figures.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/mod.rs"]
mod common;
use common::{ADAMW, bench_options, cpu_secs, load1, param_shapes, status_kb, synthetic_loader};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device};
use eg_kernel::{
    Callback, DiskStore, DiskStoreOptions, Optimizer, RamStore, StateStore, StepMetrics, Trainer,
    TrainerOptions,
};
use eg_memory::offload::Flush;
use eg_model::{Llama, LlamaConfig};

const SEQ: usize = 128;

/// Per step: wall seconds, process CPU seconds at its end, RSS (KiB) at its end, loss.
type Row = (f64, f64, u64, f64);

#[derive(Default)]
struct Record(Arc<Mutex<Vec<Row>>>);

impl Callback for Record {
    fn on_step_end(&mut self, m: &StepMetrics) {
        self.0
            .lock()
            .unwrap()
            .push((m.step_secs, cpu_secs(), status_kb("VmRSS:"), m.loss));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_else(|| "ram".into());
    let steps: u64 = args.get(2).map_or(8, |s| s.parse().unwrap());
    let rows: usize = args.get(3).map_or(2, |s| s.parse().unwrap());
    let dir = PathBuf::from(
        args.get(4)
            .cloned()
            .unwrap_or_else(|| "target/offload-bench".into()),
    );
    let ckpt_every: u64 = args.get(5).map_or(0, |s| s.parse().unwrap());
    let load_start = load1();
    let cfg = LlamaConfig {
        hidden_size: 768,
        intermediate_size: 2048,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        num_key_value_heads: Some(12),
        vocab_size: 32000,
        max_position_embeddings: SEQ,
        tie_word_embeddings: true,
        ..LlamaConfig::tiny_for_tests()
    };
    let model = Llama::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let params: usize = model.params().num_elements();
    // Reset the peak so the figure is the training's own (Linux: "5" to clear_refs).
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let rss_start = status_kb("VmRSS:");
    let loader = synthetic_loader(SEQ, rows);
    let shapes = param_shapes(&model);
    let store: Box<dyn StateStore> = match mode.as_str() {
        "ram" => Box::new(RamStore::new()),
        "disk" | "eager" => {
            let flush = if mode == "eager" {
                Flush::Eager
            } else {
                Flush::Lazy
            };
            let o = DiskStoreOptions {
                flush,
                ..DiskStoreOptions::default()
            };
            Box::new(DiskStore::create(&dir, o).unwrap())
        }
        other => panic!("unknown store {other:?}: ram, disk or eager"),
    };
    let opt = Optimizer::with_store(ADAMW, 0.01, &shapes, store).unwrap();
    let state_bytes = 2 * 4 * params as u64;
    let o = TrainerOptions {
        checkpoints: (ckpt_every > 0).then(|| eg_kernel::CheckpointOptions {
            dir: dir.join("checkpoints"),
            every: ckpt_every,
            keep_last: 1,
            keep_best: 0,
            background: true,
            write: Default::default(),
        }),
        snapshot_every: ckpt_every,
        ..bench_options(steps, rows)
    };
    let mut t = Trainer::new(model, opt, loader, o).unwrap();
    let rec = Record::default();
    let log = rec.0.clone();
    t.add_callback(Box::new(rec));
    let cpu0 = cpu_secs();
    let start = Instant::now();
    let r = t.fit().unwrap();
    let wall = start.elapsed().as_secs_f64();
    let log = log.lock().unwrap().clone();
    let skip = 2.min(log.len().saturating_sub(1));
    let mut times: Vec<f64> = log[skip..].iter().map(|x| x.0).collect();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let cpu_from = if skip > 0 { log[skip - 1].1 } else { cpu0 };
    let cpu_per_step = (log.last().unwrap().1 - cpu_from) / (log.len() - skip) as f64;
    let max_rss_step = log.iter().map(|x| x.2).max().unwrap_or(0);
    let losses: Vec<String> = log.iter().map(|x| format!("{:.6}", x.3)).collect();
    println!(
        "{mode}{}: {:.1}M parameters, AdamW state {:.0} MiB, batch {rows}x{SEQ}, {} threads, {} steps in {wall:.1} s: median step {median:.3} s, CPU {cpu_per_step:.3} s/step (steps {}..{}), peak RSS {:.0} MiB (reset: {reset}; RSS at start {:.0} MiB; max RSS at a step end {:.0} MiB), load1 {load_start} -> {}, losses [{}]",
        if ckpt_every > 0 {
            format!(" (checkpoint every {ckpt_every})")
        } else {
            String::new()
        },
        params as f64 / 1e6,
        state_bytes as f64 / 1048576.0,
        eg_kernel::compute_threads(),
        r.steps,
        skip + 1,
        log.len(),
        status_kb("VmHWM:") as f64 / 1024.0,
        rss_start as f64 / 1024.0,
        max_rss_step as f64 / 1024.0,
        load1(),
        losses.join(", "),
    );
}
