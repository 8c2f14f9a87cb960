//! CPU: vendor, model, cores, NUMA nodes, caches, ISA features, frequency.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

use crate::mounts::Mount;
use crate::root::{self, Missing, Notes, Root};

/// A CPU bandwidth limit from the cgroup (`cpu.max` in v2, `cpu.cfs_quota_us` /
/// `cpu.cfs_period_us` in v1), tightest over the group and its ancestors.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuQuota {
    /// At most this many CPUs' worth of time (quota / period), e.g. `1.5`.
    Cores(f64),
    /// No quota is set, or the process is in no CPU cgroup.
    Unlimited,
    /// The quota could not be read or parsed (a warning says why).
    Unknown,
}

impl CpuQuota {
    fn tighter(self, other: CpuQuota) -> CpuQuota {
        match (self, other) {
            (CpuQuota::Cores(a), CpuQuota::Cores(b)) => CpuQuota::Cores(a.min(b)),
            (CpuQuota::Cores(a), _) | (_, CpuQuota::Cores(a)) => CpuQuota::Cores(a),
            (CpuQuota::Unknown, _) | (_, CpuQuota::Unknown) => CpuQuota::Unknown,
            _ => CpuQuota::Unlimited,
        }
    }
}

/// The instruction-set family, as seen from the layout of `/proc/cpuinfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsaFamily {
    /// x86-64 (`flags` lines).
    X86,
    /// 64-bit Arm (`Features` lines).
    Arm,
    /// Neither could be recognised.
    Unknown,
}

/// One CPU cache level as seen by CPU 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheInfo {
    /// Level (1, 2, 3, ...).
    pub level: u32,
    /// `Data`, `Instruction` or `Unified`.
    pub kind: String,
    /// Size in bytes of one instance of this cache.
    pub size_bytes: Option<u64>,
    /// How many logical CPUs share one instance.
    pub shared_by_cpus: Option<u32>,
}

/// The CPU part of the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuReport {
    /// Instruction-set family.
    pub isa: IsaFamily,
    /// Vendor (`GenuineIntel`, `AuthenticAMD`, or the Arm implementer code).
    pub vendor: Option<String>,
    /// Model name.
    pub model: Option<String>,
    /// Logical CPUs online (`/sys/devices/system/cpu/online`, else `/proc/cpuinfo`).
    pub logical_cores: Option<u32>,
    /// Logical CPUs this process may run on (its affinity mask; what `nproc` prints).
    /// Only known on the host root.
    pub usable_cores: Option<u32>,
    /// Physical cores (distinct package/core pairs).
    pub physical_cores: Option<u32>,
    /// Sockets (distinct physical packages).
    pub sockets: Option<u32>,
    /// NUMA nodes online.
    pub numa_nodes: Option<u32>,
    /// CPU time limit of this process's cgroup.
    pub cgroup_quota: CpuQuota,
    /// Caches seen by CPU 0, by level.
    pub caches: Vec<CacheInfo>,
    /// Kernel-relevant ISA features present, by their canonical names (see
    /// [`KERNEL_FEATURES`]); `None` when the flags could not be read.
    pub features: Option<Vec<String>>,
    /// Current frequency of CPU 0 in MHz.
    pub current_mhz: Option<f64>,
    /// Maximum frequency of CPU 0 in MHz.
    pub max_mhz: Option<f64>,
}

impl CpuReport {
    /// Whether a canonical feature is present: `Some(true|false)`, or `None` when unknown.
    pub fn has(&self, feature: &str) -> Option<bool> {
        self.features
            .as_ref()
            .map(|f| f.iter().any(|x| x == feature))
    }
}

/// Canonical feature name and the `/proc/cpuinfo` flag(s) that imply it, for the features
/// that matter to matrix kernels.
pub const KERNEL_FEATURES: &[(&str, &[&str])] = &[
    // x86
    ("sse4_2", &["sse4_2"]),
    ("avx", &["avx"]),
    ("avx2", &["avx2"]),
    ("fma", &["fma"]),
    ("f16c", &["f16c"]),
    ("avx512f", &["avx512f"]),
    ("avx512bw", &["avx512bw"]),
    ("avx512vl", &["avx512vl"]),
    ("avx512_vnni", &["avx512_vnni"]),
    ("avx512_bf16", &["avx512_bf16"]),
    ("avx512_fp16", &["avx512_fp16"]),
    ("avx_vnni", &["avx_vnni"]),
    ("amx_tile", &["amx_tile"]),
    ("amx_bf16", &["amx_bf16"]),
    ("amx_int8", &["amx_int8"]),
    ("amx_fp16", &["amx_fp16"]),
    // Arm
    ("neon", &["asimd", "neon"]),
    ("fphp", &["fphp"]),
    ("asimdhp", &["asimdhp"]),
    ("asimddp", &["asimddp"]),
    ("bf16", &["bf16"]),
    ("i8mm", &["i8mm"]),
    ("sve", &["sve"]),
    ("sve2", &["sve2"]),
    ("sme", &["sme"]),
];

/// One processor block of `/proc/cpuinfo`.
#[derive(Debug, Default)]
struct Block {
    vendor: Option<String>,
    model: Option<String>,
    implementer: Option<String>,
    part: Option<String>,
    flags: Option<String>,
    physical_id: Option<String>,
    core_id: Option<String>,
    mhz: Option<f64>,
    has_processor: bool,
}

fn parse_cpuinfo(text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut cur = Block::default();
    let mut any = false;
    for line in text.lines() {
        if line.trim().is_empty() {
            if any {
                blocks.push(std::mem::take(&mut cur));
                any = false;
            }
            continue;
        }
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim().to_owned());
        any = true;
        match k {
            "processor" => cur.has_processor = true,
            "vendor_id" => cur.vendor = Some(v),
            "model name" => cur.model = Some(v),
            "CPU implementer" => cur.implementer = Some(v),
            "CPU part" => cur.part = Some(v),
            "flags" | "Features" => cur.flags = Some(v),
            "physical id" => cur.physical_id = Some(v),
            "core id" => cur.core_id = Some(v),
            "cpu MHz" => cur.mhz = v.parse().ok(),
            _ => {}
        }
    }
    if any {
        blocks.push(cur);
    }
    blocks.retain(|b| b.has_processor);
    blocks
}

fn arm_implementer(code: &str) -> String {
    let name = match code.to_ascii_lowercase().as_str() {
        "0x41" => "ARM",
        "0x42" => "Broadcom",
        "0x43" => "Cavium",
        "0x46" => "Fujitsu",
        "0x48" => "HiSilicon",
        "0x4e" => "NVIDIA",
        "0x50" => "Ampere (APM)",
        "0x51" => "Qualcomm",
        "0x61" => "Apple",
        "0xc0" => "Ampere",
        _ => return format!("implementer {code}"),
    };
    name.to_owned()
}

/// Names of common Arm Ltd. cores by `CPU part` (implementer 0x41).
fn arm_part(implementer: &str, part: &str) -> Option<&'static str> {
    if !implementer.eq_ignore_ascii_case("0x41") {
        return None;
    }
    Some(match part.to_ascii_lowercase().as_str() {
        "0xd08" => "Cortex-A72",
        "0xd0b" => "Cortex-A76",
        "0xd0c" => "Neoverse-N1",
        "0xd40" => "Neoverse-V1",
        "0xd49" => "Neoverse-N2",
        "0xd4f" => "Neoverse-V2",
        "0xd8e" => "Neoverse-N3",
        _ => return None,
    })
}

/// Canonical kernel features implied by a flags line.
pub(crate) fn features_from_flags(flags: &str) -> Vec<String> {
    let set: BTreeSet<&str> = flags.split_whitespace().collect();
    KERNEL_FEATURES
        .iter()
        .filter(|(_, implied_by)| implied_by.iter().any(|f| set.contains(f)))
        .map(|(name, _)| (*name).to_owned())
        .collect()
}

fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (num, mult) = match t.chars().last()? {
        'K' | 'k' => (&t[..t.len() - 1], 1024),
        'M' | 'm' => (&t[..t.len() - 1], 1024 * 1024),
        'G' | 'g' => (&t[..t.len() - 1], 1024 * 1024 * 1024),
        _ => (t, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

/// Reads the CPU part of the report under `root`.
pub(crate) fn detect(root: &Root, mounts: &[Mount], notes: &mut Notes) -> CpuReport {
    let blocks = root::read(root, "/proc/cpuinfo", Missing::Warn, notes)
        .map(|t| parse_cpuinfo(&t))
        .unwrap_or_default();
    if blocks.is_empty() {
        notes.warn("/proc/cpuinfo holds no processor entry: CPU model and features unknown");
    }
    let first = blocks.first();
    let isa = match first {
        Some(b) if b.vendor.is_some() => IsaFamily::X86,
        Some(b) if b.implementer.is_some() => IsaFamily::Arm,
        Some(b) => match &b.flags {
            Some(f) if f.contains("asimd") || f.contains("fp ") => IsaFamily::Arm,
            Some(_) => IsaFamily::X86,
            None => IsaFamily::Unknown,
        },
        None => IsaFamily::Unknown,
    };
    let vendor = first.and_then(|b| {
        b.vendor
            .clone()
            .or_else(|| b.implementer.as_deref().map(arm_implementer))
    });
    let model = blocks.iter().find_map(|b| b.model.clone()).or_else(|| {
        first.and_then(|b| match (&b.implementer, &b.part) {
            (Some(i), Some(p)) => arm_part(i, p).map(str::to_owned),
            _ => None,
        })
    });
    let features = match first.and_then(|b| b.flags.as_deref()) {
        Some(f) => Some(features_from_flags(f)),
        None => {
            if first.is_some() {
                notes.warn(
                    "/proc/cpuinfo has no flags/Features line (truncated?): ISA features unknown",
                );
            }
            None
        }
    };

    // Logical CPUs: the sysfs online list, else the number of processor blocks.
    let online = root::read_line(
        root,
        "/sys/devices/system/cpu/online",
        Missing::Quiet,
        notes,
    );
    let online_list = online.as_deref().and_then(root::expand_cpu_list);
    if online.is_some() && online_list.is_none() {
        notes.warn("/sys/devices/system/cpu/online is malformed");
    }
    let logical_cores = match &online_list {
        Some(l) if !l.is_empty() => u32::try_from(l.len()).ok(),
        _ if !blocks.is_empty() => u32::try_from(blocks.len()).ok(),
        _ => {
            notes.warn("number of logical CPUs unknown");
            None
        }
    };

    // Physical cores and sockets from sysfs topology, else /proc/cpuinfo ids.
    let (physical_cores, sockets) = topology(root, online_list.as_deref(), &blocks, notes);

    let numa_nodes = root::read_line(
        root,
        "/sys/devices/system/node/online",
        Missing::Quiet,
        notes,
    )
    .and_then(|l| root::count_cpu_list(&l));

    let caches = caches(root, notes);

    let usable_cores = if root.is_host() {
        affinity_count()
    } else {
        None
    };

    let cpufreq = "/sys/devices/system/cpu/cpu0/cpufreq";
    let khz = |name: &str, notes: &mut Notes| {
        root::read_u64(root, &format!("{cpufreq}/{name}"), Missing::Quiet, notes)
            .map(|k| k as f64 / 1000.0)
    };
    let current_mhz = khz("scaling_cur_freq", notes).or_else(|| first.and_then(|b| b.mhz));
    let max_mhz = khz("cpuinfo_max_freq", notes);

    CpuReport {
        isa,
        vendor,
        model,
        logical_cores,
        usable_cores,
        physical_cores,
        sockets,
        numa_nodes,
        cgroup_quota: quota(root, mounts, notes),
        caches,
        features,
        current_mhz,
        max_mhz,
    }
}

fn topology(
    root: &Root,
    online: Option<&[u32]>,
    blocks: &[Block],
    notes: &mut Notes,
) -> (Option<u32>, Option<u32>) {
    if let Some(cpus) = online.filter(|c| !c.is_empty()) {
        let mut cores = BTreeSet::new();
        let mut packages = BTreeSet::new();
        let mut complete = true;
        for cpu in cpus {
            let base = format!("/sys/devices/system/cpu/cpu{cpu}/topology");
            let pkg = root::read_line(
                root,
                &format!("{base}/physical_package_id"),
                Missing::Quiet,
                notes,
            );
            let core = root::read_line(root, &format!("{base}/core_id"), Missing::Quiet, notes);
            match (pkg, core) {
                (Some(p), Some(c)) => {
                    cores.insert((p.clone(), c));
                    packages.insert(p);
                }
                _ => {
                    complete = false;
                    break;
                }
            }
        }
        if complete {
            return (
                u32::try_from(cores.len()).ok(),
                u32::try_from(packages.len()).ok(),
            );
        }
    }
    let mut cores = BTreeSet::new();
    let mut packages = BTreeSet::new();
    for b in blocks {
        match (&b.physical_id, &b.core_id) {
            (Some(p), Some(c)) => {
                cores.insert((p.clone(), c.clone()));
                packages.insert(p.clone());
            }
            _ => {
                notes.warn("CPU topology not exposed (no sysfs topology, no core ids in /proc/cpuinfo): physical cores unknown");
                return (None, None);
            }
        }
    }
    if cores.is_empty() {
        return (None, None);
    }
    (
        u32::try_from(cores.len()).ok(),
        u32::try_from(packages.len()).ok(),
    )
}

fn caches(root: &Root, notes: &mut Notes) -> Vec<CacheInfo> {
    let base = "/sys/devices/system/cpu/cpu0/cache";
    let mut out = Vec::new();
    for entry in root::list_dir(root, base, notes) {
        if !entry.starts_with("index") {
            continue;
        }
        let dir = format!("{base}/{entry}");
        let Some(level) = root::read_u64(root, &format!("{dir}/level"), Missing::Warn, notes)
        else {
            continue;
        };
        let kind = root::read_line(root, &format!("{dir}/type"), Missing::Quiet, notes)
            .unwrap_or_else(|| "unknown".to_owned());
        let size_text = root::read_line(root, &format!("{dir}/size"), Missing::Warn, notes);
        let size_bytes = size_text.as_deref().and_then(parse_size);
        if let (Some(t), None) = (&size_text, size_bytes) {
            notes.warn(format!(
                "{dir}/size: cannot parse {:?}: size unknown",
                root::shorten(t)
            ));
        }
        let shared_by_cpus = root::read_line(
            root,
            &format!("{dir}/shared_cpu_list"),
            Missing::Quiet,
            notes,
        )
        .and_then(|l| root::count_cpu_list(&l));
        out.push(CacheInfo {
            level: u32::try_from(level).unwrap_or(u32::MAX),
            kind,
            size_bytes,
            shared_by_cpus,
        });
    }
    out.sort_by(|a, b| a.level.cmp(&b.level).then(a.kind.cmp(&b.kind)));
    out
}

/// Parses v2 `cpu.max` (`max 100000` or `150000 100000`).
fn parse_cpu_max(text: &str, shown: &str, notes: &mut Notes) -> CpuQuota {
    let mut it = text.split_whitespace();
    match (it.next(), it.next().map(str::parse::<u64>)) {
        (Some("max"), _) => CpuQuota::Unlimited,
        (Some(q), Some(Ok(p))) if p > 0 => match q.parse::<u64>() {
            Ok(q) => CpuQuota::Cores(q as f64 / p as f64),
            Err(_) => bad_quota(text, shown, notes),
        },
        _ => bad_quota(text, shown, notes),
    }
}

fn bad_quota(text: &str, shown: &str, notes: &mut Notes) -> CpuQuota {
    notes.warn(format!(
        "{shown}: cannot parse CPU quota {:?}: unknown",
        root::shorten(text.trim())
    ));
    CpuQuota::Unknown
}

/// The tightest CPU quota over the process's cgroup and its ancestors.
fn quota(root: &Root, mounts: &[Mount], notes: &mut Notes) -> CpuQuota {
    let Some(text) = root::read(root, "/proc/self/cgroup", Missing::Quiet, notes) else {
        return CpuQuota::Unlimited;
    };
    let mut v1 = None;
    let mut v2 = None;
    for line in text.lines() {
        let mut it = line.splitn(3, ':');
        if let (Some(id), Some(ctrls), Some(path)) = (it.next(), it.next(), it.next()) {
            if ctrls.split(',').any(|c| c == "cpu") {
                v1 = Some(path.to_owned());
            } else if id == "0" && ctrls.is_empty() {
                v2 = Some(path.to_owned());
            }
        }
    }
    // (directory, mount point, is v1)
    let found = if let Some(path) = v1 {
        mounts
            .iter()
            .rev()
            .find(|m| m.fs_type == "cgroup" && m.super_options.split(',').any(|o| o == "cpu"))
            .map(|m| {
                (
                    crate::memory::group_dir(m, &path, notes),
                    m.mount_point.clone(),
                    true,
                )
            })
    } else if let Some(path) = v2 {
        mounts
            .iter()
            .rev()
            .find(|m| m.fs_type == "cgroup2")
            .map(|m| {
                (
                    crate::memory::group_dir(m, &path, notes),
                    m.mount_point.clone(),
                    false,
                )
            })
    } else {
        return CpuQuota::Unlimited;
    };
    let Some((dir, top, is_v1)) = found else {
        return CpuQuota::Unlimited;
    };
    let top = top.trim_end_matches('/');
    let mut cur = dir.trim_end_matches('/').to_owned();
    let mut q = CpuQuota::Unlimited;
    loop {
        let here = if is_v1 {
            let quota = root::read(
                root,
                &format!("{cur}/cpu.cfs_quota_us"),
                Missing::Quiet,
                notes,
            );
            let period = root::read(
                root,
                &format!("{cur}/cpu.cfs_period_us"),
                Missing::Quiet,
                notes,
            );
            match (quota, period) {
                (Some(qt), Some(pt)) => {
                    match (qt.trim().parse::<i64>(), pt.trim().parse::<u64>()) {
                        (Ok(qv), _) if qv < 0 => CpuQuota::Unlimited,
                        (Ok(qv), Ok(pv)) if pv > 0 => CpuQuota::Cores(qv as f64 / pv as f64),
                        _ => bad_quota(
                            &format!("{} / {}", qt.trim(), pt.trim()),
                            &format!("{cur}/cpu.cfs_quota_us"),
                            notes,
                        ),
                    }
                }
                _ => CpuQuota::Unlimited,
            }
        } else {
            let shown = format!("{cur}/cpu.max");
            match root::read(root, &shown, Missing::Quiet, notes) {
                Some(t) => parse_cpu_max(&t, &shown, notes),
                None => CpuQuota::Unlimited,
            }
        };
        q = q.tighter(here);
        if cur.len() <= top.len() {
            break;
        }
        match cur.rfind('/') {
            Some(i) if i >= top.len() => cur.truncate(i),
            _ => break,
        }
    }
    q
}

/// CPUs in this process's affinity mask (what `nproc` prints).
fn affinity_count() -> Option<u32> {
    // SAFETY: `cpu_set_t` is plain data; zeroed is a valid empty set, and
    // `sched_getaffinity` writes at most `size_of::<cpu_set_t>()` bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        u32::try_from(libc::CPU_COUNT(&set)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max() {
        let mut n = Notes::default();
        assert_eq!(
            parse_cpu_max("max 100000\n", "f", &mut n),
            CpuQuota::Unlimited
        );
        assert_eq!(
            parse_cpu_max("150000 100000\n", "f", &mut n),
            CpuQuota::Cores(1.5)
        );
        assert!(n.warnings.is_empty());
        assert_eq!(parse_cpu_max("lots", "f", &mut n), CpuQuota::Unknown);
        assert_eq!(parse_cpu_max("1 0", "f", &mut n), CpuQuota::Unknown);
        assert_eq!(n.warnings.len(), 2);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("32K"), Some(32 * 1024));
        assert_eq!(parse_size("32768K"), Some(32 * 1024 * 1024));
        assert_eq!(parse_size("2M"), Some(2 * 1024 * 1024));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("K"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn features_canonical() {
        let f = features_from_flags("fpu avx2 fma avx512f avx512_bf16 amx_tile other");
        assert_eq!(f, ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"]);
        let arm = features_from_flags("fp asimd evtstrm aes sve bf16");
        assert_eq!(arm, ["neon", "bf16", "sve"]);
    }

    #[test]
    fn cpuinfo_blocks() {
        let b = parse_cpuinfo("processor: 0\nvendor_id: X\n\nprocessor: 1\nvendor_id: X\n");
        assert_eq!(b.len(), 2);
        assert!(parse_cpuinfo("garbage\n\n").is_empty());
    }
}
