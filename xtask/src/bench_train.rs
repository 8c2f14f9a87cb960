//! `cargo xtask bench train`: training speed of eg against PyTorch eager (issue 9).
//!
//! Runs the same Llama configurations in eg (`crates/eg-kernel/examples/train_speed.rs`) and
//! in PyTorch (`benches/peers/train_llama.py`, from the venv `--install-torch` creates),
//! alternating the two sides, at 1 and 2 threads, and prints a Markdown table: tokens/s, the
//! ratio eg/PyTorch, peak RSS of each process, CPU seconds per step, achieved FLOP/s as a
//! fraction of the 2048³ f32 matmul peak measured in the same run, and the
//! forward/backward/optimizer split.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{cargo, project_root};

/// One Llama shape with its batch and step counts.
#[derive(Debug, Clone)]
struct Shape {
    name: &'static str,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    seq: usize,
    batch: usize,
    steps: usize,
    warmup: usize,
}

impl Shape {
    fn args(&self) -> Vec<String> {
        [
            ("--hidden", self.hidden),
            ("--inter", self.inter),
            ("--layers", self.layers),
            ("--heads", self.heads),
            ("--kv-heads", self.kv_heads),
            ("--vocab", self.vocab),
            ("--seq", self.seq),
            ("--batch", self.batch),
            ("--steps", self.steps),
            ("--warmup", self.warmup),
        ]
        .iter()
        .flat_map(|(k, v)| [(*k).to_owned(), v.to_string()])
        .collect()
    }

    /// Training FLOPs per token: 6·N (N = all parameters; the tied embedding counts once, as
    /// the LM head) plus attention 12·L·h·seq (PaLM's convention, causal masking not
    /// discounted).
    fn flops_per_token(&self, params: f64) -> f64 {
        6.0 * params + 12.0 * (self.layers * self.hidden * self.seq) as f64
    }
}

const SHAPES: &[Shape] = &[
    Shape {
        name: "6.3M",
        hidden: 256,
        inter: 1024,
        layers: 4,
        heads: 8,
        kv_heads: 8,
        vocab: 8192,
        seq: 256,
        batch: 8,
        steps: 12,
        warmup: 2,
    },
    Shape {
        name: "110M",
        hidden: 768,
        inter: 2048,
        layers: 12,
        heads: 12,
        kv_heads: 12,
        vocab: 32000,
        seq: 512,
        batch: 1,
        steps: 6,
        warmup: 2,
    },
    // ~1.04B, grouped-query attention (Llama-3.2-1B shape with a 32k vocabulary). f32 weights,
    // gradients and AdamW state need ~17 GB per process: only with `--configs 1b`.
    Shape {
        name: "1B",
        hidden: 2048,
        inter: 8192,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        vocab: 32000,
        seq: 256,
        batch: 1,
        steps: 2,
        warmup: 1,
    },
];

/// The `RESULT` fields of one measurement process.
type Fields = BTreeMap<String, String>;

/// Parsed options.
#[derive(Debug)]
struct Options {
    install_torch: bool,
    rounds: usize,
    threads: Vec<usize>,
    configs: Vec<String>,
    venv: PathBuf,
    spin_limit: Option<u32>,
}

const USAGE: &str = "usage: cargo xtask bench train [--install-torch] [--rounds N] \
                     [--threads 1,2] [--configs 6.3m,110m[,1b]] [--venv DIR] [--spin-limit N]";

fn parse(args: &[String]) -> Result<Options> {
    let root = project_root();
    let mut o = Options {
        install_torch: false,
        rounds: 1,
        threads: vec![1, 2],
        configs: vec!["6.3m".into(), "110m".into()],
        venv: std::env::var_os("EG_TORCH_VENV")
            .map_or_else(|| root.join(".eg-cache").join("torch-venv"), PathBuf::from),
        spin_limit: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .with_context(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--install-torch" => o.install_torch = true,
            "--rounds" => o.rounds = value()?.parse().context("--rounds")?,
            "--threads" => {
                o.threads = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("--threads")?;
            }
            "--configs" => {
                o.configs = value()?.split(',').map(str::to_lowercase).collect();
            }
            "--venv" => o.venv = PathBuf::from(value()?),
            "--spin-limit" => o.spin_limit = Some(value()?.parse().context("--spin-limit")?),
            _ => bail!("unknown option {a}\n{USAGE}"),
        }
    }
    if o.rounds == 0 || o.threads.is_empty() || o.threads.contains(&0) {
        bail!("--rounds and --threads must be positive\n{USAGE}");
    }
    for c in &o.configs {
        if !SHAPES.iter().any(|s| s.name.eq_ignore_ascii_case(c)) {
            bail!("unknown configuration {c} (known: 6.3m, 110m, 1b)");
        }
    }
    Ok(o)
}

/// Creates the venv with the pinned PyTorch of `benches/peers/requirements.txt`.
fn install_torch(venv: &Path, requirements: &Path) -> Result<()> {
    let python = std::env::var("EG_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    if !venv.join("bin").join("python").is_file() {
        run(
            Command::new(&python).args(["-m", "venv"]).arg(venv),
            "create the venv (Debian: apt-get install python3-venv)",
        )?;
    }
    let py = venv.join("bin").join("python");
    run(
        Command::new(&py)
            .args(["-m", "pip", "install", "--disable-pip-version-check"])
            .args(["--no-cache-dir", "--no-deps", "--timeout", "60", "-r"])
            .arg(requirements),
        "install the pinned PyTorch from PyPI (~5.3 GB with its nvidia-* runtime wheels)",
    )?;
    run(
        Command::new(&py).args(["-m", "pip", "check"]),
        "check the pinned set (benches/peers/requirements.txt is incomplete)",
    )
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot {what}: cannot start {shown}"))?;
    if !status.success() {
        bail!("cannot {what}: {shown} failed ({status})");
    }
    Ok(())
}

/// Runs one measurement process and parses its `RESULT k=v ...` line.
fn measure(cmd: &mut Command) -> Result<Fields> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .with_context(|| format!("{shown} printed no RESULT line:\n{text}"))?;
    Ok(line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

fn num(r: &Fields, key: &str) -> Result<f64> {
    r.get(key)
        .with_context(|| format!("result has no {key}: {r:?}"))?
        .parse()
        .with_context(|| format!("{key} is not a number: {r:?}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

/// `cargo xtask bench train`.
pub(crate) fn bench_train(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let root = project_root();
    let requirements = root.join("benches").join("peers").join("requirements.txt");
    let script = root.join("benches").join("peers").join("train_llama.py");
    if o.install_torch {
        install_torch(&o.venv, &requirements)?;
    }
    let py = o.venv.join("bin").join("python");
    let ok = py.is_file()
        && Command::new(&py)
            .args(["-c", "import torch"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        bail!(
            "PyTorch is not installed in {}: run `cargo xtask bench train --install-torch` \
             (creates the venv with the pins of {}, ~5.3 GB from PyPI), or point \
             EG_TORCH_VENV/--venv at a venv that has torch",
            o.venv.display(),
            requirements.display()
        );
    }
    run(
        Command::new(cargo()).current_dir(&root).args([
            "build",
            "--release",
            "-p",
            "eg-kernel",
            "--example",
            "train_speed",
        ]),
        "build the eg side (cargo build --release -p eg-kernel --example train_speed)",
    )?;
    let target =
        std::env::var("CARGO_TARGET_DIR").map_or_else(|_| root.join("target"), PathBuf::from);
    let eg = target.join("release").join("examples").join("train_speed");

    let eg_cmd = |mode: &str, threads: usize, extra: &[String]| {
        let mut c = Command::new(&eg);
        c.arg(mode)
            .args(["--threads", &threads.to_string()])
            .args(extra);
        if let Some(s) = o.spin_limit {
            c.args(["--spin-limit", &s.to_string()]);
        }
        c
    };
    let py_cmd = |mode: &str, threads: usize, extra: &[String]| {
        let mut c = Command::new(&py);
        c.arg(&script)
            .arg(mode)
            .args(["--threads", &threads.to_string()])
            .args(extra)
            // No OpenMP busy-waiting beyond PyTorch's own default.
            .env("PYTHONWARNINGS", "ignore");
        c
    };

    let shapes: Vec<&Shape> = SHAPES
        .iter()
        .filter(|s| o.configs.iter().any(|c| s.name.eq_ignore_ascii_case(c)))
        .collect();
    let mut loads = vec![load_average()];
    // matmul peak per (side, threads), then per (shape, threads, side) the results of each round.
    let mut peaks: BTreeMap<(&str, usize), Vec<f64>> = BTreeMap::new();
    let mut runs: BTreeMap<(&str, usize, &str), Vec<Fields>> = BTreeMap::new();
    for round in 0..o.rounds {
        for &t in &o.threads {
            let sides: [&str; 2] = if round % 2 == 0 {
                ["eg", "pytorch"]
            } else {
                ["pytorch", "eg"]
            };
            for side in sides {
                let mut c = if side == "eg" {
                    eg_cmd("matmul", t, &[])
                } else {
                    py_cmd("matmul", t, &[])
                };
                let r = measure(&mut c)?;
                eprintln!("round {round} matmul {side} threads {t}: {r:?}");
                peaks.entry((side, t)).or_default().push(num(&r, "gflops")?);
            }
            for s in &shapes {
                for side in sides {
                    let mut c = if side == "eg" {
                        eg_cmd("train", t, &s.args())
                    } else {
                        py_cmd("train", t, &s.args())
                    };
                    let r = measure(&mut c)?;
                    eprintln!("round {round} {} {side} threads {t}: {r:?}", s.name);
                    runs.entry((s.name, t, side)).or_default().push(r);
                }
            }
        }
        loads.push(load_average());
    }

    let mut md = String::new();
    writeln!(
        md,
        "load average (1/5/15 min) before and after each round: {}",
        loads.join(" → ")
    )?;
    writeln!(
        md,
        "\n2048³ f32 matmul peak (GFLOP/s, best of 5, median over rounds):\n"
    )?;
    writeln!(md, "| threads | eg (candle/gemm) | PyTorch |")?;
    writeln!(md, "|---|---|---|")?;
    for &t in &o.threads {
        let p = |side| {
            peaks
                .get(&(side, t))
                .map_or(f64::NAN, |v| median(v.clone()))
        };
        writeln!(md, "| {t} | {:.1} | {:.1} |", p("eg"), p("pytorch"))?;
    }
    writeln!(
        md,
        "\nMedians over {} round(s) of the per-run median step. MFU = (6·N + 12·L·h·seq) · tokens/s \
         over the larger of the two matmul peaks at that thread count.\n",
        o.rounds
    )?;
    writeln!(
        md,
        "| config | threads | eg tok/s | PyTorch tok/s | eg/PyTorch | eg RSS MB | PyTorch RSS MB \
         | eg MFU | PyTorch MFU | eg fwd/bwd/gather/opt s | PyTorch fwd/bwd/opt s \
         | eg / PyTorch CPU s per step |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for s in &shapes {
        for &t in &o.threads {
            let (Some(e), Some(p)) = (
                runs.get(&(s.name, t, "eg")),
                runs.get(&(s.name, t, "pytorch")),
            ) else {
                continue;
            };
            let m = |rs: &Vec<Fields>, k: &str| -> Result<f64> {
                Ok(median(
                    rs.iter().map(|r| num(r, k)).collect::<Result<Vec<_>>>()?,
                ))
            };
            let peak = ["eg", "pytorch"]
                .iter()
                .filter_map(|side| peaks.get(&(*side, t)).map(|v| median(v.clone())))
                .fold(f64::NAN, f64::max)
                * 1e9;
            let (etps, ptps) = (m(e, "tokens_per_s")?, m(p, "tokens_per_s")?);
            let (en, pn) = (m(e, "params")?, m(p, "params")?);
            writeln!(
                md,
                "| {} | {t} | {etps:.0} | {ptps:.0} | **{:.2}** | {:.0} | {:.0} | {:.0}% | {:.0}% \
                 | {:.3}/{:.3}/{:.3}/{:.3} | {:.3}/{:.3}/{:.3} | {:.3} / {:.3} |",
                s.name,
                etps / ptps,
                m(e, "peak_rss")? / 1e6,
                m(p, "peak_rss")? / 1e6,
                100.0 * s.flops_per_token(en) * etps / peak,
                100.0 * s.flops_per_token(pn) * ptps / peak,
                m(e, "fwd_s")?,
                m(e, "bwd_s")?,
                m(e, "gather_s")?,
                m(e, "opt_s")?,
                m(p, "fwd_s")?,
                m(p, "bwd_s")?,
                m(p, "opt_s")?,
                m(e, "cpu_s_per_step")?,
                m(p, "cpu_s_per_step")?,
            )?;
        }
    }
    print!("{md}");
    Ok(())
}
