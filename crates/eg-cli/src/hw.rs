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
const PROBE_LIMIT: Duration = Duration::from_secs(19);
/// Time given to GEMM and memory bandwidth together.
const CAPACITY_BUDGET: Duration = Duration::from_secs(8);
/// Most bytes written per storage probe.
const STORAGE_BYTES: u64 = 256 << 20;

/// Runs `eg hw`.
pub(crate) fn run(args: HwArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let paths = if args.paths.is_empty() {
        vec![PathBuf::from(".")]
    } else {
        args.paths.clone()
    };
    let root = hw::Root::new(&args.root);
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

        if root.is_host() {
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
                let bw = hw::storage::measure_bandwidth(path, limits).with_context(|| {
                    format!("measuring storage bandwidth in {}", path.display())
                })?;
                store.bandwidth = Some(bw);
            }
        } else {
            report
                .warnings
                .push("storage bandwidth is only measured on the host root".to_owned());
        }
    }

    if args.json {
        let text = serde_json::to_string_pretty(&report).context("serializing the report")?;
        println!("{text}");
    } else {
        print!("{report}");
    }
    Ok(())
}
