//! Integration tests of eg-kernel (one binary, one module per area).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod tests {
    mod builder;
    mod checkpointing;
    mod checkpoints;
    mod classification;
    pub(crate) mod common;
    mod dpo;
    mod fused;
    mod guards;
    mod loop_;
    mod lora;
    mod memory_guard;
    mod offload;
    mod optim;
    mod overlap;
    mod precision;
    mod real_classification;
    mod resume;
}
