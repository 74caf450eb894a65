//! A Lightning (or plain `torch.save`) checkpoint as a relume [`Checkpoint`].
//!
//! [`convert`] builds, from an open [`LightningCheckpoint`], the components:
//!
//! | component      | from                                                         |
//! |----------------|--------------------------------------------------------------|
//! | `model`        | `state_dict`, every tensor under its own name                |
//! | `optimizer.<i>`| `optimizer_states[i]`, per-parameter state keyed by *name*   |
//! | `scheduler.<i>`| `lr_schedulers[i]`, as JSON                                  |
//! | `lightning`    | every other top-level entry (callbacks, loops, hyper_parameters, versions) as JSON |
//!
//! with `progress` `{"step", "epoch"}` and a `config` naming the source. Writing it is
//! the caller's: [`relume_ckpt::CheckpointDir::save`] commits it durably.
//!
//! ## Optimizer state: index to name
//! torch keys optimizer state by parameter *index*: the position in the list given
//! to the optimizer, which for `self.parameters()` is the `state_dict` order
//! without buffers. The conversion maps index `i` to the `i`-th `state_dict` entry
//! that is not a buffer (see [`is_buffer`]). The layout mirrors relume's optimizers:
//! `kind`, `param_groups` (with parameter names), `<name>/step`, `<name>/<buffer>`.
//! Limits: an optimizer built over a subset or a reordered list of parameters, frozen
//! parameters left out of it, tied (shared) weights, or custom buffers with float dtypes
//! break the correspondence. When the number of parameters in the param groups differs
//! from the number of candidate names the conversion refuses
//! ([`Error::OptimizerParamCount`]; [`ConvertOptions::weights_only`] converts the model
//! alone); a reordering that keeps the count cannot be detected, and shapes are checked
//! against the named parameter to catch most of them ([`Error::OptimizerStateShape`]).
//!
//! ## Memory
//! No tensor is loaded into memory: each tensor of a stored zip entry (what `torch.save`
//! writes) becomes a slice of the file's memory map, so the pages the writer touches are
//! file-backed and reclaimable, not heap; only a non-contiguous view or a tensor of a
//! compressed entry is copied into memory. The returned [`Checkpoint`] keeps the map
//! alive until it is dropped.
//!
//! The result is for weights and inspection: it has no relume RNG, data cursor or
//! loop state, so `relume inspect` reports it as not resumable.

use relume_ckpt::{Checkpoint, DType, StateDict};
use serde_json::{json, Value};

use crate::checkpoint::{CheckpointKind, LightningCheckpoint};
use crate::error::{Error, Result};
use crate::summary::OptimizerSummary;
use crate::value::{PyValue, TorchTensor};

/// What [`convert`] converts.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// Convert the model weights only, not optimizer or scheduler state (default `false`).
    pub weights_only: bool,
}

/// A converted checkpoint, ready for [`relume_ckpt::CheckpointDir::save`].
#[derive(Debug)]
pub struct Conversion {
    /// The relume checkpoint.
    pub checkpoint: Checkpoint,
    /// A checkpoint name: `step=<global_step>-epoch=<epoch>`, or `converted` when the
    /// file records neither.
    pub name: String,
    /// For each optimizer, the number of parameters whose state was keyed by name.
    pub optimizer_params_mapped: Vec<usize>,
}

/// True for `state_dict` entries that are buffers, not parameters: tensors of a
/// non-float dtype and names ending in `running_mean`, `running_var` or
/// `num_batches_tracked`.
///
/// # Example
/// ```
/// use relume_lightning::{convert::is_buffer, TorchDType, TorchTensor};
/// let t = TorchTensor::from_bytes(TorchDType::F32, vec![1], "0", vec![0u8; 4].into())?;
/// assert!(is_buffer("bn.running_mean", &t));
/// assert!(!is_buffer("bn.weight", &t));
/// # Ok::<(), relume_lightning::Error>(())
/// ```
pub fn is_buffer(name: &str, t: &TorchTensor) -> bool {
    const BUFFERS: [&str; 3] = ["running_mean", "running_var", "num_batches_tracked"];
    let float = t
        .dtype
        .to_relume()
        .is_some_and(|d| matches!(d, DType::F32 | DType::F64 | DType::F16 | DType::BF16));
    !float || BUFFERS.iter().any(|b| name.ends_with(b))
}

/// The `model` component.
fn model_component(weights: &[(String, &TorchTensor)]) -> Result<StateDict> {
    let mut sd = StateDict::new();
    for (name, t) in weights {
        sd.insert_tensor(name.clone(), t.to_tensor_data(name)?);
    }
    Ok(sd)
}

/// A JSON rendering of a step counter: an integer when integral.
fn step_json(v: &PyValue) -> Value {
    let x = v
        .as_tensor()
        .and_then(TorchTensor::scalar_f64)
        .or_else(|| v.as_f64());
    match x {
        Some(x) if x.fract() == 0.0 && x.abs() < 9.0e15 => json!(x as i64),
        _ => v.to_json(),
    }
}

/// Optimizer `i` as a relume component, its state keyed by parameter name; `params`
/// are the `state_dict` entries that are not buffers, in order. Returns the component
/// and the number of parameters with state.
///
/// # Errors
/// [`Error::OptimizerParamCount`] when the param groups list another number of
/// parameters than `params`, [`Error::OptimizerParamIndex`] for state of an index with no
/// parameter, [`Error::OptimizerStateShape`] when a state tensor's shape is not its
/// parameter's, and the tensor errors of [`TorchTensor::to_tensor_data`].
pub fn optimizer_component(
    i: usize,
    o: &OptimizerSummary<'_>,
    params: &[(String, &TorchTensor)],
) -> Result<(StateDict, usize)> {
    let in_groups = o.param_groups.iter().map(|g| g.params.len()).sum::<usize>();
    if in_groups != params.len() {
        return Err(Error::OptimizerParamCount {
            optimizer: i,
            kind: o.kind.name(),
            in_groups,
            in_state_dict: params.len(),
        });
    }
    let name_of = |idx: &str| -> Result<(usize, &(String, &TorchTensor))> {
        idx.parse::<usize>()
            .ok()
            .and_then(|k| Some((k, params.get(k)?)))
            .ok_or_else(|| Error::OptimizerParamIndex {
                optimizer: i,
                index: idx.to_string(),
            })
    };
    let mut sd = StateDict::new();
    sd.insert_json("kind", json!(o.kind.name().to_lowercase()));
    let groups: Vec<Value> = o
        .param_groups
        .iter()
        .map(|g| {
            let mut obj: serde_json::Map<String, Value> = g
                .settings
                .iter()
                .map(|(k, v)| (k.clone(), v.to_json()))
                .collect();
            let names: Vec<Value> = g
                .params
                .iter()
                .map(|&p| {
                    usize::try_from(p)
                        .ok()
                        .and_then(|k| params.get(k))
                        .map_or(Value::Null, |(n, _)| json!(n))
                })
                .collect();
            obj.insert("params".into(), Value::Array(names));
            Value::Object(obj)
        })
        .collect();
    sd.insert_json("param_groups", Value::Array(groups));
    let mut mapped = 0;
    for (idx, entries) in &o.state {
        let (index, (name, param)) = name_of(idx)?;
        mapped += 1;
        for (key, v) in entries {
            let full = format!("{name}/{key}");
            if key == "step" {
                sd.insert_json(full, step_json(v));
            } else if let Some(t) = v.as_tensor() {
                if t.shape != param.shape && t.numel() != 1 {
                    return Err(Error::OptimizerStateShape {
                        optimizer: i,
                        key: key.clone(),
                        index,
                        tensor: name.clone(),
                        expected: param.shape.clone(),
                        got: t.shape.clone(),
                    });
                }
                sd.insert_tensor(full.clone(), t.to_tensor_data(&full)?);
            } else {
                sd.insert_json(full, v.to_json());
            }
        }
    }
    Ok((sd, mapped))
}

/// Top-level dict entries as JSON leaves, except `skip`.
fn json_leaves(v: &PyValue, skip: &[&str]) -> StateDict {
    let mut sd = StateDict::new();
    for (k, x) in v.dict_items().unwrap_or_default() {
        let key = k.key_label();
        if !skip.contains(&key.as_str()) {
            sd.insert_json(key, x.to_json());
        }
    }
    sd
}

/// The checkpoint name [`convert`] proposes: `step=<global_step:06>-epoch=<epoch>`, or
/// `converted` when either is missing or negative.
pub fn default_name(l: &LightningCheckpoint) -> String {
    match (l.global_step(), l.epoch()) {
        (Some(s), Some(e)) if s >= 0 && e >= 0 => format!("step={s:06}-epoch={e}"),
        _ => "converted".to_string(),
    }
}

/// Converts `l` into a relume checkpoint (see the [module docs](self) for the layout).
///
/// # Errors
/// [`Error::NothingToConvert`] when the file has no `state_dict` tensors, the errors of
/// [`optimizer_component`] (unless [`ConvertOptions::weights_only`]), and the tensor
/// errors of [`TorchTensor::to_tensor_data`] ([`Error::UnsupportedTorchDType`] for
/// int8/int16, [`Error::ZipTruncated`] for a damaged storage).
///
/// # Example
/// ```no_run
/// use relume_ckpt::CheckpointDir;
/// use relume_lightning::{convert, ConvertOptions, LightningCheckpoint};
/// let l = LightningCheckpoint::open("epoch=1.ckpt")?;
/// let c = convert(&l, &ConvertOptions::default())?;
/// let dir = CheckpointDir::open("runs/converted")?;
/// dir.save(&c.name, &c.checkpoint)?;
/// # Ok::<(), relume_lightning::Error>(())
/// ```
pub fn convert(l: &LightningCheckpoint, opts: &ConvertOptions) -> Result<Conversion> {
    let weights = l.state_dict();
    if weights.is_empty() {
        return Err(Error::NothingToConvert {
            path: l.path().to_path_buf(),
        });
    }
    let mut ckpt = Checkpoint::default();
    ckpt.components
        .insert("model".into(), model_component(&weights)?);
    let mut mapped = Vec::new();
    if !opts.weights_only {
        let params: Vec<(String, &TorchTensor)> = weights
            .iter()
            .filter(|(n, t)| !is_buffer(n, t))
            .cloned()
            .collect();
        for (i, o) in l.optimizers().iter().enumerate() {
            let (sd, n) = optimizer_component(i, o, &params)?;
            mapped.push(n);
            ckpt.components.insert(format!("optimizer.{i}"), sd);
        }
        for (i, s) in l
            .get("lr_schedulers")
            .and_then(PyValue::as_seq)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            ckpt.components
                .insert(format!("scheduler.{i}"), json_leaves(s, &[]));
        }
    }
    let meta = json_leaves(
        l.root(),
        &["state_dict", "optimizer_states", "lr_schedulers"],
    );
    if !meta.is_empty() && l.kind() != CheckpointKind::PlainStateDict {
        ckpt.components.insert("lightning".into(), meta);
    }
    ckpt.progress = json!({"step": l.global_step(), "epoch": l.epoch()});
    ckpt.config = json!({
        "converted_from": l.path().display().to_string(),
        "lightning_version": l.lightning_version(),
        "hyper_parameters": l.hyper_parameters().map(PyValue::to_json),
        "weights_only": opts.weights_only,
    });
    Ok(Conversion {
        checkpoint: ckpt,
        name: default_name(l),
        optimizer_params_mapped: mapped,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::value::TorchDType;

    use super::*;

    fn tensor(shape: &[usize], dtype: TorchDType) -> TorchTensor {
        let n: usize = shape.iter().product::<usize>();
        let bytes = Arc::from(vec![0u8; n * dtype.size_in_bytes()]);
        TorchTensor::from_bytes(dtype, shape.to_vec(), "0", bytes).unwrap()
    }

    fn s(x: &str) -> PyValue {
        PyValue::Str(x.into())
    }

    /// An SGD state over parameter indices `params`, with a momentum buffer of
    /// `shape` for index 0.
    fn sgd(params: &[i64], shape: &[usize]) -> PyValue {
        let group = PyValue::Dict(vec![
            (s("lr"), PyValue::Float(0.1)),
            (s("momentum"), PyValue::Float(0.9)),
            (
                s("params"),
                PyValue::List(params.iter().map(|&p| PyValue::Int(p)).collect()),
            ),
        ]);
        let st = PyValue::Dict(vec![(
            PyValue::Int(0),
            PyValue::Dict(vec![(
                s("momentum_buffer"),
                PyValue::Tensor(tensor(shape, TorchDType::F32)),
            )]),
        )]);
        PyValue::Dict(vec![
            (s("state"), st),
            (s("param_groups"), PyValue::List(vec![group])),
        ])
    }

    #[test]
    fn buffers_are_not_parameters() {
        let f = tensor(&[2], TorchDType::F32);
        let i = tensor(&[], TorchDType::I64);
        assert!(is_buffer("bn.running_mean", &f));
        assert!(is_buffer("bn.num_batches_tracked", &i));
        assert!(!is_buffer("bn.weight", &f));
    }

    #[test]
    fn maps_index_to_name() {
        let (w, b) = (
            tensor(&[3, 2], TorchDType::F32),
            tensor(&[3], TorchDType::F32),
        );
        let params = vec![("fc.weight".to_string(), &w), ("fc.bias".to_string(), &b)];
        let v = sgd(&[0, 1], &[3, 2]);
        let o = OptimizerSummary::from_value(&v).unwrap();
        let (sd, n) = optimizer_component(0, &o, &params).unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            sd.get_tensor("fc.weight/momentum_buffer").unwrap().shape(),
            [3, 2]
        );
        assert_eq!(
            sd.require_json("param_groups").unwrap()[0]["params"],
            json!(["fc.weight", "fc.bias"])
        );
    }

    #[test]
    fn count_mismatch_is_refused() {
        let w = tensor(&[3, 2], TorchDType::F32);
        let params = vec![("fc.weight".to_string(), &w)];
        let v = sgd(&[0, 1], &[3, 2]);
        let o = OptimizerSummary::from_value(&v).unwrap();
        let err = optimizer_component(0, &o, &params).unwrap_err();
        assert!(
            matches!(
                err,
                Error::OptimizerParamCount {
                    in_groups: 2,
                    in_state_dict: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("2 parameters in its param groups but the state_dict has 1"),
            "{err}"
        );
    }

    #[test]
    fn shape_mismatch_is_refused() {
        let (w, b) = (
            tensor(&[3, 2], TorchDType::F32),
            tensor(&[3], TorchDType::F32),
        );
        let params = vec![("fc.weight".to_string(), &w), ("fc.bias".to_string(), &b)];
        let v = sgd(&[0, 1], &[3]);
        let o = OptimizerSummary::from_value(&v).unwrap();
        let err = optimizer_component(0, &o, &params).unwrap_err();
        assert!(
            matches!(err, Error::OptimizerStateShape { ref tensor, .. } if tensor == "fc.weight"),
            "{err}"
        );
        assert!(err.to_string().contains("parameter order differs"), "{err}");
    }
}
