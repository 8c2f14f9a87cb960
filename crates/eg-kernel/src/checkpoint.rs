//! Atomic, verified checkpoints: one directory per step.
//!
//! ```text
//! <root>/step-00000050/
//!     model.safetensors      weights (f32)
//!     optimizer.safetensors  optimizer buffers, `t` and the rule in the header metadata;
//!                            from 16 MiB of state (by default) split by tensor into
//!                            optimizer-00001-of-0000n.safetensors, … (each with the metadata)
//!     trainer.json           step, counters, spike window, quarantine, threads, ...
//!     cursor.json            the data loader's cursor (eg-data)
//!     config.toml            the resolved configuration (when known)
//!     manifest.json          sha256 and size of every file above; written last (format 2
//!                            when the optimizer state is in shards, else 1)
//! ```
//!
//! A checkpoint is written into `<root>/.tmp-step-…-<pid>/` (each file synced), renamed into
//! place and the root synced, so a crash leaves either the whole directory or none of it.
//! The large files are written by [`save_with`]'s writer threads (one per core, up to 4: the
//! weights and the first optimizer shard on one, a shard on each other; an unsplit optimizer
//! file on a second one), each hashing its blocks while another thread writes them with
//! `O_DIRECT` (see [`SaveOptions`]).
//! [`verify`] rechecks every checksum; [`newest_valid`] walks the steps from newest to oldest,
//! skipping (with a warning naming it) any directory that is incomplete or corrupt.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::io::{Read, Write};

use candle_core::{DType, Device};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fsio::{sha256_file, sync_dir};
use pipe::Pipe;

mod pipe;
use crate::optim::{OptimizerKind, OptimizerState, OptimizerStream};
use crate::{Error, Result};

/// The newest manifest format this build reads: 1 has `optimizer.safetensors`, 2 (sharded
/// optimizer state) `optimizer-i-of-n.safetensors`.
const FORMAT: u32 = 2;

/// Name of the manifest file.
pub const MANIFEST: &str = "manifest.json";
const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const TRAINER: &str = "trainer.json";
const CURSOR: &str = "cursor.json";
const CONFIG: &str = "config.toml";
/// Files every checkpoint has besides its optimizer file(s).
const REQUIRED: [&str; 3] = [MODEL, TRAINER, CURSOR];

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
    /// Format version: 1, or 2 when the optimizer state is in shards.
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

/// A [`Fill`] passing the values of `buffers` (entries in name order). A sink's error is
/// reported by [`safetensors_pass`] with the file's path.
fn buffer_fill(buffers: &NamedBuffers) -> impl Fn(usize, &mut Sink<'_>) -> Result<()> + Sync + '_ {
    let values: Vec<&[f32]> = buffers.values().map(|(_, v)| v.as_slice()).collect();
    move |i, sink| {
        let v = values.get(i).copied().unwrap_or_default();
        for chunk in v.chunks(1 << 16) {
            sink(chunk).map_err(Error::io(PathBuf::new()))?;
        }
        Ok(())
    }
}

/// Takes the values of an entry, piece by piece.
type Sink<'s> = dyn FnMut(&[f32]) -> std::io::Result<()> + 's;

/// Passes the values of entry `i` to the sink.
type Fill<'a> = dyn Fn(usize, &mut Sink<'_>) -> Result<()> + Sync + 'a;

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

/// Produces the bytes of a safetensors file (`head`, then for each entry the values `fill`
/// passes for entry `first + i`, as little-endian f32) into `pipe`.
fn safetensors_pass(path: &Path, part: &Part<'_>, pipe: &mut Pipe) -> Result<()> {
    pipe.push_bytes(&part.head).map_err(Error::io(path))?;
    for (i, &(name, _, len)) in part.entries.iter().enumerate() {
        let mut written = 0usize;
        let mut failed = None;
        let filled = (part.fill)(part.first + i, &mut |v: &[f32]| {
            pipe.push_f32(v).inspect_err(|e| {
                failed = Some(std::io::Error::new(e.kind(), e.to_string()));
            })?;
            written += v.len();
            Ok(())
        });
        if let Some(e) = failed {
            return Err(Error::io(path)(e));
        }
        filled?;
        if written != len {
            return Err(Error::StateMismatch {
                what: format!("{name} written to {}", path.display()),
                expected: format!("{len} values"),
                found: written.to_string(),
            });
        }
    }
    Ok(())
}

/// One safetensors file of a checkpoint: its name, header and entries, the entries' values
/// being entries `first..` of `fill`.
struct Part<'a> {
    name: String,
    head: Vec<u8>,
    entries: &'a [(&'a str, &'a [usize], usize)],
    first: usize,
    fill: &'a Fill<'a>,
}

/// Writes and syncs the files of `parts` in `dir` one after the other, each hashed while it
/// is written (see [`pipe`]).
fn write_parts(
    dir: &Path,
    parts: &[Part<'_>],
    direct_io: bool,
) -> Result<Vec<(String, FileEntry)>> {
    let paths: Vec<PathBuf> = parts.iter().map(|p| dir.join(&p.name)).collect();
    let written = pipe::write_files(&paths, direct_io, &mut |i, pipe| match (
        parts.get(i),
        paths.get(i),
    ) {
        (Some(part), Some(path)) => safetensors_pass(path, part, pipe),
        _ => Err(Error::StateMismatch {
            what: "checkpoint file index".into(),
            expected: format!("below {}", parts.len()),
            found: i.to_string(),
        }),
    })?;
    Ok(parts
        .iter()
        .zip(written)
        .map(|(part, (bytes, sha256))| (part.name.clone(), FileEntry { sha256, bytes }))
        .collect())
}

/// Splits entries of `sizes` bytes into consecutive shards so that `writers` threads carry
/// about the same bytes, the first one also carrying `first_load` bytes (the weights); one
/// shard when there is a single writer or less than `min_shard` bytes in all.
fn shard_ranges(
    sizes: &[u64],
    first_load: u64,
    writers: usize,
    min_shard: u64,
) -> Vec<Range<usize>> {
    let n = sizes.len();
    let total: u64 = sizes.iter().sum();
    if writers <= 1 || total < min_shard || n < 2 {
        return std::iter::once(0..n).collect();
    }
    let target = (first_load + total) / writers as u64;
    let (mut out, mut start, mut acc, mut k) = (Vec::new(), 0, first_load, 1u64);
    for (i, &s) in sizes.iter().enumerate() {
        let before = acc;
        acc += s;
        while (k as usize) < writers && acc >= k * target {
            // Cut at whichever side of entry `i` is nearer the writer's share.
            let cut = if i > start && k * target - before < acc - k * target {
                i
            } else {
                i + 1
            };
            if cut > start && cut < n {
                out.push(start..cut);
                start = cut;
            }
            k += 1;
        }
    }
    out.push(start..n);
    out
}

/// The file name of optimizer shard `i` of `n` (`optimizer.safetensors` when `n` is 1).
fn optimizer_file(i: usize, n: usize) -> String {
    if n == 1 {
        OPTIMIZER.to_string()
    } else {
        format!("optimizer-{:05}-of-{n:05}.safetensors", i + 1)
    }
}

/// The optimizer files a manifest lists, in order: `optimizer.safetensors` alone, or exactly
/// the shards `optimizer-i-of-n.safetensors` for every `i` of one `n`; `None` for anything
/// else (missing, incomplete, mixed or stray files).
fn optimizer_files(m: &Manifest) -> Option<Vec<String>> {
    let listed: Vec<&String> = m
        .files
        .keys()
        .filter(|k| k.starts_with("optimizer") && k.ends_with(".safetensors"))
        .collect();
    if let [one] = listed.as_slice() {
        return (one.as_str() == OPTIMIZER).then(|| vec![OPTIMIZER.to_string()]);
    }
    let n = listed.len();
    let names: Vec<String> = (0..n).map(|i| optimizer_file(i, n)).collect();
    (n > 1 && names.iter().all(|f| m.files.contains_key(f))).then_some(names)
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

/// How [`save_with`] writes a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveOptions {
    /// Write the weight and optimizer files with `O_DIRECT` (aligned blocks straight to the
    /// device, no copy into the page cache); a filesystem that refuses it gets buffered
    /// writes.
    pub direct_io: bool,
    /// Threads producing and hashing files at once: optimizer state of `min_shard_bytes` or
    /// more is split into up to this many `optimizer-i-of-n.safetensors` shards so that each
    /// thread carries about the same bytes (sha256 runs at 1–2 GB/s per core, slower than
    /// many disks).
    pub writers: usize,
    /// Optimizer state smaller than this stays in one `optimizer.safetensors`.
    pub min_shard_bytes: u64,
}

impl Default for SaveOptions {
    /// `O_DIRECT`, one writer per core up to 4, shards from 16 MiB of optimizer state.
    fn default() -> Self {
        Self {
            direct_io: true,
            writers: std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(1)
                .min(4),
            min_shard_bytes: 16 << 20,
        }
    }
}

/// Writes a checkpoint under `root` atomically with [`SaveOptions::default`] and returns its
/// directory.
pub fn save(root: &Path, data: &CheckpointData) -> Result<PathBuf> {
    save_with(root, data, &SaveOptions::default())
}

/// Writes a checkpoint under `root` atomically and returns its directory. Each large file is
/// hashed while it is written, and every file is synced before the directory is renamed
/// into place.
pub fn save_with(root: &Path, data: &CheckpointData, options: &SaveOptions) -> Result<PathBuf> {
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
        let model_entries = buffer_entries(&data.weights);
        let model_fill = buffer_fill(&data.weights);
        let (opt_entries, opt_fill): (Entries<'_>, Box<Fill<'_>>) = match &data.optimizer_stream {
            None => (
                buffer_entries(&data.optimizer.buffers),
                Box::new(buffer_fill(&data.optimizer.buffers)),
            ),
            Some(st) => (
                st.buffers
                    .iter()
                    .map(|(n, shape, _, _)| (n.as_str(), shape.as_slice(), shape.iter().product()))
                    .collect(),
                Box::new(|i, sink: &mut Sink<'_>| st.read(i, sink)),
            ),
        };
        let bytes =
            |e: &[(&str, &[usize], usize)]| e.iter().map(|x| 4 * x.2 as u64).collect::<Vec<_>>();
        let model_bytes: u64 = bytes(&model_entries).iter().sum();
        let shards = shard_ranges(
            &bytes(&opt_entries),
            model_bytes,
            options.writers,
            options.min_shard_bytes,
        );
        // Writer 0 writes the weights and the first shard, writer i shard i; an unsplit
        // optimizer file gets a writer of its own when there are several. Every shard
        // carries the metadata.
        let own = usize::from(shards.len() == 1 && options.writers > 1);
        let mut writers: Vec<Vec<Part<'_>>> = vec![vec![Part {
            name: MODEL.to_string(),
            head: safetensors_head(&model_entries, &BTreeMap::new())?,
            entries: &model_entries,
            first: 0,
            fill: &model_fill,
        }]];
        for (i, r) in shards.iter().enumerate() {
            let entries = &opt_entries[r.clone()];
            let part = Part {
                name: optimizer_file(i, shards.len()),
                head: safetensors_head(entries, &meta)?,
                entries,
                first: r.start,
                fill: &*opt_fill,
            };
            match writers.get_mut(i + own) {
                Some(w) => w.push(part),
                None => writers.push(vec![part]),
            }
        }
        let written = std::thread::scope(|scope| {
            // The small files on their own thread: their syncs overlap the large writes.
            let small = scope.spawn(|| {
                let mut out = vec![
                    (
                        TRAINER.to_string(),
                        write_small(&tmp.join(TRAINER), &data.trainer_json)?,
                    ),
                    (
                        CURSOR.to_string(),
                        write_small(&tmp.join(CURSOR), &data.cursor_json)?,
                    ),
                ];
                if let Some(c) = &data.config_toml {
                    out.push((
                        CONFIG.to_string(),
                        write_small(&tmp.join(CONFIG), c.as_bytes())?,
                    ));
                }
                Ok::<_, Error>(out)
            });
            let (first, rest): (&[Part<'_>], &[Vec<Part<'_>>]) = match writers.split_first() {
                Some((first, rest)) => (first, rest),
                None => (&[], &[]),
            };
            let handles: Vec<_> = rest
                .iter()
                .map(|parts| scope.spawn(|| write_parts(&tmp, parts, options.direct_io)))
                .collect();
            // Every thread joined before returning (one left unjoined after a panic would
            // make `scope` panic); the first error wins.
            let mut written = write_parts(&tmp, first, options.direct_io);
            for h in handles.into_iter().chain([small]) {
                let r = h.join().unwrap_or(Err(Error::WriterPanicked));
                match (&mut written, r) {
                    (Ok(w), Ok(more)) => w.extend(more),
                    (Ok(_), Err(e)) => written = Err(e),
                    (Err(_), _) => {}
                }
            }
            written
        })?;
        files.extend(written);
        let manifest = Manifest {
            format: if shards.len() > 1 { 2 } else { 1 },
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
    if m.format > FORMAT {
        return Err(corrupt(
            MANIFEST,
            format!(
                "format {} is newer than this build reads (up to {FORMAT}); resume with a newer eg",
                m.format
            ),
        ));
    }
    for r in REQUIRED {
        if !m.files.contains_key(r) {
            return Err(corrupt(r, "not listed in the manifest".into()));
        }
    }
    if optimizer_files(&m).is_none() {
        return Err(corrupt(
            OPTIMIZER,
            "neither it nor a complete set of optimizer shards is listed in the manifest".into(),
        ));
    }
    // The files hashed in parallel (the shards of a large state are about equal).
    m.files.par_iter().try_for_each(|(name, entry)| {
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
        Ok(())
    })?;
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
    // Only the header: the 8-byte length, then the JSON.
    let mut f = std::fs::File::open(path).map_err(Error::io(path))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| corrupt(format!("too short: {e}")))?;
    let n = u64::from_le_bytes(len);
    let size = f.metadata().map_err(Error::io(path))?.len();
    if n > size.saturating_sub(8) {
        return Err(corrupt("header past end".into()));
    }
    let mut head = vec![0u8; n as usize];
    f.read_exact(&mut head)
        .map_err(|e| corrupt(format!("header: {e}")))?;
    let head = head.as_slice();
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
    let opt_files = optimizer_files(&m).unwrap_or_default();
    let mut buffers = NamedBuffers::new();
    let mut meta = BTreeMap::new();
    let opt_file = opt_files.first().map_or(OPTIMIZER, String::as_str);
    for (i, f) in opt_files.iter().enumerate() {
        let (b, m) = read_f32_map(&dir.join(f))?;
        if i == 0 {
            meta = m;
        } else if m != meta {
            return Err(corrupt(
                f,
                format!("its metadata differs from {opt_file}'s"),
            ));
        }
        for (name, v) in b {
            if buffers.insert(name.clone(), v).is_some() {
                return Err(corrupt(f, format!("`{name}` is also in another shard")));
            }
        }
    }
    let t = meta
        .get("t")
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| corrupt(opt_file, "no `t` in the metadata".into()))?;
    let kind: OptimizerKind = meta
        .get("kind")
        .and_then(|k| serde_json::from_str(k).ok())
        .ok_or_else(|| corrupt(opt_file, "no `kind` in the metadata".into()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(sizes: &[u64], first: u64, r: &[Range<usize>]) -> Vec<u64> {
        r.iter()
            .enumerate()
            .map(|(i, r)| sizes[r.clone()].iter().sum::<u64>() + if i == 0 { first } else { 0 })
            .collect()
    }

    #[test]
    fn shards_balance_the_writers() {
        // AdamW: weights W, two moments of W each, ten equal tensors per moment.
        let sizes = vec![10u64; 20];
        let r = shard_ranges(&sizes, 100, 2, 0);
        assert_eq!(r, vec![0..5, 5..20]);
        assert_eq!(loads(&sizes, 100, &r), vec![150, 150]);
        // within one tensor of equal (the weights alone are a full share here)
        let r = shard_ranges(&sizes, 100, 3, 0);
        assert_eq!(loads(&sizes, 100, &r), vec![110, 90, 100]);
        // consecutive, covering, none empty
        for w in 1..8 {
            for first in [0, 7, 500] {
                let sizes = [3u64, 40, 1, 1, 90, 5, 5, 5, 60];
                let r = shard_ranges(&sizes, first, w, 0);
                assert!(r.len() <= w.max(1));
                assert_eq!(r.first().unwrap().start, 0);
                assert_eq!(r.last().unwrap().end, sizes.len());
                for p in r.windows(2) {
                    assert_eq!(p[0].end, p[1].start);
                }
                assert!(r.iter().all(|x| !x.is_empty()), "{r:?}");
            }
        }
        // weights larger than a writer's share: the first shard is one tensor
        assert_eq!(shard_ranges(&[10, 10, 10], 1000, 2, 0), vec![0..1, 1..3]);
        // small state or one writer: one file
        assert_eq!(shard_ranges(&sizes, 100, 4, 1 << 20), vec![0..20]);
        assert_eq!(shard_ranges(&sizes, 100, 1, 0), vec![0..20]);
    }

    #[test]
    fn optimizer_file_names() {
        let entry = FileEntry {
            sha256: String::new(),
            bytes: 0,
        };
        let manifest = |names: &[&str]| Manifest {
            format: 1,
            step: 1,
            threads: 1,
            eval_loss: None,
            files: names
                .iter()
                .map(|n| (n.to_string(), entry.clone()))
                .collect(),
        };
        assert_eq!(optimizer_file(0, 1), "optimizer.safetensors");
        assert_eq!(optimizer_file(1, 3), "optimizer-00002-of-00003.safetensors");
        let all: Vec<String> = (0..3).map(|i| optimizer_file(i, 3)).collect();
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        assert_eq!(optimizer_files(&manifest(&refs)), Some(all.clone()));
        assert_eq!(optimizer_files(&manifest(&refs[..2])), None);
        assert_eq!(optimizer_files(&manifest(&["model.safetensors"])), None);
        // one form only, no stray shard, no absurd count
        let mixed = [refs[0], refs[1], refs[2], "optimizer.safetensors"];
        assert_eq!(optimizer_files(&manifest(&mixed)), None);
        let stray = [
            "optimizer-00001-of-00002.safetensors",
            "optimizer-00002-of-00002.safetensors",
            "optimizer-00003-of-00003.safetensors",
        ];
        assert_eq!(optimizer_files(&manifest(&stray)), None);
        let huge = ["optimizer-00001-of-9000000000000000000.safetensors"];
        assert_eq!(optimizer_files(&manifest(&huge)), None);
        assert_eq!(
            optimizer_files(&manifest(&["optimizer-00001-of-00001.safetensors"])),
            None
        );
    }
}
