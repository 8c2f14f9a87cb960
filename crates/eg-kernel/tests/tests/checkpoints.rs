//! Checkpoint files: atomic layout, verification, corrupt ones skipped, retention.

use std::path::Path;

use eg_kernel::checkpoint::{self, list, newest_valid, verify};

use super::common::*;

fn run(dir: &Path) {
    let mut t = trainer(model(), 4, with_checkpoints(options(6, 2), dir, 2));
    t.fit().unwrap();
}

fn newest(dir: &Path) -> u64 {
    let (found, _) = newest_valid(&dir.join("checkpoints"));
    found.unwrap().1.step
}

#[test]
fn layout_manifest_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = with_checkpoints(options(4, 2), dir.path(), 2);
    o.config_toml = Some("[train]\nmax_steps = 4\n".into());
    trainer(model(), 4, o).fit().unwrap();
    let root = dir.path().join("checkpoints");
    let steps: Vec<u64> = list(&root).iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, vec![4, 2]);
    let m = verify(&root.join("step-00000004")).unwrap();
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "trainer.json",
        "cursor.json",
        "config.toml",
    ] {
        assert!(m.files.contains_key(f), "{f}");
    }
    assert_eq!(m.threads, eg_kernel::compute_threads());
    let d = checkpoint::load(&root.join("step-00000004")).unwrap();
    assert_eq!(d.optimizer.t, 4);
    assert_eq!(d.config_toml.as_deref(), Some("[train]\nmax_steps = 4\n"));
    // no temporaries left behind
    assert!(
        std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with('.'))
    );
}

#[test]
fn truncated_file_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path());
    let f = dir
        .path()
        .join("checkpoints/step-00000006/model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (found, skipped) = newest_valid(&dir.path().join("checkpoints"));
    assert_eq!(found.unwrap().1.step, 4);
    let msg = skipped[0].to_string();
    assert!(
        msg.contains("step-00000006") && msg.contains("model.safetensors"),
        "{msg}"
    );
}

#[test]
fn flipped_byte_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path());
    let f = dir
        .path()
        .join("checkpoints/step-00000006/optimizer.safetensors");
    let mut b = std::fs::read(&f).unwrap();
    let i = b.len() - 3;
    b[i] ^= 0x40;
    std::fs::write(&f, b).unwrap();
    assert_eq!(newest(dir.path()), 4);
}

#[test]
fn missing_manifest_is_skipped_and_resume_uses_the_previous() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path());
    std::fs::remove_file(dir.path().join("checkpoints/step-00000006/manifest.json")).unwrap();
    assert_eq!(newest(dir.path()), 4);
    let mut t = trainer(model(), 4, with_checkpoints(options(6, 2), dir.path(), 2));
    assert_eq!(t.resume().unwrap(), Some(4));
    let r = t.fit().unwrap();
    assert_eq!(r.steps, 6);
    // the rewritten step 6 verifies again
    assert!(verify(&dir.path().join("checkpoints/step-00000006")).is_ok());
}

#[test]
fn keep_last_and_best() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = with_checkpoints(options(8, 2), dir.path(), 2);
    if let Some(c) = &mut o.checkpoints {
        c.keep_last = 2;
        c.keep_best = 1;
    }
    o.eval_every = 2;
    trainer(model(), 4, o).fit().unwrap();
    let steps: Vec<u64> = list(&dir.path().join("checkpoints"))
        .iter()
        .map(|(s, _)| *s)
        .collect();
    // newest two; the best eval is the newest too (loss falls), so nothing else is kept
    assert_eq!(steps, vec![8, 6]);
}

#[test]
fn a_failed_periodic_checkpoint_is_reported_and_training_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("checkpoints");
    std::fs::create_dir_all(&root).unwrap();
    // A regular file where the step-2 directory must go: that write fails.
    std::fs::write(root.join("step-00000002"), b"in the way").unwrap();
    let mut o = with_checkpoints(options(6, 2), dir.path(), 2);
    if let Some(c) = &mut o.checkpoints {
        c.background = false;
    }
    let r = trainer(model(), 4, o).fit().unwrap();
    assert_eq!(r.steps, 6);
    assert_eq!(r.state.checkpoint_failures, 1);
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert!(text.contains("checkpoint_failed"), "{text}");
    assert_eq!(newest(dir.path()), 6);
}
