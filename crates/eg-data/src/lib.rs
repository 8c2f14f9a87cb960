//! # eg-data
//!
//! Datasets for training: streaming sources, tokenization, packing, deterministic sharding by
//! rank, and a cursor that makes resume exact.
//!
//! ## Brief overview
//!
//! The pipeline has two halves with a file format between them:
//!
//! 1. **Prepare** (streaming, bounded memory): [`stream`] reads text files and JSONL line by
//!    line (a line longer than the limit is skipped without being held in memory), quarantines
//!    bad records with their file and line, and stops with
//!    [`Error::TooManyBadRecords`] above a configured fraction. [`tokenize`] encodes documents
//!    in parallel with `tokenizers` and writes memory-mapped [`shards`], cached by a key over
//!    the inputs' content, the tokenizer and the settings, so a second run reuses them.
//! 2. **Load** (random access, deterministic): a [`Loader`] over any [`TokenDataset`] (token
//!    shards, or [`InMemoryDataset`]) shuffles sample ids with a seeded permutation per
//!    `(seed, epoch)`, packs them ([`Packing::Concat`] for pre-training, [`Packing::BestFit`]
//!    for fine-tuning with per-document position ids, block-diagonal segments and a prompt loss
//!    mask) and hands each rank its slice of the *global* batch.
//!
//! Why plan globally? Packing decides which tokens go in which row from sample *lengths*
//! alone, which every rank knows from the shard index. So every rank computes the same global
//! plan, reads only its own rows' tokens, and the [`Cursor`] — epoch, position in the epoch's
//! order, packing carry-over and RNG state — is the same on every rank. A run saved with 4
//! ranks resumes with 2 or 8 and sees every sample of the epoch exactly once, and the
//! concatenation of the ranks' batches is the same global batch as before.
//!
//! Tokenizers come from a `tokenizer.json`, from BPE training on a corpus, or from the
//! vocabulary a GGUF file carries in its metadata
//! ([`TextTokenizer::from_gguf_metadata`], byte-level BPE with llama.cpp's pre-tokenizers).
//!
//! Around the loader: [`Prefetcher`] runs it on a background thread behind a bounded queue
//! (its cursor is the one after the last batch *consumed*); [`Mixture`] mixes datasets by
//! weight into one id space; [`augment`] holds seeded, length-preserving transforms applied
//! per segment with a seed that does not depend on the rank. Token shards are read
//! memory-mapped ([`ShardAccess::Mapped`], fastest) or with positioned reads
//! ([`ShardAccess::Read`], flat resident set on corpora larger than memory).
//!
//! The order is computed with fully specified code (SplitMix64 and a Feistel permutation
//! evaluated on demand, see [`order`]), not a library's, so it never changes under a
//! dependency upgrade, and it takes O(1) memory whatever the number of samples.
//!
//! ## Example
//!
//! ```
//! use std::sync::Arc;
//! use eg_data::{InMemoryDataset, Loader, LoaderOptions, Packing, Placement};
//!
//! # fn main() -> eg_data::Result<()> {
//! let docs = (0..100u32).map(|i| vec![i; 1 + (i as usize % 7)]);
//! let data = Arc::new(InMemoryDataset::from_docs(docs));
//! let opts = LoaderOptions {
//!     seq_len: 16,
//!     rows_per_step: 4,
//!     packing: Packing::Concat,
//!     eos_id: Some(0),
//!     seed: 42,
//!     ..LoaderOptions::default()
//! };
//! let mut loader = Loader::new(data.clone(), opts.clone(), Placement::SINGLE)?;
//! let first = loader.next_batch()?.expect("data");
//! assert_eq!(first.input_ids.len(), 4 * 16);
//!
//! // Save the cursor with the checkpoint, then resume on two ranks.
//! let saved = loader.cursor().to_json()?;
//! let expected = loader.next_batch()?.expect("data");
//! let cursor = eg_data::Cursor::from_json(&saved)?;
//! let mut ids = Vec::new();
//! for rank in 0..2 {
//!     let mut l = Loader::with_cursor(data.clone(), opts.clone(), Placement { rank, world: 2 }, &cursor)?;
//!     ids.extend(l.next_batch()?.expect("data").input_ids);
//! }
//! assert_eq!(ids, expected.input_ids);
//! # Ok(())
//! # }
//! ```

pub mod augment;
mod dataset;
pub mod embedded;
mod error;
mod gguf_vocab;
mod glob;
pub mod labeled;
mod loader;
mod mix;
pub mod order;
pub mod pack;
pub mod pairs;
mod prefetch;
pub mod shards;
pub mod stream;
pub mod tokenize;

pub use augment::Augment;
pub use dataset::{InMemoryDataset, TokenDataset};
pub use error::{Error, Result};
pub use glob::expand_inputs;
pub use labeled::{LabelMap, LabeledDataset, LabeledKind, LabeledOptions};
pub use loader::{Carry, Cursor, Loader, LoaderOptions, Packing, Placement};
pub use mix::Mixture;
pub use pack::{Batch, RowPlan, Span};
pub use pairs::{
    BatchSource, PairCursor, PairDataset, PairEncoding, PairFields, PairLoader, PairLoaderOptions,
    PreferencePair,
};
pub use prefetch::{PrefetchStats, Prefetcher};
pub use shards::{ShardAccess, ShardFiles, ShardWriter, TokenShards, TokenWidth};
pub use stream::{
    ChatMessage, Document, DocumentStream, FieldPath, Format, JsonField, QuarantineEntry,
    QuarantineReason, StreamOptions, StreamStats, TextSplit,
};
pub use tokenize::{
    BpeOptions, ChatTemplate, PrepareOptions, Prepared, PreparedManifest, TextTokenizer, cache_key,
    prepare,
};
