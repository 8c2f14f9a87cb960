//! Chunked (flash-style) attention against the reference and finite differences, for every
//! mask kind (issue 7).

use candle_core::{DType, Tensor, Var};
use eg_model::attention::{AttentionMask, chunked_attention_with_block, reference_attention};

use crate::common::{max_abs_diff, rand_t};
use crate::ops::fd_check;

/// Causal; padding (with a query that sees no key); packed documents; all combined;
/// no mask.
fn masks(b: usize, t: usize) -> Vec<(&'static str, AttentionMask)> {
    let valid: Vec<bool> = (0..b * t).map(|p| p % t != 0 && p % 5 != 3).collect();
    let docs: Vec<u32> = (0..b * t).map(|p| ((p % t) * 3 / t) as u32).collect();
    vec![
        ("none", AttentionMask::default()),
        ("causal", AttentionMask::causal()),
        (
            "padding",
            AttentionMask {
                key_valid: Some(valid.clone()),
                ..AttentionMask::default()
            },
        ),
        (
            "causal+padding",
            AttentionMask {
                causal: true,
                key_valid: Some(valid.clone()),
                ..AttentionMask::default()
            },
        ),
        (
            "documents",
            AttentionMask {
                causal: true,
                doc_ids: Some(docs.clone()),
                ..AttentionMask::default()
            },
        ),
        (
            "documents+padding",
            AttentionMask {
                causal: true,
                key_valid: Some(valid),
                doc_ids: Some(docs),
            },
        ),
    ]
}

#[test]
fn chunked_attention_equals_reference_for_every_mask() {
    let (b, h, hkv, t, d) = (2, 4, 2, 19, 8);
    for dtype in [DType::F64, DType::F32] {
        for (name, mask) in masks(b, t) {
            let q = Var::from_tensor(&rand_t(1, &[b, h, t, d], dtype)).unwrap();
            let k = Var::from_tensor(&rand_t(2, &[b, hkv, t, d], dtype)).unwrap();
            let v = Var::from_tensor(&rand_t(3, &[b, hkv, t, d], dtype)).unwrap();
            let r = rand_t(4, &[b, h, t, d], dtype);
            let scale = 1.0 / (d as f64).sqrt();
            let run = |chunked: bool| {
                let y = if chunked {
                    chunked_attention_with_block(&q, &k, &v, &mask, scale, 4).unwrap()
                } else {
                    reference_attention(&q, &k, &v, &mask, scale).unwrap()
                };
                let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let grads: Vec<Tensor> = [&q, &k, &v]
                    .iter()
                    .map(|x| g.get(x.as_tensor()).unwrap().clone())
                    .collect();
                (y, grads)
            };
            let (y0, g0) = run(false);
            let (y1, g1) = run(true);
            let d = max_abs_diff(&y0, &y1);
            assert!(d <= 1e-5, "{name} {dtype:?}: output differs by {d}");
            for (i, (a, c)) in g0.iter().zip(&g1).enumerate() {
                let d = max_abs_diff(a, c);
                assert!(d <= 1e-5, "{name} {dtype:?}: grad {i} differs by {d}");
            }
        }
    }
}

#[test]
fn chunked_attention_backward_matches_finite_differences() {
    let (b, h, hkv, t, d) = (1, 2, 1, 6, 3);
    for (_, mask) in masks(b, t) {
        let q = rand_t(5, &[b, h, t, d], DType::F64);
        let k = rand_t(6, &[b, hkv, t, d], DType::F64);
        let v = rand_t(7, &[b, hkv, t, d], DType::F64);
        fd_check(
            &|x: &[Tensor]| {
                chunked_attention_with_block(&x[0], &x[1], &x[2], &mask, 0.7, 4).unwrap()
            },
            &[q, k, v],
            &[0, 1, 2],
        );
    }
}

#[test]
fn llama_with_chunked_attention_matches_reference() {
    use candle_core::Device;
    use eg_model::attention::AttentionKind;
    use eg_model::{Llama, LlamaConfig, LoraConfig};
    let cfg = LlamaConfig::tiny_for_tests();
    let base = Llama::init(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let ids = crate::model::batch(&cfg, 2, 11, 4);
    let run = |kind| {
        let mut m = base
            .clone()
            .with_lora(&LoraConfig::rank(2).targets(["all-linear"]), 1)
            .unwrap();
        m.set_attention(kind);
        for (i, (_, v)) in m.params().iter().enumerate() {
            v.set(&(rand_t(i as u64, v.dims(), DType::F32) * 0.1).unwrap())
                .unwrap();
        }
        let logits = m.forward(&ids).unwrap();
        let loss = m.next_token_loss(&logits, &ids, None).unwrap();
        let g = loss.backward().unwrap();
        let grads: Vec<Tensor> = m
            .params()
            .iter()
            .map(|(_, v)| g.get(v.as_tensor()).unwrap().clone())
            .collect();
        (logits, grads)
    };
    let (l0, g0) = run(AttentionKind::Reference);
    let (l1, g1) = run(AttentionKind::Chunked);
    assert!(max_abs_diff(&l0, &l1) < 1e-5);
    for (a, b) in g0.iter().zip(&g1) {
        assert!(max_abs_diff(a, b) < 1e-5);
    }
    assert!(AttentionKind::Auto.use_chunked(4096, None));
    assert!(!AttentionKind::Auto.use_chunked(128, None));
    assert!(!AttentionKind::Chunked.use_chunked(4096, Some(256)));
}

/// Packed rows (issue 6): with document masks and restarting positions, every document of a
/// packed row gets exactly the logits it gets alone, and padding does not leak into it.
#[test]
fn packed_forward_equals_each_document_alone() {
    use candle_core::Device;
    use eg_model::{Llama, LlamaConfig};
    let cfg = LlamaConfig::tiny_for_tests();
    let m = Llama::init(&cfg, 9, DType::F64, &Device::Cpu).unwrap();
    let a: Vec<u32> = vec![3, 9, 4, 17, 2];
    let b: Vec<u32> = vec![8, 1, 30, 30, 5, 6, 11];
    let mut ids = a.clone();
    ids.extend(&b);
    ids.extend([0u32; 4]);
    let pos: Vec<u32> = (0..5).chain(0..7).chain([0; 4]).collect();
    let docs: Vec<u32> = [0u32; 5].into_iter().chain([1; 7]).chain([2; 4]).collect();
    let t = ids.len();
    let dev = Device::Cpu;
    let packed = m
        .forward_packed(
            &Tensor::from_vec(ids, (1, t), &dev).unwrap(),
            &Tensor::from_vec(pos, (1, t), &dev).unwrap(),
            &docs,
        )
        .unwrap();
    let alone = |d: &[u32]| {
        m.forward(&Tensor::from_slice(d, (1, d.len()), &dev).unwrap())
            .unwrap()
    };
    let pa = packed.narrow(1, 0, 5).unwrap();
    let pb = packed.narrow(1, 5, 7).unwrap();
    assert!(max_abs_diff(&pa, &alone(&a)) < 1e-10);
    assert!(max_abs_diff(&pb, &alone(&b)) < 1e-10);
    // Without document masks the second document sees the first: different logits.
    let plain = m
        .forward(&Tensor::from_vec([a.clone(), b.clone()].concat(), (1, 12), &dev).unwrap())
        .unwrap();
    assert!(max_abs_diff(&plain.narrow(1, 5, 7).unwrap(), &alone(&b)) > 1e-6);
    let wrong = m.forward_packed(
        &Tensor::from_vec(vec![1u32; 4], (1, 4), &dev).unwrap(),
        &Tensor::from_vec(vec![0u32; 4], (1, 4), &dev).unwrap(),
        &[0, 0],
    );
    assert!(wrong.is_err());
}
