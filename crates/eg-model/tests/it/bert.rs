//! BERT: gradient coverage for every head, parity with candle-transformers' BERT (hidden
//! states with padding, masked-LM logits), Hugging Face loading of a `BertModel` checkpoint.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert as reference;
use eg_model::heads::Dropout;
use eg_model::{Bert, BertConfig, BertHead, Pooling, ops};

use crate::common::{max_abs_diff, rand_t};

fn ids(cfg: &BertConfig, b: usize, t: usize) -> Tensor {
    let v: Vec<u32> = (0..(b * t) as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 9) % cfg.vocab_size as u32)
        .collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

fn padding_mask() -> Tensor {
    Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap()
}

/// Random (not one/zero) LayerNorm and bias parameters so every path counts.
fn randomized(cfg: &BertConfig, head: BertHead, seed: u64) -> Bert {
    let base = Bert::init(cfg, head, seed, DType::F32, &Device::Cpu).unwrap();
    let mut w: HashMap<String, Tensor> = base.params().tensors().into_iter().collect();
    for (i, (name, t)) in w.iter_mut().enumerate() {
        if t.rank() == 1 {
            let r = (rand_t(900 + i as u64, t.dims(), DType::F32) * 0.2).unwrap();
            *t = if name.ends_with("LayerNorm.weight") {
                (r + 1.0).unwrap()
            } else {
                r
            };
        }
    }
    Bert::from_tensors(cfg, head, w, DType::F32).unwrap()
}

#[test]
fn every_bert_parameter_gets_a_finite_nonzero_gradient_for_each_head() {
    let cfg = BertConfig::tiny_for_tests();
    let heads = [
        BertHead::None,
        BertHead::MaskedLm,
        BertHead::SequenceClassification {
            num_labels: 3,
            pooling: Pooling::Cls,
        },
        BertHead::SequenceClassification {
            num_labels: 3,
            pooling: Pooling::Mean,
        },
    ];
    for head in heads {
        let model = randomized(&cfg, head, 1);
        let x = ids(&cfg, 2, 6);
        let tt = Tensor::new(&[[0u32, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]], &Device::Cpu).unwrap();
        let mask = padding_mask();
        let hidden = model.forward(&x, Some(&tt), Some(&mask)).unwrap();
        let loss = match head {
            BertHead::None => {
                let e = model.mean_pooled(&hidden, Some(&mask), true).unwrap();
                // A contrastive-style objective: pull the two embeddings together.
                let target = rand_t(3, e.dims(), DType::F32);
                (e - target).unwrap().sqr().unwrap().sum_all().unwrap()
            }
            BertHead::MaskedLm => {
                let logits = model.mlm_logits(&hidden).unwrap();
                let flat = logits.reshape((12, cfg.vocab_size)).unwrap();
                let targets: Vec<Option<u32>> = (0..12)
                    .map(|i| (i % 3 == 0).then_some(i as u32 + 1))
                    .collect();
                ops::cross_entropy(&flat, &targets).unwrap()
            }
            BertHead::SequenceClassification { .. } => {
                let d = Some(Dropout { p: 0.1, seed: 4 });
                let logits = model.classify(&hidden, Some(&mask), d).unwrap();
                ops::cross_entropy(&logits, &[Some(2), Some(0)]).unwrap()
            }
        };
        let grads = loss.backward().unwrap();
        for (name, var) in model.params().iter() {
            let g: Vec<f32> = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{head:?}: {name} has no gradient"))
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(g.iter().all(|v| v.is_finite()), "{head:?}: {name}");
            // Token type 1 rows exist, so both token-type embeddings get gradient.
            assert!(g.iter().any(|&v| v != 0.0), "{head:?}: {name} all zero");
        }
    }
}

fn reference_config(cfg: &BertConfig) -> reference::Config {
    let mut v = serde_json::to_value(cfg).unwrap();
    let o = v.as_object_mut().unwrap();
    // Fields the reference requires but we do not use.
    o.insert("hidden_dropout_prob".into(), 0.0.into());
    o.insert("initializer_range".into(), 0.02.into());
    o.insert("pad_token_id".into(), 0.into());
    serde_json::from_value(v).unwrap()
}

#[test]
fn bert_hidden_states_match_candle_transformers_with_padding() {
    let cfg = BertConfig::tiny_for_tests();
    let model = randomized(&cfg, BertHead::None, 2);
    let tensors: HashMap<String, Tensor> = model.params().tensors().into_iter().collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let theirs = reference::BertModel::load(vb, &reference_config(&cfg)).unwrap();
    let x = ids(&cfg, 2, 6);
    let tt = Tensor::new(&[[0u32, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]], &Device::Cpu).unwrap();
    let mask = padding_mask();
    let ours = model.forward(&x, Some(&tt), Some(&mask)).unwrap();
    let refs = theirs.forward(&x, &tt, Some(&mask)).unwrap();
    let d = max_abs_diff(&ours, &refs);
    assert!(d < 1e-4, "max |diff| = {d}");
    // Mean pooling ignores the padding: equal to the mean over the real tokens.
    let e = model.mean_pooled(&ours, Some(&mask), false).unwrap();
    let manual = ours
        .narrow(0, 1, 1)
        .unwrap()
        .narrow(1, 0, 4)
        .unwrap()
        .mean(1)
        .unwrap();
    assert!(max_abs_diff(&e.narrow(0, 1, 1).unwrap(), &manual) < 1e-6);
}

#[test]
fn bert_mlm_logits_match_candle_transformers() {
    let cfg = BertConfig::tiny_for_tests();
    let model = randomized(&cfg, BertHead::MaskedLm, 3);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (n, t) in model.params().tensors() {
        let name = if n.starts_with("cls.") {
            n
        } else {
            format!("bert.{n}")
        };
        tensors.insert(name, t);
    }
    // The reference reads an untied decoder with its own bias: give it the tied values.
    tensors.insert(
        "cls.predictions.decoder.weight".into(),
        tensors["bert.embeddings.word_embeddings.weight"].clone(),
    );
    tensors.insert(
        "cls.predictions.decoder.bias".into(),
        tensors["cls.predictions.bias"].clone(),
    );
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let theirs = reference::BertForMaskedLM::load(vb, &reference_config(&cfg)).unwrap();
    let x = ids(&cfg, 2, 6);
    let tt = x.zeros_like().unwrap();
    let hidden = model.forward(&x, None, None).unwrap();
    let ours = model.mlm_logits(&hidden).unwrap();
    let refs = theirs.forward(&x, &tt, None).unwrap();
    let d = max_abs_diff(&ours, &refs);
    assert!(d < 1e-4, "max |diff| = {d}");
}

#[test]
fn bert_model_checkpoint_with_pooler_loads_and_round_trips() {
    // A sentence-transformers style checkpoint: no `bert.` prefix, a pooler, position_ids.
    let dir = tempfile::tempdir().unwrap();
    let cfg = BertConfig::tiny_for_tests();
    let model = randomized(&cfg, BertHead::None, 4);
    let mut t: BTreeMap<String, Tensor> = model.params().tensors();
    let h = cfg.hidden_size;
    t.insert("pooler.dense.weight".into(), rand_t(1, &[h, h], DType::F32));
    t.insert("pooler.dense.bias".into(), rand_t(2, &[h], DType::F32));
    let pos: Vec<i64> = (0..cfg.max_position_embeddings as i64).collect();
    t.insert(
        "embeddings.position_ids".into(),
        Tensor::from_vec(pos, (1, cfg.max_position_embeddings), &Device::Cpu).unwrap(),
    );
    std::fs::create_dir_all(dir.path()).unwrap();
    eg_model::safetensors::write(&dir.path().join("model.safetensors"), &t, &BTreeMap::new())
        .unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();

    let loaded = Bert::from_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.head(), BertHead::None);
    // The pooler is carried, not trained (nothing uses it without a classifier).
    assert!(loaded.params().get("pooler.dense.weight").is_none());
    let x = ids(&cfg, 1, 5);
    let a = model.forward(&x, None, None).unwrap();
    let b = loaded.forward(&x, None, None).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);

    let out = tempfile::tempdir().unwrap();
    loaded.save_hf_dir(out.path(), None).unwrap();
    let saved =
        candle_core::safetensors::load(out.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(saved.contains_key("pooler.dense.weight"));
    let again = Bert::from_hf_dir(out.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        max_abs_diff(&a, &again.forward(&x, None, None).unwrap()),
        0.0
    );
}

#[test]
fn bert_task_model_round_trip_keeps_its_head() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = BertConfig::tiny_for_tests();
    for pooling in [Pooling::Cls, Pooling::Mean] {
        let head = BertHead::SequenceClassification {
            num_labels: 2,
            pooling,
        };
        let model = randomized(&cfg, head, 5);
        model.save_hf_dir(dir.path(), None).unwrap();
        let loaded = Bert::from_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(loaded.head(), head);
        let x = ids(&cfg, 2, 4);
        let a = model
            .classify(&model.forward(&x, None, None).unwrap(), None, None)
            .unwrap();
        let b = loaded
            .classify(&loaded.forward(&x, None, None).unwrap(), None, None)
            .unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
    }
    let loaded = Bert::from_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let x = ids(&cfg, 2, 4);
    // Using a head the model lacks is a typed error.
    assert!(matches!(
        loaded.mlm_logits(&loaded.forward(&x, None, None).unwrap()),
        Err(eg_model::Error::Unsupported { .. })
    ));
}
