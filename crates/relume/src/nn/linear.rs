//! [`Linear`]: a fully connected layer whose forward pass (product, bias and an
//! optional ReLU) is one fused CPU op with a hand-written backward.
//!
//! candle builds `x·Wᵀ + b` from a transpose, a matmul and a broadcast add, and
//! its backward from several more ops, each allocating a tensor and a zero-filled
//! gradient accumulator. For the small layers typical of CPU training that
//! bookkeeping costs more than the arithmetic. The fused op runs one `gemm` forward
//! and, backward, one `gemm` per input that needs a gradient plus a column sum for
//! the bias. On other devices and dtypes the layer falls back to candle's own ops,
//! with the same results up to float rounding.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Module, Shape, Tensor,
};
use candle_nn::VarBuilder;

use std::sync::OnceLock;

use super::gelu::{gelu_bias_new, gelu_grad_new};
use super::kernels::{
    dims2, f32_slice, for_chunks, matmul_new, parallel, rows_cols, widest, with_last, Mat,
};
use crate::error::Result;
use crate::params::{Init, ParamStore};
use crate::rng::Rng;

/// A fully connected layer `y = x·Wᵀ + b`, initialised like PyTorch's `nn.Linear`.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// Creates (or fetches) `{prefix}.weight` `[out, in]` and `{prefix}.bias` `[out]`.
    /// Weight: kaiming-uniform with `a = sqrt(5)`; bias: uniform ±1/sqrt(in).
    ///
    /// # Errors
    /// candle errors; a shape clash with an existing parameter.
    pub fn new(
        store: &ParamStore,
        prefix: &str,
        inp: usize,
        out: usize,
        rng: &mut Rng,
    ) -> Result<Self> {
        let weight = store.get_or_init(
            &format!("{prefix}.weight"),
            (out, inp),
            Init::KaimingUniform { a: 5f32.sqrt() },
            rng,
        )?;
        let bound = 1.0 / (inp.max(1) as f32).sqrt();
        let bias = store.get_or_init(
            &format!("{prefix}.bias"),
            out,
            Init::Uniform {
                lo: -bound,
                hi: bound,
            },
            rng,
        )?;
        Ok(Linear { weight, bias })
    }

    /// A layer over given `weight` `[out, in]` and `bias` `[out]` tensors, for
    /// example variables from a `VarBuilder` or weights loaded from a file. Shapes
    /// are checked at the first forward pass.
    pub fn from_tensors(weight: Tensor, bias: Tensor) -> Self {
        Linear { weight, bias }
    }

    /// The weight, `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `[out]`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// Applies the layer to `x` of shape `[..., in]`.
    ///
    /// # Errors
    /// A last dimension other than `in`; candle errors.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, Act::Identity)
    }

    /// `relu(x·Wᵀ + b)` as one fused op; equal to `forward(x)?.relu()`.
    ///
    /// # Errors
    /// As [`Linear::forward`].
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, Act::Relu)
    }

    /// `gelu(x·Wᵀ + b)` (the tanh approximation of [`crate::nn::gelu`]) as one
    /// fused op, forward and backward: equal bit for bit to
    /// `gelu(&self.forward(x)?)`, with one tensor, one graph node and one gradient
    /// accumulation fewer (the MLP of a transformer block).
    ///
    /// # Errors
    /// As [`Linear::forward`].
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, Act::Gelu)
    }

    fn apply(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        let fused = x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && self.bias.dtype() == DType::F32
            && x.rank() >= 1;
        if !fused {
            let y = candle_nn::Module::forward(
                &candle_nn::Linear::new(self.weight.clone(), Some(self.bias.clone())),
                x,
            )?;
            return match act {
                Act::Identity => Ok(y),
                Act::Relu => Ok(y.relu()?),
                Act::Gelu => super::gelu(&y),
            };
        }
        // Any leading dimensions are rows: the op reads the contiguous storage as
        // `[rows, in]` and keeps them in its output, so no reshape enters the graph.
        Ok(x.contiguous()?.apply_op3(
            &self.weight.contiguous()?,
            &self.bias.contiguous()?,
            LinearOp {
                act,
                save: act == Act::Gelu
                    && (x.track_op() || self.weight.track_op() || self.bias.track_op()),
                pre: OnceLock::new(),
            },
        )?)
    }
}

/// A drop-in for `candle_nn::linear`: `{vb}.weight` `[out, in]` and `{vb}.bias`
/// `[out]` from the VarBuilder, initialised as `candle_nn::linear` does (weight
/// kaiming-normal over the fan-in, bias uniform ±1/sqrt(in)), computed by
/// relume's fused op. Same names, so weights saved from either load into the other.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use relume::params::ParamStore;
/// let store = ParamStore::new(Device::Cpu);
/// let fc = relume::nn::linear(4, 3, store.var_builder(0).pp("fc"))?;
/// let x = Tensor::ones((2, 5, 4), candle_core::DType::F32, &Device::Cpu)?;
/// // Where a candle `Module` is expected, it is one.
/// let y = Module::forward(&fc, &x)?;
/// assert_eq!(y.dims(), &[2, 5, 3]);
/// assert!(store.get("fc.bias").is_some());
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// # Errors
/// A shape or dtype clash with an existing variable of the same name.
pub fn linear(inp: usize, out: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let weight = vb.get_with_hints(
        (out, inp),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    let bound = 1.0 / (inp.max(1) as f64).sqrt();
    let bias = vb.get_with_hints(
        out,
        "bias",
        candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    Ok(Linear { weight, bias })
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.apply(x, Act::Identity) {
            Ok(y) => Ok(y),
            Err(crate::Error::Candle(e)) => Err(e),
            Err(e) => Err(candle_core::Error::wrap(e)),
        }
    }
}

/// The fused forward op: `x [..., K]` (M rows), `w [N, K]`, `b [N]` → `[..., N]`.
struct LinearOp {
    act: Act,
    /// Keep the pre-activation for the backward pass (GELU, when a gradient is
    /// needed).
    save: bool,
    /// `x·Wᵀ + b`, kept for GELU's backward.
    pre: OnceLock<Vec<f32>>,
}

/// The activation fused after the product.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Act {
    Identity,
    Relu,
    Gelu,
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        match self.act {
            Act::Identity => "relume-linear",
            Act::Relu => "relume-linear-relu",
            Act::Gelu => "relume-linear-gelu",
        }
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
        let (m, k) = rows_cols(l1, "linear input")?;
        let (n, kw) = dims2(l2, "linear weight")?;
        if kw != k {
            bail!("linear: input has {k} features, the weight [{n}, {kw}] expects {kw}");
        }
        if l3.dims() != [n] {
            bail!("linear: bias shape {:?}, expected [{n}]", l3.dims());
        }
        let x = f32_slice(s1, l1, "linear input")?;
        let w = f32_slice(s2, l2, "linear weight")?;
        let b = f32_slice(s3, l3, "linear bias")?;
        // x·Wᵀ written by the product alone, then the bias added in the pass
        // over the result that follows (copying bias rows in first and having the
        // product accumulate onto them cost a pass of its own).
        let mut y = matmul_new(Mat::row_major(x, m, k), Mat::row_major(w, n, k).t())?;
        match self.act {
            Act::Gelu => {}
            _ => add_rows(&mut y, b),
        }
        match self.act {
            Act::Identity => {}
            Act::Relu => {
                for v in &mut y {
                    // `< 0` keeps NaN, so a diverging run stays visible; a select, not
                    // a branch, so the loop vectorises.
                    *v = if *v < 0.0 { 0.0 } else { *v };
                }
            }
            Act::Gelu => {
                let out = gelu_bias_new(&mut y, b);
                if self.save {
                    // The op runs forward once; a second run would compute the same values.
                    let _ = self.pre.set(y);
                }
                y = out;
            }
        }
        Ok((CpuStorage::F32(y), with_last(l1.dims(), n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = match self.act {
            Act::Identity => grad.contiguous()?,
            Act::Relu => grad
                .contiguous()?
                .apply_op2_no_bwd(y, &Backward::ReluMask)?,
            Act::Gelu => {
                let Some(pre) = self.pre.get() else {
                    bail!("linear gelu: backward through a run without gradients");
                };
                grad.contiguous()?.apply_op1_no_bwd(&GeluBackward { pre })?
            }
        };
        let gx = if x.track_op() {
            Some(g.apply_op2_no_bwd(w, &Backward::Input)?)
        } else {
            None
        };
        let gw = if w.track_op() {
            Some(g.apply_op2_no_bwd(x, &Backward::Weight)?)
        } else {
            None
        };
        let gb = if b.track_op() {
            Some(g.apply_op1_no_bwd(&ColumnSum)?)
        } else {
            None
        };
        Ok((gx, gw, gb))
    }
}

/// `y[r] += b` for every row `r` of `y` (rows of `b.len()` values), across
/// threads for large outputs.
fn add_rows(y: &mut [f32], b: &[f32]) {
    let n = b.len().max(1);
    // Whole rows per chunk, so each chunk starts at column 0.
    let chunk = (1 << 14) / n * n + n;
    for_chunks(y, chunk, parallel(y.len()), |_, part| {
        widest(
            #[inline(always)]
            || {
                for row in part.chunks_exact_mut(n) {
                    for (v, &bj) in row.iter_mut().zip(b) {
                        *v += bj;
                    }
                }
            },
        )
    });
}

/// GELU's backward inside the fused op: `g` → `g · gelu'(pre)`.
struct GeluBackward<'a> {
    pre: &'a [f32],
}

impl CustomOp1 for GeluBackward<'_> {
    fn name(&self) -> &'static str {
        "relume-linear-gelu-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32_slice(s, l, "linear gelu output gradient")?;
        if g.len() != self.pre.len() {
            bail!(
                "linear gelu backward: gradient of {} values, the forward pass had {}",
                g.len(),
                self.pre.len()
            );
        }
        Ok((
            CpuStorage::F32(gelu_grad_new(self.pre, g)),
            l.shape().clone(),
        ))
    }
}

/// The two-input backward kernels; the first input is always the output
/// gradient `g [M, N]`.
enum Backward {
    /// `(g, y)` → `g` where `y > 0`, else 0.
    ReluMask,
    /// `(g, w [N, K])` → `g·w`, the input gradient `[M, K]`.
    Input,
    /// `(g, x [M, K])` → `gᵀ·x`, the weight gradient `[N, K]`.
    Weight,
}

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        match self {
            Backward::ReluMask => "relume-linear-relu-bwd",
            Backward::Input => "relume-linear-input-bwd",
            Backward::Weight => "relume-linear-weight-bwd",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, n) = rows_cols(l1, "linear output gradient")?;
        let g = f32_slice(s1, l1, "linear output gradient")?;
        match self {
            Backward::ReluMask => {
                if l2.dims() != l1.dims() {
                    bail!("linear relu backward: output shape {:?}", l2.dims());
                }
                let y = f32_slice(s2, l2, "linear output")?;
                let out = g
                    .iter()
                    .zip(y)
                    .map(|(&g, &y)| if y > 0.0 { g } else { 0.0 })
                    .collect();
                Ok((CpuStorage::F32(out), l1.shape().clone()))
            }
            Backward::Input => {
                let (nw, k) = dims2(l2, "linear weight")?;
                let w = f32_slice(s2, l2, "linear weight")?;
                if nw != n {
                    bail!("linear backward: gradient has {n} columns, weight has {nw} rows");
                }
                let (out, _) = product(Mat::row_major(g, m, n), Mat::row_major(w, n, k))?;
                Ok((out, with_last(l1.dims(), k)))
            }
            Backward::Weight => {
                let (mx, k) = rows_cols(l2, "linear input")?;
                let x = f32_slice(s2, l2, "linear input")?;
                if mx != m {
                    bail!("linear backward: gradient has {m} rows, input has {mx}");
                }
                product(Mat::row_major(g, m, n).t(), Mat::row_major(x, m, k))
            }
        }
    }
}

/// A new `a · b` as storage and shape.
fn product(a: Mat<'_>, b: Mat<'_>) -> candle_core::Result<(CpuStorage, Shape)> {
    let out = matmul_new(a, b)?;
    Ok((CpuStorage::F32(out), Shape::from((a.rows, b.cols))))
}

/// `[M, N]` → `[N]`: the bias gradient, summing rows in order.
struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "relume-linear-bias-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, n) = rows_cols(l, "linear output gradient")?;
        let g = f32_slice(s, l, "linear output gradient")?;
        let mut out = vec![0.0f32; n];
        widest(
            #[inline(always)]
            || {
                for row in g.chunks_exact(n.max(1)).take(m) {
                    for (o, v) in out.iter_mut().zip(row) {
                        *o += v;
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    fn layer(inp: usize, out: usize) -> (ParamStore, Linear) {
        let store = ParamStore::new(Device::Cpu);
        let l = Linear::new(&store, "l", inp, out, &mut Rng::new(3, "init")).unwrap();
        (store, l)
    }

    /// Forward values and all three gradients against candle's composite ops.
    fn check_against_candle(x: &Tensor, relu: bool) {
        let (_s, l) = layer(x.dim(x.rank() - 1).unwrap(), 7);
        let xv = Var::from_tensor(x).unwrap();
        let fused = if relu {
            l.forward_relu(xv.as_tensor()).unwrap()
        } else {
            l.forward(xv.as_tensor()).unwrap()
        };
        let reference = {
            let y = xv
                .as_tensor()
                .broadcast_matmul(&l.weight().t().unwrap())
                .unwrap()
                .broadcast_add(l.bias())
                .unwrap();
            if relu {
                y.relu().unwrap()
            } else {
                y
            }
        };
        close(&fused, &reference, 1e-5);
        // A loss that weighs every output differently, so every gradient entry matters.
        let weights = Tensor::arange(0f32, fused.elem_count() as f32, &Device::Cpu)
            .unwrap()
            .affine(0.01, -0.3)
            .unwrap()
            .reshape(fused.shape())
            .unwrap();
        let gf = (&fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gr = (&reference * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for t in [xv.as_tensor(), l.weight(), l.bias()] {
            close(gf.get(t).unwrap(), gr.get(t).unwrap(), 1e-5);
        }
    }

    #[test]
    fn fused_forward_and_backward_match_candle() {
        let x = Rng::new(1, "x")
            .uniform_tensor((5, 4), -1.0, 1.0, &Device::Cpu)
            .unwrap();
        check_against_candle(&x, false);
        check_against_candle(&x, true);
    }

    #[test]
    fn fused_handles_batched_and_strided_inputs() {
        let x = Rng::new(2, "x")
            .uniform_tensor((2, 3, 4), -1.0, 1.0, &Device::Cpu)
            .unwrap();
        check_against_candle(&x, true);
        // A transposed, non-contiguous input.
        let xt = Rng::new(2, "x")
            .uniform_tensor((4, 6), -1.0, 1.0, &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        assert!(!xt.is_contiguous());
        check_against_candle(&xt, false);
    }

    #[test]
    fn large_outputs_split_across_threads_match_candle() {
        // 300 × 130 outputs: above the size at which the bias and GELU passes split
        // across threads, in chunks of whole rows that do not divide 16384.
        let (_s, l) = layer(16, 130);
        let x = Rng::new(9, "x")
            .uniform_tensor((300, 16), -1.0, 1.0, &Device::Cpu)
            .unwrap();
        let reference = x
            .matmul(&l.weight().t().unwrap())
            .unwrap()
            .broadcast_add(l.bias())
            .unwrap();
        close(&l.forward(&x).unwrap(), &reference, 1e-5);
        close(
            &l.forward_gelu(&x).unwrap(),
            &reference.gelu().unwrap(),
            1e-5,
        );
    }

    #[test]
    fn other_dtypes_fall_back_to_candle() {
        let (_s, l) = layer(4, 7);
        let x = Tensor::ones((2, 4), DType::F64, &Device::Cpu).unwrap();
        // candle refuses mixed dtypes: the error comes from the fallback path, not a panic.
        assert!(l.forward(&x).is_err());
        let x32 = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(l.forward(&x32).unwrap().dims(), &[2, 7]);
    }

    #[test]
    fn wrong_feature_count_is_an_error() {
        let (_s, l) = layer(4, 7);
        let x = Tensor::ones((2, 5), DType::F32, &Device::Cpu).unwrap();
        let e = l.forward(&x).unwrap_err().to_string();
        assert!(e.contains("5 features"), "{e}");
    }

    #[test]
    fn from_a_var_builder_it_matches_candle_nn_linear() {
        let store = ParamStore::new(Device::Cpu);
        let l = linear(4, 7, store.var_builder(5).pp("fc")).unwrap();
        assert_eq!(store.get("fc.weight").unwrap().dims(), &[7, 4]);
        let reference = candle_nn::Linear::new(l.weight().clone(), Some(l.bias().clone()));
        let x = Var::from_tensor(
            &Rng::new(4, "x")
                .uniform_tensor((3, 2, 4), -1.0, 1.0, &Device::Cpu)
                .unwrap(),
        )
        .unwrap();
        let fused = Module::forward(&l, x.as_tensor()).unwrap();
        let composite = Module::forward(&reference, x.as_tensor()).unwrap();
        close(&fused, &composite, 1e-5);
        let gf = fused.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gc = composite
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for t in [x.as_tensor(), l.weight(), l.bias()] {
            close(gf.get(t).unwrap(), gc.get(t).unwrap(), 1e-5);
        }
        // A clash with an existing name is candle-nn's error, through the Module too.
        assert!(linear(5, 7, store.var_builder(5).pp("fc")).is_err());
        let e = Module::forward(&l, &Tensor::ones((2, 5), DType::F32, &Device::Cpu).unwrap());
        assert!(e.unwrap_err().to_string().contains("5 features"));
    }

    #[test]
    fn fused_gelu_is_bit_identical_to_linear_then_gelu() {
        let (_s, l) = layer(6, 9);
        let x = Rng::new(8, "x")
            .uniform_tensor((2, 5, 6), -2.0, 2.0, &Device::Cpu)
            .unwrap();
        let run = |fused: bool| {
            let xv = Var::from_tensor(&x).unwrap();
            let y = if fused {
                l.forward_gelu(xv.as_tensor()).unwrap()
            } else {
                crate::nn::gelu(&l.forward(xv.as_tensor()).unwrap()).unwrap()
            };
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            [
                y,
                g.get(xv.as_tensor()).unwrap().clone(),
                g.get(l.weight()).unwrap().clone(),
                g.get(l.bias()).unwrap().clone(),
            ]
            .map(|t| crate::nn::test_util::bits(&t))
        };
        assert_eq!(run(true), run(false));
        // Without gradients nothing is kept, and the values are the same.
        let y = l.forward_gelu(&x).unwrap();
        assert_eq!(y.dims(), &[2, 5, 9]);
        // Other dtypes fall back to candle's ops and candle's gelu.
        let x64 = x.to_dtype(DType::F64).unwrap();
        let l64 = Linear::from_tensors(
            l.weight().to_dtype(DType::F64).unwrap(),
            l.bias().to_dtype(DType::F64).unwrap(),
        );
        close(
            &l64.forward_gelu(&x64)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
            &y,
            1e-5,
        );
    }

    #[test]
    fn relu_keeps_nan() {
        let (_s, l) = layer(2, 3);
        let x = Tensor::new(&[[f32::NAN, 0.0]], &Device::Cpu).unwrap();
        let y = l.forward_relu(&x).unwrap().to_vec2::<f32>().unwrap();
        assert!(y[0].iter().all(|v| v.is_nan()));
    }
}
