//! `relume lightning convert X.ckpt OUT`: a Lightning (or plain `torch.save`)
//! checkpoint as a relume checkpoint.
//!
//! The file is read with relume-lightning's restricted pickle reader (nothing in it is
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
//! The conversion itself (optimizer index→name mapping, buffer detection, memory use)
//! is [`relume_lightning::convert`]; this command writes its result and verifies it.
//! `OUT/model.safetensors` is copied from the checkpoint by the kernel
//! (`std::io::copy`), not through a buffer the size of the file. The source is
//! unmapped before the written checkpoint is verified (the verifier maps its files in
//! turn), so the two sets of file-backed pages are not resident at once.
//!
//! The result is for weights and inspection: it has no relume RNG, data cursor or
//! loop state, so `relume inspect` reports it as not resumable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use relume_ckpt::commit::check_name;
use relume_ckpt::CheckpointDir;
use relume_lightning::{convert, Conversion, ConvertOptions, LightningCheckpoint};
use serde::Serialize;

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
    let convert_opts = ConvertOptions {
        weights_only: opts.weights_only,
    };
    let Conversion {
        checkpoint: ckpt,
        name,
        optimizer_params_mapped: mapped,
    } = convert(&l, &convert_opts)?;
    let name = opts.name.clone().unwrap_or(name);
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
