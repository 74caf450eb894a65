//! Small layers built on relume's parameter store and RNG.

use candle_core::{Module, Tensor};

use crate::error::Result;
use crate::params::{Init, ParamStore};
use crate::rng::Rng;

/// A fully connected layer `y = x·Wᵀ + b`, initialised like PyTorch's `nn.Linear`.
#[derive(Clone, Debug)]
pub struct Linear {
    inner: candle_nn::Linear,
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
        let w = store.get_or_init(
            &format!("{prefix}.weight"),
            (out, inp),
            Init::KaimingUniform { a: 5f32.sqrt() },
            rng,
        )?;
        let bound = 1.0 / (inp.max(1) as f32).sqrt();
        let b = store.get_or_init(
            &format!("{prefix}.bias"),
            out,
            Init::Uniform {
                lo: -bound,
                hi: bound,
            },
            rng,
        )?;
        Ok(Linear {
            inner: candle_nn::Linear::new(w, Some(b)),
        })
    }

    /// Applies the layer.
    ///
    /// # Errors
    /// candle errors.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.inner.forward(x)?)
    }
}

/// Inverted dropout drawing its mask from `rng`; identity when `train` is false or `p == 0`.
///
/// # Errors
/// `p` outside `[0, 1)`; candle errors.
pub fn dropout(x: &Tensor, p: f32, rng: &mut Rng, train: bool) -> Result<Tensor> {
    if !train || p == 0.0 {
        return Ok(x.clone());
    }
    let mask = rng.dropout_mask(x.shape(), p, x.device())?;
    Ok(x.mul(&mask)?)
}
