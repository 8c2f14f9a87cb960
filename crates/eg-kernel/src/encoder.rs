//! Encoder objectives (BERT): sequence classification and embedding fine-tuning with
//! in-batch negatives.
//!
//! The data are [`eg_data::LabeledDataset`]s through the ordinary loader: one example per row,
//! a header token carrying the class id (or the anchor's length for a pair) followed by the
//! text(s). [`eg_data::labeled::classification_rows`] and [`eg_data::labeled::pair_rows`] turn
//! a micro-batch's rows into padded ids and attention masks (padded to the micro-batch's
//! longest text); the model runs them through [`TrainModel::class_logits`] or
//! [`TrainModel::embeddings`], which [`BertTask`] implements for [`eg_model::Bert`].
//!
//! - [`Classification`]: mean cross entropy over the examples of the global batch
//!   (normaliser: examples), metric `accuracy`.
//! - [`Embedding`]: sentence-transformers' `MultipleNegativesRankingLoss` on (anchor,
//!   positive) pairs — scaled cosine similarities, cross entropy over the micro-batch's
//!   positives (normaliser: pairs), metric `retrieval_accuracy`. The negatives of an anchor
//!   are the other positives of its **micro-batch**: with gradient accumulation the loss is
//!   the mean of per-micro-batch losses, not the loss of one batch of the global size (a
//!   contrastive loss does not decompose over micro-batches; use `micro_batch_rows` equal to
//!   the global batch for the textbook loss).
//!
//! Dropout (the classifier's, [`BertTask::new`]) draws its mask from the batch's seed and the
//! micro-batch's first row, both restored with the data cursor, so a resumed run is bitwise
//! the same; evaluation switches it off.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Device, Tensor, Var};
use eg_data::Batch;
use eg_data::labeled::{Padded, classification_rows, pair_rows};
use eg_model::heads::{self, Dropout};

use crate::objective::{MicroLoss, Objective, scalar};
use crate::trainer::TrainModel;
use crate::{Error, Result};

/// A BERT encoder as a [`TrainModel`]: classification logits (when it has a classification
/// head) and sentence embeddings, with the classifier's dropout on in training only.
#[derive(Debug)]
pub struct BertTask {
    bert: eg_model::Bert,
    dropout: f64,
    training: AtomicBool,
}

impl BertTask {
    /// Wraps `bert`; `dropout` is the classifier's dropout probability, in `[0, 1)`.
    pub fn new(bert: eg_model::Bert, dropout: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&dropout) {
            return Err(Error::InvalidOption {
                option: "dropout",
                reason: format!("{dropout} is outside [0, 1)"),
            });
        }
        Ok(Self {
            bert,
            dropout,
            training: AtomicBool::new(true),
        })
    }

    /// The model.
    pub fn bert(&self) -> &eg_model::Bert {
        &self.bert
    }

    /// The model, unwrapped.
    pub fn into_inner(self) -> eg_model::Bert {
        self.bert
    }

    fn hidden(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        Ok(self.bert.forward(ids, None, Some(mask))?)
    }
}

impl TrainModel for BertTask {
    fn named_params(&self) -> Vec<(String, Var)> {
        self.bert
            .params()
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect()
    }

    fn logits(&self, _ids: &Tensor) -> Result<Tensor> {
        Err(Error::Unsupported {
            what: "next-token logits from a BERT encoder (use the classification or embedding objective)",
            issue: 6,
        })
    }

    fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    fn class_logits(&self, ids: &Tensor, mask: &Tensor, seed: u64) -> Result<Tensor> {
        let hidden = self.hidden(ids, mask)?;
        let dropout =
            (self.training.load(Ordering::Relaxed) && self.dropout > 0.0).then_some(Dropout {
                p: self.dropout,
                seed,
            });
        Ok(self.bert.classify(&hidden, Some(mask), dropout)?)
    }

    fn embeddings(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let hidden = self.hidden(ids, mask)?;
        Ok(self.bert.mean_pooled(&hidden, Some(mask), true)?)
    }
}

/// `[rows, len]` u32 tensors of padded ids and mask.
fn tensors(p: &Padded) -> Result<(Tensor, Tensor)> {
    Ok((
        Tensor::from_slice(&p.ids, (p.rows, p.len), &Device::Cpu)?,
        Tensor::from_slice(&p.mask, (p.rows, p.len), &Device::Cpu)?,
    ))
}

/// The dropout seed of the micro-batch starting at `row`.
fn micro_seed(batch: &Batch, row: usize) -> u64 {
    eg_data::order::mix64(batch.rng_seed ^ (row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Sequence classification: cross entropy of [`TrainModel::class_logits`] against the
/// examples' labels, averaged over the examples of the global batch; metric `accuracy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Classification {
    /// Token used to pad texts to the micro-batch's longest (masked out anyway).
    pub pad_id: u32,
}

impl<M: TrainModel> Objective<M> for Classification {
    fn name(&self) -> &'static str {
        "classification"
    }

    fn normaliser(&self, batch: &Batch) -> Result<f64> {
        Ok(batch.rows as f64)
    }

    fn micro_loss(
        &mut self,
        model: &M,
        batch: &Batch,
        rows: Range<usize>,
        normaliser: f64,
    ) -> Result<Option<MicroLoss>> {
        if rows.is_empty() || normaliser <= 0.0 {
            return Ok(None);
        }
        let start = rows.start;
        let c = classification_rows(batch, rows, self.pad_id)?;
        let (ids, mask) = tensors(&c.texts)?;
        let logits = model.class_logits(&ids, &mask, micro_seed(batch, start))?;
        let n = c.labels.len() as f64;
        let loss = (heads::classification_loss(&logits, &c.labels)? * (n / normaliser))?;
        let correct = heads::correct_predictions(&logits, &c.labels)?;
        Ok(Some(MicroLoss {
            value: scalar(&loss)?,
            loss,
            metrics: vec![("accuracy", correct as f64 / normaliser)],
            grads: None,
        }))
    }
}

/// Embedding fine-tuning on (anchor, positive) pairs with in-batch negatives
/// (sentence-transformers' `MultipleNegativesRankingLoss`); metric `retrieval_accuracy`
/// (anchors whose own positive is the most similar of the micro-batch).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Embedding {
    /// Token used to pad texts (masked out anyway).
    pub pad_id: u32,
    /// Multiplier of the cosine similarities (sentence-transformers: 20).
    pub scale: f64,
}

impl Default for Embedding {
    fn default() -> Self {
        Self {
            pad_id: 0,
            scale: heads::MNRL_DEFAULT_SCALE,
        }
    }
}

impl<M: TrainModel> Objective<M> for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn normaliser(&self, batch: &Batch) -> Result<f64> {
        Ok(batch.rows as f64)
    }

    fn micro_loss(
        &mut self,
        model: &M,
        batch: &Batch,
        rows: Range<usize>,
        normaliser: f64,
    ) -> Result<Option<MicroLoss>> {
        if rows.is_empty() || normaliser <= 0.0 {
            return Ok(None);
        }
        let p = pair_rows(batch, rows, self.pad_id)?;
        let (aids, amask) = tensors(&p.anchors)?;
        let (pids, pmask) = tensors(&p.positives)?;
        let a = model.embeddings(&aids, &amask)?;
        let b = model.embeddings(&pids, &pmask)?;
        let n = p.anchors.rows as f64;
        let mnrl = heads::multiple_negatives_ranking_loss(&a, &b, self.scale)?;
        let loss = (mnrl * (n / normaliser))?;
        let hits = heads::retrieval_hits(&a, &b)?;
        Ok(Some(MicroLoss {
            value: scalar(&loss)?,
            loss,
            metrics: vec![("retrieval_accuracy", hits as f64 / normaliser)],
            grads: None,
        }))
    }
}
