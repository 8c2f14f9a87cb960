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

/// The optimizer state split into shards (as large states are) and the files written with
/// and without `O_DIRECT`: the same bytes, and a load gives back exactly what was saved.
#[test]
fn sharded_and_direct_saves_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path());
    let data = checkpoint::load(&dir.path().join("checkpoints/step-00000006")).unwrap();
    let save = |sub: &str, writers: usize, direct_io: bool| {
        let opts = checkpoint::SaveOptions {
            direct_io,
            writers,
            min_shard_bytes: 0,
        };
        checkpoint::save_with(&dir.path().join(sub), &data, &opts).unwrap()
    };
    let one = verify(&save("one", 1, true)).unwrap();
    let buffered = verify(&save("buffered", 3, false)).unwrap();
    let sharded_dir = save("sharded", 3, true);
    let sharded = verify(&sharded_dir).unwrap();
    assert!(one.files.contains_key("optimizer.safetensors"));
    let shards: Vec<&String> = sharded
        .files
        .keys()
        .filter(|k| k.starts_with("optimizer-"))
        .collect();
    assert!(shards.len() > 1, "{shards:?}");
    assert_eq!((one.format, sharded.format), (1, 2));
    assert!(shards[0].ends_with(&format!("-of-{:05}.safetensors", shards.len())));
    // O_DIRECT (padded blocks, cut back) writes the bytes buffered writes do.
    assert_eq!(sharded.files, buffered.files);
    assert_eq!(
        one.files["model.safetensors"],
        sharded.files["model.safetensors"]
    );
    for d in [&sharded_dir, &dir.path().join("one/step-00000006")] {
        let back = checkpoint::load(d).unwrap();
        assert_eq!(back.weights, data.weights);
        assert_eq!(back.optimizer.buffers, data.optimizer.buffers);
        assert_eq!(
            (back.optimizer.t, back.optimizer.kind),
            (data.optimizer.t, data.optimizer.kind)
        );
        assert_eq!(back.trainer_json, data.trainer_json);
    }
    // A damaged shard, or one missing from the manifest, makes the checkpoint invalid.
    let shard = sharded_dir.join(shards[1]);
    let mut b = std::fs::read(&shard).unwrap();
    let i = b.len() - 1;
    b[i] ^= 1;
    std::fs::write(&shard, &b).unwrap();
    let msg = verify(&sharded_dir).unwrap_err().to_string();
    assert!(msg.contains(shards[1].as_str()), "{msg}");
    b[i] ^= 1;
    std::fs::write(&shard, &b).unwrap();
    let mut m = sharded.clone();
    m.files.remove(shards[0]);
    std::fs::write(
        sharded_dir.join("manifest.json"),
        serde_json::to_vec(&m).unwrap(),
    )
    .unwrap();
    let msg = verify(&sharded_dir).unwrap_err().to_string();
    assert!(msg.contains("optimizer shards"), "{msg}");
}

/// A save on tmpfs: `O_DIRECT` where the kernel supports it there (6.6 and later), buffered
/// writes on older kernels (the fallback itself is tested in `checkpoint::pipe`).
#[test]
fn direct_io_on_tmpfs() {
    let shm = std::path::Path::new("/dev/shm");
    assert!(shm.is_dir(), "/dev/shm (tmpfs) is needed for this test");
    let dir = tempfile::tempdir().unwrap();
    run(dir.path());
    let data = checkpoint::load(&dir.path().join("checkpoints/step-00000006")).unwrap();
    let root = tempfile::tempdir_in(shm).unwrap();
    let d = checkpoint::save_with(root.path(), &data, &checkpoint::SaveOptions::default()).unwrap();
    assert_eq!(checkpoint::load(&d).unwrap().weights, data.weights);
}
