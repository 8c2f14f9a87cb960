//! Direct preference optimisation (DPO, Rafailov et al. 2023).
//!
//! Batches come from [`eg_data::PairLoader`]: row `2i` is prompt + chosen response, row
//! `2i + 1` prompt + rejected response, with the loss mask on the response tokens. For each
//! pair the loss is
//!
//! ```text
//! -log σ(β · ((log πθ(c) − log πref(c)) − (log πθ(r) − log πref(r))))
//! ```
//!
//! where `log π(y)` is the sum of the response tokens' log-probabilities (prompt tokens and
//! padding excluded). The global batch's loss is the mean over its pairs (the normaliser), so
//! gradient accumulation over micro-batches of whole pairs equals one big batch.
//!
//! The reference πref is frozen: for a model with LoRA adapters it is the same model with
//! the adapters disabled ([`TrainModel::base_logits`], no second copy of the weights);
//! otherwise a copy of the initial weights taken when the objective is built
//! ([`TrainModel::frozen_copy`]), which is not in the optimizer and gets no gradient.
//! Reference log-probabilities are computed per micro-batch and enter the loss as constants.
//!
//! Metrics per step (in `metrics.jsonl` under `extra`): `reward_accuracy` (fraction of pairs
//! whose implicit reward `β (log πθ − log πref)` is higher for the chosen response),
//! `reward_margin` (mean chosen minus rejected reward), `reward_chosen`, `reward_rejected`.

use std::ops::Range;

use candle_core::{DType, Tensor};
use eg_data::Batch;

use crate::objective::{MicroLoss, Objective, row_ids, row_targets, scalar};
use crate::trainer::TrainModel;
use crate::{Error, Result};

/// Where the reference log-probabilities come from.
enum Reference<M> {
    /// The trained model with its adapters disabled.
    AdaptersDisabled,
    /// A frozen copy of the initial weights.
    Frozen(Box<M>),
}

/// The DPO objective (see the module docs).
pub struct Dpo<M> {
    beta: f64,
    reference: Reference<M>,
}

impl<M> std::fmt::Debug for Dpo<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = match self.reference {
            Reference::AdaptersDisabled => "adapters disabled",
            Reference::Frozen(_) => "frozen copy",
        };
        f.debug_struct("Dpo")
            .field("beta", &self.beta)
            .field("reference", &r)
            .finish()
    }
}

/// Sequence log-probabilities of DPO's four sequences for the pairs of a micro-batch.
#[derive(Debug, Clone)]
pub struct PairLogps {
    /// `log πθ` of each row (chosen, rejected, chosen, ...), differentiable, `[rows]`.
    pub policy: Tensor,
    /// `log πref` of each row, constants.
    pub reference: Vec<f64>,
}

impl<M: TrainModel> Dpo<M> {
    /// DPO with temperature `beta` (> 0) against `model` as it is now: its adapters disabled
    /// when it has adapters, otherwise a frozen copy of its current weights.
    pub fn new(model: &M, beta: f64) -> Result<Self> {
        if !(beta.is_finite() && beta > 0.0) {
            return Err(Error::InvalidOption {
                option: "dpo.beta",
                reason: format!("must be a finite number above 0, got {beta}"),
            });
        }
        let reference = if model.has_adapters() {
            Reference::AdaptersDisabled
        } else {
            Reference::Frozen(Box::new(model.frozen_copy()?))
        };
        Ok(Self { beta, reference })
    }

    /// β.
    pub fn beta(&self) -> f64 {
        self.beta
    }

    /// Whether the reference is the model with its adapters disabled (else a frozen copy).
    pub fn uses_disabled_adapters(&self) -> bool {
        matches!(self.reference, Reference::AdaptersDisabled)
    }

    /// Logits of the reference for `ids`, detached.
    fn reference_logits(&self, model: &M, ids: &Tensor) -> Result<Tensor> {
        match &self.reference {
            Reference::AdaptersDisabled => {
                model.base_logits(ids)?.ok_or_else(|| Error::InvalidOption {
                    option: "dpo reference",
                    reason: "the model has no adapters any more".into(),
                })
            }
            Reference::Frozen(m) => Ok(m.logits(ids)?.detach()),
        }
    }

    /// Policy and reference sequence log-probabilities of rows `rows` of `batch`.
    pub fn logps(&self, model: &M, batch: &Batch, rows: &Range<usize>) -> Result<PairLogps> {
        let ids = row_ids(batch, rows)?;
        let targets = row_targets(batch, rows);
        let policy = sequence_logps(&model.logits(&ids)?, &targets, batch.seq_len)?;
        let reference = sequence_logps(
            &self.reference_logits(model, &ids)?,
            &targets,
            batch.seq_len,
        )?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
        Ok(PairLogps { policy, reference })
    }
}

/// Sum of the target tokens' log-probabilities per row: `[rows]`, differentiable through
/// `logits` (`[rows, seq, vocab]`). A row without targets gets 0.
pub fn sequence_logps(logits: &Tensor, targets: &[Option<u32>], seq: usize) -> Result<Tensor> {
    let rows = logits.dim(0)?;
    let mut out = Vec::with_capacity(rows);
    for r in 0..rows {
        let t = &targets[r * seq..(r + 1) * seq];
        let n = t.iter().flatten().count();
        if n == 0 {
            out.push(Tensor::zeros(1, logits.dtype(), logits.device())?);
            continue;
        }
        // The mean cross entropy times the count is minus the summed log-probability.
        let ce = eg_model::ops::cross_entropy(&logits.narrow(0, r, 1)?, t)?;
        out.push((ce * -(n as f64))?.reshape(1)?);
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// `log(1 + exp(x))`, stable for any `x`, with a backward.
fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = ((x.abs()?.neg()?.exp()? + 1.0)?).log()?;
    Ok((x.relu()? + tail)?)
}

impl<M: TrainModel> Objective<M> for Dpo<M> {
    fn name(&self) -> &'static str {
        "dpo"
    }

    fn row_group(&self) -> usize {
        2
    }

    fn normaliser(&self, batch: &Batch) -> Result<f64> {
        if !batch.rows.is_multiple_of(2) {
            return Err(Error::InvalidOption {
                option: "dpo batch",
                reason: format!(
                    "has {} rows; DPO needs (chosen, rejected) row pairs from a PairLoader",
                    batch.rows
                ),
            });
        }
        Ok((batch.rows / 2) as f64)
    }

    fn micro_loss(
        &mut self,
        model: &M,
        batch: &Batch,
        rows: Range<usize>,
        normaliser: f64,
    ) -> Result<Option<MicroLoss>> {
        if !(rows.start.is_multiple_of(2) && rows.len().is_multiple_of(2)) || rows.is_empty() {
            return Err(Error::InvalidOption {
                option: "dpo micro-batch",
                reason: format!("rows {rows:?} split a (chosen, rejected) pair"),
            });
        }
        let pairs = rows.len() / 2;
        let lp = self.logps(model, batch, &rows)?;
        let policy = lp.policy.reshape((pairs, 2))?;
        let ref_pairs: Vec<(f64, f64)> = lp.reference.chunks(2).map(|c| (c[0], c[1])).collect();
        let ref_diff: Vec<f64> = ref_pairs.iter().map(|(c, r)| c - r).collect();
        let ref_diff =
            Tensor::from_vec(ref_diff, (pairs, 1), policy.device())?.to_dtype(policy.dtype())?;
        let diff = (policy.narrow(1, 0, 1)? - policy.narrow(1, 1, 1)?)?;
        let z = ((diff - ref_diff)? * self.beta)?;
        let loss = (softplus(&z.neg()?)?.sum_all()? / normaliser)?;
        let value = scalar(&loss)?;
        // Metrics from the policy's values (no gradient needed).
        let pol: Vec<f64> = lp.policy.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let (mut acc, mut margin, mut chosen, mut rejected) = (0.0, 0.0, 0.0, 0.0);
        for (i, (rc, rr)) in ref_pairs.iter().enumerate() {
            let c = self.beta * (pol[2 * i] - rc);
            let r = self.beta * (pol[2 * i + 1] - rr);
            acc += f64::from(u8::from(c > r));
            margin += c - r;
            chosen += c;
            rejected += r;
        }
        Ok(Some(MicroLoss {
            loss,
            value,
            metrics: vec![
                ("reward_accuracy", acc / normaliser),
                ("reward_margin", margin / normaliser),
                ("reward_chosen", chosen / normaliser),
                ("reward_rejected", rejected / normaliser),
            ],
            grads: None,
        }))
    }
}
