//! Pressure levels with hysteresis.
//!
//! A [`Reading`] is what the controller needs from a [`crate::live::Sample`]: the fraction of
//! the memory ceiling in use, PSI stall percentages and whether the OOM killer or allocation
//! failures struck since the last reading. [`PressureDetector`] turns readings into a
//! [`Level`]:
//!
//! - it **rises at once** when any signal reaches the next level's *enter* threshold (an OOM
//!   event is always [`Level::Critical`]): reacting late costs a run;
//! - it **falls only** when every signal is below the current level's *exit* threshold (lower
//!   than the enter one) **and** the level has lasted at least `min_dwell_ms`: one quiet
//!   sample between two bursts does not make the controller grow back.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::live::{CgroupEvents, Sample};

/// How close to the ceiling the process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Comfortable.
    Normal,
    /// Getting close: do not grow, shrink if it lasts.
    Elevated,
    /// About to be killed or stalled: shrink now.
    Critical,
}

/// One observation for the detector.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// Monotonic time of the reading, milliseconds.
    pub at_ms: u64,
    /// Used bytes over the ceiling (`0.0..`, may exceed 1).
    pub used_fraction: f64,
    /// PSI `some` avg10, percent, when the kernel has PSI.
    pub psi_some_avg10: Option<f64>,
    /// PSI `full` avg10, percent.
    pub psi_full_avg10: Option<f64>,
    /// An OOM kill or failed allocation happened in the cgroup since the previous reading.
    pub oom_event: bool,
}

impl Reading {
    /// A reading from a live sample: `used / ceiling`, or the cgroup's working set (usage
    /// minus reclaimable page cache) over its limit, or the fullest GPU's used fraction,
    /// whichever is highest. `previous` are the event counters of the
    /// previous sample (to see new OOM events).
    pub fn from_sample(
        at_ms: u64,
        sample: &Sample,
        ceiling_bytes: u64,
        previous: Option<&CgroupEvents>,
    ) -> Reading {
        let mut used_fraction = match sample.used_bytes() {
            Some(u) if ceiling_bytes > 0 => u as f64 / ceiling_bytes as f64,
            _ => 0.0,
        };
        if let Some(c) = &sample.cgroup
            && let (Some(u), Some(l)) = (c.working_set(), c.limit.bytes())
            && l > 0
        {
            used_fraction = used_fraction.max(u as f64 / l as f64);
        }
        if let Some(g) = sample.gpu_used_fraction() {
            used_fraction = used_fraction.max(g);
        }
        let events = sample.cgroup.and_then(|c| c.events);
        let oom_event = match (events, previous) {
            (Some(now), Some(before)) => {
                now.oom > before.oom || now.oom_kill > before.oom_kill || now.under_oom
            }
            (Some(now), None) => now.under_oom,
            _ => false,
        };
        Reading {
            at_ms,
            used_fraction,
            psi_some_avg10: sample.psi.map(|p| p.some.avg10),
            psi_full_avg10: sample.psi.and_then(|p| p.full.map(|f| f.avg10)),
            oom_event,
        }
    }
}

/// Enter and exit thresholds. [`Thresholds::default`] documents the values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Used fraction that enters [`Level::Elevated`] (default 0.85).
    pub elevated_enter: f64,
    /// Used fraction below which Elevated may be left (default 0.75).
    pub elevated_exit: f64,
    /// Used fraction that enters [`Level::Critical`] (default 0.95).
    pub critical_enter: f64,
    /// Used fraction below which Critical may be left (default 0.88).
    pub critical_exit: f64,
    /// PSI `some` avg10 percent that enters Elevated (default 10).
    pub psi_some_enter: f64,
    /// PSI `some` avg10 below which Elevated may be left (default 5).
    pub psi_some_exit: f64,
    /// PSI `full` avg10 percent that enters Critical (default 10).
    pub psi_full_enter: f64,
    /// PSI `full` avg10 below which Critical may be left (default 2).
    pub psi_full_exit: f64,
    /// Shortest time in a level before falling to a lower one, ms (default 5000).
    pub min_dwell_ms: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            elevated_enter: 0.85,
            elevated_exit: 0.75,
            critical_enter: 0.95,
            critical_exit: 0.88,
            psi_some_enter: 10.0,
            psi_some_exit: 5.0,
            psi_full_enter: 10.0,
            psi_full_exit: 2.0,
            min_dwell_ms: 5_000,
        }
    }
}

impl Thresholds {
    /// Checks that each exit is below its enter and Elevated is below Critical.
    pub fn validate(&self) -> Result<()> {
        let pairs = [
            ("elevated_exit", self.elevated_exit, self.elevated_enter),
            ("critical_exit", self.critical_exit, self.critical_enter),
            ("psi_some_exit", self.psi_some_exit, self.psi_some_enter),
            ("psi_full_exit", self.psi_full_exit, self.psi_full_enter),
            ("elevated_enter", self.elevated_enter, self.critical_enter),
            ("elevated_exit", self.elevated_exit, self.critical_exit),
        ];
        for (field, lo, hi) in pairs {
            if !(lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo < hi) {
                return Err(Error::Invalid {
                    what: "pressure thresholds",
                    field,
                    reason: format!("({lo}) must be finite, non-negative and below {hi}"),
                });
            }
        }
        Ok(())
    }

    /// The level the reading reaches on the way up (enter thresholds).
    fn enter_level(&self, r: &Reading) -> Level {
        let ge = |v: Option<f64>, t: f64| v.is_some_and(|v| v >= t);
        if r.oom_event
            || r.used_fraction >= self.critical_enter
            || ge(r.psi_full_avg10, self.psi_full_enter)
        {
            Level::Critical
        } else if r.used_fraction >= self.elevated_enter
            || ge(r.psi_some_avg10, self.psi_some_enter)
        {
            Level::Elevated
        } else {
            Level::Normal
        }
    }

    /// The lowest level the reading allows on the way down (exit thresholds).
    fn hold_level(&self, r: &Reading) -> Level {
        let ge = |v: Option<f64>, t: f64| v.is_some_and(|v| v >= t);
        if r.oom_event
            || r.used_fraction >= self.critical_exit
            || ge(r.psi_full_avg10, self.psi_full_exit)
        {
            Level::Critical
        } else if r.used_fraction >= self.elevated_exit || ge(r.psi_some_avg10, self.psi_some_exit)
        {
            Level::Elevated
        } else {
            Level::Normal
        }
    }
}

/// Turns readings into levels with hysteresis and a minimum dwell time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PressureDetector {
    thresholds: Thresholds,
    level: Level,
    since_ms: u64,
}

impl PressureDetector {
    /// A detector starting at [`Level::Normal`] at time 0.
    pub fn new(thresholds: Thresholds) -> Result<PressureDetector> {
        thresholds.validate()?;
        Ok(PressureDetector {
            thresholds,
            level: Level::Normal,
            since_ms: 0,
        })
    }

    /// The current level.
    pub fn level(&self) -> Level {
        self.level
    }

    /// Since when (ms) the current level holds.
    pub fn since_ms(&self) -> u64 {
        self.since_ms
    }

    /// Feeds one reading; returns the level after it.
    pub fn observe(&mut self, r: &Reading) -> Level {
        let up = self.thresholds.enter_level(r);
        let hold = self.thresholds.hold_level(r);
        if up > self.level {
            self.level = up;
            self.since_ms = r.at_ms;
        } else if hold < self.level
            && r.at_ms.saturating_sub(self.since_ms) >= self.thresholds.min_dwell_ms
        {
            self.level = hold;
            self.since_ms = r.at_ms;
        }
        self.level
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(at_ms: u64, used: f64) -> Reading {
        Reading {
            at_ms,
            used_fraction: used,
            psi_some_avg10: None,
            psi_full_avg10: None,
            oom_event: false,
        }
    }

    fn run(readings: &[Reading]) -> Vec<Level> {
        let mut d = PressureDetector::new(Thresholds::default()).unwrap();
        readings.iter().map(|x| d.observe(x)).collect()
    }

    use Level::*;

    #[test]
    fn rises_immediately() {
        assert_eq!(
            run(&[r(0, 0.5), r(100, 0.86), r(200, 0.96)]),
            [Normal, Elevated, Critical]
        );
        assert_eq!(run(&[r(0, 0.2), r(1, 0.99)]), [Normal, Critical]);
    }

    #[test]
    fn falls_only_below_exit_threshold() {
        // 0.80 is below enter (0.85) but above exit (0.75): stays Elevated.
        let l = run(&[r(0, 0.9), r(10_000, 0.80), r(20_000, 0.76), r(30_000, 0.74)]);
        assert_eq!(l, [Elevated, Elevated, Elevated, Normal]);
    }

    #[test]
    fn falls_only_after_min_dwell() {
        let l = run(&[r(0, 0.9), r(1_000, 0.1), r(4_999, 0.1), r(5_000, 0.1)]);
        assert_eq!(l, [Elevated, Elevated, Elevated, Normal]);
    }

    #[test]
    fn critical_falls_to_elevated_then_normal() {
        let l = run(&[
            r(0, 0.97),
            r(6_000, 0.80), // below critical exit, above elevated exit
            r(7_000, 0.50), // dwell in Elevated not over yet
            r(11_000, 0.50),
        ]);
        assert_eq!(l, [Critical, Elevated, Elevated, Normal]);
    }

    #[test]
    fn critical_can_fall_straight_to_normal() {
        assert_eq!(run(&[r(0, 0.97), r(6_000, 0.1)]), [Critical, Normal]);
    }

    #[test]
    fn oscillation_around_enter_does_not_flap() {
        let seq: Vec<Reading> = (0..20)
            .map(|i| r(i * 500, if i % 2 == 0 { 0.86 } else { 0.84 }))
            .collect();
        assert!(run(&seq).iter().all(|l| *l == Elevated));
    }

    #[test]
    fn psi_and_oom_signals() {
        let mut a = r(0, 0.1);
        a.psi_some_avg10 = Some(12.0);
        let mut b = r(100, 0.1);
        b.psi_full_avg10 = Some(15.0);
        assert_eq!(run(&[a, b]), [Elevated, Critical]);
        let mut c = r(0, 0.1);
        c.oom_event = true;
        assert_eq!(run(&[c]), [Critical]);
        // PSI full above its exit keeps Critical even when usage dropped.
        let mut d = r(10_000, 0.1);
        d.psi_full_avg10 = Some(3.0);
        assert_eq!(run(&[c, d]), [Critical, Critical]);
    }

    #[test]
    fn bad_thresholds_are_rejected() {
        let t = Thresholds {
            elevated_exit: 0.9,
            ..Thresholds::default()
        };
        assert!(PressureDetector::new(t).is_err());
        let t = Thresholds {
            critical_enter: 0.8,
            ..Thresholds::default()
        };
        assert!(PressureDetector::new(t).is_err());
    }
}
