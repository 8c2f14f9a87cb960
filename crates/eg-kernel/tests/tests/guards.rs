//! Injected NaNs and loss spikes: the run finishes and records what happened.

use super::common::*;

#[test]
fn nan_gradients_skip_the_update_and_are_counted() {
    // rows 4, micro 2: two forward calls per step. Call 6 is the first micro-batch of step 3.
    let mut o = options(10, 2);
    o.spike = None;
    let mut t = trainer(Faulty::new(vec![(6, Fault::Nan)]), 4, o);
    let r = t.fit().unwrap();
    assert_eq!(r.steps, 10);
    assert_eq!(r.state.nonfinite_skips, 1);
    assert_eq!(r.state.rollbacks, 0);
    assert!(r.last_loss.unwrap().is_finite());
    for (n, w) in weights(t.model()) {
        assert!(w.iter().all(|x| x.is_finite()), "{n}");
    }
}

#[test]
fn nan_k_in_a_row_rolls_back_to_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = with_checkpoints(options(10, 4), dir.path(), 4);
    o.spike = None;
    o.nan_skip_limit = 2;
    // one call per step; calls 5 and 6 are steps 5 and 6 (after the snapshot at 4)
    let mut t = trainer(Faulty::new(vec![(5, Fault::Nan), (6, Fault::Nan)]), 4, o);
    let r = t.fit().unwrap();
    assert_eq!(r.steps, 10);
    assert_eq!(r.state.nonfinite_skips, 2);
    assert_eq!(r.state.rollbacks, 1);
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert!(text.contains("\"kind\":\"rollback\""), "{text}");
}

#[test]
fn loss_spike_rolls_back_and_quarantines_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = with_checkpoints(options(24, 4), dir.path(), 8);
    o.spike = Some((10, 6.0));
    o.lr_backoff = 0.5;
    // Step 14 (call 14) gets logits scaled up: its loss jumps far above the window.
    let mut t = trainer(Faulty::new(vec![(14, Fault::Scale(40.0))]), 4, o);
    let r = t.fit().unwrap();
    assert_eq!(r.steps, 24);
    assert_eq!(r.state.spikes, 1);
    assert_eq!(r.state.rollbacks, 1);
    assert_eq!(r.state.lr_scale, 0.5);
    let q = &r.state.quarantine;
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].step, 14);
    assert_eq!(q[0].reason, "spike");
    assert!(!q[0].sample_ids.is_empty());
    assert!(r.state.skip_data_steps.contains(&q[0].data_step));
    // The quarantine is kept in the checkpoint.
    let ck = eg_kernel::checkpoint::load(&dir.path().join("checkpoints/step-00000024")).unwrap();
    let st: eg_kernel::TrainerState = serde_json::from_slice(&ck.trainer_json).unwrap();
    assert_eq!(st.quarantine, r.state.quarantine);
}

/// A spike rollback with prefetching on (issue 5): the prefetch thread is stopped, the source
/// rewound to the snapshot's cursor, and the quarantined batch skipped, exactly as without.
#[test]
fn spike_rollback_with_prefetch_matches_the_synchronous_run() {
    let mut runs = Vec::new();
    for depth in [0, 2] {
        let dir = tempfile::tempdir().unwrap();
        let mut o = with_checkpoints(options(24, 4), dir.path(), 8);
        o.spike = Some((10, 6.0));
        o.prefetch = depth;
        let mut t = trainer(Faulty::new(vec![(14, Fault::Scale(40.0))]), 4, o);
        let r = t.fit().unwrap();
        assert_eq!((r.steps, r.state.spikes, r.state.rollbacks), (24, 1, 1));
        runs.push((
            logged_losses(dir.path()),
            weights(t.model()),
            r.state.quarantine,
        ));
    }
    assert_eq!(runs[0].0, runs[1].0, "losses");
    assert!(runs[0].1 == runs[1].1, "weights");
    assert_eq!(runs[0].2, runs[1].2, "quarantine");
}
