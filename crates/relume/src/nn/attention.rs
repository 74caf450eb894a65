//! Transformer pieces: GELU and causal scaled-dot-product attention.
//!
//! Both are composites of candle ops that backpropagate (candle-nn 0.11's fused
//! `softmax_last_dim` has no backward pass either, so it is not used here).

use candle_core::{DType, Device, Tensor, D};

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
    let (_, _, t, d) = q.dims4()?;
    let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
    let scores = scores.broadcast_add(&causal_mask(t, q.dtype(), q.device())?)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    Ok(p.matmul(&v.contiguous()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

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
