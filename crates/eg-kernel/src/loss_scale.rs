//! Dynamic loss scaling for f16 training (issue 8).
//!
//! f16 keeps five exponent bits: gradients below 2^-24 flush to zero. The loop multiplies the
//! loss by a scale before the backward pass, so the small gradients move into f16's range,
//! and divides the accumulated (f32) gradients by it again. When a scaled gradient overflows
//! to infinity (or NaN), the update is skipped and the scale halved; after
//! `growth_interval` good updates in a row it is doubled. Powers of two keep the unscaling
//! exact. An overflow is the scaler's business, not a fault: it is not a non-finite anomaly
//! and never triggers a rollback — unless the scale is already at `min_scale`, where the
//! gradient is infinite for another reason and the usual guard takes over.
//!
//! The scaler is part of [`crate::TrainerState`], so it is saved in every checkpoint and a
//! resumed run continues with the same scale (exact resume).
//!
//! ```
//! use eg_kernel::{LossScaler, ScaleUpdate};
//!
//! let mut s = LossScaler::new(65536.0)?.with_growth_interval(2)?;
//! assert_eq!(s.update(true), ScaleUpdate::Skip);    // overflow: skip the update, halve
//! assert_eq!(s.scale, 32768.0);
//! assert_eq!(s.update(false), ScaleUpdate::Apply);  // one good update
//! assert_eq!(s.update(false), ScaleUpdate::Apply);  // two: the scale doubles
//! assert_eq!(s.scale, 65536.0);
//! # Ok::<(), eg_kernel::Error>(())
//! ```

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// PyTorch's `GradScaler` default: double after this many good updates in a row.
pub const DEFAULT_GROWTH_INTERVAL: u64 = 2000;

/// State of the dynamic loss scaler (serialised in `trainer.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The current scale the loss is multiplied by before the backward pass.
    pub scale: f64,
    /// Good updates in a row after which the scale is doubled.
    pub growth_interval: u64,
    /// The scale never goes below this; an overflow at this scale is a real non-finite
    /// gradient (handled by the non-finite guard).
    pub min_scale: f64,
    /// The scale never goes above this.
    pub max_scale: f64,
    /// Good updates since the last overflow or growth.
    pub good_steps: u64,
    /// Updates skipped for an overflow.
    pub overflows: u64,
    /// Times the scale was doubled.
    pub growths: u64,
}

/// What the loop does with an update after [`LossScaler::update`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleUpdate {
    /// Gradients are finite: apply the update.
    Apply,
    /// Overflow: skip the update (the scale was halved).
    Skip,
    /// Overflow at the minimum scale: not the scaler's to handle (the non-finite guard is).
    NonFinite,
}

impl LossScaler {
    /// A scaler starting at `initial` (a positive, finite number; a power of two keeps the
    /// unscaling exact), growing every [`DEFAULT_GROWTH_INTERVAL`] good updates, between 1
    /// and 2^24.
    pub fn new(initial: f64) -> Result<Self> {
        if !(initial.is_finite() && initial > 0.0) {
            return Err(Error::InvalidOption {
                option: "loss_scale.initial",
                reason: format!("must be a positive finite number, got {initial}"),
            });
        }
        Ok(Self {
            scale: initial,
            growth_interval: DEFAULT_GROWTH_INTERVAL,
            min_scale: 1.0f64.min(initial),
            max_scale: 16_777_216.0f64.max(initial),
            good_steps: 0,
            overflows: 0,
            growths: 0,
        })
    }

    /// Sets the number of good updates after which the scale doubles (at least 1).
    pub fn with_growth_interval(mut self, n: u64) -> Result<Self> {
        if n == 0 {
            return Err(Error::InvalidOption {
                option: "loss_scale.growth_interval",
                reason: "must be at least 1".into(),
            });
        }
        self.growth_interval = n;
        Ok(self)
    }

    /// Records the outcome of one update's gradients (`overflow`: some gradient is not
    /// finite while the loss is) and says what to do with the update.
    pub fn update(&mut self, overflow: bool) -> ScaleUpdate {
        if overflow {
            if self.scale <= self.min_scale {
                self.good_steps = 0;
                return ScaleUpdate::NonFinite;
            }
            self.scale = (self.scale * 0.5).max(self.min_scale);
            self.good_steps = 0;
            self.overflows += 1;
            return ScaleUpdate::Skip;
        }
        self.good_steps += 1;
        if self.good_steps >= self.growth_interval {
            self.good_steps = 0;
            if self.scale < self.max_scale {
                self.scale = (self.scale * 2.0).min(self.max_scale);
                self.growths += 1;
            }
        }
        ScaleUpdate::Apply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_on_overflow_and_grows_after_the_interval() {
        let mut s = LossScaler::new(8.0)
            .unwrap()
            .with_growth_interval(3)
            .unwrap();
        assert_eq!(s.update(false), ScaleUpdate::Apply);
        assert_eq!(s.update(true), ScaleUpdate::Skip);
        assert_eq!((s.scale, s.good_steps, s.overflows), (4.0, 0, 1));
        for _ in 0..2 {
            assert_eq!(s.update(false), ScaleUpdate::Apply);
        }
        assert_eq!(s.scale, 4.0);
        assert_eq!(s.update(false), ScaleUpdate::Apply);
        assert_eq!((s.scale, s.growths), (8.0, 1));
    }

    #[test]
    fn overflow_at_the_minimum_is_left_to_the_guard() {
        let mut s = LossScaler::new(2.0).unwrap();
        assert_eq!(s.update(true), ScaleUpdate::Skip);
        assert_eq!(s.scale, 1.0);
        assert_eq!(s.update(true), ScaleUpdate::NonFinite);
        assert_eq!(s.scale, 1.0);
        assert_eq!(s.overflows, 1);
    }

    #[test]
    fn stays_within_bounds_and_rejects_bad_settings() {
        let mut s = LossScaler::new(16_777_216.0)
            .unwrap()
            .with_growth_interval(1)
            .unwrap();
        assert_eq!(s.update(false), ScaleUpdate::Apply);
        assert_eq!((s.scale, s.growths), (16_777_216.0, 0));
        assert!(LossScaler::new(0.0).is_err());
        assert!(LossScaler::new(f64::NAN).is_err());
        assert!(
            LossScaler::new(1.0)
                .unwrap()
                .with_growth_interval(0)
                .is_err()
        );
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<LossScaler>(&json).unwrap(), s);
    }
}
