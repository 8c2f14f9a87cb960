//! DPO (issue 6): loss and gradient against finite differences (f64), coverage, a frozen
//! reference (copy or disabled adapters), training raises the reward accuracy and margin,
//! and exact resume with pair batches.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use eg_data::{PairDataset, PairLoader, PairLoaderOptions, Placement, PreferencePair};
use eg_kernel::{Dpo, Objective, Optimizer, TrainModel, Trainer, TrainerOptions};
use eg_model::{Llama, LlamaConfig, LoraConfig};

use super::common::*;

const PSEQ: usize = 12;

/// Prompts of random tokens; the chosen response repeats tokens of 10..16, the rejected one
/// of 40..46, so a policy can learn to prefer the first kind.
fn pairs(n: u32) -> Arc<PairDataset> {
    let mut d = PairDataset::new();
    for i in 0..n {
        let plen = 2 + (i % 4) as usize;
        let prompt = (0..plen as u32)
            .map(|j| (i * 13 + j * 7) % 60 + 1)
            .collect();
        let clen = 2 + (i % 3) as usize;
        d.push(PreferencePair {
            prompt,
            chosen: (0..clen as u32).map(|j| 10 + (i + j) % 6).collect(),
            rejected: (0..(clen + i as usize % 2) as u32)
                .map(|j| 40 + (i * 3 + j) % 6)
                .collect(),
        });
    }
    Arc::new(d)
}

fn pair_opts(pairs_per_step: usize) -> PairLoaderOptions {
    PairLoaderOptions {
        seq_len: PSEQ,
        pairs_per_step,
        pad_id: 0,
        seed: 11,
        shuffle: true,
        epochs: None,
    }
}

fn batch(pairs_per_step: usize) -> eg_data::Batch {
    let mut l = PairLoader::new(pairs(16), pair_opts(pairs_per_step), Placement::SINGLE).unwrap();
    l.next_batch().unwrap().unwrap()
}

fn nudge(m: &Llama, seed: u64) {
    // Moves the policy away from the reference so that the log-ratios are not zero.
    for (i, (_, v)) in m.named_params().iter().enumerate() {
        let t = v.as_tensor();
        let noise = Tensor::randn(0f64, 1.0, t.dims(), &Device::Cpu)
            .unwrap()
            .to_dtype(t.dtype())
            .unwrap();
        let _ = seed;
        v.set(&(t + (noise * (0.02 * ((i % 3) as f64 + 1.0))).unwrap()).unwrap())
            .unwrap();
    }
}

fn loss_of(dpo: &mut Dpo<Llama>, m: &Llama, b: &eg_data::Batch) -> (Tensor, f64) {
    let n = Objective::<Llama>::normaliser(dpo, b).unwrap();
    let l = dpo.micro_loss(m, b, 0..b.rows, n).unwrap().unwrap();
    (l.loss, l.value)
}

/// The loss equals the formula computed independently (log-softmax with candle-nn), and
/// its gradient matches central finite differences in f64.
#[test]
fn dpo_loss_and_gradient_match_finite_differences() {
    let cfg = LlamaConfig::tiny_for_tests();
    let m = Llama::init(&cfg, 5, DType::F64, &Device::Cpu).unwrap();
    let beta = 0.7;
    let mut dpo = Dpo::new(&m, beta).unwrap();
    assert!(!dpo.uses_disabled_adapters());
    let reference = Llama::init(&cfg, 5, DType::F64, &Device::Cpu).unwrap();
    nudge(&m, 1);
    let b = batch(3);
    assert_eq!(b.rows, 6);

    // Independent formula.
    let logp = |model: &Llama| -> Vec<f64> {
        let ids = Tensor::from_slice(&b.input_ids, (b.rows, PSEQ), &Device::Cpu).unwrap();
        let ls = candle_nn::ops::log_softmax(&model.forward(&ids).unwrap(), 2).unwrap();
        let ls = ls.to_vec3::<f64>().unwrap();
        (0..b.rows)
            .map(|r| {
                (0..PSEQ - 1)
                    .filter(|&i| b.loss_mask[r * PSEQ + i + 1] == 1)
                    .map(|i| ls[r][i][b.input_ids[r * PSEQ + i + 1] as usize])
                    .sum()
            })
            .collect()
    };
    let (p, q) = (logp(&m), logp(&reference));
    let want: f64 = (0..3)
        .map(|i| {
            let z = beta * ((p[2 * i] - q[2 * i]) - (p[2 * i + 1] - q[2 * i + 1]));
            (1.0 + (-z).exp()).ln()
        })
        .sum::<f64>()
        / 3.0;
    let (loss, value) = loss_of(&mut dpo, &m, &b);
    assert!((value - want).abs() < 1e-10, "{value} vs {want}");
    assert!(
        (want - 2f64.ln()).abs() > 1e-3,
        "the policy should differ from the reference"
    );

    let grads = loss.backward().unwrap();
    let h = 1e-5;
    for (name, var) in m.named_params() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for k in [0, base.len() / 2, base.len() - 1] {
            let mut eval = |d: f64| {
                let mut w = base.clone();
                w[k] += d;
                var.set(&Tensor::from_vec(w, var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                loss_of(&mut dpo, &m, &b).1
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            var.set(&Tensor::from_vec(base.clone(), var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            assert!(
                (fd - g[k]).abs() < 1e-6 * (1.0 + g[k].abs()),
                "{name}[{k}]: finite difference {fd} vs gradient {}",
                g[k]
            );
        }
    }
}

/// Every trainable parameter gets a gradient, full model and LoRA.
#[test]
fn every_trainable_parameter_gets_a_dpo_gradient() {
    let b = batch(2);
    let full = model();
    let lora = model()
        .with_lora(&LoraConfig::rank(2).targets(["all-linear"]), 3)
        .unwrap();
    for (what, m) in [("full", full), ("lora", lora)] {
        let mut dpo = Dpo::new(&m, 0.1).unwrap();
        assert_eq!(dpo.uses_disabled_adapters(), what == "lora");
        let n = Objective::<Llama>::normaliser(&dpo, &b).unwrap();
        let l = dpo.micro_loss(&m, &b, 0..b.rows, n).unwrap().unwrap();
        let g = l.loss.backward().unwrap();
        for (name, v) in m.named_params() {
            let gr = g.get(v.as_tensor());
            assert!(gr.is_some(), "{what}: {name} got no gradient");
        }
    }
}

fn dpo_trainer(m: Llama, steps: u64, micro: usize, o: Option<TrainerOptions>) -> Trainer<Llama> {
    let opt = Optimizer::new(adamw(), 0.0, &shapes(&m)).unwrap();
    let loader = PairLoader::new(pairs(32), pair_opts(4), Placement::SINGLE).unwrap();
    let mut o = o.unwrap_or_else(|| options(steps, micro));
    o.spike = None;
    let dpo = Dpo::new(&m, 0.5).unwrap();
    Trainer::new(m, opt, loader, o)
        .unwrap()
        .with_objective(Box::new(dpo))
}

/// Collected step metrics.
struct Steps(Arc<std::sync::Mutex<Vec<eg_kernel::StepMetrics>>>);

impl eg_kernel::Callback for Steps {
    fn on_step_end(&mut self, m: &eg_kernel::StepMetrics) {
        self.0.lock().unwrap().push(m.clone());
    }
}

/// A short run on the synthetic preferences raises the reward accuracy and margin; the
/// frozen reference (a copy, and disabled adapters) does not move.
#[test]
fn dpo_training_raises_reward_accuracy_and_margin_and_keeps_the_reference() {
    let ids = Tensor::from_slice(&batch(2).input_ids, (4, PSEQ), &Device::Cpu).unwrap();
    for lora in [false, true] {
        let mut m = model();
        let before = m.forward(&ids).unwrap();
        if lora {
            m = m
                .with_lora(&LoraConfig::rank(4).alpha(8.0).targets(["all-linear"]), 3)
                .unwrap();
        }
        let mut o = options(24, 4);
        o.schedule = eg_kernel::Schedule::constant(if lora { 2e-2 } else { 5e-3 });
        let mut t = dpo_trainer(m, 24, 4, Some(o));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        t.add_callback(Box::new(Steps(seen.clone())));
        t.fit().unwrap();
        let s = seen.lock().unwrap();
        let mean = |r: std::ops::Range<usize>, k: &str| {
            r.clone().map(|i| s[i].extra[k]).sum::<f64>() / r.len() as f64
        };
        let (a0, a1) = (
            mean(0..4, "reward_accuracy"),
            mean(20..24, "reward_accuracy"),
        );
        let (m0, m1) = (mean(0..4, "reward_margin"), mean(20..24, "reward_margin"));
        let (l0, l1) = (s[0].loss, mean(20..24, "reward_margin"));
        let _ = l1;
        assert!(
            (l0 - 2f64.ln()).abs() < 1e-6,
            "lora={lora}: first loss {l0}"
        );
        assert!(a1 > a0 && a1 >= 0.9, "lora={lora}: accuracy {a0} -> {a1}");
        assert!(m1 > m0 && m1 > 0.5, "lora={lora}: margin {m0} -> {m1}");
        let last = s[23].loss;
        assert!(last < 0.5 * 2f64.ln(), "lora={lora}: loss {l0} -> {last}");
        // The reference is unchanged: the initial model's logits.
        if lora {
            let base = t.model().base_logits(&ids).unwrap().unwrap();
            assert_eq!(max_diff(&base, &before), 0.0);
            assert!(max_diff(&t.model().forward(&ids).unwrap(), &before) > 1e-3);
        }
    }
}

/// Without adapters the reference is a copy taken at construction: training the policy
/// leaves it bitwise unchanged.
#[test]
fn the_frozen_copy_never_changes() {
    let m = model();
    let ids = Tensor::from_slice(&batch(2).input_ids, (4, PSEQ), &Device::Cpu).unwrap();
    let before = m.forward(&ids).unwrap();
    let copy = m.frozen_copy().unwrap();
    let mut t = dpo_trainer(m, 5, 2, None);
    t.fit().unwrap();
    assert!(max_diff(&t.model().forward(&ids).unwrap(), &before) > 1e-4);
    assert_eq!(max_diff(&copy.forward(&ids).unwrap(), &before), 0.0);
    // The copy shares no storage with the trained model (its values did not follow).
    let names: Vec<String> = copy.named_params().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), t.model().named_params().len());
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Gradient accumulation over micro-batches of whole pairs equals one big batch.
#[test]
fn dpo_accumulation_matches_one_big_batch() {
    let run = |micro: usize| {
        let mut t = dpo_trainer(model(), 3, micro, None);
        let r = t.fit().unwrap();
        (r.last_loss.unwrap(), weights(t.model()))
    };
    let (l8, w8) = run(8);
    // 3 rows round up to whole pairs (4 rows).
    for micro in [2, 3] {
        let (l, w) = run(micro);
        assert!((l - l8).abs() < 1e-5, "micro {micro}: {l} vs {l8}");
        for ((n, a), (_, b)) in w.iter().zip(&w8) {
            let d = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-4, "micro {micro}: {n} differs by {d}");
        }
    }
}

struct StopAt(u64, Arc<AtomicBool>);

impl eg_kernel::Callback for StopAt {
    fn on_step_end(&mut self, m: &eg_kernel::StepMetrics) {
        if m.step == self.0 {
            self.1.store(true, Ordering::SeqCst);
        }
    }
}

/// Stop at k, resume in a fresh trainer (another initial model): every logged loss and the
/// final weights are bitwise equal to the uninterrupted run.
#[test]
fn dpo_resume_is_bitwise_identical() {
    const N: u64 = 8;
    let opts = |dir: &std::path::Path| with_checkpoints(options(N, 2), dir, 3);
    let base = tempfile::tempdir().unwrap();
    let mut t = dpo_trainer(model(), N, 2, Some(opts(base.path())));
    t.fit().unwrap();
    let want_w = weights(t.model());
    let want_l = logged_losses(base.path());
    assert_eq!(want_l.len() as u64, N);
    let text = std::fs::read_to_string(base.path().join("metrics.jsonl")).unwrap();
    assert!(text.contains("reward_accuracy") && text.contains("reward_margin"));
    for k in [2, 5] {
        let dir = tempfile::tempdir().unwrap();
        let mut a = dpo_trainer(model(), N, 2, Some(opts(dir.path())));
        let flag = a.stop_flag();
        a.add_callback(Box::new(StopAt(k, flag)));
        assert!(a.fit().unwrap().stopped);
        // The reference of the resumed run is the *initial* model, as in the first run:
        // the objective is built before the checkpoint is loaded.
        let mut b = dpo_trainer(model(), N, 2, Some(opts(dir.path())));
        assert_eq!(b.resume().unwrap(), Some(k));
        b.fit().unwrap();
        assert_eq!(logged_losses(dir.path()), want_l, "k = {k}");
        assert!(weights(b.model()) == want_w, "weights differ for k = {k}");
    }
}

/// Collected evaluations.
struct Evals(Arc<std::sync::Mutex<Vec<eg_kernel::EvalMetrics>>>);

impl eg_kernel::Callback for Evals {
    fn on_eval(&mut self, e: &eg_kernel::EvalMetrics) {
        self.0.lock().unwrap().push(e.clone());
    }
}

/// Held-out evaluation for DPO: a fresh pair loader over held-out pairs at every eval;
/// the eval loss is the mean pair loss and the reward accuracy is reported with it.
#[test]
fn dpo_periodic_eval_on_held_out_pairs() {
    let all = pairs(40);
    let mut held = PairDataset::new();
    for id in 32..40 {
        held.push(all.get(id).unwrap().clone());
    }
    let held = Arc::new(held);
    let mut o = options(16, 4);
    o.schedule = eg_kernel::Schedule::constant(5e-3);
    o.eval_every = 4;
    o.eval_max_batches = 100;
    let source = move || -> eg_kernel::Result<Box<dyn eg_data::BatchSource>> {
        let opts = PairLoaderOptions {
            shuffle: false,
            epochs: Some(1),
            ..pair_opts(3)
        };
        Ok(Box::new(PairLoader::new(
            held.clone(),
            opts,
            Placement::SINGLE,
        )?))
    };
    let mut t = dpo_trainer(model(), 16, 4, Some(o)).with_eval_batches(Box::new(source));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    t.add_callback(Box::new(Evals(seen.clone())));
    let first = t.evaluate().unwrap();
    // Before training the policy is the reference: every pair's loss is ln 2.
    assert!((first.loss - 2f64.ln()).abs() < 1e-6, "{first:?}");
    assert_eq!(first.tokens, 8, "the held-out pairs (3 + 3 + 2)");
    t.fit().unwrap();
    let e = seen.lock().unwrap();
    let steps: Vec<u64> = e.iter().map(|e| e.step).collect();
    assert_eq!(steps, [0, 4, 8, 12, 16]);
    let last = e.last().unwrap();
    assert!(last.loss < first.loss, "{} -> {}", first.loss, last.loss);
    let acc = last.extra["reward_accuracy"];
    assert!((0.0..=1.0).contains(&acc) && acc > 0.5, "accuracy {acc}");
    assert!(e.iter().all(|e| e.extra.contains_key("reward_margin")));
}
