//! `eg`: the Elastic-Guardian command line.
//!
//! Each subcommand lives in its own module; `main` parses arguments, sets up logging, runs the
//! command and maps errors to the documented exit codes (see [`exit`]).

mod augment;
mod config_cmd;
mod data_cmd;
mod exit;
mod hw;
mod model_cmd;
mod plan;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use elastic_guardian::config;
use elastic_guardian::monitor::logging::{self, ColorMode, LogSettings};

/// Train and fine-tune transformer language models without crashing or losing work.
#[derive(Debug, Parser)]
#[command(name = "eg", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Log filter in RUST_LOG syntax (the EG_LOG variable wins over the config; this flag wins
    /// over both), e.g. `info,eg_kernel=debug`.
    #[arg(long, global = true, value_name = "FILTER")]
    log: Option<String>,
    /// Console colour: auto, always or never (NO_COLOR is honoured).
    #[arg(long, global = true, value_name = "WHEN", default_value = "auto")]
    color: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check, show and describe configuration files.
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
    /// Train tokenizers and prepare token shards.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Report this machine's hardware (CPU, memory, GPUs, storage, thermal, power).
    Hw(hw::HwArgs),
    /// Inspect models and manage the local model registry.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// Show which memory strategies fit (micro-batch, checkpointing, offload) before a run.
    Plan(plan::PlanArgs),
    /// Train a model (with no arguments: a small Llama on a generated corpus, offline).
    Train(train::TrainArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let color = match cli.color.as_str() {
        _ if config::env::no_color() => ColorMode::Never,
        "always" => ColorMode::Always,
        "never" => ColorMode::Never,
        _ => ColorMode::Auto,
    };
    let filter = cli
        .log
        .clone()
        .or_else(config::env::log_filter)
        .unwrap_or_else(|| "warn".into());
    let settings = LogSettings {
        filter,
        color,
        json_file: None,
        span_durations: false,
    };
    let _guard = match logging::init(&settings) {
        Ok(g) => Some(g),
        Err(e) => {
            let code = exit::report(&anyhow::Error::new(e));
            return code;
        }
    };
    let result = match cli.command {
        Command::Config(cmd) => config_cmd::run(cmd),
        Command::Data(cmd) => data_cmd::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Hw(args) => hw::run(args).map(|()| ExitCode::SUCCESS),
        Command::Model(cmd) => model_cmd::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Plan(args) => plan::run(args),
        Command::Train(args) => train(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => exit::report(&e),
    }
}

fn train(args: train::TrainArgs) -> anyhow::Result<ExitCode> {
    train::run(args)
}
