//! Capacity: measured GEMM throughput per dtype, memory bandwidth, the per-machine cache, and
//! a rough "largest model that fits" per training strategy.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::HardwareReport;
use crate::error::{Error, Result};

/// One GEMM measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GemmFigure {
    /// Device (`cpu`).
    pub device: String,
    /// Data type (`f32`, `bf16`, `f16`).
    pub dtype: String,
    /// Square matrix size `n` (an `n×n` by `n×n` product).
    pub n: usize,
    /// Products timed.
    pub iterations: u32,
    /// Seconds spent in the timed products.
    pub seconds: f64,
    /// Throughput in GFLOP/s (`2·n³` per product); `None` if the dtype could not be measured.
    pub gflops: Option<f64>,
    /// Why there is no figure, when there is none.
    pub note: Option<String>,
}

/// Measured capacity of this machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapacityReport {
    /// What identifies the machine this was measured on (see [`machine_fingerprint`]).
    pub fingerprint: String,
    /// When it was measured, seconds since the Unix epoch.
    pub measured_at_unix: u64,
    /// Threads candle used.
    pub threads: usize,
    /// GEMM figures, one per dtype.
    pub gemm: Vec<GemmFigure>,
    /// Memory copy bandwidth in GB/s (10^9 bytes), counting bytes read plus bytes written.
    pub memory_bandwidth_gb_s: Option<f64>,
    /// Whether this came from the cache rather than a fresh measurement.
    pub from_cache: bool,
}

/// Options for [`probe_capacity`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOptions {
    /// Directory of the per-machine cache; `None` disables caching.
    pub cache_dir: Option<PathBuf>,
    /// Total time for all GEMM and memory measurements (between 0.3 s and 60 s).
    pub budget: Duration,
    /// Measure again even when the cache holds a figure for this machine.
    pub refresh: bool,
}

impl Default for ProbeOptions {
    /// No cache, 8 s, no refresh.
    fn default() -> Self {
        Self {
            cache_dir: None,
            budget: Duration::from_secs(8),
            refresh: false,
        }
    }
}

/// A string that changes when the machine (or what the measurement depends on) changes:
/// CPU model, logical CPUs, usable CPUs, kernel ISA features, total memory, candle version.
pub fn machine_fingerprint(report: &HardwareReport) -> String {
    let c = &report.cpu;
    format!(
        "v1|cpu={}|logical={}|usable={}|features={}|mem={}|candle=0.11",
        c.model.as_deref().unwrap_or("unknown"),
        c.logical_cores.map_or("unknown".into(), |n| n.to_string()),
        c.usable_cores.map_or("unknown".into(), |n| n.to_string()),
        c.features
            .as_ref()
            .map_or("unknown".into(), |f| f.join(",")),
        report
            .memory
            .total_bytes
            .map_or("unknown".into(), |n| n.to_string()),
    )
}

/// FNV-1a, 64 bit: a stable short name for a fingerprint (not for security).
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The cache file for a fingerprint inside `dir`.
pub fn cache_path(dir: &Path, fingerprint: &str) -> PathBuf {
    dir.join(format!("capacity-{:016x}.json", fnv1a(fingerprint)))
}

/// Reads a cached capacity report; `Ok(None)` when there is none for this fingerprint.
pub fn read_cache(dir: &Path, fingerprint: &str) -> Result<Option<CapacityReport>> {
    let path = cache_path(dir, fingerprint);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", &path, e)),
    };
    let mut report: CapacityReport =
        serde_json::from_slice(&bytes).map_err(|source| Error::CacheFormat {
            path: path.clone(),
            source,
        })?;
    if report.fingerprint != fingerprint {
        return Ok(None);
    }
    report.from_cache = true;
    Ok(Some(report))
}

/// Writes `bytes` to `path` atomically: a temporary name in the same directory, `fsync`,
/// rename, then `fsync` of the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| Error::io("write", &tmp, e))?;
        f.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io("rename", &tmp, e))?;
        let d = std::fs::File::open(dir).map_err(|e| Error::io("open", dir, e))?;
        d.sync_all().map_err(|e| Error::io("fsync", dir, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes a capacity report to the cache.
pub fn write_cache(dir: &Path, report: &CapacityReport) -> Result<PathBuf> {
    let path = cache_path(dir, &report.fingerprint);
    let mut stored = report.clone();
    stored.from_cache = false;
    let bytes = serde_json::to_vec_pretty(&stored).map_err(|source| Error::Serialize {
        what: "capacity cache",
        source,
    })?;
    write_atomic(&path, &bytes)?;
    Ok(path)
}

/// Returns this machine's capacity: from the cache when it holds a figure for the same
/// fingerprint (unless `refresh`), else measured within `budget` and written to the cache.
pub fn probe_capacity(report: &HardwareReport, opts: &ProbeOptions) -> Result<CapacityReport> {
    if opts.budget < Duration::from_millis(300) || opts.budget > Duration::from_secs(60) {
        return Err(Error::InvalidLimit {
            name: "budget",
            value: format!("{:?}", opts.budget),
            allowed: "between 0.3 s and 60 s",
        });
    }
    let fingerprint = machine_fingerprint(report);
    if let (Some(dir), false) = (&opts.cache_dir, opts.refresh) {
        match read_cache(dir, &fingerprint) {
            Ok(Some(c)) => return Ok(c),
            Ok(None) => {}
            Err(e) => tracing::warn!(target: "eg_hardware", "ignoring capacity cache: {e}"),
        }
    }
    let gpus = match report.gpu.status {
        crate::gpu::GpuStatus::Available => report.gpu.devices.len(),
        _ => 0,
    };
    let measured = measure(&fingerprint, opts.budget, gpus)?;
    if let Some(dir) = &opts.cache_dir {
        write_cache(dir, &measured)?;
    }
    Ok(measured)
}

/// Measures GEMM per dtype on the CPU (and on `gpus` CUDA devices) and memory bandwidth,
/// within `budget` in total.
///
/// GPU figures need the `cuda` feature (candle built with CUDA); without it each GPU gets a
/// figure with no throughput and a note saying so. Call this with `gpus > 0` only when NVML
/// found a driver: candle's CUDA layer (cudarc) panics when the CUDA library is missing.
pub fn measure(fingerprint: &str, budget: Duration, gpus: usize) -> Result<CapacityReport> {
    use candle_core::{DType, Device};
    #[rustfmt::skip]
    const DTYPES: [(DType, &str); 3] = [
        (DType::F32, "f32"),
        (DType::BF16, "bf16"),
        (DType::F16, "f16"),
    ];
    let per_gemm = budget.mul_f64(0.85 / (3.0 * (1 + gpus) as f64));
    let mut gemm = Vec::new();
    for (dtype, name) in DTYPES {
        gemm.push(gemm_on(
            &Device::Cpu,
            "cpu",
            dtype,
            name,
            CPU_GEMM_N,
            per_gemm,
        )?);
    }
    for i in 0..gpus {
        for (dtype, name) in DTYPES {
            match gemm_cuda(i, dtype, name, per_gemm) {
                Ok(f) => gemm.push(f),
                Err(e @ (Error::FeatureDisabled { .. } | Error::Gemm { .. })) => {
                    gemm.push(GemmFigure {
                        device: format!("cuda:{i}"),
                        dtype: name.into(),
                        n: 0,
                        iterations: 0,
                        seconds: 0.0,
                        gflops: None,
                        note: Some(e.to_string()),
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }
    let memory_bandwidth_gb_s = memory_bandwidth(budget.mul_f64(0.12));
    Ok(CapacityReport {
        fingerprint: fingerprint.to_owned(),
        measured_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        threads: candle_core::utils::get_num_threads(),
        gemm,
        memory_bandwidth_gb_s,
        from_cache: false,
    })
}

/// GEMM throughput on CUDA device `index`.
///
/// Without the `cuda` feature this returns [`Error::FeatureDisabled`]. With it, call it only
/// when NVML reported a driver: candle links the CUDA driver library when built with `cuda`
/// (cudarc's `dynamic-linking`), so there is no `is_culib_present` check to make here.
pub fn gemm_cuda(
    index: usize,
    dtype: candle_core::DType,
    name: &'static str,
    budget: Duration,
) -> Result<GemmFigure> {
    if !cfg!(feature = "cuda") {
        return Err(Error::FeatureDisabled {
            what: "GEMM throughput on a GPU",
            feature: "cuda",
        });
    }
    let label = format!("cuda:{index}");
    let dev = candle_core::Device::new_cuda(index).map_err(|source| Error::Gemm {
        dtype: name,
        device: label.clone(),
        source,
    })?;
    gemm_on(&dev, &label, dtype, name, GPU_GEMM_N, budget)
}

/// Matrix size of the CPU GEMM probe: fixed so figures compare across machines and runs.
pub const CPU_GEMM_N: usize = 1024;
/// Matrix size of the GPU GEMM probe.
pub const GPU_GEMM_N: usize = 4096;

/// GFLOP/s of an `n×n · n×n` product in `dtype` on `dev` within about `budget`: one untimed
/// warm-up product, then products timed for the rest of the budget (at least one). When the
/// warm-up alone takes half the budget, it is the measurement (noted). The device is
/// synchronised before the clock stops.
pub fn gemm_on(
    dev: &candle_core::Device,
    device_name: &str,
    dtype: candle_core::DType,
    name: &'static str,
    n: usize,
    budget: Duration,
) -> Result<GemmFigure> {
    use candle_core::Tensor;
    let err = |source| Error::Gemm {
        dtype: name,
        device: device_name.to_owned(),
        source,
    };
    let sync = |d: &candle_core::Device| d.synchronize().map_err(err);
    // Dense GEMM speed does not depend on the values (short of subnormals), so constant
    // operands do: cheap to build in any build profile, and every sum (n/4) is exact in f16.
    let a = Tensor::full(0.5f32, (n, n), dev)
        .and_then(|t| t.to_dtype(dtype))
        .map_err(err)?;
    // A separate buffer, so the product reads two matrices as a real one does.
    let b = Tensor::full(0.5f32, (n, n), dev)
        .and_then(|t| t.to_dtype(dtype))
        .map_err(err)?;
    sync(dev)?;
    // Warm-up (thread pool start, page faults, kernel selection). A dtype the device cannot
    // multiply is reported, not raised.
    let start = Instant::now();
    if let Err(e) = a.matmul(&b).and_then(|c| dev.synchronize().map(|()| c)) {
        return Ok(GemmFigure {
            device: device_name.into(),
            dtype: name.into(),
            n,
            iterations: 0,
            seconds: 0.0,
            gflops: None,
            note: Some(format!("matmul not available: {e}")),
        });
    }
    let warm_up = start.elapsed();
    let flops_per_product = 2.0 * (n as f64).powi(3);
    if warm_up >= budget / 2 {
        // A slow or busy machine: the warm-up product is the measurement (pessimistic), so the
        // probe stays within about one product of its budget.
        let seconds = warm_up.as_secs_f64();
        return Ok(GemmFigure {
            device: device_name.into(),
            dtype: name.into(),
            n,
            iterations: 1,
            seconds,
            gflops: Some(flops_per_product / seconds / 1e9),
            note: Some("one product only (it took half the time budget); includes warm-up".into()),
        });
    }
    let budget = budget.saturating_sub(warm_up);
    let start = Instant::now();
    let mut iterations = 0u32;
    while iterations == 0 || start.elapsed() < budget {
        let c = a.matmul(&b).map_err(err)?;
        // Keep the result alive until here so the product is not optimised away.
        std::hint::black_box(&c);
        iterations += 1;
        if iterations.is_multiple_of(8) {
            sync(dev)?;
        }
    }
    sync(dev)?;
    let seconds = start.elapsed().as_secs_f64();
    let flops = flops_per_product * f64::from(iterations);
    Ok(GemmFigure {
        device: device_name.into(),
        dtype: name.into(),
        n,
        iterations,
        seconds,
        gflops: Some(flops / seconds / 1e9),
        note: None,
    })
}

/// Memory copy bandwidth (bytes read + bytes written per second, GB/s) on buffers far larger
/// than the last-level cache, timed for about `budget`.
pub fn memory_bandwidth(budget: Duration) -> Option<f64> {
    const LEN: usize = 128 << 20;
    let src = vec![1u8; LEN];
    let mut dst = vec![0u8; LEN];
    dst.copy_from_slice(&src); // fault the pages in before timing
    let start = Instant::now();
    let mut copies = 0u64;
    while copies == 0 || start.elapsed() < budget {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        copies += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = 2.0 * LEN as f64 * copies as f64;
    (secs > 0.0).then(|| bytes / secs / 1e9)
}

/// A training strategy for the rough fit estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// f32 weights, f32 gradients, AdamW state in f32.
    FullF32,
    /// bf16 weights and gradients with an f32 master copy and f32 AdamW state.
    Bf16MixedF32Master,
    /// Frozen bf16 base, trainable low-rank adapters (~1% of parameters).
    Lora,
    /// Frozen 4-bit NF4 base, trainable low-rank adapters (~1% of parameters).
    Qlora,
}

impl Strategy {
    /// All strategies, in report order.
    pub const ALL: [Strategy; 4] = [
        Strategy::FullF32,
        Strategy::Bf16MixedF32Master,
        Strategy::Lora,
        Strategy::Qlora,
    ];

    /// Bytes per model parameter for weights, gradients and optimizer state.
    pub fn bytes_per_param(self) -> f64 {
        // Adapters: 1% of the parameters, each with f32 weight, gradient and two AdamW moments.
        const ADAPTERS: f64 = 0.01 * 16.0;
        match self {
            // 4 weight + 4 gradient + 8 AdamW (m, v).
            Strategy::FullF32 => 16.0,
            // 2 weight + 2 gradient + 4 master + 8 AdamW.
            Strategy::Bf16MixedF32Master => 16.0,
            // 2 frozen weight + adapters.
            Strategy::Lora => 2.0 + ADAPTERS,
            // 0.5 NF4 weight + ~0.03 block scales (double-quantised) + adapters.
            Strategy::Qlora => 0.53 + ADAPTERS,
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::FullF32 => "full f32",
            Strategy::Bf16MixedF32Master => "bf16 + f32 master",
            Strategy::Lora => "LoRA (bf16 base)",
            Strategy::Qlora => "QLoRA (NF4 base)",
        })
    }
}

/// What this estimate leaves out. Printed with every fit figure.
pub const FIT_NOTE: &str = "ROUGH estimate: weights + gradients + AdamW state only, with 25% of the \
budget held back for activations, buffers and fragmentation; the memory planner refines this \
for a given sequence length and batch";

/// Share of the budget given to parameters and optimizer state in the rough estimate.
pub const FIT_PARAM_SHARE: f64 = 0.75;

/// A rough largest model for one strategy on one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitEstimate {
    /// Device (`cpu`, `cuda:0`).
    pub device: String,
    /// Strategy.
    pub strategy: Strategy,
    /// Memory budget used, bytes; `None` when unknown.
    pub budget_bytes: Option<u64>,
    /// Bytes per parameter assumed.
    pub bytes_per_param: f64,
    /// Largest parameter count (rough); `None` when the budget is unknown.
    pub max_params: Option<u64>,
    /// Always `true`: this is an estimate, not a plan.
    pub rough: bool,
}

/// Rough fit estimates for every strategy with `budget_bytes` on `device`.
pub fn rough_fits(device: &str, budget_bytes: Option<u64>) -> Vec<FitEstimate> {
    Strategy::ALL
        .iter()
        .map(|&s| FitEstimate {
            device: device.to_owned(),
            strategy: s,
            budget_bytes,
            bytes_per_param: s.bytes_per_param(),
            max_params: budget_bytes
                .map(|b| (b as f64 * FIT_PARAM_SHARE / s.bytes_per_param()) as u64),
            rough: true,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_scale_with_budget() {
        let f = rough_fits("cpu", Some(16 << 30));
        assert_eq!(f.len(), 4);
        let full = f[0].max_params.unwrap();
        let qlora = f[3].max_params.unwrap();
        assert!(qlora > 20 * full);
        // 16 GiB * 0.75 / 16 B ≈ 805 M parameters.
        assert!((800_000_000..810_000_000).contains(&full), "{full}");
        assert!(
            rough_fits("cpu", None)
                .iter()
                .all(|f| f.max_params.is_none())
        );
    }

    #[test]
    fn fnv_is_stable() {
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
