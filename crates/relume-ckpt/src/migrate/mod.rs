//! Format versioning: a registry of pure migrations v(n) → v(n+1).
//!
//! A migration is a pure function over a [`Migratable`]: the *logical* manifest
//! (format_version, relume_version, created_at, progress, config, metrics) as JSON,
//! and the state of every component. It never touches files. Reading an old layout
//! into a `Migratable` is the job of that version's reader (e.g. [`v0::read`]);
//! writing the result is the job of the current writer, which recomputes file
//! lists, checksums and the fingerprint.
//!
//! [`migrate_dir`] writes the upgraded checkpoint to a new directory with the
//! commit protocol; [`migrate_in_place`] writes it next to the old one and swaps the
//! two atomically (`renameat2(RENAME_EXCHANGE)`), so a crash leaves either the old or
//! the new checkpoint in place, never neither.

pub mod v0;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::checkpoint::Checkpoint;
use crate::commit::{check_name, write_checkpoint, write_temporary};
use crate::error::{Error, Result};
use crate::manifest::{FORMAT_VERSION, MANIFEST_FILE, MAX_MANIFEST_BYTES};
use crate::state::StateDict;
use crate::storage::{LocalStorage, Storage};

/// A checkpoint in transit between format versions.
#[derive(Debug, Clone)]
pub struct Migratable {
    /// The logical manifest fields of the version it is at.
    pub manifest: Value,
    /// The state of every component.
    pub components: BTreeMap<String, StateDict>,
}

/// A pure migration from version `n` to `n + 1`.
pub type MigrationFn = fn(Migratable) -> Result<Migratable>;

/// The registry: `(n, migration from n to n + 1)`, in order.
pub const MIGRATIONS: &[(u64, MigrationFn)] = &[(0, v0::to_v1)];

/// Reads the format version of the checkpoint at `dir` without validating it.
///
/// # Errors
/// [`Error::MissingManifest`], [`Error::ManifestInvalid`], [`Error::LimitExceeded`], [`Error::Io`].
pub fn detect_version(dir: &Path) -> Result<u64> {
    let mpath = dir.join(MANIFEST_FILE);
    let meta = match std::fs::metadata(&mpath) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::MissingManifest {
                path: dir.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(Error::Io {
                op: "stat",
                path: mpath,
                source,
            })
        }
    };
    if meta.len() > MAX_MANIFEST_BYTES {
        return Err(Error::LimitExceeded {
            path: mpath,
            what: "manifest bytes",
            got: meta.len(),
            limit: MAX_MANIFEST_BYTES,
        });
    }
    let bytes = std::fs::read(&mpath).map_err(|source| Error::Io {
        op: "read",
        path: mpath.clone(),
        source,
    })?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| Error::ManifestInvalid {
        path: mpath.clone(),
        reason: format!("not JSON: {e}"),
    })?;
    v.get("format_version")
        .or_else(|| v.get("version"))
        .and_then(Value::as_u64)
        .ok_or_else(|| Error::ManifestInvalid {
            path: mpath,
            reason: "no integer format_version".into(),
        })
}

/// Reads a checkpoint of any supported version, verified, as a [`Migratable`].
///
/// # Errors
/// [`Error::UnsupportedFormatVersion`] for a version newer than [`FORMAT_VERSION`],
/// and whatever the version's reader reports.
pub fn read_any(dir: &Path) -> Result<(u64, Migratable)> {
    let version = detect_version(dir)?;
    match version {
        0 => Ok((0, v0::read(dir)?)),
        FORMAT_VERSION => {
            let loaded = crate::read::load(dir)?;
            let m = &loaded.manifest;
            let manifest = serde_json::json!({
                "format_version": m.format_version,
                "relume_version": m.relume_version,
                "created_at": m.created_at,
                "progress": m.progress,
                "config": m.config,
                "metrics": metrics_to_json(&m.metrics),
            });
            Ok((
                version,
                Migratable {
                    manifest,
                    components: loaded.components,
                },
            ))
        }
        v => Err(Error::UnsupportedFormatVersion {
            path: dir.join(MANIFEST_FILE),
            found: v,
            supported: FORMAT_VERSION,
        }),
    }
}

fn metrics_to_json(m: &BTreeMap<String, f64>) -> Value {
    m.iter()
        .map(|(k, x)| {
            (
                k.clone(),
                if x.is_finite() {
                    serde_json::json!(x)
                } else {
                    Value::String(x.to_string())
                },
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Applies the registered migrations from `from` up to `to`.
///
/// # Errors
/// [`Error::Migration`] when no migration is registered for a step or one fails;
/// [`Error::UnsupportedFormatVersion`] when `to` is newer than [`FORMAT_VERSION`].
pub fn upgrade(mut m: Migratable, from: u64, to: u64) -> Result<Migratable> {
    if to > FORMAT_VERSION {
        return Err(Error::UnsupportedFormatVersion {
            path: PathBuf::new(),
            found: to,
            supported: FORMAT_VERSION,
        });
    }
    if from > to {
        return Err(Error::Migration {
            from,
            reason: format!("cannot downgrade to v{to}"),
        });
    }
    for v in from..to {
        let f = MIGRATIONS
            .iter()
            .find(|(n, _)| *n == v)
            .map(|(_, f)| *f)
            .ok_or_else(|| Error::Migration {
                from: v,
                reason: "no migration registered".into(),
            })?;
        m = f(m)?;
    }
    Ok(m)
}

/// Turns a current-version [`Migratable`] into the writer's [`Checkpoint`].
///
/// # Errors
/// [`Error::Migration`] when the manifest lacks a field of the current version.
pub fn to_checkpoint(m: Migratable) -> Result<Checkpoint> {
    let field = |k: &str| {
        m.manifest.get(k).cloned().ok_or_else(|| Error::Migration {
            from: FORMAT_VERSION,
            reason: format!("the migrated manifest lacks {k:?}"),
        })
    };
    let metrics_v = field("metrics")?;
    let mut metrics = BTreeMap::new();
    for (k, v) in metrics_v.as_object().into_iter().flatten() {
        let x = v
            .as_f64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .ok_or_else(|| Error::Migration {
                from: FORMAT_VERSION,
                reason: format!("metric {k:?} is not a number"),
            })?;
        metrics.insert(k.clone(), x);
    }
    Ok(Checkpoint {
        progress: field("progress")?,
        config: field("config")?,
        metrics,
        components: m.components,
        group: Vec::new(),
    })
}

/// Reads the checkpoint at `src` (any supported version), migrates it to format
/// version `to` (must be [`FORMAT_VERSION`]) and writes it to the new directory
/// `dst` with the commit protocol. Returns `dst`.
///
/// # Errors
/// [`Error::InvalidName`] when `dst`'s last component is not a valid name,
/// [`Error::AlreadyExists`], errors of [`read_any`] and [`upgrade`], [`Error::Io`].
pub fn migrate_dir(src: &Path, dst: &Path, to: u64) -> Result<PathBuf> {
    if to != FORMAT_VERSION {
        return Err(Error::UnsupportedFormatVersion {
            path: dst.to_path_buf(),
            found: to,
            supported: FORMAT_VERSION,
        });
    }
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    check_name(&name)?;
    let parent = dst
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (from, m) = read_any(src)?;
    let ckpt = to_checkpoint(upgrade(m, from, to)?)?;
    write_checkpoint(&LocalStorage, parent, &name, &ckpt)
}

/// Migrates the checkpoint at `path` to version `to` in place: the new checkpoint
/// is committed next to it and the two are swapped atomically; the old one is then
/// removed. A crash leaves one of them at `path` and the other as a `.tmp-*`.
///
/// Inside a run's `checkpoints/` directory it takes the writer lock first, like
/// every other mutation of a run directory.
///
/// # Errors
/// [`Error::Locked`] when a training run (or another writer) holds the run
/// directory; as [`migrate_dir`]; [`Error::Io`] when the atomic exchange is not
/// supported.
pub fn migrate_in_place(path: &Path, to: u64) -> Result<()> {
    if to != FORMAT_VERSION {
        return Err(Error::UnsupportedFormatVersion {
            path: path.to_path_buf(),
            found: to,
            supported: FORMAT_VERSION,
        });
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // In a run's checkpoints directory, a migration is a mutation like any other:
    // it holds the writer lock, so it never races a training run.
    let in_run = parent.join(crate::dir::LOCK_FILE).exists()
        || parent
            .file_name()
            .is_some_and(|n| n == crate::dir::CHECKPOINTS_DIR);
    let _lock = if in_run {
        Some(crate::dir::take_writer_lock(parent)?)
    } else {
        None
    };
    let (from, m) = read_any(path)?;
    let ckpt = to_checkpoint(upgrade(m, from, to)?)?;
    let storage = LocalStorage;
    let tmp = write_temporary(&storage, parent, "migrate", &ckpt)?;
    if let Err(source) = exchange(&tmp, path) {
        if let Err(rm) = storage.remove_dir_all(&tmp) {
            tracing::warn!("could not remove temporary {}: {rm}", tmp.display());
        }
        return Err(Error::Io {
            op: "exchange",
            path: path.to_path_buf(),
            source,
        });
    }
    storage.sync_dir(parent).map_err(|source| Error::Io {
        op: "fsync directory",
        path: parent.to_path_buf(),
        source,
    })?;
    storage.remove_dir_all(&tmp).map_err(|source| Error::Io {
        op: "remove",
        path: tmp,
        source,
    })
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let cb = CString::new(b.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "atomic directory exchange needs Linux renameat2",
    ))
}
