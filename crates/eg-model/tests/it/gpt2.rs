//! GPT-2: gradient coverage, parity with an independent composite reference (candle-
//! transformers has no GPT-2: its `bigcode` multi-head path cannot load one), HF loading.

use std::collections::BTreeMap;

use candle_core::{D, DType, Device, Tensor};
use eg_model::{CausalLm, Error, Gpt2, Gpt2Config};

use crate::common::max_abs_diff;

fn ids(cfg: &Gpt2Config, b: usize, t: usize) -> Tensor {
    let v: Vec<u32> = (0..(b * t) as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 9) % cfg.vocab_size as u32)
        .collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

fn untied() -> Gpt2Config {
    Gpt2Config {
        tie_word_embeddings: false,
        n_inner: Some(48),
        ..Gpt2Config::tiny_for_tests()
    }
}

#[test]
fn every_gpt2_parameter_gets_a_finite_nonzero_gradient() {
    for cfg in [Gpt2Config::tiny_for_tests(), untied()] {
        let model = Gpt2::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
        let x = ids(&cfg, 2, 9);
        let logits = model.forward(&x).unwrap();
        let loss = model.next_token_loss(&logits, &x, None).unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in model.params().iter() {
            let g: Vec<f32> = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} has no gradient"))
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(g.iter().all(|v| v.is_finite()), "{name}");
            assert!(g.iter().any(|&v| v != 0.0), "{name} all zero");
        }
        assert_eq!(
            model.params().len(),
            4 + 12 * cfg.n_layer + usize::from(!cfg.tie_word_embeddings)
        );
    }
}

fn ln(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    let mu = x.mean_keepdim(D::Minus1).unwrap();
    let xc = x.broadcast_sub(&mu).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let r = (var + 1e-5).unwrap().sqrt().unwrap().recip().unwrap();
    xc.broadcast_mul(&r)
        .unwrap()
        .broadcast_mul(w)
        .unwrap()
        .broadcast_add(b)
        .unwrap()
}

/// GPT-2 written out with plain candle ops, straight from the Hugging Face definition.
fn reference(w: &BTreeMap<String, Tensor>, cfg: &Gpt2Config, ids: &Tensor) -> Tensor {
    let g = |n: &str| w[&format!("transformer.{n}")].clone();
    let (b, t) = ids.dims2().unwrap();
    let (e, nh) = (cfg.n_embd, cfg.n_head);
    let hd = e / nh;
    let conv = |x: &Tensor, p: &str| {
        x.broadcast_matmul(&g(&format!("{p}.weight")))
            .unwrap()
            .broadcast_add(&g(&format!("{p}.bias")))
            .unwrap()
    };
    let emb = g("wte.weight")
        .index_select(&ids.flatten_all().unwrap(), 0)
        .unwrap();
    let mut x = emb
        .reshape((b, t, e))
        .unwrap()
        .broadcast_add(&g("wpe.weight").narrow(0, 0, t).unwrap())
        .unwrap();
    let mask: Vec<f32> = (0..t * t)
        .map(|k| {
            if k % t <= k / t {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
    for l in 0..cfg.n_layer {
        let p = format!("h.{l}");
        let h = ln(
            &x,
            &g(&format!("{p}.ln_1.weight")),
            &g(&format!("{p}.ln_1.bias")),
        );
        let qkv = conv(&h, &format!("{p}.attn.c_attn"));
        let split = |i: usize| {
            qkv.narrow(2, i * e, e)
                .unwrap()
                .reshape((b, t, nh, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let s = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
        let p_ = candle_nn::ops::softmax(&s.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
        let a = p_
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, e))
            .unwrap();
        x = (x + conv(&a, &format!("{p}.attn.c_proj"))).unwrap();
        let h = ln(
            &x,
            &g(&format!("{p}.ln_2.weight")),
            &g(&format!("{p}.ln_2.bias")),
        );
        let m = conv(&h, &format!("{p}.mlp.c_fc")).gelu().unwrap();
        x = (x + conv(&m, &format!("{p}.mlp.c_proj"))).unwrap();
    }
    let x = ln(&x, &g("ln_f.weight"), &g("ln_f.bias"));
    let head = w
        .get("lm_head.weight")
        .cloned()
        .unwrap_or_else(|| g("wte.weight"));
    x.broadcast_matmul(&head.t().unwrap()).unwrap()
}

#[test]
fn gpt2_logits_match_a_composite_reference() {
    for cfg in [Gpt2Config::tiny_for_tests(), untied()] {
        // Random biases and LayerNorm parameters, so every path counts.
        let base = Gpt2::init(&cfg, 2, DType::F32, &Device::Cpu).unwrap();
        let mut w = base.params().tensors();
        for (i, (name, t)) in w.iter_mut().enumerate() {
            if t.rank() == 1 {
                *t = (crate::common::rand_t(500 + i as u64, t.dims(), DType::F32) * 0.3).unwrap();
                if name.contains("ln") && name.ends_with("weight") {
                    *t = (&*t + 1.0).unwrap();
                }
            }
        }
        let model = Gpt2::from_tensors(&cfg, w.clone().into_iter().collect(), DType::F32).unwrap();
        let x = ids(&cfg, 2, 7);
        let d = max_abs_diff(&model.forward(&x).unwrap(), &reference(&w, &cfg, &x));
        assert!(d < 1e-4, "max |diff| = {d}");
    }
}

#[test]
fn gpt2_hf_dir_round_trip_through_causal_lm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = untied();
    let model = Gpt2::init(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    model.save_hf_dir(dir.path(), None).unwrap();
    let loaded = CausalLm::from_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(loaded, CausalLm::Gpt2(_)));
    let x = ids(&cfg, 1, 6);
    let d = max_abs_diff(&model.forward(&x).unwrap(), &loaded.forward(&x).unwrap());
    assert_eq!(d, 0.0);
}

#[test]
fn gpt2_model_checkpoint_without_prefix_and_with_mask_buffers_loads() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Gpt2Config::tiny_for_tests();
    let model = Gpt2::init(&cfg, 4, DType::F32, &Device::Cpu).unwrap();
    model.save_hf_dir(dir.path(), None).unwrap();
    // Rewrite the weights as the original `gpt2` repository has them.
    let mut t: BTreeMap<String, Tensor> = BTreeMap::new();
    for (n, v) in model.params().tensors() {
        t.insert(n.trim_start_matches("transformer.").to_string(), v);
    }
    let n = cfg.n_positions;
    let tril = Tensor::ones((1, 1, n, n), DType::F32, &Device::Cpu).unwrap();
    t.insert("h.0.attn.bias".to_string(), tril.clone());
    t.insert("h.1.attn.bias".to_string(), tril);
    eg_model::safetensors::write(&dir.path().join("model.safetensors"), &t, &BTreeMap::new())
        .unwrap();
    let loaded = Gpt2::from_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let x = ids(&cfg, 1, 5);
    assert_eq!(
        max_abs_diff(&model.forward(&x).unwrap(), &loaded.forward(&x).unwrap()),
        0.0
    );
}

#[test]
fn causal_lm_rejects_unknown_model_type_listing_supported() {
    let dir = tempfile::tempdir().unwrap();
    let model = Gpt2::init(&Gpt2Config::tiny_for_tests(), 4, DType::F32, &Device::Cpu).unwrap();
    model.save_hf_dir(dir.path(), None).unwrap();
    let p = dir.path().join("config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"gpt2\"", "\"bloom\"");
    std::fs::write(&p, text).unwrap();
    match CausalLm::from_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap_err() {
        Error::UnsupportedModelType { found, supported } => {
            assert_eq!(found, "bloom");
            assert!(supported.contains(&"gpt2") && supported.contains(&"qwen2"));
        }
        e => panic!("{e}"),
    }
}
