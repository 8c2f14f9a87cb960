//! # eg-monitor
//!
//! Observability for Elastic-Guardian runs.
//!
//! ## Brief overview
//!
//! Library crates only emit `tracing` events and spans; this crate decides where they go.
//! [`logging::init`] installs one subscriber with two outputs at once:
//!
//! - a human console (stderr), coloured on a terminal, showing span durations when a span
//!   closes;
//! - a JSON-lines file (one event per line, with its span context), for tools.
//!
//! Levels are set per module with a `RUST_LOG`-style filter (`info,eg_kernel=debug`); the `eg`
//! binary takes it from `EG_LOG`, else from `monitor.log`.
//!
//! Metrics, the watchdog, TensorBoard/Prometheus/W&B sinks and crash bundles are planned
//! (see `ARCHITECTURE.md`); they are not built yet.
//!
//! ## Example
//!
//! ```no_run
//! use eg_monitor::logging::{self, ColorMode, LogSettings};
//!
//! let _guard = logging::init(&LogSettings {
//!     filter: "info,eg_kernel=debug".into(),
//!     color: ColorMode::Auto,
//!     json_file: Some("runs/a/logs/eg.jsonl".into()),
//!     span_durations: true,
//! })?;
//! tracing::info!(step = 1, loss = 2.5, "step done");
//! # Ok::<(), eg_monitor::Error>(())
//! ```

pub mod logging;

use std::path::PathBuf;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The log filter does not parse.
    #[error(
        "invalid log filter {filter:?}: {reason}; expected RUST_LOG syntax such as `info,eg_kernel=debug`"
    )]
    LogFilter {
        /// The filter as given.
        filter: String,
        /// The parser's reason.
        reason: String,
    },
    /// The JSON log file cannot be created.
    #[error("cannot open log file {path}: {source}")]
    LogFile {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A global subscriber is already installed in this process.
    #[error("logging is already initialised in this process")]
    AlreadyInitialized,
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
