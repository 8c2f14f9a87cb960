//! Bounded probes and the capacity cache.

use std::time::{Duration, Instant};

use eg_hardware::capacity::{self, ProbeOptions};
use eg_hardware::storage::{self, BandwidthLimits};
use eg_hardware::{Detector, Error, Root};

/// CPU-heavy probes run one at a time: candle's spinning thread pools slow each other down
/// badly when two share this machine's two cores, and the tests check time bounds.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn storage_probe_is_bounded_and_cleans_up() {
    let _heavy = heavy();
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let limits = BandwidthLimits {
        max_bytes: 16 << 20,
        max_duration: Duration::from_secs(1),
    };
    let t = Instant::now();
    let bw = storage::measure_bandwidth(dir.path(), limits).unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(bw.bytes > 0 && bw.bytes <= 16 << 20);
    assert!(bw.write_mb_s > 0.0 && bw.read_mb_s > 0.0, "{bw:?}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "probe file left behind"
    );
}

#[test]
fn storage_probe_on_tmpfs_says_reads_may_be_cached() {
    let shm = std::path::Path::new("/dev/shm");
    assert!(shm.is_dir(), "this test needs /dev/shm");
    let dir = tempfile::tempdir_in(shm).unwrap();
    let bw = storage::measure_bandwidth(
        dir.path(),
        BandwidthLimits {
            max_bytes: 8 << 20,
            max_duration: Duration::from_secs(1),
        },
    )
    .unwrap();
    assert!(bw.read_may_be_cached);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn storage_probe_rejects_non_directories() {
    let f = tempfile::NamedTempFile::new().unwrap();
    let e = storage::measure_bandwidth(f.path(), BandwidthLimits::default()).unwrap_err();
    assert!(matches!(e, Error::NotADirectory { .. }), "{e}");
}

#[test]
fn capacity_probe_is_bounded_cached_and_atomic() {
    let _heavy = heavy();
    let cache = tempfile::tempdir().unwrap();
    let report = Detector::new(Root::host()).detect();
    let opts = ProbeOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        budget: Duration::from_millis(1500),
        refresh: false,
    };
    let t = Instant::now();
    let first = capacity::probe_capacity(&report, &opts).unwrap();
    let took = t.elapsed();
    // Budget plus set-up; generous because other builds share this machine's two cores.
    assert!(took < Duration::from_secs(5), "probe took {took:?}");
    assert!(!first.from_cache);
    let dtypes: Vec<&str> = first.gemm.iter().map(|g| g.dtype.as_str()).collect();
    assert_eq!(dtypes, ["f32", "bf16", "f16"]);
    for g in &first.gemm {
        assert!(g.gflops.is_some_and(|v| v > 0.0), "{g:?}");
        assert!(g.iterations >= 1);
    }
    assert!(first.memory_bandwidth_gb_s.is_some_and(|v| v > 0.0));

    // One cache file, no temporary left behind.
    let files: Vec<String> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].starts_with("capacity-") && files[0].ends_with(".json"));

    // Second call: from the cache, fast, same figures.
    let t = Instant::now();
    let second = capacity::probe_capacity(&report, &opts).unwrap();
    assert!(t.elapsed() < Duration::from_millis(200));
    assert!(second.from_cache);
    assert_eq!(second.gemm, first.gemm);

    // Refresh re-measures.
    let third = capacity::probe_capacity(
        &report,
        &ProbeOptions {
            refresh: true,
            ..opts.clone()
        },
    )
    .unwrap();
    assert!(!third.from_cache);

    // A corrupt cache is an error when read directly, and ignored (re-measured) by the probe.
    let fp = capacity::machine_fingerprint(&report);
    std::fs::write(capacity::cache_path(cache.path(), &fp), b"{not json").unwrap();
    assert!(matches!(
        capacity::read_cache(cache.path(), &fp),
        Err(Error::CacheFormat { .. })
    ));
    let fourth = capacity::probe_capacity(&report, &opts).unwrap();
    assert!(!fourth.from_cache);
    assert!(capacity::read_cache(cache.path(), &fp).unwrap().is_some());
}

#[test]
fn a_different_machine_does_not_use_this_cache() {
    let _heavy = heavy();
    let cache = tempfile::tempdir().unwrap();
    let mut report = Detector::new(Root::host()).detect();
    let fp = capacity::machine_fingerprint(&report);
    let c = capacity::measure(&fp, Duration::from_millis(400), 0).unwrap();
    capacity::write_cache(cache.path(), &c).unwrap();
    assert!(capacity::read_cache(cache.path(), &fp).unwrap().is_some());
    report.cpu.model = Some("Some Other CPU".into());
    let other = capacity::machine_fingerprint(&report);
    assert_ne!(fp, other);
    assert!(
        capacity::read_cache(cache.path(), &other)
            .unwrap()
            .is_none()
    );
}

#[test]
fn probe_budget_is_validated() {
    let report = Detector::new(Root::host()).detect();
    let opts = ProbeOptions {
        budget: Duration::from_secs(600),
        ..ProbeOptions::default()
    };
    assert!(matches!(
        capacity::probe_capacity(&report, &opts),
        Err(Error::InvalidLimit { name: "budget", .. })
    ));
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_gemm_without_the_cuda_feature_is_feature_disabled() {
    let _heavy = heavy();
    let r = capacity::gemm_cuda(
        0,
        candle_core::DType::F32,
        "f32",
        Duration::from_millis(100),
    );
    assert!(matches!(
        r,
        Err(Error::FeatureDisabled {
            feature: "cuda",
            ..
        })
    ));
    // measure() turns it into figures with a note, not an error.
    let c = capacity::measure("fp", Duration::from_millis(400), 1).unwrap();
    let gpu: Vec<_> = c.gemm.iter().filter(|g| g.device == "cuda:0").collect();
    assert_eq!(gpu.len(), 3);
    assert!(gpu.iter().all(|g| {
        g.gflops.is_none()
            && g.note
                .as_deref()
                .is_some_and(|n| n.contains("`cuda` feature"))
    }));
}

/// Unmounts the small tmpfs when dropped.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A write that fails half way (a 2 MiB tmpfs fills up) returns an error naming the file, and
/// the probe file is removed anyway. Needs root (it mounts a small tmpfs).
#[test]
fn storage_probe_cleans_up_after_a_failed_write() {
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(dir.path())
        .status()
        .expect("this test needs the `mount` command");
    assert!(
        status.success(),
        "this test needs root to mount a 2 MiB tmpfs at {} (it fills it up to make the probe fail)",
        dir.path().display()
    );
    let _mounted = Mounted(dir.path().to_path_buf());
    let limits = BandwidthLimits {
        max_bytes: 64 << 20,
        max_duration: Duration::from_secs(5),
    };
    let err = storage::measure_bandwidth(dir.path(), limits).unwrap_err();
    match &err {
        Error::Io { op, path, .. } => {
            assert!(matches!(*op, "write" | "fsync"), "{err}");
            assert!(path.starts_with(dir.path()), "{err}");
        }
        other => panic!("expected an I/O error, got {other}"),
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "probe file left behind after an error"
    );
}
