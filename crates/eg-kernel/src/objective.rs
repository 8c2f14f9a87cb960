//! Training objectives: what the loss of a micro-batch is.
//!
//! The [`Trainer`](crate::Trainer) owns the loop (micro-batches, backward, gradient
//! accumulation, guards); an [`Objective`] owns only the loss. For every global batch the
//! trainer asks the objective once for its [`normaliser`](Objective::normaliser) (what the
//! global mean is taken over: predicted tokens for a language model, pairs for DPO, examples
//! for classification), then, for every micro-batch, for the micro-batch's loss *already
//! divided by that normaliser* ([`MicroLoss::loss`]). Backward on each scaled loss and summing
//! the gradients therefore gives exactly the gradient of the global batch's mean, whatever
//! the micro-batch size (the accumulation bug HF Trainer shipped for years cannot happen).
//!
//! Objectives:
//! - [`CausalLm`]: next-token cross entropy over the batch's loss mask (pre-training; SFT,
//!   whose prompt tokens the loader masks out). With `document_masks`, packed rows are run
//!   with positions restarting at every document and block-diagonal attention
//!   ([`TrainModel::packed_logits`]).
//!
//! ## Adding an objective (e.g. sequence classification or embeddings for BERT)
//!
//! Implement [`Objective`] for your model type. What the trait gives you:
//! - the whole global [`Batch`] for [`Objective::normaliser`] and, for the loss, the same
//!   batch with the row range of the micro-batch (rows `rows.start..rows.end`, each
//!   `batch.seq_len` long; `input_ids`, `position_ids`, `loss_mask`, `cu_seqlens`);
//! - [`Objective::row_group`]: rows that must stay in one micro-batch (2 for DPO pairs; a
//!   contrastive embedding objective with (anchor, positive) rows would return 2 as well);
//!   the trainer rounds the micro-batch size up to a multiple of it;
//! - per-example data the batch does not carry (class labels, ...) must come from the
//!   batch itself: the loader only moves token ids, so encode labels in the dataset (e.g. a
//!   label token per sample, read from `input_ids`) or extend [`Batch`] in eg-data;
//! - model-specific forwards (class logits, pooled embeddings) belong on [`TrainModel`] as
//!   new methods with a default that returns [`Error::Unsupported`], implemented by the
//!   models that have them;
//! - [`MicroLoss::metrics`]: extra per-step metrics (summed over micro-batches, so scale them
//!   by the normaliser like the loss); they appear in `metrics.jsonl` and
//!   [`StepMetrics::extra`](crate::StepMetrics::extra).
//!
//! Install it with [`Trainer::with_objective`](crate::Trainer::with_objective).

use std::ops::Range;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use eg_data::Batch;

use crate::trainer::TrainModel;
use crate::{Error, Result};

/// The loss of one micro-batch.
#[derive(Debug)]
pub struct MicroLoss {
    /// The micro-batch's loss divided by the global batch's normaliser: the trainer calls
    /// `backward` on it and accumulates the gradients.
    pub loss: Tensor,
    /// `loss` as a number; the sum over the micro-batches is the global batch's loss.
    pub value: f64,
    /// Extra metrics of this micro-batch, scaled like `loss` so that the sum over the
    /// micro-batches is the global batch's value (e.g. DPO's reward accuracy).
    pub metrics: Vec<(&'static str, f64)>,
    /// The gradients of `loss`, when the objective computed them itself (a model's fused
    /// training step, [`TrainModel::fused_causal_lm`]); the trainer then uses them instead
    /// of calling `loss.backward()`, and `loss` is only a detached value.
    pub grads: Option<GradStore>,
}

/// A training objective: the loss of a micro-batch, normalised over its global batch.
pub trait Objective<M: TrainModel> {
    /// Short name (`causal_lm`, `dpo`, ...), for logs.
    fn name(&self) -> &'static str;

    /// Rows that must stay together in one micro-batch (1: any split).
    fn row_group(&self) -> usize {
        1
    }

    /// What the global batch's mean loss is taken over (predicted tokens, pairs, examples).
    /// Zero means the batch has nothing to train on.
    fn normaliser(&self, batch: &Batch) -> Result<f64>;

    /// The loss of rows `rows` of `batch` divided by `normaliser`, or `None` when these rows
    /// contribute nothing (no target token).
    fn micro_loss(
        &mut self,
        model: &M,
        batch: &Batch,
        rows: Range<usize>,
        normaliser: f64,
    ) -> Result<Option<MicroLoss>>;

    /// The loss of rows `rows` for evaluation: as [`Objective::micro_loss`], but no gradient
    /// will be taken (an objective that computes gradients itself skips that here).
    fn eval_loss(
        &mut self,
        model: &M,
        batch: &Batch,
        rows: Range<usize>,
        normaliser: f64,
    ) -> Result<Option<MicroLoss>> {
        self.micro_loss(model, batch, rows, normaliser)
    }
}

/// Next-token cross entropy over the tokens the loader marks as targets (pre-training and
/// SFT). Normaliser: predicted tokens of the global batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CausalLm {
    /// Run packed rows with document masks (positions restarting at each document and
    /// block-diagonal attention), as fine-tuning on best-fit-packed rows needs. Off: each row
    /// is one causal sequence with positions `0..seq` (concatenated pre-training).
    pub document_masks: bool,
}

impl CausalLm {
    /// Pre-training: rows are causal sequences.
    pub fn pretrain() -> Self {
        Self {
            document_masks: false,
        }
    }

    /// Fine-tuning on packed rows: document masks on.
    pub fn packed() -> Self {
        Self {
            document_masks: true,
        }
    }
}

/// Token ids of rows `rows` as a `[rows, seq]` u32 tensor.
pub fn row_ids(batch: &Batch, rows: &Range<usize>) -> Result<Tensor> {
    let seq = batch.seq_len;
    Ok(Tensor::from_slice(
        &batch.input_ids[rows.start * seq..rows.end * seq],
        (rows.len(), seq),
        &Device::Cpu,
    )?)
}

/// Position ids of rows `rows` as a `[rows, seq]` u32 tensor.
pub fn row_positions(batch: &Batch, rows: &Range<usize>) -> Result<Tensor> {
    let seq = batch.seq_len;
    let pos = batch
        .position_ids
        .get(rows.start * seq..rows.end * seq)
        .ok_or_else(|| Error::InvalidOption {
            option: "batch.position_ids",
            reason: format!(
                "has {} entries, rows {rows:?} of {seq} need more",
                batch.position_ids.len()
            ),
        })?;
    Ok(Tensor::from_slice(pos, (rows.len(), seq), &Device::Cpu)?)
}

/// Document index of every position of rows `rows` (from `cu_seqlens`), row-major.
pub fn row_doc_ids(batch: &Batch, rows: &Range<usize>) -> Vec<u32> {
    let seq = batch.seq_len;
    let all = batch.doc_ids();
    all.get(rows.start * seq..rows.end * seq)
        .map(<[u32]>::to_vec)
        .unwrap_or_default()
}

/// Logits of rows `rows`: packed (document masks) or plain causal.
pub fn row_logits<M: TrainModel>(
    model: &M,
    batch: &Batch,
    rows: &Range<usize>,
    document_masks: bool,
) -> Result<Tensor> {
    let ids = row_ids(batch, rows)?;
    if document_masks {
        let pos = row_positions(batch, rows)?;
        model.packed_logits(&ids, &pos, &row_doc_ids(batch, rows))
    } else {
        model.logits(&ids)
    }
}

/// Next-token targets of rows `rows` (see [`crate::batch_targets`]).
pub fn row_targets(batch: &Batch, rows: &Range<usize>) -> Vec<Option<u32>> {
    let seq = batch.seq_len;
    let mut out = Vec::with_capacity(rows.len() * seq);
    for r in rows.clone() {
        for i in 0..seq {
            let k = r * seq + i + 1;
            let t = if i + 1 < seq && batch.loss_mask.get(k).is_some_and(|&m| m != 0) {
                batch.input_ids.get(k).copied()
            } else {
                None
            };
            out.push(t);
        }
    }
    out
}

/// A tensor's single value as f64 (exact for f32 and f64 tensors).
pub(crate) fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl<M: TrainModel> Objective<M> for CausalLm {
    fn name(&self) -> &'static str {
        "causal_lm"
    }

    fn normaliser(&self, batch: &Batch) -> Result<f64> {
        let all = 0..batch.rows;
        Ok(row_targets(batch, &all).iter().flatten().count() as f64)
    }

    fn micro_loss(
        &mut self,
        model: &M,
        batch: &Batch,
        rows: Range<usize>,
        normaliser: f64,
    ) -> Result<Option<MicroLoss>> {
        self.loss(model, batch, rows, normaliser, true)
    }

    fn eval_loss(
        &mut self,
        model: &M,
        batch: &Batch,
        rows: Range<usize>,
        normaliser: f64,
    ) -> Result<Option<MicroLoss>> {
        self.loss(model, batch, rows, normaliser, false)
    }
}

impl CausalLm {
    /// The micro-batch loss through the model's fused step when it has one: with `fused`
    /// the whole step (the gradients come back), without it the forward only (evaluation).
    fn loss<M: TrainModel>(
        &self,
        model: &M,
        batch: &Batch,
        rows: Range<usize>,
        normaliser: f64,
        fused: bool,
    ) -> Result<Option<MicroLoss>> {
        let t = row_targets(batch, &rows);
        let count = t.iter().flatten().count();
        if count == 0 || normaliser <= 0.0 {
            return Ok(None);
        }
        let weight = count as f64 / normaliser;
        if !self.document_masks {
            // The model's fused step (same loss, hand-written backward), when it has one;
            // for evaluation its forward alone, which keeps no graph and no activations.
            let ids = row_ids(batch, &rows)?;
            let fused = if fused {
                model
                    .fused_causal_lm(&ids, &t, weight)?
                    .map(|(value, grads)| (value, Some(grads)))
            } else {
                model
                    .fused_causal_lm_loss(&ids, &t, weight)?
                    .map(|value| (value, None))
            };
            if let Some((value, grads)) = fused {
                return Ok(Some(MicroLoss {
                    loss: Tensor::new(value, &Device::Cpu)?,
                    value,
                    metrics: Vec::new(),
                    grads,
                }));
            }
        }
        let logits = row_logits(model, batch, &rows, self.document_masks)?;
        let ce = eg_model::ops::cross_entropy(&logits, &t)?;
        let loss = (ce * weight)?;
        let value = scalar(&loss)?;
        Ok(Some(MicroLoss {
            loss,
            value,
            metrics: Vec::new(),
            grads: None,
        }))
    }
}
