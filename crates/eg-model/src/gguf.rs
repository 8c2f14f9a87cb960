//! GGUF import: a llama.cpp checkpoint becomes a trainable [`Llama`].
//!
//! Tensors are dequantized (any GGML type candle reads: F32/F16/BF16, Q4_0/Q4_1/Q5_*/Q8_0,
//! K-quants) to f32 and renamed to Hugging Face names. llama.cpp's converter permutes the rows
//! of `attn_q`/`attn_k` so its interleaved RoPE reproduces Hugging Face's half-split one; the
//! import undoes that permutation, so the model runs with [`crate::ops::RopeLayout::HalfSplit`]
//! like a model loaded from safetensors (a test checks the logits against candle-transformers'
//! `quantized_llama`, which runs the permuted weights with interleaved RoPE).
//!
//! Supported: `general.architecture = "llama"` without `rope_freqs` (Llama 3.1 scaling).
//! The tokenizer stored in GGUF metadata is returned as raw metadata (see
//! [`GgufImport::tokenizer_metadata`]); building a tokenizer from it belongs to eg-data.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

use crate::config::{LlamaConfig, ModelType};
use crate::llama::Llama;
use crate::{Error, Result};

/// What a GGUF file imports to.
#[derive(Debug, Clone)]
pub struct GgufImport {
    /// The model, trainable, with Hugging Face tensor names.
    pub model: Llama,
    /// The `tokenizer.ggml.*` metadata (tokens, scores, token types, merges, special ids),
    /// as JSON values.
    pub tokenizer_metadata: BTreeMap<String, serde_json::Value>,
}

/// The GGUF architectures [`import_gguf`] accepts.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

fn to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::U8(x) => (*x).into(),
        Value::I8(x) => (*x).into(),
        Value::U16(x) => (*x).into(),
        Value::I16(x) => (*x).into(),
        Value::U32(x) => (*x).into(),
        Value::I32(x) => (*x).into(),
        Value::U64(x) => (*x).into(),
        Value::I64(x) => (*x).into(),
        Value::F32(x) => f64::from(*x).into(),
        Value::F64(x) => (*x).into(),
        Value::Bool(x) => (*x).into(),
        Value::String(x) => x.clone().into(),
        Value::Array(xs) => serde_json::Value::Array(xs.iter().map(to_json).collect()),
    }
}

/// Hugging Face name of a llama.cpp tensor (unknown names pass through unchanged and are
/// then reported as unexpected).
fn hf_name(name: &str) -> String {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return f.to_string();
    }
    if let Some(rest) = name.strip_prefix("blk.")
        && let Some((layer, leaf)) = rest.split_once('.')
    {
        let mapped = match leaf {
            "attn_norm.weight" => "input_layernorm.weight",
            "attn_q.weight" => "self_attn.q_proj.weight",
            "attn_k.weight" => "self_attn.k_proj.weight",
            "attn_v.weight" => "self_attn.v_proj.weight",
            "attn_output.weight" => "self_attn.o_proj.weight",
            "ffn_norm.weight" => "post_attention_layernorm.weight",
            "ffn_gate.weight" => "mlp.gate_proj.weight",
            "ffn_up.weight" => "mlp.up_proj.weight",
            "ffn_down.weight" => "mlp.down_proj.weight",
            _ => return name.to_string(),
        };
        return format!("model.layers.{layer}.{mapped}");
    }
    name.to_string()
}

/// Undoes llama.cpp's row permutation of a Q or K weight (`[heads * head_dim, in]`).
pub fn unpermute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inn) = w.dims2()?;
    if heads == 0 || !out.is_multiple_of(2 * heads) {
        return Err(Error::ShapeMismatch {
            tensor: "attn_q/attn_k weight".to_string(),
            expected: vec![heads * 2, inn],
            found: vec![out, inn],
        });
    }
    let hd = out / heads;
    Ok(w.reshape((heads, hd / 2, 2, inn))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inn))?)
}

/// The permutation llama.cpp's converter applies (the inverse of [`unpermute_qk`]); useful to
/// export GGUF and in tests.
pub fn permute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inn) = w.dims2()?;
    let hd = out / heads.max(1);
    Ok(w.reshape((heads, 2, hd / 2, inn))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inn))?)
}

/// Imports a GGUF file as a trainable model with parameters of type `dtype` on `device`.
///
/// A truncated or corrupt file is [`Error::Gguf`]; another architecture is
/// [`Error::UnsupportedModelType`]; a missing metadata key is [`Error::ConfigMissingField`].
pub fn import_gguf(path: &Path, dtype: DType, device: &Device) -> Result<GgufImport> {
    let gguf_err = |source| Error::Gguf {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = std::io::BufReader::new(file);
    let content = Content::read(&mut reader).map_err(gguf_err)?;
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(Error::UnsupportedModelType {
            found: arch,
            supported: SUPPORTED_ARCHITECTURES,
        });
    }
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(Error::Unsupported {
            what: "GGUF with rope_freqs (Llama 3.1 RoPE scaling)",
            issue: 4,
        });
    }
    let cfg = config_from_metadata(path, &content)?;
    let mut tensors = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let q = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(gguf_err)?;
        let mut t = q.dequantize(&Device::Cpu).map_err(gguf_err)?;
        if name.ends_with("attn_q.weight") {
            t = unpermute_qk(&t, cfg.num_attention_heads)?;
        } else if name.ends_with("attn_k.weight") {
            t = unpermute_qk(&t, cfg.num_kv_heads())?;
        }
        tensors.insert(hf_name(name), t.to_device(device)?);
    }
    let model = Llama::from_tensors(&cfg, tensors, dtype)?;
    let tokenizer_metadata = md
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), to_json(v)))
        .collect();
    Ok(GgufImport {
        model,
        tokenizer_metadata,
    })
}

fn config_from_metadata(path: &Path, content: &Content) -> Result<LlamaConfig> {
    let md = &content.metadata;
    let missing = |field: &'static str| Error::ConfigMissingField {
        path: PathBuf::from(path),
        field,
    };
    let get_usize = |key: &'static str| -> Result<usize> {
        md.get(key)
            .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
            .map(|v| v as usize)
            .ok_or_else(|| missing(key))
    };
    let hidden = get_usize("llama.embedding_length")?;
    let heads = get_usize("llama.attention.head_count")?;
    let kv_heads = get_usize("llama.attention.head_count_kv").unwrap_or(heads);
    let eps = md
        .get("llama.attention.layer_norm_rms_epsilon")
        .and_then(|v| v.to_f32().ok())
        .ok_or_else(|| missing("llama.attention.layer_norm_rms_epsilon"))?;
    let theta = md
        .get("llama.rope.freq_base")
        .and_then(|v| v.to_f32().ok())
        .unwrap_or(10_000.0);
    let vocab = content
        .tensor_infos
        .get("token_embd.weight")
        .and_then(|t| t.shape.dims().first().copied())
        .ok_or_else(|| Error::MissingTensors {
            names: vec!["token_embd.weight".to_string()],
        })?;
    let cfg = LlamaConfig {
        model_type: ModelType::Llama,
        hidden_size: hidden,
        intermediate_size: get_usize("llama.feed_forward_length")?,
        num_hidden_layers: get_usize("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        head_dim: None,
        rms_norm_eps: f64::from(eps),
        rope_theta: f64::from(theta),
        rope_scaling: None,
        vocab_size: vocab,
        max_position_embeddings: get_usize("llama.context_length")?,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: None,
        sliding_window: None,
        use_sliding_window: None,
        hidden_act: Some("silu".to_string()),
        extra: serde_json::Map::new(),
    };
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_round_trips() {
        let w = Tensor::arange(0f32, 96.0, &Device::Cpu)
            .unwrap()
            .reshape((12, 8))
            .unwrap();
        let p = permute_qk(&w, 3).unwrap();
        assert_ne!(
            p.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let back = unpermute_qk(&p, 3).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight"),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight"),
            "model.layers.0.mlp.down_proj.weight"
        );
        assert_eq!(hf_name("token_embd.weight"), "model.embed_tokens.weight");
        assert_eq!(hf_name("blk.0.mystery"), "blk.0.mystery");
    }
}
