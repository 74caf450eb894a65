//! `relume verify CKPT|RUN_DIR`: every checksum plus the structural checks.
//!
//! Runs [`relume_ckpt::verify`] on one checkpoint, or on every checkpoint
//! directory of a run directory (including ones whose manifest no longer parses,
//! which `ls` cannot list). All problems are reported, each naming its file and,
//! when the damage lies in a tensor's bytes, the tensor. Throughput is bytes
//! hashed over wall time. Exit status 1 when any problem is found.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use relume_ckpt::commit::check_name;
use relume_ckpt::{CheckpointDir, Error as CkptError};
use serde::Serialize;

use super::ls::resolve_run_dir;
use super::{is_checkpoint, print_json, Status, UsageError};
use crate::table::{human_bytes, Table};

/// Arguments of `relume verify`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  relume verify runs/digits/checkpoints/step=000120-epoch=2\n  relume verify runs/digits          # every checkpoint of the run\n  relume verify runs/digits --json\n\nChecks the manifest's self-checksum, version and paths, the size and BLAKE3 of\nevery file, the safetensors headers, and that files and manifest agree.\nBYTES (JSON `bytes_checked`) counts every file read and hashed, manifest.json\nincluded, in binary units (1 KiB = 1024 B): for an intact checkpoint the same\ncount as `relume ls`'s SIZE.\nExit status 1 when any problem is found; each names the file and the tensor."
)]
pub struct VerifyArgs {
    /// A checkpoint directory, or a run directory to verify all its checkpoints.
    pub path: PathBuf,
    /// Print machine-readable JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What to verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One checkpoint directory.
    Checkpoint(PathBuf),
    /// Every checkpoint of a run directory.
    RunDir(PathBuf),
}

/// Validated options of `relume verify`.
#[derive(Debug, Clone)]
pub struct VerifyOpts {
    /// What to verify.
    pub target: Target,
    /// JSON output.
    pub json: bool,
}

impl VerifyArgs {
    /// Decides whether the path is a checkpoint or a run directory.
    ///
    /// A directory inside a `checkpoints/` directory counts as a checkpoint even
    /// without a manifest (so a partial copy is reported as damaged, not misused).
    ///
    /// # Errors
    /// A [`UsageError`] when the path does not exist or is neither.
    pub fn validate(self) -> anyhow::Result<VerifyOpts> {
        let p = self.path;
        if relume_ckpt::is_remote(&p) {
            let target = if is_checkpoint(&p) {
                Target::Checkpoint(p)
            } else {
                Target::RunDir(resolve_run_dir(&p)?)
            };
            return Ok(VerifyOpts {
                target,
                json: self.json,
            });
        }
        if !p.exists() {
            bail!(UsageError(format!(
                "{}: no such file or directory",
                p.display()
            )));
        }
        let in_checkpoints = p
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|n| n == relume_ckpt::dir::CHECKPOINTS_DIR);
        let target = if is_checkpoint(&p) || (p.is_dir() && in_checkpoints) {
            Target::Checkpoint(p)
        } else {
            Target::RunDir(resolve_run_dir(&p).map_err(|_| {
                UsageError(format!(
                    "{}: neither a checkpoint (no manifest.json) nor a run directory (no checkpoints/)",
                    p.display()
                ))
            })?)
        };
        Ok(VerifyOpts {
            target,
            json: self.json,
        })
    }
}

/// One problem, located.
#[derive(Debug, Serialize)]
pub struct Problem {
    /// The file (or directory) involved, when known.
    pub file: Option<PathBuf>,
    /// The tensor whose bytes are damaged, when known.
    pub tensor: Option<String>,
    /// The full message.
    pub message: String,
}

/// The file and tensor an error names.
pub fn locate(e: &CkptError) -> (Option<PathBuf>, Option<String>) {
    use CkptError as E;
    match e {
        E::ChecksumMismatch { path, tensor, .. } | E::FileSize { path, tensor, .. } => {
            (Some(path.clone()), tensor.clone())
        }
        E::TensorFileLength { path, tensor, .. } => (Some(path.clone()), Some(tensor.clone())),
        E::TensorOutOfBounds { tensor, .. } | E::TensorByteLength { tensor, .. } => {
            (None, Some(tensor.clone()))
        }
        E::Io { path, .. }
        | E::MissingManifest { path }
        | E::IncompleteManifest { path }
        | E::ManifestInvalid { path, .. }
        | E::ManifestChecksum { path, .. }
        | E::LimitExceeded { path, .. }
        | E::UnsupportedFormatVersion { path, .. }
        | E::OldFormatVersion { path, .. }
        | E::UnsafePath { path, .. }
        | E::MissingFile { path }
        | E::SafetensorsHeader { path, .. }
        | E::LatestDangling { path, .. }
        | E::Inconsistent { path, .. } => (Some(path.clone()), None),
        _ => (None, None),
    }
}

fn problem(e: &CkptError) -> Problem {
    let (file, tensor) = locate(e);
    Problem {
        file,
        tensor,
        message: e.to_string(),
    }
}

/// The verification of one checkpoint.
#[derive(Debug, Serialize)]
pub struct Checked {
    /// Checkpoint name (directory name).
    pub name: String,
    /// Checkpoint path.
    pub path: PathBuf,
    /// True when no problem was found.
    pub ok: bool,
    /// Files checked (the manifest included), when the manifest was readable.
    pub files: Option<usize>,
    /// Bytes read and hashed: every file, `manifest.json` included.
    pub bytes_checked: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Throughput in GB/s (10^9 bytes per second).
    pub gb_per_s: f64,
    /// Every problem found.
    pub problems: Vec<Problem>,
}

fn gbps(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / seconds / 1e9
    } else {
        0.0
    }
}

/// Verifies one checkpoint directory and times it.
pub fn check(path: &Path) -> Checked {
    let start = Instant::now();
    let report = relume_ckpt::verify(path);
    let seconds = start.elapsed().as_secs_f64();
    Checked {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string()),
        path: path.to_path_buf(),
        ok: report.is_ok(),
        files: report.manifest.as_ref().map(|m| m.files.len() + 1),
        bytes_checked: report.bytes_checked,
        seconds,
        gb_per_s: gbps(report.bytes_checked, seconds),
        problems: report.problems.iter().map(problem).collect(),
    }
}

/// The outcome of `relume verify`.
#[derive(Debug, Serialize)]
struct Outcome {
    target: PathBuf,
    checkpoints: Vec<Checked>,
    /// Run-level problems (a dangling `latest`).
    problems: Vec<Problem>,
    /// Notes that are not problems (temporaries, uncommitted directories).
    notes: Vec<String>,
    bytes_checked: u64,
    seconds: f64,
    gb_per_s: f64,
    ok: bool,
}

fn verify_run(run_dir: &Path) -> anyhow::Result<(Vec<Checked>, Vec<Problem>, Vec<String>)> {
    let dir = CheckpointDir::open_read_only(run_dir)?;
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    match dir.latest() {
        Err(e) => problems.push(problem(&e)),
        Ok(Some(newest)) => {
            let name = newest
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let pointer = dir.latest_pointer()?;
            if !dir.is_remote() && pointer.as_deref() != Some(name.as_str()) {
                notes.push(super::ls::pointer_note(pointer.as_deref(), &name));
            }
        }
        Ok(None) => {}
    }
    for t in dir.temporaries()? {
        notes.push(format!(
            "{}: stale temporary, not a checkpoint (removed when a writer next opens the run directory)",
            t.display()
        ));
    }
    let mut paths = Vec::new();
    if dir.clear_pending()? {
        // Readers see an interrupted clear as an empty run, as the trainer does.
        notes.push(format!(
            "{}: a clear (`--fresh`) was interrupted; the run counts as empty and the next training run finishes the clear",
            dir.path().display()
        ));
        problems.push(no_checkpoint(dir.path()));
        return Ok((Vec::new(), problems, notes));
    }
    if dir.is_remote() {
        // Exactly the committed checkpoints: an attempt without a marker is a
        // temporary (noted above).
        let paths: Vec<PathBuf> = dir.list()?.into_iter().map(|c| c.path).collect();
        if paths.is_empty() {
            problems.push(no_checkpoint(dir.path()));
        }
        return Ok((paths.iter().map(|p| check(p)).collect(), problems, notes));
    }
    let entries = std::fs::read_dir(dir.path())
        .with_context(|| format!("read directory {}", dir.path().display()))?;
    for e in entries {
        let e = e.with_context(|| format!("read directory {}", dir.path().display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if check_name(&name).is_err() || !e.path().is_dir() {
            continue;
        }
        if is_checkpoint(&e.path()) {
            paths.push(e.path());
        } else {
            notes.push(format!(
                "{}: no manifest.json, not a committed checkpoint; skipped",
                e.path().display()
            ));
        }
    }
    paths.sort();
    notes.sort();
    if paths.is_empty() {
        // Nothing verified is not "ok": a run directory without checkpoints cannot
        // resume, and a script checking `relume verify RUN` must hear it.
        problems.push(no_checkpoint(dir.path()));
    }
    Ok((paths.iter().map(|p| check(p)).collect(), problems, notes))
}

/// The problem of a run directory with no committed checkpoint.
fn no_checkpoint(dir: &Path) -> Problem {
    Problem {
        file: Some(dir.to_path_buf()),
        tensor: None,
        message: format!(
            "{}: no committed checkpoint to verify; check the run directory (a run writes them under checkpoints/)",
            dir.display()
        ),
    }
}

fn render(o: &Outcome) -> String {
    let mut out = String::new();
    let mut t =
        Table::new(["STATUS", "CHECKPOINT", "FILES", "BYTES", "TIME", "GB/s"]).right(&[2, 3, 4, 5]);
    for c in &o.checkpoints {
        t.row([
            if c.ok { "ok" } else { "DAMAGED" }.to_string(),
            c.name.clone(),
            c.files.map(|f| f.to_string()).unwrap_or_else(|| "-".into()),
            human_bytes(c.bytes_checked),
            format!("{:.3}s", c.seconds),
            format!("{:.2}", c.gb_per_s),
        ]);
    }
    if !t.is_empty() {
        out.push_str(&t.render());
    }
    for c in o.checkpoints.iter().filter(|c| !c.ok) {
        out.push_str(&format!(
            "\n{}: {} problem(s)\n",
            c.path.display(),
            c.problems.len()
        ));
        for p in &c.problems {
            out.push_str(&format!("  - {}\n", p.message));
        }
    }
    for p in &o.problems {
        out.push_str(&format!("problem: {}\n", p.message));
    }
    for n in &o.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    let damaged = o.checkpoints.iter().filter(|c| !c.ok).count();
    let n = o.checkpoints.len();
    out.push_str(&format!(
        "{}: {n} checkpoint{} checked, {} hashed in {:.3}s ({:.2} GB/s)\n",
        if o.ok { "ok" } else { "FAILED" },
        if n == 1 { "" } else { "s" },
        human_bytes(o.bytes_checked),
        o.seconds,
        o.gb_per_s,
    ));
    if damaged > 0 {
        out.push_str(&format!(
            "{damaged} of {n} damaged; do not resume from them\n"
        ));
    }
    out
}

/// Runs `relume verify`.
///
/// # Errors
/// When a run directory cannot be listed.
pub fn run(opts: &VerifyOpts) -> anyhow::Result<Status> {
    let start = Instant::now();
    let (target, checkpoints, problems, notes) = match &opts.target {
        Target::Checkpoint(p) => (p.clone(), vec![check(p)], Vec::new(), Vec::new()),
        Target::RunDir(r) => {
            let (c, p, n) = verify_run(r)?;
            (r.clone(), c, p, n)
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    let bytes_checked = checkpoints.iter().map(|c| c.bytes_checked).sum();
    let ok = problems.is_empty() && checkpoints.iter().all(|c| c.ok);
    let outcome = Outcome {
        target,
        checkpoints,
        problems,
        notes,
        bytes_checked,
        seconds,
        gb_per_s: gbps(bytes_checked, seconds),
        ok,
    };
    if opts.json {
        print_json(&outcome)?;
    } else {
        print!("{}", render(&outcome));
    }
    Ok(Status::problems_if(!ok))
}
