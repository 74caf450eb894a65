//! `relume migrate CKPT [--to N] [--out DIR | --in-place]`: upgrade a checkpoint's
//! format through the registry of pure migrations.
//!
//! By default the upgraded checkpoint is written, with the commit protocol, to a
//! new directory (`--out`, or `<CKPT>-v<N>` beside the original); the original is
//! never touched. `--in-place` commits the new checkpoint next to the old one and
//! swaps them atomically ([`relume_ckpt::migrate_in_place`]). The result is
//! verified before the command reports success.

use std::path::PathBuf;

use anyhow::{bail, Context};
use relume_ckpt::migrate::detect_version;
use relume_ckpt::{migrate_dir, migrate_in_place, FORMAT_VERSION};
use serde::Serialize;

use super::verify::{check, Checked};
use super::{print_json, require_checkpoint, Status, UsageError};

/// Arguments of `relume migrate`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  relume migrate old/step-5                     # writes old/step-5-v1\n  relume migrate old/step-5 --out new/step-5\n  relume migrate runs/x/checkpoints/step=000010 --in-place\n\nThe original is never modified unless --in-place is given; --in-place swaps the\nold and new checkpoint atomically, so a crash leaves one of them whole."
)]
pub struct MigrateArgs {
    /// The checkpoint directory to upgrade.
    pub ckpt: PathBuf,
    /// Target format version (default: the current one).
    #[arg(long)]
    pub to: Option<u64>,
    /// Directory to write the upgraded checkpoint to; must not exist (default: `<CKPT>-v<N>`).
    #[arg(long, conflicts_with = "in_place")]
    pub out: Option<PathBuf>,
    /// Replace the checkpoint in place (atomic swap) instead of writing a new directory.
    #[arg(long)]
    pub in_place: bool,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

/// Where the upgraded checkpoint goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A new directory.
    Dir(PathBuf),
    /// Replace the source atomically.
    InPlace,
}

/// Validated options of `relume migrate`.
#[derive(Debug, Clone)]
pub struct MigrateOpts {
    /// The source checkpoint.
    pub ckpt: PathBuf,
    /// Target version (≤ [`FORMAT_VERSION`]).
    pub to: u64,
    /// Destination.
    pub dest: Destination,
    /// JSON output.
    pub json: bool,
}

impl MigrateArgs {
    /// Checks the source, the target version and the destination.
    ///
    /// # Errors
    /// A [`UsageError`] when the source is not a checkpoint, the version is newer
    /// than this build supports, or the output directory exists.
    pub fn validate(self) -> anyhow::Result<MigrateOpts> {
        require_checkpoint(&self.ckpt)?;
        let to = self.to.unwrap_or(FORMAT_VERSION);
        if to > FORMAT_VERSION {
            bail!(UsageError(format!(
                "--to {to}: this relume supports format versions up to {FORMAT_VERSION}"
            )));
        }
        let dest = if self.in_place {
            Destination::InPlace
        } else {
            let out = match self.out {
                Some(o) => o,
                None => {
                    let name = self
                        .ckpt
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    self.ckpt.with_file_name(format!("{name}-v{to}"))
                }
            };
            if out.exists() {
                bail!(UsageError(format!(
                    "{}: already exists; choose another --out",
                    out.display()
                )));
            }
            Destination::Dir(out)
        };
        Ok(MigrateOpts {
            ckpt: self.ckpt,
            to,
            dest,
            json: self.json,
        })
    }
}

#[derive(Debug, Serialize)]
struct Outcome {
    source: PathBuf,
    from: u64,
    to: u64,
    output: Option<PathBuf>,
    in_place: bool,
    migrated: bool,
    verification: Option<Checked>,
}

/// Runs `relume migrate`.
///
/// # Errors
/// When the source cannot be read or migrated, or the result cannot be written.
pub fn run(opts: &MigrateOpts) -> anyhow::Result<Status> {
    let from = detect_version(&opts.ckpt)?;
    if from > opts.to {
        bail!(UsageError(format!(
            "{} is at format v{from}; cannot downgrade to v{}",
            opts.ckpt.display(),
            opts.to
        )));
    }
    let mut outcome = Outcome {
        source: opts.ckpt.clone(),
        from,
        to: opts.to,
        output: None,
        in_place: opts.dest == Destination::InPlace,
        migrated: false,
        verification: None,
    };
    if from < opts.to {
        let out = match &opts.dest {
            Destination::Dir(d) => migrate_dir(&opts.ckpt, d, opts.to).with_context(|| {
                format!("cannot migrate {} to {}", opts.ckpt.display(), d.display())
            })?,
            Destination::InPlace => {
                migrate_in_place(&opts.ckpt, opts.to)
                    .with_context(|| format!("cannot migrate {} in place", opts.ckpt.display()))?;
                opts.ckpt.clone()
            }
        };
        outcome.verification = Some(check(&out));
        outcome.output = Some(out);
        outcome.migrated = true;
    }
    let ok = outcome.verification.as_ref().is_none_or(|c| c.ok);
    if opts.json {
        print_json(&outcome)?;
    } else if !outcome.migrated {
        println!(
            "{} is already at format v{}; nothing to do",
            opts.ckpt.display(),
            opts.to
        );
    } else {
        let out = outcome.output.as_deref().unwrap_or(&opts.ckpt);
        println!(
            "migrated {} from format v{from} to v{}: {}",
            opts.ckpt.display(),
            opts.to,
            out.display()
        );
        if let Some(c) = &outcome.verification {
            if c.ok {
                println!("verified: {} files intact", c.files.unwrap_or(0));
            } else {
                println!("verification FAILED:");
                for p in &c.problems {
                    println!("  - {}", p.message);
                }
            }
        }
    }
    Ok(Status::problems_if(!ok))
}
