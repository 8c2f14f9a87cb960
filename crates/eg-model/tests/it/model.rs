//! The trainable Llama family: gradient coverage, determinism, training steps.

use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;
use eg_model::{Llama, LlamaConfig, ModelType};

pub(crate) fn variants() -> Vec<(&'static str, LlamaConfig)> {
    let llama = LlamaConfig::tiny_for_tests();
    let tied = LlamaConfig {
        tie_word_embeddings: true,
        ..llama.clone()
    };
    let qwen2 = LlamaConfig {
        model_type: ModelType::Qwen2,
        rope_theta: 1_000_000.0,
        ..llama.clone()
    };
    let qwen2_tied = LlamaConfig {
        tie_word_embeddings: true,
        ..qwen2.clone()
    };
    let mistral = LlamaConfig {
        model_type: ModelType::Mistral,
        sliding_window: Some(3),
        num_key_value_heads: Some(1),
        ..llama.clone()
    };
    let llama_bias = LlamaConfig {
        attention_bias: Some(true),
        num_key_value_heads: None,
        ..llama.clone()
    };
    vec![
        ("llama", llama),
        ("llama_tied", tied),
        ("qwen2", qwen2),
        ("qwen2_tied", qwen2_tied),
        ("mistral_window", mistral),
        ("llama_attention_bias", llama_bias),
    ]
}

pub(crate) fn batch(cfg: &LlamaConfig, b: usize, t: usize, seed: u32) -> Tensor {
    let ids: Vec<u32> = (0..(b * t) as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 7) % cfg.vocab_size as u32)
        .collect();
    Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap()
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() {
    for (name, cfg) in variants() {
        let model = Llama::init(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
        let ids = batch(&cfg, 2, 8, 1);
        let logits = model.forward(&ids).unwrap();
        assert_eq!(logits.dims(), &[2, 8, cfg.vocab_size]);
        let loss = model.next_token_loss(&logits, &ids, None).unwrap();
        let grads = loss.backward().unwrap();
        let mut n = 0;
        for (pname, var) in model.params().iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: {pname} has no gradient"));
            let v: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{name}: {pname} non-finite"
            );
            assert!(v.iter().any(|&x| x != 0.0), "{name}: {pname} all zero");
            n += 1;
        }
        let expected = 2
            + cfg.num_hidden_layers * 9
            + usize::from(!cfg.tie_word_embeddings)
            + if cfg.qkv_bias() {
                3 * cfg.num_hidden_layers
            } else {
                0
            }
            + if cfg.o_bias() {
                cfg.num_hidden_layers
            } else {
                0
            };
        assert_eq!(n, expected, "{name}: parameter count");
    }
}

#[test]
fn init_is_deterministic_per_seed() {
    let cfg = LlamaConfig::tiny_for_tests();
    let ids = batch(&cfg, 1, 5, 2);
    let run = |seed| {
        Llama::init(&cfg, seed, DType::F32, &Device::Cpu)
            .unwrap()
            .forward(&ids)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));
}

#[test]
fn loss_mask_and_ignore_index_are_respected() {
    let cfg = LlamaConfig::tiny_for_tests();
    let model = Llama::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let ids = batch(&cfg, 1, 6, 3);
    let logits = model.forward(&ids).unwrap();
    // Masking every predicted position but one equals ignoring those labels.
    let mask = Tensor::new(&[[1u8, 0, 0, 1, 0, 0]], &Device::Cpu).unwrap();
    let a = model.next_token_loss(&logits, &ids, Some(&mask)).unwrap();
    let mut labels: Vec<i64> = ids
        .flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1()
        .unwrap();
    for i in [1, 2, 4, 5] {
        labels[i] = -100;
    }
    let labels = Tensor::from_vec(labels, (1, 6), &Device::Cpu).unwrap();
    let b = model.next_token_loss(&logits, &labels, None).unwrap();
    assert_eq!(a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
}

#[test]
fn a_few_adamw_steps_lower_the_loss_and_move_every_parameter() {
    let cfg = LlamaConfig {
        model_type: ModelType::Qwen2,
        ..LlamaConfig::tiny_for_tests()
    };
    let model = Llama::init(&cfg, 9, DType::F32, &Device::Cpu).unwrap();
    // `tensors()` shares storage with the variables, which the optimizer updates in place.
    let before: std::collections::BTreeMap<String, Tensor> = model
        .params()
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.copy().unwrap()))
        .collect();
    let ids = batch(&cfg, 2, 12, 4);
    let mut opt = candle_nn::AdamW::new_lr(model.params().vars(), 1e-2).unwrap();
    let mut losses = Vec::new();
    for _ in 0..8 {
        let logits = model.forward(&ids).unwrap();
        let loss = model.next_token_loss(&logits, &ids, None).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.backward_step(&loss).unwrap();
    }
    assert!(losses[7] < losses[0] * 0.8, "{losses:?}");
    for (name, var) in model.params().iter() {
        let d = crate::common::max_abs_diff(&before[name], var.as_tensor());
        assert!(d > 0.0, "{name} did not move");
    }
}

#[test]
fn sequence_longer_than_position_tables_is_an_error() {
    let cfg = LlamaConfig {
        max_position_embeddings: 4,
        ..LlamaConfig::tiny_for_tests()
    };
    let model = Llama::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let err = model.forward(&batch(&cfg, 1, 5, 0)).unwrap_err();
    assert!(matches!(
        err,
        eg_model::Error::SequenceTooLong { len: 5, max: 4 }
    ));
}

#[test]
fn analysis_counts_equal_the_real_tensors() {
    for (name, cfg) in variants() {
        for dtype in [DType::F32, DType::BF16] {
            let model = Llama::init(&cfg, 1, dtype, &Device::Cpu).unwrap();
            let a = model.analyze(16);
            let real: usize = model.params().iter().map(|(_, v)| v.elem_count()).sum();
            assert_eq!(a.params, real as u64, "{name}");
            let bytes = (real * dtype.size_in_bytes()) as u64;
            assert_eq!(a.bytes_by_dtype[dtype.as_str()], bytes, "{name}");
            for (pname, var) in model.params().iter() {
                let owner = a
                    .modules
                    .iter()
                    .find(|m| pname.starts_with(&format!("{}.", m.name)))
                    .unwrap_or_else(|| panic!("{name}: {pname} belongs to no module"));
                assert!(owner.params >= var.elem_count() as u64);
            }
            // Forward FLOPs: 2 per weight of every matrix used as a linear layer (the
            // embedding lookup costs none, a tied head uses it once), plus attention.
            let matmul_params: usize = model
                .params()
                .iter()
                .filter(|(n, v)| v.rank() == 2 && *n != "model.embed_tokens.weight")
                .map(|(_, v)| v.elem_count())
                .sum();
            let head = if cfg.tie_word_embeddings {
                cfg.vocab_size * cfg.hidden_size
            } else {
                0
            };
            let attn = cfg.num_hidden_layers * 4 * 16 * cfg.num_attention_heads * cfg.head_dim();
            assert_eq!(
                a.forward_flops_per_token,
                (2 * (matmul_params + head) + attn) as u64
            );
        }
    }
}

#[test]
fn token_ids_outside_the_vocabulary_are_errors_not_panics() {
    let cfg = LlamaConfig::tiny_for_tests();
    let model = Llama::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, cfg.vocab_size as u32]], &Device::Cpu).unwrap();
    assert!(matches!(
        model.forward(&ids),
        Err(eg_model::Error::TokenOutOfRange { id: 64, vocab: 64 })
    ));
    let neg = Tensor::new(&[[1i64, -1]], &Device::Cpu).unwrap();
    assert!(matches!(
        model.forward(&neg),
        Err(eg_model::Error::TokenOutOfRange { id: -1, .. })
    ));
}

#[test]
fn gradient_coverage_reports_what_candle_fused_ops_drop() {
    let cfg = LlamaConfig::tiny_for_tests();
    let model = Llama::init(&cfg, 2, DType::F32, &Device::Cpu).unwrap();
    let ids = batch(&cfg, 1, 6, 2);
    let logits = model.forward(&ids).unwrap();
    let grads = model
        .next_token_loss(&logits, &ids, None)
        .unwrap()
        .backward()
        .unwrap();
    assert!(
        model
            .params()
            .gradient_coverage(&grads)
            .unwrap()
            .is_complete()
    );
    // A loss through candle's fused softmax (no backward) reaches no parameter at all.
    let probs = candle_nn::ops::softmax_last_dim(&logits).unwrap();
    let grads = probs.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let cov = model.params().gradient_coverage(&grads).unwrap();
    assert_eq!(cov.missing.len(), model.params().len());
}

#[test]
fn set_values_restores_a_snapshot_and_rejects_bad_input() {
    let cfg = LlamaConfig::tiny_for_tests();
    let a = Llama::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let b = Llama::init(&cfg, 2, DType::F32, &Device::Cpu).unwrap();
    let snapshot: std::collections::HashMap<String, Tensor> =
        a.params().tensors().into_iter().collect();
    b.params().set_values(&snapshot).unwrap();
    let ids = batch(&cfg, 1, 5, 1);
    let d = crate::common::max_abs_diff(&a.forward(&ids).unwrap(), &b.forward(&ids).unwrap());
    assert_eq!(d, 0.0);
    let mut bad = snapshot.clone();
    bad.remove("model.norm.weight");
    assert!(matches!(
        b.params().set_values(&bad),
        Err(eg_model::Error::MissingTensors { .. })
    ));
    let mut bad = snapshot;
    bad.insert(
        "model.norm.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(matches!(
        b.params().set_values(&bad),
        Err(eg_model::Error::ShapeMismatch { .. })
    ));
}

#[test]
fn explicit_positions_match_default_and_restart_per_document() {
    let cfg = LlamaConfig::tiny_for_tests();
    let model = Llama::init(&cfg, 4, DType::F32, &Device::Cpu).unwrap();
    let ids = batch(&cfg, 2, 6, 9);
    let default = model.forward(&ids).unwrap();
    let pos = Tensor::new(&[[0u32, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]], &Device::Cpu).unwrap();
    let explicit = model.forward_with_positions(&ids, Some(&pos)).unwrap();
    assert_eq!(crate::common::max_abs_diff(&default, &explicit), 0.0);
    // A packed row: the first document is unaffected by what follows (causal mask).
    let packed = Tensor::new(&[[0u32, 1, 2, 0, 1, 2]], &Device::Cpu).unwrap();
    let row = ids.narrow(0, 0, 1).unwrap();
    let a = model.forward_with_positions(&row, Some(&packed)).unwrap();
    let b = model.forward(&row.narrow(1, 0, 3).unwrap()).unwrap();
    assert!(crate::common::max_abs_diff(&a.narrow(1, 0, 3).unwrap(), &b) < 1e-6);
    let too_far = Tensor::new(&[[0u32, 1, 2, 0, 1, 128]], &Device::Cpu).unwrap();
    assert!(model.forward_with_positions(&row, Some(&too_far)).is_err());
    // Gradients flow with explicit positions too.
    let logits = model.forward_with_positions(&row, Some(&packed)).unwrap();
    let grads = model
        .next_token_loss(&logits, &row, None)
        .unwrap()
        .backward()
        .unwrap();
    assert!(
        model
            .params()
            .gradient_coverage(&grads)
            .unwrap()
            .is_complete()
    );
}
