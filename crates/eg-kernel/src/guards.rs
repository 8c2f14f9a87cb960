//! Guards: non-finite detection, global-norm clipping and loss-spike detection.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Sum of squares of `g` in f64 (NaN or infinite when `g` holds a non-finite value).
pub fn sum_squares(g: &[f32]) -> f64 {
    // Sum in fixed-size chunks so the result does not depend on anything but the data.
    g.chunks(4096)
        .map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
        .sum()
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
    }
}
