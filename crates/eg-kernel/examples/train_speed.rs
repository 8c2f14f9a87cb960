//! The eg side of `cargo xtask bench train` (issue 9): trains a Llama with this workspace's
//! model (`eg_model::Llama`, fused ops with backward) and optimizer (`eg_kernel::Optimizer`,
//! in-place AdamW) in f32 on the CPU, doing per step what the `Trainer` does (forward,
//! cross entropy and backward, through the model's fused step when it has one; gradients
//! read in place; global norm for clipping; optimizer update) without the guards, and prints
//! one line
//!
//! ```text
//! RESULT key=value key=value ...
//! ```
//!
//! that xtask parses; `benches/peers/train_llama.py` is the PyTorch side. Modes:
//!
//! ```text
//! train_speed train --hidden H --inter I --layers L --heads N --kv-heads K --vocab V
//!                   --seq S --batch B --steps T --warmup W --threads P [--spin-limit X]
//!                   [--tune 0|1]
//! train_speed matmul --n 2048 --threads P [--tune 0|1]
//! ```
//!
//! Like `eg train`, it applies `eg_kernel::tune_process` (allocator, thread-pool spinning)
//! at start unless `--tune 0`; `--spin-limit` overrides the spin limit it sets.
//!
//! Run in release: `cargo run --release -p eg-kernel --example train_speed -- train --threads 2`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/mod.rs"]
mod common;
use common::cpu_secs;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Storage, Tensor};
use eg_kernel::{Optimizer, OptimizerKind};
use eg_model::{Llama, LlamaConfig};

#[derive(Debug)]
struct Args {
    mode: String,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    seq: usize,
    batch: usize,
    steps: usize,
    warmup: usize,
    threads: usize,
    spin_limit: Option<u32>,
    tune: bool,
    n: usize,
    reps: usize,
    /// Use the model's fused training step (as the trainer does); 0: candle's autograd.
    fused: bool,
}

fn parse() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let mode = it
        .next()
        .context("usage: train_speed train|matmul [--key value]...")?;
    let mut a = Args {
        mode,
        hidden: 256,
        inter: 1024,
        layers: 4,
        heads: 8,
        kv_heads: 8,
        vocab: 8192,
        seq: 256,
        batch: 8,
        steps: 10,
        warmup: 2,
        threads: 0,
        spin_limit: None,
        tune: true,
        n: 2048,
        reps: 5,
        fused: true,
    };
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        let num = || -> Result<usize> { v.parse().with_context(|| format!("{k} {v}")) };
        match k.as_str() {
            "--hidden" => a.hidden = num()?,
            "--inter" => a.inter = num()?,
            "--layers" => a.layers = num()?,
            "--heads" => a.heads = num()?,
            "--kv-heads" => a.kv_heads = num()?,
            "--vocab" => a.vocab = num()?,
            "--seq" => a.seq = num()?,
            "--batch" => a.batch = num()?,
            "--steps" => a.steps = num()?,
            "--warmup" => a.warmup = num()?,
            "--threads" => a.threads = num()?,
            "--spin-limit" => a.spin_limit = Some(v.parse().context("--spin-limit")?),
            "--tune" => a.tune = num()? != 0,
            "--n" => a.n = num()?,
            "--reps" => a.reps = num()?,
            "--fused" => a.fused = num()? != 0,
            _ => bail!("unknown option {k}"),
        }
    }
    if a.threads == 0 {
        bail!("--threads is required");
    }
    if a.steps == 0 {
        bail!("--steps must be > 0");
    }
    Ok(a)
}

/// Peak resident set of this process (`VmHWM`), in bytes.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// A small deterministic generator (SplitMix64) for the token ids.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn train(a: &Args) -> Result<()> {
    let cfg = LlamaConfig {
        hidden_size: a.hidden,
        intermediate_size: a.inter,
        num_hidden_layers: a.layers,
        num_attention_heads: a.heads,
        num_key_value_heads: Some(a.kv_heads),
        vocab_size: a.vocab,
        max_position_embeddings: a.seq,
        tie_word_embeddings: true,
        ..LlamaConfig::tiny_for_tests()
    };
    let model = Llama::init(&cfg, 1, DType::F32, &Device::Cpu)?;
    let named: Vec<_> = model
        .params()
        .iter()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
    let shapes: Vec<_> = named
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    let vars: Vec<_> = named.iter().map(|(_, v)| v.clone()).collect();
    let n_params: usize = vars.iter().map(|v| v.elem_count()).sum();
    let kind = OptimizerKind::AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
    };
    let mut opt = Optimizer::new(kind, 0.1, &shapes)?;

    let mut rng = Rng(7);
    let batches: Vec<Vec<u32>> = (0..4)
        .map(|_| {
            (0..a.batch * (a.seq + 1))
                .map(|_| (rng.next() % a.vocab as u64) as u32)
                .collect()
        })
        .collect();
    let (mut fwd, mut bwd, mut gather, mut upd, mut total) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut losses = Vec::new();
    let mut cpu0 = 0.0;
    for step in 0..a.warmup + a.steps {
        if step == a.warmup {
            cpu0 = cpu_secs();
        }
        let rows = &batches[step % batches.len()];
        let mut ids = Vec::with_capacity(a.batch * a.seq);
        let mut targets = Vec::with_capacity(a.batch * a.seq);
        for r in rows.chunks(a.seq + 1) {
            ids.extend_from_slice(&r[..a.seq]);
            targets.extend(r[1..].iter().map(|&t| Some(t)));
        }
        let t0 = Instant::now();
        let ids = Tensor::from_vec(ids, (a.batch, a.seq), &Device::Cpu)?;
        let (loss_v, store, t1) = if a.fused {
            // What the trainer runs for this model: the fused step (hand-written backward).
            let s = model.fused_step(&ids, &targets, 1.0)?;
            let t1 = t0 + std::time::Duration::from_secs_f64(s.forward_seconds);
            (s.loss as f32, s.grads, t1)
        } else {
            let logits = model.forward(&ids)?;
            let loss = eg_model::ops::cross_entropy(&logits, &targets)?;
            let loss_v = loss.to_scalar::<f32>()?;
            let t1 = Instant::now();
            (loss_v, loss.backward()?, t1)
        };
        let t2 = Instant::now();
        // One micro-batch: the optimizer reads each gradient where candle (or the fused
        // step) left it, as the trainer does (`grads.rs`): no zeroing, no copy.
        let gs: Vec<Tensor> = named
            .iter()
            .map(|(name, var)| {
                store
                    .get(var.as_tensor())
                    .map(Tensor::contiguous)
                    .transpose()?
                    .with_context(|| format!("no gradient for {name}"))
            })
            .collect::<Result<_>>()?;
        let guards: Vec<_> = gs.iter().map(Tensor::storage_and_layout).collect();
        let mut slices: Vec<&[f32]> = Vec::with_capacity(guards.len());
        for (st, layout) in &guards {
            let Storage::Cpu(cpu) = &**st else {
                bail!("gradient not on the CPU")
            };
            let (a, b) = layout
                .contiguous_offsets()
                .context("gradient not contiguous")?;
            slices.push(&cpu.as_slice::<f32>()?[a..b]);
        }
        let t3 = Instant::now();
        let norm: f64 = slices
            .iter()
            .map(|g| eg_kernel::guards::sum_squares(g))
            .sum::<f64>()
            .sqrt();
        let scale = eg_kernel::guards::clip_factor(norm, Some(1.0));
        opt.step(&vars, &slices, 3e-4, scale)?;
        drop(slices);
        drop(guards);
        drop(gs);
        drop(store);
        let t4 = Instant::now();
        losses.push(loss_v);
        if step >= a.warmup {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
            gather.push((t3 - t2).as_secs_f64());
            upd.push((t4 - t3).as_secs_f64());
            total.push((t4 - t0).as_secs_f64());
        }
    }
    let cpu = cpu_secs() - cpu0;
    let tokens = a.batch * a.seq;
    let step_s = median(&total);
    println!(
        "RESULT side=eg fused={} threads={} params={n_params} tokens_per_step={tokens} steps={} \
         step_s={step_s:.6} fwd_s={:.6} bwd_s={:.6} gather_s={:.6} opt_s={:.6} \
         mean_step_s={:.6} min_step_s={:.6} tokens_per_s={:.3} cpu_s_per_step={:.6} peak_rss={} \
         first_loss={:.5} last_loss={:.5}",
        u8::from(a.fused),
        a.threads,
        a.steps,
        median(&fwd),
        median(&bwd),
        median(&gather),
        median(&upd),
        total.iter().sum::<f64>() / total.len() as f64,
        total.iter().copied().fold(f64::INFINITY, f64::min),
        tokens as f64 / step_s,
        cpu / a.steps as f64,
        peak_rss(),
        losses.first().copied().unwrap_or(f32::NAN),
        losses.last().copied().unwrap_or(f32::NAN),
    );
    Ok(())
}

fn matmul(a: &Args) -> Result<()> {
    let n = a.n;
    let x = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let y = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    x.matmul(&y)?;
    let mut best = f64::INFINITY;
    for _ in 0..a.reps {
        let t = Instant::now();
        let z = x.matmul(&y)?;
        best = best.min(t.elapsed().as_secs_f64());
        drop(z);
    }
    println!(
        "RESULT side=eg threads={} n={n} best_s={best:.6} gflops={:.3}",
        a.threads,
        2.0 * (n as f64).powi(3) / best / 1e9
    );
    Ok(())
}

fn main() -> Result<()> {
    let a = parse()?;
    // SAFETY: no other thread exists yet (nothing has touched candle, rayon or the gemm
    // pool), so nothing can read the environment concurrently. candle reads these two
    // variables when it starts its thread pools; there is no API to pass them.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", a.threads.to_string());
        if let Some(s) = a.spin_limit {
            std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", s.to_string());
        }
    }
    if a.tune {
        // SAFETY: as above; the spin limit set above counts as the user's and is kept.
        let t = unsafe { eg_kernel::tune_process(&eg_kernel::ProcessDefaults::default()) };
        eprintln!("process: {t}");
    }
    match a.mode.as_str() {
        "train" => train(&a),
        "matmul" => matmul(&a),
        m => bail!("unknown mode {m} (train or matmul)"),
    }
}
