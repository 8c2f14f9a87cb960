//! `eg hw`: what this machine offers a training run.
//!
//! `eg hw` prints a readable report, `eg hw --json` the serde report (schema documented in the
//! `eg-hardware` crate docs, versioned by `schema_version`), and `eg hw --probe` adds measured
//! GEMM throughput per dtype, memory bandwidth and storage bandwidth, in under 20 s. GEMM and
//! memory figures are cached per machine in `--cache-dir`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use elastic_guardian::hardware as hw;

/// Arguments of `eg hw`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct HwArgs {
    /// Print the report as JSON (schema: see the eg-hardware crate docs).
    #[arg(long)]
    pub(crate) json: bool,

    /// Also measure GEMM GFLOP/s (f32, bf16, f16), memory bandwidth and the sequential
    /// bandwidth of each --path (bounded: under 20 s in total).
    #[arg(long)]
    pub(crate) probe: bool,

    /// With --probe: measure again even when the cache holds figures for this machine.
    #[arg(long, requires = "probe")]
    pub(crate) refresh: bool,

    /// A directory whose storage to report (checkpoint, data or offload directory); repeat
    /// for several. Defaults to the current directory.
    #[arg(long = "path", value_name = "DIR")]
    pub(crate) paths: Vec<PathBuf>,

    /// Where measured GEMM and memory figures are cached, one file per machine.
    #[arg(long, value_name = "DIR", default_value = ".eg-cache/hardware")]
    pub(crate) cache_dir: PathBuf,

    /// Read system files below this directory instead of `/` (fixture trees, for testing).
    #[arg(long, value_name = "DIR", default_value = "/", hide = true)]
    pub(crate) root: PathBuf,
}

/// Total time `--probe` may take.
const PROBE_LIMIT: Duration = Duration::from_secs(18);
/// Time given to GEMM and memory bandwidth together.
const CAPACITY_BUDGET: Duration = Duration::from_secs(7);
/// Most bytes written per storage probe.
const STORAGE_BYTES: u64 = 256 << 20;

/// Runs `eg hw`: prints the report (text or JSON) to stdout.
pub(crate) fn run(args: HwArgs) -> anyhow::Result<()> {
    let text = report_text(&args)?;
    print!("{text}");
    Ok(())
}

/// Detects (and probes, with `--probe`) and renders the report as `eg hw` prints it.
fn report_text(args: &HwArgs) -> anyhow::Result<String> {
    let started = Instant::now();
    let paths = if args.paths.is_empty() {
        vec![PathBuf::from(".")]
    } else {
        args.paths.clone()
    };
    let root = hw::Root::new(&args.root);
    if args.probe && !root.is_host() {
        anyhow::bail!(
            "--probe measures this machine and cannot be combined with --root {}",
            args.root.display()
        );
    }
    let mut report = paths
        .iter()
        .fold(hw::Detector::new(root.clone()), |d, p| d.storage_path(p))
        .detect();

    if args.probe {
        let opts = hw::capacity::ProbeOptions {
            cache_dir: Some(args.cache_dir.clone()),
            budget: CAPACITY_BUDGET,
            refresh: args.refresh,
        };
        let cap = hw::capacity::probe_capacity(&report, &opts).with_context(|| {
            format!(
                "measuring GEMM and memory bandwidth (cache in {})",
                args.cache_dir.display()
            )
        })?;
        report.capacity = Some(cap);

        // Storage: each path gets an equal share of what is left of the limit.
        let n = report.storage.len();
        for (i, (store, path)) in report.storage.iter_mut().zip(&paths).enumerate() {
            let left = PROBE_LIMIT.saturating_sub(started.elapsed());
            // Write and read passes each get at most this long.
            let per_pass = (left / (2 * (n - i) as u32)).min(Duration::from_secs(3));
            if per_pass < Duration::from_millis(100) {
                report.warnings.push(format!(
                    "{}: storage bandwidth not measured (probe time limit reached)",
                    path.display()
                ));
                continue;
            }
            let limits = hw::storage::BandwidthLimits {
                max_bytes: STORAGE_BYTES,
                max_duration: per_pass,
            };
            let bw = hw::storage::measure_bandwidth(path, limits)
                .with_context(|| format!("measuring storage bandwidth in {}", path.display()))?;
            store.bandwidth = Some(bw);
        }
    }

    if args.json {
        let mut text = serde_json::to_string_pretty(&report).context("serializing the report")?;
        text.push('\n');
        Ok(text)
    } else {
        Ok(report.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: HwArgs,
    }

    const LAPTOP: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../eg-hardware/tests/fixtures/laptop-battery"
    );

    fn args(list: &[&str]) -> Result<HwArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("eg-hw").chain(list.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn json_on_a_fixture_root() {
        let a = args(&["--root", LAPTOP, "--json", "--path", "/home/me"]).unwrap();
        let text = report_text(&a).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["schema_version"], 1);
        assert_eq!(v["power"]["source"], "battery");
        assert_eq!(v["storage"][0]["kind"], "nvme");
    }

    #[test]
    fn text_on_a_fixture_root() {
        let a = args(&["--root", LAPTOP, "--path", "/home/me"]).unwrap();
        let text = report_text(&a).unwrap();
        assert!(
            text.contains("Power     battery; BAT0 63% Discharging"),
            "{text}"
        );
        assert!(text.contains("ROUGH"), "{text}");
    }

    #[test]
    fn probe_is_refused_on_a_fixture_root() {
        let a = args(&["--root", LAPTOP, "--probe"]).unwrap();
        let e = report_text(&a).unwrap_err();
        assert!(
            e.to_string().contains("--probe measures this machine"),
            "{e}"
        );
    }

    /// The whole `--probe` (GEMM per dtype, memory and storage bandwidth) stays under 20 s.
    #[test]
    fn probe_is_bounded() {
        let cache = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let a = args(&[
            "--probe",
            "--json",
            "--cache-dir",
            cache.path().to_str().unwrap(),
            "--path",
            dir.path().to_str().unwrap(),
        ])
        .unwrap();
        let t = Instant::now();
        let text = report_text(&a).unwrap();
        let took = t.elapsed();
        assert!(took < Duration::from_secs(20), "--probe took {took:?}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["capacity"]["gemm"].as_array().unwrap().len(), 3);
        assert!(v["storage"][0]["bandwidth"]["write_mb_s"].as_f64().unwrap() > 0.0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn refresh_needs_probe() {
        assert!(args(&["--refresh"]).is_err());
        assert!(args(&["--probe", "--refresh"]).is_ok());
    }
}
