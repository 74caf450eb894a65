//! `relume lightning convert X.ckpt OUT`: a Lightning (or plain `torch.save`)
//! checkpoint as a relume checkpoint.
//!
//! The file is read with relume-ckpt's restricted pickle reader (nothing in it is
//! executed). `OUT` is a run directory; the command writes, with the commit
//! protocol, `OUT/checkpoints/<name>/` holding:
//!
//! | component      | from                                                         |
//! |----------------|--------------------------------------------------------------|
//! | `model`        | `state_dict`, every tensor under its own name                |
//! | `optimizer.<i>`| `optimizer_states[i]`, per-parameter state keyed by *name*   |
//! | `scheduler.<i>`| `lr_schedulers[i]`, as JSON                                  |
//! | `lightning`    | every other top-level entry (callbacks, loops, hyper_parameters, versions) as JSON |
//!
//! and `OUT/model.safetensors`, a copy of the weights Python loads with
//! `safetensors.torch.load_file`.
//!
//! ## Optimizer state: index to name
//! torch keys optimizer state by parameter *index*: the position in the list given
//! to the optimizer, which for `self.parameters()` is the `state_dict` order
//! without buffers. The conversion maps index `i` to the `i`-th `state_dict` entry
//! that is not a buffer (buffers: integer tensors and names ending in
//! `running_mean`, `running_var`, `num_batches_tracked`). The layout mirrors
//! relume's optimizers: `param_groups` (with parameter names), `<name>/step`,
//! `<name>/<buffer>`. Limits: an optimizer built over a subset or a reordered list
//! of parameters, frozen parameters left out of it, tied (shared) weights, or
//! custom buffers with float dtypes break the correspondence. When the number of
//! parameters in the param groups differs from the number of candidate names the
//! conversion refuses (`--weights-only` converts the model alone); a reordering
//! that keeps the count cannot be detected, and shapes are checked against the
//! named parameter to catch most of them.
//!
//! ## Memory
//! No tensor is loaded into memory. The `.ckpt` is memory-mapped and each tensor of a
//! stored zip entry (what `torch.save` writes) is handed to the writer as a slice of the
//! map, so the pages it touches are file-backed and reclaimable, not heap; only a
//! non-contiguous view or a tensor of a compressed entry is copied into memory, and held
//! until the checkpoint is written. `OUT/model.safetensors` is copied from the checkpoint by the
//! kernel (`std::io::copy`), not through a buffer the size of the file. The source is
//! unmapped before the written checkpoint is verified (the verifier maps its files in
//! turn), so the two sets of file-backed pages are not resident at once.
//!
//! The result is for weights and inspection: it has no relume RNG, data cursor or
//! loop state, so `relume inspect` reports it as not resumable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use relume_ckpt::commit::check_name;
use relume_ckpt::lightning::{CheckpointKind, LightningCheckpoint, PyValue, TorchTensor};
use relume_ckpt::{Checkpoint, CheckpointDir, StateDict};
use serde::Serialize;
use serde_json::{json, Value};

use super::verify::{check, Checked};
use super::{print_json, Status, UsageError};

/// Name of the standalone weights file written in `OUT`.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Arguments of `relume lightning convert`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  relume lightning convert epoch=3-step=120.ckpt runs/converted\n  relume lightning convert weights.pt runs/w --weights-only --name pretrained\n\nWrites OUT/checkpoints/<name>/ (components model, optimizer.<i>, scheduler.<i>,\nlightning) and OUT/model.safetensors. Optimizer state is keyed by parameter index\nin torch; it is mapped to names through the state_dict order without buffers,\nwhich holds when the optimizer was built from self.parameters() with no tied or\nfrozen-and-excluded parameters. A count mismatch is an error (use --weights-only).\nNothing in the file is executed."
)]
pub struct ConvertArgs {
    /// The `.ckpt` file (a PyTorch zip checkpoint, Lightning or plain `torch.save`).
    pub ckpt: PathBuf,
    /// Run directory to write into (created if missing).
    pub out: PathBuf,
    /// Checkpoint name (default: `step=<global_step>-epoch=<epoch>`, or `converted`).
    #[arg(long)]
    pub name: Option<String>,
    /// Convert the model weights only, not optimizer or scheduler state.
    #[arg(long)]
    pub weights_only: bool,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

/// Validated options of `relume lightning convert`.
#[derive(Debug, Clone)]
pub struct ConvertOpts {
    /// Source file.
    pub ckpt: PathBuf,
    /// Run directory.
    pub out: PathBuf,
    /// Checkpoint name, if given.
    pub name: Option<String>,
    /// Model only.
    pub weights_only: bool,
    /// JSON output.
    pub json: bool,
}

impl ConvertArgs {
    /// Checks the source exists, the name is valid and `OUT/model.safetensors` is free.
    ///
    /// # Errors
    /// A [`UsageError`] naming the problem.
    pub fn validate(self) -> anyhow::Result<ConvertOpts> {
        if !self.ckpt.is_file() {
            bail!(UsageError(format!("{}: no such file", self.ckpt.display())));
        }
        if let Some(n) = &self.name {
            check_name(n).map_err(|e| UsageError(format!("--name: {e}")))?;
        }
        let weights = self.out.join(WEIGHTS_FILE);
        if weights.exists() {
            bail!(UsageError(format!(
                "{}: already exists; choose another OUT",
                weights.display()
            )));
        }
        Ok(ConvertOpts {
            ckpt: self.ckpt,
            out: self.out,
            name: self.name,
            weights_only: self.weights_only,
            json: self.json,
        })
    }
}

/// True for `state_dict` entries that are buffers, not parameters.
fn is_buffer(name: &str, t: &TorchTensor) -> bool {
    const BUFFERS: [&str; 3] = ["running_mean", "running_var", "num_batches_tracked"];
    let float = t.dtype.to_relume().is_some_and(|d| {
        matches!(
            d,
            relume_ckpt::DType::F32
                | relume_ckpt::DType::F64
                | relume_ckpt::DType::F16
                | relume_ckpt::DType::BF16
        )
    });
    !float || BUFFERS.iter().any(|b| name.ends_with(b))
}

/// The `model` component.
fn model_component(weights: &[(String, &TorchTensor)]) -> anyhow::Result<StateDict> {
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

/// Optimizer `i` with its state keyed by parameter name.
fn optimizer_component(
    i: usize,
    o: &relume_ckpt::lightning::OptimizerSummary<'_>,
    params: &[(String, &TorchTensor)],
) -> anyhow::Result<(StateDict, usize)> {
    let indices: Vec<i64> = o
        .param_groups
        .iter()
        .flat_map(|g| g.params.iter().copied())
        .collect();
    if indices.len() != params.len() {
        bail!(
            "optimizer {i} ({}) has {} parameters in its param groups but the state_dict has {} parameters (buffers excluded); the index-to-name mapping would be wrong (tied or excluded parameters?). Use --weights-only to convert the model alone",
            o.kind.name(),
            indices.len(),
            params.len()
        );
    }
    let name_of = |idx: &str| -> anyhow::Result<&(String, &TorchTensor)> {
        idx.parse::<usize>()
            .ok()
            .and_then(|k| params.get(k))
            .with_context(|| {
                format!("optimizer {i}: state for parameter index {idx:?}, which has no parameter")
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
        let (name, param) = name_of(idx)?;
        mapped += 1;
        for (key, v) in entries {
            let full = format!("{name}/{key}");
            if key == "step" {
                sd.insert_json(full, step_json(v));
            } else if let Some(t) = v.as_tensor() {
                if t.shape != param.shape && t.numel() != 1 {
                    bail!(
                        "optimizer {i}: state {key:?} of parameter index {idx} has shape {:?} but {name:?} has {:?}; the optimizer's parameter order differs from the state_dict order. Use --weights-only",
                        t.shape,
                        param.shape
                    );
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

/// Copies `src` to `dst` durably: a temporary in `dst`'s directory, fsync, rename,
/// fsync of the directory. The bytes are streamed through a small buffer, so memory
/// does not grow with the file.
fn copy_durable(src: &Path, dst: &Path) -> anyhow::Result<()> {
    let dir = dst.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".tmp-{WEIGHTS_FILE}-{}", std::process::id()));
    let mut from = std::fs::File::open(src).with_context(|| format!("open {}", src.display()))?;
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    std::io::copy(&mut from, &mut f)
        .with_context(|| format!("copy {} to {}", src.display(), tmp.display()))?;
    f.sync_all()
        .with_context(|| format!("fsync {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, dst)
        .with_context(|| format!("rename {} to {}", tmp.display(), dst.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync directory {}", dir.display()))
}

#[derive(Debug, Serialize)]
struct Outcome {
    source: PathBuf,
    checkpoint: PathBuf,
    weights: PathBuf,
    components: BTreeMap<String, usize>,
    optimizer_params_mapped: Vec<usize>,
    verification: Checked,
}

/// Runs `relume lightning convert`.
///
/// # Errors
/// When the file cannot be read (it names the file), a tensor has a dtype relume
/// does not store (int8, int16), the optimizer mapping is inconsistent, or the
/// output cannot be written.
pub fn run(opts: &ConvertOpts) -> anyhow::Result<Status> {
    let l = LightningCheckpoint::open(&opts.ckpt)
        .with_context(|| format!("cannot read Lightning checkpoint {}", opts.ckpt.display()))?;
    let weights = l.state_dict();
    if weights.is_empty() {
        bail!("{}: no state_dict tensors to convert", opts.ckpt.display());
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
        "converted_from": opts.ckpt.display().to_string(),
        "lightning_version": l.lightning_version(),
        "hyper_parameters": l.hyper_parameters().map(PyValue::to_json),
        "weights_only": opts.weights_only,
    });
    let name = match (&opts.name, l.global_step(), l.epoch()) {
        (Some(n), _, _) => n.clone(),
        (None, Some(s), Some(e)) if s >= 0 && e >= 0 => format!("step={s:06}-epoch={e}"),
        _ => "converted".to_string(),
    };
    let dir = CheckpointDir::open(&opts.out)?;
    let path = dir.save(&name, &ckpt)?;
    let components = ckpt
        .components
        .iter()
        .map(|(k, v)| (k.clone(), v.len()))
        .collect();
    // Unmap the source before verifying: the verifier maps the written files, and the
    // source's pages touched while writing need not stay resident beside them.
    drop(ckpt);
    drop(weights);
    drop(l);
    let weights_path = opts.out.join(WEIGHTS_FILE);
    copy_durable(&path.join(WEIGHTS_FILE), &weights_path)?;
    let verification = check(&path);
    let ok = verification.ok;
    let outcome = Outcome {
        source: opts.ckpt.clone(),
        checkpoint: path,
        weights: weights_path,
        components,
        optimizer_params_mapped: mapped,
        verification,
    };
    if opts.json {
        print_json(&outcome)?;
    } else {
        println!(
            "converted {} -> {}",
            outcome.source.display(),
            outcome.checkpoint.display()
        );
        for (c, n) in &outcome.components {
            println!("  {c}: {n} entries");
        }
        for (i, n) in outcome.optimizer_params_mapped.iter().enumerate() {
            println!("  optimizer.{i}: state of {n} parameters keyed by name (state_dict order)");
        }
        println!("weights for Python: {}", outcome.weights.display());
        println!(
            "verified: {}",
            if ok {
                "ok"
            } else {
                "FAILED (run relume verify)"
            }
        );
    }
    Ok(Status::problems_if(!ok))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use relume_ckpt::lightning::{OptimizerSummary, TorchDType};

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
            format!("{err:#}")
                .contains("2 parameters in its param groups but the state_dict has 1"),
            "{err:#}"
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
            format!("{err:#}").contains("parameter order differs"),
            "{err:#}"
        );
    }
}
