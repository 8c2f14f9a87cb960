//! Configuration errors: each names the key path, where the value came from and what is allowed.

use std::fmt;
use std::path::PathBuf;

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Origin {
    /// The built-in default.
    Default,
    /// A configuration file, with the line of the key where it could be found.
    File {
        /// The file.
        path: PathBuf,
        /// 1-based line of the key, when it could be located.
        line: Option<usize>,
    },
    /// An `EG_` environment variable.
    Env {
        /// The variable's name, e.g. `EG_TRAIN__OPTIMIZER__LR`.
        var: String,
    },
    /// A `--set key.path=value` override.
    Set {
        /// The argument as given, e.g. `train.optimizer.lr=3e-4`.
        arg: String,
    },
    /// The key is not set by any layer and has no default.
    NotSet,
    /// The value's origin is not known (for example a key of no known section).
    Unknown,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("built-in default"),
            Origin::File {
                path,
                line: Some(l),
            } => write!(f, "{}:{l}", path.display()),
            Origin::File { path, line: None } => write!(f, "{}", path.display()),
            Origin::Env { var } => write!(f, "environment variable {var}"),
            Origin::Set { arg } => write!(f, "--set {arg}"),
            Origin::NotSet => f.write_str("not set"),
            Origin::Unknown => f.write_str("unknown source"),
        }
    }
}

/// A key path together with the origin of its value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Located {
    /// Dotted key path, e.g. `train.optimizer.lr`.
    pub key: String,
    /// Where the value came from.
    pub origin: Origin,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.origin {
            Origin::NotSet => write!(f, "`{}` (not set)", self.key),
            _ => write!(f, "`{}` (from {})", self.key, self.origin),
        }
    }
}

/// Errors of configuration loading and validation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A configuration file's extension does not name a supported format.
    #[error(
        "config file {path}: unsupported extension {extension:?}; allowed: .toml, .yaml, .yml, .json"
    )]
    UnsupportedFormat {
        /// The file.
        path: PathBuf,
        /// The extension found (empty when there is none).
        extension: String,
    },
    /// A configuration file is larger than the loader accepts.
    #[error("config file {path} is {size} bytes; config files may be at most {limit} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A configuration file is not valid UTF-8 text.
    #[error(
        "config file {path} is not UTF-8 text (invalid byte at offset {offset}, line {line}); save it as UTF-8"
    )]
    Encoding {
        /// The file.
        path: PathBuf,
        /// Byte offset of the first invalid byte.
        offset: usize,
        /// 1-based line of that byte.
        line: usize,
    },
    /// A configuration file does not parse.
    #[error("config file {path}:{}: {format} syntax error: {message}", line.map_or_else(|| "?".to_string(), |l| l.to_string()))]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The format (TOML, YAML, JSON).
        format: &'static str,
        /// 1-based line, when the parser reports it.
        line: Option<usize>,
        /// The parser's message.
        message: String,
    },
    /// A configuration file's top level is not a table/mapping.
    #[error(
        "config file {path}: the top level must be a table of sections (run, train, ...), found {found}"
    )]
    NotATable {
        /// The file.
        path: PathBuf,
        /// What was found instead.
        found: String,
    },
    /// `extends` chains form a cycle or are too deep.
    #[error("config file {path}: `extends` {problem}: {}", chain.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" -> "))]
    Extends {
        /// The file whose `extends` failed.
        path: PathBuf,
        /// What is wrong (`forms a cycle`, `is nested too deeply`, ...).
        problem: &'static str,
        /// The chain of files that led here.
        chain: Vec<PathBuf>,
    },
    /// A `--set` argument is malformed.
    #[error("--set {arg}: {problem}; expected `key.path=value`, e.g. `train.optimizer.lr=3e-4`")]
    BadOverride {
        /// The argument as given.
        arg: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// An `EG_` environment variable cannot be mapped to a key.
    #[error(
        "environment variable {var}: {problem}; config variables look like EG_SECTION__KEY, e.g. EG_TRAIN__MAX_STEPS=100"
    )]
    BadEnv {
        /// The variable's name.
        var: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A key that no section has.
    #[error("unknown key {at}{}; allowed here: {}", suggestion.as_ref().map(|s| format!("; did you mean `{s}`?")).unwrap_or_default(), allowed.join(", "))]
    UnknownKey {
        /// The key and where it came from.
        at: Located,
        /// The closest allowed key, if one is close.
        suggestion: Option<String>,
        /// The keys allowed at that level.
        allowed: Vec<String>,
    },
    /// A value of the wrong type.
    #[error("wrong type for {at}: found {found}, expected {expected}")]
    WrongType {
        /// The key and where it came from.
        at: Located,
        /// What was found.
        found: String,
        /// What is expected.
        expected: String,
    },
    /// A value that is not one of the allowed ones.
    #[error("invalid value for {at}: {found}; allowed: {allowed}{}", suggestion.as_ref().map(|s| format!("; did you mean `{s}`?")).unwrap_or_default())]
    InvalidValue {
        /// The key and where it came from.
        at: Located,
        /// What was found.
        found: String,
        /// What is allowed.
        allowed: String,
        /// The closest allowed value, if one is close.
        suggestion: Option<String>,
    },
    /// A number outside its allowed range (including NaN and infinities).
    #[error("out of range for {at}: {found}; allowed: {allowed}")]
    OutOfRange {
        /// The key and where it came from.
        at: Located,
        /// What was found.
        found: String,
        /// The allowed range.
        allowed: String,
    },
    /// A required value is absent.
    #[error("missing value for {at}: {why}")]
    Missing {
        /// The key and where its section came from.
        at: Located,
        /// Why it is needed.
        why: &'static str,
    },
    /// Two settings that cannot hold together.
    #[error("{first} contradicts {second}: {why}")]
    Conflict {
        /// The first key.
        first: Located,
        /// The second key.
        second: Located,
        /// Why they contradict, and how to resolve it.
        why: &'static str,
    },
    /// Several errors found in one pass (validation reports all it finds).
    #[error("{} configuration errors:\n{}", .0.len(), .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Many(Vec<Error>),
}

impl Error {
    /// The individual errors: `Many` flattened, any other error as itself.
    pub fn iter(&self) -> Box<dyn Iterator<Item = &Error> + '_> {
        match self {
            Error::Many(v) => Box::new(v.iter().flat_map(|e| e.iter())),
            other => Box::new(std::iter::once(other)),
        }
    }

    /// The key this error is about, when it is about one key.
    pub fn key(&self) -> Option<&str> {
        self.located().map(|l| l.key.as_str())
    }

    /// The key and origin this error is about, when it is about one key.
    pub fn located(&self) -> Option<&Located> {
        match self {
            Error::UnknownKey { at, .. }
            | Error::WrongType { at, .. }
            | Error::InvalidValue { at, .. }
            | Error::OutOfRange { at, .. }
            | Error::Missing { at, .. } => Some(at),
            Error::Conflict { first, .. } => Some(first),
            _ => None,
        }
    }

    /// A short stable name of the error kind, for tools (`eg config validate --json`).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::UnsupportedFormat { .. } => "unsupported-format",
            Error::TooLarge { .. } => "too-large",
            Error::Encoding { .. } => "encoding",
            Error::Syntax { .. } => "syntax",
            Error::NotATable { .. } => "not-a-table",
            Error::Extends { .. } => "extends",
            Error::BadOverride { .. } => "bad-override",
            Error::BadEnv { .. } => "bad-env",
            Error::UnknownKey { .. } => "unknown-key",
            Error::WrongType { .. } => "wrong-type",
            Error::InvalidValue { .. } => "invalid-value",
            Error::OutOfRange { .. } => "out-of-range",
            Error::Missing { .. } => "missing",
            Error::Conflict { .. } => "conflict",
            Error::Many(_) => "many",
        }
    }

    /// Combines a list of errors: none → `Ok`, one → itself, several → `Many`.
    pub(crate) fn from_list(mut errors: Vec<Error>) -> Result<(), Error> {
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(Error::Many(errors)),
        }
    }
}

/// The closest candidate to `word`, if it is close enough to be a likely typo.
pub(crate) fn did_you_mean<'a, I>(word: &str, candidates: I) -> Option<String>
where
    I: IntoIterator<Item = &'a str>,
{
    let word_l = word.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|c| {
            (
                strsim::normalized_damerau_levenshtein(&word_l, &c.to_ascii_lowercase()),
                c,
            )
        })
        .filter(|(score, _)| *score >= 0.6)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(
            did_you_mean("lrr", ["lr", "eps", "betas"]).as_deref(),
            Some("lr")
        );
        assert_eq!(
            did_you_mean("max_step", ["max_steps", "mode"]).as_deref(),
            Some("max_steps")
        );
        assert_eq!(did_you_mean("zzzzzz", ["lr", "eps"]), None);
    }
}
