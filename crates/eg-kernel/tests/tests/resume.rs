//! Exact resume: k steps, stop (or crash), resume to N == N uninterrupted, bitwise.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::common::*;

const N: u64 = 10;

struct StopAt(u64, Arc<AtomicBool>);

impl eg_kernel::Callback for StopAt {
    fn on_step_end(&mut self, m: &eg_kernel::StepMetrics) {
        if m.step == self.0 {
            self.1.store(true, Ordering::SeqCst);
        }
    }
}

fn opts(dir: &std::path::Path) -> eg_kernel::TrainerOptions {
    // 4 rows per step in micro-batches of 2 (accumulation), checkpoints every 3, eval every 4
    let mut o = with_checkpoints(options(N, 2), dir, 3);
    o.eval_every = 4;
    o.spike = Some((6, 6.0));
    o
}

#[test]
fn stop_at_k_then_resume_is_bitwise_identical() {
    let base = tempfile::tempdir().unwrap();
    let mut t = trainer(model(), 4, opts(base.path()));
    t.fit().unwrap();
    let want_w = weights(t.model());
    let want_l = logged_losses(base.path());
    assert_eq!(want_l.len() as u64, N);
    for k in [1, 4, 7] {
        let dir = tempfile::tempdir().unwrap();
        let mut a = trainer(model(), 4, opts(dir.path()));
        let flag = a.stop_flag();
        a.add_callback(Box::new(StopAt(k, flag)));
        let r = a.fit().unwrap();
        assert!(r.stopped && r.steps == k);
        // A fresh process: a differently initialised model, then resume.
        let fresh = eg_model::Llama::init(
            &eg_model::LlamaConfig::tiny_for_tests(),
            99,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mut b = trainer(fresh, 4, opts(dir.path()));
        assert_eq!(b.resume().unwrap(), Some(k));
        b.fit().unwrap();
        assert_eq!(logged_losses(dir.path()), want_l, "k = {k}");
        assert!(weights(b.model()) == want_w, "weights differ for k = {k}");
    }
}

#[test]
fn crash_after_checkpoint_resumes_from_it_bitwise() {
    let base = tempfile::tempdir().unwrap();
    let mut t = trainer(model(), 4, opts(base.path()));
    t.fit().unwrap();
    let want_w = weights(t.model());
    let want_l = logged_losses(base.path());
    // Run to 8 (checkpoints at 3, 6, and 8 on stop), then lose step 8's checkpoint as a
    // crash before it was written would: steps 7 and 8 were logged but not saved.
    let dir = tempfile::tempdir().unwrap();
    let mut a = trainer(model(), 4, opts(dir.path()));
    let flag = a.stop_flag();
    a.add_callback(Box::new(StopAt(8, flag)));
    a.fit().unwrap();
    std::fs::remove_dir_all(dir.path().join("checkpoints/step-00000008")).unwrap();
    // and a half-written temporary directory lies around
    std::fs::create_dir_all(dir.path().join("checkpoints/.tmp-step-00000009-1")).unwrap();
    let mut b = trainer(model(), 4, opts(dir.path()));
    assert_eq!(b.resume().unwrap(), Some(6));
    b.fit().unwrap();
    assert_eq!(logged_losses(dir.path()), want_l);
    assert!(weights(b.model()) == want_w);
    assert!(!dir.path().join("checkpoints/.tmp-step-00000009-1").exists());
}

/// `prefetch` (issue 5): batches prepared ahead on a thread change nothing. A run stopped at
/// k and resumed with prefetching equals the uninterrupted synchronous run bitwise (the
/// checkpoint holds the cursor after the last batch trained on, not after the last one
/// prepared).
#[test]
fn resume_with_prefetch_equals_the_uninterrupted_synchronous_run() {
    let base = tempfile::tempdir().unwrap();
    let mut t = trainer(model(), 4, opts(base.path()));
    t.fit().unwrap();
    let want_w = weights(t.model());
    let want_l = logged_losses(base.path());
    for (k, depth) in [(4, 1), (5, 3)] {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.prefetch = depth;
        let mut a = trainer(model(), 4, o.clone());
        let flag = a.stop_flag();
        a.add_callback(Box::new(StopAt(k, flag)));
        assert!(a.fit().unwrap().stopped);
        drop(a);
        let mut b = trainer(model(), 4, o);
        assert_eq!(b.resume().unwrap(), Some(k));
        b.fit().unwrap();
        assert_eq!(logged_losses(dir.path()), want_l, "k = {k}, depth {depth}");
        assert!(weights(b.model()) == want_w, "weights differ, k = {k}");
    }
}
