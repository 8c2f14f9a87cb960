//! GGUF import: llama.cpp-layout files written here from a known model, imported back, and
//! compared with the original and with candle-transformers' `quantized_llama`.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, IndexOp};
use candle_transformers::models::quantized_llama;
use eg_model::gguf::{import_gguf, permute_qk};
use eg_model::{Error, Llama, LlamaConfig};

use crate::common::max_abs_diff;
use crate::model::batch;

fn gguf_name(hf: &str) -> String {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return f.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, leaf) = rest.split_once('.').unwrap();
    let leaf = match leaf {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => panic!("{other}"),
    };
    format!("blk.{layer}.{leaf}")
}

/// Writes `model` as llama.cpp's converter would: GGUF names, permuted Q/K rows.
fn write_gguf(model: &Llama, path: &Path, qtype: GgmlDType, arch: &str) {
    let cfg = model.config();
    let mut tensors = Vec::new();
    for (name, t) in model.params().tensors() {
        let g = gguf_name(&name);
        let t = if g.ends_with("attn_q.weight") {
            permute_qk(&t, cfg.num_attention_heads).unwrap()
        } else if g.ends_with("attn_k.weight") {
            permute_qk(&t, cfg.num_kv_heads()).unwrap()
        } else {
            t
        };
        let q = if t.rank() == 2 { qtype } else { GgmlDType::F32 };
        tensors.push((g, QTensor::quantize(&t, q).unwrap()));
    }
    let u = |v: usize| Value::U32(v as u32);
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String(arch.to_string())),
        ("llama.embedding_length", u(cfg.hidden_size)),
        ("llama.feed_forward_length", u(cfg.intermediate_size)),
        ("llama.block_count", u(cfg.num_hidden_layers)),
        ("llama.attention.head_count", u(cfg.num_attention_heads)),
        ("llama.attention.head_count_kv", u(cfg.num_kv_heads())),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base", Value::F32(cfg.rope_theta as f32)),
        ("llama.rope.dimension_count", u(cfg.head_dim())),
        ("llama.context_length", u(cfg.max_position_embeddings)),
        (
            "tokenizer.ggml.tokens",
            Value::Array(
                (0..cfg.vocab_size)
                    .map(|i| Value::String(format!("t{i}")))
                    .collect(),
            ),
        ),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

fn tiny() -> LlamaConfig {
    LlamaConfig {
        rms_norm_eps: 1e-6,
        ..LlamaConfig::tiny_for_tests()
    }
}

#[test]
fn f32_gguf_imports_to_the_original_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    for tied in [false, true] {
        let cfg = LlamaConfig {
            tie_word_embeddings: tied,
            ..tiny()
        };
        let model = Llama::init(&cfg, 21, DType::F32, &Device::Cpu).unwrap();
        write_gguf(&model, &path, GgmlDType::F32, "llama");
        let imported = import_gguf(&path, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(imported.model.config().tie_word_embeddings, tied);
        let ids = batch(&cfg, 2, 6, 3);
        let d = max_abs_diff(
            &model.forward(&ids).unwrap(),
            &imported.model.forward(&ids).unwrap(),
        );
        assert_eq!(d, 0.0, "tied={tied}");
        let tokens = &imported.tokenizer_metadata["tokenizer.ggml.tokens"];
        assert_eq!(tokens.as_array().unwrap().len(), cfg.vocab_size);
    }
}

/// candle-transformers' quantized llama runs the *permuted* weights with interleaved RoPE:
/// agreeing with it checks the un-permutation independently of our own writer.
#[test]
fn imported_gguf_matches_candle_transformers_quantized_llama() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let cfg = tiny();
    let model = Llama::init(&cfg, 22, DType::F32, &Device::Cpu).unwrap();
    write_gguf(&model, &path, GgmlDType::F32, "llama");
    let ours = import_gguf(&path, DType::F32, &Device::Cpu).unwrap().model;
    let ids = batch(&cfg, 1, 6, 4);
    let logits = ours.forward(&ids).unwrap();
    for t in 1..=6 {
        // Its KV cache always grows: a fresh model per prefix.
        let mut f = std::fs::File::open(&path).unwrap();
        let content = gguf_file::Content::read(&mut f).unwrap();
        let mut reference =
            quantized_llama::ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
        let theirs = reference.forward(&ids.narrow(1, 0, t).unwrap(), 0).unwrap();
        let mine = logits.i((.., t - 1, ..)).unwrap();
        let d = max_abs_diff(&mine, &theirs);
        assert!(d < 1e-4, "position {}: max |diff| = {d}", t - 1);
    }
}

#[test]
fn q8_0_gguf_is_dequantized() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let cfg = tiny();
    let model = Llama::init(&cfg, 23, DType::F32, &Device::Cpu).unwrap();
    write_gguf(&model, &path, GgmlDType::Q8_0, "llama");
    let imported = import_gguf(&path, DType::F32, &Device::Cpu).unwrap().model;
    // Weights within Q8_0's quantization error (absmax/127 per block of 32).
    let a = model
        .params()
        .get("model.layers.1.self_attn.k_proj.weight")
        .unwrap();
    let b = imported
        .params()
        .get("model.layers.1.self_attn.k_proj.weight")
        .unwrap();
    let d = max_abs_diff(a.as_tensor(), b.as_tensor());
    assert!(d > 0.0 && d < 0.1 / 127.0, "{d}");
    // And the imported model trains: every parameter gets a gradient.
    let ids = batch(&cfg, 1, 5, 1);
    let logits = imported.forward(&ids).unwrap();
    let grads = imported
        .next_token_loss(&logits, &ids, None)
        .unwrap()
        .backward()
        .unwrap();
    assert!(
        imported
            .params()
            .iter()
            .all(|(_, v)| grads.get(v.as_tensor()).is_some())
    );
}

#[test]
fn truncated_gguf_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let model = Llama::init(&tiny(), 24, DType::F32, &Device::Cpu).unwrap();
    write_gguf(&model, &path, GgmlDType::F32, "llama");
    let len = std::fs::metadata(&path).unwrap().len();
    for cut in [len - 64, 20] {
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(cut).unwrap();
        let err = import_gguf(&path, DType::F32, &Device::Cpu).unwrap_err();
        assert!(matches!(err, Error::Gguf { .. }), "cut at {cut}: {err}");
    }
    std::fs::write(&path, b"not a gguf file at all").unwrap();
    assert!(matches!(
        import_gguf(&path, DType::F32, &Device::Cpu).unwrap_err(),
        Error::Gguf { .. }
    ));
}

#[test]
fn other_gguf_architectures_are_rejected_with_the_supported_list() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let model = Llama::init(&tiny(), 25, DType::F32, &Device::Cpu).unwrap();
    write_gguf(&model, &path, GgmlDType::F32, "falcon");
    match import_gguf(&path, DType::F32, &Device::Cpu).unwrap_err() {
        Error::UnsupportedModelType { found, supported } => {
            assert_eq!(found, "falcon");
            assert_eq!(supported, &["llama"]);
        }
        e => panic!("{e}"),
    }
}
