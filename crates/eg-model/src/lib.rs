//! # eg-model
//!
//! Trainable transformer architectures whose every parameter receives a gradient, with
//! Hugging Face loading and saving.
//!
//! ## Brief overview
//!
//! candle's fused inference kernels (`candle_nn::ops::rms_norm`, `layer_norm`,
//! `softmax_last_dim`, `rotary_emb::rope`) have no backward pass: a tensor that goes through
//! them leaves the autograd graph and everything before it silently gets no gradient (issue
//! #4). A `candle-transformers` model trained with them updates only its head while the loss
//! still falls. This crate therefore:
//!
//! - provides fused ops **with** a backward pass in [`ops`] (RMSNorm, LayerNorm, softmax with
//!   an optional fused scale and causal/sliding-window mask, RoPE in both layouts with shared
//!   or per-sequence positions, SwiGLU, a fused cross entropy with ignored rows), each checked
//!   against finite differences in f64 and against the composite candle formulation. Each
//!   backward is one row-parallel pass (rayon) that recomputes cheap statistics instead of
//!   storing them, and weight gradients are reduced over fixed row blocks in a fixed order,
//!   so results do not depend on the thread count;
//! - builds the Llama family (Llama 2/3 incl. llama3 RoPE scaling, Mistral, Qwen2 with q/k/v
//!   bias; grouped-query attention; tied or untied embeddings) and GPT-2 on candle
//!   [`candle_core::Var`]s held in a [`ParamStore`] under Hugging Face tensor names;
//!   [`CausalLm`] picks the architecture from `config.json`'s `model_type`; and BERT
//!   ([`Bert`]) with masked-LM, classification and mean-pooled embedding heads;
//! - loads and saves Hugging Face directories ([`hf`]): `config.json` plus `model.safetensors`
//!   or a sharded index, memory-mapped, with typed errors for every bad input, and resolves
//!   the hf-hub cache layout offline; imports llama GGUF files ([`gguf`]), dequantized and
//!   with llama.cpp's Q/K row permutation undone;
//! - keeps a local registry of named, versioned, checksummed model copies ([`registry`]);
//! - fine-tunes with LoRA ([`lora`], [`Llama::with_lora`]): the base is frozen without
//!   gradient storage (a custom frozen-linear op whose only graph input is the activation),
//!   `params()` then holds only the adapters so any loop over it trains them alone; merge,
//!   unmerge, `merge_and_unload`, and the PEFT adapter layout (`adapter_model.safetensors`
//!   and `adapter_config.json`); QLoRA ([`Llama::with_qlora`]) keeps the frozen linears in NF4
//!   (block 64, optional double quantization) or INT8 ([`quant`]), dequantized in row tiles
//!   in the forward and again in the backward, which gives the input its gradient;
//! - runs attention either as the reference or chunked ([`attention`]): a CPU
//!   flash-attention with online softmax and a recomputing backward, for causal, padding
//!   and packed-document masks (memory linear in the sequence length);
//! - analyses a configuration ([`analysis`]): parameters, bytes, FLOPs and activation bytes
//!   per token for each module, for the memory planner.
//!
//! `candle-transformers` is used only in tests, as the inference reference the logits must
//! match (Llama, Llama 3 RoPE scaling, Qwen2, Mistral, BERT, quantized llama for GGUF; GPT-2
//! against a composite reference, as candle-transformers has none).
//!
//! Loading reads safetensors through this crate's own memory-mapped reader
//! ([`safetensors`]) rather than candle's, so that every defect of a file (truncation, a bad
//! header, offsets that do not match the shape) is a typed [`Error`] naming the tensor.
//!
//! ## Example
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use eg_model::{Llama, LlamaConfig};
//!
//! # fn main() -> eg_model::Result<()> {
//! let cfg = LlamaConfig::tiny_for_tests();
//! let model = Llama::init(&cfg, 42, DType::F32, &Device::Cpu)?;
//! let ids = Tensor::new(&[[1u32, 5, 7, 3]], &Device::Cpu)?;
//! let logits = model.forward(&ids)?; // [batch, seq, vocab]
//! let loss = model.next_token_loss(&logits, &ids, None)?;
//! let grads = loss.backward()?;
//! for (name, var) in model.params().iter() {
//!     assert!(grads.get(var.as_tensor()).is_some(), "{name} has a gradient");
//! }
//! # Ok(())
//! # }
//! ```

pub mod analysis;
pub mod attention;
pub mod bert;
pub mod builtin;
pub mod causal_lm;
pub mod checkpointing;
pub mod config;
pub mod fused;
mod gemm;
pub mod gguf;
pub mod gpt2;
pub mod heads;
pub mod hf;
pub mod llama;
pub mod lora;
pub mod ops;
pub mod params;
pub mod quant;
pub mod registry;
pub mod safetensors;

pub use analysis::{Analysis, ModuleStats, analyze_llama};
pub use bert::{Bert, BertConfig, BertHead};
pub use causal_lm::CausalLm;
pub use config::{LlamaConfig, ModelType, RopeScaling};
pub use fused::FusedStep;
pub use gguf::{GgufImport, import_gguf};
pub use gpt2::{Gpt2, Gpt2Config};
pub use heads::Pooling;
pub use llama::Llama;
pub use lora::{LoraConfig, LoraTargets};
pub use params::{GradCoverage, ParamStore};
pub use quant::{QuantKind, QuantMatrix};

use std::path::PathBuf;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The requested capability is not built yet.
    #[error("{what} is not supported yet (tracked in issue #{issue})")]
    Unsupported {
        /// What was asked for.
        what: &'static str,
        /// The issue that tracks the work.
        issue: u32,
    },
    /// An op has no kernel for this element type.
    #[error("{op} does not support dtype {dtype:?}")]
    UnsupportedDType {
        /// The op.
        op: &'static str,
        /// The element type given.
        dtype: candle_core::DType,
    },
    /// A tensor does not have the shape it must have.
    #[error("shape mismatch for {tensor}: expected {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// Which tensor.
        tensor: String,
        /// The shape required.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },
    /// A cross-entropy target is not a valid class.
    #[error("target {target} is out of range for a vocabulary of {vocab}")]
    TargetOutOfRange {
        /// The target class.
        target: u32,
        /// The number of classes.
        vocab: usize,
    },
    /// A token id is outside the embedding table.
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The id.
        id: i64,
        /// The table's size.
        vocab: usize,
    },
    /// A label is neither a token id nor the ignore value.
    #[error("label {label} is not a token id")]
    LabelOutOfRange {
        /// The label.
        label: i64,
    },
    /// A sequence is empty or longer than the model's position tables.
    #[error("sequence length {len} is outside 1..={max}")]
    SequenceTooLong {
        /// The length given.
        len: usize,
        /// `max_position_embeddings`.
        max: usize,
    },
    /// Tensors the model needs are absent from the checkpoint.
    #[error("missing tensors: {names:?}")]
    MissingTensors {
        /// Names of the missing tensors.
        names: Vec<String>,
    },
    /// The checkpoint has tensors the model does not know.
    #[error("unexpected tensors: {names:?}")]
    UnexpectedTensors {
        /// Names of the unexpected tensors.
        names: Vec<String>,
    },
    /// `model_type` names an architecture this crate does not build.
    #[error("unsupported model_type {found:?}; supported: {supported:?}")]
    UnsupportedModelType {
        /// The `model_type` found.
        found: String,
        /// The supported values.
        supported: &'static [&'static str],
    },
    /// A required field is absent from `config.json`.
    #[error("config {path:?} is missing the field `{field}`")]
    ConfigMissingField {
        /// The config file (empty for in-memory configs).
        path: PathBuf,
        /// The missing field.
        field: &'static str,
    },
    /// A config field has a value that cannot work.
    #[error("config field `{field}` is invalid: {reason}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// `config.json` is not valid JSON of the expected form.
    #[error("cannot parse config {path:?}: {source}")]
    ConfigParse {
        /// The config file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A safetensors file is truncated or corrupt.
    #[error("safetensors file {path:?} is invalid: {defect}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        defect: safetensors::Defect,
    },
    /// A GGUF file is truncated or corrupt.
    #[error("GGUF file {path:?} is invalid: {source}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// candle's reader error.
        source: candle_core::Error,
    },
    /// A directory holds neither `model.safetensors` nor `model.safetensors.index.json`.
    #[error("no safetensors weights in {dir:?}")]
    NoWeights {
        /// The directory searched.
        dir: PathBuf,
    },
    /// A model is not in the hf-hub cache.
    #[error("{repo} (revision {revision}) is not in the hf-hub cache at {path:?}")]
    NotInCache {
        /// `org/name`.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A registry name or version is not a plain path component.
    #[error("invalid registry {field} {value:?}: use letters, digits, '-', '_' and '.'")]
    InvalidRegistryName {
        /// `name` or `version`.
        field: &'static str,
        /// The value given.
        value: String,
    },
    /// The registry already has this entry.
    #[error("registry already has {name}@{version}")]
    RegistryEntryExists {
        /// Name.
        name: String,
        /// Version.
        version: String,
    },
    /// The registry has no such entry.
    #[error("registry has no {spec}; available versions: {available:?}")]
    RegistryEntryNotFound {
        /// What was asked for (`name` or `name@version`).
        spec: String,
        /// Versions of that name that exist.
        available: Vec<String>,
    },
    /// A file's checksum differs from the one recorded.
    #[error("checksum mismatch for {file:?}: expected {expected}, found {found}")]
    ChecksumMismatch {
        /// The file.
        file: PathBuf,
        /// Recorded sha256.
        expected: String,
        /// Actual sha256.
        found: String,
    },
    /// An I/O operation on a path failed.
    #[error("I/O error on {path:?}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Serialising JSON failed.
    #[error("cannot serialise JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// A LoRA target name matches no linear layer of the model.
    #[error("LoRA target {target:?} matches no linear layer; available: {available:?}")]
    LoraTargetNotFound {
        /// The target given.
        target: String,
        /// The linear layer names of the architecture.
        available: Vec<String>,
    },
    /// An operation does not fit the model's adapter state (no adapters, already merged,
    /// a quantized base, ...).
    #[error("{op}: {reason}")]
    LoraState {
        /// The operation.
        op: &'static str,
        /// Why it cannot run.
        reason: &'static str,
    },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
