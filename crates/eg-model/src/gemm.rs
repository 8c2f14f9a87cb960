//! Matrix products on slices through the `gemm` crate (the kernel candle's CPU matmul runs),
//! for the fused training step (issue 9).
//!
//! candle's `matmul` always allocates a zero-filled output and cannot add into an existing
//! buffer. The fused backward needs both: gradients such as `dq·Wq + dk·Wk + dv·Wv` are
//! accumulated in one buffer, and fresh outputs are written without being zeroed first. This
//! module is a small safe interface over `gemm::gemm`: every view is bounds-checked against
//! its slice before the call, outputs are row-major and contiguous.

use gemm::{Parallelism, gemm};

use crate::{Error, Result};

/// Element types the products run on.
pub(crate) trait Float: Copy + Send + Sync + 'static {
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

/// A strided matrix view into a slice: element `(i, j)` is `data[i · rs + j · cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major `rows × cols` block of `data` starting at `offset` whose rows are `stride`
    /// elements apart.
    pub(crate) fn block(
        data: &'a [T],
        offset: usize,
        rows: usize,
        cols: usize,
        stride: usize,
    ) -> Result<Self> {
        let data = data
            .get(offset..)
            .ok_or_else(|| bad("view offset", offset, 0))?;
        let m = Mat {
            data,
            rows,
            cols,
            rs: stride,
            cs: 1,
        };
        m.check()?;
        Ok(m)
    }

    /// The whole of `data` as a row-major `rows × cols` matrix.
    pub(crate) fn rows(data: &'a [T], rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(bad("matrix", rows * cols, data.len()));
        }
        Self::block(data, 0, rows, cols, cols)
    }

    /// The transpose (a view, no copy).
    pub(crate) fn t(self) -> Self {
        Mat {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Every element the view can reach lies inside its slice.
    fn check(&self) -> Result<()> {
        if self.rows == 0 || self.cols == 0 {
            return Ok(());
        }
        let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
        if last >= self.data.len() {
            return Err(bad("strided view", last + 1, self.data.len()));
        }
        Ok(())
    }
}

fn bad(what: &str, expected: usize, found: usize) -> Error {
    Error::ShapeMismatch {
        tensor: format!("gemm {what}"),
        expected: vec![expected],
        found: vec![found],
    }
}

/// All of rayon's compute threads (the pool `hardware.threads` sizes; asking candle instead
/// would read `/proc/cpuinfo` on every call when `RAYON_NUM_THREADS` is unset), unless the
/// caller already runs in parallel.
fn parallelism(parallel: bool) -> Parallelism {
    let n = rayon::current_num_threads();
    if parallel && n > 1 {
        Parallelism::Rayon(n)
    } else {
        Parallelism::None
    }
}

/// `dst (+)= a · b` through `gemm::gemm` for a row-major destination at `dst` with rows
/// `stride` apart.
///
/// # Safety
///
/// `a` and `b` must be checked views (`Mat::check`), `a.cols == b.rows > 0`, and the
/// `a.rows × b.cols` destination rows must be valid for writes (and reads with `read_dst`)
/// and overlap neither input.
unsafe fn call<T: Float>(
    dst: *mut T,
    stride: usize,
    read_dst: bool,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    parallel: bool,
) {
    // SAFETY: the caller's contract is gemm's.
    unsafe {
        gemm(
            a.rows,
            b.cols,
            a.cols,
            dst,
            1,
            stride as isize,
            read_dst,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            parallelism(parallel),
        );
    }
}

/// `dst = a · b` (or `dst += a · b` with `accumulate`) into the row-major block of `dst` at
/// `offset` with row stride `stride`; `parallel`: on the compute threads (else on the
/// calling thread, for callers that are already parallel).
pub(crate) fn matmul_into<T: Float>(
    dst: &mut [T],
    offset: usize,
    stride: usize,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    accumulate: bool,
    parallel: bool,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        return Err(bad("inner dimension", k, b.rows));
    }
    a.check()?;
    b.check()?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let last = offset + (m - 1) * stride + n - 1;
    if stride < n || last >= dst.len() {
        return Err(bad("destination", last + 1, dst.len()));
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                let at = offset + r * stride;
                dst[at..at + n].fill(T::ZERO);
            }
        }
        return Ok(());
    }
    // SAFETY: the destination rows `offset + r·stride .. + n` for r < m, and every element the
    // two views address (checked above), lie inside their slices; `dst` is borrowed mutably, so
    // it overlaps neither input; gemm reads `dst` only when `read_dst` is set.
    unsafe {
        call(
            dst.as_mut_ptr().add(offset),
            stride,
            accumulate,
            a,
            b,
            parallel,
        );
    }
    Ok(())
}

/// `a · b` in a new row-major vector (not zero-filled first: gemm writes every element).
pub(crate) fn matmul<T: Float>(a: Mat<'_, T>, b: Mat<'_, T>, parallel: bool) -> Result<Vec<T>> {
    let (m, n) = (a.rows, b.cols);
    if b.rows != a.cols {
        return Err(bad("inner dimension", a.cols, b.rows));
    }
    if a.cols == 0 {
        return Ok(vec![T::ZERO; m * n]);
    }
    a.check()?;
    b.check()?;
    let mut out: Vec<T> = Vec::with_capacity(m * n);
    if m == 0 || n == 0 {
        return Ok(out);
    }
    // SAFETY: the views are checked; `out` has capacity for the m × n contiguous result, which
    // gemm writes completely (`read_dst` false, k > 0) before the length is set.
    unsafe {
        call(out.as_mut_ptr(), n, false, a, b, parallel);
        out.set_len(m * n);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    c[i * n + j] += a[i * k + p] * b[p * n + j];
                }
            }
        }
        c
    }

    #[test]
    fn products_transposes_blocks_and_accumulation() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.11).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        let got = matmul(
            Mat::rows(&a, m, k).unwrap(),
            Mat::rows(&b, k, n).unwrap(),
            true,
        )
        .unwrap();
        for (x, y) in got.iter().zip(&want) {
            assert!((x - y).abs() < 1e-12);
        }
        // (bᵀ aᵀ)ᵀ = a b through transposed views.
        let bt = matmul(
            Mat::rows(&b, k, n).unwrap().t(),
            Mat::rows(&a, m, k).unwrap().t(),
            false,
        )
        .unwrap();
        for i in 0..m {
            for j in 0..n {
                assert!((bt[j * m + i] - want[i * n + j]).abs() < 1e-12);
            }
        }
        // Accumulating into a block of a wider buffer leaves the rest alone.
        let mut dst = vec![1.0; m * (n + 2)];
        matmul_into(
            &mut dst,
            1,
            n + 2,
            Mat::rows(&a, m, k).unwrap(),
            Mat::rows(&b, k, n).unwrap(),
            true,
            true,
        )
        .unwrap();
        for i in 0..m {
            assert_eq!(dst[i * (n + 2)], 1.0);
            for j in 0..n {
                assert!((dst[i * (n + 2) + 1 + j] - 1.0 - want[i * n + j]).abs() < 1e-12);
            }
        }
        // Out-of-bounds views and destinations are errors, not reads.
        assert!(Mat::block(&a, 30, 2, 7, 7).is_err());
        let mut small = vec![0.0; 4];
        assert!(
            matmul_into(
                &mut small,
                0,
                n,
                Mat::rows(&a, m, k).unwrap(),
                Mat::rows(&b, k, n).unwrap(),
                false,
                false
            )
            .is_err()
        );
    }
}
