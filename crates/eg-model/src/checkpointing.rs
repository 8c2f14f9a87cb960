//! Activation checkpointing: a transformer block that keeps only its input for the backward
//! pass and recomputes everything else.
//!
//! Switched per model by [`crate::Llama::set_activation_checkpointing`] and
//! [`crate::Gpt2::set_activation_checkpointing`]; the machinery is internal to this crate.
//!
//! ## How it works
//!
//! Without checkpointing, candle's graph keeps every intermediate tensor of every block alive
//! until `backward()` has passed it. With checkpointing, a block's forward pass runs on a
//! detached copy of its input, so the intermediates are freed as soon as the forward is done,
//! and a single custom op takes the block's place in the graph. That op's backward re-runs the
//! block's forward on a fresh tracked copy of the input with the real parameters, seeds a
//! backward pass with the incoming gradient (`sum(y · dy)`, whose gradient with respect to
//! `y` is exactly `dy`), and returns the input's gradient. Memory held between forward and
//! backward drops from the activations of all blocks to their inputs (one `hidden`-wide row
//! per token and block) plus one block's activations during its recompute.
//!
//! ## Parameter gradients: a side channel through candle's own graph
//!
//! A custom op's backward can only return gradients for its own arguments (at most three),
//! and a block has many parameters. The recompute therefore leaves the parameter gradients in
//! a side channel (a slot per parameter shared with the op), and candle collects them itself:
//! the checkpoint op has a second argument, a one-element *anchor chain*
//! `z = anchor(... anchor(anchor(0, p₁), p₂) ..., pₙ)` with one tiny op per trainable
//! parameter of the block. The chain is an ancestor of the checkpoint op, so candle's
//! topological order runs its backward right after the recompute; each anchor returns the
//! gradient waiting in its slot as its parameter's gradient. Gradients thus land in the
//! `GradStore` that `loss.backward()` returns, as for any other op: callers (the trainer,
//! tests, users' own loops) need no merge step, and parameters outside checkpointed blocks
//! are unaffected.
//!
//! Every tensor that leaves the recompute (the input gradient and the parameter gradients) is
//! detached. A gradient computed by candle's backward is itself a graph node whose history
//! reaches back into the recomputed forward; keeping it attached would keep that whole
//! recomputed graph alive until the end of the outer backward, and the saving would be lost.
//!
//! ## Exactness
//!
//! On the CPU the gradients are bitwise equal to the non-checkpointed run (tested): the
//! recompute executes the same kernels on the same values, the seed reproduces the incoming
//! gradient exactly (`1 · dy`), candle accumulates a tensor's gradient contributions in the
//! same topological order inside the block either way, and `0 + g` (how candle first stores
//! any gradient) is exact. Random masks (LoRA dropout) are replayed: the dropout stream's
//! position at forward time is recorded and restored around the recompute.
//!
//! A block whose input needs no gradient and that has no trainable parameter (inference, a
//! frozen block) runs without any op at all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor, Var};

use crate::lora::{DropoutPosition, DropoutState};
use crate::{Error, Result};

/// A transformer block that can be checkpointed: a pure function of its input and of the
/// tensors it holds (the same input gives bitwise the same output).
pub(crate) trait Block: Send + Sync {
    /// The block's forward pass.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
}

/// Whether a model checkpoints its blocks. An atomic, so that a memory controller can switch
/// it through a shared reference between steps; a clone copies the current value.
#[derive(Debug, Default)]
pub(crate) struct CheckpointFlag(AtomicBool);

impl CheckpointFlag {
    /// The current value.
    pub(crate) fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the value.
    pub(crate) fn set(&self, on: bool) {
        self.0.store(on, Ordering::Relaxed);
    }
}

impl Clone for CheckpointFlag {
    fn clone(&self) -> Self {
        CheckpointFlag(AtomicBool::new(self.get()))
    }
}

/// Gradients the recompute leaves for the anchors: `None` until the recompute ran, then one
/// entry per parameter (`None` for a parameter the block did not reach).
type Slots = Arc<Mutex<Option<Vec<Option<Tensor>>>>>;

/// Runs `block` on `x` with activation checkpointing (see the module documentation).
///
/// `params` are the tensors of the block that may need a gradient (the model's trainable
/// variables read by the block; untracked ones are ignored). A trainable tensor the block
/// reads but that is not listed would silently get no gradient, so callers list every
/// parameter of the block. `dropout`, when the block draws dropout masks from it, is replayed
/// at its current position during the recompute.
pub(crate) fn checkpoint(
    block: Box<dyn Block>,
    x: &Tensor,
    params: Vec<Tensor>,
    dropout: Option<Arc<DropoutState>>,
) -> Result<Tensor> {
    let params: Vec<Tensor> = params.into_iter().filter(Tensor::track_op).collect();
    let dropout = dropout.map(|d| {
        let at = d.position();
        (d, at)
    });
    // The forward builds no graph back to `x`; what it builds through the parameters is
    // dropped with `y`'s history below, so no intermediate outlives this call.
    let y = block.forward(&x.detach())?.detach();
    if y.dims() != x.dims() || y.dtype() != x.dtype() {
        return Err(Error::ShapeMismatch {
            tensor: "checkpointed block output".to_string(),
            expected: x.dims().to_vec(),
            found: y.dims().to_vec(),
        });
    }
    if !x.track_op() && params.is_empty() {
        return Ok(y);
    }
    let slots: Slots = Arc::new(Mutex::new(None));
    let mut z = Tensor::zeros(1, x.dtype(), x.device())?;
    for (index, p) in params.iter().enumerate() {
        let anchor = AnchorOp {
            slots: slots.clone(),
            index,
        };
        z = z.apply_op2_arc(p, Arc::new(Box::new(anchor)))?;
    }
    let op = CheckpointOp {
        block,
        params,
        slots,
        output: Mutex::new(Some(y)),
        dropout,
    };
    Ok(x.apply_op2_arc(&z, Arc::new(Box::new(op)))?)
}

/// The checkpointed block as one graph node: arguments `(x, z)`, `z` the anchor chain.
struct CheckpointOp {
    block: Box<dyn Block>,
    params: Vec<Tensor>,
    slots: Slots,
    /// The output computed by [`checkpoint`], handed to candle by `cpu_fwd` (once).
    output: Mutex<Option<Tensor>>,
    dropout: Option<(Arc<DropoutState>, DropoutPosition)>,
}

const CHECKPOINT: &str = "eg-activation-checkpoint";
const ANCHOR: &str = "eg-activation-checkpoint-anchor";

fn internal(op: &'static str, what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: {what}"))
}

/// A contiguous copy of the `layout` part of `s`.
fn copy_storage(
    op: &'static str,
    s: &CpuStorage,
    layout: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or(candle_core::Error::RequiresContiguous { op })?;
    let out = match s {
        CpuStorage::F32(v) => CpuStorage::F32(v[a..b].to_vec()),
        CpuStorage::F64(v) => CpuStorage::F64(v[a..b].to_vec()),
        CpuStorage::BF16(v) => CpuStorage::BF16(v[a..b].to_vec()),
        CpuStorage::F16(v) => CpuStorage::F16(v[a..b].to_vec()),
        other => return Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), op)),
    };
    Ok((out, layout.shape().clone()))
}

/// Puts the dropout stream back where it was when dropped.
struct Rewind<'a> {
    state: &'a DropoutState,
    was: DropoutPosition,
}

impl Drop for Rewind<'_> {
    fn drop(&mut self) {
        self.state.seek(self.was);
    }
}

impl CustomOp2 for CheckpointOp {
    fn name(&self) -> &'static str {
        CHECKPOINT
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _xl: &Layout,
        _z: &CpuStorage,
        _zl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self
            .output
            .lock()
            .map_err(|_| internal(CHECKPOINT, "output lock poisoned"))?
            .take()
            .ok_or_else(|| internal(CHECKPOINT, "forward run twice"))?
            .contiguous()?;
        let (st, l) = y.storage_and_layout();
        match &*st {
            Storage::Cpu(s) => copy_storage(CHECKPOINT, s, l),
            _ => Err(internal(CHECKPOINT, "only the CPU is supported")),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        z: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let _rewind = self.dropout.as_ref().map(|(state, at)| Rewind {
            was: state.seek(*at),
            state,
        });
        let wants_dx = x.track_op();
        let xin = if wants_dx {
            Var::from_tensor(&x.detach())?.as_tensor().clone()
        } else {
            x.detach()
        };
        let y = self.block.forward(&xin).map_err(candle_core::Error::wrap)?;
        // d/dy sum(y · dy) = 1 · dy: exactly the incoming gradient.
        let store = y.mul(&grad.detach())?.sum_all()?.backward()?;
        let dx = if wants_dx {
            Some(match store.get(&xin) {
                Some(g) => g.detach(),
                None => x.zeros_like()?,
            })
        } else {
            None
        };
        let grads = self
            .params
            .iter()
            .map(|p| store.get(p).map(Tensor::detach))
            .collect();
        *self
            .slots
            .lock()
            .map_err(|_| internal(CHECKPOINT, "gradient slots poisoned"))? = Some(grads);
        // Every anchor is a graph node and must receive a gradient; its value is unused.
        Ok((dx, Some(z.zeros_like()?)))
    }
}

/// One link of the anchor chain: `z' = z` in the forward; in the backward, the gradient the
/// recompute left for parameter `index` becomes the gradient of the op's second argument.
struct AnchorOp {
    slots: Slots,
    index: usize,
}

impl CustomOp2 for AnchorOp {
    fn name(&self) -> &'static str {
        ANCHOR
    }

    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        zl: &Layout,
        _p: &CpuStorage,
        _pl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        copy_storage(ANCHOR, z, zl)
    }

    fn bwd(
        &self,
        z: &Tensor,
        _p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let mut slots = self
            .slots
            .lock()
            .map_err(|_| internal(ANCHOR, "gradient slots poisoned"))?;
        let grads = slots
            .as_mut()
            .ok_or_else(|| internal(ANCHOR, "the block was not recomputed before its anchors"))?;
        let g = grads
            .get_mut(self.index)
            .ok_or_else(|| internal(ANCHOR, "parameter index out of range"))?
            .take();
        let dz = if z.track_op() {
            Some(grad.clone())
        } else {
            None
        };
        Ok((dz, g))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use candle_core::{Device, Tensor, Var};

    use super::{Block, checkpoint};
    use crate::Result;

    /// `tanh(x · w) · v + x`: both parameters are direct operands of products with a tracked
    /// activation, so candle's own gradients for them are attached to the forward graph.
    struct Toy {
        w: Tensor,
        v: Tensor,
    }

    impl Block for Toy {
        fn forward(&self, x: &Tensor) -> Result<Tensor> {
            Ok(((x.mul(&self.w)?.tanh()? * &self.v)? + x)?)
        }
    }

    fn t(seed: u32, shape: (usize, usize)) -> Tensor {
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    }

    /// Two toy blocks in a row, checkpointed or not; loss `sum(y²)`.
    fn two_blocks(x: &Tensor, blocks: &[(Var, Var)], ckpt: bool) -> Tensor {
        let mut h = x.clone();
        for (w, v) in blocks {
            let b = Toy {
                w: w.as_tensor().clone(),
                v: v.as_tensor().clone(),
            };
            h = if ckpt {
                let params = vec![w.as_tensor().clone(), v.as_tensor().clone()];
                checkpoint(Box::new(b), &h, params, None).unwrap()
            } else {
                b.forward(&h).unwrap()
            };
        }
        h.sqr().unwrap().sum_all().unwrap()
    }

    #[test]
    fn input_and_parameter_gradients_are_bitwise_equal_and_detached() {
        let shape = (3, 5);
        let x = Var::from_tensor(&t(1, shape)).unwrap();
        let blocks: Vec<(Var, Var)> = (0..2)
            .map(|i| {
                (
                    Var::from_tensor(&t(10 + i, shape)).unwrap(),
                    Var::from_tensor(&t(20 + i, shape)).unwrap(),
                )
            })
            .collect();
        let plain = two_blocks(x.as_tensor(), &blocks, false)
            .backward()
            .unwrap();
        let loss = two_blocks(x.as_tensor(), &blocks, true);
        let ckpt = loss.backward().unwrap();
        let mut vars = vec![x.as_tensor().clone()];
        for (w, v) in &blocks {
            vars.push(w.as_tensor().clone());
            vars.push(v.as_tensor().clone());
        }
        let mut attached_without = 0;
        for (i, var) in vars.iter().enumerate() {
            let a = plain.get(var).unwrap();
            let b = ckpt.get(var).unwrap();
            assert_eq!(bits(a), bits(b), "gradient {i}");
            attached_without += usize::from(a.track_op());
            assert!(
                !b.track_op(),
                "gradient {i} is attached to the recomputed graph"
            );
        }
        // The detach is what makes the difference here, not candle.
        assert!(attached_without > 0);
        // A second backward through the same graph recomputes again.
        let again = loss.backward().unwrap();
        for var in &vars {
            assert_eq!(bits(ckpt.get(var).unwrap()), bits(again.get(var).unwrap()));
        }
    }

    #[test]
    fn untracked_input_and_no_parameters() {
        let shape = (2, 4);
        let x = t(3, shape);
        let (w, v) = (
            Var::from_tensor(&t(4, shape)).unwrap(),
            Var::from_tensor(&t(5, shape)).unwrap(),
        );
        let blocks = vec![(w.clone(), v.clone())];
        let plain = two_blocks(&x, &blocks, false).backward().unwrap();
        let ckpt = two_blocks(&x, &blocks, true).backward().unwrap();
        for var in [w.as_tensor(), v.as_tensor()] {
            assert_eq!(bits(plain.get(var).unwrap()), bits(ckpt.get(var).unwrap()));
        }
        assert!(ckpt.get(&x).is_none(), "no gradient for an untracked input");
        // Nothing to differentiate: the output is a plain tensor.
        let frozen = Toy {
            w: w.as_tensor().detach(),
            v: v.as_tensor().detach(),
        };
        let y = checkpoint(Box::new(frozen), &x, vec![], None).unwrap();
        assert!(!y.track_op());
        let want = (x.mul(w.as_tensor()).unwrap().tanh().unwrap() * v.as_tensor()).unwrap();
        assert_eq!(bits(&y), bits(&(want + &x).unwrap()));
    }
}
