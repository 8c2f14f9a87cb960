//! A real cgroup-v1 memory group: a process inside it must report the group's limit.
//!
//! Needs root and the v1 memory controller at `/sys/fs/cgroup/memory` (as on the machines
//! this project is developed on). Without them the test fails and says so.

use std::path::{Path, PathBuf};
use std::process::Command;

use eg_hardware::memory::{CgroupVersion, Limit};
use eg_hardware::{Detector, HardwareReport, Root};

const MEMCG: &str = "/sys/fs/cgroup/memory";
const MARKER: &str = "EG-HW-REPORT:";

/// Removes the groups (innermost first) even when the test fails.
struct Groups(Vec<PathBuf>);

impl Drop for Groups {
    fn drop(&mut self) {
        for g in self.0.iter().rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(g).is_ok() || !g.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

fn prerequisites() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc_geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (it creates a cgroup under {MEMCG}); run `cargo test -p eg-hardware` as root"
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(" /sys/fs/cgroup/memory cgroup ") && l.contains("memory")),
        "this test needs the cgroup-v1 memory controller mounted at {MEMCG}"
    );
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Helper run by `process_inside_a_v1_group_reports_its_limit` inside the group: prints the
/// report. Ignored on its own (it checks nothing).
#[test]
#[ignore = "helper: run inside a cgroup by process_inside_a_v1_group_reports_its_limit"]
fn child_prints_report() {
    let r = Detector::new(Root::host()).detect();
    println!("{MARKER}{}", serde_json::to_string(&r).unwrap());
}

#[test]
fn process_inside_a_v1_group_reports_its_limit() {
    prerequisites();
    let name = format!("eg-hw-test-{}", std::process::id());
    let outer = Path::new(MEMCG).join(&name);
    let inner = outer.join("job");
    let groups = Groups(vec![outer.clone(), inner.clone()]);
    std::fs::create_dir(&outer).unwrap();
    std::fs::create_dir(&inner).unwrap();
    // The limit sits on the outer group; the process runs in the inner one, which has none.
    let limit: u64 = 512 << 20;
    std::fs::write(outer.join("memory.limit_in_bytes"), limit.to_string()).unwrap();
    std::fs::write(
        inner.join("memory.limit_in_bytes"),
        (2u64 << 30).to_string(),
    )
    .unwrap();

    let exe = std::env::current_exe().unwrap();
    let procs = inner.join("cgroup.procs");
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$1" && shift && exec "$@""#)
        .arg("sh")
        .arg(&procs)
        .arg(&exe)
        .args([
            "cgroup_real::child_prints_report",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = stdout
        .lines()
        .find_map(|l| l.find(MARKER).map(|i| &l[i + MARKER.len()..]))
        .unwrap_or_else(|| panic!("no report in child output: {stdout}"));
    let r: HardwareReport = serde_json::from_str(json).unwrap();
    let cg = &r.memory.cgroup;
    assert_eq!(cg.version, CgroupVersion::V1);
    assert_eq!(cg.dir.as_deref(), Some(inner.to_str().unwrap()));
    assert_eq!(cg.limit, Limit::Bytes(limit));
    assert_eq!(r.memory.effective_limit_bytes, Some(limit));
    assert!(r.memory.effective_available_bytes.unwrap() <= limit);
    drop(groups);
    assert!(
        !outer.exists(),
        "test cgroup {} left behind",
        outer.display()
    );
}
