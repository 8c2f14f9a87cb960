//! Pre-tokenized token shards: memory-mapped, written atomically.
//!
//! A shard `NAME` is two files:
//! - `NAME.tokens`: the tokens of every sample back to back, little-endian `u16` or `u32`;
//! - `NAME.index`: a 32-byte header (`b"EGTOKIDX"`, token width in bits as `u32`, a reserved
//!   `u32`, the sample count and token count as `u64`) followed by one 16-byte record per
//!   sample: its end offset in tokens (`u64`), its prompt length (`u32`) and a reserved `u32`.
//!
//! Both are written to temporary names, fsynced and renamed (the index last, so an index
//! always describes a complete token file), then the directory is fsynced. Readers validate
//! the index against the token file on open and fail with [`Error::CorruptShard`].

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::Mmap;

use crate::{Error, Result, TokenDataset};

const MAGIC: &[u8; 8] = b"EGTOKIDX";
const HEADER: usize = 32;
const RECORD: usize = 16;

/// Width of the tokens stored in a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenWidth {
    /// 16-bit tokens (vocabularies up to 65 536).
    U16,
    /// 32-bit tokens.
    U32,
}

impl TokenWidth {
    /// The narrowest width that holds every id below `vocab_size`.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            TokenWidth::U16
        } else {
            TokenWidth::U32
        }
    }

    /// Bytes per token.
    pub fn bytes(self) -> usize {
        match self {
            TokenWidth::U16 => 2,
            TokenWidth::U32 => 4,
        }
    }

    fn bits(self) -> u32 {
        self.bytes() as u32 * 8
    }
}

/// The two files of a finished shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardFiles {
    /// The token file.
    pub tokens: PathBuf,
    /// The index file.
    pub index: PathBuf,
}

impl ShardFiles {
    /// The files of shard `name` in `dir`.
    pub fn new(dir: &Path, name: &str) -> Self {
        Self {
            tokens: dir.join(format!("{name}.tokens")),
            index: dir.join(format!("{name}.index")),
        }
    }
}

fn tmp_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(format!(".tmp-{}", std::process::id()));
    PathBuf::from(s)
}

/// Fsync a directory so a rename in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Writes one shard, streaming: memory use does not grow with the shard.
#[derive(Debug)]
pub struct ShardWriter {
    files: ShardFiles,
    width: TokenWidth,
    tokens: BufWriter<File>,
    index: BufWriter<File>,
    samples: u64,
    total: u64,
    buf: Vec<u8>,
}

impl ShardWriter {
    /// Start writing shard `name` in `dir` (created if missing).
    pub fn create(dir: &Path, name: &str, width: TokenWidth) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let files = ShardFiles::new(dir, name);
        let open = |p: &Path| File::create(tmp_path(p)).map_err(|e| Error::io(tmp_path(p), e));
        let tokens = BufWriter::with_capacity(1 << 20, open(&files.tokens)?);
        let mut index = BufWriter::with_capacity(1 << 16, open(&files.index)?);
        index
            .write_all(&[0u8; HEADER])
            .map_err(|e| Error::io(tmp_path(&files.index), e))?;
        Ok(Self {
            files,
            width,
            tokens,
            index,
            samples: 0,
            total: 0,
            buf: Vec::new(),
        })
    }

    /// Append a sample whose first `prompt_len` tokens are prompt.
    pub fn push(&mut self, tokens: &[u32], prompt_len: usize) -> Result<()> {
        self.buf.clear();
        match self.width {
            TokenWidth::U16 => {
                for &t in tokens {
                    let v = u16::try_from(t).map_err(|_| Error::TokenOutOfRange {
                        path: self.files.tokens.clone(),
                        token: t,
                        bits: 16,
                    })?;
                    self.buf.extend_from_slice(&v.to_le_bytes());
                }
            }
            TokenWidth::U32 => {
                for &t in tokens {
                    self.buf.extend_from_slice(&t.to_le_bytes());
                }
            }
        }
        self.tokens
            .write_all(&self.buf)
            .map_err(|e| Error::io(tmp_path(&self.files.tokens), e))?;
        self.total += tokens.len() as u64;
        self.samples += 1;
        let prompt = u32::try_from(prompt_len.min(tokens.len())).unwrap_or(u32::MAX);
        let mut rec = [0u8; RECORD];
        rec[..8].copy_from_slice(&self.total.to_le_bytes());
        rec[8..12].copy_from_slice(&prompt.to_le_bytes());
        self.index
            .write_all(&rec)
            .map_err(|e| Error::io(tmp_path(&self.files.index), e))
    }

    /// Samples written so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Tokens written so far.
    pub fn tokens(&self) -> u64 {
        self.total
    }

    /// Flush, fsync and rename both files into place (index last), then fsync the directory.
    pub fn finish(self) -> Result<ShardFiles> {
        let Self {
            files,
            width,
            tokens,
            index,
            samples,
            total,
            ..
        } = self;
        let tok_tmp = tmp_path(&files.tokens);
        let idx_tmp = tmp_path(&files.index);
        let tokens = tokens
            .into_inner()
            .map_err(|e| Error::io(&tok_tmp, e.into_error()))?;
        tokens.sync_all().map_err(|e| Error::io(&tok_tmp, e))?;
        let mut index = index
            .into_inner()
            .map_err(|e| Error::io(&idx_tmp, e.into_error()))?;
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&width.bits().to_le_bytes());
        header[16..24].copy_from_slice(&samples.to_le_bytes());
        header[24..32].copy_from_slice(&total.to_le_bytes());
        index
            .seek(SeekFrom::Start(0))
            .and_then(|_| index.write_all(&header))
            .and_then(|()| index.sync_all())
            .map_err(|e| Error::io(&idx_tmp, e))?;
        std::fs::rename(&tok_tmp, &files.tokens).map_err(|e| Error::io(&files.tokens, e))?;
        std::fs::rename(&idx_tmp, &files.index).map_err(|e| Error::io(&files.index, e))?;
        if let Some(dir) = files.index.parent() {
            sync_dir(dir)?;
        }
        Ok(files)
    }
}

/// Map a file read-only; an empty file maps to nothing.
fn map(path: &Path) -> Result<Option<Mmap>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Ok(None);
    }
    // SAFETY: shard files are written once under a temporary name and renamed into place;
    // nothing in this crate modifies them afterwards. Truncating one under a running reader
    // is outside the contract (as for every memory-mapped format).
    let m = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(Some(m))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// One memory-mapped shard.
#[derive(Debug)]
struct Shard {
    files: ShardFiles,
    width: TokenWidth,
    samples: u64,
    tokens: Option<Mmap>,
    index: Mmap,
    /// Upper bound of the bytes of mapped pages touched since the last release.
    touched: AtomicU64,
}

const PAGE: u64 = 4096;

impl Shard {
    fn open(files: ShardFiles) -> Result<Self> {
        let corrupt = |reason: String| Error::CorruptShard {
            path: files.index.clone(),
            reason,
        };
        let index = map(&files.index)?.ok_or_else(|| corrupt("empty index".into()))?;
        if index.len() < HEADER || &index[..8] != MAGIC {
            return Err(corrupt("bad header".into()));
        }
        let width = match u32_at(&index, 8) {
            16 => TokenWidth::U16,
            32 => TokenWidth::U32,
            w => return Err(corrupt(format!("token width {w} bits"))),
        };
        let samples = u64_at(&index, 16);
        let total = u64_at(&index, 24);
        let expect_len = (samples as u128) * RECORD as u128 + HEADER as u128;
        if index.len() as u128 != expect_len {
            return Err(corrupt(format!(
                "{} bytes for {samples} samples (expected {expect_len})",
                index.len()
            )));
        }
        let tokens = map(&files.tokens)?;
        let tok_bytes = tokens.as_ref().map_or(0, |m| m.len()) as u128;
        if tok_bytes != total as u128 * width.bytes() as u128 {
            return Err(Error::CorruptShard {
                path: files.tokens.clone(),
                reason: format!(
                    "{tok_bytes} bytes, index says {total} tokens of {} bytes",
                    width.bytes()
                ),
            });
        }
        let mut prev = 0;
        for i in 0..samples as usize {
            let end = u64_at(&index, HEADER + i * RECORD);
            if end < prev || end > total {
                return Err(corrupt(format!(
                    "sample {i} ends at {end}, after {prev}, of {total} tokens"
                )));
            }
            prev = end;
        }
        if prev != total {
            return Err(corrupt(format!("samples cover {prev} of {total} tokens")));
        }
        Ok(Self {
            files,
            width,
            samples,
            tokens,
            index,
            touched: AtomicU64::new(0),
        })
    }

    /// Account for `bytes` read (at least a page) and, past `limit`, drop this process's
    /// mapped pages so the resident set stays bounded; the data stays in the page cache.
    fn touch(&self, bytes: usize, limit: u64) {
        let add = (bytes as u64).div_ceil(PAGE).max(1) * PAGE;
        if self.touched.fetch_add(add, Ordering::Relaxed) + add > limit {
            self.touched.store(0, Ordering::Relaxed);
            self.release();
        }
    }

    #[cfg(unix)]
    fn release(&self) {
        use memmap2::UncheckedAdvice;
        for m in [self.tokens.as_ref(), Some(&self.index)]
            .into_iter()
            .flatten()
        {
            // SAFETY: both maps are read-only shared mappings of files that are never
            // modified (see `map`). MADV_DONTNEED on such a mapping only unmaps the pages
            // from this process; the next access re-reads the same bytes from the page cache
            // or the file, so slices borrowed from the map keep their contents.
            if let Err(e) = unsafe { m.unchecked_advise(UncheckedAdvice::DontNeed) } {
                tracing::debug!(path = %self.files.tokens.display(), error = %e, "madvise(DONTNEED) failed");
            }
        }
    }

    #[cfg(not(unix))]
    fn release(&self) {}

    fn bounds(&self, i: u64) -> (usize, usize) {
        let i = i as usize;
        let end = u64_at(&self.index, HEADER + i * RECORD) as usize;
        let start = if i == 0 {
            0
        } else {
            u64_at(&self.index, HEADER + (i - 1) * RECORD) as usize
        };
        (start, end)
    }

    fn prompt(&self, i: u64) -> usize {
        u32_at(&self.index, HEADER + i as usize * RECORD + 8) as usize
    }
}

/// A set of shards read as one [`TokenDataset`]; sample ids run through the shards in order.
///
/// Pages of memory-mapped files count in a process's resident set once touched. Random
/// access over a large corpus would touch all of them, so each shard releases its mapped
/// pages (`madvise(MADV_DONTNEED)`) after about [`TokenShards::resident_limit`] bytes of
/// pages were touched: RSS stays bounded while the data stays in the kernel's page cache.
#[derive(Debug)]
pub struct TokenShards {
    shards: Vec<Shard>,
    /// `starts[i]` is the first sample id of shard `i`; one extra entry holds the total.
    starts: Vec<u64>,
    resident_limit: u64,
}

/// Default of [`TokenShards::with_resident_limit`]: 64 MiB of touched pages per shard.
pub const DEFAULT_RESIDENT_LIMIT: u64 = 64 << 20;

impl TokenShards {
    /// Open shards by their file pairs, validating each.
    pub fn open(files: impl IntoIterator<Item = ShardFiles>) -> Result<Self> {
        let mut shards = Vec::new();
        let mut starts = vec![0];
        let mut n = 0;
        for f in files {
            let s = Shard::open(f)?;
            n += s.samples;
            starts.push(n);
            shards.push(s);
        }
        Ok(Self {
            shards,
            starts,
            resident_limit: DEFAULT_RESIDENT_LIMIT,
        })
    }

    /// Release mapped pages after `bytes` of pages were touched in a shard (`u64::MAX`: never).
    pub fn with_resident_limit(mut self, bytes: u64) -> Self {
        self.resident_limit = bytes;
        self
    }

    /// The current limit (see [`TokenShards::with_resident_limit`]).
    pub fn resident_limit(&self) -> u64 {
        self.resident_limit
    }

    /// Open every shard (`*.index` with its `.tokens`) in `dir`, in file-name order.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            if path.extension().is_some_and(|e| e == "index")
                && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
            {
                names.push(stem.to_owned());
            }
        }
        names.sort();
        if names.is_empty() {
            return Err(Error::NoInput {
                pattern: dir.join("*.index").display().to_string(),
            });
        }
        Self::open(names.iter().map(|n| ShardFiles::new(dir, n)))
    }

    /// Total tokens of all shards.
    pub fn total_tokens(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.bounds(s.samples.saturating_sub(1)).1 as u64)
            .sum()
    }

    /// Token width of each shard (they may differ).
    pub fn widths(&self) -> Vec<TokenWidth> {
        self.shards.iter().map(|s| s.width).collect()
    }

    fn locate(&self, id: u64) -> Result<(&Shard, u64)> {
        let len = self.len();
        if id >= len {
            return Err(Error::SampleOutOfRange { id, len });
        }
        let k = self.starts.partition_point(|&s| s <= id) - 1;
        Ok((&self.shards[k], id - self.starts[k]))
    }
}

impl TokenDataset for TokenShards {
    fn len(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }

    fn sample_len(&self, id: u64) -> Result<usize> {
        let (s, i) = self.locate(id)?;
        s.touch(RECORD, self.resident_limit);
        let (a, b) = s.bounds(i);
        Ok(b - a)
    }

    fn prompt_len(&self, id: u64) -> Result<usize> {
        let (s, i) = self.locate(id)?;
        s.touch(RECORD, self.resident_limit);
        Ok(s.prompt(i))
    }

    fn read_tokens(&self, id: u64, start: usize, out: &mut [u32]) -> Result<()> {
        let (s, i) = self.locate(id)?;
        let (a, b) = s.bounds(i);
        let end = start.saturating_add(out.len());
        if end > b - a {
            return Err(Error::TokenRangeOutOfRange {
                id,
                start,
                end,
                len: b - a,
            });
        }
        let w = s.width.bytes();
        s.touch(out.len() * w, self.resident_limit);
        let bytes = s.tokens.as_deref().unwrap_or(&[]);
        let src = bytes
            .get((a + start) * w..(a + end) * w)
            .ok_or_else(|| Error::CorruptShard {
                path: s.files.tokens.clone(),
                reason: "token range outside the file".into(),
            })?;
        match s.width {
            TokenWidth::U16 => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = u32::from(u16::from_le_bytes([c[0], c[1]]));
                }
            }
            TokenWidth::U32 => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                    *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_and_read_back_both_widths() {
        let dir = tempfile::tempdir().unwrap();
        for (name, width) in [("a", TokenWidth::U16), ("b", TokenWidth::U32)] {
            let mut w = ShardWriter::create(dir.path(), name, width).unwrap();
            w.push(&[1, 2, 3], 1).unwrap();
            w.push(&[], 0).unwrap();
            w.push(&[65_535, 7], 0).unwrap();
            w.finish().unwrap();
        }
        let s = TokenShards::open_dir(dir.path()).unwrap();
        assert_eq!(s.len(), 6);
        assert_eq!(s.total_tokens(), 10);
        let mut out = [0u32; 2];
        s.read_tokens(5, 0, &mut out).unwrap();
        assert_eq!(out, [65_535, 7]);
        s.read_tokens(3, 1, &mut out).unwrap();
        assert_eq!(out, [2, 3]);
        assert_eq!(s.prompt_len(3).unwrap(), 1);
        assert_eq!(s.sample_len(4).unwrap(), 0);
        assert!(s.read_tokens(3, 2, &mut out).is_err());
        assert!(s.sample_len(6).is_err());
        // Releasing pages every access changes nothing visible.
        let s = s.with_resident_limit(0);
        for _ in 0..3 {
            s.read_tokens(5, 0, &mut out).unwrap();
            assert_eq!(out, [65_535, 7]);
        }
        // No temporary file is left behind.
        let leftovers = std::fs::read_dir(dir.path()).unwrap().filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp")
        });
        assert_eq!(leftovers.count(), 0);
    }

    #[test]
    fn u16_overflow_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::create(dir.path(), "x", TokenWidth::U16).unwrap();
        assert!(matches!(
            w.push(&[70_000], 0),
            Err(Error::TokenOutOfRange { token: 70_000, .. })
        ));
    }

    #[test]
    fn corrupt_shards_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::create(dir.path(), "c", TokenWidth::U32).unwrap();
        w.push(&[1, 2, 3, 4], 0).unwrap();
        let files = w.finish().unwrap();
        // Truncated token file.
        let data = std::fs::read(&files.tokens).unwrap();
        std::fs::write(&files.tokens, &data[..8]).unwrap();
        assert!(matches!(
            TokenShards::open([files.clone()]),
            Err(Error::CorruptShard { .. })
        ));
        std::fs::write(&files.tokens, &data).unwrap();
        // Flipped magic.
        let mut idx = std::fs::read(&files.index).unwrap();
        idx[0] ^= 1;
        std::fs::write(&files.index, &idx).unwrap();
        assert!(matches!(
            TokenShards::open([files]),
            Err(Error::CorruptShard { .. })
        ));
    }
}
