//! The compute-precision selector (issue 8).
//!
//! Trainable parameters are always f32 master weights; what is chosen here is the dtype the
//! forward and backward passes compute in, and whether the loss is dynamically scaled:
//!
//! - an explicit `train.precision.compute` is taken as is (`f16` with loss scaling unless
//!   `loss_scale = "none"`);
//! - `auto` on a GPU: bf16 when it has native bf16 (compute capability 8.0 or newer), else f16
//!   with dynamic loss scaling;
//! - `auto` on a CPU: bf16 only when the CPU has native bf16 (AVX512-BF16, AMX-BF16, Arm BF16)
//!   **and** a measurement says bf16 matrix products are clearly faster than f32
//!   ([`BF16_MIN_SPEEDUP`]); otherwise f32.
//!
//! Why the CPU rule asks for a measurement: native bf16 instructions do not make candle's
//! CPU bf16 path fast. On the machine this was built on (Xeon with AVX512-BF16, 2 cores)
//! candle's bf16 GEMM ran at 78 GFLOP/s against 83 for f32, and a whole training step of a
//! 110M Llama was slower in bf16 than in f32 (the casts of weights and activations cost more
//! than the matmuls save; figures in `docs/memory.md`, "Precision"). Choosing bf16 because
//! the flag is there would make `auto` pick the slower path. bf16 still halves activation
//! memory, so it stays available explicitly.

use serde::{Deserialize, Serialize};

use crate::footprint::Precision;

/// `auto` picks bf16 on a CPU only when measured bf16 GEMM throughput is at least this many
/// times f32's (mixed precision adds casts the GEMM figure does not see).
pub const BF16_MIN_SPEEDUP: f64 = 1.25;

/// Where the step computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComputeDevice {
    /// The CPU.
    Cpu,
    /// A CUDA GPU; `bf16_native` from eg-hardware's GPU report (`None`: unknown).
    Gpu {
        /// Native bf16 (compute capability 8.0 or newer).
        bf16_native: Option<bool>,
    },
}

/// Measured matrix-product throughput by dtype (eg-hardware's capacity probe), GFLOP/s.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct GemmSpeeds {
    /// f32.
    pub f32: Option<f64>,
    /// bf16.
    pub bf16: Option<f64>,
    /// f16.
    pub f16: Option<f64>,
}

impl GemmSpeeds {
    /// The CPU figures of an eg-hardware capacity report.
    pub fn from_capacity(c: &eg_hardware::capacity::CapacityReport) -> GemmSpeeds {
        let get = |dt: &str| {
            c.gemm
                .iter()
                .find(|g| g.device == "cpu" && g.dtype == dt)
                .and_then(|g| g.gflops)
        };
        GemmSpeeds {
            f32: get("f32"),
            bf16: get("bf16"),
            f16: get("f16"),
        }
    }
}

/// What the selector knows about the machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrecisionFacts {
    /// Where the step runs.
    pub device: ComputeDevice,
    /// Canonical CPU feature names (eg-hardware's `CpuReport::features`).
    pub cpu_features: Vec<String>,
    /// Measured GEMM throughput, when probed.
    pub gemm: Option<GemmSpeeds>,
}

impl PrecisionFacts {
    /// A CPU run with these features and, optionally, measured GEMM speeds.
    pub fn cpu(cpu_features: &[String], gemm: Option<GemmSpeeds>) -> Self {
        PrecisionFacts {
            device: ComputeDevice::Cpu,
            cpu_features: cpu_features.to_vec(),
            gemm,
        }
    }

    /// Whether the CPU has native bf16 arithmetic.
    pub fn cpu_bf16(&self) -> bool {
        self.cpu_features
            .iter()
            .any(|f| matches!(f.as_str(), "avx512_bf16" | "amx_bf16" | "bf16"))
    }
}

/// The selector's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrecisionChoice {
    /// Compute precision.
    pub precision: Precision,
    /// Dynamic loss scaling on.
    pub loss_scaling: bool,
    /// Why, in one sentence (logged by `eg train`, printed by `eg plan`).
    pub reason: String,
}

/// Chooses the compute precision for `requested` (`train.precision.compute`) and
/// `loss_scale` (`train.precision.loss_scale`). See the module documentation for the rules.
pub fn select(
    requested: eg_config::wire::Precision,
    loss_scale: eg_config::wire::LossScale,
    facts: &PrecisionFacts,
) -> PrecisionChoice {
    use eg_config::wire::{LossScale, Precision as P};
    let scaled = loss_scale == LossScale::Dynamic;
    let choice = |precision, reason: String| PrecisionChoice {
        precision,
        loss_scaling: precision == Precision::F16 && scaled,
        reason,
    };
    match requested {
        P::F32 => choice(Precision::F32, "train.precision.compute = \"f32\"".into()),
        P::Bf16 => choice(Precision::Bf16, "train.precision.compute = \"bf16\"".into()),
        P::F16 => choice(Precision::F16, "train.precision.compute = \"f16\"".into()),
        _ => match facts.device {
            ComputeDevice::Gpu {
                bf16_native: Some(true),
            } => choice(Precision::Bf16, "auto: the GPU has native bf16".into()),
            ComputeDevice::Gpu { .. } => choice(
                Precision::F16,
                "auto: the GPU has no native bf16 (f16 with dynamic loss scaling)".into(),
            ),
            ComputeDevice::Cpu => cpu_auto(facts),
        },
    }
}

fn cpu_auto(facts: &PrecisionFacts) -> PrecisionChoice {
    let f32_choice = |reason: String| PrecisionChoice {
        precision: Precision::F32,
        loss_scaling: false,
        reason,
    };
    if !facts.cpu_bf16() {
        return f32_choice("auto: the CPU has no native bf16".into());
    }
    match facts.gemm.and_then(|g| g.f32.zip(g.bf16)) {
        Some((f, b)) if b >= BF16_MIN_SPEEDUP * f => PrecisionChoice {
            precision: Precision::Bf16,
            loss_scaling: false,
            reason: format!(
                "auto: the CPU has native bf16 and bf16 GEMM measured {b:.0} GFLOP/s vs {f:.0} for f32"
            ),
        },
        Some((f, b)) => f32_choice(format!(
            "auto: the CPU has native bf16 but bf16 GEMM measured {b:.0} GFLOP/s vs {f:.0} for f32 \
             (bf16 is chosen from {BF16_MIN_SPEEDUP}x); set compute = \"bf16\" to halve activation memory"
        )),
        None => f32_choice(
            "auto: the CPU has native bf16 but bf16 speed is not measured (`eg hw --probe`); \
             candle's CPU bf16 step was slower than f32 where measured"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eg_config::wire::{LossScale, Precision as P};

    fn bf16_cpu(gemm: Option<GemmSpeeds>) -> PrecisionFacts {
        PrecisionFacts::cpu(&["avx2".into(), "avx512_bf16".into()], gemm)
    }

    #[test]
    fn explicit_choices_are_kept() {
        let f = PrecisionFacts::cpu(&[], None);
        for (p, want) in [
            (P::F32, Precision::F32),
            (P::Bf16, Precision::Bf16),
            (P::F16, Precision::F16),
        ] {
            let c = select(p, LossScale::Dynamic, &f);
            assert_eq!(c.precision, want);
            assert_eq!(c.loss_scaling, want == Precision::F16);
        }
        assert!(!select(P::F16, LossScale::None, &f).loss_scaling);
    }

    #[test]
    fn auto_on_gpus_follows_native_bf16() {
        let gpu = |bf16_native| PrecisionFacts {
            device: ComputeDevice::Gpu { bf16_native },
            cpu_features: vec![],
            gemm: None,
        };
        let a = select(P::Auto, LossScale::Dynamic, &gpu(Some(true)));
        assert_eq!((a.precision, a.loss_scaling), (Precision::Bf16, false));
        for n in [Some(false), None] {
            let v = select(P::Auto, LossScale::Dynamic, &gpu(n));
            assert_eq!((v.precision, v.loss_scaling), (Precision::F16, true));
        }
    }

    #[test]
    fn auto_on_cpus_needs_native_bf16_and_a_measured_speedup() {
        let sel = |f: &PrecisionFacts| select(P::Auto, LossScale::Dynamic, f).precision;
        assert_eq!(
            sel(&PrecisionFacts::cpu(&["avx2".into()], None)),
            Precision::F32
        );
        // Flag present, nothing measured: f32.
        assert_eq!(sel(&bf16_cpu(None)), Precision::F32);
        // This machine's figures (docs/benchmarks.md): bf16 78 vs f32 83 GFLOP/s.
        let here = GemmSpeeds {
            f32: Some(83.0),
            bf16: Some(78.0),
            f16: Some(72.0),
        };
        let c = select(P::Auto, LossScale::Dynamic, &bf16_cpu(Some(here)));
        assert_eq!(c.precision, Precision::F32);
        assert!(c.reason.contains("78"), "{}", c.reason);
        // A CPU where bf16 GEMM is twice as fast (AMX): bf16.
        let amx = GemmSpeeds {
            f32: Some(100.0),
            bf16: Some(200.0),
            f16: None,
        };
        assert_eq!(sel(&bf16_cpu(Some(amx))), Precision::Bf16);
        // No native bf16: a fast measured figure does not matter.
        assert_eq!(
            sel(&PrecisionFacts::cpu(&["avx2".into()], Some(amx))),
            Precision::F32
        );
    }
}
