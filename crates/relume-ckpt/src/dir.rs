//! [`CheckpointDir`]: the handle on a run directory's `checkpoints/`.
//!
//! ```text
//! run-dir/checkpoints/
//!   .lock                      exclusive writer lock (fs4), held by CheckpointDir::open
//!   .tmp-<name>-<uuid>/        a save in progress, or left by a crash: never listed
//!   step=000120-epoch=2/       committed checkpoints (manifest.json inside)
//!   latest                     names the newest committed checkpoint
//! ```
//!
//! One process writes a run directory at a time: [`CheckpointDir::open`] takes an
//! exclusive lock on `checkpoints/.lock` and a second writer gets [`Error::Locked`].
//! Because the lock guarantees no save is in flight, `open` removes every stale
//! `.tmp-*` left by a crashed save. [`CheckpointDir::open_read_only`] takes no lock
//! and changes nothing (for `relume ls`); it reports temporaries instead.
//!
//! Deletion is safe by construction: the name must be a plain name inside this
//! directory, the checkpoint `latest` names is refused, and a checkpoint held by a
//! reader (a shared lock on its `manifest.json`, see [`crate::load`]) is refused.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::commit::{
    check_name, write_checkpoint, write_latest, Checkpoint, LATEST_FILE, TMP_PREFIX,
};
use crate::error::{io_err, Error, Result};
use crate::manifest::{Manifest, MANIFEST_FILE};
use crate::storage::{LocalStorage, Storage};

/// Name of the checkpoints directory inside a run directory.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// Name of the writer lock file inside the checkpoints directory.
pub const LOCK_FILE: &str = ".lock";

/// A committed checkpoint, as listed by [`CheckpointDir::list`].
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    /// Directory name.
    pub name: String,
    /// Full path.
    pub path: PathBuf,
    /// `progress.step` (or `progress.global_step`), if recorded.
    pub step: Option<u64>,
    /// The manifest's progress block.
    pub progress: Value,
    /// The manifest's metrics.
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// Total bytes of the checkpoint's files (manifest excluded).
    pub bytes: u64,
    /// The manifest's `created_at`.
    pub created_at: String,
}

/// A run directory's checkpoints: save, list, resolve, delete.
#[derive(Debug)]
pub struct CheckpointDir {
    dir: PathBuf,
    storage: Arc<dyn Storage>,
    lock: Option<File>,
}

/// How long [`CheckpointDir::open`] waits for a held writer lock before returning
/// [`Error::Locked`]. Long enough for a holder that is exiting (or a forked child that
/// briefly inherited the lock descriptor before `exec`) to let go; short enough that a
/// real second writer gets its error at once.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

impl CheckpointDir {
    /// Opens `run_dir` for writing on the local filesystem: creates
    /// `run_dir/checkpoints`, takes the exclusive writer lock and removes stale
    /// temporaries.
    ///
    /// # Errors
    /// [`Error::Locked`] when another handle or process holds the lock (after waiting
    /// up to [`LOCK_WAIT`] for it to be released),
    /// [`Error::Io`] when the directory cannot be created or cleaned.
    pub fn open(run_dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with_storage(run_dir, Arc::new(LocalStorage))
    }

    /// As [`CheckpointDir::open`], writing through `storage` (for failure injection).
    ///
    /// # Errors
    /// As [`CheckpointDir::open`].
    pub fn open_with_storage(run_dir: impl AsRef<Path>, storage: Arc<dyn Storage>) -> Result<Self> {
        let dir = run_dir.as_ref().join(CHECKPOINTS_DIR);
        storage
            .create_dir_all(&dir)
            .map_err(io_err("create directory", &dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match fs4::FileExt::try_lock(&lock) {
                Ok(()) => break,
                // A holder that is exiting, or a forked child between fork and exec
                // (which briefly inherits the descriptor), releases it within moments.
                Err(fs4::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(fs4::TryLockError::WouldBlock) => {
                    return Err(Error::Locked { path: lock_path })
                }
                Err(fs4::TryLockError::Error(e)) => return Err(io_err("lock", &lock_path)(e)),
            }
        }
        let me = CheckpointDir {
            dir,
            storage,
            lock: Some(lock),
        };
        let temps = me.temporaries()?;
        for t in &temps {
            let res = if t.is_dir() {
                me.storage.remove_dir_all(t)
            } else {
                me.storage.remove_file(t)
            };
            res.map_err(io_err("remove stale temporary", t))?;
        }
        if !temps.is_empty() {
            tracing::info!(
                "removed {} stale temporaries in {}",
                temps.len(),
                me.dir.display()
            );
            me.storage
                .sync_dir(&me.dir)
                .map_err(io_err("fsync directory", &me.dir))?;
        }
        Ok(me)
    }

    /// Opens `run_dir` for reading only: no lock, nothing created or removed.
    ///
    /// # Errors
    /// [`Error::Io`] when `run_dir/checkpoints` is not a readable directory.
    pub fn open_read_only(run_dir: impl AsRef<Path>) -> Result<Self> {
        let dir = run_dir.as_ref().join(CHECKPOINTS_DIR);
        fs::read_dir(&dir).map_err(io_err("read directory", &dir))?;
        Ok(CheckpointDir {
            dir,
            storage: Arc::new(LocalStorage),
            lock: None,
        })
    }

    /// The `checkpoints` directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn require_writer(&self) -> Result<()> {
        if self.lock.is_none() {
            return Err(Error::ReadOnly {
                path: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// Stale temporaries (`.tmp-*`) in the checkpoints directory. Empty right after
    /// [`CheckpointDir::open`]; a read-only handle reports them as they are.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be read.
    pub fn temporaries(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io_err("read directory", &self.dir))? {
            let e = e.map_err(io_err("read directory", &self.dir))?;
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                out.push(e.path());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Saves `ckpt` as checkpoint `name` with the commit protocol, then points
    /// `latest` at it. Returns the checkpoint's path.
    ///
    /// # Errors
    /// [`Error::ReadOnly`], [`Error::InvalidName`], [`Error::AlreadyExists`],
    /// [`Error::Io`]. On error `latest` still names the previous checkpoint.
    pub fn save(&self, name: &str, ckpt: &Checkpoint) -> Result<PathBuf> {
        self.require_writer()?;
        let path = write_checkpoint(self.storage.as_ref(), &self.dir, name, ckpt)?;
        write_latest(self.storage.as_ref(), &self.dir, name)?;
        Ok(path)
    }

    /// The committed checkpoints, sorted by step (unknown first) then name.
    ///
    /// Temporaries and directories without a manifest are never listed; a directory
    /// whose manifest is invalid is skipped with a warning (run `verify` on it).
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be read.
    pub fn list(&self) -> Result<Vec<CheckpointInfo>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io_err("read directory", &self.dir))? {
            let e = e.map_err(io_err("read directory", &self.dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if check_name(&name).is_err() || !e.path().is_dir() {
                continue;
            }
            let mpath = e.path().join(MANIFEST_FILE);
            let bytes = match fs::read(&mpath) {
                Ok(b) => b,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(io_err("read", &mpath)(err)),
            };
            match Manifest::parse(&mpath, &bytes) {
                Ok(m) => out.push(CheckpointInfo {
                    name,
                    path: e.path(),
                    step: m.step(),
                    bytes: m.total_bytes(),
                    progress: m.progress,
                    metrics: m.metrics,
                    created_at: m.created_at,
                }),
                Err(err) => tracing::warn!("skipping {}: {err}", e.path().display()),
            }
        }
        out.sort_by(|a, b| (a.step, &a.name).cmp(&(b.step, &b.name)));
        Ok(out)
    }

    /// The checkpoint `latest` names, or `None` when no checkpoint was committed.
    ///
    /// # Errors
    /// [`Error::LatestDangling`] when the pointer names something that is not a
    /// committed checkpoint; [`Error::Io`] when it cannot be read.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        let p = self.dir.join(LATEST_FILE);
        let raw = match fs::read_to_string(&p) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", &p)(e)),
        };
        let name = raw.trim_end_matches('\n').to_string();
        let target = self.dir.join(&name);
        if check_name(&name).is_err() || !target.join(MANIFEST_FILE).is_file() {
            return Err(Error::LatestDangling { path: p, name });
        }
        Ok(Some(target))
    }

    /// Resolves `latest`/`last`, a checkpoint name, or a path to a committed checkpoint.
    ///
    /// # Errors
    /// [`Error::NoSuchCheckpoint`] when nothing committed matches;
    /// [`Error::LatestDangling`] for a broken pointer.
    pub fn resolve(&self, name_or_path: &str) -> Result<PathBuf> {
        let missing = || Error::NoSuchCheckpoint {
            name: name_or_path.to_string(),
            dir: self.dir.clone(),
        };
        if name_or_path == "latest" || name_or_path == "last" {
            return self.latest()?.ok_or_else(missing);
        }
        let candidate = if check_name(name_or_path).is_ok() {
            self.dir.join(name_or_path)
        } else {
            PathBuf::from(name_or_path)
        };
        if candidate.join(MANIFEST_FILE).is_file() {
            Ok(candidate)
        } else {
            Err(missing())
        }
    }

    /// Deletes committed checkpoint `name` from this directory.
    ///
    /// Refuses the checkpoint `latest` names and one that a reader holds. The
    /// directory is first renamed to a temporary (so a crash mid-delete leaves only a
    /// temporary, cleaned on the next open), then removed.
    ///
    /// # Errors
    /// [`Error::ReadOnly`], [`Error::InvalidName`] (a path, not a name),
    /// [`Error::NoSuchCheckpoint`], [`Error::DeleteLatest`], [`Error::InUse`], [`Error::Io`].
    pub fn delete(&self, name: &str) -> Result<()> {
        self.require_writer()?;
        check_name(name)?;
        let path = self.dir.join(name);
        let mpath = path.join(MANIFEST_FILE);
        if !mpath.is_file() {
            return Err(Error::NoSuchCheckpoint {
                name: name.to_string(),
                dir: self.dir.clone(),
            });
        }
        if self.latest()?.as_deref() == Some(path.as_path()) {
            return Err(Error::DeleteLatest { path });
        }
        let guard = File::open(&mpath).map_err(io_err("open", &mpath))?;
        match fs4::FileExt::try_lock(&guard) {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => return Err(Error::InUse { path }),
            Err(fs4::TryLockError::Error(e)) => return Err(io_err("lock", &mpath)(e)),
        }
        let tmp = self
            .dir
            .join(format!("{TMP_PREFIX}del-{}", uuid::Uuid::new_v4().simple()));
        self.storage
            .rename(&path, &tmp)
            .map_err(io_err("rename", &path))?;
        self.storage
            .sync_dir(&self.dir)
            .map_err(io_err("fsync directory", &self.dir))?;
        drop(guard);
        self.storage
            .remove_dir_all(&tmp)
            .map_err(io_err("remove", &tmp))?;
        Ok(())
    }
}
