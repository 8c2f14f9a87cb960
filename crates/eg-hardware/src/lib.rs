//! # eg-hardware
//!
//! One truthful [`HardwareReport`] of the machine a training run is about to use, and the
//! capacity figures every later decision (precision, micro-batch, offload, what fits) starts
//! from.
//!
//! ## Brief overview
//!
//! * [`Detector::detect`] reads CPU, memory (including the cgroup v1/v2 limit of *this*
//!   process), GPUs, storage for chosen paths, thermal sensors and the power source. It never
//!   fails: what cannot be read is `None` ("unknown") and a warning, logged with `tracing` and
//!   kept in [`HardwareReport::warnings`]. It never reports 0 for something it does not know.
//! * Every file is read through a [`Root`]. [`Root::host`] is the running machine; any other
//!   directory is a fixture tree (`proc/meminfo`, `sys/fs/cgroup/...` below it), which is how
//!   the tests cover a cgroup-v2 container, a v1 container, a laptop on battery and a server
//!   without sensors on one machine. System calls that cannot be redirected (free space, CPU
//!   affinity) are made only for the host root.
//! * GPUs come from NVML through the [`gpu::NvmlSource`] trait. The real source,
//!   [`gpu::RuntimeNvml`], loads `libnvidia-ml` at run time; no driver is the normal answer
//!   [`gpu::GpuStatus::NoDriver`] ("no NVIDIA driver found"), not an error. No CUDA is needed to
//!   build this crate.
//! * Probes are explicit and bounded: [`capacity::probe_capacity`] (GEMM GFLOP/s for f32,
//!   bf16, f16 with candle on the CPU, and on each GPU with the `cuda` feature, plus memory
//!   bandwidth; cached per machine in a directory the caller chooses, written atomically) and [`storage::measure_bandwidth`] (sequential
//!   write and read, bounded in bytes and seconds, `fsync`'d, direct I/O where allowed, the
//!   file removed even on error).
//! * [`capacity::rough_fits`] gives a *rough* largest model per strategy (full f32, bf16 with
//!   f32 master, LoRA, QLoRA). It is labelled rough everywhere; the memory planner refines it.
//!
//! Why so much `Option`: a report that says "4 GiB available" when it could not read the
//! cgroup limit causes an OOM kill an hour into a run; "unknown" makes the caller choose.
//!
//! ## Example
//!
//! ```
//! use eg_hardware::{Detector, Root};
//!
//! let report = Detector::new(Root::host()).storage_path(".").detect();
//! println!("{report}");
//! if let Some(bytes) = report.memory.effective_limit_bytes {
//!     assert!(bytes > 0);
//! }
//! let json = serde_json::to_string(&report).unwrap();
//! assert!(json.contains("\"schema_version\":1"));
//!
//! // The same detection on a fixture tree: a container with a 4 GiB cgroup-v2 limit on a
//! // 256 GiB host reports 4 GiB.
//! let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cgroup-v2-container");
//! let report = Detector::new(Root::new(fixture)).detect();
//! assert_eq!(report.memory.effective_limit_bytes, Some(4 << 30));
//! ```
//!
//! The `eg hw` subcommand (`crates/eg-cli/src/hw.rs`) is built from this crate too, as the `hw`
//! example: `cargo run --release -p eg-hardware --example hw -- --probe`.
//!
//! ## Report schema (version 1)
//!
//! [`HardwareReport`] serializes with serde (JSON in `eg hw --json`). Field names are the Rust
//! field names; `null` means unknown. Byte counts are integers in bytes, temperatures in °C,
//! frequencies in MHz, bandwidths in MB/s (10^6) for storage and GB/s (10^9) for memory.
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `schema_version` | integer | [`SCHEMA_VERSION`]; bumped on any incompatible change |
//! | `hostname`, `kernel` | string? | `/proc/sys/kernel/{hostname,osrelease}` |
//! | `cpu` | [`cpu::CpuReport`] | `isa` (`x86`/`arm`/`unknown`), `vendor`, `model`, `logical_cores`, `usable_cores` (affinity, = `nproc`), `physical_cores`, `sockets`, `numa_nodes`, `cgroup_quota` (`{"cores": 1.5}`, `"unlimited"`, `"unknown"`), `caches[]` (`level`, `kind`, `size_bytes`, `shared_by_cpus`), `features` (canonical names from [`cpu::KERNEL_FEATURES`], `null` if unreadable), `current_mhz`, `max_mhz` |
//! | `memory` | [`memory::MemoryReport`] | `total_bytes`, `available_bytes`, `swap_*`, `shm` (`total_bytes`, `available_bytes`), `cgroup` (`version`: `v1`/`v2`/`none`; `dir`; `limit` (tightest over the group and its ancestors, and v1's `hierarchical_memory_limit`) and `high`: `{"bytes": n}`, `"unlimited"` (`max`) or `"unknown"` (unreadable, garbage); `usage_bytes`), `effective_limit_bytes` (min of total, cgroup limit, high; `null` if the cgroup limit is unknown), `effective_available_bytes` |
//! | `gpu` | [`gpu::GpuReport`] | `status` (`{"state": "available"}`, `{"state": "no_driver", "reason": ...}`, `failed`, `not_queried`), `driver_version`, `cuda_version`, `devices[]` (name, memory, compute capability, `bf16_native`, temperature, power W, clocks MHz, `throttle_reasons`, ECC, PCIe) |
//! | `storage[]` | [`storage::StorageReport`] | per requested path: `mount_point`, `filesystem`, `device`, `disk`, `model`, `kind` (`nvme`, `ssd`, `hdd`, `network`, `tmpfs`, `virtual`, `unknown`), `total_bytes`, `free_bytes`, `bandwidth` (`write_mb_s`, `read_mb_s`, `bytes`, `direct_io`, `read_may_be_cached`) when probed |
//! | `thermal` | [`thermal::ThermalReport`] | `sensors[]`: `source` (`hwmon`/`thermal_zone`/`nvml`), `chip`, `label`, `temperature_c`, `max_c`, `critical_c` |
//! | `power` | [`thermal::PowerReport`] | `source` (`ac`/`battery`/`unknown`), `batteries[]`, `cpu_governor` |
//! | `capacity` | [`capacity::CapacityReport`]? | present after a probe: `gemm[]` (`device`, `dtype`, `n`, `iterations`, `seconds`, `gflops`, `note` when there is no figure or only one product), `memory_bandwidth_gb_s`, `threads`, `fingerprint`, `measured_at_unix`, `from_cache` |
//! | `fits[]` | [`capacity::FitEstimate`] | per device and strategy: `budget_bytes`, `bytes_per_param`, `max_params`, `rough: true` |
//! | `warnings[]` | string | every reason something is unknown |

pub mod capacity;
pub mod cpu;
mod error;
pub mod gpu;
pub mod memory;
mod mounts;
mod render;
mod root;
pub mod storage;
pub mod thermal;

pub use error::{Error, Result};
pub use root::Root;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Version of the [`HardwareReport`] schema.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything this crate knows about the machine. See the crate docs for the schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HardwareReport {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// Host name.
    pub hostname: Option<String>,
    /// Kernel release.
    pub kernel: Option<String>,
    /// CPU.
    pub cpu: cpu::CpuReport,
    /// Memory and cgroup limits.
    pub memory: memory::MemoryReport,
    /// NVIDIA GPUs.
    pub gpu: gpu::GpuReport,
    /// Storage for each requested path.
    pub storage: Vec<storage::StorageReport>,
    /// Temperature sensors.
    pub thermal: thermal::ThermalReport,
    /// Power source.
    pub power: thermal::PowerReport,
    /// Measured capacity, when probed.
    pub capacity: Option<capacity::CapacityReport>,
    /// Rough largest-model estimates per device and strategy.
    pub fits: Vec<capacity::FitEstimate>,
    /// Why things are unknown.
    pub warnings: Vec<String>,
}

/// Where GPU information comes from.
pub enum GpuQuery {
    /// Do not query GPUs ([`gpu::GpuStatus::NotQueried`]).
    Skip,
    /// The real NVML, loaded at run time.
    Runtime,
    /// A given source (tests, or a caller that already opened NVML).
    Source(Box<dyn gpu::NvmlSource>),
    /// A given answer: NVML is unavailable for this reason.
    Unavailable(gpu::NvmlUnavailable),
}

impl std::fmt::Debug for GpuQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GpuQuery::Skip => f.write_str("Skip"),
            GpuQuery::Runtime => f.write_str("Runtime"),
            GpuQuery::Source(_) => f.write_str("Source(..)"),
            GpuQuery::Unavailable(u) => write!(f, "Unavailable({u:?})"),
        }
    }
}

/// Builds a [`HardwareReport`]. Detection reads files only (plus NVML, when asked) and runs no
/// probe.
#[derive(Debug)]
pub struct Detector {
    root: Root,
    storage_paths: Vec<PathBuf>,
    gpu: GpuQuery,
}

impl Detector {
    /// A detector reading under `root`. The real NVML is queried when `root` is the host;
    /// for fixture roots GPUs are skipped unless [`Detector::gpu`] says otherwise.
    pub fn new(root: Root) -> Self {
        let gpu = if root.is_host() {
            GpuQuery::Runtime
        } else {
            GpuQuery::Skip
        };
        Self {
            root,
            storage_paths: Vec::new(),
            gpu,
        }
    }

    /// Adds a path (checkpoint, data or offload directory) whose storage is reported. On a
    /// fixture root it is an absolute path inside the fixture's mount table.
    pub fn storage_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.storage_paths.push(path.into());
        self
    }

    /// Chooses where GPU information comes from.
    pub fn gpu(mut self, query: GpuQuery) -> Self {
        self.gpu = query;
        self
    }

    /// Reads everything. Never fails; see [`HardwareReport::warnings`].
    pub fn detect(&self) -> HardwareReport {
        let mut notes = root::Notes::default();
        let root = &self.root;
        let mounts = mounts::read(root, &mut notes);
        let cpu = cpu::detect(root, &mounts, &mut notes);
        let memory = memory::detect(root, &mounts, &mut notes);
        let gpu = match &self.gpu {
            GpuQuery::Skip => gpu::GpuReport {
                status: gpu::GpuStatus::NotQueried,
                driver_version: None,
                cuda_version: None,
                devices: Vec::new(),
            },
            GpuQuery::Runtime => gpu::detect_runtime(),
            GpuQuery::Source(s) => gpu::report_from(Ok(s.as_ref())),
            GpuQuery::Unavailable(u) => gpu::report_from(Err(u.clone())),
        };
        let storage = self
            .storage_paths
            .iter()
            .map(|p| storage::detect(root, &mounts, p, &mut notes))
            .collect();
        let mut thermal = thermal::detect_thermal(root, &mut notes);
        thermal
            .sensors
            .extend(gpu.devices.iter().map(|d| thermal::Sensor {
                source: "nvml".to_owned(),
                chip: d.name.clone().unwrap_or_else(|| "gpu".to_owned()),
                label: format!("cuda:{}", d.index),
                temperature_c: d.temperature_c.map(f64::from),
                max_c: d.slowdown_temperature_c.map(f64::from),
                critical_c: None,
            }));
        let power = thermal::detect_power(root, &mut notes);
        let mut fits = capacity::rough_fits("cpu", memory.effective_limit_bytes);
        for d in &gpu.devices {
            fits.extend(capacity::rough_fits(
                &format!("cuda:{}", d.index),
                d.memory_total_bytes,
            ));
        }
        let hostname = root::read_line(
            root,
            "/proc/sys/kernel/hostname",
            root::Missing::Quiet,
            &mut notes,
        );
        let kernel = root::read_line(
            root,
            "/proc/sys/kernel/osrelease",
            root::Missing::Quiet,
            &mut notes,
        );
        HardwareReport {
            schema_version: SCHEMA_VERSION,
            hostname,
            kernel,
            cpu,
            memory,
            gpu,
            storage,
            thermal,
            power,
            capacity: None,
            fits,
            warnings: notes.warnings,
        }
    }
}

/// Detects the running machine (host root, real NVML) with storage for `paths`.
pub fn detect_host<P: Into<PathBuf>>(paths: impl IntoIterator<Item = P>) -> HardwareReport {
    paths
        .into_iter()
        .fold(Detector::new(Root::host()), |d, p| d.storage_path(p))
        .detect()
}
