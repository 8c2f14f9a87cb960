//! The wire format: what files, `EG_` variables and `--set` arguments are deserialized into.
//!
//! Stage one of two. Every struct here rejects unknown keys, has a default for every field and
//! keeps values plain (numbers, strings, lists) so it round-trips through TOML, YAML and JSON.
//! Validation turns a [`WireConfig`] into the typed [`crate::Config`].

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::ByteSize;

/// Declares a closed set of choices spelled in kebab-case, with its list of names.
macro_rules! choice {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)? } default $d:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
        #[cfg_attr(test, derive(proptest_derive::Arbitrary))]
        #[non_exhaustive]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $v,)+
        }
        impl $name {
            /// Every allowed spelling, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($s),+];
            /// The spelling used in config files.
            pub fn name(self) -> &'static str {
                match self { $($name::$v => $s,)+ }
            }
        }
        impl Default for $name { fn default() -> Self { $name::$d } }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

choice!(
    /// What to do with an existing run directory.
    ResumeMode { /// Resume from the newest valid checkpoint when there is one.
        Auto = "auto", /// Refuse to start when checkpoints exist.
        Never = "never", /// Fail when there is no checkpoint to resume from.
        Require = "require" } default Auto
);
choice!(
    /// Three-way switch where the system may decide.
    Toggle { /// Let the planner decide.
        Auto = "auto", /// Always on.
        On = "on", /// Always off.
        Off = "off" } default Auto
);
choice!(
    /// Where optimizer state lives.
    OffloadTarget { /// In memory next to the model.
        None = "none", /// In host RAM (when the model is on a GPU).
        Ram = "ram", /// In memory-mapped files on fast disk.
        Disk = "disk" } default None
);
choice!(
    /// Kind of training data source.
    DataSource { /// A corpus generated in code (no files, no download).
        Embedded = "embedded", /// Plain text files or directories.
        Text = "text", /// JSON lines with a text field or chat messages.
        Jsonl = "jsonl", /// Pre-tokenized memory-mapped token shards.
        Tokens = "tokens" } default Embedded
);
choice!(
    /// A seeded, deterministic token-level augmentation.
    AugmentKind { /// Replace each token with `token` with `probability`; replaced tokens leave the loss.
        TokenDropout = "token-dropout", /// Replace spans (mean length `mean_span`) covering about `probability` of the tokens with `token`.
        SpanCorruption = "span-corruption", /// With `probability` per segment, cut it at a uniform point and pad the rest with `token`.
        RandomTruncation = "random-truncation" } default TokenDropout
);
choice!(
    /// How samples are packed into sequences.
    Packing { /// Concatenate documents with EOS and cut into sequences (pre-training).
        Concat = "concat", /// Best-fit decreasing bin packing with document masks (fine-tuning).
        BestFit = "best-fit", /// One document per sequence, padded.
        None = "none" } default Concat
);
choice!(
    /// Floating-point type of stored weights or of compute.
    DType { /// 32-bit float.
        F32 = "f32", /// bfloat16.
        Bf16 = "bf16", /// IEEE half precision.
        F16 = "f16" } default F32
);
choice!(
    /// Quantization of a frozen base model (QLoRA).
    BaseQuant { /// Full-precision base.
        None = "none", /// 4-bit NormalFloat, block size 64.
        Nf4 = "nf4", /// 8-bit integer.
        Int8 = "int8" } default None
);
choice!(
    /// Attention implementation.
    Attention { /// Chosen by sequence length and device.
        Auto = "auto", /// The reference formulation.
        Reference = "reference", /// Chunked, memory-efficient (online softmax).
        Chunked = "chunked" } default Auto
);
choice!(
    /// Training objective.
    Mode { /// Causal language modelling on raw text.
        Pretrain = "pretrain", /// Supervised fine-tuning on chats; prompt tokens masked.
        Sft = "sft", /// Direct preference optimisation against a frozen reference.
        Dpo = "dpo", /// Sequence classification or embedding fine-tuning (encoders).
        Classification = "classification" } default Pretrain
);
choice!(
    /// What `train.mode = "classification"` trains (encoders such as BERT).
    EncoderObjective { /// A text and a label per record; cross entropy over the classes.
        Classification = "classification", /// (anchor, positive) text pairs; in-batch negatives (sentence-transformers' MultipleNegativesRankingLoss).
        Embedding = "embedding" } default Classification
);
choice!(
    /// How an encoder's token states become one vector for the classifier.
    Pooling { /// The first token (`[CLS]`) through BERT's pooler (Hugging Face's `BertForSequenceClassification`).
        Cls = "cls", /// The mean over the non-padding tokens (sentence-transformers' pooling).
        Mean = "mean" } default Mean
);
choice!(
    /// Optimizer.
    OptimizerKind { /// AdamW with decoupled weight decay.
        AdamW = "adamw", /// SGD with momentum.
        Sgd = "sgd", /// Lion (sign momentum).
        Lion = "lion" } default AdamW
);
choice!(
    /// Learning-rate schedule after warmup.
    ScheduleKind { /// Constant.
        Constant = "constant", /// Linear decay to `min_lr_ratio`.
        Linear = "linear", /// Cosine decay to `min_lr_ratio`.
        Cosine = "cosine", /// Warmup, stable, then decay over the last `decay_fraction`.
        Wsd = "wsd", /// Inverse square root of the step.
        InverseSqrt = "inverse-sqrt" } default Cosine
);
choice!(
    /// Compute precision.
    Precision { /// The fastest precision the hardware supports well.
        Auto = "auto", /// 32-bit float.
        F32 = "f32", /// bfloat16 compute with f32 master weights.
        Bf16 = "bf16", /// float16 compute with f32 master weights and loss scaling.
        F16 = "f16" } default Auto
);
choice!(
    /// Loss scaling for f16 training.
    LossScale { /// Dynamic: grow after stable steps, halve and skip on overflow.
        Dynamic = "dynamic", /// No loss scaling.
        None = "none" } default Dynamic
);
choice!(
    /// Communication backend.
    Backend { /// Chosen from the environment and the device.
        Auto = "auto", /// One process, no communication.
        Single = "single", /// MPI (CPU).
        Mpi = "mpi", /// NCCL (CUDA).
        Nccl = "nccl" } default Auto
);
choice!(
    /// How work is split across processes.
    Parallelism { /// One process.
        Single = "single", /// Data parallel, full replicas.
        Ddp = "ddp", /// Optimizer state sharded.
        Zero1 = "zero1", /// Optimizer state and gradients sharded.
        Zero2 = "zero2", /// Parameters, gradients and optimizer state sharded.
        Fsdp = "fsdp" } default Single
);
choice!(
    /// When console output uses colour.
    Color { /// On a terminal.
        Auto = "auto", /// Always.
        Always = "always", /// Never.
        Never = "never" } default Auto
);
choice!(
    /// Export format.
    ExportFormat { /// A Hugging Face directory (config.json, model.safetensors, tokenizer).
        Hf = "hf", /// A single safetensors file.
        Safetensors = "safetensors", /// A PyTorch `.bin` state dict.
        Pytorch = "pytorch", /// GGUF for llama.cpp.
        Gguf = "gguf", /// ONNX.
        Onnx = "onnx" } default Hf
);
choice!(
    /// Weight quantization on export (GGUF only).
    ExportQuant { /// Keep the training dtype.
        None = "none", /// 8-bit blocks (GGUF Q8_0).
        Q8_0 = "q8_0", /// 4-bit blocks (GGUF Q4_0).
        Q4_0 = "q4_0" } default None
);

/// One or several base files named by `extends`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Extends {
    /// One base file.
    One(String),
    /// Several base files, applied in order.
    Many(Vec<String>),
}

/// The whole configuration as written.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct WireConfig {
    /// Base file(s) this file builds on, relative to this file (resolved while loading).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extends: Option<Extends>,
    /// The run: name, directory, seed.
    pub run: RunWire,
    /// Device and threads.
    pub hardware: HardwareWire,
    /// Memory budget, checkpointing, offload.
    pub memory: MemoryWire,
    /// Training data.
    pub data: DataWire,
    /// The model to train.
    pub model: ModelWire,
    /// The training loop.
    pub train: TrainWire,
    /// Distributed training.
    pub dist: DistWire,
    /// Logging, metrics, watchdog.
    pub monitor: MonitorWire,
    /// Export after training.
    pub export: ExportWire,
}

/// `[run]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct RunWire {
    /// Name of the run, used in logs and metrics.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::text()"))]
    pub name: String,
    /// Run directory: checkpoints, logs and metrics go here.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::text()"))]
    pub dir: String,
    /// Seed for data order, initialisation and dropout.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::int()"))]
    pub seed: u64,
    /// What to do when the run directory already holds checkpoints.
    pub resume: ResumeMode,
}

impl Default for RunWire {
    fn default() -> Self {
        RunWire {
            name: "eg-run".into(),
            dir: "runs/eg-run".into(),
            seed: 42,
            resume: ResumeMode::Auto,
        }
    }
}

/// `[hardware]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct HardwareWire {
    /// `auto`, `cpu` or `cuda:N`.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::text()"))]
    pub device: String,
    /// Compute threads; unset means one per physical core.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(crate::wire::arb::int())")
    )]
    pub threads: Option<u64>,
    /// Measure disk bandwidth and GEMM throughput at start (cached per machine).
    pub probe: bool,
    /// Process speed settings at start: glibc's allocator keeps freed tensor buffers instead
    /// of unmapping them, candle's thread pool parks instead of spinning (your
    /// `MALLOC_*_`, `GLIBC_TUNABLES` and `CANDLE_BARRIER_POOL_SPIN_LIMIT` variables win);
    /// `false` keeps the libraries' defaults.
    pub tune_process: bool,
}

impl Default for HardwareWire {
    fn default() -> Self {
        HardwareWire {
            device: "auto".into(),
            threads: None,
            probe: false,
            tune_process: true,
        }
    }
}

/// `[memory]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct MemoryWire {
    /// Fraction of the effective memory (cgroup aware) the run may use, in (0, 1].
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub budget_fraction: f64,
    /// An absolute cap on top of the fraction, e.g. `"20GiB"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(crate::wire::arb::bytes())")
    )]
    pub limit: Option<ByteSize>,
    /// Memory kept free so an emergency checkpoint can always be written.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::bytes()"))]
    pub reserve: ByteSize,
    /// Activation checkpointing per transformer block.
    pub activation_checkpointing: Toggle,
    /// Where optimizer state lives.
    pub offload: OffloadTarget,
    /// Directory for disk offload (fast local disk).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(crate::wire::arb::text())")
    )]
    pub offload_dir: Option<String>,
    /// Plan the micro-batch against the memory budget at start and adapt micro-batch,
    /// checkpointing and offload under memory pressure; `false` plans and adapts nothing
    /// (`train.batch.micro_batch`, or micro-batches of up to 4096 tokens).
    pub guard: bool,
}

impl Default for MemoryWire {
    fn default() -> Self {
        MemoryWire {
            budget_fraction: 0.9,
            limit: None,
            reserve: ByteSize::Text("512MiB".into()),
            activation_checkpointing: Toggle::Auto,
            offload: OffloadTarget::None,
            offload_dir: None,
            guard: true,
        }
    }
}

/// `[data]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct DataWire {
    /// Kind of source.
    pub source: DataSource,
    /// Files, directories or globs.
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::collection::vec(crate::wire::arb::text(), 0..3)")
    )]
    pub paths: Vec<String>,
    /// JSONL field path holding the text (dotted for nested objects).
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::text()"))]
    pub field: String,
    /// `tokenizer.json` to use; unset means the model's own tokenizer.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(crate::wire::arb::text())")
    )]
    pub tokenizer: Option<String>,
    /// Tokens per training sequence.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::int()"))]
    pub seq_len: u64,
    /// How documents are packed into sequences.
    pub packing: Packing,
    /// Shuffle sample order each epoch (seeded by `run.seed`).
    pub shuffle: bool,
    /// Fraction of samples held out for evaluation, in [0, 1); in DPO mode, of the
    /// preference pairs (the last ones), evaluated for loss and reward accuracy.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub eval_fraction: f64,
    /// Fraction of bad records tolerated before the run stops.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub max_error_fraction: f64,
    /// Batches prepared ahead on a background thread; 0 loads each batch when it is needed.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::int()"))]
    pub prefetch: u64,
    /// Directory for tokenized shards; unset means `<run.dir>/cache`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(crate::wire::arb::text())")
    )]
    pub cache_dir: Option<String>,
    /// Sampling weight of this (the main) source when `[[data.mix]]` adds others.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub weight: f64,
    /// Augmentations applied, in order, to this source's samples.
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::arbitrary::any::<AugmentWire>(), 0..2)"
        )
    )]
    pub augment: Vec<AugmentWire>,
    /// More sources mixed with the main one by weight, each with its own augmentations.
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::arbitrary::any::<MixSourceWire>(), 0..2)"
        )
    )]
    pub mix: Vec<MixSourceWire>,
}

/// One `[[data.augment]]` (or `[[data.mix.augment]]`) entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct AugmentWire {
    /// Which augmentation.
    pub kind: AugmentKind,
    /// Probability per token (token-dropout), fraction of tokens (span-corruption) or
    /// probability per segment (random-truncation), in [0, 1].
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub probability: f64,
    /// Mean span length (span-corruption).
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::int()"))]
    pub mean_span: u64,
    /// Replacement token id; unset means the padding (or EOS) id.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(0..u64::from(u32::MAX))")
    )]
    pub token: Option<u64>,
}

impl Default for AugmentWire {
    fn default() -> Self {
        AugmentWire {
            kind: AugmentKind::TokenDropout,
            probability: 0.1,
            mean_span: 3,
            token: None,
        }
    }
}

/// One `[[data.mix]]` entry: a further source, tokenized like the main one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct MixSourceWire {
    /// Kind of source (`text`, `jsonl` or `tokens`).
    pub source: DataSource,
    /// Files, directories or globs.
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::collection::vec(crate::wire::arb::text(), 0..3)")
    )]
    pub paths: Vec<String>,
    /// JSONL field path holding the text (dotted for nested objects).
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::text()"))]
    pub field: String,
    /// Sampling weight relative to the other sources (and `data.weight`).
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub weight: f64,
    /// Augmentations applied, in order, to this source's samples.
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::arbitrary::any::<AugmentWire>(), 0..2)"
        )
    )]
    pub augment: Vec<AugmentWire>,
}

impl Default for MixSourceWire {
    fn default() -> Self {
        MixSourceWire {
            source: DataSource::Text,
            paths: Vec::new(),
            field: "text".into(),
            weight: 1.0,
            augment: Vec::new(),
        }
    }
}

impl Default for DataWire {
    fn default() -> Self {
        DataWire {
            source: DataSource::Embedded,
            paths: Vec::new(),
            field: "text".into(),
            tokenizer: None,
            seq_len: 128,
            packing: Packing::Concat,
            shuffle: true,
            eval_fraction: 0.05,
            max_error_fraction: 0.001,
            prefetch: 4,
            cache_dir: None,
            weight: 1.0,
            augment: Vec::new(),
            mix: Vec::new(),
        }
    }
}

/// `[model.lora]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct LoraWire {
    /// Adapter rank.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::int()"))]
    pub rank: u64,
    /// Scaling numerator: the update is scaled by `alpha / rank` (or `alpha / sqrt(rank)`).
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub alpha: f64,
    /// Dropout on the adapter input, in [0, 1).
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub dropout: f64,
    /// Linear layers to adapt, by name (`q_proj`, `v_proj`, ... or `all-linear`).
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::collection::vec(crate::wire::arb::text(), 0..3)")
    )]
    pub targets: Vec<String>,
    /// rsLoRA scaling `alpha / sqrt(rank)`.
    pub rslora: bool,
}

impl Default for LoraWire {
    fn default() -> Self {
        LoraWire {
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
            rslora: false,
        }
    }
}

/// `[model]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct ModelWire {
    /// `builtin:NAME`, a Hugging Face directory, or `name@version` from the local registry.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::text()"))]
    pub source: String,
    /// Dtype of stored weights.
    pub dtype: DType,
    /// LoRA adapters; absent means full fine-tuning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraWire>,
    /// Quantization of the frozen base (QLoRA); needs `model.lora`.
    pub quantization: BaseQuant,
    /// Attention implementation.
    pub attention: Attention,
    /// Registry directory for `name@version` sources; unset means `$EG_HOME/registry`
    /// (`~/.local/share/elastic-guardian/registry`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(crate::wire::arb::text())")
    )]
    pub registry: Option<String>,
}

impl Default for ModelWire {
    fn default() -> Self {
        ModelWire {
            source: "builtin:tiny-llama".into(),
            dtype: DType::F32,
            lora: None,
            quantization: BaseQuant::None,
            attention: Attention::Auto,
            registry: None,
        }
    }
}

/// `[train.optimizer]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerWire {
    /// Which optimizer.
    pub kind: OptimizerKind,
    /// Peak learning rate.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub lr: f64,
    /// Adam/Lion betas, each in [0, 1).
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::collection::vec(crate::wire::arb::float(), 0..3)")
    )]
    pub betas: Vec<f64>,
    /// Adam epsilon.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub eps: f64,
    /// Decoupled weight decay (never applied to norms and biases).
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub weight_decay: f64,
    /// SGD momentum, in [0, 1).
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub momentum: f64,
}

impl Default for OptimizerWire {
    fn default() -> Self {
        OptimizerWire {
            kind: OptimizerKind::AdamW,
            lr: 1e-3,
            betas: vec![0.9, 0.95],
            eps: 1e-8,
            weight_decay: 0.01,
            momentum: 0.9,
        }
    }
}

/// `[train.schedule]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleWire {
    /// Shape after warmup.
    pub kind: ScheduleKind,
    /// Linear warmup steps; unset means 5% of `train.max_steps`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(crate::wire::arb::int())")
    )]
    pub warmup_steps: Option<u64>,
    /// Final learning rate as a fraction of the peak.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub min_lr_ratio: f64,
    /// For `wsd`: the fraction of steps spent decaying.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub decay_fraction: f64,
}

impl Default for ScheduleWire {
    fn default() -> Self {
        ScheduleWire {
            kind: ScheduleKind::Cosine,
            warmup_steps: None,
            min_lr_ratio: 0.1,
            decay_fraction: 0.2,
        }
    }
}

/// `[train.batch]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct BatchWire {
    /// Tokens per optimizer step, across all processes and accumulation steps.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::int()"))]
    pub global_tokens: u64,
    /// Sequences per micro-batch; unset lets the memory planner choose.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(crate::wire::arb::int())")
    )]
    pub micro_batch: Option<u64>,
}

impl Default for BatchWire {
    fn default() -> Self {
        BatchWire {
            global_tokens: 2048,
            micro_batch: None,
        }
    }
}

/// `[train.precision]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct PrecisionWire {
    /// Compute precision.
    pub compute: Precision,
    /// Loss scaling (f16 only).
    pub loss_scale: LossScale,
    /// Initial dynamic loss scale.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub initial_scale: f64,
}

impl Default for PrecisionWire {
    fn default() -> Self {
        PrecisionWire {
            compute: Precision::Auto,
            loss_scale: LossScale::Dynamic,
            initial_scale: 65536.0,
        }
    }
}

/// `[train.guards]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct GuardsWire {
    /// Clip gradients by global L2 norm.
    pub clip: bool,
    /// The global L2 norm gradients are clipped to.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub clip_norm: f64,
    /// At the first step, fail when a trainable parameter got no gradient.
    pub coverage_check: bool,
    /// Consecutive non-finite steps skipped before rolling back.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::int()"))]
    pub nan_skip_limit: u64,
    /// Steps in the loss window of the spike detector.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::int()"))]
    pub spike_window: u64,
    /// Detect loss spikes and roll back.
    pub spike_detection: bool,
    /// Robust z-score above which a loss is a spike.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub spike_zscore: f64,
    /// Multiply the learning rate by this after a rollback, in (0, 1].
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub lr_backoff: f64,
}

impl Default for GuardsWire {
    fn default() -> Self {
        GuardsWire {
            clip: true,
            clip_norm: 1.0,
            coverage_check: true,
            nan_skip_limit: 3,
            spike_window: 50,
            spike_detection: true,
            spike_zscore: 6.0,
            lr_backoff: 1.0,
        }
    }
}

/// `[train.checkpoints]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointsWire {
    /// Directory; unset means `<run.dir>/checkpoints`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(crate::wire::arb::text())")
    )]
    pub dir: Option<String>,
    /// Save every this many steps.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::int()"))]
    pub every: u64,
    /// Keep the newest this many checkpoints.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::int()"))]
    pub keep_last: u64,
    /// Also keep this many with the best eval loss.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::int()"))]
    pub keep_best: u64,
    /// Write on a background thread from a snapshot.
    pub background: bool,
    /// Write the weight and optimizer files with O_DIRECT (no copy into the page cache);
    /// filesystems that refuse it get buffered writes.
    pub direct_io: bool,
}

impl Default for CheckpointsWire {
    fn default() -> Self {
        CheckpointsWire {
            dir: None,
            every: 50,
            keep_last: 3,
            keep_best: 1,
            background: true,
            direct_io: true,
        }
    }
}

/// `[train.eval]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct EvalWire {
    /// Evaluate every this many steps.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::int()"))]
    pub every: u64,
    /// Batches per evaluation.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::int()"))]
    pub max_batches: u64,
    /// Stop after this many evaluations without improvement; unset never stops early.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(crate::wire::arb::int())")
    )]
    pub early_stopping_patience: Option<u64>,
}

impl Default for EvalWire {
    fn default() -> Self {
        EvalWire {
            every: 50,
            max_batches: 8,
            early_stopping_patience: None,
        }
    }
}

/// `[train.classification]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct ClassificationWire {
    /// What to train.
    pub objective: EncoderObjective,
    /// Number of classes; unset: from the data (the number of class names, or the largest class id + 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(crate::wire::arb::int())")
    )]
    pub num_labels: Option<u64>,
    /// Pooling before the classifier.
    pub pooling: Pooling,
    /// JSON field of the label: an integer class id or a class name (names get ids in sorted order, saved in `<run.dir>/labels.json`).
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::text()"))]
    pub label_field: String,
    /// JSON field of the positive text for `objective = "embedding"` (the anchor is `data.field`).
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::text()"))]
    pub positive_field: String,
    /// Dropout probability before the classifier, in [0, 1).
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub dropout: f64,
    /// Multiplier of the cosine similarities in the embedding loss (sentence-transformers: 20).
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub scale: f64,
}

impl Default for ClassificationWire {
    fn default() -> Self {
        ClassificationWire {
            objective: EncoderObjective::Classification,
            num_labels: None,
            pooling: Pooling::Mean,
            label_field: "label".to_string(),
            positive_field: "positive".to_string(),
            dropout: 0.1,
            scale: 20.0,
        }
    }
}

/// `[train.dpo]`: direct preference optimisation (`train.mode = "dpo"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct DpoWire {
    /// Temperature β of the DPO loss −log σ(β·(chosen log-ratio − rejected log-ratio)), > 0; larger keeps the policy closer to the reference.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::float()"))]
    pub beta: f64,
    /// JSON field of the prompt: a string, or a list of chat messages rendered with the tokenizer's chat template.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::text()"))]
    pub prompt_field: String,
    /// JSON field of the preferred response (a string, or messages whose last assistant turn is taken).
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::text()"))]
    pub chosen_field: String,
    /// JSON field of the dispreferred response.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::text()"))]
    pub rejected_field: String,
}

impl Default for DpoWire {
    fn default() -> Self {
        DpoWire {
            beta: 0.1,
            prompt_field: "prompt".to_string(),
            chosen_field: "chosen".to_string(),
            rejected_field: "rejected".to_string(),
        }
    }
}

/// `[train]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct TrainWire {
    /// Training objective.
    pub mode: Mode,
    /// Optimizer steps to run.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::int()"))]
    pub max_steps: u64,
    /// Optimizer.
    pub optimizer: OptimizerWire,
    /// Learning-rate schedule.
    pub schedule: ScheduleWire,
    /// Batch size.
    pub batch: BatchWire,
    /// Precision.
    pub precision: PrecisionWire,
    /// Guards against NaNs, spikes and silent gradient loss.
    pub guards: GuardsWire,
    /// Checkpoints.
    pub checkpoints: CheckpointsWire,
    /// Evaluation.
    pub eval: EvalWire,
    /// Sequence classification and embedding fine-tuning (`mode = "classification"`).
    pub classification: ClassificationWire,
    /// Direct preference optimisation (`mode = "dpo"`).
    pub dpo: DpoWire,
}

impl Default for TrainWire {
    fn default() -> Self {
        TrainWire {
            mode: Mode::Pretrain,
            max_steps: 200,
            optimizer: OptimizerWire::default(),
            schedule: ScheduleWire::default(),
            batch: BatchWire::default(),
            precision: PrecisionWire::default(),
            guards: GuardsWire::default(),
            checkpoints: CheckpointsWire::default(),
            eval: EvalWire::default(),
            classification: ClassificationWire::default(),
            dpo: DpoWire::default(),
        }
    }
}

/// `[dist]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct DistWire {
    /// Communication backend.
    pub backend: Backend,
    /// How work is split.
    pub parallelism: Parallelism,
    /// Seconds a collective may take before the group is declared failed.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::int()"))]
    pub timeout_secs: u64,
    /// Elastic restarts allowed before giving up.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::int()"))]
    pub max_restarts: u64,
}

impl Default for DistWire {
    fn default() -> Self {
        DistWire {
            backend: Backend::Auto,
            parallelism: Parallelism::Single,
            timeout_secs: 300,
            max_restarts: 3,
        }
    }
}

/// `[monitor]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct MonitorWire {
    /// Log filter in `RUST_LOG` syntax, e.g. `info,eg_kernel=debug` (`EG_LOG` wins).
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::text()"))]
    pub log: String,
    /// Console colour.
    pub color: Color,
    /// Also write JSON-lines logs to `<run.dir>/logs/eg.jsonl`.
    pub json_log: bool,
    /// Write training metrics every this many steps.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::int()"))]
    pub metrics_every: u64,
    /// Serve Prometheus metrics on this address, e.g. `127.0.0.1:9184`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(crate::wire::arb::text())")
    )]
    pub prometheus: Option<String>,
    /// Write TensorBoard event files to `<run.dir>/tb`.
    pub tensorboard: bool,
    /// Seconds without a finished step before the watchdog reports a stall.
    #[cfg_attr(test, proptest(strategy = "crate::wire::arb::int()"))]
    pub stall_secs: u64,
}

impl Default for MonitorWire {
    fn default() -> Self {
        MonitorWire {
            log: "info".into(),
            color: Color::Auto,
            json_log: true,
            metrics_every: 10,
            prometheus: None,
            tensorboard: false,
            stall_secs: 600,
        }
    }
}

/// `[export]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct ExportWire {
    /// Format.
    pub format: ExportFormat,
    /// Quantization (GGUF only).
    pub quantization: ExportQuant,
    /// Merge LoRA adapters into the base before export.
    pub merge_lora: bool,
    /// Output directory; unset means `<run.dir>/export`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(crate::wire::arb::text())")
    )]
    pub dir: Option<String>,
    /// Reload the export and compare outputs with the trained model.
    pub validate: bool,
}

impl Default for ExportWire {
    fn default() -> Self {
        ExportWire {
            format: ExportFormat::Hf,
            quantization: ExportQuant::None,
            merge_lora: true,
            dir: None,
            validate: true,
        }
    }
}

#[cfg(test)]
pub(crate) mod arb {
    //! Strategies for the round-trip property tests.
    use proptest::prelude::*;

    use crate::units::ByteSize;

    /// Printable text (any non-control character).
    pub(crate) fn text() -> impl Strategy<Value = String> {
        "\\PC{0,12}"
    }

    /// Integers every format can hold (TOML integers are signed 64-bit).
    pub(crate) fn int() -> impl Strategy<Value = u64> {
        0..=i64::MAX as u64
    }

    /// Finite floats (NaN never equals itself, so it cannot round-trip by equality).
    pub(crate) fn float() -> impl Strategy<Value = f64> {
        prop_oneof![-1e12..1e12f64, Just(0.0), Just(1.0), Just(1e-8)]
    }

    /// Byte sizes in both spellings.
    pub(crate) fn bytes() -> impl Strategy<Value = ByteSize> {
        prop_oneof![
            int().prop_map(ByteSize::Count),
            "[0-9]{1,4}(MiB|GB|k)".prop_map(ByteSize::Text)
        ]
    }
}

#[cfg(test)]
mod roundtrip {
    //! Every section survives TOML, YAML and JSON unchanged.
    use proptest::prelude::*;

    use super::*;

    fn check<T>(v: &T) -> Result<(), TestCaseError>
    where
        T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
    {
        let toml_text =
            toml::to_string(v).map_err(|e| TestCaseError::fail(format!("toml ser: {e}")))?;
        let back: T = toml::from_str(&toml_text)
            .map_err(|e| TestCaseError::fail(format!("toml de: {e}\n{toml_text}")))?;
        prop_assert_eq!(&back, v, "TOML:\n{}", toml_text);
        let yaml = serde_yaml_ng::to_string(v)
            .map_err(|e| TestCaseError::fail(format!("yaml ser: {e}")))?;
        let back: T = serde_yaml_ng::from_str(&yaml)
            .map_err(|e| TestCaseError::fail(format!("yaml de: {e}\n{yaml}")))?;
        prop_assert_eq!(&back, v, "YAML:\n{}", yaml);
        let json =
            serde_json::to_string(v).map_err(|e| TestCaseError::fail(format!("json ser: {e}")))?;
        let back: T = serde_json::from_str(&json)
            .map_err(|e| TestCaseError::fail(format!("json de: {e}\n{json}")))?;
        prop_assert_eq!(&back, v, "JSON:\n{}", json);
        Ok(())
    }

    macro_rules! sections {
        ($($name:ident: $t:ty),+ $(,)?) => {
            proptest! {
                #![proptest_config(ProptestConfig::with_cases(96))]
                $(#[test] fn $name(v in any::<$t>()) { check(&v)?; })+
            }
        };
    }

    sections!(
        run: RunWire,
        hardware: HardwareWire,
        memory: MemoryWire,
        data: DataWire,
        model: ModelWire,
        lora: LoraWire,
        train: TrainWire,
        optimizer: OptimizerWire,
        schedule: ScheduleWire,
        batch: BatchWire,
        precision: PrecisionWire,
        guards: GuardsWire,
        checkpoints: CheckpointsWire,
        eval: EvalWire,
        dist: DistWire,
        monitor: MonitorWire,
        export: ExportWire,
    );

    prop_compose! {
        fn whole()(
            run in any::<RunWire>(), hardware in any::<HardwareWire>(), memory in any::<MemoryWire>(),
            data in any::<DataWire>(), model in any::<ModelWire>(), train in any::<TrainWire>(),
            dist in any::<DistWire>(), monitor in any::<MonitorWire>(), export in any::<ExportWire>(),
        ) -> WireConfig {
            WireConfig { extends: None, run, hardware, memory, data, model, train, dist, monitor, export }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The whole configuration, written as a file of each format and read back through the
        /// layered loader, is unchanged.
        #[test]
        fn whole_config_through_the_loader(w in whole(), fmt in 0..3usize) {
            let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let (name, text) = match fmt {
                0 => ("c.toml", toml::to_string(&w).map_err(|e| TestCaseError::fail(e.to_string()))?),
                1 => ("c.yaml", serde_yaml_ng::to_string(&w).map_err(|e| TestCaseError::fail(e.to_string()))?),
                _ => ("c.json", serde_json::to_string_pretty(&w).map_err(|e| TestCaseError::fail(e.to_string()))?),
            };
            let path = dir.path().join(name);
            std::fs::write(&path, &text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let back = crate::Sources::new().file(&path).resolve()
                .and_then(|r| r.wire())
                .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            prop_assert_eq!(back, w);
        }
    }
}
