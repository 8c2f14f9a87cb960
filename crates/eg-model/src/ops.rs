//! Fused operations with a backward pass.
//!
//! candle's own fused kernels (`candle_nn::ops::rms_norm`, `layer_norm`, `softmax_last_dim`,
//! `rotary_emb::rope`) are built with `apply_op*_no_bwd`: a tensor that goes through them
//! leaves the autograd graph, and everything upstream silently receives no gradient. The ops
//! here are candle [`CustomOp1`]/[`CustomOp2`]/[`CustomOp3`] implementations whose `bwd`
//! returns a gradient for every differentiable input, computed by a second fused kernel
//! (one pass over the rows, row-parallel with rayon; weight gradients are reduced over fixed
//! row blocks in a fixed order, so results do not depend on the number of threads).
//!
//! CPU kernels exist for `f32` and `f64`. `bf16`/`f16` inputs are converted to `f32` for the
//! kernel and the result converted back (the conversions have their own backward), so norms,
//! softmax, RoPE and SwiGLU accumulate in f32 under mixed precision; cross entropy keeps its
//! loss in f32. Other devices return candle's "no cuda implementation" error for now.
//!
//! Every backward is checked against central finite differences in `f64` and against the
//! composite candle formulation in this crate's tests.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use crate::{Error, Result};

/// Rows per block when reducing weight gradients; fixed so the sum order is deterministic.
pub(crate) const ROW_BLOCK: usize = 32;

/// Float element types with a CPU kernel.
pub(crate) trait Real: WithDType + Send + Sync + crate::gemm::Float {
    fn sqrt(self) -> Self;
    /// `e^x`: [`exp_f32`] for f32 (vectorisable, within 2 ulp), the C library's for f64 (the
    /// finite-difference checks run in f64).
    fn exp(self) -> Self;
    fn ln(self) -> Self;
}

impl Real for f32 {
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
}

impl Real for f64 {
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
}

/// `e^x` in f32 without a library call, so that loops over it vectorise (issue 9: the C
/// library's `expf`, one call per element, was 5% of a training step in softmax, SiLU and
/// cross entropy). Range reduction `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, with ln 2 split in two
/// parts, a degree-6 polynomial for `e^r` (Cephes' `expf` coefficients) and `2^n` built in the
/// exponent bits. Within 2 ulp of the exact value on `[-87.3, 88]`; NaN stays NaN; inputs are
/// clamped to that range (below it the result is `≈ 1.2e-38` instead of a subnormal or zero,
/// above it `≈ 1.65e38` instead of a larger value or infinity: softmax and cross entropy
/// subtract the row maximum first, so their arguments are never positive).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding and subtracting it rounds to the nearest integer (vectorises on SSE2).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.336_55, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // n is in [-126, 127] here: a normal power of two.
    let bits = ((n as i32 + 127) as u32) << 23;
    e * f32::from_bits(bits)
}

/// The contiguous slice of `storage` described by `layout`.
fn slice<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &'static str,
) -> candle_core::Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => Err(candle_core::Error::RequiresContiguous { op }),
    }
}

fn last_dim(layout: &Layout) -> candle_core::Result<usize> {
    layout
        .dims()
        .last()
        .copied()
        .ok_or_else(|| candle_core::Error::UnexpectedNumberOfDims {
            expected: 1,
            got: 0,
            shape: layout.shape().clone(),
        })
}

pub(crate) fn min_rows(d: usize) -> usize {
    (4096 / d.max(1)).max(1)
}

/// Runs `$body` with `$t` bound to the element type of `$storage` (f32 or f64).
macro_rules! dispatch {
    ($storage:expr, $name:expr, $t:ident => $body:expr) => {
        match $storage {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            other => Err(candle_core::Error::UnsupportedDTypeForOp(
                candle_core::backend::BackendStorage::dtype(other),
                $name,
            )),
        }
    };
}

/// Converts a half-precision tensor to f32 for a kernel; returns the dtype to convert back to.
fn widen(x: &Tensor) -> Result<(Tensor, Option<DType>)> {
    match x.dtype() {
        DType::BF16 | DType::F16 => Ok((x.to_dtype(DType::F32)?, Some(x.dtype()))),
        DType::F32 | DType::F64 => Ok((x.clone(), None)),
        other => Err(Error::UnsupportedDType {
            op: "fused op",
            dtype: other,
        }),
    }
}

fn narrow_back(y: Tensor, back: Option<DType>) -> Result<Tensor> {
    Ok(match back {
        Some(dt) => y.to_dtype(dt)?,
        None => y,
    })
}

/// The size of the last dimension, which must exist and be non-zero.
fn last_dim_of(x: &Tensor, what: &str) -> Result<usize> {
    match x.dims().last() {
        Some(&d) if d > 0 && x.elem_count() > 0 => Ok(d),
        _ => Err(Error::ShapeMismatch {
            tensor: what.to_string(),
            expected: vec![1],
            found: x.dims().to_vec(),
        }),
    }
}

fn check_param(op: &'static str, p: &Tensor, d: usize, dtype: DType) -> Result<Tensor> {
    if p.dims() != [d] {
        return Err(Error::ShapeMismatch {
            tensor: op.to_string(),
            expected: vec![d],
            found: p.dims().to_vec(),
        });
    }
    Ok(p.to_dtype(dtype)?.contiguous()?)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

struct RmsNormOp {
    eps: f64,
}

pub(crate) fn rms_fwd<T: Real>(x: &[T], w: &[T], d: usize, eps: f64) -> Vec<T> {
    let mut y = vec![T::from_f64(0.0); x.len()];
    let inv_d = T::from_f64(1.0 / d as f64);
    let eps = T::from_f64(eps);
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .with_min_len(min_rows(d))
        .for_each(|(y, x)| {
            let mut ss = T::from_f64(0.0);
            for &v in x {
                ss += v * v;
            }
            let r = T::from_f64(1.0) / (ss * inv_d + eps).sqrt();
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = x * r * w;
            }
        });
    y
}

/// Returns `dx` (len `x.len()`) followed by `dw` (len `d`).
pub(crate) fn rms_bwd<T: Real>(x: &[T], w: &[T], g: &[T], d: usize, eps: f64) -> Vec<T> {
    let zero = T::from_f64(0.0);
    let inv_d = T::from_f64(1.0 / d as f64);
    let eps = T::from_f64(eps);
    let mut out = vec![zero; x.len()];
    let partials: Vec<Vec<T>> = out
        .par_chunks_mut(d * ROW_BLOCK)
        .zip(x.par_chunks(d * ROW_BLOCK))
        .zip(g.par_chunks(d * ROW_BLOCK))
        .map(|((dx, x), g)| {
            let mut dw = vec![zero; d];
            for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                let mut ss = zero;
                for &v in x {
                    ss += v * v;
                }
                let r = T::from_f64(1.0) / (ss * inv_d + eps).sqrt();
                // c = mean(g * w * xhat)
                let mut acc = zero;
                for i in 0..d {
                    let xh = x[i] * r;
                    acc += g[i] * w[i] * xh;
                    dw[i] += g[i] * xh;
                }
                let cm = acc * inv_d;
                for i in 0..d {
                    dx[i] = r * (g[i] * w[i] - x[i] * r * cm);
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![zero; d];
    for p in partials {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    out.extend(dw);
    out
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "eg-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = last_dim(l1)?;
        dispatch!(s1, self.name(), T => {
            let x = slice::<T>(s1, l1, self.name())?;
            let w = slice::<T>(s2, l2, self.name())?;
            let y = rms_fwd(x, w, d, self.eps);
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(candle_core::D::Minus1)?;
        let n = x.elem_count();
        let grad = grad.contiguous()?;
        let both = x.apply_op3_no_bwd(w, &grad, &RmsNormBwd { eps: self.eps })?;
        let dx = both.narrow(0, 0, n)?.reshape(x.shape())?;
        // A frozen weight (not tracked: LoRA/QLoRA bases) gets no gradient storage.
        let dw = if w.track_op() {
            Some(both.narrow(0, n, d)?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

struct RmsNormBwd {
    eps: f64,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "eg-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = last_dim(l1)?;
        dispatch!(s1, self.name(), T => {
            let x = slice::<T>(s1, l1, self.name())?;
            let w = slice::<T>(s2, l2, self.name())?;
            let g = slice::<T>(s3, l3, self.name())?;
            let out = rms_bwd(x, w, g, d, self.eps);
            let len = out.len();
            Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
        })
    }
}

/// RMSNorm over the last dimension: `x * rsqrt(mean(x²) + eps) * weight`, with gradients for
/// `x` and `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let (xw, back) = widen(x)?;
    let d = last_dim_of(&xw, "rms_norm input")?;
    let w = check_param("rms_norm weight", weight, d, xw.dtype())?;
    let y = xw.contiguous()?.apply_op2(&w, RmsNormOp { eps })?;
    narrow_back(y, back)
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

struct LayerNormOp {
    eps: f64,
}

fn ln_stats<T: Real>(x: &[T], inv_d: T, eps: T) -> (T, T) {
    let mut s = T::from_f64(0.0);
    for &v in x {
        s += v;
    }
    let mu = s * inv_d;
    let mut var = T::from_f64(0.0);
    for &v in x {
        let c = v - mu;
        var += c * c;
    }
    (mu, T::from_f64(1.0) / (var * inv_d + eps).sqrt())
}

fn ln_fwd<T: Real>(x: &[T], w: &[T], b: &[T], d: usize, eps: f64) -> Vec<T> {
    let mut y = vec![T::from_f64(0.0); x.len()];
    let inv_d = T::from_f64(1.0 / d as f64);
    let eps = T::from_f64(eps);
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .with_min_len(min_rows(d))
        .for_each(|(y, x)| {
            let (mu, r) = ln_stats(x, inv_d, eps);
            for i in 0..d {
                y[i] = (x[i] - mu) * r * w[i] + b[i];
            }
        });
    y
}

/// Returns `dx` followed by `dw` and `db`.
fn ln_bwd<T: Real>(x: &[T], w: &[T], g: &[T], d: usize, eps: f64) -> Vec<T> {
    let zero = T::from_f64(0.0);
    let inv_d = T::from_f64(1.0 / d as f64);
    let eps = T::from_f64(eps);
    let mut out = vec![zero; x.len()];
    let partials: Vec<Vec<T>> = out
        .par_chunks_mut(d * ROW_BLOCK)
        .zip(x.par_chunks(d * ROW_BLOCK))
        .zip(g.par_chunks(d * ROW_BLOCK))
        .map(|((dx, x), g)| {
            let mut dwb = vec![zero; 2 * d];
            for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                let (mu, r) = ln_stats(x, inv_d, eps);
                let mut m1 = zero;
                let mut m2 = zero;
                for i in 0..d {
                    let xh = (x[i] - mu) * r;
                    let gw = g[i] * w[i];
                    m1 += gw;
                    m2 += gw * xh;
                    dwb[i] += g[i] * xh;
                    dwb[d + i] += g[i];
                }
                m1 *= inv_d;
                m2 *= inv_d;
                for i in 0..d {
                    let xh = (x[i] - mu) * r;
                    dx[i] = r * (g[i] * w[i] - m1 - xh * m2);
                }
            }
            dwb
        })
        .collect();
    let mut dwb = vec![zero; 2 * d];
    for p in partials {
        for (a, b) in dwb.iter_mut().zip(p) {
            *a += b;
        }
    }
    out.extend(dwb);
    out
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "eg-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = last_dim(l1)?;
        dispatch!(s1, self.name(), T => {
            let x = slice::<T>(s1, l1, self.name())?;
            let w = slice::<T>(s2, l2, self.name())?;
            let b = slice::<T>(s3, l3, self.name())?;
            let y = ln_fwd(x, w, b, d, self.eps);
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(candle_core::D::Minus1)?;
        let n = x.elem_count();
        let grad = grad.contiguous()?;
        let all = x.apply_op3_no_bwd(w, &grad, &LayerNormBwd { eps: self.eps })?;
        let dx = all.narrow(0, 0, n)?.reshape(x.shape())?;
        // Frozen (untracked) weight and bias get no gradient storage (LoRA bases).
        let dw = if w.track_op() {
            Some(all.narrow(0, n, d)?)
        } else {
            None
        };
        let db = if b.track_op() {
            Some(all.narrow(0, n + d, d)?)
        } else {
            None
        };
        Ok((Some(dx), dw, db))
    }
}

struct LayerNormBwd {
    eps: f64,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "eg-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = last_dim(l1)?;
        dispatch!(s1, self.name(), T => {
            let x = slice::<T>(s1, l1, self.name())?;
            let w = slice::<T>(s2, l2, self.name())?;
            let g = slice::<T>(s3, l3, self.name())?;
            let out = ln_bwd(x, w, g, d, self.eps);
            let len = out.len();
            Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
        })
    }
}

/// LayerNorm over the last dimension: `(x - mean) * rsqrt(var + eps) * weight + bias`, with
/// gradients for `x`, `weight` and `bias`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let (xw, back) = widen(x)?;
    let d = last_dim_of(&xw, "layer_norm input")?;
    let w = check_param("layer_norm weight", weight, d, xw.dtype())?;
    let b = check_param("layer_norm bias", bias, d, xw.dtype())?;
    let y = xw.contiguous()?.apply_op3(&w, &b, LayerNormOp { eps })?;
    narrow_back(y, back)
}

// ---------------------------------------------------------------------------------------------
// Softmax (optionally scaled and causally masked)

/// A causal mask fused into [`causal_softmax`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Causal {
    /// Query positions per block of rows: row `r` is query `r % q_len`.
    pub(crate) q_len: usize,
    /// Keys further back than this many positions are masked (`None`: no window).
    pub(crate) window: Option<usize>,
}

struct SoftmaxOp {
    scale: f64,
    causal: Option<Causal>,
}

/// Number of leading keys that row `row` may attend to, and the first allowed key.
fn allowed(causal: Option<Causal>, row: usize, cols: usize) -> (usize, usize) {
    match causal {
        None => (0, cols),
        Some(Causal { q_len, window }) => {
            let pos = row % q_len + cols.saturating_sub(q_len);
            let end = (pos + 1).min(cols);
            let start = match window {
                Some(w) => (pos + 1).saturating_sub(w),
                None => 0,
            };
            (start.min(end), end)
        }
    }
}

pub(crate) fn softmax_fwd<T: Real>(
    x: &[T],
    cols: usize,
    scale: f64,
    causal: Option<Causal>,
) -> Vec<T> {
    let zero = T::from_f64(0.0);
    let s = T::from_f64(scale);
    let mut y = vec![zero; x.len()];
    y.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .enumerate()
        .with_min_len(min_rows(cols))
        .for_each(|(row, (y, x))| {
            let (start, end) = allowed(causal, row, cols);
            if start >= end {
                return;
            }
            let mut max = x[start];
            for &v in &x[start..end] {
                if v > max {
                    max = v;
                }
            }
            // Exponentials first (a loop that vectorises), then their sum in order.
            for (y, &x) in y[start..end].iter_mut().zip(&x[start..end]) {
                *y = ((x - max) * s).exp();
            }
            let mut sum = zero;
            for &e in &y[start..end] {
                sum += e;
            }
            let inv = T::from_f64(1.0) / sum;
            for v in &mut y[start..end] {
                *v *= inv;
            }
        });
    y
}

pub(crate) fn softmax_bwd<T: Real>(y: &[T], g: &[T], cols: usize, scale: f64) -> Vec<T> {
    let s = T::from_f64(scale);
    let mut dx = vec![T::from_f64(0.0); y.len()];
    dx.par_chunks_mut(cols)
        .zip(y.par_chunks(cols).zip(g.par_chunks(cols)))
        .with_min_len(min_rows(cols))
        .for_each(|(dx, (y, g))| {
            let mut dot = T::from_f64(0.0);
            for (&y, &g) in y.iter().zip(g) {
                dot += y * g;
            }
            for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                *dx = s * y * (g - dot);
            }
        });
    dx
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "eg-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let cols = last_dim(l)?;
        dispatch!(s, self.name(), T => {
            let x = slice::<T>(s, l, self.name())?;
            let y = softmax_fwd(x, cols, self.scale, self.causal);
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        })
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let dx = res.apply_op2_no_bwd(&grad, &SoftmaxBwd { scale: self.scale })?;
        Ok(Some(dx))
    }
}

struct SoftmaxBwd {
    scale: f64,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "eg-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let cols = last_dim(l1)?;
        dispatch!(s1, self.name(), T => {
            let y = slice::<T>(s1, l1, self.name())?;
            let g = slice::<T>(s2, l2, self.name())?;
            let dx = softmax_bwd(y, g, cols, self.scale);
            Ok((T::to_cpu_storage_owned(dx), l1.shape().clone()))
        })
    }
}

/// Softmax over the last dimension, with a gradient.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let (xw, back) = widen(x)?;
    last_dim_of(&xw, "softmax input")?;
    let y = xw.contiguous()?.apply_op1(SoftmaxOp {
        scale: 1.0,
        causal: None,
    })?;
    narrow_back(y, back)
}

/// `softmax(scale * scores)` over the last dimension with a causal mask fused in.
///
/// `scores` has shape `[..., rows, keys]` where the rows are blocks of `q_len` consecutive query
/// positions (several heads of one key/value group may be stacked along the rows: row `r` is
/// query `r % q_len`). The queries are the last `q_len` of the `keys` positions. A key `j` is
/// visible to query position `i` when `j <= i` and, with a sliding `window`, `i - j < window`
/// (Hugging Face's convention). Masked entries are exactly zero and get no gradient.
pub fn causal_softmax(
    scores: &Tensor,
    scale: f64,
    q_len: usize,
    window: Option<usize>,
) -> Result<Tensor> {
    let (xw, back) = widen(scores)?;
    last_dim_of(&xw, "causal_softmax scores")?;
    let rows = if xw.rank() >= 2 {
        xw.dim(candle_core::D::Minus2)?
    } else {
        0
    };
    if q_len == 0 || rows % q_len != 0 || xw.dim(candle_core::D::Minus1)? < q_len {
        return Err(Error::ShapeMismatch {
            tensor: "causal_softmax scores".to_string(),
            expected: vec![q_len, q_len],
            found: xw.dims().to_vec(),
        });
    }
    let y = xw.contiguous()?.apply_op1(SoftmaxOp {
        scale,
        causal: Some(Causal { q_len, window }),
    })?;
    narrow_back(y, back)
}

// ---------------------------------------------------------------------------------------------
// Rotary position embedding

/// How the rotated pairs of a head's features are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RopeLayout {
    /// Pairs `(x[i], x[i + d/2])`: the "neox"/Hugging Face Llama layout (candle's `rope`).
    HalfSplit,
    /// Pairs `(x[2i], x[2i + 1])`: the original/GPT-J layout (candle's `rope_i`).
    Interleaved,
}

struct RopeOp {
    layout: RopeLayout,
    /// Rotate by `-θ` (the backward of a rotation by `θ`).
    inverse: bool,
}

/// `rows_per_batch`: with per-sequence tables (`[batch, seq, d/2]`), how many rows of `x`
/// belong to one sequence; `None` for one table shared by all (`[seq, d/2]`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_kernel<T: Real>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    t: usize,
    d: usize,
    rows_per_batch: Option<usize>,
    layout: RopeLayout,
    inverse: bool,
) -> Vec<T> {
    let half = d / 2;
    let mut y = vec![T::from_f64(0.0); x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .enumerate()
        .with_min_len(min_rows(d))
        .for_each(|(row, (y, x))| {
            let pos = match rows_per_batch {
                Some(rpb) => (row / rpb) * t + row % t,
                None => row % t,
            };
            let cs = &cos[pos * half..(pos + 1) * half];
            let sn = &sin[pos * half..(pos + 1) * half];
            for i in 0..half {
                let c = cs[i];
                let s = if inverse {
                    T::from_f64(0.0) - sn[i]
                } else {
                    sn[i]
                };
                let (a, b) = match layout {
                    RopeLayout::HalfSplit => (i, i + half),
                    RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                };
                let x1 = x[a];
                let x2 = x[b];
                y[a] = x1 * c - x2 * s;
                y[b] = x2 * c + x1 * s;
            }
        });
    y
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        "eg-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.dims();
        if dims.len() < 2 {
            return Err(candle_core::Error::UnexpectedNumberOfDims {
                expected: 4,
                got: dims.len(),
                shape: l1.shape().clone(),
            });
        }
        let d = dims[dims.len() - 1];
        let t = dims[dims.len() - 2];
        dispatch!(s1, self.name(), T => {
            let x = slice::<T>(s1, l1, self.name())?;
            let cos = slice::<T>(s2, l2, self.name())?;
            let sin = slice::<T>(s3, l3, self.name())?;
            let rows = x.len() / d.max(1);
            let rows_per_batch = match l2.dims() {
                [b, _, _] => Some(rows / (*b).max(1)),
                _ => None,
            };
            let y = rope_kernel(x, cos, sin, t, d, rows_per_batch, self.layout, self.inverse);
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = grad.apply_op3_no_bwd(
            cos,
            sin,
            &RopeOp {
                layout: self.layout,
                inverse: !self.inverse,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

/// Rotary position embedding of `x` (`[batch, heads, seq, head_dim]`, or any shape whose last
/// two dimensions are `[seq, head_dim]`) with `cos`/`sin` of shape `[seq, head_dim / 2]`
/// (the same positions for every sequence) or `[batch, seq, head_dim / 2]` (each sequence's
/// own positions, e.g. restarting at each document of a packed row).
///
/// The gradient flows to `x` only: `cos` and `sin` are constants (computed from positions).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, layout: RopeLayout) -> Result<Tensor> {
    let (xw, back) = widen(x)?;
    let dims = xw.dims();
    let (t, d) = match dims {
        [.., t, d] => (*t, *d),
        _ => {
            return Err(Error::ShapeMismatch {
                tensor: "rope input".to_string(),
                expected: vec![0, 0],
                found: dims.to_vec(),
            });
        }
    };
    last_dim_of(&xw, "rope input")?;
    let shared = vec![t, d / 2];
    // Per-sequence tables need a batch dimension in `x` (`[batch, ..., seq, head_dim]`).
    let per_batch = (dims.len() >= 3).then(|| vec![dims[0], t, d / 2]);
    for (name, tensor) in [("rope cos", cos), ("rope sin", sin)] {
        let ok = tensor.dims() == shared.as_slice() || per_batch.as_deref() == Some(tensor.dims());
        if d % 2 != 0 || !ok || cos.dims() != sin.dims() {
            return Err(Error::ShapeMismatch {
                tensor: name.to_string(),
                expected: shared.clone(),
                found: tensor.dims().to_vec(),
            });
        }
    }
    let cos = cos.to_dtype(xw.dtype())?.detach().contiguous()?;
    let sin = sin.to_dtype(xw.dtype())?.detach().contiguous()?;
    let y = xw.contiguous()?.apply_op3(
        &cos,
        &sin,
        RopeOp {
            layout,
            inverse: false,
        },
    )?;
    narrow_back(y, back)
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: silu(gate) * up

struct SwiGluOp;

fn sigmoid<T: Real>(x: T) -> T {
    let one = T::from_f64(1.0);
    one / (one + (T::from_f64(0.0) - x).exp())
}

pub(crate) fn swiglu_fwd<T: Real>(g: &[T], u: &[T]) -> Vec<T> {
    let mut y = vec![T::from_f64(0.0); g.len()];
    y.par_chunks_mut(4096)
        .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
        .for_each(|(y, (g, u))| {
            for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                *y = g * sigmoid(g) * u;
            }
        });
    y
}

/// Returns `d_gate` followed by `d_up`.
pub(crate) fn swiglu_bwd<T: Real>(g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
    let n = g.len();
    let mut out = vec![T::from_f64(0.0); 2 * n];
    let (dg, du) = out.split_at_mut(n);
    let one = T::from_f64(1.0);
    dg.par_chunks_mut(4096)
        .zip(du.par_chunks_mut(4096))
        .zip(
            g.par_chunks(4096)
                .zip(u.par_chunks(4096))
                .zip(dy.par_chunks(4096)),
        )
        .for_each(|((dg, du), ((g, u), dy))| {
            for i in 0..g.len() {
                let s = sigmoid(g[i]);
                let silu = g[i] * s;
                du[i] = dy[i] * silu;
                dg[i] = dy[i] * u[i] * s * (one + g[i] * (one - s));
            }
        });
    out
}

impl CustomOp2 for SwiGluOp {
    fn name(&self) -> &'static str {
        "eg-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch!(s1, self.name(), T => {
            let g = slice::<T>(s1, l1, self.name())?;
            let u = slice::<T>(s2, l2, self.name())?;
            Ok((T::to_cpu_storage_owned(swiglu_fwd(g, u)), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = gate.elem_count();
        let grad = grad.contiguous()?;
        let both = gate.apply_op3_no_bwd(up, &grad, &SwiGluBwd)?;
        let dg = both.narrow(0, 0, n)?.reshape(gate.shape())?;
        let du = both.narrow(0, n, n)?.reshape(up.shape())?;
        Ok((Some(dg), Some(du)))
    }
}

struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "eg-swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch!(s1, self.name(), T => {
            let g = slice::<T>(s1, l1, self.name())?;
            let u = slice::<T>(s2, l2, self.name())?;
            let dy = slice::<T>(s3, l3, self.name())?;
            let out = swiglu_bwd(g, u, dy);
            let len = out.len();
            Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
        })
    }
}

/// `silu(gate) * up` (the Llama MLP's gating) in one pass, with gradients for both inputs
/// (composite candle needs five elementwise passes for SiLU's backward alone).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        return Err(Error::ShapeMismatch {
            tensor: "swiglu up".to_string(),
            expected: gate.dims().to_vec(),
            found: up.dims().to_vec(),
        });
    }
    let (g, back) = widen(gate)?;
    let u = up.to_dtype(g.dtype())?.contiguous()?;
    let y = g.contiguous()?.apply_op2(&u, SwiGluOp)?;
    narrow_back(y, back)
}

// ---------------------------------------------------------------------------------------------
// Cross entropy (fused log-softmax + negative log-likelihood)

struct CrossEntropyOp {
    /// Target class per row, `None` for ignored rows.
    targets: std::sync::Arc<Vec<Option<u32>>>,
    /// Number of rows that are not ignored (the mean's denominator, at least 1).
    count: usize,
    /// Per-row log-sum-exp saved by the forward pass, so the backward needs one `exp` per
    /// element instead of two.
    lse: std::sync::Mutex<std::sync::Arc<Vec<f64>>>,
}

pub(crate) fn log_sum_exp<T: Real>(x: &[T]) -> T {
    let max = row_max(x);
    max + sum_exp_shifted(x, max).ln()
}

/// The largest element of a non-empty row (NaN elements after the first are skipped; a NaN
/// still reaches the result through the exponentials).
pub(crate) fn row_max<T: Real>(x: &[T]) -> T {
    let mut max = x[0];
    for &v in x {
        if v > max {
            max = v;
        }
    }
    max
}

/// Replaces every `x_i` by `e^(x_i - shift)` and returns their sum, in the order of
/// [`sum_exp_shifted`] (bitwise the same sum).
pub(crate) fn exp_shifted_in_place<T: Real>(x: &mut [T], shift: T) -> T {
    let zero = T::from_f64(0.0);
    let mut acc = [zero; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *v = (*v - shift).exp();
            *a += *v;
        }
    }
    let mut s = zero;
    for v in chunks.into_remainder() {
        *v = (*v - shift).exp();
        s += *v;
    }
    for a in acc {
        s += a;
    }
    s
}

/// `Σ e^(x_i - shift)`, over eight interleaved partial sums (a fixed order, so deterministic)
/// so that the exponentials vectorise.
pub(crate) fn sum_exp_shifted<T: Real>(x: &[T], shift: T) -> T {
    let zero = T::from_f64(0.0);
    let mut acc = [zero; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (v - shift).exp();
        }
    }
    let mut s = zero;
    for &v in chunks.remainder() {
        s += (v - shift).exp();
    }
    for a in acc {
        s += a;
    }
    s
}

/// Returns the mean loss and each row's log-sum-exp (0 for ignored rows).
fn ce_fwd<T: Real>(x: &[T], v: usize, targets: &[Option<u32>], count: usize) -> (T, Vec<f64>) {
    let per_row: Vec<(f64, f64)> = x
        .par_chunks(v)
        .zip(targets.par_iter())
        .with_min_len(min_rows(v))
        .map(|(x, t)| match t {
            Some(t) => {
                let lse = log_sum_exp(x);
                ((lse - x[*t as usize]).to_f64(), lse.to_f64())
            }
            None => (0.0, 0.0),
        })
        .collect();
    // Sum in row order in f64: deterministic and accurate.
    let loss = per_row.iter().map(|p| p.0).sum::<f64>() / count as f64;
    (
        T::from_f64(loss),
        per_row.into_iter().map(|p| p.1).collect(),
    )
}

fn ce_bwd<T: Real>(x: &[T], v: usize, targets: &[Option<u32>], lse: &[f64], scale: T) -> Vec<T> {
    let mut dx = vec![T::from_f64(0.0); x.len()];
    dx.par_chunks_mut(v)
        .zip(x.par_chunks(v))
        .zip(targets.par_iter().enumerate())
        .with_min_len(min_rows(v))
        .for_each(|((dx, x), (row, t))| {
            if let Some(t) = t {
                let lse = match lse.get(row) {
                    Some(&l) => T::from_f64(l),
                    None => log_sum_exp(x),
                };
                for (dx, &x) in dx.iter_mut().zip(x) {
                    *dx = (x - lse).exp() * scale;
                }
                dx[*t as usize] -= scale;
            }
        });
    dx
}

impl CustomOp1 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "eg-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let v = last_dim(l)?;
        dispatch!(s, self.name(), T => {
            let x = slice::<T>(s, l, self.name())?;
            let (loss, lse) = ce_fwd(x, v, &self.targets, self.count);
            if let Ok(mut saved) = self.lse.lock() {
                *saved = std::sync::Arc::new(lse);
            }
            Ok((T::to_cpu_storage_owned(vec![loss]), Shape::from(())))
        })
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad.to_dtype(DType::F64)?.to_scalar::<f64>()? / self.count as f64;
        // An empty table (never expected) makes the backward recompute each row's lse.
        let lse = self.lse.lock().map(|l| l.clone()).unwrap_or_default();
        let dx = x.apply_op1_no_bwd(&CrossEntropyBwd {
            targets: self.targets.clone(),
            lse,
            scale: g,
        })?;
        Ok(Some(dx))
    }
}

struct CrossEntropyBwd {
    targets: std::sync::Arc<Vec<Option<u32>>>,
    lse: std::sync::Arc<Vec<f64>>,
    scale: f64,
}

impl CustomOp1 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "eg-cross-entropy-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let v = last_dim(l)?;
        dispatch!(s, self.name(), T => {
            let x = slice::<T>(s, l, self.name())?;
            let dx = ce_bwd(x, v, &self.targets, &self.lse, T::from_f64(self.scale));
            Ok((T::to_cpu_storage_owned(dx), l.shape().clone()))
        })
    }
}

/// Mean cross entropy of `logits` (`[..., vocab]`) against `targets` (one per row; `None`
/// rows are ignored and excluded from the mean). Fused: the log-softmax is never
/// materialised; the backward is `softmax - one_hot` per row, computed in one pass.
///
/// With every row ignored the loss is `0` and the gradient is zero (not NaN).
///
/// bf16/f16 logits are widened to f32 and the loss stays f32 (a bf16 loss would keep three
/// significant digits: too coarse to report, to detect spikes on, or to scale for f16
/// training); the gradient flows back to the logits in their own dtype.
pub fn cross_entropy(logits: &Tensor, targets: &[Option<u32>]) -> Result<Tensor> {
    let (xw, _) = widen(logits)?;
    let v = last_dim_of(&xw, "cross_entropy logits")?;
    let rows = xw.elem_count() / v.max(1);
    if targets.len() != rows {
        return Err(Error::ShapeMismatch {
            tensor: "cross_entropy targets".to_string(),
            expected: vec![rows],
            found: vec![targets.len()],
        });
    }
    if let Some(bad) = targets.iter().flatten().find(|&&t| t as usize >= v) {
        return Err(Error::TargetOutOfRange {
            target: *bad,
            vocab: v,
        });
    }
    let count = targets.iter().filter(|t| t.is_some()).count().max(1);
    let loss = xw.contiguous()?.apply_op1(CrossEntropyOp {
        targets: std::sync::Arc::new(targets.to_vec()),
        count,
        lse: std::sync::Mutex::default(),
    })?;
    Ok(loss)
}

/// Targets for next-token prediction: position `i` predicts token `i + 1` of the same row.
///
/// `ids` is `[batch, seq]` (any integer dtype); `ignore` marks label values to skip (Hugging
/// Face uses `-100`); `loss_mask` (same shape, non-zero = counted) optionally masks the
/// *predicted* positions (e.g. prompt tokens in SFT). The last position of each row has no
/// target.
pub fn next_token_targets(
    ids: &Tensor,
    ignore: Option<i64>,
    loss_mask: Option<&Tensor>,
) -> Result<Vec<Option<u32>>> {
    let (b, t) = ids.dims2()?;
    let flat: Vec<i64> = ids.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
    let mask: Option<Vec<f64>> = match loss_mask {
        Some(m) => {
            if m.dims() != [b, t] {
                return Err(Error::ShapeMismatch {
                    tensor: "loss_mask".to_string(),
                    expected: vec![b, t],
                    found: m.dims().to_vec(),
                });
            }
            Some(m.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?)
        }
        None => None,
    };
    let mut out = Vec::with_capacity(b * t);
    for row in 0..b {
        for i in 0..t {
            let target = if i + 1 < t {
                let k = row * t + i + 1;
                let label = flat[k];
                let masked = mask.as_ref().is_some_and(|m| m[k] == 0.0);
                if masked || Some(label) == ignore || label < 0 {
                    None
                } else {
                    Some(u32::try_from(label).map_err(|_| Error::LabelOutOfRange { label })?)
                }
            } else {
                None
            };
            out.push(target);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Linear: x @ weight^T over the last dimension, with one fused backward

struct LinearOp;

impl LinearOp {
    /// `(rows, in, out)` of `x` `[.., in]` times `weight` `[out, in]`.
    fn dims(x: &Layout, w: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let inn = last_dim(x)?;
        let (out, w_in) = w.shape().dims2()?;
        if w_in != inn {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: x.shape().clone(),
                rhs: w.shape().clone(),
                op: "eg-linear",
            });
        }
        Ok((x.shape().elem_count() / inn.max(1), inn, out))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "eg-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage as _;
        let (rows, inn, out) = Self::dims(l1, l2)?;
        let (x_start, _) = l1
            .contiguous_offsets()
            .ok_or(candle_core::Error::RequiresContiguous { op: self.name() })?;
        let x2 = Layout::contiguous_with_offset((rows, inn), x_start);
        // weight^T as a strided view: gemm reads it in place, no copy.
        let wt = l2.transpose(0, 1)?;
        let y = s1.matmul(s2, (1, rows, out, inn), &x2, &wt)?;
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        Ok((y, Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (out, inn) = weight.dims2()?;
        let rows = x.elem_count() / inn.max(1);
        // Detached: a gradient computed from graph tensors would keep its inputs (the
        // activation, the weight) in the graph, and candle never detaches the gradients it
        // stores for variables, so every activation would live until the GradStore is dropped.
        let g = grad.detach().contiguous()?.reshape((rows, out))?;
        let x2 = x.detach().reshape((rows, inn))?;
        let weight = weight.detach();
        // One matmul per input, each result already in its input's shape and layout (candle's
        // composite would add reshape and transpose nodes, each a zero-filled gradient plus
        // an add, one of them strided).
        let dx = g.matmul(&weight)?.reshape(x.shape())?;
        let dw = g.t()?.matmul(&x2)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `x @ weight^T` over the last dimension of `x` (`[.., in]` times `[out, in]`, giving
/// `[.., out]`), as one graph node: the backward is exactly one matmul per input, where
/// candle's composite (`reshape`, `t`, `matmul`, `reshape`) builds each gradient through
/// zero-filled buffers and a strided transpose-add. Any float dtype candle's matmul takes.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (_, inn) = weight.dims2()?;
    if x.dims().last() != Some(&inn) || x.elem_count() == 0 {
        return Err(Error::ShapeMismatch {
            tensor: "linear input".to_string(),
            expected: vec![inn],
            found: x.dims().to_vec(),
        });
    }
    if x.dtype() != weight.dtype() {
        return Err(Error::UnsupportedDType {
            op: "linear (input and weight dtypes differ)",
            dtype: x.dtype(),
        });
    }
    Ok(x.contiguous()?.apply_op2(&weight.contiguous()?, LinearOp)?)
}

// ---------------------------------------------------------------------------------------------
// Attention head layout: [b, t, n * hd] <-> [b, n, t, hd]

/// Copies rows of `hd` elements between the token-major `[b, t, n, hd]` and the head-major
/// `[b, n, t, hd]` layouts (`to_heads` chooses the direction).
pub(crate) fn permute_heads<T: WithDType>(
    x: &[T],
    (_, t, n, hd): (usize, usize, usize, usize),
    to_heads: bool,
) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    // One output block of `t * hd` (to heads) or `n * hd` (from heads) per task.
    let (inner, block) = if to_heads { (t, t * hd) } else { (n, n * hd) };
    out.par_chunks_mut(block.max(1))
        .enumerate()
        .for_each(|(blk, o)| {
            for (i, row) in o.chunks_mut(hd.max(1)).enumerate().take(inner) {
                let src = if to_heads {
                    // blk = bi * n + h; i = token
                    let (bi, h) = (blk / n, blk % n);
                    ((bi * t + i) * n + h) * hd
                } else {
                    // blk = bi * t + token; i = h
                    let (bi, ti) = (blk / t, blk % t);
                    ((bi * n + i) * t + ti) * hd
                };
                row.copy_from_slice(&x[src..src + hd]);
            }
        });
    out
}

struct HeadsOp {
    dims: (usize, usize, usize, usize),
    to_heads: bool,
}

impl CustomOp1 for HeadsOp {
    fn name(&self) -> &'static str {
        if self.to_heads {
            "eg-split-heads"
        } else {
            "eg-merge-heads"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, t, n, hd) = self.dims;
        let shape = if self.to_heads {
            Shape::from((b, n, t, hd))
        } else {
            Shape::from((b, t, n * hd))
        };
        macro_rules! run {
            ($t:ty) => {{
                let x = slice::<$t>(s, l, self.name())?;
                Ok((
                    <$t>::to_cpu_storage_owned(permute_heads(x, self.dims, self.to_heads)),
                    shape,
                ))
            }};
        }
        match s {
            CpuStorage::F32(_) => run!(f32),
            CpuStorage::F64(_) => run!(f64),
            CpuStorage::BF16(_) => run!(half::bf16),
            CpuStorage::F16(_) => run!(half::f16),
            other => Err(candle_core::Error::UnsupportedDTypeForOp(
                candle_core::backend::BackendStorage::dtype(other),
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
        let back = HeadsOp {
            dims: self.dims,
            to_heads: !self.to_heads,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// `[b, t, n * hd]` → `[b, n, t, hd]` (contiguous), as one graph node whose backward is the
/// inverse copy (candle's `reshape`, `transpose`, `contiguous` are three nodes, each with a
/// zero-filled gradient, one of them added through strides).
pub fn split_heads(x: &Tensor, n: usize) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    if n == 0 || width % n != 0 {
        return Err(Error::ShapeMismatch {
            tensor: "split_heads input".to_string(),
            expected: vec![b, t, n],
            found: x.dims().to_vec(),
        });
    }
    let op = HeadsOp {
        dims: (b, t, n, width / n),
        to_heads: true,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// `[b, n, t, hd]` → `[b, t, n * hd]`, the inverse of [`split_heads`].
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, n, t, hd) = x.dims4()?;
    let op = HeadsOp {
        dims: (b, t, n, hd),
        to_heads: false,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_allowed_ranges() {
        let c = Some(Causal {
            q_len: 3,
            window: None,
        });
        assert_eq!(allowed(c, 0, 3), (0, 1));
        assert_eq!(allowed(c, 2, 3), (0, 3));
        // second head stacked along the rows
        assert_eq!(allowed(c, 4, 3), (0, 2));
        // queries are the last q_len of 5 keys
        assert_eq!(allowed(c, 0, 5), (0, 3));
        let w = Some(Causal {
            q_len: 4,
            window: Some(2),
        });
        assert_eq!(allowed(w, 3, 4), (2, 4));
    }

    #[test]
    fn rms_bwd_is_thread_independent_in_layout() {
        let d = 4;
        let x: Vec<f64> = (0..(d * 70)).map(|i| (i as f64 * 0.37).sin()).collect();
        let g: Vec<f64> = (0..(d * 70)).map(|i| (i as f64 * 0.11).cos()).collect();
        let w = vec![1.0, 2.0, 0.5, -1.0];
        let a = rms_bwd(&x, &w, &g, d, 1e-6);
        let b = rms_bwd(&x, &w, &g, d, 1e-6);
        assert_eq!(a, b);
        assert_eq!(a.len(), x.len() + d);
    }
}
