//! Attention for training: the reference formulation and a memory-efficient, chunked one.
//!
//! [`reference_attention`] materialises the `[batch, heads, seq, seq]` scores and
//! probabilities (memory quadratic in the sequence length). [`chunked_attention`] is a CPU
//! flash-attention: each query row streams over the keys in blocks with an online softmax
//! (running maximum and sum), so the forward keeps `O(seq · head_dim)` per head and never a
//! score matrix. Its backward is a second fused pass that **recomputes** the scores: it first
//! recovers each row's log-sum-exp with the same online pass, then forms
//! `P = exp(S - lse)`, `dV += Pᵀ dO`, `dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O))`, `dQ = s dS K`,
//! `dK = s dSᵀ Q` block by block. Work is split over (batch, key/value head) pairs, each
//! summed in a fixed order, so results do not depend on the thread count.
//!
//! Masks ([`AttentionMask`]): causal, key padding, packed documents (block-diagonal: a query
//! sees only keys of its own document), in any combination. A query that sees no key at all
//! gets a zero output and no gradient (the reference does the same). Grouped-query attention
//! is native: `k`/`v` may have fewer heads than `q` (query head `h` reads key/value head
//! `h / (heads / kv_heads)`).
//!
//! CUDA: candle-flash-attn has no backward pass, so it is not used for training here; this
//! kernel is CPU-only (other devices return candle's error).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::{Error, Result};

/// Which keys each query may see.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttentionMask {
    /// Key `j` is visible to query `i` only if `j <= i`.
    pub causal: bool,
    /// Per `[batch, seq]` position (row-major): whether the key is a real token. `None`: all.
    pub key_valid: Option<Vec<bool>>,
    /// Per `[batch, seq]` position: the document it belongs to in a packed row; a query sees
    /// only keys of its own document. `None`: one document per row.
    pub doc_ids: Option<Vec<u32>>,
}

impl AttentionMask {
    /// Causal only.
    pub fn causal() -> Self {
        Self {
            causal: true,
            ..Self::default()
        }
    }

    fn check(&self, b: usize, t: usize) -> Result<()> {
        let bad = |what: &str, n: usize| Error::ShapeMismatch {
            tensor: format!("attention mask {what}"),
            expected: vec![b, t],
            found: vec![n],
        };
        if let Some(v) = &self.key_valid
            && v.len() != b * t
        {
            return Err(bad("key_valid", v.len()));
        }
        if let Some(v) = &self.doc_ids
            && v.len() != b * t
        {
            return Err(bad("doc_ids", v.len()));
        }
        Ok(())
    }

    #[inline]
    fn allowed(&self, b: usize, t: usize, i: usize, j: usize) -> bool {
        (!self.causal || j <= i)
            && self.key_valid.as_ref().is_none_or(|v| v[b * t + j])
            && self
                .doc_ids
                .as_ref()
                .is_none_or(|d| d[b * t + i] == d[b * t + j])
    }

    /// `[batch, 1, seq, seq]` 0/1 visibility, as `dtype`.
    fn dense(&self, b: usize, t: usize, dtype: DType, dev: &candle_core::Device) -> Result<Tensor> {
        let mut m = vec![0f32; b * t * t];
        for bb in 0..b {
            for i in 0..t {
                for j in 0..t {
                    if self.allowed(bb, t, i, j) {
                        m[(bb * t + i) * t + j] = 1.0;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(m, (b, 1, t, t), dev)?.to_dtype(dtype)?)
    }
}

fn dims(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(usize, usize, usize, usize, usize)> {
    let (b, h, t, d) = q.dims4()?;
    let (kb, hkv, kt, kd) = k.dims4()?;
    if (kb, kt, kd) != (b, t, d) || hkv == 0 || h % hkv != 0 || v.dims() != k.dims() {
        return Err(Error::ShapeMismatch {
            tensor: "attention k/v".to_string(),
            expected: vec![b, h, t, d],
            found: k.dims().to_vec(),
        });
    }
    Ok((b, h, hkv, t, d))
}

/// `softmax(scale · q kᵀ + mask) v` with candle ops (scores materialised): the reference.
/// `q` is `[batch, heads, seq, head_dim]`, `k`/`v` `[batch, kv_heads, seq, head_dim]`.
pub fn reference_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, hkv, t, d) = dims(q, k, v)?;
    mask.check(b, t)?;
    let rep = h / hkv;
    let expand = |x: &Tensor| -> Result<Tensor> {
        Ok(x.unsqueeze(2)?
            .broadcast_as((b, hkv, rep, t, d))?
            .contiguous()?
            .reshape((b, h, t, d))?)
    };
    let (k, v) = (expand(k)?, expand(v)?);
    let vis = mask.dense(b, t, q.dtype(), q.device())?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    // Masked scores get -1e30: exp underflows to exactly 0 unless the whole row is masked.
    let neg = ((vis.ones_like()? - &vis)? * -1e30)?;
    let p = crate::ops::softmax_last_dim(&scores.broadcast_add(&neg)?)?;
    let any = vis.max_keepdim(3)?; // [b, 1, t, 1]: the row sees at least one key
    let p = p.broadcast_mul(&any)?;
    Ok(p.matmul(&v)?)
}

/// Which attention implementation a model runs (`model.attention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKind {
    /// [`reference_attention`]'s formulation (fused causal softmax over materialised scores).
    Reference,
    /// [`chunked_attention`].
    Chunked,
    /// Chunked from [`AUTO_CHUNKED_FROM`] positions on, reference below (faster for short
    /// rows, where the scores are small).
    #[default]
    Auto,
}

/// Sequence length from which [`AttentionKind::Auto`] picks the chunked kernel.
pub const AUTO_CHUNKED_FROM: usize = 1024;

impl AttentionKind {
    /// From the configuration's `model.attention`.
    pub fn from_config(a: eg_config::wire::Attention) -> Self {
        use eg_config::wire::Attention as A;
        match a {
            A::Reference => AttentionKind::Reference,
            A::Chunked => AttentionKind::Chunked,
            _ => AttentionKind::Auto,
        }
    }

    /// Whether a row of `seq` positions runs chunked. A sliding window (Mistral) always runs
    /// the reference, which supports it.
    pub fn use_chunked(self, seq: usize, window: Option<usize>) -> bool {
        window.is_none()
            && match self {
                AttentionKind::Reference => false,
                AttentionKind::Chunked => true,
                AttentionKind::Auto => seq >= AUTO_CHUNKED_FROM,
            }
    }
}

/// Keys per block of the online softmax.
pub const DEFAULT_BLOCK: usize = 64;

/// Memory-efficient attention (see the module docs): same inputs and result as
/// [`reference_attention`], with gradients for `q`, `k` and `v`.
pub fn chunked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> Result<Tensor> {
    chunked_attention_with_block(q, k, v, mask, scale, DEFAULT_BLOCK)
}

/// [`chunked_attention`] with an explicit key block size (tests use small blocks).
pub fn chunked_attention_with_block(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
    block: usize,
) -> Result<Tensor> {
    let (b, h, hkv, t, d) = dims(q, k, v)?;
    mask.check(b, t)?;
    let dtype = q.dtype();
    let (q, k, v, back) = match dtype {
        DType::F32 | DType::F64 => (q.clone(), k.clone(), v.clone(), None),
        DType::BF16 | DType::F16 => (
            q.to_dtype(DType::F32)?,
            k.to_dtype(DType::F32)?,
            v.to_dtype(DType::F32)?,
            Some(dtype),
        ),
        other => {
            return Err(Error::UnsupportedDType {
                op: "chunked_attention",
                dtype: other,
            });
        }
    };
    let op = ChunkedAttn {
        g: Geom {
            b,
            h,
            hkv,
            t,
            d,
            scale,
            block: block.max(1),
        },
        mask: Arc::new(mask.clone()),
    };
    let y = q
        .contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?;
    Ok(match back {
        Some(dt) => y.to_dtype(dt)?,
        None => y,
    })
}

#[derive(Debug, Clone, Copy)]
struct Geom {
    b: usize,
    h: usize,
    hkv: usize,
    t: usize,
    d: usize,
    scale: f64,
    block: usize,
}

struct ChunkedAttn {
    g: Geom,
    mask: Arc<AttentionMask>,
}

trait Float: WithDType {
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    const NEG_INF: Self;
}

impl Float for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    const NEG_INF: Self = f32::NEG_INFINITY;
}

impl Float for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    const NEG_INF: Self = f64::NEG_INFINITY;
}

#[inline]
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::from_f64(0.0); 4];
    let n = a.len() / 4 * 4;
    for i in (0..n).step_by(4) {
        acc[0] += a[i] * b[i];
        acc[1] += a[i + 1] * b[i + 1];
        acc[2] += a[i + 2] * b[i + 2];
        acc[3] += a[i + 3] * b[i + 3];
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for i in n..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// One query row's online softmax over its visible keys: returns `(max, sum)` and, with
/// `out`, accumulates the normalised output.
#[allow(clippy::too_many_arguments)]
fn row_forward<T: Float>(
    g: &Geom,
    mask: &AttentionMask,
    bb: usize,
    i: usize,
    qi: &[T],
    k: &[T],
    v: &[T],
    mut out: Option<&mut [T]>,
) -> (T, T) {
    let (t, d) = (g.t, g.d);
    let zero = T::from_f64(0.0);
    let scale = T::from_f64(g.scale);
    let mut m = T::NEG_INF;
    let mut l = zero;
    let end = if mask.causal { i + 1 } else { t };
    let mut s = vec![zero; g.block];
    let mut j0 = 0;
    while j0 < end {
        let j1 = (j0 + g.block).min(end);
        let mut bm = T::NEG_INF;
        for j in j0..j1 {
            let sj = if mask.allowed(bb, t, i, j) {
                dot(qi, &k[j * d..(j + 1) * d]) * scale
            } else {
                T::NEG_INF
            };
            s[j - j0] = sj;
            if sj > bm {
                bm = sj;
            }
        }
        if bm > T::NEG_INF {
            let m_new = if bm > m { bm } else { m };
            let corr = if m > T::NEG_INF {
                (m - m_new).exp()
            } else {
                zero
            };
            l *= corr;
            if let Some(o) = out.as_deref_mut() {
                for x in o.iter_mut() {
                    *x *= corr;
                }
            }
            for j in j0..j1 {
                let sj = s[j - j0];
                if sj > T::NEG_INF {
                    let p = (sj - m_new).exp();
                    l += p;
                    if let Some(o) = out.as_deref_mut() {
                        for (x, &vv) in o.iter_mut().zip(&v[j * d..(j + 1) * d]) {
                            *x += p * vv;
                        }
                    }
                }
            }
            m = m_new;
        }
        j0 = j1;
    }
    if let Some(o) = out
        && l > zero
    {
        let inv = T::from_f64(1.0) / l;
        for x in o.iter_mut() {
            *x *= inv;
        }
    }
    (m, l)
}

fn attn_fwd<T: Float>(g: &Geom, mask: &AttentionMask, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
    let (t, d) = (g.t, g.d);
    let rep = g.h / g.hkv;
    let mut y = vec![T::from_f64(0.0); q.len()];
    y.par_chunks_mut(d)
        .enumerate()
        .with_min_len(16)
        .for_each(|(row, o)| {
            let i = row % t;
            let hh = (row / t) % g.h;
            let bb = row / (t * g.h);
            let kv = (bb * g.hkv + hh / rep) * t * d;
            let qi = &q[row * d..(row + 1) * d];
            row_forward(
                g,
                mask,
                bb,
                i,
                qi,
                &k[kv..kv + t * d],
                &v[kv..kv + t * d],
                Some(o),
            );
        });
    y
}

/// Gradients `(dq, dk, dv)` of the attention, recomputing the scores.
#[allow(clippy::too_many_arguments)]
fn attn_bwd<T: Float>(
    g: &Geom,
    mask: &AttentionMask,
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    go: &[T],
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (t, d) = (g.t, g.d);
    let rep = g.h / g.hkv;
    let zero = T::from_f64(0.0);
    let scale = T::from_f64(g.scale);
    // One task per (batch, kv head): it owns that head's dK/dV and its query heads' dQ.
    let parts: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..g.b * g.hkv)
        .into_par_iter()
        .map(|task| {
            let bb = task / g.hkv;
            let kvh = task % g.hkv;
            let kv = task * t * d;
            let (kh, vh) = (&k[kv..kv + t * d], &v[kv..kv + t * d]);
            let mut dq = vec![zero; rep * t * d];
            let mut dk = vec![zero; t * d];
            let mut dv = vec![zero; t * d];
            for r in 0..rep {
                let hh = kvh * rep + r;
                for i in 0..t {
                    let row = (bb * g.h + hh) * t + i;
                    let qi = &q[row * d..(row + 1) * d];
                    let (m, l) = row_forward(g, mask, bb, i, qi, kh, vh, None);
                    if l <= zero {
                        continue;
                    }
                    let lse = m + l.ln();
                    let goi = &go[row * d..(row + 1) * d];
                    let di = dot(goi, &o[row * d..(row + 1) * d]);
                    let dqi = &mut dq[(r * t + i) * d..(r * t + i + 1) * d];
                    let end = if mask.causal { i + 1 } else { t };
                    for j in 0..end {
                        if !mask.allowed(bb, t, i, j) {
                            continue;
                        }
                        let kj = &kh[j * d..(j + 1) * d];
                        let p = (dot(qi, kj) * scale - lse).exp();
                        let dp = dot(goi, &vh[j * d..(j + 1) * d]);
                        let ds = p * (dp - di) * scale;
                        for (x, &gv) in dv[j * d..(j + 1) * d].iter_mut().zip(goi) {
                            *x += p * gv;
                        }
                        for (x, &kv) in dqi.iter_mut().zip(kj) {
                            *x += ds * kv;
                        }
                        for (x, &qv) in dk[j * d..(j + 1) * d].iter_mut().zip(qi) {
                            *x += ds * qv;
                        }
                    }
                }
            }
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![zero; q.len()];
    let mut dk = Vec::with_capacity(k.len());
    let mut dv = Vec::with_capacity(v.len());
    for (task, (pq, pk, pv)) in parts.into_iter().enumerate() {
        let bb = task / g.hkv;
        let kvh = task % g.hkv;
        for r in 0..rep {
            let hh = kvh * rep + r;
            let dst = (bb * g.h + hh) * t * d;
            dq[dst..dst + t * d].copy_from_slice(&pq[r * t * d..(r + 1) * t * d]);
        }
        dk.extend(pk);
        dv.extend(pv);
    }
    (dq, dk, dv)
}

fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => Err(candle_core::Error::RequiresContiguous {
            op: "eg-chunked-attention",
        }),
    }
}

impl CustomOp3 for ChunkedAttn {
    fn name(&self) -> &'static str {
        "eg-chunked-attention"
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
        match s1 {
            CpuStorage::F32(_) => {
                let y = attn_fwd::<f32>(
                    &self.g,
                    &self.mask,
                    contiguous(s1, l1)?,
                    contiguous(s2, l2)?,
                    contiguous(s3, l3)?,
                );
                Ok((CpuStorage::F32(y), l1.shape().clone()))
            }
            CpuStorage::F64(_) => {
                let y = attn_fwd::<f64>(
                    &self.g,
                    &self.mask,
                    contiguous(s1, l1)?,
                    contiguous(s2, l2)?,
                    contiguous(s3, l3)?,
                );
                Ok((CpuStorage::F64(y), l1.shape().clone()))
            }
            other => Err(candle_core::Error::UnsupportedDTypeForOp(
                candle_core::backend::BackendStorage::dtype(other),
                self.name(),
            )),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        fn go<T: Float>(
            op: &ChunkedAttn,
            ts: [&Tensor; 5],
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let vecs: Vec<Vec<T>> = ts
                .iter()
                .map(|t| t.contiguous()?.flatten_all()?.to_vec1::<T>())
                .collect::<candle_core::Result<_>>()?;
            let (dq, dk, dv) = attn_bwd(
                &op.g, &op.mask, &vecs[0], &vecs[1], &vecs[2], &vecs[3], &vecs[4],
            );
            let dev = ts[0].device();
            Ok((
                Some(Tensor::from_vec(dq, ts[0].shape(), dev)?),
                Some(Tensor::from_vec(dk, ts[1].shape(), dev)?),
                Some(Tensor::from_vec(dv, ts[2].shape(), dev)?),
            ))
        }
        let ts = [q, k, v, res, grad];
        match q.dtype() {
            DType::F32 => go::<f32>(self, ts),
            DType::F64 => go::<f64>(self, ts),
            other => Err(candle_core::Error::UnsupportedDTypeForOp(
                other,
                self.name(),
            )),
        }
    }
}
