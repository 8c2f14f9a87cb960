//! # Elastic-Guardian
//!
//! Train and fine-tune transformer language models without crashing and without losing work.
//!
//! This crate is the facade: it re-exports the layered crates under short module names and
//! wraps each layer's error in one [`Error`]. It holds no logic of its own.
//!
//! | module | crate | owns |
//! |---|---|---|
//! | [`config`] | `eg-config` | typed, layered, validated configuration |
//! | [`hardware`] | `eg-hardware` | hardware detection and capacity estimates |
//! | [`memory`] | `eg-memory` | memory planning, pressure control, offload |
//! | [`data`] | `eg-data` | datasets, tokenization, packing, sharding, cursors |
//! | [`model`] | `eg-model` | trainable architectures, loading, LoRA/QLoRA |
//! | [`kernel`] | `eg-kernel` | the guarded training loop, checkpoints, resume |
//! | [`dist`] | `eg-dist` | process groups, collectives, elastic restarts |
//! | [`monitor`] | `eg-monitor` | logging, metrics, watchdog, sinks |
//! | [`export`] | `eg-export` | export formats and their validation |
//!
//! [`prelude`] gathers the types a training script needs. A few lines train a model with
//! checked settings, atomic checkpoints and exact resume:
//!
//! ```
//! use std::sync::Arc;
//! use elastic_guardian::prelude::*;
//!
//! # fn main() -> elastic_guardian::Result<()> {
//! # let dir = tempfile::tempdir().expect("a temporary directory");
//! let model = Llama::init(&LlamaConfig::tiny_for_tests(), 7, DType::F32, &Device::Cpu)?;
//! let docs = (0..64u32).map(|i| (0..24).map(|j| (i * 5 + j) % 60).collect::<Vec<u32>>());
//! let data = Arc::new(InMemoryDataset::from_docs(docs));
//! let report = Trainer::builder(model, data)
//!     .optimizer(OptimizerSpec::adamw(1e-3))
//!     .schedule(ScheduleSpec::cosine().warmup(Steps(2)))
//!     .seq_len(SeqLen(8))
//!     .global_batch(Tokens(64))          // 8 sequences per optimizer step
//!     .max_steps(Steps(4))
//!     .checkpoints(Checkpoints::dir(dir.path().join("ckpt")).every(Steps(2)).keep(2))
//!     .build()?                          // validates everything, or fails clearly
//!     .fit()?;                           // resumes from the newest valid checkpoint
//! assert_eq!(report.steps, 4);
//! # Ok(())
//! # }
//! ```

pub mod prelude;

pub use eg_config as config;
pub use eg_data as data;
pub use eg_dist as dist;
pub use eg_export as export;
pub use eg_hardware as hardware;
pub use eg_kernel as kernel;
pub use eg_memory as memory;
pub use eg_model as model;
pub use eg_monitor as monitor;

/// The error of every fallible facade call: one variant per layer, each wrapping that layer's
/// error transparently so its message and source chain are unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration error.
    #[error(transparent)]
    Config(#[from] eg_config::Error),
    /// A hardware-detection error.
    #[error(transparent)]
    Hardware(#[from] eg_hardware::Error),
    /// A memory-planning error.
    #[error(transparent)]
    Memory(#[from] eg_memory::Error),
    /// A data error.
    #[error(transparent)]
    Data(#[from] eg_data::Error),
    /// A model error.
    #[error(transparent)]
    Model(#[from] eg_model::Error),
    /// A training-loop error.
    #[error(transparent)]
    Kernel(#[from] eg_kernel::Error),
    /// A distributed-training error.
    #[error(transparent)]
    Dist(#[from] eg_dist::Error),
    /// A monitoring error.
    #[error(transparent)]
    Monitor(#[from] eg_monitor::Error),
    /// An export error.
    #[error(transparent)]
    Export(#[from] eg_export::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Model(eg_model::Error::from(e))
    }
}

/// Result alias of the facade.
pub type Result<T, E = Error> = std::result::Result<T, E>;
