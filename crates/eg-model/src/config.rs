//! The Llama-family configuration, read from and written to Hugging Face `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Architectures of the Llama family this crate builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    /// Llama 2/3 (and SmolLM2, TinyLlama, ...).
    Llama,
    /// Mistral (sliding-window attention).
    Mistral,
    /// Qwen2 (bias on q/k/v projections).
    Qwen2,
}

impl ModelType {
    /// The `model_type` strings accepted in `config.json`.
    pub const SUPPORTED: &'static [&'static str] = &["llama", "mistral", "qwen2"];

    /// The `config.json` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Llama => "llama",
            ModelType::Mistral => "mistral",
            ModelType::Qwen2 => "qwen2",
        }
    }
}

/// RoPE frequency scaling (`rope_scaling` in `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type")]
pub enum RopeScaling {
    /// No scaling.
    #[serde(rename = "default")]
    Default,
    /// Positions divided by `factor`.
    #[serde(rename = "linear")]
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    #[serde(rename = "llama3")]
    Llama3 {
        /// Scale of low frequencies.
        factor: f64,
        /// Wavelength threshold (as a divisor of the original context) for low frequencies.
        low_freq_factor: f64,
        /// Wavelength threshold for high frequencies.
        high_freq_factor: f64,
        /// The context length the model was pre-trained with.
        original_max_position_embeddings: usize,
    },
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Configuration of a Llama-family model, with Hugging Face `config.json` field names.
///
/// Unknown fields are kept in [`extra`](Self::extra) and written back on save.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Which architecture.
    pub model_type: ModelType,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RoPE scaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence the RoPE tables cover.
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v/o projections (Llama's `attention_bias`); Qwen2 always has q/k/v bias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Sliding attention window (Mistral; Qwen2 when `use_sliding_window`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen2's switch for the sliding window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// MLP activation; only `silu` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// Every other field of `config.json`, kept for the round trip.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Parses `config.json` text into a JSON object whose `required` fields are present and not
/// null; errors name the file and the missing field.
pub(crate) fn config_object(
    text: &str,
    path: &Path,
    required: &[&'static str],
) -> Result<serde_json::Value> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|source| Error::ConfigParse {
            path: path.to_path_buf(),
            source,
        })?;
    if !value.is_object() {
        return Err(Error::InvalidConfig {
            field: "(root)",
            reason: "config.json is not a JSON object".to_string(),
        });
    }
    for field in required {
        if value.get(*field).is_none_or(|v| v.is_null()) {
            return Err(Error::ConfigMissingField {
                path: path.to_path_buf(),
                field,
            });
        }
    }
    Ok(value)
}

/// Deserializes a configuration object checked by [`config_object`].
pub(crate) fn from_config_value<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    path: &Path,
) -> Result<T> {
    serde_json::from_value(value).map_err(|source| Error::ConfigParse {
        path: path.to_path_buf(),
        source,
    })
}

/// Fields `config.json` must have.
const REQUIRED: &[&str] = &[
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "rms_norm_eps",
    "vocab_size",
    "max_position_embeddings",
];

impl LlamaConfig {
    /// A tiny Llama (hidden 32, 2 layers, 4 heads / 2 KV heads, vocab 64) for tests and
    /// examples.
    pub fn tiny_for_tests() -> Self {
        LlamaConfig {
            model_type: ModelType::Llama,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            vocab_size: 64,
            max_position_embeddings: 128,
            tie_word_embeddings: false,
            attention_bias: None,
            sliding_window: None,
            use_sliding_window: None,
            hidden_act: Some("silu".to_string()),
            extra: serde_json::Map::new(),
        }
    }

    /// Parses `config.json` text; `path` is used in error messages only.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let mut value = config_object(text, path, REQUIRED)?;
        let obj = value.as_object_mut().ok_or_else(|| Error::InvalidConfig {
            field: "(root)",
            reason: "config.json is not a JSON object".to_string(),
        })?;
        if let Some(mt) = obj.get("model_type") {
            let s = mt.as_str().unwrap_or_default();
            if !ModelType::SUPPORTED.contains(&s) {
                return Err(Error::UnsupportedModelType {
                    found: mt.as_str().map_or_else(|| mt.to_string(), str::to_string),
                    supported: ModelType::SUPPORTED,
                });
            }
        }
        // Older configs spell the scaling kind `type`.
        if let Some(serde_json::Value::Object(rs)) = obj.get_mut("rope_scaling")
            && !rs.contains_key("rope_type")
            && let Some(t) = rs.get("type").cloned()
        {
            rs.insert("rope_type".to_string(), t);
        }
        let cfg: LlamaConfig = from_config_value(value, path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// The `config.json` text for this configuration.
    pub fn to_json_string(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(Error::Json)
    }

    /// Checks that the sizes fit together.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("num_key_value_heads", self.num_kv_heads()),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::InvalidConfig {
                    field,
                    reason: "must be positive".to_string(),
                });
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::InvalidConfig {
                field: "num_attention_heads",
                reason: format!(
                    "hidden_size {} is not divisible by {} heads",
                    self.hidden_size, self.num_attention_heads
                ),
            });
        }
        if !self.head_dim().is_multiple_of(2) || self.head_dim() == 0 {
            return Err(Error::InvalidConfig {
                field: "head_dim",
                reason: format!(
                    "RoPE needs an even, positive head_dim, got {}",
                    self.head_dim()
                ),
            });
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(Error::InvalidConfig {
                field: "num_key_value_heads",
                reason: format!(
                    "{} query heads are not a multiple of {} key/value heads",
                    self.num_attention_heads,
                    self.num_kv_heads()
                ),
            });
        }
        if let Some(act) = &self.hidden_act
            && act != "silu"
        {
            return Err(Error::InvalidConfig {
                field: "hidden_act",
                reason: format!("only silu is supported, got {act:?}"),
            });
        }
        if self.model_type == ModelType::Qwen2 && self.use_sliding_window == Some(true) {
            return Err(Error::Unsupported {
                what: "Qwen2 with use_sliding_window (per-layer windows)",
                issue: 4,
            });
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return Err(Error::InvalidConfig {
                field: "rope_theta",
                reason: format!("must be positive, got {}", self.rope_theta),
            });
        }
        Ok(())
    }

    /// Key/value heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v projections have a bias.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias
            .unwrap_or(self.model_type == ModelType::Qwen2)
    }

    /// Whether the output projection has a bias (Llama's `attention_bias` only).
    pub fn o_bias(&self) -> bool {
        self.model_type != ModelType::Qwen2 && self.attention_bias.unwrap_or(false)
    }

    /// The effective sliding attention window.
    pub fn attention_window(&self) -> Option<usize> {
        match self.model_type {
            ModelType::Llama => None,
            ModelType::Mistral => self.sliding_window,
            ModelType::Qwen2 => {
                if self.use_sliding_window == Some(true) {
                    self.sliding_window
                } else {
                    None
                }
            }
        }
    }

    /// RoPE inverse frequencies (`head_dim / 2` of them), scaling applied.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim();
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        match &self.rope_scaling {
            None | Some(RopeScaling::Default) => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let orig = *original_max_position_embeddings as f64;
                let low_wl = orig / low_freq_factor;
                let high_wl = orig / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wl = 2.0 * std::f64::consts::PI / f;
                        if wl < high_wl {
                            f
                        } else if wl > low_wl {
                            f / factor
                        } else {
                            let smooth = (orig / wl - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hf_llama3_config() {
        let text = r#"{
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "vocab_size": 100, "max_position_embeddings": 256,
            "tie_word_embeddings": true, "torch_dtype": "bfloat16",
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64, "type": "llama3"}
        }"#;
        let cfg = LlamaConfig::from_json_str(text, Path::new("c.json")).unwrap();
        assert!(matches!(cfg.rope_scaling, Some(RopeScaling::Llama3 { .. })));
        assert_eq!(cfg.extra["torch_dtype"], "bfloat16");
        assert_eq!(cfg.head_dim(), 16);
        let back =
            LlamaConfig::from_json_str(&cfg.to_json_string().unwrap(), Path::new("x")).unwrap();
        assert_eq!(back, cfg);
        // Low frequencies are scaled down, the highest is unchanged.
        let plain = LlamaConfig {
            rope_scaling: None,
            ..cfg.clone()
        };
        let (a, b) = (cfg.inv_freq(), plain.inv_freq());
        assert_eq!(a[0], b[0]);
        assert!((a[7] - b[7] / 8.0).abs() < 1e-12);
    }
}
