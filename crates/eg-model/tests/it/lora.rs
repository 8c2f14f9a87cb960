//! LoRA (issue 7): merge equivalence, frozen base without gradient storage, training moves
//! only adapters, PEFT layout round trip, frozen-linear and dropout backward vs finite
//! differences.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use eg_model::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, dense_frozen_linear, dropout_with_mask};
use eg_model::safetensors::SafetensorsFile;
use eg_model::{Error, Llama, LlamaConfig, LoraConfig};

use crate::common::{max_abs_diff, rand_t};
use crate::model::batch;
use crate::ops::fd_check;

fn snapshot(m: &Llama) -> Vec<(String, Vec<f32>)> {
    m.params()
        .iter()
        .map(|(n, v)| {
            let t = v.as_tensor().flatten_all().unwrap();
            (n.to_string(), t.to_vec1::<f32>().unwrap())
        })
        .collect()
}

/// Gives every `lora_B` random values, so the adapters change the function.
fn randomise_b(m: &Llama) {
    for (i, (name, var)) in m.params().iter().enumerate() {
        if name.ends_with("lora_B.weight") {
            var.set(&(rand_t(100 + i as u64, var.dims(), DType::F32) * 0.05).unwrap())
                .unwrap();
        }
    }
}

/// Every gradient entry is an adapter's or has a shape no base tensor has.
pub(crate) fn assert_no_base_gradients(
    grads: &candle_core::backprop::GradStore,
    m: &Llama,
    base: &Llama,
) {
    let adapters: std::collections::HashSet<_> =
        m.params().iter().map(|(_, v)| v.as_tensor().id()).collect();
    let base_shapes: std::collections::HashSet<Vec<usize>> = base
        .params()
        .iter()
        .map(|(_, v)| v.dims().to_vec())
        .collect();
    let mut extra = 0;
    for id in grads.get_ids() {
        if adapters.contains(id) {
            continue;
        }
        extra += 1;
        let dims = grads.get_id(*id).unwrap().dims().to_vec();
        assert!(!base_shapes.contains(&dims), "a gradient of shape {dims:?}");
    }
    assert!(extra <= 8, "{extra} non-adapter gradient entries");
    for (_, v) in m.params().iter() {
        assert!(grads.get(v.as_tensor()).is_some());
    }
}

fn qwen_like() -> LlamaConfig {
    LlamaConfig {
        attention_bias: Some(true),
        ..LlamaConfig::tiny_for_tests()
    }
}

#[test]
fn lora_selects_targets_and_freezes_the_base() {
    let cfg = LlamaConfig::tiny_for_tests();
    let base = Llama::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let m = base
        .clone()
        .with_lora(&LoraConfig::rank(4).targets(["q_proj", "v_proj"]), 7)
        .unwrap();
    let names: Vec<&str> = m.params().iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 2 * 2 * cfg.num_hidden_layers);
    assert_eq!(names[0], "model.layers.0.self_attn.q_proj.lora_A.weight");
    assert_eq!(names[1], "model.layers.0.self_attn.q_proj.lora_B.weight");
    assert_eq!(m.params().get(names[0]).unwrap().dims(), &[4, 32]);
    let all = base
        .clone()
        .with_lora(&LoraConfig::rank(2).targets(["all-linear"]), 7)
        .unwrap();
    assert_eq!(all.params().len(), 2 * 7 * cfg.num_hidden_layers);
    // B = 0: the adapted model starts equal to the base.
    let ids = batch(&cfg, 2, 6, 3);
    let d = max_abs_diff(&base.forward(&ids).unwrap(), &all.forward(&ids).unwrap());
    assert!(d < 1e-6, "{d}");
    // A is Kaiming-uniform in ±1/sqrt(in), deterministic per seed.
    let a = all.params().iter().next().unwrap().1.as_tensor().clone();
    let max = a
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(max <= 1.0 / 32f32.sqrt() && max > 0.1, "{max}");
    let again = base
        .clone()
        .with_lora(&LoraConfig::rank(2).targets(["all-linear"]), 7)
        .unwrap();
    assert_eq!(snapshot(&all), snapshot(&again));
    // Unknown targets and bad settings are typed errors.
    assert!(matches!(
        base.clone()
            .with_lora(&LoraConfig::rank(2).targets(["qkv"]), 1),
        Err(Error::LoraTargetNotFound { .. })
    ));
    assert!(matches!(
        base.clone().with_lora(&LoraConfig::rank(0), 1),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        base.clone().with_lora(&LoraConfig::rank(2).dropout(1.0), 1),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        m.save_hf_dir(&std::env::temp_dir().join("never"), None),
        Err(Error::LoraState { .. })
    ));
    // rsLoRA scaling.
    assert_eq!(LoraConfig::rank(16).alpha(32.0).scaling(), 2.0);
    assert_eq!(LoraConfig::rank(16).alpha(32.0).rslora(true).scaling(), 8.0);
}

#[test]
fn lora_merged_forward_equals_unmerged() {
    for cfg in [LlamaConfig::tiny_for_tests(), qwen_like()] {
        let base = Llama::init(&cfg, 2, DType::F32, &Device::Cpu).unwrap();
        let lcfg = LoraConfig::rank(4).alpha(8.0).targets(["all-linear"]);
        let mut m = base.with_lora(&lcfg, 3).unwrap();
        randomise_b(&m);
        let ids = batch(&cfg, 2, 7, 5);
        let y0 = m.forward(&ids).unwrap();
        let w0 = m
            .frozen_weight("model.layers.1.mlp.down_proj")
            .unwrap()
            .unwrap();
        m.merge_lora().unwrap();
        let y1 = m.forward(&ids).unwrap();
        assert!(matches!(m.merge_lora(), Err(Error::LoraState { .. })));
        m.unmerge_lora().unwrap();
        let y2 = m.forward(&ids).unwrap();
        let w2 = m
            .frozen_weight("model.layers.1.mlp.down_proj")
            .unwrap()
            .unwrap();
        let unloaded = m.merge_and_unload().unwrap();
        let y3 = unloaded.forward(&ids).unwrap();
        for (what, y) in [("merged", &y1), ("unmerged", &y2), ("unloaded", &y3)] {
            let d = max_abs_diff(&y0, y);
            assert!(d < 1e-5, "{what}: {d}");
        }
        assert!(max_abs_diff(&w0, &w2) < 1e-6);
        assert_eq!(unloaded.params().len(), unloaded.params().len());
        assert!(unloaded.lora_config().is_none());
    }
}

#[test]
fn lora_adamw_steps_lower_the_loss_and_move_only_adapters() {
    let cfg = qwen_like();
    let base = Llama::init(&cfg, 4, DType::F32, &Device::Cpu).unwrap();
    // The base's own variables share storage with the frozen copies: a change to the
    // frozen base would show here.
    let before_base = snapshot(&base);
    let lcfg =
        LoraConfig::rank(4)
            .alpha(16.0)
            .dropout(0.1)
            .targets(["q_proj", "v_proj", "down_proj"]);
    let m = base.clone().with_lora(&lcfg, 9).unwrap();
    let before_adapters = snapshot(&m);
    let mut opt = candle_nn::AdamW::new_lr(m.params().vars(), 1e-2).unwrap();
    let ids = batch(&cfg, 2, 12, 1);
    let mut losses = Vec::new();
    for step in 0..8 {
        let logits = m.forward(&ids).unwrap();
        let loss = m.next_token_loss(&logits, &ids, None).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let grads = loss.backward().unwrap();
        // No gradient storage for the frozen base (weights, biases, norms, embeddings,
        // head): besides the adapters the store holds only a few activation-shaped leaves
        // of layer 0, whose input does not depend on any variable.
        assert_no_base_gradients(&grads, &m, &base);
        if step == 0 {
            let cov = m.params().gradient_coverage(&grads).unwrap();
            assert!(cov.missing.is_empty() && cov.non_finite.is_empty());
            // B = 0 at initialisation, so dL/dA is exactly zero then, and only then.
            assert!(cov.zero.iter().all(|n| n.ends_with("lora_A.weight")));
            assert!(!cov.zero.is_empty());
        }
        if step == 2 {
            let cov = m.params().gradient_coverage(&grads).unwrap();
            assert!(cov.is_complete(), "{cov:?}");
        }
        opt.step(&grads).unwrap();
    }
    assert!(losses[7] < losses[0] - 0.05, "{losses:?}");
    assert_eq!(snapshot(&base), before_base, "base weights changed");
    let after = snapshot(&m);
    for ((n, a), (_, b)) in after.iter().zip(&before_adapters) {
        assert_ne!(a, b, "{n} did not move");
    }
    // Dropout is deterministic given the seed and the call count; off in evaluation.
    m.set_lora_training(false);
    let y1 = m.forward(&ids).unwrap();
    let y2 = m.forward(&ids).unwrap();
    assert_eq!(max_abs_diff(&y1, &y2), 0.0);
}

#[test]
fn lora_peft_layout_round_trip() {
    let cfg = qwen_like();
    let base = Llama::init(&cfg, 5, DType::F32, &Device::Cpu).unwrap();
    let lcfg = LoraConfig::rank(3)
        .alpha(6.0)
        .dropout(0.05)
        .rslora(true)
        .targets(["q_proj", "o_proj", "up_proj"]);
    let m = base.clone().with_lora(&lcfg, 1).unwrap();
    randomise_b(&m);
    let dir = tempfile::tempdir().unwrap();
    m.save_lora_adapter(dir.path()).unwrap();
    let f = SafetensorsFile::open(&dir.path().join(ADAPTER_WEIGHTS)).unwrap();
    let names: Vec<&String> = f.tensors().keys().collect();
    assert_eq!(names.len(), 2 * 3 * cfg.num_hidden_layers);
    assert!(
        f.tensors()
            .contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    );
    assert_eq!(
        f.tensors()["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"].shape,
        vec![64, 3]
    );
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(ADAPTER_CONFIG)).unwrap())
            .unwrap();
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["task_type"], "CAUSAL_LM");
    assert_eq!(c["r"], 3);
    assert_eq!(c["lora_alpha"], 6.0);
    assert_eq!(c["lora_dropout"], 0.05);
    assert_eq!(c["use_rslora"], true);
    assert_eq!(
        c["target_modules"],
        serde_json::json!(["q_proj", "o_proj", "up_proj"])
    );
    let loaded = base.clone().load_lora_adapter(dir.path()).unwrap();
    assert_eq!(loaded.lora_config(), Some(&lcfg));
    assert_eq!(snapshot(&loaded), snapshot(&m));
    m.set_lora_training(false);
    loaded.set_lora_training(false);
    let ids = batch(&cfg, 1, 9, 2);
    assert_eq!(
        max_abs_diff(&m.forward(&ids).unwrap(), &loaded.forward(&ids).unwrap()),
        0.0
    );
    // A file missing an adapter is a typed error.
    let other = base
        .clone()
        .with_lora(&LoraConfig::rank(3).targets(["q_proj"]), 1)
        .unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    other.save_lora_adapter(dir2.path()).unwrap();
    std::fs::copy(
        dir.path().join(ADAPTER_CONFIG),
        dir2.path().join(ADAPTER_CONFIG),
    )
    .unwrap();
    assert!(matches!(
        base.load_lora_adapter(dir2.path()),
        Err(Error::MissingTensors { .. })
    ));
}

#[test]
fn frozen_linear_backward_matches_finite_differences() {
    let w = rand_t(1, &[5, 7], DType::F64);
    let b = rand_t(2, &[5], DType::F64);
    let x = rand_t(3, &[4, 7], DType::F64);
    fd_check(
        &|t: &[Tensor]| dense_frozen_linear(&t[0], &w, Some(&b)).unwrap(),
        std::slice::from_ref(&x),
        &[0],
    );
    // Same values as the composite; the weight gets no gradient even as a variable.
    let y = dense_frozen_linear(&x, &w, Some(&b)).unwrap();
    let r = x
        .matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(&b)
        .unwrap();
    assert!(max_abs_diff(&y, &r) < 1e-12);
    let wv = Var::from_tensor(&w).unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let g = dense_frozen_linear(xv.as_tensor(), wv.as_tensor(), None)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(wv.as_tensor()).is_none());
    assert!(g.get(xv.as_tensor()).is_some());
}

#[test]
fn dropout_backward_matches_finite_differences() {
    let x = rand_t(4, &[3, 6], DType::F64);
    let m: Vec<f64> = (0..18)
        .map(|i| if i % 3 == 0 { 0.0 } else { 1.5 })
        .collect();
    let mask = Tensor::from_vec(m, (3, 6), &Device::Cpu).unwrap();
    fd_check(
        &|t: &[Tensor]| dropout_with_mask(&t[0], &mask).unwrap(),
        &[x],
        &[0],
    );
}

#[test]
fn gpt2_lora_merges_trains_only_adapters_and_saves_peft_layout() {
    use eg_model::{Gpt2, Gpt2Config};
    let cfg = Gpt2Config::tiny_for_tests();
    let base = Gpt2::init(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let before: Vec<Vec<f32>> = base
        .params()
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let ids = Tensor::new(
        &[[1u32, 5, 7, 3, 9, 2, 4, 8], [3, 3, 1, 0, 6, 5, 2, 7]],
        &Device::Cpu,
    )
    .unwrap();
    let y_base = base.forward(&ids).unwrap();
    let mut m = base
        .clone()
        .with_lora(
            &LoraConfig::rank(2).alpha(4.0).targets(["c_attn", "c_proj"]),
            5,
        )
        .unwrap();
    assert_eq!(m.params().len(), 2 * 3 * cfg.n_layer);
    assert_eq!(
        m.params().iter().next().unwrap().0,
        "transformer.h.0.attn.c_attn.lora_A.weight"
    );
    assert!(max_abs_diff(&y_base, &m.forward(&ids).unwrap()) < 1e-6);
    let mut opt = candle_nn::AdamW::new_lr(m.params().vars(), 2e-2).unwrap();
    let mut losses = Vec::new();
    for _ in 0..6 {
        let logits = m.forward(&ids).unwrap();
        let loss = m.next_token_loss(&logits, &ids, None).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let grads = loss.backward().unwrap();
        let ids_of: std::collections::HashSet<_> =
            m.params().iter().map(|(_, v)| v.as_tensor().id()).collect();
        let shapes: std::collections::HashSet<Vec<usize>> = base
            .params()
            .iter()
            .map(|(_, v)| v.dims().to_vec())
            .collect();
        for id in grads.get_ids().filter(|i| !ids_of.contains(i)) {
            let dims = grads.get_id(*id).unwrap().dims().to_vec();
            assert!(!shapes.contains(&dims), "a base-shaped gradient {dims:?}");
        }
        opt.step(&grads).unwrap();
    }
    assert!(losses[5] < losses[0] - 0.05, "{losses:?}");
    let after: Vec<Vec<f32>> = base
        .params()
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    assert_eq!(before, after, "the base moved");
    let y0 = m.forward(&ids).unwrap();
    m.set_lora_merged(true).unwrap();
    let y1 = m.forward(&ids).unwrap();
    m.set_lora_merged(false).unwrap();
    let y2 = m.forward(&ids).unwrap();
    assert!(max_abs_diff(&y0, &y1) < 1e-5 && max_abs_diff(&y0, &y2) < 1e-5);
    let dir = tempfile::tempdir().unwrap();
    m.save_lora_adapter(dir.path()).unwrap();
    let f = SafetensorsFile::open(&dir.path().join(ADAPTER_WEIGHTS)).unwrap();
    assert!(
        f.tensors()
            .contains_key("base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight")
    );
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(ADAPTER_CONFIG)).unwrap())
            .unwrap();
    assert_eq!(c["fan_in_fan_out"], true);
    assert_eq!(c["target_modules"], serde_json::json!(["c_attn", "c_proj"]));
}

#[test]
fn lora_dropout_is_seeded_and_changes_per_call() {
    let cfg = LlamaConfig::tiny_for_tests();
    let base = Llama::init(&cfg, 6, DType::F32, &Device::Cpu).unwrap();
    let lcfg = LoraConfig::rank(2).dropout(0.3).targets(["all-linear"]);
    let make = |seed| {
        let m = base.clone().with_lora(&lcfg, seed).unwrap();
        randomise_b(&m);
        m
    };
    let (a, b, c) = (make(1), make(1), make(2));
    let ids = batch(&cfg, 1, 8, 3);
    let a1 = a.forward(&ids).unwrap();
    assert_eq!(max_abs_diff(&a1, &b.forward(&ids).unwrap()), 0.0);
    assert!(max_abs_diff(&a1, &c.forward(&ids).unwrap()) > 0.0);
    let a2 = a.forward(&ids).unwrap();
    assert!(max_abs_diff(&a1, &a2) > 0.0, "a new mask per forward call");
    assert_eq!(max_abs_diff(&a2, &b.forward(&ids).unwrap()), 0.0);
}

/// DPO's reference without a second copy (issue 6): with the adapters disabled the model
/// computes its frozen base exactly; enabling them restores the adapted function.
#[test]
fn disabled_adapters_compute_the_base_model() {
    let cfg = LlamaConfig::tiny_for_tests();
    let base = Llama::init(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let ids = batch(&cfg, 2, 8, 5);
    let want = base.forward(&ids).unwrap();
    let m = base
        .with_lora(&LoraConfig::rank(2).targets(["all-linear"]), 7)
        .unwrap();
    randomise_b(&m);
    let adapted = m.forward(&ids).unwrap();
    assert!(max_abs_diff(&adapted, &want) > 1e-4);
    assert!(m.adapters_enabled());
    m.set_adapters_enabled(false).unwrap();
    assert!(!m.adapters_enabled());
    assert_eq!(max_abs_diff(&m.forward(&ids).unwrap(), &want), 0.0);
    m.set_adapters_enabled(true).unwrap();
    assert_eq!(max_abs_diff(&m.forward(&ids).unwrap(), &adapted), 0.0);
    let plain = Llama::init(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        plain.set_adapters_enabled(false),
        Err(Error::LoraState { .. })
    ));
}
