//! Stochastic gradient descent with momentum, dampening, Nesterov and L2 weight
//! decay, following PyTorch's single-tensor CPU implementation in f32:
//!
//! ```text
//! g = grad (+ weight_decay · p)
//! b = g                                   (first step)
//! b = b · momentum + (1 − dampening) · g   (later steps)
//! g = g + momentum · b  (Nesterov)  or  g = b
//! p = p + (−lr) · g
//! ```
//!
//! On CPU with contiguous f32 parameters each parameter is updated in one pass
//! (a candle in-place custom op); elsewhere the same maths runs as tensor ops.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};
use relume_ckpt::{BufferPool, RestoreReport, Snapshot, StateDict, Stateful};
use serde::{Deserialize, Serialize};

use super::state::{
    check_group, check_groups, check_range, flush_subnormal, fusable, fused_update, load_state,
    save_state, single_group, snapshot_state, store_params, Buf, ParamState,
};
use super::{check_lr, Grads, Optimizer, ParamGroup};
use crate::error::{Error, Result};
use crate::params::ParamStore;

const MOMENTUM_BUFFER: &str = "momentum_buffer";

/// Hyper-parameters of [`Sgd`]. Defaults are PyTorch's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SgdConfig {
    /// Learning rate used by the convenience constructors. Default `1e-3`.
    pub lr: f64,
    /// Momentum factor. Default `0` (no momentum buffer).
    pub momentum: f64,
    /// Dampening of the momentum. Default `0`.
    pub dampening: f64,
    /// L2 weight decay used by the convenience constructors. Default `0`.
    pub weight_decay: f64,
    /// Nesterov momentum (needs momentum > 0 and dampening 0). Default `false`.
    pub nesterov: bool,
    /// Maximise instead of minimising. Default `false`.
    pub maximize: bool,
    /// Use the fused single-pass CPU kernel when possible. Default `true`.
    #[serde(skip, default = "yes")]
    pub fused: bool,
}

fn yes() -> bool {
    true
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            maximize: false,
            fused: true,
        }
    }
}

impl SgdConfig {
    /// Sets the learning rate (default `1e-3`).
    pub fn with_lr(mut self, lr: f64) -> Self {
        self.lr = lr;
        self
    }

    /// Sets the momentum (default `0`).
    pub fn with_momentum(mut self, momentum: f64) -> Self {
        self.momentum = momentum;
        self
    }

    /// Sets the dampening (default `0`).
    pub fn with_dampening(mut self, dampening: f64) -> Self {
        self.dampening = dampening;
        self
    }

    /// Sets the weight decay (default `0`).
    pub fn with_weight_decay(mut self, weight_decay: f64) -> Self {
        self.weight_decay = weight_decay;
        self
    }

    /// Enables Nesterov momentum (default `false`).
    pub fn with_nesterov(mut self, nesterov: bool) -> Self {
        self.nesterov = nesterov;
        self
    }

    /// Maximises the objective (default `false`).
    pub fn with_maximize(mut self, maximize: bool) -> Self {
        self.maximize = maximize;
        self
    }

    /// Enables the fused CPU kernel (default `true`).
    pub fn with_fused(mut self, fused: bool) -> Self {
        self.fused = fused;
        self
    }

    fn check(&self) -> Result<()> {
        check_lr("SGD", self.lr)?;
        check_range(
            "SGD",
            "momentum",
            self.momentum,
            self.momentum >= 0.0,
            ">= 0",
        )?;
        check_range("SGD", "dampening", self.dampening, true, "finite")?;
        check_range(
            "SGD",
            "weight_decay",
            self.weight_decay,
            self.weight_decay >= 0.0,
            ">= 0",
        )?;
        if self.nesterov {
            let ok = self.momentum > 0.0 && self.dampening == 0.0;
            check_range(
                "SGD",
                "momentum (nesterov)",
                self.momentum,
                ok,
                "> 0 with dampening 0",
            )?;
        }
        Ok(())
    }

    fn hyper(&self) -> serde_json::Value {
        serde_json::json!({
            "momentum": self.momentum,
            "dampening": self.dampening,
            "nesterov": self.nesterov,
            "maximize": self.maximize,
        })
    }
}

/// SGD (PyTorch's `torch.optim.SGD`).
#[derive(Debug)]
pub struct Sgd {
    cfg: SgdConfig,
    groups: Vec<ParamGroup>,
    state: BTreeMap<String, ParamState>,
}

#[derive(Clone, Copy)]
struct Coeffs {
    wd: f32,
    momentum: f32,
    one_minus_dampening: f32,
    neg_lr: f32,
    use_wd: bool,
    use_momentum: bool,
    nesterov: bool,
    maximize: bool,
}

impl Sgd {
    /// SGD over explicit groups, each with its own lr and weight decay.
    ///
    /// # Errors
    /// [`Error::InvalidHyperParameter`] for a NaN, infinite or negative lr, momentum
    /// or weight decay, or Nesterov without momentum; [`Error::StateMismatch`] for a
    /// parameter in two groups.
    pub fn new(groups: Vec<ParamGroup>, cfg: SgdConfig) -> Result<Self> {
        cfg.check()?;
        check_groups("SGD", &groups)?;
        Ok(Sgd {
            cfg,
            groups,
            state: BTreeMap::new(),
        })
    }

    /// One group with `cfg.lr` and `cfg.weight_decay` over `params`.
    ///
    /// # Errors
    /// As [`Sgd::new`].
    pub fn from_params(params: Vec<(String, Var)>, cfg: SgdConfig) -> Result<Self> {
        let groups = single_group(params, cfg.lr, cfg.weight_decay);
        Sgd::new(groups, cfg)
    }

    /// One group over every trainable (not frozen) parameter of `store`, in name order.
    ///
    /// # Errors
    /// As [`Sgd::new`].
    pub fn from_store(store: &ParamStore, cfg: SgdConfig) -> Result<Self> {
        Sgd::from_params(store_params(store), cfg)
    }

    /// The configuration in use.
    pub fn sgd_config(&self) -> &SgdConfig {
        &self.cfg
    }

    /// The step counter of parameter `name` (0 before its first update).
    pub fn param_step(&self, name: &str) -> u64 {
        self.state.get(name).map_or(0, |s| s.step)
    }

    fn buffer_names(&self) -> Vec<&'static str> {
        if self.cfg.momentum != 0.0 {
            vec![MOMENTUM_BUFFER]
        } else {
            Vec::new()
        }
    }
}

/// One pass: weight decay, momentum buffer and the update. Multiply-adds are
/// fused where PyTorch's `add(alpha)` kernel fuses them. A subnormal momentum
/// value is stored as zero (see the `adam` module docs).
fn sgd_kernel(p: &mut [f32], g: &[f32], buf: &mut [f32], first: bool, c: Coeffs) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { sgd_kernel_avx2(p, g, buf, first, c) };
        return;
    }
    sgd_kernel_body(p, g, buf, first, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sgd_kernel_avx2(p: &mut [f32], g: &[f32], buf: &mut [f32], first: bool, c: Coeffs) {
    sgd_kernel_body(p, g, buf, first, c)
}

/// One element: `buf` is the momentum buffer entry when momentum is on.
#[inline(always)]
fn sgd_element(p: &mut f32, g: f32, buf: Option<&mut f32>, first: bool, c: &Coeffs) {
    let mut gi = if c.maximize { -g } else { g };
    if c.use_wd {
        gi = c.wd.mul_add(*p, gi);
    }
    if let Some(buf) = buf {
        let b = if first {
            gi
        } else {
            c.one_minus_dampening.mul_add(gi, *buf * c.momentum)
        };
        *buf = flush_subnormal(b);
        gi = if c.nesterov {
            c.momentum.mul_add(b, gi)
        } else {
            b
        };
    }
    *p = c.neg_lr.mul_add(gi, *p);
}

/// The loop, over zipped slices so that no index is bounds-checked.
#[inline(always)]
fn sgd_kernel_body(p: &mut [f32], g: &[f32], buf: &mut [f32], first: bool, c: Coeffs) {
    debug_assert!(g.len() == p.len() && (!c.use_momentum || buf.len() == p.len()));
    if c.use_momentum {
        for ((p, &g), b) in p.iter_mut().zip(g).zip(buf.iter_mut()) {
            sgd_element(p, g, Some(b), first, &c);
        }
    } else {
        for (p, &g) in p.iter_mut().zip(g) {
            sgd_element(p, g, None, first, &c);
        }
    }
}

fn scalar_like(x: f32, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::new(x, like.device())?.to_dtype(like.dtype())?)
}

fn tensor_step(var: &Var, grad: &Tensor, st: &mut ParamState, c: Coeffs) -> Result<()> {
    let p = var.as_tensor().detach();
    let mut g = grad.to_dtype(p.dtype())?;
    if c.maximize {
        g = g.neg()?;
    }
    if c.use_wd {
        g = (&g + p.broadcast_mul(&scalar_like(c.wd, &p)?)?)?;
    }
    if c.use_momentum {
        let b = match st.bufs.get_mut(MOMENTUM_BUFFER) {
            None => g.copy()?,
            Some(b) => {
                (b.tensor(&p)?.broadcast_mul(&scalar_like(c.momentum, &p)?)?
                    + g.broadcast_mul(&scalar_like(c.one_minus_dampening, &p)?)?)?
            }
        };
        st.bufs.insert(MOMENTUM_BUFFER, Buf::Dev(b.clone()));
        g = if c.nesterov {
            (&g + b.broadcast_mul(&scalar_like(c.momentum, &p)?)?)?
        } else {
            b
        };
    }
    var.set(&(&p + g.broadcast_mul(&scalar_like(c.neg_lr, &p)?)?)?)?;
    Ok(())
}

impl Stateful for Sgd {
    type Error = Error;

    fn state_dict(&self) -> Result<StateDict> {
        save_state("SGD", &self.groups, &self.cfg.hyper(), &self.state)
    }

    /// Momentum buffers copied into `pool`; JSON leaves built when it resolves.
    fn snapshot(&self, pool: &BufferPool) -> Result<Snapshot<Error>> {
        snapshot_state("SGD", &self.groups, &self.cfg.hyper(), &self.state, pool)
    }

    /// Restores momentum buffers, step counters and lrs; checks everything first.
    ///
    /// # Errors
    /// [`Error::StateKind`], [`Error::StateMismatch`] listing every offending
    /// parameter, [`Error::InvalidHyperParameter`].
    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let loaded = load_state("SGD", &self.groups, &self.buffer_names(), state)?;
        for (g, (lr, wd)) in self.groups.iter_mut().zip(loaded.group_hparams) {
            g.lr = lr;
            g.weight_decay = wd;
        }
        self.state = loaded.state;
        Ok(loaded.report)
    }
}

impl Optimizer for Sgd {
    fn kind(&self) -> &'static str {
        "SGD"
    }

    fn step(&mut self, grads: &Grads) -> Result<()> {
        for group in &self.groups {
            let c0 = Coeffs {
                wd: group.weight_decay as f32,
                momentum: self.cfg.momentum as f32,
                one_minus_dampening: (1.0 - self.cfg.dampening) as f32,
                neg_lr: (-group.lr) as f32,
                use_wd: group.weight_decay != 0.0,
                use_momentum: self.cfg.momentum != 0.0,
                nesterov: self.cfg.nesterov,
                maximize: self.cfg.maximize,
            };
            for (name, var) in &group.params {
                let Some(grad) = grads.get(name) else {
                    continue;
                };
                if grad.dims() != var.dims() {
                    return Err(Error::StateMismatch {
                        component: "SGD".into(),
                        problems: vec![format!(
                            "gradient of {name:?} has shape {:?} but the parameter has {:?}",
                            grad.dims(),
                            var.dims()
                        )],
                    });
                }
                let st = self.state.entry(name.clone()).or_default();
                st.step += 1;
                if self.cfg.fused && fusable(var, grad) {
                    let n = var.elem_count();
                    let first = !st.bufs.contains_key(MOMENTUM_BUFFER);
                    let mut buf = if c0.use_momentum {
                        match st.bufs.remove(MOMENTUM_BUFFER) {
                            Some(mut b) => std::mem::take(b.host()?),
                            None => vec![0.0; n],
                        }
                    } else {
                        Vec::new()
                    };
                    if c0.use_momentum && buf.len() != n {
                        return Err(Error::StateMismatch {
                            component: "SGD".into(),
                            problems: vec![format!(
                                "{name}/momentum_buffer has {} values, parameter has {n}",
                                buf.len()
                            )],
                        });
                    }
                    let res = fused_update(var.as_tensor(), grad, |p, g| {
                        sgd_kernel(p, g, &mut buf, first, c0)
                    });
                    if c0.use_momentum {
                        st.bufs.insert(MOMENTUM_BUFFER, Buf::Host(buf));
                    }
                    res?;
                } else {
                    tensor_step(var, grad, st, c0)?;
                }
            }
        }
        Ok(())
    }

    fn num_groups(&self) -> usize {
        self.groups.len()
    }

    fn lr(&self, group: usize) -> f64 {
        self.groups.get(group).map_or(f64::NAN, |g| g.lr)
    }

    fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        check_group("SGD", group, self.groups.len())?;
        check_lr(&format!("SGD param group {group}"), lr)?;
        self.groups[group].lr = lr;
        Ok(())
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.groups
            .iter()
            .flat_map(|g| g.params.iter().cloned())
            .collect()
    }

    fn reset_state(&mut self) {
        self.state.clear();
    }

    fn config(&self) -> serde_json::Value {
        let mut v = self.cfg.hyper();
        if let serde_json::Value::Object(o) = &mut v {
            o.insert("kind".into(), "SGD".into());
            o.insert(
                "lrs".into(),
                self.groups.iter().map(|g| g.lr).collect::<Vec<_>>().into(),
            );
            o.insert(
                "weight_decays".into(),
                self.groups
                    .iter()
                    .map(|g| g.weight_decay)
                    .collect::<Vec<_>>()
                    .into(),
            );
        }
        v
    }
}
