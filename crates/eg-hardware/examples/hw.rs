//! Runs the `eg hw` subcommand (`crates/eg-cli/src/hw.rs`) straight from this crate, so the
//! command can be built, tested and timed without building every layer of the CLI:
//!
//! ```text
//! cargo run --release -p eg-hardware --example hw -- --probe
//! ```

// `hw.rs` names the facade path `elastic_guardian::hardware`; here the facade is this crate.
extern crate self as elastic_guardian;
pub(crate) use eg_hardware as hardware;

#[path = "../../eg-cli/src/hw.rs"]
mod hw;

use clap::Parser as _;

/// `eg hw`, standalone.
#[derive(Debug, clap::Parser)]
#[command(name = "eg-hw")]
struct Cli {
    #[command(flatten)]
    args: hw::HwArgs,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .init();
    hw::run(Cli::parse().args)
}
