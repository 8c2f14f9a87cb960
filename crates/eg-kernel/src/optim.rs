//! Optimizers whose state can be saved, restored and (later) offloaded.
//!
//! One [`Optimizer`] type covers AdamW, SGD with momentum and Lion ([`OptimizerKind`]). It
//! updates each parameter in place in its own f32 storage, one fused pass per tensor (weight
//! decay, moments, bias correction and the step together), with the gradients already
//! accumulated and a clipping factor applied on the fly.
//!
//! State buffers live behind [`StateStore`], so the memory layer can move them to
//! memory-mapped files without touching the update rules: [`RamStore`] keeps them in RAM,
//! eg-memory's [`DiskStore`] in files under `memory.offload_dir` with a background thread
//! that prefetches the next tensors and writes back and drops the ones just updated. The
//! update walks the parameters in a fixed order, in chunks of the store's
//! [`StateStore::chunk_elems`], and every kernel is element-wise, so the result is bitwise the
//! same whatever the store. [`Optimizer::set_store`] moves the state to another store between
//! steps (the memory controller turns disk offload on at run time with it).
//! [`Optimizer::export_state`] / [`Optimizer::import_state`] give the state as named f32
//! vectors (`<param>.exp_avg`, `<param>.exp_avg_sq`, `<param>.momentum`) for checkpoints and
//! in-memory snapshots.
//!
//! Parameter groups: decoupled weight decay applies only to matrices (rank ≥ 2) whose name
//! is not a norm ([`decays`]); norms and biases are never decayed.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Var;
pub use eg_memory::offload::{DiskStore, DiskStoreOptions, Flush, SnapshotReader};
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
    /// Elements the optimizer updates at a time (`None`: a whole tensor at once).
    fn chunk_elems(&self) -> Option<usize> {
        None
    }
    /// The update of `elems` of `param` is done: the store may write it back, drop it from
    /// memory and prefetch what comes next in the (fixed) update order.
    fn release(&mut self, _param: usize, _elems: Range<usize>) -> Result<()> {
        Ok(())
    }
    /// `param` was read (export) or written (import) as a whole: the store may drop it.
    fn evict(&mut self, _param: usize) -> Result<()> {
        Ok(())
    }
    /// Where the state lives.
    fn location(&self) -> StateLocation {
        StateLocation::Ram
    }
    /// Keeps a copy of the whole state inside the store for [`StateStore::restore_snapshot`]
    /// and returns `true`; `false` (the default) means the store cannot, and the caller
    /// keeps an exported copy instead.
    fn save_snapshot(&mut self) -> Result<bool> {
        Ok(false)
    }
    /// A reader of the copy made by [`StateStore::save_snapshot`] (`None`: the store keeps
    /// none), so a checkpoint can stream it instead of exporting the state into RAM.
    fn snapshot_reader(&self) -> Result<Option<Arc<dyn SlotReader>>> {
        Ok(None)
    }
    /// Restores the copy made by [`StateStore::save_snapshot`].
    fn restore_snapshot(&mut self) -> Result<()> {
        Err(Error::StateMismatch {
            what: "optimizer snapshot".into(),
            expected: "a snapshot kept by the state store".into(),
            found: "a store that keeps none".into(),
        })
    }
}

/// Reads a saved copy of optimizer buffers piece by piece (an offloading store's snapshot).
pub trait SlotReader: Send + Sync + std::fmt::Debug {
    /// Passes slot `slot` of parameter `param` to `sink`, in order, in pieces.
    fn read(
        &self,
        param: usize,
        slot: usize,
        sink: &mut dyn FnMut(&[f32]) -> std::io::Result<()>,
    ) -> Result<()>;
}

impl SlotReader for SnapshotReader {
    fn read(
        &self,
        param: usize,
        slot: usize,
        sink: &mut dyn FnMut(&[f32]) -> std::io::Result<()>,
    ) -> Result<()> {
        Ok(SnapshotReader::read(self, param, slot, sink)?)
    }
}

/// The optimizer buffers of a checkpoint, streamed from a store's snapshot instead of held
/// in RAM: names in the checkpoint's order (sorted), with shapes.
#[derive(Debug)]
pub struct OptimizerStream {
    /// `<param>.<slot>`, shape, parameter index, slot index; sorted by name.
    pub buffers: Vec<(String, Vec<usize>, usize, usize)>,
    reader: Arc<dyn SlotReader>,
}

impl OptimizerStream {
    /// Passes buffer `i` of [`OptimizerStream::buffers`] to `sink` in pieces.
    pub fn read(
        &self,
        i: usize,
        sink: &mut dyn FnMut(&[f32]) -> std::io::Result<()>,
    ) -> Result<()> {
        let (name, _, param, slot) = self.buffers.get(i).ok_or_else(|| Error::StateMismatch {
            what: "optimizer stream".into(),
            expected: format!("fewer than {} buffers", self.buffers.len()),
            found: i.to_string(),
        })?;
        let _ = name;
        self.reader.read(*param, *slot, sink)
    }
}

/// Where optimizer state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateLocation {
    /// In RAM.
    Ram,
    /// In memory-mapped files in this directory.
    Disk(PathBuf),
}

impl StateStore for DiskStore {
    fn allocate(&mut self, param: usize, slots: usize, len: usize) -> Result<()> {
        Ok(DiskStore::allocate(self, param, slots, len)?)
    }

    fn slots_mut(&mut self, param: usize) -> Result<Vec<&mut [f32]>> {
        Ok(DiskStore::slots_mut(self, param)?)
    }

    fn slot(&self, param: usize, slot: usize) -> Result<&[f32]> {
        Ok(DiskStore::slot(self, param, slot)?)
    }

    fn chunk_elems(&self) -> Option<usize> {
        Some(DiskStore::chunk_elems(self))
    }

    fn release(&mut self, param: usize, elems: Range<usize>) -> Result<()> {
        Ok(DiskStore::release(self, param, elems)?)
    }

    fn evict(&mut self, param: usize) -> Result<()> {
        Ok(DiskStore::release(self, param, 0..usize::MAX)?)
    }

    fn location(&self) -> StateLocation {
        StateLocation::Disk(self.dir().to_path_buf())
    }

    fn save_snapshot(&mut self) -> Result<bool> {
        DiskStore::save_snapshot(self)?;
        Ok(true)
    }

    fn restore_snapshot(&mut self) -> Result<()> {
        Ok(DiskStore::restore_snapshot(self)?)
    }

    fn snapshot_reader(&self) -> Result<Option<Arc<dyn SlotReader>>> {
        Ok(Some(Arc::new(DiskStore::snapshot_reader(self)?)))
    }
}

/// Builds the store `memory.offload` asks for: RAM for `none`; files under the directory
/// for `disk`; `ram` (a GPU model's state in host RAM) needs the `cuda` feature and is a
/// typed error in this build.
pub fn store_for(offload: &eg_config::Offload) -> Result<Box<dyn StateStore>> {
    match offload {
        eg_config::Offload::Disk(dir) => Ok(Box::new(DiskStore::create(
            dir,
            DiskStoreOptions::default(),
        )?)),
        eg_config::Offload::Ram => {
            eg_memory::offload::host_offload_available()?;
            Ok(Box::new(RamStore::new()))
        }
        _ => Ok(Box::new(RamStore::new())),
    }
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

/// AdamW's per-step constants.
#[derive(Debug, Clone, Copy)]
struct AdamK {
    b1: f32,
    b2: f32,
    eps: f32,
    step_size: f32,
    bc2_sqrt: f32,
    decay: f32,
}

/// AdamW on one chunk, element-wise (the same result for any chunking).
fn adamw(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], scale: f32, k: AdamK) {
    for j in 0..w.len() {
        let gk = g[j] * scale;
        let mk = k.b1 * m[j] + (1.0 - k.b1) * gk;
        let vk = k.b2 * v[j] + (1.0 - k.b2) * gk * gk;
        m[j] = mk;
        v[j] = vk;
        let denom = vk.sqrt() / k.bc2_sqrt + k.eps;
        w[j] = w[j] * k.decay - k.step_size * mk / denom;
    }
}

/// SGD with momentum on one chunk, element-wise.
fn sgd(w: &mut [f32], g: &[f32], buf: &mut [f32], scale: f32, mu: f32, lr: f32, wd: f32) {
    for j in 0..w.len() {
        let gk = g[j] * scale + wd * w[j];
        let b = mu * buf[j] + gk;
        buf[j] = b;
        w[j] -= lr * b;
    }
}

/// Lion on one chunk, element-wise.
fn lion(
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    scale: f32,
    (b1, b2): (f32, f32),
    decay: f32,
    lr: f32,
) {
    for j in 0..w.len() {
        let gk = g[j] * scale;
        let c = b1 * m[j] + (1.0 - b1) * gk;
        let s = if c > 0.0 {
            1.0
        } else if c < 0.0 {
            -1.0
        } else {
            0.0
        };
        w[j] = w[j] * decay - lr * s;
        m[j] = b2 * m[j] + (1.0 - b2) * gk;
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

/// A rollback point of the optimizer: an exported copy in RAM, or (disk offload) a copy
/// the store keeps in its own files.
#[derive(Debug, Clone)]
pub enum OptimizerSnapshot {
    /// The whole state, exported.
    Ram(Arc<OptimizerState>),
    /// Kept by the store ([`StateStore::save_snapshot`]), taken after `t` updates.
    InStore {
        /// Updates applied when it was taken.
        t: u64,
    },
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
    /// by `grad_scale` (the clipping factor), at learning rate `lr`. The gradients may be
    /// owned buffers or slices borrowed from candle's gradient storage (no copy).
    pub fn step<G: AsRef<[f32]>>(
        &mut self,
        vars: &[Var],
        grads: &[G],
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
            let g = g.as_ref();
            let info = &self.params[i];
            if g.len() != var.elem_count() {
                return Err(Error::StateMismatch {
                    what: format!("gradient of {}", info.name),
                    expected: var.elem_count().to_string(),
                    found: g.len().to_string(),
                });
            }
            let wd = if info.decay { self.weight_decay } else { 0.0 };
            let name = info.name.as_str();
            let n = g.len();
            let chunk = self.store.chunk_elems().unwrap_or(n).max(1);
            let store = &mut self.store;
            let mut result: Result<()> = Ok(());
            update_var(name, var, |w| {
                result = (|| {
                    let mut a = 0;
                    loop {
                        let b = (a + chunk).min(n);
                        let mut slots = store.slots_mut(i)?;
                        let r = a..b;
                        match (kind, slots.as_mut_slice()) {
                            (OptimizerKind::AdamW { beta1, beta2, eps }, [m, v]) => {
                                let bc1 = 1.0 - beta1.powi(t as i32);
                                let bc2 = 1.0 - beta2.powi(t as i32);
                                let k = AdamK {
                                    b1: beta1 as f32,
                                    b2: beta2 as f32,
                                    eps: eps as f32,
                                    step_size: (lr / bc1) as f32,
                                    bc2_sqrt: bc2.sqrt() as f32,
                                    decay: (1.0 - lr * wd) as f32,
                                };
                                let (m, v) = (&mut m[r.clone()], &mut v[r.clone()]);
                                adamw(&mut w[r.clone()], &g[r], m, v, grad_scale, k);
                            }
                            (OptimizerKind::Sgd { momentum }, [buf]) => sgd(
                                &mut w[r.clone()],
                                &g[r.clone()],
                                &mut buf[r],
                                grad_scale,
                                momentum as f32,
                                lr as f32,
                                wd as f32,
                            ),
                            (OptimizerKind::Lion { beta1, beta2 }, [m]) => lion(
                                &mut w[r.clone()],
                                &g[r.clone()],
                                &mut m[r],
                                grad_scale,
                                (beta1 as f32, beta2 as f32),
                                (1.0 - lr * wd) as f32,
                                lr as f32,
                            ),
                            _ => return Err(missing(i, kind.slot_names().len() - 1)),
                        }
                        drop(slots);
                        store.release(i, a..b)?;
                        if b >= n {
                            return Ok(());
                        }
                        a = b;
                    }
                })();
            })?;
            result?;
        }
        Ok(())
    }

    /// A copy of the whole state (read through the store; an offloading store drops each
    /// tensor again after reading it).
    pub fn export_state(&mut self) -> Result<OptimizerState> {
        let mut buffers = BTreeMap::new();
        for (i, p) in self.params.iter().enumerate() {
            for (s, slot) in self.kind.slot_names().iter().enumerate() {
                let v = self.store.slot(i, s)?.to_vec();
                buffers.insert(format!("{}.{slot}", p.name), (p.shape.clone(), v));
            }
        }
        self.evict_all()?;
        Ok(OptimizerState {
            t: self.t,
            kind: self.kind,
            buffers,
        })
    }

    /// [`Optimizer::snapshot`], copying into the buffers of `spare` (an earlier exported
    /// state no longer in use) where names and lengths match instead of allocating: no page
    /// faults on the copy. Bitwise the same as [`Optimizer::snapshot`]; a store that keeps
    /// its own snapshot (disk offload) ignores `spare`.
    pub fn snapshot_reusing(&mut self, spare: Option<OptimizerState>) -> Result<OptimizerSnapshot> {
        self.snapshot_reusing_with(spare, true)
    }

    /// [`Optimizer::snapshot_reusing`] with every copy on the calling thread (no rayon
    /// tasks): what the trainer's background snapshot copy runs while the next step's
    /// forward and backward use rayon's threads. Bitwise the same.
    pub fn snapshot_reusing_serial(
        &mut self,
        spare: Option<OptimizerState>,
    ) -> Result<OptimizerSnapshot> {
        self.snapshot_reusing_with(spare, false)
    }

    fn snapshot_reusing_with(
        &mut self,
        spare: Option<OptimizerState>,
        parallel: bool,
    ) -> Result<OptimizerSnapshot> {
        if self.store.save_snapshot()? {
            return Ok(OptimizerSnapshot::InStore { t: self.t });
        }
        let mut old = spare.map(|s| s.buffers).unwrap_or_default();
        let mut jobs = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            for (s, slot) in self.kind.slot_names().iter().enumerate() {
                let key = format!("{}.{slot}", p.name);
                let reuse = old.remove(&key).map(|(_, v)| v);
                jobs.push((key, &p.shape, reuse, self.store.slot(i, s)?));
            }
        }
        drop(old);
        let copy = |(key, shape, reuse, src): (String, &Vec<usize>, Option<Vec<f32>>, &[f32])| {
            let v = crate::tensors::reuse_copy(reuse, src, parallel);
            (key, (shape.clone(), v))
        };
        let buffers: BTreeMap<_, _> = if parallel {
            // On rayon's threads (each buffer is copied whole into its own place).
            use rayon::prelude::*;
            jobs.into_par_iter().map(copy).collect()
        } else {
            jobs.into_iter().map(copy).collect()
        };
        self.evict_all()?;
        Ok(OptimizerSnapshot::Ram(Arc::new(OptimizerState {
            t: self.t,
            kind: self.kind,
            buffers,
        })))
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
            drop(slots);
            self.store.evict(i)?;
        }
        self.t = state.t;
        Ok(())
    }

    fn evict_all(&mut self) -> Result<()> {
        for i in 0..self.params.len() {
            self.store.evict(i)?;
        }
        Ok(())
    }

    /// Where the state lives.
    pub fn state_location(&self) -> StateLocation {
        self.store.location()
    }

    /// A rollback point: kept by the store when it can (disk offload: a copy of its files,
    /// not in RAM), otherwise an exported copy in RAM.
    pub fn snapshot(&mut self) -> Result<OptimizerSnapshot> {
        if self.store.save_snapshot()? {
            Ok(OptimizerSnapshot::InStore { t: self.t })
        } else {
            Ok(OptimizerSnapshot::Ram(Arc::new(self.export_state()?)))
        }
    }

    /// Goes back to a rollback point made by [`Optimizer::snapshot`] (with this store).
    pub fn restore(&mut self, snap: &OptimizerSnapshot) -> Result<()> {
        match snap {
            OptimizerSnapshot::Ram(s) => self.import_state(s),
            OptimizerSnapshot::InStore { t } => {
                self.store.restore_snapshot()?;
                self.t = *t;
                Ok(())
            }
        }
    }

    /// The state of a snapshot just taken, as a checkpoint needs it: the snapshot itself
    /// when it is in RAM; when the store keeps it (disk offload), `t` and the rule with no
    /// buffers, plus a stream that reads the buffers from the store's snapshot files (so the
    /// whole state is never in RAM).
    pub fn checkpoint_state(
        &mut self,
        snap: &OptimizerSnapshot,
    ) -> Result<(Arc<OptimizerState>, Option<Arc<OptimizerStream>>)> {
        match snap {
            OptimizerSnapshot::Ram(s) => Ok((s.clone(), None)),
            OptimizerSnapshot::InStore { t } => {
                let Some(reader) = self.store.snapshot_reader()? else {
                    return Ok((Arc::new(self.export_state()?), None));
                };
                let mut buffers = Vec::new();
                for (i, p) in self.params.iter().enumerate() {
                    for (s, slot) in self.kind.slot_names().iter().enumerate() {
                        buffers.push((format!("{}.{slot}", p.name), p.shape.clone(), i, s));
                    }
                }
                buffers.sort_by(|a, b| a.0.cmp(&b.0));
                let state = OptimizerState {
                    t: *t,
                    kind: self.kind,
                    buffers: BTreeMap::new(),
                };
                Ok((
                    Arc::new(state),
                    Some(Arc::new(OptimizerStream { buffers, reader })),
                ))
            }
        }
    }

    /// Moves the state into `store` (e.g. RAM → disk when memory runs short), one tensor at
    /// a time; the old store is dropped (a disk store removes its files). Call it between
    /// steps; a rollback snapshot taken before refers to the old store, so take a new one.
    pub fn set_store(&mut self, mut store: Box<dyn StateStore>) -> Result<()> {
        let slots = self.kind.slot_names().len();
        for (i, p) in self.params.iter().enumerate() {
            let len = p.shape.iter().product();
            store.allocate(i, slots, len)?;
            let mut dst = store.slots_mut(i)?;
            for (s, d) in dst.iter_mut().enumerate() {
                d.copy_from_slice(self.store.slot(i, s)?);
            }
            drop(dst);
            store.evict(i)?;
            self.store.evict(i)?;
        }
        tracing::info!(from = ?self.store.location(), to = ?store.location(), "optimizer state moved");
        self.store = store;
        Ok(())
    }
}
