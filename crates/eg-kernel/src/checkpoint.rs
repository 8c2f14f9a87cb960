//! Atomic, verified checkpoints: one directory per step.
//!
//! ```text
//! <root>/step-00000050/
//!     model.safetensors      weights (f32)
//!     optimizer.safetensors  optimizer buffers, `t` and the rule in the header metadata
//!     trainer.json           step, counters, spike window, quarantine, threads, ...
//!     cursor.json            the data loader's cursor (eg-data)
//!     config.toml            the resolved configuration (when known)
//!     manifest.json          sha256 and size of every file above; written last
//! ```
//!
//! A checkpoint is written into `<root>/.tmp-step-…-<pid>/` (each file synced), renamed into
//! place and the root synced, so a crash leaves either the whole directory or none of it.
//! [`verify`] rechecks every checksum; [`newest_valid`] walks the steps from newest to oldest,
//! skipping (with a warning naming it) any directory that is incomplete or corrupt.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::io::Write;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fsio::{sha256_file, sync_dir};
use crate::optim::{OptimizerKind, OptimizerState, OptimizerStream};
use crate::{Error, Result};

/// Name of the manifest file.
pub const MANIFEST: &str = "manifest.json";
const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const TRAINER: &str = "trainer.json";
const CURSOR: &str = "cursor.json";
const CONFIG: &str = "config.toml";
const REQUIRED: [&str; 4] = [MODEL, OPTIMIZER, TRAINER, CURSOR];

/// Named f32 buffers: shape and values.
pub type NamedBuffers = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Everything a checkpoint holds, owned (so it can be written on another thread).
#[derive(Debug, Clone)]
pub struct CheckpointData {
    /// Optimizer steps done.
    pub step: u64,
    /// Weights by name: shape and values.
    pub weights: Arc<NamedBuffers>,
    /// Optimizer state.
    pub optimizer: Arc<OptimizerState>,
    /// When set (disk offload), the optimizer buffers are streamed from it instead of taken
    /// from `optimizer.buffers` (same file format).
    pub optimizer_stream: Option<Arc<OptimizerStream>>,
    /// The trainer's state (JSON).
    pub trainer_json: Vec<u8>,
    /// The data cursor (JSON).
    pub cursor_json: Vec<u8>,
    /// The resolved configuration.
    pub config_toml: Option<String>,
    /// Eval loss at this step, when evaluated (used to keep the best checkpoints).
    pub eval_loss: Option<f64>,
    /// Compute threads used (a resume with another count may differ in the last bits).
    pub threads: usize,
}

/// One file in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Hex sha256 of the contents.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// The manifest of a checkpoint directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version.
    pub format: u32,
    /// Optimizer steps done.
    pub step: u64,
    /// Compute threads of the run that wrote it.
    pub threads: usize,
    /// Eval loss at this step, if evaluated.
    pub eval_loss: Option<f64>,
    /// Files and their checksums.
    pub files: BTreeMap<String, FileEntry>,
}

/// The directory name of step `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The entries of `buffers`.
fn buffer_entries(buffers: &NamedBuffers) -> Entries<'_> {
    buffers
        .iter()
        .map(|(n, (shape, v))| (n.as_str(), shape.as_slice(), v.len()))
        .collect()
}

/// A [`Fill`] passing the values of `buffers` (entries in name order).
fn buffer_fill<'a>(
    path: &'a Path,
    buffers: &'a NamedBuffers,
) -> impl FnMut(usize, &mut Sink<'_>) -> Result<()> + 'a {
    let values: Vec<&[f32]> = buffers.values().map(|(_, v)| v.as_slice()).collect();
    move |i, sink| {
        let v = values.get(i).copied().unwrap_or_default();
        for chunk in v.chunks(1 << 16) {
            sink(chunk).map_err(Error::io(path))?;
        }
        Ok(())
    }
}

/// Takes the values of an entry, piece by piece.
type Sink<'s> = dyn FnMut(&[f32]) -> std::io::Result<()> + 's;

/// Passes the values of entry `i` to the sink.
type Fill<'a> = dyn FnMut(usize, &mut Sink<'_>) -> Result<()> + 'a;

/// Entries of a safetensors file: name, shape, elements; in name order.
type Entries<'a> = Vec<(&'a str, &'a [usize], usize)>;

/// The start of a safetensors file: the header's length (8 bytes) and the header, padded
/// to 8 bytes, for entries (name, shape, elements; in name order).
fn safetensors_head(
    entries: &[(&str, &[usize], usize)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".to_string(),
            serde_json::to_value(metadata).map_err(|source| Error::Json {
                what: "safetensors metadata",
                source,
            })?,
        );
    }
    let mut offset = 0usize;
    for &(name, shape, len) in entries {
        let n = len * 4;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut head = serde_json::to_vec(&header).map_err(|source| Error::Json {
        what: "safetensors header",
        source,
    })?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&head);
    Ok(out)
}

/// One pass over a safetensors file's bytes (`head`, then the values `fill` passes for
/// each entry as little-endian f32) into `w`: written to its file, hashed, or both.
fn safetensors_pass(
    path: &Path,
    head: &[u8],
    entries: &[(&str, &[usize], usize)],
    fill: &mut Fill<'_>,
    mut w: Staging,
) -> Result<Staging> {
    let io = |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    w.push_bytes(head).map_err(io)?;
    for (i, &(name, _, len)) in entries.iter().enumerate() {
        let mut written = 0usize;
        fill(i, &mut |v: &[f32]| {
            w.push_f32(v)?;
            written += v.len();
            Ok(())
        })?;
        if written != len {
            return Err(Error::StateMismatch {
                what: format!("{name} written to {}", path.display()),
                expected: format!("{len} values"),
                found: written.to_string(),
            });
        }
    }
    w.flush().map_err(io)?;
    Ok(w)
}

/// Writes a safetensors file (not synced yet): its open file and its size.
fn write_safetensors_unsynced(
    path: &Path,
    head: &[u8],
    entries: &[(&str, &[usize], usize)],
    fill: &mut Fill<'_>,
) -> Result<(std::fs::File, u64)> {
    let file = std::fs::File::create(path).map_err(Error::io(path))?;
    let w = safetensors_pass(
        path,
        head,
        entries,
        fill,
        Staging::new(Some(file), false, WRITE_CHUNK),
    )?;
    match w.file {
        Some(f) => Ok((f, w.bytes)),
        None => Err(Error::io(path)(std::io::Error::other("file lost"))),
    }
}

/// The hex sha256 of the bytes [`write_safetensors_unsynced`] wrote, computed again from
/// the values (in cache-sized pieces: converting them again costs little next to the hash).
fn hash_safetensors(
    path: &Path,
    head: &[u8],
    entries: &[(&str, &[usize], usize)],
    fill: &mut Fill<'_>,
) -> Result<String> {
    let w = safetensors_pass(
        path,
        head,
        entries,
        fill,
        Staging::new(None, true, HASH_CHUNK),
    )?;
    Ok(w.hash
        .map(|h| hex::encode(h.finalize()))
        .unwrap_or_default())
}

/// Bytes staged before each `write`.
const WRITE_CHUNK: usize = 4 << 20;
/// Bytes staged before each hash update in the hashing pass (stays in the L2 cache).
const HASH_CHUNK: usize = 256 << 10;

/// Stages bytes in a buffer and passes each full buffer with one call to the file (when
/// writing) and the hash (when hashing): no second buffer, few system calls.
struct Staging {
    file: Option<std::fs::File>,
    hash: Option<Sha256>,
    bytes: u64,
    buf: Vec<u8>,
    fill: usize,
}

impl Staging {
    fn new(file: Option<std::fs::File>, hash: bool, chunk: usize) -> Self {
        Self {
            file,
            hash: hash.then(Sha256::new),
            bytes: 0,
            buf: vec![0; chunk],
            fill: 0,
        }
    }

    fn push_bytes(&mut self, mut b: &[u8]) -> std::io::Result<()> {
        while !b.is_empty() {
            let n = (self.buf.len() - self.fill).min(b.len());
            self.buf[self.fill..self.fill + n].copy_from_slice(&b[..n]);
            self.fill += n;
            b = &b[n..];
            if self.fill == self.buf.len() {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Appends `v` as little-endian f32 bytes.
    fn push_f32(&mut self, mut v: &[f32]) -> std::io::Result<()> {
        while !v.is_empty() {
            let room = (self.buf.len() - self.fill) / 4;
            if room == 0 {
                self.flush()?;
                continue;
            }
            let (now, later) = v.split_at(room.min(v.len()));
            let dst = &mut self.buf[self.fill..self.fill + 4 * now.len()];
            for (d, x) in dst.chunks_exact_mut(4).zip(now) {
                d.copy_from_slice(&x.to_le_bytes());
            }
            self.fill += 4 * now.len();
            v = later;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let b = &self.buf[..self.fill];
        if let Some(f) = &mut self.file {
            f.write_all(b)?;
        }
        if let Some(h) = &mut self.hash {
            h.update(b);
        }
        self.bytes += b.len() as u64;
        self.fill = 0;
        Ok(())
    }
}

/// Writes a small file (synced) and returns its entry.
fn write_small(path: &Path, bytes: &[u8]) -> Result<FileEntry> {
    let mut f = std::fs::File::create(path).map_err(Error::io(path))?;
    f.write_all(bytes).map_err(Error::io(path))?;
    f.sync_all().map_err(Error::io(path))?;
    Ok(FileEntry {
        sha256: hex::encode(Sha256::digest(bytes)),
        bytes: bytes.len() as u64,
    })
}

/// Writes a checkpoint under `root` atomically and returns its directory.
pub fn save(root: &Path, data: &CheckpointData) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(Error::io(root))?;
    let name = step_dir_name(data.step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(Error::io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(Error::io(&tmp))?;
    let result = (|| {
        let mut files = BTreeMap::new();
        let kind = serde_json::to_string(&data.optimizer.kind).map_err(|source| Error::Json {
            what: "optimizer kind",
            source,
        })?;
        let meta = BTreeMap::from([
            ("t".to_string(), data.optimizer.t.to_string()),
            ("kind".to_string(), kind),
        ]);
        let (model_path, opt_path) = (tmp.join(MODEL), tmp.join(OPTIMIZER));
        let model_entries = buffer_entries(&data.weights);
        let mut model_fill = buffer_fill(&model_path, &data.weights);
        let (opt_entries, mut opt_fill): (Entries<'_>, Box<Fill<'_>>) = match &data.optimizer_stream
        {
            None => (
                buffer_entries(&data.optimizer.buffers),
                Box::new(buffer_fill(&opt_path, &data.optimizer.buffers)),
            ),
            Some(st) => (
                st.buffers
                    .iter()
                    .map(|(n, shape, _, _)| (n.as_str(), shape.as_slice(), shape.iter().product()))
                    .collect(),
                Box::new(|i, sink: &mut Sink<'_>| st.read(i, sink)),
            ),
        };
        let model_head = safetensors_head(&model_entries, &BTreeMap::new())?;
        let opt_head = safetensors_head(&opt_entries, &meta)?;
        // Each large file is written first and synced on a helper thread (waiting for the
        // disk, not using the CPU) while this thread hashes what was written, from the
        // values again: the hash overlaps the disk instead of adding to it.
        std::thread::scope(|scope| -> Result<()> {
            let (f, model_bytes) = write_safetensors_unsynced(
                &model_path,
                &model_head,
                &model_entries,
                &mut model_fill,
            )?;
            let model_sync = scope.spawn(move || f.sync_all());
            let (f, opt_bytes) =
                write_safetensors_unsynced(&opt_path, &opt_head, &opt_entries, &mut opt_fill)?;
            let opt_sync = scope.spawn(move || f.sync_all());
            let model_sha =
                hash_safetensors(&model_path, &model_head, &model_entries, &mut model_fill)?;
            let opt_sha = hash_safetensors(&opt_path, &opt_head, &opt_entries, &mut opt_fill)?;
            let joined = |h: std::thread::ScopedJoinHandle<'_, std::io::Result<()>>, p: &Path| {
                h.join()
                    .map_err(|_| Error::WriterPanicked)?
                    .map_err(Error::io(p))
            };
            joined(model_sync, &model_path)?;
            joined(opt_sync, &opt_path)?;
            files.insert(
                MODEL.to_string(),
                FileEntry {
                    sha256: model_sha,
                    bytes: model_bytes,
                },
            );
            files.insert(
                OPTIMIZER.to_string(),
                FileEntry {
                    sha256: opt_sha,
                    bytes: opt_bytes,
                },
            );
            Ok(())
        })?;
        files.insert(
            TRAINER.to_string(),
            write_small(&tmp.join(TRAINER), &data.trainer_json)?,
        );
        files.insert(
            CURSOR.to_string(),
            write_small(&tmp.join(CURSOR), &data.cursor_json)?,
        );
        if let Some(c) = &data.config_toml {
            files.insert(
                CONFIG.to_string(),
                write_small(&tmp.join(CONFIG), c.as_bytes())?,
            );
        }
        let manifest = Manifest {
            format: 1,
            step: data.step,
            threads: data.threads,
            eval_loss: data.eval_loss,
            files,
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|source| Error::Json {
            what: "manifest",
            source,
        })?;
        // Inside the temporary directory, renamed into place as a whole: a plain synced
        // write like the other files (no temporary name, rename and sync of its own).
        write_small(&tmp.join(MANIFEST), &json)?;
        sync_dir(&tmp)?;
        let dst = root.join(&name);
        if dst.exists() {
            std::fs::remove_dir_all(&dst).map_err(Error::io(&dst))?;
        }
        std::fs::rename(&tmp, &dst).map_err(Error::io(&dst))?;
        sync_dir(root)?;
        Ok(dst)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Checks a checkpoint directory: the manifest parses, names every required file, and every
/// file listed has its recorded size and sha256.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let corrupt = |file: &str, reason: String| Error::CheckpointCorrupt {
        dir: dir.to_path_buf(),
        file: file.to_string(),
        reason,
    };
    let bytes = std::fs::read(dir.join(MANIFEST)).map_err(|e| corrupt(MANIFEST, e.to_string()))?;
    let m: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(MANIFEST, e.to_string()))?;
    for r in REQUIRED {
        if !m.files.contains_key(r) {
            return Err(corrupt(r, "not listed in the manifest".into()));
        }
    }
    for (name, entry) in &m.files {
        let p = dir.join(name);
        let (sha, len) = sha256_file(&p).map_err(|e| corrupt(name, e.to_string()))?;
        if len != entry.bytes {
            return Err(corrupt(
                name,
                format!("{len} bytes, manifest says {}", entry.bytes),
            ));
        }
        if sha != entry.sha256 {
            return Err(corrupt(name, "sha256 does not match the manifest".into()));
        }
    }
    Ok(m)
}

fn read_f32_map(path: &Path) -> Result<(NamedBuffers, BTreeMap<String, String>)> {
    let f = eg_model::safetensors::SafetensorsFile::open(path)?;
    let mut out = BTreeMap::new();
    for name in f.tensors().keys() {
        let t = f.load(name, DType::F32, &Device::Cpu)?;
        let shape = t.dims().to_vec();
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        out.insert(name.clone(), (shape, v));
    }
    Ok((out, read_metadata(path)?))
}

/// The `__metadata__` of a safetensors file.
fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    let corrupt = |reason: String| Error::CheckpointCorrupt {
        dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        file: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(Error::io(path))?;
    let n = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| corrupt("too short".into()))? as usize;
    let head = bytes
        .get(8..8usize.saturating_add(n))
        .ok_or_else(|| corrupt("header past end".into()))?;
    let v: serde_json::Value = serde_json::from_slice(head).map_err(|e| corrupt(e.to_string()))?;
    let mut out = BTreeMap::new();
    if let Some(m) = v.get("__metadata__").and_then(|m| m.as_object()) {
        for (k, v) in m {
            if let Some(s) = v.as_str() {
                out.insert(k.clone(), s.to_string());
            }
        }
    }
    Ok(out)
}

/// Verifies and loads a checkpoint directory.
pub fn load(dir: &Path) -> Result<CheckpointData> {
    let m = verify(dir)?;
    let corrupt = |file: &str, reason: String| Error::CheckpointCorrupt {
        dir: dir.to_path_buf(),
        file: file.to_string(),
        reason,
    };
    let (weights, _) = read_f32_map(&dir.join(MODEL))?;
    let (buffers, meta) = read_f32_map(&dir.join(OPTIMIZER))?;
    let t = meta
        .get("t")
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| corrupt(OPTIMIZER, "no `t` in the metadata".into()))?;
    let kind: OptimizerKind = meta
        .get("kind")
        .and_then(|k| serde_json::from_str(k).ok())
        .ok_or_else(|| corrupt(OPTIMIZER, "no `kind` in the metadata".into()))?;
    let read = |n: &str| std::fs::read(dir.join(n)).map_err(|e| corrupt(n, e.to_string()));
    let config_toml = if m.files.contains_key(CONFIG) {
        Some(String::from_utf8(read(CONFIG)?).map_err(|e| corrupt(CONFIG, e.to_string()))?)
    } else {
        None
    };
    Ok(CheckpointData {
        step: m.step,
        weights: Arc::new(weights),
        optimizer: Arc::new(OptimizerState { t, kind, buffers }),
        optimizer_stream: None,
        trainer_json: read(TRAINER)?,
        cursor_json: read(CURSOR)?,
        config_toml,
        eval_loss: m.eval_loss,
        threads: m.threads,
    })
}

/// Checkpoint directories under `root` (`step-N`), newest first.
pub fn list(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_prefix("step-")
                .and_then(|s| s.parse::<u64>().ok())
            {
                out.push((n, e.path()));
            }
        }
    }
    out.sort_by_key(|b| std::cmp::Reverse(b.0));
    out
}

/// The newest checkpoint that verifies and loads; each one skipped is logged with the
/// reason and returned in the second element.
pub fn newest_valid(root: &Path) -> (Option<(PathBuf, CheckpointData)>, Vec<Error>) {
    let mut skipped = Vec::new();
    for (_, dir) in list(root) {
        match load(&dir) {
            Ok(d) => return (Some((dir, d)), skipped),
            Err(e) => {
                tracing::warn!(checkpoint = %dir.display(), error = %e, "skipping invalid checkpoint");
                skipped.push(e);
            }
        }
    }
    (None, skipped)
}

/// Removes leftovers of interrupted writes (`.tmp-*` directories) under `root`.
pub fn clean_temporaries(root: &Path) {
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Keeps the newest `keep_last` checkpoints plus the `keep_best` with the lowest eval loss;
/// removes the rest. Invalid directories older than the newest valid one are removed too.
pub fn prune(root: &Path, keep_last: usize, keep_best: usize) -> Result<()> {
    let all = list(root);
    let mut keep: std::collections::BTreeSet<u64> =
        all.iter().take(keep_last.max(1)).map(|(s, _)| *s).collect();
    let mut scored: Vec<(f64, u64)> = Vec::new();
    for (s, dir) in &all {
        if let Ok(bytes) = std::fs::read(dir.join(MANIFEST))
            && let Ok(m) = serde_json::from_slice::<Manifest>(&bytes)
            && let Some(l) = m.eval_loss
        {
            scored.push((l, *s));
        }
    }
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    keep.extend(scored.iter().take(keep_best).map(|(_, s)| *s));
    for (s, dir) in &all {
        if !keep.contains(s) {
            std::fs::remove_dir_all(dir).map_err(Error::io(dir))?;
        }
    }
    sync_dir(root)
}
