//! Causal scaled-dot-product attention.
//!
//! On f32 CPU tensors it is one fused op with a hand-written backward
//! (`attention_kernel.rs`); elsewhere a composite of candle ops that backpropagate
//! ([`composite`]; candle-nn 0.11's fused `softmax_last_dim` has no backward pass,
//! so it is not used).

use candle_core::{DType, Device, Tensor, D};

use super::attention_kernel::{Attention, PackedAttention};

use crate::error::Result;

/// The additive causal mask of `t` positions: 0 on and below the diagonal,
/// -inf above.
fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)?)
}

/// Causal scaled-dot-product attention: `softmax(q·kᵀ/√d + mask)·v` for `q`, `k`,
/// `v` shaped `[batch, heads, time, head_dim]`; position `i` attends to `0..=i`.
///
/// f32 CPU tensors use the fused op (non-contiguous inputs, such as the usual
/// `[batch, time, heads, head_dim]` transposed, are copied first); other dtypes and
/// devices use [`composite`], with the same results up to float rounding.
///
/// # Errors
/// Shape mismatches; candle errors.
///
/// # Example
/// ```
/// use candle_core::{Device, Tensor};
/// let q = Tensor::ones((1, 2, 3, 4), candle_core::DType::F32, &Device::Cpu)?;
/// let y = relume::nn::causal_attention(&q, &q, &q)?;
/// assert_eq!(y.dims(), &[1, 2, 3, 4]);
/// # Ok::<(), relume::Error>(())
/// ```
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let fused = q.device().is_cpu() && [q, k, v].iter().all(|t| t.dtype() == DType::F32);
    if !fused {
        return composite(q, k, v);
    }
    let op = Attention {
        save: q.track_op() || k.track_op() || v.track_op(),
        probs: std::sync::OnceLock::new(),
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// Causal attention from candle ops: the fallback of [`causal_attention`].
///
/// # Errors
/// Shape mismatches; candle errors.
pub fn composite(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (_, _, t, d) = q.dims4()?;
    // candle's CPU matmul refuses batch strides like those of a transposed
    // `[batch, time, heads, head_dim]`.
    let (q, k) = (q.contiguous()?, k.contiguous()?);
    let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
    let scores = scores.broadcast_add(&causal_mask(t, q.dtype(), q.device())?)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    Ok(p.matmul(&v.contiguous()?)?)
}

/// Causal multi-head self-attention on a packed projection: `qkv` is
/// `[batch, time, 3 · width]` (queries, keys, values side by side, as one
/// `Linear(width, 3 · width)` produces them), split into `heads` heads of
/// `width / heads`; the result is `[batch, time, width]` with the heads side by
/// side, ready for the output projection.
///
/// It equals splitting the heads, [`causal_attention`], and merging them (bit for
/// bit on f32 CPU tensors, where the same fused kernel runs), but without the
/// split's and merge's copies or their backward passes (candle's backward of
/// `narrow` pads each gradient with zeros to the full width). Other dtypes and
/// devices use [`composite_self_attention`].
///
/// # Errors
/// `qkv` not rank 3, or its last dimension not `3 × heads × head_dim`; candle errors.
///
/// # Example
/// ```
/// use candle_core::{Device, Tensor};
/// let qkv = Tensor::ones((2, 5, 3 * 8), candle_core::DType::F32, &Device::Cpu)?;
/// let y = relume::nn::causal_self_attention(&qkv, 2)?;
/// assert_eq!(y.dims(), &[2, 5, 8]);
/// # Ok::<(), relume::Error>(())
/// ```
pub fn causal_self_attention(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    if !qkv.device().is_cpu() || qkv.dtype() != DType::F32 {
        return composite_self_attention(qkv, heads);
    }
    let op = PackedAttention {
        heads,
        save: qkv.track_op(),
        probs: std::sync::OnceLock::new(),
    };
    Ok(qkv.contiguous()?.apply_op1(op)?)
}

/// [`causal_self_attention`] from candle ops: split the heads, [`composite`],
/// merge the heads.
///
/// # Errors
/// As [`causal_self_attention`].
pub fn composite_self_attention(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, c3) = qkv.dims3()?;
    if heads == 0 || c3 % (3 * heads) != 0 {
        return Err(candle_core::Error::Msg(format!(
            "causal_self_attention: the last dimension {c3} is not 3 × a multiple of {heads} heads"
        ))
        .into());
    }
    let c = c3 / 3;
    let head = |i: usize| -> Result<Tensor> {
        Ok(qkv
            .narrow(2, i * c, c)?
            .reshape((b, t, heads, c / heads))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let y = composite(&head(0)?, &head(1)?, &head(2)?)?;
    Ok(y.transpose(1, 2)?.reshape((b, t, c))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::{assert_close, check_grads};
    use crate::rng::Rng;

    fn qkv(shape: (usize, usize, usize, usize), seed: u64) -> Vec<Tensor> {
        let mut r = Rng::new(seed, "qkv");
        (0..3)
            .map(|_| r.uniform_tensor(shape, -2.0, 2.0, &Device::Cpu).unwrap())
            .collect()
    }

    #[test]
    fn fused_matches_composite_forward_and_all_gradients() {
        // T below, at and across tile boundaries; several heads in parallel.
        for shape in [(1, 1, 1, 4), (1, 2, 5, 3), (2, 3, 32, 8), (2, 2, 77, 16)] {
            check_grads(
                &qkv(shape, shape.2 as u64),
                |t| causal_attention(&t[0], &t[1], &t[2]).unwrap(),
                |t| composite(&t[0], &t[1], &t[2]).unwrap(),
                2e-5,
            );
        }
    }

    #[test]
    fn strided_inputs_and_other_dtypes() {
        // [B, T, H, D] transposed to [B, H, T, D], as a GPT block produces them.
        let t = qkv((2, 40, 3, 8), 9);
        let tr = |t: &Tensor| t.transpose(1, 2).unwrap();
        assert!(!tr(&t[0]).is_contiguous());
        check_grads(
            &t,
            |t| causal_attention(&tr(&t[0]), &tr(&t[1]), &tr(&t[2])).unwrap(),
            |t| composite(&tr(&t[0]), &tr(&t[1]), &tr(&t[2])).unwrap(),
            2e-5,
        );
        let t64: Vec<Tensor> = t.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect();
        let y = causal_attention(&t64[0], &t64[1], &t64[2]).unwrap();
        assert_eq!(y.dtype(), DType::F64);
        assert_close(
            &y.to_dtype(DType::F32).unwrap(),
            &causal_attention(&t[0], &t[1], &t[2]).unwrap(),
            1e-5,
        );
    }

    #[test]
    fn fused_is_deterministic_and_checks_shapes() {
        let t = qkv((2, 4, 64, 16), 3);
        let run = || {
            let v = candle_core::Var::from_tensor(&t[0]).unwrap();
            let y = causal_attention(v.as_tensor(), &t[1], &t[2]).unwrap();
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let g = g.get(v.as_tensor()).unwrap().flatten_all().unwrap();
            g.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
        let e = causal_attention(&t[0], &t[1].narrow(2, 0, 10).unwrap(), &t[2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("k shape"), "{e}");
    }

    #[test]
    fn packed_self_attention_matches_split_heads_and_composite() {
        let mut r = Rng::new(21, "packed");
        for (b, t, heads, hd) in [(1, 1, 1, 4), (2, 5, 3, 2), (3, 33, 4, 8), (2, 64, 2, 16)] {
            let x = r
                .uniform_tensor((b, t, 3 * heads * hd), -2.0, 2.0, &Device::Cpu)
                .unwrap();
            check_grads(
                std::slice::from_ref(&x),
                |t| causal_self_attention(&t[0], heads).unwrap(),
                |t| composite_self_attention(&t[0], heads).unwrap(),
                2e-5,
            );
            // Bit for bit the split-heads fused op, forward and backward.
            let split = |t: &[Tensor]| {
                let c = heads * hd;
                let head = |i: usize| {
                    t[0].narrow(2, i * c, c)
                        .unwrap()
                        .reshape((b, t[0].dim(1).unwrap(), heads, hd))
                        .unwrap()
                        .transpose(1, 2)
                        .unwrap()
                };
                causal_attention(&head(0), &head(1), &head(2))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .reshape((b, t[0].dim(1).unwrap(), c))
                    .unwrap()
            };
            let bits = |f: &dyn Fn(&[Tensor]) -> Tensor| {
                let v = candle_core::Var::from_tensor(&x).unwrap();
                let y = f(&[v.as_tensor().clone()]);
                let g = (y.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
                let g = g.get(v.as_tensor()).unwrap().clone();
                [y, g].map(|t| crate::nn::test_util::bits(&t))
            };
            assert_eq!(
                bits(&|t| causal_self_attention(&t[0], heads).unwrap()),
                bits(&split),
                "{b}x{t}, {heads} heads of {hd}"
            );
        }
        let x = Tensor::ones((2, 3, 10), DType::F32, &Device::Cpu).unwrap();
        for e in [
            causal_self_attention(&x, 3).unwrap_err(),
            composite_self_attention(&x, 3).unwrap_err(),
            causal_self_attention(&x.flatten_all().unwrap(), 1).unwrap_err(),
        ] {
            assert!(
                e.to_string().contains("causal_self_attention") || e.to_string().contains("rank"),
                "{e}"
            );
        }
        // Other dtypes take the composite path.
        let y = causal_self_attention(
            &Tensor::ones((1, 2, 6), DType::F64, &Device::Cpu).unwrap(),
            1,
        )
        .unwrap();
        assert_eq!(y.dims(), &[1, 2, 2]);
    }

    #[test]
    fn attention_is_causal_and_backpropagates() {
        let dev = Device::Cpu;
        let q = candle_core::Var::from_tensor(
            &Tensor::arange(0f32, 24., &dev)
                .unwrap()
                .reshape((1, 1, 4, 6))
                .unwrap()
                .affine(0.1, 0.0)
                .unwrap(),
        )
        .unwrap();
        let v = Tensor::arange(0f32, 24., &dev)
            .unwrap()
            .reshape((1, 1, 4, 6))
            .unwrap();
        let y = causal_attention(q.as_tensor(), q.as_tensor(), &v).unwrap();
        // Position 0 sees only itself.
        let first = y
            .narrow(2, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(first, vec![0., 1., 2., 3., 4., 5.]);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(q.as_tensor()).is_some());
    }
}
