//! Live readers on fixture trees built here: a cgroup v2 container, a v1 container, PSI, and
//! a sequence of readings driven through the pressure detector and the controller.

use std::fs;
use std::path::Path;

use eg_hardware::memory::{CgroupVersion, Limit};
use eg_hardware::{Detector, Root};
use eg_memory::live::{self, Sampler};
use eg_memory::{
    Action, Controller, ControllerConfig, Error, Level, OffloadKind, PressureDetector, Reading,
    Strategy, Thresholds,
};

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

const STATUS: &str =
    "Name:\teg\nVmPeak:\t 9000000 kB\nVmHWM:\t 3000000 kB\nVmRSS:\t 2500000 kB\nThreads:\t4\n";
const PSI: &str = "some avg10=12.50 avg60=3.00 avg300=1.00 total=123456\nfull avg10=0.40 avg60=0.10 avg300=0.00 total=789\n";

/// A container in a cgroup v2 group `/train` with a 4 GiB limit.
fn v2_tree(dir: &Path) {
    write(dir, "proc/self/status", STATUS);
    write(dir, "proc/self/cgroup", "0::/train\n");
    write(
        dir,
        "proc/self/mountinfo",
        "1001 1000 0:52 / / rw,relatime - overlay overlay rw\n\
         1010 1001 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw\n",
    );
    write(
        dir,
        "proc/meminfo",
        "MemTotal:       16777216 kB\nMemAvailable:   8388608 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n",
    );
    write(dir, "proc/pressure/memory", PSI);
    write(dir, "sys/fs/cgroup/cgroup.controllers", "cpu memory pids\n");
    write(dir, "sys/fs/cgroup/train/memory.max", "4294967296\n");
    write(dir, "sys/fs/cgroup/train/memory.high", "max\n");
    write(dir, "sys/fs/cgroup/train/memory.current", "3221225472\n");
    write(dir, "sys/fs/cgroup/train/memory.peak", "3500000000\n");
    write(
        dir,
        "sys/fs/cgroup/train/memory.events",
        "low 0\nhigh 0\nmax 12\noom 0\noom_kill 0\noom_group_kill 0\n",
    );
}

/// A container in a cgroup v1 memory group with a 2 GiB limit.
fn v1_tree(dir: &Path) {
    write(dir, "proc/self/status", STATUS);
    write(dir, "proc/self/cgroup", "4:memory:/docker/abc\n0::/\n");
    write(
        dir,
        "proc/self/mountinfo",
        "500 400 0:52 / / rw,relatime - overlay overlay rw\n\
         515 500 0:33 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n",
    );
    write(
        dir,
        "proc/meminfo",
        "MemTotal:       16777216 kB\nMemAvailable:   8388608 kB\n",
    );
    write(
        dir,
        "sys/fs/cgroup/memory/memory.limit_in_bytes",
        "2147483648\n",
    );
    write(
        dir,
        "sys/fs/cgroup/memory/memory.usage_in_bytes",
        "1073741824\n",
    );
    write(
        dir,
        "sys/fs/cgroup/memory/memory.max_usage_in_bytes",
        "1500000000\n",
    );
    write(
        dir,
        "sys/fs/cgroup/memory/memory.oom_control",
        "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
    );
}

#[test]
fn process_status_rss_and_hwm() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), "proc/self/status", STATUS);
    let p = live::process_memory(&Root::new(t.path())).unwrap().unwrap();
    assert_eq!(p.rss, 2_500_000 * 1024);
    assert_eq!(p.hwm, 3_000_000 * 1024);
}

#[test]
fn missing_files_are_unknown_not_zero() {
    let t = tempfile::tempdir().unwrap();
    let root = Root::new(t.path());
    assert_eq!(live::process_memory(&root).unwrap(), None);
    assert_eq!(live::psi(&root).unwrap(), None);
    let c = live::cgroup_sample(&root, CgroupVersion::V2, "/sys/fs/cgroup").unwrap();
    assert_eq!(c.usage, None);
    assert_eq!(c.limit, Limit::Unknown);
    assert_eq!(c.events, None);
}

#[test]
fn malformed_files_are_parse_errors_naming_the_file() {
    let t = tempfile::tempdir().unwrap();
    write(
        t.path(),
        "proc/self/status",
        "VmRSS:\t lots kB\nVmHWM:\t 1 kB\n",
    );
    write(t.path(), "proc/pressure/memory", "some avg10=oops\n");
    write(t.path(), "sys/fs/cgroup/memory.current", "12abc\n");
    let root = Root::new(t.path());
    let e = live::process_memory(&root).unwrap_err();
    assert!(matches!(e, Error::Parse { .. }));
    assert!(e.to_string().contains("status"), "{e}");
    assert!(live::psi(&root).is_err());
    let e = live::cgroup_sample(&root, CgroupVersion::V2, "/sys/fs/cgroup").unwrap_err();
    assert!(e.to_string().contains("memory.current"), "{e}");
}

#[test]
fn cgroup_v2_fixture_through_hardware_detection() {
    let t = tempfile::tempdir().unwrap();
    v2_tree(t.path());
    let root = Root::new(t.path());
    let report = Detector::new(root.clone()).detect();
    assert_eq!(report.memory.cgroup.version, CgroupVersion::V2);
    let s = Sampler::new(root, &report.memory.cgroup).sample().unwrap();
    let c = s.cgroup.unwrap();
    assert_eq!(c.version, CgroupVersion::V2);
    assert_eq!(c.usage, Some(3 << 30));
    assert_eq!(c.limit, Limit::Bytes(4 << 30));
    assert_eq!(c.peak, Some(3_500_000_000));
    assert_eq!(c.events.unwrap().max, 12);
    assert_eq!(s.psi.unwrap().some.avg10, 12.5);
    assert_eq!(s.psi.unwrap().full.unwrap().avg10, 0.4);
    // In a limited group the cgroup's usage is what counts.
    assert_eq!(s.used_bytes(), Some(3 << 30));
    let r = Reading::from_sample(0, &s, 4 << 30, None);
    assert!((r.used_fraction - 0.75).abs() < 1e-12);
    // PSI some 12.5 % is above the Elevated enter threshold.
    let mut d = PressureDetector::new(Thresholds::default()).unwrap();
    assert_eq!(d.observe(&r), Level::Elevated);
}

#[test]
fn cgroup_v2_unlimited_counts_rss() {
    let t = tempfile::tempdir().unwrap();
    v2_tree(t.path());
    write(t.path(), "sys/fs/cgroup/train/memory.max", "max\n");
    let root = Root::new(t.path());
    let s = Sampler::with_cgroup(
        root,
        Some((CgroupVersion::V2, "/sys/fs/cgroup/train".into())),
    )
    .sample()
    .unwrap();
    assert_eq!(s.cgroup.unwrap().limit, Limit::Unlimited);
    assert_eq!(s.used_bytes(), Some(2_500_000 * 1024));
}

#[test]
fn cgroup_v1_fixture_through_hardware_detection() {
    let t = tempfile::tempdir().unwrap();
    v1_tree(t.path());
    let root = Root::new(t.path());
    let report = Detector::new(root.clone()).detect();
    assert_eq!(report.memory.cgroup.version, CgroupVersion::V1);
    let s = Sampler::new(root, &report.memory.cgroup).sample().unwrap();
    let c = s.cgroup.unwrap();
    assert_eq!(c.usage, Some(1 << 30));
    assert_eq!(c.limit, Limit::Bytes(2 << 30));
    assert_eq!(c.peak, Some(1_500_000_000));
    assert!(!c.events.unwrap().under_oom);
    assert_eq!(s.psi, None);
}

#[test]
fn v1_unlimited_sentinel() {
    let t = tempfile::tempdir().unwrap();
    write(
        t.path(),
        "cg/memory.limit_in_bytes",
        "9223372036854771712\n",
    );
    let c = live::cgroup_sample(&Root::new(t.path()), CgroupVersion::V1, "/cg").unwrap();
    assert_eq!(c.limit, Limit::Unlimited);
}

#[test]
fn oom_events_between_samples_are_critical() {
    let t = tempfile::tempdir().unwrap();
    v2_tree(t.path());
    write(
        t.path(),
        "proc/pressure/memory",
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    );
    let root = Root::new(t.path());
    let sampler = Sampler::with_cgroup(
        root,
        Some((CgroupVersion::V2, "/sys/fs/cgroup/train".into())),
    );
    let first = sampler.sample().unwrap();
    write(
        t.path(),
        "sys/fs/cgroup/train/memory.events",
        "low 0\nhigh 0\nmax 20\noom 1\noom_kill 1\n",
    );
    let second = sampler.sample().unwrap();
    let prev = first.cgroup.unwrap().events.unwrap();
    let r = Reading::from_sample(1_000, &second, 4 << 30, Some(&prev));
    assert!(r.oom_event);
    let mut d = PressureDetector::new(Thresholds::default()).unwrap();
    assert_eq!(d.observe(&r), Level::Critical);
}

/// A memory hog grows next to the job and then leaves: the fixture's `memory.current` is
/// rewritten at each tick; the detector and controller react and recover with the same
/// global batch.
#[test]
fn pressure_episode_on_a_v2_fixture_drives_the_controller() {
    let t = tempfile::tempdir().unwrap();
    v2_tree(t.path());
    write(
        t.path(),
        "proc/pressure/memory",
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    );
    let root = Root::new(t.path());
    let sampler = Sampler::with_cgroup(
        root,
        Some((CgroupVersion::V2, "/sys/fs/cgroup/train".into())),
    );
    let limit: u64 = 4 << 30;
    let mut detector = PressureDetector::new(Thresholds::default()).unwrap();
    let planned = Strategy {
        micro_batch: 4,
        accumulation: 4,
        checkpointing: false,
        offload: OffloadKind::None,
    };
    let mut ctl = Controller::new(ControllerConfig::new(16), planned).unwrap();
    let mut decisions = Vec::new();
    // 0-10 s calm, 10-20 s near the limit, then calm for 5 minutes; one tick per second.
    for sec in 0..320u64 {
        let frac = if (10..20).contains(&sec) { 0.97 } else { 0.5 };
        write(
            t.path(),
            "sys/fs/cgroup/train/memory.current",
            &format!("{}\n", (limit as f64 * frac) as u64),
        );
        let s = sampler.sample().unwrap();
        let level = detector.observe(&Reading::from_sample(sec * 1000, &s, limit, None));
        if let Some(d) = ctl.observe(sec * 1000, level) {
            let after = ctl.current();
            assert_eq!(after.micro_batch * after.accumulation, 16);
            decisions.push(d);
        }
    }
    let actions: Vec<Action> = decisions.iter().map(|d| d.action).collect();
    assert_eq!(
        actions,
        [
            Action::ShrinkMicroBatch { from: 4, to: 2 },
            Action::ShrinkMicroBatch { from: 2, to: 1 },
            Action::EnableCheckpointing,
            Action::EnableOffload,
            Action::Exhausted,
            Action::DisableOffload,
            Action::DisableCheckpointing,
            Action::GrowMicroBatch { from: 1, to: 2 },
            Action::GrowMicroBatch { from: 2, to: 4 },
        ]
    );
    assert_eq!(ctl.current(), planned);
    // Decisions are serde records.
    let json = serde_json::to_string(&decisions).unwrap();
    let back: Vec<eg_memory::Decision> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, decisions);
}

#[test]
fn host_process_memory_is_readable() {
    let p = live::process_memory(&Root::host()).unwrap().unwrap();
    assert!(p.rss > 0);
    assert!(p.hwm >= p.rss);
}

/// A fake NVML with one GPU of 16 GiB, 15 GiB of it used, and one that cannot be queried.
struct FakeNvml;

impl eg_hardware::gpu::NvmlSource for FakeNvml {
    fn driver_version(&self) -> Option<String> {
        Some("550.0".into())
    }
    fn cuda_driver_version(&self) -> Option<i32> {
        Some(12040)
    }
    fn device_count(&self) -> Result<u32, eg_hardware::gpu::NvmlUnavailable> {
        Ok(2)
    }
    fn device(
        &self,
        index: u32,
    ) -> Result<eg_hardware::gpu::RawGpu, eg_hardware::gpu::NvmlUnavailable> {
        match index {
            0 => Ok(eg_hardware::gpu::RawGpu {
                memory_total: Some(16 << 30),
                memory_free: Some(1 << 30),
                ..Default::default()
            }),
            _ => Err(eg_hardware::gpu::NvmlUnavailable::Failed("lost".into())),
        }
    }
}

#[test]
fn gpu_memory_from_nvml_counts_toward_pressure() {
    let t = tempfile::tempdir().unwrap();
    v2_tree(t.path());
    write(
        t.path(),
        "proc/pressure/memory",
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    );
    write(
        t.path(),
        "sys/fs/cgroup/train/memory.current",
        "1073741824\n",
    );
    let sampler = Sampler::with_cgroup(
        Root::new(t.path()),
        Some((CgroupVersion::V2, "/sys/fs/cgroup/train".into())),
    )
    .gpu(Box::new(FakeNvml));
    let s = sampler.sample().unwrap();
    let gpus = s.gpus.clone().unwrap();
    assert_eq!(gpus.len(), 2);
    assert_eq!(gpus[0].used, Some(15 << 30));
    assert_eq!(gpus[1].used, None);
    assert!((s.gpu_used_fraction().unwrap() - 15.0 / 16.0).abs() < 1e-12);
    // RAM is at 25 % of the cgroup, the GPU at 94 %: Elevated.
    let r = Reading::from_sample(0, &s, 4 << 30, None);
    let mut d = PressureDetector::new(Thresholds::default()).unwrap();
    assert_eq!(d.observe(&r), Level::Elevated);
}
