//! `relume ls RUN_DIR`: the committed checkpoints of a run directory.
//!
//! Read-only: the directory is opened with
//! [`CheckpointDir::open_read_only`], which takes no lock and removes nothing, so
//! `ls` is safe beside a running trainer. Stale temporaries (`.tmp-*`, left by an
//! interrupted save) are shown as such. The `best` marker comes from a
//! ModelCheckpoint-style callback state (a JSON leaf `…best_model_path` in the
//! `callbacks` component of the newest checkpoint); without one no checkpoint is
//! marked best.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use relume_ckpt::commit::check_name;
use relume_ckpt::manifest::{Manifest, MANIFEST_FILE, STATE_FILE};
use relume_ckpt::{CheckpointDir, CheckpointInfo, Error as CkptError};
use serde::Serialize;
use serde_json::Value;

use super::{print_json, Status, UsageError};
use crate::table::{human_bytes, num, num_column, Table};

/// Arguments of `relume ls`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example:\n  relume ls runs/digits\n  relume ls runs/digits --json\n\nMarkers: `latest` is the checkpoint the `latest` pointer names; `best` the one a\nModelCheckpoint callback recorded as best_model_path. SIZE (JSON `bytes`) counts\nevery file of the checkpoint, manifest.json included, in binary units\n(1 KiB = 1024 B): the same count as `relume verify`'s BYTES. Metric columns\nshare their decimals so that they line up. Exit status 1 when the\n`latest` pointer is dangling or a checkpoint's manifest is unreadable."
)]
pub struct LsArgs {
    /// Run directory (the one holding `checkpoints/`), or its `checkpoints/` directory.
    pub run_dir: PathBuf,
    /// Print machine-readable JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Validated options of `relume ls`.
#[derive(Debug, Clone)]
pub struct LsOpts {
    /// The run directory (parent of `checkpoints/`).
    pub run_dir: PathBuf,
    /// JSON output.
    pub json: bool,
}

impl LsArgs {
    /// Resolves the run directory.
    ///
    /// # Errors
    /// A [`UsageError`] when the path does not exist or holds no `checkpoints/`.
    pub fn validate(self) -> anyhow::Result<LsOpts> {
        Ok(LsOpts {
            run_dir: resolve_run_dir(&self.run_dir)?,
            json: self.json,
        })
    }
}

/// `path` if it holds `checkpoints/`, its parent if `path` is a `checkpoints/`
/// directory itself.
///
/// # Errors
/// A [`UsageError`] when neither holds.
pub fn resolve_run_dir(path: &Path) -> anyhow::Result<PathBuf> {
    if relume_ckpt::is_remote(path) {
        // The store is asked when the run is opened, which names what is wrong.
        let s = path.to_string_lossy();
        let s = s.trim_end_matches('/');
        let run = s
            .strip_suffix(&format!("/{}", relume_ckpt::dir::CHECKPOINTS_DIR))
            .unwrap_or(s);
        return Ok(PathBuf::from(run));
    }
    if !path.exists() {
        bail!(UsageError(format!(
            "{}: no such file or directory",
            path.display()
        )));
    }
    if path.join(relume_ckpt::dir::CHECKPOINTS_DIR).is_dir() {
        return Ok(path.to_path_buf());
    }
    if path
        .file_name()
        .is_some_and(|n| n == relume_ckpt::dir::CHECKPOINTS_DIR)
    {
        if let Some(parent) = path.parent() {
            return Ok(parent.to_path_buf());
        }
    }
    bail!(UsageError(format!(
        "{}: not a run directory (no checkpoints/ inside)",
        path.display()
    )))
}

/// The best checkpoint as a ModelCheckpoint callback recorded it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Best {
    /// `best_model_path` as stored.
    pub path: String,
    /// `best_model_score`, when stored as a number.
    pub score: Option<f64>,
    /// The monitored metric, when stored.
    pub monitor: Option<String>,
    /// The callback's state key (prefix of the leaves), empty for a top-level leaf.
    pub callback: String,
}

/// Finds `best_model_path` in a `callbacks` component's JSON leaves (`{key: value}`):
/// either a leaf whose key ends in `best_model_path`, or an object leaf with a
/// `best_model_path` field. The first (by key) non-empty one wins.
pub fn find_best(callbacks: &serde_json::Map<String, Value>) -> Option<Best> {
    const FIELD: &str = "best_model_path";
    for (key, value) in callbacks {
        let (prefix, obj) = if key == FIELD || key.ends_with(&format!("/{FIELD}")) {
            (key[..key.len() - FIELD.len()].to_string(), None)
        } else if let Some(o) = value.as_object().filter(|o| o.contains_key(FIELD)) {
            (format!("{key}/"), Some(o))
        } else {
            continue;
        };
        let field = |name: &str| match obj {
            Some(o) => o.get(name).cloned(),
            None => callbacks.get(&format!("{prefix}{name}")).cloned(),
        };
        let Some(path) = field(FIELD).and_then(|v| v.as_str().map(str::to_string)) else {
            continue;
        };
        if path.is_empty() {
            continue;
        }
        return Some(Best {
            path,
            score: field("best_model_score").and_then(|v| v.as_f64()),
            monitor: field("monitor").and_then(|v| v.as_str().map(str::to_string)),
            callback: prefix.trim_end_matches('/').to_string(),
        });
    }
    find_relume_best(callbacks)
}

/// relume's own `ModelCheckpoint` state: `ModelCheckpoint{monitor=M,mode=min|max,...}/best_k`,
/// an object of checkpoint name → score. The best is the lowest score in `min` mode
/// and the highest in `max` mode; without a monitor the score is the step (`max`).
fn find_relume_best(callbacks: &serde_json::Map<String, Value>) -> Option<Best> {
    for (key, value) in callbacks {
        let Some(prefix) = key.strip_suffix("/best_k") else {
            continue;
        };
        if !prefix.starts_with("ModelCheckpoint{") {
            continue;
        }
        let setting = |name: &str| {
            prefix
                .trim_start_matches("ModelCheckpoint{")
                .trim_end_matches('}')
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .map(str::to_string)
        };
        let monitor = setting("monitor").filter(|m| m != "none");
        let max = monitor.is_none() || setting("mode").as_deref() == Some("max");
        let best = value
            .as_object()?
            .iter()
            .filter_map(|(name, v)| v.as_f64().filter(|x| !x.is_nan()).map(|x| (name, x)))
            .reduce(|a, b| {
                let better = if max { b.1 > a.1 } else { b.1 < a.1 };
                if better {
                    b
                } else {
                    a
                }
            });
        if let Some((name, score)) = best {
            return Some(Best {
                path: name.clone(),
                score: Some(score),
                monitor,
                callback: prefix.to_string(),
            });
        }
    }
    None
}

/// Reads the `callbacks` component of `ckpt`'s `state.json` (unverified: `ls`
/// does not hash files) and finds the best checkpoint in it. A checkpoint without
/// callback state has no best; an unreadable `state.json` is reported as a note.
fn best_from(ckpt: &Path) -> Result<Option<Best>, String> {
    let path = ckpt.join(STATE_FILE);
    let bytes = relume_ckpt::read_checkpoint_file(ckpt, STATE_FILE)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let state: Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{}: not JSON ({e}); run `relume verify`", path.display()))?;
    Ok(state
        .get("callbacks")
        .and_then(Value::as_object)
        .and_then(find_best))
}

/// The size of a checkpoint's manifest (0 when it cannot be read: the row's other
/// fields came from it a moment ago, and `verify` reports damage).
pub(crate) fn manifest_bytes(ckpt: &Path) -> u64 {
    if relume_ckpt::is_remote(ckpt) {
        return relume_ckpt::read_checkpoint_file(ckpt, MANIFEST_FILE)
            .map_or(0, |b| b.len() as u64);
    }
    std::fs::metadata(ckpt.join(MANIFEST_FILE)).map_or(0, |m| m.len())
}

/// One checkpoint row.
#[derive(Debug, Serialize)]
struct Row {
    name: String,
    path: PathBuf,
    step: Option<u64>,
    epoch: Option<u64>,
    metrics: BTreeMap<String, f64>,
    /// Bytes of every file of the checkpoint, `manifest.json` included.
    bytes: u64,
    created_at: String,
    latest: bool,
    best: bool,
}

/// A directory entry that is neither committed nor a temporary.
#[derive(Debug, Serialize)]
struct Other {
    name: String,
    reason: String,
    problem: bool,
}

/// The whole listing.
#[derive(Debug, Serialize)]
struct Listing {
    run_dir: PathBuf,
    checkpoints: Vec<Row>,
    latest: Option<String>,
    best: Option<Best>,
    temporaries: Vec<String>,
    other: Vec<Other>,
    notes: Vec<String>,
    problems: Vec<String>,
}

/// Entries of `checkpoints/` that look like checkpoints but were not listed.
fn others(dir: &Path, listed: &BTreeSet<&str>) -> anyhow::Result<Vec<Other>> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("read directory {}", dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("read directory {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if check_name(&name).is_err() || !e.path().is_dir() || listed.contains(name.as_str()) {
            continue;
        }
        let mpath = e.path().join(MANIFEST_FILE);
        let (reason, problem) = match std::fs::read(&mpath) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => (
                "no manifest.json: not a committed checkpoint".to_string(),
                false,
            ),
            Err(err) => (format!("cannot read manifest.json: {err}"), true),
            Ok(bytes) => match Manifest::parse(&mpath, &bytes) {
                Err(CkptError::OldFormatVersion { found, current, .. }) => (
                    format!("format v{found} (current v{current}): run `relume migrate`"),
                    false,
                ),
                Err(err) => (format!("unreadable manifest: {err}"), true),
                Ok(_) => continue,
            },
        };
        out.push(Other {
            name,
            reason,
            problem,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The note for a `latest` file that names something else than the newest committed
/// checkpoint (shared with `verify`).
pub(crate) fn pointer_note(pointer: Option<&str>, newest: &str) -> String {
    let said = match pointer {
        None => "is missing".to_string(),
        Some(p) => format!("names {p:?}"),
    };
    format!(
        "`latest` {said}, but the newest committed checkpoint is {newest}; resuming uses {newest} (the next training run rewrites `latest`)"
    )
}

fn build(opts: &LsOpts) -> anyhow::Result<Listing> {
    let dir = CheckpointDir::open_read_only(&opts.run_dir)?;
    let infos: Vec<CheckpointInfo> = dir.list()?;
    let mut problems = Vec::new();
    let latest = match dir.latest() {
        Ok(p) => p,
        Err(e @ CkptError::LatestDangling { .. }) => {
            problems.push(e.to_string());
            None
        }
        Err(e) => return Err(e.into()),
    };
    let latest_name = latest
        .as_ref()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned());
    let mut notes = Vec::new();
    // A remote run has no pointer to be behind: `latest` is resolved from markers.
    if let (Some(name), Ok(pointer), false) = (&latest_name, dir.latest_pointer(), dir.is_remote())
    {
        if pointer.as_deref() != Some(name.as_str()) {
            notes.push(pointer_note(pointer.as_deref(), name));
        }
    }
    // The newest checkpoint holds the newest callback state.
    let newest = latest
        .clone()
        .or_else(|| infos.last().map(|i| i.path.clone()));
    let best = match newest.as_deref().map(best_from) {
        Some(Ok(b)) => b,
        Some(Err(note)) => {
            notes.push(note);
            None
        }
        None => None,
    };
    let best_name = best.as_ref().and_then(|b| {
        let p = Path::new(b.path.trim_end_matches('/'));
        let n = p.file_name()?.to_string_lossy().into_owned();
        infos.iter().any(|i| i.name == n).then_some(n)
    });
    let temporaries = dir
        .temporaries()?
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let listed: BTreeSet<&str> = infos.iter().map(|i| i.name.as_str()).collect();
    // An object store holds no directories that are not checkpoints; uncommitted
    // attempts are the temporaries.
    let other = if dir.is_remote() {
        Vec::new()
    } else {
        others(dir.path(), &listed)?
    };
    problems.extend(
        other
            .iter()
            .filter(|o| o.problem)
            .map(|o| format!("{}: {}", o.name, o.reason)),
    );
    let checkpoints = infos
        .into_iter()
        .map(|i| Row {
            // As `verify` counts: every file, the manifest included. The manifest
            // was just read by `list`, so it is there to stat.
            bytes: i.bytes + manifest_bytes(&i.path),
            latest: latest_name.as_deref() == Some(i.name.as_str()),
            best: best_name.as_deref() == Some(i.name.as_str()),
            epoch: i.progress.get("epoch").and_then(Value::as_u64),
            name: i.name,
            path: i.path,
            step: i.step,
            metrics: i.metrics,
            created_at: i.created_at,
        })
        .collect();
    Ok(Listing {
        run_dir: opts.run_dir.clone(),
        checkpoints,
        latest: latest_name,
        best,
        temporaries,
        other,
        notes,
        problems,
    })
}

fn render(l: &Listing) -> String {
    let mut out = String::new();
    if l.checkpoints.is_empty() {
        out.push_str(&format!(
            "no committed checkpoints in {}\n",
            l.run_dir.join(relume_ckpt::dir::CHECKPOINTS_DIR).display()
        ));
    } else {
        let metric_names: BTreeSet<&str> = l
            .checkpoints
            .iter()
            .flat_map(|r| r.metrics.keys().map(String::as_str))
            .collect();
        let mut headers = vec!["", "NAME", "STEP", "EPOCH"];
        headers.extend(metric_names.iter().copied());
        headers.extend(["SIZE", "CREATED"]);
        let right: Vec<usize> = (2..headers.len() - 1).collect();
        let mut t = Table::new(headers).right(&right);
        // One format per metric column, so the decimal points line up.
        let columns: Vec<Vec<String>> = metric_names
            .iter()
            .map(|m| {
                let values: Vec<Option<f64>> = l
                    .checkpoints
                    .iter()
                    .map(|r| r.metrics.get(*m).copied())
                    .collect();
                num_column(&values)
            })
            .collect();
        for (i, r) in l.checkpoints.iter().enumerate() {
            let mut marks = Vec::new();
            if r.latest {
                marks.push("latest");
            }
            if r.best {
                marks.push("best");
            }
            let mut cells = vec![
                marks.join(","),
                r.name.clone(),
                r.step.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                r.epoch.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            ];
            for col in &columns {
                cells.push(col.get(i).cloned().unwrap_or_default());
            }
            cells.push(human_bytes(r.bytes));
            cells.push(r.created_at.clone());
            t.row(cells);
        }
        out.push_str(&t.render());
        match (&l.best, l.checkpoints.iter().find(|r| r.best)) {
            (Some(b), Some(_)) => {
                let score = b
                    .score
                    .map(|s| format!(" = {}", num(s)))
                    .unwrap_or_default();
                let monitor = b.monitor.as_deref().unwrap_or("monitored metric");
                out.push_str(&format!(
                    "best by {monitor}{score} (callback {})\n",
                    b.callback
                ));
            }
            (Some(b), None) => out.push_str(&format!(
                "best_model_path {:?} names no committed checkpoint here (deleted or elsewhere)\n",
                b.path
            )),
            (None, _) => {}
        }
    }
    if !l.temporaries.is_empty() {
        out.push_str(&format!(
            "\n{} stale temporar{} (interrupted save or delete; never loaded, removed when a writer next opens the run directory):\n",
            l.temporaries.len(),
            if l.temporaries.len() == 1 { "y" } else { "ies" }
        ));
        for t in &l.temporaries {
            out.push_str(&format!("  stale  {t}\n"));
        }
    }
    if !l.other.is_empty() {
        out.push_str("\nnot listed:\n");
        for o in &l.other {
            out.push_str(&format!("  {}  {}\n", o.name, o.reason));
        }
    }
    for n in &l.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    for p in &l.problems {
        out.push_str(&format!("problem: {p}\n"));
    }
    out
}

/// Runs `relume ls`.
///
/// # Errors
/// When the checkpoints directory or a manifest cannot be read.
pub fn run(opts: &LsOpts) -> anyhow::Result<Status> {
    let listing = build(opts)?;
    if opts.json {
        print_json(&listing)?;
    } else {
        print!("{}", render(&listing));
    }
    Ok(Status::problems_if(!listing.problems.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn best_from_flat_leaves() {
        let cbs = map(json!({
            "ModelCheckpoint{val_loss}/best_model_path": "runs/x/checkpoints/step=000020",
            "ModelCheckpoint{val_loss}/best_model_score": 0.25,
            "ModelCheckpoint{val_loss}/monitor": "val_loss",
        }));
        let b = find_best(&cbs).unwrap();
        assert_eq!(b.path, "runs/x/checkpoints/step=000020");
        assert_eq!(b.score, Some(0.25));
        assert_eq!(b.monitor.as_deref(), Some("val_loss"));
        assert_eq!(b.callback, "ModelCheckpoint{val_loss}");
    }

    #[test]
    fn best_from_relume_model_checkpoint_state() {
        let key = "ModelCheckpoint{monitor=val_loss,mode=min,every_n_train_steps=0,every_n_epochs=1,train_time_interval=none}";
        let cbs = map(json!({
            format!("{key}/best_k"): {"epoch=3-step=40": 0.2, "epoch=5-step=60": 0.1, "epoch=4-step=50": 0.3},
            format!("{key}/last"): "epoch=5-step=60",
        }));
        let b = find_best(&cbs).unwrap();
        assert_eq!((b.path.as_str(), b.score), ("epoch=5-step=60", Some(0.1)));
        assert_eq!(b.monitor.as_deref(), Some("val_loss"));
        let max = key.replace("mode=min", "mode=max");
        let cbs = map(json!({format!("{max}/best_k"): {"a": 0.2, "b": 0.9}}));
        assert_eq!(find_best(&cbs).unwrap().path, "b");
    }

    #[test]
    fn best_from_object_leaf() {
        let cbs = map(json!({"ckpt/state": {"best_model_path": "a", "best_model_score": 1.5}}));
        let b = find_best(&cbs).unwrap();
        assert_eq!((b.path.as_str(), b.score), ("a", Some(1.5)));
        assert_eq!(b.callback, "ckpt/state");
    }

    #[test]
    fn no_best_when_absent_or_empty() {
        assert_eq!(find_best(&map(json!({"early/wait": 3}))), None);
        assert_eq!(find_best(&map(json!({"best_model_path": ""}))), None);
    }
}
