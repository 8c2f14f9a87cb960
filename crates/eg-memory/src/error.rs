//! The error type of this crate.

use std::fmt;
use std::path::PathBuf;

use eg_config::Bytes;
use serde::{Deserialize, Serialize};

use crate::HumanBytes;

/// Something that would make a run fit that does not fit now, with the peak it would have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
#[non_exhaustive]
pub enum Suggestion {
    /// Turn on activation checkpointing (`memory.activation_checkpointing = "on"`).
    Checkpointing {
        /// Predicted peak with it.
        peak: Bytes,
    },
    /// Keep optimizer state in memory-mapped files (`memory.offload = "disk"`).
    Offload {
        /// Predicted peak with it.
        peak: Bytes,
    },
    /// Train LoRA adapters on a frozen base (`[model.lora]`).
    Lora {
        /// Adapter rank assumed for the prediction.
        rank: u32,
        /// Whether it also needs activation checkpointing (configured off).
        with_checkpointing: bool,
        /// Predicted peak with it.
        peak: Bytes,
    },
    /// LoRA on an NF4-quantized frozen base (`model.quantization = "nf4"`).
    Qlora {
        /// Adapter rank assumed for the prediction.
        rank: u32,
        /// Whether it also needs activation checkpointing (configured off).
        with_checkpointing: bool,
        /// Predicted peak with it.
        peak: Bytes,
    },
    /// Shorter sequences (`data.seq_len`), keeping the global batch in tokens when it divides.
    ShorterSequences {
        /// The longest sequence length (a power-of-two fraction of the current one) that fits.
        seq_len: u32,
        /// Whether it also needs activation checkpointing (configured off).
        with_checkpointing: bool,
        /// Predicted peak with it.
        peak: Bytes,
    },
    /// A bigger budget (`memory.budget_fraction`, `memory.limit`, `memory.reserve`, or a
    /// machine/cgroup with more memory).
    MoreMemory {
        /// How much more the smallest strategy needs.
        by: Bytes,
    },
}

impl fmt::Display for Suggestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Suggestion::Checkpointing { peak } => write!(
                f,
                "activation checkpointing (memory.activation_checkpointing=on): peak {}",
                HumanBytes::from(*peak)
            ),
            Suggestion::Offload { peak } => write!(
                f,
                "optimizer offload to disk (memory.offload=disk): peak {}",
                HumanBytes::from(*peak)
            ),
            Suggestion::Lora {
                rank,
                with_checkpointing,
                peak,
            } => write!(
                f,
                "LoRA rank {rank} on a frozen base ([model.lora]){}: peak {}",
                Also(*with_checkpointing),
                HumanBytes::from(*peak)
            ),
            Suggestion::Qlora {
                rank,
                with_checkpointing,
                peak,
            } => write!(
                f,
                "QLoRA: LoRA rank {rank} on an NF4 base (model.quantization=nf4){}: peak {}",
                Also(*with_checkpointing),
                HumanBytes::from(*peak)
            ),
            Suggestion::ShorterSequences {
                seq_len,
                with_checkpointing,
                peak,
            } => write!(
                f,
                "shorter sequences (data.seq_len={seq_len}){}: peak {}",
                Also(*with_checkpointing),
                HumanBytes::from(*peak)
            ),
            Suggestion::MoreMemory { by } => write!(
                f,
                "{} more memory (memory.budget_fraction, memory.limit, memory.reserve, or a bigger machine/cgroup)",
                HumanBytes::from(*by)
            ),
        }
    }
}

/// ` with activation checkpointing` when a suggestion needs it too.
struct Also(bool);

impl fmt::Display for Also {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 {
            f.write_str(" with activation checkpointing")
        } else {
            Ok(())
        }
    }
}

/// Renders suggestions as `; would help: a; b` (or nothing).
struct SuggestionList<'a>(&'a [Suggestion]);

impl fmt::Display for SuggestionList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i == 0 {
                f.write_str("; would help: ")?;
            } else {
                f.write_str("; or ")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No strategy fits the memory budget.
    #[error(
        "the run does not fit: the smallest strategy ({smallest}) needs {} but the budget is {} (short by {}){}",
        HumanBytes::from(*needed),
        HumanBytes::from(*budget),
        HumanBytes::from(*short),
        SuggestionList(suggestions)
    )]
    DoesNotFit {
        /// Predicted peak of the smallest strategy.
        needed: Bytes,
        /// The usable budget.
        budget: Bytes,
        /// `needed - budget`.
        short: Bytes,
        /// The smallest strategy, described.
        smallest: String,
        /// What would make it fit, each with its predicted peak.
        suggestions: Vec<Suggestion>,
    },
    /// The memory budget cannot be computed.
    #[error("the memory budget is unknown: {reason}; set memory.limit to give one explicitly")]
    BudgetUnknown {
        /// Why.
        reason: String,
    },
    /// The reserve leaves nothing to plan with.
    #[error(
        "memory.reserve ({reserve}) is not smaller than the budget before the reserve ({budget})"
    )]
    ReserveTooLarge {
        /// The reserve.
        reserve: Bytes,
        /// The budget it is taken from.
        budget: Bytes,
    },
    /// The global batch cannot be cut into whole sequences or micro-batches.
    #[error(
        "invalid batch: global batch of {global_tokens} tokens with seq_len {seq_len}: {reason}"
    )]
    InvalidBatch {
        /// Tokens per optimizer step.
        global_tokens: u64,
        /// Tokens per sequence.
        seq_len: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// A model profile or training set-up is inconsistent.
    #[error("invalid {what}: {field} {reason}")]
    Invalid {
        /// Which input (`model profile`, `setup`, `thresholds`, ...).
        what: &'static str,
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A system file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file (as seen under the root).
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A system file has an unexpected format.
    #[error("cannot parse {}: {reason} (found {found:?})", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was expected.
        reason: &'static str,
        /// The text that did not parse (shortened).
        found: String,
    },
    /// An optimizer-state offload file or directory could not be created, mapped, written
    /// or removed.
    #[error("optimizer-state offload: cannot {action} {}: {source}", path.display())]
    Offload {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The offload directory's disk cannot hold the optimizer state.
    #[error(
        "optimizer-state offload: no space for {}: {} needed (including the free-space margin), {} available; free space or point memory.offload_dir at a bigger disk",
        path.display(),
        HumanBytes(*needed),
        HumanBytes(*available)
    )]
    OffloadNoSpace {
        /// The file that could not be allocated.
        path: PathBuf,
        /// Bytes needed.
        needed: u64,
        /// Bytes free.
        available: u64,
    },
    /// A setting needs a cargo feature this build does not have.
    #[error("{what} needs the `{feature}` feature; rebuild with `--features {feature}`")]
    FeatureDisabled {
        /// The setting.
        what: &'static str,
        /// The feature.
        feature: &'static str,
    },
    /// Something that is not built yet.
    #[error("{what} is not supported yet (issue #{issue})")]
    Unsupported {
        /// What.
        what: &'static str,
        /// The issue that tracks it.
        issue: u32,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
