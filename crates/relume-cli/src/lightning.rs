//! `relume lightning inspect X.ckpt [--json]`: what is in a PyTorch Lightning checkpoint,
//! and could Lightning resume from it?
//!
//! The file is read with relume-lightning's restricted pickle reader: nothing in it is
//! executed. The verdict is Lightning's: relume itself can take the weights and
//! optimizer state (`relume lightning convert`) but never an exact resume, since the
//! file has no relume RNG, data cursor or loop state. Exit codes: 0 when Lightning can
//! resume training from the checkpoint, 1 when the diagnosis
//! has a blocker (weights only, not a Lightning file), and an error (2 in `main`) when
//! the file cannot be read.

use std::path::PathBuf;

use anyhow::Context;
use relume_lightning::{LightningCheckpoint, LoopProgress, PyValue, Severity};
use serde_json::{json, Value};

/// `relume lightning ...` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum LightningCommand {
    /// Show what a Lightning `.ckpt` holds and whether Lightning can resume from it.
    ///
    /// Example: `relume lightning inspect epoch=3-step=120.ckpt --json`
    Inspect(InspectArgs),
}

/// Arguments of `relume lightning inspect`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// The `.ckpt` file (a PyTorch zip checkpoint, Lightning or plain `torch.save`).
    pub path: PathBuf,
    /// Print machine-readable JSON instead of tables (default: tables).
    #[arg(long)]
    pub json: bool,
}

/// The verdict on a file Lightning can resume: relume, converting it, gets weights and
/// optimizer state but none of the state an exact resume needs.
pub const RESUMABLE_VERDICT: &str = "Lightning can resume this (full training state: optimizers, schedulers, loops); relume can take its weights and optimizer state but not an exact resume (no RNG, data cursor, loop state)";

/// The verdict on a file with a blocker (weights only, not a Lightning file).
pub const NOT_RESUMABLE_VERDICT: &str =
    "Lightning CANNOT resume this; relume can take its weights only";

/// Runs a `relume lightning` subcommand and returns its exit code.
///
/// # Errors
/// As [`run_inspect`].
pub fn run(cmd: &LightningCommand) -> anyhow::Result<i32> {
    match cmd {
        LightningCommand::Inspect(args) => run_inspect(args),
    }
}

/// `relume lightning inspect`: prints the report and returns 0 if Lightning can resume
/// from the checkpoint, 1 if the diagnosis has a blocker.
///
/// # Errors
/// When the file cannot be opened or decoded (I/O, not a zip, truncated, malformed or
/// hostile pickle); the error names the file.
pub fn run_inspect(args: &InspectArgs) -> anyhow::Result<i32> {
    let ckpt = LightningCheckpoint::open(&args.path)
        .with_context(|| format!("cannot read Lightning checkpoint {}", args.path.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report_json(&ckpt))?);
    } else {
        print!("{}", report_text(&ckpt));
    }
    Ok(if ckpt.is_resumable() { 0 } else { 1 })
}

fn kind_label(ckpt: &LightningCheckpoint) -> &'static str {
    use relume_lightning::CheckpointKind as K;
    match ckpt.kind() {
        K::Full => "Lightning checkpoint (full training state)",
        K::WeightsOnly => "Lightning checkpoint (weights only)",
        K::PlainStateDict => "plain torch.save(state_dict) (weights only)",
        K::Other => "torch checkpoint without Lightning keys",
    }
}

fn progress_json(p: &LoopProgress) -> Value {
    json!({
        "epochs_completed": p.epochs_completed,
        "epochs_started": p.epochs_started,
        "batches_in_epoch": p.batches_in_epoch,
        "batches_total": p.batches_total,
        "is_last_batch": p.is_last_batch,
        "optimizer_steps": p.optimizer_steps,
        "loader_state_saved": p.loader_state_saved,
        "mid_epoch": p.is_mid_epoch(),
    })
}

fn settings_json(settings: &[(String, &PyValue)]) -> Value {
    Value::Object(
        settings
            .iter()
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect(),
    )
}

/// The `--json` report: every section of the human report, as data.
pub fn report_json(ckpt: &LightningCheckpoint) -> Value {
    let tensors: Vec<Value> = ckpt
        .state_dict()
        .iter()
        .map(|(name, t)| {
            json!({ "name": name, "dtype": t.dtype.torch_name(), "shape": t.shape, "bytes": t.nbytes() })
        })
        .collect();
    let optimizers: Vec<Value> = ckpt
        .optimizers()
        .iter()
        .map(|o| {
            json!({
                "type": o.kind.name(),
                "param_groups": o.param_groups.iter().map(|g| json!({
                    "params": g.params,
                    "settings": settings_json(&g.settings),
                })).collect::<Vec<_>>(),
                "state_params": o.state.len(),
                "state_tensors": o.state_tensors().len(),
            })
        })
        .collect();
    let schedulers: Vec<Value> = ckpt
        .lr_schedulers()
        .iter()
        .map(|s| {
            json!({
                "type": s.kind,
                "last_epoch": s.last_epoch,
                "last_lr": s.last_lr,
                "settings": settings_json(&s.settings),
            })
        })
        .collect();
    let callbacks: Vec<Value> = ckpt
        .callbacks()
        .iter()
        .map(
            |c| json!({ "key": c.key, "name": c.name, "highlights": settings_json(&c.highlights) }),
        )
        .collect();
    let findings: Vec<Value> = ckpt
        .diagnose()
        .iter()
        .map(|f| json!({ "severity": f.severity.label(), "code": f.code, "message": f.message }))
        .collect();
    json!({
        "file": ckpt.path().display().to_string(),
        "kind": kind_label(ckpt),
        "lightning_version": ckpt.lightning_version(),
        "format_version": ckpt.format_version(),
        "epoch": ckpt.epoch(),
        "global_step": ckpt.global_step(),
        "loop_progress": ckpt.loop_progress().as_ref().map(progress_json),
        "tensors": tensors,
        "optimizers": optimizers,
        "lr_schedulers": schedulers,
        "callbacks": callbacks,
        "hyper_parameters": ckpt.hyper_parameters().map(PyValue::to_json),
        "resumable": ckpt.is_resumable(),
        "findings": findings,
    })
}

/// A short one-cell rendering of a value.
fn short(v: &PyValue) -> String {
    match v {
        PyValue::None => "None".into(),
        PyValue::Bool(b) => if *b { "True" } else { "False" }.into(),
        PyValue::Int(i) => i.to_string(),
        PyValue::BigInt(s) => s.clone(),
        PyValue::Float(f) => format!("{f:?}"),
        PyValue::Str(s) if s.is_empty() => "''".into(),
        PyValue::Str(s) => s.clone(),
        PyValue::Tensor(t) => match t.scalar_f64() {
            Some(x) if t.shape.is_empty() => format!("{x:?}"),
            _ => format!("tensor {} {:?}", t.dtype, t.shape),
        },
        PyValue::List(items) | PyValue::Tuple(items) if items.len() <= 8 => {
            let inner: Vec<String> = items.iter().map(short).collect();
            format!("[{}]", inner.join(", "))
        }
        PyValue::List(items) | PyValue::Tuple(items) => format!("[{} items]", items.len()),
        PyValue::Dict(items) => format!("{{{} keys}}", items.len()),
        other => other.type_name(),
    }
}

/// Renders rows as left-aligned columns, each line indented by `indent`.
fn table(rows: &[Vec<String>], indent: &str) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::from(indent);
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn kv(settings: &[(String, &PyValue)]) -> Vec<Vec<String>> {
    settings
        .iter()
        .map(|(k, v)| vec![k.clone(), short(v)])
        .collect()
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

/// The human report: aligned tables, one section per part of the checkpoint.
pub fn report_text(ckpt: &LightningCheckpoint) -> String {
    let mut out = String::new();
    let mut head = vec![
        vec!["file".into(), ckpt.path().display().to_string()],
        vec!["kind".into(), kind_label(ckpt).into()],
        vec!["lightning".into(), opt(ckpt.lightning_version())],
        vec!["torch format".into(), opt(ckpt.format_version())],
        vec!["epoch".into(), opt(ckpt.epoch())],
        vec!["global_step".into(), opt(ckpt.global_step())],
    ];
    if let Some(p) = ckpt.loop_progress() {
        head.push(vec![
            "loop progress".into(),
            format!(
                "{} epoch(s) completed, {} started; {} batch(es) into the epoch (last batch: {}); {} batches, {} optimizer steps in total",
                p.epochs_completed,
                p.epochs_started,
                p.batches_in_epoch,
                if p.is_last_batch { "yes" } else { "no" },
                p.batches_total,
                p.optimizer_steps
            ),
        ]);
        head.push(vec![
            "mid-epoch".into(),
            if p.is_mid_epoch() { "yes" } else { "no" }.into(),
        ]);
    }
    out.push_str(&table(&head, ""));

    let sd = ckpt.state_dict();
    let total: u64 = sd.iter().map(|(_, t)| t.nbytes()).sum();
    out.push_str(&format!(
        "\nstate_dict: {} tensor(s), {total} bytes\n",
        sd.len()
    ));
    let mut rows = vec![vec![
        "name".into(),
        "dtype".into(),
        "shape".into(),
        "bytes".into(),
    ]];
    rows.extend(sd.iter().map(|(n, t)| {
        vec![
            n.clone(),
            t.dtype.to_string(),
            format!("{:?}", t.shape),
            t.nbytes().to_string(),
        ]
    }));
    out.push_str(&table(&rows, "  "));

    let opts = ckpt.optimizers();
    out.push_str(&format!("\noptimizers: {}\n", opts.len()));
    for (i, o) in opts.iter().enumerate() {
        out.push_str(&format!(
            "  #{i} {}: {} param group(s), state for {} parameter(s), {} state tensor(s)\n",
            o.kind.name(),
            o.param_groups.len(),
            o.state.len(),
            o.state_tensors().len()
        ));
        for (g, group) in o.param_groups.iter().enumerate() {
            out.push_str(&format!("    group {g}: params {:?}\n", group.params));
            out.push_str(&table(&kv(&group.settings), "      "));
        }
    }

    let scheds = ckpt.lr_schedulers();
    out.push_str(&format!("\nlr_schedulers: {}\n", scheds.len()));
    for (i, s) in scheds.iter().enumerate() {
        out.push_str(&format!(
            "  #{i} {}: last_epoch {}, last_lr {:?}\n",
            s.kind,
            opt(s.last_epoch),
            s.last_lr
        ));
        out.push_str(&table(&kv(&s.settings), "      "));
    }

    let cbs = ckpt.callbacks();
    out.push_str(&format!("\ncallbacks: {}\n", cbs.len()));
    for c in &cbs {
        out.push_str(&format!("  {}\n", c.key));
        out.push_str(&table(&kv(&c.highlights), "      "));
    }

    if let Some(hp) = ckpt.hyper_parameters() {
        out.push_str("\nhyper_parameters\n");
        let rows: Vec<Vec<String>> = hp
            .dict_items()
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| vec![k.key_label(), short(v)])
            .collect();
        out.push_str(&table(&rows, "  "));
    }

    let findings = ckpt.diagnose();
    out.push_str(&format!(
        "\nresumability: {}\n",
        if ckpt.is_resumable() {
            RESUMABLE_VERDICT
        } else {
            NOT_RESUMABLE_VERDICT
        }
    ));
    let rows: Vec<Vec<String>> = findings
        .iter()
        .map(|f| {
            let mark = match f.severity {
                Severity::Blocker => "✗",
                Severity::Warning => "!",
                Severity::Info => "✓",
            };
            vec![
                format!("{mark} {}", f.severity.label()),
                f.code.into(),
                f.message.clone(),
            ]
        })
        .collect();
    out.push_str(&table(&rows, "  "));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../relume-lightning/tests/data/lightning")
            .join(name)
    }

    #[test]
    fn human_report_has_every_section_aligned() {
        let ckpt = LightningCheckpoint::open(fixture("sgd_cosine_mid_epoch.ckpt")).unwrap();
        let text = report_text(&ckpt);
        for needle in [
            "lightning      2.6.6",
            "global_step    7",
            "mid-epoch      yes",
            "body.0.weight  float32  [32, 16]  2048",
            "#0 SGD",
            "#0 CosineAnnealingLR",
            "best_model_path",
            "hyper_parameters",
            "! warning  mid-epoch",
            "resumability: Lightning can resume this (",
            "relume can take its weights and optimizer state but not an exact resume (no RNG, data cursor, loop state)",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn json_report_and_exit_codes() {
        let ckpt = LightningCheckpoint::open(fixture("adam_steplr_epoch_end.ckpt")).unwrap();
        let j = report_json(&ckpt);
        assert_eq!(j["epoch"], 1);
        assert_eq!(j["optimizers"][0]["type"], "Adam");
        assert_eq!(j["tensors"].as_array().unwrap().len(), 4);
        assert_eq!(j["resumable"], true);
        let args = |name: &str| InspectArgs {
            path: fixture(name),
            json: true,
        };
        assert_eq!(run_inspect(&args("adam_steplr_epoch_end.ckpt")).unwrap(), 0);
        assert_eq!(run_inspect(&args("weights_only.ckpt")).unwrap(), 1);
        let err = run_inspect(&args("truncated.ckpt")).unwrap_err();
        assert!(format!("{err:#}").contains("truncated"), "{err:#}");
    }

    #[test]
    fn weights_only_verdict_has_no_rng_noise() {
        let ckpt = LightningCheckpoint::open(fixture("weights_only.ckpt")).unwrap();
        let text = report_text(&ckpt);
        assert!(text.contains(NOT_RESUMABLE_VERDICT), "{text}");
        assert!(!text.contains("no-rng-state"), "{text}");
        assert!(!text.contains("can resume"), "{text}");
    }
}
