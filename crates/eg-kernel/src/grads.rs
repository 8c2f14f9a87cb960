//! Gradient accumulation without copies where none is needed.
//!
//! With one micro-batch per update (the common case) the optimizer reads each parameter's
//! gradient straight from candle's gradient storage: nothing is copied or zeroed. Only a
//! parameter that receives a second micro-batch's gradient gets an f32 accumulation buffer
//! (allocated once, on first need, and reused): the first addition writes `a + b` into it in
//! one pass, later ones add in place. The sums are the same, bit for bit, as zeroing a buffer
//! and adding every micro-batch into it in order.
//!
//! Raw (possibly loss-scaled) gradients are kept: the caller folds the unscale factor into
//! the global norm and into the optimizer's gradient multiplier, which is exact for the
//! power-of-two scales of [`crate::LossScaler`].

use candle_core::{CpuStorage, DType, Storage, Tensor};

use crate::guards::sum_squares;
use crate::{Error, Result};

enum Slot {
    /// No gradient this step (yet).
    Empty,
    /// The one micro-batch gradient so far, candle's own storage (contiguous, f32).
    Direct(Tensor),
    /// The sum of several micro-batches, in `bufs[i]`.
    Buf,
}

/// Per-parameter gradient sums of the current update.
pub(crate) struct Grads {
    slots: Vec<Slot>,
    lens: Vec<usize>,
    bufs: Vec<Vec<f32>>,
}

fn unsupported(name: &str, reason: impl Into<String>) -> Error {
    Error::UnsupportedParam {
        name: name.to_string(),
        reason: reason.into(),
    }
}

/// The f32 slice of a contiguous CPU tensor inside its (locked) storage.
fn slice_of<'a>(name: &str, st: &'a Storage, t: &Tensor) -> Result<&'a [f32]> {
    let (a, b) = t
        .layout()
        .contiguous_offsets()
        .ok_or_else(|| unsupported(name, "gradient not contiguous"))?;
    match st {
        Storage::Cpu(CpuStorage::F32(v)) => v
            .get(a..b)
            .ok_or_else(|| unsupported(name, "gradient layout outside its storage")),
        Storage::Cpu(_) => Err(unsupported(name, format!("gradient dtype {:?}", t.dtype()))),
        _ => Err(unsupported(name, "gradient not on the CPU")),
    }
}

impl Grads {
    /// Slots for parameters of `lens` elements; no buffer is allocated yet.
    pub(crate) fn new(lens: Vec<usize>) -> Self {
        Self {
            slots: lens.iter().map(|_| Slot::Empty).collect(),
            bufs: lens.iter().map(|_| Vec::new()).collect(),
            lens,
        }
    }

    /// Forgets the gradients of the last update (buffers are kept for reuse).
    pub(crate) fn clear(&mut self) {
        for s in &mut self.slots {
            *s = Slot::Empty;
        }
    }

    /// Adds `g` (the gradient of parameter `i`, named `name`, whose own storage is `param`)
    /// to the sum of this update.
    pub(crate) fn add(&mut self, i: usize, name: &str, g: &Tensor, param: &Tensor) -> Result<()> {
        let len = *self.lens.get(i).ok_or_else(|| Error::StateMismatch {
            what: format!("gradient slot of {name}"),
            expected: format!("fewer than {} parameters", self.lens.len()),
            found: i.to_string(),
        })?;
        if g.elem_count() != len {
            return Err(Error::StateMismatch {
                what: format!("gradient of {name}"),
                expected: len.to_string(),
                found: g.elem_count().to_string(),
            });
        }
        if g.dtype() != DType::F32 {
            return Err(unsupported(name, format!("gradient dtype {:?}", g.dtype())));
        }
        let g = if g.is_contiguous() {
            g.clone()
        } else {
            g.contiguous()?
        };
        match std::mem::replace(&mut self.slots[i], Slot::Buf) {
            Slot::Empty => {
                // The optimizer writes the parameter while reading the gradient: a gradient
                // that is the parameter's own storage (never seen, but candle does not
                // promise it) is copied instead of being locked twice.
                let (gs, _) = g.storage_and_layout();
                let gp = slice_of(name, &gs, &g)?.as_ptr();
                let (ps, _) = param.storage_and_layout();
                let aliased = match &*ps {
                    Storage::Cpu(CpuStorage::F32(v)) => v.as_ptr_range().contains(&gp),
                    _ => false,
                };
                drop(ps);
                if aliased {
                    let buf = &mut self.bufs[i];
                    buf.clear();
                    buf.extend_from_slice(slice_of(name, &gs, &g)?);
                } else {
                    drop(gs);
                    self.slots[i] = Slot::Direct(g);
                }
            }
            Slot::Direct(d) => {
                let (ds, _) = d.storage_and_layout();
                let (gs, _) = g.storage_and_layout();
                let (a, b) = (slice_of(name, &ds, &d)?, slice_of(name, &gs, &g)?);
                let buf = &mut self.bufs[i];
                buf.clear();
                buf.extend(a.iter().zip(b).map(|(x, y)| *x + *y));
            }
            Slot::Buf => {
                let (gs, _) = g.storage_and_layout();
                let b = slice_of(name, &gs, &g)?;
                for (a, y) in self.bufs[i].iter_mut().zip(b) {
                    *a += *y;
                }
            }
        }
        Ok(())
    }

    /// Sum of squares of every gradient in f64; NaN or infinite when any element is. A
    /// parameter without gradient counts as zeros.
    pub(crate) fn sum_squares(&self, names: &[String]) -> Result<f64> {
        let mut total = 0.0f64;
        for (i, s) in self.slots.iter().enumerate() {
            let name = names.get(i).map(String::as_str).unwrap_or("?");
            total += match s {
                Slot::Empty => 0.0,
                Slot::Direct(t) => {
                    let (st, _) = t.storage_and_layout();
                    sum_squares(slice_of(name, &st, t)?)
                }
                Slot::Buf => sum_squares(&self.bufs[i]),
            };
        }
        Ok(total)
    }

    /// Runs `f` on every parameter's gradient (zeros for a parameter without one), in
    /// parameter order, with candle's storage locked for reading while `f` runs.
    pub(crate) fn with_slices<R>(
        &mut self,
        names: &[String],
        f: impl FnOnce(&[&[f32]]) -> R,
    ) -> Result<R> {
        for (i, s) in self.slots.iter_mut().enumerate() {
            if matches!(s, Slot::Empty) {
                let buf = &mut self.bufs[i];
                buf.clear();
                buf.resize(self.lens[i], 0.0);
                *s = Slot::Buf;
            }
        }
        let guards: Vec<_> = self
            .slots
            .iter()
            .map(|s| match s {
                Slot::Direct(t) => Some((t.storage_and_layout().0, t)),
                _ => None,
            })
            .collect();
        let mut slices: Vec<&[f32]> = Vec::with_capacity(self.slots.len());
        for (i, g) in guards.iter().enumerate() {
            let name = names.get(i).map(String::as_str).unwrap_or("?");
            slices.push(match g {
                Some((st, t)) => slice_of(name, st, t)?,
                None => &self.bufs[i],
            });
        }
        Ok(f(&slices))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap()
    }

    #[test]
    fn one_micro_batch_is_read_in_place_and_sums_match_a_zeroed_buffer() {
        let names = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let p = [t(&[0.0; 3]), t(&[0.0; 2]), t(&[0.0; 1])];
        let mut g = Grads::new(vec![3, 2, 1]);
        g.add(0, "a", &t(&[1.0, -2.0, 0.5]), &p[0]).unwrap();
        g.add(1, "b", &t(&[3.0, 4.0]), &p[1]).unwrap();
        assert!(matches!(g.slots[0], Slot::Direct(_)));
        assert!(g.bufs[0].is_empty(), "no buffer for one micro-batch");
        assert!(matches!(g.slots[2], Slot::Empty));
        assert_eq!(
            g.sum_squares(&names).unwrap(),
            1.0 + 4.0 + 0.25 + 9.0 + 16.0
        );
        // a second and third micro-batch for "a"
        g.add(0, "a", &t(&[0.1, 0.2, 0.3]), &p[0]).unwrap();
        g.add(0, "a", &t(&[1e-8, 1e8, -0.3]), &p[0]).unwrap();
        let want: Vec<f32> = {
            let mut acc = vec![0.0f32; 3];
            for m in [[1.0, -2.0, 0.5], [0.1, 0.2, 0.3], [1e-8, 1e8, -0.3]] {
                for (a, b) in acc.iter_mut().zip(m) {
                    *a += b;
                }
            }
            acc
        };
        let got = g
            .with_slices(&names, |s| s.iter().map(|s| s.to_vec()).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(got[0], want);
        assert_eq!(got[1], vec![3.0, 4.0]);
        assert_eq!(
            got[2],
            vec![0.0],
            "a parameter without gradient reads as zeros"
        );
        g.clear();
        assert!(matches!(g.slots[0], Slot::Empty));
        g.add(2, "c", &t(&[f32::NAN]), &p[2]).unwrap();
        assert!(g.sum_squares(&names).unwrap().is_nan());
    }

    #[test]
    fn a_gradient_sharing_the_parameter_storage_is_copied() {
        let names = vec!["w".to_string()];
        let w = t(&[1.0, 2.0]);
        let mut g = Grads::new(vec![2]);
        g.add(0, "w", &w, &w).unwrap();
        assert!(matches!(g.slots[0], Slot::Buf));
        let got = g.with_slices(&names, |s| s[0].to_vec()).unwrap();
        assert_eq!(got, vec![1.0, 2.0]);
    }

    #[test]
    fn wrong_length_names_the_parameter() {
        let p = t(&[0.0; 2]);
        let mut g = Grads::new(vec![2]);
        let e = g.add(0, "layer.w", &t(&[1.0]), &p).unwrap_err();
        assert!(e.to_string().contains("layer.w"), "{e}");
    }
}
