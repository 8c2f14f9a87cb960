//! The memory guard: the [`Controller`] inside a training loop.
//!
//! [`MemoryGuard::poll`] runs between two optimizer steps. It reads the process and its
//! cgroup ([`Sampler`]), and decides with two signals:
//!
//! - **Projected** (acts at once): the bytes the *next* step needs — the other processes of
//!   the cgroup ([`Sample::others_bytes`]: a memory hog, another job) plus this process's
//!   peak for the current strategy — against the usable budget (ceiling − reserve). The
//!   peak is the memory model's prediction ([`GuardConfig::predicted`]) or, when larger, the
//!   peak RSS measured over the last step that ran the strategy (`VmHWM`, reset after every
//!   step through `/proc/self/clear_refs`), and for a strategy not run yet the prediction
//!   scaled by the last measured/predicted ratio (at most ×1.5). While the projection does
//!   not fit, the controller shrinks without waiting for its cooldown (the effect is
//!   predicted, not awaited), so the step that would have been OOM-killed never runs.
//! - **Measured** (with hysteresis): the cgroup's working set over the ceiling, PSI and new
//!   OOM events through the [`PressureDetector`]; before a high reading counts, the
//!   allocator's free memory is handed back to the kernel ([`live::release_free_memory`]),
//!   since memory freed by candle but kept by `malloc` is charged to the cgroup all the same.
//!
//! Growing back is gated by the projection too: the controller only undoes a shrink after
//! its stable period *and* when the larger strategy's projected peak leaves the planner's
//! headroom. After every shrink the allocator's free memory is released.
//!
//! The guard's clock continues across a resume: [`GuardState`] (saved in checkpoints)
//! holds the controller, the detector, the measured peaks, every decision and the clock.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::controller::{Action, Controller, ControllerConfig, Decision, Hints};
use crate::error::{Error, Result};
use crate::live::{self, CgroupEvents, Sample, Sampler};
use crate::planner::{Plan, Strategy};
use crate::pressure::{Level, PressureDetector, Reading, Thresholds};

/// Decisions kept in [`GuardState::decisions`] (the most recent ones).
pub const KEPT_DECISIONS: usize = 256;

/// Largest factor a measured peak may scale the prediction of a strategy not run yet.
const MAX_CALIBRATION: f64 = 3.0;

/// Settings of a [`MemoryGuard`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuardConfig {
    /// The controller's settings (global batch, allowed steps, timings).
    pub controller: ControllerConfig,
    /// Pressure thresholds of the measured signal.
    pub thresholds: Thresholds,
    /// Bytes the measured usage is compared with: `min(effective × budget_fraction,
    /// memory.limit)`.
    pub ceiling: u64,
    /// Bytes the projected peak may reach: the ceiling minus the emergency-checkpoint
    /// reserve (the planner's usable budget).
    pub usable: u64,
    /// Fraction of `usable` a grown-back strategy must leave free (the planner's headroom).
    pub headroom: f64,
    /// Predicted peak bytes of this process per strategy (from [`crate::plan`]'s model).
    pub predicted: Vec<(Strategy, u64)>,
    /// Run the first step at micro-batch 1 and grow to the plan only as far as the
    /// measured peak allows ([`Controller::probe`]): the model's prediction is checked
    /// before a large micro-batch can be OOM-killed.
    #[serde(default)]
    pub probe: bool,
}

impl GuardConfig {
    /// Settings from a plan: its budget, headroom `headroom`, and the predicted peak of
    /// every candidate plus `extra` predictions (strategies the configuration does not
    /// offer at start but the controller may reach).
    pub fn from_plan(
        plan: &Plan,
        controller: ControllerConfig,
        headroom: f64,
        extra: &[(Strategy, u64)],
    ) -> GuardConfig {
        let mut predicted: Vec<(Strategy, u64)> = plan
            .candidates
            .iter()
            .map(|c| (c.strategy, c.estimate.peak.0))
            .collect();
        for e in extra {
            if !predicted.iter().any(|(s, _)| *s == e.0) {
                predicted.push(*e);
            }
        }
        GuardConfig {
            controller,
            thresholds: Thresholds::default(),
            ceiling: plan.budget.usable.0 + plan.budget.reserve.0,
            usable: plan.budget.usable.0,
            headroom,
            predicted,
            probe: false,
        }
    }

    fn validate(&self) -> Result<()> {
        self.thresholds.validate()?;
        if self.usable == 0 || self.usable > self.ceiling {
            return Err(Error::Invalid {
                what: "memory guard",
                field: "usable",
                reason: format!(
                    "must be positive and at most the ceiling ({} bytes), found {}",
                    self.ceiling, self.usable
                ),
            });
        }
        if !(0.0..1.0).contains(&self.headroom) {
            return Err(Error::Invalid {
                what: "memory guard",
                field: "headroom",
                reason: format!("must be in [0, 1), found {}", self.headroom),
            });
        }
        Ok(())
    }
}

/// What the guard saves in checkpoints and restores on resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuardState {
    /// The controller (current strategy, undo stack, timers).
    pub controller: Controller,
    /// The pressure detector (level and since when).
    pub detector: PressureDetector,
    /// The guard's clock when saved, ms; a resumed guard continues from it.
    pub clock_ms: u64,
    /// Peak RSS measured per strategy (the last step that ran it), bytes.
    pub observed: Vec<(Strategy, u64)>,
    /// The last measured/predicted peak ratio (≥ 1), used for strategies not run yet.
    pub calibration: f64,
    /// The decisions taken, the most recent [`KEPT_DECISIONS`].
    pub decisions: Vec<Decision>,
    /// A probe step is running (see [`GuardConfig::probe`]).
    #[serde(default)]
    pub probing: bool,
}

/// The result of one [`MemoryGuard::poll`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Poll {
    /// The guard's clock, ms.
    pub at_ms: u64,
    /// The measured reading.
    pub reading: Reading,
    /// The level after the detector.
    pub level: Level,
    /// Bytes held by the other processes of the cgroup.
    pub others: u64,
    /// Projected bytes of the next step (others + this process's peak) for the strategy
    /// now in force.
    pub projected: u64,
    /// Decisions taken in this poll (empty most of the time).
    pub decisions: Vec<Decision>,
}

/// The controller in the loop; see the module documentation.
pub struct MemoryGuard {
    cfg: GuardConfig,
    sampler: Sampler,
    state: GuardState,
    started: Instant,
    offset_ms: u64,
    last_events: Option<CgroupEvents>,
    last_run: Option<Strategy>,
    peak_reset: bool,
    /// Decisions taken outside a poll (the probe), reported by the next one.
    pending: Vec<Decision>,
}

impl std::fmt::Debug for MemoryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryGuard")
            .field("cfg", &self.cfg)
            .field("sampler", &self.sampler)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl MemoryGuard {
    /// A guard starting from `planned`, reading through `sampler`.
    pub fn new(cfg: GuardConfig, sampler: Sampler, planned: Strategy) -> Result<MemoryGuard> {
        cfg.validate()?;
        let mut controller = Controller::new(cfg.controller, planned)?;
        let detector = PressureDetector::new(cfg.thresholds)?;
        let peak_reset = live::reset_peak(sampler.root());
        let probe = if cfg.probe && peak_reset {
            controller.probe(0)
        } else {
            None
        };
        Ok(MemoryGuard {
            sampler,
            state: GuardState {
                controller,
                detector,
                clock_ms: 0,
                observed: Vec::new(),
                calibration: 1.0,
                probing: probe.is_some(),
                decisions: probe.into_iter().collect(),
            },
            pending: probe.into_iter().collect(),
            started: Instant::now(),
            offset_ms: 0,
            last_events: None,
            last_run: None,
            peak_reset,
            cfg,
        })
    }

    /// The settings.
    pub fn config(&self) -> &GuardConfig {
        &self.cfg
    }

    /// The strategy to run now.
    pub fn current(&self) -> Strategy {
        self.state.controller.current()
    }

    /// Forbids steps the job cannot take (see [`Controller::restrict`]).
    pub fn restrict(&mut self, allow_checkpointing: bool, allow_offload: bool) {
        self.state
            .controller
            .restrict(allow_checkpointing, allow_offload);
        self.cfg.controller = *self.state.controller.config();
    }

    /// The guard's clock, ms (continues across a resume).
    pub fn now_ms(&self) -> u64 {
        self.offset_ms
            .saturating_add(u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// The state to save in a checkpoint.
    pub fn state(&self) -> GuardState {
        GuardState {
            clock_ms: self.now_ms(),
            ..self.state.clone()
        }
    }

    /// Continues from a saved state: same strategy, timers, measured peaks and decisions.
    /// A state for another global batch is refused (the configuration changed).
    pub fn restore(&mut self, state: GuardState) -> Result<()> {
        let saved = state.controller.config().global_sequences;
        let now = self.cfg.controller.global_sequences;
        if saved != now {
            return Err(Error::Invalid {
                what: "memory guard state",
                field: "global_sequences",
                reason: format!(
                    "the checkpoint's controller runs a global batch of {saved} sequences, the configuration {now}"
                ),
            });
        }
        let (ckpt, off) = (
            self.cfg.controller.allow_checkpointing,
            self.cfg.controller.allow_offload,
        );
        self.offset_ms = state.clock_ms;
        self.started = Instant::now();
        self.state = state;
        self.state.controller.restrict(ckpt, off);
        self.last_run = None;
        self.last_events = None;
        self.pending.clear();
        Ok(())
    }

    /// The predicted peak of `s` for this process, corrected by what was measured.
    pub fn own_peak(&self, s: &Strategy) -> u64 {
        let predicted = self
            .cfg
            .predicted
            .iter()
            .find(|(p, _)| p == s)
            .map(|(_, b)| *b)
            .unwrap_or(0);
        match self.state.observed.iter().find(|(p, _)| p == s) {
            Some((_, measured)) => predicted.max(*measured),
            None => (predicted as f64 * self.state.calibration) as u64,
        }
    }

    fn record_peak(&mut self, s: Strategy, hwm: u64) {
        match self.state.observed.iter_mut().find(|(p, _)| *p == s) {
            Some(e) => e.1 = hwm,
            None => self.state.observed.push((s, hwm)),
        }
        let predicted = self
            .cfg
            .predicted
            .iter()
            .find(|(p, _)| *p == s)
            .map(|(_, b)| *b);
        if let Some(p) = predicted.filter(|p| *p > 0) {
            self.state.calibration = (hwm as f64 / p as f64).clamp(1.0, MAX_CALIBRATION);
        }
    }

    fn read(&mut self, at_ms: u64) -> Result<(Sample, Reading)> {
        let mut sample = self.sampler.sample()?;
        let mut reading = Reading::from_sample(at_ms, &sample, self.cfg.ceiling, None);
        if reading.used_fraction >= self.cfg.thresholds.elevated_enter && self.is_host() {
            // Memory freed by the last step but kept by the allocator counts against the
            // cgroup all the same: hand it back before judging the pressure.
            live::release_free_memory();
            sample = self.sampler.sample()?;
        }
        reading = Reading::from_sample(at_ms, &sample, self.cfg.ceiling, self.last_events.as_ref());
        Ok((sample, reading))
    }

    fn is_host(&self) -> bool {
        self.sampler.root().is_host()
    }

    /// Reads memory and decides; call it between optimizer steps, then run the step with
    /// [`MemoryGuard::current`].
    pub fn poll(&mut self) -> Result<Poll> {
        let at_ms = self.now_ms();
        let (sample, reading) = self.read(at_ms)?;
        if let (Some(run), Some(p)) = (self.last_run, sample.process)
            && self.peak_reset
        {
            self.record_peak(run, p.hwm);
        }
        if self.peak_reset {
            self.peak_reset = live::reset_peak(self.sampler.root());
        }
        self.last_events = sample.cgroup.and_then(|c| c.events).or(self.last_events);
        let level = self.state.detector.observe(&reading);
        let others = sample.others_bytes();
        let mut decisions = std::mem::take(&mut self.pending);
        let reported = decisions.len();
        if self.state.probing && self.last_run.is_some() {
            // The probe step ran: grow as far as the measured peak allows.
            self.state.probing = false;
            let room = (self.cfg.usable as f64 * (1.0 - self.cfg.headroom)) as u64;
            let peaks: Vec<(Strategy, u64)> = self
                .cfg
                .predicted
                .iter()
                .map(|(s, _)| (*s, self.own_peak(s)))
                .collect();
            let fits = |s: &Strategy| {
                peaks
                    .iter()
                    .find(|(p, _)| p == s)
                    .is_some_and(|(_, b)| others.saturating_add(*b) <= room)
            };
            decisions.extend(self.state.controller.settle(at_ms, fits));
            tracing::info!(
                calibration = self.state.calibration,
                strategy = %self.state.controller.current(),
                "memory guard: probe step measured, settled"
            );
        }
        // The next step must fit: shrink now, as far as needed.
        loop {
            let cur = self.state.controller.current();
            if others.saturating_add(self.own_peak(&cur)) <= self.cfg.usable {
                break;
            }
            let hints = Hints {
                block_grow: true,
                immediate: true,
            };
            match self
                .state
                .controller
                .observe_with(at_ms, Level::Critical, hints)
            {
                Some(d) => {
                    decisions.push(d);
                    if d.action == Action::Exhausted {
                        break;
                    }
                }
                None => break,
            }
        }
        if decisions.is_empty() {
            let room = (self.cfg.usable as f64 * (1.0 - self.cfg.headroom)) as u64;
            let block_grow = self
                .state
                .controller
                .peek_grow()
                .is_some_and(|g| others.saturating_add(self.own_peak(&g)) > room);
            let hints = Hints {
                block_grow,
                immediate: false,
            };
            if let Some(d) = self.state.controller.observe_with(at_ms, level, hints) {
                decisions.push(d);
            }
        }
        let shrunk = decisions.iter().any(|d| {
            matches!(
                d.action,
                Action::ShrinkMicroBatch { .. }
                    | Action::EnableCheckpointing
                    | Action::EnableOffload
            )
        });
        if shrunk && self.is_host() {
            live::release_free_memory();
        }
        self.state
            .decisions
            .extend(decisions.iter().skip(reported).copied());
        let excess = self.state.decisions.len().saturating_sub(KEPT_DECISIONS);
        self.state.decisions.drain(..excess);
        let cur = self.state.controller.current();
        self.last_run = Some(cur);
        let projected = others.saturating_add(self.own_peak(&cur));
        tracing::debug!(
            level = ?level,
            used_fraction = reading.used_fraction,
            others,
            projected,
            usable = self.cfg.usable,
            micro_batch = cur.micro_batch,
            "memory guard poll"
        );
        Ok(Poll {
            at_ms,
            reading,
            level,
            others,
            projected,
            decisions,
        })
    }
}
