//! Task heads and losses on encoder hidden states: pooling, seeded dropout, sequence
//! classification and sentence-embedding fine-tuning with in-batch negatives.
//!
//! Everything here is a plain function of tensors, so each piece is checked against finite
//! differences on its own; [`crate::Bert::classify`] and [`crate::Bert::mean_pooled`]
//! compose them with the model's parameters.
//!
//! - Pooling ([`Pooling`]): the first token (`[CLS]`), or the mean over the tokens the
//!   attention mask keeps (padding never enters the mean).
//! - Dropout ([`Dropout`]) draws its mask from an explicit seed (the trainer passes the
//!   batch's seed, which the data cursor saves), so a resumed run repeats it bit for bit.
//! - Classification: cross entropy of the logits against integer labels
//!   ([`classification_loss`]), plus [`correct_predictions`] for accuracy.
//! - Embeddings: [`multiple_negatives_ranking_loss`] as in sentence-transformers — for
//!   L2-normalised anchors `a_i` and positives `p_j`, the logits `scale · cos(a_i, p_j)` and a
//!   cross entropy whose target for anchor `i` is its own positive `i`; the other positives of
//!   the batch are the negatives.

use candle_core::{D, DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::params::stream_for;
use crate::{Error, Result, ops};

/// How a sequence of hidden states becomes one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The first token (`[CLS]`); BERT's classifier passes it through the pooler
    /// (dense + tanh), as Hugging Face's `BertForSequenceClassification` does.
    #[default]
    Cls,
    /// The mean over the tokens the attention mask keeps (sentence-transformers' pooling).
    Mean,
}

impl Pooling {
    /// `"cls"` or `"mean"`.
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Cls => "cls",
            Pooling::Mean => "mean",
        }
    }

    /// Parses [`Pooling::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "cls" => Some(Pooling::Cls),
            "mean" => Some(Pooling::Mean),
            _ => None,
        }
    }
}

/// Dropout with probability `p` whose mask is drawn from `seed` alone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Probability of zeroing an element, in `[0, 1)`.
    pub p: f64,
    /// Seed of the mask.
    pub seed: u64,
}

/// `x` with dropout applied (kept elements scaled by `1 / (1 - p)`); `None` or `p = 0` is
/// the identity. Gradients flow to `x` only.
pub fn dropout(x: &Tensor, d: Option<Dropout>) -> Result<Tensor> {
    let Some(d) = d.filter(|d| d.p > 0.0) else {
        return Ok(x.clone());
    };
    if !(0.0..1.0).contains(&d.p) {
        return Err(Error::InvalidConfig {
            field: "dropout",
            reason: format!("{} is outside [0, 1)", d.p),
        });
    }
    let mut rng = stream_for(d.seed, "heads.dropout");
    let keep = (1.0 / (1.0 - d.p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            if u < d.p { 0.0 } else { keep }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
    crate::lora::dropout_with_mask(x, &mask)
}

fn check_mask(hidden: &Tensor, mask: &Tensor) -> Result<(usize, usize)> {
    let (b, t, _) = hidden.dims3()?;
    if mask.dims() != [b, t] {
        return Err(Error::ShapeMismatch {
            tensor: "attention_mask".to_string(),
            expected: vec![b, t],
            found: mask.dims().to_vec(),
        });
    }
    Ok((b, t))
}

/// The first token's hidden state, `[batch, hidden]`.
pub fn first_token(hidden: &Tensor) -> Result<Tensor> {
    Ok(hidden.narrow(1, 0, 1)?.squeeze(1)?)
}

/// Mean of `hidden` (`[batch, seq, hidden]`) over the positions where `mask` (`[batch, seq]`,
/// 1 = token, 0 = padding) is set, `[batch, hidden]`; the plain mean without a mask. A row
/// with no token pools to zeros.
pub fn mean_pool(hidden: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    match mask {
        Some(m) => {
            check_mask(hidden, m)?;
            let m = m.to_dtype(hidden.dtype())?.unsqueeze(2)?.detach();
            let sum = hidden.broadcast_mul(&m)?.sum(1)?;
            let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
            Ok(sum.broadcast_div(&count)?)
        }
        None => Ok(hidden.mean(1)?),
    }
}

/// Rows of `x` (`[batch, dim]`) divided by their L2 norm (clamped below at `1e-12`).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

/// Pools `hidden` as `pooling` says (the first token without the pooler, or the masked mean).
pub fn pool(hidden: &Tensor, mask: Option<&Tensor>, pooling: Pooling) -> Result<Tensor> {
    match pooling {
        Pooling::Cls => first_token(hidden),
        Pooling::Mean => mean_pool(hidden, mask),
    }
}

fn check_labels(logits: &Tensor, labels: &[u32]) -> Result<usize> {
    let (b, n) = logits.dims2()?;
    if labels.len() != b {
        return Err(Error::ShapeMismatch {
            tensor: "labels".to_string(),
            expected: vec![b],
            found: vec![labels.len()],
        });
    }
    Ok(n)
}

/// Mean cross entropy of classification logits `[batch, num_labels]` against one label per
/// row (fused, with a backward pass; a label `>= num_labels` is an error).
pub fn classification_loss(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    check_labels(logits, labels)?;
    let targets: Vec<Option<u32>> = labels.iter().map(|&l| Some(l)).collect();
    ops::cross_entropy(logits, &targets)
}

/// Rows whose arg-max logit is the label (ties go to the lowest index).
pub fn correct_predictions(logits: &Tensor, labels: &[u32]) -> Result<usize> {
    let n = check_labels(logits, labels)?;
    let v: Vec<f32> = logits
        .detach()
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let mut correct = 0;
    for (row, &label) in labels.iter().enumerate() {
        let r = &v[row * n..(row + 1) * n];
        let mut best = 0;
        for (i, &x) in r.iter().enumerate() {
            if x > r[best] {
                best = i;
            }
        }
        correct += usize::from(best == label as usize);
    }
    Ok(correct)
}

/// The scale sentence-transformers' `MultipleNegativesRankingLoss` uses by default.
pub const MNRL_DEFAULT_SCALE: f64 = 20.0;

/// The logits of in-batch-negatives training: `scale · a · pᵀ` for L2-normalised anchors and
/// positives (`[batch, dim]` each), `[batch, batch]`.
pub fn similarity_logits(anchors: &Tensor, positives: &Tensor, scale: f64) -> Result<Tensor> {
    if anchors.dims() != positives.dims() || anchors.rank() != 2 {
        return Err(Error::ShapeMismatch {
            tensor: "positive embeddings".to_string(),
            expected: anchors.dims().to_vec(),
            found: positives.dims().to_vec(),
        });
    }
    Ok((anchors.matmul(&positives.t()?)? * scale)?)
}

/// sentence-transformers' `MultipleNegativesRankingLoss`: anchors and positives
/// (`[batch, dim]`, already L2-normalised) give the logits `scale · cos(a_i, p_j)`, and the
/// loss is the mean cross entropy with target `i` for anchor `i`.
pub fn multiple_negatives_ranking_loss(
    anchors: &Tensor,
    positives: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let logits = similarity_logits(anchors, positives, scale)?;
    let b = anchors.dim(0)?;
    let targets: Vec<Option<u32>> = (0..b as u32).map(Some).collect();
    ops::cross_entropy(&logits, &targets)
}

/// Anchors whose own positive has the highest similarity among the batch's positives
/// (in-batch retrieval accuracy).
pub fn retrieval_hits(anchors: &Tensor, positives: &Tensor) -> Result<usize> {
    let logits = similarity_logits(anchors, positives, 1.0)?;
    let b = anchors.dim(0)?;
    let labels: Vec<u32> = (0..b as u32).collect();
    correct_predictions(&logits, &labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn dropout_is_seeded_and_scales_kept_elements() {
        let x = Tensor::ones((4, 64), DType::F32, &Device::Cpu).unwrap();
        let d = Some(Dropout { p: 0.25, seed: 9 });
        let a: Vec<f32> = dropout(&x, d)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = dropout(&x, d)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
        let zeros = a.iter().filter(|&&v| v == 0.0).count();
        assert!(zeros > 30 && zeros < 100, "{zeros}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        let other: Vec<f32> = dropout(&x, Some(Dropout { p: 0.25, seed: 10 }))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_ne!(a, other);
        assert!(dropout(&x, Some(Dropout { p: 1.0, seed: 1 })).is_err());
    }

    #[test]
    fn correct_predictions_counts_argmax() {
        let logits = Tensor::new(&[[0.1f32, 0.9], [2.0, -1.0], [0.0, 0.5]], &Device::Cpu).unwrap();
        assert_eq!(correct_predictions(&logits, &[1, 0, 0]).unwrap(), 2);
        assert!(correct_predictions(&logits, &[1, 0]).is_err());
    }
}
