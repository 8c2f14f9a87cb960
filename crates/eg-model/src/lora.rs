//! LoRA and QLoRA adapters for the Llama family, saved and loaded in the PEFT layout.
//!
//! [`crate::Llama::with_lora`] freezes the whole base model and injects a low-rank adapter
//! `W x + s · B A dropout(x)` (A `[r, in]`, B `[out, r]`, `s = alpha / r`, or
//! `alpha / sqrt(r)` with rsLoRA) into the linear layers its [`LoraTargets`] select. After it
//! the model's [`crate::ParamStore`] holds **only** the adapters (`...q_proj.lora_A.weight`,
//! `...lora_B.weight`), so a training loop that optimizes `params()` trains the adapters and
//! nothing else.
//!
//! The base is frozen without gradient storage. candle's backward computes and stores a
//! gradient for both operands of a `matmul` even when one of them is not a variable, so a
//! plain `x.matmul(w.t())` with a detached `w` would still allocate a weight-sized gradient
//! for every frozen layer. Frozen linear layers therefore run as one custom op
//! (`FrozenLinearOp`, exposed as [`dense_frozen_linear`] and [`quantized_linear`]) whose only graph input is `x`: the weight (dense, or quantized for
//! QLoRA, [`crate::quant`]) and the bias are captured in the op, and its backward returns
//! `dx = dy · W` and nothing else. The same op is the QLoRA path: the forward dequantizes row
//! tiles of the NF4/INT8 matrix on the fly, the backward dequantizes them again (candle's
//! `QMatMul` gives its input no gradient at all). Frozen norm weights get no gradient either
//! ([`crate::ops::rms_norm`] skips it for untracked weights), and the embeddings are never in
//! the graph.
//!
//! Initialisation follows PEFT: A is Kaiming-uniform with `a = sqrt(5)` (uniform in
//! `±1/sqrt(in)`), seeded per adapter name; B is zero, so the adapted model starts equal to
//! the base. Dropout on the adapter input draws its mask from `(seed, adapter name, forward
//! call number)`, so a run is reproducible (the call counter is not checkpointed: a resumed
//! run restarts the dropout stream).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, Var, WithDType};

use crate::llama::{Layer, Linear, Llama};
use crate::params::{ParamStore, stream_for};
use crate::quant::{QuantKind, QuantMatrix};
use crate::{Error, Result};

/// File name of the adapter weights in a PEFT directory.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// File name of the adapter configuration in a PEFT directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// Prefix PEFT puts before the base model's module names.
const PEFT_PREFIX: &str = "base_model.model.";

/// The linear layers of a GPT-2 block (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`,
/// `mlp.c_proj`).
pub const GPT2_LINEARS: [&str; 4] = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"];

/// The linear layers of a Llama decoder layer, in the order they are visited.
pub const LLAMA_LINEARS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Which linear layers get an adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoraTargets {
    /// Modules whose name is, or ends with `.` followed by, one of these (PEFT's rule for a
    /// list of names), e.g. `q_proj`, `v_proj` or `self_attn.o_proj`.
    Modules(Vec<String>),
    /// Every linear layer except the output head (PEFT's `"all-linear"`).
    AllLinear,
}

impl LoraTargets {
    /// Parses names; the single name `all-linear` selects every linear layer.
    pub fn from_names<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        if names.len() == 1 && names[0] == "all-linear" {
            LoraTargets::AllLinear
        } else {
            LoraTargets::Modules(names)
        }
    }

    fn matches(&self, module: &str) -> bool {
        match self {
            LoraTargets::AllLinear => true,
            LoraTargets::Modules(names) => names
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
        }
    }
}

/// A LoRA configuration (PEFT's `LoraConfig` fields that matter for training).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` of the update.
    pub rank: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// Dropout probability on the adapter input, in `[0, 1)`.
    pub dropout: f64,
    /// Which layers get adapters.
    pub targets: LoraTargets,
    /// rsLoRA: scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
}

impl LoraConfig {
    /// Rank `r`, `alpha = r`, no dropout, targets `q_proj` and `v_proj` (PEFT's defaults for
    /// Llama).
    pub fn rank(rank: usize) -> Self {
        Self {
            rank,
            alpha: rank as f64,
            dropout: 0.0,
            targets: LoraTargets::from_names(["q_proj", "v_proj"]),
            use_rslora: false,
        }
    }

    /// Sets `lora_alpha`.
    pub fn alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }

    /// Sets the dropout probability.
    pub fn dropout(mut self, p: f64) -> Self {
        self.dropout = p;
        self
    }

    /// Sets the targets (`["all-linear"]` for every linear layer).
    pub fn targets<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.targets = LoraTargets::from_names(names);
        self
    }

    /// Turns rsLoRA scaling on or off.
    pub fn rslora(mut self, on: bool) -> Self {
        self.use_rslora = on;
        self
    }

    /// From the validated `[model.lora]` section.
    pub fn from_config(c: &eg_config::LoraConfig) -> Self {
        Self {
            rank: c.rank.get() as usize,
            alpha: c.alpha,
            dropout: c.dropout.get(),
            targets: LoraTargets::from_names(c.targets.iter().cloned()),
            use_rslora: c.rslora,
        }
    }

    /// The factor `s` the update `B A x` is multiplied by.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::InvalidConfig {
                field: "lora.rank",
                reason: "the rank must be at least 1".to_string(),
            });
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::InvalidConfig {
                field: "lora.alpha",
                reason: format!("{} is not a positive finite number", self.alpha),
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::InvalidConfig {
                field: "lora.dropout",
                reason: format!("{} is outside [0, 1)", self.dropout),
            });
        }
        if let LoraTargets::Modules(m) = &self.targets
            && m.is_empty()
        {
            return Err(Error::InvalidConfig {
                field: "lora.targets",
                reason: "no target modules".to_string(),
            });
        }
        Ok(())
    }

    /// PEFT's `adapter_config.json` for these settings; `modules` are the short names that
    /// were adapted (written as `target_modules`).
    pub fn to_peft_json(&self, modules: &[String]) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": modules,
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "base_model_name_or_path": null,
            "revision": null,
            "use_dora": false,
        })
    }

    /// Reads PEFT's `adapter_config.json` (`r`, `lora_alpha`, `lora_dropout`,
    /// `target_modules` as a list or `"all-linear"`, `use_rslora`; `peft_type` must be
    /// `LORA`).
    pub fn from_peft_json(path: &Path, v: &serde_json::Value) -> Result<Self> {
        let missing = |field| Error::ConfigMissingField {
            path: path.to_path_buf(),
            field,
        };
        if let Some(t) = v.get("peft_type").and_then(|t| t.as_str())
            && t != "LORA"
        {
            return Err(Error::InvalidConfig {
                field: "peft_type",
                reason: format!("{t:?} is not \"LORA\""),
            });
        }
        let rank = v
            .get("r")
            .and_then(|r| r.as_u64())
            .ok_or_else(|| missing("r"))? as usize;
        let alpha = v
            .get("lora_alpha")
            .and_then(|a| a.as_f64())
            .ok_or_else(|| missing("lora_alpha"))?;
        let dropout = v
            .get("lora_dropout")
            .and_then(|a| a.as_f64())
            .unwrap_or(0.0);
        let targets = match v.get("target_modules") {
            Some(serde_json::Value::String(s)) => LoraTargets::from_names([s.clone()]),
            Some(serde_json::Value::Array(a)) => LoraTargets::Modules(
                a.iter()
                    .map(|s| s.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| missing("target_modules"))?,
            ),
            _ => return Err(missing("target_modules")),
        };
        let use_rslora = v
            .get("use_rslora")
            .and_then(|b| b.as_bool())
            .unwrap_or(false);
        let cfg = Self {
            rank,
            alpha,
            dropout,
            targets,
            use_rslora,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Dropout settings shared by all adapters of a model.
#[derive(Debug)]
pub(crate) struct DropoutState {
    p: f64,
    seed: u64,
    calls: AtomicU64,
    training: AtomicBool,
    /// Adapters skipped in the forward: the model computes its frozen base alone (DPO's
    /// reference model without a second copy).
    disabled: AtomicBool,
}

/// What a model with adapters remembers about them.
#[derive(Debug, Clone)]
pub(crate) struct LoraState {
    pub(crate) config: LoraConfig,
    pub(crate) dropout: Arc<DropoutState>,
    pub(crate) merged: bool,
    pub(crate) quant: Option<QuantKind>,
}

impl LoraState {
    /// Called once per forward pass: advances the dropout stream.
    pub(crate) fn begin_forward(&self) {
        self.dropout.calls.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where the dropout stream stood during one forward pass, so that activation checkpointing
/// ([`crate::checkpointing`]) replays the same masks when it recomputes a block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropoutPosition {
    calls: u64,
    training: bool,
}

impl DropoutState {
    /// The current position of the stream.
    pub(crate) fn position(&self) -> DropoutPosition {
        DropoutPosition {
            calls: self.calls.load(Ordering::Relaxed),
            training: self.training.load(Ordering::Relaxed),
        }
    }

    /// Moves the stream to `p` and returns where it was.
    pub(crate) fn seek(&self, p: DropoutPosition) -> DropoutPosition {
        DropoutPosition {
            calls: self.calls.swap(p.calls, Ordering::Relaxed),
            training: self.training.swap(p.training, Ordering::Relaxed),
        }
    }
}

/// A frozen base weight: dense or quantized.
#[derive(Debug, Clone)]
pub(crate) enum FrozenWeight {
    Dense(Tensor),
    Quant(Arc<QuantMatrix>),
}

/// A low-rank adapter on one linear layer.
#[derive(Debug, Clone)]
pub(crate) struct Adapter {
    name: String,
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: Arc<DropoutState>,
}

/// A linear layer of a model: trainable, or frozen with an optional adapter.
#[derive(Debug, Clone)]
pub(crate) enum Proj {
    Train(Linear),
    /// Trainable `x @ W + b` with `W` stored `[in, out]` (GPT-2's `Conv1D`).
    TrainInOut {
        weight: Tensor,
        bias: Tensor,
    },
    Frozen {
        weight: FrozenWeight,
        bias: Option<Tensor>,
        adapter: Option<Box<Adapter>>,
        merged: bool,
    },
}

impl From<Linear> for Proj {
    fn from(l: Linear) -> Self {
        Proj::Train(l)
    }
}

impl Proj {
    /// `x @ W^T + b (+ s · B A dropout(x))` over the last dimension of `x`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (weight, bias, adapter, merged) = match self {
            Proj::Train(l) => return l.forward(x),
            Proj::TrainInOut { weight, bias } => {
                let (inn, out) = weight.dims2()?;
                let rows = x.elem_count() / inn.max(1);
                let y = x
                    .reshape((rows, inn))?
                    .matmul(&weight.to_dtype(x.dtype())?)?
                    .broadcast_add(&bias.to_dtype(x.dtype())?)?;
                let mut shape = x.dims().to_vec();
                if let Some(last) = shape.last_mut() {
                    *last = out;
                }
                return Ok(y.reshape(shape)?);
            }
            Proj::Frozen {
                weight,
                bias,
                adapter,
                merged,
            } => (weight, bias, adapter, *merged),
        };
        let dims = x.dims().to_vec();
        let inn = dims.last().copied().unwrap_or(1);
        let rows = x.elem_count() / inn.max(1);
        let x2 = x.reshape((rows, inn))?.contiguous()?;
        let mut y = frozen_linear(&x2, weight, bias.as_ref())?;
        if let (Some(ad), false) = (adapter, merged)
            && !ad.dropout.disabled.load(Ordering::Relaxed)
        {
            let h = ad.dropout_input(&x2)?;
            // Adapters are f32 master weights; cast to the activation's dtype at use.
            let dt = h.dtype();
            let u = h
                .matmul(&ad.a.to_dtype(dt)?.t()?)?
                .matmul(&ad.b.to_dtype(dt)?.t()?)?;
            y = (y + u.affine(ad.scale, 0.0)?)?;
        }
        let mut shape = dims;
        if let Some(last) = shape.last_mut() {
            *last = y.dim(1)?;
        }
        Ok(y.reshape(shape)?)
    }

    pub(crate) fn freeze(&mut self) -> Result<()> {
        let frozen = match self {
            Proj::Train(l) => Proj::Frozen {
                weight: FrozenWeight::Dense(l.weight.detach()),
                bias: l.bias.as_ref().map(Tensor::detach),
                adapter: None,
                merged: false,
            },
            // One transposed copy, so the frozen op reads `[out, in]` rows contiguously.
            Proj::TrainInOut { weight, bias } => Proj::Frozen {
                weight: FrozenWeight::Dense(weight.detach().t()?.contiguous()?),
                bias: Some(bias.detach()),
                adapter: None,
                merged: false,
            },
            Proj::Frozen { .. } => return Ok(()),
        };
        *self = frozen;
        Ok(())
    }

    /// The base weight as a dense tensor (dequantized if needed), merged update included
    /// when merged.
    fn dense_weight(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Proj::Train(l) => Ok(l.weight.clone()),
            Proj::TrainInOut { weight, .. } => Ok(weight.t()?),
            Proj::Frozen {
                weight: FrozenWeight::Dense(w),
                ..
            } => Ok(w.clone()),
            Proj::Frozen {
                weight: FrozenWeight::Quant(q),
                ..
            } => q.dequantize(dtype, &candle_core::Device::Cpu),
        }
    }

    fn bias(&self) -> Option<&Tensor> {
        match self {
            Proj::Train(l) => l.bias.as_ref(),
            Proj::TrainInOut { bias, .. } => Some(bias),
            Proj::Frozen { bias, .. } => bias.as_ref(),
        }
    }

    fn adapter(&self) -> Option<&Adapter> {
        match self {
            Proj::Frozen { adapter, .. } => adapter.as_deref(),
            Proj::Train(_) | Proj::TrainInOut { .. } => None,
        }
    }
}

impl Adapter {
    /// `s · B A` as a `[out, in]` matrix.
    fn delta(&self) -> Result<Tensor> {
        Ok(self.b.matmul(&self.a)?.affine(self.scale, 0.0)?)
    }

    fn dropout_input(&self, x: &Tensor) -> Result<Tensor> {
        let d = &self.dropout;
        if d.p <= 0.0 || !d.training.load(Ordering::Relaxed) {
            return Ok(x.clone());
        }
        let call = d.calls.load(Ordering::Relaxed);
        let mut rng = stream_for(d.seed ^ call.rotate_left(32), &self.name);
        let keep = 1.0 / (1.0 - d.p);
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                if u < d.p { 0.0 } else { keep as f32 }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        dropout_with_mask(x, &mask)
    }
}

// ---------------------------------------------------------------------------------------------
// Ops

/// The frozen linear op: `y = x W^T + b` where only `x` is a graph input.
struct FrozenLinearOp {
    weight: FrozenWeight,
    bias: Option<Tensor>,
}

fn cpu_err(op: &'static str) -> candle_core::Error {
    candle_core::Error::RequiresContiguous { op }
}

/// Runs `f` on the CPU storage and layout of `t`.
fn with_cpu<R>(
    t: &Tensor,
    op: &'static str,
    f: impl FnOnce(&CpuStorage, &Layout) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(c) => f(c, l),
        _ => Err(candle_core::Error::Msg(format!(
            "{op}: only the CPU is supported"
        ))),
    }
}

fn add_bias<T: WithDType>(y: &mut [T], b: &[T]) {
    for row in y.chunks_mut(b.len().max(1)) {
        for (v, &bb) in row.iter_mut().zip(b) {
            *v += bb;
        }
    }
}

impl FrozenLinearOp {
    fn fwd_t<T: WithDType>(
        &self,
        s: &CpuStorage,
        l: &Layout,
        rows: usize,
        k: usize,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = "eg-frozen-linear";
        let mut y: Vec<T> = match &self.weight {
            FrozenWeight::Dense(w) => {
                let n = w.dim(0)?;
                let out = with_cpu(w, name, |ws, wl| {
                    let wt = wl.transpose(0, 1)?;
                    s.matmul(ws, (1, rows, n, k), l, &wt)
                })?;
                T::cpu_storage_as_slice(&out)?.to_vec()
            }
            FrozenWeight::Quant(q) => {
                let (n, _) = q.shape();
                let mut y = vec![T::from_f64(0.0); rows * n];
                let tile = q.tile_rows();
                let mut buf = vec![0f32; tile * k];
                let mut r0 = 0;
                while r0 < n {
                    let r1 = (r0 + tile).min(n);
                    let nt = r1 - r0;
                    q.dequantize_rows(r0, r1, &mut buf[..nt * k])
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                    let wt: Vec<T> = buf[..nt * k]
                        .iter()
                        .map(|&v| T::from_f64(f64::from(v)))
                        .collect();
                    let ws = T::to_cpu_storage_owned(wt);
                    let wl = Layout::contiguous((nt, k)).transpose(0, 1)?;
                    let out = s.matmul(&ws, (1, rows, nt, k), l, &wl)?;
                    let out = T::cpu_storage_as_slice(&out)?;
                    for r in 0..rows {
                        y[r * n + r0..r * n + r1].copy_from_slice(&out[r * nt..(r + 1) * nt]);
                    }
                    r0 = r1;
                }
                y
            }
        };
        let n = y.len() / rows.max(1);
        if let Some(b) = &self.bias {
            let b = b.contiguous()?;
            with_cpu(&b, name, |bs, bl| {
                let bv = T::cpu_storage_as_slice(bs)?;
                let (o0, o1) = bl.contiguous_offsets().ok_or_else(|| cpu_err(name))?;
                add_bias(&mut y, &bv[o0..o1]);
                Ok(())
            })?;
        }
        Ok((T::to_cpu_storage_owned(y), Shape::from((rows, n))))
    }
}

impl CustomOp1 for FrozenLinearOp {
    fn name(&self) -> &'static str {
        "eg-frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, k) = l.shape().dims2()?;
        if !l.is_contiguous() {
            return Err(cpu_err(self.name()));
        }
        match s {
            CpuStorage::F32(_) => self.fwd_t::<f32>(s, l, rows, k),
            CpuStorage::F64(_) => self.fwd_t::<f64>(s, l, rows, k),
            CpuStorage::BF16(_) if matches!(self.weight, FrozenWeight::Dense(_)) => {
                self.fwd_t::<half::bf16>(s, l, rows, k)
            }
            CpuStorage::F16(_) if matches!(self.weight, FrozenWeight::Dense(_)) => {
                self.fwd_t::<half::f16>(s, l, rows, k)
            }
            other => Err(candle_core::Error::UnsupportedDTypeForOp(
                other.dtype(),
                self.name(),
            )),
        }
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let dx = match &self.weight {
            FrozenWeight::Dense(w) => grad.matmul(w)?,
            FrozenWeight::Quant(q) => {
                let (n, k) = q.shape();
                let rows = grad.dim(0)?;
                let mut dx = Tensor::zeros((rows, k), grad.dtype(), grad.device())?;
                let tile = q.tile_rows();
                let mut r0 = 0;
                while r0 < n {
                    let r1 = (r0 + tile).min(n);
                    let mut buf = vec![0f32; (r1 - r0) * k];
                    q.dequantize_rows(r0, r1, &mut buf)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                    let wt = Tensor::from_vec(buf, (r1 - r0, k), grad.device())?
                        .to_dtype(grad.dtype())?;
                    let g = grad.narrow(1, r0, r1 - r0)?.contiguous()?;
                    dx = (dx + g.matmul(&wt)?)?;
                    r0 = r1;
                }
                dx
            }
        };
        Ok(Some(dx))
    }
}

/// `x @ W^T + b` for a frozen `W` (dense or quantized) and `b`, with a gradient for `x` only:
/// neither the weight nor the bias is a graph input, so they never get gradient storage.
/// `x` is `[rows, in]`; half-precision inputs with a quantized weight are computed in f32.
pub(crate) fn frozen_linear(
    x: &Tensor,
    weight: &FrozenWeight,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (_, k) = x.dims2()?;
    let (n, wk) = match weight {
        FrozenWeight::Dense(w) => w.dims2()?,
        FrozenWeight::Quant(q) => q.shape(),
    };
    if wk != k {
        return Err(Error::ShapeMismatch {
            tensor: "frozen linear input".to_string(),
            expected: vec![wk],
            found: x.dims().to_vec(),
        });
    }
    if let Some(b) = bias
        && b.dims() != [n]
    {
        return Err(Error::ShapeMismatch {
            tensor: "frozen linear bias".to_string(),
            expected: vec![n],
            found: b.dims().to_vec(),
        });
    }
    let half = matches!(x.dtype(), DType::BF16 | DType::F16);
    let quant = matches!(weight, FrozenWeight::Quant(_));
    let (xw, back) = if half && quant {
        (x.to_dtype(DType::F32)?, Some(x.dtype()))
    } else {
        (x.clone(), None)
    };
    let op = FrozenLinearOp {
        weight: match weight {
            FrozenWeight::Dense(w) => FrozenWeight::Dense(w.to_dtype(xw.dtype())?.contiguous()?),
            q => q.clone(),
        },
        bias: bias.map(|b| b.to_dtype(xw.dtype())).transpose()?,
    };
    let y = xw.contiguous()?.apply_op1(op)?;
    Ok(match back {
        Some(dt) => y.to_dtype(dt)?,
        None => y,
    })
}

/// Public entry to the frozen linear op for tests and benchmarks: `x @ W^T` (`x` is
/// `[rows, in]`) with a quantized `W` and a gradient for `x` only.
pub fn quantized_linear(x: &Tensor, w: &Arc<QuantMatrix>) -> Result<Tensor> {
    frozen_linear(x, &FrozenWeight::Quant(w.clone()), None)
}

/// Public entry to the frozen linear op with a dense `W` (`[out, in]`, not a graph input)
/// and optional bias: `x @ W^T + b` with a gradient for `x` only.
pub fn dense_frozen_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    frozen_linear(x, &FrozenWeight::Dense(w.detach()), bias)
}

struct DropoutOp {
    mask: Tensor,
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "eg-lora-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn go<T: WithDType>(
            s: &CpuStorage,
            l: &Layout,
            mask: &Tensor,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            let x = T::cpu_storage_as_slice(s)?;
            let (a, b) = l
                .contiguous_offsets()
                .ok_or_else(|| cpu_err("eg-lora-dropout"))?;
            let y = with_cpu(mask, "eg-lora-dropout", |ms, ml| {
                let m = T::cpu_storage_as_slice(ms)?;
                let (c, d) = ml
                    .contiguous_offsets()
                    .ok_or_else(|| cpu_err("eg-lora-dropout"))?;
                Ok(x[a..b]
                    .iter()
                    .zip(&m[c..d])
                    .map(|(&x, &m)| x * m)
                    .collect::<Vec<T>>())
            })?;
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        }
        match s {
            CpuStorage::F32(_) => go::<f32>(s, l, &self.mask),
            CpuStorage::F64(_) => go::<f64>(s, l, &self.mask),
            CpuStorage::BF16(_) => go::<half::bf16>(s, l, &self.mask),
            CpuStorage::F16(_) => go::<half::f16>(s, l, &self.mask),
            other => Err(candle_core::Error::UnsupportedDTypeForOp(
                other.dtype(),
                self.name(),
            )),
        }
    }

    fn bwd(&self, _x: &Tensor, _r: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.mul(&self.mask)?))
    }
}

/// `x * mask` with a gradient for `x` only (the mask holds 0 or `1 / (1 - p)`).
pub fn dropout_with_mask(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if x.dims() != mask.dims() {
        return Err(Error::ShapeMismatch {
            tensor: "dropout mask".to_string(),
            expected: x.dims().to_vec(),
            found: mask.dims().to_vec(),
        });
    }
    let op = DropoutOp {
        mask: mask.to_dtype(x.dtype())?.contiguous()?.detach(),
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

// ---------------------------------------------------------------------------------------------
// Llama with adapters

fn layer_projs_mut(l: &mut Layer) -> [(&'static str, &mut Proj); 7] {
    [
        ("self_attn.q_proj", &mut l.q),
        ("self_attn.k_proj", &mut l.k),
        ("self_attn.v_proj", &mut l.v),
        ("self_attn.o_proj", &mut l.o),
        ("mlp.gate_proj", &mut l.gate),
        ("mlp.up_proj", &mut l.up),
        ("mlp.down_proj", &mut l.down),
    ]
}

fn layer_projs(l: &Layer) -> [(&'static str, &Proj); 7] {
    [
        ("self_attn.q_proj", &l.q),
        ("self_attn.k_proj", &l.k),
        ("self_attn.v_proj", &l.v),
        ("self_attn.o_proj", &l.o),
        ("mlp.gate_proj", &l.gate),
        ("mlp.up_proj", &l.up),
        ("mlp.down_proj", &l.down),
    ]
}

/// Kaiming-uniform (`a = sqrt(5)`) as PEFT initialises `lora_A`: uniform in `±1/sqrt(in)`.
fn kaiming_a(seed: u64, name: &str, rank: usize, fan_in: usize, dtype: DType) -> Result<Tensor> {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    let mut rng = stream_for(seed, name);
    let v: Vec<f64> = (0..rank * fan_in)
        .map(|_| ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * bound)
        .collect();
    Ok(Tensor::from_vec(v, (rank, fan_in), &candle_core::Device::Cpu)?.to_dtype(dtype)?)
}

/// Freezes every projection and adds adapters to those `cfg` selects; returns the adapters
/// (in order, `{module}.lora_A.weight` then `lora_B.weight`) and the shared dropout state.
/// `available` names the architecture's linear layers for the error message.
pub(crate) fn inject(
    projs: Vec<(String, &mut Proj)>,
    available: &[&str],
    cfg: &LoraConfig,
    seed: u64,
    dtype: DType,
) -> Result<(ParamStore, Arc<DropoutState>)> {
    cfg.validate()?;
    if let LoraTargets::Modules(names) = &cfg.targets {
        for t in names {
            let one = LoraTargets::Modules(vec![t.clone()]);
            if !projs.iter().any(|(n, _)| one.matches(n)) {
                return Err(Error::LoraTargetNotFound {
                    target: t.clone(),
                    available: available.iter().map(|s| s.to_string()).collect(),
                });
            }
        }
    }
    let dropout = Arc::new(DropoutState {
        p: cfg.dropout,
        seed,
        calls: AtomicU64::new(0),
        training: AtomicBool::new(true),
        disabled: AtomicBool::new(false),
    });
    let mut params = ParamStore::new();
    let scale = cfg.scaling();
    for (module, proj) in projs {
        proj.freeze()?;
        if !cfg.targets.matches(&module) {
            continue;
        }
        if let Proj::Frozen {
            weight, adapter, ..
        } = proj
        {
            let (out, inn) = match weight {
                FrozenWeight::Dense(w) => w.dims2()?,
                FrozenWeight::Quant(q) => q.shape(),
            };
            let a_name = format!("{module}.lora_A.weight");
            let b_name = format!("{module}.lora_B.weight");
            let a = Var::from_tensor(&kaiming_a(seed, &a_name, cfg.rank, inn, dtype)?)?;
            let b = Var::from_tensor(&Tensor::zeros(
                (out, cfg.rank),
                dtype,
                &candle_core::Device::Cpu,
            )?)?;
            *adapter = Some(Box::new(Adapter {
                name: module.clone(),
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale,
                dropout: dropout.clone(),
            }));
            params.insert(a_name, a);
            params.insert(b_name, b);
        }
    }
    Ok((params, dropout))
}

/// Adds (`to`) or subtracts the adapters' update into the dense frozen weights.
pub(crate) fn merge_projs(projs: Vec<&mut Proj>, to: bool) -> Result<()> {
    for proj in projs {
        if let Proj::Frozen {
            weight: FrozenWeight::Dense(w),
            adapter: Some(ad),
            merged,
            ..
        } = proj
        {
            let d = ad.delta()?.detach().to_dtype(w.dtype())?;
            *w = if to { (&*w + d)? } else { (&*w - d)? }.detach();
            *merged = to;
        }
    }
    Ok(())
}

/// Writes `adapter_model.safetensors` and `adapter_config.json` for `params`.
pub(crate) fn save_adapter(
    dir: &Path,
    params: &ParamStore,
    cfg: &LoraConfig,
    fan_in_fan_out: bool,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut tensors = BTreeMap::new();
    let mut modules: Vec<String> = Vec::new();
    for (name, var) in params.iter() {
        tensors.insert(format!("{PEFT_PREFIX}{name}"), var.as_tensor().detach());
        if let Some(short) = name
            .strip_suffix(".lora_A.weight")
            .and_then(|m| m.rsplit('.').next())
            && !modules.iter().any(|m| m == short)
        {
            modules.push(short.to_string());
        }
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    crate::safetensors::write(&dir.join(ADAPTER_WEIGHTS), &tensors, &meta)?;
    let mut json = cfg.to_peft_json(&modules);
    json["fan_in_fan_out"] = serde_json::Value::Bool(fan_in_fan_out);
    let text = serde_json::to_string_pretty(&json).map_err(Error::Json)?;
    crate::safetensors::write_atomic(&dir.join(ADAPTER_CONFIG), |w| {
        use std::io::Write;
        w.write_all(text.as_bytes())
    })
}

impl Llama {
    /// Freezes the whole model and adds LoRA adapters to the linear layers `cfg` selects;
    /// `seed` fixes `lora_A`'s initialisation and the dropout masks. Afterwards
    /// [`Llama::params`] holds only the adapters, named
    /// `model.layers.{i}.self_attn.q_proj.lora_A.weight` / `lora_B.weight`.
    ///
    /// Fails with [`Error::LoraTargetNotFound`] when a target matches no layer and
    /// [`Error::LoraState`] when the model already has adapters.
    pub fn with_lora(mut self, cfg: &LoraConfig, seed: u64) -> Result<Self> {
        if self.lora.is_some() {
            return Err(Error::LoraState {
                op: "with_lora",
                reason: "the model already has adapters",
            });
        }
        let dtype = self.dtype();
        let mut projs = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.input_norm = layer.input_norm.detach();
            layer.post_norm = layer.post_norm.detach();
            for (short, proj) in layer_projs_mut(layer) {
                projs.push((format!("model.layers.{i}.{short}"), proj));
            }
        }
        let (params, dropout) = inject(projs, &LLAMA_LINEARS, cfg, seed, dtype)?;
        self.embed = self.embed.detach();
        self.norm = self.norm.detach();
        self.lm_head.freeze()?;
        self.params = params;
        self.lora = Some(Box::new(LoraState {
            config: cfg.clone(),
            dropout,
            merged: false,
            quant: None,
        }));
        Ok(self)
    }

    /// QLoRA: [`Llama::with_lora`], then every decoder linear layer's frozen weight is
    /// quantized as `quant` (NF4 or INT8) and its dense copy dropped. Embeddings, norms and
    /// the output head stay dense (as bitsandbytes does).
    pub fn with_qlora(self, cfg: &LoraConfig, quant: QuantKind, seed: u64) -> Result<Self> {
        let mut m = self.with_lora(cfg, seed)?;
        for layer in &mut m.layers {
            for (_, proj) in layer_projs_mut(layer) {
                if let Proj::Frozen { weight, .. } = proj
                    && let FrozenWeight::Dense(w) = weight
                {
                    let q = QuantMatrix::quantize(w, quant)?;
                    *weight = FrozenWeight::Quant(Arc::new(q));
                }
            }
        }
        if let Some(l) = &mut m.lora {
            l.quant = Some(quant);
        }
        Ok(m)
    }

    /// The same model as `Llama::init(cfg, seed, ..)?.with_qlora(lora, quant, lora_seed)`
    /// (bitwise: initial values depend only on the seed and each tensor's name), built layer
    /// by layer so that no more than one dense decoder layer exists at a time: peak memory is
    /// the quantized base plus one layer, not the whole dense model.
    pub fn init_qlora(
        cfg: &crate::LlamaConfig,
        seed: u64,
        dtype: DType,
        lora: &LoraConfig,
        quant: QuantKind,
        lora_seed: u64,
    ) -> Result<Self> {
        cfg.validate()?;
        let device = candle_core::Device::Cpu;
        let one = crate::LlamaConfig {
            num_hidden_layers: 1,
            ..cfg.clone()
        };
        let mut m = Llama::init(&one, seed, dtype, &device)?;
        m.layers.clear();
        let expected = crate::llama::expected_tensors(cfg);
        for l in 0..cfg.num_hidden_layers {
            let prefix = format!("model.layers.{l}.");
            let mut t = HashMap::new();
            for (name, shape, init) in expected.iter().filter(|(n, _, _)| n.starts_with(&prefix)) {
                let short = name[prefix.len()..].to_string();
                let v = crate::params::init_tensor(seed, name, shape, *init, dtype, &device)?;
                t.insert(short, v);
            }
            let mut take = |n: &str| -> Result<Tensor> {
                t.remove(n).ok_or_else(|| Error::MissingTensors {
                    names: vec![format!("{prefix}{n}")],
                })
            };
            let mut proj = |p: &str| -> Result<Proj> {
                let w = take(&format!("{p}.weight"))?;
                let bias = take(&format!("{p}.bias")).ok();
                Ok(Proj::Frozen {
                    weight: FrozenWeight::Quant(Arc::new(QuantMatrix::quantize(&w, quant)?)),
                    bias,
                    adapter: None,
                    merged: false,
                })
            };
            let layer = Layer {
                q: proj("self_attn.q_proj")?,
                k: proj("self_attn.k_proj")?,
                v: proj("self_attn.v_proj")?,
                o: proj("self_attn.o_proj")?,
                gate: proj("mlp.gate_proj")?,
                up: proj("mlp.up_proj")?,
                down: proj("mlp.down_proj")?,
                input_norm: take("input_layernorm.weight")?,
                post_norm: take("post_attention_layernorm.weight")?,
            };
            m.layers.push(layer);
        }
        m.cfg = cfg.clone();
        let mut m = m.with_lora(lora, lora_seed)?;
        if let Some(l) = &mut m.lora {
            l.quant = Some(quant);
        }
        Ok(m)
    }

    /// The LoRA configuration, when the model has adapters.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref().map(|l| &l.config)
    }

    /// Turns adapter dropout on (training, the default) or off (evaluation).
    pub fn set_lora_training(&self, training: bool) {
        if let Some(l) = &self.lora {
            l.dropout.training.store(training, Ordering::Relaxed);
        }
    }

    /// Turns the adapters off (the forward computes the frozen base alone, e.g. as DPO's
    /// reference model, with no second copy of the weights) or back on. Fails without
    /// adapters, or while they are merged into the base (the base then includes them).
    pub fn set_adapters_enabled(&self, enabled: bool) -> Result<()> {
        let l = self.lora.as_ref().ok_or(Error::LoraState {
            op: "set_adapters_enabled",
            reason: "the model has no adapters",
        })?;
        if l.merged {
            return Err(Error::LoraState {
                op: "set_adapters_enabled",
                reason: "the adapters are merged into the base",
            });
        }
        l.dropout.disabled.store(!enabled, Ordering::Relaxed);
        Ok(())
    }

    /// Whether the adapters run in the forward (false without adapters).
    pub fn adapters_enabled(&self) -> bool {
        self.lora
            .as_ref()
            .is_some_and(|l| !l.merged && !l.dropout.disabled.load(Ordering::Relaxed))
    }

    /// Bytes held by the frozen base: dense tensors at their dtype, quantized matrices at
    /// their packed size.
    pub fn frozen_base_bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let proj = |p: &Proj| match p {
            Proj::Train(l) => dense(&l.weight) + l.bias.as_ref().map_or(0, dense),
            Proj::TrainInOut { weight, bias } => dense(weight) + dense(bias),
            Proj::Frozen { weight, bias, .. } => {
                bias.as_ref().map_or(0, dense)
                    + match weight {
                        FrozenWeight::Dense(w) => dense(w),
                        FrozenWeight::Quant(q) => q.storage_bytes(),
                    }
            }
        };
        let mut n = dense(&self.embed) + dense(&self.norm);
        if !self.cfg.tie_word_embeddings {
            n += proj(&self.lm_head);
        }
        for l in &self.layers {
            n += dense(&l.input_norm) + dense(&l.post_norm);
            n += layer_projs(l).iter().map(|(_, p)| proj(p)).sum::<usize>();
        }
        n
    }

    /// The frozen base weight of a linear layer (e.g. `model.layers.0.self_attn.q_proj`), as
    /// a dense tensor (dequantized for QLoRA; merged updates included while merged); `None`
    /// when there is no such layer.
    pub fn frozen_weight(&self, module: &str) -> Result<Option<Tensor>> {
        let dtype = self.dtype();
        if module == "lm_head" {
            return Ok(Some(self.lm_head.dense_weight(dtype)?));
        }
        for (i, l) in self.layers.iter().enumerate() {
            for (short, proj) in layer_projs(l) {
                if format!("model.layers.{i}.{short}") == module {
                    return Ok(Some(proj.dense_weight(dtype)?));
                }
            }
        }
        Ok(None)
    }

    fn lora_mut(&mut self, op: &'static str) -> Result<&mut LoraState> {
        self.lora.as_deref_mut().ok_or(Error::LoraState {
            op,
            reason: "the model has no adapters",
        })
    }

    /// Adds `s · B A` into each adapted dense base weight, so the forward no longer runs the
    /// adapters (the same function, one matmul less per layer). Quantized bases cannot be
    /// merged in place (use [`Llama::merge_and_unload`]).
    pub fn merge_lora(&mut self) -> Result<()> {
        self.set_merged(true, "merge_lora")
    }

    /// Subtracts the merged update again (equal to the unmerged weights up to rounding).
    pub fn unmerge_lora(&mut self) -> Result<()> {
        self.set_merged(false, "unmerge_lora")
    }

    fn set_merged(&mut self, to: bool, op: &'static str) -> Result<()> {
        let state = self.lora_mut(op)?;
        if state.merged == to {
            return Err(Error::LoraState {
                op,
                reason: if to {
                    "the adapters are already merged"
                } else {
                    "the adapters are not merged"
                },
            });
        }
        if state.quant.is_some() {
            return Err(Error::LoraState {
                op,
                reason: "a quantized base cannot be merged in place; use merge_and_unload",
            });
        }
        state.merged = to;
        let projs = self
            .layers
            .iter_mut()
            .flat_map(|l| layer_projs_mut(l).map(|(_, p)| p))
            .collect();
        merge_projs(projs, to)?;
        Ok(())
    }

    /// A plain trainable model whose weights are the base plus the merged adapters
    /// (quantized bases dequantized), e.g. for export as a Hugging Face directory.
    pub fn merge_and_unload(&self) -> Result<Llama> {
        let dtype = self.dtype();
        let mut t: HashMap<String, Tensor> = HashMap::new();
        t.insert("model.embed_tokens.weight".into(), self.embed.clone());
        t.insert("model.norm.weight".into(), self.norm.clone());
        if !self.cfg.tie_word_embeddings {
            t.insert("lm_head.weight".into(), self.lm_head.dense_weight(dtype)?);
        }
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            t.insert(format!("{p}.input_layernorm.weight"), l.input_norm.clone());
            t.insert(
                format!("{p}.post_attention_layernorm.weight"),
                l.post_norm.clone(),
            );
            for (short, proj) in layer_projs(l) {
                let mut w = proj.dense_weight(dtype)?;
                let merged = matches!(proj, Proj::Frozen { merged: true, .. });
                if let (Some(ad), false) = (proj.adapter(), merged) {
                    w = (w + ad.delta()?.to_dtype(dtype)?)?;
                }
                t.insert(format!("{p}.{short}.weight"), w.detach());
                if let Some(b) = proj.bias() {
                    t.insert(format!("{p}.{short}.bias"), b.clone());
                }
            }
        }
        Llama::from_tensors(&self.cfg, t, dtype)
    }

    /// Saves the adapters in the PEFT layout: `adapter_model.safetensors` with tensors named
    /// `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, ..., and
    /// `adapter_config.json`. Both files are written atomically.
    pub fn save_lora_adapter(&self, dir: &Path) -> Result<()> {
        let state = self.lora.as_ref().ok_or(Error::LoraState {
            op: "save_lora_adapter",
            reason: "the model has no adapters",
        })?;
        save_adapter(dir, &self.params, &state.config, false)
    }

    /// Loads a PEFT LoRA adapter directory onto this (plain) model: reads
    /// `adapter_config.json`, injects adapters as [`Llama::with_lora`] does and sets their
    /// values from `adapter_model.safetensors` (names with or without PEFT's `.default`
    /// adapter name). Every adapter must be present with its shape, and no other tensor.
    pub fn load_lora_adapter(self, dir: &Path) -> Result<Self> {
        let cpath = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&cpath).map_err(|source| Error::Io {
            path: cpath.clone(),
            source,
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::ConfigParse {
                path: cpath.clone(),
                source,
            })?;
        let cfg = LoraConfig::from_peft_json(&cpath, &v)?;
        let m = self.with_lora(&cfg, 0)?;
        let file = crate::safetensors::SafetensorsFile::open(&dir.join(ADAPTER_WEIGHTS))?;
        let dtype = m.dtype();
        let mut values = HashMap::new();
        for name in file.tensors().keys() {
            let short = name.strip_prefix(PEFT_PREFIX).unwrap_or(name);
            let short = short
                .replace(".lora_A.default.weight", ".lora_A.weight")
                .replace(".lora_B.default.weight", ".lora_B.weight");
            values.insert(short, file.load(name, dtype, m.device())?);
        }
        m.params.set_values(&values)?;
        Ok(m)
    }
}

impl crate::gpt2::Gpt2 {
    fn blocks_projs_mut(&mut self) -> Vec<(String, &mut Proj)> {
        let mut v = Vec::new();
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let p = format!("transformer.h.{i}");
            v.push((format!("{p}.attn.c_attn"), &mut b.c_attn));
            v.push((format!("{p}.attn.c_proj"), &mut b.attn_proj));
            v.push((format!("{p}.mlp.c_fc"), &mut b.c_fc));
            v.push((format!("{p}.mlp.c_proj"), &mut b.mlp_proj));
        }
        v
    }

    /// Freezes the whole model and adds LoRA adapters to the `Conv1D` layers `cfg` selects
    /// (`c_attn`, `c_proj`, `c_fc`, or `all-linear`), as [`Llama::with_lora`] does; adapters
    /// are named `transformer.h.{i}.attn.c_attn.lora_A.weight` (`[r, in]`) and
    /// `lora_B.weight` (`[out, r]`), PEFT's shapes for `fan_in_fan_out` layers.
    pub fn with_lora(mut self, cfg: &LoraConfig, seed: u64) -> Result<Self> {
        if self.lora.is_some() {
            return Err(Error::LoraState {
                op: "with_lora",
                reason: "the model already has adapters",
            });
        }
        let dtype = self.wte.dtype();
        for b in &mut self.blocks {
            b.ln_1 = (b.ln_1.0.detach(), b.ln_1.1.detach());
            b.ln_2 = (b.ln_2.0.detach(), b.ln_2.1.detach());
        }
        let (params, dropout) = inject(self.blocks_projs_mut(), &GPT2_LINEARS, cfg, seed, dtype)?;
        self.wte = self.wte.detach();
        self.wpe = self.wpe.detach();
        self.ln_f = (self.ln_f.0.detach(), self.ln_f.1.detach());
        self.lm_head.freeze()?;
        self.params = params;
        self.lora = Some(Box::new(LoraState {
            config: cfg.clone(),
            dropout,
            merged: false,
            quant: None,
        }));
        Ok(self)
    }

    /// The LoRA configuration, when the model has adapters.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref().map(|l| &l.config)
    }

    /// Merges (`true`) or unmerges (`false`) the adapters into the frozen weights.
    pub fn set_lora_merged(&mut self, merged: bool) -> Result<()> {
        let state = self.lora.as_deref_mut().ok_or(Error::LoraState {
            op: "set_lora_merged",
            reason: "the model has no adapters",
        })?;
        if state.merged == merged {
            return Err(Error::LoraState {
                op: "set_lora_merged",
                reason: "the adapters are already in that state",
            });
        }
        state.merged = merged;
        let projs = self
            .blocks_projs_mut()
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        merge_projs(projs, merged)
    }

    /// Saves the adapters in the PEFT layout (`fan_in_fan_out: true`, as PEFT writes for
    /// GPT-2's `Conv1D`).
    pub fn save_lora_adapter(&self, dir: &Path) -> Result<()> {
        let state = self.lora.as_ref().ok_or(Error::LoraState {
            op: "save_lora_adapter",
            reason: "the model has no adapters",
        })?;
        save_adapter(dir, &self.params, &state.config, true)
    }
}
