//! Stage two: the validated, typed configuration.
//!
//! [`validate`] checks every value (ranges, NaN, syntax of addresses and devices) and every
//! contradiction between sections, collecting all errors rather than stopping at the first.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Located};
use crate::loader::Resolved;
use crate::units::{ByteSize, Bytes, Ratio, SeqLen, Steps, Tokens};
use crate::wire::*;

/// The device to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub enum Device {
    /// The best available device (a GPU when one is usable, else the CPU).
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device with this ordinal.
    Cuda(u32),
}

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub enum ModelSource {
    /// A model defined in code (`builtin:NAME`), needing no files.
    Builtin(String),
    /// A registry entry (`name@version`).
    Registry {
        /// Name.
        name: String,
        /// Version.
        version: String,
    },
    /// A Hugging Face directory or hub-cache snapshot.
    Dir(PathBuf),
}

/// `[run]`, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RunConfig {
    /// Name of the run.
    pub name: String,
    /// Run directory.
    pub dir: PathBuf,
    /// Seed.
    pub seed: u64,
    /// Resume policy.
    pub resume: ResumeMode,
}

/// `[hardware]`, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HardwareConfig {
    /// Device.
    pub device: Device,
    /// Compute threads; `None` means one per physical core.
    pub threads: Option<NonZeroU32>,
    /// Measure bandwidth and GEMM throughput at start.
    pub probe: bool,
    /// Apply the process speed settings at start (allocator, thread-pool spinning).
    pub tune_process: bool,
}

/// Where optimizer state lives, validated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub enum Offload {
    /// Next to the model.
    None,
    /// Host RAM.
    Ram,
    /// Memory-mapped files in this directory.
    Disk(PathBuf),
}

/// `[memory]`, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MemoryConfig {
    /// Fraction of the effective memory the run may use.
    pub budget_fraction: Ratio,
    /// Absolute cap.
    pub limit: Option<Bytes>,
    /// Reserve for emergency checkpoints.
    pub reserve: Bytes,
    /// Activation checkpointing.
    pub activation_checkpointing: Toggle,
    /// Optimizer-state offload.
    pub offload: Offload,
    /// Adapt under memory pressure.
    pub guard: bool,
}

/// `[data]`, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DataConfig {
    /// Kind of source.
    pub source: DataSource,
    /// Files, directories or globs (empty for `embedded`).
    pub paths: Vec<String>,
    /// JSONL field path, split at dots.
    pub field: Vec<String>,
    /// Tokenizer file.
    pub tokenizer: Option<PathBuf>,
    /// Tokens per sequence.
    pub seq_len: SeqLen,
    /// Packing.
    pub packing: Packing,
    /// Shuffle each epoch.
    pub shuffle: bool,
    /// Held-out fraction, below 1.
    pub eval_fraction: Ratio,
    /// Tolerated fraction of bad records.
    pub max_error_fraction: Ratio,
    /// Batches prepared ahead on a background thread; 0 loads each batch when needed.
    pub prefetch: usize,
    /// Directory of tokenized shards.
    pub cache_dir: PathBuf,
    /// Sampling weight of the main source among `mix`.
    pub weight: f64,
    /// Augmentations of the main source, in order.
    pub augment: Vec<Augmentation>,
    /// Further sources mixed in by weight.
    pub mix: Vec<MixSource>,
}

/// One augmentation, validated (`[[data.augment]]`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Augmentation {
    /// Which augmentation.
    pub kind: AugmentKind,
    /// Probability per token, fraction of tokens or probability per segment (by kind).
    pub probability: Ratio,
    /// Mean span length (span corruption), at least 1.
    pub mean_span: usize,
    /// Replacement token; `None` means the padding (or EOS) id.
    pub token: Option<u32>,
}

/// A further data source, validated (`[[data.mix]]`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MixSource {
    /// Kind of source: text, jsonl or tokens.
    pub source: DataSource,
    /// Files, directories or globs (at least one).
    pub paths: Vec<String>,
    /// JSONL field path, split at dots.
    pub field: Vec<String>,
    /// Sampling weight, finite and non-negative.
    pub weight: f64,
    /// Augmentations of this source, in order.
    pub augment: Vec<Augmentation>,
}

/// `[model.lora]`, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoraConfig {
    /// Rank.
    pub rank: NonZeroU32,
    /// Alpha (finite, positive).
    pub alpha: f64,
    /// Dropout, below 1.
    pub dropout: Ratio,
    /// Target layer names.
    pub targets: Vec<String>,
    /// rsLoRA scaling.
    pub rslora: bool,
}

/// `[model]`, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    /// Source.
    pub source: ModelSource,
    /// Weight dtype.
    pub dtype: DType,
    /// LoRA.
    pub lora: Option<LoraConfig>,
    /// Base quantization.
    pub quantization: BaseQuant,
    /// Attention implementation.
    pub attention: Attention,
    /// Registry directory for `name@version` sources (`None`: the per-user default, see
    /// [`crate::env::default_registry_dir`]).
    pub registry: Option<PathBuf>,
}

/// The optimizer and its hyper-parameters, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub enum OptimizerConfig {
    /// AdamW.
    AdamW {
        /// Peak learning rate.
        lr: f64,
        /// (beta1, beta2).
        betas: (f64, f64),
        /// Epsilon.
        eps: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
    },
    /// SGD with momentum.
    Sgd {
        /// Peak learning rate.
        lr: f64,
        /// Momentum.
        momentum: f64,
        /// Weight decay.
        weight_decay: f64,
    },
    /// Lion.
    Lion {
        /// Peak learning rate.
        lr: f64,
        /// (beta1, beta2).
        betas: (f64, f64),
        /// Decoupled weight decay.
        weight_decay: f64,
    },
}

impl OptimizerConfig {
    /// The peak learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            OptimizerConfig::AdamW { lr, .. }
            | OptimizerConfig::Sgd { lr, .. }
            | OptimizerConfig::Lion { lr, .. } => *lr,
        }
    }
}

/// `[train.schedule]`, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ScheduleConfig {
    /// Shape.
    pub kind: ScheduleKind,
    /// Warmup.
    pub warmup: Steps,
    /// Final LR fraction.
    pub min_lr_ratio: Ratio,
    /// WSD decay fraction.
    pub decay_fraction: Ratio,
}

/// `[train.batch]`, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BatchConfig {
    /// Tokens per optimizer step.
    pub global_tokens: Tokens,
    /// Fixed micro-batch; `None` lets the planner choose.
    pub micro_batch: Option<NonZeroU32>,
}

/// `[train.precision]`, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PrecisionConfig {
    /// Compute precision.
    pub compute: Precision,
    /// Loss scaling.
    pub loss_scale: LossScale,
    /// Initial dynamic scale.
    pub initial_scale: f64,
}

/// Loss-spike detection settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SpikeConfig {
    /// Window in steps.
    pub window: u32,
    /// Robust z-score threshold.
    pub zscore: f64,
}

/// `[train.guards]`, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GuardsConfig {
    /// Global-norm clipping threshold.
    pub clip_norm: Option<f64>,
    /// Gradient-coverage check at the first step.
    pub coverage_check: bool,
    /// Non-finite steps skipped before rollback.
    pub nan_skip_limit: u32,
    /// Spike detection; `None` disables it.
    pub spike: Option<SpikeConfig>,
    /// LR multiplier after a rollback, in (0, 1].
    pub lr_backoff: Ratio,
}

/// `[train.checkpoints]`, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CheckpointsConfig {
    /// Directory.
    pub dir: PathBuf,
    /// Interval.
    pub every: Steps,
    /// Newest kept.
    pub keep_last: u32,
    /// Best kept.
    pub keep_best: u32,
    /// Background writes.
    pub background: bool,
    /// O_DIRECT writes of the large files.
    pub direct_io: bool,
}

/// `[train.eval]`, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EvalConfig {
    /// Interval.
    pub every: Steps,
    /// Batches per evaluation.
    pub max_batches: u32,
    /// Early-stopping patience in evaluations.
    pub early_stopping_patience: Option<NonZeroU32>,
}

/// `[train.classification]`, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClassificationConfig {
    /// Classification or embedding.
    pub objective: EncoderObjective,
    /// Number of classes, or `None` to take it from the data.
    pub num_labels: Option<u32>,
    /// Pooling before the classifier.
    pub pooling: Pooling,
    /// JSON field of the label (dotted path).
    pub label_field: String,
    /// JSON field of the positive text (dotted path).
    pub positive_field: String,
    /// Classifier dropout, in [0, 1).
    pub dropout: Ratio,
    /// Similarity scale of the embedding loss.
    pub scale: f64,
}

/// `[train.dpo]`, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DpoConfig {
    /// Temperature β, > 0.
    pub beta: f64,
    /// JSON field of the prompt.
    pub prompt_field: String,
    /// JSON field of the chosen response.
    pub chosen_field: String,
    /// JSON field of the rejected response.
    pub rejected_field: String,
}

/// `[train]`, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrainConfig {
    /// Objective.
    pub mode: Mode,
    /// Steps to run.
    pub max_steps: Steps,
    /// Optimizer.
    pub optimizer: OptimizerConfig,
    /// Schedule.
    pub schedule: ScheduleConfig,
    /// Batch.
    pub batch: BatchConfig,
    /// Precision.
    pub precision: PrecisionConfig,
    /// Guards.
    pub guards: GuardsConfig,
    /// Checkpoints.
    pub checkpoints: CheckpointsConfig,
    /// Evaluation.
    pub eval: EvalConfig,
    /// Classification and embedding settings.
    pub classification: ClassificationConfig,
    /// DPO settings.
    pub dpo: DpoConfig,
}

/// `[dist]`, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DistConfig {
    /// Backend.
    pub backend: Backend,
    /// Parallelism.
    pub parallelism: Parallelism,
    /// Collective timeout.
    pub timeout: Duration,
    /// Elastic restarts allowed.
    pub max_restarts: u32,
}

/// `[monitor]`, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MonitorConfig {
    /// Log filter (RUST_LOG syntax).
    pub log: String,
    /// Console colour.
    pub color: Color,
    /// JSON-lines log file.
    pub json_log: Option<PathBuf>,
    /// Metrics interval.
    pub metrics_every: Steps,
    /// Prometheus listen address.
    pub prometheus: Option<SocketAddr>,
    /// TensorBoard directory.
    pub tensorboard: Option<PathBuf>,
    /// Stall threshold.
    pub stall: Duration,
}

/// `[export]`, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ExportConfig {
    /// Format.
    pub format: ExportFormat,
    /// Quantization.
    pub quantization: ExportQuant,
    /// Merge LoRA before export.
    pub merge_lora: bool,
    /// Output directory.
    pub dir: PathBuf,
    /// Validate by reloading.
    pub validate: bool,
}

/// The validated configuration of a run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Config {
    /// Run.
    pub run: RunConfig,
    /// Hardware.
    pub hardware: HardwareConfig,
    /// Memory.
    pub memory: MemoryConfig,
    /// Data.
    pub data: DataConfig,
    /// Model.
    pub model: ModelConfig,
    /// Training loop.
    pub train: TrainConfig,
    /// Distributed training.
    pub dist: DistConfig,
    /// Monitoring.
    pub monitor: MonitorConfig,
    /// Export.
    pub export: ExportConfig,
    /// The resolved wire form, kept so checkpoints can store exactly what ran.
    #[serde(skip)]
    pub wire: WireConfig,
}

impl Config {
    /// The built-in defaults, validated (what `eg train` with no arguments runs).
    pub fn defaults() -> Result<Config, Error> {
        crate::Sources::new().load()
    }

    /// The resolved configuration as TOML (stored in checkpoints; loads back to the same
    /// config).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string_pretty(&self.wire)
    }
}

/// Validates a list of augmentations at `key` (`data.augment`, `data.mix.N.augment`).
fn augmentations(c: &mut Checker<'_>, key: &str, list: &[AugmentWire]) -> Vec<Augmentation> {
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            let k = format!("{key}.{i}");
            Augmentation {
                kind: a.kind,
                probability: c.ratio(&format!("{k}.probability"), a.probability, false, false),
                mean_span: c.int(&format!("{k}.mean_span"), a.mean_span, 1, 65_536) as usize,
                token: a
                    .token
                    .map(|t| c.u32(&format!("{k}.token"), t, 0, u32::MAX)),
            }
        })
        .collect()
}

/// Collects errors with their origins while building the typed config.
struct Checker<'a> {
    r: &'a Resolved,
    errors: Vec<Error>,
}

const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

impl Checker<'_> {
    fn at(&self, key: &str) -> Located {
        self.r.located(key)
    }

    fn range_err(&mut self, key: &str, found: impl std::fmt::Display, allowed: &str) {
        let at = self.at(key);
        self.errors.push(Error::OutOfRange {
            at,
            found: found.to_string(),
            allowed: allowed.to_string(),
        });
    }

    fn invalid(&mut self, key: &str, found: impl std::fmt::Debug, allowed: &str) {
        let at = self.at(key);
        self.errors.push(Error::InvalidValue {
            at,
            found: format!("{found:?}"),
            allowed: allowed.to_string(),
            suggestion: None,
        });
    }

    fn conflict(&mut self, first: &str, second: &str, why: &'static str) {
        let (first, second) = (self.at(first), self.at(second));
        self.errors.push(Error::Conflict { first, second, why });
    }

    fn missing(&mut self, key: &str, trigger: &str, why: &'static str) {
        let origin = self.r.origin(trigger);
        self.errors.push(Error::Missing {
            at: Located {
                key: key.into(),
                origin,
            },
            why,
        });
    }

    /// An integer in `lo..=hi`.
    fn int(&mut self, key: &str, v: u64, lo: u64, hi: u64) -> u64 {
        if v < lo || v > hi {
            self.range_err(key, v, &format!("an integer from {lo} to {hi}"));
            return lo;
        }
        v
    }

    fn u32(&mut self, key: &str, v: u64, lo: u32, hi: u32) -> u32 {
        u32::try_from(self.int(key, v, lo.into(), hi.into())).unwrap_or(lo)
    }

    fn nonzero_u32(&mut self, key: &str, v: u64, hi: u32) -> NonZeroU32 {
        NonZeroU32::new(self.u32(key, v, 1, hi)).unwrap_or(NonZeroU32::MIN)
    }

    /// A finite float in `(lo, hi]` when `open_lo`, else `[lo, hi]`; `hi_open` excludes `hi`.
    fn float(&mut self, key: &str, v: f64, lo: f64, hi: f64, lo_open: bool, hi_open: bool) -> f64 {
        let ok = v.is_finite()
            && if lo_open { v > lo } else { v >= lo }
            && if hi_open { v < hi } else { v <= hi };
        if !ok {
            let allowed = format!(
                "a finite number {}{lo}, {hi}{}",
                if lo_open { "in (" } else { "in [" },
                if hi_open { ")" } else { "]" }
            );
            self.range_err(key, fmt_float(v), &allowed);
            return if lo_open { hi.min(1.0) } else { lo };
        }
        v
    }

    fn ratio(&mut self, key: &str, v: f64, lo_open: bool, hi_open: bool) -> Ratio {
        let f = self.float(key, v, 0.0, 1.0, lo_open, hi_open);
        Ratio::saturating(f)
    }

    fn bytes(&mut self, key: &str, v: &ByteSize) -> Bytes {
        match v {
            ByteSize::Count(n) => Bytes(*n),
            ByteSize::Text(s) => match Bytes::parse(s) {
                Ok(b) => b,
                Err(_) => {
                    self.invalid(key, s, Bytes::UNITS);
                    Bytes(0)
                }
            },
        }
    }

    fn non_empty(&mut self, key: &str, v: &str) {
        if v.trim().is_empty() {
            self.invalid(key, v, "a non-empty string");
        }
    }

    fn path(&mut self, key: &str, v: &str) -> PathBuf {
        self.non_empty(key, v);
        PathBuf::from(v)
    }
}

fn fmt_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf".into() } else { "-inf".into() }
    } else {
        v.to_string()
    }
}

fn parse_device(s: &str) -> Option<Device> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Some(Device::Auto),
        "cpu" => Some(Device::Cpu),
        "cuda" | "gpu" => Some(Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda),
    }
}

fn parse_model_source(s: &str) -> Option<ModelSource> {
    let s = s.trim();
    if let Some(name) = s.strip_prefix("builtin:") {
        return (!name.is_empty()).then(|| ModelSource::Builtin(name.to_string()));
    }
    if s.is_empty() {
        return None;
    }
    let looks_like_path = s.contains('/') || s.contains('\\') || s.starts_with('.');
    if !looks_like_path && let Some((name, version)) = s.split_once('@') {
        if name.is_empty() || version.is_empty() {
            return None;
        }
        return Some(ModelSource::Registry {
            name: name.into(),
            version: version.into(),
        });
    }
    Some(ModelSource::Dir(PathBuf::from(s)))
}

/// Checks `RUST_LOG`-style filter syntax: `level` or `target=level`, comma separated.
pub fn check_log_filter(s: &str) -> bool {
    s.split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .all(|d| {
            let level = d.rsplit_once('=').map_or(d, |(target, level)| {
                if target.is_empty()
                    || !target
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_:-".contains(c))
                {
                    return "";
                }
                level
            });
            LEVELS.contains(&level.to_ascii_lowercase().as_str())
                || (d
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_:-".contains(c))
                    && !d.contains('='))
        })
}

/// Builds the typed configuration, collecting every error.
pub(crate) fn validate(w: WireConfig, r: &Resolved) -> Result<Config, Error> {
    let mut c = Checker {
        r,
        errors: Vec::new(),
    };

    // run
    c.non_empty("run.name", &w.run.name);
    let run = RunConfig {
        name: w.run.name.clone(),
        dir: c.path("run.dir", &w.run.dir),
        seed: w.run.seed,
        resume: w.run.resume,
    };

    // hardware
    let device = parse_device(&w.hardware.device).unwrap_or_else(|| {
        c.invalid(
            "hardware.device",
            &w.hardware.device,
            "auto, cpu, cuda or cuda:N",
        );
        Device::Auto
    });
    let threads = w
        .hardware
        .threads
        .map(|t| c.nonzero_u32("hardware.threads", t, 4096));
    let hardware = HardwareConfig {
        device,
        threads,
        probe: w.hardware.probe,
        tune_process: w.hardware.tune_process,
    };

    // memory
    let m = &w.memory;
    let budget_fraction = c.ratio("memory.budget_fraction", m.budget_fraction, true, false);
    let limit = m.limit.as_ref().map(|b| c.bytes("memory.limit", b));
    let reserve = c.bytes("memory.reserve", &m.reserve);
    if let Some(l) = limit
        && l.0 > 0
        && reserve >= l
    {
        c.conflict(
            "memory.reserve",
            "memory.limit",
            "the reserve must be smaller than the memory limit",
        );
    }
    let offload = match (m.offload, &m.offload_dir) {
        (OffloadTarget::Disk, Some(d)) => Offload::Disk(c.path("memory.offload_dir", d)),
        (OffloadTarget::Disk, None) => {
            c.missing(
                "memory.offload_dir",
                "memory.offload",
                "memory.offload = \"disk\" needs a directory on fast local disk",
            );
            Offload::None
        }
        (other, Some(_)) => {
            c.conflict(
                "memory.offload_dir",
                "memory.offload",
                "an offload directory is only used with memory.offload = \"disk\"; remove it or set offload to disk",
            );
            if other == OffloadTarget::Ram {
                Offload::Ram
            } else {
                Offload::None
            }
        }
        (OffloadTarget::Ram, None) => Offload::Ram,
        (_, None) => Offload::None,
    };
    let memory = MemoryConfig {
        budget_fraction,
        limit,
        reserve,
        activation_checkpointing: m.activation_checkpointing,
        offload,
        guard: m.guard,
    };

    // data
    let d = &w.data;
    match d.source {
        DataSource::Embedded if !d.paths.is_empty() => c.conflict(
            "data.paths",
            "data.source",
            "the embedded corpus reads no files; set data.source to text, jsonl or tokens, or remove data.paths",
        ),
        DataSource::Text | DataSource::Jsonl | DataSource::Tokens if d.paths.is_empty() => {
            c.missing("data.paths", "data.source", "this data source reads files: list them in data.paths")
        }
        _ => {}
    }
    for (i, p) in d.paths.iter().enumerate() {
        c.non_empty(&format!("data.paths.{i}"), p);
    }
    let field: Vec<String> = d.field.split('.').map(str::to_string).collect();
    if field.iter().any(|f| f.trim().is_empty()) {
        c.invalid(
            "data.field",
            &d.field,
            "a field name or dotted path such as `text` or `doc.body`",
        );
    }
    let seq_len = SeqLen(c.u32("data.seq_len", d.seq_len, 1, 1 << 20));
    let eval_fraction = c.ratio("data.eval_fraction", d.eval_fraction, false, true);
    let max_error_fraction = c.ratio(
        "data.max_error_fraction",
        d.max_error_fraction,
        false,
        false,
    );
    let prefetch = c.int("data.prefetch", d.prefetch, 0, 1024) as usize;
    let cache_dir = match &d.cache_dir {
        Some(p) => c.path("data.cache_dir", p),
        None => run.dir.join("cache"),
    };
    let tokenizer = d.tokenizer.as_ref().map(|p| c.path("data.tokenizer", p));
    let weight = c.float("data.weight", d.weight, 0.0, 1e9, false, false);
    let augment = augmentations(&mut c, "data.augment", &d.augment);
    if !d.mix.is_empty() && d.source == DataSource::Embedded {
        c.conflict(
            "data.mix",
            "data.source",
            "mixed sources are tokenized like the main source, but the embedded corpus uses its own byte tokens; make the main source text, jsonl or tokens",
        );
    }
    let mut mix = Vec::new();
    for (i, m) in d.mix.iter().enumerate() {
        let key = format!("data.mix.{i}");
        if m.source == DataSource::Embedded {
            c.invalid(
                &format!("{key}.source"),
                m.source.name(),
                "text, jsonl or tokens (the embedded corpus can only be the main source)",
            );
        }
        if m.paths.is_empty() {
            c.invalid(
                &format!("{key}.paths"),
                &m.paths,
                "at least one file, directory or glob",
            );
        }
        for (j, p) in m.paths.iter().enumerate() {
            c.non_empty(&format!("{key}.paths.{j}"), p);
        }
        let field: Vec<String> = m.field.split('.').map(str::to_string).collect();
        if field.iter().any(|f| f.trim().is_empty()) {
            c.invalid(
                &format!("{key}.field"),
                &m.field,
                "a field name or dotted path such as `text` or `doc.body`",
            );
        }
        mix.push(MixSource {
            source: m.source,
            paths: m.paths.clone(),
            field,
            weight: c.float(&format!("{key}.weight"), m.weight, 0.0, 1e9, false, false),
            augment: augmentations(&mut c, &format!("{key}.augment"), &m.augment),
        });
    }
    if !mix.is_empty() && weight + mix.iter().map(|m| m.weight).sum::<f64>() <= 0.0 {
        c.invalid(
            "data.weight",
            weight,
            "weights that are not all zero (data.weight and each data.mix weight)",
        );
    }
    let data = DataConfig {
        source: d.source,
        paths: d.paths.clone(),
        field,
        tokenizer,
        seq_len,
        packing: d.packing,
        shuffle: d.shuffle,
        eval_fraction,
        max_error_fraction,
        prefetch,
        cache_dir,
        weight,
        augment,
        mix,
    };

    // model
    let mw = &w.model;
    let source = parse_model_source(&mw.source).unwrap_or_else(|| {
        c.invalid(
            "model.source",
            &mw.source,
            "builtin:NAME, a model directory, or name@version from the registry",
        );
        ModelSource::Builtin(String::new())
    });
    let lora = mw.lora.as_ref().map(|l| {
        let rank = c.nonzero_u32("model.lora.rank", l.rank, 65536);
        let alpha = c.float("model.lora.alpha", l.alpha, 0.0, 1e6, true, false);
        let dropout = c.ratio("model.lora.dropout", l.dropout, false, true);
        if l.targets.is_empty() {
            c.invalid("model.lora.targets", &l.targets, "a non-empty list of layer names such as [\"q_proj\", \"v_proj\"] or [\"all-linear\"]");
        }
        for (i, t) in l.targets.iter().enumerate() {
            c.non_empty(&format!("model.lora.targets.{i}"), t);
        }
        LoraConfig { rank, alpha, dropout, targets: l.targets.clone(), rslora: l.rslora }
    });
    if mw.quantization != BaseQuant::None && lora.is_none() {
        c.conflict(
            "model.quantization",
            "model.lora",
            "a quantized base is frozen, so there is nothing to train without LoRA adapters; add [model.lora] or set quantization = \"none\"",
        );
    }
    let registry = mw.registry.as_ref().map(|p| c.path("model.registry", p));
    let model = ModelConfig {
        source,
        dtype: mw.dtype,
        lora,
        quantization: mw.quantization,
        attention: mw.attention,
        registry,
    };

    // train
    let t = &w.train;
    let max_steps = Steps(c.int("train.max_steps", t.max_steps, 1, 1_000_000_000_000));
    let o = &t.optimizer;
    let lr = c.float("train.optimizer.lr", o.lr, 0.0, 10.0, true, false);
    let weight_decay = c.float(
        "train.optimizer.weight_decay",
        o.weight_decay,
        0.0,
        10.0,
        false,
        false,
    );
    let mut betas = || -> (f64, f64) {
        if o.betas.len() != 2 {
            c.invalid(
                "train.optimizer.betas",
                &o.betas,
                "two numbers [beta1, beta2], each in [0, 1)",
            );
            return (0.9, 0.999);
        }
        let b1 = c.float("train.optimizer.betas.0", o.betas[0], 0.0, 1.0, false, true);
        let b2 = c.float("train.optimizer.betas.1", o.betas[1], 0.0, 1.0, false, true);
        (b1, b2)
    };
    let optimizer = match o.kind {
        OptimizerKind::AdamW => {
            let betas = betas();
            let eps = c.float("train.optimizer.eps", o.eps, 0.0, 1.0, true, false);
            OptimizerConfig::AdamW {
                lr,
                betas,
                eps,
                weight_decay,
            }
        }
        OptimizerKind::Lion => OptimizerConfig::Lion {
            lr,
            betas: betas(),
            weight_decay,
        },
        OptimizerKind::Sgd => {
            let momentum = c.float(
                "train.optimizer.momentum",
                o.momentum,
                0.0,
                1.0,
                false,
                true,
            );
            OptimizerConfig::Sgd {
                lr,
                momentum,
                weight_decay,
            }
        }
    };
    let s = &t.schedule;
    let warmup = match s.warmup_steps {
        Some(w) if w > 0 && w >= max_steps.0 => {
            c.conflict(
                "train.schedule.warmup_steps",
                "train.max_steps",
                "warmup must end before the last step",
            );
            Steps(0)
        }
        Some(w) => Steps(w),
        None => Steps(max_steps.0 / 20),
    };
    let schedule = ScheduleConfig {
        kind: s.kind,
        warmup,
        min_lr_ratio: c.ratio("train.schedule.min_lr_ratio", s.min_lr_ratio, false, false),
        decay_fraction: c.ratio(
            "train.schedule.decay_fraction",
            s.decay_fraction,
            true,
            false,
        ),
    };
    let b = &t.batch;
    let global_tokens = Tokens(c.int("train.batch.global_tokens", b.global_tokens, 1, 1 << 40));
    if global_tokens.0 < u64::from(seq_len.0) {
        c.conflict(
            "train.batch.global_tokens",
            "data.seq_len",
            "a global batch must hold at least one whole sequence",
        );
    } else if !global_tokens.0.is_multiple_of(u64::from(seq_len.0)) {
        c.conflict(
            "train.batch.global_tokens",
            "data.seq_len",
            "the global batch must be a whole number of sequences (a multiple of data.seq_len)",
        );
    }
    let micro_batch = b
        .micro_batch
        .map(|m| c.nonzero_u32("train.batch.micro_batch", m, 65536));
    if let Some(mb) = micro_batch
        && global_tokens.0 >= u64::from(seq_len.0)
        && u64::from(mb.get()) * u64::from(seq_len.0) > global_tokens.0
    {
        c.conflict(
            "train.batch.micro_batch",
            "train.batch.global_tokens",
            "a micro-batch cannot hold more sequences than the global batch",
        );
    }
    let batch = BatchConfig {
        global_tokens,
        micro_batch,
    };
    let p = &t.precision;
    if p.compute == Precision::F16 && p.loss_scale == LossScale::None {
        c.conflict(
            "train.precision.loss_scale",
            "train.precision.compute",
            "f16 gradients underflow without loss scaling; use loss_scale = \"dynamic\" or compute = \"bf16\"",
        );
    }
    let precision = PrecisionConfig {
        compute: p.compute,
        loss_scale: p.loss_scale,
        initial_scale: c.float(
            "train.precision.initial_scale",
            p.initial_scale,
            1.0,
            16_777_216.0,
            false,
            false,
        ),
    };
    let g = &t.guards;
    let clip_norm = g
        .clip
        .then(|| c.float("train.guards.clip_norm", g.clip_norm, 0.0, 1e6, true, false));
    let nan_skip_limit = c.u32("train.guards.nan_skip_limit", g.nan_skip_limit, 1, 1000);
    let spike = g.spike_detection.then(|| SpikeConfig {
        window: c.u32("train.guards.spike_window", g.spike_window, 5, 100_000),
        zscore: c.float(
            "train.guards.spike_zscore",
            g.spike_zscore,
            0.0,
            1e6,
            true,
            false,
        ),
    });
    let guards = GuardsConfig {
        clip_norm,
        coverage_check: g.coverage_check,
        nan_skip_limit,
        spike,
        lr_backoff: c.ratio("train.guards.lr_backoff", g.lr_backoff, true, false),
    };
    let k = &t.checkpoints;
    let checkpoints = CheckpointsConfig {
        dir: match &k.dir {
            Some(p) => c.path("train.checkpoints.dir", p),
            None => run.dir.join("checkpoints"),
        },
        every: Steps(c.int("train.checkpoints.every", k.every, 1, 1_000_000_000_000)),
        keep_last: c.u32("train.checkpoints.keep_last", k.keep_last, 1, 1_000_000),
        keep_best: c.u32("train.checkpoints.keep_best", k.keep_best, 0, 1_000_000),
        background: k.background,
        direct_io: k.direct_io,
    };
    let e = &t.eval;
    let eval = EvalConfig {
        every: Steps(c.int("train.eval.every", e.every, 1, 1_000_000_000_000)),
        max_batches: c.u32("train.eval.max_batches", e.max_batches, 1, 1_000_000),
        early_stopping_patience: e
            .early_stopping_patience
            .map(|p| c.nonzero_u32("train.eval.early_stopping_patience", p, 1_000_000)),
    };
    if matches!(t.mode, Mode::Sft | Mode::Dpo | Mode::Classification)
        && d.source != DataSource::Jsonl
        && !(t.mode == Mode::Sft && d.source == DataSource::Tokens)
    {
        c.conflict(
            "train.mode",
            "data.source",
            "sft, dpo and classification read structured records: set data.source = \"jsonl\" (sft also reads chat data prepared with `eg data prepare`: \"tokens\")",
        );
    }
    let dw = &t.dpo;
    c.non_empty("train.dpo.prompt_field", &dw.prompt_field);
    c.non_empty("train.dpo.chosen_field", &dw.chosen_field);
    c.non_empty("train.dpo.rejected_field", &dw.rejected_field);
    let dpo = DpoConfig {
        beta: c.float("train.dpo.beta", dw.beta, 0.0, 1e3, true, false),
        prompt_field: dw.prompt_field.clone(),
        chosen_field: dw.chosen_field.clone(),
        rejected_field: dw.rejected_field.clone(),
    };
    if t.mode == Mode::Pretrain && d.packing == Packing::BestFit {
        c.conflict(
            "data.packing",
            "train.mode",
            "best-fit packing keeps documents whole for fine-tuning; pre-training uses packing = \"concat\"",
        );
    }
    let cl = &t.classification;
    c.non_empty("train.classification.label_field", &cl.label_field);
    c.non_empty("train.classification.positive_field", &cl.positive_field);
    let classification = ClassificationConfig {
        objective: cl.objective,
        num_labels: cl
            .num_labels
            .map(|n| c.u32("train.classification.num_labels", n, 2, 1_000_000)),
        pooling: cl.pooling,
        label_field: cl.label_field.clone(),
        positive_field: cl.positive_field.clone(),
        dropout: c.ratio("train.classification.dropout", cl.dropout, false, true),
        scale: c.float(
            "train.classification.scale",
            cl.scale,
            0.0,
            1e4,
            true,
            false,
        ),
    };
    let train = TrainConfig {
        mode: t.mode,
        max_steps,
        optimizer,
        schedule,
        batch,
        precision,
        guards,
        checkpoints,
        eval,
        classification,
        dpo,
    };

    // dist
    let ds = &w.dist;
    if ds.backend == Backend::Single && ds.parallelism != Parallelism::Single {
        c.conflict(
            "dist.parallelism",
            "dist.backend",
            "splitting work across processes needs a communication backend (auto, mpi or nccl)",
        );
    }
    if ds.backend == Backend::Nccl && device == Device::Cpu {
        c.conflict(
            "dist.backend",
            "hardware.device",
            "NCCL runs on CUDA devices; use backend = \"mpi\" on the CPU",
        );
    }
    let dist = DistConfig {
        backend: ds.backend,
        parallelism: ds.parallelism,
        timeout: Duration::from_secs(c.int("dist.timeout_secs", ds.timeout_secs, 1, 86_400)),
        max_restarts: c.u32("dist.max_restarts", ds.max_restarts, 0, 1000),
    };

    // monitor
    let mo = &w.monitor;
    if !check_log_filter(&mo.log) {
        c.invalid("monitor.log", &mo.log, "a RUST_LOG-style filter: a level (trace, debug, info, warn, error, off) or target=level items separated by commas");
    }
    let prometheus = mo
        .prometheus
        .as_ref()
        .and_then(|a| match a.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                c.invalid(
                    "monitor.prometheus",
                    a,
                    "a socket address such as 127.0.0.1:9184",
                );
                None
            }
        });
    let monitor = MonitorConfig {
        log: mo.log.clone(),
        color: mo.color,
        json_log: mo.json_log.then(|| run.dir.join("logs").join("eg.jsonl")),
        metrics_every: Steps(c.int("monitor.metrics_every", mo.metrics_every, 1, 1_000_000_000)),
        prometheus,
        tensorboard: mo.tensorboard.then(|| run.dir.join("tb")),
        stall: Duration::from_secs(c.int("monitor.stall_secs", mo.stall_secs, 1, 7 * 86_400)),
    };

    // export
    let x = &w.export;
    if x.quantization != ExportQuant::None && x.format != ExportFormat::Gguf {
        c.conflict("export.quantization", "export.format", "quantized export (q8_0, q4_0) is a GGUF feature; set format = \"gguf\" or quantization = \"none\"");
    }
    let export = ExportConfig {
        format: x.format,
        quantization: x.quantization,
        merge_lora: x.merge_lora,
        dir: match &x.dir {
            Some(p) => c.path("export.dir", p),
            None => run.dir.join("export"),
        },
        validate: x.validate,
    };

    Error::from_list(c.errors)?;
    Ok(Config {
        run,
        hardware,
        memory,
        data,
        model,
        train,
        dist,
        monitor,
        export,
        wire: w,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices() {
        assert_eq!(parse_device("cuda:3"), Some(Device::Cuda(3)));
        assert_eq!(parse_device("CPU"), Some(Device::Cpu));
        assert_eq!(parse_device("tpu"), None);
        assert_eq!(parse_device("cuda:x"), None);
    }

    #[test]
    fn model_sources() {
        assert_eq!(
            parse_model_source("builtin:tiny-llama"),
            Some(ModelSource::Builtin("tiny-llama".into()))
        );
        assert_eq!(parse_model_source("builtin:"), None);
        assert_eq!(
            parse_model_source("smollm@1.0"),
            Some(ModelSource::Registry {
                name: "smollm".into(),
                version: "1.0".into()
            })
        );
        assert_eq!(
            parse_model_source("./models/a@b"),
            Some(ModelSource::Dir("./models/a@b".into()))
        );
        assert_eq!(parse_model_source("@1"), None);
    }

    #[test]
    fn log_filters() {
        assert!(check_log_filter("info"));
        assert!(check_log_filter("info,eg_kernel=debug"));
        assert!(check_log_filter("eg_kernel"));
        assert!(!check_log_filter("info,eg_kernel=loud"));
        assert!(!check_log_filter("=debug"));
    }
}
