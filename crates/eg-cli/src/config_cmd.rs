//! `eg config validate|show|schema`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use elastic_guardian::config::{self, Error, Origin, Sources};
use serde_json::json;

use crate::exit::code;

/// `eg config` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Check files (with EG_ variables and --set overrides); exit 0 when valid, 2 when not.
    Validate {
        /// Configuration files, later ones win.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Override one key: `key.path=value` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Ignore EG_ environment variables.
        #[arg(long)]
        no_env: bool,
        /// Print a JSON report for tools.
        #[arg(long)]
        json: bool,
    },
    /// Print the resolved configuration, each value with where it came from.
    Show {
        /// Configuration files, later ones win (none: the built-in defaults).
        #[arg(value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Override one key: `key.path=value` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Ignore EG_ environment variables.
        #[arg(long)]
        no_env: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the JSON Schema of configuration files (for editors).
    Schema,
    /// Print the configuration reference (Markdown: every key, type, default and meaning).
    Reference,
}

fn sources(files: &[PathBuf], set: &[String], no_env: bool) -> Sources {
    let s = Sources::new().files(files).sets(set);
    if no_env { s } else { s.process_env() }
}

pub(crate) fn run(cmd: ConfigCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ConfigCommand::Validate {
            files,
            set,
            no_env,
            json,
        } => {
            let result = sources(&files, &set, no_env).load();
            Ok(validate_report(&files, result.err(), json))
        }
        ConfigCommand::Show {
            files,
            set,
            no_env,
            json,
        } => {
            let resolved = sources(&files, &set, no_env).resolve()?;
            let entries = resolved.entries();
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                let width = entries.iter().map(|e| e.key.len()).max().unwrap_or(0);
                for e in &entries {
                    println!("{:width$} = {}  # {}", e.key, e.value, e.origin);
                }
            }
            // Showing an invalid configuration is useful, but the exit code still says so.
            match resolved.validate() {
                Ok(_) => Ok(ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("the configuration above is invalid:\n{e}");
                    Ok(ExitCode::from(code::INVALID))
                }
            }
        }
        ConfigCommand::Reference => {
            print!("{}", config::reference_markdown());
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::Schema => {
            println!("{}", serde_json::to_string_pretty(&config::json_schema())?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn validate_report(files: &[PathBuf], err: Option<Error>, json: bool) -> ExitCode {
    let errors: Vec<&Error> = err.as_ref().map(|e| e.iter().collect()).unwrap_or_default();
    if json {
        let list: Vec<_> = errors
            .iter()
            .map(|e| {
                let origin = e.located().map_or(Origin::Unknown, |l| l.origin.clone());
                json!({ "kind": e.kind_name(), "key": e.key(), "origin": origin, "message": e.to_string() })
            })
            .collect();
        let report = json!({ "files": files, "valid": errors.is_empty(), "errors": list });
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else if errors.is_empty() {
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        println!("valid: {}", names.join(", "));
    } else {
        for e in &errors {
            eprintln!("error: {e}");
        }
        eprintln!("{} error(s); the configuration is invalid", errors.len());
    }
    if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(code::INVALID)
    }
}
