//! The overlapped snapshot copy (issue 6): a checkpoint whose weights and optimizer state
//! are copied on a background thread while the next step's forward and backward run is
//! byte for byte the checkpoint a synchronous save writes, and a rollback right after it
//! goes back to exactly the saved state.

use std::path::Path;

use super::common::*;

/// Every file of every checkpoint directory under `root`: (dir/file, bytes).
fn checkpoint_files(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (_, dir) in eg_kernel::checkpoint::list(root) {
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in names {
            let d = dir.file_name().unwrap().to_string_lossy().into_owned();
            out.push((format!("{d}/{n}"), std::fs::read(dir.join(&n)).unwrap()));
        }
    }
    out
}

#[test]
fn overlapped_checkpoint_is_byte_identical_to_a_synchronous_one() {
    let mut runs = Vec::new();
    for background in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut o = with_checkpoints(options(10, 2), dir.path(), 3);
        if let Some(c) = &mut o.checkpoints {
            c.background = background;
        }
        // Rollback points every 2 updates too (copied in the background as well).
        o.snapshot_every = 2;
        let mut t = trainer(model(), 4, o);
        let r = t.fit().unwrap();
        assert_eq!(r.steps, 10);
        let stalls: Vec<_> = t.checkpoint_stalls().copied().collect();
        if background {
            // Checkpoints at 3, 6, 9 (training went on after each) and 10; rollback points
            // at 2, 4, 8 (6 and 10 are checkpoints).
            let steps: Vec<_> = stalls.iter().map(|s| (s.step, s.checkpoint)).collect();
            assert_eq!(
                steps,
                [
                    (2, false),
                    (3, true),
                    (4, false),
                    (6, true),
                    (8, false),
                    (9, true),
                    (10, true)
                ]
            );
            assert!(
                stalls
                    .iter()
                    .all(|s| s.blocked_secs() >= 0.0 && s.copy_secs > 0.0)
            );
        } else {
            // The checkpoints copy on the loop; the rollback points still overlap.
            let steps: Vec<_> = stalls.iter().map(|s| (s.step, s.checkpoint)).collect();
            assert_eq!(steps, [(2, false), (4, false), (8, false)]);
        }
        runs.push((
            checkpoint_files(&dir.path().join("checkpoints")),
            logged_losses(dir.path()),
            weights(t.model()),
        ));
    }
    let names = |r: &[(String, Vec<u8>)]| r.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&runs[0].0), names(&runs[1].0));
    assert!(runs[0].0.len() >= 4 * 5, "four checkpoints of five files");
    for ((n, a), (_, b)) in runs[0].0.iter().zip(&runs[1].0) {
        assert!(
            a == b,
            "{n} differs between the synchronous and the overlapped save"
        );
    }
    assert_eq!(runs[0].1, runs[1].1, "losses");
    assert!(runs[0].2 == runs[1].2, "weights");
}

/// A checkpoint saved by hand, then training goes on (the copy overlaps the next step and
/// is settled before its update): the files hold the state of the saved step, equal to a
/// synchronous save of a twin run at the same step.
#[test]
fn save_checkpoint_then_training_continues() {
    let mut files = Vec::new();
    for background in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut o = with_checkpoints(options(4, 2), dir.path(), 100);
        if let Some(c) = &mut o.checkpoints {
            c.background = background;
        }
        let mut t = trainer(model(), 4, o);
        t.fit().unwrap(); // 4 updates, the final checkpoint at 4
        let before = weights(t.model());
        let root = dir.path().join("checkpoints");
        std::fs::remove_dir_all(root.join("step-00000004")).unwrap();
        // Save step 4 again by hand; the copy (background) is still in flight here.
        let d = t.save_checkpoint(None).unwrap().unwrap();
        assert!(weights(t.model()) == before);
        // Settles the copy (the optimizer comes back).
        let _ = t.optimizer().unwrap();
        // At max_steps already: `fit` only waits for the writer.
        assert_eq!(t.fit().unwrap().steps, 4);
        let data = eg_kernel::checkpoint::load(&d).unwrap();
        let saved: Vec<_> = before
            .iter()
            .map(|(n, _)| (n.clone(), data.weights[n].1.clone()))
            .collect();
        assert!(
            saved == before,
            "the checkpoint holds the weights of the saved step"
        );
        files.push(checkpoint_files(&root));
    }
    assert_eq!(files[0], files[1]);
}

/// A loss spike at the update right after a checkpoint: the rollback waits for the copy in
/// flight, goes back to the checkpoint's step and the run equals the synchronous one.
#[test]
fn rollback_right_after_an_overlapped_save() {
    let mut runs = Vec::new();
    for background in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut o = with_checkpoints(options(20, 4), dir.path(), 7);
        o.spike = Some((10, 6.0));
        if let Some(c) = &mut o.checkpoints {
            c.background = background;
        }
        // Forward call 14 is update 14, the first after the checkpoint of step 14.
        let mut t = trainer(Faulty::new(vec![(14, Fault::Scale(40.0))]), 4, o);
        let r = t.fit().unwrap();
        assert_eq!((r.steps, r.state.spikes, r.state.rollbacks), (20, 1, 1));
        let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        let rollback = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["anomaly"]["kind"] == "rollback")
            .unwrap();
        assert_eq!(rollback["anomaly"]["to_step"], 14);
        assert_eq!(rollback["anomaly"]["from_step"], 14);
        runs.push((
            logged_losses(dir.path()),
            weights(t.model()),
            r.state.quarantine,
            checkpoint_files(&dir.path().join("checkpoints")),
        ));
    }
    assert_eq!(runs[0].0, runs[1].0, "losses");
    assert!(runs[0].1 == runs[1].1, "weights");
    assert_eq!(runs[0].2, runs[1].2, "quarantine");
    assert!(runs[0].3 == runs[1].3, "checkpoint files");
}
