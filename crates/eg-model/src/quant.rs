//! Block quantization of frozen weight matrices for QLoRA: NF4 and INT8.
//!
//! - **NF4** (QLoRA paper, Dettmers et al. 2023): the flattened matrix is cut into blocks of
//!   [`NF4_BLOCK`] (64) values; each block keeps its absolute maximum as an f32 scale and each
//!   value the index (4 bits, two per byte, the first in the high nibble as in bitsandbytes)
//!   of the nearest of the 16 NormalFloat levels [`NF4_CODES`] to `value / absmax`. With
//!   **double quantization** the scales themselves are stored as `i8` in blocks of
//!   [`DOUBLE_QUANT_BLOCK`] (256) with one f32 step per block, after subtracting their mean
//!   (the paper uses 8-bit floats; symmetric int8 after centring gives the same 8 bits per
//!   scale): 4.127 bits per weight instead of 4.5.
//! - **INT8**: symmetric absmax quantization, one f32 scale per row or per block.
//!
//! A [`QuantMatrix`] is only ever dequantized in row tiles ([`QuantMatrix::dequantize_rows`]),
//! so the forward and backward passes of a quantized linear layer
//! ([`crate::lora`]) never hold more than one tile of the dense matrix.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::{Error, Result};

/// Values per NF4 block.
pub const NF4_BLOCK: usize = 64;
/// Scales per double-quantization block.
pub const DOUBLE_QUANT_BLOCK: usize = 256;

/// The 16 NormalFloat-4 levels (bitsandbytes' table): quantiles of a standard normal,
/// normalised to [-1, 1], with an exact zero.
pub const NF4_CODES: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// How a frozen matrix is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum QuantKind {
    /// NF4 in blocks of 64 with absmax scales, optionally double-quantized.
    Nf4 {
        /// Quantize the scales too (int8 in blocks of 256).
        double_quant: bool,
    },
    /// Symmetric int8 with absmax scales.
    Int8 {
        /// Values per scale; `None` is one scale per row.
        block: Option<usize>,
    },
}

impl QuantKind {
    /// From `model.quantization`: `nf4` is NF4 with double quantization (the QLoRA paper's
    /// setting), `int8` is per-row INT8, `none` is `None`.
    pub fn from_config(q: eg_config::wire::BaseQuant) -> Option<Self> {
        use eg_config::wire::BaseQuant as B;
        match q {
            B::Nf4 => Some(QuantKind::Nf4 { double_quant: true }),
            B::Int8 => Some(QuantKind::Int8 { block: None }),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
enum Scales {
    F32(Vec<f32>),
    Double {
        q: Vec<i8>,
        step: Vec<f32>,
        offset: f32,
    },
}

/// A quantized `[rows, cols]` matrix.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    kind: QuantKind,
    block: usize,
    codes: Vec<u8>,
    scales: Scales,
}

fn nearest_nf4(v: f32) -> u8 {
    // Midpoints between consecutive levels; the index is the number of midpoints below v.
    let mut idx = 0u8;
    for w in NF4_CODES.windows(2) {
        if v > 0.5 * (w[0] + w[1]) {
            idx += 1;
        }
    }
    idx
}

impl QuantMatrix {
    /// Quantizes a rank-2 tensor (any float dtype).
    pub fn quantize(w: &Tensor, kind: QuantKind) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let data: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Self::quantize_f32(&data, rows, cols, kind)
    }

    /// Quantizes row-major `data` of shape `[rows, cols]`.
    pub fn quantize_f32(data: &[f32], rows: usize, cols: usize, kind: QuantKind) -> Result<Self> {
        if data.len() != rows * cols || data.is_empty() {
            return Err(Error::ShapeMismatch {
                tensor: "quantized matrix".to_string(),
                expected: vec![rows, cols],
                found: vec![data.len()],
            });
        }
        let block = match kind {
            QuantKind::Nf4 { .. } => NF4_BLOCK,
            QuantKind::Int8 { block: None } => cols,
            QuantKind::Int8 { block: Some(b) } => {
                if b == 0 {
                    return Err(Error::InvalidConfig {
                        field: "quant.block",
                        reason: "the block size must be at least 1".to_string(),
                    });
                }
                b
            }
        };
        let absmax: Vec<f32> = data
            .par_chunks(block)
            .map(|b| b.iter().fold(0.0f32, |m, v| m.max(v.abs())))
            .collect();
        match kind {
            QuantKind::Nf4 { double_quant } => {
                let scales = if double_quant {
                    double_quantize(&absmax)
                } else {
                    Scales::F32(absmax)
                };
                let m = Self {
                    rows,
                    cols,
                    kind,
                    block,
                    codes: Vec::new(),
                    scales,
                };
                // Quantize against the scale that dequantization will use.
                let n = data.len();
                let mut codes = vec![0u8; n.div_ceil(2)];
                codes
                    .par_chunks_mut(NF4_BLOCK / 2)
                    .enumerate()
                    .for_each(|(b, out)| {
                        let s = m.scale(b);
                        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                        for (j, byte) in out.iter_mut().enumerate() {
                            let i = b * NF4_BLOCK + 2 * j;
                            let hi = nearest_nf4(data[i] * inv);
                            let lo = data.get(i + 1).map_or(7, |v| nearest_nf4(v * inv));
                            *byte = (hi << 4) | lo;
                        }
                    });
                Ok(Self { codes, ..m })
            }
            QuantKind::Int8 { .. } => {
                let steps: Vec<f32> = absmax.iter().map(|a| a / 127.0).collect();
                let mut codes = vec![0u8; data.len()];
                codes
                    .par_chunks_mut(block)
                    .zip(data.par_chunks(block))
                    .zip(steps.par_iter())
                    .for_each(|((out, d), &s)| {
                        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                        for (o, v) in out.iter_mut().zip(d) {
                            *o = ((v * inv).round().clamp(-127.0, 127.0) as i8) as u8;
                        }
                    });
                Ok(Self {
                    rows,
                    cols,
                    kind,
                    block,
                    codes,
                    scales: Scales::F32(steps),
                })
            }
        }
    }

    /// The scale of block `b` (absmax for NF4, the step for INT8).
    fn scale(&self, b: usize) -> f32 {
        match &self.scales {
            Scales::F32(v) => v[b],
            Scales::Double { q, step, offset } => {
                f32::from(q[b]) * step[b / DOUBLE_QUANT_BLOCK] + offset
            }
        }
    }

    /// `[rows, cols]`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The quantization.
    pub fn kind(&self) -> QuantKind {
        self.kind
    }

    /// Bytes held by the codes and scales (what the matrix costs in memory, besides a few
    /// words of bookkeeping).
    pub fn storage_bytes(&self) -> usize {
        self.codes.len()
            + match &self.scales {
                Scales::F32(v) => 4 * v.len(),
                Scales::Double { q, step, .. } => q.len() + 4 * step.len() + 4,
            }
    }

    /// Bytes a matrix of `n` values takes when quantized as `kind` with blocks that do not
    /// cross rows of `cols` values (the same figure as [`QuantMatrix::storage_bytes`]).
    pub fn bytes_for(kind: QuantKind, rows: usize, cols: usize) -> u64 {
        let n = (rows * cols) as u64;
        match kind {
            QuantKind::Nf4 { double_quant } => {
                let blocks = n.div_ceil(NF4_BLOCK as u64);
                let scales = if double_quant {
                    blocks + 4 * blocks.div_ceil(DOUBLE_QUANT_BLOCK as u64) + 4
                } else {
                    4 * blocks
                };
                n.div_ceil(2) + scales
            }
            QuantKind::Int8 { block } => {
                let b = block.unwrap_or(cols).max(1) as u64;
                n + 4 * n.div_ceil(b)
            }
        }
    }

    /// Dequantizes rows `r0..r1` into `out` (`(r1 - r0) * cols` values, row-major).
    pub fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) -> Result<()> {
        if r0 > r1 || r1 > self.rows || out.len() != (r1 - r0) * self.cols {
            return Err(Error::ShapeMismatch {
                tensor: "dequantized rows".to_string(),
                expected: vec![r1.saturating_sub(r0), self.cols],
                found: vec![out.len()],
            });
        }
        let cols = self.cols;
        let nf4 = matches!(self.kind, QuantKind::Nf4 { .. });
        out.par_chunks_mut(cols).enumerate().for_each(|(row, o)| {
            let base = (r0 + row) * cols;
            let mut b = usize::MAX;
            let mut s = 0.0f32;
            for (j, v) in o.iter_mut().enumerate() {
                let i = base + j;
                if i / self.block != b {
                    b = i / self.block;
                    s = self.scale(b);
                }
                *v = if nf4 {
                    let byte = self.codes[i / 2];
                    let c = if i.is_multiple_of(2) {
                        byte >> 4
                    } else {
                        byte & 0x0f
                    };
                    NF4_CODES[usize::from(c)] * s
                } else {
                    f32::from(self.codes[i] as i8) * s
                };
            }
        });
        Ok(())
    }

    /// The whole matrix, dequantized, as a `[rows, cols]` tensor.
    pub fn dequantize(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, self.rows, &mut out)?;
        Ok(Tensor::from_vec(out, (self.rows, self.cols), device)?.to_dtype(dtype)?)
    }

    /// Rows per tile so that one dequantized tile holds at most about 4M values (16 MB of
    /// f32).
    pub(crate) fn tile_rows(&self) -> usize {
        ((1usize << 22) / self.cols.max(1)).clamp(1, self.rows.max(1))
    }
}

/// Centred int8 quantization of the block scales, one f32 step per 256 scales.
fn double_quantize(absmax: &[f32]) -> Scales {
    let offset =
        (absmax.iter().map(|&a| f64::from(a)).sum::<f64>() / absmax.len().max(1) as f64) as f32;
    let mut q = Vec::with_capacity(absmax.len());
    let mut step = Vec::with_capacity(absmax.len().div_ceil(DOUBLE_QUANT_BLOCK));
    for chunk in absmax.chunks(DOUBLE_QUANT_BLOCK) {
        let m = chunk.iter().fold(0.0f32, |m, a| m.max((a - offset).abs()));
        let s = m / 127.0;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        step.push(s);
        q.extend(
            chunk
                .iter()
                .map(|a| ((a - offset) * inv).round().clamp(-127.0, 127.0) as i8),
        );
    }
    Scales::Double { q, step, offset }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_level_is_exact_on_levels() {
        for (i, &c) in NF4_CODES.iter().enumerate() {
            assert_eq!(usize::from(nearest_nf4(c)), i);
        }
    }
}
