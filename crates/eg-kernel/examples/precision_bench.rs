//! Step time and peak RSS of f32 vs bf16 vs f16 compute (f32 master weights, AdamW) with the
//! guarded trainer (issue 8). One precision per process, so the peak RSS (`VmHWM`) is that
//! run's:
//!
//! ```text
//! cargo build --release -p eg-kernel --example precision_bench
//! target/release/examples/precision_bench f32 110m 3
//! target/release/examples/precision_bench bf16 110m 3
//! target/release/examples/precision_bench f16 110m 3
//! target/release/examples/precision_bench gemm          # candle matmul per dtype
//! ```
//! `small` is builtin small-llama with a 32k vocabulary; `110m` is hidden 768, 12 layers, 12
//! heads, intermediate 2048, vocab 32000, tied embeddings (the configurations of
//! `lora_bench`). Arguments after the size: steps (default 3) and rows of 256 tokens per step
//! (default 4, one micro-batch). f16 runs with dynamic loss scaling (initial 65536). Step
//! times are wall and CPU (user + system, from `/proc/self/stat`) per step, first step
//! separately (it allocates).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/mod.rs"]
mod common;
use common::{adamw, bench_options, cpu_secs, status_kb, synthetic_loader};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use eg_kernel::{Callback, LossScaler, StepMetrics, Trainer};
use eg_model::{Llama, LlamaConfig};

const SEQ: usize = 256;

fn gemm() {
    // The shapes of a 110M step at 4 x 256 tokens: projections and the MLP.
    for (m, k, n) in [(1024, 768, 768), (1024, 768, 2048), (1024, 2048, 768)] {
        let mut line = format!("gemm {m}x{k} @ {k}x{n}:");
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let a = Tensor::ones((m, k), DType::F32, &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let b = Tensor::ones((k, n), DType::F32, &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let _ = a.matmul(&b).unwrap();
            let iters = 20;
            let t = Instant::now();
            for _ in 0..iters {
                let _ = a.matmul(&b).unwrap();
            }
            let s = t.elapsed().as_secs_f64() / iters as f64;
            let gflops = 2.0 * (m * k * n) as f64 / s / 1e9;
            line.push_str(&format!(" {dt:?} {gflops:.0} GFLOP/s"));
        }
        println!("{line}");
    }
    // The cast mixed precision adds: one f32 -> bf16 conversion of a 768 x 2048 weight.
    let w = Tensor::ones((2048, 768), DType::F32, &Device::Cpu).unwrap();
    for dt in [DType::BF16, DType::F16] {
        let t = Instant::now();
        for _ in 0..20 {
            let _ = w.to_dtype(dt).unwrap();
        }
        println!(
            "cast 2048x768 f32 -> {dt:?}: {:.2} ms",
            t.elapsed().as_secs_f64() / 20.0 * 1e3
        );
    }
}

/// Wall and CPU seconds of each step.
struct Times {
    wall: Arc<std::sync::Mutex<Vec<(f64, f64)>>>,
    cpu0: f64,
}

impl Callback for Times {
    fn on_step_start(&mut self, _step: u64) {
        self.cpu0 = cpu_secs();
    }

    fn on_step_end(&mut self, m: &StepMetrics) {
        let cpu = cpu_secs() - self.cpu0;
        self.wall.lock().unwrap().push((m.step_secs, cpu));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let prec = args.get(1).cloned().unwrap_or_else(|| "f32".into());
    if prec == "gemm" {
        gemm();
        return;
    }
    let size = args.get(2).cloned().unwrap_or_else(|| "small".into());
    let steps: u64 = args.get(3).map_or(3, |s| s.parse().unwrap());
    let rows: usize = args.get(4).map_or(4, |s| s.parse().unwrap());
    let cfg = match size.as_str() {
        "110m" => LlamaConfig {
            hidden_size: 768,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_key_value_heads: Some(12),
            vocab_size: 32000,
            max_position_embeddings: SEQ,
            tie_word_embeddings: true,
            ..LlamaConfig::tiny_for_tests()
        },
        _ => eg_model::builtin::config("small-llama", 32000, SEQ).unwrap(),
    };
    let dtype = match prec.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    let total = eg_model::analyze_llama(&cfg, DType::F32, SEQ).params;
    let mut model = Llama::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    model.set_compute_dtype(dtype).unwrap();
    let rss_start = status_kb("VmRSS:");
    let loader = synthetic_loader(SEQ, rows);
    let opt = adamw(&model);
    let o = bench_options(steps, rows);
    let mut t = Trainer::new(model, opt, loader, o).unwrap();
    if dtype == DType::F16 {
        t = t.with_loss_scaler(LossScaler::new(65536.0).unwrap());
    }
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    t.add_callback(Box::new(Times {
        wall: times.clone(),
        cpu0: 0.0,
    }));
    let r = t.fit().unwrap();
    let times = times.lock().unwrap().clone();
    let rest = &times[1.min(times.len())..];
    let (w, c) = rest
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let n = rest.len().max(1) as f64;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{prec} {size}: {:.1}M parameters, batch {rows}x{SEQ}, {} threads, {} steps: first step {:.2} s wall / {:.2} s CPU; later steps {:.2} s wall / {:.2} s CPU per step; peak RSS {:.0} MiB (RSS after building {:.0} MiB); last loss {:.4}; overflow skips {}; load {}",
        total as f64 / 1e6,
        eg_kernel::compute_threads(),
        r.steps,
        times.first().map_or(f64::NAN, |t| t.0),
        times.first().map_or(f64::NAN, |t| t.1),
        w / n,
        c / n,
        status_kb("VmHWM:") as f64 / 1024.0,
        rss_start as f64 / 1024.0,
        r.last_loss.unwrap_or(f64::NAN),
        r.state.loss_scaler.map_or(0, |s| s.overflows),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    );
}
