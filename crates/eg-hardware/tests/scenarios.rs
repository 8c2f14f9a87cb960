//! Fixture scenarios.

use eg_hardware::capacity::Strategy;
use eg_hardware::cpu::{CpuQuota, IsaFamily};
use eg_hardware::memory::{CgroupVersion, Limit};
use eg_hardware::storage::StorageKind;
use eg_hardware::thermal::PowerSource;
use eg_hardware::{Detector, HardwareReport, Root, SCHEMA_VERSION};

const GIB: u64 = 1 << 30;

pub(crate) fn fixture(name: &str) -> Root {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    assert!(p.is_dir(), "fixture {} missing", p.display());
    Root::new(p)
}

fn detect(name: &str, paths: &[&str]) -> HardwareReport {
    paths
        .iter()
        .fold(Detector::new(fixture(name)), |d, p| d.storage_path(p))
        .detect()
}

fn warned(r: &HardwareReport, needle: &str) -> bool {
    r.warnings.iter().any(|w| w.contains(needle))
}

#[test]
fn cgroup_v2_container_with_4_gib_limit_on_256_gib_host() {
    let r = detect("cgroup-v2-container", &["/workspace/ckpt"]);
    assert_eq!(r.memory.total_bytes, Some(256 * GIB));
    assert_eq!(r.memory.cgroup.version, CgroupVersion::V2);
    assert_eq!(r.memory.cgroup.limit, Limit::Bytes(4 * GIB));
    assert_eq!(r.memory.cgroup.high, Limit::Unlimited);
    assert_eq!(r.memory.cgroup.usage_bytes, Some(GIB));
    assert_eq!(r.memory.effective_limit_bytes, Some(4 * GIB));
    assert_eq!(r.memory.effective_available_bytes, Some(3 * GIB));
    assert_eq!(
        r.memory.shm.as_ref().and_then(|s| s.total_bytes),
        Some(64 << 20)
    );
    // Fits are computed from the 4 GiB budget, not the host's 256 GiB.
    let full = r
        .fits
        .iter()
        .find(|f| f.strategy == Strategy::FullF32)
        .unwrap();
    assert_eq!(full.budget_bytes, Some(4 * GIB));
    assert!(full.rough);
    // CPU: Sapphire Rapids features.
    assert_eq!(r.cpu.isa, IsaFamily::X86);
    assert_eq!(r.cpu.vendor.as_deref(), Some("GenuineIntel"));
    for f in [
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
        "amx_bf16",
    ] {
        assert_eq!(r.cpu.has(f), Some(true), "{f}");
    }
    assert_eq!(r.cpu.has("sve"), Some(false));
    assert_eq!(r.cpu.logical_cores, Some(4));
    assert_eq!(r.cpu.caches.len(), 4);
    assert_eq!(r.cpu.cgroup_quota, CpuQuota::Cores(2.0));
    assert_eq!(r.cpu.caches[3].size_bytes, Some(107_520 * 1024));
    // Fixture roots make no system calls: free space and affinity are unknown, not the host's.
    assert_eq!(r.cpu.usable_cores, None);
    // The container's / is an overlay: the device is not visible.
    assert_eq!(r.storage[0].filesystem.as_deref(), Some("overlay"));
    assert_eq!(r.storage[0].kind, StorageKind::Unknown);
    assert_eq!(r.storage[0].free_bytes, None);
    assert!(warned(&r, "overlay"), "{:?}", r.warnings);
}

#[test]
fn cgroup_v2_limit_on_an_ancestor_and_high_on_the_leaf() {
    let r = detect("cgroup-v2-nested", &[]);
    let cg = &r.memory.cgroup;
    assert_eq!(cg.version, CgroupVersion::V2);
    assert_eq!(
        cg.dir.as_deref(),
        Some("/sys/fs/cgroup/kubepods.slice/pod42.slice/cri-abc.scope")
    );
    assert_eq!(cg.limit, Limit::Bytes(8 * GIB));
    assert_eq!(cg.high, Limit::Bytes(6 * GIB));
    assert_eq!(r.cpu.cgroup_quota, CpuQuota::Cores(4.0));
    assert_eq!(r.memory.effective_limit_bytes, Some(6 * GIB));
    assert_eq!(r.memory.effective_available_bytes, Some(4 * GIB));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[test]
fn cgroup_v1_container() {
    let r = detect("cgroup-v1-container", &[]);
    let cg = &r.memory.cgroup;
    assert_eq!(cg.version, CgroupVersion::V1);
    // The mount root is the container's own group: its files are at the mount point.
    assert_eq!(cg.dir.as_deref(), Some("/sys/fs/cgroup/memory"));
    // memory.limit_in_bytes says 2 GiB, but memory.stat's hierarchical_memory_limit (an
    // ancestor outside the container's view) says 1.5 GiB: the tighter wins.
    assert_eq!(cg.limit, Limit::Bytes(1536 << 20));
    assert_eq!(cg.usage_bytes, Some(512 << 20));
    assert_eq!(r.cpu.cgroup_quota, CpuQuota::Cores(1.5));
    assert_eq!(r.memory.effective_limit_bytes, Some(1536 << 20));
    assert_eq!(r.memory.effective_available_bytes, Some(GIB));
    // No sysfs topology here: physical cores come from /proc/cpuinfo core ids.
    assert_eq!(r.cpu.logical_cores, Some(2));
    assert_eq!(r.cpu.physical_cores, Some(2));
    assert_eq!(r.cpu.has("avx512f"), Some(false));
    assert_eq!(r.cpu.has("avx2"), Some(true));
}

#[test]
fn max_in_memory_max_means_no_limit() {
    let r = detect("cgroup-v2-unlimited", &[]);
    assert_eq!(r.memory.cgroup.limit, Limit::Unlimited);
    assert_eq!(r.memory.cgroup.high, Limit::Unlimited);
    assert_eq!(r.memory.effective_limit_bytes, r.memory.total_bytes);
    assert_eq!(r.memory.effective_limit_bytes, Some(16_384_000 * 1024));
    assert!(!warned(&r, "memory.max"), "{:?}", r.warnings);
}

#[test]
fn laptop_on_battery_with_hwmon_sensors() {
    let r = detect("laptop-battery", &["/home/me/runs/a"]);
    assert_eq!(r.power.source, PowerSource::Battery);
    // The mouse battery (scope=Device) is not the laptop's.
    assert_eq!(r.power.batteries.len(), 1);
    assert_eq!(r.power.batteries[0].capacity_percent, Some(63));
    assert_eq!(r.power.batteries[0].status.as_deref(), Some("Discharging"));
    assert_eq!(r.power.cpu_governor.as_deref(), Some("powersave"));

    let s = &r.thermal.sensors;
    let labels: Vec<(&str, &str)> = s
        .iter()
        .map(|s| (s.chip.as_str(), s.label.as_str()))
        .collect();
    assert_eq!(
        labels,
        [
            ("nvme", "Composite"),
            ("coretemp", "Package id 0"),
            ("coretemp", "Core 0"),
            ("coretemp", "Core 8"),
            ("x86_pkg_temp", "thermal_zone0"),
        ]
    );
    assert_eq!(s[0].temperature_c, Some(38.85));
    assert_eq!(s[0].critical_c, Some(84.85));
    assert_eq!(s[1].max_c, Some(100.0));
    assert_eq!(s[4].critical_c, Some(105.0));
    assert_eq!(r.thermal.hottest_c(), Some(61.0));

    assert_eq!(r.cpu.logical_cores, Some(8));
    assert_eq!(r.cpu.physical_cores, Some(4));
    assert_eq!(r.cpu.current_mhz, Some(1400.0));
    assert_eq!(r.cpu.max_mhz, Some(5000.0));
    assert_eq!(r.memory.swap_total_bytes, Some(8_388_604 * 1024));
    assert_eq!(r.memory.cgroup.limit, Limit::Unlimited);

    let st = &r.storage[0];
    assert_eq!(st.kind, StorageKind::Nvme);
    assert_eq!(st.disk.as_deref(), Some("nvme0n1"));
    assert_eq!(st.model.as_deref(), Some("Samsung SSD 980 PRO 1TB"));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[test]
fn server_without_sensors_says_so() {
    let r = detect("server-no-sensors", &["/srv/data"]);
    assert!(r.thermal.sensors.is_empty());
    assert_eq!(r.thermal.hottest_c(), None);
    assert_eq!(r.power.source, PowerSource::Unknown);
    assert!(r.power.batteries.is_empty());
    assert_eq!(r.power.cpu_governor, None);
    assert_eq!(r.cpu.sockets, Some(2));
    assert_eq!(r.cpu.cgroup_quota, CpuQuota::Unlimited);
    assert_eq!(r.cpu.numa_nodes, Some(2));
    assert_eq!(r.cpu.physical_cores, Some(8));
    assert_eq!(r.cpu.has("amx_tile"), Some(false));
    assert_eq!(r.cpu.has("avx512_bf16"), Some(true));
    // The root cgroup has no memory.max: no limit, and no warning about it.
    assert_eq!(r.memory.cgroup.version, CgroupVersion::V2);
    assert_eq!(r.memory.cgroup.limit, Limit::Unlimited);
    assert_eq!(r.memory.effective_limit_bytes, r.memory.total_bytes);
    assert_eq!(r.storage[0].kind, StorageKind::Ssd);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let text = r.to_string();
    assert!(text.contains("no sensors exposed"), "{text}");
    assert!(text.contains("Power     unknown"), "{text}");
}

#[test]
fn nvme_and_hdd_and_friends() {
    let r = detect(
        "nvme-hdd",
        &[
            "/home/me/ckpt",
            "/data/shards",
            "/mnt/shared/x",
            "/dev/shm/offload",
            "/var/lib/docker/overlay2/x/merged/app",
            "/backup",
        ],
    );
    let kinds: Vec<StorageKind> = r.storage.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        [
            StorageKind::Nvme,
            StorageKind::Hdd,
            StorageKind::Network,
            StorageKind::Tmpfs,
            StorageKind::Unknown,
            StorageKind::Ssd,
        ]
    );
    assert_eq!(r.storage[0].device.as_deref(), Some("nvme0n1p2"));
    assert_eq!(r.storage[0].disk.as_deref(), Some("nvme0n1"));
    assert_eq!(r.storage[1].mount_point.as_deref(), Some("/data"));
    assert_eq!(r.storage[1].filesystem.as_deref(), Some("xfs"));
    assert_eq!(r.storage[1].model.as_deref(), Some("ST8000VN004-3CP1"));
    assert_eq!(r.storage[5].disk.as_deref(), Some("sdb"));
    assert!(warned(&r, "overlay"));
    assert_eq!(r.cpu.vendor.as_deref(), Some("AuthenticAMD"));
    // Root cgroup of a cgroup2 host: no limit.
    assert_eq!(r.memory.cgroup.limit, Limit::Unlimited);
    assert_eq!(r.memory.effective_limit_bytes, r.memory.total_bytes);
}

#[test]
fn cgroup_v2_group_without_a_mounted_hierarchy_is_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let w = |p: &str, s: &str| {
        let f = dir.path().join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, s).unwrap();
    };
    w("proc/meminfo", "MemTotal: 1000 kB\nMemAvailable: 500 kB\n");
    w("proc/self/cgroup", "0::/\n");
    w(
        "proc/self/mountinfo",
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n",
    );
    let r = Detector::new(Root::new(dir.path())).detect();
    assert_eq!(r.memory.cgroup.version, CgroupVersion::V2);
    assert_eq!(r.memory.cgroup.limit, Limit::Unknown);
    assert_eq!(r.memory.effective_limit_bytes, None);
    assert!(warned(&r, "cgroup2 is not mounted"), "{:?}", r.warnings);
}

#[test]
fn malformed_files_give_unknown_and_warnings_never_zero_or_panic() {
    let r = detect("malformed", &["/x"]);
    // Truncated /proc/cpuinfo: model known, features unknown.
    assert_eq!(
        r.cpu.model.as_deref(),
        Some("Intel(R) Xeon(R) Platinum 8480+")
    );
    assert_eq!(r.cpu.features, None);
    assert_eq!(r.cpu.has("avx2"), None);
    assert!(warned(&r, "flags"), "{:?}", r.warnings);
    assert_eq!(r.cpu.cgroup_quota, CpuQuota::Unknown);
    assert!(warned(&r, "cpu.max"), "{:?}", r.warnings);
    // Garbage in memory.max: limit unknown, so the effective budget is unknown (not MemTotal,
    // not 0).
    assert_eq!(r.memory.cgroup.limit, Limit::Unknown);
    assert!(warned(&r, "memory.max"), "{:?}", r.warnings);
    assert_eq!(r.memory.total_bytes, Some(16_384_000 * 1024));
    assert_eq!(r.memory.available_bytes, None);
    assert!(warned(&r, "MemAvailable"));
    assert_eq!(r.memory.effective_limit_bytes, None);
    assert_eq!(r.memory.effective_available_bytes, None);
    assert_eq!(r.memory.cgroup.usage_bytes, None);
    assert!(
        r.fits
            .iter()
            .all(|f| f.max_params.is_none() && f.budget_bytes.is_none())
    );
    // Sensor reading "N/A" and cache size "32Q".
    assert_eq!(r.thermal.sensors[0].temperature_c, None);
    assert_eq!(r.cpu.caches[0].size_bytes, None);
    // A garbage mountinfo line is skipped with a warning.
    assert!(warned(&r, "mountinfo"));
    // Rendering says "unknown".
    let text = r.to_string();
    assert!(text.contains("effective budget: unknown"), "{text}");
}

#[test]
fn an_empty_root_is_all_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let r = Detector::new(Root::new(dir.path()))
        .storage_path("/x")
        .detect();
    assert_eq!(r.cpu.model, None);
    assert_eq!(r.cpu.logical_cores, None);
    assert_eq!(r.cpu.features, None);
    assert_eq!(r.memory.total_bytes, None);
    assert_eq!(r.memory.effective_limit_bytes, None);
    assert_eq!(r.memory.cgroup.version, CgroupVersion::None);
    assert_eq!(r.storage[0].kind, StorageKind::Unknown);
    assert!(!r.warnings.is_empty());
    let _ = r.to_string();
}

#[test]
fn every_fixture_round_trips_through_json() {
    for name in [
        "cgroup-v2-container",
        "cgroup-v2-nested",
        "cgroup-v2-unlimited",
        "cgroup-v1-container",
        "laptop-battery",
        "server-no-sensors",
        "nvme-hdd",
        "malformed",
        "arm-server",
    ] {
        let r = detect(name, &["/data/x"]);
        assert_eq!(r.schema_version, SCHEMA_VERSION);
        let json = serde_json::to_string(&r).unwrap();
        let back: HardwareReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r, "{name}");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["schema_version"], 1);
    }
}

#[test]
fn json_shape_of_limits_is_documented() {
    let r = detect("cgroup-v2-container", &[]);
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["memory"]["cgroup"]["limit"]["bytes"], 4 * GIB);
    assert_eq!(v["memory"]["cgroup"]["high"], "unlimited");
    assert_eq!(v["memory"]["cgroup"]["version"], "v2");
    assert_eq!(v["gpu"]["status"]["state"], "not_queried");
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever memory.max holds, detection does not panic, never reports a 0 budget from
        /// garbage, and reports bytes only for what parses as bytes.
        #[test]
        fn any_memory_max_is_safe(content in ".{0,40}") {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path();
            let w = |p: &str, s: &str| {
                let f = root.join(p);
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                std::fs::write(f, s).unwrap();
            };
            w("proc/meminfo", "MemTotal: 1000 kB\nMemAvailable: 500 kB\n");
            w("proc/self/cgroup", "0::/g\n");
            w("proc/self/mountinfo", "1 0 0:1 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
            w("sys/fs/cgroup/g/memory.max", &content);
            let r = Detector::new(Root::new(root)).detect();
            match content.trim().parse::<u64>() {
                Ok(b) => prop_assert_eq!(r.memory.cgroup.limit, Limit::Bytes(b)),
                Err(_) if content.trim() == "max" => prop_assert_eq!(r.memory.cgroup.limit, Limit::Unlimited),
                Err(_) => {
                    prop_assert_eq!(r.memory.cgroup.limit, Limit::Unknown);
                    prop_assert_eq!(r.memory.effective_limit_bytes, None);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Arbitrary text in every file detection reads never panics, and what is reported is
        /// never a zero budget conjured from garbage.
        #[test]
        fn arbitrary_system_files_never_panic(
            cpuinfo in "(.|\n){0,300}",
            meminfo in "(.|\n){0,120}",
            mountinfo in "(.|\n){0,200}",
            cgroup in "(.|\n){0,80}",
            number in ".{0,20}",
        ) {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path();
            let w = |p: &str, s: &str| {
                let f = root.join(p);
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                std::fs::write(f, s).unwrap();
            };
            w("proc/cpuinfo", &cpuinfo);
            w("proc/meminfo", &meminfo);
            w("proc/self/mountinfo", &mountinfo);
            w("proc/self/cgroup", &cgroup);
            w("sys/devices/system/cpu/online", &number);
            w("sys/devices/system/cpu/cpu0/cache/index0/size", &number);
            w("sys/class/hwmon/hwmon0/temp1_input", &number);
            w("sys/class/power_supply/BAT0/type", "Battery\n");
            w("sys/class/power_supply/BAT0/capacity", &number);
            let r = Detector::new(Root::new(root)).storage_path("/a/b").detect();
            let _ = r.to_string();
            let _ = serde_json::to_string(&r).unwrap();
            if let Some(b) = r.memory.effective_limit_bytes {
                prop_assert!(r.memory.total_bytes.is_some_and(|t| b <= t));
            }
        }
    }
}
