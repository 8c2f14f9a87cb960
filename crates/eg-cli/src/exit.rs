//! Exit codes and error reports of `eg`.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | internal error (a bug: please report it) |
//! | 2 | usage error or invalid configuration (`eg config validate` exits 2 on invalid files) |
//! | 3 | hardware detection failed |
//! | 4 | data error |
//! | 5 | model error |
//! | 6 | training error |
//! | 7 | memory planning error (the run cannot fit) |
//! | 8 | distributed-training error |
//! | 9 | monitoring/logging set-up error |
//! | 10 | export error |
//! | 11 | the feature is not built yet or disabled in this build |
//!
//! The report prints the error and its chain of causes; with `EG_BACKTRACE=1` it also prints a
//! backtrace.

use std::process::ExitCode;

use elastic_guardian as eg;

/// A command that exists in the interface but is not built yet.
#[derive(Debug, thiserror::Error)]
#[error("{what} is not built yet; see the README's status table")]
pub(crate) struct Unsupported {
    /// What was asked for.
    pub(crate) what: &'static str,
}

/// Exit codes, as documented in the module docs and the README.
pub(crate) mod code {
    pub(crate) const INTERNAL: u8 = 1;
    pub(crate) const INVALID: u8 = 2;
    pub(crate) const HARDWARE: u8 = 3;
    pub(crate) const DATA: u8 = 4;
    pub(crate) const MODEL: u8 = 5;
    pub(crate) const TRAIN: u8 = 6;
    pub(crate) const MEMORY: u8 = 7;
    pub(crate) const DIST: u8 = 8;
    pub(crate) const MONITOR: u8 = 9;
    pub(crate) const EXPORT: u8 = 10;
    pub(crate) const UNSUPPORTED: u8 = 11;
}

fn layer_code(e: &eg::Error) -> u8 {
    match e {
        eg::Error::Config(_) => code::INVALID,
        eg::Error::Hardware(_) => code::HARDWARE,
        eg::Error::Memory(_) => code::MEMORY,
        eg::Error::Data(_) => code::DATA,
        eg::Error::Model(_) => code::MODEL,
        eg::Error::Kernel(_) => code::TRAIN,
        eg::Error::Dist(_) => code::DIST,
        eg::Error::Monitor(_) => code::MONITOR,
        eg::Error::Export(_) => code::EXPORT,
        _ => code::INTERNAL,
    }
}

/// The exit code for an error: the first error in the chain that we recognise decides.
pub(crate) fn code_of(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if cause.downcast_ref::<Unsupported>().is_some() {
            return code::UNSUPPORTED;
        }
        if let Some(e) = cause.downcast_ref::<eg::Error>() {
            return layer_code(e);
        }
        if cause.downcast_ref::<eg::config::Error>().is_some() {
            return code::INVALID;
        }
        if cause.downcast_ref::<eg::hardware::Error>().is_some() {
            return code::HARDWARE;
        }
        if cause.downcast_ref::<eg::memory::Error>().is_some() {
            return code::MEMORY;
        }
        if cause.downcast_ref::<eg::data::Error>().is_some() {
            return code::DATA;
        }
        if cause.downcast_ref::<eg::model::Error>().is_some() {
            return code::MODEL;
        }
        if cause.downcast_ref::<eg::kernel::Error>().is_some() {
            return code::TRAIN;
        }
        if cause.downcast_ref::<eg::dist::Error>().is_some() {
            return code::DIST;
        }
        if cause.downcast_ref::<eg::monitor::Error>().is_some() {
            return code::MONITOR;
        }
        if cause.downcast_ref::<eg::export::Error>().is_some() {
            return code::EXPORT;
        }
    }
    code::INTERNAL
}

/// Prints the error with its causes (and a backtrace with `EG_BACKTRACE=1`); returns the exit
/// code.
pub(crate) fn report(err: &anyhow::Error) -> ExitCode {
    eprintln!("error: {err}");
    for cause in err.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    if eg::config::env::backtrace_enabled() {
        eprintln!(
            "backtrace (where the error was reported):\n{}",
            std::backtrace::Backtrace::force_capture()
        );
    }
    ExitCode::from(code_of(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_layer() {
        let cfg = eg::config::Sources::new()
            .set("train.max_steps=0")
            .load()
            .unwrap_err();
        assert_eq!(code_of(&anyhow::Error::new(cfg)), code::INVALID);
        let wrapped = anyhow::Error::new(Unsupported { what: "x" }).context("while starting");
        assert_eq!(code_of(&wrapped), code::UNSUPPORTED);
        assert_eq!(code_of(&anyhow::anyhow!("plain")), code::INTERNAL);
    }
}
