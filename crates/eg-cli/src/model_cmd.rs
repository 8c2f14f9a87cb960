//! `eg model inspect|list|add|show`: look inside a model directory and manage the local
//! registry of `name@version` entries.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use elastic_guardian::config;
use elastic_guardian::model::hf::{self, Inspection};
use elastic_guardian::model::registry::Registry;

/// `eg model` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum ModelCommand {
    /// Parameters, bytes by dtype, FLOPs and activation bytes per token, per module.
    Inspect {
        /// A Hugging Face model directory (a hub-cache snapshot directory works too), or
        /// `name@version` from the registry.
        model: String,
        /// Sequence length for the attention figures.
        #[arg(long, default_value_t = 2048)]
        seq_len: usize,
        /// Registry directory (default: `$EG_HOME/registry`).
        #[arg(long, value_name = "DIR")]
        registry: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the registry's entries.
    List {
        /// Registry directory (default: `$EG_HOME/registry`).
        #[arg(long, value_name = "DIR")]
        registry: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy a model directory into the registry as `name@version` (sha256 of every file).
    Add {
        /// `name@version`.
        spec: String,
        /// The model directory to copy.
        dir: PathBuf,
        /// Where it came from (free text; default: the directory).
        #[arg(long)]
        source: Option<String>,
        /// Registry directory (default: `$EG_HOME/registry`).
        #[arg(long, value_name = "DIR")]
        registry: Option<PathBuf>,
    },
    /// Show one entry's manifest (files, sizes, checksums, config).
    Show {
        /// `name@version`.
        spec: String,
        /// Registry directory (default: `$EG_HOME/registry`).
        #[arg(long, value_name = "DIR")]
        registry: Option<PathBuf>,
    },
}

/// The registry at `dir`, or at the per-user default.
pub(crate) fn registry(dir: Option<PathBuf>) -> anyhow::Result<Registry> {
    let dir = dir.or_else(config::env::default_registry_dir).context(
        "no registry directory: pass --registry DIR, set model.registry, or set EG_HOME or HOME",
    )?;
    Ok(Registry::new(dir))
}

/// The directory of the configured model: `None` for a builtin, the directory itself, or the
/// registry entry's directory (checksums verified by the registry).
pub(crate) fn model_dir(cfg: &config::Config) -> anyhow::Result<Option<PathBuf>> {
    match &cfg.model.source {
        config::ModelSource::Builtin(_) => Ok(None),
        config::ModelSource::Dir(d) => Ok(Some(d.clone())),
        config::ModelSource::Registry { name, version } => {
            let reg = registry(cfg.model.registry.clone())?;
            Ok(Some(reg.resolve(&format!("{name}@{version}"))?))
        }
        _ => Err(crate::exit::Unsupported {
            what: "this kind of model.source",
        }
        .into()),
    }
}

/// `name@version` (no path separator) or a directory.
fn resolve(model: &str, reg: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let p = Path::new(model);
    if p.exists() || model.contains('/') || !model.contains('@') {
        return Ok(p.to_path_buf());
    }
    Ok(registry(reg)?.resolve(model)?)
}

pub(crate) fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Inspect {
            model,
            seq_len,
            registry: reg,
            json,
        } => {
            let dir = resolve(&model, reg)?;
            let ins = hf::inspect_dir(&dir, seq_len)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&inspection_json(&ins))?);
            } else {
                print_inspection(&dir, &ins);
            }
        }
        ModelCommand::List {
            registry: reg,
            json,
        } => {
            let entries = registry(reg)?.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else if entries.is_empty() {
                println!("the registry is empty; add a model with `eg model add NAME@VERSION DIR`");
            } else {
                for e in &entries {
                    let bytes: u64 = e.files.values().map(|f| f.bytes).sum();
                    println!(
                        "{}@{}  {} files, {}  ({})",
                        e.name,
                        e.version,
                        e.files.len(),
                        human(bytes),
                        e.source
                    );
                }
            }
        }
        ModelCommand::Add {
            spec,
            dir,
            source,
            registry: reg,
        } => {
            let (name, version) = spec
                .split_once('@')
                .filter(|(n, v)| !n.is_empty() && !v.is_empty())
                .with_context(|| format!("{spec:?} is not NAME@VERSION"))?;
            let source = source.unwrap_or_else(|| dir.display().to_string());
            let e = registry(reg)?.add(name, version, &dir, &source)?;
            println!("added {}@{} ({} files)", e.name, e.version, e.files.len());
        }
        ModelCommand::Show {
            spec,
            registry: reg,
        } => {
            let e = registry(reg)?.show(&spec)?;
            println!("{}", serde_json::to_string_pretty(&e)?);
        }
    }
    Ok(())
}

fn inspection_json(ins: &Inspection) -> serde_json::Value {
    serde_json::json!({
        "model_type": ins.model_type,
        "params": ins.params,
        "bytes_by_dtype": ins.bytes_by_dtype,
        "tensors": ins.tensors.iter().map(|t| serde_json::json!({"name": t.name, "dtype": t.dtype, "shape": t.shape})).collect::<Vec<_>>(),
        "analysis": ins.analysis,
    })
}

fn print_inspection(dir: &Path, ins: &Inspection) {
    println!("model: {} ({})", dir.display(), ins.model_type);
    println!("parameters: {} ({} tensors)", ins.params, ins.tensors.len());
    for (dtype, bytes) in &ins.bytes_by_dtype {
        println!("bytes {dtype}: {bytes} ({})", human(*bytes));
    }
    let Some(a) = &ins.analysis else {
        println!("(per-module analysis is available for the Llama family only)");
        return;
    };
    println!(
        "at sequence length {}: forward {:.3} GFLOP/token, training {:.3} GFLOP/token, activations {} per token",
        a.seq_len,
        a.forward_flops_per_token as f64 / 1e9,
        a.training_flops_per_token as f64 / 1e9,
        human(a.activation_bytes_per_token)
    );
    let width = a
        .modules
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!(
        "{:width$}  {:>12}  {:>10}  {:>14}  {:>12}",
        "module", "params", "bytes", "MFLOP/token", "act/token"
    );
    for m in &a.modules {
        println!(
            "{:width$}  {:>12}  {:>10}  {:>14.3}  {:>12}",
            m.name,
            m.params,
            human(m.param_bytes),
            m.flops_per_token as f64 / 1e6,
            human(m.activation_bytes_per_token)
        );
    }
}

fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}
