//! Memory: `/proc/meminfo`, `/dev/shm`, and the cgroup (v1 or v2) limits of this process.

use serde::{Deserialize, Serialize};

use crate::mounts::Mount;
use crate::root::{self, Missing, Notes, Root};

/// A cgroup memory limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// A limit in bytes.
    Bytes(u64),
    /// No limit is set (`max` in cgroup v2, the "infinite" value in v1).
    Unlimited,
    /// The limit could not be read or parsed (a warning says why).
    Unknown,
}

impl Limit {
    /// The limit in bytes, if there is a known one.
    pub fn bytes(self) -> Option<u64> {
        match self {
            Limit::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// The tighter of two limits; unknown wins over unlimited (we cannot claim "no limit"
    /// when part of the chain is unreadable), a byte figure wins over both.
    fn tighter(self, other: Limit) -> Limit {
        match (self, other) {
            (Limit::Bytes(a), Limit::Bytes(b)) => Limit::Bytes(a.min(b)),
            (Limit::Bytes(a), _) | (_, Limit::Bytes(a)) => Limit::Bytes(a),
            (Limit::Unknown, _) | (_, Limit::Unknown) => Limit::Unknown,
            (Limit::Unlimited, Limit::Unlimited) => Limit::Unlimited,
        }
    }
}

/// Which cgroup hierarchy holds this process's memory controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupVersion {
    /// cgroup v1 (`memory.limit_in_bytes`).
    V1,
    /// cgroup v2, the unified hierarchy (`memory.max`, `memory.high`).
    V2,
    /// No memory controller was found (not in a cgroup, or not mounted).
    None,
}

/// The memory cgroup of the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupMemory {
    /// Hierarchy version.
    pub version: CgroupVersion,
    /// The cgroup's directory (as seen under the root), if found.
    pub dir: Option<String>,
    /// Hard limit: the tightest of `memory.max` (v2) or `memory.limit_in_bytes` (v1) over the
    /// group and its ancestors.
    pub limit: Limit,
    /// Throttling threshold `memory.high` (v2 only; `Unlimited` on v1), tightest over ancestors.
    pub high: Limit,
    /// Current usage of the group (`memory.current` / `memory.usage_in_bytes`).
    pub usage_bytes: Option<u64>,
}

/// `/dev/shm`, the shared-memory filesystem data loaders use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmInfo {
    /// Size of the tmpfs (`size=` mount option, else `statvfs` on the host).
    pub total_bytes: Option<u64>,
    /// Free bytes (`statvfs`; host root only).
    pub available_bytes: Option<u64>,
}

/// The memory part of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// `MemTotal`.
    pub total_bytes: Option<u64>,
    /// `MemAvailable`.
    pub available_bytes: Option<u64>,
    /// `SwapTotal`.
    pub swap_total_bytes: Option<u64>,
    /// `SwapFree`.
    pub swap_free_bytes: Option<u64>,
    /// `/dev/shm`, when mounted.
    pub shm: Option<ShmInfo>,
    /// The cgroup limits.
    pub cgroup: CgroupMemory,
    /// The most memory this process can ever hold: the smallest of `MemTotal`, the cgroup
    /// hard limit and `memory.high`. `None` when `MemTotal` is unknown.
    pub effective_limit_bytes: Option<u64>,
    /// What it can take now: the smallest of `MemAvailable` and (limit − usage).
    pub effective_available_bytes: Option<u64>,
}

/// Values at or above this in cgroup v1 mean "no limit" (the kernel writes
/// `PAGE_COUNTER_MAX * PAGE_SIZE`, e.g. 9223372036854771712).
const V1_UNLIMITED: u64 = 1 << 62;

/// Parses `/proc/meminfo` into (total, available, swap total, swap free).
fn meminfo(root: &Root, notes: &mut Notes) -> [Option<u64>; 4] {
    let mut out = [None; 4];
    let Some(text) = root::read(root, "/proc/meminfo", Missing::Warn, notes) else {
        return out;
    };
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let idx = match k.trim() {
            "MemTotal" => 0,
            "MemAvailable" => 1,
            "SwapTotal" => 2,
            "SwapFree" => 3,
            _ => continue,
        };
        let mut parts = v.split_whitespace();
        let n = parts.next().and_then(|n| n.parse::<u64>().ok());
        let unit = parts.next();
        out[idx] = match (n, unit) {
            (Some(n), Some("kB")) => n.checked_mul(1024),
            (Some(n), None) => Some(n),
            _ => {
                notes.warn(format!(
                    "/proc/meminfo: cannot parse {} value {:?}: unknown",
                    k.trim(),
                    root::shorten(v.trim())
                ));
                None
            }
        };
    }
    if out[0] == Some(0) {
        notes.warn("/proc/meminfo: MemTotal is 0, which cannot be right: unknown");
        out[0] = None;
    }
    for (i, name) in ["MemTotal", "MemAvailable"].iter().enumerate() {
        if out[i].is_none() {
            notes.warn(format!("/proc/meminfo has no usable {name}: unknown"));
        }
    }
    out
}

/// Parses a cgroup v2 limit file (`max` or bytes).
pub(crate) fn parse_v2_limit(text: &str, shown: &str, notes: &mut Notes) -> Limit {
    let t = text.trim();
    if t == "max" {
        return Limit::Unlimited;
    }
    match t.parse::<u64>() {
        Ok(v) => Limit::Bytes(v),
        Err(_) => {
            notes.warn(format!(
                "{shown}: expected `max` or a byte count, found {:?}: limit unknown",
                root::shorten(t)
            ));
            Limit::Unknown
        }
    }
}

/// Parses a cgroup v1 `memory.limit_in_bytes`.
pub(crate) fn parse_v1_limit(text: &str, shown: &str, notes: &mut Notes) -> Limit {
    let t = text.trim();
    match t.parse::<u64>() {
        Ok(v) if v >= V1_UNLIMITED => Limit::Unlimited,
        Ok(v) => Limit::Bytes(v),
        // v1 reports "-1" in some kernels' writes; treat as unlimited.
        Err(_) if t == "-1" => Limit::Unlimited,
        Err(_) => {
            notes.warn(format!(
                "{shown}: expected a byte count, found {:?}: limit unknown",
                root::shorten(t)
            ));
            Limit::Unknown
        }
    }
}

/// Where the process's group lives: mount point + path relative to the mount's root.
pub(crate) fn group_dir(mount: &Mount, cgroup_path: &str, notes: &mut Notes) -> String {
    let mroot = mount.root.trim_end_matches('/');
    let rel = if mroot.is_empty() {
        cgroup_path.to_owned()
    } else if cgroup_path == mroot {
        String::new()
    } else if let Some(rest) = cgroup_path
        .strip_prefix(mroot)
        .filter(|r| r.starts_with('/'))
    {
        rest.to_owned()
    } else {
        // Namespaced: the mount's root is our own group already.
        notes.warn(format!(
            "cgroup path {cgroup_path} is outside the mounted root {}: using the mount point",
            mount.root
        ));
        String::new()
    };
    let mp = mount.mount_point.trim_end_matches('/');
    format!("{mp}{rel}")
}

fn cgroup(root: &Root, mounts: &[Mount], notes: &mut Notes) -> CgroupMemory {
    let none = CgroupMemory {
        version: CgroupVersion::None,
        dir: None,
        limit: Limit::Unlimited,
        high: Limit::Unlimited,
        usage_bytes: None,
    };
    let Some(text) = root::read(root, "/proc/self/cgroup", Missing::Quiet, notes) else {
        return none;
    };
    let mut v1_path = None;
    let mut v2_path = None;
    for line in text.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (it.next(), it.next(), it.next()) else {
            if !line.trim().is_empty() {
                notes.warn(format!(
                    "/proc/self/cgroup: malformed line {:?}",
                    root::shorten(line)
                ));
            }
            continue;
        };
        if ctrls.split(',').any(|c| c == "memory") {
            v1_path = Some(path.to_owned());
        } else if id == "0" && ctrls.is_empty() {
            v2_path = Some(path.to_owned());
        }
    }

    if let Some(path) = v1_path {
        let mount = mounts
            .iter()
            .rev()
            .find(|m| m.fs_type == "cgroup" && m.super_options.split(',').any(|o| o == "memory"));
        let Some(mount) = mount else {
            notes.warn(
                "process is in a v1 memory cgroup but the controller is not mounted: limit unknown",
            );
            return CgroupMemory {
                version: CgroupVersion::V1,
                limit: Limit::Unknown,
                high: Limit::Unknown,
                ..none
            };
        };
        let dir = group_dir(mount, &path, notes);
        let mp = mount.mount_point.trim_end_matches('/').to_owned();
        let mut limit = walk_limits(
            root,
            &dir,
            &mp,
            "memory.limit_in_bytes",
            parse_v1_limit,
            notes,
        );
        // The kernel's own answer for the whole chain (including ancestors hidden from a
        // container), when it gives one.
        if let Some(stat) = root::read(root, &format!("{dir}/memory.stat"), Missing::Quiet, notes)
            && let Some(v) = stat
                .lines()
                .find_map(|l| l.strip_prefix("hierarchical_memory_limit "))
        {
            limit = limit.tighter(parse_v1_limit(v, &format!("{dir}/memory.stat"), notes));
        }
        let usage = root::read_u64(
            root,
            &format!("{dir}/memory.usage_in_bytes"),
            Missing::Warn,
            notes,
        );
        return CgroupMemory {
            version: CgroupVersion::V1,
            dir: Some(dir),
            limit,
            high: Limit::Unlimited,
            usage_bytes: usage,
        };
    }

    if let Some(path) = v2_path {
        let Some(mount) = mounts.iter().rev().find(|m| m.fs_type == "cgroup2") else {
            notes.warn("process is in a cgroup v2 group but cgroup2 is not mounted: limit unknown");
            return CgroupMemory {
                version: CgroupVersion::V2,
                limit: Limit::Unknown,
                high: Limit::Unknown,
                ..none
            };
        };
        let mp = mount.mount_point.trim_end_matches('/').to_owned();
        // Is the memory controller enabled in this hierarchy at all?
        let controllers = root::read(
            root,
            &format!("{mp}/cgroup.controllers"),
            Missing::Quiet,
            notes,
        );
        if let Some(c) = &controllers
            && !c.split_whitespace().any(|x| x == "memory")
        {
            return none;
        }
        let dir = group_dir(mount, &path, notes);
        let limit = walk_limits(root, &dir, &mp, "memory.max", parse_v2_limit, notes);
        let high = walk_limits(root, &dir, &mp, "memory.high", parse_v2_limit, notes);
        let at_root = dir.trim_end_matches('/') == mp;
        let usage = root::read_u64(
            root,
            &format!("{dir}/memory.current"),
            if at_root {
                Missing::Quiet
            } else {
                Missing::Warn
            },
            notes,
        );
        return CgroupMemory {
            version: CgroupVersion::V2,
            dir: Some(dir),
            limit,
            high,
            usage_bytes: usage,
        };
    }
    none
}

/// The tightest limit in `file` from `dir` up to the mount point `top` (inclusive). A group
/// can never use more than any ancestor allows.
fn walk_limits(
    root: &Root,
    dir: &str,
    top: &str,
    file: &str,
    parse: fn(&str, &str, &mut Notes) -> Limit,
    notes: &mut Notes,
) -> Limit {
    let mut limit = Limit::Unlimited;
    let mut cur = dir.trim_end_matches('/').to_owned();
    let mut leaf = true;
    loop {
        let shown = format!("{cur}/{file}");
        // The leaf's file must exist, except in the root group (v2 has no memory.max there);
        // ancestors may lack it.
        let at_top = cur.len() <= top.len();
        let missing = if leaf && !at_top {
            Missing::Warn
        } else {
            Missing::Quiet
        };
        match root::read(root, &shown, missing, notes) {
            Some(text) => limit = limit.tighter(parse(&text, &shown, notes)),
            None if missing == Missing::Warn => limit = limit.tighter(Limit::Unknown),
            None => {}
        }
        leaf = false;
        if at_top {
            break;
        }
        match cur.rfind('/') {
            Some(i) if i >= top.len() => cur.truncate(i),
            _ => break,
        }
    }
    limit
}

fn shm(root: &Root, mounts: &[Mount]) -> Option<ShmInfo> {
    let m = mounts.iter().rev().find(|m| m.mount_point == "/dev/shm")?;
    let from_opts = m
        .super_options
        .split(',')
        .chain(m.mount_options.split(','))
        .find_map(|o| o.strip_prefix("size="))
        .and_then(parse_mount_size);
    let (st_total, st_avail) = if root.is_host() {
        match crate::storage::statvfs_bytes(std::path::Path::new("/dev/shm")) {
            Some((t, a)) => (Some(t), Some(a)),
            None => (None, None),
        }
    } else {
        (None, None)
    };
    Some(ShmInfo {
        total_bytes: from_opts.or(st_total),
        available_bytes: st_avail,
    })
}

/// Parses a tmpfs `size=` option (`24684084k`, `64m`, `1g`, bytes).
fn parse_mount_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let last = s.chars().last()?;
    let (num, mult) = match last.to_ascii_lowercase() {
        'k' => (&s[..s.len() - 1], 1u64 << 10),
        'm' => (&s[..s.len() - 1], 1 << 20),
        'g' => (&s[..s.len() - 1], 1 << 30),
        't' => (&s[..s.len() - 1], 1 << 40),
        '%' => return None,
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// Reads the memory part of the report.
pub(crate) fn detect(root: &Root, mounts: &[Mount], notes: &mut Notes) -> MemoryReport {
    let [total, available, swap_total, swap_free] = meminfo(root, notes);
    let cgroup = cgroup(root, mounts, notes);
    let cg_unknown = cgroup.limit == Limit::Unknown || cgroup.high == Limit::Unknown;
    if cg_unknown {
        notes.warn("cgroup memory limit unknown: effective memory budget unknown");
    }
    let effective_limit_bytes = match total {
        Some(t) if !cg_unknown => Some(
            [cgroup.limit.bytes(), cgroup.high.bytes()]
                .into_iter()
                .flatten()
                .fold(t, u64::min),
        ),
        _ => None,
    };
    let cg_room = match (
        cgroup.limit.tighter(cgroup.high).bytes(),
        cgroup.usage_bytes,
    ) {
        (Some(l), Some(u)) => Some(l.saturating_sub(u)),
        (Some(l), None) => Some(l),
        _ => None,
    };
    let effective_available_bytes = match (available, cg_room) {
        _ if cg_unknown => None,
        (Some(a), Some(r)) => Some(a.min(r)),
        (a, None) => a,
        (None, Some(_)) => None,
    };
    MemoryReport {
        total_bytes: total,
        available_bytes: available,
        swap_total_bytes: swap_total,
        swap_free_bytes: swap_free,
        shm: shm(root, mounts),
        cgroup,
        effective_limit_bytes,
        effective_available_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_values() {
        let mut n = Notes::default();
        assert_eq!(parse_v2_limit("max\n", "f", &mut n), Limit::Unlimited);
        assert_eq!(
            parse_v2_limit("4294967296\n", "f", &mut n),
            Limit::Bytes(1 << 32)
        );
        assert!(n.warnings.is_empty());
        assert_eq!(parse_v2_limit("lots", "f", &mut n), Limit::Unknown);
        assert_eq!(parse_v2_limit("", "f", &mut n), Limit::Unknown);
        assert_eq!(n.warnings.len(), 2);
    }

    #[test]
    fn v1_values() {
        let mut n = Notes::default();
        assert_eq!(
            parse_v1_limit("9223372036854771712", "f", &mut n),
            Limit::Unlimited
        );
        assert_eq!(
            parse_v1_limit("536870912", "f", &mut n),
            Limit::Bytes(512 << 20)
        );
        assert_eq!(parse_v1_limit("-1", "f", &mut n), Limit::Unlimited);
        assert_eq!(parse_v1_limit("x", "f", &mut n), Limit::Unknown);
    }

    #[test]
    fn tighter() {
        use Limit::*;
        assert_eq!(Bytes(5).tighter(Bytes(3)), Bytes(3));
        assert_eq!(Unlimited.tighter(Bytes(3)), Bytes(3));
        assert_eq!(Unknown.tighter(Unlimited), Unknown);
        assert_eq!(Unknown.tighter(Bytes(1)), Bytes(1));
    }

    #[test]
    fn zero_mem_total_is_unknown() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        std::fs::write(
            dir.path().join("proc/meminfo"),
            "MemTotal: 0 kB\nMemAvailable: 0 kB\n",
        )
        .unwrap();
        let mut n = Notes::default();
        let [total, avail, ..] = meminfo(&Root::new(dir.path()), &mut n);
        assert_eq!(total, None);
        assert_eq!(avail, Some(0));
        assert!(n.warnings.iter().any(|w| w.contains("MemTotal is 0")));
    }

    #[test]
    fn mount_sizes() {
        assert_eq!(parse_mount_size("24684084k"), Some(24684084 * 1024));
        assert_eq!(parse_mount_size("64m"), Some(64 << 20));
        assert_eq!(parse_mount_size("50%"), None);
    }
}
