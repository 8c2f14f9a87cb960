//! The fused training step (issue 9): same loss as the autograd path (bitwise), gradients
//! equal within rounding for every parameter, f64 central finite differences, and a typed
//! refusal for the settings it does not cover.

use candle_core::{DType, Device, Tensor};
use eg_model::attention::AttentionKind;
use eg_model::ops::{cross_entropy, next_token_targets};
use eg_model::{Error, Llama, LlamaConfig, LoraConfig, ModelType};

use crate::model::{batch, variants};

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Loss `weight × cross_entropy` and gradients through candle's autograd.
fn autograd(
    m: &Llama,
    ids: &Tensor,
    targets: &[Option<u32>],
    weight: f64,
) -> (f64, candle_core::backprop::GradStore) {
    let logits = m.forward(ids).unwrap();
    let loss = (cross_entropy(&logits, targets).unwrap() * weight).unwrap();
    let grads = loss.backward().unwrap();
    (flat(&loss)[0], grads)
}

fn eligible() -> Vec<(&'static str, LlamaConfig)> {
    let base = LlamaConfig::tiny_for_tests();
    vec![
        ("llama_gqa", base.clone()),
        (
            "llama_mha_tied",
            LlamaConfig {
                num_key_value_heads: None,
                tie_word_embeddings: true,
                ..base.clone()
            },
        ),
        (
            "mistral_window_longer_than_seq",
            LlamaConfig {
                model_type: ModelType::Mistral,
                sliding_window: Some(64),
                num_key_value_heads: Some(1),
                ..base
            },
        ),
    ]
}

/// Compares the fused step with autograd: loss bitwise in f32 on these shapes (same kernels;
/// the blocked products happen to round alike here), every parameter's gradient within `tol`
/// of the largest gradient entry.
fn compare(what: &str, m: &Llama, ids: &Tensor, targets: &[Option<u32>], tol: f64) {
    let (want_loss, want) = autograd(m, ids, targets, 0.75);
    let got = m.fused_step(ids, targets, 0.75).unwrap();
    // The forward-only loss (evaluation) is bitwise the step's.
    let (eval, count) = m.fused_loss(ids, targets, 0.75).unwrap();
    assert_eq!(
        (eval.to_bits(), count),
        (got.loss.to_bits(), got.count),
        "{what}: fused_loss"
    );
    if m.dtype() == DType::F32 {
        assert_eq!(
            (got.loss as f32).to_bits(),
            (want_loss as f32).to_bits(),
            "{what}: loss"
        );
    } else {
        assert!(
            (got.loss - want_loss).abs() <= 1e-14 * want_loss.abs(),
            "{what}: loss"
        );
    }
    for (name, var) in m.params().iter() {
        let a = flat(want.get(var.as_tensor()).unwrap());
        let b = flat(
            got.grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{what}: no fused gradient for {name}")),
        );
        assert_eq!(a.len(), b.len(), "{what}: {name} size");
        let scale = a.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{what}: {name} has a zero gradient");
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff <= tol * scale,
            "{what}: {name} differs by {diff:e} (largest entry {scale:e})"
        );
    }
}

#[test]
fn issue_9_fused_step_equals_autograd_in_f32_and_f64() {
    for (name, cfg) in eligible() {
        for (dtype, tol) in [(DType::F32, 2e-5), (DType::F64, 1e-12)] {
            let m = Llama::init(&cfg, 5, dtype, &Device::Cpu).unwrap();
            assert_eq!(m.fused_step_unavailable(8), None, "{name}");
            let ids = batch(&cfg, 3, 8, 2);
            let mut targets = next_token_targets(&ids, None, None).unwrap();
            // Some positions not counted (as a loss mask would make them).
            targets[3] = None;
            targets[10] = None;
            compare(&format!("{name} {dtype:?}"), &m, &ids, &targets, tol);
        }
    }
}

#[test]
fn issue_9_fused_step_with_no_counted_target_gives_zero_gradients() {
    let cfg = LlamaConfig::tiny_for_tests();
    let m = Llama::init(&cfg, 5, DType::F32, &Device::Cpu).unwrap();
    let ids = batch(&cfg, 2, 8, 1);
    let got = m.fused_step(&ids, &[None; 16], 1.0).unwrap();
    assert_eq!(got.loss, 0.0);
    for (_, var) in m.params().iter() {
        let g = flat(got.grads.get(var.as_tensor()).unwrap());
        assert!(g.iter().all(|&v| v == 0.0));
    }
}

#[test]
fn issue_9_fused_step_matches_finite_differences_in_f64() {
    let cfg = LlamaConfig {
        tie_word_embeddings: true,
        ..LlamaConfig::tiny_for_tests()
    };
    let m = Llama::init(&cfg, 9, DType::F64, &Device::Cpu).unwrap();
    let ids = batch(&cfg, 2, 6, 4);
    let targets = next_token_targets(&ids, None, None).unwrap();
    let got = m.fused_step(&ids, &targets, 1.0).unwrap();
    let loss_at = |m: &Llama| m.fused_step(&ids, &targets, 1.0).unwrap().loss;
    let h = 1e-6;
    for (name, var) in m.params().iter() {
        let g = flat(got.grads.get(var.as_tensor()).unwrap());
        let base = flat(var.as_tensor());
        // Three entries per parameter: the first, the largest gradient, the last.
        let big = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        for i in [0, big, g.len() - 1] {
            let mut v = base.clone();
            v[i] = base[i] + h;
            var.set(&Tensor::from_vec(v.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let up = loss_at(&m);
            v[i] = base[i] - h;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let down = loss_at(&m);
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let fd = (up - down) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() <= 1e-7 + 1e-5 * fd.abs(),
                "{name}[{i}]: finite difference {fd:e}, fused {:e}",
                g[i]
            );
        }
    }
}

#[test]
fn issue_9_fused_step_refuses_what_it_does_not_cover() {
    let ids = |cfg: &LlamaConfig| batch(cfg, 1, 8, 3);
    // Biases (Qwen2's q/k/v, attention_bias), a window shorter than the sequence.
    for (name, cfg) in variants() {
        let m = Llama::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
        let blocked = m.fused_step_unavailable(8);
        let expect_blocked = matches!(
            name,
            "qwen2" | "qwen2_tied" | "mistral_window" | "llama_attention_bias"
        );
        assert_eq!(blocked.is_some(), expect_blocked, "{name}: {blocked:?}");
        if expect_blocked {
            let t = next_token_targets(&ids(&cfg), None, None).unwrap();
            assert!(matches!(
                m.fused_step(&ids(&cfg), &t, 1.0),
                Err(Error::Unsupported { .. })
            ));
            assert!(matches!(
                m.fused_loss(&ids(&cfg), &t, 1.0),
                Err(Error::Unsupported { .. })
            ));
        }
    }
    let cfg = LlamaConfig::tiny_for_tests();
    let mut m = Llama::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    m.set_attention(AttentionKind::Chunked);
    assert!(m.fused_step_unavailable(8).is_some());
    m.set_attention(AttentionKind::Reference);
    m.set_compute_dtype(DType::BF16).unwrap();
    assert!(m.fused_step_unavailable(8).is_some());
    m.set_compute_dtype(DType::F32).unwrap();
    assert_eq!(m.fused_step_unavailable(8), None);
    let lora = m
        .with_lora(&LoraConfig::rank(2).targets(["q_proj"]), 1)
        .unwrap();
    assert!(lora.fused_step_unavailable(8).is_some());
}

#[test]
fn issue_9_fused_step_with_activation_checkpointing_is_bitwise_the_same() {
    for (name, cfg) in eligible() {
        let m = Llama::init(&cfg, 6, DType::F32, &Device::Cpu).unwrap();
        let ids = batch(&cfg, 2, 8, 5);
        let targets = next_token_targets(&ids, None, None).unwrap();
        let plain = m.fused_step(&ids, &targets, 0.5).unwrap();
        m.set_activation_checkpointing(true);
        assert_eq!(m.fused_step_unavailable(8), None);
        let ckpt = m.fused_step(&ids, &targets, 0.5).unwrap();
        m.set_activation_checkpointing(false);
        assert_eq!(plain.loss.to_bits(), ckpt.loss.to_bits(), "{name}: loss");
        for (pname, var) in m.params().iter() {
            let a = flat(plain.grads.get(var.as_tensor()).unwrap());
            let b = flat(ckpt.grads.get(var.as_tensor()).unwrap());
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name}: {pname}"
            );
        }
    }
}
