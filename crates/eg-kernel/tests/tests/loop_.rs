//! The loop: accumulation equals one big batch, coverage, eval, learning.

use candle_core::{Device, Tensor, Var};
use eg_kernel::Error;

use super::common::*;

#[test]
fn accumulation_equals_one_big_batch() {
    // Same global batch of 4 rows: one micro-batch of 4 vs 4 micro-batches of 1.
    let mut o = options(4, 4);
    o.clip_norm = None;
    o.spike = None;
    let mut big = trainer(model(), 4, o.clone());
    let rb = big.fit().unwrap();
    o.micro_batch_rows = 1;
    let mut acc = trainer(model(), 4, o);
    let ra = acc.fit().unwrap();
    let (lb, la) = (rb.last_loss.unwrap(), ra.last_loss.unwrap());
    assert!((lb - la).abs() <= 1e-5 * lb.abs(), "{lb} vs {la}");
    for ((n, a), (_, b)) in weights(big.model()).iter().zip(weights(acc.model())) {
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5, "{n}: {x} vs {y}");
        }
    }
}

#[test]
fn loss_falls_and_eval_reports_perplexity() {
    let mut o = options(30, 2);
    o.eval_every = 15;
    let mut t = trainer(model(), 4, o);
    let first = t.evaluate().unwrap();
    let r = t.fit().unwrap();
    let e = r.eval.unwrap();
    assert_eq!(e.step, 30);
    assert!(e.loss < first.loss - 0.3, "{} -> {}", first.loss, e.loss);
    assert!((e.perplexity - e.loss.exp()).abs() < 1e-9);
    assert!(e.tokens > 0);
}

#[test]
fn coverage_check_names_parameters_without_gradient() {
    let mut m = Faulty::new(vec![]);
    let extra =
        Var::from_tensor(&Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap())
            .unwrap();
    m.extra = Some(extra);
    let mut t = trainer(m, 4, options(2, 2));
    let err = t.fit().unwrap_err();
    let Error::AtStep { step: 0, source } = &err else {
        panic!("{err:?}")
    };
    match &**source {
        Error::NoGradient { params } => assert_eq!(params, &["unused.weight".to_string()]),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("unused.weight"));
}

#[test]
fn stop_flag_finishes_the_step_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer(
        model(),
        4,
        with_checkpoints(options(20, 2), dir.path(), 100),
    );
    struct StopAt(std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl eg_kernel::Callback for StopAt {
        fn on_step_end(&mut self, m: &eg_kernel::StepMetrics) {
            if m.step == 3 {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }
    let flag = t.stop_flag();
    t.add_callback(Box::new(StopAt(flag)));
    let r = t.fit().unwrap();
    assert!(r.stopped);
    assert_eq!(r.steps, 3);
    assert!(r.checkpoint.unwrap().ends_with("step-00000003"));
    assert!(eg_kernel::checkpoint::verify(&dir.path().join("checkpoints/step-00000003")).is_ok());
}

#[test]
fn sft_trains_only_on_response_tokens() {
    use eg_data::{InMemoryDataset, Loader, LoaderOptions, Packing, Placement};
    let mut d = InMemoryDataset::new();
    for i in 0..40u32 {
        let prompt: Vec<u32> = (0..6).map(|j| (i + j) % 30 + 1).collect();
        let answer: Vec<u32> = (0..(3 + i % 5)).map(|j| 40 + (i + j) % 20).collect();
        let all: Vec<u32> = prompt.iter().chain(&answer).copied().collect();
        d.push(&all, prompt.len());
    }
    let opts = LoaderOptions {
        seq_len: SEQ,
        rows_per_step: 4,
        packing: Packing::BestFit { window: 16 },
        eos_id: Some(0),
        seed: 3,
        ..LoaderOptions::default()
    };
    let mut l = Loader::new(
        std::sync::Arc::new(d.clone()),
        opts.clone(),
        Placement::SINGLE,
    )
    .unwrap();
    let b = l.next_batch().unwrap().unwrap();
    let targets = eg_kernel::batch_targets(&b);
    // Every target is a response token (>= 40) or EOS, never a prompt token.
    assert!(
        targets.iter().flatten().all(|&t| t >= 40 || t == 0),
        "{targets:?}"
    );
    let n = targets.iter().flatten().count();
    assert!(n > 0);
    // And the loop trains on such batches.
    let m = model();
    let opt = eg_kernel::Optimizer::new(adamw(), 0.0, &shapes(&m)).unwrap();
    let loader = Loader::new(std::sync::Arc::new(d), opts, Placement::SINGLE).unwrap();
    let mut t = eg_kernel::Trainer::new(m, opt, loader, options(5, 2)).unwrap();
    assert_eq!(t.fit().unwrap().steps, 5);
}

#[test]
fn early_stopping_when_eval_stops_improving() {
    use eg_data::{Loader, Placement};
    use eg_kernel::{EvalSet, Optimizer, OptimizerKind, Trainer};
    // Lion at lr 0.5 wrecks the model: the eval loss gets worse, patience 2 stops the run.
    let m = model();
    let opt = Optimizer::new(
        OptimizerKind::Lion {
            beta1: 0.9,
            beta2: 0.99,
        },
        0.0,
        &shapes(&m),
    )
    .unwrap();
    let loader = Loader::new(dataset(0), loader_opts(4), Placement::SINGLE).unwrap();
    let mut o = options(50, 4);
    o.schedule = eg_kernel::Schedule::constant(0.5);
    o.spike = None;
    o.clip_norm = None;
    o.eval_every = 1;
    o.eval_max_batches = 1;
    o.early_stopping_patience = Some(2);
    let mut t = Trainer::new(m, opt, loader, o).unwrap().with_eval(EvalSet {
        data: dataset(1),
        opts: eg_data::LoaderOptions {
            shuffle: false,
            epochs: Some(1),
            ..loader_opts(4)
        },
    });
    let r = t.fit().unwrap();
    assert!(r.early_stopped, "{r:?}");
    assert!(r.steps < 50);
    assert_eq!(r.state.evals_since_best, 2);
}
