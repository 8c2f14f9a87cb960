//! # eg-config
//!
//! Typed configuration for every layer of Elastic-Guardian, loaded from layered sources and
//! validated before anything runs.
//!
//! ## Brief overview
//!
//! A configuration is built in two stages:
//!
//! 1. **Wire** ([`WireConfig`]): what files, `EG_` environment variables and `--set` overrides
//!    deserialize into. Plain values, a default for every key, unknown keys rejected.
//! 2. **Validated** ([`Config`]): enums and unit newtypes ([`Steps`], [`Tokens`], [`Bytes`],
//!    [`SeqLen`], [`Ratio`]); every range and every contradiction between sections checked,
//!    all errors reported at once.
//!
//! Layers, lowest precedence first (figment merges them):
//! built-in defaults < files (TOML, YAML or JSON by extension; a file may `extends` base
//! files) < `EG_SECTION__KEY` environment variables < `--set key.path=value` overrides.
//!
//! Every error names the key path, where its value came from (file and line, environment
//! variable, `--set` argument or default) and what is allowed; unknown keys come with a
//! "did you mean". No input makes the loader panic: empty files, binary junk, deep nesting,
//! huge numbers, NaN and wrong encodings are all typed errors.
//!
//! This is the only crate of the workspace that reads environment variables ([`mod@env`]).
//!
//! ## Example
//!
//! ```
//! use eg_config::{Sources, Steps};
//!
//! let config = Sources::new()
//!     .set("train.max_steps=30")
//!     .set("train.optimizer.lr=3e-4")
//!     .load()?;
//! assert_eq!(config.train.max_steps, Steps(30));
//! assert_eq!(config.train.optimizer.lr(), 3e-4);
//!
//! let err = Sources::new().set("train.optimizer.lrr=1").load().unwrap_err();
//! assert!(err.to_string().contains("did you mean `lr`?"));
//! # Ok::<(), eg_config::Error>(())
//! ```

pub mod env;
mod error;
mod loader;
mod locate;
mod reference;
mod units;
mod validate;
pub mod wire;

pub use error::{Error, Located, Origin};
pub use loader::{
    ENV_PREFIX, ENV_SEPARATOR, Entry, MAX_EXTENDS_DEPTH, MAX_FILE_BYTES, Resolved, Sources,
};
pub use reference::reference_markdown;
pub use units::{ByteSize, ByteSizeError, Bytes, Ratio, SeqLen, Steps, Tokens};
pub use validate::{
    Augmentation, BatchConfig, CheckpointsConfig, ClassificationConfig, Config, DataConfig, Device,
    DistConfig, DpoConfig, EvalConfig, ExportConfig, GuardsConfig, HardwareConfig, LoraConfig,
    MemoryConfig, MixSource, ModelConfig, ModelSource, MonitorConfig, Offload, OptimizerConfig,
    PrecisionConfig, RunConfig, ScheduleConfig, SpikeConfig, TrainConfig, check_log_filter,
};
pub use wire::WireConfig;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The JSON Schema of configuration files, for editors and external tools.
pub fn json_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(WireConfig);
    serde_json::to_value(schema).unwrap_or(serde_json::Value::Null)
}
