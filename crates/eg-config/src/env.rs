//! The process environment: the only place in the workspace that reads it.
//!
//! Configuration variables (`EG_SECTION__KEY`) are read by [`crate::Sources::process_env`].
//! The variables here are tool settings that are not configuration keys.

/// `EG_LOG`: a log filter in `RUST_LOG` syntax, overriding `monitor.log`.
pub fn log_filter() -> Option<String> {
    std::env::var("EG_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
}

/// `EG_BACKTRACE=1`: print backtraces with errors.
pub fn backtrace_enabled() -> bool {
    std::env::var("EG_BACKTRACE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// `NO_COLOR`: the user asked for no colour (<https://no-color.org>).
pub fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

/// Where Elastic-Guardian keeps per-user data (the model registry): `EG_HOME`, else
/// `$XDG_DATA_HOME/elastic-guardian`, else `$HOME/.local/share/elastic-guardian`.
pub fn data_home() -> Option<std::path::PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    };
    var("EG_HOME")
        .or_else(|| var("XDG_DATA_HOME").map(|d| d.join("elastic-guardian")))
        .or_else(|| var("HOME").map(|h| h.join(".local/share/elastic-guardian")))
}

/// The default model registry directory: `<data_home>/registry`.
pub fn default_registry_dir() -> Option<std::path::PathBuf> {
    data_home().map(|d| d.join("registry"))
}
