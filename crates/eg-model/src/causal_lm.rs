//! Any causal language model of this crate, chosen by `config.json`'s `model_type`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::gpt2::Gpt2;
use crate::hf::CONFIG;
use crate::llama::Llama;
use crate::params::ParamStore;
use crate::{Error, Result};

/// A trainable causal language model: what a training loop holds.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum CausalLm {
    /// Llama, Mistral or Qwen2.
    Llama(Llama),
    /// GPT-2.
    Gpt2(Gpt2),
}

impl CausalLm {
    /// The `model_type` values [`CausalLm::from_hf_dir`] accepts.
    pub const SUPPORTED: &'static [&'static str] = &["llama", "mistral", "qwen2", "gpt2"];

    /// Loads a Hugging Face directory, choosing the architecture from `model_type`.
    pub fn from_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let path = dir.join(CONFIG);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::ConfigParse {
                path: path.clone(),
                source,
            })?;
        let mt = value
            .get("model_type")
            .ok_or_else(|| Error::ConfigMissingField {
                path: path.clone(),
                field: "model_type",
            })?;
        match mt.as_str() {
            Some("llama" | "mistral" | "qwen2") => {
                Ok(CausalLm::Llama(Llama::from_hf_dir(dir, dtype, device)?))
            }
            Some("gpt2") => Ok(CausalLm::Gpt2(Gpt2::from_hf_dir(dir, dtype, device)?)),
            _ => Err(Error::UnsupportedModelType {
                found: mt.as_str().map_or_else(|| mt.to_string(), str::to_string),
                supported: Self::SUPPORTED,
            }),
        }
    }

    /// Saves as a Hugging Face directory.
    pub fn save_hf_dir(&self, dir: &Path, max_shard_bytes: Option<u64>) -> Result<()> {
        match self {
            CausalLm::Llama(m) => m.save_hf_dir(dir, max_shard_bytes),
            CausalLm::Gpt2(m) => m.save_hf_dir(dir, max_shard_bytes),
        }
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            CausalLm::Llama(m) => m.forward(ids),
            CausalLm::Gpt2(m) => m.forward(ids),
        }
    }

    /// Mean next-token cross entropy; `-100` labels and zero `loss_mask` positions are
    /// ignored.
    pub fn next_token_loss(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        loss_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let targets = crate::ops::next_token_targets(labels, Some(-100), loss_mask)?;
        crate::ops::cross_entropy(logits, &targets)
    }

    /// Freezes the model and adds LoRA adapters ([`Llama::with_lora`]); with `quant`, the
    /// frozen linear layers are quantized too (QLoRA, [`Llama::with_qlora`]; Llama family only,
    /// GPT-2 returns [`Error::Unsupported`]).
    pub fn with_lora(
        self,
        cfg: &crate::lora::LoraConfig,
        quant: Option<crate::quant::QuantKind>,
        seed: u64,
    ) -> Result<Self> {
        match self {
            CausalLm::Llama(m) => Ok(CausalLm::Llama(match quant {
                None => m.with_lora(cfg, seed)?,
                Some(q) => m.with_qlora(cfg, q, seed)?,
            })),
            CausalLm::Gpt2(m) => match quant {
                None => Ok(CausalLm::Gpt2(m.with_lora(cfg, seed)?)),
                Some(_) => Err(Error::Unsupported {
                    what: "QLoRA on GPT-2",
                    issue: 7,
                }),
            },
        }
    }

    /// The trainable parameters.
    pub fn params(&self) -> &ParamStore {
        match self {
            CausalLm::Llama(m) => m.params(),
            CausalLm::Gpt2(m) => m.params(),
        }
    }
}
