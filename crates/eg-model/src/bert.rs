//! A trainable BERT encoder with masked-LM, sequence-classification and mean-pooled
//! embedding heads.
//!
//! Post-LayerNorm blocks as in Hugging Face's `modeling_bert.py`; padding is an additive mask
//! on the attention scores; GELU is the exact (erf) one unless `hidden_act` says otherwise.
//!
//! Tensor names: `BertModel` checkpoints (e.g. sentence-transformers' all-MiniLM-L6-v2) have
//! no prefix (`encoder.layer.0.attention.self.query.weight`), task models prefix the encoder
//! with `bert.`; both load, and saving uses `bert.` when there is a task head. The pooler is
//! trainable only with the classification head on `[CLS]` pooling (nothing else uses it, so it
//! would get no gradient); otherwise it is carried along unchanged for the round trip.
//!
//! The classification head pools (the `[CLS]` token through the pooler, or the mean over the
//! attention mask, [`Pooling`]), applies seeded dropout and a linear layer to `num_labels`
//! logits ([`Bert::classify`]); [`Bert::with_classifier`] puts a fresh head on an encoder such
//! as all-MiniLM-L6-v2. Sentence embeddings are [`Bert::mean_pooled`]; the losses are in
//! [`crate::heads`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{D, DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::heads::{self, Dropout, Pooling};
use crate::hf::{CONFIG, Weights, save_dir, torch_dtype};
use crate::llama::Linear;
use crate::ops;
use crate::params::{Init, ParamStore, check_tensor_names, init_tensor};
use crate::{Error, Result};

fn default_eps() -> f64 {
    1e-12
}

fn default_type_vocab() -> usize {
    2
}

/// BERT configuration with Hugging Face `config.json` field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of learned positions.
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// `gelu` (erf, default), `gelu_new`/`gelu_pytorch_tanh` (tanh) or `relu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// Every other field, kept for the round trip.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

const REQUIRED: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
];

/// Which activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    GeluErf,
    GeluTanh,
    Relu,
}

impl BertConfig {
    /// A tiny BERT (hidden 32, 2 layers, 4 heads, vocab 64) for tests and examples.
    pub fn tiny_for_tests() -> Self {
        let mut extra = serde_json::Map::new();
        extra.insert("model_type".to_string(), "bert".into());
        BertConfig {
            vocab_size: 64,
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 48,
            max_position_embeddings: 32,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_act: Some("gelu".to_string()),
            extra,
        }
    }

    /// Parses `config.json` text; `path` is used in error messages only.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value = crate::config::config_object(text, path, REQUIRED)?;
        let cfg: BertConfig = crate::config::from_config_value(value, path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the sizes fit together.
    pub fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || self.hidden_size == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::InvalidConfig {
                field: "num_attention_heads",
                reason: format!(
                    "hidden_size {} is not divisible by {} heads",
                    self.hidden_size, self.num_attention_heads
                ),
            });
        }
        self.act().map(|_| ())
    }

    fn act(&self) -> Result<Act> {
        match self.hidden_act.as_deref() {
            None | Some("gelu") => Ok(Act::GeluErf),
            Some("gelu_new" | "gelu_pytorch_tanh") => Ok(Act::GeluTanh),
            Some("relu") => Ok(Act::Relu),
            Some(other) => Err(Error::InvalidConfig {
                field: "hidden_act",
                reason: format!("unsupported activation {other:?}"),
            }),
        }
    }
}

/// The task head on top of the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BertHead {
    /// The bare encoder (embeddings come from [`Bert::mean_pooled`]).
    None,
    /// Masked language modelling (`cls.predictions.*`, decoder tied to the word embeddings).
    MaskedLm,
    /// Sequence classification: pooling (with [`Pooling::Cls`], the pooler: dense + tanh on
    /// the first token), dropout and a linear classifier with `num_labels` outputs.
    SequenceClassification {
        /// Number of classes.
        num_labels: usize,
        /// How the sequence is pooled.
        pooling: Pooling,
    },
}

impl BertHead {
    /// Whether the head trains the pooler (`pooler.dense.*`).
    fn uses_pooler(self) -> bool {
        matches!(
            self,
            BertHead::SequenceClassification {
                pooling: Pooling::Cls,
                ..
            }
        )
    }
}

/// `config.json` key recording the classifier's pooling (absent: `cls`, Hugging Face's).
const POOLING_KEY: &str = "classifier_pooling";

fn encoder_tensors(cfg: &BertConfig) -> Vec<(String, Vec<usize>, Init)> {
    let h = cfg.hidden_size;
    let i = cfg.intermediate_size;
    let w = Init::Normal(0.02);
    let mut out = vec![
        (
            "embeddings.word_embeddings.weight".to_string(),
            vec![cfg.vocab_size, h],
            w,
        ),
        (
            "embeddings.position_embeddings.weight".to_string(),
            vec![cfg.max_position_embeddings, h],
            w,
        ),
        (
            "embeddings.token_type_embeddings.weight".to_string(),
            vec![cfg.type_vocab_size, h],
            w,
        ),
        (
            "embeddings.LayerNorm.weight".to_string(),
            vec![h],
            Init::Ones,
        ),
        (
            "embeddings.LayerNorm.bias".to_string(),
            vec![h],
            Init::Zeros,
        ),
    ];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{l}");
        for m in ["query", "key", "value"] {
            out.push((format!("{p}.attention.self.{m}.weight"), vec![h, h], w));
            out.push((format!("{p}.attention.self.{m}.bias"), vec![h], Init::Zeros));
        }
        out.extend([
            (format!("{p}.attention.output.dense.weight"), vec![h, h], w),
            (
                format!("{p}.attention.output.dense.bias"),
                vec![h],
                Init::Zeros,
            ),
            (
                format!("{p}.attention.output.LayerNorm.weight"),
                vec![h],
                Init::Ones,
            ),
            (
                format!("{p}.attention.output.LayerNorm.bias"),
                vec![h],
                Init::Zeros,
            ),
            (format!("{p}.intermediate.dense.weight"), vec![i, h], w),
            (format!("{p}.intermediate.dense.bias"), vec![i], Init::Zeros),
            (format!("{p}.output.dense.weight"), vec![h, i], w),
            (format!("{p}.output.dense.bias"), vec![h], Init::Zeros),
            (format!("{p}.output.LayerNorm.weight"), vec![h], Init::Ones),
            (format!("{p}.output.LayerNorm.bias"), vec![h], Init::Zeros),
        ]);
    }
    out
}

fn pooler_tensors(cfg: &BertConfig) -> Vec<(String, Vec<usize>, Init)> {
    let h = cfg.hidden_size;
    vec![
        (
            "pooler.dense.weight".to_string(),
            vec![h, h],
            Init::Normal(0.02),
        ),
        ("pooler.dense.bias".to_string(), vec![h], Init::Zeros),
    ]
}

fn head_tensors(cfg: &BertConfig, head: BertHead) -> Vec<(String, Vec<usize>, Init)> {
    let h = cfg.hidden_size;
    match head {
        BertHead::None => vec![],
        BertHead::MaskedLm => vec![
            (
                "cls.predictions.transform.dense.weight".to_string(),
                vec![h, h],
                Init::Normal(0.02),
            ),
            (
                "cls.predictions.transform.dense.bias".to_string(),
                vec![h],
                Init::Zeros,
            ),
            (
                "cls.predictions.transform.LayerNorm.weight".to_string(),
                vec![h],
                Init::Ones,
            ),
            (
                "cls.predictions.transform.LayerNorm.bias".to_string(),
                vec![h],
                Init::Zeros,
            ),
            (
                "cls.predictions.bias".to_string(),
                vec![cfg.vocab_size],
                Init::Zeros,
            ),
        ],
        BertHead::SequenceClassification {
            num_labels,
            pooling,
        } => {
            let mut v = if pooling == Pooling::Cls {
                pooler_tensors(cfg)
            } else {
                Vec::new()
            };
            v.push((
                "classifier.weight".to_string(),
                vec![num_labels, h],
                Init::Normal(0.02),
            ));
            v.push(("classifier.bias".to_string(), vec![num_labels], Init::Zeros));
            v
        }
    }
}

/// Strips the `bert.` prefix and maps old spellings to the names used here.
fn canonical(name: &str) -> String {
    let n = name.strip_prefix("bert.").unwrap_or(name);
    // Old TF-converted checkpoints spell LayerNorm parameters gamma/beta.
    n.replace("LayerNorm.gamma", "LayerNorm.weight")
        .replace("LayerNorm.beta", "LayerNorm.bias")
}

fn is_ignorable(name: &str) -> bool {
    name == "embeddings.position_ids"
        || name == "cls.predictions.decoder.weight"
        || name == "cls.predictions.decoder.bias"
        || name.starts_with("cls.seq_relationship")
}

#[derive(Debug, Clone)]
struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    attn_out: Linear,
    attn_ln: (Tensor, Tensor),
    inter: Linear,
    out: Linear,
    out_ln: (Tensor, Tensor),
}

/// A trainable BERT.
#[derive(Debug, Clone)]
pub struct Bert {
    cfg: BertConfig,
    head: BertHead,
    params: ParamStore,
    /// Tensors carried along but not trained (an unused pooler).
    frozen: BTreeMap<String, Tensor>,
    word: Tensor,
    pos: Tensor,
    token_type: Tensor,
    emb_ln: (Tensor, Tensor),
    layers: Vec<Layer>,
    act: Act,
}

impl Bert {
    /// A randomly initialised model with the given head, from `seed`.
    pub fn init(
        cfg: &BertConfig,
        head: BertHead,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let mut tensors = HashMap::new();
        for (name, shape, init) in encoder_tensors(cfg)
            .into_iter()
            .chain(head_tensors(cfg, head))
        {
            let t = init_tensor(seed, &name, &shape, init, dtype, device)?;
            tensors.insert(name, t);
        }
        Self::from_tensors(cfg, head, tensors, dtype)
    }

    /// Builds a model from named tensors (with or without the `bert.` prefix).
    pub fn from_tensors(
        cfg: &BertConfig,
        head: BertHead,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
    ) -> Result<Self> {
        cfg.validate()?;
        let mut tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(n, t)| (canonical(&n), t))
            .collect();
        if head == BertHead::MaskedLm
            && !tensors.contains_key("cls.predictions.bias")
            && let Some(b) = tensors.get("cls.predictions.decoder.bias").cloned()
        {
            tensors.insert("cls.predictions.bias".to_string(), b);
        }
        let trained: Vec<(String, Vec<usize>)> = encoder_tensors(cfg)
            .into_iter()
            .chain(head_tensors(cfg, head))
            .map(|(n, s, _)| (n, s))
            .collect();
        let mut expected = trained.clone();
        let carries_pooler = !head.uses_pooler() && tensors.contains_key("pooler.dense.weight");
        if carries_pooler {
            expected.extend(pooler_tensors(cfg).into_iter().map(|(n, s, _)| (n, s)));
        }
        let shapes = tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        check_tensor_names(&expected, &shapes, is_ignorable)?;
        let mut params = ParamStore::new();
        for (name, _) in &trained {
            let t = tensors.remove(name).ok_or_else(|| Error::MissingTensors {
                names: vec![name.clone()],
            })?;
            params.insert(name.clone(), Var::from_tensor(&t.to_dtype(dtype)?)?);
        }
        let mut frozen = BTreeMap::new();
        if carries_pooler {
            for (name, _, _) in pooler_tensors(cfg) {
                if let Some(t) = tensors.remove(&name) {
                    frozen.insert(name, t.to_dtype(dtype)?);
                }
            }
        }
        let get = |n: &str| -> Result<Tensor> {
            params
                .get(n)
                .map(|v| v.as_tensor().clone())
                .ok_or_else(|| Error::MissingTensors {
                    names: vec![n.to_string()],
                })
        };
        let lin = |p: &str| -> Result<Linear> {
            Ok(Linear {
                weight: get(&format!("{p}.weight"))?,
                bias: Some(get(&format!("{p}.bias"))?),
            })
        };
        let ln = |p: &str| -> Result<(Tensor, Tensor)> {
            Ok((get(&format!("{p}.weight"))?, get(&format!("{p}.bias"))?))
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            layers.push(Layer {
                q: lin(&format!("{p}.attention.self.query"))?,
                k: lin(&format!("{p}.attention.self.key"))?,
                v: lin(&format!("{p}.attention.self.value"))?,
                attn_out: lin(&format!("{p}.attention.output.dense"))?,
                attn_ln: ln(&format!("{p}.attention.output.LayerNorm"))?,
                inter: lin(&format!("{p}.intermediate.dense"))?,
                out: lin(&format!("{p}.output.dense"))?,
                out_ln: ln(&format!("{p}.output.LayerNorm"))?,
            });
        }
        Ok(Bert {
            word: get("embeddings.word_embeddings.weight")?,
            pos: get("embeddings.position_embeddings.weight")?,
            token_type: get("embeddings.token_type_embeddings.weight")?,
            emb_ln: ln("embeddings.LayerNorm")?,
            layers,
            act: cfg.act()?,
            cfg: cfg.clone(),
            head,
            params,
            frozen,
        })
    }

    /// Loads a Hugging Face BERT directory; the head is inferred from the tensor names
    /// (`cls.predictions.*`: masked LM; `classifier.*`: classification; else none).
    pub fn from_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let path = dir.join(CONFIG);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let cfg = BertConfig::from_json_str(&text, &path)?;
        let weights = Weights::open_dir(dir)?;
        let shapes = weights.shapes();
        let head = if shapes.contains_key("cls.predictions.transform.dense.weight") {
            BertHead::MaskedLm
        } else if let Some(s) = shapes.get("classifier.weight") {
            let pooling = match cfg.extra.get(POOLING_KEY).and_then(|v| v.as_str()) {
                None => Pooling::Cls,
                Some(name) => Pooling::from_name(name).ok_or_else(|| Error::InvalidConfig {
                    field: POOLING_KEY,
                    reason: format!("{name:?} is neither \"cls\" nor \"mean\""),
                })?,
            };
            BertHead::SequenceClassification {
                num_labels: s.first().copied().unwrap_or(0),
                pooling,
            }
        } else {
            BertHead::None
        };
        let mut tensors = HashMap::new();
        for name in shapes.keys() {
            tensors.insert(name.clone(), weights.load(name, dtype, device)?);
        }
        Self::from_tensors(&cfg, head, tensors, dtype)
    }

    /// Saves as a Hugging Face directory (encoder names prefixed `bert.` when there is a
    /// head, as the task models save them).
    pub fn save_hf_dir(&self, dir: &Path, max_shard_bytes: Option<u64>) -> Result<()> {
        let prefix = if self.head == BertHead::None {
            ""
        } else {
            "bert."
        };
        let mut out = BTreeMap::new();
        for (n, t) in self.params.tensors().into_iter().chain(self.frozen.clone()) {
            let name = if n.starts_with("cls.") || n.starts_with("classifier.") {
                n
            } else {
                format!("{prefix}{n}")
            };
            out.insert(name, t);
        }
        let mut cfg = self.cfg.clone();
        cfg.extra.insert("model_type".to_string(), "bert".into());
        cfg.extra.insert(
            "torch_dtype".to_string(),
            torch_dtype(self.word.dtype()).into(),
        );
        if let BertHead::SequenceClassification {
            num_labels,
            pooling,
        } = self.head
        {
            cfg.extra
                .insert("num_labels".to_string(), (num_labels as u64).into());
            cfg.extra
                .insert(POOLING_KEY.to_string(), pooling.name().into());
        }
        let json = serde_json::to_string_pretty(&cfg).map_err(Error::Json)?;
        save_dir(dir, out, &json, max_shard_bytes)
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// The head.
    pub fn head(&self) -> BertHead {
        self.head
    }

    /// The trainable parameters.
    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// Final hidden states `[batch, seq, hidden]`. `token_type_ids` default to zeros;
    /// `attention_mask` (`[batch, seq]`, 1 = token, 0 = padding) defaults to all ones.
    pub fn forward(
        &self,
        ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t == 0 || t > self.cfg.max_position_embeddings {
            return Err(Error::SequenceTooLong {
                len: t,
                max: self.cfg.max_position_embeddings,
            });
        }
        let h = self.cfg.hidden_size;
        let nh = self.cfg.num_attention_heads;
        let hd = h / nh;
        let eps = self.cfg.layer_norm_eps;
        let dev = ids.device();
        let flat = crate::params::checked_ids(ids, self.cfg.vocab_size)?;
        let tt = match token_type_ids {
            Some(tt) => crate::params::checked_ids(tt, self.cfg.type_vocab_size)?,
            None => Tensor::zeros(b * t, DType::U32, dev)?,
        };
        let x = (self.word.index_select(&flat, 0)? + self.token_type.index_select(&tt, 0)?)?
            .reshape((b, t, h))?
            .broadcast_add(&self.pos.narrow(0, 0, t)?)?;
        let mut x = ops::layer_norm(&x, &self.emb_ln.0, &self.emb_ln.1, eps)?;
        let dtype = x.dtype();
        // Additive padding mask [b, 1, 1, t]: 0 for tokens, the dtype's minimum for padding.
        let mask = match attention_mask {
            Some(m) => {
                if m.dims() != [b, t] {
                    return Err(Error::ShapeMismatch {
                        tensor: "attention_mask".to_string(),
                        expected: vec![b, t],
                        found: m.dims().to_vec(),
                    });
                }
                let keep = m.to_dtype(DType::F32)?;
                Some(
                    ((1.0 - keep)? * f64::from(f32::MIN))?
                        .to_dtype(dtype)?
                        .reshape((b, 1, 1, t))?,
                )
            }
            None => None,
        };
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &self.layers {
            let heads = |y: Tensor| -> Result<Tensor> {
                Ok(y.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let q = heads(l.q.forward(&x)?)?;
            let k = heads(l.k.forward(&x)?)?;
            let v = heads(l.v.forward(&x)?)?;
            let mut scores = (q.matmul(&k.t()?)? * scale)?;
            if let Some(m) = &mask {
                scores = scores.broadcast_add(m)?;
            }
            let probs = ops::softmax_last_dim(&scores)?;
            let a = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
            let y = (l.attn_out.forward(&a)? + &x)?;
            let attn = ops::layer_norm(&y, &l.attn_ln.0, &l.attn_ln.1, eps)?;
            let inter = self.activate(&l.inter.forward(&attn)?)?;
            let y = (l.out.forward(&inter)? + &attn)?;
            x = ops::layer_norm(&y, &l.out_ln.0, &l.out_ln.1, eps)?;
        }
        Ok(x)
    }

    fn activate(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.act {
            Act::GeluErf => x.gelu_erf()?,
            Act::GeluTanh => x.gelu()?,
            Act::Relu => x.relu()?,
        })
    }

    fn param(&self, name: &str) -> Result<Tensor> {
        self.params
            .get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or(Error::Unsupported {
                what: "this BERT head (the model was built with another head)",
                issue: 4,
            })
    }

    /// Masked-LM logits `[batch, seq, vocab]` from hidden states (needs
    /// [`BertHead::MaskedLm`]). Train with [`crate::ops::cross_entropy`] on the masked
    /// positions.
    pub fn mlm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let dense = Linear {
            weight: self.param("cls.predictions.transform.dense.weight")?,
            bias: Some(self.param("cls.predictions.transform.dense.bias")?),
        };
        let h = self.activate(&dense.forward(hidden)?)?;
        let h = ops::layer_norm(
            &h,
            &self.param("cls.predictions.transform.LayerNorm.weight")?,
            &self.param("cls.predictions.transform.LayerNorm.bias")?,
            self.cfg.layer_norm_eps,
        )?;
        let decoder = Linear {
            weight: self.word.clone(),
            bias: Some(self.param("cls.predictions.bias")?),
        };
        decoder.forward(&h)
    }

    /// Classification logits `[batch, num_labels]` from hidden states (needs
    /// [`BertHead::SequenceClassification`]): pooling ([`Pooling::Cls`]: the pooler, dense +
    /// tanh, on the first token; [`Pooling::Mean`]: the mean over the tokens `attention_mask`
    /// keeps), then `dropout` (none at evaluation), then the classifier.
    pub fn classify(
        &self,
        hidden: &Tensor,
        attention_mask: Option<&Tensor>,
        dropout: Option<Dropout>,
    ) -> Result<Tensor> {
        let BertHead::SequenceClassification { pooling, .. } = self.head else {
            return Err(Error::Unsupported {
                what: "classification with a BERT built without a classification head",
                issue: 6,
            });
        };
        let pooled = match pooling {
            Pooling::Cls => {
                let pooler = Linear {
                    weight: self.param("pooler.dense.weight")?,
                    bias: Some(self.param("pooler.dense.bias")?),
                };
                pooler.forward(&heads::first_token(hidden)?)?.tanh()?
            }
            Pooling::Mean => heads::mean_pool(hidden, attention_mask)?,
        };
        let pooled = heads::dropout(&pooled, dropout)?;
        let classifier = Linear {
            weight: self.param("classifier.weight")?,
            bias: Some(self.param("classifier.bias")?),
        };
        classifier.forward(&pooled)
    }

    /// This encoder with a classification head of `num_labels` classes on `pooling`. A
    /// classifier of that size is kept; otherwise a fresh one is initialised from `seed`, as
    /// is the pooler when [`Pooling::Cls`] needs one the checkpoint lacks (a masked-LM head
    /// is dropped).
    pub fn with_classifier(&self, num_labels: usize, pooling: Pooling, seed: u64) -> Result<Self> {
        if num_labels < 2 {
            return Err(Error::InvalidConfig {
                field: "num_labels",
                reason: format!("{num_labels} (a classifier needs at least 2 classes)"),
            });
        }
        let head = BertHead::SequenceClassification {
            num_labels,
            pooling,
        };
        let dtype = self.word.dtype();
        let device = self.word.device().clone();
        let mut tensors: HashMap<String, Tensor> = self
            .params
            .tensors()
            .into_iter()
            .chain(self.frozen.clone())
            .filter(|(n, _)| !n.starts_with("cls."))
            .collect();
        let keep_classifier = matches!(
            self.head,
            BertHead::SequenceClassification { num_labels: n, .. } if n == num_labels
        );
        if !keep_classifier {
            tensors.retain(|n, _| !n.starts_with("classifier."));
        }
        for (name, shape, init) in head_tensors(&self.cfg, head) {
            if let std::collections::hash_map::Entry::Vacant(e) = tensors.entry(name) {
                let t = init_tensor(seed, e.key(), &shape, init, dtype, &device)?;
                e.insert(t);
            }
        }
        Self::from_tensors(&self.cfg, head, tensors, dtype)
    }

    /// Mean of the hidden states over the non-padding tokens, `[batch, hidden]`
    /// (sentence-transformers' mean pooling), optionally L2-normalised.
    pub fn mean_pooled(
        &self,
        hidden: &Tensor,
        attention_mask: Option<&Tensor>,
        normalize: bool,
    ) -> Result<Tensor> {
        let pooled = match attention_mask {
            Some(m) => {
                let m = m.to_dtype(hidden.dtype())?.unsqueeze(2)?;
                let sum = hidden.broadcast_mul(&m)?.sum(1)?;
                let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
                sum.broadcast_div(&count)?
            }
            None => hidden.mean(1)?,
        };
        if normalize {
            let norm = pooled
                .sqr()?
                .sum_keepdim(D::Minus1)?
                .sqrt()?
                .clamp(1e-12, f64::MAX)?;
            Ok(pooled.broadcast_div(&norm)?)
        } else {
            Ok(pooled)
        }
    }
}
