//! The error type of this crate.
//!
//! Detection itself never fails: what cannot be read is reported as unknown (`None`) with a
//! warning. Errors come only from the explicit probes (GEMM, memory and storage bandwidth) and
//! from the capacity cache.

use std::path::PathBuf;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on a file or directory failed.
    #[error("could not {op} {path}: {source}")]
    Io {
        /// What was being done ("create", "write", "fsync", "rename", ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A capacity cache file exists but is not a valid cache.
    #[error("capacity cache {path} is not valid JSON for this schema: {source}")]
    CacheFormat {
        /// The cache file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A report could not be serialized.
    #[error("could not serialize the {what}: {source}")]
    Serialize {
        /// What was being serialized.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A candle operation failed while measuring GEMM throughput.
    #[error("GEMM probe for {dtype} on {device} failed: {source}")]
    Gemm {
        /// The data type being measured.
        dtype: &'static str,
        /// The device being measured (`cpu`, `cuda:0`).
        device: String,
        /// The underlying error.
        #[source]
        source: candle_core::Error,
    },
    /// A probe limit is out of its allowed range.
    #[error("probe limit `{name}` = {value} is invalid: {allowed}")]
    InvalidLimit {
        /// The limit's name.
        name: &'static str,
        /// The value given, rendered.
        value: String,
        /// What is allowed.
        allowed: &'static str,
    },
    /// A path given to a probe is not a directory.
    #[error("{path} is not a directory (the storage probe writes a temporary file inside it)")]
    NotADirectory {
        /// The path given.
        path: PathBuf,
    },
    /// A probe could not complete even one measurement inside its time budget.
    #[error("{what} probe made no complete measurement within {budget_ms} ms")]
    ProbeTooSlow {
        /// The probe.
        what: &'static str,
        /// The budget, in milliseconds.
        budget_ms: u128,
    },
    /// A feature needed for this call is not compiled in.
    #[error("{what} needs the `{feature}` feature of eg-hardware")]
    FeatureDisabled {
        /// What was asked for.
        what: &'static str,
        /// The cargo feature that enables it.
        feature: &'static str,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
