//! Step time and peak RSS of full fine-tuning vs LoRA vs QLoRA with the guarded trainer
//! (issue 7). One mode per process, so the peak RSS (`VmHWM`) is that mode's:
//!
//! ```text
//! cargo build --release -p eg-kernel --example lora_bench
//! target/release/examples/lora_bench full 110m
//! target/release/examples/lora_bench lora 110m
//! target/release/examples/lora_bench qlora 110m
//! ```
//! `small` is builtin small-llama with a 32k vocabulary (11M); `110m` is hidden 768, 12
//! layers, 12 heads, intermediate 2048, vocab 32000, tied embeddings (110M parameters); `1b`
//! has TinyLlama-1.1B's shapes (hidden 2048, 22 layers, 32 heads / 4 KV heads, intermediate
//! 5632, vocab 32000). An optional third argument sets the number of steps (default 4) and a
//! fourth the rows of 256 tokens per step (default 4). LoRA: rank 16, alpha 32,
//! all linear layers; QLoRA: the same on an NF4 (double-quantized) base.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/mod.rs"]
mod common;
use common::{adamw, bench_options, status_kb, synthetic_loader};
use std::time::Instant;

use candle_core::{DType, Device};
use eg_kernel::Trainer;
use eg_model::{Llama, LlamaConfig, LoraConfig, QuantKind};

const SEQ: usize = 256;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_else(|| "lora".into());
    let size = args.get(2).cloned().unwrap_or_else(|| "small".into());
    let steps: u64 = args.get(3).map_or(4, |s| s.parse().unwrap());
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
        // TinyLlama-1.1B shapes.
        "1b" => LlamaConfig {
            hidden_size: 2048,
            intermediate_size: 5632,
            num_hidden_layers: 22,
            num_attention_heads: 32,
            num_key_value_heads: Some(4),
            vocab_size: 32000,
            max_position_embeddings: SEQ,
            tie_word_embeddings: false,
            ..LlamaConfig::tiny_for_tests()
        },
        _ => eg_model::builtin::config("small-llama", 32000, SEQ).unwrap(),
    };
    let total = eg_model::analyze_llama(&cfg, DType::F32, SEQ).params;
    let lcfg = LoraConfig::rank(16).alpha(32.0).targets(["all-linear"]);
    let model = match mode.as_str() {
        "full" => Llama::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap(),
        "lora" => Llama::init(&cfg, 1, DType::F32, &Device::Cpu)
            .unwrap()
            .with_lora(&lcfg, 1)
            .unwrap(),
        // Quantized layer by layer: no dense copy of the whole base.
        _ => Llama::init_qlora(
            &cfg,
            1,
            DType::F32,
            &lcfg,
            QuantKind::Nf4 { double_quant: true },
            1,
        )
        .unwrap(),
    };
    let base_bytes = model.frozen_base_bytes();
    let trainable = model.params().num_elements();
    let after_build = status_kb("VmHWM:");
    // Reset the peak (Linux: "5" to clear_refs) so the figure below is the training's own,
    // not the dense f32 initialisation's before quantization.
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let rss_trained_from = status_kb("VmRSS:");
    let loader = synthetic_loader(SEQ, rows);
    let opt = adamw(&model);
    let o = bench_options(steps, rows);
    let mut t = Trainer::new(model, opt, loader, o).unwrap();
    let start = Instant::now();
    let r = t.fit().unwrap();
    let secs = start.elapsed().as_secs_f64() / r.steps as f64;
    println!(
        "{mode} {size}: {:.1}M parameters, {:.2}M trainable, frozen base {:.1} MiB, batch {rows}x{SEQ}, {} threads: {secs:.2} s/step over {} steps (incl. the first), peak RSS while training {:.0} MiB (peak reset: {reset}; RSS when training started {:.0} MiB; peak while building the model {:.0} MiB), last loss {:.4}",
        total as f64 / 1e6,
        trainable as f64 / 1e6,
        base_bytes as f64 / 1048576.0,
        eg_kernel::compute_threads(),
        r.steps,
        status_kb("VmHWM:") as f64 / 1024.0,
        rss_trained_from as f64 / 1024.0,
        after_build as f64 / 1024.0,
        r.last_loss.unwrap_or(f64::NAN),
    );
}
