//! This machine, checked against independent sources.

use eg_hardware::cpu::KERNEL_FEATURES;
use eg_hardware::gpu::GpuStatus;
use eg_hardware::{Detector, Root};
use std::process::Command;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("this test needs `{cmd}` on PATH: {e}"));
    assert!(out.status.success(), "`{cmd}` failed");
    String::from_utf8(out.stdout).unwrap()
}

fn meminfo_kib(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("this test needs /proc/meminfo");
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k == key).then(|| v.split_whitespace().next().unwrap().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("/proc/meminfo has no {key}"))
}

#[test]
fn memory_matches_proc_meminfo() {
    let r = Detector::new(Root::host()).detect();
    assert_eq!(r.memory.total_bytes, Some(meminfo_kib("MemTotal") * 1024));
    assert_eq!(
        r.memory.swap_total_bytes,
        Some(meminfo_kib("SwapTotal") * 1024)
    );
    // MemAvailable moves; allow 256 MiB of drift between the two reads.
    let avail = meminfo_kib("MemAvailable") * 1024;
    let got = r.memory.available_bytes.unwrap();
    assert!(got.abs_diff(avail) < 256 << 20, "{got} vs {avail}");
    let limit = r.memory.effective_limit_bytes.unwrap();
    assert!(limit > 0 && limit <= r.memory.total_bytes.unwrap());
}

#[test]
fn cores_match_nproc() {
    let r = Detector::new(Root::host()).detect();
    let nproc: u32 = run("nproc", &[]).trim().parse().unwrap();
    assert_eq!(r.cpu.usable_cores, Some(nproc));
    let all: u32 = run("nproc", &["--all"]).trim().parse().unwrap();
    assert_eq!(r.cpu.logical_cores, Some(all));
    // This machine's process runs in the root CPU group (cfs_quota_us = -1).
    assert_eq!(r.cpu.cgroup_quota, eg_hardware::cpu::CpuQuota::Unlimited);
    let phys = r.cpu.physical_cores.unwrap();
    assert!(phys >= 1 && phys <= all);
}

#[test]
fn features_match_proc_cpuinfo_flags() {
    let text = std::fs::read_to_string("/proc/cpuinfo").expect("this test needs /proc/cpuinfo");
    let flags: Vec<&str> = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k.trim(), "flags" | "Features").then(|| v.split_whitespace().collect())
        })
        .expect("/proc/cpuinfo has no flags line");
    let r = Detector::new(Root::host()).detect();
    let features = r
        .cpu
        .features
        .clone()
        .expect("features known on this machine");
    for (name, implied_by) in KERNEL_FEATURES {
        let expected = implied_by.iter().any(|f| flags.contains(f));
        assert_eq!(features.iter().any(|x| x == name), expected, "{name}");
    }
    let model = text.lines().find_map(|l| {
        l.strip_prefix("model name")
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
    });
    assert_eq!(r.cpu.model, model);
}

#[test]
fn storage_free_space_matches_df() {
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let r = Detector::new(Root::host())
        .storage_path(dir.path())
        .detect();
    let s = &r.storage[0];
    let df = run(
        "df",
        &["-B1", "--output=avail,size", dir.path().to_str().unwrap()],
    );
    let nums: Vec<u64> = df
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(s.total_bytes, Some(nums[1]));
    // Other builds write to this disk meanwhile: allow 1 GiB.
    assert!(s.free_bytes.unwrap().abs_diff(nums[0]) < 1 << 30);
    assert!(s.mount_point.is_some() && s.filesystem.is_some());
}

#[test]
fn gpu_answer_is_normal_without_a_driver() {
    let r = Detector::new(Root::host()).detect();
    let lib_present = [
        "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
        "/usr/lib64/libnvidia-ml.so.1",
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists());
    match &r.gpu.status {
        GpuStatus::NoDriver(reason) => {
            assert!(!lib_present);
            assert!(reason.contains("no NVIDIA driver found"), "{reason}");
        }
        GpuStatus::Available => assert!(lib_present),
        other => panic!("unexpected GPU status {other:?}"),
    }
}
