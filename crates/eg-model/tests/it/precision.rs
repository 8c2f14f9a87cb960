//! Mixed precision (issue 8): f32 master weights, bf16/f16 compute through
//! `Llama::set_compute_dtype`. Every parameter gets an f32 gradient and the gradients stay
//! close to the f32 run's.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use eg_model::attention::AttentionKind;
use eg_model::{Llama, LlamaConfig, LoraConfig};

use crate::model::{batch, variants};

/// Gradients of the mean next-token loss, by parameter name, and the loss. Every gradient
/// must be finite and, unless it is a LoRA `A` (zero while `B` is zero at initialisation),
/// not all zero.
fn grads(model: &Llama, ids: &Tensor) -> (f64, HashMap<String, Vec<f64>>) {
    let logits = model.forward(ids).unwrap();
    assert_eq!(logits.dtype(), model.compute_dtype());
    let loss = model.next_token_loss(&logits, ids, None).unwrap();
    // The loss is f32 whatever the compute dtype.
    assert_eq!(loss.dtype(), DType::F32);
    let store = loss.backward().unwrap();
    let mut out = HashMap::new();
    for (name, var) in model.params().iter() {
        let g = store
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        // The gradient arrives in the master weight's dtype.
        assert_eq!(g.dtype(), DType::F32, "{name}");
        let v: Vec<f64> = g
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name}: non-finite");
        assert!(
            name.contains("lora_A") || v.iter().any(|&x| x != 0.0),
            "{name}: all zero"
        );
        out.insert(name.to_string(), v);
    }
    (f64::from(loss.to_scalar::<f32>().unwrap()), out)
}

/// `‖a − b‖ / ‖b‖`.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let n: f64 = b.iter().map(|y| y * y).sum();
    (d / n.max(1e-300)).sqrt()
}

/// Tolerances on the relative L2 error of each parameter's gradient against the f32 run:
/// bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ≈ 2e-3 per operation), f16 keeps 11
/// (2^-12 ≈ 2.4e-4); errors compound through two layers and the backward. Measured on these
/// models: bf16 ≤ 2.5e-2, f16 ≤ 5.7e-3 (worst parameter over all variants: a k_proj bias);
/// the loss within 6e-5 relative for both.
const TOL: [(DType, f64, f64); 2] = [(DType::BF16, 6e-2, 5e-3), (DType::F16, 1e-2, 1e-3)];

#[test]
fn half_compute_gradients_reach_every_f32_master_and_match_f32() {
    for (name, cfg) in variants() {
        let mut model = Llama::init(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
        let ids = batch(&cfg, 2, 8, 1);
        let (loss32, g32) = grads(&model, &ids);
        for (dtype, grad_tol, loss_tol) in TOL {
            model.set_compute_dtype(dtype).unwrap();
            assert_eq!(model.compute_dtype(), dtype);
            // The parameters themselves stay f32.
            assert!(model.params().iter().all(|(_, v)| v.dtype() == DType::F32));
            let (loss, g) = grads(&model, &ids);
            assert!(
                (loss - loss32).abs() / loss32 < loss_tol,
                "{name} {dtype:?}: loss {loss} vs f32 {loss32}"
            );
            let mut worst = (0.0, String::new());
            for (p, v32) in &g32 {
                let e = rel_err(&g[p], v32);
                if e > worst.0 {
                    worst = (e, p.clone());
                }
            }
            assert!(
                worst.0 < grad_tol,
                "{name} {dtype:?}: gradient of {} off by {:.3e} (relative L2), tolerance {grad_tol:e}",
                worst.1,
                worst.0
            );
        }
        model.set_compute_dtype(DType::F32).unwrap();
        assert_eq!(model.compute_dtype(), DType::F32);
    }
}

#[test]
fn half_compute_with_chunked_attention_and_lora() {
    let cfg = LlamaConfig::tiny_for_tests();
    let ids = batch(&cfg, 2, 8, 5);
    let base = Llama::init(&cfg, 4, DType::F32, &Device::Cpu).unwrap();
    let lcfg = LoraConfig::rank(4).alpha(8.0).targets(["all-linear"]);
    let mut lora = base.clone().with_lora(&lcfg, 1).unwrap();
    let mut chunked = base;
    chunked.set_attention(AttentionKind::Chunked);
    let (l32, g32) = grads(&chunked, &ids);
    let (_, gl32) = grads(&lora, &ids);
    for (dtype, grad_tol, _) in TOL {
        chunked.set_compute_dtype(dtype).unwrap();
        let (l, g) = grads(&chunked, &ids);
        assert!((l - l32).abs() / l32 < 1e-2, "{dtype:?}: {l} vs {l32}");
        for (p, v) in &g32 {
            let e = rel_err(&g[p], v);
            assert!(e < grad_tol, "chunked {dtype:?} {p}: {e:.3e}");
        }
        lora.set_compute_dtype(dtype).unwrap();
        // Only the adapters are parameters; each gets an f32 gradient (checked in `grads`).
        let (_, gl) = grads(&lora, &ids);
        assert_eq!(gl.len(), gl32.len());
        for (p, v) in &gl32 {
            let e = rel_err(&gl[p], v);
            assert!(e < grad_tol, "lora {dtype:?} {p}: {e:.3e}");
        }
    }
}

#[test]
fn compute_dtype_rejects_integers() {
    let mut model =
        Llama::init(&LlamaConfig::tiny_for_tests(), 1, DType::F32, &Device::Cpu).unwrap();
    let err = model.set_compute_dtype(DType::U32).unwrap_err();
    assert!(matches!(
        err,
        eg_model::Error::UnsupportedDType {
            dtype: DType::U32,
            ..
        }
    ));
}
