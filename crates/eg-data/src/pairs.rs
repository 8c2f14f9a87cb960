//! Preference pairs for DPO: a dataset of (prompt, chosen, rejected) token sequences and a
//! loader that keeps each pair together.
//!
//! [`PairDataset`] reads JSONL with TRL's field names (`prompt`, `chosen`, `rejected`;
//! configurable with [`PairFields`]). The prompt is a string, or a list of chat messages that
//! is rendered with a [`ChatTemplate`] (the responses then become the assistant's turn, so the
//! template's assistant header ends the prompt and its end marker ends each response);
//! `chosen`/`rejected` are strings or message lists whose last assistant message is taken.
//!
//! [`PairLoader`] emits, per global step, `pairs_per_step` pairs as `2 × pairs` rows: row `2i`
//! is prompt + chosen, row `2i + 1` prompt + rejected, each one segment padded to `seq_len`,
//! with `loss_mask` on the response tokens only. Pairs (never rows) are shuffled per epoch
//! with the seeded permutation of [`crate::order`] and sharded over ranks by pair, so a pair
//! never straddles ranks or micro-batches of an even size. The [`PairCursor`] is global (the
//! same on every rank) and a restored loader continues bitwise identically.
//!
//! Truncation: a prompt keeps at most `seq_len / 2` tokens (its *end* is kept, closest to the
//! response); each response is cut at the end to fit the row.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::order::{EpochPermutation, SplitMix64, mix64, shard_range};
use crate::stream::ChatMessage;
use crate::tokenize::{ChatTemplate, TextTokenizer};
use crate::{Batch, Cursor, Error, Loader, Placement, Result};

/// A stream of batches whose position can be saved and restored: what the trainer consumes.
///
/// Implemented by the packing [`Loader`] and by [`PairLoader`]. The cursor is opaque JSON
/// (what checkpoints store); a cursor of one kind of source does not restore into another.
pub trait BatchSource: Send {
    /// The next batch of this rank, or `None` when the configured epochs are exhausted.
    fn next_batch(&mut self) -> Result<Option<Batch>>;
    /// The position after the last batch returned, as JSON bytes.
    fn cursor_json(&self) -> Result<Vec<u8>>;
    /// Continue from a position saved by [`BatchSource::cursor_json`].
    fn restore_json(&mut self, bytes: &[u8]) -> Result<()>;
}

impl<T: BatchSource + ?Sized> BatchSource for Box<T> {
    fn next_batch(&mut self) -> Result<Option<Batch>> {
        (**self).next_batch()
    }

    fn cursor_json(&self) -> Result<Vec<u8>> {
        (**self).cursor_json()
    }

    fn restore_json(&mut self, bytes: &[u8]) -> Result<()> {
        (**self).restore_json(bytes)
    }
}

impl BatchSource for Loader {
    fn next_batch(&mut self) -> Result<Option<Batch>> {
        Loader::next_batch(self)
    }

    fn cursor_json(&self) -> Result<Vec<u8>> {
        self.cursor().to_json()
    }

    fn restore_json(&mut self, bytes: &[u8]) -> Result<()> {
        self.restore(&Cursor::from_json(bytes)?)
    }
}

/// Field names of a preference record (TRL's by default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairFields {
    /// The prompt: a string or a list of `{role, content}` messages.
    pub prompt: String,
    /// The preferred response.
    pub chosen: String,
    /// The dispreferred response.
    pub rejected: String,
}

impl Default for PairFields {
    fn default() -> Self {
        Self {
            prompt: "prompt".into(),
            chosen: "chosen".into(),
            rejected: "rejected".into(),
        }
    }
}

/// One tokenized preference pair.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PreferencePair {
    /// Prompt tokens (shared by both rows).
    pub prompt: Vec<u32>,
    /// Preferred response tokens.
    pub chosen: Vec<u32>,
    /// Dispreferred response tokens.
    pub rejected: Vec<u32>,
}

/// Tokenized preference pairs, held in memory.
#[derive(Debug, Clone, Default)]
pub struct PairDataset {
    pairs: Vec<PreferencePair>,
    skipped: u64,
}

/// How a text record becomes token ids.
#[derive(Debug, Clone, Copy)]
pub struct PairEncoding<'a> {
    /// The tokenizer.
    pub tokenizer: &'a TextTokenizer,
    /// Template for prompts given as message lists (ChatML when `None`).
    pub template: Option<ChatTemplate>,
    /// Token appended to each response of a plain-string record (usually EOS); chat-rendered
    /// responses end with the template's end marker instead.
    pub eos: Option<u32>,
}

impl PairDataset {
    /// An empty dataset.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a pair.
    pub fn push(&mut self, pair: PreferencePair) {
        self.pairs.push(pair);
    }

    /// Number of pairs.
    pub fn len(&self) -> u64 {
        self.pairs.len() as u64
    }

    /// Whether there is no pair.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Records skipped while reading (malformed JSON, missing or empty fields).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Pair `id`.
    pub fn get(&self, id: u64) -> Result<&PreferencePair> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.pairs.get(i))
            .ok_or(Error::SampleOutOfRange {
                id,
                len: self.len(),
            })
    }

    /// Reads and tokenizes JSONL files. A record that is not a JSON object with the three
    /// fields (strings or message lists; non-empty responses) is skipped with a warning
    /// naming its file and line, and counted in [`PairDataset::skipped`].
    pub fn from_jsonl(
        files: &[PathBuf],
        fields: &PairFields,
        enc: PairEncoding<'_>,
    ) -> Result<Self> {
        let mut out = Self::new();
        for path in files {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                match parse_record(line, fields, enc) {
                    Ok(p) => out.push(p),
                    Err(reason) => {
                        tracing::warn!(file = %path.display(), line = i + 1, %reason, "skipping preference record");
                        out.skipped += 1;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// A record's field: a string or a list of chat messages.
enum Field {
    Text(String),
    Chat(Vec<ChatMessage>),
}

fn field(v: &serde_json::Value, name: &str) -> std::result::Result<Field, String> {
    match v.get(name) {
        Some(serde_json::Value::String(s)) => Ok(Field::Text(s.clone())),
        Some(a @ serde_json::Value::Array(_)) => serde_json::from_value(a.clone())
            .map(Field::Chat)
            .map_err(|e| format!("field {name:?} is not a list of {{role, content}}: {e}")),
        Some(_) => Err(format!(
            "field {name:?} is neither a string nor a message list"
        )),
        None => Err(format!("missing field {name:?}")),
    }
}

/// The response text of `f`: the string, or the last assistant message's content.
fn response(f: Field, name: &str) -> std::result::Result<String, String> {
    match f {
        Field::Text(s) => Ok(s),
        Field::Chat(m) => m
            .into_iter()
            .rev()
            .find(|m| m.role == "assistant")
            .map(|m| m.content)
            .ok_or_else(|| format!("field {name:?} has no assistant message")),
    }
}

fn parse_record(
    line: &str,
    fields: &PairFields,
    enc: PairEncoding<'_>,
) -> std::result::Result<PreferencePair, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let prompt = field(&v, &fields.prompt)?;
    let chosen = response(field(&v, &fields.chosen)?, &fields.chosen)?;
    let rejected = response(field(&v, &fields.rejected)?, &fields.rejected)?;
    if chosen.is_empty() || rejected.is_empty() {
        return Err("an empty response".into());
    }
    let tok = |s: &str| enc.tokenizer.encode(s).map_err(|e| e.to_string());
    let (prompt, chosen, rejected) = match prompt {
        Field::Text(p) => {
            let mut c = tok(&chosen)?;
            let mut r = tok(&rejected)?;
            if let Some(e) = enc.eos {
                c.push(e);
                r.push(e);
            }
            (tok(&p)?, c, r)
        }
        Field::Chat(mut msgs) => {
            let template = enc.template.unwrap_or(ChatTemplate::ChatMl);
            let render = |msgs: &mut Vec<ChatMessage>, content: String| {
                msgs.push(ChatMessage {
                    role: "assistant".into(),
                    content,
                });
                let r = template.render(msgs);
                msgs.pop();
                r
            };
            let (p, c) = render(&mut msgs, chosen);
            let (_, r) = render(&mut msgs, rejected);
            (tok(&p)?, tok(&c)?, tok(&r)?)
        }
    };
    if chosen.is_empty() || rejected.is_empty() {
        return Err("an empty response".into());
    }
    Ok(PreferencePair {
        prompt,
        chosen,
        rejected,
    })
}

/// Options of a [`PairLoader`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairLoaderOptions {
    /// Tokens per row (prompt + response, padded).
    pub seq_len: usize,
    /// Pairs per *global* step over all ranks (each pair is two rows).
    pub pairs_per_step: usize,
    /// Padding token.
    pub pad_id: u32,
    /// Run seed: fixes the order of every epoch and the per-step RNG stream.
    pub seed: u64,
    /// Shuffle pairs each epoch.
    pub shuffle: bool,
    /// Stop after this many epochs; `None` streams forever.
    pub epochs: Option<u64>,
}

/// Where a [`PairLoader`] stands: saved in checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairCursor {
    /// Always `"pairs"`: tells this cursor from a packing [`Cursor`].
    pub kind: String,
    /// Global steps emitted.
    pub step: u64,
    /// Current epoch.
    pub epoch: u64,
    /// Index in the epoch's order of the next pair.
    pub position: u64,
    /// State of the per-step RNG stream.
    pub rng_state: u64,
    /// Pairs in the dataset when saved (checked on restore).
    pub dataset_len: u64,
    /// Seed when saved (checked on restore).
    pub seed: u64,
    /// Shuffle when saved (checked on restore).
    pub shuffle: bool,
    /// Row length when saved (checked on restore).
    pub seq_len: usize,
}

/// Streams batches of preference pairs for one rank, deterministically and resumably.
#[derive(Debug)]
pub struct PairLoader {
    data: Arc<PairDataset>,
    opts: PairLoaderOptions,
    placement: Placement,
    epoch: u64,
    position: u64,
    order: EpochPermutation,
    rng: SplitMix64,
    step: u64,
}

impl PairLoader {
    /// A loader at the start of epoch 0.
    pub fn new(
        data: Arc<PairDataset>,
        opts: PairLoaderOptions,
        placement: Placement,
    ) -> Result<Self> {
        let invalid = |option, reason: &str| Error::InvalidOption {
            option,
            reason: reason.to_owned(),
        };
        if opts.seq_len < 2 || u32::try_from(opts.seq_len).is_err() {
            return Err(invalid("seq_len", "must be between 2 and 2^32 - 1"));
        }
        if opts.pairs_per_step == 0 {
            return Err(invalid("pairs_per_step", "must be at least 1"));
        }
        if placement.world == 0 || placement.rank >= placement.world {
            return Err(invalid(
                "placement",
                "rank must be in 0..world and world at least 1",
            ));
        }
        if data.is_empty() {
            return Err(invalid("dataset", "has no preference pair"));
        }
        let order = EpochPermutation::new(data.len(), opts.seed, 0, opts.shuffle);
        let rng = SplitMix64::new(mix64(opts.seed ^ 0x5DEE_CE66_D1CE_4E5B));
        Ok(Self {
            data,
            opts,
            placement,
            epoch: 0,
            position: 0,
            order,
            rng,
            step: 0,
        })
    }

    /// The cursor after the last batch.
    pub fn cursor(&self) -> PairCursor {
        PairCursor {
            kind: "pairs".into(),
            step: self.step,
            epoch: self.epoch,
            position: self.position,
            rng_state: self.rng.state(),
            dataset_len: self.data.len(),
            seed: self.opts.seed,
            shuffle: self.opts.shuffle,
            seq_len: self.opts.seq_len,
        }
    }

    /// Continue from `c`; fails with [`Error::CursorMismatch`] for another dataset or setup.
    pub fn restore(&mut self, c: &PairCursor) -> Result<()> {
        fn check<T: PartialEq + std::fmt::Debug>(
            field: &'static str,
            saved: T,
            now: T,
        ) -> Result<()> {
            if saved == now {
                Ok(())
            } else {
                Err(Error::CursorMismatch {
                    field,
                    saved: format!("{saved:?}"),
                    current: format!("{now:?}"),
                })
            }
        }
        check("kind", c.kind.as_str(), "pairs")?;
        check("dataset_len", c.dataset_len, self.data.len())?;
        check("seed", c.seed, self.opts.seed)?;
        check("shuffle", c.shuffle, self.opts.shuffle)?;
        check("seq_len", c.seq_len, self.opts.seq_len)?;
        if c.position > self.data.len() {
            return Err(Error::CursorMismatch {
                field: "position",
                saved: c.position.to_string(),
                current: format!("at most {}", self.data.len()),
            });
        }
        self.epoch = c.epoch;
        self.position = c.position;
        self.order =
            EpochPermutation::new(self.data.len(), self.opts.seed, c.epoch, self.opts.shuffle);
        self.rng = SplitMix64::new(c.rng_state);
        self.step = c.step;
        Ok(())
    }

    /// The next pair id in the global order, advancing epochs.
    fn next_pair(&mut self) -> Option<u64> {
        if self.position >= self.data.len() {
            if self.opts.epochs.is_some_and(|m| self.epoch + 1 >= m) {
                return None;
            }
            self.epoch += 1;
            self.position = 0;
            self.order = EpochPermutation::new(
                self.data.len(),
                self.opts.seed,
                self.epoch,
                self.opts.shuffle,
            );
        }
        let id = self.order.get(self.position);
        self.position += 1;
        Some(id)
    }

    /// The next batch of this rank: its pairs as (chosen, rejected) row pairs.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        let mut ids = Vec::with_capacity(self.opts.pairs_per_step);
        while ids.len() < self.opts.pairs_per_step {
            match self.next_pair() {
                Some(id) => ids.push(id),
                None => break,
            }
        }
        if ids.is_empty() {
            return Ok(None);
        }
        let mine = shard_range(ids.len(), self.placement.rank, self.placement.world);
        let mut b = Batch {
            step: self.step,
            rng_seed: self.rng.next_u64(),
            seq_len: self.opts.seq_len,
            cu_seqlens: vec![0],
            ..Batch::default()
        };
        for &id in &ids[mine] {
            let p = self.data.get(id)?;
            self.push_row(&mut b, &p.prompt, &p.chosen);
            self.push_row(&mut b, &p.prompt, &p.rejected);
            b.sample_ids.push(id);
        }
        self.step += 1;
        Ok(Some(b))
    }

    /// Appends one row `prompt + response` (truncated, padded) to `b`.
    fn push_row(&self, b: &mut Batch, prompt: &[u32], response: &[u32]) {
        let seq = self.opts.seq_len;
        let p = &prompt[prompt.len().saturating_sub(seq / 2)..];
        let r = &response[..response.len().min(seq - p.len())];
        let n = p.len() + r.len();
        let start = b.input_ids.len();
        b.input_ids.extend_from_slice(p);
        b.input_ids.extend_from_slice(r);
        b.input_ids.resize(start + seq, self.opts.pad_id);
        b.position_ids
            .extend((0..n as u32).chain(std::iter::repeat_n(0, seq - n)));
        // Targets: the response tokens (not the row's first token).
        let first = p.len().max(1).min(n);
        b.loss_mask
            .extend((0..seq).map(|i| u8::from(i >= first && i < n)));
        b.cu_seqlens.push((start + n) as u32);
        b.segment_is_padding.push(false);
        if n < seq {
            b.cu_seqlens.push((start + seq) as u32);
            b.segment_is_padding.push(true);
        }
        b.tokens += n;
        b.rows += 1;
    }
}

impl BatchSource for PairLoader {
    fn next_batch(&mut self) -> Result<Option<Batch>> {
        PairLoader::next_batch(self)
    }

    fn cursor_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(&self.cursor()).map_err(|source| Error::CursorCodec { source })
    }

    fn restore_json(&mut self, bytes: &[u8]) -> Result<()> {
        let c: PairCursor =
            serde_json::from_slice(bytes).map_err(|source| Error::CursorCodec { source })?;
        self.restore(&c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: u32) -> Arc<PairDataset> {
        let mut d = PairDataset::new();
        for i in 0..n {
            d.push(PreferencePair {
                prompt: vec![1, 2, i % 7 + 3],
                chosen: vec![10 + i % 5; 1 + (i % 3) as usize],
                rejected: vec![20 + i % 5; 2],
            });
        }
        Arc::new(d)
    }

    fn opts() -> PairLoaderOptions {
        PairLoaderOptions {
            seq_len: 8,
            pairs_per_step: 3,
            pad_id: 0,
            seed: 5,
            shuffle: true,
            epochs: None,
        }
    }

    #[test]
    fn rows_come_in_pairs_with_response_masks() {
        let d = data(10);
        let mut l = PairLoader::new(d.clone(), opts(), Placement::SINGLE).unwrap();
        let b = l.next_batch().unwrap().unwrap();
        assert_eq!(b.rows, 6);
        assert_eq!(b.sample_ids.len(), 3);
        for (k, &id) in b.sample_ids.iter().enumerate() {
            let p = d.get(id).unwrap();
            for (row, resp) in [(2 * k, &p.chosen), (2 * k + 1, &p.rejected)] {
                let ids = &b.input_ids[row * 8..row * 8 + 8];
                let mask = &b.loss_mask[row * 8..row * 8 + 8];
                let n = p.prompt.len() + resp.len();
                assert_eq!(&ids[..3], &p.prompt[..]);
                assert_eq!(&ids[3..n], &resp[..]);
                assert!(mask[..3].iter().all(|&m| m == 0));
                assert!(mask[3..n].iter().all(|&m| m == 1));
                assert!(mask[n..].iter().all(|&m| m == 0));
            }
        }
        assert_eq!(*b.cu_seqlens.last().unwrap() as usize, 6 * 8);
        assert_eq!(b.doc_ids().len(), 48);
    }

    #[test]
    fn resume_is_exact_and_epochs_cover_every_pair() {
        let d = data(10);
        let mut a = PairLoader::new(d.clone(), opts(), Placement::SINGLE).unwrap();
        let mut seen = Vec::new();
        let mut all = Vec::new();
        for s in 0..7 {
            let b = a.next_batch().unwrap().unwrap();
            if s < 4 {
                seen.extend(b.sample_ids.clone());
            }
            all.push(b);
        }
        // 4 steps × 3 pairs = 12 ≥ 10: the first epoch is a permutation.
        let mut first: Vec<u64> = seen[..10].to_vec();
        first.sort_unstable();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
        for k in [1, 3, 5] {
            let mut x = PairLoader::new(d.clone(), opts(), Placement::SINGLE).unwrap();
            for _ in 0..k {
                x.next_batch().unwrap();
            }
            let c = x.cursor_json().unwrap();
            let mut y = PairLoader::new(d.clone(), opts(), Placement::SINGLE).unwrap();
            y.restore_json(&c).unwrap();
            for b in &all[k..] {
                assert_eq!(&y.next_batch().unwrap().unwrap(), b);
            }
        }
    }

    #[test]
    fn ranks_split_by_pair() {
        let d = data(10);
        let mut g = PairLoader::new(d.clone(), opts(), Placement::SINGLE).unwrap();
        let whole = g.next_batch().unwrap().unwrap();
        let mut ids = Vec::new();
        for rank in 0..2 {
            let mut l = PairLoader::new(d.clone(), opts(), Placement { rank, world: 2 }).unwrap();
            let b = l.next_batch().unwrap().unwrap();
            assert_eq!(b.rows, 2 * b.sample_ids.len());
            ids.extend(b.sample_ids);
        }
        assert_eq!(ids, whole.sample_ids);
    }

    #[test]
    fn a_packing_cursor_does_not_restore_into_pairs() {
        let mut l = PairLoader::new(data(4), opts(), Placement::SINGLE).unwrap();
        assert!(l.restore_json(br#"{"format":1}"#).is_err());
    }

    #[test]
    fn truncation_keeps_the_prompt_end_and_some_response() {
        let mut d = PairDataset::new();
        d.push(PreferencePair {
            prompt: (1..=20).collect(),
            chosen: vec![30; 10],
            rejected: vec![40; 10],
        });
        let o = PairLoaderOptions {
            epochs: Some(1),
            ..opts()
        };
        let mut l = PairLoader::new(Arc::new(d), o, Placement::SINGLE).unwrap();
        let b = l.next_batch().unwrap().unwrap();
        assert!(l.next_batch().unwrap().is_none());
        assert_eq!(&b.input_ids[..8], &[17, 18, 19, 20, 30, 30, 30, 30]);
        assert_eq!(b.target_tokens(), 8);
    }

    #[test]
    fn jsonl_records_with_chat_prompts_and_custom_fields() {
        let texts = [
            "hello there how are you",
            "fine thanks and you",
            "<|im_start|>user",
        ];
        let opts = crate::BpeOptions {
            vocab_size: 300,
            min_frequency: 1,
            special_tokens: vec![
                "<|im_start|>".into(),
                "<|im_end|>".into(),
                "<|endoftext|>".into(),
            ],
        };
        let tok = TextTokenizer::train_bpe(texts.iter(), &opts).unwrap();
        let eos = tok.token_id("<|endoftext|>");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.jsonl");
        std::fs::write(
            &f,
            concat!(
                r#"{"q": "hello", "good": "fine", "bad": "you"}"#, "\n",
                r#"{"q": [{"role": "user", "content": "how are you"}], "good": [{"role": "assistant", "content": "fine"}], "bad": "thanks"}"#, "\n",
                "not json\n",
                r#"{"q": "hello", "good": "", "bad": "you"}"#, "\n",
            ),
        )
        .unwrap();
        let fields = PairFields {
            prompt: "q".into(),
            chosen: "good".into(),
            rejected: "bad".into(),
        };
        let enc = PairEncoding {
            tokenizer: &tok,
            template: Some(ChatTemplate::ChatMl),
            eos,
        };
        let d = PairDataset::from_jsonl(&[f], &fields, enc).unwrap();
        assert_eq!((d.len(), d.skipped()), (2, 2));
        let p = d.get(0).unwrap();
        assert_eq!(p.prompt, tok.encode("hello").unwrap());
        let mut c = tok.encode("fine").unwrap();
        c.push(eos.unwrap());
        assert_eq!(p.chosen, c);
        let p = d.get(1).unwrap();
        let prompt = "<|im_start|>user\nhow are you<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(p.prompt, tok.encode(prompt).unwrap());
        assert_eq!(p.chosen, tok.encode("fine<|im_end|>\n").unwrap());
        assert_eq!(p.rejected, tok.encode("thanks<|im_end|>\n").unwrap());
    }
}
