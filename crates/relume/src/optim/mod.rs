//! Optimizers with named, exportable state: SGD, Adam, AdamW.
//!
//! State is keyed by parameter **name**, with a per-parameter step counter, and
//! updates reproduce PyTorch's rules exactly (checked against torch's own values).

mod adam;
pub mod clip;
mod sgd;
mod state;

pub use self::adam::{Adam, AdamConfig, AdamW};
pub use self::clip::{clip_grad_norm, clip_grad_value, total_norm};
pub use self::sgd::{Sgd, SgdConfig};
pub use self::state::report_to_error;

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use relume_ckpt::Stateful;

use crate::error::{Error, Result};
use crate::params::ParamStore;

/// Gradients keyed by parameter name, in name order.
///
/// Built from candle's `GradStore` after `backward()`; accumulation over several
/// micro-batches adds them by name.
#[derive(Clone, Debug, Default)]
pub struct Grads {
    grads: BTreeMap<String, Tensor>,
}

impl Grads {
    /// No gradients.
    pub fn new() -> Self {
        Grads::default()
    }

    /// The gradients as bytes, for a data-parallel exchange: per gradient its name,
    /// shape and f32 values (little-endian), in name order.
    ///
    /// # Errors
    /// A gradient that is not f32 ([`Error::InvalidSetting`]); candle errors.
    pub(crate) fn encode(&self) -> Result<Vec<u8>> {
        // Sized up front: the message is one allocation, never regrown.
        let len = 8 + self
            .grads
            .iter()
            .map(|(name, g)| 8 + name.len() + 8 * (1 + g.rank()) + 4 * g.elem_count())
            .sum::<usize>();
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&(self.grads.len() as u64).to_le_bytes());
        for (name, g) in &self.grads {
            if g.dtype() != candle_core::DType::F32 {
                return Err(Error::InvalidSetting {
                    setting: format!("gradient of {name}"),
                    value: format!("{:?}", g.dtype()),
                    rule:
                        "data-parallel training exchanges f32 gradients; keep the parameters in f32"
                            .into(),
                });
            }
            out.extend_from_slice(&(name.len() as u64).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(g.rank() as u64).to_le_bytes());
            for d in g.dims() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            // A contiguous CPU gradient is copied straight from its storage.
            let (storage, layout) = g.storage_and_layout();
            let direct = match (&*storage, layout.contiguous_offsets()) {
                (candle_core::Storage::Cpu(cpu), Some((a, b)))
                    if cfg!(target_endian = "little") =>
                {
                    cpu.as_slice::<f32>()?.get(a..b)
                }
                _ => None,
            };
            match direct {
                Some(v) => out.extend_from_slice(bytemuck::cast_slice(v)),
                None => {
                    drop(storage);
                    for v in g.flatten_all()?.to_vec1::<f32>()? {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        Ok(out)
    }

    /// The inverse of [`Grads::encode`], building tensors on `device`.
    ///
    /// # Errors
    /// Truncated or malformed bytes ([`Error::InvalidSetting`]); candle errors.
    pub(crate) fn decode(bytes: &[u8], device: &candle_core::Device) -> Result<Self> {
        let bad = || Error::InvalidSetting {
            setting: "data-parallel gradient message".into(),
            value: format!("{} bytes", bytes.len()),
            rule: "must be what Grads::encode wrote (same relume version on every rank)".into(),
        };
        let mut pos = 0usize;
        let mut take = |n: usize| -> Result<&[u8]> {
            let end = pos
                .checked_add(n)
                .filter(|e| *e <= bytes.len())
                .ok_or_else(bad)?;
            let s = &bytes[pos..end];
            pos = end;
            Ok(s)
        };
        let u64_at = |b: &[u8]| -> u64 {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        };
        let n = u64_at(take(8)?) as usize;
        let mut grads = BTreeMap::new();
        for _ in 0..n {
            let len = u64_at(take(8)?) as usize;
            let name = String::from_utf8(take(len)?.to_vec()).map_err(|_| bad())?;
            let rank = u64_at(take(8)?) as usize;
            let mut dims = Vec::with_capacity(rank);
            for _ in 0..rank {
                dims.push(u64_at(take(8)?) as usize);
            }
            let count: usize = dims.iter().product();
            let raw = take(count.checked_mul(4).ok_or_else(bad)?)?;
            let mut v: Vec<f32> = Vec::with_capacity(count);
            if cfg!(target_endian = "little") {
                // One copy of the bytes, which are already the in-memory f32s.
                // SAFETY: `raw` holds exactly `count · 4` bytes and the capacity
                // `count` f32s, which do not overlap; every bit pattern is an f32,
                // so all `count` values are initialised by the copy.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        raw.as_ptr(),
                        v.as_mut_ptr().cast::<u8>(),
                        raw.len(),
                    );
                    v.set_len(count);
                }
            } else {
                v.extend(
                    raw.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
            grads.insert(name, Tensor::from_vec(v, dims, device)?);
        }
        Ok(Grads { grads })
    }

    /// Takes the gradient of every trainable parameter in `params` out of `store`.
    /// Parameters without a gradient (unused in the forward pass) and frozen ones
    /// ([`ParamStore::freeze`]) are skipped.
    pub fn from_backward(store: &GradStore, params: &ParamStore) -> Self {
        let mut grads = BTreeMap::new();
        for (name, var) in params.trainable_vars() {
            if let Some(g) = store.get(var.as_tensor()) {
                grads.insert(name, g.clone());
            }
        }
        Grads { grads }
    }

    /// Adds `other` into `self`, by name (gradient accumulation).
    ///
    /// # Errors
    /// candle errors (shape mismatch).
    pub fn accumulate(&mut self, other: Grads) -> Result<()> {
        for (name, g) in other.grads {
            match self.grads.get_mut(&name) {
                Some(acc) => *acc = (&*acc + &g)?,
                None => {
                    self.grads.insert(name, g);
                }
            }
        }
        Ok(())
    }

    /// The gradient of `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.grads.get(name)
    }

    /// Replaces the gradient of `name`.
    pub fn insert(&mut self, name: impl Into<String>, grad: Tensor) {
        self.grads.insert(name.into(), grad);
    }

    /// `(name, grad)` in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.grads.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Mutable access in name order (for clipping).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Tensor)> {
        self.grads.iter_mut().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of gradients.
    pub fn len(&self) -> usize {
        self.grads.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// Multiplies every gradient by `factor` (e.g. 1/accumulate_grad_batches).
    ///
    /// # Errors
    /// candle errors.
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        for g in self.grads.values_mut() {
            *g = g.affine(factor, 0.0)?;
        }
        Ok(())
    }
}

/// A group of parameters sharing hyper-parameters.
#[derive(Clone, Debug)]
pub struct ParamGroup {
    /// `(name, variable)` in name order.
    pub params: Vec<(String, Var)>,
    /// Learning rate.
    pub lr: f64,
    /// Weight decay (L2 for SGD/Adam, decoupled for AdamW).
    pub weight_decay: f64,
}

/// The interface every optimizer implements. `Stateful` exports moments and step
/// counters keyed by parameter name.
pub trait Optimizer: Stateful<Error = Error> + Send {
    /// Kind name, e.g. `"AdamW"`; saved with the state and checked on restore.
    fn kind(&self) -> &'static str;

    /// Applies one update using `grads`. A parameter without a gradient is skipped,
    /// as in PyTorch (its step counter does not advance).
    ///
    /// # Errors
    /// candle errors.
    fn step(&mut self, grads: &Grads) -> Result<()>;

    /// Number of parameter groups.
    fn num_groups(&self) -> usize;

    /// Current learning rate of `group`.
    fn lr(&self, group: usize) -> f64;

    /// Sets the learning rate of `group` (used by schedulers).
    ///
    /// # Errors
    /// [`Error::InvalidHyperParameter`] for a NaN, infinite or negative rate, or an
    /// out-of-range group.
    fn set_lr(&mut self, group: usize, lr: f64) -> Result<()>;

    /// All learning rates, one per group.
    fn lrs(&self) -> Vec<f64> {
        (0..self.num_groups()).map(|g| self.lr(g)).collect()
    }

    /// `(name, variable)` of every parameter, in group then name order.
    fn params(&self) -> Vec<(String, Var)>;

    /// Clears all state (moments, buffers, step counters).
    fn reset_state(&mut self);

    /// The hyper-parameters that change results (kind, betas, eps, momentum, initial
    /// lrs, weight decay...), stored in the checkpoint config and diffed on resume.
    fn config(&self) -> serde_json::Value;
}

/// Checks that a learning rate is finite and non-negative.
///
/// # Errors
/// [`Error::InvalidHyperParameter`] naming `component`.
pub fn check_lr(component: &str, lr: f64) -> Result<()> {
    if lr.is_finite() && lr >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidHyperParameter {
            component: component.to_string(),
            what: "lr".into(),
            value: lr,
            rule: ">= 0".into(),
        })
    }
}
