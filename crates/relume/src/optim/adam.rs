//! Adam (L2 weight decay) and AdamW (decoupled weight decay), with AMSGrad.
//!
//! Both follow PyTorch's single-tensor CPU implementation operation by operation, in
//! f32, with the bias corrections computed in f64 as Python floats are:
//!
//! ```text
//! g      = grad (+ weight_decay · p            for Adam)
//! p      = p · (1 − lr · weight_decay)         (AdamW only, before the moments)
//! m      = lerp(m, g, 1 − β1)
//! v      = v · β2 + (1 − β2) · g · g
//! v̂      = max(v̂, v)                           (AMSGrad; v̂ is used instead of v)
//! denom  = sqrt(v) / sqrt(1 − β2^t) + eps
//! p      = p + (−lr / (1 − β1^t)) · m / denom
//! ```
//!
//! On CPU with contiguous f32 parameters each parameter is updated in **one pass**
//! over its data (a candle in-place custom op), with moments kept as plain
//! `Vec<f32>`; elsewhere the same maths runs as candle tensor ops.
//!
//! **Subnormal moments.** The fused kernel stores a moment whose magnitude falls
//! below `f32::MIN_POSITIVE` (1.18e-38) as zero, as `torch.set_flush_denormal(True)`
//! would. Moments of parameters whose gradient has stopped (dead units, always-zero
//! inputs) decay geometrically into that range, where every CPU operation on them
//! takes a slow microcode path: on the digits MLP the update ran 4× slower from
//! epoch ~18 on. The flush changes a parameter only when the parameter itself is
//! below about 1e-12, since the update it drops is under 1e-30 · lr. It is
//! deterministic, so resumed runs stay bit-identical.

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

/// Hyper-parameters of [`Adam`] and [`AdamW`]. Defaults are PyTorch's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    /// Learning rate used by the convenience constructors. Default `1e-3`.
    pub lr: f64,
    /// `(β1, β2)`, the moment decay rates. Default `(0.9, 0.999)`.
    pub betas: (f64, f64),
    /// Added to the denominator. Default `1e-8`.
    pub eps: f64,
    /// Weight decay used by the convenience constructors. Default `0` for Adam
    /// ([`AdamConfig::adam`]) and `1e-2` for AdamW ([`AdamConfig::adamw`]).
    pub weight_decay: f64,
    /// Use AMSGrad (the running maximum of `v`). Default `false`.
    pub amsgrad: bool,
    /// Maximise instead of minimising. Default `false`.
    pub maximize: bool,
    /// Use the fused single-pass CPU kernel when possible. Default `true`; the
    /// tensor-op path gives bit-identical results and exists for other devices.
    #[serde(skip, default = "yes")]
    pub fused: bool,
}

fn yes() -> bool {
    true
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig::adam()
    }
}

impl AdamConfig {
    /// PyTorch's `Adam` defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, no decay.
    pub fn adam() -> Self {
        AdamConfig {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            maximize: false,
            fused: true,
        }
    }

    /// PyTorch's `AdamW` defaults: as [`AdamConfig::adam`] with weight decay 1e-2.
    pub fn adamw() -> Self {
        AdamConfig {
            weight_decay: 1e-2,
            ..AdamConfig::adam()
        }
    }

    /// Sets the learning rate (default `1e-3`).
    pub fn with_lr(mut self, lr: f64) -> Self {
        self.lr = lr;
        self
    }

    /// Sets `(β1, β2)` (default `(0.9, 0.999)`).
    pub fn with_betas(mut self, beta1: f64, beta2: f64) -> Self {
        self.betas = (beta1, beta2);
        self
    }

    /// Sets eps (default `1e-8`).
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// Sets the weight decay (default `0` for Adam, `1e-2` for AdamW).
    pub fn with_weight_decay(mut self, weight_decay: f64) -> Self {
        self.weight_decay = weight_decay;
        self
    }

    /// Enables AMSGrad (default `false`).
    pub fn with_amsgrad(mut self, amsgrad: bool) -> Self {
        self.amsgrad = amsgrad;
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

    fn check(&self, kind: &str) -> Result<()> {
        check_lr(kind, self.lr)?;
        let (b1, b2) = self.betas;
        check_range(kind, "betas.0", b1, (0.0..1.0).contains(&b1), "in [0, 1)")?;
        check_range(kind, "betas.1", b2, (0.0..1.0).contains(&b2), "in [0, 1)")?;
        check_range(kind, "eps", self.eps, self.eps >= 0.0, ">= 0")?;
        check_range(
            kind,
            "weight_decay",
            self.weight_decay,
            self.weight_decay >= 0.0,
            ">= 0",
        )
    }

    fn hyper(&self) -> serde_json::Value {
        serde_json::json!({
            "betas": [self.betas.0, self.betas.1],
            "eps": self.eps,
            "amsgrad": self.amsgrad,
            "maximize": self.maximize,
        })
    }
}

/// The shared implementation; `decoupled` selects AdamW.
#[derive(Debug)]
struct AdamCore {
    kind: &'static str,
    decoupled: bool,
    cfg: AdamConfig,
    groups: Vec<ParamGroup>,
    state: BTreeMap<String, ParamState>,
}

/// Per-step scalar coefficients, rounded to f32 exactly where PyTorch rounds, and
/// the variant flags of the update.
#[derive(Clone, Copy)]
struct Coeffs {
    /// AMSGrad: the running maximum of `v` is used instead of `v`.
    ams: bool,
    /// Ascend instead of descend.
    maximize: bool,
    /// Adam's L2 weight decay folded into the gradient (`wd != 0`).
    l2: bool,
    /// AdamW's decoupled decay of the parameter (`wd != 0`).
    decoupled: bool,
    wd: f32,
    decay: f32,
    w1: f32,
    small: bool,
    one_minus_w1: f32,
    b2: f32,
    one_minus_b2: f32,
    bc2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
}

impl AdamCore {
    fn new(
        kind: &'static str,
        decoupled: bool,
        groups: Vec<ParamGroup>,
        cfg: AdamConfig,
    ) -> Result<Self> {
        cfg.check(kind)?;
        check_groups(kind, &groups)?;
        Ok(AdamCore {
            kind,
            decoupled,
            cfg,
            groups,
            state: BTreeMap::new(),
        })
    }

    fn buffer_names(&self) -> Vec<&'static str> {
        let mut b = vec!["exp_avg", "exp_avg_sq"];
        if self.cfg.amsgrad {
            b.push("max_exp_avg_sq");
        }
        b
    }

    fn coeffs(&self, lr: f64, wd: f64, step: u64) -> Coeffs {
        let (b1, b2) = self.cfg.betas;
        let t = step as f64;
        let bc1 = 1.0 - b1.powf(t);
        let bc2 = 1.0 - b2.powf(t);
        let w1 = (1.0 - b1) as f32;
        Coeffs {
            ams: self.cfg.amsgrad,
            maximize: self.cfg.maximize,
            l2: !self.decoupled && wd != 0.0,
            decoupled: self.decoupled && wd != 0.0,
            wd: if self.decoupled { 0.0 } else { wd as f32 },
            decay: if self.decoupled {
                (1.0 - lr * wd) as f32
            } else {
                1.0
            },
            w1,
            small: w1.abs() < 0.5,
            one_minus_w1: 1.0 - w1,
            b2: b2 as f32,
            one_minus_b2: (1.0 - b2) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: self.cfg.eps as f32,
            neg_step_size: (-(lr / bc1)) as f32,
        }
    }

    fn step(&mut self, grads: &Grads) -> Result<()> {
        let names = self.buffer_names();
        for gi in 0..self.groups.len() {
            let (lr, wd) = (self.groups[gi].lr, self.groups[gi].weight_decay);
            for pi in 0..self.groups[gi].params.len() {
                let (name, var) = &self.groups[gi].params[pi];
                let Some(grad) = grads.get(name) else {
                    continue;
                };
                if grad.dims() != var.dims() {
                    return Err(Error::StateMismatch {
                        component: self.kind.to_string(),
                        problems: vec![format!(
                            "gradient of {name:?} has shape {:?} but the parameter has {:?}",
                            grad.dims(),
                            var.dims()
                        )],
                    });
                }
                let step = self.state.get(name).map_or(0, |s| s.step) + 1;
                let c = self.coeffs(lr, wd, step);
                let st = self.state.entry(name.clone()).or_default();
                st.step = step;
                if self.cfg.fused && fusable(var, grad) {
                    fused_step(var, grad, st, &names, c)?;
                } else {
                    tensor_step(var, grad, st, c)?;
                }
            }
        }
        Ok(())
    }

    fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        check_group(self.kind, group, self.groups.len())?;
        check_lr(&format!("{} param group {group}", self.kind), lr)?;
        self.groups[group].lr = lr;
        Ok(())
    }

    fn config(&self) -> serde_json::Value {
        let mut v = self.cfg.hyper();
        if let serde_json::Value::Object(o) = &mut v {
            o.insert("kind".into(), self.kind.into());
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

    fn state_dict(&self) -> Result<StateDict> {
        save_state(self.kind, &self.groups, &self.cfg.hyper(), &self.state)
    }

    fn snapshot(&self, pool: &BufferPool) -> Result<Snapshot<Error>> {
        snapshot_state(
            self.kind,
            &self.groups,
            &self.cfg.hyper(),
            &self.state,
            pool,
        )
    }

    fn load_state_dict(&mut self, sd: &StateDict) -> Result<RestoreReport> {
        let loaded = load_state(self.kind, &self.groups, &self.buffer_names(), sd)?;
        let mut cfg = self.cfg.clone();
        if let Some(b) = loaded
            .hyper
            .get("betas")
            .and_then(|b| serde_json::from_value::<(f64, f64)>(b.clone()).ok())
        {
            cfg.betas = b;
        }
        if let Some(e) = loaded.hyper.get("eps").and_then(|v| v.as_f64()) {
            cfg.eps = e;
        }
        cfg.check(self.kind)?;
        self.cfg = cfg;
        for (g, (lr, wd)) in self.groups.iter_mut().zip(loaded.group_hparams) {
            g.lr = lr;
            g.weight_decay = wd;
        }
        self.state = loaded.state;
        Ok(loaded.report)
    }
}

fn take_host(st: &mut ParamState, name: &'static str, n: usize) -> Result<Vec<f32>> {
    match st.bufs.remove(name) {
        Some(mut b) => {
            let v = std::mem::take(b.host()?);
            if v.len() != n {
                return Err(Error::StateMismatch {
                    component: name.to_string(),
                    problems: vec![format!("buffer has {} values, parameter has {n}", v.len())],
                });
            }
            Ok(v)
        }
        None => Ok(vec![0.0; n]),
    }
}

fn fused_step(
    var: &Var,
    grad: &Tensor,
    st: &mut ParamState,
    names: &[&'static str],
    c: Coeffs,
) -> Result<()> {
    let n = var.elem_count();
    let mut m = take_host(st, "exp_avg", n)?;
    let mut v = take_host(st, "exp_avg_sq", n)?;
    let mut mx = if c.ams {
        take_host(st, "max_exp_avg_sq", n)?
    } else {
        Vec::new()
    };
    let res = fused_update(var.as_tensor(), grad, |p, g| {
        adam_kernel(p, g, &mut m, &mut v, &mut mx, c)
    });
    st.bufs.insert(names[0], Buf::Host(m));
    st.bufs.insert(names[1], Buf::Host(v));
    if c.ams {
        st.bufs.insert("max_exp_avg_sq", Buf::Host(mx));
    }
    res
}

/// One pass over a parameter: decay, both moments, AMSGrad maximum and the update.
///
/// Multiply-adds are fused (`mul_add`) exactly where PyTorch's CPU kernels fuse
/// them (`add(alpha)`, `lerp`, `addcmul`), so results match torch's bit for bit in
/// the golden tests. With the CPU's FMA unit the loop is compiled for it.
fn adam_kernel(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], mx: &mut [f32], c: Coeffs) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { adam_kernel_avx2(p, g, m, v, mx, c) };
        return;
    }
    adam_kernel_body(p, g, m, v, mx, c)
}

/// The kernel compiled for 8-wide AVX2 vectors with FMA. Element-wise IEEE
/// arithmetic rounds the same at any vector width, so results are bit-identical
/// to the portable build (where `mul_add` is a correctly rounded, slower libm call).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn adam_kernel_avx2(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    mx: &mut [f32],
    c: Coeffs,
) {
    adam_kernel_body(p, g, m, v, mx, c)
}

/// One element of the update; `mx` is the AMSGrad running maximum when enabled.
/// Branches on loop-invariant flags only, which the vectoriser turns into selects.
#[inline(always)]
fn adam_element(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, mx: Option<&mut f32>, c: &Coeffs) {
    let mut gi = if c.maximize { -g } else { g };
    let mut pi = *p;
    if c.l2 {
        gi = c.wd.mul_add(pi, gi);
    }
    if c.decoupled {
        pi *= c.decay;
    }
    let mi = if c.small {
        c.w1.mul_add(gi - *m, *m)
    } else {
        (-(gi - *m)).mul_add(c.one_minus_w1, gi)
    };
    *m = flush_subnormal(mi);
    let vi = (c.one_minus_b2 * gi).mul_add(gi, *v * c.b2);
    *v = flush_subnormal(vi);
    let s = match mx {
        Some(mx) => {
            let x = if vi > *mx || vi.is_nan() { vi } else { *mx };
            *mx = x;
            x
        }
        None => vi,
    };
    let denom = s.sqrt() / c.bc2_sqrt + c.eps;
    *p = pi + c.neg_step_size * mi / denom;
}

/// The loop, over zipped slices so that no index is bounds-checked.
#[inline(always)]
fn adam_kernel_body(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    mx: &mut [f32],
    c: Coeffs,
) {
    debug_assert!(g.len() == p.len() && m.len() == p.len() && v.len() == p.len());
    let it = p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut());
    if c.ams {
        for ((((p, &g), m), v), mx) in it.zip(mx.iter_mut()) {
            adam_element(p, g, m, v, Some(mx), &c);
        }
    } else {
        for (((p, &g), m), v) in it {
            adam_element(p, g, m, v, None, &c);
        }
    }
}

/// Buffer `name` as a tensor like `like`, zeros when absent.
fn dev_buf(st: &mut ParamState, name: &'static str, like: &Tensor) -> Result<Tensor> {
    if !st.bufs.contains_key(name) {
        st.bufs.insert(name, Buf::Dev(like.zeros_like()?));
    }
    match st.bufs.get_mut(name) {
        Some(b) => b.tensor(like),
        None => Err(Error::UnknownParameter {
            name: name.to_string(),
        }),
    }
}

fn scalar_like(x: f32, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::new(x, like.device())?.to_dtype(like.dtype())?)
}

/// The same maths as [`adam_kernel`] with candle tensor ops (any device/dtype).
fn tensor_step(var: &Var, grad: &Tensor, st: &mut ParamState, c: Coeffs) -> Result<()> {
    let p0 = var.as_tensor().detach();
    let mut g = grad.to_dtype(p0.dtype())?;
    if c.maximize {
        g = g.neg()?;
    }
    if c.l2 {
        g = (&g + p0.broadcast_mul(&scalar_like(c.wd, &p0)?)?)?;
    }
    let p = if c.decoupled {
        p0.broadcast_mul(&scalar_like(c.decay, &p0)?)?
    } else {
        p0.clone()
    };
    let m = dev_buf(st, "exp_avg", &p0)?;
    let v = dev_buf(st, "exp_avg_sq", &p0)?;
    let diff = (&g - &m)?;
    let m = if c.small {
        (&m + diff.broadcast_mul(&scalar_like(c.w1, &p0)?)?)?
    } else {
        (&g - diff.broadcast_mul(&scalar_like(c.one_minus_w1, &p0)?)?)?
    };
    let v = (v.broadcast_mul(&scalar_like(c.b2, &p0)?)?
        + g.broadcast_mul(&scalar_like(c.one_minus_b2, &p0)?)?
            .mul(&g)?)?;
    let s = if c.ams {
        let mx = dev_buf(st, "max_exp_avg_sq", &p0)?.maximum(&v)?;
        st.bufs.insert("max_exp_avg_sq", Buf::Dev(mx.clone()));
        mx
    } else {
        v.clone()
    };
    let denom = s
        .sqrt()?
        .broadcast_div(&scalar_like(c.bc2_sqrt, &p0)?)?
        .broadcast_add(&scalar_like(c.eps, &p0)?)?;
    let upd = m
        .broadcast_mul(&scalar_like(c.neg_step_size, &p0)?)?
        .div(&denom)?;
    var.set(&(p + upd)?)?;
    st.bufs.insert("exp_avg", Buf::Dev(m));
    st.bufs.insert("exp_avg_sq", Buf::Dev(v));
    Ok(())
}

macro_rules! adam_optimizer {
    ($name:ident, $kind:literal, $decoupled:expr, $default:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug)]
        pub struct $name {
            core: AdamCore,
        }

        impl $name {
            /// An optimizer over explicit parameter groups, each with its own lr and
            /// weight decay (`cfg.lr` / `cfg.weight_decay` are not used).
            ///
            /// # Errors
            /// [`Error::InvalidHyperParameter`] for a NaN, infinite or negative lr,
            /// weight decay or eps, or betas outside `[0, 1)`;
            /// [`Error::StateMismatch`] for a parameter in two groups.
            pub fn new(groups: Vec<ParamGroup>, cfg: AdamConfig) -> Result<Self> {
                Ok($name {
                    core: AdamCore::new($kind, $decoupled, groups, cfg)?,
                })
            }

            /// One group with `cfg.lr` and `cfg.weight_decay` over `params`.
            ///
            /// # Errors
            /// As [`Self::new`].
            pub fn from_params(params: Vec<(String, Var)>, cfg: AdamConfig) -> Result<Self> {
                let groups = single_group(params, cfg.lr, cfg.weight_decay);
                Self::new(groups, cfg)
            }

            /// One group with `cfg.lr` and `cfg.weight_decay` over every trainable (not frozen) parameter of
            /// `store`, in name order.
            ///
            /// # Errors
            /// As [`Self::new`].
            pub fn from_store(store: &ParamStore, cfg: AdamConfig) -> Result<Self> {
                Self::from_params(store_params(store), cfg)
            }

            /// The default configuration of this optimizer (PyTorch's).
            pub fn default_config() -> AdamConfig {
                $default
            }

            /// The configuration in use.
            pub fn adam_config(&self) -> &AdamConfig {
                &self.core.cfg
            }

            /// The step counter of parameter `name` (0 before its first update).
            pub fn param_step(&self, name: &str) -> u64 {
                self.core.state.get(name).map_or(0, |s| s.step)
            }
        }

        impl Stateful for $name {
            type Error = Error;

            fn state_dict(&self) -> Result<StateDict> {
                self.core.state_dict()
            }

            /// Moments copied into `pool`; JSON leaves built when it resolves.
            fn snapshot(&self, pool: &BufferPool) -> Result<Snapshot<Error>> {
                self.core.snapshot(pool)
            }

            /// Restores moments, step counters, lrs and hyper-parameters. Everything
            /// is checked before anything live changes.
            ///
            /// # Errors
            /// [`Error::StateKind`] for another optimizer's state;
            /// [`Error::StateMismatch`] listing every missing, unexpected or
            /// mis-shaped parameter; [`Error::InvalidHyperParameter`].
            fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
                self.core.load_state_dict(state)
            }
        }

        impl Optimizer for $name {
            fn kind(&self) -> &'static str {
                $kind
            }

            fn step(&mut self, grads: &Grads) -> Result<()> {
                self.core.step(grads)
            }

            fn num_groups(&self) -> usize {
                self.core.groups.len()
            }

            fn lr(&self, group: usize) -> f64 {
                self.core.groups.get(group).map_or(f64::NAN, |g| g.lr)
            }

            fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
                self.core.set_lr(group, lr)
            }

            fn params(&self) -> Vec<(String, Var)> {
                self.core
                    .groups
                    .iter()
                    .flat_map(|g| g.params.iter().cloned())
                    .collect()
            }

            fn reset_state(&mut self) {
                self.core.state.clear();
            }

            fn config(&self) -> serde_json::Value {
                self.core.config()
            }
        }
    };
}

adam_optimizer!(
    Adam,
    "Adam",
    false,
    AdamConfig::adam(),
    "Adam with L2 weight decay added to the gradient (PyTorch's `torch.optim.Adam`)."
);
adam_optimizer!(
    AdamW,
    "AdamW",
    true,
    AdamConfig::adamw(),
    "AdamW with decoupled weight decay (PyTorch's `torch.optim.AdamW`)."
);
