//! Logits parity with candle-transformers' inference implementations (the reference), on
//! the same small random weights.

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama as ref_llama, qwen2 as ref_qwen2};
use eg_model::{Llama, LlamaConfig, ModelType};

use crate::common::max_abs_diff;
use crate::model::batch;

fn var_builder(model: &Llama) -> VarBuilder<'static> {
    let tensors: HashMap<String, Tensor> = model.params().tensors().into_iter().collect();
    VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)
}

/// candle-transformers' llama returns the logits of the last position only and keeps a
/// per-shape mask cache, so each prefix is run on its own with a fresh cache and no KV cache.
fn check_llama(cfg: &LlamaConfig, seed: u64) {
    let model = Llama::init(cfg, seed, DType::F32, &Device::Cpu).unwrap();
    // The reference's config is read from the same config.json text.
    let json = cfg.to_json_string().unwrap();
    let ref_cfg: ref_llama::LlamaConfig = serde_json::from_str(&json).unwrap();
    let ref_cfg = ref_cfg.into_config(false);
    let reference = ref_llama::Llama::load(var_builder(&model), &ref_cfg).unwrap();

    let ids = batch(cfg, 2, 7, 11);
    let ours = model.forward(&ids).unwrap();
    for t in 1..=7 {
        let mut cache = ref_llama::Cache::new(false, DType::F32, &ref_cfg, &Device::Cpu).unwrap();
        let prefix = ids.narrow(1, 0, t).unwrap();
        let theirs = reference.forward(&prefix, 0, &mut cache).unwrap();
        let mine = ours.i((.., t - 1, ..)).unwrap();
        let d = max_abs_diff(&mine, &theirs);
        assert!(d < 1e-4, "position {}: max |diff| = {d}", t - 1);
    }
}

#[test]
fn llama_logits_match_candle_transformers() {
    check_llama(&LlamaConfig::tiny_for_tests(), 1);
}

#[test]
fn llama_tied_logits_match_candle_transformers() {
    let cfg = LlamaConfig {
        tie_word_embeddings: true,
        num_key_value_heads: Some(1),
        ..LlamaConfig::tiny_for_tests()
    };
    check_llama(&cfg, 2);
}

#[test]
fn llama3_rope_scaling_logits_match_candle_transformers() {
    let text = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": 50,
        "max_position_embeddings": 64,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16, "rope_type": "llama3"}}"#;
    let cfg = LlamaConfig::from_json_str(text, std::path::Path::new("config.json")).unwrap();
    check_llama(&cfg, 3);
}

/// Initialisation sets biases to zero; random ones make the bias path count in the parity.
fn with_random_biases(model: Llama) -> Llama {
    let mut tensors: HashMap<String, Tensor> = model.params().tensors().into_iter().collect();
    let mut n = 0;
    for (i, (name, t)) in tensors.iter_mut().enumerate() {
        if name.ends_with(".bias") {
            *t = (crate::common::rand_t(100 + i as u64, t.dims(), DType::F32) * 0.5).unwrap();
            n += 1;
        }
    }
    assert!(n > 0, "the configuration has biases");
    Llama::from_tensors(model.config(), tensors, DType::F32).unwrap()
}

/// candle-transformers' qwen2 always appends to its KV cache, so the cache is cleared before
/// each prefix; it also returns the last position only.
fn check_qwen2(cfg: &LlamaConfig, seed: u64) {
    let model = with_random_biases(Llama::init(cfg, seed, DType::F32, &Device::Cpu).unwrap());
    let ref_cfg = ref_qwen2::Config {
        vocab_size: cfg.vocab_size,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        num_key_value_heads: cfg.num_kv_heads(),
        max_position_embeddings: cfg.max_position_embeddings,
        // The reference always applies its window; make it wider than any sequence here.
        sliding_window: cfg.max_position_embeddings,
        max_window_layers: cfg.num_hidden_layers,
        tie_word_embeddings: cfg.tie_word_embeddings,
        rope_theta: cfg.rope_theta,
        rms_norm_eps: cfg.rms_norm_eps,
        use_sliding_window: false,
        hidden_act: candle_nn::Activation::Silu,
    };
    let mut reference = ref_qwen2::ModelForCausalLM::new(&ref_cfg, var_builder(&model)).unwrap();
    let ids = batch(cfg, 2, 6, 5);
    let ours = model.forward(&ids).unwrap();
    for t in 1..=6 {
        reference.clear_kv_cache();
        let prefix = ids.narrow(1, 0, t).unwrap();
        let theirs = reference.forward(&prefix, 0).unwrap().squeeze(1).unwrap();
        let mine = ours.i((.., t - 1, ..)).unwrap();
        let d = max_abs_diff(&mine, &theirs);
        assert!(d < 1e-4, "position {}: max |diff| = {d}", t - 1);
    }
}

#[test]
fn qwen2_logits_match_candle_transformers() {
    let cfg = LlamaConfig {
        model_type: ModelType::Qwen2,
        rope_theta: 1_000_000.0,
        ..LlamaConfig::tiny_for_tests()
    };
    check_qwen2(&cfg, 4);
}

#[test]
fn qwen2_tied_logits_match_candle_transformers() {
    let cfg = LlamaConfig {
        model_type: ModelType::Qwen2,
        tie_word_embeddings: true,
        ..LlamaConfig::tiny_for_tests()
    };
    check_qwen2(&cfg, 5);
}

/// Mistral with a sliding window shorter than the sequence and a `head_dim` that is not
/// `hidden / heads`. candle-transformers' mistral lets query `i` see key `j` when
/// `i - j <= window`; Hugging Face (and this crate) when `i - j < window`: our window `w + 1`
/// equals its window `w`.
#[test]
fn mistral_sliding_window_and_head_dim_match_candle_transformers() {
    use candle_transformers::models::mistral as ref_mistral;
    let cfg = LlamaConfig {
        model_type: ModelType::Mistral,
        head_dim: Some(16),
        num_key_value_heads: Some(2),
        sliding_window: Some(4),
        ..LlamaConfig::tiny_for_tests()
    };
    let model = Llama::init(&cfg, 6, DType::F32, &Device::Cpu).unwrap();
    let ref_cfg = ref_mistral::Config {
        vocab_size: cfg.vocab_size,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        head_dim: cfg.head_dim,
        num_key_value_heads: cfg.num_kv_heads(),
        hidden_act: candle_nn::Activation::Silu,
        max_position_embeddings: cfg.max_position_embeddings,
        rms_norm_eps: cfg.rms_norm_eps,
        rope_theta: cfg.rope_theta,
        sliding_window: Some(3),
        use_flash_attn: false,
    };
    let mut reference = ref_mistral::Model::new(&ref_cfg, var_builder(&model)).unwrap();
    let ids = batch(&cfg, 2, 9, 8);
    let ours = model.forward(&ids).unwrap();
    for t in 1..=9 {
        reference.clear_kv_cache();
        let theirs = reference
            .forward(&ids.narrow(1, 0, t).unwrap(), 0)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let d = max_abs_diff(&ours.i((.., t - 1, ..)).unwrap(), &theirs);
        assert!(d < 1e-4, "position {}: max |diff| = {d}", t - 1);
    }
    // The window matters here: without it the last logits differ.
    let wide = Llama::from_tensors(
        &LlamaConfig {
            sliding_window: None,
            ..cfg.clone()
        },
        model.params().tensors().into_iter().collect(),
        DType::F32,
    )
    .unwrap();
    let d = max_abs_diff(&wide.forward(&ids).unwrap(), &ours);
    assert!(d > 1e-3, "{d}");
}
