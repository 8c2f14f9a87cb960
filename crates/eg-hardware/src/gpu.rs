//! NVIDIA GPUs through NVML, loaded at run time.
//!
//! The NVML calls sit behind [`NvmlSource`], so what this module decides (how to name
//! throttle reasons, which CUDA version a driver integer means, whether bf16 is native, what
//! "no driver" looks like) is tested with a fake source and no GPU. [`RuntimeNvml`] is the real
//! source: `nvml-wrapper` opens `libnvidia-ml.so` with `dlopen` when asked, so nothing about
//! CUDA is needed at build time, and a machine without the driver gets
//! [`GpuStatus::NoDriver`], which is a normal answer, not an error.

use serde::{Deserialize, Serialize};

/// Why NVML could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NvmlUnavailable {
    /// The NVML library or the kernel driver is absent.
    NoDriver(String),
    /// NVML is present but failed.
    Failed(String),
}

/// Raw per-device values as NVML gives them (units as in NVML: milliwatts, MHz, a throttle
/// bit mask). `None` is "not supported on this device" or "query failed".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawGpu {
    /// Product name.
    pub name: Option<String>,
    /// UUID.
    pub uuid: Option<String>,
    /// Total framebuffer memory in bytes.
    pub memory_total: Option<u64>,
    /// Free framebuffer memory in bytes.
    pub memory_free: Option<u64>,
    /// CUDA compute capability (major, minor).
    pub compute_capability: Option<(i32, i32)>,
    /// GPU core temperature in °C.
    pub temperature_c: Option<u32>,
    /// Slowdown temperature threshold in °C.
    pub slowdown_temperature_c: Option<u32>,
    /// Power draw in milliwatts.
    pub power_usage_mw: Option<u32>,
    /// Enforced power limit in milliwatts.
    pub power_limit_mw: Option<u32>,
    /// Current graphics / SM / memory clocks in MHz.
    pub clocks_mhz: [Option<u32>; 3],
    /// Maximum graphics / SM / memory clocks in MHz.
    pub max_clocks_mhz: [Option<u32>; 3],
    /// NVML clock throttle reason bit mask.
    pub throttle_reasons: Option<u64>,
    /// Volatile ECC errors (corrected, uncorrected) since the driver loaded.
    pub ecc_volatile: Option<(u64, u64)>,
    /// Current PCIe link (generation, width).
    pub pcie_current: Option<(u32, u32)>,
    /// Maximum PCIe link (generation, width).
    pub pcie_max: Option<(u32, u32)>,
}

/// A source of NVML answers. Implemented by [`RuntimeNvml`] and by fakes in tests.
pub trait NvmlSource {
    /// Driver version string.
    fn driver_version(&self) -> Option<String>;
    /// CUDA driver API version as NVML encodes it (`12040` for 12.4).
    fn cuda_driver_version(&self) -> Option<i32>;
    /// Number of devices.
    fn device_count(&self) -> Result<u32, NvmlUnavailable>;
    /// Raw values for device `index`.
    fn device(&self, index: u32) -> Result<RawGpu, NvmlUnavailable>;
}

/// One GPU in the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuDevice {
    /// Index as NVML numbers it.
    pub index: u32,
    /// Product name.
    pub name: Option<String>,
    /// UUID.
    pub uuid: Option<String>,
    /// Total memory in bytes.
    pub memory_total_bytes: Option<u64>,
    /// Free memory in bytes.
    pub memory_free_bytes: Option<u64>,
    /// Compute capability as `major.minor`.
    pub compute_capability: Option<String>,
    /// Native bf16 tensor cores (compute capability 8.0 or newer).
    pub bf16_native: Option<bool>,
    /// Core temperature, °C.
    pub temperature_c: Option<u32>,
    /// Slowdown threshold, °C.
    pub slowdown_temperature_c: Option<u32>,
    /// Power draw, watts.
    pub power_draw_w: Option<f64>,
    /// Enforced power limit, watts.
    pub power_limit_w: Option<f64>,
    /// Current graphics clock, MHz.
    pub graphics_clock_mhz: Option<u32>,
    /// Current SM clock, MHz.
    pub sm_clock_mhz: Option<u32>,
    /// Current memory clock, MHz.
    pub memory_clock_mhz: Option<u32>,
    /// Maximum SM clock, MHz.
    pub max_sm_clock_mhz: Option<u32>,
    /// Active throttle reasons by name (`gpu_idle`, `sw_power_cap`, `hw_thermal_slowdown`...);
    /// `None` when unknown.
    pub throttle_reasons: Option<Vec<String>>,
    /// Volatile corrected ECC errors.
    pub ecc_corrected: Option<u64>,
    /// Volatile uncorrected ECC errors.
    pub ecc_uncorrected: Option<u64>,
    /// Current PCIe link as `genN xW`.
    pub pcie_link: Option<String>,
    /// Maximum PCIe link as `genN xW`.
    pub pcie_link_max: Option<String>,
}

/// Whether GPUs could be queried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum GpuStatus {
    /// NVML answered (there may still be zero devices).
    Available,
    /// No NVIDIA driver: a normal answer on CPU machines.
    NoDriver(String),
    /// NVML is present but failed.
    Failed(String),
    /// GPU detection was not requested.
    NotQueried,
}

/// The GPU part of the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuReport {
    /// Whether NVML answered.
    pub status: GpuStatus,
    /// Driver version.
    pub driver_version: Option<String>,
    /// CUDA driver API version (`12.4`).
    pub cuda_version: Option<String>,
    /// The devices.
    pub devices: Vec<GpuDevice>,
}

/// NVML throttle reason bits and their names.
pub const THROTTLE_REASONS: &[(u64, &str)] = &[
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
];

/// Names the set bits of an NVML throttle mask; unknown bits are named by value.
pub fn throttle_reason_names(mask: u64) -> Vec<String> {
    let mut out: Vec<String> = THROTTLE_REASONS
        .iter()
        .filter(|(bit, _)| mask & bit != 0)
        .map(|(_, n)| (*n).to_owned())
        .collect();
    let known: u64 = THROTTLE_REASONS
        .iter()
        .map(|(b, _)| b)
        .fold(0, |a, b| a | b);
    let rest = mask & !known;
    if rest != 0 {
        out.push(format!("unknown_bits_{rest:#x}"));
    }
    out
}

/// `12040` → `12.4`.
pub fn cuda_version_string(v: i32) -> Option<String> {
    if v <= 0 {
        return None;
    }
    Some(format!("{}.{}", v / 1000, (v % 1000) / 10))
}

/// Builds the report from any NVML source (or the reason there is none).
pub fn report_from(source: Result<&dyn NvmlSource, NvmlUnavailable>) -> GpuReport {
    let source = match source {
        Ok(s) => s,
        Err(NvmlUnavailable::NoDriver(r)) => {
            return GpuReport {
                status: GpuStatus::NoDriver(r),
                driver_version: None,
                cuda_version: None,
                devices: Vec::new(),
            };
        }
        Err(NvmlUnavailable::Failed(r)) => {
            tracing::warn!(target: "eg_hardware", "NVML failed: {r}");
            return GpuReport {
                status: GpuStatus::Failed(r),
                driver_version: None,
                cuda_version: None,
                devices: Vec::new(),
            };
        }
    };
    let driver_version = source.driver_version();
    let cuda_version = source.cuda_driver_version().and_then(cuda_version_string);
    let count = match source.device_count() {
        Ok(n) => n,
        Err(NvmlUnavailable::NoDriver(r)) | Err(NvmlUnavailable::Failed(r)) => {
            tracing::warn!(target: "eg_hardware", "NVML device count failed: {r}");
            return GpuReport {
                status: GpuStatus::Failed(r),
                driver_version,
                cuda_version,
                devices: Vec::new(),
            };
        }
    };
    let mut devices = Vec::new();
    for index in 0..count {
        match source.device(index) {
            Ok(raw) => devices.push(decode(index, raw)),
            Err(NvmlUnavailable::NoDriver(r)) | Err(NvmlUnavailable::Failed(r)) => {
                tracing::warn!(target: "eg_hardware", "GPU {index}: NVML query failed: {r}");
                devices.push(decode(index, RawGpu::default()));
            }
        }
    }
    GpuReport {
        status: GpuStatus::Available,
        driver_version,
        cuda_version,
        devices,
    }
}

fn decode(index: u32, raw: RawGpu) -> GpuDevice {
    let link = |l: Option<(u32, u32)>| l.map(|(g, w)| format!("gen{g} x{w}"));
    GpuDevice {
        index,
        name: raw.name,
        uuid: raw.uuid,
        memory_total_bytes: raw.memory_total,
        memory_free_bytes: raw.memory_free,
        compute_capability: raw.compute_capability.map(|(a, b)| format!("{a}.{b}")),
        bf16_native: raw.compute_capability.map(|(major, _)| major >= 8),
        temperature_c: raw.temperature_c,
        slowdown_temperature_c: raw.slowdown_temperature_c,
        power_draw_w: raw.power_usage_mw.map(|m| f64::from(m) / 1000.0),
        power_limit_w: raw.power_limit_mw.map(|m| f64::from(m) / 1000.0),
        graphics_clock_mhz: raw.clocks_mhz[0],
        sm_clock_mhz: raw.clocks_mhz[1],
        memory_clock_mhz: raw.clocks_mhz[2],
        max_sm_clock_mhz: raw.max_clocks_mhz[1],
        throttle_reasons: raw.throttle_reasons.map(throttle_reason_names),
        ecc_corrected: raw.ecc_volatile.map(|e| e.0),
        ecc_uncorrected: raw.ecc_volatile.map(|e| e.1),
        pcie_link: link(raw.pcie_current),
        pcie_link_max: link(raw.pcie_max),
    }
}

/// The real NVML, opened at run time.
pub struct RuntimeNvml {
    nvml: nvml_wrapper::Nvml,
}

impl std::fmt::Debug for RuntimeNvml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeNvml").finish_non_exhaustive()
    }
}

impl RuntimeNvml {
    /// Loads `libnvidia-ml` and initialises it. A missing library or driver is
    /// [`NvmlUnavailable::NoDriver`].
    pub fn open() -> Result<Self, NvmlUnavailable> {
        use nvml_wrapper::error::NvmlError as E;
        match nvml_wrapper::Nvml::init() {
            Ok(nvml) => Ok(Self { nvml }),
            Err(e @ (E::LibloadingError(_) | E::LibraryNotFound | E::DriverNotLoaded)) => Err(
                NvmlUnavailable::NoDriver(format!("no NVIDIA driver found ({e})")),
            ),
            Err(e) => Err(NvmlUnavailable::Failed(e.to_string())),
        }
    }
}

fn fail(e: nvml_wrapper::error::NvmlError) -> NvmlUnavailable {
    NvmlUnavailable::Failed(e.to_string())
}

impl NvmlSource for RuntimeNvml {
    fn driver_version(&self) -> Option<String> {
        self.nvml.sys_driver_version().ok()
    }

    fn cuda_driver_version(&self) -> Option<i32> {
        self.nvml.sys_cuda_driver_version().ok()
    }

    fn device_count(&self) -> Result<u32, NvmlUnavailable> {
        self.nvml.device_count().map_err(fail)
    }

    fn device(&self, index: u32) -> Result<RawGpu, NvmlUnavailable> {
        use nvml_wrapper::enum_wrappers::device::{
            Clock, EccCounter, MemoryError, TemperatureSensor, TemperatureThreshold,
        };
        let d = self.nvml.device_by_index(index).map_err(fail)?;
        let mem = d.memory_info().ok();
        let clocks = [Clock::Graphics, Clock::SM, Clock::Memory];
        let ecc = match (
            d.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile),
            d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
        ) {
            (Ok(c), Ok(u)) => Some((c, u)),
            _ => None,
        };
        let pair = |a: Result<u32, _>, b: Result<u32, _>| match (a, b) {
            (Ok(a), Ok(b)) => Some((a, b)),
            _ => None,
        };
        Ok(RawGpu {
            name: d.name().ok(),
            uuid: d.uuid().ok(),
            memory_total: mem.as_ref().map(|m| m.total),
            memory_free: mem.as_ref().map(|m| m.free),
            compute_capability: d.cuda_compute_capability().ok().map(|c| (c.major, c.minor)),
            temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
            slowdown_temperature_c: d.temperature_threshold(TemperatureThreshold::Slowdown).ok(),
            power_usage_mw: d.power_usage().ok(),
            power_limit_mw: d.enforced_power_limit().ok(),
            clocks_mhz: clocks.map(|c| d.clock_info(c).ok()),
            max_clocks_mhz: clocks.map(|c| d.max_clock_info(c).ok()),
            throttle_reasons: d.current_throttle_reasons().ok().map(|r| r.bits()),
            ecc_volatile: ecc,
            pcie_current: pair(d.current_pcie_link_gen(), d.current_pcie_link_width()),
            pcie_max: pair(d.max_pcie_link_gen(), d.max_pcie_link_width()),
        })
    }
}

/// Queries the real NVML (if any).
pub(crate) fn detect_runtime() -> GpuReport {
    match RuntimeNvml::open() {
        Ok(n) => report_from(Ok(&n)),
        Err(e) => report_from(Err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_names() {
        assert_eq!(throttle_reason_names(0), Vec::<String>::new());
        assert_eq!(
            throttle_reason_names(0x44),
            ["sw_power_cap", "hw_thermal_slowdown"]
        );
        assert_eq!(
            throttle_reason_names(0x1001),
            ["gpu_idle", "unknown_bits_0x1000"]
        );
    }

    #[test]
    fn cuda_versions() {
        assert_eq!(cuda_version_string(12040).as_deref(), Some("12.4"));
        assert_eq!(cuda_version_string(11080).as_deref(), Some("11.8"));
        assert_eq!(cuda_version_string(0), None);
    }

    #[test]
    fn no_driver_is_a_normal_answer() {
        let r = report_from(Err(NvmlUnavailable::NoDriver(
            "no NVIDIA driver found".into(),
        )));
        assert_eq!(
            r.status,
            GpuStatus::NoDriver("no NVIDIA driver found".into())
        );
        assert!(r.devices.is_empty());
    }
}
