//! Live accounting: what the process and its cgroup use now, and how much the kernel is
//! stalling on memory.
//!
//! Every reader takes an [`eg_hardware::Root`], so tests run on fixture trees: the host's
//! cgroup v1 files (`memory.usage_in_bytes`, `memory.limit_in_bytes`,
//! `memory.max_usage_in_bytes`, `memory.oom_control`) and v2 files (`memory.current`,
//! `memory.max`, `memory.peak`, `memory.events`) are parsed the same way whichever the
//! machine mounts. A file that does not exist is "unknown" (`None`), never 0; a file that
//! exists but does not parse is an [`Error::Parse`]. GPU memory comes from NVML through
//! eg-hardware's [`NvmlSource`] trait (fakes in tests).

use std::path::PathBuf;

pub use eg_hardware::Root;
use eg_hardware::gpu::NvmlSource;
pub use eg_hardware::memory::CgroupVersion;
use eg_hardware::memory::{CgroupMemory, Limit};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Values at or above this in cgroup v1 mean "no limit".
const V1_UNLIMITED: u64 = 1 << 62;

fn read_opt(root: &Root, abs: &str) -> Result<Option<(String, PathBuf)>> {
    let path = root.join(abs);
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(Some((t, path))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read { path, source }),
    }
}

fn shorten(s: &str) -> String {
    s.chars().take(80).collect()
}

fn parse_u64(text: &str, path: &std::path::Path, reason: &'static str) -> Result<u64> {
    text.trim().parse::<u64>().map_err(|_| Error::Parse {
        path: path.to_path_buf(),
        reason,
        found: shorten(text.trim()),
    })
}

/// `VmRSS` and `VmHWM` of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessMemory {
    /// Resident set size now, bytes.
    pub rss: u64,
    /// Peak resident set size ("high water mark"), bytes.
    pub hwm: u64,
}

/// Reads `/proc/self/status` under `root`. `None` when the file does not exist.
pub fn process_memory(root: &Root) -> Result<Option<ProcessMemory>> {
    let Some((text, path)) = read_opt(root, "/proc/self/status")? else {
        return Ok(None);
    };
    let field = |name: &str| -> Result<Option<u64>> {
        let Some(line) = text.lines().find(|l| l.starts_with(name)) else {
            return Ok(None);
        };
        let v = line[name.len()..].trim();
        let num = v.strip_suffix("kB").map(str::trim).unwrap_or(v);
        let kb = parse_u64(num, &path, "expected `<number> kB`")?;
        Ok(Some(kb.saturating_mul(1024)))
    };
    match (field("VmRSS:")?, field("VmHWM:")?) {
        (Some(rss), Some(hwm)) => Ok(Some(ProcessMemory { rss, hwm })),
        // Kernel threads have no VmRSS; a fixture may omit it.
        _ => Ok(None),
    }
}

/// Counters of `memory.events` (v2) or `memory.oom_control` (v1). Monotonic; compare two
/// readings to see new events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupEvents {
    /// v2 `high`: times the group went over `memory.high` and was throttled.
    pub high: u64,
    /// v2 `max`: times usage hit `memory.max` and reclaim ran.
    pub max: u64,
    /// v2 `oom`: times the group hit its limit and allocation failed.
    pub oom: u64,
    /// `oom_kill`: processes killed by the OOM killer in the group (v1 and v2).
    pub oom_kill: u64,
    /// v1 `under_oom`: the group is in an OOM situation right now.
    pub under_oom: bool,
}

/// One reading of a memory cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupSample {
    /// v1 or v2.
    pub version: CgroupVersion,
    /// Usage now (`memory.current` / `memory.usage_in_bytes`).
    pub usage: Option<u64>,
    /// This group's hard limit (`memory.max` / `memory.limit_in_bytes`).
    pub limit: Limit,
    /// Peak usage (`memory.peak` / `memory.max_usage_in_bytes`), when the kernel has it.
    pub peak: Option<u64>,
    /// Event counters, when readable.
    pub events: Option<CgroupEvents>,
    /// File-backed page cache charged to the group that the kernel reclaims before it
    /// OOM-kills (`active_file + inactive_file` of `memory.stat`; v1: the `total_` ones,
    /// which include descendants), when readable.
    #[serde(default)]
    pub reclaimable: Option<u64>,
}

impl CgroupSample {
    /// What the OOM killer sees: usage minus the reclaimable page cache (checkpoint files
    /// written by the run are charged to the group as page cache, and count against the
    /// limit only until the kernel drops them).
    pub fn working_set(&self) -> Option<u64> {
        self.usage
            .map(|u| u.saturating_sub(self.reclaimable.unwrap_or(0)))
    }
}

/// `active_file + inactive_file` from a `memory.stat` text (`prefix` is `total_` on v1).
fn parse_file_cache(text: &str, path: &std::path::Path, prefix: &str) -> Result<Option<u64>> {
    let mut sum = None;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(k), Some(v)) = (it.next(), it.next()) else {
            continue;
        };
        let Some(k) = k.strip_prefix(prefix) else {
            continue;
        };
        if k == "active_file" || k == "inactive_file" {
            let v = parse_u64(v, path, "expected `key <bytes>`")?;
            sum = Some(sum.unwrap_or(0u64).saturating_add(v));
        }
    }
    Ok(sum)
}

/// Parses `key value` lines into events. Unknown keys are ignored (kernels add some).
fn parse_events(text: &str, path: &std::path::Path) -> Result<CgroupEvents> {
    let mut ev = CgroupEvents::default();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(k), Some(v)) = (it.next(), it.next()) else {
            if line.trim().is_empty() {
                continue;
            }
            return Err(Error::Parse {
                path: path.to_path_buf(),
                reason: "expected `key value` lines",
                found: shorten(line),
            });
        };
        let v = parse_u64(v, path, "expected `key <count>`")?;
        match k {
            "high" => ev.high = v,
            "max" => ev.max = v,
            "oom" => ev.oom = v,
            "oom_kill" => ev.oom_kill = v,
            "under_oom" => ev.under_oom = v != 0,
            _ => {}
        }
    }
    Ok(ev)
}

/// Reads the memory cgroup in directory `dir` (an absolute path under `root`, such as
/// `/sys/fs/cgroup` or `/sys/fs/cgroup/memory/train`).
pub fn cgroup_sample(root: &Root, version: CgroupVersion, dir: &str) -> Result<CgroupSample> {
    let dir = dir.trim_end_matches('/');
    let num = |file: &str| -> Result<Option<u64>> {
        match read_opt(root, &format!("{dir}/{file}"))? {
            Some((t, p)) => parse_u64(&t, &p, "expected a byte count").map(Some),
            None => Ok(None),
        }
    };
    match version {
        CgroupVersion::V2 => {
            let limit = match read_opt(root, &format!("{dir}/memory.max"))? {
                None => Limit::Unknown,
                Some((t, _)) if t.trim() == "max" => Limit::Unlimited,
                Some((t, p)) => Limit::Bytes(parse_u64(&t, &p, "expected `max` or bytes")?),
            };
            let events = match read_opt(root, &format!("{dir}/memory.events"))? {
                Some((t, p)) => Some(parse_events(&t, &p)?),
                None => None,
            };
            let reclaimable = match read_opt(root, &format!("{dir}/memory.stat"))? {
                Some((t, p)) => parse_file_cache(&t, &p, "")?,
                None => None,
            };
            Ok(CgroupSample {
                version,
                usage: num("memory.current")?,
                limit,
                peak: num("memory.peak")?,
                events,
                reclaimable,
            })
        }
        CgroupVersion::V1 => {
            let limit = match num("memory.limit_in_bytes")? {
                None => Limit::Unknown,
                Some(v) if v >= V1_UNLIMITED => Limit::Unlimited,
                Some(v) => Limit::Bytes(v),
            };
            let events = match read_opt(root, &format!("{dir}/memory.oom_control"))? {
                Some((t, p)) => Some(parse_events(&t, &p)?),
                None => None,
            };
            let reclaimable = match read_opt(root, &format!("{dir}/memory.stat"))? {
                Some((t, p)) => parse_file_cache(&t, &p, "total_")?,
                None => None,
            };
            Ok(CgroupSample {
                version,
                usage: num("memory.usage_in_bytes")?,
                limit,
                peak: num("memory.max_usage_in_bytes")?,
                events,
                reclaimable,
            })
        }
        CgroupVersion::None => Ok(CgroupSample {
            version,
            usage: None,
            limit: Limit::Unlimited,
            peak: None,
            events: None,
            reclaimable: None,
        }),
    }
}

/// One line of `/proc/pressure/memory`: the share of wall time tasks stalled on memory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PsiLine {
    /// Percent over the last 10 s.
    pub avg10: f64,
    /// Percent over the last 60 s.
    pub avg60: f64,
    /// Percent over the last 300 s.
    pub avg300: f64,
    /// Total stall time, microseconds.
    pub total_us: u64,
}

/// Memory pressure stall information.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Psi {
    /// Some tasks stalled.
    pub some: PsiLine,
    /// All non-idle tasks stalled at once (absent on old kernels).
    pub full: Option<PsiLine>,
}

/// Parses PSI text (`some avg10=0.00 avg60=0.00 avg300=0.00 total=0`, then `full ...`).
pub fn parse_psi(text: &str, path: &std::path::Path) -> Result<Psi> {
    let bad = |line: &str| Error::Parse {
        path: path.to_path_buf(),
        reason: "expected `some|full avg10=F avg60=F avg300=F total=N`",
        found: shorten(line),
    };
    let mut some = None;
    let mut full = None;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut it = line.split_whitespace();
        let kind = it.next().ok_or_else(|| bad(line))?;
        let mut l = PsiLine {
            avg10: f64::NAN,
            avg60: f64::NAN,
            avg300: f64::NAN,
            total_us: 0,
        };
        let mut total = None;
        for kv in it {
            let (k, v) = kv.split_once('=').ok_or_else(|| bad(line))?;
            let f = || v.parse::<f64>().ok().filter(|x| x.is_finite());
            match k {
                "avg10" => l.avg10 = f().ok_or_else(|| bad(line))?,
                "avg60" => l.avg60 = f().ok_or_else(|| bad(line))?,
                "avg300" => l.avg300 = f().ok_or_else(|| bad(line))?,
                "total" => total = Some(v.parse::<u64>().map_err(|_| bad(line))?),
                _ => {}
            }
        }
        if l.avg10.is_nan() || l.avg60.is_nan() || l.avg300.is_nan() {
            return Err(bad(line));
        }
        l.total_us = total.ok_or_else(|| bad(line))?;
        match kind {
            "some" => some = Some(l),
            "full" => full = Some(l),
            _ => return Err(bad(line)),
        }
    }
    let some = some.ok_or_else(|| bad(text))?;
    Ok(Psi { some, full })
}

/// Reads `/proc/pressure/memory` under `root`; `None` when the kernel has no PSI.
pub fn psi(root: &Root) -> Result<Option<Psi>> {
    match read_opt(root, "/proc/pressure/memory")? {
        Some((t, p)) => parse_psi(&t, &p).map(Some),
        None => Ok(None),
    }
}

/// Resets this process's peak RSS (`VmHWM`) by writing `5` to `/proc/self/clear_refs`
/// under `root`, so the next [`process_memory`] reports the peak since now. Returns whether
/// the kernel accepted it (the file is missing on non-Linux systems and some sandboxes).
pub fn reset_peak(root: &Root) -> bool {
    std::fs::write(root.join("/proc/self/clear_refs"), "5").is_ok()
}

/// Returns memory the allocator keeps after frees to the kernel (glibc's `malloc_trim`),
/// so what was freed by a smaller micro-batch stops counting against the cgroup. A no-op
/// with other C libraries.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only walks the allocator's own free lists; it is thread-safe
    // and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Memory of one GPU, from NVML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuMemory {
    /// NVML device index.
    pub index: u32,
    /// Total bytes, when NVML answers.
    pub total: Option<u64>,
    /// Used bytes (`total − free`), when NVML answers both.
    pub used: Option<u64>,
}

impl GpuMemory {
    /// `used / total`, when both are known and `total > 0`.
    pub fn used_fraction(&self) -> Option<f64> {
        match (self.used, self.total) {
            (Some(u), Some(t)) if t > 0 => Some(u as f64 / t as f64),
            _ => None,
        }
    }
}

/// Memory of every GPU `source` knows; `None` when NVML is unavailable. A device that
/// cannot be queried is listed with unknown figures.
pub fn gpu_memory(source: &dyn NvmlSource) -> Option<Vec<GpuMemory>> {
    let n = source.device_count().ok()?;
    Some(
        (0..n)
            .map(|index| match source.device(index) {
                Ok(d) => GpuMemory {
                    index,
                    total: d.memory_total,
                    used: d
                        .memory_total
                        .zip(d.memory_free)
                        .map(|(t, f)| t.saturating_sub(f)),
                },
                Err(_) => GpuMemory {
                    index,
                    total: None,
                    used: None,
                },
            })
            .collect(),
    )
}

/// Everything read at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The process.
    pub process: Option<ProcessMemory>,
    /// Its memory cgroup.
    pub cgroup: Option<CgroupSample>,
    /// Memory pressure stalls.
    pub psi: Option<Psi>,
    /// GPU memory, when a source was given and NVML answered.
    pub gpus: Option<Vec<GpuMemory>>,
}

impl Sample {
    /// The bytes that count against the budget: the cgroup's working set (usage minus the
    /// page cache the kernel would reclaim first, [`CgroupSample::working_set`]) when in a
    /// limited group, which is what an OOM kill sees; else the process RSS.
    pub fn used_bytes(&self) -> Option<u64> {
        let cg = self
            .cgroup
            .filter(|c| matches!(c.limit, Limit::Bytes(_)))
            .and_then(|c| c.working_set());
        cg.or(self.process.map(|p| p.rss))
    }

    /// Bytes of the group not held by this process (another job, a memory hog, tmpfs):
    /// working set minus this process's RSS. 0 outside a limited cgroup.
    pub fn others_bytes(&self) -> u64 {
        let ws = self
            .cgroup
            .filter(|c| matches!(c.limit, Limit::Bytes(_)))
            .and_then(|c| c.working_set());
        match (ws, self.process) {
            (Some(w), Some(p)) => w.saturating_sub(p.rss),
            _ => 0,
        }
    }

    /// The fullest GPU's used fraction, when any is known.
    pub fn gpu_used_fraction(&self) -> Option<f64> {
        self.gpus
            .as_ref()?
            .iter()
            .filter_map(GpuMemory::used_fraction)
            .fold(None, |a: Option<f64>, f| Some(a.map_or(f, |a| a.max(f))))
    }
}

/// Reads the process, its cgroup and PSI through one root, and GPUs through NVML.
pub struct Sampler {
    root: Root,
    cgroup: Option<(CgroupVersion, String)>,
    gpu: Option<Box<dyn NvmlSource>>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("root", &self.root)
            .field("cgroup", &self.cgroup)
            .field("gpu", &self.gpu.as_ref().map(|_| "NvmlSource"))
            .finish()
    }
}

impl Sampler {
    /// A sampler reading under `root`, with the cgroup directory eg-hardware found
    /// ([`eg_hardware::memory::MemoryReport::cgroup`]).
    pub fn new(root: Root, cgroup: &CgroupMemory) -> Sampler {
        let cgroup = match (&cgroup.dir, cgroup.version) {
            (Some(d), v @ (CgroupVersion::V1 | CgroupVersion::V2)) => Some((v, d.clone())),
            _ => None,
        };
        Sampler {
            root,
            cgroup,
            gpu: None,
        }
    }

    /// A sampler for an explicit cgroup directory (or none).
    pub fn with_cgroup(root: Root, cgroup: Option<(CgroupVersion, String)>) -> Sampler {
        Sampler {
            root,
            cgroup,
            gpu: None,
        }
    }

    /// The root the sampler reads under.
    pub fn root(&self) -> &Root {
        &self.root
    }

    /// Also samples GPU memory from `source` (eg-hardware's `RuntimeNvml`, or a fake).
    pub fn gpu(mut self, source: Box<dyn NvmlSource>) -> Sampler {
        self.gpu = Some(source);
        self
    }

    /// Reads everything once.
    pub fn sample(&self) -> Result<Sample> {
        let cgroup = match &self.cgroup {
            Some((v, d)) => Some(cgroup_sample(&self.root, *v, d)?),
            None => None,
        };
        Ok(Sample {
            process: process_memory(&self.root)?,
            cgroup,
            psi: psi(&self.root)?,
            gpus: self.gpu.as_deref().and_then(gpu_memory),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_parses_some_and_full() {
        let t = "some avg10=1.50 avg60=0.20 avg300=0.00 total=12345\nfull avg10=0.50 avg60=0.10 avg300=0.00 total=678\n";
        let p = parse_psi(t, std::path::Path::new("x")).unwrap();
        assert_eq!(p.some.avg10, 1.5);
        assert_eq!(p.some.total_us, 12345);
        assert_eq!(p.full.unwrap().avg10, 0.5);
    }

    #[test]
    fn psi_rejects_junk() {
        for t in [
            "",
            "some avg10=x avg60=0 avg300=0 total=1",
            "weird avg10=0 avg60=0 avg300=0 total=1",
            "some avg10=1",
        ] {
            assert!(parse_psi(t, std::path::Path::new("x")).is_err(), "{t:?}");
        }
    }

    #[test]
    fn events_parse() {
        let e = parse_events(
            "low 0\nhigh 3\nmax 7\noom 1\noom_kill 1\noom_group_kill 0\n",
            std::path::Path::new("x"),
        )
        .unwrap();
        assert_eq!((e.high, e.max, e.oom, e.oom_kill), (3, 7, 1, 1));
        let v1 = parse_events(
            "oom_kill_disable 0\nunder_oom 1\noom_kill 2\n",
            std::path::Path::new("x"),
        )
        .unwrap();
        assert!(v1.under_oom);
        assert_eq!(v1.oom_kill, 2);
    }
}
