//! # eg-export
//!
//! Export to safetensors/Hugging Face directories, PyTorch, GGUF (INT8/INT4) and ONNX, validated by reloading.
//!
//! **Status:** this crate is a placeholder. Its design is written down in
//! `ARCHITECTURE.md`; the work that fills it is not scheduled in an issue yet. Nothing here pretends
//! to work: every entry point that exists returns [`Error::Unsupported`].

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
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
