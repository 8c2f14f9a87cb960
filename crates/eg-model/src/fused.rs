//! A fused training step for the Llama family (issue 9): forward pass, cross entropy and a
//! hand-written backward pass in one call, without candle's autograd.
//!
//! ## Why
//!
//! candle's `backward()` sums every gradient into a zero-filled buffer (`zeros_like`, then
//! `add`) for every input of every node, keeps one tensor per node alive until the whole
//! backward is done, zero-fills every matmul output, and runs its element-wise adds on a
//! second thread pool that competes with gemm's on a small machine. Profiled at 6.3M/110M
//! parameters on two cores, that machinery was 15–25% of a step. [`Llama::fused_step`]
//! computes the same function with the same kernels, but its backward is written out by
//! hand: one `gemm` call per gradient (through the crate's `gemm` wrapper: outputs not
//! zero-filled, sums such as `dq·Wq + dk·Wk + dv·Wv` and the residual adds accumulated by the
//! products themselves), the element-wise backward kernels of [`crate::ops`] (parallel over rows), the
//! cross entropy's gradient written over the logits (one exponential per logit), causal
//! attention computed on the blocks below the diagonal only (in 32- or 64-row blocks, each
//! key/value group on its own thread), and each layer's saved activations dropped as soon as
//! its backward is done.
//!
//! ## Exactness
//!
//! Same kernels as [`Llama::forward`] + [`crate::ops::cross_entropy`], but the products are
//! blocked differently (masked attention blocks skipped, residual adds folded into the
//! products), so the loss agrees within float rounding (bitwise on the tested shapes), and
//! the gradients agree with candle's autograd within rounding (sums formed in another
//! order). Both are checked against autograd and against f64 central finite differences
//! for every parameter. With activation checkpointing the gradients are bitwise those of
//! the run without it.
//!
//! ## Scope
//!
//! Full training of a Llama-family model in f32 or f64 on the CPU, with or without activation
//! checkpointing (then only each layer's input is kept and the layer is recomputed in the
//! backward, bitwise the same gradients): no LoRA adapters, no mixed precision, no biases
//! (Qwen2's q/k/v biases), no sliding window shorter than the sequence, no chunked attention
//! and no document masks.
//! [`Llama::fused_step_unavailable`] says which of these blocks it; callers fall back to the
//! autograd path, which covers all of them.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Layout, Storage, Tensor, WithDType};
use rayon::prelude::*;

use crate::gemm::{self, Mat};
use crate::llama::{Layer, Llama};
use crate::lora::Proj;
use crate::ops::{self, Real, RopeLayout};
use crate::{Error, Result};

/// The result of [`Llama::fused_step`].
#[derive(Debug)]
pub struct FusedStep {
    /// `weight ×` the mean cross entropy over the counted targets (as
    /// `cross_entropy(logits, targets) * weight` would give it).
    pub loss: f64,
    /// Targets counted in the mean.
    pub count: usize,
    /// The gradient of `loss` for every parameter of the model, keyed by the parameter
    /// tensors (the model's [`candle_core::Var`]s), as `loss.backward()` would return it.
    pub grads: GradStore,
    /// Wall time of the forward pass including the loss, in seconds (the rest of the call is
    /// the backward pass).
    pub forward_seconds: f64,
}

/// A plain trainable projection's weight (no bias, no adapter).
fn plain_weight(p: &Proj) -> Option<&Tensor> {
    match p {
        Proj::Train(l) if l.bias.is_none() => Some(&l.weight),
        _ => None,
    }
}

fn internal(what: &str) -> Error {
    Error::Candle(candle_core::Error::Msg(format!("fused step: {what}")))
}

/// The contiguous elements of a tensor's storage.
fn slice_of<'a, T: WithDType>(storage: &'a Storage, layout: &Layout) -> Result<&'a [T]> {
    let Storage::Cpu(cpu) = storage else {
        return Err(internal("tensor not on the CPU"));
    };
    let data = cpu.as_slice::<T>()?;
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| internal("parameter not contiguous"))?;
    Ok(&data[a..b])
}

fn from_vec<T: WithDType, S: Into<candle_core::Shape>>(v: Vec<T>, shape: S) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// `a += b` element-wise.
fn add_into<T: Real>(a: &mut [T], b: &[T]) {
    a.par_chunks_mut(1 << 14)
        .zip(b.par_chunks(1 << 14))
        .for_each(|(a, b)| {
            for (a, &b) in a.iter_mut().zip(b) {
                *a += b;
            }
        });
}

/// `rms_norm` backward: `(dx + residual, dw)`.
fn rms_backward<T: Real>(
    x: &[T],
    w: &[T],
    g: &[T],
    residual: Option<&[T]>,
    eps: f64,
) -> (Vec<T>, Vec<T>) {
    let d = w.len();
    let mut dx = ops::rms_bwd(x, w, g, d, eps);
    let dw = dx.split_off(x.len());
    if let Some(r) = residual {
        add_into(&mut dx, r);
    }
    (dx, dw)
}

/// The weights of a decoder layer, as slices of the parameters' storage.
struct LayerW<'a, T> {
    input_norm: &'a [T],
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    o: &'a [T],
    post_norm: &'a [T],
    gate: &'a [T],
    up: &'a [T],
    down: &'a [T],
}

/// A layer's parameter tensors, in the order of [`LayerW`].
fn layer_tensors(l: &Layer) -> Option<[&Tensor; 9]> {
    Some([
        &l.input_norm,
        plain_weight(&l.q)?,
        plain_weight(&l.k)?,
        plain_weight(&l.v)?,
        plain_weight(&l.o)?,
        &l.post_norm,
        plain_weight(&l.gate)?,
        plain_weight(&l.up)?,
        plain_weight(&l.down)?,
    ])
}

/// Sizes and constants of one step.
#[derive(Clone, Copy)]
struct Shapes {
    b: usize,
    t: usize,
    h: usize,
    inter: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    eps: f64,
    scale: f64,
}

impl Shapes {
    fn n(&self) -> usize {
        self.b * self.t
    }
    fn rep(&self) -> usize {
        self.nh / self.nkv
    }
    /// Query rows per key/value group: the `rep` heads sharing it, stacked.
    fn rows(&self) -> usize {
        self.rep() * self.t
    }
    /// Causal row blocks: block `[i0, i1)` of queries sees keys `0..i1` only.
    fn blocks(&self) -> Vec<(usize, usize)> {
        let bs = if self.t >= 512 { 64 } else { 32 };
        (0..self.t.div_ceil(bs))
            .map(|i| (i * bs, ((i + 1) * bs).min(self.t)))
            .collect()
    }
}

/// What a decoder layer's backward needs from its forward.
struct Saved<T> {
    /// Layer input `[n, h]`.
    x: Vec<T>,
    hs1: Vec<T>,
    /// Rotated queries `[b, nkv, rep · t, hd]`.
    q: Vec<T>,
    /// Rotated keys `[b, nkv, t, hd]`.
    k: Vec<T>,
    v: Vec<T>,
    /// Attention probabilities `[b, nkv, rep · t, t]` (zero where masked).
    probs: Vec<T>,
    /// Attention output, heads merged, `[n, nh · hd]`.
    attn: Vec<T>,
    x1: Vec<T>,
    hs2: Vec<T>,
    gate: Vec<T>,
    up: Vec<T>,
    act: Vec<T>,
}

/// A layer's saved activations, or only its input (activation checkpointing).
enum Kept<T> {
    All(Box<Saved<T>>),
    Input(Vec<T>),
}

/// `x · wᵀ` for `x` `[n, in]` and a weight `w` `[out, in]`.
fn linear<T: Real>(x: &[T], w: &[T], n: usize, inn: usize, out: usize) -> Result<Vec<T>> {
    gemm::matmul(Mat::rows(x, n, inn)?, Mat::rows(w, out, inn)?.t(), true)
}

/// `y + x · wᵀ` (the residual add done by the product).
fn linear_add<T: Real>(
    y: &[T],
    x: &[T],
    w: &[T],
    n: usize,
    inn: usize,
    out: usize,
) -> Result<Vec<T>> {
    let mut r = y.to_vec();
    gemm::matmul_into(
        &mut r,
        0,
        out,
        Mat::rows(x, n, inn)?,
        Mat::rows(w, out, inn)?.t(),
        true,
        true,
    )?;
    Ok(r)
}

/// For every stacked head `r` and causal row block `[i0, i1)` (queries that see keys `0..i1`
/// only): `dst[row..row + i1 - i0] = a · b` with `row = r·t + i0`, rows `stride` apart, where
/// `views(row, i1)` gives `(a, b)`.
fn below_diagonal<'a, T: Real>(
    dst: &mut [T],
    stride: usize,
    s: &Shapes,
    views: impl Fn(usize, usize) -> Result<(Mat<'a, T>, Mat<'a, T>)>,
) -> Result<()> {
    for r in 0..s.rep() {
        for &(i0, i1) in &s.blocks() {
            let row = r * s.t + i0;
            let (a, b) = views(row, i1)?;
            gemm::matmul_into(dst, row * stride, stride, a, b, false, false)?;
        }
    }
    Ok(())
}

/// For every key block `[j0, j1)`: `dst[j0..j1] = Σ_r a_r · b_r` over the stacked heads `r`
/// (`dst` `[t, hd]`), where `views(r·t + j0, j0, j1)` gives `(a_r, b_r)` over the queries
/// `j0..t` that can see those keys.
fn by_key_block<'a, T: Real>(
    dst: &mut [T],
    s: &Shapes,
    views: impl Fn(usize, usize, usize) -> Result<(Mat<'a, T>, Mat<'a, T>)>,
) -> Result<()> {
    for &(j0, j1) in &s.blocks() {
        for r in 0..s.rep() {
            let (a, b) = views(r * s.t + j0, j0, j1)?;
            gemm::matmul_into(dst, j0 * s.hd, s.hd, a, b, r > 0, false)?;
        }
    }
    Ok(())
}

/// Causal attention of one key/value group: `scores = q kᵀ` on the allowed blocks only,
/// the masked softmax, `ctx = p v` (the same blocks). `q` `[rows, hd]`, `k`/`v` `[t, hd]`.
fn attention_group<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    probs: &mut [T],
    ctx: &mut [T],
    s: &Shapes,
) -> Result<()> {
    let (t, hd) = (s.t, s.hd);
    let mut scores = vec![T::ZERO; s.rows() * t];
    below_diagonal(&mut scores, t, s, |row, i1| {
        Ok((
            Mat::block(q, row * hd, i1 - row % t, hd, hd)?,
            Mat::block(k, 0, i1, hd, hd)?.t(),
        ))
    })?;
    let causal = ops::Causal {
        q_len: t,
        window: None,
    };
    probs.copy_from_slice(&ops::softmax_fwd(&scores, t, s.scale, Some(causal)));
    drop(scores);
    let p: &[T] = probs;
    below_diagonal(ctx, hd, s, |row, i1| {
        Ok((
            Mat::block(p, row * t, i1 - row % t, i1, t)?,
            Mat::block(v, 0, i1, hd, hd)?,
        ))
    })
}

/// The backward of [`attention_group`]: `(dq, dk, dv)` for one group from `dctx`
/// (`[rows, hd]`), written into the given buffers (`dq` `[rows, hd]`, `dk`/`dv` `[t, hd]`).
#[allow(clippy::too_many_arguments)]
fn attention_group_backward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    probs: &[T],
    dctx: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    s: &Shapes,
) -> Result<()> {
    let (t, hd) = (s.t, s.hd);
    // dprobs = dctx vᵀ on the allowed blocks (zero elsewhere: the softmax backward reads the
    // whole row).
    let mut dprobs = vec![T::ZERO; s.rows() * t];
    below_diagonal(&mut dprobs, t, s, |row, i1| {
        Ok((
            Mat::block(dctx, row * hd, i1 - row % t, hd, hd)?,
            Mat::block(v, 0, i1, hd, hd)?.t(),
        ))
    })?;
    // dv[j] = Σ_{i ≥ j} p[i, j] dctx[i], summed over the stacked heads.
    by_key_block(dv, s, |row, j0, j1| {
        Ok((
            Mat::block(probs, row * t + j0, t - j0, j1 - j0, t)?.t(),
            Mat::block(dctx, row * hd, t - j0, hd, hd)?,
        ))
    })?;
    let dscores = ops::softmax_bwd(probs, &dprobs, t, s.scale);
    drop(dprobs);
    below_diagonal(dq, hd, s, |row, i1| {
        Ok((
            Mat::block(&dscores, row * t, i1 - row % t, i1, t)?,
            Mat::block(k, 0, i1, hd, hd)?,
        ))
    })?;
    by_key_block(dk, s, |row, j0, j1| {
        Ok((
            Mat::block(&dscores, row * t + j0, t - j0, j1 - j0, t)?.t(),
            Mat::block(q, row * hd, t - j0, hd, hd)?,
        ))
    })
}

/// Splits `[b, t, n · hd]` into heads `[b, n, t, hd]` and applies RoPE (or its inverse).
fn heads_rope<T: Real>(x: &[T], n: usize, cos: &[T], sin: &[T], s: &Shapes) -> Vec<T> {
    let h = ops::permute_heads(x, (s.b, s.t, n, s.hd), true);
    ops::rope_kernel(&h, cos, sin, s.t, s.hd, None, RopeLayout::HalfSplit, false)
}

/// A decoder layer's forward pass: what its backward needs, and its output.
fn layer_forward<T: Real>(
    w: &LayerW<'_, T>,
    x: Vec<T>,
    cos: &[T],
    sin: &[T],
    s: &Shapes,
) -> Result<(Saved<T>, Vec<T>)> {
    let (n, h, inter, nh, nkv, hd) = (s.n(), s.h, s.inter, s.nh, s.nkv, s.hd);
    let hs1 = ops::rms_fwd(&x, w.input_norm, h, s.eps);
    let q = heads_rope(&linear(&hs1, w.q, n, h, nh * hd)?, nh, cos, sin, s);
    let k = heads_rope(&linear(&hs1, w.k, n, h, nkv * hd)?, nkv, cos, sin, s);
    let v = ops::permute_heads(
        &linear(&hs1, w.v, n, h, nkv * hd)?,
        (s.b, s.t, nkv, hd),
        true,
    );
    let (rows, t) = (s.rows(), s.t);
    let mut probs = vec![T::ZERO; s.b * nkv * rows * t];
    let mut ctx = vec![T::ZERO; n * nh * hd];
    probs
        .par_chunks_mut(rows * t)
        .zip(ctx.par_chunks_mut(rows * hd))
        .enumerate()
        .try_for_each(|(g, (p, c))| {
            attention_group(
                &q[g * rows * hd..(g + 1) * rows * hd],
                &k[g * t * hd..(g + 1) * t * hd],
                &v[g * t * hd..(g + 1) * t * hd],
                p,
                c,
                s,
            )
        })?;
    let attn = ops::permute_heads(&ctx, (s.b, t, nh, hd), false);
    drop(ctx);
    let x1 = linear_add(&x, &attn, w.o, n, nh * hd, h)?;
    let hs2 = ops::rms_fwd(&x1, w.post_norm, h, s.eps);
    let gate = linear(&hs2, w.gate, n, h, inter)?;
    let up = linear(&hs2, w.up, n, h, inter)?;
    let act = ops::swiglu_fwd(&gate, &up);
    let x2 = linear_add(&x1, &act, w.down, n, inter, h)?;
    let saved = Saved {
        x,
        hs1,
        q,
        k,
        v,
        probs,
        attn,
        x1,
        hs2,
        gate,
        up,
        act,
    };
    Ok((saved, x2))
}

/// Gradients of a decoder layer's parameters, in the order of [`LayerW`].
type LayerGrads<T> = [Vec<T>; 9];

/// A decoder layer's backward: the gradient of its input and of its parameters, from the
/// gradient `dy` of its output.
fn layer_backward<T: Real>(
    w: &LayerW<'_, T>,
    sv: &Saved<T>,
    dy: &[T],
    cos: &[T],
    sin: &[T],
    s: &Shapes,
) -> Result<(Vec<T>, LayerGrads<T>)> {
    let (n, h, inter, nh, nkv, hd, t) = (s.n(), s.h, s.inter, s.nh, s.nkv, s.hd, s.t);
    let rows = s.rows();
    // MLP: x2 = x1 + down(swiglu(gate(hs2), up(hs2))), hs2 = rms(x1).
    let d_act = gemm::matmul(Mat::rows(dy, n, h)?, Mat::rows(w.down, h, inter)?, true)?;
    let d_down = gemm::matmul(
        Mat::rows(dy, n, h)?.t(),
        Mat::rows(&sv.act, n, inter)?,
        true,
    )?;
    let mut d_gate = ops::swiglu_bwd(&sv.gate, &sv.up, &d_act);
    drop(d_act);
    let d_up = d_gate.split_off(n * inter);
    let mut dhs2 = gemm::matmul(
        Mat::rows(&d_gate, n, inter)?,
        Mat::rows(w.gate, inter, h)?,
        true,
    )?;
    gemm::matmul_into(
        &mut dhs2,
        0,
        h,
        Mat::rows(&d_up, n, inter)?,
        Mat::rows(w.up, inter, h)?,
        true,
        true,
    )?;
    let d_gate_w = gemm::matmul(
        Mat::rows(&d_gate, n, inter)?.t(),
        Mat::rows(&sv.hs2, n, h)?,
        true,
    )?;
    let d_up_w = gemm::matmul(
        Mat::rows(&d_up, n, inter)?.t(),
        Mat::rows(&sv.hs2, n, h)?,
        true,
    )?;
    drop((d_gate, d_up));
    let (dx1, d_post) = rms_backward(&sv.x1, w.post_norm, &dhs2, Some(dy), s.eps);
    drop(dhs2);
    // Attention: x1 = x + o(attn).
    let d_attn = gemm::matmul(Mat::rows(&dx1, n, h)?, Mat::rows(w.o, h, nh * hd)?, true)?;
    let d_o = gemm::matmul(
        Mat::rows(&dx1, n, h)?.t(),
        Mat::rows(&sv.attn, n, nh * hd)?,
        true,
    )?;
    let dctx = ops::permute_heads(&d_attn, (s.b, t, nh, hd), true);
    drop(d_attn);
    let mut dq = vec![T::ZERO; n * nh * hd];
    let mut dk = vec![T::ZERO; n * nkv * hd];
    let mut dv = vec![T::ZERO; n * nkv * hd];
    dq.par_chunks_mut(rows * hd)
        .zip(dk.par_chunks_mut(t * hd).zip(dv.par_chunks_mut(t * hd)))
        .enumerate()
        .try_for_each(|(g, (dq, (dk, dv)))| {
            let qs = g * rows * hd..(g + 1) * rows * hd;
            let ks = g * t * hd..(g + 1) * t * hd;
            attention_group_backward(
                &sv.q[qs.clone()],
                &sv.k[ks.clone()],
                &sv.v[ks],
                &sv.probs[g * rows * t..(g + 1) * rows * t],
                &dctx[qs],
                dq,
                dk,
                dv,
                s,
            )
        })?;
    drop(dctx);
    let unrope = |d: &[T], nheads: usize| {
        let r = ops::rope_kernel(d, cos, sin, t, hd, None, RopeLayout::HalfSplit, true);
        ops::permute_heads(&r, (s.b, t, nheads, hd), false)
    };
    let dq = unrope(&dq, nh);
    let dk = unrope(&dk, nkv);
    let dv = ops::permute_heads(&dv, (s.b, t, nkv, hd), false);
    let mut dhs1 = gemm::matmul(
        Mat::rows(&dq, n, nh * hd)?,
        Mat::rows(w.q, nh * hd, h)?,
        true,
    )?;
    for (d, wt) in [(&dk, w.k), (&dv, w.v)] {
        gemm::matmul_into(
            &mut dhs1,
            0,
            h,
            Mat::rows(d, n, nkv * hd)?,
            Mat::rows(wt, nkv * hd, h)?,
            true,
            true,
        )?;
    }
    let d_q = gemm::matmul(
        Mat::rows(&dq, n, nh * hd)?.t(),
        Mat::rows(&sv.hs1, n, h)?,
        true,
    )?;
    let d_k = gemm::matmul(
        Mat::rows(&dk, n, nkv * hd)?.t(),
        Mat::rows(&sv.hs1, n, h)?,
        true,
    )?;
    let d_v = gemm::matmul(
        Mat::rows(&dv, n, nkv * hd)?.t(),
        Mat::rows(&sv.hs1, n, h)?,
        true,
    )?;
    drop((dq, dk, dv));
    let (dx, d_in) = rms_backward(&sv.x, w.input_norm, &dhs1, Some(&dx1), s.eps);
    Ok((
        dx,
        [d_in, d_q, d_k, d_v, d_o, d_post, d_gate_w, d_up_w, d_down],
    ))
}

impl Llama {
    /// Why [`Llama::fused_step`] cannot run on this model for sequences of `seq` tokens, or
    /// `None` when it can (see the [module documentation](crate::fused)).
    pub fn fused_step_unavailable(&self, seq: usize) -> Option<&'static str> {
        if self.lora.is_some() {
            return Some("LoRA/QLoRA adapters");
        }
        if !matches!(self.dtype(), DType::F32 | DType::F64) || self.compute_dtype() != self.dtype()
        {
            return Some("mixed precision or a half-precision model");
        }
        if !self.device().is_cpu() {
            return Some("a device other than the CPU");
        }
        let window = self.cfg.attention_window();
        if window.is_some_and(|w| w < seq) {
            return Some("a sliding attention window");
        }
        if self.attention.use_chunked(seq, window) {
            return Some("chunked attention");
        }
        if plain_weight(&self.lm_head).is_none()
            || self.layers.iter().any(|l| layer_tensors(l).is_none())
        {
            return Some("projection biases");
        }
        None
    }

    /// Loss and gradients of `weight × cross_entropy(self.forward(ids), targets)` in one
    /// call, with a hand-written backward (see the [module documentation](crate::fused)).
    ///
    /// `ids` is `[batch, seq]` (positions `0..seq`, causal); `targets` has one entry per
    /// position (`None`: not counted), as for [`crate::ops::cross_entropy`]. Returns
    /// [`Error::Unsupported`] when [`Llama::fused_step_unavailable`] names a reason.
    pub fn fused_step(
        &self,
        ids: &Tensor,
        targets: &[Option<u32>],
        weight: f64,
    ) -> Result<FusedStep> {
        self.fused(ids, targets, weight, true)
    }

    /// The loss of [`Llama::fused_step`] (`weight × mean cross entropy`) and its count,
    /// forward only: each layer's activations are dropped as soon as the next layer has its
    /// input, so the peak is one layer's transients and the logits (evaluation, with no
    /// graph kept). The same settings are required ([`Llama::fused_step_unavailable`]); the
    /// loss is bitwise the one the fused step returns.
    pub fn fused_loss(
        &self,
        ids: &Tensor,
        targets: &[Option<u32>],
        weight: f64,
    ) -> Result<(f64, usize)> {
        let step = self.fused(ids, targets, weight, false)?;
        Ok((step.loss, step.count))
    }

    /// The fused step (or with `backward` false its forward), after checking that it applies.
    fn fused(
        &self,
        ids: &Tensor,
        targets: &[Option<u32>],
        weight: f64,
        backward: bool,
    ) -> Result<FusedStep> {
        let (_, t) = ids.dims2()?;
        if let Some(why) = self.fused_step_unavailable(t) {
            tracing::debug!(reason = why, backward, "fused step unavailable");
            return Err(Error::Unsupported {
                what: "the fused training step with this model setting",
                issue: 9,
            });
        }
        match self.dtype() {
            DType::F64 => self.fused_step_typed::<f64>(ids, targets, weight, backward),
            _ => self.fused_step_typed::<f32>(ids, targets, weight, backward),
        }
    }

    /// The fused step; without `backward`, the forward and the loss only (no gradients).
    fn fused_step_typed<T: Real>(
        &self,
        ids: &Tensor,
        targets: &[Option<u32>],
        weight: f64,
        backward: bool,
    ) -> Result<FusedStep> {
        let cfg = &self.cfg;
        let (b, t) = ids.dims2()?;
        if t == 0 || t > cfg.max_position_embeddings {
            return Err(Error::SequenceTooLong {
                len: t,
                max: cfg.max_position_embeddings,
            });
        }
        let vocab = cfg.vocab_size;
        if targets.len() != b * t {
            return Err(Error::ShapeMismatch {
                tensor: "fused step targets".to_string(),
                expected: vec![b * t],
                found: vec![targets.len()],
            });
        }
        if let Some(bad) = targets.iter().flatten().find(|&&x| x as usize >= vocab) {
            return Err(Error::TargetOutOfRange {
                target: *bad,
                vocab,
            });
        }
        let s = Shapes {
            b,
            t,
            h: cfg.hidden_size,
            inter: cfg.intermediate_size,
            nh: cfg.num_attention_heads,
            nkv: cfg.num_kv_heads(),
            hd: cfg.head_dim(),
            eps: cfg.rms_norm_eps,
            scale: 1.0 / (cfg.head_dim() as f64).sqrt(),
        };
        let (n, h) = (s.n(), s.h);
        let lm_param = plain_weight(&self.lm_head).ok_or_else(|| internal("lm_head has a bias"))?;
        let mut tensors: Vec<&Tensor> = vec![&self.embed, &self.norm, lm_param];
        for l in &self.layers {
            tensors.extend(layer_tensors(l).ok_or_else(|| internal("a projection has a bias"))?);
        }
        // Read access to every parameter for the whole step (nothing writes them meanwhile).
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let p: Vec<&[T]> = guards
            .iter()
            .map(|(g, l)| slice_of::<T>(g, l))
            .collect::<Result<_>>()?;
        let (embed, norm, lm) = (p[0], p[1], p[2]);
        let layers: Vec<LayerW<'_, T>> = p[3..]
            .chunks_exact(9)
            .map(|c| LayerW {
                input_norm: c[0],
                q: c[1],
                k: c[2],
                v: c[3],
                o: c[4],
                post_norm: c[5],
                gate: c[6],
                up: c[7],
                down: c[8],
            })
            .collect();
        let cos: Vec<T> = self.cos.narrow(0, 0, t)?.flatten_all()?.to_vec1()?;
        let sin: Vec<T> = self.sin.narrow(0, 0, t)?.flatten_all()?.to_vec1()?;
        let ids: Vec<u32> = crate::params::checked_ids(ids, vocab)?.to_vec1()?;

        // ---- forward ----
        let started = std::time::Instant::now();
        let mut x: Vec<T> = Vec::with_capacity(n * h);
        for &id in &ids {
            let at = id as usize * h;
            x.extend_from_slice(&embed[at..at + h]);
        }
        // With activation checkpointing only each layer's input is kept; the backward
        // recomputes the rest with the same kernels (bitwise the same gradients).
        let checkpointing = self.checkpointing.get();
        let mut kept: Vec<Kept<T>> = Vec::with_capacity(layers.len());
        for w in &layers {
            let (sv, x2) = layer_forward(w, x, &cos, &sin, &s)?;
            if !backward {
                // evaluation: nothing is kept
            } else if checkpointing {
                kept.push(Kept::Input(sv.x));
            } else {
                kept.push(Kept::All(Box::new(sv)));
            }
            x = x2;
        }
        let xf = ops::rms_fwd(&x, norm, h, s.eps);
        let mut logits = linear(&xf, lm, n, h, vocab)?;
        // The cross entropy; its gradient is written over the logits.
        let count = targets.iter().filter(|x| x.is_some()).count().max(1);
        let sum = cross_entropy_in_place::<T>(&mut logits, targets, vocab, weight, count);
        // As `cross_entropy(..) * weight`: the mean in f64 rounded to T, times weight in T.
        let loss = (T::from_f64(sum / count as f64) * T::from_f64(weight)).to_f64();
        let forward_seconds = started.elapsed().as_secs_f64();
        if !backward {
            return Ok(FusedStep {
                loss,
                count,
                grads: GradStore::default(),
                forward_seconds,
            });
        }

        // ---- backward ----
        let mut grads = GradStore::default();
        let dxf = gemm::matmul(
            Mat::rows(&logits, n, vocab)?,
            Mat::rows(lm, vocab, h)?,
            true,
        )?;
        let dlm = gemm::matmul(
            Mat::rows(&logits, n, vocab)?.t(),
            Mat::rows(&xf, n, h)?,
            true,
        )?;
        drop((logits, xf));
        let (mut dx, dnorm) = rms_backward(&x, norm, &dxf, None, s.eps);
        drop((x, dxf));
        grads.insert(&self.norm, from_vec(dnorm, h)?);
        for ((w, k), l) in layers.iter().zip(kept).zip(&self.layers).rev() {
            let sv = match k {
                Kept::All(sv) => *sv,
                Kept::Input(x) => layer_forward(w, x, &cos, &sin, &s)?.0,
            };
            let (dx0, g) = layer_backward(w, &sv, &dx, &cos, &sin, &s)?;
            drop(sv);
            dx = dx0;
            let params = layer_tensors(l).ok_or_else(|| internal("a projection has a bias"))?;
            for (param, g) in params.into_iter().zip(g) {
                grads.insert(param, from_vec(g, param.shape())?);
            }
        }
        // Embedding rows: added into the lm_head gradient when tied, else into zeros.
        let tied = lm_param.id() == self.embed.id();
        let mut dembed = if tied {
            dlm
        } else {
            grads.insert(lm_param, from_vec(dlm, (vocab, h))?);
            vec![T::ZERO; vocab * h]
        };
        for (row, &id) in dx.chunks_exact(h).zip(&ids) {
            let at = id as usize * h;
            for (a, &g) in dembed[at..at + h].iter_mut().zip(row) {
                *a += g;
            }
        }
        grads.insert(&self.embed, from_vec(dembed, (vocab, h))?);
        drop(p);
        drop(guards);
        Ok(FusedStep {
            loss,
            count,
            grads,
            forward_seconds,
        })
    }
}

/// Cross entropy of `logits` (`[rows, vocab]`) against `targets`, with the logits
/// overwritten by the gradient of `weight × mean` (`(softmax − one_hot) · weight / count` on
/// counted rows, zero elsewhere; the softmax as `e_i / Σ e`). Returns the sum over counted
/// rows of `lse − logit[target]` (f64, row order), computed as [`crate::ops::cross_entropy`]
/// does.
fn cross_entropy_in_place<T: Real>(
    logits: &mut [T],
    targets: &[Option<u32>],
    vocab: usize,
    weight: f64,
    count: usize,
) -> f64 {
    // The gradient scale as `cross_entropy`'s backward forms it: d(ce · w)/d(ce) = w in T.
    let g = T::from_f64(weight).to_f64() / count as f64;
    let scale = T::from_f64(g);
    let mut per_row = vec![0f64; targets.len()];
    logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .zip(per_row.par_iter_mut())
        .with_min_len(ops::min_rows(vocab))
        .for_each(|((x, t), out)| match t {
            Some(t) => {
                let t = *t as usize;
                let target = x[t];
                // One exponential per element: e_i = exp(x_i - max) in place, summed in the
                // order of `ops::log_sum_exp` (the same loss), then e_i · scale / sum.
                let max = ops::row_max(x);
                let sum = ops::exp_shifted_in_place(x, max);
                let lse = max + sum.ln();
                *out = (lse - target).to_f64();
                let f = scale / sum;
                for v in x.iter_mut() {
                    *v *= f;
                }
                x[t] -= scale;
            }
            None => x.fill(T::ZERO),
        });
    per_row.iter().sum()
}
