//! Optimizers whose state can be saved, restored and (later) offloaded.
//!
//! One [`Optimizer`] type covers AdamW, SGD with momentum and Lion ([`OptimizerKind`]). It
//! updates each parameter in place in its own f32 storage, one fused pass per tensor (weight
//! decay, moments, bias correction and the step together), with the gradients already
//! accumulated and a clipping factor applied on the fly.
//!
//! State buffers live behind [`StateStore`], so the memory layer can move them to
//! memory-mapped files without touching the update rules; [`RamStore`] keeps them in RAM.
//! [`Optimizer::export_state`] / [`Optimizer::import_state`] give the state as named f32
//! vectors (`<param>.exp_avg`, `<param>.exp_avg_sq`, `<param>.momentum`) for checkpoints and
//! in-memory snapshots.
//!
//! Parameter groups: decoupled weight decay applies only to matrices (rank ≥ 2) whose name
//! is not a norm ([`decays`]); norms and biases are never decayed.

use std::collections::BTreeMap;

use candle_core::Var;
use serde::{Deserialize, Serialize};

use crate::tensors::update_var;
use crate::{Error, Result};

/// Which update rule, with its hyper-parameters (the learning rate comes from the schedule).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum OptimizerKind {
    /// AdamW (Loshchilov & Hutter), PyTorch semantics (bias-corrected moments, eps outside
    /// the square root).
    AdamW {
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Denominator epsilon.
        eps: f64,
    },
    /// SGD with (heavy-ball) momentum; weight decay is added to the gradient.
    Sgd {
        /// Momentum.
        momentum: f64,
    },
    /// Lion (Chen et al. 2023): the sign of an interpolated momentum.
    Lion {
        /// Interpolation for the update.
        beta1: f64,
        /// Momentum decay.
        beta2: f64,
    },
}

impl OptimizerKind {
    /// Names of the state buffers kept per parameter.
    pub fn slot_names(&self) -> &'static [&'static str] {
        match self {
            OptimizerKind::AdamW { .. } => &["exp_avg", "exp_avg_sq"],
            OptimizerKind::Sgd { .. } => &["momentum"],
            OptimizerKind::Lion { .. } => &["exp_avg"],
        }
    }

    /// From the validated config: the kind, the peak learning rate and the weight decay.
    pub fn from_config(cfg: &eg_config::OptimizerConfig) -> Result<(Self, f64, f64)> {
        match cfg {
            eg_config::OptimizerConfig::AdamW {
                lr,
                betas,
                eps,
                weight_decay,
            } => Ok((
                OptimizerKind::AdamW {
                    beta1: betas.0,
                    beta2: betas.1,
                    eps: *eps,
                },
                *lr,
                *weight_decay,
            )),
            eg_config::OptimizerConfig::Sgd {
                lr,
                momentum,
                weight_decay,
            } => Ok((
                OptimizerKind::Sgd {
                    momentum: *momentum,
                },
                *lr,
                *weight_decay,
            )),
            eg_config::OptimizerConfig::Lion {
                lr,
                betas,
                weight_decay,
            } => Ok((
                OptimizerKind::Lion {
                    beta1: betas.0,
                    beta2: betas.1,
                },
                *lr,
                *weight_decay,
            )),
            _ => Err(Error::Unsupported {
                what: "this optimizer",
                issue: 6,
            }),
        }
    }
}

/// Whether weight decay applies to a parameter: matrices only, never norms or biases.
pub fn decays(name: &str, rank: usize) -> bool {
    rank >= 2 && !name.contains("norm") && !name.ends_with(".bias")
}

/// Where optimizer state lives. Buffers are addressed by parameter index and slot.
///
/// Implementations must hand back the same contents that were last written: the memory
/// layer's disk store (issue #8) maps them to files and prefetches the next parameter's.
pub trait StateStore: Send + std::fmt::Debug {
    /// Creates `slots` zeroed buffers of `len` elements for parameter `param`.
    fn allocate(&mut self, param: usize, slots: usize, len: usize) -> Result<()>;
    /// The buffers of `param`, writable.
    fn slots_mut(&mut self, param: usize) -> Result<Vec<&mut [f32]>>;
    /// One buffer, read-only.
    fn slot(&self, param: usize, slot: usize) -> Result<&[f32]>;
}

/// State kept in RAM.
#[derive(Debug, Default)]
pub struct RamStore {
    bufs: Vec<Vec<Vec<f32>>>,
}

impl RamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

fn missing(param: usize, slot: usize) -> Error {
    Error::StateMismatch {
        what: format!("optimizer slot {slot} of parameter {param}"),
        expected: "an allocated buffer".into(),
        found: "none".into(),
    }
}

impl StateStore for RamStore {
    fn allocate(&mut self, param: usize, slots: usize, len: usize) -> Result<()> {
        if self.bufs.len() <= param {
            self.bufs.resize_with(param + 1, Vec::new);
        }
        self.bufs[param] = vec![vec![0.0; len]; slots];
        Ok(())
    }

    fn slots_mut(&mut self, param: usize) -> Result<Vec<&mut [f32]>> {
        let b = self.bufs.get_mut(param).ok_or_else(|| missing(param, 0))?;
        Ok(b.iter_mut().map(|v| v.as_mut_slice()).collect())
    }

    fn slot(&self, param: usize, slot: usize) -> Result<&[f32]> {
        self.bufs
            .get(param)
            .and_then(|b| b.get(slot))
            .map(|v| v.as_slice())
            .ok_or_else(|| missing(param, slot))
    }
}

#[derive(Debug, Clone)]
struct ParamInfo {
    name: String,
    shape: Vec<usize>,
    decay: bool,
}

/// Saved optimizer state: the step count and every buffer by name.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    /// Updates applied so far (Adam's bias-correction `t`).
    pub t: u64,
    /// The rule the state belongs to.
    pub kind: OptimizerKind,
    /// `<param>.<slot>` → (shape, values).
    pub buffers: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

/// An optimizer over a fixed, ordered list of named parameters.
#[derive(Debug)]
pub struct Optimizer {
    kind: OptimizerKind,
    weight_decay: f64,
    params: Vec<ParamInfo>,
    store: Box<dyn StateStore>,
    t: u64,
}

impl Optimizer {
    /// An optimizer for `params` (name, shape), with state in RAM.
    pub fn new(
        kind: OptimizerKind,
        weight_decay: f64,
        params: &[(String, Vec<usize>)],
    ) -> Result<Self> {
        Self::with_store(kind, weight_decay, params, Box::new(RamStore::new()))
    }

    /// An optimizer whose state lives in `store`.
    pub fn with_store(
        kind: OptimizerKind,
        weight_decay: f64,
        params: &[(String, Vec<usize>)],
        mut store: Box<dyn StateStore>,
    ) -> Result<Self> {
        let check = |ok: bool, option: &'static str, reason: &str| {
            if ok {
                Ok(())
            } else {
                Err(Error::InvalidOption {
                    option,
                    reason: reason.into(),
                })
            }
        };
        check(
            weight_decay.is_finite() && weight_decay >= 0.0,
            "weight_decay",
            "must be finite and >= 0",
        )?;
        match kind {
            OptimizerKind::AdamW { beta1, beta2, eps } => {
                check((0.0..1.0).contains(&beta1), "beta1", "must be in [0, 1)")?;
                check((0.0..1.0).contains(&beta2), "beta2", "must be in [0, 1)")?;
                check(eps > 0.0 && eps.is_finite(), "eps", "must be > 0")?;
            }
            OptimizerKind::Sgd { momentum } => {
                check(
                    (0.0..1.0).contains(&momentum),
                    "momentum",
                    "must be in [0, 1)",
                )?;
            }
            OptimizerKind::Lion { beta1, beta2 } => {
                check((0.0..1.0).contains(&beta1), "beta1", "must be in [0, 1)")?;
                check((0.0..1.0).contains(&beta2), "beta2", "must be in [0, 1)")?;
            }
        }
        let slots = kind.slot_names().len();
        let mut infos = Vec::with_capacity(params.len());
        for (i, (name, shape)) in params.iter().enumerate() {
            let len = shape.iter().product();
            store.allocate(i, slots, len)?;
            infos.push(ParamInfo {
                name: name.clone(),
                shape: shape.clone(),
                decay: decays(name, shape.len()),
            });
        }
        Ok(Self {
            kind,
            weight_decay,
            params: infos,
            store,
            t: 0,
        })
    }

    /// The update rule.
    pub fn kind(&self) -> OptimizerKind {
        self.kind
    }

    /// Updates applied so far.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// Whether parameter `i` is weight-decayed.
    pub fn is_decayed(&self, i: usize) -> bool {
        self.params.get(i).is_some_and(|p| p.decay)
    }

    /// Applies one update to every parameter: `vars[i]` with gradient `grads[i]` multiplied
    /// by `grad_scale` (the clipping factor), at learning rate `lr`.
    pub fn step(
        &mut self,
        vars: &[Var],
        grads: &[Vec<f32>],
        lr: f64,
        grad_scale: f32,
    ) -> Result<()> {
        if vars.len() != self.params.len() || grads.len() != self.params.len() {
            return Err(Error::StateMismatch {
                what: "number of parameters".into(),
                expected: self.params.len().to_string(),
                found: format!("{} vars, {} grads", vars.len(), grads.len()),
            });
        }
        self.t += 1;
        let t = self.t;
        let kind = self.kind;
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let info = &self.params[i];
            if g.len() != var.elem_count() {
                return Err(Error::StateMismatch {
                    what: format!("gradient of {}", info.name),
                    expected: var.elem_count().to_string(),
                    found: g.len().to_string(),
                });
            }
            let wd = if info.decay { self.weight_decay } else { 0.0 };
            let mut slots = self.store.slots_mut(i)?;
            let name = info.name.as_str();
            match kind {
                OptimizerKind::AdamW { beta1, beta2, eps } => {
                    let [m, v] = slots.as_mut_slice() else {
                        return Err(missing(i, 1));
                    };
                    let (m, v) = (&mut **m, &mut **v);
                    let bc1 = 1.0 - beta1.powi(t as i32);
                    let bc2 = 1.0 - beta2.powi(t as i32);
                    let step_size = (lr / bc1) as f32;
                    let bc2_sqrt = bc2.sqrt() as f32;
                    let decay = (1.0 - lr * wd) as f32;
                    let (b1, b2, eps) = (beta1 as f32, beta2 as f32, eps as f32);
                    update_var(name, var, move |w| {
                        for k in 0..w.len() {
                            let gk = g[k] * grad_scale;
                            let mk = b1 * m[k] + (1.0 - b1) * gk;
                            let vk = b2 * v[k] + (1.0 - b2) * gk * gk;
                            m[k] = mk;
                            v[k] = vk;
                            let denom = vk.sqrt() / bc2_sqrt + eps;
                            w[k] = w[k] * decay - step_size * mk / denom;
                        }
                    })?;
                }
                OptimizerKind::Sgd { momentum } => {
                    let [buf] = slots.as_mut_slice() else {
                        return Err(missing(i, 0));
                    };
                    let buf = &mut **buf;
                    let (mu, lr, wd) = (momentum as f32, lr as f32, wd as f32);
                    update_var(name, var, move |w| {
                        for k in 0..w.len() {
                            let gk = g[k] * grad_scale + wd * w[k];
                            let b = mu * buf[k] + gk;
                            buf[k] = b;
                            w[k] -= lr * b;
                        }
                    })?;
                }
                OptimizerKind::Lion { beta1, beta2 } => {
                    let [m] = slots.as_mut_slice() else {
                        return Err(missing(i, 0));
                    };
                    let m = &mut **m;
                    let (b1, b2) = (beta1 as f32, beta2 as f32);
                    let decay = (1.0 - lr * wd) as f32;
                    let lr = lr as f32;
                    update_var(name, var, move |w| {
                        for k in 0..w.len() {
                            let gk = g[k] * grad_scale;
                            let c = b1 * m[k] + (1.0 - b1) * gk;
                            let s = if c > 0.0 {
                                1.0
                            } else if c < 0.0 {
                                -1.0
                            } else {
                                0.0
                            };
                            w[k] = w[k] * decay - lr * s;
                            m[k] = b2 * m[k] + (1.0 - b2) * gk;
                        }
                    })?;
                }
            }
        }
        Ok(())
    }

    /// A copy of the whole state.
    pub fn export_state(&self) -> Result<OptimizerState> {
        let mut buffers = BTreeMap::new();
        for (i, p) in self.params.iter().enumerate() {
            for (s, slot) in self.kind.slot_names().iter().enumerate() {
                let v = self.store.slot(i, s)?.to_vec();
                buffers.insert(format!("{}.{slot}", p.name), (p.shape.clone(), v));
            }
        }
        Ok(OptimizerState {
            t: self.t,
            kind: self.kind,
            buffers,
        })
    }

    /// Replaces the whole state; names, shapes and the rule must match.
    pub fn import_state(&mut self, state: &OptimizerState) -> Result<()> {
        if std::mem::discriminant(&state.kind) != std::mem::discriminant(&self.kind) {
            return Err(Error::StateMismatch {
                what: "optimizer kind".into(),
                expected: format!("{:?}", self.kind),
                found: format!("{:?}", state.kind),
            });
        }
        let names = self.kind.slot_names();
        for (i, p) in self.params.iter().enumerate() {
            let mut slots = self.store.slots_mut(i)?;
            for (s, slot) in names.iter().enumerate() {
                let key = format!("{}.{slot}", p.name);
                let (shape, v) = state
                    .buffers
                    .get(&key)
                    .ok_or_else(|| Error::StateMismatch {
                        what: key.clone(),
                        expected: format!("{:?}", p.shape),
                        found: "missing".into(),
                    })?;
                let dst = slots.get_mut(s).ok_or_else(|| missing(i, s))?;
                if shape != &p.shape || v.len() != dst.len() {
                    return Err(Error::StateMismatch {
                        what: key,
                        expected: format!("{:?}", p.shape),
                        found: format!("{shape:?}"),
                    });
                }
                dst.copy_from_slice(v);
            }
        }
        self.t = state.t;
        Ok(())
    }
}
