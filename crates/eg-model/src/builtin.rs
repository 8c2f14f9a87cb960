//! Model shapes defined in code (`model.source = "builtin:NAME"`), needing no files.

use crate::config::{LlamaConfig, ModelType};
use crate::{Error, Result};

/// Names accepted after `builtin:`.
pub const NAMES: &[&str] = &["tiny-llama", "micro-llama", "small-llama"];

/// The Llama configuration of a built-in model with the given vocabulary size.
///
/// - `micro-llama`: hidden 32, 2 layers (tests; seconds);
/// - `tiny-llama`: hidden 128, 4 layers, 4 heads / 2 KV heads (~0.8M parameters with a
///   byte vocabulary; `eg train` with no arguments);
/// - `small-llama`: hidden 256, 4 layers (the 6.3M configuration of the speed issue with a
///   32k vocabulary).
pub fn config(name: &str, vocab_size: usize, max_positions: usize) -> Result<LlamaConfig> {
    let (hidden, inter, layers, heads, kv) = match name {
        "micro-llama" => (32, 64, 2, 4, 2),
        "tiny-llama" => (128, 384, 4, 4, 2),
        "small-llama" => (256, 688, 4, 8, 4),
        _ => {
            return Err(Error::InvalidConfig {
                field: "model.source",
                reason: format!("unknown builtin model {name:?}; known: {NAMES:?}"),
            });
        }
    };
    let cfg = LlamaConfig {
        model_type: ModelType::Llama,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv),
        max_position_embeddings: max_positions,
        vocab_size,
        tie_word_embeddings: true,
        ..LlamaConfig::tiny_for_tests()
    };
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_validates() {
        for n in NAMES {
            let c = config(n, 257, 256).unwrap();
            assert_eq!(c.vocab_size, 257);
        }
        assert!(config("huge", 257, 256).is_err());
    }
}
