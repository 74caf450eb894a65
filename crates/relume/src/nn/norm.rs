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

use candle_core::{Module, Tensor, D};
use candle_nn::VarBuilder;

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
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamStore;
    use candle_core::Device;

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
