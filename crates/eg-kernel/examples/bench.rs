//! Step time of the guarded trainer against bare loops, and the stall of a background
//! checkpoint. Run in release: `cargo run --release -p eg-kernel --example bench [MODE]`.
//!
//! Modes: none (wall and CPU time of the three loops, 3 rounds, then the checkpoint);
//! `cpu [ROUNDS]` (CPU time of bare vs guarded on one compute thread, load-independent);
//! `checkpoint [ROUNDS]` (stall, save time of four writer settings, throughput vs the
//! disk's buffered and `O_DIRECT` sequential write bandwidth; 5 rounds, medians);
//! `save [MB] [ROUNDS]` (the same saves of a synthetic AdamW checkpoint of MB megabytes,
//! default 1000, 5 rounds);
//! `run VARIANT STEPS` (one loop,
//! for profilers; VARIANT is candle, bare or guarded).
//!
//! Applies `eg_kernel::tune_process` at start, as `eg train` does.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/mod.rs"]
mod common;
use common::cpu_secs;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer as _;
use eg_data::Loader;
use eg_hardware::storage::AlignedBuf;
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

fn loader() -> Loader {
    common::synthetic_docs_loader(SEQ, ROWS, 4000, 200, 2000)
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
fn bare_candle(steps: u64) -> (f64, f64) {
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
    let (t, c) = (Instant::now(), cpu_secs());
    for _ in 0..steps {
        let b = l.next_batch().unwrap().unwrap();
        let g = loss_of(&m, &b).backward().unwrap();
        opt.step(&g).unwrap();
    }
    per_step(t, c, steps)
}

/// The model's fused step (forward, loss, hand-written backward: what the trainer runs for
/// this model), this crate's in-place AdamW reading the gradients where they lie: no guards,
/// no accumulation, no copy.
fn bare_inplace(steps: u64) -> (f64, f64) {
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
        let ids = Tensor::from_slice(&b.input_ids, (b.rows, b.seq_len), &Device::Cpu).unwrap();
        let g = m
            .fused_step(&ids, &eg_kernel::batch_targets(&b), 1.0)
            .unwrap()
            .grads;
        // The update reads the gradient storage directly: no copy.
        let ts: Vec<Tensor> = vars
            .iter()
            .map(|v| g.get(v.as_tensor()).unwrap().contiguous().unwrap())
            .collect();
        let locked: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
        let grads: Vec<&[f32]> = locked
            .iter()
            .map(|(s, l)| match &**s {
                candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
                    let (a, b) = l.contiguous_offsets().unwrap();
                    &v[a..b]
                }
                _ => panic!("not f32 on the CPU"),
            })
            .collect();
        opt.step(&vars, &grads, 1e-3, 1.0).unwrap();
    };
    step(&mut l);
    let (t, c) = (Instant::now(), cpu_secs());
    for _ in 0..steps {
        step(&mut l);
    }
    per_step(t, c, steps)
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
fn guarded(steps: u64) -> (f64, f64) {
    /// The clock and CPU time when the warm-up step ended.
    struct Times(Arc<std::sync::Mutex<Option<(Instant, f64)>>>);
    impl eg_kernel::Callback for Times {
        fn on_step_end(&mut self, m: &eg_kernel::StepMetrics) {
            if m.step == 1 {
                *self.0.lock().unwrap() = Some((Instant::now(), cpu_secs()));
            }
        }
    }
    let m = model();
    let shapes: Vec<_> = m
        .named_params()
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    let opt = Optimizer::new(kind(), 0.01, &shapes).unwrap();
    let mut t = Trainer::new(m, opt, loader(), trainer_opts(1 + steps)).unwrap();
    let times = Arc::new(std::sync::Mutex::new(None));
    t.add_callback(Box::new(Times(times.clone())));
    t.fit().unwrap();
    let (t0, c0) = times.lock().unwrap().unwrap();
    per_step(t0, c0, steps)
}

/// (wall, CPU) seconds per step since `t0` / `c0`.
fn per_step(t0: Instant, c0: f64, steps: u64) -> (f64, f64) {
    (
        t0.elapsed().as_secs_f64() / steps as f64,
        (cpu_secs() - c0) / steps as f64,
    )
}

/// What the loop blocks for at one background checkpoint, and the data it wrote.
struct Stall {
    /// Seconds in `save_checkpoint` (JSON files, handing over, starting the thread).
    start: f64,
    /// Seconds the next update waited for the overlapped copy.
    wait: f64,
    /// Seconds the copy took on its thread (overlapped with the next step).
    copy: f64,
    /// The checkpoint written, for the synchronous save of the same data.
    dir: std::path::PathBuf,
    _tmp: tempfile::TempDir,
}

/// Background checkpoint inside the loop: a checkpoint at update 2 whose copy overlaps
/// update 3's forward and backward; the stall is the time in `save_checkpoint` plus the
/// wait for the copy before update 3's optimizer step (as the trainer records it).
fn checkpoint_stall() -> Stall {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let shapes: Vec<_> = m
        .named_params()
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    let opt = Optimizer::new(kind(), 0.01, &shapes).unwrap();
    let mut o = trainer_opts(3);
    o.checkpoints = Some(CheckpointOptions {
        dir: dir.path().join("ck"),
        every: 2,
        keep_last: 100,
        keep_best: 0,
        background: true,
        write: Default::default(),
    });
    let mut t = Trainer::new(m, opt, loader(), o).unwrap();
    t.fit().unwrap(); // checkpoints at 2 (overlapped with update 3) and 3 (at exit)
    let s = *t
        .checkpoint_stalls()
        .find(|s| s.step == 2 && s.checkpoint)
        .unwrap();
    Stall {
        start: s.start_secs,
        wait: s.wait_secs,
        copy: s.copy_secs,
        dir: dir.path().join("ck").join("step-00000002"),
        _tmp: dir,
    }
}

/// Seconds of a synchronous `checkpoint::save` of the checkpoint in `dir`, and its bytes.
fn synchronous_save(
    dir: &std::path::Path,
    options: &eg_kernel::checkpoint::SaveOptions,
) -> (f64, u64) {
    let data = eg_kernel::checkpoint::load(dir).unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let t1 = Instant::now();
    let out =
        eg_kernel::checkpoint::save_with(&out_dir.path().join("sync"), &data, options).unwrap();
    let save = t1.elapsed().as_secs_f64();
    (save, checkpoint_bytes(&out))
}

/// (wall s/step, CPU s/step) of a variant over `STEPS` steps after a warm-up step, run in a
/// fresh process so no variant inherits another's heap.
fn timed(v: &str) -> (f64, f64) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["run", v, &STEPS.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "bench run {v} failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<f64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (f[0], f[1])
}

fn variant(name: &str) -> fn(u64) -> (f64, f64) {
    match name {
        "candle" => bare_candle,
        "bare" => bare_inplace,
        "guarded" => guarded,
        _ => panic!("unknown variant {name}: candle, bare or guarded"),
    }
}

/// CPU time per step of the bare and the guarded loop on one compute thread, alternated
/// in fresh processes: with one thread no worker spins while waiting, so CPU time counts
/// the work only and hardly depends on the machine's load. (callgrind instruction counts
/// were tried: about 1.3M basic blocks per second here, hours for one step of this model.)
fn cpu_one_thread(rounds: usize) {
    let mut sums = [0.0f64; 2];
    for round in 0..rounds {
        let mut r = [0.0f64; 2];
        for k in 0..2 {
            let i = (k + round) % 2;
            let v = ["bare", "guarded"][i];
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["run", v, &STEPS.to_string()])
                .env("RAYON_NUM_THREADS", "1")
                .env("CANDLE_NUM_THREADS", "1")
                .output()
                .unwrap();
            assert!(out.status.success(), "bench run {v} failed");
            let text = String::from_utf8_lossy(&out.stdout);
            r[i] = text
                .split_whitespace()
                .filter_map(|w| w.parse::<f64>().ok())
                .nth(1)
                .unwrap();
        }
        println!(
            "round {round}: CPU s/step on 1 thread: bare in-place {:.4} | guarded {:.4} ({:+.1}%)",
            r[0],
            r[1],
            100.0 * (r[1] / r[0] - 1.0)
        );
        for (s, x) in sums.iter_mut().zip(r) {
            *s += x;
        }
    }
    println!(
        "mean over {rounds} rounds: guarded Trainer vs bare in-place loop, CPU on 1 thread: {:+.2}%",
        100.0 * (sums[1] / sums[0] - 1.0)
    );
    // The guards' own work per step, timed alone: the one pass over the gradients (global
    // norm and finiteness) and the spike detector's robust z-score over its window.
    let n = model().params().num_elements();
    let g: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 1e-3 - 0.05).collect();
    let reps = 50;
    let c0 = cpu_secs();
    let mut acc = 0.0;
    for _ in 0..reps {
        acc += eg_kernel::guards::sum_squares(std::hint::black_box(&g));
    }
    let norm = (cpu_secs() - c0) / reps as f64;
    let mut d = eg_kernel::guards::SpikeDetector::new(50, 6.0);
    for i in 0..50 {
        d.push(3.0 + (i % 7) as f64 * 0.01);
    }
    let c0 = cpu_secs();
    for _ in 0..10_000 {
        acc += d.zscore(std::hint::black_box(3.1)).unwrap_or(0.0);
    }
    let z = (cpu_secs() - c0) / 10_000.0;
    let step = sums[0] / rounds as f64;
    println!(
        "guards alone: norm+finiteness pass over {n} gradients {:.2} ms ({:.2}% of a bare step), spike z-score {:.1} us (checksum {acc:.3})",
        norm * 1e3,
        100.0 * norm / step,
        z * 1e6
    );
}

/// Bytes per second of writing `bytes` to a new file sequentially and syncing it:
/// one buffered `write` of them all (`block` 0), or `O_DIRECT` writes of `block`-byte aligned
/// blocks as `dd oflag=direct bs=… conv=fsync` does. The bytes are pseudo-random, as fio's
/// are: this virtual disk writes constant data (dd's `/dev/zero`) about 1.4× faster than
/// incompressible data, which a checkpoint's floats are.
fn disk_bandwidth(bytes: usize, block: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let raw = random_bytes(bytes);
    let t = Instant::now();
    write_synced(&dir.path().join("bw"), raw.as_slice(), bytes, block);
    bytes as f64 / t.elapsed().as_secs_f64()
}

/// `bytes` pseudo-random bytes, rounded up to 4 KiB, in an aligned buffer.
fn random_bytes(bytes: usize) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(bytes.div_ceil(4096) * 4096);
    b.fill_pseudo_random(0x9E37_79B9_7F4A_7C15 ^ bytes as u64);
    b
}

/// Writes `bytes` of `data` (aligned) to a new file `p` and syncs it: one buffered `write`
/// (`block` 0) or `O_DIRECT` writes of `block` bytes.
fn write_synced(p: &std::path::Path, data: &[u8], bytes: usize, block: usize) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if block == 0 {
        let mut f = std::fs::File::create(p).unwrap();
        f.write_all(&data[..bytes]).unwrap();
        f.sync_all().unwrap();
        return;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(p)
        .unwrap();
    for c in data[..bytes.div_ceil(4096) * 4096].chunks(block) {
        f.write_all(c).unwrap();
    }
    f.set_len(bytes as u64).unwrap();
    f.sync_all().unwrap();
}

fn main() {
    // What `eg train` does at start (allocator, thread-pool spinning), so that the loops are
    // measured as `eg` runs them; child processes do the same.
    // SAFETY: no other thread exists yet and no tensor operation has run.
    let tuning = unsafe { eg_kernel::tune_process(&eg_kernel::ProcessDefaults::default()) };
    eprintln!("process: {tuning}");
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        // One variant, for profilers: `bench run guarded 3`.
        Some("run") => {
            let steps = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(STEPS);
            let v = args.get(1).map(String::as_str).unwrap_or("guarded");
            let (wall, cpu) = variant(v)(steps);
            println!("{wall:.6} {cpu:.6} (wall and CPU s/step of {v})");
            return;
        }
        Some("cpu") => {
            return cpu_one_thread(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(6));
        }
        Some("checkpoint") => {
            return checkpoint_report(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5));
        }
        Some("disk") => {
            // O_DIRECT bandwidth by block size (and buffered), alternated, medians.
            let mb: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(48);
            let blocks = [0usize, 256 << 10, 1 << 20, 2 << 20, 4 << 20, 8 << 20];
            let mut r = vec![vec![]; blocks.len()];
            for _ in 0..9 {
                for (i, &b) in blocks.iter().enumerate() {
                    r[i].push(disk_bandwidth(mb << 20, b));
                }
            }
            for (b, v) in blocks.iter().zip(r) {
                println!("block {} KiB: median {:.0} MB/s", b >> 10, median(v) / 1e6);
            }
            // The same bytes as two files written at once (two threads, 1 MiB O_DIRECT blocks,
            // started together), alternated with one file.
            let (mut one, mut two) = (vec![], vec![]);
            let dir = tempfile::tempdir().unwrap();
            let half = mb << 19;
            let (raw_a, raw_b) = (random_bytes(half), random_bytes(half));
            for round in 0..9 {
                one.push(disk_bandwidth(mb << 20, 1 << 20));
                let go = std::sync::Barrier::new(2);
                let t = std::thread::scope(|s| {
                    let h = s.spawn(|| {
                        go.wait();
                        let p = dir.path().join(format!("b{round}"));
                        write_synced(&p, raw_b.as_slice(), half, 1 << 20);
                    });
                    go.wait();
                    let t = Instant::now();
                    let p = dir.path().join(format!("a{round}"));
                    write_synced(&p, raw_a.as_slice(), half, 1 << 20);
                    h.join().unwrap();
                    t.elapsed().as_secs_f64()
                });
                two.push((mb << 20) as f64 / t);
            }
            println!(
                "1 MiB blocks: one file {:.0} MB/s, two files of half the size at once {:.0} MB/s (medians)",
                median(one) / 1e6,
                median(two) / 1e6
            );
            return;
        }
        Some("save") => {
            let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
            return save_report(arg(1, 1000), arg(2, 5));
        }
        _ => {}
    }
    let n = model().params().num_elements();
    println!(
        "model: {:.2}M parameters, batch {ROWS}x{SEQ}, {} threads, {STEPS} timed steps per run",
        n as f64 / 1e6,
        eg_kernel::compute_threads()
    );
    let rounds = 3;
    let mut sums = [(0.0, 0.0); 3];
    let names = ["candle", "bare", "guarded"];
    for round in 0..rounds {
        // Each variant in its own process, the order rotated every round.
        let mut r = [(0.0, 0.0); 3];
        for k in 0..3 {
            let i = (k + round) % 3;
            r[i] = timed(names[i]);
        }
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
    checkpoint_report(5);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The save variants and disk measurements `checkpoint_report` times each round.
const SAVES: [(&str, bool, usize); 4] = [
    ("save (default: O_DIRECT, writers per core)", true, 0),
    ("save O_DIRECT, 1 writer", true, 1),
    ("save O_DIRECT, 4 writers", true, 4),
    ("save buffered, 1 writer", false, 1),
];

/// One round of synchronous saves of the checkpoint in `dir` (`SAVES`) and of the disk's
/// sequential write bandwidth for as many bytes (buffered, and `O_DIRECT` in 1 MiB and in
/// 4 MiB blocks; the largest of the three medians counts), in an order rotated by `round`.
struct SaveRound {
    /// Seconds of each of `SAVES`.
    secs: Vec<f64>,
    /// Bytes per second of a buffered write + fsync.
    disk: f64,
    /// Bytes per second of `O_DIRECT` writes of 1 MiB blocks + fsync.
    direct: f64,
    /// The same with 4 MiB blocks.
    direct4: f64,
    /// Bytes of the checkpoint.
    bytes: u64,
}

impl SaveRound {
    fn run(round: usize, dir: &std::path::Path) -> Self {
        let mut r = SaveRound {
            secs: vec![0.0; SAVES.len()],
            disk: 0.0,
            direct: 0.0,
            direct4: 0.0,
            bytes: 0,
        };
        let jobs = SAVES.len() + 3;
        for k in 0..jobs {
            let j = (k + round) % jobs;
            if let Some(&(_, direct_io, writers)) = SAVES.get(j) {
                let mut o = eg_kernel::checkpoint::SaveOptions {
                    direct_io,
                    ..Default::default()
                };
                if writers > 0 {
                    o.writers = writers;
                }
                let (s, b) = synchronous_save(dir, &o);
                r.bytes = b;
                r.secs[j] = s;
            } else {
                let bytes = checkpoint_bytes(dir) as usize;
                match j - SAVES.len() {
                    0 => r.disk = disk_bandwidth(bytes, 0),
                    1 => r.direct = disk_bandwidth(bytes, 1 << 20),
                    _ => r.direct4 = disk_bandwidth(bytes, 4 << 20),
                }
            }
        }
        r
    }

    /// The disk's sequential write bandwidth this round: the larger figure.
    fn top(&self) -> f64 {
        self.disk.max(self.direct).max(self.direct4)
    }

    /// One line: the saves and the disk.
    fn line(&self) -> String {
        format!(
            "saves {} ms; save {:.0} MB/s vs disk buffered {:.0} / O_DIRECT 1 MiB {:.0} / 4 MiB {:.0} MB/s ({:.0}% of the largest), load {}",
            self.secs
                .iter()
                .map(|s| format!("{:.1}", s * 1e3))
                .collect::<Vec<_>>()
                .join(" / "),
            self.bytes as f64 / self.secs[0] / 1e6,
            self.disk / 1e6,
            self.direct / 1e6,
            self.direct4 / 1e6,
            100.0 * self.bytes as f64 / self.secs[0] / self.top(),
            common::load1()
        )
    }
}

/// Bytes of the files of checkpoint directory `dir`.
fn checkpoint_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// Medians of the saves and the disk over `rounds`, and save/disk.
fn report_saves(rounds: &[SaveRound], load_before: String) {
    let bytes = rounds[0].bytes as f64;
    let save = median(rounds.iter().map(|r| r.secs[0]).collect());
    for (i, (name, _, _)) in SAVES.iter().enumerate() {
        let s = median(rounds.iter().map(|r| r.secs[i]).collect());
        println!("  {name}: {:.1} ms = {:.0} MB/s", s * 1e3, bytes / s / 1e6);
    }
    let (disk, direct, direct4) = (
        median(rounds.iter().map(|r| r.disk).collect()),
        median(rounds.iter().map(|r| r.direct).collect()),
        median(rounds.iter().map(|r| r.direct4).collect()),
    );
    let top = disk.max(direct).max(direct4);
    println!(
        "  disk: buffered write + fsync {:.0} MB/s, O_DIRECT 1 MiB / 4 MiB writes + fsync {:.0} / {:.0} MB/s (medians; the largest counts)",
        disk / 1e6,
        direct / 1e6,
        direct4 / 1e6,
    );
    let ratios: Vec<f64> = rounds
        .iter()
        .map(|r| r.bytes as f64 / r.secs[0] / r.top())
        .collect();
    println!(
        "  save/disk: {:.0}% of the medians; per round, against that round's largest disk figure: median {:.0}%, min {:.0}%, {} of {} rounds >= 70%; 1-minute load {} before, {} after",
        100.0 * (bytes / save) / top,
        100.0 * median(ratios.clone()),
        100.0 * ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratios.iter().filter(|&&x| x >= 0.7).count(),
        ratios.len(),
        load_before,
        common::load1()
    );
}

/// `rounds` rounds, each: a training run with one overlapped checkpoint (the stall), then a
/// [`SaveRound`] of the same checkpoint. Medians over the rounds.
fn checkpoint_report(rounds: usize) {
    let (mut blocked, mut start, mut wait, mut copy, mut ratios) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut saves = vec![];
    let load_before = common::load1();
    for round in 0..rounds {
        let st = checkpoint_stall();
        let r = SaveRound::run(round, &st.dir);
        let b = st.start + st.wait;
        println!(
            "round {round}: stall {:.3} ms (save_checkpoint {:.3} + wait {:.3}; copy {:.1} ms on its thread) = {:.2}% of the save; {}",
            b * 1e3,
            st.start * 1e3,
            st.wait * 1e3,
            st.copy * 1e3,
            100.0 * b / r.secs[0],
            r.line()
        );
        blocked.push(b);
        start.push(st.start);
        wait.push(st.wait);
        copy.push(st.copy);
        ratios.push(b / r.secs[0]);
        saves.push(r);
    }
    let save = median(saves.iter().map(|r| r.secs[0]).collect());
    println!(
        "checkpoint: {:.1} MB; medians over {rounds} rounds: stall {:.3} ms (save_checkpoint {:.3} + wait {:.3}; overlapped copy {:.1} ms) = {:.2}% of the save (median of ratios {:.2}%)",
        saves[0].bytes as f64 / 1e6,
        median(blocked.clone()) * 1e3,
        median(start) * 1e3,
        median(wait) * 1e3,
        median(copy) * 1e3,
        100.0 * median(blocked) / save,
        100.0 * median(ratios),
    );
    report_saves(&saves, load_before);
}

/// Saves of a synthetic AdamW checkpoint of about `mb` MB (a third weights, two thirds
/// moments, in tensors of up to 16 MiB), `rounds` [`SaveRound`]s.
fn save_report(mb: usize, rounds: usize) {
    let n = (mb * 1_000_000 / 12).clamp(1024, 4 << 20); // elements per tensor
    let tensors = (mb * 1_000_000 / 3).div_ceil(4 * n).max(1);
    let value = |k: usize, i: usize| ((k * n + i) as f32 * 1e-3).sin();
    let weights: eg_kernel::checkpoint::NamedBuffers = (0..tensors)
        .map(|k| {
            (
                format!("w{k:04}"),
                (vec![n], (0..n).map(|i| value(k, i)).collect()),
            )
        })
        .collect();
    let buffers = (0..tensors)
        .flat_map(|k| {
            let m = (0..n).map(|i| value(k + 1, i) * 1e-2).collect();
            let v = (0..n).map(|i| value(k + 2, i).abs() * 1e-4).collect();
            [
                (format!("w{k:04}.m"), (vec![n], m)),
                (format!("w{k:04}.v"), (vec![n], v)),
            ]
        })
        .collect();
    let data = eg_kernel::checkpoint::CheckpointData {
        step: 1,
        weights: Arc::new(weights),
        optimizer: Arc::new(eg_kernel::OptimizerState {
            t: 1,
            kind: kind(),
            buffers,
        }),
        optimizer_stream: None,
        trainer_json: b"{}".to_vec(),
        cursor_json: b"{}".to_vec(),
        config_toml: None,
        eval_loss: None,
        threads: 1,
    };
    let src = tempfile::tempdir().unwrap();
    let dir = eg_kernel::checkpoint::save(src.path(), &data).unwrap();
    drop(data);
    // Verifying it (what a resume does first), the first time from the disk (the writer
    // left nothing in the page cache), then from the page cache; then a load.
    let mut times = vec![];
    for _ in 0..3 {
        let t = Instant::now();
        eg_kernel::checkpoint::verify(&dir).unwrap();
        times.push(format!("{:.0}", t.elapsed().as_secs_f64() * 1e3));
    }
    let t = Instant::now();
    drop(eg_kernel::checkpoint::load(&dir).unwrap());
    println!(
        "verify: {} ms; load (verify + read): {:.0} ms",
        times.join(" / "),
        t.elapsed().as_secs_f64() * 1e3
    );
    let load_before = common::load1();
    let mut saves = vec![];
    for round in 0..rounds {
        let r = SaveRound::run(round, &dir);
        println!("round {round}: {}", r.line());
        saves.push(r);
    }
    println!(
        "synthetic checkpoint: {:.1} MB; medians over {rounds} rounds:",
        saves[0].bytes as f64 / 1e6
    );
    report_saves(&saves, load_before);
}
