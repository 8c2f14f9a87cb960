//! Integration tests of eg-model (one binary; one module per area).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

#[path = "it/attention.rs"]
mod attention;
#[path = "it/bert.rs"]
mod bert;
#[path = "it/bert_heads.rs"]
mod bert_heads;
#[path = "it/checkpointing.rs"]
mod checkpointing;
#[path = "it/common.rs"]
mod common;
#[path = "it/fused.rs"]
mod fused;
#[path = "it/gguf.rs"]
mod gguf;
#[path = "it/gpt2.rs"]
mod gpt2;
#[path = "it/hf.rs"]
mod hf;
#[path = "it/lora.rs"]
mod lora;
#[path = "it/model.rs"]
mod model;
#[path = "it/ops.rs"]
mod ops;
#[path = "it/parity.rs"]
mod parity;
#[path = "it/precision.rs"]
mod precision;
#[path = "it/qlora.rs"]
mod qlora;
#[path = "it/real_assets.rs"]
mod real_assets;
#[path = "it/registry.rs"]
mod registry;
