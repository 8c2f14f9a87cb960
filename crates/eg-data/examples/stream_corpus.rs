//! End-to-end streaming of a large generated corpus with bounded memory.
//!
//! Generates `SIZE_MB` (default 2048) of text in 256 MB files, trains a byte-level BPE on the
//! first megabytes, prepares token shards (streaming, parallel tokenization), then streams one
//! epoch of packed batches, printing throughput of each phase and peak memory.
//!
//! ```text
//! cargo run --release -p eg-data --example stream_corpus -- [DIR] [SIZE_MB] [read|mapped]
//! ```
//!
//! Peak RSS is reported twice: `VmHWM` (includes file pages of the memory-mapped shards, which
//! the kernel can drop at any time) and the largest sampled `RssAnon` (heap and stacks: what
//! the pipeline itself holds).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use eg_data::order::SplitMix64;
use eg_data::{
    BpeOptions, Format, Loader, LoaderOptions, Placement, Prefetcher, PrepareOptions, ShardAccess,
    TextSplit, TextTokenizer, TokenDataset, prepare,
};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be",
    "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have",
    "an", "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no", "king", "lord", "thou",
    "thee", "shall", "unto", "said", "house", "people", "data",
];

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn generate(dir: &Path, size_mb: u64) -> Res<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let per_file: u64 = 256 << 20;
    let total = size_mb << 20;
    let mut files = Vec::new();
    let mut written = 0;
    let mut k = 0;
    while written < total {
        let path = dir.join(format!("corpus-{k:03}.txt"));
        let want = per_file.min(total - written);
        if std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) != want {
            let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
            let mut r = SplitMix64::new(k);
            let mut n = 0u64;
            let mut line = String::new();
            while n < want {
                line.clear();
                let words = 5 + r.below(40);
                for w in 0..words {
                    if w > 0 {
                        line.push(' ');
                    }
                    line.push_str(WORDS[r.below(WORDS.len() as u64) as usize]);
                }
                line.push('\n');
                let take = (line.len() as u64).min(want - n) as usize;
                f.write_all(&line.as_bytes()[..take])?;
                n += take as u64;
            }
            f.flush()?;
        }
        written += want;
        files.push(path);
        k += 1;
    }
    Ok(files)
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(
        args.get(1)
            .cloned()
            .unwrap_or_else(|| "/tmp/eg-data-corpus".into()),
    );
    let size_mb: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2048);
    let access = match args.get(3).map(String::as_str) {
        Some("mapped") => ShardAccess::Mapped,
        _ => ShardAccess::Read,
    };

    // Sample RssAnon every 20 ms on a side thread (the kernel keeps no high-water mark for it).
    let max_anon = Arc::new(AtomicU64::new(0));
    let sampler = Arc::clone(&max_anon);
    std::thread::spawn(move || {
        loop {
            sampler.fetch_max(status_kb("RssAnon:"), Ordering::Relaxed);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    });

    let t = Instant::now();
    let files = generate(&dir.join("text"), size_mb)?;
    println!(
        "corpus: {} files, {size_mb} MB in {:.1}s",
        files.len(),
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    // Train on the first 4 MB only: memory stays bounded whatever the corpus size.
    let mut sample = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(std::fs::File::open(&files[0])?, 4 << 20),
        &mut sample,
    )?;
    let head: Vec<&str> = sample.lines().collect();
    let tok = TextTokenizer::train_bpe(
        head.into_iter(),
        &BpeOptions {
            vocab_size: 4096,
            min_frequency: 2,
            special_tokens: vec!["<|endoftext|>".into()],
        },
    )?;
    drop(sample);
    println!(
        "tokenizer: vocab {} trained in {:.1}s",
        tok.vocab_size(),
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let mut opts = PrepareOptions::new(Format::Text(TextSplit::Lines), dir.join("cache"));
    opts.stream.quarantine = Some(dir.join("quarantine.jsonl"));
    let prepared = prepare(&files, &tok, &opts)?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "prepare: {} samples, {} tokens, reused={} in {secs:.1}s = {:.1} MB/s of text on {} threads",
        prepared.manifest.samples,
        prepared.manifest.tokens,
        prepared.reused,
        (size_mb as f64) / secs,
        rayon::current_num_threads(),
    );

    let t = Instant::now();
    let shards: Arc<dyn TokenDataset> = Arc::new(prepared.open_with(access)?);
    let o = LoaderOptions {
        seq_len: 2048,
        rows_per_step: 8,
        eos_id: tok.token_id("<|endoftext|>"),
        epochs: Some(1),
        ..LoaderOptions::default()
    };
    let mut pre = Prefetcher::spawn(Loader::new(shards, o, Placement::SINGLE)?, 8)?;
    let (mut batches, mut tokens) = (0u64, 0u64);
    while let Some(b) = pre.next_batch()? {
        batches += 1;
        tokens += b.tokens as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    max_anon.fetch_max(status_kb("RssAnon:"), Ordering::Relaxed);
    println!(
        "load ({access:?}): {batches} batches, {tokens} tokens in {secs:.1}s = {:.1} M tokens/s ({:.0} MB/s of u32)",
        tokens as f64 / secs / 1e6,
        tokens as f64 * 4.0 / secs / 1e6
    );
    println!(
        "peak memory: VmHWM {} MB (incl. mapped file pages), max RssAnon (sampled every 20 ms) {} MB",
        status_kb("VmHWM:") / 1024,
        max_anon.load(Ordering::Relaxed) / 1024
    );
    Ok(())
}
