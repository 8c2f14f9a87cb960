//! Packing: turning variable-length samples into fixed-length rows.
//!
//! Packing is split into a *plan* (which token ranges of which samples go into which row,
//! computed from sample lengths alone) and *materialisation* (copying the tokens of the rows
//! one rank owns). Every rank computes the same plan for the global batch, so the global
//! batch does not depend on the number of ranks; each rank reads only its own rows' tokens.
//!
//! - [`Packing::Concat`](crate::Packing::Concat) for pre-training: samples are concatenated, each followed by EOS, and
//!   cut into rows of `seq_len`; the tail of a sample that did not fit continues the next
//!   row (the *carry-over*, saved in the [`Cursor`](crate::Cursor)).
//! - [`best_fit_decreasing`] for fine-tuning: a window of samples is packed into as few rows
//!   as possible without splitting a sample (samples longer than a row are cut into row-sized
//!   pieces first); rows left over after a batch are carried over in the cursor.
//!
//! In both modes each row is a sequence of *segments* (one per sample piece, plus padding);
//! [`Batch::cu_seqlens`] gives their boundaries so attention can be block-diagonal, and
//! position ids restart at 0 in every segment.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::augment::Augment;
use crate::order::{SplitMix64, mix64};
use crate::{Result, TokenDataset};

/// A range of a sample's tokens placed in a row. Offsets count the sample's tokens followed
/// by the EOS token when packing appends one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Span {
    /// Sample id.
    pub sample: u64,
    /// First token of the range.
    pub start: u32,
    /// Number of tokens.
    pub len: u32,
}

/// The plan of one packed row: its spans in order (the rest of the row is padding).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RowPlan {
    /// Spans in row order.
    pub spans: Vec<Span>,
}

impl RowPlan {
    /// Tokens (not padding) in the row.
    pub fn tokens(&self) -> usize {
        self.spans.iter().map(|s| s.len as usize).sum()
    }
}

/// A piece of a sample to be placed by [`best_fit_decreasing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    /// Sample id.
    pub sample: u64,
    /// First token of the piece.
    pub start: u32,
    /// Tokens in the piece (at most the row length).
    pub len: u32,
}

/// Cut a sample of `len` tokens into pieces of at most `seq_len` tokens.
pub fn split_sample(sample: u64, len: usize, seq_len: usize, out: &mut Vec<Item>) {
    let seq_len = seq_len.max(1);
    let mut start = 0;
    while start < len {
        let n = (len - start).min(seq_len);
        out.push(Item {
            sample,
            start: start as u32,
            len: n as u32,
        });
        start += n;
    }
}

/// Best-fit-decreasing bin packing of `items` (each at most `capacity` long) into rows of
/// `capacity` tokens. Deterministic: ties keep the input order; rows come out in the order
/// they were opened.
pub fn best_fit_decreasing(items: &[Item], capacity: usize) -> Vec<RowPlan> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| items[b].len.cmp(&items[a].len).then(a.cmp(&b)));
    let mut rows: Vec<RowPlan> = Vec::new();
    // remaining capacity -> rows with that much room (smallest row index last out: we pop
    // the largest index, which is deterministic).
    let mut by_room: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in order {
        let it = items[i];
        let len = it.len as usize;
        if len == 0 {
            continue;
        }
        let found = by_room
            .range_mut(len..)
            .next()
            .and_then(|(&room, v)| v.pop().map(|r| (room, r)));
        let (room, row) = match found {
            Some((room, row)) => {
                if by_room.get(&room).is_some_and(Vec::is_empty) {
                    by_room.remove(&room);
                }
                (room, row)
            }
            None => {
                rows.push(RowPlan::default());
                (capacity, rows.len() - 1)
            }
        };
        rows[row].spans.push(Span {
            sample: it.sample,
            start: it.start,
            len: it.len,
        });
        let left = room - len;
        if left > 0 {
            by_room.entry(left).or_default().push(row);
        }
    }
    rows
}

/// Packing efficiency of rows: tokens over capacity (1.0 means no padding).
pub fn efficiency(rows: &[RowPlan], seq_len: usize) -> f64 {
    let cap = rows.len() * seq_len;
    if cap == 0 {
        return 1.0;
    }
    rows.iter().map(RowPlan::tokens).sum::<usize>() as f64 / cap as f64
}

/// A batch of packed rows, as one rank receives it. Arrays are row-major `rows × seq_len`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Global step this batch belongs to (0-based).
    pub step: u64,
    /// Rows of this rank.
    pub rows: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Token ids (padding is the loader's `pad_id`).
    pub input_ids: Vec<u32>,
    /// Position of each token inside its segment (restarts at 0 in every segment).
    pub position_ids: Vec<u32>,
    /// 1 where `input_ids[i]` is a training target predicted from the tokens before it in its
    /// segment; 0 for prompt tokens, padding and the first token of each segment.
    pub loss_mask: Vec<u8>,
    /// Segment boundaries in the flattened `rows × seq_len` array, starting at 0 and ending
    /// at `rows × seq_len` (flash-attention "varlen" layout). No segment crosses a row, and
    /// attention must stay inside a segment (block-diagonal).
    pub cu_seqlens: Vec<u32>,
    /// Whether each segment is padding (same length as `cu_seqlens` minus one).
    pub segment_is_padding: Vec<bool>,
    /// Sample ids of the batch's segments in order (consecutive repeats removed; a sample cut
    /// across rows may appear more than once). The trainer records these when it skips a batch.
    pub sample_ids: Vec<u64>,
    /// Non-padding tokens.
    pub tokens: usize,
    /// Seed for this step's random transforms (dropout, augmentation), drawn from the
    /// loader's RNG stream, whose state the cursor saves.
    pub rng_seed: u64,
}

impl Batch {
    /// Segment index of every token (block-diagonal attention: token `i` may attend to token
    /// `j <= i` only when `doc_ids[i] == doc_ids[j]`).
    pub fn doc_ids(&self) -> Vec<u32> {
        let mut ids = Vec::with_capacity(self.input_ids.len());
        for (seg, w) in self.cu_seqlens.windows(2).enumerate() {
            ids.extend(std::iter::repeat_n(seg as u32, (w[1] - w[0]) as usize));
        }
        ids
    }

    /// Tokens that are training targets.
    pub fn target_tokens(&self) -> usize {
        self.loss_mask.iter().map(|&m| m as usize).sum()
    }

    /// Fraction of the batch that is not padding.
    pub fn efficiency(&self) -> f64 {
        let cap = self.rows * self.seq_len;
        if cap == 0 {
            1.0
        } else {
            self.tokens as f64 / cap as f64
        }
    }

    /// SHA-256 over every array of the batch: a compact identity for resume tests and logs.
    pub fn hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.step.to_le_bytes());
        h.update(self.rng_seed.to_le_bytes());
        h.update((self.rows as u64).to_le_bytes());
        h.update((self.seq_len as u64).to_le_bytes());
        for t in &self.input_ids {
            h.update(t.to_le_bytes());
        }
        for t in &self.position_ids {
            h.update(t.to_le_bytes());
        }
        h.update(&self.loss_mask);
        for t in &self.cu_seqlens {
            h.update(t.to_le_bytes());
        }
        for s in &self.sample_ids {
            h.update(s.to_le_bytes());
        }
        h.finalize().into()
    }
}

/// How rows are materialised: the tokens appended to each sample and used for padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fill {
    pub(crate) seq_len: usize,
    pub(crate) eos: Option<u32>,
    pub(crate) pad: u32,
}

/// Append rows to `batch`, reading tokens from `data`.
/// The loader's augmentations: those applied to every segment, then those of the segment's
/// source.
#[derive(Debug, Clone, Default)]
pub(crate) struct Augmentations {
    /// Applied to every segment.
    pub(crate) all: Vec<Arc<dyn Augment>>,
    /// Applied to segments of source `k` ([`TokenDataset::source_of`]).
    pub(crate) per_source: Vec<Vec<Arc<dyn Augment>>>,
}

impl Augmentations {
    /// The augmentations for a segment of `sample`, in order.
    fn for_sample<'a>(
        &'a self,
        data: &dyn TokenDataset,
        sample: u64,
    ) -> Result<impl Iterator<Item = &'a Arc<dyn Augment>> + Clone> {
        let own: &[Arc<dyn Augment>] = if self.per_source.is_empty() {
            &[]
        } else {
            self.per_source
                .get(data.source_of(sample)?)
                .map_or(&[], Vec::as_slice)
        };
        Ok(self.all.iter().chain(own))
    }
}

pub(crate) fn materialize(
    data: &dyn TokenDataset,
    rows: &[RowPlan],
    fill: Fill,
    augment: &Augmentations,
    batch: &mut Batch,
) -> Result<()> {
    let seq_len = fill.seq_len;
    let base = batch.input_ids.len();
    let total = base + rows.len() * seq_len;
    batch.input_ids.resize(total, fill.pad);
    batch.position_ids.resize(total, 0);
    batch.loss_mask.resize(total, 0);
    if batch.cu_seqlens.is_empty() {
        batch.cu_seqlens.push(base as u32);
    }
    for (r, row) in rows.iter().enumerate() {
        let row_start = base + r * seq_len;
        let mut at = row_start;
        for span in &row.spans {
            let n = span.len as usize;
            let start = span.start as usize;
            let (sample_len, prompt) = data.sample_info(span.sample)?;
            let real_end = (start + n).min(sample_len);
            let real = real_end.saturating_sub(start);
            if real > 0 {
                data.read_tokens(span.sample, start, &mut batch.input_ids[at..at + real])?;
            }
            if real < n {
                // The range extends past the sample: the EOS appended by packing.
                batch.input_ids[at + real..at + n].fill(fill.eos.unwrap_or(fill.pad));
            }
            for (i, p) in batch.position_ids[at..at + n].iter_mut().enumerate() {
                *p = i as u32;
            }
            // Targets: not prompt tokens, not the segment's first token.
            let first_target = prompt.max(start + 1).saturating_sub(start).min(n);
            batch.loss_mask[at + first_target..at + n].fill(1);
            let augs = augment.for_sample(data, span.sample)?;
            if augs.clone().next().is_some() {
                // Seeded by step, sample and piece: never by rank.
                let piece = span.sample ^ (u64::from(span.start) << 40);
                let mut rng = SplitMix64::new(mix64(batch.rng_seed ^ mix64(piece)));
                for a in augs {
                    a.apply(
                        &mut batch.input_ids[at..at + n],
                        &mut batch.loss_mask[at..at + n],
                        &mut rng,
                    );
                }
            }
            at += n;
            batch.cu_seqlens.push(at as u32);
            batch.segment_is_padding.push(false);
            if batch.sample_ids.last() != Some(&span.sample) {
                batch.sample_ids.push(span.sample);
            }
            batch.tokens += n;
        }
        let row_end = row_start + seq_len;
        if at < row_end {
            batch.cu_seqlens.push(row_end as u32);
            batch.segment_is_padding.push(true);
        }
    }
    batch.rows += rows.len();
    batch.seq_len = seq_len;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bfd_fills_rows_tightly() {
        let items: Vec<Item> = [6, 4, 5, 5, 3, 7]
            .iter()
            .enumerate()
            .map(|(i, &len)| Item {
                sample: i as u64,
                start: 0,
                len,
            })
            .collect();
        let rows = best_fit_decreasing(&items, 10);
        assert_eq!(rows.len(), 3);
        assert!((efficiency(&rows, 10) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn split_sample_covers() {
        let mut v = Vec::new();
        split_sample(3, 25, 10, &mut v);
        assert_eq!(v.iter().map(|i| i.len).collect::<Vec<_>>(), vec![10, 10, 5]);
        assert_eq!(v[2].start, 20);
    }
}
