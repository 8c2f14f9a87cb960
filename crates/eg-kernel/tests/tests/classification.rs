//! Encoder objectives (issue 6): a tiny random BERT learns a separable classification task
//! and an embedding task from the library (eval accuracy rises), every parameter gets a
//! gradient (the trainer's coverage check at step 1), and a classification run with dropout
//! and gradient accumulation resumes bitwise.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device};
use eg_data::{LabeledDataset, Loader, Placement};
use eg_kernel::{
    BertTask, Classification, Embedding, EvalSet, Objective, Optimizer, Trainer, TrainerOptions,
};
use eg_model::{Bert, BertConfig, BertHead, Pooling};

use crate::tests::common::{adamw, logged_losses, options, shapes, weights, with_checkpoints};

const CLS: u32 = 1;
const SEP: u32 = 2;

/// Texts of class `c`: 2..8 tokens, most from the class's own range (4..30 or 30..56), one in
/// three from a shared range (56..64).
fn class_rows(n: u32, seed: u32) -> Vec<(Vec<u32>, u32)> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        s
    };
    (0..n)
        .map(|i| {
            let c = i % 2;
            let len = 2 + next() % 7;
            let mut t = vec![CLS];
            for _ in 0..len {
                let r = next();
                t.push(if r % 3 == 0 {
                    56 + r % 8
                } else {
                    4 + 26 * c + (r / 3) % 26
                });
            }
            t.push(SEP);
            (t, c)
        })
        .collect()
}

struct StopAt(u64, Arc<AtomicBool>);

impl eg_kernel::Callback for StopAt {
    fn on_step_end(&mut self, m: &eg_kernel::StepMetrics) {
        if m.step == self.0 {
            self.1.store(true, Ordering::SeqCst);
        }
    }
}

fn bert(pooling: Pooling) -> BertTask {
    let cfg = BertConfig::tiny_for_tests();
    let base = Bert::init(&cfg, BertHead::None, 5, DType::F32, &Device::Cpu).unwrap();
    BertTask::new(base.with_classifier(2, pooling, 5).unwrap(), 0.1).unwrap()
}

fn trainer<O: Objective<BertTask> + 'static>(
    model: BertTask,
    train: Arc<LabeledDataset>,
    eval: Arc<LabeledDataset>,
    objective: O,
    o: TrainerOptions,
) -> Trainer<BertTask> {
    let opt = Optimizer::new(adamw(), 0.01, &shapes(&model)).unwrap();
    let lopts = train.loader_options(16, 3, true, None);
    let loader = Loader::new(train.clone(), lopts, Placement::SINGLE).unwrap();
    Trainer::new(model, opt, loader, o)
        .unwrap()
        .with_objective(Box::new(objective))
        .with_eval(EvalSet {
            opts: eval.loader_options(16, 0, false, Some(1)),
            data: eval,
        })
}

#[test]
fn tiny_bert_learns_a_separable_classification_task() {
    let train = Arc::new(LabeledDataset::classification(class_rows(256, 1), 12, 2).unwrap());
    let eval = Arc::new(LabeledDataset::classification(class_rows(64, 2), 12, 2).unwrap());
    for pooling in [Pooling::Mean, Pooling::Cls] {
        let mut o = options(40, 8);
        o.eval_max_batches = 4;
        let mut t = trainer(
            bert(pooling),
            train.clone(),
            eval.clone(),
            Classification::default(),
            o,
        );
        let before = t.evaluate().unwrap();
        let report = t.fit().unwrap();
        let after = report.eval.unwrap();
        let acc0 = before.extra["accuracy"];
        let acc1 = after.extra["accuracy"];
        assert_eq!(after.tokens, 64, "examples evaluated");
        assert!(
            acc1 >= 0.9 && acc1 > acc0,
            "{pooling:?}: accuracy {acc0} -> {acc1}, loss {} -> {}",
            before.loss,
            after.loss
        );
        assert!(after.loss < before.loss);
    }
}

#[test]
fn tiny_bert_learns_embeddings_with_in_batch_negatives() {
    // Pairs share a "topic" (8 topics over disjoint token ranges): the anchor and its positive
    // are different draws from the same topic.
    let topic_text = |topic: u32, k: u32| -> Vec<u32> {
        let mut t = vec![CLS];
        for j in 0..3 + k % 3 {
            t.push(4 + topic * 7 + (k * 3 + j * 5) % 7);
        }
        t.push(SEP);
        t
    };
    let pairs = |n: u32, off: u32| {
        (0..n)
            .map(|i| {
                let topic = i % 8;
                (
                    topic_text(topic, i + off),
                    topic_text(topic, i * 7 + 3 + off),
                )
            })
            .collect::<Vec<_>>()
    };
    let train = Arc::new(LabeledDataset::pairs(pairs(128, 0), 8).unwrap());
    let eval = Arc::new(LabeledDataset::pairs(pairs(64, 1000), 8).unwrap());
    let cfg = BertConfig::tiny_for_tests();
    let model = BertTask::new(
        Bert::init(&cfg, BertHead::None, 6, DType::F32, &Device::Cpu).unwrap(),
        0.0,
    )
    .unwrap();
    let mut o = options(30, 8);
    o.eval_max_batches = 4;
    let mut t = trainer(model, train, eval, Embedding::default(), o);
    let before = t.evaluate().unwrap();
    let after = t.fit().unwrap().eval.unwrap();
    let (a0, a1) = (
        before.extra["retrieval_accuracy"],
        after.extra["retrieval_accuracy"],
    );
    assert!(
        after.loss < before.loss,
        "{} -> {}",
        before.loss,
        after.loss
    );
    assert!(a1 > a0, "retrieval accuracy {a0} -> {a1}");
}

#[test]
fn classification_with_dropout_and_accumulation_resumes_bitwise() {
    let train = Arc::new(LabeledDataset::classification(class_rows(96, 3), 12, 2).unwrap());
    let eval = Arc::new(LabeledDataset::classification(class_rows(16, 4), 12, 2).unwrap());
    let full = tempfile::tempdir().unwrap();
    let mut t = trainer(
        bert(Pooling::Cls),
        train.clone(),
        eval.clone(),
        Classification::default(),
        with_checkpoints(options(8, 5), full.path(), 3),
    );
    t.fit().unwrap();
    let expected = weights(t.model());
    let expected_losses = logged_losses(full.path());

    for k in [2, 5] {
        let part = tempfile::tempdir().unwrap();
        let mut a = trainer(
            bert(Pooling::Cls),
            train.clone(),
            eval.clone(),
            Classification::default(),
            with_checkpoints(options(8, 5), part.path(), 3),
        );
        let flag = a.stop_flag();
        a.add_callback(Box::new(StopAt(k, flag)));
        assert!(a.fit().unwrap().stopped);
        drop(a);
        // A fresh process with another initialisation: resumes from step k.
        let cfg = BertConfig::tiny_for_tests();
        let other = Bert::init(&cfg, BertHead::None, 77, DType::F32, &Device::Cpu).unwrap();
        let fresh =
            BertTask::new(other.with_classifier(2, Pooling::Cls, 77).unwrap(), 0.1).unwrap();
        let mut b = trainer(
            fresh,
            train.clone(),
            eval.clone(),
            Classification::default(),
            with_checkpoints(options(8, 5), part.path(), 3),
        );
        assert_eq!(b.resume().unwrap(), Some(k));
        b.fit().unwrap();
        assert!(weights(b.model()) == expected, "weights differ for k = {k}");
        assert_eq!(logged_losses(part.path()), expected_losses, "k = {k}");
    }
}
