//! Tokenization throughput per core: this crate's parallel encoder against Python's
//! `tokenizers.Tokenizer.encode_batch`, on the same corpus and the same `tokenizer.json`, in
//! the same run.
//!
//! ```text
//! python3 -m venv /tmp/eg-data-venv && /tmp/eg-data-venv/bin/pip install tokenizers==0.23.3
//! cargo run --release -p eg-data --example tokenize_throughput -- /tmp/eg-data-venv/bin/python [MB]
//! ```
//!
//! Both sides run on one thread (`RAYON_NUM_THREADS=1` for Python, a one-thread rayon pool
//! here), then on all cores.

use std::io::Write;
use std::process::Command;
use std::time::Instant;

use eg_data::order::SplitMix64;
use eg_data::{BpeOptions, TextTokenizer};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const PY: &str = r#"
import sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
lines = open(sys.argv[2], encoding="utf-8").read().split("\n")
size = sum(len(l.encode("utf-8")) for l in lines)
tok.encode_batch(lines[:2000], add_special_tokens=False)
best = 0.0
for _ in range(3):
    t = time.perf_counter()
    enc = tok.encode_batch(lines, add_special_tokens=False)
    best = max(best, size / (time.perf_counter() - t) / 1e6)
print(best, sum(len(e.ids) for e in enc))
"#;

/// Varied generated English-like text with punctuation, digits and some non-ASCII.
fn corpus(bytes: usize) -> Vec<String> {
    const SYL: &[&str] = &[
        "th", "e", "an", "re", "in", "on", "at", "er", "st", "ou", "ing", "ed", "ly", "tion", "qu",
        "ch", "sh", "é", "ü", "or", "al", "it", "is", "ar", "le", "se",
    ];
    const PUNCT: &[&str] = &[
        ",", ".", ";", ":", "!", "?", "'s", " -", " (", ")", "\"", " 1984", " 3.14",
    ];
    let mut r = SplitMix64::new(2024);
    let (mut out, mut n) = (Vec::new(), 0);
    while n < bytes {
        let mut line = String::new();
        for w in 0..(4 + r.below(30)) {
            if w > 0 {
                line.push(' ');
            }
            for _ in 0..(1 + r.below(4)) {
                line.push_str(SYL[r.below(SYL.len() as u64) as usize]);
            }
            if r.below(6) == 0 {
                line.push_str(PUNCT[r.below(PUNCT.len() as u64) as usize]);
            }
        }
        n += line.len() + 1;
        out.push(line);
    }
    out
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let python = args.get(1).cloned().unwrap_or_else(|| "python3".into());
    let mb: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(16);
    let dir = tempfile::tempdir()?;
    let lines = corpus(mb << 20);
    let size: usize = lines.iter().map(|l| l.len()).sum();
    let text_path = dir.path().join("corpus.txt");
    std::fs::File::create(&text_path)?.write_all(lines.join("\n").as_bytes())?;
    let tok = TextTokenizer::train_bpe(
        lines.iter().take(50_000),
        &BpeOptions {
            vocab_size: 8192,
            ..BpeOptions::default()
        },
    )?;
    let tok_path = dir.path().join("tokenizer.json");
    tok.save(&tok_path)?;
    println!(
        "corpus {:.1} MB, {} lines, vocab {}",
        size as f64 / 1e6,
        lines.len(),
        tok.vocab_size()
    );

    let measure = |threads: usize| -> Res<(f64, usize)> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        let mut best = 0.0f64;
        let mut count = 0;
        pool.install(|| tok.encode_batch(&lines[..2000]))?;
        for _ in 0..3 {
            let t = Instant::now();
            let ids = pool.install(|| tok.encode_batch(&lines))?;
            best = best.max(size as f64 / t.elapsed().as_secs_f64() / 1e6);
            count = ids.iter().map(Vec::len).sum();
        }
        Ok((best, count))
    };
    let python_run = |threads: usize| -> Res<(f64, usize)> {
        let out = Command::new(&python)
            .args(["-c", PY])
            .arg(&tok_path)
            .arg(&text_path)
            .env("RAYON_NUM_THREADS", threads.to_string())
            .env("RAYON_RS_NUM_THREADS", threads.to_string())
            .env("TOKENIZERS_PARALLELISM", "true")
            .output()?;
        let s = String::from_utf8_lossy(&out.stdout);
        let mut it = s.split_whitespace();
        match (
            it.next().and_then(|v| v.parse().ok()),
            it.next().and_then(|v| v.parse().ok()),
        ) {
            (Some(mbps), Some(n)) => Ok((mbps, n)),
            _ => Err(format!("python failed: {}", String::from_utf8_lossy(&out.stderr)).into()),
        }
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    for threads in [1, cores] {
        let (rust, n_rust) = measure(threads)?;
        let (py, n_py) = python_run(threads)?;
        println!(
            "{threads} thread(s): eg-data {rust:.2} MB/s, python tokenizers {py:.2} MB/s, ratio {:.2} (tokens {n_rust} vs {n_py})",
            rust / py
        );
    }
    Ok(())
}
