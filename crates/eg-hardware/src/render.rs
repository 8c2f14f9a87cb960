//! The human-readable rendering of a [`HardwareReport`] (`eg hw`).

use std::fmt::{self, Display, Formatter};

use crate::HardwareReport;
use crate::gpu::GpuStatus;
use crate::memory::{CgroupVersion, Limit};
use crate::thermal::PowerSource;

const UNKNOWN: &str = "unknown";

/// `12.3 GiB`, or `unknown`.
pub(crate) fn bytes(b: Option<u64>) -> String {
    match b {
        None => UNKNOWN.to_owned(),
        Some(b) => {
            const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
            let mut v = b as f64;
            let mut i = 0;
            while v >= 1024.0 && i + 1 < UNITS.len() {
                v /= 1024.0;
                i += 1;
            }
            if i == 0 {
                format!("{b} B")
            } else {
                format!("{v:.1} {}", UNITS[i])
            }
        }
    }
}

fn opt<T: Display>(v: Option<T>) -> String {
    v.map_or_else(|| UNKNOWN.to_owned(), |v| v.to_string())
}

fn limit(l: Limit) -> String {
    match l {
        Limit::Bytes(b) => bytes(Some(b)),
        Limit::Unlimited => "none".to_owned(),
        Limit::Unknown => UNKNOWN.to_owned(),
    }
}

fn params(p: Option<u64>) -> String {
    match p {
        None => UNKNOWN.to_owned(),
        Some(p) if p >= 1_000_000_000 => format!("~{:.1} B params", p as f64 / 1e9),
        Some(p) => format!("~{:.0} M params", p as f64 / 1e6),
    }
}

impl Display for HardwareReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let c = &self.cpu;
        writeln!(
            f,
            "Host      {} (kernel {})",
            opt(self.hostname.as_deref()),
            opt(self.kernel.as_deref())
        )?;
        writeln!(
            f,
            "CPU       {} ({})",
            opt(c.model.as_deref()),
            opt(c.vendor.as_deref())
        )?;
        writeln!(
            f,
            "          {} logical / {} physical cores, {} usable by this process, {} socket(s), {} NUMA node(s)",
            opt(c.logical_cores),
            opt(c.physical_cores),
            opt(c.usable_cores),
            opt(c.sockets),
            opt(c.numa_nodes)
        )?;
        match c.cgroup_quota {
            crate::cpu::CpuQuota::Cores(q) => {
                writeln!(f, "          cgroup CPU quota: {q:.2} CPUs")?
            }
            crate::cpu::CpuQuota::Unknown => writeln!(f, "          cgroup CPU quota: unknown")?,
            crate::cpu::CpuQuota::Unlimited => {}
        }
        if !c.caches.is_empty() {
            let caches: Vec<String> = c
                .caches
                .iter()
                .map(|k| {
                    format!(
                        "L{} {} {}",
                        k.level,
                        k.kind.to_lowercase(),
                        bytes(k.size_bytes)
                    )
                })
                .collect();
            writeln!(f, "          caches: {}", caches.join(", "))?;
        }
        writeln!(
            f,
            "          features: {}",
            c.features
                .as_ref()
                .map_or_else(|| UNKNOWN.to_owned(), |v| v.join(" "))
        )?;
        let mhz = |v: Option<f64>| v.map_or(UNKNOWN.to_owned(), |m| format!("{m:.0} MHz"));
        writeln!(
            f,
            "          frequency: {} now, max {}",
            mhz(c.current_mhz),
            mhz(c.max_mhz)
        )?;

        let m = &self.memory;
        writeln!(
            f,
            "Memory    {} total, {} available, swap {} ({} free)",
            bytes(m.total_bytes),
            bytes(m.available_bytes),
            bytes(m.swap_total_bytes),
            bytes(m.swap_free_bytes)
        )?;
        let cg = &m.cgroup;
        match cg.version {
            CgroupVersion::None => writeln!(f, "          cgroup: no memory controller")?,
            v => writeln!(
                f,
                "          cgroup {}: limit {}, high {}, usage {} ({})",
                if v == CgroupVersion::V1 { "v1" } else { "v2" },
                limit(cg.limit),
                limit(cg.high),
                bytes(cg.usage_bytes),
                opt(cg.dir.as_deref())
            )?,
        }
        writeln!(
            f,
            "          effective budget: {} (available now {})",
            bytes(m.effective_limit_bytes),
            bytes(m.effective_available_bytes)
        )?;
        if let Some(s) = &m.shm {
            writeln!(
                f,
                "          /dev/shm: {} ({} free)",
                bytes(s.total_bytes),
                bytes(s.available_bytes)
            )?;
        }

        let g = &self.gpu;
        match &g.status {
            GpuStatus::NoDriver(r) => writeln!(f, "GPU       none: {r}")?,
            GpuStatus::Failed(r) => writeln!(f, "GPU       NVML failed: {r}")?,
            GpuStatus::NotQueried => writeln!(f, "GPU       not queried")?,
            GpuStatus::Available => {
                writeln!(
                    f,
                    "GPU       {} device(s), driver {}, CUDA {}",
                    g.devices.len(),
                    opt(g.driver_version.as_deref()),
                    opt(g.cuda_version.as_deref())
                )?;
                for d in &g.devices {
                    writeln!(
                        f,
                        "  [{}] {}: {} ({} free), cc {}, {} °C, {} / {} W, throttle: {}",
                        d.index,
                        opt(d.name.as_deref()),
                        bytes(d.memory_total_bytes),
                        bytes(d.memory_free_bytes),
                        opt(d.compute_capability.as_deref()),
                        opt(d.temperature_c),
                        d.power_draw_w
                            .map_or(UNKNOWN.to_owned(), |w| format!("{w:.0}")),
                        d.power_limit_w
                            .map_or(UNKNOWN.to_owned(), |w| format!("{w:.0}")),
                        d.throttle_reasons.as_ref().map_or(UNKNOWN.to_owned(), |t| {
                            if t.is_empty() {
                                "none".to_owned()
                            } else {
                                t.join(",")
                            }
                        })
                    )?;
                }
            }
        }

        for s in &self.storage {
            let on = match (
                s.disk.as_deref().or(s.device.as_deref()),
                s.model.as_deref(),
            ) {
                (Some(d), Some(m)) => format!(" on {d} ({m})"),
                (Some(d), None) => format!(" on {d}"),
                _ => String::new(),
            };
            writeln!(
                f,
                "Storage   {}: {}{on}, {} at {}, {} free of {}",
                s.path,
                s.kind,
                opt(s.filesystem.as_deref()),
                opt(s.mount_point.as_deref()),
                bytes(s.free_bytes),
                bytes(s.total_bytes)
            )?;
            if let Some(b) = &s.bandwidth {
                writeln!(
                    f,
                    "          measured: write {:.0} MB/s, read {:.0} MB/s ({} MiB, {}{})",
                    b.write_mb_s,
                    b.read_mb_s,
                    b.bytes >> 20,
                    if b.direct_io {
                        "direct I/O"
                    } else {
                        "buffered + fsync"
                    },
                    if b.read_may_be_cached {
                        ", read may be cached"
                    } else {
                        ""
                    }
                )?;
            }
        }

        if self.thermal.sensors.is_empty() {
            writeln!(f, "Thermal   no sensors exposed")?;
        } else {
            writeln!(
                f,
                "Thermal   {} sensor(s), hottest {} °C",
                self.thermal.sensors.len(),
                self.thermal
                    .hottest_c()
                    .map_or(UNKNOWN.to_owned(), |t| format!("{t:.1}"))
            )?;
            for s in &self.thermal.sensors {
                writeln!(
                    f,
                    "          {} {}: {} °C (max {}, crit {})",
                    s.chip,
                    s.label,
                    s.temperature_c
                        .map_or(UNKNOWN.to_owned(), |t| format!("{t:.1}")),
                    s.max_c.map_or(UNKNOWN.to_owned(), |t| format!("{t:.0}")),
                    s.critical_c
                        .map_or(UNKNOWN.to_owned(), |t| format!("{t:.0}"))
                )?;
            }
        }
        let p = &self.power;
        let source = match p.source {
            PowerSource::Ac => "AC",
            PowerSource::Battery => "battery",
            PowerSource::Unknown => "unknown (no power supply information exposed)",
        };
        write!(f, "Power     {source}")?;
        for b in &p.batteries {
            write!(
                f,
                "; {} {}% {}",
                b.name,
                opt(b.capacity_percent),
                opt(b.status.as_deref())
            )?;
        }
        writeln!(f, "; governor {}", opt(p.cpu_governor.as_deref()))?;

        if let Some(cap) = &self.capacity {
            writeln!(
                f,
                "Capacity  {} threads{}",
                cap.threads,
                if cap.from_cache { " (cached)" } else { "" }
            )?;
            for g in &cap.gemm {
                match g.gflops {
                    Some(v) => writeln!(
                        f,
                        "          GEMM {} {}: {v:.1} GFLOP/s (n={})",
                        g.device, g.dtype, g.n
                    )?,
                    None => writeln!(
                        f,
                        "          GEMM {} {}: {}",
                        g.device,
                        g.dtype,
                        opt(g.note.as_deref())
                    )?,
                }
            }
            writeln!(
                f,
                "          memory copy bandwidth: {} GB/s (read + write)",
                cap.memory_bandwidth_gb_s
                    .map_or(UNKNOWN.to_owned(), |v| format!("{v:.1}"))
            )?;
        }

        if !self.fits.is_empty() {
            writeln!(
                f,
                "Fits      largest model per strategy. {}",
                crate::capacity::FIT_NOTE
            )?;
            for e in &self.fits {
                writeln!(
                    f,
                    "          {:<7} {:<22} {} with {}",
                    e.device,
                    e.strategy.to_string(),
                    params(e.max_params),
                    bytes(e.budget_bytes)
                )?;
            }
        }
        if !self.warnings.is_empty() {
            writeln!(f, "Warnings")?;
            for w in &self.warnings {
                writeln!(f, "          {w}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_units() {
        assert_eq!(bytes(None), "unknown");
        assert_eq!(bytes(Some(512)), "512 B");
        assert_eq!(bytes(Some(4 << 30)), "4.0 GiB");
    }
}
