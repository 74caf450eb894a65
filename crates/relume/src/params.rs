//! Named trainable parameters with stable, sorted names.
//!
//! candle's `VarMap` iterates in `HashMap` order; relume's [`ParamStore`] keeps its
//! variables in a `BTreeMap`, so every iteration (optimizer state, checkpoints,
//! fingerprints, gradient clipping) is in name order in every process.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Shape, Tensor, Var};
use relume_ckpt::{BufferPool, RestoreReport, Snapshot, StateDict, Stateful};

use crate::convert::{ckpt_dtype, data_to_tensor, describe, tensor_to_data, tensor_to_data_pooled};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// How a parameter is initialised. Every variant draws from relume's [`Rng`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// A constant.
    Constant(f32),
    /// Uniform in `[lo, hi)`.
    Uniform {
        /// Lower bound.
        lo: f32,
        /// Upper bound.
        hi: f32,
    },
    /// Normal with mean and standard deviation.
    Normal {
        /// Mean.
        mean: f32,
        /// Standard deviation.
        std: f32,
    },
    /// Kaiming (He) uniform with leaky-relu slope `a`: bound = gain·sqrt(3/fan_in),
    /// gain = sqrt(2/(1+a²)). PyTorch's `nn.Linear` weight uses `a = sqrt(5)`.
    KaimingUniform {
        /// Negative slope of the leaky relu that follows.
        a: f32,
    },
    /// Kaiming (He) normal for relu: std = sqrt(2/fan_in).
    KaimingNormal,
    /// Xavier (Glorot) uniform: bound = sqrt(6/(fan_in+fan_out)).
    XavierUniform,
    /// Xavier (Glorot) normal: std = sqrt(2/(fan_in+fan_out)).
    XavierNormal,
}

/// `(fan_in, fan_out)` of a weight shaped `[out, in, k...]`, as PyTorch computes it.
pub fn fans(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [n] => (*n, *n),
        [out, inp, rest @ ..] => {
            let rf: usize = rest.iter().product();
            (inp * rf, out * rf)
        }
    }
}

impl Init {
    /// Draws a f32 tensor of `shape` on `device`.
    ///
    /// # Errors
    /// candle errors.
    pub fn sample(&self, shape: &Shape, rng: &mut Rng, device: &Device) -> Result<Tensor> {
        let (fan_in, fan_out) = fans(shape.dims());
        let n = shape.elem_count();
        let v: Vec<f32> = match *self {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Constant(c) => vec![c; n],
            Init::Uniform { lo, hi } => rng.uniform_vec(n, lo, hi),
            Init::Normal { mean, std } => rng.normal_vec(n, mean, std),
            Init::KaimingUniform { a } => {
                let gain = (2.0 / (1.0 + a * a)).sqrt();
                let bound = gain * (3.0 / fan_in.max(1) as f32).sqrt();
                rng.uniform_vec(n, -bound, bound)
            }
            Init::KaimingNormal => rng.normal_vec(n, 0.0, (2.0 / fan_in.max(1) as f32).sqrt()),
            Init::XavierUniform => {
                let bound = (6.0 / (fan_in + fan_out).max(1) as f32).sqrt();
                rng.uniform_vec(n, -bound, bound)
            }
            Init::XavierNormal => {
                rng.normal_vec(n, 0.0, (2.0 / (fan_in + fan_out).max(1) as f32).sqrt())
            }
        };
        Ok(Tensor::from_vec(v, shape.clone(), device)?)
    }
}

/// Trainable variables keyed by dotted name (`encoder.layer1.weight`).
///
/// Cloning shares the same variables (like candle's `VarMap`).
///
/// # Example
/// ```
/// use relume::params::{Init, ParamStore};
/// use relume::rng::Rng;
/// let store = ParamStore::new(candle_core::Device::Cpu);
/// let mut rng = Rng::new(0, "init");
/// store.get_or_init("b.bias", 4, Init::Zeros, &mut rng).unwrap();
/// store.get_or_init("a.weight", (4, 2), Init::XavierUniform, &mut rng).unwrap();
/// assert_eq!(store.names(), vec!["a.weight", "b.bias"]);
/// ```
#[derive(Clone, Debug)]
pub struct ParamStore {
    vars: Arc<Mutex<BTreeMap<String, Var>>>,
    frozen: Arc<Mutex<BTreeSet<String>>>,
    device: Device,
}

/// True when the freeze rule `rule` covers the parameter `name`: the name itself,
/// or every parameter under it (`backbone` covers `backbone.l1.weight`).
pub(crate) fn rule_covers(rule: &str, name: &str) -> bool {
    let rule = rule.strip_suffix('.').unwrap_or(rule);
    name == rule
        || (name.len() > rule.len()
            && name.starts_with(rule)
            && name[rule.len()..].starts_with('.'))
}

impl ParamStore {
    /// An empty store whose parameters live on `device`.
    pub fn new(device: Device) -> Self {
        ParamStore {
            vars: Arc::new(Mutex::new(BTreeMap::new())),
            frozen: Arc::new(Mutex::new(BTreeSet::new())),
            device,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Var>> {
        // A poisoned lock only means another thread panicked mid-insert; the map
        // itself is always consistent, so keep going.
        self.vars.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_frozen(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.frozen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Freezes the parameter `rule` and every parameter under it (`"backbone"`
    /// freezes `backbone.l1.weight`, `backbone.l2.bias`, ...), like Lightning's
    /// `freeze()` on a sub-module.
    ///
    /// A frozen parameter gets no gradient and no optimizer state
    /// (`AdamW::from_store` and the other `from_store` constructors skip it, and
    /// [`crate::trainer::Trainer::fit`] refuses an optimizer that holds one). It is
    /// still saved in every checkpoint and fingerprinted, and the run's frozen set
    /// is part of the checkpoint's `config` block, so a resume with another frozen
    /// set is refused ([`Error::ConfigChanged`]).
    ///
    /// Freeze before the model is built through [`ParamStore::var_builder`] and
    /// the layers hold detached tensors, so backward skips the frozen part
    /// altogether; freezing later still keeps the parameters unchanged (their
    /// gradients are dropped), at the cost of computing them.
    ///
    /// A rule that covers no parameter when training starts is an error
    /// ([`Error::FreezeMatchesNothing`]), so a typo never trains what was meant to
    /// stay fixed.
    pub fn freeze(&self, rule: impl Into<String>) {
        self.lock_frozen().insert(rule.into());
    }

    /// Removes a freeze rule given to [`ParamStore::freeze`]; true when it was there.
    pub fn unfreeze(&self, rule: &str) -> bool {
        self.lock_frozen().remove(rule)
    }

    /// The freeze rules, sorted.
    pub fn freeze_rules(&self) -> Vec<String> {
        self.lock_frozen().iter().cloned().collect()
    }

    /// True when `name` is covered by a freeze rule.
    pub fn is_frozen(&self, name: &str) -> bool {
        self.lock_frozen().iter().any(|r| rule_covers(r, name))
    }

    /// The names of the frozen parameters, in name order.
    pub fn frozen_names(&self) -> Vec<String> {
        let rules = self.freeze_rules();
        self.lock()
            .keys()
            .filter(|n| rules.iter().any(|r| rule_covers(r, n)))
            .cloned()
            .collect()
    }

    /// The trainable (not frozen) `(name, variable)` pairs, in name order: what
    /// the `from_store` optimizer constructors train.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let rules = self.freeze_rules();
        self.named_vars()
            .into_iter()
            .filter(|(n, _)| !rules.iter().any(|r| rule_covers(r, n)))
            .collect()
    }

    /// Errors with [`Error::FreezeMatchesNothing`] for a freeze rule that covers no
    /// parameter.
    ///
    /// # Errors
    /// As above.
    pub fn check_freeze_rules(&self) -> Result<()> {
        let names = self.names();
        for rule in self.freeze_rules() {
            if !names.iter().any(|n| rule_covers(&rule, n)) {
                return Err(Error::FreezeMatchesNothing {
                    rule,
                    near: names
                        .iter()
                        .filter_map(|n| n.split('.').next())
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .map(str::to_string)
                        .collect(),
                });
            }
        }
        Ok(())
    }

    /// Returns the parameter `name` of `shape` and `dtype`, creating it on first
    /// use with `init` drawn from a generator of its own, derived from `(seed,
    /// name)`: its values do not depend on which parameters were created before it.
    /// A frozen parameter is returned detached (no gradient flows to it).
    ///
    /// # Errors
    /// [`Error::ParamConflict`] when `name` exists with another shape or dtype;
    /// candle errors.
    pub fn get_or_init_named(
        &self,
        name: &str,
        shape: &Shape,
        init: Init,
        dtype: DType,
        seed: u64,
    ) -> Result<Tensor> {
        let mut vars = self.lock();
        let var = match vars.get(name) {
            Some(v) => {
                if v.shape() != shape || v.dtype() != dtype {
                    return Err(Error::ParamConflict {
                        name: name.to_string(),
                        existing: format!("{:?}{:?}", v.dtype(), v.dims()),
                        requested: format!("{dtype:?}{:?}", shape.dims()),
                    });
                }
                v.clone()
            }
            None => {
                let mut rng = Rng::new(seed, &format!("init/{name}"));
                let t = init
                    .sample(shape, &mut rng, &self.device)?
                    .to_dtype(dtype)?;
                let var = Var::from_tensor(&t)?;
                vars.insert(name.to_string(), var.clone());
                var
            }
        };
        drop(vars);
        Ok(if self.is_frozen(name) {
            var.as_tensor().detach()
        } else {
            var.as_tensor().clone()
        })
    }

    /// The device parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Returns the parameter `name`, creating it with `init` on first use.
    ///
    /// # Errors
    /// [`Error::StateMismatch`] when `name` exists with another shape; candle errors.
    pub fn get_or_init(
        &self,
        name: &str,
        shape: impl Into<Shape>,
        init: Init,
        rng: &mut Rng,
    ) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let mut vars = self.lock();
        if let Some(v) = vars.get(name) {
            if v.shape() != &shape {
                return Err(Error::StateMismatch {
                    component: "params".into(),
                    problems: vec![format!(
                        "{name}: exists with shape {:?}, requested {:?}",
                        v.dims(),
                        shape.dims()
                    )],
                });
            }
            return Ok(v.as_tensor().clone());
        }
        let t = init.sample(&shape, rng, &self.device)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(out)
    }

    /// The variable `name`.
    pub fn get(&self, name: &str) -> Option<Var> {
        self.lock().get(name).cloned()
    }

    /// All `(name, variable)` pairs in name order.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The variables whose names start with `prefix`, in name order.
    pub fn named_vars_with_prefix(&self, prefix: &str) -> Vec<(String, Var)> {
        self.lock()
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// All names in order.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Number of parameters (tensors).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when the store is empty.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Total number of scalar elements.
    pub fn num_elements(&self) -> usize {
        self.lock().values().map(|v| v.elem_count()).sum()
    }
}

impl Stateful for ParamStore {
    type Error = Error;

    /// One tensor leaf per parameter, keyed by its name.
    fn state_dict(&self) -> Result<StateDict> {
        let mut sd = StateDict::new();
        for (name, var) in self.named_vars() {
            sd.insert_tensor(name.clone(), tensor_to_data(var.as_tensor(), &name)?);
        }
        Ok(sd)
    }

    /// The parameters copied into `pool`'s recycled buffers (tensors only, so the
    /// snapshot is ready at once).
    fn snapshot(&self, pool: &BufferPool) -> Result<Snapshot<Error>> {
        let mut sd = StateDict::new();
        for (name, var) in self.named_vars() {
            let data = tensor_to_data_pooled(var.as_tensor(), &name, pool)?;
            sd.insert_tensor(name, data);
        }
        Ok(Snapshot::ready(sd))
    }

    /// Copies every saved parameter whose dtype and shape match into the live
    /// variable; reports the rest. Nothing is applied unless all keys match, so a
    /// failed strict restore never leaves a half-loaded model.
    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let vars = self.named_vars();
        let mut report = RestoreReport::new();
        report.diff_keys(vars.iter().map(|(n, _)| n.as_str()), state);
        let mut apply = Vec::new();
        for (name, var) in &vars {
            let Some(saved) = state.get(name) else {
                continue;
            };
            let relume_ckpt::Leaf::Tensor(saved) = saved else {
                report.mismatched(name.clone(), "tensor", "json");
                continue;
            };
            let live_dtype = ckpt_dtype(var.dtype());
            if live_dtype != Some(saved.dtype()) || var.dims() != saved.shape() {
                report.mismatched(
                    name.clone(),
                    match live_dtype {
                        Some(d) => describe(d, var.dims()),
                        None => format!("{:?}{:?}", var.dtype(), var.dims()),
                    },
                    describe(saved.dtype(), saved.shape()),
                );
                continue;
            }
            apply.push((name.clone(), var.clone(), saved));
        }
        if report.is_clean() {
            for (name, var, saved) in apply {
                var.set(&data_to_tensor(saved, &self.device, &name)?)?;
                report.restored(name);
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_init_is_identical_and_restores() {
        let make = || {
            let s = ParamStore::new(Device::Cpu);
            let mut rng = Rng::new(11, "init");
            s.get_or_init(
                "l1.weight",
                (8, 4),
                Init::KaimingUniform { a: 5f32.sqrt() },
                &mut rng,
            )
            .unwrap();
            s.get_or_init("l1.bias", 8, Init::Uniform { lo: -0.5, hi: 0.5 }, &mut rng)
                .unwrap();
            s
        };
        let a = make();
        let b = make();
        assert_eq!(a.state_dict().unwrap(), b.state_dict().unwrap());
        let mut c = ParamStore::new(Device::Cpu);
        let mut rng = Rng::new(99, "init");
        c.get_or_init("l1.weight", (8, 4), Init::Zeros, &mut rng)
            .unwrap();
        c.get_or_init("l1.bias", 8, Init::Zeros, &mut rng).unwrap();
        assert!(c
            .load_state_dict(&a.state_dict().unwrap())
            .unwrap()
            .is_clean());
        assert_eq!(a.state_dict().unwrap(), c.state_dict().unwrap());
    }

    #[test]
    fn shape_mismatch_is_named_and_nothing_applied() {
        let a = ParamStore::new(Device::Cpu);
        let mut rng = Rng::new(1, "init");
        a.get_or_init("w", (2, 3), Init::Ones, &mut rng).unwrap();
        a.get_or_init("v", 2, Init::Ones, &mut rng).unwrap();
        let mut b = ParamStore::new(Device::Cpu);
        b.get_or_init("w", (3, 3), Init::Zeros, &mut rng).unwrap();
        b.get_or_init("v", 2, Init::Zeros, &mut rng).unwrap();
        let r = b.load_state_dict(&a.state_dict().unwrap()).unwrap();
        assert_eq!(r.mismatched[0].key, "w");
        assert_eq!(r.mismatched[0].expected, "F32[3, 3]");
        assert!(r.restored.is_empty());
        let v = b.get("v").unwrap().as_tensor().to_vec1::<f32>().unwrap();
        assert_eq!(v, vec![0.0, 0.0]);
    }

    #[test]
    fn fans_match_torch() {
        assert_eq!(fans(&[256, 64]), (64, 256));
        assert_eq!(fans(&[8, 3, 3, 3]), (27, 72));
    }
}
