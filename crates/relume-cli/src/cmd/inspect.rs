//! `relume inspect CKPT`: what a checkpoint holds and whether it can resume.
//!
//! The checkpoint is read with [`relume_ckpt::load`], so every checksum is
//! verified first; a checkpoint of an older format is read through its version's
//! reader ([`relume_ckpt::migrate::read_any`]) and flagged for `relume migrate`.
//!
//! The resumable verdict lists what the trainer's strict restore needs: `model`,
//! one `optimizer.<i>` per optimizer and one `scheduler.<i>` per configured
//! scheduler (counts from `config.optimizers` / `config.schedulers`; without them
//! at least one optimizer), `rng`, `train_loader` and `loop`. Callback and logger
//! state is listed for each callback the `loop` component names; a stateless
//! callback stores nothing, so its absence does not block resuming. Exit status 1
//! when the checkpoint cannot resume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use relume_ckpt::migrate::{detect_version, read_any};
use relume_ckpt::{CheckpointDir, StateDict, FORMAT_VERSION};
use serde::Serialize;
use serde_json::{json, Value};

use super::ls::resolve_run_dir;
use super::{compact, is_checkpoint, print_json, Status, UsageError};
use crate::decode::{decode_leaf, display};
use crate::table::{ellipsize, human_bytes, Table};

/// Arguments of `relume inspect`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  relume inspect runs/digits/checkpoints/step=000120-epoch=2\n  relume inspect runs/digits        # the checkpoint `latest` names\n  relume inspect runs/digits --json\n\nNumbers are shown as numbers. state.json stores some floats in an exact encoding\n(the loop's metric aggregation as u64 bit patterns, scheduler rates as decimal\nstrings); they are decoded for display. With --json each component's `json`\nholds the decoded values (NaN and infinities as the strings \"NaN\", \"inf\",\n\"-inf\") and its `exact` object maps `KEY/PATH` to the bit pattern of each float\ndecoded, e.g. \"metrics/latest/train_loss\": \"0x3ed7b6...\".\n\nExit status 1 when the checkpoint cannot resume training (the verdict names what\nis missing) or is damaged."
)]
pub struct InspectArgs {
    /// A checkpoint directory, or a run directory (inspects its `latest`).
    pub ckpt: PathBuf,
    /// Print machine-readable JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Validated options of `relume inspect`.
#[derive(Debug, Clone)]
pub struct InspectOpts {
    /// The checkpoint directory.
    pub ckpt: PathBuf,
    /// JSON output.
    pub json: bool,
}

impl InspectArgs {
    /// Resolves the checkpoint (a run directory means its `latest`).
    ///
    /// # Errors
    /// A [`UsageError`] when the path is neither a checkpoint nor a run directory
    /// with a committed `latest`.
    pub fn validate(self) -> anyhow::Result<InspectOpts> {
        Ok(InspectOpts {
            ckpt: resolve_checkpoint(&self.ckpt)?,
            json: self.json,
        })
    }
}

/// `path` if it is a checkpoint, else the checkpoint `latest` names in run
/// directory `path`.
///
/// # Errors
/// A [`UsageError`] when it is neither; the library error for a dangling `latest`.
pub fn resolve_checkpoint(path: &Path) -> anyhow::Result<PathBuf> {
    if is_checkpoint(path) {
        return Ok(path.to_path_buf());
    }
    if let Ok(run) = resolve_run_dir(path) {
        let dir = CheckpointDir::open_read_only(&run)?;
        return match dir.latest()? {
            Some(p) => Ok(p),
            None => bail!(UsageError(format!(
                "{}: run directory has no committed checkpoint",
                path.display()
            ))),
        };
    }
    super::require_checkpoint(path)?;
    Ok(path.to_path_buf())
}

/// A checkpoint read for inspection, of any supported format version.
#[derive(Debug)]
pub struct Read {
    /// Format version found on disk.
    pub format_version: u64,
    /// The manifest's logical fields (as stored for old versions).
    pub header: Value,
    /// The components.
    pub components: BTreeMap<String, StateDict>,
}

/// Reads and verifies a checkpoint of any supported version.
///
/// # Errors
/// The library's error (damage, unsupported version, I/O).
pub fn read(path: &Path) -> anyhow::Result<Read> {
    // An object store only ever holds the current format (it cannot be migrated in
    // place there).
    let version = if relume_ckpt::is_remote(path) {
        FORMAT_VERSION
    } else {
        detect_version(path)?
    };
    if version == FORMAT_VERSION {
        let l = relume_ckpt::load(path)?;
        let m = &l.manifest;
        let header = json!({
            "relume_version": m.relume_version,
            "created_at": m.created_at,
            "progress": m.progress,
            "config": m.config,
            "metrics": m.metrics.iter().map(|(k, v)| (k.clone(), json_f64(*v))).collect::<serde_json::Map<_, _>>(),
            "fingerprint": m.fingerprint,
            "files": m.files.len() + 1,
            // Every file, the manifest included, as `ls` and `verify` count.
            "bytes": m.total_bytes() + super::ls::manifest_bytes(path),
        });
        return Ok(Read {
            format_version: version,
            header,
            components: l.components,
        });
    }
    let (v, m) = read_any(path)?;
    let h = &m.manifest;
    let pick = |a: &str, b: &str| {
        h.get(a)
            .or_else(|| h.get(b))
            .cloned()
            .unwrap_or(Value::Null)
    };
    Ok(Read {
        format_version: v,
        header: json!({
            "relume_version": pick("relume_version", "relume"),
            "created_at": pick("created_at", "timestamp"),
            "progress": pick("progress", "progress"),
            "config": pick("config", "config"),
            "metrics": pick("metrics", "metrics"),
        }),
        components: m.components,
    })
}

fn json_f64(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::String(x.to_string())
    }
}

/// One item a full resume needs (or uses).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Need {
    /// Component (or `callbacks/<key>`).
    pub item: String,
    /// Whether resuming fails without it.
    pub required: bool,
    /// Whether the checkpoint holds it.
    pub present: bool,
    /// Why it is needed, or what its absence means.
    pub note: String,
}

fn need(item: impl Into<String>, required: bool, present: bool, note: impl Into<String>) -> Need {
    Need {
        item: item.into(),
        required,
        present,
        note: note.into(),
    }
}

/// The resumable verdict's items for `components` under `config`.
pub fn resume_needs(components: &BTreeMap<String, StateDict>, config: &Value) -> Vec<Need> {
    let has = |c: &str| components.contains_key(c);
    let mut out = vec![need("model", true, has("model"), "parameters")];
    match config.get("optimizers").and_then(Value::as_array) {
        Some(opts) => {
            for i in 0..opts.len() {
                let c = format!("optimizer.{i}");
                out.push(need(
                    &c,
                    true,
                    has(&c),
                    format!("optimizer {i} of {} in config", opts.len()),
                ));
            }
        }
        None => {
            let found: Vec<&String> = components
                .keys()
                .filter(|k| *k == "optimizer" || k.starts_with("optimizer."))
                .collect();
            if found.is_empty() {
                out.push(need(
                    "optimizer.0",
                    true,
                    false,
                    "no optimizer state (weights only?)",
                ));
            }
            for c in found {
                out.push(need(c, true, true, "optimizer state (count not in config)"));
            }
        }
    }
    if let Some(scheds) = config.get("schedulers").and_then(Value::as_array) {
        for (i, s) in scheds.iter().enumerate() {
            if !s.is_null() {
                let c = format!("scheduler.{i}");
                out.push(need(
                    &c,
                    true,
                    has(&c),
                    format!("scheduler of optimizer {i} in config"),
                ));
            }
        }
    } else {
        for c in components
            .keys()
            .filter(|k| *k == "scheduler" || k.starts_with("scheduler."))
        {
            out.push(need(c, true, true, "scheduler state (not in config)"));
        }
    }
    out.push(need(
        "rng",
        true,
        has("rng"),
        "RNG streams (dropout, shuffling)",
    ));
    out.push(need(
        "train_loader",
        true,
        has("train_loader"),
        "data cursor: epoch, position, shuffle seed",
    ));
    out.push(need(
        "loop",
        true,
        has("loop"),
        "step and epoch counters, logger step, callbacks that took part",
    ));
    let listed = |field: &str| -> Vec<String> {
        components
            .get("loop")
            .and_then(|l| l.get_json(field))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    for (group, field) in [("callbacks", "callbacks"), ("loggers", "loggers")] {
        let state = components.get(group);
        for key in listed(field) {
            let present = state.is_some_and(|s| !s.sub(&key).is_empty());
            let note = if present {
                "state saved"
            } else {
                "no state saved (fine if it is stateless)"
            };
            out.push(need(format!("{group}/{key}"), false, present, note));
        }
    }
    out
}

/// Inspection report (the JSON output).
#[derive(Debug, Serialize)]
struct Report {
    path: PathBuf,
    format_version: u64,
    current_format_version: u64,
    header: Value,
    components: BTreeMap<String, ComponentReport>,
    totals: Totals,
    resumable: bool,
    needs: Vec<Need>,
    notes: Vec<String>,
}

#[derive(Debug, Serialize)]
struct TensorRow {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    bytes: u64,
}

#[derive(Debug, Serialize)]
struct ComponentReport {
    tensors: Vec<TensorRow>,
    tensor_bytes: u64,
    /// JSON leaves, exactly-encoded floats decoded to numbers.
    json: BTreeMap<String, Value>,
    /// `KEY/PATH` → bit pattern of each float decoded in `json`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    exact: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
struct Totals {
    components: usize,
    tensors: usize,
    tensor_bytes: u64,
    json_leaves: usize,
}

fn build(path: &Path, r: Read) -> Report {
    let mut components = BTreeMap::new();
    let mut totals = Totals {
        components: r.components.len(),
        tensors: 0,
        tensor_bytes: 0,
        json_leaves: 0,
    };
    for (name, sd) in &r.components {
        let tensors: Vec<TensorRow> = sd
            .tensors()
            .map(|(k, t)| TensorRow {
                name: k.to_string(),
                dtype: t.dtype().to_string(),
                shape: t.shape().to_vec(),
                bytes: t.bytes().len() as u64,
            })
            .collect();
        let mut json = BTreeMap::new();
        let mut exact = BTreeMap::new();
        for (k, v) in sd.json_leaves() {
            let d = decode_leaf(name, k, v);
            json.insert(k.to_string(), d.value);
            exact.extend(d.exact);
        }
        totals.tensors += tensors.len();
        totals.tensor_bytes += sd.tensor_bytes();
        totals.json_leaves += json.len();
        components.insert(
            name.clone(),
            ComponentReport {
                tensor_bytes: sd.tensor_bytes(),
                tensors,
                json,
                exact,
            },
        );
    }
    let config = r.header.get("config").cloned().unwrap_or(Value::Null);
    let needs = resume_needs(&r.components, &config);
    let mut notes = Vec::new();
    let mut resumable = needs.iter().all(|n| n.present || !n.required);
    if r.format_version < FORMAT_VERSION {
        resumable = false;
        notes.push(format!(
            "format v{} is older than v{FORMAT_VERSION}: run `relume migrate {}` before resuming",
            r.format_version,
            path.display()
        ));
    }
    let finished = r
        .components
        .get("loop")
        .and_then(|l| l.get_json("finished"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if finished {
        notes.push("the run had finished: resuming trains nothing more unless max_epochs or max_steps is raised".into());
    }
    Report {
        path: path.to_path_buf(),
        format_version: r.format_version,
        current_format_version: FORMAT_VERSION,
        header: r.header,
        components,
        totals,
        resumable,
        needs,
        notes,
    }
}

fn render(r: &Report) -> String {
    let h = &r.header;
    let s = |k: &str| {
        h.get(k)
            .map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| compact(v)))
            .unwrap_or_default()
    };
    let mut out = format!("checkpoint   {}\n", r.path.display());
    out.push_str(&format!(
        "format       v{} (current v{}), written by relume {}\n",
        r.format_version,
        r.current_format_version,
        s("relume_version")
    ));
    out.push_str(&format!("created      {}\n", s("created_at")));
    out.push_str(&format!("progress     {}\n", s("progress")));
    if let Some(m) = h
        .get("metrics")
        .and_then(Value::as_object)
        .filter(|m| !m.is_empty())
    {
        let parts: Vec<String> = m
            .iter()
            .map(|(k, v)| format!("{k}={}", display(v)))
            .collect();
        out.push_str(&format!("metrics      {}\n", parts.join(" ")));
    }
    if h.get("fingerprint").is_some() {
        out.push_str(&format!("fingerprint  {}\n", s("fingerprint")));
    }
    if let (Some(f), Some(b)) = (h.get("files"), h.get("bytes").and_then(Value::as_u64)) {
        out.push_str(&format!(
            "files        {f} incl. the manifest, {} in all, every checksum verified\n",
            human_bytes(b)
        ));
    }
    let config = h.get("config").cloned().unwrap_or(Value::Null);
    let pretty = serde_json::to_string_pretty(&config).unwrap_or_default();
    out.push_str("config\n");
    for line in pretty.lines() {
        out.push_str(&format!("  {line}\n"));
    }
    for (name, c) in &r.components {
        out.push_str(&format!(
            "\ncomponent {name}: {} tensor{}, {}; {} JSON lea{}\n",
            c.tensors.len(),
            if c.tensors.len() == 1 { "" } else { "s" },
            human_bytes(c.tensor_bytes),
            c.json.len(),
            if c.json.len() == 1 { "f" } else { "ves" },
        ));
        if !c.tensors.is_empty() {
            let mut t = Table::new(["  TENSOR", "DTYPE", "SHAPE", "BYTES"]).right(&[3]);
            for row in &c.tensors {
                t.row([
                    format!("  {}", row.name),
                    row.dtype.clone(),
                    format!("{:?}", row.shape),
                    row.bytes.to_string(),
                ]);
            }
            out.push_str(&t.render());
        }
        if !c.json.is_empty() {
            let mut t = Table::new(["  KEY", "VALUE"]);
            for (k, v) in &c.json {
                t.row([format!("  {k}"), ellipsize(&display(v), 100)]);
            }
            out.push_str(&t.render());
        }
    }
    out.push_str(&format!(
        "\ntotals: {} components, {} tensors ({}), {} JSON leaves\n",
        r.totals.components,
        r.totals.tensors,
        human_bytes(r.totals.tensor_bytes),
        r.totals.json_leaves
    ));
    out.push_str(&format!(
        "\nresumable: {}\n",
        if r.resumable { "yes" } else { "NO" }
    ));
    let mut t = Table::new(["  NEEDS", "STATUS", "WHAT"]);
    for n in &r.needs {
        let status = match (n.present, n.required) {
            (true, _) => "present",
            (false, true) => "MISSING",
            (false, false) => "absent",
        };
        t.row([format!("  {}", n.item), status.to_string(), n.note.clone()]);
    }
    out.push_str(&t.render());
    for n in &r.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out
}

/// Runs `relume inspect`.
///
/// # Errors
/// When the checkpoint cannot be read or is damaged.
pub fn run(opts: &InspectOpts) -> anyhow::Result<Status> {
    let read =
        read(&opts.ckpt).with_context(|| format!("cannot inspect {}", opts.ckpt.display()))?;
    let report = build(&opts.ckpt, read);
    if opts.json {
        print_json(&report)?;
    } else {
        print!("{}", render(&report));
    }
    Ok(Status::problems_if(!report.resumable))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comps(names: &[&str]) -> BTreeMap<String, StateDict> {
        names
            .iter()
            .map(|n| (n.to_string(), StateDict::new()))
            .collect()
    }

    fn missing(needs: &[Need]) -> Vec<&str> {
        needs
            .iter()
            .filter(|n| n.required && !n.present)
            .map(|n| n.item.as_str())
            .collect()
    }

    #[test]
    fn counts_come_from_config() {
        let cfg = json!({"optimizers": [{}, {}], "schedulers": [null, {"kind": "step"}]});
        let c = comps(&["model", "optimizer.0", "rng", "train_loader", "loop"]);
        assert_eq!(
            missing(&resume_needs(&c, &cfg)),
            ["optimizer.1", "scheduler.1"]
        );
    }

    #[test]
    fn weights_only_is_not_resumable() {
        let needs = resume_needs(&comps(&["model"]), &Value::Null);
        assert_eq!(
            missing(&needs),
            ["optimizer.0", "rng", "train_loader", "loop"]
        );
    }

    #[test]
    fn stateless_callbacks_do_not_block() {
        let mut c = comps(&["model", "optimizer", "rng", "train_loader"]);
        let mut lp = StateDict::new();
        lp.insert_json("callbacks", json!(["ProgressBar"]));
        c.insert("loop".into(), lp);
        let needs = resume_needs(&c, &Value::Null);
        assert!(missing(&needs).is_empty());
        let cb = needs
            .iter()
            .find(|n| n.item == "callbacks/ProgressBar")
            .unwrap();
        assert!(!cb.present && !cb.required);
    }
}
