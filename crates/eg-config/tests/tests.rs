//! Integration tests of eg-config: bad configurations, precedence, hostile input, `extends`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod bad_configs;
mod hostile;
mod precedence;

use std::path::{Path, PathBuf};

use eg_config::{Error, Origin, Sources};

/// A temporary directory with config files in it.
pub(crate) struct Dir(tempfile::TempDir);

impl Dir {
    pub(crate) fn new() -> Self {
        Dir(tempfile::tempdir().expect("tempdir"))
    }

    pub(crate) fn write(&self, name: &str, text: &str) -> PathBuf {
        self.write_bytes(name, text.as_bytes())
    }

    pub(crate) fn write_bytes(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.path().join(name);
        std::fs::write(&p, bytes).expect("write fixture");
        p
    }

    pub(crate) fn path(&self) -> &Path {
        self.0.path()
    }
}

/// Loads one file and returns its single error (panics when there is none or several).
pub(crate) fn file_error(name: &str, text: &str) -> (Error, PathBuf) {
    let dir = Dir::new();
    let path = dir.write(name, text);
    let err = Sources::new()
        .file(&path)
        .load()
        .expect_err("config should be invalid");
    (single(err), path)
}

/// The only error in `err`.
pub(crate) fn single(err: Error) -> Error {
    match err {
        Error::Many(v) => panic!("expected one error, got {}: {v:#?}", v.len()),
        e => e,
    }
}

/// Asserts the error is about `key`, from `origin`, and that its message contains `words`.
#[track_caller]
pub(crate) fn assert_error(err: &Error, key: &str, origin: &Origin, words: &[&str]) {
    let located = err
        .located()
        .unwrap_or_else(|| panic!("error has no key: {err}"));
    assert_eq!(located.key, key, "key of: {err}");
    assert_eq!(&located.origin, origin, "origin of: {err}");
    let msg = err.to_string();
    for w in words {
        assert!(msg.contains(w), "message {msg:?} should contain {w:?}");
    }
}

pub(crate) fn at_file(path: &Path, line: usize) -> Origin {
    Origin::File {
        path: path.to_path_buf(),
        line: Some(line),
    }
}
