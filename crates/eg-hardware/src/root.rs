//! Reading the system through a root directory, and collecting warnings.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// The directory that plays the role of `/` for every file this crate reads.
///
/// [`Root::host`] is the running machine. Any other directory is a *fixture tree*: files such
/// as `proc/meminfo` or `sys/fs/cgroup/memory.max` are read below it, and system calls that
/// cannot be redirected (free space with `statvfs`, the CPU affinity mask) are not made, so a
/// fixture reports those values as unknown rather than mixing in numbers from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    path: PathBuf,
    host: bool,
}

impl Root {
    /// A root at `path`. `Root::new("/")` is the same as [`Root::host`].
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let host = path == Path::new("/");
        Self { path, host }
    }

    /// The running machine's own `/`.
    pub fn host() -> Self {
        Self::new("/")
    }

    /// The directory this root points at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this root is the running machine (system calls are then allowed).
    pub fn is_host(&self) -> bool {
        self.host
    }

    /// The location of the absolute system path `abs` (e.g. `/proc/meminfo`) under this root.
    pub fn join(&self, abs: impl AsRef<Path>) -> PathBuf {
        let abs = abs.as_ref();
        let rel = abs.strip_prefix("/").unwrap_or(abs);
        if self.host {
            Path::new("/").join(rel)
        } else {
            self.path.join(rel)
        }
    }
}

impl Default for Root {
    fn default() -> Self {
        Self::host()
    }
}

/// Collects the warnings of one detection: each is logged with `tracing` and kept for the
/// report, so that "unknown" always comes with a reason.
#[derive(Debug, Default)]
pub(crate) struct Notes {
    pub(crate) warnings: Vec<String>,
}

impl Notes {
    pub(crate) fn warn(&mut self, message: impl Into<String>) {
        let message = message.into();
        tracing::warn!(target: "eg_hardware", "{message}");
        self.warnings.push(message);
    }
}

/// How to treat a file that does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Missing {
    /// Absence is normal (no battery, no cpufreq driver): no warning.
    Quiet,
    /// Absence means a value is unknown: warn.
    Warn,
}

/// Reads a text file under `root`. Returns `None` (with a warning unless the file is missing
/// and `missing` is `Quiet`) when it cannot be read.
pub(crate) fn read(root: &Root, abs: &str, missing: Missing, notes: &mut Notes) -> Option<String> {
    read_path(&root.join(abs), abs, missing, notes)
}

/// Like [`read`], with the full path already computed; `shown` is how the path is named in
/// warnings.
pub(crate) fn read_path(
    path: &Path,
    shown: &str,
    missing: Missing,
    notes: &mut Notes,
) -> Option<String> {
    match std::fs::read(path) {
        Ok(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if missing == Missing::Warn {
                notes.warn(format!("{shown} is missing: value unknown"));
            }
            None
        }
        Err(e) => {
            notes.warn(format!("could not read {shown}: {e}: value unknown"));
            None
        }
    }
}

/// Reads a file holding one unsigned integer (surrounding white space allowed).
pub(crate) fn read_u64(root: &Root, abs: &str, missing: Missing, notes: &mut Notes) -> Option<u64> {
    let text = read(root, abs, missing, notes)?;
    parse_u64(&text, abs, notes)
}

/// Parses one unsigned integer, warning (and returning `None`) on anything else.
pub(crate) fn parse_u64(text: &str, shown: &str, notes: &mut Notes) -> Option<u64> {
    let t = text.trim();
    match t.parse::<u64>() {
        Ok(v) => Some(v),
        Err(_) => {
            notes.warn(format!(
                "{shown}: expected an unsigned integer, found {:?}: value unknown",
                shorten(t)
            ));
            None
        }
    }
}

/// Reads a file holding one line of text, trimmed; empty counts as missing.
pub(crate) fn read_line(
    root: &Root,
    abs: &str,
    missing: Missing,
    notes: &mut Notes,
) -> Option<String> {
    let text = read(root, abs, missing, notes)?;
    let t = text.trim();
    if t.is_empty() {
        None
    } else {
        Some(t.to_owned())
    }
}

/// Keeps warnings short when a file holds garbage.
pub(crate) fn shorten(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head}…")
    }
}

/// Sorted names of the entries of a directory under `root`; empty when it does not exist.
pub(crate) fn list_dir(root: &Root, abs: &str, notes: &mut Notes) -> Vec<String> {
    let path = root.join(abs);
    match std::fs::read_dir(&path) {
        Ok(rd) => {
            let mut names: Vec<String> = rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort_by(|a, b| natural_cmp(a, b));
            names
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            notes.warn(format!("could not list {abs}: {e}"));
            Vec::new()
        }
    }
}

/// Orders `hwmon2` before `hwmon10`.
pub(crate) fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let split = |s: &str| {
        let digits = s.len() - s.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        let (head, tail) = s.split_at(s.len() - digits);
        (head.to_owned(), tail.parse::<u64>().ok())
    };
    let (ha, na) = split(a);
    let (hb, nb) = split(b);
    ha.cmp(&hb).then(na.cmp(&nb)).then(a.cmp(b))
}

/// Counts the CPUs in a kernel CPU list such as `0-3,8,10-11`. `None` when malformed.
pub(crate) fn count_cpu_list(list: &str) -> Option<u32> {
    let list = list.trim();
    if list.is_empty() {
        return Some(0);
    }
    let mut n: u32 = 0;
    for part in list.split(',') {
        let part = part.trim();
        match part.split_once('-') {
            Some((a, b)) => {
                let a: u32 = a.trim().parse().ok()?;
                let b: u32 = b.trim().parse().ok()?;
                if b < a {
                    return None;
                }
                n = n.checked_add(b - a + 1)?;
            }
            None => {
                let _: u32 = part.parse().ok()?;
                n = n.checked_add(1)?;
            }
        }
    }
    Some(n)
}

/// Expands a kernel CPU list into CPU numbers. `None` when malformed.
pub(crate) fn expand_cpu_list(list: &str) -> Option<Vec<u32>> {
    let list = list.trim();
    let mut out = Vec::new();
    if list.is_empty() {
        return Some(out);
    }
    for part in list.split(',') {
        let part = part.trim();
        match part.split_once('-') {
            Some((a, b)) => {
                let a: u32 = a.trim().parse().ok()?;
                let b: u32 = b.trim().parse().ok()?;
                if b < a || b - a > 1 << 16 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("x"), None);
        assert_eq!(expand_cpu_list("0-2,5"), Some(vec![0, 1, 2, 5]));
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["hwmon10", "hwmon2", "hwmon1"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["hwmon1", "hwmon2", "hwmon10"]);
    }

    #[test]
    fn garbage_is_unknown_with_warning() {
        let mut notes = Notes::default();
        assert_eq!(parse_u64("12x", "/f", &mut notes), None);
        assert_eq!(notes.warnings.len(), 1);
        assert_eq!(parse_u64(" 42\n", "/f", &mut notes), Some(42));
    }

    #[test]
    fn join_strips_leading_slash() {
        let r = Root::new("/tmp/fx");
        assert_eq!(
            r.join("/proc/meminfo"),
            PathBuf::from("/tmp/fx/proc/meminfo")
        );
        assert!(Root::new("/").is_host());
        assert!(!r.is_host());
    }
}
