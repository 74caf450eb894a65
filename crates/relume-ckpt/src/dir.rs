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
//!
//! ## The committed checkpoints are the truth; `latest` is a hint
//! A kill between a checkpoint's rename and the update of `latest`, a full disk
//! while `latest` is replaced, or a `latest` deleted by hand leave the pointer
//! behind (or missing) while newer checkpoints are committed. Resolving `latest`
//! therefore never trusts the pointer alone: the newest checkpoint is the committed
//! one with the largest `(step, commit_seq)` that
//! - verifies (every checksum; skipped for the one the pointer names, which
//!   [`crate::load`] verifies anyway), and
//! - if it is at the newest step, has every member of its `group` committed (the
//!   checkpoints saved at the same boundary from the same state: a checkpoint whose
//!   state names a sibling that never committed is not used while an older one
//!   exists).
//!
//! [`CheckpointDir::open`] rewrites the pointer to that checkpoint and logs what it
//! said before ([`CheckpointDir::reconcile`]); a read-only handle resolves the same
//! way without writing and says so in one line. `latest` naming nothing while no
//! checkpoint is committed is [`Error::LatestDangling`]: the checkpoints were removed.
//!
//! ## Clearing
//! [`CheckpointDir::clear`] empties the directory crash-safely: it creates a
//! `.trash-<uuid>/` directory and fsyncs (from that instant the run counts as
//! empty: readers list nothing), moves every entry into it, renames it to a
//! `.tmp-*` temporary and removes that. A kill at any point leaves either the old
//! run whole or, once the next writer opens and finishes the move, an empty one.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::Value;

use crate::commit::{
    check_name, write_checkpoint_seq, write_latest, Checkpoint, LATEST_FILE, TMP_PREFIX,
};
use crate::error::{io_err, Error, Result};
use crate::manifest::{Manifest, MANIFEST_FILE};
use crate::storage::{LocalStorage, Storage};

/// Name of the checkpoints directory inside a run directory.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// Name of the writer lock file inside the checkpoints directory.
pub const LOCK_FILE: &str = ".lock";
/// Prefix of the directory that marks a [`CheckpointDir::clear`] in progress.
pub const TRASH_PREFIX: &str = ".trash-";

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
    /// The manifest's `commit_seq` (commit order in this directory), if recorded.
    pub commit_seq: Option<u64>,
    /// The manifest's `group`: every checkpoint saved at the same boundary.
    pub group: Vec<String>,
}

impl CheckpointInfo {
    /// The listing entry of checkpoint `name` at `path`, from its manifest.
    pub fn from_manifest(name: String, path: PathBuf, m: Manifest) -> Self {
        CheckpointInfo {
            name,
            path,
            step: m.step(),
            bytes: m.total_bytes(),
            progress: m.progress,
            metrics: m.metrics,
            created_at: m.created_at,
            commit_seq: m.commit_seq,
            group: m.group,
        }
    }
}

/// A run directory's checkpoints: save, list, resolve, delete.
#[derive(Debug)]
pub struct CheckpointDir {
    dir: PathBuf,
    storage: Arc<dyn Storage>,
    lock: Option<File>,
    /// The next `commit_seq` a save records.
    next_seq: AtomicU64,
    /// Set for an `s3://` run: every operation goes to it (see [`crate::remote`]).
    #[cfg(feature = "s3")]
    remote: Option<crate::remote::RemoteDir>,
}

/// Runs `$body` with the remote directory when this handle is remote.
macro_rules! if_remote {
    ($self:ident, |$r:ident| $body:expr) => {
        #[cfg(feature = "s3")]
        if let Some($r) = &$self.remote {
            return $body;
        }
    };
}

/// How long [`CheckpointDir::open`] waits for a held writer lock before returning
/// [`Error::Locked`]. Long enough for a holder that is exiting (or a forked child that
/// briefly inherited the lock descriptor before `exec`) to let go; short enough that a
/// real second writer gets its error at once.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

impl CheckpointDir {
    /// Opens `run_dir` for writing on the local filesystem: creates
    /// `run_dir/checkpoints`, takes the exclusive writer lock, finishes a clear
    /// that a crash interrupted, removes stale temporaries and reconciles `latest`
    /// with the committed checkpoints ([`CheckpointDir::reconcile`]).
    ///
    /// # Errors
    /// [`Error::Locked`] when another handle or process holds the lock (after waiting
    /// up to [`LOCK_WAIT`] for it to be released),
    /// [`Error::Io`] when the directory cannot be created or cleaned, or `latest`
    /// cannot be rewritten.
    pub fn open(run_dir: impl AsRef<Path>) -> Result<Self> {
        #[cfg(feature = "s3")]
        if crate::location::is_remote(run_dir.as_ref()) {
            return Self::open_remote(run_dir, None, crate::remote::RemoteOptions::default());
        }
        Self::open_with_storage(run_dir, Arc::new(LocalStorage))
    }

    /// As [`CheckpointDir::open`], writing through `storage` (for failure injection).
    ///
    /// # Errors
    /// As [`CheckpointDir::open`].
    pub fn open_with_storage(run_dir: impl AsRef<Path>, storage: Arc<dyn Storage>) -> Result<Self> {
        if crate::location::is_remote(run_dir.as_ref()) {
            #[cfg(feature = "s3")]
            return Self::open_remote(
                run_dir,
                Some(storage),
                crate::remote::RemoteOptions::default(),
            );
            #[cfg(not(feature = "s3"))]
            return Err(crate::location::not_built(run_dir.as_ref()));
        }
        let dir = run_dir.as_ref().join(CHECKPOINTS_DIR);
        storage
            .create_dir_all(&dir)
            .map_err(io_err("create directory", &dir))?;
        let lock = take_writer_lock(&dir)?;
        let me = CheckpointDir {
            dir,
            storage,
            lock: Some(lock),
            next_seq: AtomicU64::new(0),
            #[cfg(feature = "s3")]
            remote: None,
        };
        for trash in me.pending_clears()? {
            tracing::info!(
                "finishing the clear of {} that was interrupted",
                me.dir.display()
            );
            me.finish_clear(&trash)?;
        }
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
        let listed = me.list()?;
        let next = listed
            .iter()
            .filter_map(|c| c.commit_seq)
            .max()
            .map_or(0, |m| m + 1);
        me.next_seq.store(next, Ordering::SeqCst);
        me.reconcile()?;
        Ok(me)
    }

    /// Opens `run_dir` for reading only: no lock, nothing created or removed.
    ///
    /// # Errors
    /// [`Error::Io`] when `run_dir/checkpoints` is not a readable directory.
    pub fn open_read_only(run_dir: impl AsRef<Path>) -> Result<Self> {
        if crate::location::is_remote(run_dir.as_ref()) {
            #[cfg(feature = "s3")]
            {
                let r = crate::remote::RemoteDir::open(
                    run_dir.as_ref(),
                    None,
                    false,
                    crate::remote::RemoteOptions::default(),
                )?;
                return Ok(Self::from_remote(r));
            }
            #[cfg(not(feature = "s3"))]
            return Err(crate::location::not_built(run_dir.as_ref()));
        }
        let dir = run_dir.as_ref().join(CHECKPOINTS_DIR);
        fs::read_dir(&dir).map_err(io_err("read directory", &dir))?;
        Ok(CheckpointDir {
            dir,
            storage: Arc::new(LocalStorage),
            lock: None,
            next_seq: AtomicU64::new(0),
            #[cfg(feature = "s3")]
            remote: None,
        })
    }

    /// Opens the `s3://` run `run_dir` for writing (feature `s3`): finishes an
    /// interrupted clear and deletes uncommitted attempts older than
    /// `options.stale_after`. Writes go through `storage` when given (a
    /// [`crate::FaultyStorage`] over a [`crate::remote::RemoteStorage`], for failure
    /// tests). There is no writer lock on an object store: two writers of one run
    /// race on the create-only commit markers, and all but one get
    /// [`Error::RemoteAlreadyExists`].
    ///
    /// # Errors
    /// [`Error::RemoteUnsupported`] for a malformed URL, [`Error::Remote`] when the
    /// store cannot be reached (naming the URL, and whether the endpoint, the
    /// credentials or the bucket is at fault).
    #[cfg(feature = "s3")]
    pub fn open_remote(
        run_dir: impl AsRef<Path>,
        storage: Option<Arc<dyn Storage>>,
        options: crate::remote::RemoteOptions,
    ) -> Result<Self> {
        let r = crate::remote::RemoteDir::open(run_dir.as_ref(), storage, true, options)?;
        Ok(Self::from_remote(r))
    }

    #[cfg(feature = "s3")]
    fn from_remote(r: crate::remote::RemoteDir) -> Self {
        CheckpointDir {
            dir: r.path(),
            storage: Arc::new(LocalStorage),
            lock: None,
            next_seq: AtomicU64::new(0),
            remote: Some(r),
        }
    }

    /// Whether this handle is on an object store (an `s3://` run).
    pub fn is_remote(&self) -> bool {
        #[cfg(feature = "s3")]
        return self.remote.is_some();
        #[cfg(not(feature = "s3"))]
        false
    }

    /// The `checkpoints` directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn require_writer(&self) -> Result<()> {
        if_remote!(self, |r| r.require_writer());
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
        if_remote!(self, |r| r.temporaries());
        self.entries_starting_with(TMP_PREFIX)
    }

    /// The entries of the checkpoints directory whose names start with `prefix`, sorted.
    fn entries_starting_with(&self, prefix: &str) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io_err("read directory", &self.dir))? {
            let e = e.map_err(io_err("read directory", &self.dir))?;
            if e.file_name().to_string_lossy().starts_with(prefix) {
                out.push(e.path());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Saves `ckpt` as checkpoint `name` with the commit protocol, then points
    /// `latest` at it once every member of its `group` is committed. Returns the
    /// checkpoint's path.
    ///
    /// Saving a name that is already committed with the same fingerprint succeeds
    /// without writing (a deterministic run replaying a step it committed before a
    /// crash); see [`crate::write_checkpoint`].
    ///
    /// # Errors
    /// [`Error::ReadOnly`], [`Error::InvalidName`], [`Error::CommitConflict`],
    /// [`Error::AlreadyExists`], [`Error::Io`]. On error `latest` still names the
    /// previous checkpoint.
    pub fn save(&self, name: &str, ckpt: &Checkpoint) -> Result<PathBuf> {
        if_remote!(self, |r| r.save(name, ckpt));
        self.require_writer()?;
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        let path = write_checkpoint_seq(self.storage.as_ref(), &self.dir, name, ckpt, Some(seq))?;
        let complete = ckpt
            .group
            .iter()
            .all(|g| g == name || self.dir.join(g).join(MANIFEST_FILE).is_file());
        if complete {
            write_latest(self.storage.as_ref(), &self.dir, name)?;
        }
        Ok(path)
    }

    /// Empties the directory crash-safely (see the module docs): every committed
    /// checkpoint, `latest` and every temporary are removed; the lock stays held.
    /// Returns the number of checkpoints removed.
    ///
    /// # Errors
    /// [`Error::ReadOnly`], or [`Error::Io`] naming the entry; a clear that fails
    /// part-way is finished by the next [`CheckpointDir::open`].
    pub fn clear(&self) -> Result<usize> {
        if_remote!(self, |r| r.clear());
        self.require_writer()?;
        let trash = self
            .dir
            .join(format!("{TRASH_PREFIX}{}", uuid::Uuid::new_v4().simple()));
        self.storage
            .create_dir_all(&trash)
            .map_err(io_err("create directory", &trash))?;
        self.storage
            .sync_dir(&self.dir)
            .map_err(io_err("fsync directory", &self.dir))?;
        let n = self.finish_clear(&trash)?;
        tracing::info!("cleared {}: removed {n} checkpoints", self.dir.display());
        Ok(n)
    }

    /// Whether a [`CheckpointDir::clear`] was started and not finished (a kill
    /// interrupted it): the run then counts as empty, and the next writer finishes it.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be read.
    pub fn clear_pending(&self) -> Result<bool> {
        if_remote!(self, |r| r.clear_pending());
        Ok(!self.pending_clears()?.is_empty())
    }

    /// `.trash-*` directories: clears that were started and not finished.
    fn pending_clears(&self) -> Result<Vec<PathBuf>> {
        self.entries_starting_with(TRASH_PREFIX)
    }

    /// Moves every entry but the lock and the trash directories into `trash`, then
    /// turns `trash` into a temporary and removes it.
    fn finish_clear(&self, trash: &Path) -> Result<usize> {
        let mut moved = 0;
        for e in fs::read_dir(&self.dir).map_err(io_err("read directory", &self.dir))? {
            let e = e.map_err(io_err("read directory", &self.dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name == LOCK_FILE || name.starts_with(TRASH_PREFIX) {
                continue;
            }
            self.storage
                .rename(&e.path(), &trash.join(&name))
                .map_err(io_err("rename", &e.path()))?;
            if check_name(&name).is_ok() {
                moved += 1;
            }
        }
        self.storage
            .sync_dir(&self.dir)
            .map_err(io_err("fsync directory", &self.dir))?;
        let garbage = self.dir.join(format!(
            "{TMP_PREFIX}trash-{}",
            uuid::Uuid::new_v4().simple()
        ));
        self.storage
            .rename(trash, &garbage)
            .map_err(io_err("rename", trash))?;
        self.storage
            .sync_dir(&self.dir)
            .map_err(io_err("fsync directory", &self.dir))?;
        self.storage
            .remove_dir_all(&garbage)
            .map_err(io_err("remove", &garbage))?;
        Ok(moved)
    }

    /// The committed checkpoints, sorted by step (unknown first), then commit order
    /// (`commit_seq`, unknown first), then name.
    ///
    /// Temporaries and directories without a manifest are never listed; a directory
    /// whose manifest is invalid, and a symlink, are skipped with a warning (run
    /// `verify` on them). While a [`CheckpointDir::clear`] is unfinished nothing is
    /// listed.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be read.
    pub fn list(&self) -> Result<Vec<CheckpointInfo>> {
        if_remote!(self, |r| r.list());
        let mut out = Vec::new();
        if !self.pending_clears()?.is_empty() {
            tracing::info!(
                "{} is being cleared (a `.trash-*` directory exists): no checkpoint is listed",
                self.dir.display()
            );
            return Ok(out);
        }
        for e in fs::read_dir(&self.dir).map_err(io_err("read directory", &self.dir))? {
            let e = e.map_err(io_err("read directory", &self.dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if check_name(&name).is_err() {
                continue;
            }
            let ft = e.file_type().map_err(io_err("stat", &e.path()))?;
            if ft.is_symlink() {
                tracing::warn!(
                    "skipping {}: it is a symlink, and relume never follows symlinks in a checkpoints directory",
                    e.path().display()
                );
                continue;
            }
            if !ft.is_dir() {
                continue;
            }
            let mpath = e.path().join(MANIFEST_FILE);
            let bytes = match fs::read(&mpath) {
                Ok(b) => b,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(io_err("read", &mpath)(err)),
            };
            match Manifest::parse(&mpath, &bytes) {
                Ok(m) => out.push(CheckpointInfo::from_manifest(name, e.path(), m)),
                Err(err) => tracing::warn!("skipping {}: {err}", e.path().display()),
            }
        }
        out.sort_by(|a, b| (a.step, a.commit_seq, &a.name).cmp(&(b.step, b.commit_seq, &b.name)));
        Ok(out)
    }

    /// What the `latest` file itself says, if it exists (a hint: [`CheckpointDir::latest`]
    /// resolves the newest checkpoint from the committed ones).
    ///
    /// # Errors
    /// [`Error::Io`] when it exists but cannot be read.
    pub fn latest_pointer(&self) -> Result<Option<String>> {
        // A remote run has no pointer: `latest` is resolved from the markers.
        if_remote!(self, |_r| Ok(None));
        self.read_pointer()
    }

    fn read_pointer(&self) -> Result<Option<String>> {
        let p = self.dir.join(LATEST_FILE);
        match fs::read_to_string(&p) {
            Ok(s) => Ok(Some(s.trim_end_matches('\n').to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &p)(e)),
        }
    }

    /// The pointer's content and the newest usable committed checkpoint (module
    /// docs), without changing anything.
    fn resolve_newest(&self) -> Result<(Option<String>, Option<CheckpointInfo>)> {
        let list = self.list()?;
        if list.is_empty() && !self.pending_clears()?.is_empty() {
            return Ok((None, None));
        }
        let pointer = self.read_pointer()?;
        let names: BTreeSet<&str> = list.iter().map(|c| c.name.as_str()).collect();
        let newest_step = list.last().map(|c| c.step);
        for c in list.iter().rev() {
            if Some(c.step) == newest_step {
                if let Some(missing) = c.group.iter().find(|g| !names.contains(g.as_str())) {
                    tracing::warn!(
                        "{} is not used as the latest checkpoint: it was saved at the same step as {missing:?}, whose save did not commit",
                        c.path.display()
                    );
                    continue;
                }
            }
            if pointer.as_deref() == Some(c.name.as_str()) {
                return Ok((pointer, Some(c.clone())));
            }
            let report = crate::read::verify(&c.path);
            if let Some(p) = report.problems.first() {
                tracing::warn!(
                    "{} is not used as the latest checkpoint: it does not verify: {p}",
                    c.path.display()
                );
                continue;
            }
            return Ok((pointer, Some(c.clone())));
        }
        // Nothing passed: the newest one is still resumed from (never a fresh start
        // beside committed checkpoints); loading it reports what is wrong.
        Ok((pointer, list.last().cloned()))
    }

    /// Points `latest` at the newest usable committed checkpoint (see the module
    /// docs) if it names anything else, logging what it said and what it says now.
    /// [`CheckpointDir::open`] calls it. Returns the newest checkpoint.
    ///
    /// # Errors
    /// [`Error::ReadOnly`], [`Error::Io`] when `latest` cannot be rewritten.
    pub fn reconcile(&self) -> Result<Option<PathBuf>> {
        if_remote!(self, |r| r.latest());
        self.require_writer()?;
        let (pointer, newest) = self.resolve_newest()?;
        let Some(newest) = newest else {
            return Ok(None);
        };
        if pointer.as_deref() != Some(newest.name.as_str()) {
            write_latest(self.storage.as_ref(), &self.dir, &newest.name)?;
            tracing::info!(
                "reconciled {}: `latest` {}, now names {} (the newest committed checkpoint)",
                self.dir.join(LATEST_FILE).display(),
                describe_pointer(pointer.as_deref()),
                newest.name
            );
        }
        Ok(Some(newest.path))
    }

    /// The newest committed checkpoint, or `None` when none was committed.
    ///
    /// `latest` is a hint (see the module docs): when it is missing, behind, or
    /// names something that is not a committed checkpoint, the newest usable
    /// committed checkpoint is returned and one line says so.
    ///
    /// # Errors
    /// [`Error::LatestDangling`] when the pointer names something that is not a
    /// committed checkpoint and none is committed; [`Error::Io`] when it cannot be
    /// read.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        if_remote!(self, |r| r.latest());
        let (pointer, newest) = self.resolve_newest()?;
        match (pointer, newest) {
            (pointer, Some(c)) => {
                if pointer.as_deref() != Some(c.name.as_str()) {
                    tracing::info!(
                        "`latest` in {} {}; using {}, the newest committed checkpoint",
                        self.dir.display(),
                        describe_pointer(pointer.as_deref()),
                        c.name
                    );
                }
                Ok(Some(c.path))
            }
            (Some(name), None) => Err(Error::LatestDangling {
                path: self.dir.join(LATEST_FILE),
                name,
            }),
            (None, None) => Ok(None),
        }
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
        if_remote!(self, |r| r
            .committed(name_or_path)?
            .map(|u| u.path())
            .ok_or_else(missing));
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
        if_remote!(self, |r| r.delete(name));
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

/// Whether `path` is a committed checkpoint: a local directory holding a
/// `manifest.json`, or an `s3://` checkpoint URL whose `COMMIT` marker exists.
///
/// # Errors
/// For a URL, [`Error::Remote`] when the store cannot be asked (never `false` for an
/// unreachable store), and [`Error::RemoteUnsupported`] without the `s3` feature.
pub fn is_committed(path: &Path) -> Result<bool> {
    if crate::location::is_remote(path) {
        #[cfg(feature = "s3")]
        return crate::remote::is_committed(path);
        #[cfg(not(feature = "s3"))]
        return Err(crate::location::not_built(path));
    }
    Ok(path.join(MANIFEST_FILE).is_file())
}

/// Whether anything exists at `path` (a committed checkpoint, or for a local path
/// any file or directory): names already taken are not reused.
///
/// # Errors
/// As [`is_committed`].
pub fn name_taken(path: &Path) -> Result<bool> {
    if crate::location::is_remote(path) {
        return is_committed(path);
    }
    Ok(fs::symlink_metadata(path).is_ok())
}

/// How a log line describes what `latest` said.
fn describe_pointer(pointer: Option<&str>) -> String {
    match pointer {
        None => "was missing".to_string(),
        Some(n) => format!("named {n:?}"),
    }
}

/// Takes the exclusive writer lock on `dir/.lock` (creating the file), waiting up to
/// [`LOCK_WAIT`] for a holder that is letting go. Every mutation of a checkpoints
/// directory holds it: [`CheckpointDir::open`] for saves, retention and
/// [`CheckpointDir::clear`], and [`crate::migrate_in_place`].
///
/// # Errors
/// [`Error::Locked`] when another handle or process holds it, [`Error::Io`].
pub(crate) fn take_writer_lock(dir: &Path) -> Result<File> {
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
            Ok(()) => return Ok(lock),
            // A holder that is exiting, or a forked child between fork and exec
            // (which briefly inherits the descriptor), releases it within moments.
            Err(fs4::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(fs4::TryLockError::WouldBlock) => return Err(Error::Locked { path: lock_path }),
            Err(fs4::TryLockError::Error(e)) => return Err(io_err("lock", &lock_path)(e)),
        }
    }
}
