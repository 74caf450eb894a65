//! One module per subcommand. Each has an `…Args` (clap), a validated `…Opts`
//! built by `…Args::validate`, and `run(&Opts) -> anyhow::Result<Status>`.

pub mod diff;
pub mod inspect;
pub mod lightning_convert;
pub mod ls;
pub mod migrate;
pub mod verify;

use std::path::Path;

use anyhow::bail;
use relume_ckpt::manifest::MANIFEST_FILE;
use relume_ckpt::Error as CkptError;

/// How a command that ran to the end went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Nothing wrong (exit status 0).
    Ok,
    /// The command found problems: damage, differences, not resumable (exit status 1).
    Problems,
}

impl Status {
    /// The process exit status.
    pub fn code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Problems => 1,
        }
    }

    /// From an exit code returned by a library-style runner (`0` ok, else problems).
    pub fn from_code(code: i32) -> Status {
        Status::problems_if(code != 0)
    }

    /// `Problems` when `found`, else `Ok`.
    pub fn problems_if(found: bool) -> Status {
        if found {
            Status::Problems
        } else {
            Status::Ok
        }
    }
}

/// A bad argument found while validating flags (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit status for an error that stopped a command: `1` when a checkpoint is
/// damaged or inconsistent (a problem found in the data), `2` for usage and I/O
/// errors and anything else.
pub fn exit_code_of(e: &anyhow::Error) -> u8 {
    let damaged = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<CkptError>(),
            Some(
                CkptError::ChecksumMismatch { .. }
                    | CkptError::FileSize { .. }
                    | CkptError::MissingFile { .. }
                    | CkptError::ManifestChecksum { .. }
                    | CkptError::ManifestInvalid { .. }
                    | CkptError::IncompleteManifest { .. }
                    | CkptError::UnsafePath { .. }
                    | CkptError::LimitExceeded { .. }
                    | CkptError::SafetensorsHeader { .. }
                    | CkptError::TensorFileLength { .. }
                    | CkptError::TensorOutOfBounds { .. }
                    | CkptError::TensorByteLength { .. }
                    | CkptError::Inconsistent { .. }
                    | CkptError::LatestDangling { .. }
            )
        )
    });
    if damaged {
        1
    } else {
        2
    }
}

/// True when `path` is a checkpoint directory (it holds `manifest.json`), or an
/// `s3://` checkpoint URL whose commit marker exists. A store that cannot be asked
/// answers `false` here; the run-directory open that follows reports its error.
pub fn is_checkpoint(path: &Path) -> bool {
    if relume_ckpt::is_remote(path) {
        return matches!(relume_ckpt::is_committed(path), Ok(true));
    }
    path.join(MANIFEST_FILE).is_file()
}

/// Refuses an `s3://` URL for a command that works on local files only.
///
/// # Errors
/// A [`UsageError`] naming the URL and what to do instead.
pub fn local_only(command: &str, path: &Path, instead: &str) -> anyhow::Result<()> {
    if relume_ckpt::is_remote(path) {
        bail!(UsageError(format!(
            "{}: `relume {command}` works on local paths only; {instead}",
            path.display()
        )));
    }
    Ok(())
}

/// Checks that `path` is an existing checkpoint directory.
///
/// # Errors
/// A [`UsageError`] naming the path when it does not exist or is not a checkpoint.
pub fn require_checkpoint(path: &Path) -> anyhow::Result<()> {
    if relume_ckpt::is_remote(path) {
        if relume_ckpt::is_committed(path)? {
            return Ok(());
        }
        bail!(UsageError(format!(
            "{}: not a committed checkpoint (no COMMIT marker); pass a URL like s3://BUCKET/RUN/checkpoints/step=000120, or the run URL",
            path.display()
        )));
    }
    if !path.exists() {
        bail!(UsageError(format!(
            "{}: no such file or directory",
            path.display()
        )));
    }
    if !is_checkpoint(path) {
        bail!(UsageError(format!(
            "{}: not a checkpoint directory (no manifest.json); pass a directory like RUN_DIR/checkpoints/step=000120",
            path.display()
        )));
    }
    Ok(())
}

/// Prints `value` as pretty JSON on stdout.
///
/// # Errors
/// When serialisation fails (it does not for plain data).
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A JSON value in one short line, for tables.
pub fn compact(v: &serde_json::Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| v.to_string())
}
