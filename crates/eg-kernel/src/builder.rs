//! The builder: a few lines from a model and a dataset to a checked, resumable [`Trainer`].
//!
//! Every check happens in [`TrainerBuilder::build`], which returns a `Result`; nothing runs
//! before it. `build` also resumes from the newest valid checkpoint when checkpoints are on.

use std::path::PathBuf;
use std::sync::Arc;

use eg_config::{SeqLen, Steps, Tokens};
use eg_data::{Loader, LoaderOptions, Packing, Placement, TokenDataset};

use crate::optim::{Optimizer, OptimizerKind};
use crate::schedule::{Schedule, Shape};
use crate::trainer::{CheckpointOptions, EvalSet, TrainModel, Trainer, TrainerOptions};
use crate::{Error, Result};

/// An optimizer choice: the rule, its peak learning rate and weight decay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerSpec {
    /// The rule.
    pub kind: OptimizerKind,
    /// Peak learning rate.
    pub lr: f64,
    /// Decoupled weight decay (never on norms and biases).
    pub weight_decay: f64,
}

impl OptimizerSpec {
    /// AdamW with betas (0.9, 0.95), eps 1e-8, weight decay 0.01.
    pub fn adamw(lr: f64) -> Self {
        Self {
            kind: OptimizerKind::AdamW {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
            },
            lr,
            weight_decay: 0.01,
        }
    }

    /// SGD with momentum 0.9, no weight decay.
    pub fn sgd(lr: f64) -> Self {
        Self {
            kind: OptimizerKind::Sgd { momentum: 0.9 },
            lr,
            weight_decay: 0.0,
        }
    }

    /// Lion with betas (0.9, 0.99), weight decay 0.01.
    pub fn lion(lr: f64) -> Self {
        Self {
            kind: OptimizerKind::Lion {
                beta1: 0.9,
                beta2: 0.99,
            },
            lr,
            weight_decay: 0.01,
        }
    }

    /// Sets the weight decay.
    pub fn weight_decay(mut self, wd: f64) -> Self {
        self.weight_decay = wd;
        self
    }
}

/// A schedule shape with warmup; the peak and the length come from the builder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduleSpec {
    shape: Shape,
    warmup: u64,
    min_ratio: f64,
}

impl ScheduleSpec {
    fn new(shape: Shape) -> Self {
        Self {
            shape,
            warmup: 0,
            min_ratio: 0.1,
        }
    }
    /// Constant.
    pub fn constant() -> Self {
        Self::new(Shape::Constant)
    }
    /// Linear decay.
    pub fn linear() -> Self {
        Self::new(Shape::Linear)
    }
    /// Cosine decay.
    pub fn cosine() -> Self {
        Self::new(Shape::Cosine)
    }
    /// Warmup-stable-decay, decaying over the last `decay_fraction` of the steps.
    pub fn wsd(decay_fraction: f64) -> Self {
        Self::new(Shape::Wsd { decay_fraction })
    }
    /// Inverse square root.
    pub fn inverse_sqrt() -> Self {
        Self::new(Shape::InverseSqrt)
    }
    /// Linear warmup length.
    pub fn warmup(mut self, steps: Steps) -> Self {
        self.warmup = steps.0;
        self
    }
    /// Final rate as a fraction of the peak.
    pub fn min_ratio(mut self, r: f64) -> Self {
        self.min_ratio = r;
        self
    }
}

/// Checkpoint settings for the builder.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoints(CheckpointOptions);

impl Checkpoints {
    /// Checkpoints under `dir`, every 100 steps, keeping 3 (+1 best), written in the
    /// background.
    pub fn dir(dir: impl Into<PathBuf>) -> Self {
        Self(CheckpointOptions {
            dir: dir.into(),
            every: 100,
            keep_last: 3,
            keep_best: 1,
            background: true,
            write: crate::checkpoint::SaveOptions::default(),
        })
    }
    /// Interval.
    pub fn every(mut self, s: Steps) -> Self {
        self.0.every = s.0;
        self
    }
    /// Newest kept.
    pub fn keep(mut self, n: usize) -> Self {
        self.0.keep_last = n;
        self
    }
    /// Best kept (by eval loss).
    pub fn keep_best(mut self, n: usize) -> Self {
        self.0.keep_best = n;
        self
    }
    /// Write in the foreground.
    pub fn foreground(mut self) -> Self {
        self.0.background = false;
        self
    }
    /// Write through the page cache instead of `O_DIRECT`.
    pub fn buffered(mut self) -> Self {
        self.0.write.direct_io = false;
        self
    }
}

/// Builds a [`Trainer`]; see [`Trainer::builder`].
pub struct TrainerBuilder<M: TrainModel> {
    model: M,
    data: Arc<dyn TokenDataset>,
    eval: Option<Arc<dyn TokenDataset>>,
    optimizer: OptimizerSpec,
    schedule: ScheduleSpec,
    seq_len: usize,
    global_tokens: u64,
    micro_rows: Option<usize>,
    max_steps: u64,
    seed: u64,
    packing: Packing,
    eos_id: Option<u32>,
    checkpoints: Option<Checkpoints>,
    run_dir: Option<PathBuf>,
    clip_norm: Option<f64>,
    spike: Option<(usize, f64)>,
}

impl<M: TrainModel> std::fmt::Debug for TrainerBuilder<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainerBuilder")
            .field("optimizer", &self.optimizer)
            .field("schedule", &self.schedule)
            .field("seq_len", &self.seq_len)
            .field("global_tokens", &self.global_tokens)
            .field("max_steps", &self.max_steps)
            .finish_non_exhaustive()
    }
}

impl<M: TrainModel> Trainer<M> {
    /// A builder with defaults: AdamW at 1e-3 with a cosine schedule (5% warmup), sequences
    /// of 1024, global batches of 65,536 tokens in micro-batches of one row, 1000 steps, seed
    /// 0, concat packing, clipping at 1.0, spike detection on, no checkpoints.
    pub fn builder(model: M, data: Arc<dyn TokenDataset>) -> TrainerBuilder<M> {
        TrainerBuilder {
            model,
            data,
            eval: None,
            optimizer: OptimizerSpec::adamw(1e-3),
            schedule: ScheduleSpec::cosine(),
            seq_len: 1024,
            global_tokens: 65_536,
            micro_rows: None,
            max_steps: 1000,
            seed: 0,
            packing: Packing::Concat,
            eos_id: None,
            checkpoints: None,
            run_dir: None,
            clip_norm: Some(1.0),
            spike: Some((50, 6.0)),
        }
    }
}

impl<M: TrainModel> TrainerBuilder<M> {
    /// The optimizer.
    pub fn optimizer(mut self, o: OptimizerSpec) -> Self {
        self.optimizer = o;
        self
    }
    /// The schedule.
    pub fn schedule(mut self, s: ScheduleSpec) -> Self {
        self.schedule = s;
        self
    }
    /// Tokens per optimizer step (rounded down to whole rows).
    pub fn global_batch(mut self, t: Tokens) -> Self {
        self.global_tokens = t.0;
        self
    }
    /// Row length.
    pub fn seq_len(mut self, s: SeqLen) -> Self {
        self.seq_len = s.0 as usize;
        self
    }
    /// Rows per micro-batch (gradients of the micro-batches of a step are accumulated).
    pub fn micro_batch(mut self, rows: usize) -> Self {
        self.micro_rows = Some(rows);
        self
    }
    /// Updates to run.
    pub fn max_steps(mut self, s: Steps) -> Self {
        self.max_steps = s.0;
        self
    }
    /// Seed of the data order.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Packing mode.
    pub fn packing(mut self, p: Packing) -> Self {
        self.packing = p;
        self
    }
    /// Token appended after every sample.
    pub fn eos(mut self, id: u32) -> Self {
        self.eos_id = Some(id);
        self
    }
    /// A held-out split, evaluated at each checkpoint interval and at the end.
    pub fn eval(mut self, data: Arc<dyn TokenDataset>) -> Self {
        self.eval = Some(data);
        self
    }
    /// Checkpoints (and exact resume from them).
    pub fn checkpoints(mut self, c: Checkpoints) -> Self {
        self.checkpoints = Some(c);
        self
    }
    /// Directory for `metrics.jsonl`.
    pub fn run_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.run_dir = Some(dir.into());
        self
    }
    /// Clipping threshold (`None` disables clipping).
    pub fn clip_norm(mut self, c: Option<f64>) -> Self {
        self.clip_norm = c;
        self
    }
    /// Spike detection window and robust z threshold (`None` disables it).
    pub fn spike_detection(mut self, s: Option<(usize, f64)>) -> Self {
        self.spike = s;
        self
    }

    /// Checks everything, builds loader, optimizer and loop, and resumes from the newest
    /// valid checkpoint when checkpoints are on.
    pub fn build(self) -> Result<Trainer<M>> {
        let bad = |option: &'static str, reason: String| Error::InvalidOption { option, reason };
        let o = self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(bad(
                "optimizer.lr",
                format!("{} must be finite and > 0", o.lr),
            ));
        }
        if self.seq_len == 0 {
            return Err(bad("seq_len", "must be at least 1".into()));
        }
        let rows = (self.global_tokens / self.seq_len as u64) as usize;
        if rows == 0 {
            return Err(bad(
                "global_batch",
                format!(
                    "{} tokens is less than one row of {}",
                    self.global_tokens, self.seq_len
                ),
            ));
        }
        if self.max_steps == 0 {
            return Err(bad("max_steps", "must be at least 1".into()));
        }
        if self.schedule.warmup > self.max_steps {
            return Err(bad(
                "schedule.warmup",
                format!(
                    "{} is longer than the run ({})",
                    self.schedule.warmup, self.max_steps
                ),
            ));
        }
        let micro = self.micro_rows.unwrap_or(1);
        if micro == 0 || micro > rows {
            return Err(bad(
                "micro_batch",
                format!("must be in 1..={rows} rows (the global batch)"),
            ));
        }
        let lopts = LoaderOptions {
            seq_len: self.seq_len,
            rows_per_step: rows,
            packing: self.packing,
            eos_id: self.eos_id,
            pad_id: 0,
            seed: self.seed,
            shuffle: true,
            epochs: None,
        };
        let loader = Loader::new(self.data, lopts.clone(), Placement::SINGLE)?;
        let shapes: Vec<(String, Vec<usize>)> = self
            .model
            .named_params()
            .iter()
            .map(|(n, v)| (n.clone(), v.dims().to_vec()))
            .collect();
        let optimizer = Optimizer::new(o.kind, o.weight_decay, &shapes)?;
        let every = self.checkpoints.as_ref().map(|c| c.0.every).unwrap_or(0);
        let opts = TrainerOptions {
            max_steps: self.max_steps,
            micro_batch_rows: micro,
            schedule: Schedule {
                peak: o.lr,
                warmup: self.schedule.warmup,
                total: self.max_steps,
                min_ratio: self.schedule.min_ratio,
                shape: self.schedule.shape,
            },
            clip_norm: self.clip_norm,
            spike: self.spike,
            checkpoints: self.checkpoints.map(|c| c.0),
            snapshot_every: if every > 0 { every } else { 50 },
            eval_every: every,
            run_dir: self.run_dir,
            ..TrainerOptions::default()
        };
        let mut t = Trainer::new(self.model, optimizer, loader, opts)?;
        if let Some(eval) = self.eval {
            t = t.with_eval(EvalSet {
                data: eval,
                opts: LoaderOptions {
                    shuffle: false,
                    epochs: Some(1),
                    ..lopts
                },
            });
        }
        t.resume()?;
        Ok(t)
    }
}
