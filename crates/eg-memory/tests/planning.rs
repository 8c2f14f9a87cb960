//! Planning from a validated configuration and a hardware fixture.

use std::fs;
use std::path::Path;

use eg_config::wire::Toggle;
use eg_config::{Bytes, Sources};
use eg_hardware::{Detector, Root};
use eg_memory::{
    Adapters, BaseFormat, BlockProfile, Budget, Error, MemoryModel, ModelProfile, OffloadChoice,
    OffloadKind, Optimizer, PlanRequest, Precision, SpeedModel, Suggestion, plan,
};

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

/// A cgroup v2 container limited to `limit` bytes on a 16 GiB machine.
fn container(dir: &Path, limit: u64) -> eg_hardware::HardwareReport {
    write(dir, "proc/self/cgroup", "0::/job\n");
    write(
        dir,
        "proc/self/mountinfo",
        "1 0 0:1 / / rw - overlay overlay rw\n2 1 0:2 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
    );
    write(
        dir,
        "proc/meminfo",
        "MemTotal: 16777216 kB\nMemAvailable: 16000000 kB\n",
    );
    write(dir, "sys/fs/cgroup/cgroup.controllers", "memory\n");
    write(dir, "sys/fs/cgroup/job/memory.max", &format!("{limit}\n"));
    write(dir, "sys/fs/cgroup/job/memory.high", "max\n");
    write(dir, "sys/fs/cgroup/job/memory.current", "0\n");
    Detector::new(Root::new(dir)).detect()
}

/// About a 110M-parameter Llama-like profile (hidden 768, 12 blocks, vocab 32000).
fn profile_110m() -> ModelProfile {
    let h = 768u64;
    let i = 3072u64;
    let heads = 12u64;
    let per_block_params = 4 * h * h + 3 * h * i + 2 * h;
    let v = 32_000u64;
    ModelProfile {
        params: 12 * per_block_params + 2 * v * h + h,
        quantizable_params: 12 * (4 * h * h + 3 * h * i),
        largest_matrix_params: h * i,
        hidden_size: h,
        blocks: vec![
            BlockProfile {
                activation_elems_per_token: 3 * h + 3 * h + 2 * h + 2 * h + h + 4 * i + h + 4 * h,
                activation_elems_per_token_per_position: 2 * heads,
            };
            12
        ],
        head_activation_elems_per_token: h + h + v,
        vocab_size: v,
        lora_params_per_rank: 12 * 2 * (h + h),
        lora_activation_elems_per_token_per_rank: 12 * 2,
        forward_flops_per_token: 2 * (12 * (4 * h * h + 3 * h * i) + v * h),
        forward_flops_per_token_per_position: 12 * 4 * h,
        fused: None,
    }
}

#[test]
fn budget_follows_cgroup_fraction_limit_and_reserve() {
    let t = tempfile::tempdir().unwrap();
    let report = container(t.path(), 4 << 30);
    let cfg = Sources::new()
        .set("memory.budget_fraction=0.5")
        .set("memory.reserve=\"512MiB\"")
        .load()
        .unwrap();
    let b = Budget::from_config(&report, &cfg.memory).unwrap();
    assert_eq!(b.effective, Some(Bytes(4 << 30)));
    assert_eq!(b.usable, Bytes((2 << 30) - (512 << 20)));

    let capped = Sources::new()
        .set("memory.budget_fraction=0.5")
        .set("memory.limit=\"1GiB\"")
        .set("memory.reserve=\"256MiB\"")
        .load()
        .unwrap();
    let b = Budget::from_config(&report, &capped.memory).unwrap();
    assert_eq!(b.usable, Bytes((1 << 30) - (256 << 20)));
}

#[test]
fn plan_from_config_keeps_the_global_batch() {
    let t = tempfile::tempdir().unwrap();
    let report = container(t.path(), 8 << 30);
    let cfg = Sources::new()
        .set("data.seq_len=512")
        .set("train.batch.global_tokens=8192")
        .set("train.precision.compute=\"f32\"")
        .load()
        .unwrap();
    let req = PlanRequest::from_config(&cfg, profile_110m(), &[]);
    assert_eq!(req.precision, Precision::F32);
    assert_eq!(req.optimizer, Optimizer::AdamW);
    assert_eq!(req.global_sequences().unwrap(), 16);
    let budget = Budget::from_config(&report, &cfg.memory).unwrap();
    let p = plan(
        &req,
        &budget,
        &MemoryModel::default(),
        &SpeedModel::default(),
    )
    .unwrap();
    assert!(p.fitting().count() >= 1);
    for c in &p.candidates {
        assert_eq!(c.strategy.micro_batch * c.strategy.accumulation, 16);
    }
    assert!(p.chosen.fits);
    assert!(p.chosen.estimate.peak.0 as f64 <= budget.usable.0 as f64 * 0.9);
    // The fastest fitting candidate is the chosen one (headroom aside).
    let best = p.fitting().next().unwrap();
    assert!(best.relative_throughput >= p.chosen.relative_throughput);
}

#[test]
fn checkpointing_off_in_config_restricts_candidates() {
    let cfg = Sources::new()
        .set("memory.activation_checkpointing=\"off\"")
        .set("memory.limit=\"64GiB\"")
        .load()
        .unwrap();
    let req = PlanRequest::from_config(&cfg, profile_110m(), &[]);
    assert_eq!(req.checkpointing, Toggle::Off);
    let budget = Budget::new(None, 1.0, cfg.memory.limit, cfg.memory.reserve).unwrap();
    let p = plan(
        &req,
        &budget,
        &MemoryModel::default(),
        &SpeedModel::default(),
    )
    .unwrap();
    assert!(p.candidates.iter().all(|c| !c.strategy.checkpointing));
}

#[test]
fn lora_and_qlora_config_shrink_the_prediction() {
    let full = Sources::new()
        .set("train.precision.compute=\"bf16\"")
        .load()
        .unwrap();
    let lora = Sources::new()
        .set("train.precision.compute=\"bf16\"")
        .set("model.lora.rank=16")
        .load()
        .unwrap();
    let qlora = Sources::new()
        .set("train.precision.compute=\"bf16\"")
        .set("model.lora.rank=16")
        .set("model.quantization=\"nf4\"")
        .load()
        .unwrap();
    let reqs: Vec<PlanRequest> = [&full, &lora, &qlora]
        .iter()
        .map(|c| PlanRequest::from_config(c, profile_110m(), &[]))
        .collect();
    assert_eq!(
        reqs[1].adapters,
        Adapters::Lora {
            rank: 16,
            base: BaseFormat::Full
        }
    );
    assert_eq!(
        reqs[2].adapters,
        Adapters::Lora {
            rank: 16,
            base: BaseFormat::Nf4 { double_quant: true }
        }
    );
    let budget = Budget::new(None, 1.0, Some(Bytes(64 << 30)), Bytes(0)).unwrap();
    let peaks: Vec<u64> = reqs
        .iter()
        .map(|r| {
            plan(r, &budget, &MemoryModel::default(), &SpeedModel::default())
                .unwrap()
                .candidates
                .iter()
                .map(|c| c.estimate.peak.0)
                .min()
                .unwrap()
        })
        .collect();
    assert!(peaks[0] > peaks[1] && peaks[1] > peaks[2], "{peaks:?}");
}

/// Issue #8: when nothing fits, the error says by how much and what would help.
#[test]
fn issue8_does_not_fit_names_the_shortfall_and_the_remedies() {
    let t = tempfile::tempdir().unwrap();
    let report = container(t.path(), 5 << 28); // 1.25 GiB
    let cfg = Sources::new()
        .set("data.seq_len=512")
        .set("train.batch.global_tokens=8192")
        .set("train.precision.compute=\"f32\"")
        .set("memory.activation_checkpointing=\"off\"")
        .set("memory.reserve=\"128MiB\"")
        .load()
        .unwrap();
    let mut req = PlanRequest::from_config(&cfg, profile_110m(), &[]);
    req.offload = OffloadChoice::None;
    let budget = Budget::from_config(&report, &cfg.memory).unwrap();
    let err = plan(
        &req,
        &budget,
        &MemoryModel::default(),
        &SpeedModel::default(),
    )
    .unwrap_err();
    let text = err.to_string();
    let Error::DoesNotFit {
        needed,
        budget: b,
        short,
        suggestions,
        ..
    } = err
    else {
        panic!("{text}");
    };
    assert_eq!(b, budget.usable);
    assert_eq!(short.0, needed.0 - b.0);
    assert!(text.contains("short by"), "{text}");
    assert!(text.contains("would help"), "{text}");
    assert!(
        suggestions
            .iter()
            .any(|s| matches!(s, Suggestion::Qlora { .. })),
        "{suggestions:?}"
    );
    for s in &suggestions {
        match s {
            Suggestion::MoreMemory { by } => assert_eq!(*by, short),
            Suggestion::Checkpointing { peak }
            | Suggestion::Offload { peak }
            | Suggestion::Lora { peak, .. }
            | Suggestion::Qlora { peak, .. }
            | Suggestion::ShorterSequences { peak, .. } => assert!(*peak <= b),
            _ => {}
        }
    }
}

#[test]
fn disk_offload_from_config_is_forced() {
    let t = tempfile::tempdir().unwrap();
    let cfg = Sources::new()
        .set("memory.offload=\"disk\"")
        .set(format!("memory.offload_dir=\"{}\"", t.path().display()))
        .set("memory.limit=\"64GiB\"")
        .load()
        .unwrap();
    let req = PlanRequest::from_config(&cfg, profile_110m(), &[]);
    assert_eq!(req.offload, OffloadChoice::Disk);
    let budget = Budget::new(None, 1.0, cfg.memory.limit, cfg.memory.reserve).unwrap();
    let p = plan(
        &req,
        &budget,
        &MemoryModel::default(),
        &SpeedModel::default(),
    )
    .unwrap();
    assert!(
        p.candidates
            .iter()
            .all(|c| c.strategy.offload == OffloadKind::Disk)
    );
}

#[test]
fn plan_serializes() {
    let budget = Budget::new(None, 1.0, Some(Bytes(64 << 30)), Bytes(0)).unwrap();
    let cfg = Sources::new().load().unwrap();
    let req = PlanRequest::from_config(&cfg, profile_110m(), &[]);
    let p = plan(
        &req,
        &budget,
        &MemoryModel::default(),
        &SpeedModel::default(),
    )
    .unwrap();
    let json = serde_json::to_string(&p).unwrap();
    let back: eg_memory::Plan = serde_json::from_str(&json).unwrap();
    assert_eq!(back, p);
}

#[test]
fn speed_model_uses_measured_gemm_and_disk_bandwidth() {
    let t = tempfile::tempdir().unwrap();
    let mut report = container(t.path(), 8 << 30);
    assert!(SpeedModel::from_report(&report).assumed());
    report.capacity = Some(eg_hardware::capacity::CapacityReport {
        fingerprint: "test".into(),
        measured_at_unix: 0,
        threads: 2,
        gemm: ["f32", "bf16"]
            .iter()
            .zip([80.0, 120.0])
            .map(|(d, g)| eg_hardware::capacity::GemmFigure {
                device: "cpu".into(),
                dtype: d.to_string(),
                n: 512,
                iterations: 1,
                seconds: 1.0,
                gflops: Some(g),
                note: None,
            })
            .collect(),
        memory_bandwidth_gb_s: None,
        from_cache: false,
    });
    report.storage.push(eg_hardware::storage::StorageReport {
        path: "/nvme".into(),
        mount_point: None,
        filesystem: None,
        device: None,
        disk: None,
        model: None,
        kind: eg_hardware::storage::StorageKind::Nvme,
        total_bytes: None,
        free_bytes: None,
        bandwidth: Some(eg_hardware::storage::Bandwidth {
            bytes: 1 << 28,
            write_mb_s: 1500.0,
            read_mb_s: 2500.0,
            direct_io: true,
            read_may_be_cached: false,
        }),
    });
    let s = SpeedModel::from_report(&report);
    assert_eq!(s.gflops, Some(120.0));
    assert_eq!(s.disk_read_mb_s, Some(2500.0));
    assert_eq!(s.disk_write_mb_s, Some(1500.0));
    assert!(!s.assumed());
}
