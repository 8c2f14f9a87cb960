//! The controller: how a running job adapts to memory pressure, as a pure state machine.
//!
//! It starts from the planned [`Strategy`] and reacts to [`Level`]s (from
//! [`crate::pressure::PressureDetector`]) with one [`Decision`] at a time:
//!
//! 1. **Shrink**, under [`Level::Critical`] at once, under [`Level::Elevated`] once it has
//!    lasted `elevated_patience_ms`: first the micro-batch (to the largest divisor of the
//!    global batch at most half the current one; accumulation grows so micro-batch ×
//!    accumulation stays the global batch), then activation checkpointing, then disk offload
//!    of the optimizer state. With nothing left, one [`Action::Exhausted`] is recorded.
//!    Consecutive shrinks are `cooldown_ms` apart so the previous one can take effect.
//! 2. **Grow back** after [`Level::Normal`] has lasted `stable_ms`: undo the most recent
//!    shrink first (a stack), never beyond the plan. When pressure returns right after a
//!    grow, the stable period doubles (up to `max_stable_ms`) so the job does not oscillate.
//!
//! The global batch never changes (property-tested). Every decision is a serde record for
//! logs and checkpoints, and the whole controller serializes so a resumed run continues with
//! the same state.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::footprint::OffloadKind;
use crate::planner::{Strategy, divisors};
use crate::pressure::Level;

/// Settings of the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerConfig {
    /// The global batch in sequences; micro-batch × accumulation always equals it.
    pub global_sequences: u32,
    /// Whether the controller may turn activation checkpointing on.
    pub allow_checkpointing: bool,
    /// Whether the controller may move optimizer state to disk.
    pub allow_offload: bool,
    /// How long Elevated must last before a shrink, ms (default 10 000).
    pub elevated_patience_ms: u64,
    /// Shortest time between two changes, ms (default 2 000).
    pub cooldown_ms: u64,
    /// How long Normal must last before growing back, ms (default 60 000).
    pub stable_ms: u64,
    /// Cap of the doubled stable period, ms (default 600 000).
    pub max_stable_ms: u64,
}

impl ControllerConfig {
    /// Defaults for a global batch of `global_sequences`, everything allowed.
    pub fn new(global_sequences: u32) -> ControllerConfig {
        ControllerConfig {
            global_sequences,
            allow_checkpointing: true,
            allow_offload: true,
            elevated_patience_ms: 10_000,
            cooldown_ms: 2_000,
            stable_ms: 60_000,
            max_stable_ms: 600_000,
        }
    }
}

/// What the caller of [`Controller::observe_with`] knows beyond the pressure level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hints {
    /// Do not grow now even after a stable period: the caller predicts the larger
    /// strategy would not fit (the grow happens at the first observation without it).
    pub block_grow: bool,
    /// The caller predicts the shrink's effect (from the memory model) instead of waiting
    /// for it to show in the readings: the cooldown does not apply.
    pub immediate: bool,
}

/// What the controller changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Action {
    /// Smaller micro-batch, more accumulation steps.
    ShrinkMicroBatch {
        /// Micro-batch before.
        from: u32,
        /// Micro-batch after.
        to: u32,
    },
    /// Activation checkpointing turned on.
    EnableCheckpointing,
    /// Optimizer state moved to disk.
    EnableOffload,
    /// Micro-batch grown back.
    GrowMicroBatch {
        /// Micro-batch before.
        from: u32,
        /// Micro-batch after.
        to: u32,
    },
    /// Activation checkpointing turned off again.
    DisableCheckpointing,
    /// Optimizer state back in RAM.
    DisableOffload,
    /// Under pressure with nothing left to give up (the guard's emergency checkpoint is next).
    Exhausted,
}

impl Action {
    fn is_shrink(self) -> bool {
        matches!(
            self,
            Action::ShrinkMicroBatch { .. } | Action::EnableCheckpointing | Action::EnableOffload
        )
    }
}

/// One decision, as logged and saved in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Sequence number, from 1.
    pub seq: u64,
    /// When, ms (the caller's monotonic clock).
    pub at_ms: u64,
    /// The pressure level that caused it.
    pub level: Level,
    /// What changed.
    pub action: Action,
    /// Strategy before.
    pub before: Strategy,
    /// Strategy after.
    pub after: Strategy,
}

/// The controller's state. Serialize it into checkpoints; deserialize to resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Controller {
    cfg: ControllerConfig,
    planned: Strategy,
    current: Strategy,
    /// Shrinks not yet undone, most recent last.
    undo: Vec<Action>,
    last_change_ms: Option<u64>,
    last_was_grow: bool,
    elevated_since_ms: Option<u64>,
    normal_since_ms: Option<u64>,
    stable_ms: u64,
    exhausted_reported: bool,
    decisions: u64,
}

impl Controller {
    /// A controller starting from the planned strategy.
    pub fn new(cfg: ControllerConfig, planned: Strategy) -> Result<Controller> {
        let g = cfg.global_sequences;
        if g == 0
            || planned.micro_batch == 0
            || u64::from(planned.micro_batch) * u64::from(planned.accumulation) != u64::from(g)
        {
            return Err(Error::Invalid {
                what: "controller",
                field: "planned",
                reason: format!(
                    "micro-batch {} × accumulation {} must equal the global batch of {g} sequences",
                    planned.micro_batch, planned.accumulation
                ),
            });
        }
        if cfg.max_stable_ms < cfg.stable_ms {
            return Err(Error::Invalid {
                what: "controller",
                field: "max_stable_ms",
                reason: format!("must be at least stable_ms ({})", cfg.stable_ms),
            });
        }
        Ok(Controller {
            cfg,
            planned,
            current: planned,
            undo: Vec::new(),
            last_change_ms: None,
            last_was_grow: false,
            elevated_since_ms: None,
            normal_since_ms: None,
            stable_ms: cfg.stable_ms,
            exhausted_reported: false,
            decisions: 0,
        })
    }

    /// The strategy to run now.
    pub fn current(&self) -> Strategy {
        self.current
    }

    /// The strategy planned at the start (the controller never grows beyond it).
    pub fn planned(&self) -> Strategy {
        self.planned
    }

    /// The current stable period before growing, ms (doubles after a grow that did not
    /// last).
    pub fn stable_ms(&self) -> u64 {
        self.stable_ms
    }

    /// The settings.
    pub fn config(&self) -> &ControllerConfig {
        &self.cfg
    }

    /// Forbids the steps the running job cannot take (a model without activation
    /// checkpointing, no offload store): the controller skips them when shrinking.
    pub fn restrict(&mut self, allow_checkpointing: bool, allow_offload: bool) {
        self.cfg.allow_checkpointing &= allow_checkpointing;
        self.cfg.allow_offload &= allow_offload;
    }

    /// The decisions taken so far.
    pub fn decisions(&self) -> u64 {
        self.decisions
    }

    /// The strategy the next grow would restore, if any shrink is left to undo.
    pub fn peek_grow(&self) -> Option<Strategy> {
        let mut s = self.current;
        match self.undo.last()? {
            Action::ShrinkMicroBatch { from, .. } => {
                s.micro_batch = *from;
                s.accumulation = self.cfg.global_sequences / from;
            }
            Action::EnableCheckpointing => s.checkpointing = false,
            Action::EnableOffload => s.offload = OffloadKind::None,
            _ => return None,
        }
        Some(s)
    }

    /// The strategy the next shrink would run, if any is left.
    pub fn peek_shrink(&self) -> Option<Strategy> {
        let mut s = self.current;
        if s.micro_batch > 1 {
            let half = s.micro_batch / 2;
            let to = divisors(self.cfg.global_sequences)
                .into_iter()
                .filter(|d| *d <= half)
                .max()
                .unwrap_or(1);
            s.micro_batch = to;
            s.accumulation = self.cfg.global_sequences / to;
        } else if self.cfg.allow_checkpointing && !s.checkpointing {
            s.checkpointing = true;
        } else if self.cfg.allow_offload && s.offload == OffloadKind::None {
            s.offload = OffloadKind::Disk;
        } else {
            return None;
        }
        Some(s)
    }

    /// Starts a *probe*: the first step runs at micro-batch 1 (accumulation = the global
    /// batch), so the job's real memory can be measured before a larger micro-batch risks
    /// an OOM kill; [`Controller::settle`] then grows back as far as the measurement allows.
    /// Recorded as one [`Action::ShrinkMicroBatch`] at [`Level::Normal`].
    pub fn probe(&mut self, at_ms: u64) -> Option<Decision> {
        let before = self.current;
        if before.micro_batch <= 1 {
            return None;
        }
        let g = self.cfg.global_sequences;
        // One undo entry per halving, so growing back retraces the usual steps.
        let mut m = before.micro_batch;
        while m > 1 {
            let half = m / 2;
            let to = divisors(g)
                .into_iter()
                .filter(|d| *d <= half)
                .max()
                .unwrap_or(1);
            self.undo.push(Action::ShrinkMicroBatch { from: m, to });
            m = to;
        }
        self.current.micro_batch = 1;
        self.current.accumulation = g;
        self.last_change_ms = Some(at_ms);
        Some(self.record(
            at_ms,
            Level::Normal,
            Action::ShrinkMicroBatch {
                from: before.micro_batch,
                to: 1,
            },
            before,
        ))
    }

    /// Ends a probe: grows back at once (no stable period) while `fits` accepts the larger
    /// strategy, never beyond the plan. Returns the decisions.
    pub fn settle(&mut self, at_ms: u64, fits: impl Fn(&Strategy) -> bool) -> Vec<Decision> {
        let mut out = Vec::new();
        while let Some(next) = self.peek_grow() {
            if !fits(&next) {
                break;
            }
            match self.grow(at_ms, Level::Normal) {
                Some(d) => out.push(d),
                None => break,
            }
        }
        // Growing after a probe is not "pressure came back after a grow".
        self.last_was_grow = false;
        out
    }

    /// Feeds the pressure level at time `at_ms`; returns a decision when the strategy
    /// changes (or, once per episode, [`Action::Exhausted`]).
    pub fn observe(&mut self, at_ms: u64, level: Level) -> Option<Decision> {
        self.observe_with(at_ms, level, Hints::default())
    }

    /// [`Controller::observe`] with what the caller knows beyond the level (see [`Hints`]).
    pub fn observe_with(&mut self, at_ms: u64, level: Level, hints: Hints) -> Option<Decision> {
        if level == Level::Normal {
            self.normal_since_ms.get_or_insert(at_ms);
            self.elevated_since_ms = None;
            self.exhausted_reported = false;
        } else {
            self.normal_since_ms = None;
            self.elevated_since_ms.get_or_insert(at_ms);
        }
        let cooled = hints.immediate
            || self
                .last_change_ms
                .is_none_or(|t| at_ms.saturating_sub(t) >= self.cfg.cooldown_ms);
        match level {
            Level::Critical if cooled => self.shrink(at_ms, level),
            Level::Elevated
                if cooled
                    && self.elevated_since_ms.is_some_and(|t| {
                        at_ms.saturating_sub(t) >= self.cfg.elevated_patience_ms
                    }) =>
            {
                // The next shrink under Elevated needs the patience again.
                self.elevated_since_ms = Some(at_ms);
                self.shrink(at_ms, level)
            }
            Level::Normal => {
                let quiet_from = match (self.normal_since_ms, self.last_change_ms) {
                    (Some(n), Some(c)) => n.max(c),
                    (Some(n), None) => n,
                    (None, _) => at_ms,
                };
                if !hints.block_grow
                    && !self.undo.is_empty()
                    && at_ms.saturating_sub(quiet_from) >= self.stable_ms
                {
                    self.grow(at_ms, level)
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    fn record(&mut self, at_ms: u64, level: Level, action: Action, before: Strategy) -> Decision {
        self.decisions += 1;
        let d = Decision {
            seq: self.decisions,
            at_ms,
            level,
            action,
            before,
            after: self.current,
        };
        tracing::info!(
            seq = d.seq,
            ?level,
            ?action,
            micro_batch = d.after.micro_batch,
            accumulation = d.after.accumulation,
            checkpointing = d.after.checkpointing,
            offload = %d.after.offload,
            "memory controller decision"
        );
        d
    }

    fn shrink(&mut self, at_ms: u64, level: Level) -> Option<Decision> {
        let before = self.current;
        let g = self.cfg.global_sequences;
        let action = if before.micro_batch > 1 {
            let half = before.micro_batch / 2;
            let to = divisors(g)
                .into_iter()
                .filter(|d| *d <= half)
                .max()
                .unwrap_or(1);
            self.current.micro_batch = to;
            self.current.accumulation = g / to;
            Action::ShrinkMicroBatch {
                from: before.micro_batch,
                to,
            }
        } else if self.cfg.allow_checkpointing && !before.checkpointing {
            self.current.checkpointing = true;
            Action::EnableCheckpointing
        } else if self.cfg.allow_offload && before.offload == OffloadKind::None {
            self.current.offload = OffloadKind::Disk;
            Action::EnableOffload
        } else {
            if self.exhausted_reported {
                return None;
            }
            self.exhausted_reported = true;
            return Some(self.record(at_ms, level, Action::Exhausted, before));
        };
        if self.last_was_grow {
            // Pressure came back after growing: wait longer before the next grow.
            self.stable_ms = self.stable_ms.saturating_mul(2).min(self.cfg.max_stable_ms);
        }
        self.last_was_grow = false;
        self.undo.push(action);
        self.last_change_ms = Some(at_ms);
        Some(self.record(at_ms, level, action, before))
    }

    fn grow(&mut self, at_ms: u64, level: Level) -> Option<Decision> {
        let before = self.current;
        let undo = self.undo.pop()?;
        let action = match undo {
            Action::ShrinkMicroBatch { from, to } => {
                self.current.micro_batch = from;
                self.current.accumulation = self.cfg.global_sequences / from;
                Action::GrowMicroBatch { from: to, to: from }
            }
            Action::EnableCheckpointing => {
                self.current.checkpointing = false;
                Action::DisableCheckpointing
            }
            Action::EnableOffload => {
                self.current.offload = OffloadKind::None;
                Action::DisableOffload
            }
            other => {
                debug_assert!(!other.is_shrink());
                return None;
            }
        };
        self.last_was_grow = true;
        self.last_change_ms = Some(at_ms);
        Some(self.record(at_ms, level, action, before))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned() -> Strategy {
        Strategy {
            micro_batch: 8,
            accumulation: 2,
            checkpointing: false,
            offload: OffloadKind::None,
        }
    }

    fn ctl() -> Controller {
        Controller::new(ControllerConfig::new(16), planned()).unwrap()
    }

    #[test]
    fn shrink_order_micro_then_checkpointing_then_offload() {
        let mut c = ctl();
        let mut actions = Vec::new();
        for i in 0..8 {
            if let Some(d) = c.observe(i * 2_000, Level::Critical) {
                assert_eq!(d.after.micro_batch * d.after.accumulation, 16);
                actions.push(d.action);
            }
        }
        assert_eq!(
            actions,
            [
                Action::ShrinkMicroBatch { from: 8, to: 4 },
                Action::ShrinkMicroBatch { from: 4, to: 2 },
                Action::ShrinkMicroBatch { from: 2, to: 1 },
                Action::EnableCheckpointing,
                Action::EnableOffload,
                Action::Exhausted,
            ]
        );
        assert_eq!(c.current().accumulation, 16);
    }

    #[test]
    fn cooldown_spaces_shrinks() {
        let mut c = ctl();
        assert!(c.observe(0, Level::Critical).is_some());
        assert!(c.observe(1_000, Level::Critical).is_none());
        assert!(c.observe(2_000, Level::Critical).is_some());
    }

    #[test]
    fn elevated_waits_for_patience() {
        let mut c = ctl();
        assert!(c.observe(0, Level::Elevated).is_none());
        assert!(c.observe(9_999, Level::Elevated).is_none());
        let d = c.observe(10_000, Level::Elevated).unwrap();
        assert_eq!(d.action, Action::ShrinkMicroBatch { from: 8, to: 4 });
        assert!(c.observe(15_000, Level::Elevated).is_none());
        assert!(c.observe(20_000, Level::Elevated).is_some());
    }

    #[test]
    fn grows_back_after_stable_period_in_reverse_order() {
        let mut c = ctl();
        c.observe(0, Level::Critical);
        c.observe(2_000, Level::Critical);
        assert_eq!(c.current().micro_batch, 2);
        assert!(c.observe(3_000, Level::Normal).is_none());
        assert!(c.observe(62_999, Level::Normal).is_none());
        let d = c.observe(63_000, Level::Normal).unwrap();
        assert_eq!(d.action, Action::GrowMicroBatch { from: 2, to: 4 });
        let d = c.observe(123_000, Level::Normal).unwrap();
        assert_eq!(d.action, Action::GrowMicroBatch { from: 4, to: 8 });
        assert_eq!(c.current(), planned());
        // Never beyond the plan.
        assert!(c.observe(1_000_000, Level::Normal).is_none());
    }

    #[test]
    fn pressure_after_grow_doubles_the_stable_period() {
        let mut c = ctl();
        c.observe(0, Level::Critical);
        c.observe(1_000, Level::Normal);
        assert!(c.observe(61_000, Level::Normal).is_some()); // grow
        assert!(c.observe(70_000, Level::Critical).is_some()); // shrink again
        assert_eq!(c.stable_ms(), 120_000);
    }

    #[test]
    fn non_divisible_global_batch_uses_divisors() {
        let p = Strategy {
            micro_batch: 12,
            accumulation: 1,
            checkpointing: true,
            offload: OffloadKind::None,
        };
        let mut c = Controller::new(ControllerConfig::new(12), p).unwrap();
        let d = c.observe(0, Level::Critical).unwrap();
        assert_eq!(d.action, Action::ShrinkMicroBatch { from: 12, to: 6 });
        let d = c.observe(2_000, Level::Critical).unwrap();
        assert_eq!(d.action, Action::ShrinkMicroBatch { from: 6, to: 3 });
        let d = c.observe(4_000, Level::Critical).unwrap();
        assert_eq!(d.action, Action::ShrinkMicroBatch { from: 3, to: 1 });
        // Checkpointing was already on in the plan: offload is next.
        let d = c.observe(6_000, Level::Critical).unwrap();
        assert_eq!(d.action, Action::EnableOffload);
    }

    #[test]
    fn hints_block_grow_and_skip_cooldown() {
        let mut c = ctl();
        let now = Hints {
            immediate: true,
            ..Hints::default()
        };
        assert!(c.observe_with(0, Level::Critical, now).is_some());
        assert_eq!(c.peek_shrink().map(|s| s.micro_batch), Some(2));
        assert!(c.observe_with(0, Level::Critical, now).is_some());
        assert_eq!(c.current().micro_batch, 2);
        assert_eq!(c.peek_grow().map(|s| s.micro_batch), Some(4));
        let blocked = Hints {
            block_grow: true,
            ..Hints::default()
        };
        assert!(c.observe_with(1_000, Level::Normal, blocked).is_none());
        assert!(c.observe_with(100_000, Level::Normal, blocked).is_none());
        // The stable period counted while blocked: the first unblocked observation grows.
        let d = c.observe(100_001, Level::Normal).unwrap();
        assert_eq!(d.action, Action::GrowMicroBatch { from: 2, to: 4 });
    }

    #[test]
    fn probe_then_settle_grows_as_far_as_it_fits() {
        let mut c = ctl();
        let d = c.probe(0).unwrap();
        assert_eq!(d.action, Action::ShrinkMicroBatch { from: 8, to: 1 });
        assert_eq!((c.current().micro_batch, c.current().accumulation), (1, 16));
        let grown = c.settle(10, |s| s.micro_batch <= 4);
        let actions: Vec<Action> = grown.iter().map(|d| d.action).collect();
        assert_eq!(
            actions,
            [
                Action::GrowMicroBatch { from: 1, to: 2 },
                Action::GrowMicroBatch { from: 2, to: 4 },
            ]
        );
        assert_eq!(c.current().micro_batch * c.current().accumulation, 16);
        // The rest grows back after calm as usual, never beyond the plan.
        assert_eq!(c.peek_grow().map(|s| s.micro_batch), Some(8));
        assert_eq!(c.settle(20, |_| true).len(), 1);
        assert_eq!(c.current(), planned());
    }

    #[test]
    fn restricted_controller_skips_unavailable_steps() {
        let p = Strategy {
            micro_batch: 1,
            accumulation: 16,
            checkpointing: false,
            offload: OffloadKind::None,
        };
        let mut c = Controller::new(ControllerConfig::new(16), p).unwrap();
        c.restrict(false, true);
        assert_eq!(
            c.observe(0, Level::Critical).map(|d| d.action),
            Some(Action::EnableOffload)
        );
        c.restrict(false, false);
        assert_eq!(c.peek_shrink(), None);
    }

    #[test]
    fn invalid_plan_is_rejected() {
        let p = Strategy {
            micro_batch: 3,
            ..planned()
        };
        assert!(Controller::new(ControllerConfig::new(16), p).is_err());
    }
}
