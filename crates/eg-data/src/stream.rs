//! Streaming documents from text and JSONL files with bounded memory and a quarantine.
//!
//! Files are read line by line through a fixed buffer; a line longer than
//! [`StreamOptions::max_line_bytes`] is skipped *while it is read* (never held in memory).
//! Bad data — invalid UTF-8, malformed JSON, missing or mistyped fields, empty files, binary
//! files, over-long lines — is skipped, counted, and recorded as one JSON line in the
//! quarantine file ([`QuarantineEntry`]). When the fraction of bad records exceeds
//! [`StreamOptions::max_error_fraction`] the stream yields [`Error::TooManyBadRecords`] and
//! ends. Nothing is dropped silently.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

/// How plain text files are cut into documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextSplit {
    /// Each non-empty line is a document.
    Lines,
    /// Blank-line-separated paragraphs are documents (capped at `max_line_bytes`).
    Paragraphs,
}

/// A dotted path to a JSON field, e.g. `text` or `data.body`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldPath(Vec<String>);

impl FieldPath {
    /// Parse `a.b.c`.
    pub fn parse(path: &str) -> Self {
        Self(path.split('.').map(str::to_owned).collect())
    }

    fn get<'v>(&self, v: &'v Value) -> Option<&'v Value> {
        self.0.iter().try_fold(v, |v, k| v.get(k))
    }
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

/// What a JSONL record holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JsonField {
    /// A string field: the document's text.
    Text(FieldPath),
    /// An array of `{"role": ..., "content": ...}` chat messages.
    Messages(FieldPath),
}

/// The format of the input files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Plain UTF-8 text.
    Text(TextSplit),
    /// One JSON object per line.
    Jsonl(JsonField),
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

/// A document read from a source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Document {
    /// Plain text.
    Text(String),
    /// A conversation (rendered with a chat template before tokenization).
    Chat(Vec<ChatMessage>),
}

/// A document and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The document.
    pub doc: Document,
    /// Index of its file in [`DocumentStream::files`].
    pub file: usize,
    /// Its (first) line, 1-based.
    pub line: u64,
}

/// Options of a [`DocumentStream`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Longest line kept, in bytes; longer lines are skipped and quarantined.
    pub max_line_bytes: usize,
    /// Largest tolerated fraction of bad records; above it the stream stops with an error.
    pub max_error_fraction: f64,
    /// The fraction is enforced once this many records were seen (and always at the end), so
    /// one bad first line does not stop a run.
    pub min_records_for_fraction: u64,
    /// Where to append quarantine entries (JSON lines); `None` keeps only the counters.
    pub quarantine: Option<PathBuf>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            max_line_bytes: 16 << 20,
            max_error_fraction: 0.01,
            min_records_for_fraction: 1000,
            quarantine: None,
        }
    }
}

/// Why a record was quarantined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum QuarantineReason {
    /// The line is not valid UTF-8.
    InvalidUtf8,
    /// The line is not valid JSON (or not an object).
    MalformedJson {
        /// The parser's message.
        detail: String,
    },
    /// The field is missing.
    MissingField {
        /// The field path.
        field: String,
    },
    /// The field has the wrong type.
    WrongType {
        /// The field path.
        field: String,
        /// What was expected.
        expected: String,
    },
    /// The file is empty.
    EmptyFile,
    /// The file looks binary (NUL bytes in its first block).
    BinaryFile,
    /// The line exceeds the maximum length.
    LineTooLong {
        /// Its length in bytes.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The file could not be opened or read.
    Unreadable {
        /// The I/O error.
        detail: String,
    },
}

impl QuarantineReason {
    /// A short stable name, e.g. `invalid_utf8`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::InvalidUtf8 => "invalid_utf8",
            Self::MalformedJson { .. } => "malformed_json",
            Self::MissingField { .. } => "missing_field",
            Self::WrongType { .. } => "wrong_type",
            Self::EmptyFile => "empty_file",
            Self::BinaryFile => "binary_file",
            Self::LineTooLong { .. } => "line_too_long",
            Self::Unreadable { .. } => "unreadable",
        }
    }
}

/// One quarantined record: a line of the quarantine file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    /// The input file.
    pub file: PathBuf,
    /// 1-based line, 0 for problems of the whole file.
    pub line: u64,
    /// Byte offset of the line's start in the file.
    pub byte_offset: u64,
    /// Why.
    #[serde(flatten)]
    pub reason: QuarantineReason,
}

/// Read a quarantine file back.
pub fn read_quarantine(path: &Path) -> Result<Vec<QuarantineEntry>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).map_err(|source| Error::Metadata {
                path: path.to_owned(),
                source,
            })
        })
        .collect()
}

/// Counters of a stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStats {
    /// Files opened.
    pub files: u64,
    /// Documents yielded.
    pub documents: u64,
    /// Bad records skipped.
    pub bad: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Bad records by [`QuarantineReason::name`].
    pub bad_by_reason: BTreeMap<String, u64>,
}

/// A line (or an over-long line that was skipped).
enum Line {
    Text { line: u64, offset: u64 },
    TooLong { line: u64, offset: u64, bytes: u64 },
}

/// Reads lines through `BufRead` without ever holding more than `max` bytes of one line.
struct LineReader {
    inner: BufReader<File>,
    line: u64,
    offset: u64,
}

impl LineReader {
    fn next(&mut self, buf: &mut Vec<u8>, max: usize) -> std::io::Result<Option<Line>> {
        buf.clear();
        let start = self.offset;
        let mut len: u64 = 0;
        let mut too_long = false;
        loop {
            let avail = self.inner.fill_buf()?;
            if avail.is_empty() {
                if self.offset == start {
                    return Ok(None);
                }
                break;
            }
            let (chunk, used, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (&avail[..i], i + 1, true),
                None => (avail, avail.len(), false),
            };
            len += chunk.len() as u64;
            if !too_long && buf.len() + chunk.len() <= max {
                buf.extend_from_slice(chunk);
            } else {
                too_long = true;
                buf.clear();
            }
            self.inner.consume(used);
            self.offset += used as u64;
            if done {
                break;
            }
        }
        self.line += 1;
        if too_long {
            return Ok(Some(Line::TooLong {
                line: self.line,
                offset: start,
                bytes: len,
            }));
        }
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        Ok(Some(Line::Text {
            line: self.line,
            offset: start,
        }))
    }
}

/// Documents streamed from files, one at a time, with quarantine and error accounting.
#[derive(Debug)]
pub struct DocumentStream {
    files: Vec<PathBuf>,
    format: Format,
    opts: StreamOptions,
    next_file: usize,
    reader: Option<ReaderState>,
    quarantine: Option<BufWriter<File>>,
    stats: StreamStats,
    buf: Vec<u8>,
    done: bool,
}

struct ReaderState {
    file: usize,
    lines: LineReader,
    paragraph: String,
    paragraph_line: u64,
}

impl std::fmt::Debug for ReaderState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReaderState")
            .field("file", &self.file)
            .field("line", &self.lines.line)
            .finish()
    }
}

impl DocumentStream {
    /// A stream over `files` (see [`expand_inputs`](crate::expand_inputs)) in the given order.
    pub fn new(files: Vec<PathBuf>, format: Format, opts: StreamOptions) -> Result<Self> {
        if !(0.0..=1.0).contains(&opts.max_error_fraction) {
            return Err(Error::InvalidOption {
                option: "max_error_fraction",
                reason: format!("must be in [0, 1], got {}", opts.max_error_fraction),
            });
        }
        let quarantine = match &opts.quarantine {
            Some(p) => {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                }
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| Error::io(p, e))?;
                Some(BufWriter::new(f))
            }
            None => None,
        };
        Ok(Self {
            files,
            format,
            opts,
            next_file: 0,
            reader: None,
            quarantine,
            stats: StreamStats::default(),
            buf: Vec::new(),
            done: false,
        })
    }

    /// The input files.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Counters so far.
    pub fn stats(&self) -> &StreamStats {
        &self.stats
    }

    /// Record a bad record; returns the error that stops the stream when over the limit.
    fn bad(
        &mut self,
        file: usize,
        line: u64,
        byte_offset: u64,
        reason: QuarantineReason,
    ) -> Result<()> {
        self.stats.bad += 1;
        *self
            .stats
            .bad_by_reason
            .entry(reason.name().to_owned())
            .or_default() += 1;
        let path = self.files[file].clone();
        tracing::debug!(file = %path.display(), line, reason = reason.name(), "quarantined record");
        if let Some(q) = &mut self.quarantine {
            let entry = QuarantineEntry {
                file: path.clone(),
                line,
                byte_offset,
                reason,
            };
            let qpath = self.opts.quarantine.clone().unwrap_or_default();
            let mut bytes = serde_json::to_vec(&entry).map_err(|source| Error::Metadata {
                path: qpath.clone(),
                source,
            })?;
            bytes.push(b'\n');
            q.write_all(&bytes)
                .and_then(|()| q.flush())
                .map_err(|e| Error::io(&qpath, e))?;
        }
        let total = self.stats.bad + self.stats.documents;
        if total >= self.opts.min_records_for_fraction {
            self.check_fraction(path, line)?;
        }
        Ok(())
    }

    fn check_fraction(&self, file: PathBuf, line: u64) -> Result<()> {
        let total = self.stats.bad + self.stats.documents;
        if total == 0 {
            return Ok(());
        }
        let fraction = self.stats.bad as f64 / total as f64;
        if fraction > self.opts.max_error_fraction {
            return Err(Error::TooManyBadRecords {
                bad: self.stats.bad,
                total,
                fraction,
                limit: self.opts.max_error_fraction,
                file,
                line,
            });
        }
        Ok(())
    }

    /// Open the next file, quarantining empty, binary and unreadable ones.
    fn open_next(&mut self) -> Result<bool> {
        while self.next_file < self.files.len() {
            let i = self.next_file;
            self.next_file += 1;
            self.stats.files += 1;
            let path = &self.files[i];
            let mut reader = match File::open(path) {
                Ok(f) => BufReader::with_capacity(64 << 10, f),
                Err(e) => {
                    self.bad(
                        i,
                        0,
                        0,
                        QuarantineReason::Unreadable {
                            detail: e.to_string(),
                        },
                    )?;
                    continue;
                }
            };
            let head = match reader.fill_buf() {
                Ok(h) => h,
                Err(e) => {
                    self.bad(
                        i,
                        0,
                        0,
                        QuarantineReason::Unreadable {
                            detail: e.to_string(),
                        },
                    )?;
                    continue;
                }
            };
            if head.is_empty() {
                self.bad(i, 0, 0, QuarantineReason::EmptyFile)?;
                continue;
            }
            if head.contains(&0) {
                self.bad(i, 0, 0, QuarantineReason::BinaryFile)?;
                continue;
            }
            self.reader = Some(ReaderState {
                file: i,
                lines: LineReader {
                    inner: reader,
                    line: 0,
                    offset: 0,
                },
                paragraph: String::new(),
                paragraph_line: 0,
            });
            return Ok(true);
        }
        Ok(false)
    }

    fn next_record(&mut self) -> Result<Option<Record>> {
        loop {
            if self.reader.is_none() && !self.open_next()? {
                let last = self.files.last().cloned().unwrap_or_default();
                self.check_fraction(last, 0)?;
                return Ok(None);
            }
            let max = self.opts.max_line_bytes;
            let Some(st) = self.reader.as_mut() else {
                continue;
            };
            let file = st.file;
            let mut buf = std::mem::take(&mut self.buf);
            let line = st
                .lines
                .next(&mut buf, max)
                .map_err(|e| Error::io(&self.files[file], e));
            let line = match line {
                Ok(l) => l,
                Err(e) => {
                    self.buf = buf;
                    return Err(e);
                }
            };
            let out = self.handle_line(file, line, &buf);
            self.buf = buf;
            if let Some(r) = out? {
                self.stats.documents += 1;
                return Ok(Some(r));
            }
        }
    }

    /// Turn one line into at most one record (or a quarantine entry).
    fn handle_line(
        &mut self,
        file: usize,
        line: Option<Line>,
        buf: &[u8],
    ) -> Result<Option<Record>> {
        let (line_no, offset) = match line {
            None => {
                // End of file: flush a pending paragraph.
                let st = self.reader.take();
                return Ok(st.and_then(|st| {
                    (!st.paragraph.trim().is_empty()).then_some(Record {
                        doc: Document::Text(st.paragraph),
                        file,
                        line: st.paragraph_line,
                    })
                }));
            }
            Some(Line::TooLong {
                line,
                offset,
                bytes,
            }) => {
                self.stats.bytes += bytes;
                let limit = self.opts.max_line_bytes as u64;
                self.bad(
                    file,
                    line,
                    offset,
                    QuarantineReason::LineTooLong { bytes, limit },
                )?;
                return Ok(None);
            }
            Some(Line::Text { line, offset }) => (line, offset),
        };
        self.stats.bytes += buf.len() as u64 + 1;
        let Ok(text) = std::str::from_utf8(buf) else {
            self.bad(file, line_no, offset, QuarantineReason::InvalidUtf8)?;
            return Ok(None);
        };
        match self.format.clone() {
            Format::Text(TextSplit::Lines) => Ok((!text.trim().is_empty()).then(|| Record {
                doc: Document::Text(text.to_owned()),
                file,
                line: line_no,
            })),
            Format::Text(TextSplit::Paragraphs) => {
                let max = self.opts.max_line_bytes;
                let Some(st) = self.reader.as_mut() else {
                    return Ok(None);
                };
                if text.trim().is_empty() || st.paragraph.len() + text.len() + 1 > max {
                    let para = std::mem::take(&mut st.paragraph);
                    let first = st.paragraph_line;
                    if !text.trim().is_empty() {
                        st.paragraph.push_str(text);
                        st.paragraph_line = line_no;
                    }
                    return Ok((!para.trim().is_empty()).then_some(Record {
                        doc: Document::Text(para),
                        file,
                        line: first,
                    }));
                }
                if st.paragraph.is_empty() {
                    st.paragraph_line = line_no;
                } else {
                    st.paragraph.push('\n');
                }
                st.paragraph.push_str(text);
                Ok(None)
            }
            Format::Jsonl(field) => {
                if text.trim().is_empty() {
                    return Ok(None);
                }
                match parse_json(text, &field) {
                    Ok(doc) => Ok(Some(Record {
                        doc,
                        file,
                        line: line_no,
                    })),
                    Err(reason) => {
                        self.bad(file, line_no, offset, reason)?;
                        Ok(None)
                    }
                }
            }
        }
    }
}

fn parse_json(text: &str, field: &JsonField) -> std::result::Result<Document, QuarantineReason> {
    let v: Value = serde_json::from_str(text).map_err(|e| QuarantineReason::MalformedJson {
        detail: e.to_string(),
    })?;
    if !v.is_object() {
        return Err(QuarantineReason::MalformedJson {
            detail: "not a JSON object".into(),
        });
    }
    let (path, want_messages) = match field {
        JsonField::Text(p) => (p, false),
        JsonField::Messages(p) => (p, true),
    };
    let value = path.get(&v).ok_or_else(|| QuarantineReason::MissingField {
        field: path.to_string(),
    })?;
    let wrong = |expected: &str| QuarantineReason::WrongType {
        field: path.to_string(),
        expected: expected.into(),
    };
    if !want_messages {
        return value
            .as_str()
            .map(|s| Document::Text(s.to_owned()))
            .ok_or_else(|| wrong("string"));
    }
    let arr = value.as_array().ok_or_else(|| wrong("array of messages"))?;
    let mut msgs = Vec::with_capacity(arr.len());
    for m in arr {
        let role = m.get("role").and_then(Value::as_str);
        let content = m.get("content").and_then(Value::as_str);
        match (role, content) {
            (Some(r), Some(c)) => msgs.push(ChatMessage {
                role: r.to_owned(),
                content: c.to_owned(),
            }),
            _ => return Err(wrong("messages with string role and content")),
        }
    }
    if msgs.is_empty() {
        return Err(wrong("non-empty array of messages"));
    }
    Ok(Document::Chat(msgs))
}

impl Iterator for DocumentStream {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_record() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
