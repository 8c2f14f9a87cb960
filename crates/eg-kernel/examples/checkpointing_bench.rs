//! Peak RSS and step time of the ~110M Llama with and without activation checkpointing
//! (issue 8), batch 4 × 512 tokens, f32, AdamW. One mode per process, so the peak RSS
//! (`VmHWM`, reset after the model is built) is that mode's:
//!
//! ```text
//! cargo build --release -p eg-kernel --example checkpointing_bench
//! target/release/examples/checkpointing_bench plain trainer
//! target/release/examples/checkpointing_bench ckpt trainer
//! target/release/examples/checkpointing_bench plain bare
//! target/release/examples/checkpointing_bench ckpt bare
//! ```
//!
//! `trainer` runs eg-kernel's guarded [`Trainer`] as `eg train` does (f32 gradient
//! accumulator, in-place AdamW, the rollback snapshot of weights and optimizer state, no
//! spike detector, no checkpoints on disk). `bare` is the minimal loop: forward, backward, the
//! gradients copied out of candle's store one tensor at a time, in-place AdamW; no snapshot.
//! Optional arguments: steps (default 2), rows (4), sequence length (512), size (`110m`, or
//! `small`: hidden 256, 4 layers, 8 heads, intermediate 688, vocabulary 4096, for quick runs).
//!
//! The model is the 110M configuration of `lora_bench`: hidden 768, 12 layers, 12 heads,
//! intermediate 2048, vocabulary 32000, tied embeddings (109.5M parameters).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/mod.rs"]
mod common;
use common::{adamw, cpu_secs, load1, status_kb, synthetic_docs_loader};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use eg_kernel::{Schedule, TrainModel, Trainer, TrainerOptions};
use eg_model::{Llama, LlamaConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_else(|| "ckpt".into());
    let lp = args.get(2).cloned().unwrap_or_else(|| "trainer".into());
    let steps: u64 = args.get(3).map_or(2, |s| s.parse().unwrap());
    let rows: usize = args.get(4).map_or(4, |s| s.parse().unwrap());
    let seq: usize = args.get(5).map_or(512, |s| s.parse().unwrap());
    let size = args.get(6).cloned().unwrap_or_else(|| "110m".into());
    assert!(
        matches!(mode.as_str(), "plain" | "ckpt"),
        "mode: plain or ckpt"
    );
    assert!(
        matches!(lp.as_str(), "trainer" | "bare"),
        "loop: trainer or bare"
    );
    let cfg = match size.as_str() {
        "110m" => LlamaConfig {
            hidden_size: 768,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_key_value_heads: Some(12),
            vocab_size: 32000,
            max_position_embeddings: seq,
            tie_word_embeddings: true,
            ..LlamaConfig::tiny_for_tests()
        },
        "small" => LlamaConfig {
            hidden_size: 256,
            intermediate_size: 688,
            num_hidden_layers: 4,
            num_attention_heads: 8,
            num_key_value_heads: Some(8),
            vocab_size: 4096,
            max_position_embeddings: seq,
            tie_word_embeddings: true,
            ..LlamaConfig::tiny_for_tests()
        },
        other => panic!("size: 110m or small, not {other}"),
    };
    let model = Llama::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    model.set_activation_checkpointing(mode == "ckpt");
    let n_params = model.params().num_elements();
    let after_build = status_kb("VmHWM:");
    // Reset the peak (Linux: "5" to clear_refs) so the figure below is the training's own.
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let ids = (cfg.vocab_size as u32 - 1).min(31_000);
    let mut loader = synthetic_docs_loader(seq, rows, 2000, 700, ids);
    let mut opt = adamw(&model);
    let cpu0 = cpu_secs();
    let start = Instant::now();
    let mut losses = Vec::new();
    if lp == "trainer" {
        let o = TrainerOptions {
            max_steps: steps,
            micro_batch_rows: rows,
            schedule: Schedule::constant(1e-4),
            spike: None,
            ..TrainerOptions::default()
        };
        let mut t = Trainer::new(model, opt, loader, o).unwrap();
        let r = t.fit().unwrap();
        assert_eq!(r.steps, steps);
        losses.push(r.last_loss.unwrap_or(f64::NAN));
    } else {
        let vars: Vec<_> = model.named_params().into_iter().map(|(_, v)| v).collect();
        for _ in 0..steps {
            let b = loader.next_batch().unwrap().unwrap();
            let ids = Tensor::from_slice(&b.input_ids, (b.rows, b.seq_len), &Device::Cpu).unwrap();
            let logits = model.forward(&ids).unwrap();
            let loss = model.next_token_loss(&logits, &ids, None).unwrap();
            losses.push(f64::from(loss.to_scalar::<f32>().unwrap()));
            let mut store = loss.backward().unwrap();
            drop((logits, loss));
            let grads: Vec<Vec<f32>> = vars
                .iter()
                .map(|v| {
                    let g = store
                        .remove(v.as_tensor())
                        .expect("every parameter has a gradient");
                    g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                })
                .collect();
            drop(store);
            opt.step(&vars, &grads, 1e-4, 1.0).unwrap();
        }
    }
    let secs = start.elapsed().as_secs_f64() / steps as f64;
    let cpu = (cpu_secs() - cpu0) / steps as f64;
    println!(
        "{mode} {lp}: {:.1}M parameters, batch {rows}x{seq}, {} threads, {steps} steps: \
         {secs:.2} s/step wall, {cpu:.2} CPU s/step, peak RSS while training {:.0} MiB \
         (peak reset: {reset}; peak while building {:.0} MiB), losses {losses:?}, load1 {}",
        n_params as f64 / 1e6,
        eg_kernel::compute_threads(),
        status_kb("VmHWM:") as f64 / 1024.0,
        after_build as f64 / 1024.0,
        load1(),
    );
}
