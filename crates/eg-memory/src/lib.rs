//! # eg-memory
//!
//! Memory planning and control: a run that fits is planned before it starts, and a run that
//! stops fitting adapts instead of being killed.
//!
//! ## Brief overview
//!
//! - [`footprint`]: the memory model. From a [`ModelProfile`] (plain numbers the model side
//!   fills in from its layer analysis; this crate sits below eg-model and does not depend on
//!   it) and a [`Setup`] (precision, optimizer, LoRA/QLoRA, sequence length, micro-batch,
//!   accumulation, checkpointing, offload), [`MemoryModel::estimate`] predicts the peak bytes
//!   of a training step, term by term: persistent state, plus the larger of the step phase
//!   (gradients, activations, transient buffers) and the checkpoint phase. Every term and
//!   formula is documented on [`Estimate`] and in `docs/memory.md`, with predicted vs
//!   measured peak RSS (within ±10 % over 13 configurations of eg-kernel's trainer).
//! - [`planner`]: the [`Budget`] (effective memory from eg-hardware, cgroup aware, ×
//!   `memory.budget_fraction`, capped by `memory.limit`, minus `memory.reserve`) and [`plan`],
//!   which enumerates micro-batch sizes dividing the global batch, checkpointing on/off and
//!   offload none/disk, predicts peak and relative throughput for each, and chooses the
//!   fastest that fits with headroom — or returns [`Error::DoesNotFit`] saying by how much
//!   and what would help.
//! - [`live`]: what is used now — process RSS/HWM, cgroup v1 and v2 usage, limit, peak and
//!   OOM events, PSI — all read through an [`eg_hardware::Root`] so tests use fixture trees;
//!   GPU memory through eg-hardware's NVML trait.
//! - [`pressure`]: [`Level`]s (Normal, Elevated, Critical) with hysteresis (enter at one
//!   threshold, leave below a lower one, after a minimum dwell).
//! - [`controller`]: the pure state machine that shrinks the micro-batch (accumulation grows,
//!   the global batch never changes), then turns on checkpointing, then offload, and grows
//!   back after a stable period; every [`Decision`] is a serde record.
//! - [`guard`]: the controller in a training loop ([`MemoryGuard`]): between steps it
//!   projects the next step's peak (other processes of the cgroup + this process's
//!   predicted or measured peak) against the budget and shrinks before a step that would be
//!   OOM-killed, reads the measured pressure (cgroup working set, PSI, OOM events), probes
//!   the first step at micro-batch 1 to calibrate the model, and saves its state for
//!   checkpoints (eg-kernel's `Trainer::with_memory_guard` applies the decisions).
//! - [`precision`]: the compute-precision selector ([`select`]): explicit choices kept; `auto`
//!   is bf16 on GPUs with native bf16, else f16 with dynamic loss scaling; on CPUs bf16 only
//!   with native bf16 *and* a measured bf16 GEMM speed-up (candle's CPU bf16 was slower than
//!   f32 where measured). The loss scaler itself lives in eg-kernel.
//!
//! Why a model and not trial and error: the alternatives in the field either change the
//! effective batch (HF's `auto_find_batch_size`), never grow back (Composer), or ignore
//! activations (Accelerate's and DeepSpeed's estimators). Predicting first lets `eg plan`
//! say what fits before anything runs; the controller covers what the model misses.
//!
//! ## Example
//!
//! ```
//! use eg_config::Bytes;
//! use eg_config::wire::Toggle;
//! use eg_memory::{
//!     Adapters, BlockProfile, Budget, MemoryModel, ModelProfile, OffloadChoice, Optimizer,
//!     PlanRequest, Precision, SpeedModel, plan,
//! };
//!
//! let profile = ModelProfile {
//!     params: 10_000_000,
//!     quantizable_params: 8_000_000,
//!     largest_matrix_params: 500_000,
//!     hidden_size: 256,
//!     blocks: vec![
//!         BlockProfile { activation_elems_per_token: 4_000, activation_elems_per_token_per_position: 8 };
//!         8
//!     ],
//!     head_activation_elems_per_token: 1_000,
//!     vocab_size: 1_000,
//!     lora_params_per_rank: 8_192,
//!     lora_activation_elems_per_token_per_rank: 16,
//!     forward_flops_per_token: 20_000_000,
//!     forward_flops_per_token_per_position: 16_000,
//!     fused: None,
//! };
//! let request = PlanRequest {
//!     profile,
//!     precision: Precision::Bf16,
//!     optimizer: Optimizer::AdamW,
//!     adapters: Adapters::None,
//!     global_tokens: 16 * 512,
//!     seq_len: 512,
//!     micro_batch: None,
//!     checkpointing: Toggle::Auto,
//!     offload: OffloadChoice::Auto,
//!     headroom: 0.1,
//! };
//! // 2 GiB effective memory, 90 % of it, minus a 256 MiB reserve.
//! let budget = Budget::new(Some(Bytes(2 << 30)), 0.9, None, Bytes(256 << 20))?;
//! let plan = plan(&request, &budget, &MemoryModel::default(), &SpeedModel::default())?;
//! let s = plan.chosen.strategy;
//! assert_eq!(s.micro_batch * s.accumulation, 16);
//! assert!(plan.chosen.estimate.peak <= budget.usable);
//!
//! // With a 300 MiB limit nothing fits, and the error says what would help (LoRA here).
//! let small = Budget::new(None, 1.0, Some(Bytes(300 << 20)), Bytes(64 << 20))?;
//! let err = eg_memory::plan(&request, &small, &MemoryModel::default(), &SpeedModel::default())
//!     .unwrap_err();
//! assert!(err.to_string().contains("would help"));
//! # Ok::<(), eg_memory::Error>(())
//! ```

pub mod controller;
mod error;
pub mod footprint;
pub mod guard;
pub mod live;
pub mod offload;
pub mod planner;
pub mod precision;
pub mod pressure;

pub use controller::{Action, Controller, ControllerConfig, Decision, Hints};
pub use error::{Error, Result, Suggestion};
pub use footprint::{
    Adapters, BaseFormat, BlockProfile, Estimate, FusedProfile, MemoryModel, ModelProfile,
    OffloadKind, Optimizer, Precision, Setup,
};
pub use guard::{GuardConfig, GuardState, MemoryGuard, Poll};
pub use planner::{
    Budget, Candidate, OffloadChoice, Plan, PlanRequest, SpeedModel, Strategy, plan,
};
pub use precision::{ComputeDevice, GemmSpeeds, PrecisionChoice, PrecisionFacts, select};
pub use pressure::{Level, PressureDetector, Reading, Thresholds};

/// Bytes for people: binary units with one decimal (`355.3 MiB`), exact below 1 KiB.
///
/// ```
/// use eg_memory::HumanBytes;
/// assert_eq!(HumanBytes(1536).to_string(), "1.5 KiB");
/// assert_eq!(HumanBytes(3 << 30).to_string(), "3.0 GiB");
/// assert_eq!(HumanBytes(512).to_string(), "512 B");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanBytes(pub u64);

impl From<eg_config::Bytes> for HumanBytes {
    fn from(b: eg_config::Bytes) -> Self {
        HumanBytes(b.0)
    }
}

impl std::fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut x = self.0 as f64;
        let mut u = 0;
        while u + 1 < UNITS.len() && x >= 1024.0 {
            x /= 1024.0;
            u += 1;
        }
        write!(f, "{x:.1} {}", UNITS[u])
    }
}
