//! A local model registry: named, versioned copies of model directories with checksums.
//!
//! Layout: `<root>/<name>/<version>/` holds the model's files and `registry.json`, the
//! manifest (name, version, source, each file's size and sha256, and the model's
//! `config.json`). The manifest is written last and atomically, so a half-copied entry has
//! none and is not listed. Loading by `name@version` verifies every checksum first.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::safetensors::write_atomic;
use crate::{Error, Result};

/// Name of the manifest inside an entry.
pub const MANIFEST: &str = "registry.json";

/// One file of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Size in bytes.
    pub bytes: u64,
    /// Lower-case hex sha256.
    pub sha256: String,
}

/// A registry entry's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Where it came from (free text: a path, a hub id, ...).
    pub source: String,
    /// Files by relative path.
    pub files: BTreeMap<String, FileRecord>,
    /// The model's `config.json`, if it has one.
    pub config: Option<serde_json::Value>,
}

/// A registry rooted at a directory.
#[derive(Debug, Clone)]
pub struct Registry {
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn valid_component(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Streams a file through sha256.
pub fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(io(path))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((n, hex))
}

impl Registry {
    /// A registry at `root` (created on the first [`Registry::add`]).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn entry_dir(&self, name: &str, version: &str) -> Result<PathBuf> {
        for (field, v) in [("name", name), ("version", version)] {
            if !valid_component(v) {
                return Err(Error::InvalidRegistryName {
                    field,
                    value: v.to_string(),
                });
            }
        }
        Ok(self.root.join(name).join(version))
    }

    /// Copies the regular files of `source_dir` (not subdirectories) into the registry as
    /// `name@version`, recording sizes and checksums. An existing entry is an error.
    pub fn add(&self, name: &str, version: &str, source_dir: &Path, source: &str) -> Result<Entry> {
        let dir = self.entry_dir(name, version)?;
        if dir.join(MANIFEST).exists() {
            return Err(Error::RegistryEntryExists {
                name: name.to_string(),
                version: version.to_string(),
            });
        }
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut files = BTreeMap::new();
        let mut names: Vec<PathBuf> = std::fs::read_dir(source_dir)
            .map_err(io(source_dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        names.sort();
        for src in names {
            let Some(file_name) = src.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            let dst = dir.join(&file_name);
            write_atomic(&dst, |w| {
                let mut f = std::fs::File::open(&src)?;
                std::io::copy(&mut f, w)?;
                Ok(())
            })?;
            let (bytes, sha256) = sha256_file(&dst)?;
            files.insert(file_name, FileRecord { bytes, sha256 });
        }
        let config = match std::fs::read_to_string(dir.join("config.json")) {
            Ok(text) => serde_json::from_str(&text).ok(),
            Err(_) => None,
        };
        let entry = Entry {
            name: name.to_string(),
            version: version.to_string(),
            source: source.to_string(),
            files,
            config,
        };
        let text = serde_json::to_string_pretty(&entry).map_err(Error::Json)?;
        write_atomic(&dir.join(MANIFEST), |w| {
            std::io::Write::write_all(w, text.as_bytes())
        })?;
        Ok(entry)
    }

    /// Every complete entry, sorted by name then version.
    pub fn list(&self) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let Ok(names) = std::fs::read_dir(&self.root) else {
            return Ok(out);
        };
        for n in names.flatten() {
            let Ok(versions) = std::fs::read_dir(n.path()) else {
                continue;
            };
            for v in versions.flatten() {
                let m = v.path().join(MANIFEST);
                if m.is_file() {
                    out.push(read_manifest(&m)?);
                }
            }
        }
        out.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
        Ok(out)
    }

    /// The entry for `name@version`, or `name` alone when it has exactly one version.
    pub fn show(&self, spec: &str) -> Result<Entry> {
        let (name, version) = match spec.split_once('@') {
            Some((n, v)) => (n, Some(v)),
            None => (spec, None),
        };
        let versions: Vec<Entry> = self
            .list()?
            .into_iter()
            .filter(|e| e.name == name)
            .collect();
        let available = || versions.iter().map(|e| e.version.clone()).collect();
        match version {
            Some(v) => versions
                .iter()
                .find(|e| e.version == v)
                .cloned()
                .ok_or_else(|| Error::RegistryEntryNotFound {
                    spec: spec.to_string(),
                    available: available(),
                }),
            None if versions.len() == 1 => Ok(versions[0].clone()),
            None => Err(Error::RegistryEntryNotFound {
                spec: spec.to_string(),
                available: available(),
            }),
        }
    }

    /// The directory of `spec` after checking every file's size and sha256.
    pub fn resolve(&self, spec: &str) -> Result<PathBuf> {
        let entry = self.show(spec)?;
        let dir = self.entry_dir(&entry.name, &entry.version)?;
        for (file, rec) in &entry.files {
            let (bytes, sha256) = sha256_file(&dir.join(file))?;
            if bytes != rec.bytes || sha256 != rec.sha256 {
                return Err(Error::ChecksumMismatch {
                    file: dir.join(file),
                    expected: rec.sha256.clone(),
                    found: sha256,
                });
            }
        }
        Ok(dir)
    }
}

fn read_manifest(path: &Path) -> Result<Entry> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|source| Error::ConfigParse {
        path: path.to_path_buf(),
        source,
    })
}
