//! Layers built on relume's parameter store and RNG, with fused CPU kernels.
//!
//! [`Linear`] (optionally with its ReLU; [`linear`] builds one from a candle-nn
//! `VarBuilder`, as a drop-in for `candle_nn::linear`), [`cross_entropy`],
//! [`LayerNorm`], [`gelu`], [`causal_attention`] and [`causal_self_attention`] (on
//! the packed `[B, T, 3·C]` projection) are single candle custom ops with hand-written
//! backward passes on f32 CPU tensors (non-contiguous inputs are copied first), and
//! fall back to candle's composite ops ([`composite`]) on other dtypes and devices.
//! Where candle's per-op bookkeeping outweighs the arithmetic, that makes a training
//! step several times faster (see `benches/trainer.rs` and `benches/kernels.rs`).
//! The kernels are deterministic: work is split across threads by rows or heads,
//! and every sum is taken in a fixed order, so results do not depend on the thread
//! count. [`dropout`] draws its mask from a relume [`Rng`] stream, so it is saved
//! and restored with the checkpoint. [`LayerNorm`] replaces candle-nn's, whose fused
//! forward has no backward pass.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use relume::nn::{cross_entropy, dropout, Linear};
//! use relume::params::ParamStore;
//! use relume::rng::Rng;
//!
//! let store = ParamStore::new(Device::Cpu);
//! let mut init = Rng::new(0, "init");
//! let hidden = Linear::new(&store, "hidden", 4, 8, &mut init)?;
//! let out = Linear::new(&store, "out", 8, 3, &mut init)?;
//!
//! let x = Tensor::ones((2, 4), DType::F32, &Device::Cpu)?;
//! let target = Tensor::new(&[0u32, 2], &Device::Cpu)?;
//! let h = dropout(&hidden.forward_relu(&x)?, 0.1, &mut Rng::new(0, "dropout"), true)?;
//! let loss = cross_entropy(&out.forward(&h)?, &target)?;
//! let grads = loss.backward()?;
//! assert_eq!(grads.get(out.weight()).map(|g| g.dims().to_vec()), Some(vec![3, 8]));
//! # Ok::<(), relume::Error>(())
//! ```

use candle_core::Tensor;

use crate::error::Result;
use crate::rng::Rng;

mod attention;
mod attention_kernel;
mod gelu;
mod kernels;
mod linear;
mod loss;
mod norm;
#[cfg(test)]
mod test_util;

pub use attention::{causal_attention, causal_self_attention};
pub use gelu::gelu;
pub use linear::{linear, Linear};
pub use loss::cross_entropy;
pub use norm::{layer_norm, LayerNorm};

/// The composite candle-op implementations that the fused ops fall back to on
/// other devices and dtypes, with the same results up to float rounding. Public so
/// that benchmarks and downstream tests can compare against them.
pub mod composite {
    pub use super::attention::composite as causal_attention;
    pub use super::attention::composite_self_attention as causal_self_attention;
    pub use super::gelu::composite as gelu;
    pub use super::norm::composite as layer_norm;
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
