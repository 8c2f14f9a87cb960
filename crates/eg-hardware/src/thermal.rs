//! Thermal sensors (hwmon, thermal zones) and the power source (AC, battery, governor).

use serde::{Deserialize, Serialize};

use crate::root::{self, Missing, Notes, Root};

/// One temperature sensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sensor {
    /// `hwmon`, `thermal_zone` or `nvml` (GPU core; `max_c` is its slowdown threshold).
    pub source: String,
    /// Chip or zone name (`coretemp`, `k10temp`, `nvme`, `x86_pkg_temp`, `acpitz`...).
    pub chip: String,
    /// Label (`Package id 0`, `Core 1`, `temp1`...).
    pub label: String,
    /// Temperature in °C.
    pub temperature_c: Option<f64>,
    /// High threshold in °C.
    pub max_c: Option<f64>,
    /// Critical threshold in °C.
    pub critical_c: Option<f64>,
}

/// The thermal part of the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThermalReport {
    /// All sensors found; empty on machines that expose none (most VMs and many servers).
    pub sensors: Vec<Sensor>,
}

impl ThermalReport {
    /// The hottest reading, if any sensor has one.
    pub fn hottest_c(&self) -> Option<f64> {
        self.sensors
            .iter()
            .filter_map(|s| s.temperature_c)
            .fold(None, |m, t| Some(m.map_or(t, |m: f64| m.max(t))))
    }
}

/// Where power comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerSource {
    /// Mains power.
    Ac,
    /// Running on battery.
    Battery,
    /// No power-supply information is exposed (typical of servers and VMs).
    Unknown,
}

/// One battery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatteryInfo {
    /// Name (`BAT0`).
    pub name: String,
    /// Charge in percent.
    pub capacity_percent: Option<u8>,
    /// `Charging`, `Discharging`, `Full`, `Not charging`...
    pub status: Option<String>,
}

/// The power part of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerReport {
    /// AC, battery or unknown.
    pub source: PowerSource,
    /// Batteries found.
    pub batteries: Vec<BatteryInfo>,
    /// CPU frequency governor of CPU 0 (`performance`, `powersave`, `schedutil`...).
    pub cpu_governor: Option<String>,
}

fn milli_c(root: &Root, path: &str, notes: &mut Notes) -> Option<f64> {
    let text = root::read(root, path, Missing::Quiet, notes)?;
    match text.trim().parse::<i64>() {
        Ok(v) => Some(v as f64 / 1000.0),
        Err(_) => {
            notes.warn(format!(
                "{path}: expected millidegrees, found {:?}: unknown",
                root::shorten(text.trim())
            ));
            None
        }
    }
}

/// Reads the thermal sensors.
pub(crate) fn detect_thermal(root: &Root, notes: &mut Notes) -> ThermalReport {
    let mut sensors = Vec::new();
    let hw = "/sys/class/hwmon";
    for dev in root::list_dir(root, hw, notes) {
        let dir = format!("{hw}/{dev}");
        let chip = root::read_line(root, &format!("{dir}/name"), Missing::Quiet, notes)
            .unwrap_or_else(|| dev.clone());
        let mut inputs: Vec<String> = root::list_dir(root, &dir, notes)
            .into_iter()
            .filter(|f| f.starts_with("temp") && f.ends_with("_input"))
            .collect();
        inputs.sort_by_key(|f| {
            let n: String = f["temp".len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            (n.parse::<u32>().unwrap_or(u32::MAX), f.clone())
        });
        for input in inputs {
            let stem = input.trim_end_matches("_input");
            let label =
                root::read_line(root, &format!("{dir}/{stem}_label"), Missing::Quiet, notes)
                    .unwrap_or_else(|| stem.to_owned());
            sensors.push(Sensor {
                source: "hwmon".to_owned(),
                chip: chip.clone(),
                label,
                temperature_c: milli_c(root, &format!("{dir}/{input}"), notes),
                max_c: milli_c(root, &format!("{dir}/{stem}_max"), notes),
                critical_c: milli_c(root, &format!("{dir}/{stem}_crit"), notes),
            });
        }
    }
    let tz = "/sys/class/thermal";
    for zone in root::list_dir(root, tz, notes) {
        if !zone.starts_with("thermal_zone") {
            continue;
        }
        let dir = format!("{tz}/{zone}");
        let chip = root::read_line(root, &format!("{dir}/type"), Missing::Quiet, notes)
            .unwrap_or_else(|| zone.clone());
        let mut critical_c = None;
        let mut max_c = None;
        for f in root::list_dir(root, &dir, notes) {
            let Some(n) = f
                .strip_prefix("trip_point_")
                .and_then(|r| r.strip_suffix("_type"))
            else {
                continue;
            };
            let kind = root::read_line(root, &format!("{dir}/{f}"), Missing::Quiet, notes);
            let temp = milli_c(root, &format!("{dir}/trip_point_{n}_temp"), notes);
            match kind.as_deref() {
                Some("critical") => critical_c = temp,
                Some("hot") => max_c = temp,
                _ => {}
            }
        }
        sensors.push(Sensor {
            source: "thermal_zone".to_owned(),
            chip,
            label: zone.clone(),
            temperature_c: milli_c(root, &format!("{dir}/temp"), notes),
            max_c,
            critical_c,
        });
    }
    ThermalReport { sensors }
}

/// Reads the power source.
pub(crate) fn detect_power(root: &Root, notes: &mut Notes) -> PowerReport {
    let ps = "/sys/class/power_supply";
    let mut ac_online: Option<bool> = None;
    let mut batteries = Vec::new();
    for sup in root::list_dir(root, ps, notes) {
        let dir = format!("{ps}/{sup}");
        let kind = root::read_line(root, &format!("{dir}/type"), Missing::Quiet, notes);
        match kind.as_deref() {
            Some("Mains") | Some("USB") => {
                if let Some(o) =
                    root::read_u64(root, &format!("{dir}/online"), Missing::Quiet, notes)
                {
                    ac_online = Some(ac_online.unwrap_or(false) || o == 1);
                }
            }
            Some("Battery") => {
                // Peripheral batteries (mice) report scope=Device; skip them.
                let scope = root::read_line(root, &format!("{dir}/scope"), Missing::Quiet, notes);
                if scope.as_deref() == Some("Device") {
                    continue;
                }
                let capacity_percent =
                    root::read_u64(root, &format!("{dir}/capacity"), Missing::Quiet, notes)
                        .and_then(|c| u8::try_from(c.min(100)).ok());
                let status = root::read_line(root, &format!("{dir}/status"), Missing::Quiet, notes);
                batteries.push(BatteryInfo {
                    name: sup.clone(),
                    capacity_percent,
                    status,
                });
            }
            _ => {}
        }
    }
    let discharging = batteries
        .iter()
        .any(|b| b.status.as_deref() == Some("Discharging"));
    let charging = batteries
        .iter()
        .any(|b| b.status.as_deref() == Some("Charging"));
    let source = match (ac_online, batteries.is_empty()) {
        (Some(true), _) => PowerSource::Ac,
        (Some(false), false) => PowerSource::Battery,
        (None, false) if discharging => PowerSource::Battery,
        (None, false) if charging => PowerSource::Ac,
        // No mains entry and no battery telling us which way current flows.
        _ => PowerSource::Unknown,
    };
    let cpu_governor = root::read_line(
        root,
        "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor",
        Missing::Quiet,
        notes,
    );
    PowerReport {
        source,
        batteries,
        cpu_governor,
    }
}
