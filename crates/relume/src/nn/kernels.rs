//! Checked f32 CPU kernels shared by the fused layers: a strided matrix view, a
//! matrix product through the `gemm` crate, and access to contiguous storage.
//!
//! Every kernel validates its shapes and that each view lies inside its slice before
//! touching memory, and reports a candle error (never a panic) otherwise.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result};

/// Below this many multiply-adds a product runs on the calling thread. Small
/// products (every layer of the digits MLP) lose more to waking a thread pool than
/// they gain, and asking candle for its thread count parses `/proc/cpuinfo` when
/// `RAYON_NUM_THREADS` is unset.
const PARALLEL_MIN_MACS: usize = 1 << 22;

/// candle's thread count, asked once: without `RAYON_NUM_THREADS` candle parses
/// `/proc/cpuinfo` on every call. Read at the first large product, like candle's own
/// pools read it at first use (so [`crate::set_cpu_threads`] belongs at start-up).
fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// A read-only strided f32 matrix: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, as a view of the same memory.
    pub fn t(self) -> Self {
        Mat {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Whether every element of the view lies inside `data`.
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1)
            .checked_mul(self.rs)
            .and_then(|a| (self.cols - 1).checked_mul(self.cs).map(|b| (a, b)))
            .and_then(|(a, b)| a.checked_add(b));
        matches!(last, Some(i) if i < self.data.len())
    }
}

/// `dst = a · b`, or `dst += a · b` when `accumulate`; `dst` is row-major
/// `a.rows × b.cols`.
pub(crate) fn matmul_into(dst: &mut [f32], a: Mat<'_>, b: Mat<'_>, accumulate: bool) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        bail!(
            "relume matmul: inner dimensions differ ({m}x{k} · {}x{n})",
            b.rows
        );
    }
    if dst.len() != m * n {
        bail!(
            "relume matmul: destination holds {} values, {m}x{n} needs {}",
            dst.len(),
            m * n
        );
    }
    if !a.in_bounds() || !b.in_bounds() {
        bail!("relume matmul: a strided view reaches past the end of its storage");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    let parallelism = if m * n * k >= PARALLEL_MIN_MACS {
        match threads() {
            t if t > 1 => gemm::Parallelism::Rayon(t),
            _ => gemm::Parallelism::None,
        }
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `dst` is exactly m×n row-major; both views were checked to lie inside
    // their slices; the slices outlive the call and `dst` does not alias them (it is
    // a unique borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// The contiguous f32 values behind `layout`, or an error naming `what`.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{what} must be f32, got {:?}", s.dtype());
    };
    match l.contiguous_offsets() {
        Some((a, b)) if b <= v.len() => Ok(&v[a..b]),
        _ => bail!("{what} must be contiguous"),
    }
}

/// The `[rows, cols]` of a rank-2 layout, or an error naming `what`.
pub(crate) fn dims2(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.dims() {
        [r, c] => Ok((*r, *c)),
        d => bail!("{what} must be a matrix, got shape {d:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: Mat<'_>, b: Mat<'_>) -> Vec<f32> {
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = 0.0f64;
                for p in 0..a.cols {
                    s += f64::from(a.data[i * a.rs + p * a.cs])
                        * f64::from(b.data[p * b.rs + j * b.cs]);
                }
                out[i * b.cols + j] = s as f32;
            }
        }
        out
    }

    #[test]
    fn matmul_matches_naive_for_every_transpose() {
        let a: Vec<f32> = (0..15).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..20).map(|i| (i as f32 * 0.11).cos()).collect();
        let am = Mat::row_major(&a, 3, 5);
        let bm = Mat::row_major(&b, 5, 4);
        for (x, y) in [
            (am, bm),
            (Mat::row_major(&a, 5, 3).t(), bm),
            (am, Mat::row_major(&b, 4, 5).t()),
        ] {
            let mut dst = vec![0.0; 12];
            matmul_into(&mut dst, x, y, false).unwrap();
            for (g, w) in dst.iter().zip(naive(x, y)) {
                assert!((g - w).abs() < 1e-5, "{g} vs {w}");
            }
            let mut acc = vec![1.0; 12];
            matmul_into(&mut acc, x, y, true).unwrap();
            for (g, w) in acc.iter().zip(&dst) {
                assert!((g - (w + 1.0)).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn matmul_rejects_bad_shapes_and_views() {
        let a = vec![0.0f32; 6];
        let mut dst = vec![0.0f32; 4];
        let m = Mat::row_major(&a, 2, 3);
        assert!(matmul_into(&mut dst, m, m, false).is_err(), "inner dims");
        let too_long = Mat::row_major(&a, 3, 3);
        assert!(matmul_into(&mut dst, m, too_long, false).is_err(), "bounds");
        let mut small = vec![0.0f32; 3];
        assert!(
            matmul_into(&mut small, m, m.t(), false).is_err(),
            "dst size"
        );
    }
}
