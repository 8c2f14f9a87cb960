//! The memory side of `eg train` (issue #8): plan the micro-batch against the budget at
//! start, and put the memory guard (eg-memory's controller) into the loop.
//!
//! With `memory.guard = true` (the default) the planner chooses the fastest strategy that
//! fits `min(effective × memory.budget_fraction, memory.limit) − memory.reserve`, where the
//! effective memory is eg-hardware's cgroup-aware figure; a fixed `train.batch.micro_batch`
//! is checked instead of chosen. The guard then starts from that strategy. With
//! `memory.guard = false` nothing is planned or adapted: the micro-batch is
//! `train.batch.micro_batch` or up to 4096 tokens.

use std::path::PathBuf;

use candle_core::DType;
use elastic_guardian::config::{self, Config};
use elastic_guardian::hardware as hw;
use elastic_guardian::kernel::{self, StoreFactory};
use elastic_guardian::memory::{self as mem, OffloadKind};
use elastic_guardian::model::Llama;

/// What `eg train` runs, memory-wise.
pub(super) struct MemorySetup {
    /// Rows per micro-batch at start.
    pub(super) micro: usize,
    /// The guard to attach, with the optimizer-state stores it may switch between.
    pub(super) guard: Option<(mem::MemoryGuard, Option<StoreFactory>)>,
    /// One line for the console.
    pub(super) summary: String,
}

/// Micro-batches of up to this many tokens when nothing is planned (larger ones run
/// faster in candle: fewer, bigger matmuls).
const UNPLANNED_MICRO_TOKENS: usize = 4096;

/// The micro-batch without planning: the configured one, else up to 4096 tokens.
fn unplanned(cfg: &Config, rows: usize, seq: usize) -> usize {
    cfg.train
        .batch
        .micro_batch
        .map(|m| m.get() as usize)
        .unwrap_or_else(|| rows.min((UNPLANNED_MICRO_TOKENS / seq).max(1)))
}

/// The planner's precision for what the model computes in.
fn precision_of(model: &Llama) -> mem::Precision {
    match model.compute_dtype() {
        DType::BF16 => mem::Precision::Bf16,
        DType::F16 => mem::Precision::F16,
        _ => mem::Precision::F32,
    }
}

/// Plans the run and builds the guard (see the module documentation).
pub(super) fn setup(
    cfg: &Config,
    model: &Llama,
    rows: usize,
    seq: usize,
) -> anyhow::Result<MemorySetup> {
    if !cfg.memory.guard {
        let micro = unplanned(cfg, rows, seq);
        return Ok(MemorySetup {
            micro,
            guard: None,
            summary: "memory: guard off (memory.guard = false): no plan, no adaptation".to_string(),
        });
    }
    let targets: Vec<String> = cfg
        .model
        .lora
        .as_ref()
        .map(|l| l.targets.clone())
        .unwrap_or_default();
    let chunked = model
        .attention()
        .use_chunked(seq, model.config().attention_window());
    let mut profile = crate::plan::profile_of(model.config(), seq, &targets, chunked)?;
    // The fused step's counts only when this run takes it: eg-model decides (adapters,
    // precision, attention, biases) and only pre-training's causal LM uses it (SFT's packed
    // rows need document masks).
    if cfg.train.mode != config::wire::Mode::Pretrain || model.fused_step_unavailable(seq).is_some()
    {
        profile.fused = None;
    }
    let report = hw::Detector::new(hw::Root::host())
        .gpu(hw::GpuQuery::Skip)
        .detect();
    let budget = mem::Budget::from_config(&report, &cfg.memory)?;
    let features = report.cpu.features.clone().unwrap_or_default();
    let mut request = mem::PlanRequest::from_config(cfg, profile, &features);
    request.precision = precision_of(model);
    // Where the optimizer state can go: the configured directory when offload is on,
    // else `<run.dir>/offload` for the guard's runtime offload.
    let (start_offload, offload_dir) = match &cfg.memory.offload {
        config::Offload::Disk(d) => (mem::OffloadChoice::Disk, d.clone()),
        _ => (mem::OffloadChoice::None, cfg.run.dir.join("offload")),
    };
    request.offload = start_offload;
    let model_mem = mem::MemoryModel::default();
    let plan = mem::plan(
        &request,
        &budget,
        &model_mem,
        &mem::SpeedModel::from_report(&report),
    )?;
    let chosen = plan.chosen.strategy;
    let mut controller = mem::ControllerConfig::new(plan.global_sequences);
    controller.allow_checkpointing =
        cfg.memory.activation_checkpointing != config::wire::Toggle::Off;
    let extra: Vec<(mem::Strategy, u64)> = request
        .estimate_all(&model_mem)?
        .into_iter()
        .map(|(s, b)| (s, b.0))
        .collect();
    let mut guard_cfg = mem::GuardConfig::from_plan(
        &plan,
        controller,
        mem::PlanRequest::DEFAULT_HEADROOM,
        &extra,
    );
    // The first update runs at micro-batch 1 and measures the real peak before the planned
    // micro-batch can be OOM-killed by a wrong prediction.
    guard_cfg.probe = true;
    let sampler = mem::live::Sampler::new(hw::Root::host(), &report.memory.cgroup);
    let guard = mem::MemoryGuard::new(guard_cfg, sampler, chosen)?;
    let stores = store_factory(offload_dir);
    let summary = format!(
        "memory: budget {}; plan {} (predicted peak {}{}); guard on",
        plan.budget,
        chosen,
        mem::HumanBytes::from(plan.chosen.estimate.peak),
        if plan.tight { ", tight" } else { "" },
    );
    Ok(MemorySetup {
        micro: chosen.micro_batch as usize,
        guard: Some((guard, Some(stores))),
        summary,
    })
}

/// The optimizer-state stores the guard switches between: RAM, or files under `dir`.
fn store_factory(dir: PathBuf) -> StoreFactory {
    Box::new(move |kind| match kind {
        OffloadKind::Disk => kernel::optim::store_for(&config::Offload::Disk(dir.clone())),
        _ => kernel::optim::store_for(&config::Offload::None),
    })
}
