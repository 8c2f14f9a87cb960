//! Labelled texts for sequence classification and (anchor, positive) text pairs for
//! embedding fine-tuning, carried through the ordinary [`Loader`](crate::Loader).
//!
//! ## Rows
//!
//! Each example is stored as one sample whose first token is a *header* — the class id for
//! classification, the anchor's length for a pair — followed by the encoded text(s):
//!
//! - classification: `[label, CLS, text…, SEP]`;
//! - pairs: `[anchor_len, CLS, anchor…, SEP, CLS, positive…, SEP]`.
//!
//! Texts are truncated to `max_len` tokens (specials included) when the dataset is built, so
//! every sample fits one row; [`LabeledDataset::loader_options`] gives the loader settings
//! that put exactly one example in each row (best-fit packing with a window of one: no
//! packing across examples, no EOS). Order, rank sharding, the resumable cursor and the
//! trainer's quarantine of batches are therefore the loader's own, unchanged.
//! [`classification_rows`] and [`pair_rows`] turn rows of such a batch back into padded id
//! and attention-mask arrays (padded to the longest example of the rows asked for) plus the
//! labels.
//!
//! ## JSONL input
//!
//! [`LabeledDataset::read_jsonl`] reads one object per line: a text field and a label field
//! (an integer class id, or a string mapped through a [`LabelMap`]), or two text fields for
//! pairs. String labels get ids in sorted order of the distinct names, so the map does not
//! depend on the order of the rows; save it with the run ([`LabelMap::save`]) and pass it
//! back for evaluation and resume. Bad records — malformed JSON, a missing or empty field, a
//! label of another type (a float, a boolean, an object; strings in a file whose labels are
//! integers), a class id out of range, a name missing from a given map — are skipped,
//! counted and written to the quarantine file like the other sources' records; above
//! `max_error_fraction` reading stops with [`Error::TooManyBadRecords`].

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::order::mix64;
use crate::stream::{FieldPath, QuarantineEntry, QuarantineReason, StreamOptions, StreamStats};
use crate::tokenize::TextTokenizer;
use crate::{Batch, Error, InMemoryDataset, LoaderOptions, Packing, Result, TokenDataset};

/// What a labelled dataset holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabeledKind {
    /// A text and a class id per example.
    Classification,
    /// An (anchor, positive) pair of texts per example.
    Pairs,
}

/// Class names in id order: id `i` is `names[i]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelMap {
    labels: Vec<String>,
}

impl LabelMap {
    /// A map from names in id order; names must be distinct.
    pub fn new(labels: Vec<String>) -> Result<Self> {
        let distinct: BTreeSet<&String> = labels.iter().collect();
        if distinct.len() != labels.len() {
            return Err(Error::InvalidOption {
                option: "label_map",
                reason: "names must be distinct".into(),
            });
        }
        Ok(Self { labels })
    }

    /// The names in id order.
    pub fn names(&self) -> &[String] {
        &self.labels
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The id of `name`.
    pub fn id(&self, name: &str) -> Option<u32> {
        self.labels
            .iter()
            .position(|l| l == name)
            .and_then(|i| u32::try_from(i).ok())
    }

    /// Writes `{"labels": [...]}` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| Error::Metadata {
            path: path.to_owned(),
            source,
        })?;
        crate::tokenize::write_atomic(path, &bytes)
    }

    /// Reads a map written by [`LabelMap::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let m: LabelMap = serde_json::from_slice(&bytes).map_err(|source| Error::Metadata {
            path: path.to_owned(),
            source,
        })?;
        Self::new(m.labels)
    }
}

/// Settings of [`LabeledDataset::read_jsonl`].
#[derive(Debug, Clone, PartialEq)]
pub struct LabeledOptions {
    /// Classification or pairs.
    pub kind: LabeledKind,
    /// The text (classification) or the anchor (pairs).
    pub text_field: FieldPath,
    /// The label (classification).
    pub label_field: FieldPath,
    /// The positive text (pairs).
    pub positive_field: FieldPath,
    /// Tokens kept per text, specials included (at least 3 with both specials).
    pub max_len: usize,
    /// Token put before each text (BERT's `[CLS]`).
    pub cls_id: Option<u32>,
    /// Token put after each text (BERT's `[SEP]`).
    pub sep_id: Option<u32>,
    /// Number of classes; `None`: the label map's size, or the largest id + 1.
    pub num_labels: Option<usize>,
    /// A fixed map for string labels (resume, evaluation); `None` builds it from the data.
    pub label_map: Option<LabelMap>,
    /// Line length limit, error fraction and quarantine file.
    pub stream: StreamOptions,
}

impl LabeledOptions {
    /// Classification on `text`/`label` fields, 128 tokens, no specials.
    pub fn classification(max_len: usize) -> Self {
        Self {
            kind: LabeledKind::Classification,
            text_field: FieldPath::parse("text"),
            label_field: FieldPath::parse("label"),
            positive_field: FieldPath::parse("positive"),
            max_len,
            cls_id: None,
            sep_id: None,
            num_labels: None,
            label_map: None,
            stream: StreamOptions::default(),
        }
    }

    /// Pairs on `anchor`/`positive` fields, 128 tokens per text, no specials.
    pub fn pairs(max_len: usize) -> Self {
        Self {
            kind: LabeledKind::Pairs,
            text_field: FieldPath::parse("anchor"),
            ..Self::classification(max_len)
        }
    }

    /// Sets BERT's `[CLS]`/`[SEP]` from the tokenizer's vocabulary (error when missing).
    pub fn with_bert_specials(mut self, tokenizer: &TextTokenizer) -> Result<Self> {
        let get = |what: &'static str, token: &'static str| {
            tokenizer
                .token_id(token)
                .ok_or_else(|| Error::MissingSpecialToken {
                    what,
                    token: token.to_string(),
                })
        };
        self.cls_id = Some(get("classification", "[CLS]")?);
        self.sep_id = Some(get("separator", "[SEP]")?);
        Ok(self)
    }
}

/// Labelled examples in memory, one sample per example (see the module docs for the layout).
#[derive(Debug, Clone)]
pub struct LabeledDataset {
    kind: LabeledKind,
    data: InMemoryDataset,
    num_labels: usize,
    label_map: Option<LabelMap>,
    max_len: usize,
    stats: StreamStats,
}

fn too_short(max_len: usize) -> Error {
    Error::InvalidOption {
        option: "max_len",
        reason: format!("{max_len} leaves no room for a token"),
    }
}

/// `[CLS] body [SEP]` cut to `max_len` tokens.
fn frame(body: &[u32], max_len: usize, cls: Option<u32>, sep: Option<u32>) -> Vec<u32> {
    let specials = usize::from(cls.is_some()) + usize::from(sep.is_some());
    let keep = body.len().min(max_len.saturating_sub(specials));
    let mut out = Vec::with_capacity(keep + specials);
    out.extend(cls);
    out.extend_from_slice(&body[..keep]);
    out.extend(sep);
    out
}

impl LabeledDataset {
    fn empty(kind: LabeledKind, max_len: usize) -> Result<Self> {
        if max_len == 0 || u32::try_from(max_len).is_err() {
            return Err(too_short(max_len));
        }
        Ok(Self {
            kind,
            data: InMemoryDataset::new(),
            num_labels: 0,
            label_map: None,
            max_len,
            stats: StreamStats::default(),
        })
    }

    /// A classification set from already encoded texts (each cut to `max_len` tokens) and
    /// class ids below `num_labels`.
    pub fn classification<I>(rows: I, max_len: usize, num_labels: usize) -> Result<Self>
    where
        I: IntoIterator<Item = (Vec<u32>, u32)>,
    {
        if num_labels < 2 {
            return Err(Error::InvalidOption {
                option: "num_labels",
                reason: format!("{num_labels} (classification needs at least 2 classes)"),
            });
        }
        let mut d = Self::empty(LabeledKind::Classification, max_len)?;
        d.num_labels = num_labels;
        for (i, (text, label)) in rows.into_iter().enumerate() {
            if label as usize >= num_labels || text.is_empty() {
                return Err(Error::InvalidOption {
                    option: "rows",
                    reason: format!(
                        "row {i}: label {label} of {num_labels} classes, {} tokens",
                        text.len()
                    ),
                });
            }
            d.push_classification(&text, label);
        }
        Ok(d)
    }

    /// A pair set from already encoded (anchor, positive) texts, each cut to `max_len`.
    pub fn pairs<I>(rows: I, max_len: usize) -> Result<Self>
    where
        I: IntoIterator<Item = (Vec<u32>, Vec<u32>)>,
    {
        let mut d = Self::empty(LabeledKind::Pairs, max_len)?;
        for (i, (a, p)) in rows.into_iter().enumerate() {
            if a.is_empty() || p.is_empty() {
                return Err(Error::InvalidOption {
                    option: "rows",
                    reason: format!("pair {i} has an empty text"),
                });
            }
            d.push_pair(&a, &p);
        }
        Ok(d)
    }

    fn push_classification(&mut self, text: &[u32], label: u32) {
        let keep = text.len().min(self.max_len);
        let mut s = Vec::with_capacity(keep + 1);
        s.push(label);
        s.extend_from_slice(&text[..keep]);
        self.data.push(&s, 0);
    }

    fn push_pair(&mut self, anchor: &[u32], positive: &[u32]) {
        let a = anchor.len().min(self.max_len);
        let p = positive.len().min(self.max_len);
        let mut s = Vec::with_capacity(1 + a + p);
        s.push(a as u32);
        s.extend_from_slice(&anchor[..a]);
        s.extend_from_slice(&positive[..p]);
        self.data.push(&s, 0);
    }

    /// Reads labelled JSONL files (see the module docs), encodes the texts with `tokenizer`
    /// and frames them with `opts.cls_id`/`opts.sep_id`.
    pub fn read_jsonl(
        files: &[PathBuf],
        tokenizer: &TextTokenizer,
        opts: &LabeledOptions,
    ) -> Result<Self> {
        let specials = usize::from(opts.cls_id.is_some()) + usize::from(opts.sep_id.is_some());
        if opts.max_len <= specials {
            return Err(too_short(opts.max_len));
        }
        let mut reader = Reader::new(files, opts)?;
        let raw = reader.read_all()?;
        let mut d = Self::empty(opts.kind, opts.max_len)?;
        let frame_all = |texts: Vec<&str>| -> Result<Vec<Vec<u32>>> {
            let enc = tokenizer.encode_batch(&texts)?;
            Ok(enc
                .iter()
                .map(|b| frame(b, opts.max_len, opts.cls_id, opts.sep_id))
                .collect())
        };
        match opts.kind {
            LabeledKind::Classification => {
                let (labels, map, num_labels) = reader.assign_labels(&raw, opts)?;
                let texts = frame_all(raw.iter().map(|r| r.text.as_str()).collect())?;
                for (t, l) in texts.iter().zip(labels) {
                    if let Some(l) = l {
                        d.push_classification(t, l);
                    }
                }
                d.num_labels = num_labels;
                d.label_map = map;
            }
            LabeledKind::Pairs => {
                let a = frame_all(raw.iter().map(|r| r.text.as_str()).collect())?;
                let p = frame_all(raw.iter().map(|r| r.second.as_str()).collect())?;
                for (a, p) in a.iter().zip(&p) {
                    d.push_pair(a, p);
                }
            }
        }
        reader.finish(d.data.len())?;
        d.stats = reader.stats;
        if d.data.is_empty() {
            return Err(Error::InvalidOption {
                option: "dataset",
                reason: format!("no valid labelled record in {} file(s)", files.len()),
            });
        }
        Ok(d)
    }

    /// Classification or pairs.
    pub fn kind(&self) -> LabeledKind {
        self.kind
    }

    /// Number of classes (0 for pairs).
    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// The map of string labels, when the labels were strings.
    pub fn label_map(&self) -> Option<&LabelMap> {
        self.label_map.as_ref()
    }

    /// Tokens kept per text.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokens of a loader row: the header and one text, or two for pairs.
    pub fn row_len(&self) -> usize {
        match self.kind {
            LabeledKind::Classification => 1 + self.max_len,
            LabeledKind::Pairs => 1 + 2 * self.max_len,
        }
    }

    /// Records read, skipped and quarantined by [`LabeledDataset::read_jsonl`].
    pub fn stats(&self) -> &StreamStats {
        &self.stats
    }

    /// The class id of example `id` (classification).
    pub fn label(&self, id: u64) -> Result<u32> {
        Ok(self.data.sample(id)?.first().copied().unwrap_or(0))
    }

    /// How many examples have each class id (classification).
    pub fn label_counts(&self) -> Result<Vec<u64>> {
        let mut c = vec![0u64; self.num_labels];
        for id in 0..self.data.len() {
            if let Some(n) = c.get_mut(self.label(id)? as usize) {
                *n += 1;
            }
        }
        Ok(c)
    }

    /// Loader settings that give one example per row: rows of [`LabeledDataset::row_len`]
    /// tokens, best-fit packing with a window of one, no EOS.
    pub fn loader_options(
        &self,
        rows_per_step: usize,
        seed: u64,
        shuffle: bool,
        epochs: Option<u64>,
    ) -> LoaderOptions {
        LoaderOptions {
            seq_len: self.row_len(),
            rows_per_step,
            packing: Packing::BestFit { window: 1 },
            eos_id: None,
            pad_id: 0,
            seed,
            shuffle,
            epochs,
        }
    }

    /// Splits off `round(fraction · len)` examples (at least one left for training) chosen by
    /// a seeded hash of their index, so the split depends on neither the order of classes in
    /// the files nor the number of ranks: returns `(train, held_out)`.
    pub fn split_holdout(&self, fraction: f64, seed: u64) -> Result<(Self, Self)> {
        let n = self.data.len();
        let held = ((n as f64) * fraction.clamp(0.0, 1.0)).round() as u64;
        let held = held.min(n.saturating_sub(1));
        let mut order: Vec<(u64, u64)> = (0..n).map(|i| (mix64(seed ^ mix64(i)), i)).collect();
        order.sort_unstable();
        let out: BTreeSet<u64> = order.iter().take(held as usize).map(|&(_, i)| i).collect();
        let mut train = Self {
            data: InMemoryDataset::new(),
            ..self.clone()
        };
        let mut eval = train.clone();
        eval.stats = StreamStats::default();
        for id in 0..n {
            let s = self.data.sample(id)?;
            if out.contains(&id) {
                eval.data.push(s, 0);
            } else {
                train.data.push(s, 0);
            }
        }
        Ok((train, eval))
    }
}

impl TokenDataset for LabeledDataset {
    fn len(&self) -> u64 {
        self.data.len()
    }

    fn sample_len(&self, id: u64) -> Result<usize> {
        self.data.sample_len(id)
    }

    fn read_tokens(&self, id: u64, start: usize, out: &mut [u32]) -> Result<()> {
        self.data.read_tokens(id, start, out)
    }
}

/// Token ids and attention mask of rows padded to a common length, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Padded {
    /// Ids, `rows × len`.
    pub ids: Vec<u32>,
    /// 1 for tokens, 0 for padding, `rows × len`.
    pub mask: Vec<u32>,
    /// Rows.
    pub rows: usize,
    /// Tokens per row (the longest text of the rows).
    pub len: usize,
}

impl Padded {
    fn from_texts(texts: &[&[u32]], pad: u32) -> Self {
        let len = texts.iter().map(|t| t.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![pad; texts.len() * len];
        let mut mask = vec![0u32; texts.len() * len];
        for (r, t) in texts.iter().enumerate() {
            ids[r * len..r * len + t.len()].copy_from_slice(t);
            mask[r * len..r * len + t.len()].fill(1);
        }
        Self {
            ids,
            mask,
            rows: texts.len(),
            len,
        }
    }
}

/// Rows of a classification batch: texts and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassRows {
    /// The texts.
    pub texts: Padded,
    /// One class id per row.
    pub labels: Vec<u32>,
}

/// Rows of a pair batch: anchors and positives, row `i` of one matching row `i` of the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairRows {
    /// The anchors.
    pub anchors: Padded,
    /// The positives.
    pub positives: Padded,
}

fn not_labeled(row: usize, reason: &str) -> Error {
    Error::InvalidOption {
        option: "labelled batch",
        reason: format!(
            "row {row}: {reason} (build the loader with LabeledDataset::loader_options)"
        ),
    }
}

/// The example of row `r`: its one non-padding segment, header first.
fn row_sample(batch: &Batch, r: usize) -> Result<&[u32]> {
    let seq = batch.seq_len;
    let start = (r * seq) as u32;
    let seg = batch
        .cu_seqlens
        .binary_search(&start)
        .map_err(|_| not_labeled(r, "no segment starts at the row"))?;
    if batch.segment_is_padding.get(seg).copied().unwrap_or(true) {
        return Err(not_labeled(r, "the row is padding"));
    }
    let end = batch
        .cu_seqlens
        .get(seg + 1)
        .copied()
        .ok_or_else(|| not_labeled(r, "segment without an end"))?;
    let row_end = ((r + 1) * seq) as u32;
    if end < row_end
        && !batch
            .segment_is_padding
            .get(seg + 1)
            .copied()
            .unwrap_or(true)
    {
        return Err(not_labeled(r, "two examples share the row"));
    }
    let s = batch
        .input_ids
        .get(start as usize..end as usize)
        .ok_or_else(|| not_labeled(r, "segment outside the batch"))?;
    if s.len() < 2 {
        return Err(not_labeled(r, "an example without text"));
    }
    Ok(s)
}

/// Texts (padded with `pad` to the longest) and labels of rows `rows` of a classification
/// batch.
pub fn classification_rows(batch: &Batch, rows: Range<usize>, pad: u32) -> Result<ClassRows> {
    let mut texts = Vec::with_capacity(rows.len());
    let mut labels = Vec::with_capacity(rows.len());
    for r in rows {
        let s = row_sample(batch, r)?;
        labels.push(s[0]);
        texts.push(&s[1..]);
    }
    Ok(ClassRows {
        texts: Padded::from_texts(&texts, pad),
        labels,
    })
}

/// Anchors and positives (each padded with `pad` to its longest) of rows `rows` of a pair
/// batch.
pub fn pair_rows(batch: &Batch, rows: Range<usize>, pad: u32) -> Result<PairRows> {
    let mut a = Vec::with_capacity(rows.len());
    let mut p = Vec::with_capacity(rows.len());
    for r in rows {
        let s = row_sample(batch, r)?;
        let n = s[0] as usize;
        if n == 0 || 1 + n >= s.len() {
            return Err(not_labeled(r, "the anchor length does not split the pair"));
        }
        a.push(&s[1..1 + n]);
        p.push(&s[1 + n..]);
    }
    Ok(PairRows {
        anchors: Padded::from_texts(&a, pad),
        positives: Padded::from_texts(&p, pad),
    })
}

/// One record's text fields and raw label, before labels get ids.
struct RawRecord {
    text: String,
    second: String,
    label: Value,
    file: usize,
    line: u64,
    offset: u64,
}

/// Line reader with quarantine and error accounting.
struct Reader<'a> {
    files: &'a [PathBuf],
    opts: &'a LabeledOptions,
    stats: StreamStats,
    quarantine: Option<std::fs::File>,
    last_bad: (usize, u64),
}

fn text_of(v: &Value, field: &FieldPath) -> std::result::Result<String, QuarantineReason> {
    match field_get(v, field) {
        None | Some(Value::Null) => Err(QuarantineReason::MissingField {
            field: field.to_string(),
        }),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(_) => Err(QuarantineReason::WrongType {
            field: field.to_string(),
            expected: "a non-empty string".into(),
        }),
    }
}

fn field_get<'v>(v: &'v Value, field: &FieldPath) -> Option<&'v Value> {
    field.to_string().split('.').try_fold(v, |v, k| v.get(k))
}

impl<'a> Reader<'a> {
    fn new(files: &'a [PathBuf], opts: &'a LabeledOptions) -> Result<Self> {
        let quarantine = match &opts.stream.quarantine {
            Some(p) => {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                }
                Some(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                        .map_err(|e| Error::io(p, e))?,
                )
            }
            None => None,
        };
        Ok(Self {
            files,
            opts,
            stats: StreamStats::default(),
            quarantine,
            last_bad: (0, 0),
        })
    }

    fn bad(&mut self, file: usize, line: u64, offset: u64, reason: QuarantineReason) -> Result<()> {
        self.stats.bad += 1;
        *self
            .stats
            .bad_by_reason
            .entry(reason.name().to_owned())
            .or_default() += 1;
        self.last_bad = (file, line);
        let path = self.files.get(file).cloned().unwrap_or_default();
        tracing::debug!(file = %path.display(), line, reason = reason.name(), "quarantined labelled record");
        if let Some(q) = &mut self.quarantine {
            let entry = QuarantineEntry {
                file: path,
                line,
                byte_offset: offset,
                reason,
            };
            let qpath = self.opts.stream.quarantine.clone().unwrap_or_default();
            let mut bytes = serde_json::to_vec(&entry).map_err(|source| Error::Metadata {
                path: qpath.clone(),
                source,
            })?;
            bytes.push(b'\n');
            q.write_all(&bytes).map_err(|e| Error::io(&qpath, e))?;
        }
        Ok(())
    }

    /// Every record with its text fields; the label is checked for type only.
    fn read_all(&mut self) -> Result<Vec<RawRecord>> {
        let mut out = Vec::new();
        let max = self.opts.stream.max_line_bytes;
        for (fi, path) in self.files.iter().enumerate() {
            self.stats.files += 1;
            let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let mut r = BufReader::new(f);
            let mut buf = Vec::new();
            let (mut line, mut offset) = (0u64, 0u64);
            loop {
                buf.clear();
                let n = r
                    .read_until(b'\n', &mut buf)
                    .map_err(|e| Error::io(path, e))?;
                if n == 0 {
                    break;
                }
                line += 1;
                let at = offset;
                offset += n as u64;
                self.stats.bytes += n as u64;
                while buf.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
                    buf.pop();
                }
                if buf.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                if buf.len() > max {
                    let reason = QuarantineReason::LineTooLong {
                        bytes: buf.len() as u64,
                        limit: max as u64,
                    };
                    self.bad(fi, line, at, reason)?;
                    continue;
                }
                match self.parse(&buf, fi, line, at) {
                    Ok(rec) => out.push(rec),
                    Err(reason) => self.bad(fi, line, at, reason)?,
                }
            }
        }
        Ok(out)
    }

    fn parse(
        &self,
        bytes: &[u8],
        file: usize,
        line: u64,
        offset: u64,
    ) -> std::result::Result<RawRecord, QuarantineReason> {
        let text = std::str::from_utf8(bytes).map_err(|_| QuarantineReason::InvalidUtf8)?;
        let v: Value = serde_json::from_str(text).map_err(|e| QuarantineReason::MalformedJson {
            detail: e.to_string(),
        })?;
        if !v.is_object() {
            return Err(QuarantineReason::MalformedJson {
                detail: "not a JSON object".into(),
            });
        }
        let first = text_of(&v, &self.opts.text_field)?;
        let (second, label) = match self.opts.kind {
            LabeledKind::Pairs => (text_of(&v, &self.opts.positive_field)?, Value::Null),
            LabeledKind::Classification => {
                let field = &self.opts.label_field;
                let label = match field_get(&v, field) {
                    None | Some(Value::Null) => {
                        return Err(QuarantineReason::MissingField {
                            field: field.to_string(),
                        });
                    }
                    Some(l @ Value::String(s)) if !s.is_empty() => l.clone(),
                    Some(l @ Value::Number(n)) if n.as_u64().is_some() => l.clone(),
                    Some(_) => {
                        return Err(QuarantineReason::WrongType {
                            field: field.to_string(),
                            expected: "a class id (integer >= 0) or a class name (string)".into(),
                        });
                    }
                };
                (String::new(), label)
            }
        };
        Ok(RawRecord {
            text: first,
            second,
            label,
            file,
            line,
            offset,
        })
    }

    /// Class ids of the records (`None`: quarantined), the map of string labels and the
    /// number of classes.
    #[allow(clippy::type_complexity)]
    fn assign_labels(
        &mut self,
        raw: &[RawRecord],
        opts: &LabeledOptions,
    ) -> Result<(Vec<Option<u32>>, Option<LabelMap>, usize)> {
        let field = opts.label_field.to_string();
        // The kind of label: from a given map (strings), else from the first record.
        let strings = opts.label_map.is_some() || raw.first().is_some_and(|r| r.label.is_string());
        let map = match (&opts.label_map, strings) {
            (Some(m), _) => Some(m.clone()),
            (None, true) => {
                let names: BTreeSet<String> = raw
                    .iter()
                    .filter_map(|r| r.label.as_str().map(str::to_owned))
                    .collect();
                Some(LabelMap::new(names.into_iter().collect())?)
            }
            (None, false) => None,
        };
        let max_id = raw.iter().filter_map(|r| r.label.as_u64()).max();
        let num_labels = match (opts.num_labels, &map) {
            (Some(n), _) => n,
            (None, Some(m)) => m.len(),
            (None, None) => max_id.map_or(0, |m| m as usize + 1),
        };
        if let Some(m) = &map
            && m.len() > num_labels
        {
            return Err(Error::InvalidOption {
                option: "num_labels",
                reason: format!("{num_labels}, but the data has {} class names", m.len()),
            });
        }
        if num_labels < 2 {
            return Err(Error::InvalidOption {
                option: "num_labels",
                reason: format!("{num_labels} (classification needs at least 2 classes)"),
            });
        }
        let mut out = Vec::with_capacity(raw.len());
        for r in raw {
            let id = match (&map, &r.label) {
                (Some(m), Value::String(s)) => m.id(s).ok_or_else(|| QuarantineReason::WrongType {
                    field: field.clone(),
                    expected: format!("one of the class names {:?}", m.names()),
                }),
                (None, Value::Number(n)) => n
                    .as_u64()
                    .filter(|&i| (i as usize) < num_labels)
                    .map(|i| i as u32)
                    .ok_or_else(|| QuarantineReason::WrongType {
                        field: field.clone(),
                        expected: format!("a class id below {num_labels}"),
                    }),
                (Some(_), _) => Err(QuarantineReason::WrongType {
                    field: field.clone(),
                    expected: "a class name (string), like the other records".into(),
                }),
                (None, _) => Err(QuarantineReason::WrongType {
                    field: field.clone(),
                    expected: "a class id (integer), like the other records".into(),
                }),
            };
            match id {
                Ok(i) => out.push(Some(i)),
                Err(reason) => {
                    self.bad(r.file, r.line, r.offset, reason)?;
                    out.push(None);
                }
            }
        }
        Ok((out, map, num_labels))
    }

    /// Syncs the quarantine file, counts the `good` records and enforces the error fraction
    /// (always, at the end: every record is known).
    fn finish(&mut self, good: u64) -> Result<()> {
        if let Some(q) = &mut self.quarantine {
            let path = self.opts.stream.quarantine.clone().unwrap_or_default();
            q.sync_all().map_err(|e| Error::io(&path, e))?;
        }
        self.stats.documents = good;
        let last = (
            self.files.get(self.last_bad.0).cloned().unwrap_or_default(),
            self.last_bad.1,
        );
        check_fraction(&self.stats, &self.opts.stream, last)
    }
}

/// Checks the fraction of bad records once all are known.
fn check_fraction(stats: &StreamStats, opts: &StreamOptions, last: (PathBuf, u64)) -> Result<()> {
    let total = stats.documents + stats.bad;
    if total == 0 {
        return Ok(());
    }
    let fraction = stats.bad as f64 / total as f64;
    if fraction > opts.max_error_fraction {
        return Err(Error::TooManyBadRecords {
            bad: stats.bad,
            total,
            fraction,
            limit: opts.max_error_fraction,
            file: last.0,
            line: last.1,
        });
    }
    Ok(())
}

/// Per-class counts of a map of names, for logs: `name: count`.
pub fn describe_counts(map: Option<&LabelMap>, counts: &[u64]) -> String {
    let names: BTreeMap<usize, String> = map
        .map(|m| m.names().iter().cloned().enumerate().collect())
        .unwrap_or_default();
    counts
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let name = names.get(&i).cloned().unwrap_or_else(|| i.to_string());
            format!("{name}: {c}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}
