//! Seeded, deterministic, length-preserving augmentations applied to packed segments.
//!
//! Augmentations run after packing, on each segment (one sample piece) of a batch, with an
//! RNG seeded from the step's [`Batch::rng_seed`](crate::Batch::rng_seed), the sample id and
//! the piece's start — never from the rank — so the global batch is the same for any number
//! of ranks and a resumed run repeats them exactly. They must keep the segment's length (the
//! packing plan was made from lengths): "removing" a token means replacing it and taking it
//! out of the loss.

use crate::order::SplitMix64;

/// A transform of one packed segment.
pub trait Augment: Send + Sync + std::fmt::Debug {
    /// Transform `tokens` and their `loss_mask` (same length) in place.
    fn apply(&self, tokens: &mut [u32], loss_mask: &mut [u8], rng: &mut SplitMix64);
}

/// Replace each token with `replacement` with probability `probability`, and drop it from
/// the loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenDropout {
    /// Probability per token.
    pub probability: f64,
    /// Replacement id (e.g. an `<unk>` or mask token).
    pub replacement: u32,
}

impl Augment for TokenDropout {
    fn apply(&self, tokens: &mut [u32], loss_mask: &mut [u8], rng: &mut SplitMix64) {
        for (t, m) in tokens.iter_mut().zip(loss_mask.iter_mut()) {
            if rng.next_f64() < self.probability {
                *t = self.replacement;
                *m = 0;
            }
        }
    }
}

/// Corrupt spans: about `rate` of the tokens, in spans of mean length `mean_span`, become
/// `sentinel` and leave the loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpanCorruption {
    /// Fraction of tokens corrupted.
    pub rate: f64,
    /// Mean span length.
    pub mean_span: usize,
    /// Sentinel token id.
    pub sentinel: u32,
}

impl Augment for SpanCorruption {
    fn apply(&self, tokens: &mut [u32], loss_mask: &mut [u8], rng: &mut SplitMix64) {
        let mean = self.mean_span.max(1);
        let start_p = self.rate / mean as f64;
        let mut i = 0;
        while i < tokens.len() {
            if rng.next_f64() < start_p {
                let len = 1 + rng.below(2 * mean as u64 - 1) as usize;
                let end = (i + len).min(tokens.len());
                tokens[i..end].fill(self.sentinel);
                loss_mask[i..end].fill(0);
                i = end;
            } else {
                i += 1;
            }
        }
    }
}

/// With probability `probability`, cut the segment at a uniform point: later tokens become
/// `pad_id` and leave the loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomTruncation {
    /// Probability per segment.
    pub probability: f64,
    /// Padding id written after the cut.
    pub pad_id: u32,
}

impl Augment for RandomTruncation {
    fn apply(&self, tokens: &mut [u32], loss_mask: &mut [u8], rng: &mut SplitMix64) {
        if tokens.len() > 1 && rng.next_f64() < self.probability {
            let cut = 1 + rng.below(tokens.len() as u64 - 1) as usize;
            tokens[cut..].fill(self.pad_id);
            loss_mask[cut..].fill(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn augmentations_are_deterministic_and_length_preserving() {
        let augs: [&dyn Augment; 3] = [
            &TokenDropout {
                probability: 0.3,
                replacement: 0,
            },
            &SpanCorruption {
                rate: 0.3,
                mean_span: 3,
                sentinel: 1,
            },
            &RandomTruncation {
                probability: 1.0,
                pad_id: 2,
            },
        ];
        for a in augs {
            let run = |seed| {
                let mut t: Vec<u32> = (10..110).collect();
                let mut m = vec![1u8; 100];
                a.apply(&mut t, &mut m, &mut SplitMix64::new(seed));
                (t, m)
            };
            let (t, m) = run(5);
            assert_eq!((t.len(), m.len()), (100, 100));
            assert_eq!(run(5), (t.clone(), m.clone()));
            assert_ne!(run(6).0, t, "{a:?}");
            assert!(m.contains(&0), "{a:?}");
        }
    }
}
