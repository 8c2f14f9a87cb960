//! File helpers: hashing and atomic placement.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// The sha256 (lower-case hex) and size in bytes of a file.
pub(crate) fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// Moves a finished file from a staging location to `dest` atomically: the
/// data is synced, the file renamed (both paths must be on one file system)
/// and the directory synced, so `dest` is either absent, old, or complete.
pub(crate) fn persist(staged: &Path, dest: &Path) -> Result<()> {
    File::open(staged)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {}", staged.display()))?;
    let parent = dest
        .parent()
        .with_context(|| format!("{} has no parent directory", dest.display()))?;
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    fs::rename(staged, dest)
        .with_context(|| format!("cannot move {} to {}", staged.display(), dest.display()))?;
    sync_dir(parent)
}

/// Writes `bytes` to `dest` atomically (temporary name, sync, rename, sync dir).
pub(crate) fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let parent = dest
        .parent()
        .with_context(|| format!("{} has no parent directory", dest.display()))?;
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let name = dest
        .file_name()
        .with_context(|| format!("{} has no file name", dest.display()))?;
    let tmp = parent.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut file =
        File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    drop(file);
    fs::rename(&tmp, dest)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), dest.display()))?;
    sync_dir(parent)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))
}

/// All regular files below `dir`, as paths relative to it with `/`, sorted.
pub(crate) fn walk_files(dir: &Path) -> Result<Vec<String>> {
    fn go(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        let entries =
            fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                go(base, &path, out)?;
            } else if kind.is_file() {
                let rel = path.strip_prefix(base)?;
                let parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    go(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// A human size: `92.9 MB`.
pub(crate) fn human(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)] // display only
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_persist_walk_and_hash() {
        let dir = std::env::temp_dir().join(format!("xtask-fsutil-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        write_atomic(&dir.join("a/b.txt"), b"abc").unwrap();
        fs::write(dir.join("staged"), b"").unwrap();
        persist(&dir.join("staged"), &dir.join("c/d/e")).unwrap();
        assert_eq!(walk_files(&dir).unwrap(), ["a/b.txt", "c/d/e"]);
        let (sha, size) = sha256_file(&dir.join("a/b.txt")).unwrap();
        assert_eq!(size, 3);
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(53), "53 B");
        assert_eq!(human(92_871_040), "92.9 MB");
    }
}
