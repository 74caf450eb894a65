//! Machinery shared by every optimizer: per-parameter state keyed by name, moment
//! buffers that live either as plain host `Vec<f32>` (fused CPU path) or as device
//! tensors (fallback path), the fused in-place kernel driver, and the
//! `state_dict` / `load_state_dict` layout.
//!
//! State layout (flat keys joined with `/`):
//! - `kind`: JSON string, e.g. `"AdamW"`;
//! - `param_groups`: JSON array, one object per group with `lr`, `weight_decay`,
//!   `params` (names, in order) and the optimizer's hyper-parameters;
//! - `<param>/step`: JSON integer, the parameter's own step counter;
//! - `<param>/<buffer>`: tensors (`exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`,
//!   `momentum_buffer`) shaped like the parameter.
//!
//! A parameter that never received a gradient has no state, as in PyTorch.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor, Var};
use relume_ckpt::{BufferPool, DType as CkDType, RestoreReport, Snapshot, StateDict, TensorData};

use super::{check_lr, ParamGroup};
use crate::convert::{data_to_tensor, tensor_to_data, tensor_to_data_pooled};
use crate::error::{Error, Result};
use crate::params::ParamStore;

/// A moment buffer: host floats for the fused CPU path, a tensor otherwise.
#[derive(Clone, Debug)]
pub(crate) enum Buf {
    /// Contiguous f32 values in row-major order.
    Host(Vec<f32>),
    /// A tensor on the parameter's device, with the parameter's dtype.
    Dev(Tensor),
}

impl Buf {
    fn to_data(&self, shape: &[usize], key: &str) -> Result<TensorData> {
        match self {
            Buf::Host(v) => {
                Ok(TensorData::from_f32(shape.to_vec(), v).map_err(|e| e.with_key(key))?)
            }
            Buf::Dev(t) => tensor_to_data(t, key),
        }
    }

    /// As `to_data`, copying into a recycled buffer of `pool`.
    fn to_data_pooled(&self, shape: &[usize], key: &str, pool: &BufferPool) -> Result<TensorData> {
        match self {
            Buf::Host(v) if cfg!(target_endian = "little") => {
                // On little-endian hosts the in-memory bytes are the checkpoint's.
                let bytes = pool.copy(bytemuck::cast_slice::<f32, u8>(v));
                Ok(TensorData::new(CkDType::F32, shape.to_vec(), bytes)
                    .map_err(|e| e.with_key(key))?)
            }
            Buf::Host(v) => {
                Ok(TensorData::from_f32(shape.to_vec(), v).map_err(|e| e.with_key(key))?)
            }
            Buf::Dev(t) => tensor_to_data_pooled(t, key, pool),
        }
    }

    /// The host values, converting a tensor buffer first.
    pub(crate) fn host(&mut self) -> Result<&mut Vec<f32>> {
        if let Buf::Dev(t) = self {
            let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            *self = Buf::Host(v);
        }
        match self {
            Buf::Host(v) => Ok(v),
            Buf::Dev(_) => unreachable!("converted to host just above"),
        }
    }

    /// The buffer as a tensor shaped, typed and placed like `like`.
    pub(crate) fn tensor(&mut self, like: &Tensor) -> Result<Tensor> {
        if let Buf::Host(v) = self {
            let t = Tensor::from_slice(v, like.shape(), like.device())?.to_dtype(like.dtype())?;
            *self = Buf::Dev(t);
        }
        match self {
            Buf::Dev(t) => Ok(t.clone()),
            Buf::Host(_) => unreachable!("converted to a tensor just above"),
        }
    }
}

/// Per-parameter optimizer state.
#[derive(Clone, Debug, Default)]
pub(crate) struct ParamState {
    /// Number of updates applied to this parameter.
    pub step: u64,
    /// Named buffers (`exp_avg`, `momentum_buffer`, ...).
    pub bufs: BTreeMap<&'static str, Buf>,
}

/// Whether the fused single-pass CPU kernel can update `param` with `grad`.
pub(crate) fn fusable(param: &Tensor, grad: &Tensor) -> bool {
    param.device().is_cpu()
        && param.dtype() == DType::F32
        && grad.dtype() == DType::F32
        && param.is_contiguous()
        && param.shape() == grad.shape()
}

/// `x`, or zero when `x` is subnormal (`|x| < f32::MIN_POSITIVE`). The fused
/// kernels store optimizer buffers through it; see the module docs of `adam`.
#[inline(always)]
pub(crate) fn flush_subnormal(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE {
        0.0
    } else {
        x
    }
}

/// Runs `f(param_values, grad_values)` in place on the storage of `param`, in one
/// pass, without allocating.
///
/// # Errors
/// candle errors (non-f32 or non-contiguous storage).
pub(crate) fn fused_update(
    param: &Tensor,
    grad: &Tensor,
    f: impl FnMut(&mut [f32], &[f32]),
) -> Result<()> {
    struct Op<F>(RefCell<F>);
    impl<F: FnMut(&mut [f32], &[f32])> InplaceOp2 for Op<F> {
        fn name(&self) -> &'static str {
            "relume-fused-optimizer-step"
        }
        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> candle_core::Result<()> {
            let (CpuStorage::F32(p), CpuStorage::F32(g)) = (s1, s2) else {
                candle_core::bail!("fused optimizer step needs f32 parameter and gradient")
            };
            let (Some((ps, pe)), Some((gs, ge))) =
                (l1.contiguous_offsets(), l2.contiguous_offsets())
            else {
                candle_core::bail!("fused optimizer step needs contiguous tensors")
            };
            if pe - ps != ge - gs {
                candle_core::bail!("fused optimizer step: parameter and gradient sizes differ")
            }
            (self.0.borrow_mut())(&mut p[ps..pe], &g[gs..ge]);
            Ok(())
        }
    }
    let grad = grad.contiguous()?;
    param.inplace_op2(&grad, &Op(RefCell::new(f)))?;
    Ok(())
}

/// Builds groups from a parameter store: one group with `lr` and `weight_decay`.
pub(crate) fn single_group(
    params: Vec<(String, Var)>,
    lr: f64,
    weight_decay: f64,
) -> Vec<ParamGroup> {
    vec![ParamGroup {
        params,
        lr,
        weight_decay,
    }]
}

/// The trainable (not frozen) parameters of a store, in name order.
pub(crate) fn store_params(store: &ParamStore) -> Vec<(String, Var)> {
    store.trainable_vars()
}

/// Validates groups: finite non-negative lr and weight decay, unique names.
///
/// # Errors
/// [`Error::InvalidHyperParameter`], [`Error::StateMismatch`] for a duplicate name.
pub(crate) fn check_groups(kind: &str, groups: &[ParamGroup]) -> Result<()> {
    let mut seen = BTreeSet::new();
    let mut dups = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        check_lr(&format!("{kind} param group {i}"), g.lr)?;
        check_non_negative(
            &format!("{kind} param group {i}"),
            "weight_decay",
            g.weight_decay,
        )?;
        for (name, _) in &g.params {
            if !seen.insert(name.clone()) {
                dups.push(format!("parameter {name:?} appears in more than one group"));
            }
        }
    }
    if dups.is_empty() {
        Ok(())
    } else {
        Err(Error::StateMismatch {
            component: kind.to_string(),
            problems: dups,
        })
    }
}

/// Checks that `value` is finite and `>= 0`.
///
/// # Errors
/// [`Error::InvalidHyperParameter`].
pub(crate) fn check_non_negative(component: &str, what: &str, value: f64) -> Result<()> {
    check_range(component, what, value, value >= 0.0, ">= 0")
}

/// Checks that `value` is finite and satisfies `ok`.
///
/// # Errors
/// [`Error::InvalidHyperParameter`] with `rule`.
pub(crate) fn check_range(
    component: &str,
    what: &str,
    value: f64,
    ok: bool,
    rule: &str,
) -> Result<()> {
    if value.is_finite() && ok {
        Ok(())
    } else {
        Err(Error::InvalidHyperParameter {
            component: component.to_string(),
            what: what.to_string(),
            value,
            rule: rule.to_string(),
        })
    }
}

/// Turns a restore report with problems into [`Error::StateMismatch`] listing every
/// missing, unexpected and mismatched key; `Ok` when the report is clean.
///
/// # Errors
/// [`Error::StateMismatch`] naming `component` and every offending key.
pub fn report_to_error(component: &str, report: &RestoreReport) -> Result<()> {
    if report.is_clean() {
        return Ok(());
    }
    let mut problems = Vec::new();
    for k in &report.missing {
        problems.push(format!("{k}: missing from the saved state"));
    }
    for k in &report.unexpected {
        problems.push(format!(
            "{k}: in the saved state but not in the live optimizer"
        ));
    }
    for m in &report.mismatched {
        problems.push(format!("{}: expected {}, got {}", m.key, m.expected, m.got));
    }
    Err(Error::StateMismatch {
        component: component.to_string(),
        problems,
    })
}

/// Writes the full state of an optimizer.
pub(crate) fn save_state(
    kind: &str,
    groups: &[ParamGroup],
    hyper: &serde_json::Value,
    state: &BTreeMap<String, ParamState>,
) -> Result<StateDict> {
    let mut sd = StateDict::new();
    sd.insert_json("kind", serde_json::Value::from(kind));
    sd.insert_json("param_groups", groups_json(groups, hyper));
    let shapes: BTreeMap<&str, &Var> = groups
        .iter()
        .flat_map(|g| g.params.iter().map(|(n, v)| (n.as_str(), v)))
        .collect();
    for (name, st) in state {
        let Some(var) = shapes.get(name.as_str()) else {
            continue;
        };
        sd.insert_json(format!("{name}/step"), serde_json::Value::from(st.step));
        for (bname, buf) in &st.bufs {
            let key = format!("{name}/{bname}");
            let data = buf.to_data(var.dims(), &key)?;
            sd.insert_tensor(key, data);
        }
    }
    Ok(sd)
}

/// As [`save_state`], for an async save: the buffers are copied into `pool` now;
/// the JSON leaves (kind, groups, step counters) and the keys are built when the
/// snapshot resolves, from plain copies taken now. Resolves to exactly what
/// [`save_state`] returns.
pub(crate) fn snapshot_state(
    kind: &'static str,
    groups: &[ParamGroup],
    hyper: &serde_json::Value,
    state: &BTreeMap<String, ParamState>,
    pool: &BufferPool,
) -> Result<Snapshot<Error>> {
    let shapes: BTreeMap<&str, &Var> = groups
        .iter()
        .flat_map(|g| g.params.iter().map(|(n, v)| (n.as_str(), v)))
        .collect();
    let mut params = Vec::with_capacity(state.len());
    for (name, st) in state {
        let Some(var) = shapes.get(name.as_str()) else {
            continue;
        };
        let mut bufs = Vec::with_capacity(st.bufs.len());
        for (bname, buf) in &st.bufs {
            let data = buf
                .to_data_pooled(var.dims(), bname, pool)
                .map_err(|e| with_context(e, name, bname))?;
            bufs.push((*bname, data));
        }
        params.push((name.clone(), st.step, bufs));
    }
    let groups = groups.to_vec();
    let hyper = hyper.clone();
    Ok(Snapshot::deferred(move || {
        let mut sd = StateDict::new();
        sd.insert_json("kind", serde_json::Value::from(kind));
        sd.insert_json("param_groups", groups_json(&groups, &hyper));
        for (name, step, bufs) in params {
            sd.insert_json(format!("{name}/step"), serde_json::Value::from(step));
            for (bname, data) in bufs {
                sd.insert_tensor(format!("{name}/{bname}"), data);
            }
        }
        Ok(sd)
    }))
}

/// Names `<param>/<buffer>` in a buffer copy's error (the key is only formatted on
/// failure, off the hot path).
fn with_context(e: Error, name: &str, bname: &str) -> Error {
    match e {
        Error::Ckpt(c) => Error::Ckpt(c.with_key(&format!("{name}/{bname}"))),
        other => other,
    }
}

/// The `param_groups` JSON value.
pub(crate) fn groups_json(groups: &[ParamGroup], hyper: &serde_json::Value) -> serde_json::Value {
    let arr = groups
        .iter()
        .map(|g| {
            let mut obj = serde_json::Map::new();
            obj.insert("lr".into(), g.lr.into());
            obj.insert("weight_decay".into(), g.weight_decay.into());
            obj.insert(
                "params".into(),
                g.params
                    .iter()
                    .map(|(n, _)| n.clone())
                    .collect::<Vec<_>>()
                    .into(),
            );
            if let serde_json::Value::Object(h) = hyper {
                for (k, v) in h {
                    obj.insert(k.clone(), v.clone());
                }
            }
            serde_json::Value::Object(obj)
        })
        .collect();
    serde_json::Value::Array(arr)
}

/// What a successful load produces; applied to the live optimizer only after every
/// check passed.
pub(crate) struct Loaded {
    /// `(lr, weight_decay)` per group.
    pub group_hparams: Vec<(f64, f64)>,
    /// The hyper-parameters recorded with group 0.
    pub hyper: serde_json::Value,
    /// The new per-parameter state.
    pub state: BTreeMap<String, ParamState>,
    /// Accounting.
    pub report: RestoreReport,
}

/// Reads and checks an optimizer state against the live groups. `bufs` lists the
/// buffers every stepped parameter must have. Nothing live is modified.
///
/// # Errors
/// [`Error::StateKind`] for another optimizer kind; [`Error::StateMismatch`] listing
/// every missing, unexpected or mis-shaped key; [`Error::InvalidHyperParameter`] for
/// a saved NaN/infinite learning rate.
pub(crate) fn load_state(
    kind: &str,
    groups: &[ParamGroup],
    bufs: &[&'static str],
    sd: &StateDict,
) -> Result<Loaded> {
    let saved_kind: String = sd.require_value("kind")?;
    if saved_kind != kind {
        return Err(Error::StateKind {
            key: "kind".into(),
            saved: saved_kind,
            live: kind.to_string(),
        });
    }
    let saved_groups: Vec<serde_json::Value> = sd.require_value("param_groups")?;
    let mut report = RestoreReport::new();
    if saved_groups.len() != groups.len() {
        report.mismatched(
            "param_groups",
            format!("{} groups", groups.len()),
            format!("{} groups", saved_groups.len()),
        );
    }
    let mut group_hparams = Vec::new();
    for (i, (live, saved)) in groups.iter().zip(&saved_groups).enumerate() {
        let field = |f: &str| -> Result<f64> {
            saved
                .get(f)
                .and_then(|v| v.as_f64())
                .ok_or_else(|| Error::StateMismatch {
                    component: kind.to_string(),
                    problems: vec![format!("param_groups[{i}].{f}: missing or not a number")],
                })
        };
        let lr = field("lr")?;
        let wd = field("weight_decay")?;
        check_lr(&format!("{kind} param group {i} (saved)"), lr)?;
        check_non_negative(
            &format!("{kind} param group {i} (saved)"),
            "weight_decay",
            wd,
        )?;
        group_hparams.push((lr, wd));
        let saved_names: BTreeSet<String> = saved
            .get("params")
            .and_then(|v| serde_json::from_value::<Vec<String>>(v.clone()).ok())
            .unwrap_or_default()
            .into_iter()
            .collect();
        let live_names: BTreeSet<String> = live.params.iter().map(|(n, _)| n.clone()).collect();
        for n in live_names.difference(&saved_names) {
            report.missing(format!("param_groups[{i}].params/{n}"));
        }
        for n in saved_names.difference(&live_names) {
            report.unexpected(format!("param_groups[{i}].params/{n}"));
        }
    }
    let hyper = saved_groups
        .first()
        .cloned()
        .unwrap_or(serde_json::Value::Null);

    let live: BTreeMap<&str, &Var> = groups
        .iter()
        .flat_map(|g| g.params.iter().map(|(n, v)| (n.as_str(), v)))
        .collect();
    // Per-parameter keys present in the saved state.
    let mut per_param: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for key in sd.keys() {
        if key == "kind" || key == "param_groups" {
            continue;
        }
        match key.rsplit_once('/') {
            Some((p, leaf)) => {
                per_param.entry(p).or_default().insert(leaf);
            }
            None => report.unexpected(key),
        }
    }
    let mut state = BTreeMap::new();
    for (pname, leaves) in &per_param {
        let Some(var) = live.get(pname) else {
            for leaf in leaves {
                report.unexpected(format!("{pname}/{leaf}"));
            }
            continue;
        };
        let mut st = ParamState::default();
        let step_key = format!("{pname}/step");
        match sd.get_json(&step_key).and_then(|v| v.as_u64()) {
            Some(s) => st.step = s,
            None => report.missing(step_key.clone()),
        }
        for b in bufs {
            let key = format!("{pname}/{b}");
            let Some(data) = sd.get_tensor(&key) else {
                report.missing(key);
                continue;
            };
            if data.shape() != var.dims() {
                report.mismatched(
                    key.clone(),
                    format!("shape {:?}", var.dims()),
                    format!("shape {:?}", data.shape()),
                );
                continue;
            }
            let buf = if data.dtype() == CkDType::F32 {
                Buf::Host(data.to_f32_vec().map_err(|e| e.with_key(&key))?)
            } else {
                let t = data_to_tensor(data, var.device(), &key)?.to_dtype(var.dtype())?;
                Buf::Dev(t)
            };
            st.bufs.insert(b, buf);
            report.restored(key);
        }
        for leaf in leaves {
            if *leaf != "step" && !bufs.contains(leaf) {
                report.unexpected(format!("{pname}/{leaf}"));
            }
        }
        if sd.contains_key(&step_key) {
            report.restored(step_key);
        }
        state.insert(pname.to_string(), st);
    }
    report_to_error(kind, &report)?;
    report.restored("kind");
    report.restored("param_groups");
    Ok(Loaded {
        group_hparams,
        hyper,
        state,
        report,
    })
}

/// Index of `group` or an error naming the optimizer.
///
/// # Errors
/// [`Error::InvalidHyperParameter`] for an out-of-range group.
pub(crate) fn check_group(kind: &str, group: usize, n: usize) -> Result<()> {
    if group < n {
        Ok(())
    } else {
        Err(Error::InvalidHyperParameter {
            component: kind.to_string(),
            what: "param group index".into(),
            value: group as f64,
            rule: format!("< {n}"),
        })
    }
}
