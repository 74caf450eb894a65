//! Layer normalisation that trains.
//!
//! candle-nn 0.11's `LayerNorm::forward` (and `RmsNorm::forward`) run a fused
//! kernel **without a backward pass** on contiguous input: gradients stop there
//! silently, and nothing before the norm trains. relume's [`LayerNorm`] has the same
//! parameters and names (`weight`, `bias`) and the same VarBuilder constructor
//! ([`layer_norm`]), and is built from candle ops that backpropagate. The trainer
//! also refuses a step in which a trainable parameter got no gradient
//! ([`crate::Error::MissingGradients`]), so a model built with candle's fused norm
//! fails loudly instead.
//!
//! On f32 CPU tensors the norm is one fused op with a hand-written backward (the
//! composite takes eleven ops forward and about twice that backward); elsewhere it
//! is the composite, [`composite`].

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Module, Shape, Tensor, D};
use candle_nn::VarBuilder;

use super::kernels::{f32_slice, new_chunks, parallel, sum_by, sum_of, widest};

/// Layer normalisation over the last dimension, with learned scale and shift.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

/// A [`LayerNorm`] of `size` features whose `weight` (ones) and `bias` (zeros) come
/// from `vb`: a drop-in for `candle_nn::layer_norm(size, eps, vb)`.
///
/// # Errors
/// The VarBuilder's (a shape conflict with an existing parameter).
///
/// # Example
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use relume::params::ParamStore;
/// let store = ParamStore::new(Device::Cpu);
/// let ln = relume::nn::layer_norm(4, 1e-5, store.var_builder(0).pp("ln"))?;
/// let x = Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu)?;
/// let grads = ln.forward(&x)?.sqr()?.sum_all()?.backward()?;
/// assert!(grads.get(&store.get("ln.weight").unwrap()).is_some());
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    let weight = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?;
    let bias = vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?;
    Ok(LayerNorm { weight, bias, eps })
}

impl LayerNorm {
    /// A layer norm over given `weight` and `bias` tensors.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        LayerNorm { weight, bias, eps }
    }

    /// The scale.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The shift.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let fused = x.device().is_cpu()
            && [x, &self.weight, &self.bias]
                .iter()
                .all(|t| t.dtype() == DType::F32)
            && x.rank() >= 1;
        if !fused {
            return composite(x, &self.weight, &self.bias, self.eps);
        }
        x.contiguous()?.apply_op3(
            &self.weight.contiguous()?,
            &self.bias.contiguous()?,
            Norm {
                eps: self.eps as f32,
            },
        )
    }
}

/// Layer normalisation from candle ops: the fallback of [`LayerNorm`].
///
/// # Errors
/// candle errors (a weight or bias not matching the last dimension).
pub fn composite(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Rows per task, and per partial sum of the weight and bias gradients. Fixed, so
/// the order of every sum is the same whatever the thread count.
const BLOCK: usize = 32;

/// A row's mean and `1/√(var + eps)`, in f32 like the composite, with the sums
/// in the fixed lane order of [`sum_of`].
#[inline(always)]
fn stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = sum_of(row, |v| v) / n;
    let var = sum_of(row, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `(rows, features)` of an input `[..., C]` whose weight and bias are `[C]`.
fn check(lx: &Layout, lw: &Layout, lb: &Layout) -> candle_core::Result<(usize, usize)> {
    let Some(&c) = lx.dims().last() else {
        bail!("layer_norm: a scalar input has no feature dimension");
    };
    for (l, what) in [(lw, "weight"), (lb, "bias")] {
        if l.dims() != [c] {
            bail!("layer_norm: {what} shape {:?}, expected [{c}]", l.dims());
        }
    }
    Ok((lx.shape().elem_count() / c.max(1), c))
}

/// The forward op: `(x [..., C], weight [C], bias [C])` → same shape as `x`.
struct Norm {
    eps: f32,
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "relume-layer-norm"
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
        let (_, c) = check(l1, l2, l3)?;
        let x = f32_slice(s1, l1, "layer_norm input")?;
        let w = f32_slice(s2, l2, "layer_norm weight")?;
        let b = f32_slice(s3, l3, "layer_norm bias")?;
        // SAFETY: each chunk is whole rows (`BLOCK · c` values, the last one fewer
        // but still whole rows), and every element of every row is written.
        let y = unsafe {
            new_chunks(x.len(), BLOCK * c, parallel(x.len()), |i, out| {
                let xs = &x[i * BLOCK * c..i * BLOCK * c + out.len()];
                // One dispatch per block of rows, not per row.
                widest(
                    #[inline(always)]
                    || {
                        for (yr, xr) in out.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
                            let (mean, rstd) = stats(xr, self.eps);
                            for (((o, &v), &w), &b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                                o.write((v - mean) * rstd * w + b);
                            }
                        }
                    },
                );
            })
        };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let all = x.apply_op3_no_bwd(w, &grad.contiguous()?, &NormGrad { eps: self.eps })?;
        let (n, c) = (x.elem_count(), w.elem_count());
        let gx = x
            .track_op()
            .then(|| all.narrow(0, 0, n)?.reshape(x.shape()));
        let gw = w.track_op().then(|| all.narrow(0, n, c));
        let gb = b.track_op().then(|| all.narrow(0, n + c, c));
        Ok((gx.transpose()?, gw.transpose()?, gb.transpose()?))
    }
}

/// The backward op: `(x, weight, g)` → the gradients of `x`, `weight` and `bias`,
/// flattened and concatenated in that order.
struct NormGrad {
    eps: f32,
}

impl CustomOp3 for NormGrad {
    fn name(&self) -> &'static str {
        "relume-layer-norm-bwd"
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
        let (rows, c) = check(l1, l2, l2)?;
        if l3.dims() != l1.dims() {
            bail!(
                "layer_norm backward: gradient shape {:?}, input shape {:?}",
                l3.dims(),
                l1.dims()
            );
        }
        let x = f32_slice(s1, l1, "layer_norm input")?;
        let w = f32_slice(s2, l2, "layer_norm weight")?;
        let g = f32_slice(s3, l3, "layer_norm output gradient")?;
        let blocks = rows.div_ceil(BLOCK);
        // Room for the weight and bias gradients appended below, so they do not
        // copy the whole input gradient into a larger buffer.
        let mut dx = Vec::with_capacity(x.len() + 2 * c);
        dx.resize(x.len(), 0.0f32);
        // Per block: the weight gradient's partial sum, then the bias gradient's.
        let mut partial = vec![0.0f32; blocks * 2 * c];
        let block = |i: usize, dx: &mut [f32], part: &mut [f32]| {
            let r = i * BLOCK * c..i * BLOCK * c + dx.len();
            let (pw, pb) = part.split_at_mut(c);
            let mut dxhat = vec![0.0f32; c];
            // One dispatch per block of rows, not per row.
            widest(
                #[inline(always)]
                || {
                    for ((dr, xr), gr) in dx
                        .chunks_exact_mut(c)
                        .zip(x[r.clone()].chunks_exact(c))
                        .zip(g[r].chunks_exact(c))
                    {
                        let (mean, rstd) = stats(xr, self.eps);
                        // The element-wise passes are separate zipped loops (no
                        // bounds checks), so they vectorise; the row sums run in
                        // sum_by's fixed lane order.
                        for ((((d, &g), &w), &v), (pw, pb)) in dxhat
                            .iter_mut()
                            .zip(gr)
                            .zip(w)
                            .zip(xr)
                            .zip(pw.iter_mut().zip(pb.iter_mut()))
                        {
                            let xhat = (v - mean) * rstd;
                            *d = g * w;
                            *pw += g * xhat;
                            *pb += g;
                        }
                        let sum = sum_of(&dxhat, |d| d) / c as f32;
                        let dot = sum_by(&dxhat, xr, |d, v| d * ((v - mean) * rstd)) / c as f32;
                        for ((o, &d), &v) in dr.iter_mut().zip(&dxhat).zip(xr) {
                            let xhat = (v - mean) * rstd;
                            *o = rstd * (d - sum - xhat * dot);
                        }
                    }
                },
            );
        };
        if parallel(x.len()) {
            use rayon::prelude::*;
            dx.par_chunks_mut(BLOCK * c)
                .zip(partial.par_chunks_mut(2 * c))
                .enumerate()
                .for_each(|(i, (d, p))| block(i, d, p));
        } else {
            dx.chunks_mut(BLOCK * c)
                .zip(partial.chunks_mut(2 * c))
                .enumerate()
                .for_each(|(i, (d, p))| block(i, d, p));
        }
        let mut out = dx;
        let mut sums = vec![0.0f32; 2 * c];
        for p in partial.chunks_exact(2 * c) {
            for (s, v) in sums.iter_mut().zip(p) {
                *s += v;
            }
        }
        out.extend_from_slice(&sums);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::check_grads;
    use crate::params::ParamStore;
    use crate::rng::Rng;
    use candle_core::Device;

    fn inputs(rows: usize, c: usize) -> Vec<Tensor> {
        let mut r = Rng::new(4, "ln");
        let dev = Device::Cpu;
        vec![
            r.uniform_tensor((rows, c), -3.0, 3.0, &dev).unwrap(),
            r.uniform_tensor(c, 0.5, 1.5, &dev).unwrap(),
            r.uniform_tensor(c, -0.5, 0.5, &dev).unwrap(),
        ]
    }

    fn fused(t: &[Tensor]) -> Tensor {
        LayerNorm::new(t[1].clone(), t[2].clone(), 1e-5)
            .forward(&t[0])
            .unwrap()
    }

    #[test]
    fn fused_matches_composite_forward_and_all_gradients() {
        // 100 rows: several blocks and a partial last one, split across threads.
        for (rows, c) in [(3, 5), (100, 48), (1500, 64)] {
            check_grads(
                &inputs(rows, c),
                fused,
                |t| composite(&t[0], &t[1], &t[2], 1e-5).unwrap(),
                2e-5,
            );
        }
    }

    #[test]
    fn batched_strided_and_other_dtypes() {
        let t = inputs(24, 8);
        check_grads(
            &t,
            |t| {
                fused(&[
                    t[0].reshape((2, 8, 12)).unwrap().transpose(1, 2).unwrap(),
                    t[1].clone(),
                    t[2].clone(),
                ])
            },
            |t| {
                let x = t[0].reshape((2, 8, 12)).unwrap().transpose(1, 2).unwrap();
                composite(&x, &t[1], &t[2], 1e-5).unwrap()
            },
            2e-5,
        );
        let t64: Vec<Tensor> = t.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect();
        let y = fused(&t64);
        assert_eq!(y.dtype(), DType::F64);
        crate::nn::test_util::assert_close(&y.to_dtype(DType::F32).unwrap(), &fused(&t), 1e-5);
    }

    #[test]
    fn fused_is_deterministic_and_checks_shapes() {
        let t = inputs(1000, 40);
        let run = || {
            let v = candle_core::Var::from_tensor(&t[0]).unwrap();
            let y = fused(&[v.as_tensor().clone(), t[1].clone(), t[2].clone()]);
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            g.get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let a: Vec<u32> = run().iter().map(|v| v.to_bits()).collect();
        let b: Vec<u32> = run().iter().map(|v| v.to_bits()).collect();
        assert_eq!(a, b);
        let e = fused_err(&t[0], &t[1].narrow(0, 0, 39).unwrap(), &t[2]);
        assert!(e.contains("weight shape [39], expected [40]"), "{e}");
    }

    fn fused_err(x: &Tensor, w: &Tensor, b: &Tensor) -> String {
        LayerNorm::new(w.clone(), b.clone(), 1e-5)
            .forward(x)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn matches_candle_forward_and_has_gradients_candle_lacks() {
        let store = ParamStore::new(Device::Cpu);
        let vb = store.var_builder(0);
        let ours = layer_norm(6, 1e-5, vb.pp("a")).unwrap();
        let theirs = candle_nn::layer_norm(6, 1e-5, vb.pp("b")).unwrap();
        let x = Tensor::new(
            &[
                [0.5f32, -1.0, 2.0, 3.5, 0.0, 1.0],
                [1.0, 1.0, 1.0, 2.0, 2.0, 9.0],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let a = ours
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = theirs
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-5, "{a:?} vs {b:?}");
        }
        let g = ours
            .forward(&x)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&store.get("a.weight").unwrap()).is_some());
        // candle-nn 0.11's fused forward has no backward: the reason this type exists.
        let g = theirs
            .forward(&x)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&store.get("b.weight").unwrap()).is_none());
    }
}
