//! A trainable GPT-2.
//!
//! Hugging Face's GPT-2 stores its projections as `Conv1D` weights (`[in, out]`, used as
//! `x @ W + b`), fuses q/k/v into `attn.c_attn` (`[E, 3E]`, split as `[Q | K | V]`), learns
//! absolute position embeddings (`wpe`), uses pre-LayerNorm blocks and the tanh
//! approximation of GELU (`gelu_new`), and ties `lm_head` to `wte` by default.
//!
//! Checkpoints saved from `GPT2Model` name tensors `h.0.attn.c_attn.weight`, those saved from
//! `GPT2LMHeadModel` `transformer.h.0.attn.c_attn.weight`; both load. The causal-mask buffers
//! some checkpoints carry (`attn.bias`, `attn.masked_bias`) are ignored. Saving uses the
//! `transformer.` prefix.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::checkpointing::{self, CheckpointFlag};
use crate::hf::{CONFIG, Weights, save_dir, torch_dtype};
use crate::llama::Linear;
use crate::lora::{LoraState, Proj};
use crate::ops;
use crate::params::{Init, ParamStore, check_tensor_names, init_tensor};
use crate::{Error, Result};

fn default_eps() -> f64 {
    1e-5
}

fn default_true() -> bool {
    true
}

/// GPT-2 configuration with Hugging Face `config.json` field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Number of learned positions.
    pub n_positions: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Number of blocks.
    pub n_layer: usize,
    /// Number of attention heads.
    pub n_head: usize,
    /// Width of the MLP (default `4 * n_embd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_inner: Option<usize>,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// Activation; only `gelu_new` (tanh approximation) is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_function: Option<String>,
    /// Whether `lm_head` is `wte` (GPT-2's default: true).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Every other field, kept for the round trip (includes `model_type`).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

const REQUIRED: &[&str] = &["vocab_size", "n_positions", "n_embd", "n_layer", "n_head"];

impl Gpt2Config {
    /// A tiny GPT-2 (width 32, 2 layers, 4 heads, vocab 64) for tests and examples.
    pub fn tiny_for_tests() -> Self {
        let mut extra = serde_json::Map::new();
        extra.insert("model_type".to_string(), "gpt2".into());
        Gpt2Config {
            vocab_size: 64,
            n_positions: 64,
            n_embd: 32,
            n_layer: 2,
            n_head: 4,
            n_inner: None,
            layer_norm_epsilon: 1e-5,
            activation_function: Some("gelu_new".to_string()),
            tie_word_embeddings: true,
            extra,
        }
    }

    /// Parses `config.json` text; `path` is used in error messages only.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value = crate::config::config_object(text, path, REQUIRED)?;
        let cfg: Gpt2Config = crate::config::from_config_value(value, path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the sizes fit together.
    pub fn validate(&self) -> Result<()> {
        if self.n_head == 0 || self.n_embd == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(Error::InvalidConfig {
                field: "n_head",
                reason: format!(
                    "n_embd {} is not divisible by {} heads",
                    self.n_embd, self.n_head
                ),
            });
        }
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_layer", self.n_layer),
        ] {
            if v == 0 {
                return Err(Error::InvalidConfig {
                    field,
                    reason: "must be positive".to_string(),
                });
            }
        }
        if let Some(act) = &self.activation_function
            && act != "gelu_new"
            && act != "gelu_pytorch_tanh"
        {
            return Err(Error::InvalidConfig {
                field: "activation_function",
                reason: format!("only gelu_new is supported, got {act:?}"),
            });
        }
        Ok(())
    }

    /// MLP width.
    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
}

/// Tensor names (with the `transformer.` prefix), shapes and initialisation.
fn expected_tensors(cfg: &Gpt2Config) -> Vec<(String, Vec<usize>, Init)> {
    let e = cfg.n_embd;
    let i = cfg.inner();
    let w = Init::Normal(0.02);
    // GPT-2 scales residual projections by 1/sqrt(2 · n_layer).
    let wp = Init::Normal(0.02 / (2.0 * cfg.n_layer as f64).sqrt());
    let mut out = vec![
        (
            "transformer.wte.weight".to_string(),
            vec![cfg.vocab_size, e],
            w,
        ),
        (
            "transformer.wpe.weight".to_string(),
            vec![cfg.n_positions, e],
            w,
        ),
    ];
    for l in 0..cfg.n_layer {
        let p = format!("transformer.h.{l}");
        out.extend([
            (format!("{p}.ln_1.weight"), vec![e], Init::Ones),
            (format!("{p}.ln_1.bias"), vec![e], Init::Zeros),
            (format!("{p}.attn.c_attn.weight"), vec![e, 3 * e], w),
            (format!("{p}.attn.c_attn.bias"), vec![3 * e], Init::Zeros),
            (format!("{p}.attn.c_proj.weight"), vec![e, e], wp),
            (format!("{p}.attn.c_proj.bias"), vec![e], Init::Zeros),
            (format!("{p}.ln_2.weight"), vec![e], Init::Ones),
            (format!("{p}.ln_2.bias"), vec![e], Init::Zeros),
            (format!("{p}.mlp.c_fc.weight"), vec![e, i], w),
            (format!("{p}.mlp.c_fc.bias"), vec![i], Init::Zeros),
            (format!("{p}.mlp.c_proj.weight"), vec![i, e], wp),
            (format!("{p}.mlp.c_proj.bias"), vec![e], Init::Zeros),
        ]);
    }
    out.push(("transformer.ln_f.weight".to_string(), vec![e], Init::Ones));
    out.push(("transformer.ln_f.bias".to_string(), vec![e], Init::Zeros));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, e], w));
    }
    out
}

/// A decoder block; the linear layers are HF `Conv1D`s (`x @ W + b`, `W` stored
/// `[in, out]`), [`Proj::TrainInOut`] until frozen for LoRA.
#[derive(Debug, Clone)]
pub(crate) struct Block {
    pub(crate) ln_1: (Tensor, Tensor),
    pub(crate) c_attn: Proj,
    pub(crate) attn_proj: Proj,
    pub(crate) ln_2: (Tensor, Tensor),
    pub(crate) c_fc: Proj,
    pub(crate) mlp_proj: Proj,
}

/// A trainable GPT-2 language model.
#[derive(Debug, Clone)]
pub struct Gpt2 {
    pub(crate) cfg: Gpt2Config,
    pub(crate) params: ParamStore,
    pub(crate) wte: Tensor,
    pub(crate) wpe: Tensor,
    pub(crate) blocks: Vec<Block>,
    pub(crate) ln_f: (Tensor, Tensor),
    pub(crate) lm_head: Proj,
    /// Adapters ([`crate::lora`]); `None` for a fully trainable model.
    pub(crate) lora: Option<Box<LoraState>>,
    /// Activation checkpointing of the blocks ([`crate::checkpointing`]).
    checkpointing: CheckpointFlag,
}

impl Gpt2 {
    /// A randomly initialised model (GPT-2's scheme: normal(0, 0.02), residual projections
    /// scaled by `1/sqrt(2 n_layer)`, LayerNorm one/zero, biases zero), from `seed`.
    pub fn init(cfg: &Gpt2Config, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let mut tensors = HashMap::new();
        for (name, shape, init) in expected_tensors(cfg) {
            tensors.insert(
                name.clone(),
                init_tensor(seed, &name, &shape, init, dtype, device)?,
            );
        }
        Self::from_tensors(cfg, tensors, dtype)
    }

    /// Builds a model from named tensors (with or without the `transformer.` prefix).
    pub fn from_tensors(
        cfg: &Gpt2Config,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
    ) -> Result<Self> {
        cfg.validate()?;
        let mut tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(n, t)| (canonical(&n), t))
            .collect();
        let shapes = tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        let expected: Vec<(String, Vec<usize>)> = expected_tensors(cfg)
            .into_iter()
            .map(|(n, s, _)| (n, s))
            .collect();
        check_tensor_names(&expected, &shapes, |n| is_ignorable(cfg, n))?;
        let mut params = ParamStore::new();
        for (name, _) in &expected {
            let t = tensors.remove(name).ok_or_else(|| Error::MissingTensors {
                names: vec![name.clone()],
            })?;
            params.insert(name.clone(), Var::from_tensor(&t.to_dtype(dtype)?)?);
        }
        let get = |n: &str| -> Result<Tensor> {
            params
                .get(n)
                .map(|v| v.as_tensor().clone())
                .ok_or_else(|| Error::MissingTensors {
                    names: vec![n.to_string()],
                })
        };
        let conv = |p: &str| -> Result<Proj> {
            Ok(Proj::TrainInOut {
                weight: get(&format!("{p}.weight"))?,
                bias: get(&format!("{p}.bias"))?,
            })
        };
        let ln = |p: &str| -> Result<(Tensor, Tensor)> {
            Ok((get(&format!("{p}.weight"))?, get(&format!("{p}.bias"))?))
        };
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let p = format!("transformer.h.{l}");
            blocks.push(Block {
                ln_1: ln(&format!("{p}.ln_1"))?,
                c_attn: conv(&format!("{p}.attn.c_attn"))?,
                attn_proj: conv(&format!("{p}.attn.c_proj"))?,
                ln_2: ln(&format!("{p}.ln_2"))?,
                c_fc: conv(&format!("{p}.mlp.c_fc"))?,
                mlp_proj: conv(&format!("{p}.mlp.c_proj"))?,
            });
        }
        let wte = get("transformer.wte.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            wte.clone()
        } else {
            get("lm_head.weight")?
        };
        Ok(Gpt2 {
            wpe: get("transformer.wpe.weight")?,
            ln_f: ln("transformer.ln_f")?,
            wte,
            blocks,
            lm_head: Proj::Train(Linear {
                weight: lm_head,
                bias: None,
            }),
            params,
            cfg: cfg.clone(),
            lora: None,
            checkpointing: CheckpointFlag::default(),
        })
    }

    /// Loads a Hugging Face GPT-2 directory.
    pub fn from_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let path = dir.join(CONFIG);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let cfg = Gpt2Config::from_json_str(&text, &path)?;
        let weights = Weights::open_dir(dir)?;
        let mut tensors = HashMap::new();
        for name in weights.shapes().keys() {
            if is_buffer(name) {
                continue;
            }
            tensors.insert(name.clone(), weights.load(name, dtype, device)?);
        }
        Self::from_tensors(&cfg, tensors, dtype)
    }

    /// Saves as a Hugging Face directory (see [`crate::Llama::save_hf_dir`]).
    /// A model with LoRA adapters is refused ([`Error::LoraState`]).
    pub fn save_hf_dir(&self, dir: &Path, max_shard_bytes: Option<u64>) -> Result<()> {
        if self.lora.is_some() {
            return Err(Error::LoraState {
                op: "save_hf_dir",
                reason: "the model has adapters; save them with save_lora_adapter",
            });
        }
        let mut cfg = self.cfg.clone();
        cfg.extra.insert("model_type".to_string(), "gpt2".into());
        cfg.extra.insert(
            "torch_dtype".to_string(),
            torch_dtype(self.wte.dtype()).into(),
        );
        let json = serde_json::to_string_pretty(&cfg).map_err(Error::Json)?;
        save_dir(dir, self.params.tensors(), &json, max_shard_bytes)
    }

    /// The configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.cfg
    }

    /// The trainable parameters.
    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// Turns activation checkpointing of every block on or off (default off); see
    /// [`crate::Llama::set_activation_checkpointing`].
    pub fn set_activation_checkpointing(&self, on: bool) {
        self.checkpointing.set(on);
    }

    /// Whether activation checkpointing is on.
    pub fn activation_checkpointing(&self) -> bool {
        self.checkpointing.get()
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t == 0 || t > self.cfg.n_positions {
            return Err(Error::SequenceTooLong {
                len: t,
                max: self.cfg.n_positions,
            });
        }
        if let Some(l) = &self.lora {
            l.begin_forward();
        }
        let e = self.cfg.n_embd;
        let flat = crate::params::checked_ids(ids, self.cfg.vocab_size)?;
        let tok = self.wte.index_select(&flat, 0)?.reshape((b, t, e))?;
        let pos = self.wpe.narrow(0, 0, t)?;
        let mut x = tok.broadcast_add(&pos)?;
        if self.checkpointing.get() {
            // One shallow copy (shared tensors) the blocks read again when recomputed.
            let model = Arc::new(self.clone());
            for i in 0..self.blocks.len() {
                let prefix = format!("transformer.h.{i}.");
                let params = self
                    .params
                    .iter()
                    .filter(|(n, _)| n.starts_with(&prefix))
                    .map(|(_, v)| v.as_tensor().clone())
                    .collect();
                let dropout = self.lora.as_ref().map(|l| l.dropout.clone());
                let block = Gpt2Block {
                    model: model.clone(),
                    index: i,
                };
                x = checkpointing::checkpoint(Box::new(block), &x, params, dropout)?;
            }
        } else {
            for blk in &self.blocks {
                x = self.block_forward(blk, &x)?;
            }
        }
        let eps = self.cfg.layer_norm_epsilon;
        let x = ops::layer_norm(&x, &self.ln_f.0, &self.ln_f.1, eps)?;
        self.lm_head.forward(&x)
    }

    /// One block: pre-norm attention and GELU MLP, each with a residual connection.
    fn block_forward(&self, blk: &Block, x: &Tensor) -> Result<Tensor> {
        let (b, t, e) = x.dims3()?;
        let eps = self.cfg.layer_norm_epsilon;
        let nh = self.cfg.n_head;
        let hd = e / nh;
        let h = ops::layer_norm(x, &blk.ln_1.0, &blk.ln_1.1, eps)?;
        let qkv = blk.c_attn.forward(&h)?;
        let heads = |i: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(2, i * e, e)?
                .reshape((b, t, nh, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let scores = q.matmul(&k.t()?)?;
        let probs = ops::causal_softmax(&scores, 1.0 / (hd as f64).sqrt(), t, None)?;
        let a = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, e))?;
        let x = (x + blk.attn_proj.forward(&a)?)?;
        let h = ops::layer_norm(&x, &blk.ln_2.0, &blk.ln_2.1, eps)?;
        let m = blk.c_fc.forward(&h)?.gelu()?;
        Ok((x + blk.mlp_proj.forward(&m)?)?)
    }

    /// Mean next-token cross entropy (see [`crate::Llama::next_token_loss`]).
    pub fn next_token_loss(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        loss_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let targets = ops::next_token_targets(labels, Some(-100), loss_mask)?;
        ops::cross_entropy(logits, &targets)
    }
}

/// Block `index` of `model`, for [`checkpointing`].
struct Gpt2Block {
    model: Arc<Gpt2>,
    index: usize,
}

impl checkpointing::Block for Gpt2Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let blk = self
            .model
            .blocks
            .get(self.index)
            .ok_or_else(|| Error::MissingTensors {
                names: vec![format!("transformer.h.{}", self.index)],
            })?;
        self.model.block_forward(blk, x)
    }
}

/// Adds the `transformer.` prefix GPT2Model checkpoints lack.
fn canonical(name: &str) -> String {
    if name.starts_with("transformer.") || name == "lm_head.weight" {
        name.to_string()
    } else {
        format!("transformer.{name}")
    }
}

/// The causal-mask buffers some checkpoints store.
fn is_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")
}

fn is_ignorable(cfg: &Gpt2Config, name: &str) -> bool {
    is_buffer(name) || (cfg.tie_word_embeddings && name == "lm_head.weight")
}
