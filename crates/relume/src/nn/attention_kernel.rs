//! The fused causal attention op behind [`super::causal_attention`].
//!
//! Per (batch, head), in row tiles of [`TILE`] positions: `S = q·kᵀ/√d` only for
//! the columns a tile can see (the masked upper triangle is skipped, apart from
//! the diagonal tile), a causal softmax in place, then `P·v`. The probabilities are
//! kept in the op for the backward pass, which computes
//! `dS = P ⊙ (dP − rowsum(dP ⊙ P))/√d` from `dP = dO·vᵀ`, then `dq = dS·k`,
//! `dk = dSᵀ·q` and `dv = Pᵀ·dO`, again skipping the masked triangle.
//!
//! Heads run in parallel, each on one thread with single-threaded products, so
//! every value is computed in the same order whatever the thread count.

use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Storage, Tensor};

use super::kernels::{
    exp, f32_slice, for_chunks, gemm_into, max_of, parallel, sum_by, sum_of, widest, Mat,
};

/// Query positions per tile.
const TILE: usize = 32;

/// The forward op: `(q, k, v)`, each `[B, H, T, D]` → `[B, H, T, D]`.
pub(super) struct Attention {
    /// Keep the probabilities for a backward pass (false when nothing needs a
    /// gradient).
    pub save: bool,
    /// The probabilities `[B·H, T, T]`, zero above the diagonal.
    pub probs: OnceLock<Vec<f32>>,
}

/// `(heads, T, D)` after checking that `q`, `k` and `v` share one rank-4 shape.
fn check(l1: &Layout, l2: &Layout, l3: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let &[b, h, t, d] = l1.dims() else {
        bail!(
            "causal_attention: q must be [batch, heads, time, head_dim], got {:?}",
            l1.dims()
        );
    };
    for (l, what) in [(l2, "k"), (l3, "v")] {
        if l.dims() != l1.dims() {
            bail!(
                "causal_attention: {what} shape {:?}, q shape {:?}",
                l.dims(),
                l1.dims()
            );
        }
    }
    Ok((b * h, t, d))
}

/// Runs `f(head, a, b, c)` over matching `size`-sized chunks of three buffers.
fn for_heads<F>(a: &mut [f32], b: &mut [f32], c: &mut [f32], size: usize, par: bool, f: F)
where
    F: Fn(usize, &mut [f32], &mut [f32], &mut [f32]) + Sync + Send,
{
    use rayon::prelude::*;
    let size = size.max(1);
    if par {
        a.par_chunks_mut(size)
            .zip(b.par_chunks_mut(size))
            .zip(c.par_chunks_mut(size))
            .enumerate()
            .for_each(|(i, ((a, b), c))| f(i, a, b, c));
    } else {
        a.chunks_mut(size)
            .zip(b.chunks_mut(size))
            .zip(c.chunks_mut(size))
            .enumerate()
            .for_each(|(i, ((a, b), c))| f(i, a, b, c));
    }
}

/// One head's `T × D` input inside a larger buffer: row `i` starts at
/// `data[i * rs]`. Contiguous per-head tensors have `rs == D`; a head of the packed
/// `[B, T, 3C]` projection is a column block with `rs == 3C`, read in place.
#[derive(Clone, Copy)]
struct HeadIn<'a> {
    data: &'a [f32],
    rs: usize,
}

impl<'a> HeadIn<'a> {
    /// Head `h` of contiguous `[heads, T, D]` values (`td = T·D`).
    fn of_contiguous(x: &'a [f32], h: usize, td: usize, d: usize) -> Self {
        HeadIn {
            data: &x[h * td..(h + 1) * td],
            rs: d,
        }
    }

    /// Rows `r0..r0 + rows`, `cols` wide.
    fn rows(self, r0: usize, rows: usize, cols: usize) -> Mat<'a> {
        rows_of(self.data, r0, rows, cols, self.rs)
    }
}

/// Where one head's backward pass writes `dq`, `dk` and `dv` (each `T × D`).
enum HeadGrads<'a> {
    /// Three separate blocks, rows `rs` apart.
    Split([&'a mut [f32]; 3], usize),
    /// Three column blocks of one buffer with row stride `rs`, starting at `at`.
    Packed {
        data: &'a mut [f32],
        rs: usize,
        at: [usize; 3],
    },
}

impl HeadGrads<'_> {
    /// Block `i` (0 `dq`, 1 `dk`, 2 `dv`) from its row `r0` on, and its row stride.
    fn rows(&mut self, i: usize, r0: usize) -> (&mut [f32], usize) {
        match self {
            HeadGrads::Split(parts, rs) => (&mut parts[i][r0 * *rs..], *rs),
            HeadGrads::Packed { data, rs, at } => (&mut data[at[i] + r0 * *rs..], *rs),
        }
    }
}

/// Rows `r0..r0 + rows` of a `[_, cols]` row-major matrix (`cols` wide).
fn rows_of(data: &[f32], r0: usize, rows: usize, cols: usize, stride: usize) -> Mat<'_> {
    Mat {
        data: &data[r0 * stride..],
        rows,
        cols,
        rs: stride,
        cs: 1,
    }
}

/// One head's forward pass. `p` is `T×T` zeros, `o` is `T×D`.
fn head_forward(
    (q, k, v): (HeadIn<'_>, HeadIn<'_>, HeadIn<'_>),
    p: &mut [f32],
    (o, ors): (&mut [f32], usize),
    t: usize,
    d: usize,
) -> candle_core::Result<()> {
    let scale = 1.0 / (d as f32).sqrt();
    for r0 in (0..t).step_by(TILE) {
        let r1 = (r0 + TILE).min(t);
        let rows = r1 - r0;
        // S[r0..r1, 0..r1]: the columns beyond r1 are masked for the whole tile.
        gemm_into(
            &mut p[r0 * t..],
            t,
            q.rows(r0, rows, d),
            k.rows(0, r1, d).t(),
            false,
            scale,
            false,
        )?;
        // One dispatch per tile of rows, not per row.
        widest(
            #[inline(always)]
            || {
                for i in r0..r1 {
                    let row = &mut p[i * t..i * t + r1];
                    let (seen, masked) = row.split_at_mut(i + 1);
                    masked.fill(0.0);
                    let m = max_of(seen);
                    // The exponentials in a loop of their own, which vectorises; the
                    // sum then runs in sum_of's fixed lane order.
                    for s in seen.iter_mut() {
                        *s = exp(*s - m);
                    }
                    let sum = sum_of(seen, |v| v);
                    for s in seen.iter_mut() {
                        *s /= sum;
                    }
                }
            },
        );
        gemm_into(
            &mut o[r0 * ors..],
            ors,
            rows_of(p, r0, rows, r1, t),
            v.rows(0, r1, d),
            false,
            1.0,
            false,
        )?;
    }
    Ok(())
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "relume-causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (heads, t, d) = check(l1, l2, l3)?;
        let q = f32_slice(s1, l1, "causal_attention q")?;
        let k = f32_slice(s2, l2, "causal_attention k")?;
        let v = f32_slice(s3, l3, "causal_attention v")?;
        let mut out = vec![0.0f32; heads * t * d];
        let mut probs = vec![0.0f32; heads * t * t];
        let (td, tt) = (t * d, t * t);
        let failed = std::sync::Mutex::new(None);
        let par = heads > 1 && parallel(heads * tt * d);
        {
            use rayon::prelude::*;
            let body = |(h, (o, p)): (usize, (&mut [f32], &mut [f32]))| {
                let head = |x| HeadIn::of_contiguous(x, h, td, d);
                if let Err(e) = head_forward((head(q), head(k), head(v)), p, (o, d), t, d) {
                    *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                }
            };
            if par {
                out.par_chunks_mut(td.max(1))
                    .zip(probs.par_chunks_mut(tt.max(1)))
                    .enumerate()
                    .for_each(body);
            } else {
                out.chunks_mut(td.max(1))
                    .zip(probs.chunks_mut(tt.max(1)))
                    .enumerate()
                    .for_each(body);
            }
        }
        if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        if self.save {
            // The op runs forward once; a second run would compute the same values.
            let _ = self.probs.set(probs);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(probs) = self.probs.get() else {
            bail!("causal_attention: backward through an attention run without gradients");
        };
        let all = with_cpu_grad(grad, "causal_attention", |g, dims| {
            if dims != q.dims() {
                bail!(
                    "causal_attention: output gradient shape {dims:?}, q shape {:?}",
                    q.dims()
                );
            }
            q.apply_op3_no_bwd(k, v, &AttentionGrad { probs, grad: g })
        })?;
        let n = q.elem_count();
        let part = |i: usize, t: &Tensor| {
            t.track_op()
                .then(|| all.narrow(0, i * n, n)?.reshape(q.shape()))
                .transpose()
        };
        Ok((part(0, q)?, part(1, k)?, part(2, v)?))
    }
}

/// `f(values, dims)` on an output gradient's contiguous f32 CPU values (copied to
/// contiguous first if needed), borrowed for the call; `op` names the attention op
/// in the errors.
fn with_cpu_grad<R>(
    grad: &Tensor,
    op: &str,
    f: impl FnOnce(&[f32], &[usize]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let grad = grad.contiguous()?;
    let (guard, layout) = grad.storage_and_layout();
    let Storage::Cpu(s) = &*guard else {
        bail!("{op}: output gradient is not on the CPU");
    };
    f(
        f32_slice(s, layout, &format!("{op} output gradient"))?,
        layout.dims(),
    )
}

/// The backward op: `(q, k, v)` with the saved probabilities and the output
/// gradient → `dq`, `dk` and `dv`, flattened and concatenated.
struct AttentionGrad<'a> {
    probs: &'a [f32],
    grad: &'a [f32],
}

/// One head's backward pass into `dq`, `dk`, `dv` (each `T×D`).
fn head_backward(
    (q, k, v): (HeadIn<'_>, HeadIn<'_>, HeadIn<'_>),
    p: &[f32],
    g: HeadIn<'_>,
    out: &mut HeadGrads<'_>,
    t: usize,
    d: usize,
) -> candle_core::Result<()> {
    let scale = 1.0 / (d as f32).sqrt();
    let mut ds = vec![0.0f32; t * t];
    for r0 in (0..t).step_by(TILE) {
        let r1 = (r0 + TILE).min(t);
        let rows = r1 - r0;
        // dP[r0..r1, 0..r1] = dO · vᵀ
        gemm_into(
            &mut ds[r0 * t..],
            t,
            g.rows(r0, rows, d),
            v.rows(0, r1, d).t(),
            false,
            1.0,
            false,
        )?;
        // One dispatch per tile of rows, as forward.
        widest(
            #[inline(always)]
            || {
                for i in r0..r1 {
                    let pr = &p[i * t..i * t + i + 1];
                    let row = &mut ds[i * t..i * t + r1];
                    let (seen, masked) = row.split_at_mut(i + 1);
                    masked.fill(0.0);
                    let dot = sum_by(pr, seen, |a, b| a * b);
                    for (s, &pv) in seen.iter_mut().zip(pr) {
                        *s = pv * (*s - dot) * scale;
                    }
                }
            },
        );
        let (dq, rs) = out.rows(0, r0);
        gemm_into(
            dq,
            rs,
            rows_of(&ds, r0, rows, r1, t),
            k.rows(0, r1, d),
            false,
            1.0,
            false,
        )?;
    }
    for c0 in (0..t).step_by(TILE) {
        let c1 = (c0 + TILE).min(t);
        // Rows before c0 cannot see columns c0..c1.
        let below = Mat {
            data: &ds[c0 * t + c0..],
            rows: t - c0,
            cols: c1 - c0,
            rs: t,
            cs: 1,
        };
        let (dk, rs) = out.rows(1, c0);
        gemm_into(dk, rs, below.t(), q.rows(c0, t - c0, d), false, 1.0, false)?;
        let below = Mat {
            data: &p[c0 * t + c0..],
            ..below
        };
        let (dv, rs) = out.rows(2, c0);
        gemm_into(dv, rs, below.t(), g.rows(c0, t - c0, d), false, 1.0, false)?;
    }
    Ok(())
}

impl CustomOp3 for AttentionGrad<'_> {
    fn name(&self) -> &'static str {
        "relume-causal-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (heads, t, d) = check(l1, l2, l3)?;
        let q = f32_slice(s1, l1, "causal_attention q")?;
        let k = f32_slice(s2, l2, "causal_attention k")?;
        let v = f32_slice(s3, l3, "causal_attention v")?;
        let (td, tt, n) = (t * d, t * t, heads * t * d);
        if self.probs.len() != heads * tt || self.grad.len() != n {
            bail!("causal_attention backward: saved state does not match the inputs");
        }
        let mut out = vec![0.0f32; 3 * n];
        let (dq, rest) = out.split_at_mut(n);
        let (dk, dv) = rest.split_at_mut(n);
        let failed = std::sync::Mutex::new(None);
        let par = heads > 1 && parallel(heads * tt * d);
        for_heads(dq, dk, dv, td, par, |h, dq, dk, dv| {
            let head = |x| HeadIn::of_contiguous(x, h, td, d);
            let res = head_backward(
                (head(q), head(k), head(v)),
                &self.probs[h * tt..(h + 1) * tt],
                head(self.grad),
                &mut HeadGrads::Split([dq, dk, dv], d),
                t,
                d,
            );
            if let Err(e) = res {
                *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            }
        });
        if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        Ok((CpuStorage::F32(out), Shape::from(3 * n)))
    }
}

/// `(batch, time, width, head_dim)` of a packed `[B, T, 3·width]` input split into
/// `heads` heads.
fn packed_dims(l: &Layout, heads: usize) -> candle_core::Result<(usize, usize, usize, usize)> {
    let &[b, t, c3] = l.dims() else {
        bail!(
            "causal_self_attention: qkv must be [batch, time, 3 * width], got {:?}",
            l.dims()
        );
    };
    if heads == 0 || c3 % (3 * heads) != 0 {
        bail!(
            "causal_self_attention: the last dimension {c3} is not 3 × a multiple of {heads} heads"
        );
    }
    Ok((b, t, c3 / 3, c3 / 3 / heads))
}

/// Runs `f(batch, a_chunk, b_chunk)` over matching chunks of two buffers, across
/// threads when `par`.
fn for_batches<F>(a: &mut [f32], b: &mut [f32], (ca, cb): (usize, usize), par: bool, f: F)
where
    F: Fn(usize, &mut [f32], &mut [f32]) + Sync + Send,
{
    use rayon::prelude::*;
    let (ca, cb) = (ca.max(1), cb.max(1));
    if par {
        a.par_chunks_mut(ca)
            .zip(b.par_chunks_mut(cb))
            .enumerate()
            .for_each(|(i, (a, b))| f(i, a, b));
    } else {
        a.chunks_mut(ca)
            .zip(b.chunks_mut(cb))
            .enumerate()
            .for_each(|(i, (a, b))| f(i, a, b));
    }
}

/// The forward op of [`super::causal_self_attention`]: packed `qkv`
/// `[B, T, 3·C]` → `[B, T, C]`. Each (batch, head) is read in place, as a column
/// block of the packed rows, and run through the same [`head_forward`] as
/// [`Attention`], so the values are those of splitting the heads first, bit for
/// bit, without the split's and merge's copies and their backward passes.
pub(super) struct PackedAttention {
    /// Heads the width is split into.
    pub heads: usize,
    /// Keep the probabilities for a backward pass.
    pub save: bool,
    /// The probabilities `[B·H, T, T]`, zero above the diagonal.
    pub probs: OnceLock<Vec<f32>>,
}

impl CustomOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "relume-causal-self-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, t, c, hd) = packed_dims(l, self.heads)?;
        let x = f32_slice(s, l, "causal_self_attention qkv")?;
        let h = self.heads;
        let mut out = vec![0.0f32; b * t * c];
        let mut probs = vec![0.0f32; b * h * t * t];
        let failed = std::sync::Mutex::new(None);
        let par = b > 1 && parallel(b * h * t * t * hd);
        for_batches(
            &mut out,
            &mut probs,
            (t * c, h * t * t),
            par,
            |bi, out, probs| {
                let src = &x[bi * t * 3 * c..(bi + 1) * t * 3 * c];
                // Each head read and written in place: column blocks of the packed
                // rows (stride 3C) and of the output rows (stride C).
                let at = |col: usize| HeadIn {
                    data: &src[col..],
                    rs: 3 * c,
                };
                for (head, p) in probs.chunks_mut((t * t).max(1)).enumerate() {
                    let col = head * hd;
                    let qkv = (at(col), at(c + col), at(2 * c + col));
                    if let Err(e) = head_forward(qkv, p, (&mut out[col..], c), t, hd) {
                        *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        return;
                    }
                }
            },
        );
        if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        if self.save {
            // The op runs forward once; a second run would compute the same values.
            let _ = self.probs.set(probs);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, t, c))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(probs) = self.probs.get() else {
            bail!("causal_self_attention: backward through a run without gradients");
        };
        let dqkv = with_cpu_grad(grad, "causal_self_attention", |g, dims| {
            let d = qkv.dims();
            if dims.len() != 3 || dims[..2] != d[..2] || 3 * dims[2] != d[2] {
                bail!("causal_self_attention: output gradient shape {dims:?}, qkv shape {d:?}");
            }
            let op = PackedAttentionGrad {
                heads: self.heads,
                probs,
                grad: g,
            };
            qkv.apply_op1_no_bwd(&op)
        })?;
        Ok(Some(dqkv))
    }
}

/// The backward op of [`PackedAttention`]: `qkv` with the saved probabilities and
/// the output gradient → `dqkv`, packed like `qkv`.
struct PackedAttentionGrad<'a> {
    heads: usize,
    probs: &'a [f32],
    grad: &'a [f32],
}

impl CustomOp1 for PackedAttentionGrad<'_> {
    fn name(&self) -> &'static str {
        "relume-causal-self-attention-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, t, c, hd) = packed_dims(l, self.heads)?;
        let x = f32_slice(s, l, "causal_self_attention qkv")?;
        let h = self.heads;
        if self.probs.len() != b * h * t * t || self.grad.len() != b * t * c {
            bail!("causal_self_attention backward: saved state does not match the inputs");
        }
        let mut out = vec![0.0f32; b * t * 3 * c];
        let failed = std::sync::Mutex::new(None);
        let par = b > 1 && parallel(b * h * t * t * hd);
        for_chunks(&mut out, t * 3 * c, par, |bi, dst| {
            let src = &x[bi * t * 3 * c..(bi + 1) * t * 3 * c];
            let g_all = &self.grad[bi * t * c..(bi + 1) * t * c];
            // In place, as forward: the packed rows' column blocks (stride 3C).
            let at = |col: usize| HeadIn {
                data: &src[col..],
                rs: 3 * c,
            };
            for head in 0..h {
                let cols = [head * hd, c + head * hd, 2 * c + head * hd];
                let g = HeadIn {
                    data: &g_all[head * hd..],
                    rs: c,
                };
                let p = &self.probs[(bi * h + head) * t * t..(bi * h + head + 1) * t * t];
                let mut out = HeadGrads::Packed {
                    data: &mut *dst,
                    rs: 3 * c,
                    at: cols,
                };
                let res = head_backward(
                    (at(cols[0]), at(cols[1]), at(cols[2])),
                    p,
                    g,
                    &mut out,
                    t,
                    hd,
                );
                if let Err(e) = res {
                    *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    return;
                }
            }
        });
        if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}
