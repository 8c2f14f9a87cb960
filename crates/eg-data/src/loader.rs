//! The loader: global packing plan, rank sharding, batches and the resumable cursor.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::augment::Augment;
use crate::order::{EpochPermutation, SplitMix64, mix64, shard_range};
use crate::pack::{
    Augmentations, Batch, Fill, Item, RowPlan, Span, best_fit_decreasing, materialize, split_sample,
};
use crate::{Error, Result, TokenDataset};

/// How samples become rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Packing {
    /// Pre-training: concatenate samples (each followed by EOS when `eos_id` is set) and cut
    /// the stream into rows; a sample's tail continues in the next row.
    Concat,
    /// Fine-tuning: best-fit-decreasing packing of `window` samples at a time; samples are
    /// never split unless longer than a row.
    BestFit {
        /// Samples packed together (larger: tighter rows, more rows carried in the cursor).
        window: usize,
    },
}

/// Options of a [`Loader`]. Plain data; the facade maps the `data` config section onto it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderOptions {
    /// Tokens per row.
    pub seq_len: usize,
    /// Rows per *global* step, over all ranks. May change between a save and a resume.
    pub rows_per_step: usize,
    /// Packing mode.
    pub packing: Packing,
    /// Token appended to every sample (usually the tokenizer's EOS), or none.
    pub eos_id: Option<u32>,
    /// Token used for padding.
    pub pad_id: u32,
    /// Run seed: fixes the order of every epoch and the per-step RNG stream.
    pub seed: u64,
    /// Shuffle samples each epoch (a seeded permutation per `(seed, epoch)`).
    pub shuffle: bool,
    /// Stop after this many epochs; `None` streams forever.
    pub epochs: Option<u64>,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        Self {
            seq_len: 1024,
            rows_per_step: 8,
            packing: Packing::Concat,
            eos_id: None,
            pad_id: 0,
            seed: 0,
            shuffle: true,
            epochs: None,
        }
    }
}

/// Which rank of how many this loader feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// This process's rank, `0..world`.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
}

impl Placement {
    /// A single process.
    pub const SINGLE: Placement = Placement { rank: 0, world: 1 };
}

/// Packing state carried from one step to the next.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Carry {
    /// Nothing carried.
    #[default]
    None,
    /// Concat packing: this many tokens of the sample at `position` were already emitted.
    Partial {
        /// Tokens already emitted (counting the appended EOS).
        offset: u32,
    },
    /// Best-fit packing: rows planned but not yet emitted.
    Rows(Vec<RowPlan>),
}

/// Where the data stream stands: saved in checkpoints, restored with [`Loader::restore`].
///
/// The position is *global* (it does not depend on the number of ranks), so a run saved with
/// 4 ranks resumes with 2 or 8 and still sees every sample of the epoch exactly once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Format version of this structure.
    pub format: u32,
    /// Global steps emitted so far.
    pub step: u64,
    /// Current epoch.
    pub epoch: u64,
    /// Index in the epoch's sample order of the next sample not fully emitted.
    pub position: u64,
    /// Packing carry-over.
    pub carry: Carry,
    /// State of the per-step RNG stream ([`Batch::rng_seed`]).
    pub rng_state: u64,
    /// Number of samples of the dataset when saved (checked on restore).
    pub dataset_len: u64,
    /// Seed when saved (checked on restore).
    pub seed: u64,
    /// Whether epochs were shuffled (checked on restore).
    pub shuffle: bool,
    /// Row length when saved (checked on restore).
    pub seq_len: usize,
    /// Packing when saved (checked on restore).
    pub packing: Packing,
    /// EOS appended when saved (checked on restore).
    pub eos_id: Option<u32>,
}

impl Cursor {
    /// Current format version.
    pub const FORMAT: u32 = 1;

    /// Encode as JSON bytes (what checkpoints store).
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|source| Error::CursorCodec { source })
    }

    /// Decode from [`Cursor::to_json`] bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|source| Error::CursorCodec { source })
    }
}

/// More than two epochs' worth of consecutive empty samples (so at least one whole epoch)
/// went by without a token.
fn no_token() -> Error {
    Error::InvalidOption {
        option: "dataset",
        reason: "has no token (every sample is empty and no EOS is appended)".into(),
    }
}

/// The global row stream: independent of ranks, rebuilt exactly from a cursor.
#[derive(Debug, Clone)]
struct Planner {
    n: u64,
    epoch: u64,
    position: u64,
    offset: u32,
    pending: VecDeque<RowPlan>,
    order: EpochPermutation,
}

/// Streams packed batches of a [`TokenDataset`] for one rank, deterministically.
///
/// Each step, every rank plans the same global batch of `rows_per_step` rows from sample
/// lengths, then reads and materialises only its own contiguous slice of rows
/// ([`shard_range`]). Concatenating the batches of ranks `0..world` gives the same global
/// batch for any `world`.
pub struct Loader {
    data: Arc<dyn TokenDataset>,
    opts: LoaderOptions,
    placement: Placement,
    planner: Planner,
    rng: SplitMix64,
    step: u64,
    plans: Vec<RowPlan>,
    augment: Augmentations,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("opts", &self.opts)
            .field("placement", &self.placement)
            .field("cursor", &self.cursor())
            .finish_non_exhaustive()
    }
}

impl Loader {
    /// A loader at the start of epoch 0. Checks the options; O(1) in the dataset size (a
    /// dataset whose samples are all empty is reported by the first `next_batch`).
    pub fn new(
        data: Arc<dyn TokenDataset>,
        opts: LoaderOptions,
        placement: Placement,
    ) -> Result<Self> {
        let invalid = |option, reason: &str| Error::InvalidOption {
            option,
            reason: reason.to_owned(),
        };
        if opts.seq_len == 0 || u32::try_from(opts.seq_len).is_err() {
            return Err(invalid("seq_len", "must be between 1 and 2^32 - 1"));
        }
        if opts.rows_per_step == 0 {
            return Err(invalid("rows_per_step", "must be at least 1"));
        }
        if let Packing::BestFit { window: 0 } = opts.packing {
            return Err(invalid("packing.window", "must be at least 1"));
        }
        if placement.world == 0 || placement.rank >= placement.world {
            return Err(invalid(
                "placement",
                "rank must be in 0..world and world at least 1",
            ));
        }
        let n = data.len();
        if n == 0 {
            return Err(invalid("dataset", "has no sample"));
        }
        let order = EpochPermutation::new(n, opts.seed, 0, opts.shuffle);
        let rng = SplitMix64::new(mix64(opts.seed ^ 0xD1B5_4A32_D192_ED03));
        Ok(Self {
            planner: Planner {
                n,
                epoch: 0,
                position: 0,
                offset: 0,
                pending: VecDeque::new(),
                order,
            },
            data,
            opts,
            placement,
            rng,
            step: 0,
            plans: Vec::new(),
            augment: Augmentations::default(),
        })
    }

    /// [`Loader::new`] followed by [`Loader::restore`].
    pub fn with_cursor(
        data: Arc<dyn TokenDataset>,
        opts: LoaderOptions,
        placement: Placement,
        cursor: &Cursor,
    ) -> Result<Self> {
        let mut l = Self::new(data, opts, placement)?;
        l.restore(cursor)?;
        Ok(l)
    }

    /// Apply `augment` (in order) to every segment of every batch. Augmentations are code,
    /// not state: a resumed run must configure the same ones to repeat the same batches.
    pub fn with_augmentations(mut self, augment: Vec<Arc<dyn Augment>>) -> Self {
        self.augment.all = augment;
        self
    }

    /// Apply `augment` (in order, after those of [`Loader::with_augmentations`]) to the
    /// segments whose sample comes from source `source` of the dataset
    /// ([`TokenDataset::source_of`]: the index of a [`Mixture`](crate::Mixture)'s sources).
    /// Replaces what an earlier call set for that source.
    pub fn with_source_augmentations(
        mut self,
        source: usize,
        augment: Vec<Arc<dyn Augment>>,
    ) -> Self {
        let per = &mut self.augment.per_source;
        if per.len() <= source {
            per.resize_with(source + 1, Vec::new);
        }
        per[source] = augment;
        self
    }

    /// The options.
    pub fn options(&self) -> &LoaderOptions {
        &self.opts
    }

    /// The placement.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// The state after the last batch returned: save it with the checkpoint of that step.
    /// All ranks hold the same cursor.
    pub fn cursor(&self) -> Cursor {
        let p = &self.planner;
        let carry = match self.opts.packing {
            Packing::Concat if p.offset > 0 => Carry::Partial { offset: p.offset },
            Packing::BestFit { .. } if !p.pending.is_empty() => {
                Carry::Rows(p.pending.iter().cloned().collect())
            }
            _ => Carry::None,
        };
        Cursor {
            format: Cursor::FORMAT,
            step: self.step,
            epoch: p.epoch,
            position: p.position,
            carry,
            rng_state: self.rng.state(),
            dataset_len: p.n,
            seed: self.opts.seed,
            shuffle: self.opts.shuffle,
            seq_len: self.opts.seq_len,
            packing: self.opts.packing,
            eos_id: self.opts.eos_id,
        }
    }

    /// Continue from `cursor` (possibly saved with another number of ranks or another
    /// `rows_per_step`). Fails with [`Error::CursorMismatch`] when the cursor belongs to
    /// another dataset or packing.
    pub fn restore(&mut self, cursor: &Cursor) -> Result<()> {
        fn check<T: PartialEq + std::fmt::Debug>(
            field: &'static str,
            saved: T,
            current: T,
        ) -> Result<()> {
            if saved == current {
                Ok(())
            } else {
                Err(Error::CursorMismatch {
                    field,
                    saved: format!("{saved:?}"),
                    current: format!("{current:?}"),
                })
            }
        }
        check("format", cursor.format, Cursor::FORMAT)?;
        check("dataset_len", cursor.dataset_len, self.planner.n)?;
        check("seed", cursor.seed, self.opts.seed)?;
        check("shuffle", cursor.shuffle, self.opts.shuffle)?;
        check("seq_len", cursor.seq_len, self.opts.seq_len)?;
        check("packing", cursor.packing, self.opts.packing)?;
        check("eos_id", cursor.eos_id, self.opts.eos_id)?;
        if cursor.position > self.planner.n {
            return Err(Error::CursorMismatch {
                field: "position",
                saved: cursor.position.to_string(),
                current: format!("at most {}", self.planner.n),
            });
        }
        let p = &mut self.planner;
        p.epoch = cursor.epoch;
        p.position = cursor.position;
        p.offset = 0;
        p.pending.clear();
        match &cursor.carry {
            Carry::None => {}
            Carry::Partial { offset } => p.offset = *offset,
            Carry::Rows(rows) => p.pending.extend(rows.iter().cloned()),
        }
        p.order = EpochPermutation::new(p.n, self.opts.seed, p.epoch, self.opts.shuffle);
        self.rng = SplitMix64::new(cursor.rng_state);
        self.step = cursor.step;
        Ok(())
    }

    /// The next batch of this rank, or `None` when the configured epochs are exhausted.
    ///
    /// The last batch may have fewer than `rows_per_step` rows (and a rank may then get zero
    /// rows); every other global batch has exactly `rows_per_step`.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        let mut plans = std::mem::take(&mut self.plans);
        plans.clear();
        while plans.len() < self.opts.rows_per_step {
            match self.next_row()? {
                Some(r) => plans.push(r),
                None => break,
            }
        }
        if plans.is_empty() {
            self.plans = plans;
            return Ok(None);
        }
        let mine = shard_range(plans.len(), self.placement.rank, self.placement.world);
        let mut batch = Batch {
            step: self.step,
            rng_seed: self.rng.next_u64(),
            ..Batch::default()
        };
        let fill = Fill {
            seq_len: self.opts.seq_len,
            eos: self.opts.eos_id,
            pad: self.opts.pad_id,
        };
        materialize(&*self.data, &plans[mine], fill, &self.augment, &mut batch)?;
        batch.seq_len = self.opts.seq_len;
        self.step += 1;
        self.plans = plans;
        Ok(Some(batch))
    }

    /// The plan of the next global row, advancing the planner.
    fn next_row(&mut self) -> Result<Option<RowPlan>> {
        match self.opts.packing {
            Packing::Concat => self.next_concat_row(),
            Packing::BestFit { window } => self.next_packed_row(window),
        }
    }

    fn effective_len(&self, id: u64) -> Result<u32> {
        let len = self.data.sample_len(id)? + usize::from(self.opts.eos_id.is_some());
        Ok(u32::try_from(len).unwrap_or(u32::MAX))
    }

    /// Move to the next epoch; false when the epoch limit is reached.
    fn advance_epoch(&mut self) -> bool {
        let p = &mut self.planner;
        if self.opts.epochs.is_some_and(|max| p.epoch + 1 >= max) {
            return false;
        }
        p.epoch += 1;
        p.position = 0;
        p.offset = 0;
        p.order = EpochPermutation::new(p.n, self.opts.seed, p.epoch, self.opts.shuffle);
        true
    }

    fn next_concat_row(&mut self) -> Result<Option<RowPlan>> {
        let mut row = RowPlan::default();
        let mut room = self.opts.seq_len as u32;
        let mut empty_run = 0u64;
        while room > 0 {
            if self.planner.position >= self.planner.n && !self.advance_epoch() {
                break;
            }
            if empty_run > 2 * self.planner.n {
                return Err(no_token());
            }
            let id = self.planner.order.get(self.planner.position);
            let eff = self.effective_len(id)?;
            let offset = self.planner.offset.min(eff);
            let take = (eff - offset).min(room);
            if take > 0 {
                row.spans.push(Span {
                    sample: id,
                    start: offset,
                    len: take,
                });
                room -= take;
                empty_run = 0;
            } else {
                empty_run += 1;
            }
            if offset + take >= eff {
                self.planner.position += 1;
                self.planner.offset = 0;
            } else {
                self.planner.offset = offset + take;
            }
        }
        Ok((!row.spans.is_empty()).then_some(row))
    }

    fn next_packed_row(&mut self, window: usize) -> Result<Option<RowPlan>> {
        let mut items: Vec<Item> = Vec::new();
        let mut empty_run = 0u64;
        while self.planner.pending.is_empty() {
            if self.planner.position >= self.planner.n && !self.advance_epoch() {
                return Ok(None);
            }
            if empty_run > 2 * self.planner.n {
                return Err(no_token());
            }
            let start = self.planner.position;
            let end = (start + window as u64).min(self.planner.n);
            items.clear();
            for pos in start..end {
                let id = self.planner.order.get(pos);
                split_sample(
                    id,
                    self.effective_len(id)? as usize,
                    self.opts.seq_len,
                    &mut items,
                );
            }
            empty_run = if items.is_empty() {
                empty_run + (end - start)
            } else {
                0
            };
            self.planner.position = end;
            self.planner
                .pending
                .extend(best_fit_decreasing(&items, self.opts.seq_len));
        }
        Ok(self.planner.pending.pop_front())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InMemoryDataset;

    fn data() -> Arc<dyn TokenDataset> {
        Arc::new(InMemoryDataset::from_docs(
            (0..10u32).map(|i| vec![i; (i as usize % 4) + 1]),
        ))
    }

    #[test]
    fn concat_rows_are_full_until_the_end() {
        let opts = LoaderOptions {
            seq_len: 4,
            rows_per_step: 2,
            eos_id: Some(99),
            epochs: Some(1),
            ..Default::default()
        };
        let mut l = Loader::new(data(), opts, Placement::SINGLE).unwrap();
        let mut total = 0;
        while let Some(b) = l.next_batch().unwrap() {
            total += b.tokens;
        }
        // 10 samples of lengths 1,2,3,4,1,2,3,4,1,2 plus one EOS each.
        assert_eq!(total, 23 + 10);
    }

    #[test]
    fn mismatched_cursor_is_refused() {
        let opts = LoaderOptions {
            seq_len: 4,
            rows_per_step: 2,
            ..Default::default()
        };
        let l = Loader::new(data(), opts.clone(), Placement::SINGLE).unwrap();
        let c = l.cursor();
        let other = LoaderOptions { seq_len: 8, ..opts };
        let err = Loader::with_cursor(data(), other, Placement::SINGLE, &c).unwrap_err();
        assert!(
            matches!(
                err,
                Error::CursorMismatch {
                    field: "seq_len",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn all_empty_dataset_is_an_error_not_a_hang() {
        let empty: Arc<dyn TokenDataset> =
            Arc::new(InMemoryDataset::from_docs(vec![Vec::<u32>::new(); 5]));
        for packing in [Packing::Concat, Packing::BestFit { window: 2 }] {
            let o = LoaderOptions {
                seq_len: 4,
                rows_per_step: 1,
                packing,
                ..Default::default()
            };
            let mut l = Loader::new(empty.clone(), o, Placement::SINGLE).unwrap();
            assert!(matches!(
                l.next_batch(),
                Err(Error::InvalidOption {
                    option: "dataset",
                    ..
                })
            ));
        }
    }

    #[test]
    fn bad_options_are_refused() {
        let opts = LoaderOptions {
            rows_per_step: 0,
            ..Default::default()
        };
        assert!(Loader::new(data(), opts, Placement::SINGLE).is_err());
        let p = Placement { rank: 2, world: 2 };
        assert!(Loader::new(data(), LoaderOptions::default(), p).is_err());
    }
}
