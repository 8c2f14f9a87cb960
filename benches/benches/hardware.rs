//! eg-hardware: detection without probes must stay under 50 ms (issue 3).
//!
//! `cargo bench -p eg-benches --bench hardware`

#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use eg_hardware::{Detector, GpuQuery, Root};
use std::hint::black_box;
use std::path::Path;

fn detection(c: &mut Criterion) {
    let mut g = c.benchmark_group("hardware");
    // Everything `eg hw` does without --probe: files, statvfs, affinity, and the attempt to
    // load NVML (absent on this machine: the dlopen failure is part of the cost).
    g.bench_function("detect_host_no_probes", |b| {
        b.iter(|| black_box(Detector::new(Root::host()).storage_path(".").detect()))
    });
    g.bench_function("detect_host_no_gpu_query", |b| {
        b.iter(|| {
            black_box(
                Detector::new(Root::host())
                    .gpu(GpuQuery::Skip)
                    .storage_path(".")
                    .detect(),
            )
        })
    });
    let laptop = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/eg-hardware/tests/fixtures/laptop-battery");
    g.bench_function("detect_fixture_laptop", |b| {
        b.iter(|| {
            black_box(
                Detector::new(Root::new(&laptop))
                    .storage_path("/home/me/ckpt")
                    .detect(),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, detection);
criterion_main!(benches);
