//! Packing throughput: batches per second of the loader, reported as bytes of `u32` tokens.
//!
//! Run: `cargo bench -p eg-data --bench packing`. The target in issue 5 is ≥ 500 MB/s.

#![allow(clippy::expect_used)] // a benchmark may stop on a broken fixture

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use eg_data::order::SplitMix64;
use eg_data::{
    InMemoryDataset, Loader, LoaderOptions, Packing, Placement, ShardAccess, ShardWriter,
    TokenDataset, TokenShards, TokenWidth,
};

/// 20 000 documents of 1..2000 tokens (mean ≈ 1000), deterministic.
fn docs() -> Vec<Vec<u32>> {
    let mut r = SplitMix64::new(7);
    (0..20_000)
        .map(|_| {
            let n = 1 + r.below(2000) as usize;
            (0..n).map(|_| r.below(50_000) as u32).collect()
        })
        .collect()
}

fn bench_loader(c: &mut Criterion, name: &str, data: Arc<dyn TokenDataset>, packing: Packing) {
    let opts = LoaderOptions {
        seq_len: 2048,
        rows_per_step: 16,
        packing,
        eos_id: Some(0),
        seed: 1,
        ..LoaderOptions::default()
    };
    let mut group = c.benchmark_group("packing");
    group.throughput(Throughput::Bytes(
        (opts.seq_len * opts.rows_per_step * 4) as u64,
    ));
    let mut loader = Loader::new(data, opts, Placement::SINGLE).expect("loader");
    group.bench_function(name, |b| {
        b.iter(|| black_box(loader.next_batch().expect("batch")));
    });
    group.finish();
}

fn packing(c: &mut Criterion) {
    let docs = docs();
    let mem: Arc<dyn TokenDataset> = Arc::new(InMemoryDataset::from_docs(&docs));
    bench_loader(c, "concat/memory", mem.clone(), Packing::Concat);
    bench_loader(c, "best_fit/memory", mem, Packing::BestFit { window: 256 });

    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = ShardWriter::create(dir.path(), "bench", TokenWidth::U16).expect("writer");
    for d in &docs {
        w.push(d, 0).expect("push");
    }
    w.finish().expect("finish");
    for (access, name) in [
        (ShardAccess::Mapped, "mmap_u16"),
        (ShardAccess::Read, "pread_u16"),
    ] {
        let shards: Arc<dyn TokenDataset> =
            Arc::new(TokenShards::open_dir(dir.path(), access).expect("open"));
        bench_loader(
            c,
            &format!("concat/{name}"),
            shards.clone(),
            Packing::Concat,
        );
        bench_loader(
            c,
            &format!("best_fit/{name}"),
            shards,
            Packing::BestFit { window: 256 },
        );
    }
}

criterion_group!(benches, packing);
criterion_main!(benches);
