//! Measurement helpers shared by the benchmark examples (Linux `/proc` and `getrusage`).
#![allow(dead_code)]

/// A `kB` field of `/proc/self/status` (`VmHWM:`, `VmRSS:`, ...), 0 when unreadable.
pub(crate) fn status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// User + system CPU seconds of this process, all threads (`getrusage`); NaN on failure.
pub(crate) fn cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// The 1-minute load average as printed in `/proc/loadavg`.
pub(crate) fn load1() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

use std::sync::Arc;

use eg_data::{InMemoryDataset, Loader, LoaderOptions, Placement};
use eg_kernel::{Optimizer, OptimizerKind, Schedule, TrainModel, TrainerOptions};

/// The benchmarks' AdamW (β 0.9 / 0.95, eps 1e-8).
pub(crate) const ADAMW: OptimizerKind = OptimizerKind::AdamW {
    beta1: 0.9,
    beta2: 0.95,
    eps: 1e-8,
};

/// Name and shape of every trainable parameter of `m`.
pub(crate) fn param_shapes<M: TrainModel>(m: &M) -> Vec<(String, Vec<usize>)> {
    m.named_params()
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect()
}

/// [`ADAMW`] without weight decay over `m`'s parameters, state in RAM.
pub(crate) fn adamw<M: TrainModel>(m: &M) -> Optimizer {
    Optimizer::new(ADAMW, 0.0, &param_shapes(m)).unwrap()
}

/// A loader of `rows` rows of `seq` tokens over 2000 synthetic documents of 50–349 ids in
/// `1..=31000` (EOS 0, seed 1).
pub(crate) fn synthetic_loader(seq: usize, rows: usize) -> Loader {
    synthetic_docs_loader(seq, rows, 2000, 300, 31_000)
}

/// A loader of `rows` rows of `seq` tokens over `docs` synthetic documents of
/// `50..50 + spread` ids in `1..=ids` (EOS 0, seed 1).
pub(crate) fn synthetic_docs_loader(
    seq: usize,
    rows: usize,
    docs: u32,
    spread: u32,
    ids: u32,
) -> Loader {
    let docs = (0..docs).map(|i| {
        (0..(50 + i % spread))
            .map(|j| (i.wrapping_mul(2_654_435_761) ^ j.wrapping_mul(40_503)) % ids + 1)
            .collect::<Vec<u32>>()
    });
    let data = Arc::new(InMemoryDataset::from_docs(docs));
    let lo = LoaderOptions {
        seq_len: seq,
        rows_per_step: rows,
        eos_id: Some(0),
        seed: 1,
        ..LoaderOptions::default()
    };
    Loader::new(data, lo, Placement::SINGLE).unwrap()
}

/// `steps` updates of one `rows`-row micro-batch at a constant 1e-4, no spike detection.
pub(crate) fn bench_options(steps: u64, rows: usize) -> TrainerOptions {
    TrainerOptions {
        max_steps: steps,
        micro_batch_rows: rows,
        schedule: Schedule::constant(1e-4),
        spike: None,
        ..TrainerOptions::default()
    }
}
