//! The planner: from a budget and a global batch, the strategies that fit and the one to run.
//!
//! A *strategy* is a micro-batch size (a divisor of the global batch in sequences, so
//! micro-batch × accumulation is exactly the global batch), activation checkpointing on or
//! off, and optimizer offload none or disk. [`plan`] predicts the peak of each with the
//! [`MemoryModel`] and a relative throughput with [`SpeedModel`], keeps those whose peak is
//! within the [`Budget`], and chooses the fastest that also leaves [`PlanRequest::headroom`].
//! When nothing fits, [`Error::DoesNotFit`] says by how much and what would help.

use std::fmt;

use eg_config::wire::Toggle;
use eg_config::{Bytes, MemoryConfig};
use eg_hardware::HardwareReport;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, Suggestion};
use crate::footprint::{
    Adapters, BaseFormat, Estimate, MemoryModel, ModelProfile, OffloadKind, Optimizer, Precision,
    Setup,
};

/// The memory a run may use, and how it was derived.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// Effective memory of the machine/cgroup (eg-hardware's `effective_limit_bytes`), when
    /// known.
    pub effective: Option<Bytes>,
    /// `memory.budget_fraction`.
    pub fraction: f64,
    /// `memory.limit`, an absolute cap.
    pub limit: Option<Bytes>,
    /// `memory.reserve`, kept free for an emergency checkpoint.
    pub reserve: Bytes,
    /// What the plan may use: `min(effective × fraction, limit) − reserve`.
    pub usable: Bytes,
}

impl Budget {
    /// `min(effective × fraction, limit) − reserve`. Either `effective` or `limit` must be
    /// known; the reserve must leave something.
    pub fn new(
        effective: Option<Bytes>,
        fraction: f64,
        limit: Option<Bytes>,
        reserve: Bytes,
    ) -> Result<Budget> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(Error::Invalid {
                what: "budget",
                field: "budget_fraction",
                reason: format!("must be in (0, 1], found {fraction}"),
            });
        }
        let scaled = effective.map(|e| Bytes((e.0 as f64 * fraction) as u64));
        let before = match (scaled, limit) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => {
                return Err(Error::BudgetUnknown {
                    reason:
                        "the effective memory (MemTotal and the cgroup limit) could not be read"
                            .into(),
                });
            }
        };
        if reserve >= before {
            return Err(Error::ReserveTooLarge {
                reserve,
                budget: before,
            });
        }
        Ok(Budget {
            effective,
            fraction,
            limit,
            reserve,
            usable: Bytes(before.0 - reserve.0),
        })
    }

    /// The budget from a hardware report (cgroup aware) and the `[memory]` section.
    pub fn from_config(report: &HardwareReport, memory: &MemoryConfig) -> Result<Budget> {
        Budget::new(
            report.memory.effective_limit_bytes.map(Bytes),
            memory.budget_fraction.get(),
            memory.limit,
            memory.reserve,
        )
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::HumanBytes as H;
        match self.effective {
            Some(e) => write!(
                f,
                "{} = {} effective × {}",
                H::from(self.usable),
                H::from(e),
                self.fraction
            )?,
            None => write!(f, "{} = memory.limit", H::from(self.usable))?,
        }
        if let (Some(l), Some(_)) = (self.limit, self.effective) {
            write!(f, " capped at memory.limit {}", H::from(l))?;
        }
        write!(f, " − reserve {}", H::from(self.reserve))
    }
}

/// Which offload settings the planner may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffloadChoice {
    /// Either; disk only when it is needed to fit (it is never faster).
    Auto,
    /// Optimizer state stays in RAM.
    None,
    /// Optimizer state is on disk.
    Disk,
}

impl OffloadChoice {
    /// From the configuration: `none` lets the planner add disk offload when nothing else
    /// fits (`none` is the default and cannot be told apart from an explicit choice); `ram`
    /// is the same as `none` for a CPU run; `disk` forces disk.
    pub fn from_config(o: &eg_config::Offload) -> OffloadChoice {
        match o {
            eg_config::Offload::Disk(_) => OffloadChoice::Disk,
            _ => OffloadChoice::Auto,
        }
    }
}

/// What to plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanRequest {
    /// The network.
    pub profile: ModelProfile,
    /// Compute precision.
    pub precision: Precision,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// Full fine-tuning or LoRA/QLoRA.
    pub adapters: Adapters,
    /// Tokens per optimizer step.
    pub global_tokens: u64,
    /// Tokens per sequence.
    pub seq_len: u32,
    /// A fixed micro-batch (`train.batch.micro_batch`), or `None` to choose.
    pub micro_batch: Option<u32>,
    /// Activation checkpointing: `auto` tries both.
    pub checkpointing: Toggle,
    /// Offload.
    pub offload: OffloadChoice,
    /// Fraction of the budget the chosen strategy leaves free (default 0.1) for what the
    /// model does not predict.
    pub headroom: f64,
}

impl PlanRequest {
    /// The default [`PlanRequest::headroom`]: 10 % of the budget left free.
    pub const DEFAULT_HEADROOM: f64 = 0.1;

    /// A request from the validated configuration: `train.batch` (global tokens, fixed
    /// micro-batch), `data.seq_len`, `train.precision.compute` (`auto` resolved with the
    /// CPU's features), `train.optimizer`, `[model.lora]` and `model.quantization`,
    /// `memory.activation_checkpointing` and `memory.offload`.
    pub fn from_config(
        config: &eg_config::Config,
        profile: ModelProfile,
        cpu_features: &[String],
    ) -> PlanRequest {
        PlanRequest {
            profile,
            precision: Precision::from_config(config.train.precision.compute, cpu_features),
            optimizer: Optimizer::from_config(&config.train.optimizer),
            adapters: Adapters::from_config(&config.model),
            global_tokens: config.train.batch.global_tokens.0,
            seq_len: config.data.seq_len.0,
            micro_batch: config.train.batch.micro_batch.map(|m| m.get()),
            checkpointing: config.memory.activation_checkpointing,
            offload: OffloadChoice::from_config(&config.memory.offload),
            headroom: Self::DEFAULT_HEADROOM,
        }
    }

    /// Global batch in sequences: `global_tokens / seq_len`, which must be whole.
    pub fn global_sequences(&self) -> Result<u32> {
        let bad = |reason| Error::InvalidBatch {
            global_tokens: self.global_tokens,
            seq_len: self.seq_len,
            reason,
        };
        if self.seq_len == 0 {
            return Err(bad("seq_len must be positive"));
        }
        let s = u64::from(self.seq_len);
        if self.global_tokens < s {
            return Err(bad("the global batch is shorter than one sequence"));
        }
        if !self.global_tokens.is_multiple_of(s) {
            return Err(bad("the global batch is not a whole number of sequences"));
        }
        u32::try_from(self.global_tokens / s).map_err(|_| bad("too many sequences per step"))
    }
}

impl PlanRequest {
    /// The predicted peak of every strategy the controller can reach: each micro-batch
    /// dividing the global batch (from 1 to the fixed or largest one) × checkpointing
    /// off/on × offload none/disk, whatever the request allows at start.
    pub fn estimate_all(&self, model: &MemoryModel) -> Result<Vec<(Strategy, Bytes)>> {
        let g = self.global_sequences()?;
        let top = self.micro_batch.unwrap_or(g);
        let mut out = Vec::new();
        for m in divisors(g).into_iter().filter(|m| *m <= top) {
            for checkpointing in [false, true] {
                for offload in [OffloadKind::None, OffloadKind::Disk] {
                    let strategy = Strategy {
                        micro_batch: m,
                        accumulation: g / m,
                        checkpointing,
                        offload,
                    };
                    let e = model.estimate(&self.profile, &setup_of(self, &strategy))?;
                    out.push((strategy, e.peak));
                }
            }
        }
        Ok(out)
    }
}

/// Constants of the relative-throughput model. [`SpeedModel::default`] holds the documented
/// values; `gflops` and the disk bandwidths come from eg-hardware's probes when measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SpeedModel {
    /// Sustained training GFLOP/s; `None` assumes [`SpeedModel::ASSUMED_GFLOPS`].
    pub gflops: Option<f64>,
    /// Disk read MB/s for offloaded state; `None` assumes [`SpeedModel::ASSUMED_DISK_MB_S`].
    pub disk_read_mb_s: Option<f64>,
    /// Disk write MB/s; `None` assumes [`SpeedModel::ASSUMED_DISK_MB_S`].
    pub disk_write_mb_s: Option<f64>,
    /// Per-micro-batch fixed cost, in tokens of work: efficiency is `n / (n + this)`.
    pub micro_batch_overhead_tokens: f64,
}

impl SpeedModel {
    /// Assumed compute when unmeasured: 50 GFLOP/s (a few CPU cores).
    pub const ASSUMED_GFLOPS: f64 = 50.0;
    /// Assumed disk bandwidth when unmeasured: 500 MB/s (a SATA SSD).
    pub const ASSUMED_DISK_MB_S: f64 = 500.0;

    /// From a hardware report: the best measured GEMM figure and the first storage
    /// bandwidth, when probed.
    pub fn from_report(report: &HardwareReport) -> SpeedModel {
        let gflops = report.capacity.as_ref().and_then(|c| {
            c.gemm
                .iter()
                .filter_map(|g| g.gflops)
                .fold(None, |a: Option<f64>, g| Some(a.map_or(g, |a| a.max(g))))
        });
        let bw = report.storage.iter().find_map(|s| s.bandwidth.as_ref());
        SpeedModel {
            gflops,
            disk_read_mb_s: bw.map(|b| b.read_mb_s),
            disk_write_mb_s: bw.map(|b| b.write_mb_s),
            ..SpeedModel::default()
        }
    }

    /// Whether any figure is assumed rather than measured.
    pub fn assumed(&self) -> bool {
        self.gflops.is_none() || self.disk_read_mb_s.is_none() || self.disk_write_mb_s.is_none()
    }

    /// Micro-batch efficiency for `tokens` per micro-batch.
    fn efficiency(&self, tokens: f64) -> f64 {
        tokens / (tokens + self.micro_batch_overhead_tokens.max(0.0))
    }
}

impl Default for SpeedModel {
    /// Nothing measured; 256 tokens of fixed cost per micro-batch.
    fn default() -> Self {
        SpeedModel {
            gflops: None,
            disk_read_mb_s: None,
            disk_write_mb_s: None,
            micro_batch_overhead_tokens: 256.0,
        }
    }
}

/// One way to run the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Strategy {
    /// Sequences per micro-batch.
    pub micro_batch: u32,
    /// Micro-batches per optimizer step.
    pub accumulation: u32,
    /// Activation checkpointing.
    pub checkpointing: bool,
    /// Optimizer-state offload.
    pub offload: OffloadKind,
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "micro-batch {} × {} accumulation, checkpointing {}, offload {}",
            self.micro_batch,
            self.accumulation,
            if self.checkpointing { "on" } else { "off" },
            self.offload
        )
    }
}

/// A strategy with its prediction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The strategy.
    pub strategy: Strategy,
    /// Predicted memory.
    pub estimate: Estimate,
    /// Throughput relative to the ideal (largest micro-batch, no recompute, no I/O): in
    /// (0, 1].
    pub relative_throughput: f64,
    /// Predicted seconds per optimizer step (with the [`SpeedModel`]'s figures).
    pub step_seconds: f64,
    /// Whether the peak is within the budget.
    pub fits: bool,
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The budget planned against.
    pub budget: Budget,
    /// Global batch in sequences.
    pub global_sequences: u32,
    /// Every strategy evaluated, fastest first.
    pub candidates: Vec<Candidate>,
    /// The chosen strategy.
    pub chosen: Candidate,
    /// Whether the choice leaves less than the requested headroom (nothing fitting did).
    pub tight: bool,
    /// Whether throughput figures rest on assumed rather than measured hardware speeds.
    pub assumed_speeds: bool,
}

impl Plan {
    /// The strategies that fit, fastest first.
    pub fn fitting(&self) -> impl Iterator<Item = &Candidate> {
        self.candidates.iter().filter(|c| c.fits)
    }
}

/// Divisors of `n`, ascending.
pub fn divisors(n: u32) -> Vec<u32> {
    let mut small = Vec::new();
    let mut large = Vec::new();
    let mut d = 1u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            small.push(d);
            if d != n / d {
                large.push(n / d);
            }
        }
        d += 1;
    }
    small.extend(large.into_iter().rev());
    small
}

fn setup_of(req: &PlanRequest, st: &Strategy) -> Setup {
    Setup {
        precision: req.precision,
        optimizer: req.optimizer,
        adapters: req.adapters,
        seq_len: req.seq_len,
        micro_batch: st.micro_batch,
        accumulation: st.accumulation,
        checkpointing: st.checkpointing,
        offload: st.offload,
    }
}

/// Seconds per optimizer step of `st`: compute (3 forwards per token, 4 with checkpointing's
/// recompute) divided by the micro-batch efficiency, plus offload I/O (read and write back
/// all optimizer state once per step, not overlapped: a conservative bound).
fn step_seconds(
    req: &PlanRequest,
    model: &MemoryModel,
    speed: &SpeedModel,
    st: &Strategy,
    global_sequences: u32,
) -> f64 {
    let tokens = f64::from(global_sequences) * f64::from(req.seq_len);
    let fwd = req.profile.forward_flops(u64::from(req.seq_len)) as f64;
    let passes = if st.checkpointing { 4.0 } else { 3.0 };
    let gflops = speed.gflops.unwrap_or(SpeedModel::ASSUMED_GFLOPS).max(1e-9);
    let micro_tokens = f64::from(st.micro_batch) * f64::from(req.seq_len);
    let compute = tokens * fwd * passes / (gflops * 1e9) / speed.efficiency(micro_tokens);
    let io = match st.offload {
        OffloadKind::None => 0.0,
        OffloadKind::Disk => {
            let state = model.optimizer_state_bytes(&req.profile, &setup_of(req, st)) as f64;
            let r = speed
                .disk_read_mb_s
                .unwrap_or(SpeedModel::ASSUMED_DISK_MB_S)
                .max(1e-9);
            let w = speed
                .disk_write_mb_s
                .unwrap_or(SpeedModel::ASSUMED_DISK_MB_S)
                .max(1e-9);
            state / (r * 1e6) + state / (w * 1e6)
        }
    };
    compute + io
}

/// Evaluates every allowed strategy and chooses one. Errors when the request is invalid or
/// nothing fits ([`Error::DoesNotFit`], with suggestions).
pub fn plan(
    req: &PlanRequest,
    budget: &Budget,
    model: &MemoryModel,
    speed: &SpeedModel,
) -> Result<Plan> {
    req.profile.validate()?;
    if !(0.0..1.0).contains(&req.headroom) {
        return Err(Error::Invalid {
            what: "plan request",
            field: "headroom",
            reason: format!("must be in [0, 1), found {}", req.headroom),
        });
    }
    let g = req.global_sequences()?;
    let micro_batches = match req.micro_batch {
        Some(m) if m == 0 || !g.is_multiple_of(m) => {
            return Err(Error::InvalidBatch {
                global_tokens: req.global_tokens,
                seq_len: req.seq_len,
                reason: "train.batch.micro_batch does not divide the global batch in sequences",
            });
        }
        Some(m) => vec![m],
        None => divisors(g),
    };
    let ckpts: &[bool] = match req.checkpointing {
        Toggle::On => &[true],
        Toggle::Off => &[false],
        _ => &[false, true],
    };
    let offloads: &[OffloadKind] = match req.offload {
        OffloadChoice::None => &[OffloadKind::None],
        OffloadChoice::Disk => &[OffloadKind::Disk],
        OffloadChoice::Auto => &[OffloadKind::None, OffloadKind::Disk],
    };
    let ideal = Strategy {
        micro_batch: g,
        accumulation: 1,
        checkpointing: false,
        offload: OffloadKind::None,
    };
    let ideal_seconds = step_seconds(req, model, speed, &ideal, g);

    let mut candidates = Vec::new();
    for &m in &micro_batches {
        for &checkpointing in ckpts {
            for &offload in offloads {
                let strategy = Strategy {
                    micro_batch: m,
                    accumulation: g / m,
                    checkpointing,
                    offload,
                };
                let estimate = model.estimate(&req.profile, &setup_of(req, &strategy))?;
                let secs = step_seconds(req, model, speed, &strategy, g);
                candidates.push(Candidate {
                    strategy,
                    estimate,
                    relative_throughput: if secs > 0.0 {
                        ideal_seconds / secs
                    } else {
                        1.0
                    },
                    step_seconds: secs,
                    fits: estimate.peak <= budget.usable,
                });
            }
        }
    }
    candidates.sort_by(|a, b| {
        b.relative_throughput
            .total_cmp(&a.relative_throughput)
            .then(a.estimate.peak.cmp(&b.estimate.peak))
    });
    let limit_with_headroom = (budget.usable.0 as f64 * (1.0 - req.headroom)) as u64;
    let roomy = candidates
        .iter()
        .find(|c| c.fits && c.estimate.peak.0 <= limit_with_headroom);
    let (chosen, tight) = match roomy {
        Some(c) => (*c, false),
        None => match candidates.iter().find(|c| c.fits) {
            Some(c) => (*c, true),
            None => return Err(does_not_fit(req, budget, model, &candidates)),
        },
    };
    Ok(Plan {
        budget: *budget,
        global_sequences: g,
        candidates,
        chosen,
        tight,
        assumed_speeds: speed.assumed(),
    })
}

/// The LoRA rank suggestions assume.
pub const SUGGESTED_LORA_RANK: u32 = 16;

/// Builds [`Error::DoesNotFit`]: the smallest candidate, and what would make it fit.
fn does_not_fit(
    req: &PlanRequest,
    budget: &Budget,
    model: &MemoryModel,
    candidates: &[Candidate],
) -> Error {
    let smallest = candidates
        .iter()
        .min_by_key(|c| c.estimate.peak)
        .map(|c| (c.estimate.peak, c.strategy.to_string()))
        .unwrap_or((Bytes(0), String::from("none")));
    let fits = |s: &Setup| {
        model
            .estimate(&req.profile, s)
            .ok()
            .map(|e| e.peak)
            .filter(|p| *p <= budget.usable)
    };
    // The leanest setup within the request's own choices.
    let lean = Setup {
        precision: req.precision,
        optimizer: req.optimizer,
        adapters: req.adapters,
        seq_len: req.seq_len,
        micro_batch: req.micro_batch.unwrap_or(1),
        accumulation: 1,
        checkpointing: req.checkpointing == Toggle::On,
        offload: if req.offload == OffloadChoice::Disk {
            OffloadKind::Disk
        } else {
            OffloadKind::None
        },
    };
    // Everything the planner may turn on is on.
    let leanest = Setup {
        checkpointing: req.checkpointing != Toggle::Off,
        offload: if req.offload == OffloadChoice::None {
            OffloadKind::None
        } else {
            OffloadKind::Disk
        },
        ..lean
    };
    let mut suggestions = Vec::new();
    if req.checkpointing == Toggle::Off {
        let s = Setup {
            checkpointing: true,
            ..leanest
        };
        if let Some(peak) = fits(&s) {
            suggestions.push(Suggestion::Checkpointing { peak });
        }
    }
    if req.offload == OffloadChoice::None {
        let s = Setup {
            offload: OffloadKind::Disk,
            ..leanest
        };
        if let Some(peak) = fits(&s) {
            suggestions.push(Suggestion::Offload { peak });
        }
    }
    let rank = match req.adapters {
        Adapters::Lora { rank, .. } => rank,
        Adapters::None => SUGGESTED_LORA_RANK,
    };
    // Within the request's choices first; else also with checkpointing (configured off).
    let first_fit = |s: Setup| -> Option<(Bytes, bool)> {
        fits(&s).map(|p| (p, false)).or_else(|| {
            (!s.checkpointing)
                .then(|| {
                    fits(&Setup {
                        checkpointing: true,
                        ..s
                    })
                })
                .flatten()
                .map(|p| (p, true))
        })
    };
    if req.adapters == Adapters::None && req.profile.lora_params_per_rank > 0 {
        let s = Setup {
            adapters: Adapters::Lora {
                rank,
                base: BaseFormat::Full,
            },
            ..leanest
        };
        if let Some((peak, with_checkpointing)) = first_fit(s) {
            suggestions.push(Suggestion::Lora {
                rank,
                with_checkpointing,
                peak,
            });
        }
    }
    let is_nf4 = matches!(
        req.adapters,
        Adapters::Lora {
            base: BaseFormat::Nf4 { .. },
            ..
        }
    );
    if !is_nf4 && req.profile.lora_params_per_rank > 0 {
        let s = Setup {
            adapters: Adapters::Lora {
                rank,
                base: BaseFormat::Nf4 { double_quant: true },
            },
            ..leanest
        };
        if let Some((peak, with_checkpointing)) = first_fit(s) {
            suggestions.push(Suggestion::Qlora {
                rank,
                with_checkpointing,
                peak,
            });
        }
    }
    let mut seq = req.seq_len / 2;
    while seq >= 16 {
        let s = Setup {
            seq_len: seq,
            ..leanest
        };
        if let Some((peak, with_checkpointing)) = first_fit(s) {
            suggestions.push(Suggestion::ShorterSequences {
                seq_len: seq,
                with_checkpointing,
                peak,
            });
            break;
        }
        seq /= 2;
    }
    let short = Bytes(smallest.0.0.saturating_sub(budget.usable.0));
    suggestions.push(Suggestion::MoreMemory { by: short });
    Error::DoesNotFit {
        needed: smallest.0,
        budget: budget.usable,
        short,
        smallest: smallest.1,
        suggestions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::footprint::BlockProfile;

    fn profile() -> ModelProfile {
        ModelProfile {
            params: 10_000_000,
            quantizable_params: 8_000_000,
            largest_matrix_params: 500_000,
            hidden_size: 256,
            blocks: vec![
                BlockProfile {
                    activation_elems_per_token: 4_000,
                    activation_elems_per_token_per_position: 8,
                };
                8
            ],
            head_activation_elems_per_token: 1_000,
            vocab_size: 1_000,
            lora_params_per_rank: 8 * 2 * 512,
            lora_activation_elems_per_token_per_rank: 16,
            forward_flops_per_token: 20_000_000,
            forward_flops_per_token_per_position: 16_000,
            fused: None,
        }
    }

    fn request() -> PlanRequest {
        PlanRequest {
            profile: profile(),
            precision: Precision::F32,
            optimizer: Optimizer::AdamW,
            adapters: Adapters::None,
            global_tokens: 8 * 256,
            seq_len: 256,
            micro_batch: None,
            checkpointing: Toggle::Auto,
            offload: OffloadChoice::Auto,
            headroom: 0.1,
        }
    }

    fn model() -> MemoryModel {
        MemoryModel {
            runtime_overhead: Bytes(0),
            offload_window: Bytes(1 << 20),
            rollback_snapshot: false,
            checkpoint_copies: 0,
            in_flight_copies: 0,
            adapter_heap_retention_permille: 0,
            checkpoint_writer: Bytes(0),
        }
    }

    fn budget(b: u64) -> Budget {
        Budget::new(None, 1.0, Some(Bytes(b)), Bytes(0)).unwrap()
    }

    #[test]
    fn budget_formula() {
        let b = Budget::new(Some(Bytes(1000)), 0.5, None, Bytes(100)).unwrap();
        assert_eq!(b.usable, Bytes(400));
        let b = Budget::new(Some(Bytes(1000)), 0.9, Some(Bytes(600)), Bytes(100)).unwrap();
        assert_eq!(b.usable, Bytes(500));
        assert!(matches!(
            Budget::new(None, 0.9, None, Bytes(0)),
            Err(Error::BudgetUnknown { .. })
        ));
        assert!(matches!(
            Budget::new(Some(Bytes(1000)), 0.5, None, Bytes(500)),
            Err(Error::ReserveTooLarge { .. })
        ));
    }

    #[test]
    fn divisors_are_sorted_and_complete() {
        assert_eq!(divisors(12), vec![1, 2, 3, 4, 6, 12]);
        assert_eq!(divisors(1), vec![1]);
        assert_eq!(divisors(16), vec![1, 2, 4, 8, 16]);
    }

    #[test]
    fn global_batch_must_be_whole_sequences() {
        let mut r = request();
        r.global_tokens = 1000;
        assert!(matches!(
            r.global_sequences(),
            Err(Error::InvalidBatch { .. })
        ));
    }

    #[test]
    fn huge_budget_picks_the_ideal() {
        let p = plan(
            &request(),
            &budget(1 << 40),
            &model(),
            &SpeedModel::default(),
        )
        .unwrap();
        assert_eq!(p.chosen.strategy.micro_batch, 8);
        assert!(!p.chosen.strategy.checkpointing);
        assert_eq!(p.chosen.strategy.offload, OffloadKind::None);
        assert!((p.chosen.relative_throughput - 1.0).abs() < 1e-12);
        // 4 micro-batches x 2 ckpt x 2 offload.
        assert_eq!(p.candidates.len(), 16);
        for c in &p.candidates {
            assert_eq!(c.strategy.micro_batch * c.strategy.accumulation, 8);
        }
    }

    #[test]
    fn checkpointing_costs_a_quarter_of_throughput() {
        let p = plan(
            &request(),
            &budget(1 << 40),
            &model(),
            &SpeedModel::default(),
        )
        .unwrap();
        let on = p
            .candidates
            .iter()
            .find(|c| {
                c.strategy.micro_batch == 8
                    && c.strategy.checkpointing
                    && c.strategy.offload == OffloadKind::None
            })
            .unwrap();
        assert!((on.relative_throughput - 0.75).abs() < 1e-12);
    }

    #[test]
    fn tight_budget_shrinks_micro_batch_first() {
        let m = model();
        let mut r = request();
        r.checkpointing = Toggle::Off;
        r.offload = OffloadChoice::None;
        // Enough for micro-batch 2 with headroom, not 4.
        let mb = |k: u32| {
            m.estimate(
                &r.profile,
                &Setup {
                    precision: r.precision,
                    optimizer: r.optimizer,
                    adapters: r.adapters,
                    seq_len: r.seq_len,
                    micro_batch: k,
                    accumulation: 8 / k,
                    checkpointing: false,
                    offload: OffloadKind::None,
                },
            )
            .unwrap()
            .peak
            .0
        };
        let b = (mb(2) as f64 / 0.9) as u64 + 1;
        assert!(mb(4) > b);
        let p = plan(&r, &budget(b), &m, &SpeedModel::default()).unwrap();
        assert_eq!(p.chosen.strategy.micro_batch, 2);
        assert_eq!(p.chosen.strategy.accumulation, 4);
        assert!(!p.tight);
    }

    #[test]
    fn disk_offload_is_chosen_only_when_needed() {
        let p = plan(
            &request(),
            &budget(1 << 40),
            &model(),
            &SpeedModel::default(),
        )
        .unwrap();
        assert_eq!(p.chosen.strategy.offload, OffloadKind::None);
        let disk = p
            .candidates
            .iter()
            .find(|c| c.strategy.offload == OffloadKind::Disk && c.strategy.micro_batch == 8)
            .unwrap();
        assert!(disk.relative_throughput < 1.0);
        // Measured bandwidth changes the cost: faster disk, smaller penalty.
        let fast = SpeedModel {
            disk_read_mb_s: Some(5_000.0),
            disk_write_mb_s: Some(5_000.0),
            ..SpeedModel::default()
        };
        let p2 = plan(&request(), &budget(1 << 40), &model(), &fast).unwrap();
        let disk2 = p2
            .candidates
            .iter()
            .find(|c| c.strategy.offload == OffloadKind::Disk && c.strategy.micro_batch == 8)
            .unwrap();
        assert!(disk2.relative_throughput > disk.relative_throughput);
    }

    #[test]
    fn nothing_fits_says_by_how_much_and_what_helps() {
        let mut r = request();
        r.checkpointing = Toggle::Off;
        r.offload = OffloadChoice::None;
        // Weights, gradients and AdamW state of a full fine-tune are 160 MB: 110 MB fits none,
        // LoRA (40 MB frozen weights + about 60 MB of activations) fits.
        let err = plan(&r, &budget(110_000_000), &model(), &SpeedModel::default()).unwrap_err();
        let Error::DoesNotFit {
            needed,
            budget,
            short,
            suggestions,
            ..
        } = &err
        else {
            panic!("{err}");
        };
        assert_eq!(budget.0, 110_000_000);
        assert_eq!(short.0, needed.0 - budget.0);
        assert!(
            suggestions
                .iter()
                .any(|s| matches!(s, Suggestion::Lora { .. }))
        );
        assert!(
            suggestions
                .iter()
                .any(|s| matches!(s, Suggestion::Qlora { .. }))
        );
        assert!(matches!(
            suggestions.last(),
            Some(Suggestion::MoreMemory { .. })
        ));
        let text = err.to_string();
        assert!(text.contains("short by"), "{text}");
        assert!(text.contains("LoRA"), "{text}");
    }

    #[test]
    fn fixed_micro_batch_must_divide() {
        let mut r = request();
        r.micro_batch = Some(3);
        assert!(matches!(
            plan(&r, &budget(1 << 40), &model(), &SpeedModel::default()),
            Err(Error::InvalidBatch { .. })
        ));
        r.micro_batch = Some(4);
        let p = plan(&r, &budget(1 << 40), &model(), &SpeedModel::default()).unwrap();
        assert!(p.candidates.iter().all(|c| c.strategy.micro_batch == 4));
    }
}
