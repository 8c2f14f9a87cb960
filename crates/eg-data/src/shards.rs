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

/// How a [`TokenShards`] reads its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardAccess {
    /// Memory-map index and tokens: fastest; the pages touched count in the process's
    /// resident set (they are file pages the kernel may drop, but tools report them).
    #[default]
    Mapped,
    /// Positioned reads (`pread`) into the caller's buffer: the resident set stays flat
    /// whatever the corpus size; the kernel's page cache still serves repeated reads.
    /// Unix only (elsewhere this falls back to `Mapped`).
    Read,
}

#[derive(Debug)]
enum Backing {
    Mapped {
        tokens: Option<Mmap>,
        index: Mmap,
    },
    #[cfg(unix)]
    Read {
        tokens: File,
        index: File,
    },
}

/// One shard.
#[derive(Debug)]
struct Shard {
    files: ShardFiles,
    width: TokenWidth,
    samples: u64,
    total: u64,
    backing: Backing,
}

/// Validate an index against its token file by streaming it (nothing stays mapped).
fn validate(files: &ShardFiles) -> Result<(TokenWidth, u64, u64)> {
    use std::io::Read;
    let corrupt = |reason: String| Error::CorruptShard {
        path: files.index.clone(),
        reason,
    };
    let file = File::open(&files.index).map_err(|e| Error::io(&files.index, e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(&files.index, e))?
        .len();
    let mut r = std::io::BufReader::with_capacity(1 << 16, file);
    let mut header = [0u8; HEADER];
    if len < HEADER as u64 {
        return Err(corrupt("shorter than its header".into()));
    }
    r.read_exact(&mut header)
        .map_err(|e| Error::io(&files.index, e))?;
    if &header[..8] != MAGIC {
        return Err(corrupt("bad header".into()));
    }
    let width = match u32_at(&header, 8) {
        16 => TokenWidth::U16,
        32 => TokenWidth::U32,
        w => return Err(corrupt(format!("token width {w} bits"))),
    };
    let samples = u64_at(&header, 16);
    let total = u64_at(&header, 24);
    let expect_len = u128::from(samples) * RECORD as u128 + HEADER as u128;
    if u128::from(len) != expect_len {
        return Err(corrupt(format!(
            "{len} bytes for {samples} samples (expected {expect_len})"
        )));
    }
    let tok_bytes = std::fs::metadata(&files.tokens)
        .map_err(|e| Error::io(&files.tokens, e))?
        .len();
    if u128::from(tok_bytes) != u128::from(total) * width.bytes() as u128 {
        return Err(Error::CorruptShard {
            path: files.tokens.clone(),
            reason: format!(
                "{tok_bytes} bytes, index says {total} tokens of {} bytes",
                width.bytes()
            ),
        });
    }
    let mut prev = 0;
    let mut rec = [0u8; RECORD];
    for i in 0..samples {
        r.read_exact(&mut rec)
            .map_err(|e| Error::io(&files.index, e))?;
        let end = u64_at(&rec, 0);
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
    Ok((width, samples, total))
}

impl Shard {
    fn open(files: ShardFiles, access: ShardAccess) -> Result<Self> {
        let (width, samples, total) = validate(&files)?;
        let backing = match access {
            #[cfg(unix)]
            ShardAccess::Read => Backing::Read {
                tokens: File::open(&files.tokens).map_err(|e| Error::io(&files.tokens, e))?,
                index: File::open(&files.index).map_err(|e| Error::io(&files.index, e))?,
            },
            _ => {
                let index = map(&files.index)?.ok_or_else(|| Error::CorruptShard {
                    path: files.index.clone(),
                    reason: "empty index".into(),
                })?;
                Backing::Mapped {
                    tokens: map(&files.tokens)?,
                    index,
                }
            }
        };
        Ok(Self {
            files,
            width,
            samples,
            total,
            backing,
        })
    }

    /// Copy `buf.len()` bytes of the index from `at`.
    fn index_bytes(&self, at: usize, buf: &mut [u8]) -> Result<()> {
        match &self.backing {
            Backing::Mapped { index, .. } => {
                let src = index
                    .get(at..at + buf.len())
                    .ok_or_else(|| Error::CorruptShard {
                        path: self.files.index.clone(),
                        reason: "record outside the file".into(),
                    })?;
                buf.copy_from_slice(src);
                Ok(())
            }
            #[cfg(unix)]
            Backing::Read { index, .. } => {
                use std::os::unix::fs::FileExt;
                index
                    .read_exact_at(buf, at as u64)
                    .map_err(|e| Error::io(&self.files.index, e))
            }
        }
    }

    /// Token range and prompt length of sample `i` (one index read of two records).
    fn record(&self, i: u64) -> Result<(usize, usize, usize)> {
        let i = i as usize;
        if i == 0 {
            let mut b = [0u8; 12];
            self.index_bytes(HEADER, &mut b)?;
            return Ok((0, u64_at(&b, 0) as usize, u32_at(&b, 8) as usize));
        }
        let mut b = [0u8; RECORD + 12];
        self.index_bytes(HEADER + (i - 1) * RECORD, &mut b)?;
        Ok((
            u64_at(&b, 0) as usize,
            u64_at(&b, RECORD) as usize,
            u32_at(&b, RECORD + 8) as usize,
        ))
    }

    /// Copy token bytes `range` into `out`, decoding the shard's width.
    fn tokens_into(&self, first: usize, out: &mut [u32]) -> Result<()> {
        let w = self.width.bytes();
        let outside = || Error::CorruptShard {
            path: self.files.tokens.clone(),
            reason: "token range outside the file".into(),
        };
        match &self.backing {
            Backing::Mapped { tokens, .. } => {
                let bytes = tokens.as_deref().unwrap_or(&[]);
                let src = bytes
                    .get(first * w..(first + out.len()) * w)
                    .ok_or_else(outside)?;
                decode(self.width, src, out);
                Ok(())
            }
            #[cfg(unix)]
            Backing::Read { tokens, .. } => {
                use std::os::unix::fs::FileExt;
                let mut buf = [0u8; 8192];
                let per = buf.len() / w;
                let mut done = 0;
                while done < out.len() {
                    let n = per.min(out.len() - done);
                    let at = ((first + done) * w) as u64;
                    tokens
                        .read_exact_at(&mut buf[..n * w], at)
                        .map_err(|e| Error::io(&self.files.tokens, e))?;
                    decode(self.width, &buf[..n * w], &mut out[done..done + n]);
                    done += n;
                }
                Ok(())
            }
        }
    }
}

fn decode(width: TokenWidth, src: &[u8], out: &mut [u32]) {
    match width {
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
}

/// A set of shards read as one [`TokenDataset`]; sample ids run through the shards in order.
#[derive(Debug)]
pub struct TokenShards {
    shards: Vec<Shard>,
    /// `starts[i]` is the first sample id of shard `i`; one extra entry holds the total.
    starts: Vec<u64>,
}

impl TokenShards {
    /// Open shards by their file pairs, validating each, memory-mapped.
    pub fn open(files: impl IntoIterator<Item = ShardFiles>) -> Result<Self> {
        Self::open_with(files, ShardAccess::Mapped)
    }

    /// Open shards by their file pairs, validating each, with the given access.
    pub fn open_with(
        files: impl IntoIterator<Item = ShardFiles>,
        access: ShardAccess,
    ) -> Result<Self> {
        let mut shards = Vec::new();
        let mut starts = vec![0];
        let mut n = 0;
        for f in files {
            let s = Shard::open(f, access)?;
            n += s.samples;
            starts.push(n);
            shards.push(s);
        }
        Ok(Self { shards, starts })
    }

    /// Open every shard (`*.index` with its `.tokens`) in `dir`, in file-name order.
    pub fn open_dir(dir: &Path, access: ShardAccess) -> Result<Self> {
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
        Self::open_with(names.iter().map(|n| ShardFiles::new(dir, n)), access)
    }

    /// Total tokens of all shards.
    pub fn total_tokens(&self) -> u64 {
        self.shards.iter().map(|s| s.total).sum()
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
        let (a, b, _) = s.record(i)?;
        Ok(b - a)
    }

    fn prompt_len(&self, id: u64) -> Result<usize> {
        let (s, i) = self.locate(id)?;
        Ok(s.record(i)?.2)
    }

    fn sample_info(&self, id: u64) -> Result<(usize, usize)> {
        let (s, i) = self.locate(id)?;
        let (a, b, p) = s.record(i)?;
        Ok((b - a, p))
    }

    fn read_tokens(&self, id: u64, start: usize, out: &mut [u32]) -> Result<()> {
        let (s, i) = self.locate(id)?;
        let (a, b, _) = s.record(i)?;
        let end = start.saturating_add(out.len());
        if end > b - a {
            return Err(Error::TokenRangeOutOfRange {
                id,
                start,
                end,
                len: b - a,
            });
        }
        s.tokens_into(a + start, out)
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
        let s = TokenShards::open_dir(dir.path(), ShardAccess::Mapped).unwrap();
        let r = TokenShards::open_dir(dir.path(), ShardAccess::Read).unwrap();
        for id in 0..6 {
            let n = s.sample_len(id).unwrap();
            assert_eq!(n, r.sample_len(id).unwrap());
            assert_eq!(s.prompt_len(id).unwrap(), r.prompt_len(id).unwrap());
            let (mut x, mut y) = (vec![0; n], vec![0; n]);
            s.read_tokens(id, 0, &mut x).unwrap();
            r.read_tokens(id, 0, &mut y).unwrap();
            assert_eq!(x, y);
        }
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
