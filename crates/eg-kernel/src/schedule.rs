//! Learning-rate schedules.
//!
//! [`Schedule::lr`] maps the 0-based index of the update being applied to a learning rate:
//! a linear warmup from `peak / warmup` up to `peak`, then the chosen shape.

use serde::{Deserialize, Serialize};

/// Shape of the schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Shape {
    /// The peak rate throughout.
    Constant,
    /// Linear decay to `min_ratio × peak` at the last step.
    Linear,
    /// Half-cosine decay to `min_ratio × peak` at the last step.
    Cosine,
    /// Warmup-stable-decay: the peak until the last `decay_fraction` of the steps, then a
    /// linear decay to `min_ratio × peak`.
    Wsd {
        /// Fraction of all steps spent decaying, in [0, 1].
        decay_fraction: f64,
    },
    /// `peak × sqrt(warmup / (step + 1))` after warmup (`warmup` taken as at least 1).
    InverseSqrt,
}

/// A learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Peak learning rate.
    pub peak: f64,
    /// Warmup updates.
    pub warmup: u64,
    /// Total updates of the run.
    pub total: u64,
    /// Final rate as a fraction of the peak (linear, cosine, WSD).
    pub min_ratio: f64,
    /// Shape after warmup.
    pub shape: Shape,
}

impl Schedule {
    /// A constant rate without warmup.
    pub fn constant(peak: f64) -> Self {
        Self {
            peak,
            warmup: 0,
            total: 1,
            min_ratio: 1.0,
            shape: Shape::Constant,
        }
    }

    /// From the validated `[train.schedule]` and the run length.
    pub fn from_config(cfg: &eg_config::ScheduleConfig, peak: f64, total: u64) -> Self {
        use eg_config::wire::ScheduleKind as K;
        let shape = match cfg.kind {
            K::Constant => Shape::Constant,
            K::Linear => Shape::Linear,
            K::Cosine => Shape::Cosine,
            K::Wsd => Shape::Wsd {
                decay_fraction: cfg.decay_fraction.get(),
            },
            K::InverseSqrt => Shape::InverseSqrt,
            _ => Shape::Cosine,
        };
        Self {
            peak,
            warmup: cfg.warmup.0,
            total,
            min_ratio: cfg.min_lr_ratio.get(),
            shape,
        }
    }

    /// The rate for update `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        let peak = self.peak;
        if step < self.warmup {
            return peak * (step + 1) as f64 / self.warmup as f64;
        }
        let min = self.min_ratio * peak;
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress =
            ((step - self.warmup) as f64 / span.saturating_sub(1).max(1) as f64).min(1.0);
        match self.shape {
            Shape::Constant => peak,
            Shape::Linear => peak - (peak - min) * progress,
            Shape::Cosine => {
                min + (peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Shape::Wsd { decay_fraction } => {
                let decay = ((self.total as f64) * decay_fraction).round() as u64;
                let start = self.total.saturating_sub(decay).max(self.warmup);
                if step < start || decay == 0 {
                    peak
                } else {
                    let p = ((step - start + 1) as f64 / decay as f64).min(1.0);
                    peak - (peak - min) * p
                }
            }
            Shape::InverseSqrt => {
                let w = self.warmup.max(1) as f64;
                peak * (w / (step + 1) as f64).sqrt().min(1.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    fn s(shape: Shape, warmup: u64, total: u64) -> Schedule {
        Schedule {
            peak: 1.0,
            warmup,
            total,
            min_ratio: 0.1,
            shape,
        }
    }

    #[test]
    fn warmup_is_linear_to_peak() {
        let c = s(Shape::Constant, 4, 10);
        close(c.lr(0), 0.25);
        close(c.lr(1), 0.5);
        close(c.lr(3), 1.0);
        close(c.lr(4), 1.0);
        close(c.lr(100), 1.0);
    }

    #[test]
    fn linear_and_cosine_reach_min_at_last_step() {
        // warmup 2, total 12: decay over updates 2..=11 (10 updates, progress 0..1)
        let l = s(Shape::Linear, 2, 12);
        close(l.lr(2), 1.0);
        close(l.lr(11), 0.1);
        close(l.lr(2 + 3), 1.0 - 0.9 * (3.0 / 9.0));
        close(l.lr(50), 0.1);
        let c = s(Shape::Cosine, 2, 12);
        close(c.lr(2), 1.0);
        close(c.lr(11), 0.1);
        // midway between (progress 0.5): min + (peak - min) / 2
        let mid = Schedule { total: 13, ..c };
        close(mid.lr(2 + 5), 0.55);
    }

    #[test]
    fn wsd_is_stable_then_decays() {
        let w = s(
            Shape::Wsd {
                decay_fraction: 0.2,
            },
            2,
            20,
        );
        close(w.lr(0), 0.5);
        close(w.lr(15), 1.0);
        // decay over the last 4 updates: 16, 17, 18, 19
        close(w.lr(16), 1.0 - 0.9 * 0.25);
        close(w.lr(19), 0.1);
    }

    #[test]
    fn inverse_sqrt_after_warmup() {
        let i = s(Shape::InverseSqrt, 4, 100);
        close(i.lr(3), 1.0);
        close(i.lr(4), (4.0f64 / 5.0).sqrt());
        close(i.lr(15), 0.5);
        let no_warmup = s(Shape::InverseSqrt, 0, 100);
        close(no_warmup.lr(0), 1.0);
        close(no_warmup.lr(3), 0.5);
    }
}
