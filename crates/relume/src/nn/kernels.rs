//! Checked f32 CPU kernels shared by the fused layers: a strided matrix view, a
//! matrix product through the `gemm` crate, and access to contiguous storage.
//!
//! Every kernel validates its shapes and that each view lies inside its slice before
//! touching memory, and reports a candle error (never a panic) otherwise.

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result, Shape};

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

/// The operands of a product: matching inner dimensions, and each view inside its
/// slice.
fn check_operands(a: Mat<'_>, b: Mat<'_>) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        bail!(
            "relume matmul: inner dimensions differ ({m}x{k} · {}x{n})",
            b.rows
        );
    }
    if !a.in_bounds() || !b.in_bounds() {
        bail!("relume matmul: a strided view reaches past the end of its storage");
    }
    Ok(())
}

/// `dst = scale · a · b`, or `dst += scale · a · b` when `accumulate`, where `dst`
/// is the `a.rows × b.cols` block at the start of `dst` with row stride `dst_rs`.
/// `parallel` lets `gemm` use candle's thread count; callers that already split
/// work across threads pass false.
pub(crate) fn gemm_into(
    dst: &mut [f32],
    dst_rs: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    accumulate: bool,
    scale: f32,
    parallel: bool,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    check_operands(a, b)?;
    let out = Mat {
        data: dst,
        rows: m,
        cols: n,
        rs: dst_rs,
        cs: 1,
    };
    if n > dst_rs || !out.in_bounds() {
        bail!(
            "relume matmul: a {m}x{n} destination with row stride {dst_rs} does not fit in {} values",
            dst.len()
        );
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_rs).take(m) {
                row[..n].fill(0.0);
            }
        }
        return Ok(());
    }
    // SAFETY: the m×n block with row stride `dst_rs` (≥ n) was checked to lie inside
    // `dst`; both views were checked to lie inside their slices; the slices outlive
    // the call and `dst` does not alias them (it is a unique borrow).
    unsafe { gemm_raw(dst.as_mut_ptr(), dst_rs, a, b, accumulate, scale, parallel) };
    Ok(())
}

/// A new row-major `a · b` (`a.rows × b.cols`), written by the product alone: no
/// zero fill first, which cost as much as a pass over the result.
pub(crate) fn matmul_new(a: Mat<'_>, b: Mat<'_>) -> Result<Vec<f32>> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    check_operands(a, b)?;
    let Some(len) = m.checked_mul(n) else {
        bail!("relume matmul: a {m}x{n} result does not fit in memory");
    };
    if len == 0 || k == 0 {
        return Ok(vec![0.0; len]);
    }
    let mut out = Vec::with_capacity(len);
    // SAFETY: with `accumulate` false and k > 0, gemm writes every element of the
    // m×n destination (row stride n) through the pointer and reads none of them, so
    // all `len` elements of the capacity are initialised before `set_len`; both
    // views were checked to lie inside their slices, which `out` does not alias.
    unsafe {
        gemm_raw(
            out.as_mut_ptr(),
            n,
            a,
            b,
            false,
            1.0,
            m * n * k >= PARALLEL_MIN_MACS,
        );
        out.set_len(len);
    }
    Ok(out)
}

/// `gemm::gemm` on checked views: `dst = scale · a · b`, or `dst += …` when
/// `accumulate`, with `dst` row-major at row stride `dst_rs`.
///
/// # Safety
/// `a` and `b` lie inside their slices (`Mat::in_bounds`), `b.rows == a.cols`,
/// and `dst` points to an `a.rows × b.cols` block at row stride `dst_rs ≥ b.cols`
/// that the caller may write, which aliases neither view, and which is
/// initialised when `accumulate`.
unsafe fn gemm_raw(
    dst: *mut f32,
    dst_rs: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    accumulate: bool,
    scale: f32,
    parallel: bool,
) {
    let parallelism = match threads() {
        t if parallel && t > 1 => gemm::Parallelism::Rayon(t),
        _ => gemm::Parallelism::None,
    };
    gemm::gemm(
        a.rows,
        b.cols,
        a.cols,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        1.0,
        scale,
        false,
        false,
        false,
        parallelism,
    );
}

/// Below this many elements of work an element- or row-wise kernel runs on the
/// calling thread: waking the pool costs more than it saves.
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// Whether a kernel touching `elems` values should split its rows across threads.
/// The kernels' results never depend on the answer: each row (or head) is computed
/// by the same code on whichever thread, and nothing is reduced across threads.
pub(crate) fn parallel(elems: usize) -> bool {
    elems >= PARALLEL_MIN_ELEMS && threads() > 1
}

/// `f(index, chunk)` for consecutive `chunk`-sized pieces of `out`, across threads
/// when `par`. Deterministic: each piece is written by one call, whatever the
/// thread count.
pub(crate) fn for_chunks<F>(out: &mut [f32], chunk: usize, par: bool, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    use rayon::prelude::*;
    let chunk = chunk.max(1);
    if par {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        out.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// A new vector of `n` values written chunk by chunk, `f(index, chunk)` over
/// consecutive `chunk`-sized pieces (across threads when `par`), like
/// [`for_chunks`] but without the zero fill of `vec![0.0; n]`, which costs a pass
/// over memory as long as a kernel's own.
///
/// # Safety
/// `f` must write every element of each chunk it is given.
pub(crate) unsafe fn new_chunks<F>(n: usize, chunk: usize, par: bool, f: F) -> Vec<f32>
where
    F: Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send,
{
    use rayon::prelude::*;
    let chunk = chunk.max(1);
    let mut out = Vec::with_capacity(n);
    let spare = &mut out.spare_capacity_mut()[..n];
    if par {
        spare
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        spare
            .chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
    // SAFETY: the chunks cover 0..n, and the caller's `f` wrote all of each.
    unsafe { out.set_len(n) };
    out
}

/// Runs `f` compiled for the widest vectors this CPU has (AVX-512, else AVX2,
/// else the portable build), for element-wise loops that the compiler vectorises.
/// IEEE element-wise arithmetic rounds the same at every vector width (and no FMA
/// contraction is done), so the results are bit-identical on every path.
#[inline(always)]
pub(crate) fn widest<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { with_avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { with_avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Lanes of the fixed-order sums ([`sum_by`]): one AVX-512 register of f32.
const LANES: usize = 16;

/// `Σ f(xs[i], ys[i])` over `i < xs.len()` (`ys` at least as long), in a fixed
/// order that vectorises: element `i` goes to partial sum `i % 16`, each partial
/// sum runs in index order, and the 16 are then added pairwise (lane `l` + lane
/// `l + 8`, then `+ 4`, `+ 2`, `+ 1`). A plain left-to-right sum is one chain of
/// dependent additions (4 cycles each), which is what made the row statistics of
/// LayerNorm and softmax slow; this order is as exact and the same on every CPU
/// and vector width, since Rust never reassociates float arithmetic.
#[inline(always)]
pub(crate) fn sum_by(xs: &[f32], ys: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let ys = &ys[..xs.len()];
    let (xc, yc) = (xs.chunks_exact(LANES), ys.chunks_exact(LANES));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (x, y) in xc.zip(yc) {
        for l in 0..LANES {
            acc[l] += f(x[l], y[l]);
        }
    }
    for ((a, &x), &y) in acc.iter_mut().zip(xr).zip(yr) {
        *a += f(x, y);
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0]
}

/// `Σ f(xs[i])` in the order of [`sum_by`].
#[inline(always)]
pub(crate) fn sum_of(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    sum_by(xs, xs, |x, _| f(x))
}

/// The largest element (−inf for none; NaN is skipped, as `f32::max` does), in
/// 16 lanes like [`sum_by`]: the maximum does not depend on the order.
#[inline(always)]
pub(crate) fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max(c[l]);
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a = a.max(x);
    }
    acc.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `e^x` in f32 within 2 ulp of `f32::exp` over the finite range, written so the
/// compiler vectorises loops over it (no calls, no branches). Inputs below −87.3
/// give 0 (not subnormals), above 88.37 give +inf (`f32::exp` overflows at 88.72); NaN gives NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round-to-nearest by the 1.5·2^23 trick, which vectorises on plain SSE2.
    const ROUND: f32 = 12_582_912.0;
    let c = x.clamp(-87.336_55, 88.376_26);
    // `t`'s low mantissa bits hold the rounded exponent: t = 1.5·2^23 + n exactly.
    let t = c * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (c - n * LN2_HI) - n * LN2_LO;
    // Cephes' expf polynomial for e^r on |r| ≤ ln2/2.
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n from t's bits, with no float-to-int conversion (whose saturating form
    // does not vectorise): |n| <= 127 here, so the subtraction is exact.
    let scale = f32::from_bits((t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127)) << 23);
    let y = e * scale;
    let y = if x > 88.376_26 { f32::INFINITY } else { y };
    let y = if x < -87.336_55 { 0.0 } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
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
/// `(rows, columns)` of a tensor of rank >= 1 seen as a matrix: the last
/// dimension is the columns, all the others together the rows.
pub(crate) fn rows_cols(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.dims() {
        [] => bail!("{what} must have at least one dimension, got a scalar"),
        [lead @ .., c] => Ok((lead.iter().product(), *c)),
    }
}

/// `dims` with the last dimension replaced by `last`.
pub(crate) fn with_last(dims: &[usize], last: usize) -> Shape {
    let mut d = dims.to_vec();
    if let Some(l) = d.last_mut() {
        *l = last;
    }
    Shape::from(d)
}

pub(crate) fn dims2(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.dims() {
        [r, c] => Ok((*r, *c)),
        d => bail!("{what} must be a matrix, got shape {d:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_widest_path_is_bit_identical_to_the_portable_one() {
        let xs: Vec<f32> = (0..10_000).map(|i| (i as f32 - 5000.0) * 0.021).collect();
        let body = |out: &mut [f32]| {
            for (o, &x) in out.iter_mut().zip(&xs) {
                *o = x / (1.0 + exp(-x)) + x * x * 0.5;
            }
        };
        let (mut wide, mut portable) = (vec![0f32; xs.len()], vec![0f32; xs.len()]);
        widest(
            #[inline(always)]
            || body(&mut wide),
        );
        body(&mut portable);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&wide), bits(&portable));
    }

    #[test]
    fn lane_sums_follow_their_documented_order_on_every_path() {
        let xs: Vec<f32> = (0..131)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1.3e-3)
            .collect();
        let ys: Vec<f32> = (0..131).map(|i| (i as f32 * 0.7).sin()).collect();
        // The order spelled out: partial sum i % 16 in index order, then pairwise.
        let reference = |n: usize| {
            let mut acc = [0.0f32; 16];
            for i in 0..n {
                acc[i % 16] += xs[i] * ys[i];
            }
            for w in [8, 4, 2, 1] {
                for l in 0..w {
                    acc[l] += acc[l + w];
                }
            }
            acc[0]
        };
        for n in [0, 1, 15, 16, 17, 64, 128, 131] {
            let (x, y) = (&xs[..n], &ys[..n]);
            let portable = sum_by(x, y, |a, b| a * b);
            let wide = widest(
                #[inline(always)]
                || sum_by(x, y, |a, b| a * b),
            );
            assert_eq!(portable.to_bits(), reference(n).to_bits(), "n = {n}");
            assert_eq!(wide.to_bits(), portable.to_bits(), "n = {n}");
            let plain: f32 = x.iter().sum();
            assert!((sum_of(x, |v| v) - plain).abs() <= 1e-6, "n = {n}");
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_of(x).to_bits(), m.to_bits(), "n = {n}");
        }
        assert!(sum_of(&[1.0, f32::NAN, 2.0], |v| v).is_nan());
        assert_eq!(max_of(&[1.0, f32::NAN, 2.0]), 2.0);
    }

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
            let dst = matmul_new(x, y).unwrap();
            for (g, w) in dst.iter().zip(naive(x, y)) {
                assert!((g - w).abs() < 1e-5, "{g} vs {w}");
            }
            let mut acc = vec![1.0; 12];
            gemm_into(&mut acc, 4, x, y, true, 1.0, false).unwrap();
            for (g, w) in acc.iter().zip(&dst) {
                assert!((g - (w + 1.0)).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_std() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x < 88.3 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(a.to_bits().abs_diff(b.to_bits()));
            x += 0.0137;
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn gemm_into_writes_a_strided_block() {
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let id = [1.0f32, 0.0, 0.0, 1.0];
        let mut dst = vec![9.0f32; 6];
        gemm_into(
            &mut dst,
            3,
            Mat::row_major(&a, 2, 2),
            Mat::row_major(&id, 2, 2),
            false,
            0.5,
            false,
        )
        .unwrap();
        assert_eq!(dst, vec![0.5, 1.0, 9.0, 1.5, 2.0, 9.0]);
        assert!(gemm_into(
            &mut dst,
            2,
            Mat::row_major(&a, 2, 2),
            Mat::row_major(&id, 2, 2),
            false,
            1.0,
            false
        )
        .is_ok());
        assert!(
            gemm_into(
                &mut dst,
                1,
                Mat::row_major(&a, 2, 2),
                Mat::row_major(&id, 2, 2),
                false,
                1.0,
                false
            )
            .is_err(),
            "stride below width"
        );
        assert!(
            gemm_into(
                &mut dst[..4],
                3,
                Mat::row_major(&a, 2, 2),
                Mat::row_major(&id, 2, 2),
                false,
                1.0,
                false
            )
            .is_err(),
            "too short"
        );
    }

    #[test]
    fn matmul_rejects_bad_shapes_and_views() {
        let a = vec![0.0f32; 6];
        let mut dst = vec![0.0f32; 4];
        let m = Mat::row_major(&a, 2, 3);
        assert!(matmul_new(m, m).is_err(), "inner dims");
        assert!(
            gemm_into(&mut dst, 2, m, m, false, 1.0, false).is_err(),
            "inner dims"
        );
        let too_long = Mat::row_major(&a, 3, 3);
        assert!(matmul_new(m, too_long).is_err(), "bounds");
        let mut small = vec![0.0f32; 3];
        assert!(
            gemm_into(&mut small, 2, m, m.t(), false, 1.0, false).is_err(),
            "dst size"
        );
    }
}
