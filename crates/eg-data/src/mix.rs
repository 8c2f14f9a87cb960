//! Mixing several datasets by weight into one sample id space.

use std::sync::Arc;

use crate::order::mix64;
use crate::{Error, Result, TokenDataset};

#[derive(Clone)]
struct Part {
    data: Arc<dyn TokenDataset>,
    count: u64,
    len: u64,
    mult: u64,
    offset: u64,
}

/// A weighted mixture of datasets, itself a [`TokenDataset`] of `samples` ids.
///
/// Dataset `k` gets `count_k ≈ samples × w_k / Σw` ids (largest-remainder rounding). Its id
/// `i` maps to sample `(i × a_k + b_k) mod len_k` with `a_k` coprime to `len_k`: a fixed
/// pseudo-random bijection, so a down-sampled dataset contributes a spread-out subset and an
/// up-sampled one repeats every sample ⌊count/len⌋ or ⌈count/len⌉ times. The loader's
/// per-epoch shuffle then interleaves the sources; the mapping is a pure function of the
/// seed, so the cursor stays valid.
#[derive(Clone)]
pub struct Mixture {
    parts: Vec<Part>,
    starts: Vec<u64>,
}

impl std::fmt::Debug for Mixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mixture")
            .field("counts", &self.counts())
            .finish_non_exhaustive()
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Mixture {
    /// Mix `sources` (dataset, weight) into `samples` ids per epoch (default: the sum of
    /// their lengths).
    pub fn new(
        sources: Vec<(Arc<dyn TokenDataset>, f64)>,
        samples: Option<u64>,
        seed: u64,
    ) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidOption {
            option: "mixture",
            reason,
        };
        if sources.is_empty() {
            return Err(invalid("no source".into()));
        }
        let total_w: f64 = sources.iter().map(|s| s.1).sum();
        if sources.iter().any(|s| !s.1.is_finite() || s.1 < 0.0)
            || total_w <= 0.0
            || !total_w.is_finite()
        {
            return Err(invalid(
                "weights must be finite, non-negative, and not all zero".into(),
            ));
        }
        if let Some(k) = sources.iter().position(|s| s.1 > 0.0 && s.0.is_empty()) {
            return Err(invalid(format!("source {k} has a weight but no sample")));
        }
        let m = samples.unwrap_or_else(|| sources.iter().map(|s| s.0.len()).sum());
        let exact: Vec<f64> = sources.iter().map(|s| s.1 / total_w * m as f64).collect();
        let mut counts: Vec<u64> = exact.iter().map(|e| e.floor() as u64).collect();
        let mut rest = m.saturating_sub(counts.iter().sum());
        let mut by_rem: Vec<usize> = (0..exact.len()).filter(|&k| sources[k].1 > 0.0).collect();
        by_rem.sort_by(|&a, &b| {
            (exact[b] - exact[b].floor())
                .total_cmp(&(exact[a] - exact[a].floor()))
                .then(a.cmp(&b))
        });
        for &k in by_rem.iter().cycle().take(by_rem.len().max(1) * 2) {
            if rest == 0 {
                break;
            }
            counts[k] += 1;
            rest -= 1;
        }
        let mut parts = Vec::new();
        let mut starts = vec![0];
        for (k, ((data, _), count)) in sources.into_iter().zip(counts).enumerate() {
            let len = data.len();
            let (mut mult, offset) = if len == 0 {
                (1, 0)
            } else {
                (
                    mix64(seed ^ (k as u64).wrapping_mul(0x9E37)) % len,
                    mix64(seed.wrapping_add(k as u64)) % len,
                )
            };
            mult = mult.max(1);
            while len > 1 && gcd(mult, len) != 1 {
                mult += 1;
            }
            starts.push(starts[k] + count);
            parts.push(Part {
                data,
                count,
                len,
                mult,
                offset,
            });
        }
        Ok(Self { parts, starts })
    }

    /// Ids per source.
    pub fn counts(&self) -> Vec<u64> {
        self.parts.iter().map(|p| p.count).collect()
    }

    /// The source and sample behind mixture id `id`.
    pub fn locate(&self, id: u64) -> Result<(usize, u64)> {
        let len = self.len();
        if id >= len {
            return Err(Error::SampleOutOfRange { id, len });
        }
        let k = self.starts.partition_point(|&s| s <= id) - 1;
        let p = &self.parts[k];
        let i = u128::from(id - self.starts[k]);
        let j = (i * u128::from(p.mult) + u128::from(p.offset)) % u128::from(p.len.max(1));
        Ok((k, j as u64))
    }
}

impl TokenDataset for Mixture {
    fn len(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }
    fn sample_len(&self, id: u64) -> Result<usize> {
        let (k, j) = self.locate(id)?;
        self.parts[k].data.sample_len(j)
    }
    fn prompt_len(&self, id: u64) -> Result<usize> {
        let (k, j) = self.locate(id)?;
        self.parts[k].data.prompt_len(j)
    }
    fn read_tokens(&self, id: u64, start: usize, out: &mut [u32]) -> Result<()> {
        let (k, j) = self.locate(id)?;
        self.parts[k].data.read_tokens(j, start, out)
    }
    fn sample_info(&self, id: u64) -> Result<(usize, usize)> {
        let (k, j) = self.locate(id)?;
        self.parts[k].data.sample_info(j)
    }
    fn source_of(&self, id: u64) -> Result<usize> {
        Ok(self.locate(id)?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InMemoryDataset;

    fn ds(n: u32, tag: u32) -> Arc<dyn TokenDataset> {
        Arc::new(InMemoryDataset::from_docs((0..n).map(|i| vec![tag, i])))
    }

    #[test]
    fn weights_set_counts_and_mapping_covers_sources() {
        let m = Mixture::new(vec![(ds(10, 1), 3.0), (ds(100, 2), 1.0)], Some(40), 7).unwrap();
        assert_eq!(m.counts(), vec![30, 10]);
        // Source 0 is up-sampled 3×: every sample appears exactly 3 times.
        let mut seen = [0u32; 10];
        for id in 0..30 {
            let (k, j) = m.locate(id).unwrap();
            assert_eq!(k, 0);
            seen[j as usize] += 1;
        }
        assert_eq!(seen, [3; 10]);
        // Source 1 is down-sampled: 10 distinct samples.
        let mut js: Vec<u64> = (30..40).map(|id| m.locate(id).unwrap().1).collect();
        js.sort_unstable();
        js.dedup();
        assert_eq!(js.len(), 10);
        let mut out = [0u32; 2];
        m.read_tokens(35, 0, &mut out).unwrap();
        assert_eq!(out[0], 2);
    }

    #[test]
    fn bad_weights_are_refused() {
        assert!(Mixture::new(vec![(ds(3, 0), f64::NAN)], None, 0).is_err());
        assert!(Mixture::new(vec![(ds(3, 0), 0.0)], None, 0).is_err());
        assert!(Mixture::new(vec![(ds(0, 0), 1.0)], None, 0).is_err());
    }
}
