//! The trainer side of asynchronous checkpointing (invariant 10).
//!
//! With `Trainer::builder().async_checkpointing(true)`, a step boundary's saves
//! are snapshotted on the training thread and committed by
//! [`relume_ckpt::AsyncCheckpointer`]'s writer thread. The snapshot
//! ([`relume_ckpt::Stateful::snapshot`] of every component) is the only work on
//! the training thread: one copy of every tensor (large ones into buffers the
//! writer recycles, see [`relume_ckpt::BufferPool`]) and plain copies of the
//! small state. The writer resolves it into the components map (JSON leaves,
//! keys), then builds the manifest, fingerprint and checksums while it commits;
//! the saves of one boundary share one snapshot (`SharedSnapshot`). This module
//! keeps what the trainer must do once each save is reported:
//!
//! - at every step boundary the trainer **polls** first: each reported commit
//!   runs its `on_save_checkpoint` hooks and then the deletions requested at the
//!   boundary that saved it (retention strictly after the commit); the first
//!   failure is returned as an error naming the checkpoint, so retention for a
//!   failed save never runs and the previous checkpoint survives;
//! - before taking a new snapshot the trainer waits for a free slot and polls
//!   again, so (with the default `max_in_flight` of 1) a failed save is always
//!   reported before a later snapshot, whose callback state might name it, is
//!   submitted. With `max_in_flight > 1` a save queued behind a failed one may
//!   still commit; fit stops at the failure all the same;
//! - at the end of fit, on a stop and on preemption the trainer **flushes**:
//!   it waits for every save in flight and handles their outcomes as above.
//!
//! A checkpoint written asynchronously holds exactly the bytes a synchronous
//! save of the same boundary would (a snapshot resolves to the same
//! `components` map; the synchronous path builds it through the same
//! snapshots), so resuming from either is byte-identical. A snapshot that fails
//! to resolve on the writer is reported like a failed write, naming the
//! checkpoint.

use std::collections::{BTreeMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use relume_ckpt::{
    AsyncCheckpointer, AsyncOptions, BufferPool, Checkpoint, CheckpointDir, Committed, StateDict,
    WriterPriority,
};

use crate::callbacks::Progress;
use crate::error::Result;
use crate::trainer::connector::Snapshots;

/// A submitted save, waiting for its outcome.
#[derive(Debug)]
pub(crate) struct PendingSave {
    /// Submission number.
    pub seq: u64,
    /// Checkpoint name.
    pub name: String,
    /// Loop position it holds.
    pub progress: Progress,
    /// Metrics recorded in its manifest.
    pub metrics: BTreeMap<String, f64>,
    /// Deletions to carry out once this save (the last of its boundary) committed.
    pub deletes: Vec<String>,
}

/// The async writer plus what to do when each of its saves is reported.
pub(crate) struct AsyncSaves {
    writer: AsyncCheckpointer,
    pending: VecDeque<PendingSave>,
    /// Recycled tensor buffers: the writer gives a snapshot's buffers back once it
    /// is committed, so the next snapshot copies into memory that is already
    /// mapped. Bounded to `max_in_flight` snapshots.
    pool: BufferPool,
    max_in_flight: usize,
}

impl AsyncSaves {
    /// A writer committing into `dir`, with at most `max_in_flight` saves queued,
    /// scheduled as `priority` says.
    ///
    /// # Errors
    /// relume-ckpt errors (a read-only directory, a thread that cannot start).
    pub(crate) fn new(
        dir: Arc<CheckpointDir>,
        max_in_flight: usize,
        priority: WriterPriority,
    ) -> Result<Self> {
        let n = NonZeroUsize::new(max_in_flight).unwrap_or(NonZeroUsize::MIN);
        let options = AsyncOptions {
            max_in_flight: n,
            priority,
        };
        Ok(AsyncSaves {
            writer: AsyncCheckpointer::with_options(dir, options)?,
            pending: VecDeque::new(),
            pool: BufferPool::new(),
            max_in_flight: n.get(),
        })
    }

    /// The pool snapshots copy tensor bytes into.
    pub(crate) fn pool(&self) -> &BufferPool {
        &self.pool
    }

    /// Call after taking a snapshot from [`AsyncSaves::pool`]: the pool keeps at
    /// most `max_in_flight` snapshots' worth of buffers.
    pub(crate) fn snapshot_taken(&mut self) {
        let bytes = self.pool.take_handed_out();
        self.pool
            .set_max_held(bytes.saturating_mul(self.max_in_flight));
    }

    /// Waits until a snapshot may be taken.
    ///
    /// # Errors
    /// The writer thread is gone.
    pub(crate) fn wait_for_slot(&mut self) -> Result<()> {
        Ok(self.writer.wait_for_slot()?)
    }

    /// Submits a save whose checkpoint `build` makes on the writer thread from a
    /// snapshot; its tensor buffers go back to the pool after the commit.
    ///
    /// # Errors
    /// A bad name, or the writer thread is gone.
    pub(crate) fn submit_deferred(
        &mut self,
        name: &str,
        build: impl FnOnce() -> relume_ckpt::Result<Checkpoint> + Send + 'static,
        progress: Progress,
        metrics: BTreeMap<String, f64>,
    ) -> Result<()> {
        let ticket = self
            .writer
            .submit_deferred(name, build, Some(self.pool.clone()))?;
        self.pending.push_back(PendingSave {
            seq: ticket.seq(),
            name: name.to_string(),
            progress,
            metrics,
            deletes: Vec::new(),
        });
        Ok(())
    }

    /// Attaches `deletes` to the newest submitted save (they run once it commits).
    /// Returns them back when nothing is pending (the caller runs them now).
    pub(crate) fn defer_deletes(&mut self, deletes: Vec<String>) -> Vec<String> {
        match self.pending.back_mut() {
            Some(p) => {
                p.deletes.extend(deletes);
                Vec::new()
            }
            None => deletes,
        }
    }

    /// The saves reported committed (non-blocking, or waiting for all with
    /// `wait`), each with its pending record.
    ///
    /// # Errors
    /// [`relume_ckpt::Error::AsyncSaveFailed`] naming the first failed save.
    pub(crate) fn collect(&mut self, wait: bool) -> Result<Vec<(Committed, PendingSave)>> {
        let done = if wait {
            self.writer.flush()
        } else {
            self.writer.poll()
        };
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                if let relume_ckpt::Error::AsyncSaveFailed { checkpoint, .. } = &e {
                    // Its deletions (and those of later saves) never run.
                    self.pending.retain(|p| &p.name != checkpoint);
                }
                return Err(e.into());
            }
        };
        let mut out = Vec::new();
        for c in done {
            while let Some(p) = self.pending.pop_front() {
                if p.seq == c.seq {
                    out.push((c.clone(), p));
                    break;
                }
            }
        }
        Ok(out)
    }

    /// True when nothing is in flight or unreported.
    pub(crate) fn is_idle(&self) -> bool {
        self.writer.is_idle()
    }
}

/// One boundary's snapshot, shared by its saves: the first writer job to need it
/// resolves it (builds the JSON leaves), the last one takes the components map
/// instead of cloning it (so its buffers can be recycled).
pub(crate) struct SharedSnapshot {
    inner: Mutex<Shared>,
}

struct Shared {
    snapshot: Option<Snapshots>,
    resolved: Option<BTreeMap<String, StateDict>>,
    failed: bool,
    remaining: usize,
}

impl SharedSnapshot {
    /// A snapshot used by `saves` saves.
    pub(crate) fn new(snapshot: Snapshots, saves: usize) -> Self {
        SharedSnapshot {
            inner: Mutex::new(Shared {
                snapshot: Some(snapshot),
                resolved: None,
                failed: false,
                remaining: saves,
            }),
        }
    }

    /// The components map for one save (on the writer thread).
    ///
    /// # Errors
    /// [`relume_ckpt::Error::SnapshotBuild`] when a component's deferred state
    /// failed (for this save and every later save of the boundary).
    pub(crate) fn take(&self) -> relume_ckpt::Result<BTreeMap<String, StateDict>> {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        s.remaining = s.remaining.saturating_sub(1);
        if let Some(snap) = s.snapshot.take() {
            match snap.resolve_named() {
                Ok(c) => s.resolved = Some(c),
                Err(e) => {
                    let (component, source) = *e;
                    s.failed = true;
                    return Err(relume_ckpt::Error::SnapshotBuild {
                        component,
                        source: Box::new(source),
                    });
                }
            }
        }
        match (&s.resolved, s.remaining) {
            (Some(_), 0) => Ok(s.resolved.take().unwrap_or_default()),
            (Some(c), _) => Ok(c.clone()),
            (None, _) => Err(relume_ckpt::Error::SnapshotBuild {
                component: "<all>".into(),
                source: if s.failed {
                    "an earlier save of this step boundary failed to build the snapshot".into()
                } else {
                    "the snapshot was already used by every save of its boundary".into()
                },
            }),
        }
    }
}
