//! BERT task heads (issue 6): finite-difference checks (f64) of the classification head with
//! both poolings and dropout, of the classification loss and of the in-batch-negatives
//! embedding loss; padding never changes what the heads see; every parameter gets a gradient
//! from the embedding loss; `with_classifier` puts a head on an encoder.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use eg_model::heads::{self, Dropout, Pooling};
use eg_model::{Bert, BertConfig, BertHead};

use crate::common::{max_abs_diff, rand_t};
use crate::ops::fd_check;

fn small_cfg() -> BertConfig {
    BertConfig {
        vocab_size: 16,
        hidden_size: 8,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        intermediate_size: 12,
        max_position_embeddings: 8,
        ..BertConfig::tiny_for_tests()
    }
}

fn mask_2x4() -> Tensor {
    Tensor::new(&[[1f64, 1., 1., 1.], [1., 1., 0., 0.]], &Device::Cpu).unwrap()
}

/// The classification head of a real `Bert` (built around the tensors under test) on given
/// hidden states, followed by the classification loss.
#[test]
fn classification_head_and_loss_match_finite_differences_for_both_poolings() {
    let cfg = small_cfg();
    for pooling in [Pooling::Cls, Pooling::Mean] {
        let head = BertHead::SequenceClassification {
            num_labels: 3,
            pooling,
        };
        let base = Bert::init(&cfg, head, 3, DType::F64, &Device::Cpu).unwrap();
        let encoder: HashMap<String, Tensor> = base
            .params()
            .tensors()
            .into_iter()
            .filter(|(n, _)| !n.starts_with("pooler.") && !n.starts_with("classifier."))
            .collect();
        let h = cfg.hidden_size;
        let mut names = vec!["classifier.weight", "classifier.bias"];
        let mut inputs = vec![
            rand_t(1, &[2, 4, h], DType::F64),
            rand_t(2, &[3, h], DType::F64),
            rand_t(3, &[3], DType::F64),
        ];
        if pooling == Pooling::Cls {
            names.extend(["pooler.dense.weight", "pooler.dense.bias"]);
            inputs.push(rand_t(4, &[h, h], DType::F64));
            inputs.push(rand_t(5, &[h], DType::F64));
        }
        let mask = mask_2x4();
        let f = |ins: &[Tensor]| -> Tensor {
            let mut t = encoder.clone();
            for (n, v) in names.iter().zip(&ins[1..]) {
                t.insert(n.to_string(), v.clone());
            }
            let model = Bert::from_tensors(&cfg, head, t, DType::F64).unwrap();
            let d = Some(Dropout { p: 0.3, seed: 11 });
            let logits = model.classify(&ins[0], Some(&mask), d).unwrap();
            heads::classification_loss(&logits, &[2, 0]).unwrap()
        };
        let all: Vec<usize> = (0..inputs.len()).collect();
        fd_check(&f, &inputs, &all);
    }
}

#[test]
fn embedding_loss_through_mean_pooling_and_normalisation_matches_finite_differences() {
    let ma = Tensor::new(&[[1f64, 1., 1.], [1., 0., 0.], [1., 1., 0.]], &Device::Cpu).unwrap();
    let mp = Tensor::new(&[[1f64, 1., 0.], [1., 1., 1.], [1., 0., 0.]], &Device::Cpu).unwrap();
    let f = |ins: &[Tensor]| -> Tensor {
        let a = heads::l2_normalize(&heads::mean_pool(&ins[0], Some(&ma)).unwrap()).unwrap();
        let p = heads::l2_normalize(&heads::mean_pool(&ins[1], Some(&mp)).unwrap()).unwrap();
        heads::multiple_negatives_ranking_loss(&a, &p, heads::MNRL_DEFAULT_SCALE).unwrap()
    };
    let inputs = [
        rand_t(21, &[3, 3, 5], DType::F64),
        rand_t(22, &[3, 3, 5], DType::F64),
    ];
    fd_check(&f, &inputs, &[0, 1]);
}

#[test]
fn embedding_loss_equals_cross_entropy_over_scaled_cosines() {
    let a = rand_t(31, &[3, 4], DType::F64);
    let p = rand_t(32, &[3, 4], DType::F64);
    let loss = heads::multiple_negatives_ranking_loss(
        &heads::l2_normalize(&a).unwrap(),
        &heads::l2_normalize(&p).unwrap(),
        20.0,
    )
    .unwrap()
    .to_scalar::<f64>()
    .unwrap();
    let av: Vec<Vec<f64>> = a.to_vec2().unwrap();
    let pv: Vec<Vec<f64>> = p.to_vec2().unwrap();
    let cos = |x: &[f64], y: &[f64]| {
        let d: f64 = x.iter().zip(y).map(|(a, b)| a * b).sum();
        let n = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
        d / (n(x) * n(y))
    };
    let mut expect = 0.0;
    for i in 0..3 {
        let logits: Vec<f64> = (0..3).map(|j| 20.0 * cos(&av[i], &pv[j])).collect();
        let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
        expect += lse - logits[i];
    }
    expect /= 3.0;
    assert!((loss - expect).abs() < 1e-9, "{loss} vs {expect}");
}

fn ids_with_padding(pad: u32) -> (Tensor, Tensor) {
    let ids = Tensor::new(&[[2u32, 5, 7, 9, 3], [2, 11, 3, pad, pad]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    (ids, mask)
}

#[test]
fn padding_tokens_never_change_hidden_states_pooling_or_logits() {
    let cfg = BertConfig::tiny_for_tests();
    for pooling in [Pooling::Cls, Pooling::Mean] {
        let head = BertHead::SequenceClassification {
            num_labels: 2,
            pooling,
        };
        let model = Bert::init(&cfg, head, 7, DType::F32, &Device::Cpu).unwrap();
        let run = |pad: u32| {
            let (ids, mask) = ids_with_padding(pad);
            let h = model.forward(&ids, None, Some(&mask)).unwrap();
            let e = model.mean_pooled(&h, Some(&mask), true).unwrap();
            let l = model.classify(&h, Some(&mask), None).unwrap();
            (h, e, l)
        };
        let (h0, e0, l0) = run(0);
        let (h1, e1, l1) = run(40);
        // Real positions of the padded row are unchanged; padded positions may differ.
        let real = |h: &Tensor| h.narrow(0, 1, 1).unwrap().narrow(1, 0, 3).unwrap();
        assert!(max_abs_diff(&real(&h0), &real(&h1)) < 1e-6);
        assert!(max_abs_diff(&e0, &e1) < 1e-6);
        assert!(max_abs_diff(&l0, &l1) < 1e-6);
        // And equal to the unpadded sequence on its own.
        let alone = Tensor::new(&[[2u32, 11, 3]], &Device::Cpu).unwrap();
        let ha = model.forward(&alone, None, None).unwrap();
        assert!(max_abs_diff(&real(&h0), &ha) < 1e-5);
        let la = model.classify(&ha, None, None).unwrap();
        assert!(max_abs_diff(&l0.narrow(0, 1, 1).unwrap(), &la) < 1e-5);
    }
}

#[test]
fn every_encoder_parameter_gets_a_gradient_from_the_embedding_loss() {
    let cfg = BertConfig::tiny_for_tests();
    let model = Bert::init(&cfg, BertHead::None, 8, DType::F32, &Device::Cpu).unwrap();
    let (ids, mask) = ids_with_padding(0);
    let tt = Tensor::new(&[[0u32, 0, 1, 1, 1], [0, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let embed = |ids: &Tensor| {
        let h = model.forward(ids, Some(&tt), Some(&mask)).unwrap();
        model.mean_pooled(&h, Some(&mask), true).unwrap()
    };
    let a = embed(&ids);
    let p = embed(&(ids.clone() + 1.0).unwrap());
    let loss = heads::multiple_negatives_ranking_loss(&a, &p, 20.0).unwrap();
    let grads = loss.backward().unwrap();
    let cov = model.params().gradient_coverage(&grads).unwrap();
    assert!(cov.missing.is_empty(), "{:?}", cov.missing);
    assert!(cov.non_finite.is_empty(), "{:?}", cov.non_finite);
    // Positions 5.. are never used, so only the used rows of the tables get gradient; no
    // parameter is zero everywhere.
    assert!(cov.zero.is_empty(), "{:?}", cov.zero);
}

#[test]
fn with_classifier_reuses_the_pooler_for_cls_and_carries_it_for_mean() {
    let cfg = BertConfig::tiny_for_tests();
    let encoder = Bert::init(
        &cfg,
        BertHead::SequenceClassification {
            num_labels: 2,
            pooling: Pooling::Cls,
        },
        9,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let pooler = encoder.params().tensors()["pooler.dense.weight"].clone();
    let plain = encoder.with_classifier(3, Pooling::Mean, 1).unwrap();
    assert!(plain.params().get("pooler.dense.weight").is_none());
    assert_eq!(
        plain.params().get("classifier.weight").unwrap().dims(),
        [3, 32]
    );
    let cls = plain.with_classifier(3, Pooling::Cls, 1).unwrap();
    let reused = cls.params().tensors()["pooler.dense.weight"].clone();
    assert_eq!(max_abs_diff(&pooler, &reused), 0.0);
    // The same classifier size keeps the trained classifier.
    let w = plain.params().tensors()["classifier.weight"].clone();
    assert_eq!(
        max_abs_diff(&w, &cls.params().tensors()["classifier.weight"]),
        0.0
    );
    // The new model owns its parameters: updating one leaves the other alone.
    let v = cls.params().get("classifier.weight").unwrap();
    v.set(&v.as_tensor().zeros_like().unwrap()).unwrap();
    assert!(max_abs_diff(&w, &plain.params().tensors()["classifier.weight"]) == 0.0);
    assert!(encoder.with_classifier(1, Pooling::Cls, 1).is_err());
    // An encoder without a classification head refuses to classify.
    let bare = Bert::init(&cfg, BertHead::None, 1, DType::F32, &Device::Cpu).unwrap();
    let (ids, _) = ids_with_padding(0);
    let h = bare.forward(&ids, None, None).unwrap();
    assert!(matches!(
        bare.classify(&h, None, None),
        Err(eg_model::Error::Unsupported { .. })
    ));
}
