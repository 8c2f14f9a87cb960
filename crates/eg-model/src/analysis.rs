//! Layer analysis: parameters, bytes, FLOPs and activation memory per module, computed from
//! the configuration alone (the memory planner needs them before any tensor exists).
//!
//! - **Parameters and bytes** are exact: they are derived from the same tensor list the model
//!   is built from (a test checks them against real tensors).
//! - **FLOPs per token** count multiply-adds as 2 FLOPs in the forward pass: every linear
//!   layer (`2 · in · out`) and attention's two matrix products over the full
//!   `seq_len × seq_len` score matrix (`4 · seq_len · heads · head_dim`; this implementation
//!   computes the full matrix and masks it). Norms, RoPE and activations are left out (they
//!   are a few FLOPs per element, well under 1%). Training costs about 3× the forward.
//! - **Activation bytes per token** are the intermediate tensors this crate's forward pass
//!   creates and the autograd graph keeps alive until the backward pass (every one of them,
//!   since candle frees nothing early), at the parameters' element size.

use std::collections::BTreeMap;

use candle_core::DType;
use serde::Serialize;

use crate::config::LlamaConfig;
use crate::llama::expected_tensors;

/// Statistics of one module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModuleStats {
    /// Module name (Hugging Face prefix, e.g. `model.layers.0.self_attn`).
    pub name: String,
    /// Number of parameters.
    pub params: u64,
    /// Bytes of the parameters.
    pub param_bytes: u64,
    /// Forward FLOPs per token.
    pub flops_per_token: u64,
    /// Bytes of activations kept for the backward pass, per token.
    pub activation_bytes_per_token: u64,
}

/// Statistics of a whole model at a sequence length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Analysis {
    /// Sequence length the attention figures are for.
    pub seq_len: usize,
    /// Per-module statistics, in forward order.
    pub modules: Vec<ModuleStats>,
    /// Total parameters (a tied embedding counted once).
    pub params: u64,
    /// Parameter bytes by dtype name (e.g. `"f32"`).
    pub bytes_by_dtype: BTreeMap<String, u64>,
    /// Forward FLOPs per token.
    pub forward_flops_per_token: u64,
    /// Forward + backward FLOPs per token (3× the forward).
    pub training_flops_per_token: u64,
    /// Activation bytes per token kept for the backward pass.
    pub activation_bytes_per_token: u64,
}

fn module_of(name: &str) -> String {
    // model.layers.3.self_attn.q_proj.weight -> model.layers.3.self_attn
    // model.layers.3.input_layernorm.weight -> model.layers.3.input_layernorm
    let parts: Vec<&str> = name.split('.').collect();
    match parts.as_slice() {
        ["model", "layers", i, m, ..] => format!("model.layers.{i}.{m}"),
        _ => name
            .trim_end_matches(".weight")
            .trim_end_matches(".bias")
            .to_string(),
    }
}

/// Analyses a Llama-family configuration with parameters of type `dtype` at `seq_len`.
pub fn analyze_llama(cfg: &LlamaConfig, dtype: DType, seq_len: usize) -> Analysis {
    let s = dtype.size_in_bytes() as u64;
    let h = cfg.hidden_size as u64;
    let i = cfg.intermediate_size as u64;
    let hd = cfg.head_dim() as u64;
    let nh = cfg.num_attention_heads as u64;
    let nkv = cfg.num_kv_heads() as u64;
    let v = cfg.vocab_size as u64;
    let t = seq_len as u64;
    let biased = |b: bool| u64::from(b);

    let mut modules: Vec<ModuleStats> = Vec::new();
    for (name, shape, _) in expected_tensors(cfg) {
        let m = module_of(&name);
        let n: u64 = shape.iter().map(|&d| d as u64).product();
        match modules.iter_mut().find(|x| x.name == m) {
            Some(x) => {
                x.params += n;
                x.param_bytes += n * s;
            }
            None => modules.push(ModuleStats {
                name: m,
                params: n,
                param_bytes: n * s,
                flops_per_token: 0,
                activation_bytes_per_token: 0,
            }),
        }
    }
    for m in &mut modules {
        let leaf = m.name.rsplit('.').next().unwrap_or_default();
        let (flops, acts) = match leaf {
            "embed_tokens" => (0, h),
            "self_attn" => {
                let proj = 2 * h * (nh * hd + 2 * nkv * hd) + 2 * nh * hd * h;
                let attn = 4 * t * nh * hd;
                // q: linear, head-major copy, rotated; k: the same; v: linear, copy;
                // scores and probabilities; output and its token-major copy; o_proj.
                let acts = 3 * nh * hd
                    + 3 * nkv * hd
                    + 2 * nkv * hd
                    + 2 * nh * t
                    + 2 * nh * hd
                    + h
                    + biased(cfg.qkv_bias()) * (nh * hd + 2 * nkv * hd)
                    + biased(cfg.o_bias()) * h;
                (proj + attn, acts)
            }
            // gate, up, fused silu(gate) * up; down
            "mlp" => (2 * 3 * h * i, 3 * i + h),
            // the norm's output, plus the residual sum after it
            "input_layernorm" | "post_attention_layernorm" => (0, 2 * h),
            "norm" => (0, h),
            "lm_head" => (2 * h * v, v),
            _ => (0, 0),
        };
        m.flops_per_token = flops;
        m.activation_bytes_per_token = acts * s;
    }
    if cfg.tie_word_embeddings {
        // The head reuses the embedding: its compute and output still exist.
        modules.push(ModuleStats {
            name: "lm_head (tied)".to_string(),
            params: 0,
            param_bytes: 0,
            flops_per_token: 2 * h * v,
            activation_bytes_per_token: v * s,
        });
    }
    let params = modules.iter().map(|m| m.params).sum();
    let bytes: u64 = modules.iter().map(|m| m.param_bytes).sum();
    let forward: u64 = modules.iter().map(|m| m.flops_per_token).sum();
    let mut bytes_by_dtype = BTreeMap::new();
    bytes_by_dtype.insert(dtype.as_str().to_string(), bytes);
    Analysis {
        seq_len,
        params,
        bytes_by_dtype,
        forward_flops_per_token: forward,
        training_flops_per_token: 3 * forward,
        activation_bytes_per_token: modules.iter().map(|m| m.activation_bytes_per_token).sum(),
        modules,
    }
}

impl crate::Llama {
    /// [`analyze_llama`] for this model's configuration, dtype and a sequence length.
    pub fn analyze(&self, seq_len: usize) -> Analysis {
        analyze_llama(self.config(), self.dtype(), seq_len)
    }
}
