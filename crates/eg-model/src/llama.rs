//! The trainable Llama family: Llama 2/3, Mistral, Qwen2.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use crate::attention::{AttentionKind, AttentionMask, chunked_attention};
use crate::checkpointing::{self, Block, CheckpointFlag};
use crate::config::LlamaConfig;
use crate::lora::{LoraState, Proj};
use crate::ops::{self, RopeLayout};
use crate::params::{Init, ParamStore, init_tensor};
use crate::{Error, Result};

/// Standard deviation of the initial weights (Hugging Face's `initializer_range` default).
const INIT_STD: f64 = 0.02;

#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
}

impl Linear {
    /// `x @ weight^T + bias` over the last dimension of `x`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Mixed precision: the (f32 master) weight is cast to the activation's dtype at use;
        // the cast's backward converts the gradient back to the parameter's dtype. A no-op
        // when the dtypes agree.
        let w = self.weight.to_dtype(x.dtype())?;
        // One graph node with a one-matmul-per-input backward (issue 9).
        let y = ops::linear(x, &w)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
            None => y,
        })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub(crate) input_norm: Tensor,
    pub(crate) q: Proj,
    pub(crate) k: Proj,
    pub(crate) v: Proj,
    pub(crate) o: Proj,
    pub(crate) post_norm: Tensor,
    pub(crate) gate: Proj,
    pub(crate) up: Proj,
    pub(crate) down: Proj,
}

/// A trainable Llama-family causal language model.
///
/// Parameters are candle [`Var`]s in a [`ParamStore`] under Hugging Face names
/// (`model.layers.0.self_attn.q_proj.weight`, ...). The forward pass uses this crate's fused
/// ops with backward ([`crate::ops`]), so one `loss.backward()` reaches every parameter.
#[derive(Debug, Clone)]
pub struct Llama {
    pub(crate) cfg: LlamaConfig,
    pub(crate) params: ParamStore,
    pub(crate) embed: Tensor,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Proj,
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// Adapters and frozen base ([`crate::lora`]); `None` for a fully trainable model.
    pub(crate) lora: Option<Box<LoraState>>,
    pub(crate) attention: AttentionKind,
    /// Dtype activations and matrix products run in; `None`: the parameters' dtype.
    pub(crate) compute: Option<DType>,
    /// Activation checkpointing of the decoder layers ([`crate::checkpointing`]).
    pub(crate) checkpointing: CheckpointFlag,
}

/// The tensors a configuration needs: name, shape and initialisation.
pub(crate) fn expected_tensors(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>, Init)> {
    let h = cfg.hidden_size;
    let hd = cfg.head_dim();
    let q_out = cfg.num_attention_heads * hd;
    let kv_out = cfg.num_kv_heads() * hd;
    let i = cfg.intermediate_size;
    let w = Init::Normal(INIT_STD);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
        w,
    )];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h], Init::Ones));
        for (name, o) in [("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)] {
            out.push((format!("{p}.self_attn.{name}.weight"), vec![o, h], w));
            if cfg.qkv_bias() {
                out.push((format!("{p}.self_attn.{name}.bias"), vec![o], Init::Zeros));
            }
        }
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q_out], w));
        if cfg.o_bias() {
            out.push((format!("{p}.self_attn.o_proj.bias"), vec![h], Init::Zeros));
        }
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Init::Ones,
        ));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h], w));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h], w));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i], w));
    }
    out.push(("model.norm.weight".to_string(), vec![h], Init::Ones));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h], w));
    }
    out
}

impl Llama {
    /// A randomly initialised model: weights normal(0, 0.02), norms one, biases zero. The
    /// values depend only on `seed` and each tensor's name.
    pub fn init(cfg: &LlamaConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let mut tensors = HashMap::new();
        for (name, shape, init) in expected_tensors(cfg) {
            let t = init_tensor(seed, &name, &shape, init, dtype, device)?;
            tensors.insert(name, t);
        }
        Self::from_tensors(cfg, tensors, dtype)
    }

    /// Builds a model from named tensors (converted to `dtype` and copied into new [`Var`]s).
    ///
    /// Every expected tensor must be present with its exact shape ([`Error::MissingTensors`],
    /// [`Error::ShapeMismatch`]); extra names are [`Error::UnexpectedTensors`], except a
    /// redundant `lm_head.weight` when the embeddings are tied and RoPE `inv_freq` buffers.
    pub fn from_tensors(
        cfg: &LlamaConfig,
        mut tensors: HashMap<String, Tensor>,
        dtype: DType,
    ) -> Result<Self> {
        cfg.validate()?;
        let shapes: HashMap<String, Vec<usize>> = tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        check_names(cfg, &shapes)?;
        let expected = expected_tensors(cfg);
        let mut params = ParamStore::new();
        for (name, _, _) in &expected {
            let t = tensors
                .remove(name)
                .ok_or_else(|| Error::MissingTensors {
                    names: vec![name.clone()],
                })?
                .to_dtype(dtype)?;
            params.insert(name.clone(), Var::from_tensor(&t)?);
        }
        Self::assemble(cfg.clone(), params)
    }

    fn assemble(cfg: LlamaConfig, params: ParamStore) -> Result<Self> {
        let get = |name: &str| -> Result<Tensor> {
            params
                .get(name)
                .map(|v| v.as_tensor().clone())
                .ok_or_else(|| Error::MissingTensors {
                    names: vec![name.to_string()],
                })
        };
        let opt = |name: &str| params.get(name).map(|v| v.as_tensor().clone());
        let linear = |p: &str| -> Result<Proj> {
            Ok(Proj::Train(Linear {
                weight: get(&format!("{p}.weight"))?,
                bias: opt(&format!("{p}.bias")),
            }))
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            layers.push(Layer {
                input_norm: get(&format!("{p}.input_layernorm.weight"))?,
                q: linear(&format!("{p}.self_attn.q_proj"))?,
                k: linear(&format!("{p}.self_attn.k_proj"))?,
                v: linear(&format!("{p}.self_attn.v_proj"))?,
                o: linear(&format!("{p}.self_attn.o_proj"))?,
                post_norm: get(&format!("{p}.post_attention_layernorm.weight"))?,
                gate: linear(&format!("{p}.mlp.gate_proj"))?,
                up: linear(&format!("{p}.mlp.up_proj"))?,
                down: linear(&format!("{p}.mlp.down_proj"))?,
            });
        }
        let embed = get("model.embed_tokens.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            get("lm_head.weight")?
        };
        let device = embed.device().clone();
        let (cos, sin) = rope_tables(&cfg, embed.dtype(), &device)?;
        Ok(Llama {
            norm: get("model.norm.weight")?,
            embed,
            layers,
            lm_head: Proj::Train(Linear {
                weight: lm_head,
                bias: None,
            }),
            cos,
            sin,
            params,
            cfg,
            lora: None,
            attention: AttentionKind::default(),
            compute: None,
            checkpointing: CheckpointFlag::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Chooses the attention implementation (default [`AttentionKind::Auto`]).
    pub fn set_attention(&mut self, kind: AttentionKind) {
        self.attention = kind;
    }

    /// The attention implementation.
    pub fn attention(&self) -> AttentionKind {
        self.attention
    }

    /// Turns activation checkpointing of every decoder layer on or off (default off).
    ///
    /// With it on, each layer keeps only its input between the forward and the backward pass
    /// and recomputes its activations during the backward (one more forward pass of compute);
    /// gradients are bitwise the same ([`crate::checkpointing`]). It takes a shared reference
    /// so that a memory controller can switch it between steps; it applies from the next
    /// forward pass.
    pub fn set_activation_checkpointing(&self, on: bool) {
        self.checkpointing.set(on);
    }

    /// Whether activation checkpointing is on.
    pub fn activation_checkpointing(&self) -> bool {
        self.checkpointing.get()
    }

    /// Runs the forward pass in `dtype` (mixed precision): parameters stay as they are (f32
    /// master weights), each is cast to `dtype` where it is used, and activations and matrix
    /// products are in `dtype`. Norms, softmax, RoPE, SwiGLU and cross entropy compute in f32
    /// inside their kernels ([`crate::ops`]); the loss is f32. The casts have a backward, so
    /// gradients reach the parameters in their own dtype.
    ///
    /// `dtype` must be f32, f64, bf16 or f16 ([`Error::UnsupportedDType`] otherwise).
    pub fn set_compute_dtype(&mut self, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::F64 | DType::BF16 | DType::F16) {
            return Err(Error::UnsupportedDType {
                op: "Llama compute dtype",
                dtype,
            });
        }
        self.compute = (dtype != self.dtype()).then_some(dtype);
        Ok(())
    }

    /// The dtype the forward pass computes in (the parameters' unless
    /// [`Llama::set_compute_dtype`] chose another).
    pub fn compute_dtype(&self) -> DType {
        self.compute.unwrap_or_else(|| self.dtype())
    }

    /// The trainable parameters.
    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// The parameters' element type.
    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]` (positions `0..seq`, causal).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_with_positions(ids, None)
    }

    /// Like [`Llama::forward`] with explicit RoPE positions (`[batch, seq]`, each below
    /// `max_position_embeddings`), e.g. restarting at every document of a packed row. The
    /// attention mask stays causal over the whole row.
    pub fn forward_with_positions(
        &self,
        ids: &Tensor,
        positions: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_impl(ids, positions, None)
    }

    /// Logits for packed rows: RoPE `positions` (`[batch, seq]`) restart at every document,
    /// and attention is causal *and* block-diagonal: a token sees only earlier tokens of its
    /// own document (`doc_ids`, one per position, row-major), so packed documents do not see
    /// each other. Runs the chunked attention kernel, which takes document masks; a sliding
    /// window together with document masks is [`Error::Unsupported`].
    pub fn forward_packed(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        doc_ids: &[u32],
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if doc_ids.len() != b * t {
            return Err(Error::ShapeMismatch {
                tensor: "doc_ids".to_string(),
                expected: vec![b, t],
                found: vec![doc_ids.len()],
            });
        }
        if self.cfg.attention_window().is_some_and(|w| w < t) {
            return Err(Error::Unsupported {
                what: "document masks together with a sliding attention window",
                issue: 6,
            });
        }
        self.forward_impl(ids, Some(positions), Some(Arc::new(doc_ids.to_vec())))
    }

    fn forward_impl(
        &self,
        ids: &Tensor,
        positions: Option<&Tensor>,
        docs: Option<Arc<Vec<u32>>>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t == 0 || t > self.cfg.max_position_embeddings {
            return Err(Error::SequenceTooLong {
                len: t,
                max: self.cfg.max_position_embeddings,
            });
        }
        if let Some(l) = &self.lora {
            l.begin_forward();
        }
        let h = self.cfg.hidden_size;
        let flat = crate::params::checked_ids(ids, self.cfg.vocab_size)?;
        let mut x = self
            .embed
            .index_select(&flat, 0)?
            .reshape((b, t, h))?
            .to_dtype(self.compute_dtype())?;
        let (cos, sin) = match positions {
            None => (self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?),
            Some(p) => {
                if p.dims() != [b, t] {
                    return Err(Error::ShapeMismatch {
                        tensor: "positions".to_string(),
                        expected: vec![b, t],
                        found: p.dims().to_vec(),
                    });
                }
                let idx = crate::params::checked_ids(p, self.cfg.max_position_embeddings)?;
                let half = self.cos.dim(1)?;
                (
                    self.cos.index_select(&idx, 0)?.reshape((b, t, half))?,
                    self.sin.index_select(&idx, 0)?.reshape((b, t, half))?,
                )
            }
        };
        if self.checkpointing.get() {
            // One shallow copy (shared tensors) that every checkpointed layer reads again
            // when it is recomputed during the backward pass.
            let model = Arc::new(self.clone());
            for i in 0..self.layers.len() {
                let prefix = format!("model.layers.{i}.");
                let params = self
                    .params
                    .iter()
                    .filter(|(n, _)| n.starts_with(&prefix))
                    .map(|(_, v)| v.as_tensor().clone())
                    .collect();
                let dropout = self.lora.as_ref().map(|l| l.dropout.clone());
                let block = LlamaBlock {
                    model: model.clone(),
                    index: i,
                    cos: cos.clone(),
                    sin: sin.clone(),
                    docs: docs.clone(),
                };
                x = checkpointing::checkpoint(Box::new(block), &x, params, dropout)?;
            }
        } else {
            for layer in &self.layers {
                x = self.layer_forward(layer, &x, &cos, &sin, docs.as_deref())?;
            }
        }
        let x = ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?;
        self.lm_head.forward(&x)
    }

    fn layer_forward(
        &self,
        l: &Layer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        docs: Option<&Vec<u32>>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let nh = cfg.num_attention_heads;
        let nkv = cfg.num_kv_heads();
        let hd = cfg.head_dim();
        let rep = nh / nkv;

        let hs = ops::rms_norm(x, &l.input_norm, cfg.rms_norm_eps)?;
        // [b, t, n * hd] -> [b, n, t, hd] as one node with a copy for backward (issue 9).
        let heads = |y: Tensor, n: usize| ops::split_heads(&y, n);
        let q = heads(l.q.forward(&hs)?, nh)?;
        let k = heads(l.k.forward(&hs)?, nkv)?;
        let v = heads(l.v.forward(&hs)?, nkv)?;
        let q = ops::rope(&q, cos, sin, RopeLayout::HalfSplit)?;
        let k = ops::rope(&k, cos, sin, RopeLayout::HalfSplit)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let attn = if let Some(d) = docs {
            let mask = AttentionMask {
                causal: true,
                key_valid: None,
                doc_ids: Some(d.clone()),
            };
            chunked_attention(&q, &k, &v, &mask, scale)?
        } else if self.attention.use_chunked(t, cfg.attention_window()) {
            chunked_attention(&q, &k, &v, &AttentionMask::causal(), scale)?
        } else {
            // Grouped-query attention without copying K/V: the `rep` query heads that share
            // a key/value head are stacked along the rows, [b, nkv, rep * t, hd].
            let q = q.reshape((b, nkv, rep * t, hd))?;
            let scores = q.matmul(&k.t()?)?;
            let probs = ops::causal_softmax(&scores, scale, t, cfg.attention_window())?;
            probs.matmul(&v)?.reshape((b, nh, t, hd))?
        };
        let attn = ops::merge_heads(&attn)?;
        let x = (x + l.o.forward(&attn)?)?;

        let hs = ops::rms_norm(&x, &l.post_norm, cfg.rms_norm_eps)?;
        let act = ops::swiglu(&l.gate.forward(&hs)?, &l.up.forward(&hs)?)?;
        Ok((x + l.down.forward(&act)?)?)
    }

    /// Mean next-token cross entropy of `logits` (`[batch, seq, vocab]`) against `labels`
    /// (`[batch, seq]`, usually the input ids): position `i` predicts `labels[i + 1]`. Labels
    /// equal to `-100` (Hugging Face's ignore index) and positions where `loss_mask` is zero
    /// are left out of the mean.
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

/// Decoder layer `index` of `model` with the RoPE tables of one forward pass, for
/// [`checkpointing`].
struct LlamaBlock {
    model: Arc<Llama>,
    index: usize,
    cos: Tensor,
    sin: Tensor,
    /// Document ids of a packed forward ([`Llama::forward_packed`]).
    docs: Option<Arc<Vec<u32>>>,
}

impl Block for LlamaBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let layer = self
            .model
            .layers
            .get(self.index)
            .ok_or_else(|| Error::MissingTensors {
                names: vec![format!("model.layers.{}", self.index)],
            })?;
        self.model
            .layer_forward(layer, x, &self.cos, &self.sin, self.docs.as_deref())
    }
}

/// Checks tensor names and shapes against what `cfg` needs.
pub(crate) fn check_names(cfg: &LlamaConfig, shapes: &HashMap<String, Vec<usize>>) -> Result<()> {
    let expected: Vec<(String, Vec<usize>)> = expected_tensors(cfg)
        .into_iter()
        .map(|(n, s, _)| (n, s))
        .collect();
    crate::params::check_tensor_names(&expected, shapes, |n| is_ignorable(cfg, n))
}

fn is_ignorable(cfg: &LlamaConfig, name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq") || (cfg.tie_word_embeddings && name == "lm_head.weight")
}

/// RoPE `cos`/`sin` tables `[max_position_embeddings, head_dim / 2]`, computed in f64.
fn rope_tables(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv = cfg.inv_freq();
    let n = cfg.max_position_embeddings;
    let half = inv.len();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for &f in &inv {
            // Same rounding as the reference: angle computed in f32.
            let a = f64::from(p as f32 * f as f32);
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}
