//! The error type of this crate.

use std::path::PathBuf;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The requested capability is not built yet.
    #[error(
        "{what} is not supported yet (tracked in issue #{issue}; see the README's status table)"
    )]
    Unsupported {
        /// What was asked for.
        what: &'static str,
        /// The issue that tracks the work.
        issue: u32,
    },
    /// Trainable parameters received no gradient (an op without backward cut the graph).
    #[error("{} trainable parameter(s) received no gradient: {params:?}", params.len())]
    NoGradient {
        /// Names of the parameters without gradient.
        params: Vec<String>,
    },
    /// A parameter cannot be handled by the in-place optimizer (not f32 on the CPU, or not
    /// contiguous).
    #[error("parameter {name} is not a contiguous f32 CPU tensor ({reason})")]
    UnsupportedParam {
        /// The parameter.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// Saved state does not fit the parameters it is loaded into.
    #[error("state {what} does not match: expected {expected}, found {found}")]
    StateMismatch {
        /// Which state.
        what: String,
        /// What was expected.
        expected: String,
        /// What was found.
        found: String,
    },
    /// An option has a value that cannot work.
    #[error("invalid option {option}: {reason}")]
    InvalidOption {
        /// The option.
        option: &'static str,
        /// Why.
        reason: String,
    },
    /// A checkpoint directory is incomplete or corrupt.
    #[error("checkpoint {dir:?} is corrupt: {file}: {reason}")]
    CheckpointCorrupt {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The file at fault (or `manifest.json`).
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// No valid checkpoint exists where one is required.
    #[error("no valid checkpoint in {dir:?}")]
    NoCheckpoint {
        /// The directory searched.
        dir: PathBuf,
    },
    /// Too many consecutive non-finite steps even after rolling back.
    #[error("training diverged: {consecutive} consecutive non-finite steps after a rollback")]
    Diverged {
        /// Consecutive non-finite steps.
        consecutive: u32,
    },
    /// The background checkpoint writer panicked (a bug); the checkpoint it was writing is
    /// incomplete and will be skipped on resume.
    #[error("the background checkpoint writer panicked")]
    WriterPanicked,
    /// The data ran out before the first step.
    #[error("the data stream is empty")]
    NoData,
    /// An I/O operation on a path failed.
    #[error("I/O error on {path:?}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// JSON (de)serialisation of a checkpoint file failed.
    #[error("JSON error in {what}: {source}")]
    Json {
        /// Which document.
        what: &'static str,
        /// The error.
        source: serde_json::Error,
    },
    /// An error of the step it happened at.
    #[error("at step {step}: {source}")]
    AtStep {
        /// The optimizer step.
        step: u64,
        /// The error.
        source: Box<Error>,
    },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An error from the model crate.
    #[error(transparent)]
    Model(#[from] eg_model::Error),
    /// An error from the data crate.
    #[error(transparent)]
    Data(#[from] eg_data::Error),
    /// Memory layer (optimizer-state offload).
    #[error(transparent)]
    Memory(#[from] eg_memory::Error),
}

impl Error {
    /// Wraps `self` with the step it happened at.
    pub fn at_step(self, step: u64) -> Error {
        match self {
            e @ Error::AtStep { .. } => e,
            e => Error::AtStep {
                step,
                source: Box::new(e),
            },
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
