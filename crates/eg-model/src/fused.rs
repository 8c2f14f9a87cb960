//! A fused training step for the Llama family (issue 9): forward pass, cross entropy and a
//! hand-written backward pass in one call, without candle's autograd.
//!
//! ## Why
//!
//! candle's `backward()` sums every gradient into a zero-filled buffer (`zeros_like`, then
//! `add`) for every input of every node, keeps one tensor per node alive until the whole
//! backward is done, and runs its element-wise adds on a second thread pool that competes
//! with gemm's on a small machine. Profiled at 6.3M/110M parameters on two cores, that
//! machinery (zero fills, adds, page faults of the fresh buffers, the pools' spinning and
//! context switches) was 15–25% of a step. [`Llama::fused_step`] computes exactly the same
//! function with the same kernels, but its backward is written out by hand: one matmul per
//! gradient, the element-wise backward kernels of [`crate::ops`] (parallel over rows),
//! residual gradients added in place, the cross entropy's gradient written over the logits,
//! and each layer's saved activations dropped as soon as its backward is done.
//!
//! ## Exactness
//!
//! The forward pass runs the same kernels in the same order as [`Llama::forward`] followed
//! by [`crate::ops::cross_entropy`], so the loss is bitwise the same. Gradients agree with
//! candle's autograd within float rounding (sums are formed in another order); they are
//! checked against autograd and against f64 central finite differences for every parameter.
//!
//! ## Scope
//!
//! Full training of a Llama-family model in f32 or f64 on the CPU, with or without activation
//! checkpointing (then only each layer's input is kept and the layer is recomputed in the
//! backward, bitwise the same gradients): no LoRA adapters, no mixed precision, no biases (Qwen2's q/k/v biases), no
//! sliding window shorter than the sequence, no chunked attention and no document masks.
//! [`Llama::fused_step_unavailable`] says which of these blocks it; callers fall back to the
//! autograd path, which covers all of them.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Storage, Tensor, WithDType};
use rayon::prelude::*;

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

fn internal(what: String) -> Error {
    Error::Candle(candle_core::Error::Msg(format!("fused step: {what}")))
}

/// Runs `f` on the contiguous CPU data of `t`.
fn read<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(internal("tensor not on the CPU".into()));
    };
    let data = cpu.as_slice::<T>()?;
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| internal("tensor not contiguous".into()))?;
    Ok(f(&data[a..b]))
}

/// A closure run once on a tensor's elements.
type Edit<'a, T> = Box<dyn FnOnce(&mut [T]) + 'a>;

/// In-place access to a tensor's own storage (through candle's [`InplaceOp1`]).
struct InPlace<'a, T> {
    f: RefCell<Option<Edit<'a, T>>>,
}

impl<T: Real> InplaceOp1 for InPlace<'_, T> {
    fn name(&self) -> &'static str {
        "eg-fused-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or(candle_core::Error::RequiresContiguous { op: self.name() })?;
        let dtype = candle_core::backend::BackendStorage::dtype(storage);
        let data = T::storage_mut(storage).ok_or(candle_core::Error::UnsupportedDTypeForOp(
            dtype,
            self.name(),
        ))?;
        if let Some(f) = self.f.borrow_mut().take() {
            f(&mut data[a..b]);
        }
        Ok(())
    }
}

/// Runs `f` on the storage of `t` (a contiguous tensor this module created and owns alone).
fn write<'a, T: Real>(t: &Tensor, f: impl FnOnce(&mut [T]) + 'a) -> Result<()> {
    if !t.is_contiguous() {
        return Err(internal("in-place target not contiguous".into()));
    }
    let op = InPlace::<T> {
        f: RefCell::new(Some(Box::new(f))),
    };
    t.inplace_op1(&op)?;
    Ok(())
}

/// `a += b` element-wise, in place in `a` (distinct tensors of the same shape).
fn add_assign<T: Real>(a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(Error::ShapeMismatch {
            tensor: "fused step gradient sum".to_string(),
            expected: a.dims().to_vec(),
            found: b.dims().to_vec(),
        });
    }
    read::<T, _>(b, |b| {
        write::<T>(a, |a| {
            a.par_chunks_mut(1 << 14)
                .zip(b.par_chunks(1 << 14))
                .for_each(|(a, b)| {
                    for (a, &b) in a.iter_mut().zip(b) {
                        *a += b;
                    }
                });
        })
    })?
}

fn from_vec<T: WithDType, S: Into<candle_core::Shape>>(v: Vec<T>, shape: S) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// `rms_norm` backward: `(dx + residual, dw)`, with the residual gradient added in place.
fn rms_backward<T: Real>(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    residual: Option<&Tensor>,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let d = x.dim(candle_core::D::Minus1)?;
    let mut out = read::<T, _>(x, |x| {
        read::<T, _>(w, |w| read::<T, _>(g, |g| ops::rms_bwd(x, w, g, d, eps)))
    })???;
    let n = x.elem_count();
    let dw = out.split_off(n);
    if let Some(r) = residual {
        read::<T, _>(r, |r| {
            out.par_chunks_mut(1 << 14)
                .zip(r.par_chunks(1 << 14))
                .for_each(|(o, r)| {
                    for (o, &r) in o.iter_mut().zip(r) {
                        *o += r;
                    }
                });
        })?;
    }
    Ok((from_vec(out, x.shape())?, from_vec(dw, d)?))
}

/// A linear layer's backward for `y = x @ wᵀ`: `(dx, dw)` with `x` `[n, in]`, `dy` `[n, out]`.
fn linear_backward(x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let (out, inn) = w.dims2()?;
    let n = x.elem_count() / inn.max(1);
    let dy = dy.reshape((n, out))?;
    let dx = dy.matmul(w)?;
    let dw = dy.t()?.matmul(&x.reshape((n, inn))?)?;
    Ok((dx, dw))
}

/// What a decoder layer's backward needs from its forward.
struct Saved {
    /// Layer input `[b, t, h]`.
    x: Tensor,
    hs1: Tensor,
    /// Rotated queries `[b, nkv, rep * t, hd]`.
    q: Tensor,
    /// Rotated keys `[b, nkv, t, hd]`.
    k: Tensor,
    v: Tensor,
    /// Attention probabilities `[b, nkv, rep * t, t]`.
    probs: Tensor,
    /// Attention output, heads merged, `[b, t, nh * hd]`.
    attn: Tensor,
    x1: Tensor,
    hs2: Tensor,
    gate: Tensor,
    up: Tensor,
    act: Tensor,
}

/// A layer's saved activations, or only its input (activation checkpointing).
enum Kept {
    All(Box<Saved>),
    Input(Tensor),
}

/// Sizes and constants of one step.
struct Shapes {
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    eps: f64,
    scale: f64,
    window: Option<usize>,
}

/// A decoder layer's forward pass (the kernels and order of `Llama::layer_forward`): what its
/// backward needs, and its output.
fn layer_forward(
    w: &Weights,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    s: &Shapes,
) -> Result<(Saved, Tensor)> {
    let Shapes {
        b,
        t,
        nh,
        nkv,
        hd,
        eps,
        scale,
        window,
    } = *s;
    let rep = nh / nkv;
    let hs1 = ops::rms_norm(x, &w.input_norm, eps)?;
    let q = ops::split_heads(&ops::linear(&hs1, &w.q)?, nh)?;
    let k = ops::split_heads(&ops::linear(&hs1, &w.k)?, nkv)?;
    let v = ops::split_heads(&ops::linear(&hs1, &w.v)?, nkv)?;
    let q = ops::rope(&q, cos, sin, RopeLayout::HalfSplit)?;
    let k = ops::rope(&k, cos, sin, RopeLayout::HalfSplit)?;
    let q = q.reshape((b, nkv, rep * t, hd))?;
    let scores = q.matmul(&k.t()?)?;
    let probs = ops::causal_softmax(&scores, scale, t, window)?;
    drop(scores);
    let ctx = probs.matmul(&v)?.reshape((b, nh, t, hd))?;
    let attn = ops::merge_heads(&ctx)?;
    let x1 = (x + ops::linear(&attn, &w.o)?)?;
    let hs2 = ops::rms_norm(&x1, &w.post_norm, eps)?;
    let gate = ops::linear(&hs2, &w.gate)?;
    let up = ops::linear(&hs2, &w.up)?;
    let act = ops::swiglu(&gate, &up)?;
    let x2 = (&x1 + ops::linear(&act, &w.down)?)?;
    let saved = Saved {
        x: x.clone(),
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

/// The detached weights of a decoder layer.
struct Weights {
    input_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    post_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

impl Weights {
    fn of(l: &Layer) -> Option<Self> {
        Some(Weights {
            input_norm: l.input_norm.detach(),
            q: plain_weight(&l.q)?.detach(),
            k: plain_weight(&l.k)?.detach(),
            v: plain_weight(&l.v)?.detach(),
            o: plain_weight(&l.o)?.detach(),
            post_norm: l.post_norm.detach(),
            gate: plain_weight(&l.gate)?.detach(),
            up: plain_weight(&l.up)?.detach(),
            down: plain_weight(&l.down)?.detach(),
        })
    }
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
            || self.layers.iter().any(|l| Weights::of(l).is_none())
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
        let (_, t) = ids.dims2()?;
        if let Some(why) = self.fused_step_unavailable(t) {
            tracing::debug!(reason = why, "fused step unavailable");
            return Err(Error::Unsupported {
                what: "the fused training step with this model setting",
                issue: 9,
            });
        }
        match self.dtype() {
            DType::F64 => self.fused_step_typed::<f64>(ids, targets, weight),
            _ => self.fused_step_typed::<f32>(ids, targets, weight),
        }
    }

    fn fused_step_typed<T: Real>(
        &self,
        ids: &Tensor,
        targets: &[Option<u32>],
        weight: f64,
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
        let (h, nh, nkv, hd) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.head_dim(),
        );
        let rep = nh / nkv;
        let eps = cfg.rms_norm_eps;
        let scale = 1.0 / (hd as f64).sqrt();
        let window = cfg.attention_window();
        let weights: Vec<Weights> = self.layers.iter().filter_map(Weights::of).collect();
        let lm_w = plain_weight(&self.lm_head)
            .ok_or_else(|| internal("lm_head has a bias".into()))?
            .detach();
        let embed = self.embed.detach();
        let norm = self.norm.detach();
        let cos = self.cos.narrow(0, 0, t)?.contiguous()?;
        let sin = self.sin.narrow(0, 0, t)?.contiguous()?;

        // ---- forward (the kernels and order of `Llama::forward`) ----
        let started = std::time::Instant::now();
        let flat = crate::params::checked_ids(ids, vocab)?;
        let mut x = embed.index_select(&flat, 0)?.reshape((b, t, h))?;
        let shape = Shapes {
            b,
            t,
            nh,
            nkv,
            hd,
            eps,
            scale,
            window,
        };
        // With activation checkpointing only each layer's input is kept; the backward
        // recomputes the rest with the same kernels (so the gradients are bitwise those of
        // the run without it).
        let checkpointing = self.checkpointing.get();
        let mut saved: Vec<Kept> = Vec::with_capacity(weights.len());
        for w in &weights {
            let (s, x2) = layer_forward(w, &x, &cos, &sin, &shape)?;
            saved.push(if checkpointing {
                Kept::Input(s.x)
            } else {
                Kept::All(Box::new(s))
            });
            x = x2;
        }
        let xf = ops::rms_norm(&x, &norm, eps)?;
        let logits = ops::linear(&xf, &lm_w)?.reshape((b * t, vocab))?;

        // ---- cross entropy, its gradient written over the logits ----
        let count = targets.iter().filter(|x| x.is_some()).count().max(1);
        // As `cross_entropy(..) * weight`: the mean in f64 rounded to T, times weight in T.
        let sum = cross_entropy_in_place::<T>(&logits, targets, vocab, weight, count)?;
        let loss = (T::from_f64(sum / count as f64) * T::from_f64(weight)).to_f64();
        let dlogits = logits;
        let forward_seconds = started.elapsed().as_secs_f64();

        // ---- backward ----
        let mut grads = GradStore::default();
        let (dxf, dlm) = linear_backward(&xf, &lm_w, &dlogits)?;
        drop(dlogits);
        drop(xf);
        let (mut dx, dnorm) = rms_backward::<T>(&x, &norm, &dxf.reshape((b, t, h))?, None, eps)?;
        drop(x);
        grads.insert(&self.norm, dnorm);
        for (w, (s, layer)) in weights
            .iter()
            .zip(saved.into_iter().zip(&self.layers))
            .rev()
        {
            let s = match s {
                Kept::All(s) => *s,
                Kept::Input(x) => layer_forward(w, &x, &cos, &sin, &shape)?.0,
            };
            // MLP: x2 = x1 + down(swiglu(gate(hs2), up(hs2))), hs2 = rms(x1).
            let (d_act, d_down) = linear_backward(&s.act, &w.down, &dx)?;
            let both = read::<T, _>(&s.gate, |g| {
                read::<T, _>(&s.up, |u| {
                    read::<T, _>(&d_act, |dy| ops::swiglu_bwd(g, u, dy))
                })
            })???;
            let n_inter = s.gate.elem_count();
            let inter = s.gate.dim(candle_core::D::Minus1)?;
            let mut both = both;
            let d_up = from_vec(both.split_off(n_inter), (b * t, inter))?;
            let d_gate = from_vec(both, (b * t, inter))?;
            let (dhs2, d_gate_w) = linear_backward(&s.hs2, &w.gate, &d_gate)?;
            let (dhs2_up, d_up_w) = linear_backward(&s.hs2, &w.up, &d_up)?;
            add_assign::<T>(&dhs2, &dhs2_up)?;
            drop((d_gate, d_up, dhs2_up));
            let (dx1, d_post) = rms_backward::<T>(
                &s.x1,
                &w.post_norm,
                &dhs2.reshape((b, t, h))?,
                Some(&dx),
                eps,
            )?;
            // Attention: x1 = x + o(attn).
            let (d_attn, d_o) = linear_backward(&s.attn, &w.o, &dx1)?;
            let dctx = ops::split_heads(&d_attn.reshape((b, t, nh * hd))?, nh)?.reshape((
                b,
                nkv,
                rep * t,
                hd,
            ))?;
            let dprobs = dctx.matmul(&s.v.t()?)?;
            let dv = s.probs.t()?.matmul(&dctx)?;
            drop(dctx);
            let cols = t;
            let dscores = read::<T, _>(&s.probs, |p| {
                read::<T, _>(&dprobs, |g| ops::softmax_bwd(p, g, cols, scale))
            })??;
            drop(dprobs);
            let dscores = from_vec(dscores, (b, nkv, rep * t, t))?;
            let dq = dscores.matmul(&s.k)?.reshape((b, nh, t, hd))?;
            let dk = dscores.t()?.matmul(&s.q)?;
            drop(dscores);
            let unrope = |d: &Tensor| -> Result<Tensor> {
                let y = read::<T, _>(d, |d| {
                    read::<T, _>(&cos, |c| {
                        read::<T, _>(&sin, |s| {
                            ops::rope_kernel(d, c, s, t, hd, None, RopeLayout::HalfSplit, true)
                        })
                    })
                })???;
                from_vec(y, d.shape())
            };
            let dq = ops::merge_heads(&unrope(&dq)?)?;
            let dk = ops::merge_heads(&unrope(&dk)?)?;
            let dv = ops::merge_heads(&dv)?;
            let (dhs1, d_q) = linear_backward(&s.hs1, &w.q, &dq)?;
            let (dhs1_k, d_k) = linear_backward(&s.hs1, &w.k, &dk)?;
            let (dhs1_v, d_v) = linear_backward(&s.hs1, &w.v, &dv)?;
            add_assign::<T>(&dhs1, &dhs1_k)?;
            add_assign::<T>(&dhs1, &dhs1_v)?;
            drop((dq, dk, dv, dhs1_k, dhs1_v));
            let (dx0, d_in) = rms_backward::<T>(
                &s.x,
                &w.input_norm,
                &dhs1.reshape((b, t, h))?,
                Some(&dx1),
                eps,
            )?;
            dx = dx0;
            grads.insert(&layer.input_norm, d_in);
            grads.insert(&layer.post_norm, d_post);
            for (p, g) in [
                (&layer.q, d_q),
                (&layer.k, d_k),
                (&layer.v, d_v),
                (&layer.o, d_o),
                (&layer.gate, d_gate_w),
                (&layer.up, d_up_w),
                (&layer.down, d_down),
            ] {
                if let Some(p) = plain_weight(p) {
                    grads.insert(p, g);
                }
            }
        }

        // Embedding rows: scatter-add into the lm_head gradient when tied, else into zeros.
        let lm_param =
            plain_weight(&self.lm_head).ok_or_else(|| internal("lm_head has a bias".into()))?;
        let tied = lm_param.id() == self.embed.id();
        let dembed = if tied {
            dlm
        } else {
            grads.insert(lm_param, dlm);
            Tensor::zeros((vocab, h), self.dtype(), &Device::Cpu)?
        };
        let ids_v: Vec<u32> = flat.to_vec1()?;
        read::<T, _>(&dx, |dx| {
            write::<T>(&dembed, |de| {
                for (row, &id) in dx.chunks(h).zip(&ids_v) {
                    let at = id as usize * h;
                    for (a, &g) in de[at..at + h].iter_mut().zip(row) {
                        *a += g;
                    }
                }
            })
        })??;
        grads.insert(&self.embed, dembed);
        Ok(FusedStep {
            loss,
            count,
            grads,
            forward_seconds,
        })
    }
}

/// Cross entropy of `logits` (`[rows, vocab]`, owned by the caller) against `targets`, with
/// the logits overwritten by the gradient of `weight × mean` (`(softmax − one_hot) · weight /
/// count` on counted rows, zero elsewhere). Returns the sum over counted rows of
/// `lse − logit[target]` (in f64, row order), computed with the kernel of
/// [`crate::ops::cross_entropy`].
fn cross_entropy_in_place<T: Real>(
    logits: &Tensor,
    targets: &[Option<u32>],
    vocab: usize,
    weight: f64,
    count: usize,
) -> Result<f64> {
    // The gradient scale as `cross_entropy`'s backward forms it: d(ce · w)/d(ce) = w in T.
    let g = T::from_f64(weight).to_f64() / count as f64;
    let scale = T::from_f64(g);
    let mut per_row = vec![0f64; targets.len()];
    write::<T>(logits, |x| {
        x.par_chunks_mut(vocab)
            .zip(targets.par_iter())
            .zip(per_row.par_iter_mut())
            .with_min_len(ops::min_rows(vocab))
            .for_each(|((x, t), out)| match t {
                Some(t) => {
                    let lse = ops::log_sum_exp(x);
                    *out = (lse - x[*t as usize]).to_f64();
                    let lse = T::from_f64(lse.to_f64());
                    for v in x.iter_mut() {
                        *v = (*v - lse).exp() * scale;
                    }
                    x[*t as usize] -= scale;
                }
                None => x.fill(T::from_f64(0.0)),
            });
    })?;
    Ok(per_row.iter().sum())
}
