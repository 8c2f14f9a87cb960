//! The memory model: predicted peak bytes of one training step.
//!
//! Inputs are a [`ModelProfile`] (what the network is: parameter counts and activation
//! elements per token, filled in by the model side from its layer analysis) and a [`Setup`]
//! (how it runs: precision, optimizer, adapters, sequence length, micro-batch, accumulation,
//! checkpointing, offload). [`MemoryModel::estimate`] returns an [`Estimate`]: every term
//! separately and their sum, the predicted peak.
//!
//! Notation below: `P` base parameters, `Q` of them in quantizable block matrices, `T`
//! trainable parameters (`P` for full fine-tuning, the adapters' for LoRA), `c` the compute
//! element size (4 for f32, 2 for bf16/f16), `n = micro_batch × seq_len` tokens per
//! micro-batch, `s` the sequence length, `L` the number of blocks. Each term is documented on
//! its [`Estimate`] field; `docs/memory.md` has the same formulas in one place.

use std::fmt;

use eg_config::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Element size of f32 master weights, gradient accumulators and optimizer moments.
pub const F32_BYTES: u64 = 4;
/// NF4 and Int8 quantize in blocks of this many weights, each with its own absmax scale.
pub const QUANT_BLOCK: u64 = 64;
/// With double quantization, the 8-bit absmax scales are themselves scaled in groups of this
/// many blocks, one f32 per group (QLoRA paper, section 2).
pub const DOUBLE_QUANT_GROUP: u64 = 256;

/// One transformer block's activation memory, in elements per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockProfile {
    /// Elements per token the forward pass keeps for the backward pass that do not depend on
    /// the sequence length (projections, MLP intermediates, norm outputs, residual sums).
    pub activation_elems_per_token: u64,
    /// Elements per token *per position of context*: the attention score and probability
    /// matrices (`2 × heads` for a reference attention that materialises `s × s` per head).
    /// Multiplied by the sequence length.
    pub activation_elems_per_token_per_position: u64,
}

impl BlockProfile {
    /// Elements per token kept at sequence length `seq_len`.
    pub fn elems_per_token(&self, seq_len: u64) -> u64 {
        self.activation_elems_per_token.saturating_add(
            self.activation_elems_per_token_per_position
                .saturating_mul(seq_len),
        )
    }
}

/// What the memory model needs to know about a network. Plain numbers: the model side
/// (eg-model's layer analysis) converts into it, so this crate does not depend on the model
/// crate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelProfile {
    /// Base parameters `P` (a tied embedding counted once).
    pub params: u64,
    /// Parameters `Q` in the blocks' weight matrices: the ones QLoRA stores in NF4/Int8. The
    /// rest (embeddings, norms, the head) stay in the compute dtype.
    pub quantizable_params: u64,
    /// Elements of the largest single quantizable matrix (QLoRA dequantizes one at a time).
    pub largest_matrix_params: u64,
    /// Width of the residual stream: elements per token of a block's input, which is what
    /// activation checkpointing keeps per block.
    pub hidden_size: u64,
    /// The transformer blocks, in order.
    pub blocks: Vec<BlockProfile>,
    /// Activation elements per token outside the blocks (embedding output, final norm,
    /// logits).
    pub head_activation_elems_per_token: u64,
    /// Vocabulary size (the logits' gradient is `n × vocab`).
    pub vocab_size: u64,
    /// LoRA parameters per unit of rank on the configured target modules, over all blocks:
    /// `Σ (in + out)` of the targeted matrices. Rank `r` trains `r ×` this many.
    pub lora_params_per_rank: u64,
    /// LoRA activation elements per token per unit of rank (the `r`-wide intermediate of each
    /// adapter), over all blocks.
    pub lora_activation_elems_per_token_per_rank: u64,
    /// Forward FLOPs per token that do not depend on the sequence length.
    pub forward_flops_per_token: u64,
    /// Forward FLOPs per token per position of context (attention's two matrix products).
    pub forward_flops_per_token_per_position: u64,
    /// The activation counts of the model's fused training step (a hand-written backward
    /// that keeps fewer tensors than candle's autograd), when the model takes it at this
    /// sequence length for full training in f32 (eg-model's `Llama::fused_step`). `None`
    /// (the default): every setup runs the autograd path described by `blocks` and
    /// `head_activation_elems_per_token`. Used only for full fine-tuning in f32: adapters
    /// and mixed precision run the autograd path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fused: Option<FusedProfile>,
}

/// What a fused training step keeps and allocates, in elements per token (see
/// [`ModelProfile::fused`]). Every block is alike (the fused step exists for uniform
/// decoder stacks), so one block's counts stand for all `blocks.len()` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FusedProfile {
    /// Elements per token one block keeps for the backward, independent of the context.
    pub block_activation_elems_per_token: u64,
    /// Elements per token per position of context one block keeps (the attention
    /// probabilities: one per head).
    pub block_activation_elems_per_token_per_position: u64,
    /// Elements per token kept outside the blocks (final hidden state, its norm, the
    /// logits, whose gradient overwrites them).
    pub head_activation_elems_per_token: u64,
    /// Elements per token alive only during the backward, at its largest (the gradients of
    /// the activations of the block being back-propagated, the incoming gradient).
    pub transient_elems_per_token: u64,
    /// Transient elements per token per position of context (attention's per-group
    /// probability gradients).
    pub transient_elems_per_token_per_position: u64,
}

impl ModelProfile {
    /// Checks the profile's internal consistency.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: String| Error::Invalid {
            what: "model profile",
            field,
            reason,
        };
        if self.params == 0 {
            return Err(bad("params", "must be positive".into()));
        }
        if self.quantizable_params > self.params {
            return Err(bad(
                "quantizable_params",
                format!(
                    "({}) exceeds params ({})",
                    self.quantizable_params, self.params
                ),
            ));
        }
        if self.largest_matrix_params > self.quantizable_params {
            return Err(bad(
                "largest_matrix_params",
                format!(
                    "({}) exceeds quantizable_params ({})",
                    self.largest_matrix_params, self.quantizable_params
                ),
            ));
        }
        if self.blocks.is_empty() {
            return Err(bad("blocks", "is empty".into()));
        }
        if self.hidden_size == 0 {
            return Err(bad("hidden_size", "must be positive".into()));
        }
        Ok(())
    }

    /// Forward FLOPs per token at sequence length `seq_len`.
    pub fn forward_flops(&self, seq_len: u64) -> u64 {
        self.forward_flops_per_token.saturating_add(
            self.forward_flops_per_token_per_position
                .saturating_mul(seq_len),
        )
    }
}

/// Compute precision of a training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in f32.
    F32,
    /// bf16 weights and activations, f32 master weights for the trainable parameters.
    Bf16,
    /// f16 weights and activations, f32 master weights, dynamic loss scaling (the scaler's
    /// state is a few scalars; overflowed steps are skipped, which costs no memory).
    F16,
}

impl Precision {
    /// Element size `c` of weights, activations and gradients in compute.
    pub fn compute_bytes(self) -> u64 {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 | Precision::F16 => 2,
        }
    }

    /// Whether trainable parameters need an f32 master copy.
    pub fn needs_master(self) -> bool {
        self != Precision::F32
    }

    /// Bytes per gradient element of the trainable parameters in candle's gradient store:
    /// 4 for every precision (mixed precision casts the f32 master weights at use, so each
    /// parameter's gradient arrives in f32 through the cast's backward).
    pub fn gradient_bytes(self) -> u64 {
        F32_BYTES
    }

    /// Bytes per kept activation element, in half-bytes (f32: 8 = 4 bytes; bf16/f16: 6 = 3
    /// bytes). Mixed precision keeps the matrix products' inputs in 2 bytes, but the fused
    /// ops (norms, softmax, RoPE, SwiGLU) widen their input to f32 and narrow their output
    /// back, and candle keeps both for the backward pass; measured on a 110M Llama
    /// (`docs/memory.md`, "Precision"), 3 bytes per element fits.
    pub fn activation_half_bytes(self) -> u64 {
        match self {
            Precision::F32 => 8,
            Precision::Bf16 | Precision::F16 => 6,
        }
    }

    /// Bytes per transient element (the logits' and activations' gradients): f32 4; mixed
    /// precision 6 (cross entropy widens the 2-byte logits to f32 and its gradient is f32,
    /// then narrowed to 2 bytes for the head's backward: 2 + 4 where f32 has 4).
    pub fn transient_bytes(self) -> u64 {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 | Precision::F16 => 6,
        }
    }

    /// Resolves the configured precision for a CPU run with [`crate::precision::select`]
    /// (no GEMM measurement): `auto` is f32 on a CPU unless measured bf16 is clearly faster,
    /// which needs the figures ([`crate::precision`] says why).
    pub fn from_config(p: eg_config::wire::Precision, cpu_features: &[String]) -> Precision {
        let facts = crate::precision::PrecisionFacts::cpu(cpu_features, None);
        crate::precision::select(p, eg_config::wire::LossScale::Dynamic, &facts).precision
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16+f32 master",
            Precision::F16 => "f16+f32 master+loss scaling",
        })
    }
}

/// Optimizer, for the size of its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    /// AdamW: two f32 moments per trainable parameter.
    AdamW,
    /// SGD with momentum: one f32 buffer.
    Sgd,
    /// Lion: one f32 momentum.
    Lion,
}

impl Optimizer {
    /// f32 state buffers per trainable parameter.
    pub fn slots(self) -> u64 {
        match self {
            Optimizer::AdamW => 2,
            Optimizer::Sgd | Optimizer::Lion => 1,
        }
    }

    /// From the validated configuration.
    pub fn from_config(o: &eg_config::OptimizerConfig) -> Optimizer {
        match o {
            eg_config::OptimizerConfig::Sgd { .. } => Optimizer::Sgd,
            eg_config::OptimizerConfig::Lion { .. } => Optimizer::Lion,
            _ => Optimizer::AdamW,
        }
    }
}

/// How the frozen base of a LoRA run is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum BaseFormat {
    /// In the compute dtype (plain LoRA).
    Full,
    /// NF4 (QLoRA): 4 bits per weight plus one absmax per 64-block; with `double_quant` the
    /// absmax values are 8-bit with one f32 per 256 blocks, else f32.
    Nf4 {
        /// Double quantization of the absmax scales.
        double_quant: bool,
    },
    /// 8-bit integers plus one f32 absmax per 64-block.
    Int8,
}

/// Which parameters train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Adapters {
    /// Full fine-tuning: every parameter trains.
    None,
    /// LoRA adapters of this rank on a frozen base stored as `base`.
    Lora {
        /// Adapter rank.
        rank: u32,
        /// Storage of the frozen base.
        base: BaseFormat,
    },
}

impl Adapters {
    /// From the validated configuration (`[model.lora]`, `model.quantization`). NF4 uses
    /// double quantization, as QLoRA does by default.
    pub fn from_config(m: &eg_config::ModelConfig) -> Adapters {
        use eg_config::wire::BaseQuant;
        match &m.lora {
            None => Adapters::None,
            Some(l) => Adapters::Lora {
                rank: l.rank.get(),
                base: match m.quantization {
                    BaseQuant::Nf4 => BaseFormat::Nf4 { double_quant: true },
                    BaseQuant::Int8 => BaseFormat::Int8,
                    _ => BaseFormat::Full,
                },
            },
        }
    }
}

impl fmt::Display for Adapters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Adapters::None => f.write_str("full fine-tuning"),
            Adapters::Lora {
                rank,
                base: BaseFormat::Full,
            } => write!(f, "LoRA r={rank}"),
            Adapters::Lora {
                rank,
                base: BaseFormat::Nf4 { double_quant },
            } => write!(
                f,
                "QLoRA r={rank} (NF4{})",
                if *double_quant { "+double quant" } else { "" }
            ),
            Adapters::Lora {
                rank,
                base: BaseFormat::Int8,
            } => write!(f, "LoRA r={rank} on an Int8 base"),
        }
    }
}

/// Where optimizer state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffloadKind {
    /// In RAM, next to the model.
    None,
    /// In memory-mapped files on disk, streamed through a bounded window.
    Disk,
}

impl fmt::Display for OffloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OffloadKind::None => "none",
            OffloadKind::Disk => "disk",
        })
    }
}

/// How one training step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Setup {
    /// Compute precision.
    pub precision: Precision,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// Full fine-tuning or LoRA/QLoRA.
    pub adapters: Adapters,
    /// Tokens per sequence `s`.
    pub seq_len: u32,
    /// Sequences per micro-batch.
    pub micro_batch: u32,
    /// Micro-batches per optimizer step.
    pub accumulation: u32,
    /// Activation checkpointing per block.
    pub checkpointing: bool,
    /// Optimizer-state offload.
    pub offload: OffloadKind,
}

/// Predicted bytes of one training step, term by term, in three groups:
///
/// - **persistent** (alive for the whole run): `weights`, `adapter_weights`,
///   `master_weights`, `grad_accumulator`, `optimizer_state`, `rollback_snapshot`,
///   `overhead`;
/// - **step phase** (forward and backward of one micro-batch): `gradients`, `activations`,
///   `transient`, `checkpoint_in_flight`, `heap_retention`;
/// - **checkpoint phase** (writing a checkpoint, after the step's tensors are freed):
///   `checkpoint_buffers`;
/// - **evaluation** (with a fused training step only): `evaluation`.
///
/// `peak = persistent + max(step phase, checkpoint phase, evaluation)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Estimate {
    /// Weights used in compute. Full fine-tuning and LoRA: `P·c`. QLoRA: `⌈Q/2⌉` NF4 bytes
    /// (`Q` for Int8) + absmax scales (`⌈Q/64⌉·4`, or with double quantization
    /// `⌈Q/64⌉ + ⌈Q/64/256⌉·4`) + `(P−Q)·c` for what is not quantized.
    pub weights: Bytes,
    /// LoRA adapter weights in compute: `T·c` (0 without adapters: they are in `weights`).
    pub adapter_weights: Bytes,
    /// f32 master copy of the trainable parameters for bf16/f16: `T·4` (0 for f32).
    pub master_weights: Bytes,
    /// f32 accumulator of the gradients over micro-batches, `T·4`. eg-kernel's trainer
    /// accumulates into f32 vectors at every step, whatever the accumulation count.
    pub grad_accumulator: Bytes,
    /// Optimizer state: `slots·T·4` (AdamW 2 slots, SGD and Lion 1). With disk offload, only
    /// the streaming window: `min(state, offload_window)`.
    pub optimizer_state: Bytes,
    /// The in-memory rollback snapshot the loss-spike guard restores from: an f32 copy of
    /// the trainable parameters and of the optimizer state, `T·4 + slots·T·4` (0 when
    /// [`MemoryModel::rollback_snapshot`] is off; under disk offload only `T·4`: the state
    /// snapshot is assumed to live with the state).
    pub rollback_snapshot: Bytes,
    /// Fixed runtime overhead: the binary, allocator, thread stacks, tokenizer, data
    /// pipeline ([`MemoryModel::runtime_overhead`]).
    pub overhead: Bytes,
    /// Gradients the backward pass produces (candle's gradient store), in compute dtype:
    /// `T·4` (none for a frozen base): f32 also under mixed precision, where the master
    /// weights are cast at use and their gradients come back in f32.
    pub gradients: Bytes,
    /// Activations kept for the backward pass, `·a` with `a` = 4 bytes in f32 and 3 under
    /// mixed precision ([`Precision::activation_half_bytes`]). Without checkpointing:
    /// `n·(Σ_blocks (a_b + p_b·s) + head + r·lora_act)`. With checkpointing: the block inputs
    /// `n·L·hidden`, plus one block's full activations during its recompute
    /// `n·max_b (a_b + p_b·s)`, plus `n·(head + r·lora_act)`. With a fused step
    /// ([`ModelProfile::fused`], full training in f32) its counts `a_f`, `p_f`, `H_f`
    /// replace them: `n·(L·(a_f + p_f·s) + H_f)·4`, with checkpointing
    /// `n·(L·hidden + a_f + p_f·s + H_f)·4`.
    pub activations: Bytes,
    /// Short-lived buffers at the peak, `·t` with `t` = 4 bytes in f32 and 6 under mixed
    /// precision ([`Precision::transient_bytes`]): the logits' gradient `n·vocab`, the
    /// activation gradients of the block being back-propagated `n·max_b (a_b + p_b·s)`, one
    /// more score-sized tensor `n·(max_b p_b / 2)·s` (the softmax backward makes the incoming
    /// gradient contiguous; `p_b` counts scores and probabilities, hence the half), and
    /// under QLoRA one dequantized matrix `largest·c`. With a fused step:
    /// `n·(t_f + t_p·s)·4` from [`FusedProfile`] (its logits' gradient overwrites the
    /// logits, which the activations count).
    pub transient: Bytes,
    /// Copies a background checkpoint writer holds while the next steps run:
    /// [`MemoryModel::in_flight_copies`]` × (T·4 + slots·T·4)`. 1 with eg-kernel: the
    /// snapshot a checkpoint writes is copied into the spare snapshot's buffers on a
    /// background thread while the next step runs (under disk offload the state part is 0:
    /// the writer streams it from the offload store's snapshot files).
    pub checkpoint_in_flight: Bytes,
    /// Freed buffers the allocator keeps resident during the step (heap fragmentation under
    /// the allocator settings of `eg_kernel::tune_process`, whose mmap threshold keeps every
    /// buffer below 32 MiB in the heap): [`MemoryModel::adapter_heap_retention_permille`]
    /// ‰ of `gradients + activations + transient` with LoRA adapters (candle's autograd
    /// path), 0 for full training. Measured, not derived: see `docs/memory.md`.
    #[serde(default = "zero_bytes")]
    pub heap_retention: Bytes,
    /// Copies made while writing a checkpoint:
    /// [`MemoryModel::checkpoint_copies`]` × (T·4 + slots·T·4)` (eg-kernel captures the new
    /// snapshot while the old one is still alive: one copy); the state part is 0 under disk
    /// offload.
    pub checkpoint_buffers: Bytes,
    /// Evaluation phase, with a fused step only ([`ModelProfile::fused`]): eg-kernel
    /// evaluates with the same micro-batch through the fused forward (`Llama::fused_loss`),
    /// which keeps no graph: the hidden state, one block's activations and the head's, per
    /// token, while a background checkpoint copy may still run
    /// ([`Estimate::checkpoint_in_flight`]). Smaller than the step phase; without a fused
    /// step the training step keeps at least as much, and this term is 0.
    #[serde(default = "zero_bytes")]
    pub evaluation: Bytes,
    /// The predicted peak: persistent terms + the largest of the phases (step,
    /// checkpoint, evaluation).
    pub peak: Bytes,
}

impl Estimate {
    /// The terms with their names, in order (without `peak`).
    pub fn terms(&self) -> [(&'static str, Bytes); 14] {
        [
            ("weights", self.weights),
            ("adapter_weights", self.adapter_weights),
            ("master_weights", self.master_weights),
            ("grad_accumulator", self.grad_accumulator),
            ("optimizer_state", self.optimizer_state),
            ("rollback_snapshot", self.rollback_snapshot),
            ("overhead", self.overhead),
            ("gradients", self.gradients),
            ("activations", self.activations),
            ("transient", self.transient),
            ("checkpoint_in_flight", self.checkpoint_in_flight),
            ("heap_retention", self.heap_retention),
            ("checkpoint_buffers", self.checkpoint_buffers),
            ("evaluation", self.evaluation),
        ]
    }

    /// Sum of the persistent terms.
    pub fn persistent(&self) -> Bytes {
        Bytes(
            [
                self.weights,
                self.adapter_weights,
                self.master_weights,
                self.grad_accumulator,
                self.optimizer_state,
                self.rollback_snapshot,
                self.overhead,
            ]
            .iter()
            .fold(0u64, |a, b| a.saturating_add(b.0)),
        )
    }

    /// Sum of the step-phase terms.
    pub fn step_phase(&self) -> Bytes {
        Bytes(
            self.gradients
                .0
                .saturating_add(self.activations.0)
                .saturating_add(self.transient.0)
                .saturating_add(self.checkpoint_in_flight.0)
                .saturating_add(self.heap_retention.0),
        )
    }
}

fn zero_bytes() -> Bytes {
    Bytes(0)
}

impl fmt::Display for Estimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peak {}", crate::HumanBytes::from(self.peak))?;
        for (name, b) in self.terms() {
            if b.0 > 0 {
                write!(f, ", {name} {}", crate::HumanBytes::from(b))?;
            }
        }
        Ok(())
    }
}

/// The memory model's constants: properties of the runtime, not of a strategy.
/// [`MemoryModel::default`] holds the values documented (and measured) in `docs/memory.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryModel {
    /// Fixed bytes every run has besides the model: the binary and its libraries, allocator
    /// arenas, thread stacks, tokenizer and data pipeline.
    pub runtime_overhead: Bytes,
    /// Bytes of optimizer state held in RAM at a time under disk offload (prefetch of the
    /// next tensors plus write-back of the last ones).
    pub offload_window: Bytes,
    /// Whether the trainer keeps an in-memory rollback snapshot (eg-kernel's does).
    pub rollback_snapshot: bool,
    /// Extra copies of parameters and optimizer state alive while a checkpoint is captured.
    pub checkpoint_copies: u32,
    /// Extra copies a background checkpoint writer holds while training goes on.
    pub in_flight_copies: u32,
    /// Per mille of the step phase (`gradients + activations + transient`) the allocator
    /// keeps resident as fragmentation with LoRA adapters ([`Estimate::heap_retention`]);
    /// also applied to the evaluation phase's activations ([`Estimate::evaluation`]), which
    /// run the same candle path.
    #[serde(default)]
    pub adapter_heap_retention_permille: u32,
    /// The checkpoint writer's blocks while it writes, at most (eg-kernel: 4 blocks of 1 MiB
    /// per file in flight, one file per writer thread, a finishing file's blocks overlapping
    /// the next's); no more than the checkpoint's bytes, since only written parts of a block
    /// become resident. In the checkpoint phase, and in the step phase when a background
    /// writer runs beside the step ([`MemoryModel::in_flight_copies`] > 0).
    #[serde(default = "default_checkpoint_writer")]
    pub checkpoint_writer: Bytes,
}

fn default_checkpoint_writer() -> Bytes {
    Bytes(16 << 20)
}

impl Default for MemoryModel {
    /// eg-kernel's trainer as measured in `docs/memory.md`: 32 MiB runtime overhead (`eg
    /// train` of a 0.03M-parameter model peaks at 26 MiB), 64 MiB offload window, a rollback
    /// snapshot, one copy filled on a background thread while the next step runs (the
    /// spare snapshot), one extra copy while a checkpoint is captured.
    fn default() -> Self {
        MemoryModel {
            // Measured with the release `eg` (the whole run of `micro-llama` is 30 MiB;
            // the debug build needed 32 MiB).
            runtime_overhead: Bytes(22 << 20),
            offload_window: Bytes(64 << 20),
            rollback_snapshot: true,
            checkpoint_copies: 1,
            // Since eg-kernel 72eb5c8 a checkpoint's snapshot is copied on a background
            // thread while the next step runs: the rollback snapshot and the spare being
            // filled (`Trainer::start_snapshot_copy` / `settle_snapshot`) are both resident
            // during the step.
            in_flight_copies: 1,
            // glibc with `eg_kernel::tune_process`'s settings (mmap threshold 32 MiB, no
            // trimming), measured 2026-11-29 on the grid of docs/memory.md: LoRA / QLoRA
            // rank 16 on small-llama peak 36–46 MiB (7–12 % of the step phase) above glibc's
            // defaults; full training (fused step or autograd) within ±4 MiB.
            adapter_heap_retention_permille: 100,
            // Two writer threads (2 cores) × two files' blocks × 4 MiB.
            checkpoint_writer: default_checkpoint_writer(),
        }
    }
}

fn mul(a: u64, b: u64) -> u64 {
    a.saturating_mul(b)
}

impl MemoryModel {
    /// Predicts the peak bytes of one training step of `profile` run as `setup`.
    pub fn estimate(&self, profile: &ModelProfile, setup: &Setup) -> Result<Estimate> {
        profile.validate()?;
        let bad = |field, reason: &str| Error::Invalid {
            what: "setup",
            field,
            reason: reason.to_string(),
        };
        if setup.seq_len == 0 {
            return Err(bad("seq_len", "must be positive"));
        }
        if setup.micro_batch == 0 {
            return Err(bad("micro_batch", "must be positive"));
        }
        if setup.accumulation == 0 {
            return Err(bad("accumulation", "must be positive"));
        }
        if let Adapters::Lora { rank: 0, .. } = setup.adapters {
            return Err(bad("adapters.rank", "must be positive"));
        }

        let c = setup.precision.compute_bytes();
        let p = profile.params;
        let q = profile.quantizable_params;
        let s = u64::from(setup.seq_len);
        let n = mul(u64::from(setup.micro_batch), s);

        // Weights and trainable parameters.
        let (weights, trainable, rank, dequant) = match setup.adapters {
            Adapters::None => (mul(p, c), p, 0, 0),
            Adapters::Lora { rank, base } => {
                let r = u64::from(rank);
                let t = mul(r, profile.lora_params_per_rank);
                let blocks = q.div_ceil(QUANT_BLOCK);
                let rest = mul(p - q, c);
                let (w, deq) = match base {
                    BaseFormat::Full => (mul(p, c), 0),
                    BaseFormat::Nf4 { double_quant } => {
                        let scales = if double_quant {
                            blocks + mul(blocks.div_ceil(DOUBLE_QUANT_GROUP), F32_BYTES)
                        } else {
                            mul(blocks, F32_BYTES)
                        };
                        (
                            q.div_ceil(2) + scales + rest,
                            mul(profile.largest_matrix_params, c),
                        )
                    }
                    BaseFormat::Int8 => (
                        q + mul(blocks, F32_BYTES) + rest,
                        mul(profile.largest_matrix_params, c),
                    ),
                };
                (w, t, r, deq)
            }
        };
        let adapter_weights = if setup.adapters == Adapters::None {
            0
        } else {
            mul(trainable, c)
        };
        let master_weights = if setup.precision.needs_master() {
            mul(trainable, F32_BYTES)
        } else {
            0
        };
        let f32_params = mul(trainable, F32_BYTES);
        let grad_accumulator = f32_params;
        let state = mul(mul(setup.optimizer.slots(), trainable), F32_BYTES);
        let (optimizer_state, state_in_ram) = match setup.offload {
            OffloadKind::None => (state, state),
            OffloadKind::Disk => (state.min(self.offload_window.0), 0),
        };
        let rollback_snapshot = if self.rollback_snapshot {
            f32_params.saturating_add(state_in_ram)
        } else {
            0
        };
        let overhead = self.runtime_overhead.0;

        // Step phase.
        let gradients = mul(trainable, setup.precision.gradient_bytes());
        let per_block: Vec<u64> = profile
            .blocks
            .iter()
            .map(|b| b.elems_per_token(s))
            .collect();
        let max_block = per_block.iter().copied().max().unwrap_or(0);
        let outside = profile
            .head_activation_elems_per_token
            .saturating_add(mul(rank, profile.lora_activation_elems_per_token_per_rank));
        let kept_per_token = if setup.checkpointing {
            mul(profile.blocks.len() as u64, profile.hidden_size)
                .saturating_add(max_block)
                .saturating_add(outside)
        } else {
            per_block
                .iter()
                .fold(0u64, |a, &b| a.saturating_add(b))
                .saturating_add(outside)
        };
        let activations = mul(
            mul(n, kept_per_token),
            setup.precision.activation_half_bytes(),
        ) / 2;
        let max_pos = profile
            .blocks
            .iter()
            .map(|b| b.activation_elems_per_token_per_position)
            .max()
            .unwrap_or(0);
        let softmax_copy = mul(max_pos / 2, s);
        let transient = mul(
            mul(
                n,
                profile
                    .vocab_size
                    .saturating_add(max_block)
                    .saturating_add(softmax_copy),
            ),
            setup.precision.transient_bytes(),
        )
        .saturating_add(dequant);
        // Full training in f32 with a fused step: its own counts replace the autograd ones.
        let fused = profile
            .fused
            .filter(|_| setup.adapters == Adapters::None && setup.precision == Precision::F32);
        // The writer's blocks are touched only as far as there are bytes to write.
        let writer_blocks = self
            .checkpoint_writer
            .0
            .min(f32_params.saturating_add(state));
        let writer = if self.in_flight_copies > 0 {
            writer_blocks
        } else {
            0
        };
        let evaluation = match fused {
            None => 0,
            Some(f) => {
                let in_flight = mul(
                    u64::from(self.in_flight_copies),
                    f32_params.saturating_add(state_in_ram),
                );
                // The fused forward: the hidden state, one block's activations (dropped
                // when the next block has its input) and the head's.
                let per_token = profile
                    .hidden_size
                    .saturating_add(f.block_activation_elems_per_token)
                    .saturating_add(mul(f.block_activation_elems_per_token_per_position, s))
                    .saturating_add(f.head_activation_elems_per_token);
                in_flight
                    .saturating_add(writer)
                    .saturating_add(mul(mul(n, per_token), F32_BYTES))
            }
        };
        let (activations, transient) = match fused {
            None => (activations, transient),
            Some(f) => {
                let block = f
                    .block_activation_elems_per_token
                    .saturating_add(mul(f.block_activation_elems_per_token_per_position, s));
                let blocks = profile.blocks.len() as u64;
                let kept = if setup.checkpointing {
                    mul(blocks, profile.hidden_size).saturating_add(block)
                } else {
                    mul(blocks, block)
                }
                .saturating_add(f.head_activation_elems_per_token);
                let short = f
                    .transient_elems_per_token
                    .saturating_add(mul(f.transient_elems_per_token_per_position, s));
                (mul(mul(n, kept), F32_BYTES), mul(mul(n, short), F32_BYTES))
            }
        };

        // Under disk offload the state's snapshot is a copy of the offload files and the
        // checkpoint writer streams it from there (pieces of 4 MiB): no state in RAM.
        let checkpoint_in_flight = mul(
            u64::from(self.in_flight_copies),
            f32_params.saturating_add(state_in_ram),
        )
        .saturating_add(writer);

        // Checkpoint phase.
        let checkpoint_buffers = mul(
            u64::from(self.checkpoint_copies),
            f32_params.saturating_add(state_in_ram),
        )
        .saturating_add(writer_blocks);

        // Heap fragmentation on the autograd path with adapters (measured, see the field).
        let heap_retention = match setup.adapters {
            Adapters::None => 0,
            Adapters::Lora { .. } => {
                mul(
                    gradients
                        .saturating_add(activations)
                        .saturating_add(transient),
                    u64::from(self.adapter_heap_retention_permille),
                ) / 1000
            }
        };

        let mut e = Estimate {
            weights: Bytes(weights),
            adapter_weights: Bytes(adapter_weights),
            master_weights: Bytes(master_weights),
            grad_accumulator: Bytes(grad_accumulator),
            optimizer_state: Bytes(optimizer_state),
            rollback_snapshot: Bytes(rollback_snapshot),
            overhead: Bytes(overhead),
            gradients: Bytes(gradients),
            activations: Bytes(activations),
            transient: Bytes(transient),
            checkpoint_in_flight: Bytes(checkpoint_in_flight),
            heap_retention: Bytes(heap_retention),
            checkpoint_buffers: Bytes(checkpoint_buffers),
            evaluation: Bytes(evaluation),
            peak: Bytes(0),
        };
        e.peak = Bytes(
            e.persistent()
                .0
                .saturating_add(e.step_phase().0.max(checkpoint_buffers).max(evaluation)),
        );
        Ok(e)
    }

    /// Bytes of optimizer state for `setup` (what disk offload moves out of RAM).
    pub fn optimizer_state_bytes(&self, profile: &ModelProfile, setup: &Setup) -> u64 {
        let trainable = match setup.adapters {
            Adapters::None => profile.params,
            Adapters::Lora { rank, .. } => mul(u64::from(rank), profile.lora_params_per_rank),
        };
        mul(mul(setup.optimizer.slots(), trainable), F32_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy profile with round numbers for hand computation.
    fn toy() -> ModelProfile {
        ModelProfile {
            params: 1_000_000,
            quantizable_params: 640_000,
            largest_matrix_params: 64_000,
            hidden_size: 100,
            blocks: vec![
                BlockProfile {
                    activation_elems_per_token: 1_000,
                    activation_elems_per_token_per_position: 8,
                };
                4
            ],
            head_activation_elems_per_token: 600,
            vocab_size: 500,
            lora_params_per_rank: 1_000,
            lora_activation_elems_per_token_per_rank: 10,
            forward_flops_per_token: 2_000_000,
            forward_flops_per_token_per_position: 1_000,
            fused: None,
        }
    }

    fn setup() -> Setup {
        Setup {
            precision: Precision::F32,
            optimizer: Optimizer::AdamW,
            adapters: Adapters::None,
            seq_len: 100,
            micro_batch: 2,
            accumulation: 1,
            checkpointing: false,
            offload: OffloadKind::None,
        }
    }

    /// No overhead, no rollback snapshot, no checkpoint copies: the textbook terms.
    fn zero_overhead() -> MemoryModel {
        MemoryModel {
            runtime_overhead: Bytes(0),
            offload_window: Bytes(1_000),
            rollback_snapshot: false,
            checkpoint_copies: 0,
            in_flight_copies: 0,
            adapter_heap_retention_permille: 0,
            checkpoint_writer: Bytes(0),
        }
    }

    #[test]
    fn full_f32_adamw_by_hand() {
        let e = zero_overhead().estimate(&toy(), &setup()).unwrap();
        assert_eq!(e.weights, Bytes(4_000_000));
        assert_eq!(e.master_weights, Bytes(0));
        assert_eq!(e.gradients, Bytes(4_000_000));
        assert_eq!(e.grad_accumulator, Bytes(4_000_000));
        assert_eq!(e.optimizer_state, Bytes(8_000_000));
        // n = 200 tokens; per block 1000 + 8*100 = 1800; 4 blocks = 7200; + head 600 = 7800.
        assert_eq!(e.activations, Bytes(200 * 7_800 * 4));
        // logits grad 200*500*4 + one block's grads 200*1800*4 + the softmax backward's
        // contiguous copy 200*(8/2)*100*4.
        assert_eq!(
            e.transient,
            Bytes(200 * 500 * 4 + 200 * 1_800 * 4 + 200 * 400 * 4)
        );
        // weights + accumulator + gradients + state = 20e6, then activations and transient.
        assert_eq!(
            e.peak,
            Bytes(20_000_000 + 6_240_000 + 400_000 + 1_440_000 + 320_000)
        );
    }

    #[test]
    fn bf16_master_and_accumulation() {
        let s = Setup {
            precision: Precision::Bf16,
            accumulation: 4,
            ..setup()
        };
        let e = zero_overhead().estimate(&toy(), &s).unwrap();
        assert_eq!(e.weights, Bytes(2_000_000));
        assert_eq!(e.master_weights, Bytes(4_000_000));
        // Gradients of the f32 masters are f32; activations 3 bytes per element (issue 8).
        assert_eq!(e.gradients, Bytes(4_000_000));
        assert_eq!(e.grad_accumulator, Bytes(4_000_000));
        assert_eq!(e.activations, Bytes(200 * 7_800 * 3));
    }

    #[test]
    fn optimizer_slots() {
        for (o, state) in [
            (Optimizer::AdamW, 8_000_000),
            (Optimizer::Sgd, 4_000_000),
            (Optimizer::Lion, 4_000_000),
        ] {
            let s = Setup {
                optimizer: o,
                ..setup()
            };
            let e = zero_overhead().estimate(&toy(), &s).unwrap();
            assert_eq!(e.optimizer_state, Bytes(state), "{o:?}");
        }
    }

    #[test]
    fn checkpointing_keeps_block_inputs_and_one_block() {
        let s = Setup {
            checkpointing: true,
            ..setup()
        };
        let e = zero_overhead().estimate(&toy(), &s).unwrap();
        // 4 blocks * hidden 100 + one block 1800 + head 600 = 2800 per token.
        assert_eq!(e.activations, Bytes(200 * 2_800 * 4));
    }

    #[test]
    fn lora_trains_only_adapters() {
        let s = Setup {
            adapters: Adapters::Lora {
                rank: 8,
                base: BaseFormat::Full,
            },
            ..setup()
        };
        let e = zero_overhead().estimate(&toy(), &s).unwrap();
        assert_eq!(e.weights, Bytes(4_000_000));
        assert_eq!(e.adapter_weights, Bytes(8_000 * 4));
        assert_eq!(e.gradients, Bytes(8_000 * 4));
        assert_eq!(e.optimizer_state, Bytes(2 * 8_000 * 4));
        // + 8 * 10 LoRA elements per token.
        assert_eq!(e.activations, Bytes(200 * (7_800 + 80) * 4));
    }

    /// The allocator-retention term (issue 9): a fraction of the step phase with LoRA
    /// adapters only, counted in the step phase and the peak.
    #[test]
    fn heap_retention_is_a_share_of_the_adapter_step_phase() {
        let lora = Setup {
            adapters: Adapters::Lora {
                rank: 8,
                base: BaseFormat::Full,
            },
            ..setup()
        };
        let m = MemoryModel {
            adapter_heap_retention_permille: 100,
            ..zero_overhead()
        };
        let without = zero_overhead().estimate(&toy(), &lora).unwrap();
        let with = m.estimate(&toy(), &lora).unwrap();
        assert_eq!(without.heap_retention, Bytes(0));
        let step = without.gradients.0 + without.activations.0 + without.transient.0;
        assert_eq!(with.heap_retention, Bytes(step / 10));
        assert_eq!(with.step_phase().0, without.step_phase().0 + step / 10);
        assert_eq!(with.peak.0, without.peak.0 + step / 10);
        // Full training: no retention term.
        let full = m.estimate(&toy(), &setup()).unwrap();
        assert_eq!(full.heap_retention, Bytes(0));
        assert_eq!(full, zero_overhead().estimate(&toy(), &setup()).unwrap());
        // The shipped model has it; an Estimate serialized before the term existed loads.
        assert_eq!(MemoryModel::default().adapter_heap_retention_permille, 100);
        let mut v = serde_json::to_value(with).unwrap();
        v.as_object_mut().unwrap().remove("heap_retention");
        let back: Estimate = serde_json::from_value(v).unwrap();
        assert_eq!(back.heap_retention, Bytes(0));
    }

    #[test]
    fn qlora_nf4_with_and_without_double_quant() {
        let mk = |dq| Setup {
            precision: Precision::Bf16,
            adapters: Adapters::Lora {
                rank: 8,
                base: BaseFormat::Nf4 { double_quant: dq },
            },
            ..setup()
        };
        // Q = 640000: 320000 bytes of NF4, 10000 blocks.
        // Single: 10000 * 4 = 40000 bytes of scales. Rest (360000 params) in bf16 = 720000.
        let e = zero_overhead().estimate(&toy(), &mk(false)).unwrap();
        assert_eq!(e.weights, Bytes(320_000 + 40_000 + 720_000));
        // Double: 10000 one-byte scales + ceil(10000/256)=40 f32 = 10160.
        let e2 = zero_overhead().estimate(&toy(), &mk(true)).unwrap();
        assert_eq!(e2.weights, Bytes(320_000 + 10_160 + 720_000));
        // Transient buffers at 6 bytes under mixed precision, plus one dequantized matrix in
        // the compute dtype: 64000 * 2.
        assert_eq!(
            e2.transient,
            Bytes(200 * 500 * 6 + 200 * 1_800 * 6 + 200 * 400 * 6 + 128_000)
        );
        assert_eq!(e2.master_weights, Bytes(8_000 * 4));
        assert_eq!(e2.grad_accumulator, Bytes(8_000 * 4));
    }

    #[test]
    fn disk_offload_keeps_only_the_window() {
        let s = Setup {
            offload: OffloadKind::Disk,
            ..setup()
        };
        let e = zero_overhead().estimate(&toy(), &s).unwrap();
        assert_eq!(e.optimizer_state, Bytes(1_000));
        assert_eq!(zero_overhead().optimizer_state_bytes(&toy(), &s), 8_000_000);
    }

    #[test]
    fn overhead_is_added() {
        let m = MemoryModel {
            runtime_overhead: Bytes(32 << 20),
            ..zero_overhead()
        };
        let a = zero_overhead().estimate(&toy(), &setup()).unwrap();
        let b = m.estimate(&toy(), &setup()).unwrap();
        assert_eq!(b.peak.0 - a.peak.0, 32 << 20);
    }

    #[test]
    fn rollback_snapshot_and_checkpoint_phase() {
        let m = MemoryModel {
            rollback_snapshot: true,
            checkpoint_copies: 3,
            ..zero_overhead()
        };
        let e = m.estimate(&toy(), &setup()).unwrap();
        // f32 params 4e6 + AdamW state 8e6.
        assert_eq!(e.rollback_snapshot, Bytes(12_000_000));
        assert_eq!(e.checkpoint_buffers, Bytes(36_000_000));
        // Persistent: weights 4e6 + accumulator 4e6 + state 8e6 + snapshot 12e6 = 28e6.
        assert_eq!(e.persistent(), Bytes(28_000_000));
        // Step phase: grads 4e6 + activations 6.24e6 + transient 2.16e6 = 12.4e6 < 36e6.
        assert_eq!(e.step_phase(), Bytes(12_400_000));
        assert_eq!(e.peak, Bytes(28_000_000 + 36_000_000));
        // A background write in flight adds one copy to the step phase.
        let bg = MemoryModel {
            in_flight_copies: 1,
            ..m
        };
        let e2 = bg.estimate(&toy(), &setup()).unwrap();
        assert_eq!(e2.checkpoint_in_flight, Bytes(12_000_000));
        assert_eq!(e2.step_phase(), Bytes(24_400_000));
        // A big micro-batch makes the step phase the larger one.
        let big = Setup {
            micro_batch: 16,
            ..setup()
        };
        let e = m.estimate(&toy(), &big).unwrap();
        assert!(e.step_phase() > e.checkpoint_buffers);
        assert_eq!(e.peak.0, e.persistent().0 + e.step_phase().0);
        // Under disk offload the state's rollback snapshot and checkpoint copies leave RAM
        // (a copy of the files, streamed to the checkpoint).
        let off = Setup {
            offload: OffloadKind::Disk,
            ..setup()
        };
        let e = m.estimate(&toy(), &off).unwrap();
        assert_eq!(e.rollback_snapshot, Bytes(4_000_000));
        assert_eq!(e.checkpoint_buffers, Bytes(12_000_000));
        assert_eq!(e.checkpoint_in_flight, Bytes(0));
    }

    /// The toy profile with a fused step.
    fn toy_fused() -> ModelProfile {
        ModelProfile {
            fused: Some(FusedProfile {
                block_activation_elems_per_token: 500,
                block_activation_elems_per_token_per_position: 4,
                head_activation_elems_per_token: 300,
                transient_elems_per_token: 700,
                transient_elems_per_token_per_position: 2,
            }),
            ..toy()
        }
    }

    #[test]
    fn fused_step_counts_replace_autograd_for_full_f32() {
        let m = zero_overhead();
        let e = m.estimate(&toy_fused(), &setup()).unwrap();
        // n = 200: 200 · (4 blocks · (500 + 4·100) + 300) · 4.
        assert_eq!(e.activations, Bytes(3_120_000));
        // 200 · (700 + 2·100) · 4: no logits' gradient of its own (it overwrites them).
        assert_eq!(e.transient, Bytes(720_000));
        // Evaluation through the fused forward: 200 · (100 + 500 + 4·100 + 300) · 4.
        assert_eq!(e.evaluation, Bytes(1_040_000));
        // Persistent 16e6 + max(step 4e6 + 3.12e6 + 0.72e6, evaluation 1.04e6).
        assert_eq!(e.peak, Bytes(16_000_000 + 7_840_000));
        // Checkpointing: 4 block inputs of 100 + one block + head.
        let ck = Setup {
            checkpointing: true,
            ..setup()
        };
        let e = m.estimate(&toy_fused(), &ck).unwrap();
        assert_eq!(e.activations, Bytes(200 * (400 + 900 + 300) * 4));
        // With the in-flight copy (the allocator's retention is on candle's path only).
        let m2 = MemoryModel {
            in_flight_copies: 1,
            adapter_heap_retention_permille: 100,
            ..zero_overhead()
        };
        let e = m2.estimate(&toy_fused(), &setup()).unwrap();
        assert_eq!(e.evaluation, Bytes(12_000_000 + 1_040_000));
        // Adapters and mixed precision run the autograd path: the fused counts are ignored.
        for s in [
            Setup {
                adapters: Adapters::Lora {
                    rank: 4,
                    base: BaseFormat::Full,
                },
                ..setup()
            },
            Setup {
                precision: Precision::Bf16,
                ..setup()
            },
        ] {
            let fused = m.estimate(&toy_fused(), &s).unwrap();
            assert_eq!(fused, m.estimate(&toy(), &s).unwrap());
            assert_eq!(fused.evaluation, Bytes(0));
        }
    }

    #[test]
    fn older_profiles_and_estimates_deserialize() {
        let mut v = serde_json::to_value(toy_fused()).unwrap();
        assert!(v.get("fused").is_some());
        v.as_object_mut().unwrap().remove("fused");
        let p: ModelProfile = serde_json::from_value(v).unwrap();
        assert_eq!(p, toy());
        // Without a fused step the field is not written.
        assert!(serde_json::to_value(toy()).unwrap().get("fused").is_none());
        let e = zero_overhead().estimate(&toy(), &setup()).unwrap();
        let mut v = serde_json::to_value(e).unwrap();
        v.as_object_mut().unwrap().remove("evaluation");
        let back: Estimate = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn default_model_counts_the_background_snapshot_copy() {
        assert_eq!(MemoryModel::default().in_flight_copies, 1);
    }

    #[test]
    fn invalid_inputs_are_errors() {
        let mut p = toy();
        p.quantizable_params = 2_000_000;
        assert!(matches!(
            zero_overhead().estimate(&p, &setup()),
            Err(Error::Invalid {
                field: "quantizable_params",
                ..
            })
        ));
        let s = Setup {
            micro_batch: 0,
            ..setup()
        };
        assert!(zero_overhead().estimate(&toy(), &s).is_err());
    }

    #[test]
    fn precision_auto_follows_cpu() {
        use eg_config::wire::Precision as P;
        // Native bf16 alone does not make candle's CPU bf16 faster (issue 8): f32.
        assert_eq!(
            Precision::from_config(P::Auto, &["avx512_bf16".into()]),
            Precision::F32
        );
        assert_eq!(
            Precision::from_config(P::Bf16, &["avx2".into()]),
            Precision::Bf16
        );
        assert_eq!(
            Precision::from_config(P::Auto, &["avx2".into()]),
            Precision::F32
        );
        assert_eq!(Precision::from_config(P::F16, &[]), Precision::F16);
    }
}
