//! [`gelu`]: the tanh-approximation GELU as one fused op with a hand-written
//! backward.
//!
//! candle's `gelu` forward is one op, but its backward is built from eight more
//! (a cube, a tanh, products and sums), each allocating a tensor. The fused op
//! writes `gelu(x)` forward and `g · gelu'(x)` backward in one pass each, using
//! `½(1 + tanh u) = σ(2u)` so that the whole pass is one vectorised exponential.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

use super::kernels::{exp, f32_slice, new_chunks, parallel, widest};
use crate::error::Result;

/// √(2/π), as candle writes it.
#[allow(clippy::excessive_precision)]
const SQRT_2_OVER_PI: f32 = 0.797_884_560_802_865_355_879_892_119_868_763_73;
/// The cubic coefficient of the tanh approximation.
const CUBIC: f32 = 0.044_715;
/// Elements per task when the pass is split across threads.
const CHUNK: usize = 1 << 14;

/// GELU with the tanh approximation (GPT-2's, PyTorch's `approximate="tanh"`):
/// `½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
///
/// f32 CPU tensors use the fused op (a non-contiguous input is copied first);
/// other dtypes and devices use candle's `gelu`, with the same values up to float
/// rounding.
///
/// # Errors
/// candle errors.
///
/// # Example
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[-1f32, 0.0, 2.0], &Device::Cpu)?;
/// let y = relume::nn::gelu(&x)?.to_vec1::<f32>()?;
/// assert!((y[2] - 1.9546).abs() < 1e-4);
/// # Ok::<(), relume::Error>(())
/// ```
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return composite(x);
    }
    Ok(x.contiguous()?.apply_op1(Gelu)?)
}

/// candle's own `gelu`: the fallback of [`gelu`].
///
/// # Errors
/// candle errors.
pub fn composite(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu()?)
}

/// `(2u, d(2u)/dx)` for the tanh approximation's argument `u`.
#[inline(always)]
fn arg(x: f32) -> (f32, f32) {
    let x2 = x * x;
    let two_u = 2.0 * SQRT_2_OVER_PI * x * (1.0 + CUBIC * x2);
    let d = 2.0 * SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * x2);
    (two_u, d)
}

/// `gelu(x)`, elementwise, across threads for large inputs.
pub(super) fn gelu_new(x: &[f32]) -> Vec<f32> {
    // SAFETY: each chunk is zipped with the input range of its length, and every
    // element of it is written.
    unsafe {
        new_chunks(x.len(), CHUNK, parallel(x.len()), |i, out| {
            let xs = &x[i * CHUNK..i * CHUNK + out.len()];
            widest(
                #[inline(always)]
                || {
                    for (o, &v) in out.iter_mut().zip(xs) {
                        o.write(gelu_at(v));
                    }
                },
            )
        })
    }
}

/// `pre[r] += b` for every row `r` (rows of `b.len()` values), and `gelu(pre)`:
/// the bias of a linear layer and its GELU in one pass over the product.
pub(super) fn gelu_bias_new(pre: &mut [f32], b: &[f32]) -> Vec<f32> {
    if b.is_empty() {
        // No columns: nothing to add (and rows of zero values would write nothing).
        return pre.iter().map(|&v| gelu_at(v)).collect();
    }
    let n = b.len();
    // Whole rows per chunk, so each chunk's bias offset is 0.
    let rows = CHUNK.div_ceil(n).max(1);
    let mut out = Vec::with_capacity(pre.len());
    let spare = &mut out.spare_capacity_mut()[..pre.len()];
    let body = |(p, o): (&mut [f32], &mut [std::mem::MaybeUninit<f32>])| {
        widest(
            #[inline(always)]
            || {
                for (pr, or) in p.chunks_mut(n).zip(o.chunks_mut(n)) {
                    for ((v, o), &bj) in pr.iter_mut().zip(or.iter_mut()).zip(b) {
                        *v += bj;
                        o.write(gelu_at(*v));
                    }
                }
            },
        )
    };
    if parallel(pre.len()) {
        use rayon::prelude::*;
        pre.par_chunks_mut(rows * n)
            .zip(spare.par_chunks_mut(rows * n))
            .for_each(body);
    } else {
        pre.chunks_mut(rows * n)
            .zip(spare.chunks_mut(rows * n))
            .for_each(body);
    }
    // SAFETY: `spare` is cut into chunks of the same lengths as `pre`, and each
    // pair into rows of the same lengths, at most `b.len()` values (the last row of
    // a chunk may be shorter); zipped with `b`, every element of every row of
    // `spare` is written.
    unsafe { out.set_len(pre.len()) };
    out
}

/// `gelu(v)`: `v·σ(2u)`; e^(−2u) = inf gives −0 for very negative v, as it should.
#[inline(always)]
pub(super) fn gelu_at(v: f32) -> f32 {
    let (two_u, _) = arg(v);
    v / (1.0 + exp(-two_u))
}

/// `g · gelu'(x)`, elementwise, across threads for large inputs.
pub(super) fn gelu_grad_new(x: &[f32], g: &[f32]) -> Vec<f32> {
    // SAFETY: as in `gelu_new`; `g` is as long as `x` (checked by the callers, and
    // a shorter one would only leave the zip short, which the assert excludes).
    assert_eq!(
        x.len(),
        g.len(),
        "gelu backward: input and gradient lengths"
    );
    unsafe {
        new_chunks(x.len(), CHUNK, parallel(x.len()), |i, out| {
            let r = i * CHUNK..i * CHUNK + out.len();
            widest(
                #[inline(always)]
                || {
                    for ((o, &v), &g) in out.iter_mut().zip(&x[r.clone()]).zip(&g[r]) {
                        let (two_u, d) = arg(v);
                        let s = 1.0 / (1.0 + exp(-two_u));
                        // d/dx x·σ(2u) = σ + x·σ(1 − σ)·d(2u)/dx
                        o.write(g * (s + v * s * (1.0 - s) * d));
                    }
                },
            )
        })
    }
}

/// The forward op: `x` → `gelu(x)`, any shape.
struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "relume-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "gelu input")?;
        Ok((CpuStorage::F32(gelu_new(x)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

/// The backward op: `(x, g)` → `g · gelu'(x)`.
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "relume-gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "gelu input")?;
        let g = f32_slice(s2, l2, "gelu output gradient")?;
        if l1.dims() != l2.dims() {
            bail!(
                "gelu backward: gradient shape {:?}, input shape {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        Ok((CpuStorage::F32(gelu_grad_new(x, g)), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::{assert_close, check_grads};
    use crate::rng::Rng;
    use candle_core::Device;

    #[test]
    fn fused_matches_candle_forward_and_backward() {
        let x = Rng::new(7, "x")
            .uniform_tensor((37, 1000), -6.0, 6.0, &Device::Cpu)
            .unwrap();
        assert_close(&gelu(&x).unwrap(), &composite(&x).unwrap(), 1e-6);
        check_grads(
            &[x],
            |t| gelu(&t[0]).unwrap(),
            |t| composite(&t[0]).unwrap(),
            1e-5,
        );
    }

    #[test]
    fn extremes_and_nan() {
        let x = Tensor::new(&[-200f32, -20.0, 0.0, 20.0, 200.0, f32::NAN], &Device::Cpu).unwrap();
        let y = gelu(&x).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&y[..5], &[0.0, 0.0, 0.0, 20.0, 200.0]);
        assert!(y[5].is_nan());
    }

    #[test]
    fn strided_and_other_dtypes() {
        let base = Rng::new(8, "x")
            .uniform_tensor((6, 5), -3.0, 3.0, &Device::Cpu)
            .unwrap();
        assert!(!base.t().unwrap().is_contiguous());
        check_grads(
            std::slice::from_ref(&base),
            |t| gelu(&t[0].t().unwrap()).unwrap(),
            |t| composite(&t[0].t().unwrap()).unwrap(),
            1e-5,
        );
        let x = base.t().unwrap();
        let x64 = x.to_dtype(DType::F64).unwrap();
        let y = gelu(&x64).unwrap();
        assert_eq!(y.dtype(), DType::F64);
        assert_close(
            &y.to_dtype(DType::F32).unwrap(),
            &composite(&x).unwrap(),
            1e-6,
        );
    }

    #[test]
    fn backward_exists() {
        let x = candle_core::Var::new(&[0.5f32, -0.5], &Device::Cpu).unwrap();
        let g = gelu(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(
            g.get(x.as_tensor()).is_some(),
            "the fused gelu has no backward"
        );
    }
}
