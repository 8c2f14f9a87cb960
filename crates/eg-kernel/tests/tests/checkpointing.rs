//! Activation checkpointing in the training loop (issue 8): runs with and without it give
//! bitwise-equal losses and weights, for full training and LoRA with dropout, with gradient
//! accumulation, and when it is switched between micro-batches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use eg_kernel::{Callback, StepMetrics, TrainModel};
use eg_model::{Llama, LoraConfig};

use super::common::*;

struct Losses(Arc<Mutex<Vec<u64>>>);

impl Callback for Losses {
    fn on_step_end(&mut self, m: &StepMetrics) {
        self.0.lock().unwrap().push(m.loss.to_bits());
    }
}

/// Trains `m` for `steps` updates of 4 rows in micro-batches of 2; returns the step losses
/// (bits) and the final weights.
fn train<M: TrainModel>(m: M, steps: u64) -> (Vec<u64>, Vec<(String, Vec<f32>)>) {
    let losses = Arc::new(Mutex::new(Vec::new()));
    let mut o = options(steps, 2);
    o.schedule.peak = 3e-2;
    let mut t = trainer(m, 4, o);
    t.add_callback(Box::new(Losses(losses.clone())));
    let r = t.fit().unwrap();
    assert_eq!(r.steps, steps);
    let w = weights(t.model());
    let l = losses.lock().unwrap().clone();
    (l, w)
}

#[test]
fn training_with_checkpointing_is_bitwise_identical() {
    let lora = LoraConfig::rank(4)
        .alpha(8.0)
        .dropout(0.1)
        .targets(["all-linear"]);
    for adapters in [false, true] {
        let make = || {
            let m = model();
            if adapters {
                m.with_lora(&lora, 1).unwrap()
            } else {
                m
            }
        };
        let (plain_losses, plain_weights) = train(make(), 4);
        let m = make();
        m.set_activation_checkpointing(true);
        let (losses, weights) = train(m, 4);
        assert_eq!(losses.len(), 4);
        assert_eq!(losses, plain_losses, "losses (LoRA: {adapters})");
        assert_eq!(weights, plain_weights, "weights (LoRA: {adapters})");
    }
}

/// A model whose checkpointing is switched on and off at every forward pass, through the
/// trait a memory controller uses.
struct Switching {
    m: Llama,
    calls: AtomicU64,
}

impl TrainModel for Switching {
    fn named_params(&self) -> Vec<(String, Var)> {
        self.m.named_params()
    }

    fn logits(&self, ids: &Tensor) -> eg_kernel::Result<Tensor> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        TrainModel::set_activation_checkpointing(&self.m, n % 2 == 1)?;
        self.m.logits(ids)
    }

    // The trainer runs Llama's fused step (issue 9), which checkpoints too.
    fn fused_causal_lm(
        &self,
        ids: &Tensor,
        targets: &[Option<u32>],
        weight: f64,
    ) -> eg_kernel::Result<Option<(f64, GradStore)>> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        TrainModel::set_activation_checkpointing(&self.m, n % 2 == 1)?;
        self.m.fused_causal_lm(ids, targets, weight)
    }
}

#[test]
fn switching_checkpointing_between_micro_batches_changes_nothing() {
    let (plain_losses, plain_weights) = train(model(), 3);
    let s = Switching {
        m: model(),
        calls: AtomicU64::new(0),
    };
    let (losses, weights) = train(s, 3);
    assert_eq!(losses, plain_losses);
    assert_eq!(weights, plain_weights);
}
