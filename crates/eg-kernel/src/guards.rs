//! Guards: non-finite detection, global-norm clipping and loss-spike detection.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Sum of squares of `g` in f64 (NaN or infinite when `g` holds a non-finite value, so this
/// one pass is both the global-norm term and the finiteness check).
///
/// Eight independent f64 partial sums (one per lane, squares of f32 values are exact in
/// f64 and cannot overflow) let the compiler vectorise the loop; they are added in a fixed
/// order, so the result depends on nothing but the data.
pub fn sum_squares(g: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0.0f64; LANES];
    let chunks = g.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            let x = f64::from(x);
            *a += x * x;
        }
    }
    let mut rest = 0.0f64;
    for &x in tail {
        rest += f64::from(x) * f64::from(x);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + rest
}

/// The factor gradients are multiplied by so their global L2 norm is at most `max_norm`.
pub fn clip_factor(norm: f64, max_norm: Option<f64>) -> f32 {
    match max_norm {
        Some(m) if norm > m && norm.is_finite() => (m / (norm + 1e-6)) as f32,
        _ => 1.0,
    }
}

/// Loss-spike detection with a robust z-score over a window of recent losses:
/// `z = (loss − median) / (1.4826 · MAD)`, where MAD is the median absolute deviation.
///
/// Robust statistics keep one earlier outlier from masking the next one, which a mean and
/// standard deviation would not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpikeDetector {
    /// Losses kept.
    pub window: usize,
    /// Threshold on the robust z-score.
    pub threshold: f64,
    /// Losses needed before any decision.
    pub min_history: usize,
    history: VecDeque<f64>,
}

impl SpikeDetector {
    /// A detector over `window` losses flagging z-scores above `threshold`.
    pub fn new(window: usize, threshold: f64) -> Self {
        Self {
            window: window.max(2),
            threshold,
            min_history: window.clamp(2, 8),
            history: VecDeque::new(),
        }
    }

    /// The robust z-score of `loss` against the window, or `None` while it is too short.
    pub fn zscore(&self, loss: f64) -> Option<f64> {
        if self.history.len() < self.min_history {
            return None;
        }
        let mut v: Vec<f64> = self.history.iter().copied().collect();
        let med = median(&mut v);
        let mut dev: Vec<f64> = v.iter().map(|x| (x - med).abs()).collect();
        let mad = median(&mut dev);
        // A floor on the spread so a flat curve does not turn noise into spikes.
        let scale = (1.4826 * mad).max(1e-3 * med.abs()).max(1e-8);
        Some((loss - med) / scale)
    }

    /// Whether `loss` is a spike.
    pub fn is_spike(&self, loss: f64) -> bool {
        self.zscore(loss).is_some_and(|z| z > self.threshold)
    }

    /// Adds an accepted loss to the window.
    pub fn push(&mut self, loss: f64) {
        if self.history.len() == self.window {
            self.history.pop_front();
        }
        self.history.push_back(loss);
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spike_is_flagged_and_noise_is_not() {
        let mut d = SpikeDetector::new(20, 6.0);
        for i in 0..20 {
            let loss = 3.0 - 0.01 * i as f64 + if i % 2 == 0 { 0.02 } else { -0.02 };
            assert!(!d.is_spike(loss));
            d.push(loss);
        }
        assert!(!d.is_spike(2.9));
        assert!(d.is_spike(6.0));
        assert!(d.zscore(6.0).unwrap() > 20.0);
    }

    #[test]
    fn clipping_factor() {
        assert_eq!(clip_factor(0.5, Some(1.0)), 1.0);
        assert!((clip_factor(4.0, Some(1.0)) - 0.25).abs() < 1e-6);
        assert_eq!(clip_factor(4.0, None), 1.0);
        assert_eq!(sum_squares(&[3.0, 4.0]), 25.0);
        assert!(sum_squares(&[f32::NAN]).is_nan());
        // every position of the 8 lanes and the tail is checked
        for n in [1usize, 7, 8, 9, 17, 1000] {
            for bad in [0, n / 2, n - 1] {
                let mut v = vec![0.5f32; n];
                v[bad] = f32::INFINITY;
                assert!(!sum_squares(&v).is_finite(), "n {n} at {bad}");
            }
            let v: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - 3.0).collect();
            let want: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            assert!((sum_squares(&v) - want).abs() <= 1e-12 * want.max(1.0));
        }
        // the largest f32 squared does not overflow f64
        assert!(sum_squares(&[f32::MAX, f32::MAX]).is_finite());
    }
}
