//! Optimizer state offloaded to memory-mapped files (eg-memory's `DiskStore`): bitwise the
//! same updates as in RAM, checkpoints and exact resume, files removed and recreated, typed
//! errors naming the offload path.

use candle_core::{Device, Tensor, Var};
use eg_data::{Loader, Placement};
use eg_kernel::optim::store_for;
use eg_kernel::{
    DiskStore, DiskStoreOptions, Optimizer, OptimizerKind, RamStore, StateLocation, StateStore,
    TrainModel, Trainer,
};

use super::common::*;

const KINDS: [OptimizerKind; 3] = [
    OptimizerKind::AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
    },
    OptimizerKind::Sgd { momentum: 0.9 },
    OptimizerKind::Lion {
        beta1: 0.9,
        beta2: 0.99,
    },
];

/// Small chunks and window so one tensor spans several units and the prefetch wraps.
fn small_disk(dir: &std::path::Path) -> Box<dyn StateStore> {
    let opts = DiskStoreOptions {
        chunk_elems: 1024,
        window: 12 << 10,
        ..DiskStoreOptions::default()
    };
    Box::new(DiskStore::create(dir, opts).unwrap())
}

fn shapes_and_vars(seed: u32) -> (Vec<(String, Vec<usize>)>, Vec<Var>) {
    let shapes = vec![
        ("embed.weight".to_string(), vec![50, 101]), // 5050: 5 chunks, the last partial
        ("norm.weight".to_string(), vec![101]),
        ("proj.weight".to_string(), vec![3, 7]),
        ("proj.bias".to_string(), vec![7]),
    ];
    let vars = shapes
        .iter()
        .enumerate()
        .map(|(i, (_, s))| {
            let n: usize = s.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|k| {
                    ((k as u32)
                        .wrapping_mul(2654435761)
                        .wrapping_add(seed + i as u32)
                        % 1000) as f32
                        / 1000.0
                        - 0.5
                })
                .collect();
            Var::from_tensor(&Tensor::from_slice(&v, s.as_slice(), &Device::Cpu).unwrap()).unwrap()
        })
        .collect();
    (shapes, vars)
}

fn grads(vars: &[Var], step: u32) -> Vec<Vec<f32>> {
    vars.iter()
        .enumerate()
        .map(|(i, v)| {
            (0..v.elem_count())
                .map(|k| {
                    (((k as u32 + 31 * i as u32) * 7919 + step * 104729) % 2001) as f32 / 1000.0
                        - 1.0
                })
                .collect()
        })
        .collect()
}

fn bits(vars: &[Var]) -> Vec<Vec<u32>> {
    vars.iter()
        .map(|v| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f32::to_bits)
                .collect()
        })
        .collect()
}

#[test]
fn disk_store_updates_are_bitwise_equal_to_ram() {
    for kind in KINDS {
        let dir = tempfile::tempdir().unwrap();
        let (shapes, ram_vars) = shapes_and_vars(1);
        let (_, disk_vars) = shapes_and_vars(1);
        let mut ram = Optimizer::new(kind, 0.05, &shapes).unwrap();
        let mut disk = Optimizer::with_store(kind, 0.05, &shapes, small_disk(dir.path())).unwrap();
        assert!(matches!(disk.state_location(), StateLocation::Disk(_)));
        for step in 0..5 {
            let g = grads(&ram_vars, step);
            let scale = if step == 2 { 0.37 } else { 1.0 };
            ram.step(&ram_vars, &g, 1e-2, scale).unwrap();
            disk.step(&disk_vars, &g, 1e-2, scale).unwrap();
            assert_eq!(bits(&ram_vars), bits(&disk_vars), "{kind:?} step {step}");
        }
        let a = ram.export_state().unwrap();
        let b = disk.export_state().unwrap();
        assert_eq!(a, b, "{kind:?}");
    }
}

#[test]
fn moving_state_ram_to_disk_between_steps_changes_nothing() {
    for kind in KINDS {
        let dir = tempfile::tempdir().unwrap();
        let (shapes, a_vars) = shapes_and_vars(2);
        let (_, b_vars) = shapes_and_vars(2);
        let mut a = Optimizer::new(kind, 0.01, &shapes).unwrap();
        let mut b = Optimizer::new(kind, 0.01, &shapes).unwrap();
        for step in 0..4 {
            if step == 2 {
                b.set_store(small_disk(dir.path())).unwrap();
                assert!(matches!(b.state_location(), StateLocation::Disk(_)));
            }
            if step == 3 {
                // and back: the disk store is dropped and removes its files
                b.set_store(Box::new(RamStore::new())).unwrap();
                assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
            }
            let g = grads(&a_vars, step);
            a.step(&a_vars, &g, 3e-3, 1.0).unwrap();
            b.step(&b_vars, &g, 3e-3, 1.0).unwrap();
        }
        assert_eq!(bits(&a_vars), bits(&b_vars), "{kind:?}");
    }
}

#[test]
fn snapshot_in_the_store_rolls_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let kind = KINDS[0];
    let (shapes, vars) = shapes_and_vars(3);
    let mut o = Optimizer::with_store(kind, 0.01, &shapes, small_disk(dir.path())).unwrap();
    o.step(&vars, &grads(&vars, 0), 1e-2, 1.0).unwrap();
    let snap = o.snapshot().unwrap();
    assert!(matches!(
        snap,
        eg_kernel::OptimizerSnapshot::InStore { t: 1 }
    ));
    let before = o.export_state().unwrap();
    o.step(&vars, &grads(&vars, 1), 1e-2, 1.0).unwrap();
    assert_ne!(o.export_state().unwrap(), before);
    o.restore(&snap).unwrap();
    assert_eq!(o.export_state().unwrap(), before);
    assert_eq!(o.steps(), 1);
}

fn disk_trainer<M: TrainModel>(
    m: M,
    offload: &std::path::Path,
    o: eg_kernel::TrainerOptions,
) -> Trainer<M> {
    let opt = Optimizer::with_store(adamw(), 0.01, &shapes(&m), small_disk(offload)).unwrap();
    let loader = Loader::new(dataset(0), loader_opts(4), Placement::SINGLE).unwrap();
    Trainer::new(m, opt, loader, o).unwrap()
}

#[test]
fn training_with_disk_offload_checkpoints_and_resumes_bitwise() {
    const N: u64 = 8;
    let ram_dir = tempfile::tempdir().unwrap();
    let opts = |d: &std::path::Path| {
        let mut o = with_checkpoints(options(N, 2), d, 3);
        o.spike = Some((6, 6.0));
        o
    };
    // Uninterrupted, state in RAM.
    let opt = Optimizer::new(adamw(), 0.01, &shapes(&model())).unwrap();
    let loader = Loader::new(dataset(0), loader_opts(4), Placement::SINGLE).unwrap();
    let mut t = Trainer::new(model(), opt, loader, opts(ram_dir.path())).unwrap();
    t.fit().unwrap();
    let want_w = weights(t.model());
    let want_l = logged_losses(ram_dir.path());

    // Disk offload, stopped after a checkpoint (step 6) and resumed by a "new process";
    // its checkpoints split the streamed optimizer state over three writer threads.
    let run = tempfile::tempdir().unwrap();
    let off = tempfile::tempdir().unwrap();
    let sharded = |d: &std::path::Path| {
        let mut o = opts(d);
        if let Some(c) = o.checkpoints.as_mut() {
            c.write = eg_kernel::checkpoint::SaveOptions {
                direct_io: true,
                writers: 3,
                min_shard_bytes: 0,
            };
        }
        o
    };
    let mut o = sharded(run.path());
    o.max_steps = 6;
    let mut a = disk_trainer(model(), off.path(), o);
    let files = std::fs::read_dir(off.path()).unwrap().count();
    assert_eq!(files, 1, "one state directory while training");
    a.fit().unwrap();
    drop(a);
    assert_eq!(
        std::fs::read_dir(off.path()).unwrap().count(),
        0,
        "offload files removed with the store"
    );
    let shards = std::fs::read_dir(run.path().join("checkpoints/step-00000006"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("optimizer-"))
        .count();
    assert!(shards > 1, "{shards} optimizer shards");
    let mut b = disk_trainer(model(), off.path(), sharded(run.path()));
    assert_eq!(b.resume().unwrap(), Some(6));
    b.fit().unwrap();
    assert_eq!(logged_losses(run.path()), want_l);
    assert!(weights(b.model()) == want_w, "weights differ after resume");

    // The checkpoint format is the same: a RAM trainer resumes from a disk-offload run.
    let mut c = Trainer::new(
        model(),
        Optimizer::new(adamw(), 0.01, &shapes(&model())).unwrap(),
        Loader::new(dataset(0), loader_opts(4), Placement::SINGLE).unwrap(),
        opts(run.path()),
    )
    .unwrap();
    assert_eq!(c.resume().unwrap(), Some(N));
}

struct StopAt(u64, std::sync::Arc<std::sync::atomic::AtomicBool>);

impl eg_kernel::Callback for StopAt {
    fn on_step_end(&mut self, m: &eg_kernel::StepMetrics) {
        if m.step == self.0 {
            self.1.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

#[test]
fn trainer_switches_to_disk_between_steps_bitwise() {
    const N: u64 = 5;
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let off = tempfile::tempdir().unwrap();
    let mk = |d: &std::path::Path| {
        let mut o = options(N, 2);
        o.run_dir = Some(d.to_path_buf());
        let opt = Optimizer::new(adamw(), 0.01, &shapes(&model())).unwrap();
        let loader = Loader::new(dataset(0), loader_opts(4), Placement::SINGLE).unwrap();
        Trainer::new(model(), opt, loader, o).unwrap()
    };
    let mut a = mk(a_dir.path());
    a.fit().unwrap();
    let mut b = mk(b_dir.path());
    let flag = b.stop_flag();
    b.add_callback(Box::new(StopAt(2, flag.clone())));
    assert!(b.fit().unwrap().stopped);
    // What the memory controller does under pressure: state RAM -> disk between steps.
    b.set_optimizer_store(small_disk(off.path())).unwrap();
    assert!(matches!(
        b.optimizer().unwrap().state_location(),
        StateLocation::Disk(_)
    ));
    flag.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(b.fit().unwrap().steps, N);
    assert_eq!(logged_losses(a_dir.path()), logged_losses(b_dir.path()));
    assert!(weights(a.model()) == weights(b.model()));
}

#[test]
fn offload_errors_are_typed_and_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let bad = file.join("offload");
    let e = store_for(&eg_config::Offload::Disk(bad.clone())).unwrap_err();
    assert!(
        matches!(
            e,
            eg_kernel::Error::Memory(eg_memory::Error::Offload { .. })
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("plain-file"), "{e}");

    let opts = DiskStoreOptions {
        keep_free: u64::MAX / 4,
        ..DiskStoreOptions::default()
    };
    let store = Box::new(DiskStore::create(dir.path(), opts).unwrap());
    let e = Optimizer::with_store(adamw(), 0.0, &shapes(&model()), store).unwrap_err();
    assert!(
        matches!(
            e,
            eg_kernel::Error::Memory(eg_memory::Error::OffloadNoSpace { .. })
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("p00000.bin"), "{e}");

    let e = store_for(&eg_config::Offload::Ram).unwrap_err();
    assert!(
        matches!(
            e,
            eg_kernel::Error::Memory(eg_memory::Error::FeatureDisabled {
                feature: "cuda",
                ..
            })
        ),
        "{e:?}"
    );
}
