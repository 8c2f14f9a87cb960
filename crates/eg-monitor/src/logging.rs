//! One logging set-up for the `eg` binary and for library users.

use std::fs::{File, OpenOptions};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Registry};

use crate::{Error, Result};

/// When the console output is coloured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ColorMode {
    /// When stderr is a terminal.
    #[default]
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

impl From<eg_config::wire::Color> for ColorMode {
    fn from(c: eg_config::wire::Color) -> Self {
        match c {
            eg_config::wire::Color::Always => ColorMode::Always,
            eg_config::wire::Color::Never => ColorMode::Never,
            _ => ColorMode::Auto,
        }
    }
}

/// How to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// `RUST_LOG`-style filter, e.g. `info,eg_kernel=debug`.
    pub filter: String,
    /// Console colour.
    pub color: ColorMode,
    /// Also write JSON lines to this file (parent directories are created).
    pub json_file: Option<PathBuf>,
    /// Report each span's duration when it closes.
    pub span_durations: bool,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            filter: "info".into(),
            color: ColorMode::Auto,
            json_file: None,
            span_durations: false,
        }
    }
}

impl LogSettings {
    /// Settings from a validated config's `[monitor]` section. `env_filter` (the `EG_LOG`
    /// variable, read by the caller through `eg_config::env`) wins over `monitor.log`.
    pub fn from_config(monitor: &eg_config::MonitorConfig, env_filter: Option<String>) -> Self {
        LogSettings {
            filter: env_filter.unwrap_or_else(|| monitor.log.clone()),
            color: monitor.color.into(),
            json_file: monitor.json_log.clone(),
            span_durations: true,
        }
    }
}

/// Keeps the JSON log file flushed; dropping it flushes once more.
#[derive(Debug)]
pub struct LogGuard {
    file: Option<Arc<Mutex<File>>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some(f) = &self.file
            && let Ok(f) = f.lock()
        {
            let _ = f.sync_data();
        }
    }
}

/// Parses a filter, naming it in the error.
pub fn parse_filter(filter: &str) -> Result<EnvFilter> {
    EnvFilter::builder()
        .parse(filter)
        .map_err(|e| Error::LogFilter {
            filter: filter.to_string(),
            reason: e.to_string(),
        })
}

fn open_json(path: &Path) -> Result<File> {
    let err = |source| Error::LogFile {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)
}

/// Builds the subscriber without installing it (for tests and for embedding with
/// `tracing::subscriber::with_default`).
pub fn subscriber(
    settings: &LogSettings,
) -> Result<(impl tracing::Subscriber + Send + Sync, LogGuard)> {
    let ansi = match settings.color {
        ColorMode::Always => true,
        ColorMode::Never => false,
        ColorMode::Auto => std::io::stderr().is_terminal(),
    };
    let spans = if settings.span_durations {
        FmtSpan::CLOSE
    } else {
        FmtSpan::NONE
    };
    let console = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(true)
        .with_span_events(spans.clone())
        .with_filter(parse_filter(&settings.filter)?);
    let (json, file) = match &settings.json_file {
        Some(path) => {
            let file = Arc::new(Mutex::new(open_json(path)?));
            let layer = tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .with_span_events(spans)
                .with_writer(SharedFile(file.clone()))
                .with_filter(parse_filter(&settings.filter)?);
            (Some(layer), Some(file))
        }
        None => (None, None),
    };
    let subscriber = Registry::default().with(console).with(json);
    Ok((subscriber, LogGuard { file }))
}

/// Installs the global subscriber. Call once, early in `main`.
pub fn init(settings: &LogSettings) -> Result<LogGuard> {
    let (subscriber, guard) = subscriber(settings)?;
    tracing::subscriber::set_global_default(subscriber).map_err(|_| Error::AlreadyInitialized)?;
    Ok(guard)
}

/// A file shared by the JSON layer's writers.
#[derive(Clone)]
struct SharedFile(Arc<Mutex<File>>);

impl std::io::Write for SharedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.lock() {
            Ok(mut f) => f.write(buf),
            Err(p) => p.into_inner().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.0.lock() {
            Ok(mut f) => f.flush(),
            Err(p) => p.into_inner().flush(),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SharedFile {
    type Writer = SharedFile;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_carry_fields_spans_and_per_module_levels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/eg.jsonl");
        let settings = LogSettings {
            filter: "warn,eg_monitor=debug".into(),
            color: ColorMode::Never,
            json_file: Some(path.clone()),
            span_durations: true,
        };
        let (sub, guard) = subscriber(&settings).unwrap();
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("step", n = 3);
            let _e = span.enter();
            tracing::debug!(loss = 1.5, "inside");
            tracing::debug!(target: "other_crate", "filtered out");
        });
        drop(guard);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let event = lines
            .iter()
            .find(|v| v["fields"]["message"] == "inside")
            .expect("event logged");
        assert_eq!(event["fields"]["loss"], 1.5);
        assert_eq!(event["span"]["name"], "step");
        assert!(!text.contains("filtered out"));
        // The span's close event carries its duration.
        assert!(
            lines
                .iter()
                .any(|v| v["fields"]["message"] == "close" && v["fields"]["time.busy"].is_string()),
            "{text}"
        );
    }

    #[test]
    fn bad_filter_is_named() {
        let err = parse_filter("info,eg=loud").unwrap_err();
        assert!(err.to_string().contains("info,eg=loud"), "{err}");
    }

    #[test]
    fn unwritable_log_file_is_an_error() {
        let settings = LogSettings {
            json_file: Some("/proc/eg-cannot/x.jsonl".into()),
            ..LogSettings::default()
        };
        assert!(matches!(
            subscriber(&settings).map(|_| ()),
            Err(Error::LogFile { .. })
        ));
    }
}
