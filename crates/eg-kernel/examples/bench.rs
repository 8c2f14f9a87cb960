//! Step time of the guarded trainer against bare loops, and the stall of a background
//! checkpoint. Run in release: `cargo run --release -p eg-kernel --example bench`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer as _;
use eg_data::{InMemoryDataset, Loader, LoaderOptions, Placement};
use eg_kernel::{
    CheckpointOptions, Optimizer, OptimizerKind, Schedule, TrainModel, Trainer, TrainerOptions,
};
use eg_model::{Llama, LlamaConfig};

const ROWS: usize = 8;
const SEQ: usize = 128;
const STEPS: u64 = 8;

fn cfg() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 256,
        intermediate_size: 688,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: Some(4),
        vocab_size: 2048,
        max_position_embeddings: SEQ,
        ..LlamaConfig::tiny_for_tests()
    }
}

fn data() -> Arc<InMemoryDataset> {
    let docs = (0..4000u32).map(|i| {
        (0..(50 + i % 200))
            .map(|j| (i.wrapping_mul(2_654_435_761) ^ j.wrapping_mul(40_503)) % 2000 + 1)
            .collect::<Vec<u32>>()
    });
    Arc::new(InMemoryDataset::from_docs(docs))
}

fn loader() -> Loader {
    let o = LoaderOptions {
        seq_len: SEQ,
        rows_per_step: ROWS,
        eos_id: Some(0),
        seed: 1,
        ..LoaderOptions::default()
    };
    Loader::new(data(), o, Placement::SINGLE).unwrap()
}

fn kind() -> OptimizerKind {
    OptimizerKind::AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
    }
}

fn model() -> Llama {
    Llama::init(&cfg(), 1, DType::F32, &Device::Cpu).unwrap()
}

fn loss_of(m: &Llama, b: &eg_data::Batch) -> Tensor {
    let ids = Tensor::from_slice(&b.input_ids, (b.rows, b.seq_len), &Device::Cpu).unwrap();
    let logits = m.forward(&ids).unwrap();
    eg_model::ops::cross_entropy(&logits, &eg_kernel::batch_targets(b)).unwrap()
}

/// forward, backward, candle_nn::AdamW.
fn bare_candle() -> f64 {
    let m = model();
    let mut l = loader();
    let mut opt = candle_nn::AdamW::new(
        m.params().vars(),
        candle_nn::ParamsAdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
        },
    )
    .unwrap();
    let b = l.next_batch().unwrap().unwrap();
    let g = loss_of(&m, &b).backward().unwrap();
    opt.step(&g).unwrap();
    let t = Instant::now();
    for _ in 0..STEPS {
        let b = l.next_batch().unwrap().unwrap();
        let g = loss_of(&m, &b).backward().unwrap();
        opt.step(&g).unwrap();
    }
    t.elapsed().as_secs_f64() / STEPS as f64
}

/// forward, backward, this crate's in-place AdamW: no guards, no accumulation.
fn bare_inplace() -> f64 {
    let m = model();
    let mut l = loader();
    let named = m.named_params();
    let shapes: Vec<_> = named
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    let vars: Vec<_> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = Optimizer::new(kind(), 0.01, &shapes).unwrap();
    let mut step = |l: &mut Loader| {
        let b = l.next_batch().unwrap().unwrap();
        let g = loss_of(&m, &b).backward().unwrap();
        let grads: Vec<Vec<f32>> = vars
            .iter()
            .map(|v| {
                g.get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        opt.step(&vars, &grads, 1e-3, 1.0).unwrap();
    };
    step(&mut l);
    let t = Instant::now();
    for _ in 0..STEPS {
        step(&mut l);
    }
    t.elapsed().as_secs_f64() / STEPS as f64
}

fn trainer_opts(steps: u64) -> TrainerOptions {
    TrainerOptions {
        max_steps: steps,
        micro_batch_rows: ROWS,
        schedule: Schedule::constant(1e-3),
        clip_norm: Some(1.0),
        coverage_check: true,
        nan_skip_limit: 3,
        spike: Some((50, 6.0)),
        snapshot_every: 0,
        ..TrainerOptions::default()
    }
}

/// The guarded trainer (coverage, sanitizer, clipping, spike detection), one warm-up step
/// not counted.
fn guarded() -> f64 {
    struct Times(Arc<std::sync::Mutex<Vec<f64>>>);
    impl eg_kernel::Callback for Times {
        fn on_step_end(&mut self, m: &eg_kernel::StepMetrics) {
            self.0.lock().unwrap().push(m.step_secs);
        }
    }
    let m = model();
    let shapes: Vec<_> = m
        .named_params()
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    let opt = Optimizer::new(kind(), 0.01, &shapes).unwrap();
    let mut t = Trainer::new(m, opt, loader(), trainer_opts(1 + STEPS)).unwrap();
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    t.add_callback(Box::new(Times(times.clone())));
    let start = Instant::now();
    t.fit().unwrap();
    let total = start.elapsed().as_secs_f64();
    let first = times.lock().unwrap().first().copied().unwrap_or(0.0);
    (total - first) / STEPS as f64
}

/// Background checkpoint: how long the loop is blocked vs how long the write takes.
fn checkpoint_stall() -> (f64, f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let shapes: Vec<_> = m
        .named_params()
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    let opt = Optimizer::new(kind(), 0.01, &shapes).unwrap();
    let mut o = trainer_opts(1);
    o.checkpoints = Some(CheckpointOptions {
        dir: dir.path().join("ck"),
        every: 1000,
        keep_last: 100,
        keep_best: 0,
        background: true,
    });
    let mut t = Trainer::new(m, opt, loader(), o).unwrap();
    t.fit().unwrap(); // writes the step-1 checkpoint at the end
    let t0 = Instant::now();
    let d = t.save_checkpoint(None).unwrap().unwrap();
    let stall = t0.elapsed().as_secs_f64();
    // Synchronous write of the same data for the save duration.
    let data = eg_kernel::checkpoint::load(&d);
    let data = match data {
        Ok(d) => d,
        Err(_) => {
            std::thread::sleep(std::time::Duration::from_secs(2));
            eg_kernel::checkpoint::load(&d).unwrap()
        }
    };
    let t1 = Instant::now();
    let out = eg_kernel::checkpoint::save(&dir.path().join("sync"), &data).unwrap();
    let save = t1.elapsed().as_secs_f64();
    let bytes: u64 = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    (stall, save, bytes)
}

/// CPU seconds (user + system) of this process so far, from `/proc/self/stat` (Linux).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // fields 14 and 15 of the stat line (utime, stime) are at 11 and 12 after the name
    (tick(11) + tick(12)) / 100.0
}

/// (wall s/step, CPU s/step) of a variant; the CPU figure includes the warm-up step.
fn timed(f: fn() -> f64) -> (f64, f64) {
    let c0 = cpu_secs();
    let wall = f();
    (wall, (cpu_secs() - c0) / (STEPS + 1) as f64)
}

fn disk_bandwidth(bytes: usize) -> f64 {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bw");
    let buf = vec![7u8; bytes];
    let t = Instant::now();
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(&buf).unwrap();
    f.sync_all().unwrap();
    bytes as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let n = model().params().num_elements();
    println!(
        "model: {:.2}M parameters, batch {ROWS}x{SEQ}, {} threads, {STEPS} timed steps per run",
        n as f64 / 1e6,
        eg_kernel::compute_threads()
    );
    let rounds = 3;
    let mut sums = [(0.0, 0.0); 3];
    for round in 0..rounds {
        let r = [timed(bare_candle), timed(bare_inplace), timed(guarded)];
        println!(
            "round {round}: wall s/step (CPU s/step): bare candle_nn::AdamW {:.3} ({:.3}) | bare in-place AdamW {:.3} ({:.3}) | guarded Trainer {:.3} ({:.3})",
            r[0].0, r[0].1, r[1].0, r[1].1, r[2].0, r[2].1
        );
        for (s, x) in sums.iter_mut().zip(r) {
            s.0 += x.0 / rounds as f64;
            s.1 += x.1 / rounds as f64;
        }
    }
    println!(
        "mean: guarded Trainer vs bare in-place loop: wall {:+.1}%, CPU {:+.1}%; bare candle_nn::AdamW loop vs bare in-place: wall {:+.1}%",
        100.0 * (sums[2].0 / sums[1].0 - 1.0),
        100.0 * (sums[2].1 / sums[1].1 - 1.0),
        100.0 * (sums[0].0 / sums[1].0 - 1.0),
    );
    let (stall, save, bytes) = checkpoint_stall();
    let bw = disk_bandwidth(bytes as usize);
    println!(
        "checkpoint: {:.1} MB; background stall {:.1} ms = {:.1}% of a synchronous save of {:.1} ms; save {:.0} MB/s vs disk {:.0} MB/s ({:.0}%)",
        bytes as f64 / 1e6,
        stall * 1e3,
        100.0 * stall / save,
        save * 1e3,
        bytes as f64 / save / 1e6,
        bw / 1e6,
        100.0 * (bytes as f64 / save) / bw
    );
}
