//! The guarded training loop.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use eg_data::{Batch, BatchSource, Loader, LoaderOptions, Placement, TokenDataset};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointData};
use crate::feed::Feed;
use crate::grads::Grads;
use crate::guards::{SpikeDetector, clip_factor};
use crate::loss_scale::{LossScaler, ScaleUpdate};
use crate::objective::{CausalLm, Objective};
use crate::optim::{Optimizer, OptimizerSnapshot, OptimizerState, OptimizerStream};
use crate::schedule::Schedule;
use crate::tensors::{copy_f32_into, set_var};

use crate::checkpoint::NamedBuffers;
use crate::{Error, Result};

/// What the trainer needs from a model: its trainable parameters and a forward pass.
pub trait TrainModel {
    /// Trainable parameters, named, in a fixed order.
    fn named_params(&self) -> Vec<(String, Var)>;
    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]` (u32).
    fn logits(&self, ids: &Tensor) -> Result<Tensor>;
    /// Switches training-only behaviour (dropout) on or off; evaluation turns it off.
    fn set_training(&self, _training: bool) {}
    /// Sequence-classification logits `[batch, num_labels]` for padded token ids and their
    /// attention mask (`[batch, len]` u32, 1 = token); `seed` draws the dropout mask in
    /// training mode. Models without a classification head return [`Error::Unsupported`].
    fn class_logits(&self, _ids: &Tensor, _mask: &Tensor, _seed: u64) -> Result<Tensor> {
        Err(Error::Unsupported {
            what: "sequence classification for this model",
            issue: 6,
        })
    }
    /// L2-normalised sentence embeddings `[batch, dim]` (mean over the tokens the mask
    /// keeps) for padded token ids and their attention mask. Models without them return
    /// [`Error::Unsupported`].
    fn embeddings(&self, _ids: &Tensor, _mask: &Tensor) -> Result<Tensor> {
        Err(Error::Unsupported {
            what: "sentence embeddings for this model",
            issue: 6,
        })
    }
    /// Turns activation checkpointing on or off from the next forward pass
    /// (`memory.activation_checkpointing`, or a memory controller between steps). Models
    /// without it return [`Error::Unsupported`].
    fn set_activation_checkpointing(&self, _on: bool) -> Result<()> {
        Err(Error::Unsupported {
            what: "activation checkpointing for this model",
            issue: 8,
        })
    }
    /// Logits for packed rows: `positions` (`[batch, seq]` u32) restart at every document and
    /// attention stays inside a document (`doc_ids`, one per position, row-major). Models
    /// without block-diagonal attention return [`Error::Unsupported`].
    fn packed_logits(
        &self,
        _ids: &Tensor,
        _positions: &Tensor,
        _doc_ids: &[u32],
    ) -> Result<Tensor> {
        Err(Error::Unsupported {
            what: "packed rows with document masks for this model",
            issue: 6,
        })
    }
    /// The loss `weight × cross_entropy(logits(ids), targets)` and its gradients in one
    /// call, when the model has a fused training step for its current settings (issue 9:
    /// [`eg_model::Llama::fused_step`], a hand-written backward). `Ok(None)`: no fused step,
    /// the objective builds the loss for candle's autograd instead.
    fn fused_causal_lm(
        &self,
        _ids: &Tensor,
        _targets: &[Option<u32>],
        _weight: f64,
    ) -> Result<Option<(f64, GradStore)>> {
        Ok(None)
    }
    /// The loss [`TrainModel::fused_causal_lm`] would return, forward only and without
    /// building candle's graph (evaluation); `Ok(None)` when the model has no fused step for
    /// its current settings.
    fn fused_causal_lm_loss(
        &self,
        _ids: &Tensor,
        _targets: &[Option<u32>],
        _weight: f64,
    ) -> Result<Option<f64>> {
        Ok(None)
    }
    /// Whether the model trains adapters over a frozen base (LoRA): DPO then uses the base
    /// ([`TrainModel::base_logits`]) as its reference.
    fn has_adapters(&self) -> bool {
        false
    }
    /// Logits of the model with its adapters disabled (the frozen base), detached: DPO's
    /// reference with no second copy of the weights. `Ok(None)` when the model has no
    /// adapters (DPO then keeps a [`TrainModel::frozen_copy`]).
    fn base_logits(&self, _ids: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// A copy of the model with weights of its own (nothing shared, never trained): DPO's
    /// frozen reference for a model without adapters.
    fn frozen_copy(&self) -> Result<Self>
    where
        Self: Sized,
    {
        Err(Error::Unsupported {
            what: "a frozen reference copy of this model",
            issue: 6,
        })
    }
}

impl TrainModel for eg_model::Llama {
    fn named_params(&self) -> Vec<(String, Var)> {
        self.params()
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect()
    }

    fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.forward(ids)?)
    }

    fn set_training(&self, training: bool) {
        self.set_lora_training(training);
    }

    fn packed_logits(&self, ids: &Tensor, positions: &Tensor, doc_ids: &[u32]) -> Result<Tensor> {
        Ok(self.forward_packed(ids, positions, doc_ids)?)
    }

    fn fused_causal_lm(
        &self,
        ids: &Tensor,
        targets: &[Option<u32>],
        weight: f64,
    ) -> Result<Option<(f64, GradStore)>> {
        if self.fused_step_unavailable(ids.dim(1)?).is_some() {
            return Ok(None);
        }
        let step = self.fused_step(ids, targets, weight)?;
        Ok(Some((step.loss, step.grads)))
    }

    fn fused_causal_lm_loss(
        &self,
        ids: &Tensor,
        targets: &[Option<u32>],
        weight: f64,
    ) -> Result<Option<f64>> {
        if self.fused_step_unavailable(ids.dim(1)?).is_some() {
            return Ok(None);
        }
        Ok(Some(self.fused_loss(ids, targets, weight)?.0))
    }

    fn has_adapters(&self) -> bool {
        self.lora_config().is_some()
    }

    fn base_logits(&self, ids: &Tensor) -> Result<Option<Tensor>> {
        if self.lora_config().is_none() {
            return Ok(None);
        }
        self.set_adapters_enabled(false)?;
        let logits = self.forward(ids);
        self.set_adapters_enabled(true)?;
        Ok(Some(logits?.detach()))
    }

    fn frozen_copy(&self) -> Result<Self> {
        if self.lora_config().is_some() {
            return Err(Error::Unsupported {
                what: "a frozen copy of a model with adapters (disable the adapters instead)",
                issue: 6,
            });
        }
        let mut tensors = std::collections::HashMap::new();
        for (name, var) in self.params().iter() {
            tensors.insert(name.to_string(), var.as_tensor().detach().copy()?);
        }
        let mut copy = eg_model::Llama::from_tensors(self.config(), tensors, self.dtype())?;
        copy.set_attention(self.attention());
        copy.set_compute_dtype(self.compute_dtype())?;
        Ok(copy)
    }

    fn set_activation_checkpointing(&self, on: bool) -> Result<()> {
        eg_model::Llama::set_activation_checkpointing(self, on);
        Ok(())
    }
}

/// Hooks called by the loop. Every method has an empty default.
pub trait Callback: Send {
    /// Before update `step` (0-based) starts.
    fn on_step_start(&mut self, _step: u64) {}
    /// After an update was applied.
    fn on_step_end(&mut self, _m: &StepMetrics) {}
    /// After an evaluation.
    fn on_eval(&mut self, _e: &EvalMetrics) {}
    /// After a checkpoint was written (or handed to the background writer).
    fn on_checkpoint(&mut self, _step: u64, _dir: &Path) {}
    /// After a guard fired.
    fn on_anomaly(&mut self, _a: &Anomaly) {}
    /// After the memory guard changed the strategy (before the next update).
    fn on_memory(&mut self, _d: &eg_memory::Decision) {}
}

/// Metrics of one applied update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Updates done after this one (1-based).
    pub step: u64,
    /// Mean next-token loss over the global batch.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Non-padding tokens of the global batch.
    pub tokens: u64,
    /// Tokens trained on so far.
    pub tokens_seen: u64,
    /// Wall time of the step in seconds.
    pub step_secs: f64,
    /// Metrics of the objective beyond the loss (e.g. DPO's `reward_accuracy`); the
    /// `metrics.jsonl` line holds them under `extra` (absent when empty).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

/// Metrics of an evaluation on the held-out split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Updates done.
    pub step: u64,
    /// Mean loss per predicted token (per example, per pair: the objective's normaliser).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Predicted tokens evaluated (examples, pairs: what the loss is averaged over).
    pub tokens: u64,
    /// The objective's metrics beyond the loss, averaged like it (e.g. classification's
    /// `accuracy`); the `metrics.jsonl` line holds them under `extra`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

/// What a guard saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
#[non_exhaustive]
pub enum Anomaly {
    /// The loss or a gradient was NaN or infinite: the update was skipped.
    NonFinite {
        /// Update index that was skipped.
        step: u64,
        /// Data step of the batch.
        data_step: u64,
        /// Consecutive non-finite steps.
        consecutive: u32,
    },
    /// A loss spike: rolled back, batch quarantined.
    Spike {
        /// Update index.
        step: u64,
        /// Data step of the batch.
        data_step: u64,
        /// The loss.
        loss: f64,
        /// Its robust z-score.
        zscore: f64,
    },
    /// A periodic checkpoint could not be written; training went on (the previous valid
    /// checkpoint still stands). A failure of the final checkpoint is an error instead.
    CheckpointFailed {
        /// Update index of the checkpoint.
        step: u64,
        /// The error.
        error: String,
    },
    /// Parameters, optimizer and data position were restored from the in-memory snapshot.
    Rollback {
        /// Update index before.
        from_step: u64,
        /// Update index restored.
        to_step: u64,
    },
}

/// A batch taken out of training, kept in checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    /// Data step of the batch.
    pub data_step: u64,
    /// Update index when it was quarantined.
    pub step: u64,
    /// Why (`spike` or `non_finite`).
    pub reason: String,
    /// Sample ids of the batch.
    pub sample_ids: Vec<u64>,
}

/// Everything of the loop that is not weights, optimizer or data cursor; saved in
/// `trainer.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Updates applied.
    pub step: u64,
    /// Tokens trained on.
    pub tokens_seen: u64,
    /// Multiplier on the schedule (LR back-off after rollbacks).
    pub lr_scale: f64,
    /// Updates skipped for non-finite values.
    pub nonfinite_skips: u64,
    /// Current run of consecutive non-finite steps.
    pub consecutive_nonfinite: u32,
    /// Rollbacks done.
    pub rollbacks: u64,
    /// Spikes detected.
    pub spikes: u64,
    /// Quarantined batches.
    pub quarantine: Vec<QuarantineEntry>,
    /// Data steps never trained on again.
    pub skip_data_steps: BTreeSet<u64>,
    /// The spike detector's window.
    pub detector: Option<SpikeDetector>,
    /// Best eval loss so far.
    pub best_eval: Option<f64>,
    /// Evaluations since the best one.
    pub evals_since_best: u32,
    /// Last eval loss.
    pub last_eval: Option<f64>,
    /// Compute threads (candle) of the process that wrote this.
    pub threads: usize,
    /// Periodic checkpoints that failed to write.
    #[serde(default)]
    pub checkpoint_failures: u64,
    /// Dynamic loss scaling (f16 compute), when on: the scale and its counters, so a resume
    /// continues with the same scale ([`crate::loss_scale`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<LossScaler>,
    /// The memory guard's state (controller, decisions, clock) when one runs; a resume
    /// continues with the saved strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<eg_memory::GuardState>,
}

/// Checkpoint settings.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointOptions {
    /// Directory holding `step-N` directories.
    pub dir: PathBuf,
    /// Save every this many updates (and at the end and on stop).
    pub every: u64,
    /// Newest kept.
    pub keep_last: usize,
    /// Best (by eval loss) kept on top.
    pub keep_best: usize,
    /// Write on a background thread from a snapshot.
    pub background: bool,
    /// How the files are written.
    pub write: checkpoint::SaveOptions,
}

/// Loop settings. Plain data; the CLI and the facade map the configuration onto it.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerOptions {
    /// Updates to run in total.
    pub max_steps: u64,
    /// Rows per micro-batch; the loader's `rows_per_step` rows of a global batch are split
    /// into micro-batches whose gradients are accumulated.
    pub micro_batch_rows: usize,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Global-norm clipping threshold.
    pub clip_norm: Option<f64>,
    /// Fail at the first step when a trainable parameter gets no gradient.
    pub coverage_check: bool,
    /// Consecutive non-finite steps tolerated before rolling back.
    pub nan_skip_limit: u32,
    /// Spike detection: (window, robust z threshold).
    pub spike: Option<(usize, f64)>,
    /// LR multiplier applied after each spike rollback, in (0, 1].
    pub lr_backoff: f64,
    /// Checkpoints; `None` keeps nothing on disk.
    pub checkpoints: Option<CheckpointOptions>,
    /// In-memory snapshot interval for rollback (snapshots are also taken at checkpoints).
    pub snapshot_every: u64,
    /// Evaluate every this many updates (0: only at the end).
    pub eval_every: u64,
    /// Global batches per evaluation.
    pub eval_max_batches: usize,
    /// Stop after this many evaluations without improvement.
    pub early_stopping_patience: Option<u32>,
    /// Run directory for `metrics.jsonl`; `None` writes no metrics file.
    pub run_dir: Option<PathBuf>,
    /// Resolved configuration stored in checkpoints.
    pub config_toml: Option<String>,
    /// Batches prepared ahead on a background thread (0: each batch is loaded when needed).
    /// Checkpoints hold the cursor after the last batch *trained on*, so resume is exact
    /// either way.
    pub prefetch: usize,
}

impl Default for TrainerOptions {
    fn default() -> Self {
        Self {
            max_steps: 100,
            micro_batch_rows: 1,
            schedule: Schedule::constant(1e-3),
            clip_norm: Some(1.0),
            coverage_check: true,
            nan_skip_limit: 3,
            spike: Some((50, 6.0)),
            lr_backoff: 1.0,
            checkpoints: None,
            snapshot_every: 50,
            eval_every: 0,
            eval_max_batches: 8,
            early_stopping_patience: None,
            run_dir: None,
            config_toml: None,
            prefetch: 0,
        }
    }
}

/// A held-out split evaluated with a fresh, unshuffled loader.
pub struct EvalSet {
    /// The data.
    pub data: Arc<dyn TokenDataset>,
    /// Loader options (usually the training ones with `shuffle = false`, one epoch).
    pub opts: LoaderOptions,
}

impl std::fmt::Debug for EvalSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvalSet")
            .field("samples", &self.data.len())
            .field("opts", &self.opts)
            .finish()
    }
}

/// Makes a fresh source of held-out batches for one evaluation
/// ([`Trainer::with_eval_batches`]).
pub type EvalSource = Box<dyn FnMut() -> Result<Box<dyn BatchSource>> + Send>;

/// The held-out split: tokens read with a fresh loader, or batches from a source.
enum EvalData {
    Tokens(EvalSet),
    Batches(EvalSource),
}

/// How [`Trainer::fit`] ended.
#[derive(Debug, Clone, PartialEq)]
pub struct FitReport {
    /// Updates applied in total.
    pub steps: u64,
    /// Loss of the last update.
    pub last_loss: Option<f64>,
    /// The last evaluation.
    pub eval: Option<EvalMetrics>,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// Stopped by the stop flag (signal) before `max_steps`.
    pub stopped: bool,
    /// Stopped early by the eval patience.
    pub early_stopped: bool,
    /// The data ran out before `max_steps`.
    pub data_exhausted: bool,
    /// The loop's state at the end.
    pub state: TrainerState,
}

struct Snapshot {
    step: u64,
    tokens_seen: u64,
    /// Weights by name, shared with the checkpoint writer (no second copy).
    weights: Arc<crate::checkpoint::NamedBuffers>,
    /// In RAM, or kept by an offloading state store in its files.
    optimizer: OptimizerSnapshot,
    /// The data source's cursor (JSON, as checkpoints store it).
    cursor: Vec<u8>,
    detector: Option<SpikeDetector>,
}

/// How long the loop was blocked by one snapshot copied in the background (a checkpoint's
/// or a rollback point's): [`Trainer::checkpoint_stalls`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SnapshotStall {
    /// Updates done when the snapshot was taken.
    pub step: u64,
    /// Whether it was a checkpoint's (else a rollback point only).
    pub checkpoint: bool,
    /// Seconds the loop spent starting it (in [`Trainer::save_checkpoint`]: the small JSON
    /// files, handing the buffers over, starting the thread).
    pub start_secs: f64,
    /// Seconds the loop waited for the copy to finish where it needed the state back (the
    /// next update, a rollback, ...): zero when the copy was done by then.
    pub wait_secs: f64,
    /// Seconds the copy itself took on its thread (overlapped with the loop).
    pub copy_secs: f64,
}

impl SnapshotStall {
    /// Seconds the loop was blocked in total: `start_secs + wait_secs`.
    pub fn blocked_secs(&self) -> f64 {
        self.start_secs + self.wait_secs
    }
}

/// What the background copy hands back: the optimizer (moved to the copy's thread, since
/// its state store is read there) and the copied weights and optimizer state.
struct Copied {
    optimizer: Optimizer,
    state: Result<(Arc<NamedBuffers>, OptimizerSnapshot)>,
    copy_secs: f64,
}

/// A snapshot being copied on a background thread. The optimizer is on that thread until
/// [`Trainer::settle_snapshot`] receives it back; the parameters are only read there.
struct PendingCopy {
    rx: std::sync::mpsc::Receiver<Copied>,
    /// The snapshot's small parts, taken on the loop's thread when the copy started.
    step: u64,
    tokens_seen: u64,
    cursor: Vec<u8>,
    detector: Option<SpikeDetector>,
    checkpoint: bool,
    start_secs: f64,
}

/// The optimizer, in the trainer or on the thread copying a snapshot.
///
/// Safety of the overlapped copy: while it runs, the weights are only *read* (the forward
/// and backward passes, evaluation, the copy; candle's storage lock lets readers share) and
/// the optimizer, whose update writes the weights and its moments in place, is not in the
/// trainer at all: every path that writes weights or optimizer state (the update, a
/// rollback, restoring a checkpoint, moving the optimizer state, a memory-guard action,
/// drop) first calls [`Trainer::settle_snapshot`], which waits for the copy and takes the
/// optimizer back.
enum OptimizerSlot {
    /// In the trainer.
    Here(Optimizer),
    /// Moved to a background snapshot copy.
    Copying(PendingCopy),
}

fn optimizer_away() -> Error {
    Error::StateMismatch {
        what: "optimizer".into(),
        expected: "in the trainer".into(),
        found: "on the background snapshot copy (not settled)".into(),
    }
}

/// Copies the parameters and the optimizer state into `spare`'s buffers where they are
/// free (else new ones). `parallel` runs the copies on rayon's threads (the synchronous
/// capture); the background copy runs them on its own thread.
fn copy_state(
    names: &[String],
    vars: &[Var],
    optimizer: &mut Optimizer,
    spare: (NamedBuffers, Option<OptimizerState>),
    parallel: bool,
) -> Result<(Arc<NamedBuffers>, OptimizerSnapshot)> {
    let (mut old_weights, old_optimizer) = spare;
    let jobs: Vec<_> = names
        .iter()
        .zip(vars)
        .map(|(n, v)| (n, v, old_weights.remove(n).map(|(_, b)| b)))
        .collect();
    drop(old_weights);
    let copy = |(n, v, reuse): (&String, &Var, Option<Vec<f32>>)| {
        let b = copy_f32_into(n, v.as_tensor(), reuse, parallel)?;
        Ok((n.clone(), (v.dims().to_vec(), b)))
    };
    let weights = if parallel {
        // On rayon's threads (each tensor is copied whole into its own place).
        use rayon::prelude::*;
        jobs.into_par_iter()
            .map(copy)
            .collect::<Result<BTreeMap<_, _>>>()?
    } else {
        jobs.into_iter()
            .map(copy)
            .collect::<Result<BTreeMap<_, _>>>()?
    };
    let optimizer = if parallel {
        optimizer.snapshot_reusing(old_optimizer)?
    } else {
        optimizer.snapshot_reusing_serial(old_optimizer)?
    };
    Ok((Arc::new(weights), optimizer))
}

/// The buffers of a snapshot no longer in use, for the next copy to reuse (those still held
/// by a checkpoint writer are not taken).
fn spare_buffers(s: Option<Snapshot>) -> (NamedBuffers, Option<OptimizerState>) {
    match s {
        Some(s) => (
            Arc::try_unwrap(s.weights).unwrap_or_default(),
            match s.optimizer {
                OptimizerSnapshot::Ram(o) => Arc::try_unwrap(o).ok(),
                OptimizerSnapshot::InStore { .. } => None,
            },
        ),
        None => (BTreeMap::new(), None),
    }
}

/// What a checkpoint takes from a snapshot copy: the weights, the optimizer state and (disk
/// offload) the stream of its buffers.
type CheckpointParts = (
    Arc<NamedBuffers>,
    Arc<OptimizerState>,
    Option<Arc<OptimizerStream>>,
);

/// Writes a checkpoint from a snapshot copy, on the copy's thread.
type WriteFromCopy = Box<dyn FnOnce(CheckpointParts) -> Result<PathBuf> + Send>;

/// Background snapshot stalls kept by [`Trainer::checkpoint_stalls`] (the newest).
const STALLS_KEPT: usize = 256;

/// The training loop: micro-batches with accumulation normalised over the global batch, the
/// guards, evaluation, checkpoints and exact resume.
pub struct Trainer<M: TrainModel> {
    model: M,
    names: Vec<String>,
    vars: Vec<Var>,
    optimizer: OptimizerSlot,
    /// Stalls of the newest background snapshots, oldest first.
    stalls: std::collections::VecDeque<SnapshotStall>,
    loader: Box<dyn BatchSource>,
    eval: Option<EvalData>,
    opts: TrainerOptions,
    callbacks: Vec<Box<dyn Callback>>,
    stop: Arc<AtomicBool>,
    state: TrainerState,
    snapshot: Option<Snapshot>,
    /// The rollback snapshot before the current one: its buffers are reused by the next
    /// capture once the checkpoint writer has let go of them (no allocation, no page faults
    /// in the loop's stall).
    spare: Option<Snapshot>,
    /// Gradient sums of the current update (candle's own storage for one micro-batch).
    grads: Grads,
    /// Factor from the summed (loss-scaled) gradients to true gradients, this update.
    grad_unscale: f32,
    metrics: Option<std::fs::File>,
    pending: Option<JoinHandle<Result<PathBuf>>>,
    pending_step: u64,
    last_checkpoint: Option<PathBuf>,
    coverage_checked: bool,
    memory: Option<MemoryHook>,
    objective: Box<dyn Objective<M>>,
    step_extra: BTreeMap<String, f64>,
}

impl<M: TrainModel> std::fmt::Debug for Trainer<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("opts", &self.opts)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Makes the optimizer-state store for an offload setting: the memory guard switches the
/// optimizer between RAM and disk with it ([`Trainer::with_memory_guard`]).
pub type StoreFactory =
    Box<dyn FnMut(eg_memory::OffloadKind) -> Result<Box<dyn crate::optim::StateStore>> + Send>;

/// The memory guard in the loop and what it controls.
struct MemoryHook {
    guard: eg_memory::MemoryGuard,
    stores: Option<StoreFactory>,
    /// What the model and the optimizer run now.
    checkpointing: bool,
    offload: eg_memory::OffloadKind,
}

/// Compute threads candle uses on the CPU.
pub fn compute_threads() -> usize {
    candle_core::utils::get_num_threads()
}

impl<M: TrainModel> Trainer<M> {
    /// A trainer at step 0. Checks the options; the optimizer must have been built for
    /// `model.named_params()` in that order.
    pub fn new(
        model: M,
        optimizer: Optimizer,
        loader: impl BatchSource + 'static,
        opts: TrainerOptions,
    ) -> Result<Self> {
        let invalid = |option, reason: &str| Error::InvalidOption {
            option,
            reason: reason.into(),
        };
        if opts.micro_batch_rows == 0 {
            return Err(invalid("micro_batch_rows", "must be at least 1"));
        }
        if !(opts.lr_backoff > 0.0 && opts.lr_backoff <= 1.0) {
            return Err(invalid("lr_backoff", "must be in (0, 1]"));
        }
        if let Some(c) = &opts.checkpoints
            && c.every == 0
        {
            return Err(invalid("checkpoints.every", "must be at least 1"));
        }
        if opts.nan_skip_limit == 0 {
            return Err(invalid("nan_skip_limit", "must be at least 1"));
        }
        let (names, vars): (Vec<String>, Vec<Var>) = model.named_params().into_iter().unzip();
        let grads = Grads::new(vars.iter().map(|v| v.elem_count()).collect());
        let detector = opts.spike.map(|(w, z)| SpikeDetector::new(w, z));
        Ok(Self {
            model,
            names,
            vars,
            optimizer: OptimizerSlot::Here(optimizer),
            stalls: std::collections::VecDeque::new(),
            loader: Box::new(Feed::new(Box::new(loader), opts.prefetch)),
            eval: None,
            stop: Arc::new(AtomicBool::new(false)),
            state: TrainerState {
                step: 0,
                tokens_seen: 0,
                lr_scale: 1.0,
                nonfinite_skips: 0,
                consecutive_nonfinite: 0,
                rollbacks: 0,
                spikes: 0,
                quarantine: Vec::new(),
                skip_data_steps: BTreeSet::new(),
                detector,
                best_eval: None,
                evals_since_best: 0,
                last_eval: None,
                threads: compute_threads(),
                checkpoint_failures: 0,
                loss_scaler: None,
                memory: None,
            },
            opts,
            callbacks: Vec::new(),
            snapshot: None,
            spare: None,
            grads,
            grad_unscale: 1.0,
            metrics: None,
            pending: None,
            pending_step: 0,
            last_checkpoint: None,
            coverage_checked: false,
            memory: None,
            objective: Box::new(CausalLm::pretrain()),
            step_extra: BTreeMap::new(),
        })
    }

    /// Replaces the objective (default: [`CausalLm::pretrain`]). See [`crate::objective`].
    pub fn with_objective(mut self, objective: Box<dyn Objective<M>>) -> Self {
        self.objective = objective;
        self
    }

    /// Turns dynamic loss scaling on (for f16 compute; [`crate::loss_scale`]): the loss is
    /// multiplied by the scale before each backward pass and the accumulated gradients divided
    /// by it; an update whose gradients overflow is skipped and the scale halved (not a
    /// non-finite anomaly, no rollback); the scale doubles after `growth_interval` good
    /// updates. Add it before [`Trainer::resume`], which continues with the saved scale.
    pub fn with_loss_scaler(mut self, scaler: LossScaler) -> Self {
        self.state.loss_scaler = Some(scaler);
        self
    }

    /// Adds a held-out split evaluated every `eval_every` updates and at the end.
    pub fn with_eval(mut self, eval: EvalSet) -> Self {
        self.eval = Some(EvalData::Tokens(eval));
        self
    }

    /// Adds a held-out split given as batches (e.g. DPO's preference pairs: a
    /// [`eg_data::PairLoader`] over held-out pairs, unshuffled, one epoch): `source` makes a
    /// fresh source at each evaluation (every `eval_every` updates and at the end), which
    /// is read until it ends or `eval_max_batches` batches. The loss is the objective's on
    /// those batches, averaged over their normalisers (pairs for DPO), with the
    /// objective's metrics (DPO: `reward_accuracy`, ...) under `extra`.
    pub fn with_eval_batches(mut self, source: EvalSource) -> Self {
        self.eval = Some(EvalData::Batches(source));
        self
    }

    /// Adds a callback.
    pub fn add_callback(&mut self, cb: Box<dyn Callback>) {
        self.callbacks.push(cb);
    }

    /// The flag that asks the loop to finish the current update, checkpoint and return
    /// (set it from a signal handler).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The loop's state.
    pub fn state(&self) -> &TrainerState {
        &self.state
    }

    /// The options.
    pub fn options(&self) -> &TrainerOptions {
        &self.opts
    }

    /// The optimizer (waits for a snapshot copy in flight first: the copy holds it).
    pub fn optimizer(&mut self) -> Result<&Optimizer> {
        Ok(self.optimizer_mut()?)
    }

    /// The optimizer, taken back from a snapshot copy in flight first.
    fn optimizer_mut(&mut self) -> Result<&mut Optimizer> {
        self.settle_snapshot()?;
        match &mut self.optimizer {
            OptimizerSlot::Here(o) => Ok(o),
            OptimizerSlot::Copying(_) => Err(optimizer_away()),
        }
    }

    /// How long the loop was blocked by each of the newest snapshots copied in the
    /// background (up to 256, oldest first; one is listed once it was settled).
    pub fn checkpoint_stalls(&self) -> impl Iterator<Item = &SnapshotStall> {
        self.stalls.iter()
    }

    /// Waits for a snapshot copy in flight, takes the optimizer back and makes the copy the
    /// rollback point. Called first by every path that writes the weights or the optimizer
    /// state, so the copy always sees the state of the step it was started at.
    fn settle_snapshot(&mut self) -> Result<()> {
        if matches!(self.optimizer, OptimizerSlot::Here(_)) {
            return Ok(());
        }
        let t0 = Instant::now();
        let OptimizerSlot::Copying(p) = &self.optimizer else {
            return Ok(());
        };
        // A copy thread that panicked drops its sender: the optimizer is lost with it.
        let copied = p.rx.recv().map_err(|_| Error::WriterPanicked)?;
        let wait_secs = t0.elapsed().as_secs_f64();
        let OptimizerSlot::Copying(p) =
            std::mem::replace(&mut self.optimizer, OptimizerSlot::Here(copied.optimizer))
        else {
            return Err(optimizer_away());
        };
        let (weights, optimizer) = copied.state?;
        self.set_snapshot(Snapshot {
            step: p.step,
            tokens_seen: p.tokens_seen,
            weights,
            optimizer,
            cursor: p.cursor,
            detector: p.detector,
        });
        if self.stalls.len() >= STALLS_KEPT {
            self.stalls.pop_front();
        }
        self.stalls.push_back(SnapshotStall {
            step: p.step,
            checkpoint: p.checkpoint,
            start_secs: p.start_secs,
            wait_secs,
            copy_secs: copied.copy_secs,
        });
        Ok(())
    }

    /// Starts copying a snapshot of the current state on a background thread (the training
    /// step goes on meanwhile; [`Trainer::settle_snapshot`] takes it in). With `then`, the
    /// same thread goes on to write the checkpoint from the copy; its handle is returned.
    fn start_snapshot_copy(
        &mut self,
        t0: Instant,
        cursor: Vec<u8>,
        then: Option<WriteFromCopy>,
    ) -> Result<JoinHandle<Result<PathBuf>>> {
        self.settle_snapshot()?;
        let spare = spare_buffers(self.spare.take());
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let pending = PendingCopy {
            rx,
            step: self.state.step,
            tokens_seen: self.state.tokens_seen,
            cursor,
            detector: self.state.detector.clone(),
            checkpoint: then.is_some(),
            start_secs: 0.0,
        };
        let OptimizerSlot::Here(mut optimizer) =
            std::mem::replace(&mut self.optimizer, OptimizerSlot::Copying(pending))
        else {
            return Err(optimizer_away());
        };
        let (names, vars) = (self.names.clone(), self.vars.clone());
        let body = move || -> Result<PathBuf> {
            let t = Instant::now();
            let state = copy_state(&names, &vars, &mut optimizer, spare, false);
            drop(vars);
            // The checkpoint's view of the optimizer state (a stream from the store's own
            // snapshot when it keeps one) is taken before the optimizer goes back.
            let parts = match &state {
                Ok((w, o)) if then.is_some() => Some(
                    optimizer
                        .checkpoint_state(o)
                        .map(|(opt, stream)| (w.clone(), opt, stream)),
                ),
                _ => None,
            };
            let copy_secs = t.elapsed().as_secs_f64();
            let copy_failed = state.is_err();
            // The loop may have stopped waiting (dropped): then there is no one to hand to.
            let _ = tx.send(Copied {
                optimizer,
                state,
                copy_secs,
            });
            match (then, parts) {
                (Some(write), Some(parts)) => write(parts?),
                // The copy's own error reaches the loop through `settle_snapshot`.
                (Some(_), None) if copy_failed => Err(Error::StateMismatch {
                    what: "checkpoint snapshot".into(),
                    expected: "a copy of the weights and the optimizer state".into(),
                    found: "the copy failed (reported by the next update)".into(),
                }),
                _ => Ok(PathBuf::new()),
            }
        };
        let handle = std::thread::Builder::new()
            .name("eg-snapshot".into())
            .spawn(body);
        let handle = match handle {
            Ok(h) => h,
            Err(e) => {
                // The closure (and the optimizer in it) is gone with the failed spawn.
                return Err(Error::Io {
                    path: PathBuf::from("<snapshot thread>"),
                    source: e,
                });
            }
        };
        self.note_start_secs(t0);
        Ok(handle)
    }

    /// Records the time the loop spent starting the copy in flight (since `t0`).
    fn note_start_secs(&mut self, t0: Instant) {
        if let OptimizerSlot::Copying(p) = &mut self.optimizer {
            p.start_secs = t0.elapsed().as_secs_f64();
        }
    }

    /// Moves the optimizer state into `store` between steps (the memory controller turns
    /// disk offload on or off with it) and retakes the rollback snapshot, so no copy of the
    /// state stays in the old place. Updates are bitwise the same in either store; the
    /// rollback point moves to the current step.
    pub fn set_optimizer_store(&mut self, store: Box<dyn crate::optim::StateStore>) -> Result<()> {
        self.settle_snapshot()?;
        // The old snapshot may live in the old store: drop it before the store goes.
        let had_snapshot = self.snapshot.take().is_some();
        // The spare buffers go too: the state may be moving to disk to free RAM.
        self.spare = None;
        self.optimizer_mut()?.set_store(store)?;
        if had_snapshot {
            let s = self.capture()?;
            self.set_snapshot(s);
        }
        Ok(())
    }

    /// Adds the memory guard (eg-memory's controller in the loop). Before every update it
    /// reads memory and may change the micro-batch (the global batch stays; accumulation
    /// absorbs it), activation checkpointing (through
    /// [`TrainModel::set_activation_checkpointing`]) and where the optimizer state lives
    /// (through `stores`, which must have built the optimizer's current store for the
    /// guard's current strategy). Steps the model or a missing `stores` cannot take are
    /// removed from the controller, with a log line. Every decision is logged (tracing and a
    /// `memory` event in `metrics.jsonl`) and saved in checkpoints; add the guard before
    /// [`Trainer::resume`], which continues with the saved strategy.
    pub fn with_memory_guard(
        mut self,
        mut guard: eg_memory::MemoryGuard,
        stores: Option<StoreFactory>,
    ) -> Result<Self> {
        let cur = guard.current();
        let checkpointing_ok = match self.model.set_activation_checkpointing(cur.checkpointing) {
            Ok(()) => true,
            Err(e) if !cur.checkpointing => {
                tracing::info!(reason = %e, "memory guard: activation checkpointing is unavailable, the guard will not use it");
                false
            }
            Err(e) => return Err(e),
        };
        if stores.is_none() {
            tracing::info!(
                "memory guard: optimizer-state offload is unavailable (no offload store), the guard will not use it"
            );
        }
        guard.restrict(checkpointing_ok, stores.is_some());
        self.opts.micro_batch_rows = cur.micro_batch.max(1) as usize;
        self.state.memory = Some(guard.state());
        self.memory = Some(MemoryHook {
            guard,
            stores,
            checkpointing: cur.checkpointing,
            offload: cur.offload,
        });
        Ok(self)
    }

    /// The strategy the memory guard runs now, when one is attached.
    pub fn memory_strategy(&self) -> Option<eg_memory::Strategy> {
        self.memory.as_ref().map(|h| h.guard.current())
    }

    /// Runs `s`: micro-batch rows, activation checkpointing, optimizer-state store.
    fn apply_memory_strategy(&mut self, s: eg_memory::Strategy) -> Result<()> {
        self.settle_snapshot()?;
        self.opts.micro_batch_rows = s.micro_batch.max(1) as usize;
        let Some(h) = &mut self.memory else {
            return Ok(());
        };
        if s.checkpointing != h.checkpointing {
            self.model.set_activation_checkpointing(s.checkpointing)?;
            h.checkpointing = s.checkpointing;
        }
        if s.offload != h.offload
            && let Some(make) = &mut h.stores
        {
            let store = make(s.offload)?;
            h.offload = s.offload;
            self.set_optimizer_store(store)?;
        }
        Ok(())
    }

    /// Between updates: the guard reads memory and its decisions are applied and logged.
    fn poll_memory(&mut self) -> Result<()> {
        let Some(h) = &mut self.memory else {
            return Ok(());
        };
        let poll = h.guard.poll()?;
        self.state.memory = Some(h.guard.state());
        for d in &poll.decisions {
            self.apply_memory_strategy(d.after)?;
            self.log_json(&serde_json::json!({
                "event": "memory",
                "step": self.state.step,
                "decision": d,
                "used_fraction": poll.reading.used_fraction,
                "others_bytes": poll.others,
                "projected_bytes": poll.projected,
            }))?;
            for cb in &mut self.callbacks {
                cb.on_memory(d);
            }
        }
        if !poll.decisions.is_empty() {
            // The allocator may keep freed memory for speed (`tune_process`): a new strategy
            // gives it back, so that a shrink lowers the process's resident memory.
            crate::threads::release_free_memory();
        }
        Ok(())
    }

    /// After a checkpoint was loaded: the guard continues from the saved state (a state
    /// for another global batch is ignored with a warning).
    fn restore_memory_guard(&mut self) -> Result<()> {
        let Some(h) = &mut self.memory else {
            return Ok(());
        };
        if let Some(saved) = self.state.memory.clone()
            && let Err(e) = h.guard.restore(saved)
        {
            tracing::warn!(error = %e, "memory guard: the checkpoint's state does not apply, starting from the plan");
        }
        let cur = h.guard.current();
        self.state.memory = Some(h.guard.state());
        tracing::info!(strategy = %cur, "memory guard: continuing with the saved strategy");
        self.apply_memory_strategy(cur)
    }

    /// Restores the newest valid checkpoint, if any; returns its step. Invalid checkpoints
    /// are skipped with a warning; a checkpoint written with another thread count is used
    /// with a warning (results may then differ in the last bits).
    pub fn resume(&mut self) -> Result<Option<u64>> {
        let Some(c) = &self.opts.checkpoints else {
            return Ok(None);
        };
        checkpoint::clean_temporaries(&c.dir);
        let (found, _skipped) = checkpoint::newest_valid(&c.dir);
        let Some((dir, data)) = found else {
            return Ok(None);
        };
        self.restore_checkpoint(&data)?;
        if let Some(run) = &self.opts.run_dir {
            truncate_metrics(&run.join("metrics.jsonl"), data.step)?;
        }
        tracing::info!(checkpoint = %dir.display(), step = data.step, "resumed");
        self.last_checkpoint = Some(dir);
        Ok(Some(data.step))
    }

    fn restore_checkpoint(&mut self, data: &CheckpointData) -> Result<()> {
        self.settle_snapshot()?;
        for (name, var) in self.names.iter().zip(&self.vars) {
            let (shape, v) = data.weights.get(name).ok_or_else(|| Error::StateMismatch {
                what: format!("weights of {name}"),
                expected: format!("{:?}", var.dims()),
                found: "missing".into(),
            })?;
            if shape.as_slice() != var.dims() {
                return Err(Error::StateMismatch {
                    what: format!("shape of {name}"),
                    expected: format!("{:?}", var.dims()),
                    found: format!("{shape:?}"),
                });
            }
            set_var(name, var, v)?;
        }
        self.optimizer_mut()?.import_state(&data.optimizer)?;
        let state: TrainerState =
            serde_json::from_slice(&data.trainer_json).map_err(|source| Error::Json {
                what: "trainer.json",
                source,
            })?;
        let threads = compute_threads();
        if state.threads != threads {
            tracing::warn!(
                saved = state.threads,
                now = threads,
                "resuming with another thread count: results may differ in the last bits"
            );
        }
        // Loss scaling stays as configured; its state comes from the checkpoint when it has one.
        let loss_scaler = self.state.loss_scaler.as_ref().map(|configured| {
            state
                .loss_scaler
                .clone()
                .unwrap_or_else(|| configured.clone())
        });
        self.state = TrainerState {
            threads,
            loss_scaler,
            ..state
        };
        self.restore_memory_guard()?;
        self.loader.restore_json(&data.cursor_json)?;
        let s = self.capture()?;
        self.set_snapshot(s);
        Ok(())
    }

    /// Makes `s` the rollback point; the one it replaces becomes the spare whose buffers
    /// the next [`Trainer::capture`] reuses.
    fn set_snapshot(&mut self, s: Snapshot) {
        self.spare = self.snapshot.replace(s);
    }

    /// A snapshot of the current state, copied on this thread (and rayon's). Copies into
    /// the spare snapshot's buffers when no one else holds them (the background writer is
    /// done: `Arc::try_unwrap`), else into new ones; the values are the same either way.
    fn capture(&mut self) -> Result<Snapshot> {
        self.settle_snapshot()?;
        let spare = spare_buffers(self.spare.take());
        let OptimizerSlot::Here(optimizer) = &mut self.optimizer else {
            return Err(optimizer_away());
        };
        let (weights, optimizer) = copy_state(&self.names, &self.vars, optimizer, spare, true)?;
        Ok(Snapshot {
            step: self.state.step,
            tokens_seen: self.state.tokens_seen,
            weights,
            optimizer,
            cursor: self.loader.cursor_json()?,
            detector: self.state.detector.clone(),
        })
    }

    fn rollback(&mut self) -> Result<()> {
        // A copy in flight is the newest rollback point: it is taken in first.
        self.settle_snapshot()?;
        let Some(s) = self.snapshot.take() else {
            return Ok(());
        };
        for (n, v) in self.names.iter().zip(&self.vars) {
            let (_, p) = s.weights.get(n).ok_or_else(|| Error::StateMismatch {
                what: format!("snapshot of {n}"),
                expected: "present".into(),
                found: "missing".into(),
            })?;
            set_var(n, v, p)?;
        }
        self.optimizer_mut()?.restore(&s.optimizer)?;
        self.loader.restore_json(&s.cursor)?;
        let from = self.state.step;
        self.state.step = s.step;
        self.state.tokens_seen = s.tokens_seen;
        self.state.detector = s.detector.clone();
        self.state.consecutive_nonfinite = 0;
        self.state.rollbacks += 1;
        self.snapshot = Some(s);
        self.anomaly(Anomaly::Rollback {
            from_step: from,
            to_step: self.state.step,
        })?;
        Ok(())
    }

    fn anomaly(&mut self, a: Anomaly) -> Result<()> {
        tracing::warn!(anomaly = ?a, "guard fired");
        self.log_json(
            &serde_json::json!({"event": "anomaly", "step": self.state.step, "anomaly": &a}),
        )?;
        for cb in &mut self.callbacks {
            cb.on_anomaly(&a);
        }
        Ok(())
    }

    fn log_json(&mut self, v: &serde_json::Value) -> Result<()> {
        if self.metrics.is_none()
            && let Some(run) = &self.opts.run_dir
        {
            std::fs::create_dir_all(run).map_err(Error::io(run))?;
            let p = run.join("metrics.jsonl");
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(Error::io(&p))?;
            self.metrics = Some(f);
        }
        if let Some(f) = &mut self.metrics {
            let mut line = serde_json::to_vec(v).map_err(|source| Error::Json {
                what: "metrics",
                source,
            })?;
            line.push(b'\n');
            let path = self
                .opts
                .run_dir
                .as_ref()
                .map(|r| r.join("metrics.jsonl"))
                .unwrap_or_default();
            f.write_all(&line).map_err(Error::io(path))?;
        }
        Ok(())
    }

    fn next_batch(&mut self) -> Result<Option<Batch>> {
        while let Some(b) = self.loader.next_batch()? {
            if self.state.skip_data_steps.contains(&b.step) {
                continue;
            }
            return Ok(Some(b));
        }
        Ok(None)
    }

    /// Runs updates until `max_steps`, the stop flag, early stopping or the end of the data.
    pub fn fit(&mut self) -> Result<FitReport> {
        let step = self.state.step;
        self.fit_inner()
            .map_err(|e| e.at_step(step.max(self.state.step)))
    }

    fn fit_inner(&mut self) -> Result<FitReport> {
        self.settle_snapshot()?;
        if self.snapshot.is_none() {
            // Not resumed: lines of an earlier attempt that never reached a checkpoint go.
            if let Some(run) = &self.opts.run_dir {
                truncate_metrics(&run.join("metrics.jsonl"), self.state.step)?;
            }
            let s = self.capture()?;
            self.set_snapshot(s);
        }
        let mut last_loss = None;
        let mut last_eval = None;
        let report = |s: &Self, last_loss, eval, stopped, early, exhausted| FitReport {
            steps: s.state.step,
            last_loss,
            eval,
            checkpoint: s.last_checkpoint.clone(),
            stopped,
            early_stopped: early,
            data_exhausted: exhausted,
            state: s.state.clone(),
        };
        let mut rollbacks_in_a_row = 0u32;
        while self.state.step < self.opts.max_steps {
            let step = self.state.step;
            for cb in &mut self.callbacks {
                cb.on_step_start(step);
            }
            self.poll_memory()?;
            let t0 = Instant::now();
            let Some(batch) = self.next_batch()? else {
                if step == 0 && last_loss.is_none() {
                    return Err(Error::NoData);
                }
                self.finish_checkpoint(last_eval.as_ref())?;
                let r = report(self, last_loss, last_eval, false, false, true);
                return Ok(r);
            };
            let (loss, norm_sq) = self.forward_backward(&batch)?;
            // Loss scaling: gradients that overflowed while the loss is finite skip the update
            // and halve the scale (not an anomaly); at the minimum scale the guard below acts.
            let scale_update = match &mut self.state.loss_scaler {
                Some(s) if loss.is_finite() => Some((s.update(!norm_sq.is_finite()), s.scale)),
                _ => None,
            };
            if let Some((ScaleUpdate::Skip, scale)) = scale_update {
                tracing::info!(
                    step,
                    scale,
                    "loss scale: gradients overflowed, update skipped"
                );
                self.log_json(&serde_json::json!({
                    "event": "loss_scale",
                    "step": step,
                    "data_step": batch.step,
                    "overflow": true,
                    "scale": scale,
                }))?;
                continue;
            }
            if !(loss.is_finite() && norm_sq.is_finite()) {
                self.state.nonfinite_skips += 1;
                self.state.consecutive_nonfinite += 1;
                let consecutive = self.state.consecutive_nonfinite;
                self.anomaly(Anomaly::NonFinite {
                    step,
                    data_step: batch.step,
                    consecutive,
                })?;
                if consecutive >= self.opts.nan_skip_limit {
                    rollbacks_in_a_row += 1;
                    if rollbacks_in_a_row > 3 {
                        return Err(Error::Diverged { consecutive });
                    }
                    self.rollback()?;
                }
                continue;
            }
            if let Some(d) = &self.state.detector
                && let Some(z) = d.zscore(loss)
                && z > d.threshold
            {
                self.state.spikes += 1;
                self.state.skip_data_steps.insert(batch.step);
                self.state.quarantine.push(QuarantineEntry {
                    data_step: batch.step,
                    step,
                    reason: "spike".into(),
                    sample_ids: batch.sample_ids.clone(),
                });
                self.state.lr_scale *= self.opts.lr_backoff;
                self.anomaly(Anomaly::Spike {
                    step,
                    data_step: batch.step,
                    loss,
                    zscore: z,
                })?;
                self.rollback()?;
                continue;
            }
            rollbacks_in_a_row = 0;
            self.state.consecutive_nonfinite = 0;
            let norm = norm_sq.sqrt();
            let scale = clip_factor(norm, self.opts.clip_norm) * self.grad_unscale;
            let lr = self.opts.schedule.lr(step) * self.state.lr_scale;
            // The update writes weights and moments in place: a snapshot copy started at the
            // last checkpoint (overlapped with this step's forward and backward) ends first.
            self.settle_snapshot()?;
            let OptimizerSlot::Here(optimizer) = &mut self.optimizer else {
                return Err(optimizer_away());
            };
            let vars = &self.vars;
            self.grads
                .with_slices(&self.names, |g| optimizer.step(vars, g, lr, scale))??;
            self.state.step += 1;
            self.state.tokens_seen += batch.tokens as u64;
            if let Some(d) = &mut self.state.detector {
                d.push(loss);
            }
            last_loss = Some(loss);
            let m = StepMetrics {
                step: self.state.step,
                loss,
                lr,
                grad_norm: norm,
                tokens: batch.tokens as u64,
                tokens_seen: self.state.tokens_seen,
                step_secs: t0.elapsed().as_secs_f64(),
                extra: std::mem::take(&mut self.step_extra),
            };
            let mut line = serde_json::to_value(&m).map_err(|source| Error::Json {
                what: "metrics",
                source,
            })?;
            if let Some(o) = line.as_object_mut() {
                o.insert("event".into(), "step".into());
                if let Some(s) = &self.state.loss_scaler {
                    o.insert("loss_scale".into(), s.scale.into());
                }
            }
            self.log_json(&line)?;
            for cb in &mut self.callbacks {
                cb.on_step_end(&m);
            }
            let s = self.state.step;
            let at_end = s >= self.opts.max_steps;
            let mut early = false;
            if self.eval.is_some()
                && ((self.opts.eval_every > 0 && s.is_multiple_of(self.opts.eval_every)) || at_end)
            {
                let e = self.evaluate()?;
                early = self
                    .opts
                    .early_stopping_patience
                    .is_some_and(|p| self.state.evals_since_best >= p);
                last_eval = Some(e);
            }
            let stop = self.stop.load(Ordering::SeqCst);
            let ckpt_due = self
                .opts
                .checkpoints
                .as_ref()
                .is_some_and(|c| s.is_multiple_of(c.every) || at_end || stop || early);
            if ckpt_due {
                let eval_loss = last_eval.as_ref().filter(|e| e.step == s).map(|e| e.loss);
                match self.save_checkpoint(eval_loss) {
                    Ok(_) => {}
                    // A periodic checkpoint may fail (disk full, ...): go on, the previous
                    // valid one stands. The last one of the run must succeed.
                    Err(e) if !(at_end || stop || early) => self.checkpoint_failed(s, e)?,
                    Err(e) => return Err(e),
                }
            } else if self.opts.snapshot_every > 0 && s.is_multiple_of(self.opts.snapshot_every) {
                // Copied in the background like a checkpoint's, taken in before the next update.
                let cursor = self.loader.cursor_json()?;
                // The thread ends once the copy is handed back: nothing to join.
                drop(self.start_snapshot_copy(Instant::now(), cursor, None)?);
            }
            if stop || early {
                self.settle_snapshot()?;
                self.join_pending()?;
                return Ok(report(self, last_loss, last_eval, stop, early, false));
            }
        }
        self.settle_snapshot()?;
        self.join_pending()?;
        Ok(report(self, last_loss, last_eval, false, false, false))
    }

    fn finish_checkpoint(&mut self, eval: Option<&EvalMetrics>) -> Result<()> {
        let s = self.state.step;
        let already = self
            .last_checkpoint
            .as_ref()
            .is_some_and(|p| p.ends_with(checkpoint::step_dir_name(s)));
        if self.opts.checkpoints.is_some() && !already && s > 0 {
            self.save_checkpoint(eval.filter(|e| e.step == s).map(|e| e.loss))?;
        }
        self.settle_snapshot()?;
        self.join_pending()
    }

    /// Splits the global batch into micro-batches, runs forward and backward on each with
    /// the objective's loss scaled by its share of the global batch (see
    /// [`crate::objective`]), and accumulates the gradients. Returns the global mean loss and
    /// the gradients' squared norm.
    fn forward_backward(&mut self, batch: &Batch) -> Result<(f64, f64)> {
        let rows = batch.rows;
        let group = self.objective.row_group().max(1);
        let mb = self.opts.micro_batch_rows.div_ceil(group) * group;
        let total = self.objective.normaliser(batch)?;
        self.grads.clear();
        self.grad_unscale = 1.0;
        self.step_extra.clear();
        if total <= 0.0 {
            return Ok((0.0, 0.0));
        }
        let mut loss = 0.0f64;
        // Loss scaling: the backward runs on `loss × scale`, the accumulators get `grad / scale`
        // (exact for the power-of-two scales the scaler uses).
        let (loss_scale, unscale) = match &self.state.loss_scaler {
            Some(s) => (Some(s.scale), (1.0 / s.scale) as f32),
            None => (None, 1.0f32),
        };
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + mb).min(rows);
            let micro = self
                .objective
                .micro_loss(&self.model, batch, r0..r1, total)?;
            if let Some(micro) = micro {
                loss += micro.value;
                for (k, v) in micro.metrics {
                    *self.step_extra.entry(k.to_string()).or_insert(0.0) += v;
                }
                let store = match (micro.grads, loss_scale) {
                    // Gradients from a fused backward (issue 9): already those of `loss`.
                    (Some(g), None) => g,
                    (Some(g), Some(s)) => scale_grads(g, &self.vars, s)?,
                    (None, Some(s)) => (micro.loss * s)?.backward()?,
                    (None, None) => micro.loss.backward()?,
                };
                let check = self.opts.coverage_check && !self.coverage_checked;
                let mut missing = Vec::new();
                for (i, (name, var)) in self.names.iter().zip(&self.vars).enumerate() {
                    match store.get(var.as_tensor()) {
                        Some(g) => self.grads.add(i, name, g, var.as_tensor())?,
                        None if check => missing.push(name.clone()),
                        None => {}
                    }
                }
                if check {
                    if !missing.is_empty() {
                        return Err(Error::NoGradient { params: missing });
                    }
                    self.coverage_checked = true;
                }
            }
            r0 = r1;
        }
        // Summed raw; the unscale factor (a power of two) is applied to the norm here and to
        // the gradients inside the optimizer's pass, exactly as if each had been unscaled.
        self.grad_unscale = unscale;
        let norm_sq =
            self.grads.sum_squares(&self.names)? * f64::from(unscale) * f64::from(unscale);
        Ok((loss, norm_sq))
    }

    /// Evaluates the held-out split (up to `eval_max_batches` global batches).
    pub fn evaluate(&mut self) -> Result<EvalMetrics> {
        self.model.set_training(false);
        let result = self.evaluate_without_dropout();
        self.model.set_training(true);
        result
    }

    /// [`Trainer::evaluate`] with the model already in evaluation mode.
    fn evaluate_without_dropout(&mut self) -> Result<EvalMetrics> {
        let mut loader: Box<dyn BatchSource> = match &mut self.eval {
            None => {
                return Err(Error::InvalidOption {
                    option: "eval",
                    reason: "no held-out split was given".into(),
                });
            }
            Some(EvalData::Tokens(ev)) => Box::new(Loader::new(
                ev.data.clone(),
                ev.opts.clone(),
                Placement::SINGLE,
            )?),
            Some(EvalData::Batches(make)) => make()?,
        };
        // The objective's loss with a normaliser of 1 is the micro-batch's *sum*; the mean
        // is taken over the normalisers of all evaluated batches.
        let mut sum = 0.0f64;
        let mut n = 0.0f64;
        let mut extra: BTreeMap<String, f64> = BTreeMap::new();
        let group = self.objective.row_group().max(1);
        let mb = self.opts.micro_batch_rows.div_ceil(group) * group;
        for _ in 0..self.opts.eval_max_batches.max(1) {
            let Some(b) = loader.next_batch()? else { break };
            let norm = self.objective.normaliser(&b)?;
            if norm <= 0.0 {
                continue;
            }
            let mut r0 = 0;
            while r0 < b.rows {
                let r1 = (r0 + mb).min(b.rows);
                if let Some(m) = self.objective.eval_loss(&self.model, &b, r0..r1, 1.0)? {
                    sum += m.value;
                    for (k, v) in m.metrics {
                        *extra.entry(k.to_string()).or_insert(0.0) += v;
                    }
                }
                r0 = r1;
            }
            n += norm;
        }
        let loss = if n > 0.0 { sum / n } else { f64::NAN };
        for v in extra.values_mut() {
            *v /= n;
        }
        let e = EvalMetrics {
            step: self.state.step,
            loss,
            perplexity: loss.exp(),
            tokens: n as u64,
            extra,
        };
        if self.state.best_eval.is_none_or(|b| loss < b) {
            self.state.best_eval = Some(loss);
            self.state.evals_since_best = 0;
        } else {
            self.state.evals_since_best += 1;
        }
        self.state.last_eval = Some(loss);
        let mut line = serde_json::to_value(&e).map_err(|source| Error::Json {
            what: "metrics",
            source,
        })?;
        if let Some(o) = line.as_object_mut() {
            o.insert("event".into(), "eval".into());
        }
        self.log_json(&line)?;
        for cb in &mut self.callbacks {
            cb.on_eval(&e);
        }
        Ok(e)
    }

    fn checkpoint_failed(&mut self, step: u64, e: Error) -> Result<()> {
        self.state.checkpoint_failures += 1;
        self.anomaly(Anomaly::CheckpointFailed {
            step,
            error: e.to_string(),
        })
    }

    /// Waits for a background write; its failure is reported as an anomaly, not returned.
    fn settle_pending(&mut self) -> Result<()> {
        let step = self.pending_step;
        match self.join_pending() {
            Ok(()) => Ok(()),
            Err(e) => self.checkpoint_failed(step, e),
        }
    }

    fn join_pending(&mut self) -> Result<()> {
        if let Some(h) = self.pending.take() {
            match h.join() {
                Ok(r) => {
                    r?;
                }
                Err(_) => return Err(Error::WriterPanicked),
            }
        }
        Ok(())
    }

    /// Writes a checkpoint of the current state now (waits for a background write in
    /// flight first). Also refreshes the rollback snapshot.
    ///
    /// With `background`, the weights and the optimizer state are copied on a background
    /// thread, which then writes the checkpoint: the copy overlaps the next step's forward
    /// and backward and is waited for before anything writes the state again (the next
    /// update, a rollback, ...: [`Trainer::checkpoint_stalls`] says how long the loop was
    /// blocked). Otherwise the copy and the write happen here.
    pub fn save_checkpoint(&mut self, eval_loss: Option<f64>) -> Result<Option<PathBuf>> {
        let t0 = Instant::now();
        let Some(c) = self.opts.checkpoints.clone() else {
            return Ok(None);
        };
        self.settle_snapshot()?;
        self.settle_pending()?;
        let step = self.state.step;
        let cursor_json = self.loader.cursor_json()?;
        let trainer_json =
            serde_json::to_vec_pretty(&self.state).map_err(|source| Error::Json {
                what: "trainer.json",
                source,
            })?;
        let (config_toml, threads) = (self.opts.config_toml.clone(), self.state.threads);
        let dir = c.dir.join(checkpoint::step_dir_name(step));
        let background = c.background;
        let cursor = cursor_json.clone();
        let write = move |(weights, optimizer, optimizer_stream): CheckpointParts| {
            let data = CheckpointData {
                step,
                weights,
                optimizer,
                optimizer_stream,
                trainer_json,
                cursor_json,
                config_toml,
                eval_loss,
                threads,
            };
            let d = checkpoint::save_with(&c.dir, &data, &c.write)?;
            checkpoint::prune(&c.dir, c.keep_last, c.keep_best)?;
            Ok(d)
        };
        if background {
            self.pending_step = step;
            self.pending = Some(self.start_snapshot_copy(t0, cursor, Some(Box::new(write)))?);
        } else {
            let snap = self.capture()?;
            let (optimizer, stream) = self.optimizer_mut()?.checkpoint_state(&snap.optimizer)?;
            let parts = (snap.weights.clone(), optimizer, stream);
            self.set_snapshot(snap);
            write(parts)?;
        }
        for cb in &mut self.callbacks {
            cb.on_checkpoint(step, &dir);
        }
        self.last_checkpoint = Some(dir.clone());
        self.note_start_secs(t0);
        Ok(Some(dir))
    }
}

impl<M: TrainModel> Drop for Trainer<M> {
    /// Waits for a snapshot copy in flight (a few milliseconds), so nothing outlives the
    /// trainer reading its parameters. A checkpoint write in flight goes on detached (it
    /// is atomic: a process that exits first leaves no partial checkpoint).
    fn drop(&mut self) {
        if let Err(e) = self.settle_snapshot() {
            tracing::warn!(error = %e, "snapshot copy failed while the trainer was dropped");
        }
    }
}

/// Next-token targets of a packed batch: position `i` predicts token `i + 1` of its row when
/// the loader's loss mask marks that token as a target.
pub fn batch_targets(b: &Batch) -> Vec<Option<u32>> {
    let seq = b.seq_len;
    let mut out = Vec::with_capacity(b.rows * seq);
    for r in 0..b.rows {
        for i in 0..seq {
            let k = r * seq + i + 1;
            let t = if i + 1 < seq && b.loss_mask.get(k).is_some_and(|&m| m != 0) {
                b.input_ids.get(k).copied()
            } else {
                None
            };
            out.push(t);
        }
    }
    out
}

/// Keeps only the lines of `metrics.jsonl` up to `step` (a resumed run rewrites what came
/// after its checkpoint). Written atomically.
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let mut out = String::new();
    for line in text.lines() {
        // Anomalies logged at `step` happened after the checkpoint of `step` was taken.
        let keep = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .is_some_and(|v| {
                // So are memory decisions taken before the update after it.
                let anomaly = matches!(
                    v.get("event").and_then(|e| e.as_str()),
                    Some("anomaly" | "memory")
                );
                v.get("step")
                    .and_then(|s| s.as_u64())
                    .is_some_and(|s| if anomaly { s < step } else { s <= step })
            });
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    crate::fsio::write_atomic(path, out.as_bytes())
}

/// The gradients of `loss × scale` from those of `loss`: a fused backward's gradients under
/// a dynamic loss scaler (whose unscale is applied to every gradient later).
fn scale_grads(mut grads: GradStore, vars: &[Var], scale: f64) -> Result<GradStore> {
    for v in vars {
        if let Some(g) = grads.remove(v.as_tensor()) {
            grads.insert(v.as_tensor(), (g * scale)?);
        }
    }
    Ok(grads)
}
