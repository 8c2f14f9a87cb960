//! Named trainable parameters and their deterministic initialisation.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var};

use crate::{Error, Result};

/// Trainable parameters under Hugging Face tensor names, in a fixed order (the order they
/// were added), so optimizers and checkpoints see the same sequence every run.
///
/// Each entry is a candle [`Var`]; the model's forward uses the very same tensors, so
/// `grads.get(var.as_tensor())` after `loss.backward()` is the parameter's gradient.
#[derive(Debug, Clone, Default)]
pub struct ParamStore {
    entries: Vec<(String, Var)>,
    index: HashMap<String, usize>,
}

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a parameter.
    pub fn insert(&mut self, name: impl Into<String>, var: Var) {
        let name = name.into();
        match self.index.get(&name) {
            Some(&i) => self.entries[i].1 = var,
            None => {
                self.index.insert(name.clone(), self.entries.len());
                self.entries.push((name, var));
            }
        }
    }

    /// The parameter called `name`.
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.index.get(name).map(|&i| &self.entries[i].1)
    }

    /// Parameters in order, with their names.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// The variables in order (what an optimizer takes).
    pub fn vars(&self) -> Vec<Var> {
        self.entries.iter().map(|(_, v)| v.clone()).collect()
    }

    /// Number of parameter tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total number of scalar parameters.
    pub fn num_elements(&self) -> usize {
        self.entries.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Overwrites every parameter in place with the tensor of the same name (converted to the
    /// parameter's dtype), e.g. when resuming from a checkpoint. All names must be present
    /// with the right shapes and no others, or nothing is changed.
    pub fn set_values(&self, values: &HashMap<String, Tensor>) -> Result<()> {
        let expected: Vec<(String, Vec<usize>)> = self
            .entries
            .iter()
            .map(|(n, v)| (n.clone(), v.dims().to_vec()))
            .collect();
        let shapes = values
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        check_tensor_names(&expected, &shapes, |_| false)?;
        for (name, var) in &self.entries {
            if let Some(t) = values.get(name) {
                var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
            }
        }
        Ok(())
    }

    /// Which parameters a backward pass left without a usable gradient: none at all, a
    /// non-finite value, or all zeros (the symptom of an op without a backward, issue #4).
    pub fn gradient_coverage(
        &self,
        grads: &candle_core::backprop::GradStore,
    ) -> Result<GradCoverage> {
        let mut cov = GradCoverage::default();
        for (name, var) in &self.entries {
            match grads.get(var.as_tensor()) {
                None => cov.missing.push(name.clone()),
                Some(g) => {
                    // A NaN or infinity anywhere makes the sum non-finite.
                    let sum_abs = g
                        .to_dtype(DType::F64)?
                        .abs()?
                        .sum_all()?
                        .to_scalar::<f64>()?;
                    if !sum_abs.is_finite() {
                        cov.non_finite.push(name.clone());
                    } else if sum_abs == 0.0 {
                        cov.zero.push(name.clone());
                    }
                }
            }
        }
        Ok(cov)
    }

    /// The current values, by name, detached from the graph, e.g. for saving. They share
    /// storage with the variables (no copy): an in-place optimizer update shows through.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.entries
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect()
    }
}

/// The result of [`ParamStore::gradient_coverage`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GradCoverage {
    /// Parameters with no gradient.
    pub missing: Vec<String>,
    /// Parameters whose gradient has a NaN or an infinity.
    pub non_finite: Vec<String>,
    /// Parameters whose gradient is exactly zero everywhere.
    pub zero: Vec<String>,
}

impl GradCoverage {
    /// Whether every parameter has a finite, non-zero gradient.
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty() && self.non_finite.is_empty() && self.zero.is_empty()
    }
}

/// Checks that `shapes` holds exactly the `expected` tensors with their shapes: a wrong
/// shape is [`Error::ShapeMismatch`], absent names [`Error::MissingTensors`], extra names
/// (other than `ignorable` ones) [`Error::UnexpectedTensors`].
pub(crate) fn check_tensor_names(
    expected: &[(String, Vec<usize>)],
    shapes: &HashMap<String, Vec<usize>>,
    ignorable: impl Fn(&str) -> bool,
) -> Result<()> {
    let mut missing = Vec::new();
    for (name, shape) in expected {
        match shapes.get(name) {
            None => missing.push(name.clone()),
            Some(found) if found != shape => {
                return Err(Error::ShapeMismatch {
                    tensor: name.clone(),
                    expected: shape.clone(),
                    found: found.clone(),
                });
            }
            Some(_) => {}
        }
    }
    if !missing.is_empty() {
        return Err(Error::MissingTensors { names: missing });
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut unexpected: Vec<String> = shapes
        .keys()
        .filter(|n| !known.contains(n.as_str()) && !ignorable(n))
        .cloned()
        .collect();
    if !unexpected.is_empty() {
        unexpected.sort();
        return Err(Error::UnexpectedTensors { names: unexpected });
    }
    Ok(())
}

/// Token ids (any integer dtype, any shape) as a flat `u32` tensor, each checked to be in
/// `0..vocab` ([`Error::TokenOutOfRange`] otherwise, instead of a silent wrap or clamp).
pub(crate) fn checked_ids(ids: &Tensor, vocab: usize) -> Result<Tensor> {
    let v: Vec<i64> = ids.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
    let mut out = Vec::with_capacity(v.len());
    for id in v {
        match u32::try_from(id) {
            Ok(u) if (u as usize) < vocab => out.push(u),
            _ => return Err(Error::TokenOutOfRange { id, vocab }),
        }
    }
    let n = out.len();
    Ok(Tensor::from_vec(out, n, ids.device())?)
}

/// A SplitMix64 stream: tiny, fast, and identical on every platform.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub(crate) fn next_normal(&mut self) -> f64 {
        let u1 = self.next_open01();
        let u2 = self.next_open01();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// FNV-1a of a name, mixed with the seed: each parameter has its own stream, so its initial
/// value does not depend on which other parameters exist or their order.
pub(crate) fn stream_for(seed: u64, name: &str) -> SplitMix64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    SplitMix64::new(h ^ seed.rotate_left(17))
}

/// How a parameter starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Init {
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
    /// All ones (norm weights).
    Ones,
    /// All zeros (biases).
    Zeros,
}

/// A tensor initialised deterministically from `(seed, name)`.
pub(crate) fn init_tensor(
    seed: u64,
    name: &str,
    shape: &[usize],
    init: Init,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let t = match init {
        Init::Ones => Tensor::ones(shape, dtype, device)?,
        Init::Zeros => Tensor::zeros(shape, dtype, device)?,
        Init::Normal(std) => {
            let n: usize = shape.iter().product();
            let mut rng = stream_for(seed, name);
            let v: Vec<f64> = (0..n).map(|_| rng.next_normal() * std).collect();
            Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?
        }
    };
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_stream_has_plausible_moments() {
        let mut r = SplitMix64::new(7);
        let v: Vec<f64> = (0..20_000).map(|_| r.next_normal()).collect();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.03, "{mean}");
        assert!((var - 1.0).abs() < 0.05, "{var}");
    }

    #[test]
    fn init_depends_on_seed_and_name_only() {
        let d = Device::Cpu;
        let a = init_tensor(1, "w", &[3, 2], Init::Normal(0.02), DType::F32, &d).unwrap();
        let b = init_tensor(1, "w", &[3, 2], Init::Normal(0.02), DType::F32, &d).unwrap();
        let c = init_tensor(2, "w", &[3, 2], Init::Normal(0.02), DType::F32, &d).unwrap();
        let (a, b, c) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            c.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
