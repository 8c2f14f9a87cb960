//! GPU decisions with a fake NVML.

use eg_hardware::gpu::{GpuStatus, NvmlSource, NvmlUnavailable, RawGpu};
use eg_hardware::{Detector, GpuQuery};

use crate::scenarios::fixture;

struct FakeNvml {
    devices: Vec<Result<RawGpu, NvmlUnavailable>>,
}

impl NvmlSource for FakeNvml {
    fn driver_version(&self) -> Option<String> {
        Some("550.54.15".into())
    }
    fn cuda_driver_version(&self) -> Option<i32> {
        Some(12040)
    }
    fn device_count(&self) -> Result<u32, NvmlUnavailable> {
        Ok(self.devices.len() as u32)
    }
    fn device(&self, index: u32) -> Result<RawGpu, NvmlUnavailable> {
        self.devices[index as usize].clone()
    }
}

fn a100() -> RawGpu {
    RawGpu {
        name: Some("NVIDIA A100-SXM4-80GB".into()),
        uuid: Some("GPU-1234".into()),
        memory_total: Some(80 << 30),
        memory_free: Some(79 << 30),
        compute_capability: Some((8, 0)),
        temperature_c: Some(41),
        slowdown_temperature_c: Some(88),
        power_usage_mw: Some(61_500),
        power_limit_mw: Some(400_000),
        clocks_mhz: [Some(1410), Some(1410), Some(1593)],
        max_clocks_mhz: [Some(1410), Some(1410), Some(1593)],
        throttle_reasons: Some(0x1 | 0x40),
        ecc_volatile: Some((3, 0)),
        pcie_current: Some((4, 16)),
        pcie_max: Some((4, 16)),
    }
}

#[test]
fn decoded_devices() {
    let fake = FakeNvml {
        devices: vec![
            Ok(a100()),
            Ok(RawGpu {
                name: Some("Tesla T4".into()),
                compute_capability: Some((7, 5)),
                ..RawGpu::default()
            }),
            Err(NvmlUnavailable::Failed("GPU is lost".into())),
        ],
    };
    let r = Detector::new(fixture("server-no-sensors"))
        .gpu(GpuQuery::Source(Box::new(fake)))
        .detect();
    let g = &r.gpu;
    assert_eq!(g.status, GpuStatus::Available);
    assert_eq!(g.driver_version.as_deref(), Some("550.54.15"));
    assert_eq!(g.cuda_version.as_deref(), Some("12.4"));
    assert_eq!(g.devices.len(), 3);
    let a = &g.devices[0];
    assert_eq!(a.compute_capability.as_deref(), Some("8.0"));
    assert_eq!(a.bf16_native, Some(true));
    assert_eq!(a.power_draw_w, Some(61.5));
    assert_eq!(a.power_limit_w, Some(400.0));
    assert_eq!(
        a.throttle_reasons.as_deref(),
        Some(&["gpu_idle".to_owned(), "hw_thermal_slowdown".to_owned()][..])
    );
    assert_eq!(a.ecc_corrected, Some(3));
    assert_eq!(a.pcie_link.as_deref(), Some("gen4 x16"));
    let t4 = &g.devices[1];
    assert_eq!(t4.bf16_native, Some(false));
    // Unsupported queries are unknown, not zero.
    assert_eq!(t4.memory_total_bytes, None);
    assert_eq!(t4.throttle_reasons, None);
    assert_eq!(t4.power_draw_w, None);
    // A failing device is listed, all unknown.
    assert_eq!(g.devices[2].name, None);
    // Fits per GPU from its memory; unknown memory gives unknown fits.
    let a_fits: Vec<_> = r.fits.iter().filter(|f| f.device == "cuda:0").collect();
    assert_eq!(a_fits.len(), 4);
    assert!(a_fits.iter().all(|f| f.budget_bytes == Some(80 << 30)));
    assert!(
        r.fits
            .iter()
            .filter(|f| f.device == "cuda:1")
            .all(|f| f.max_params.is_none())
    );
    let text = r.to_string();
    assert!(text.contains("NVIDIA A100-SXM4-80GB"), "{text}");
    // GPU temperatures join the thermal sensors.
    let gpu_sensor = r
        .thermal
        .sensors
        .iter()
        .find(|s| s.source == "nvml")
        .unwrap();
    assert_eq!(gpu_sensor.temperature_c, Some(41.0));
    assert_eq!(gpu_sensor.max_c, Some(88.0));
    assert_eq!(
        r.thermal
            .sensors
            .iter()
            .filter(|s| s.source == "nvml")
            .count(),
        3
    );
}

#[test]
fn no_driver_is_reported_not_raised() {
    let r = Detector::new(fixture("laptop-battery"))
        .gpu(GpuQuery::Unavailable(NvmlUnavailable::NoDriver(
            "no NVIDIA driver found".into(),
        )))
        .detect();
    assert_eq!(
        r.gpu.status,
        GpuStatus::NoDriver("no NVIDIA driver found".into())
    );
    assert!(r.gpu.devices.is_empty());
    assert!(
        r.to_string()
            .contains("GPU       none: no NVIDIA driver found")
    );
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["gpu"]["status"]["state"], "no_driver");
}

#[test]
fn count_failure_is_failed_status() {
    struct Broken;
    impl NvmlSource for Broken {
        fn driver_version(&self) -> Option<String> {
            None
        }
        fn cuda_driver_version(&self) -> Option<i32> {
            None
        }
        fn device_count(&self) -> Result<u32, NvmlUnavailable> {
            Err(NvmlUnavailable::Failed("Unknown Error".into()))
        }
        fn device(&self, _: u32) -> Result<RawGpu, NvmlUnavailable> {
            unreachable!()
        }
    }
    let r = Detector::new(fixture("laptop-battery"))
        .gpu(GpuQuery::Source(Box::new(Broken)))
        .detect();
    assert_eq!(r.gpu.status, GpuStatus::Failed("Unknown Error".into()));
}
