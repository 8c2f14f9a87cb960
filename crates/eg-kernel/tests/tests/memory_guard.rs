//! The memory guard in the loop (issue 8): a memory hog appears in the (fixture) cgroup
//! mid-run, the guard halves the micro-batch before the next update, the global batch and
//! the loss curve stay, the decision is logged and checkpointed, and a resume continues
//! with it bitwise.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use eg_memory::live::{CgroupVersion, Root, Sampler};
use eg_memory::{
    Action, ControllerConfig, GuardConfig, MemoryGuard, OffloadKind, Strategy, Thresholds,
};

use super::common::*;

const MB: u64 = 1 << 20;
const N: u64 = 8;
const ROWS: usize = 8;

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// The process holds 300 MB; the group `/job` (limit 1000 MB) holds `current`.
fn cgroup(root: &Path, current: u64) {
    write(
        root,
        "proc/self/status",
        &format!("VmHWM:\t{} kB\nVmRSS:\t{} kB\n", 300 * 1024, 300 * 1024),
    );
    write(
        root,
        "sys/fs/cgroup/job/memory.max",
        &format!("{}\n", 1000 * MB),
    );
    write(
        root,
        "sys/fs/cgroup/job/memory.current",
        &format!("{current}\n"),
    );
}

fn strategy(m: u32) -> Strategy {
    Strategy {
        micro_batch: m,
        accumulation: ROWS as u32 / m,
        checkpointing: false,
        offload: OffloadKind::None,
    }
}

fn guard(root: &Path) -> MemoryGuard {
    let mut controller = ControllerConfig::new(ROWS as u32);
    controller.allow_checkpointing = false;
    controller.allow_offload = false;
    let cfg = GuardConfig {
        controller,
        thresholds: Thresholds::default(),
        ceiling: 1000 * MB,
        usable: 900 * MB,
        headroom: 0.1,
        predicted: vec![
            (strategy(1), 250 * MB),
            (strategy(2), 330 * MB),
            (strategy(4), 450 * MB),
            (strategy(8), 700 * MB),
        ],
        probe: false,
    };
    let sampler = Sampler::with_cgroup(
        Root::new(root),
        Some((CgroupVersion::V2, "/sys/fs/cgroup/job".into())),
    );
    MemoryGuard::new(cfg, sampler, strategy(8)).unwrap()
}

/// After update `at`, a 400 MB hog joins the group.
struct Hog {
    at: u64,
    root: std::path::PathBuf,
}

impl eg_kernel::Callback for Hog {
    fn on_step_end(&mut self, m: &eg_kernel::StepMetrics) {
        if m.step == self.at {
            cgroup(&self.root, 700 * MB);
        }
    }
}

struct StopAt(u64, Arc<AtomicBool>);

impl eg_kernel::Callback for StopAt {
    fn on_step_end(&mut self, m: &eg_kernel::StepMetrics) {
        if m.step == self.0 {
            self.1.store(true, Ordering::SeqCst);
        }
    }
}

fn opts(dir: &Path) -> eg_kernel::TrainerOptions {
    with_checkpoints(options(N, ROWS), dir, 2)
}

fn guarded(dir: &Path, fixture: &Path) -> eg_kernel::Trainer<eg_model::Llama> {
    trainer(model(), ROWS, opts(dir))
        .with_memory_guard(guard(fixture), None)
        .unwrap()
}

fn losses(run: &Path) -> Vec<f64> {
    logged_losses(run)
        .into_iter()
        .map(|(_, b)| f64::from_bits(b))
        .collect()
}

#[test]
fn hog_mid_run_halves_the_micro_batch_and_the_loss_curve_stays() {
    let base = tempfile::tempdir().unwrap();
    trainer(model(), ROWS, opts(base.path())).fit().unwrap();
    let want = losses(base.path());

    let dir = tempfile::tempdir().unwrap();
    let fx = tempfile::tempdir().unwrap();
    cgroup(fx.path(), 300 * MB);
    let mut t = guarded(dir.path(), fx.path());
    assert_eq!(t.options().micro_batch_rows, 8);
    t.add_callback(Box::new(Hog {
        at: 3,
        root: fx.path().to_path_buf(),
    }));
    let r = t.fit().unwrap();
    assert_eq!(r.steps, N);
    assert_eq!(t.options().micro_batch_rows, 4);
    assert_eq!(t.memory_strategy(), Some(strategy(4)));
    // The same global batch: the loss curve is the unguarded one up to summation order.
    let got = losses(dir.path());
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!(((g - w) / w).abs() < 1e-5, "{got:?} vs {want:?}");
    }
    // Logged once, before update 4, in tracing's record and metrics.jsonl.
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "memory")
        .collect();
    assert_eq!(events.len(), 1, "{text}");
    assert_eq!(events[0]["step"], 3);
    assert_eq!(
        events[0]["decision"]["action"]["action"],
        "shrink_micro_batch"
    );
    assert_eq!(events[0]["others_bytes"], 400 * MB);
    // Saved in the checkpoints after it.
    let saved: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("checkpoints/step-00000004/trainer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        saved["memory"]["controller"]["current"]["micro_batch"], 4,
        "{saved}"
    );
    let d = &r.state.memory.as_ref().unwrap().decisions;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].action, Action::ShrinkMicroBatch { from: 8, to: 4 });
}

#[test]
fn resume_continues_with_the_saved_decision_bitwise() {
    let fx = tempfile::tempdir().unwrap();
    cgroup(fx.path(), 300 * MB);
    let base = tempfile::tempdir().unwrap();
    let mut t = guarded(base.path(), fx.path());
    t.add_callback(Box::new(Hog {
        at: 3,
        root: fx.path().to_path_buf(),
    }));
    t.fit().unwrap();
    let want = logged_losses(base.path());
    let want_w = weights(t.model());

    // Stop after update 5 (checkpoint 5 holds micro-batch 4), then resume in a "new
    // process" whose guard starts from the plan (8) and sees no hog: it must continue at 4.
    let fx = tempfile::tempdir().unwrap();
    cgroup(fx.path(), 300 * MB);
    let dir = tempfile::tempdir().unwrap();
    let mut a = guarded(dir.path(), fx.path());
    a.add_callback(Box::new(Hog {
        at: 3,
        root: fx.path().to_path_buf(),
    }));
    let flag = a.stop_flag();
    a.add_callback(Box::new(StopAt(5, flag)));
    assert!(a.fit().unwrap().stopped);
    cgroup(fx.path(), 300 * MB);
    let mut b = guarded(dir.path(), fx.path());
    assert_eq!(b.resume().unwrap(), Some(5));
    assert_eq!(b.memory_strategy(), Some(strategy(4)));
    assert_eq!(b.options().micro_batch_rows, 4);
    b.fit().unwrap();
    assert_eq!(logged_losses(dir.path()), want);
    assert!(weights(b.model()) == want_w);
}
