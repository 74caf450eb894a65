//! [`AsyncCheckpointer`]: commit checkpoints on a writer thread while training goes on
//! (invariant 10).
//!
//! The training thread takes a *snapshot*: a [`Checkpoint`] whose tensors are owned
//! copies ([`crate::TensorBytes::owned`] built from the copied `Vec` directly, one
//! memcpy per tensor). [`AsyncCheckpointer::submit`] hands it to a single writer thread,
//! which commits it with the full durable protocol of [`CheckpointDir::save`]
//! (temporary directory, fsync of every file, manifest last, rename, fsync of the
//! parent, then `latest`). Saves are committed one at a time, in submission order, so
//! `latest` always ends on the newest successful save.
//!
//! [`AsyncCheckpointer::submit_deferred`] goes further: it takes a closure over the
//! snapshot (see [`crate::Snapshot`]) that the writer runs to build the
//! [`Checkpoint`] (JSON leaves, keys) before committing it, and a
//! [`crate::BufferPool`] that gets the tensor buffers back after the commit. Then the
//! training thread only copies tensor bytes and small plain data.
//!
//! An idle writer sleeps on its queue until a save is submitted; it never wakes up
//! on a timer (see [Why the writer never polls](#why-the-writer-never-polls)).
//!
//! ## The writer never preempts training
//! By default the writer runs as a background thread ([`WriterPriority::Background`]:
//! Linux's `SCHED_IDLE` class, inherited by the threads it starts to hash and fsync
//! files). It gets every CPU the training threads leave idle, but never preempts
//! them. On a 2-core machine training on one thread, a normal-priority writer (with
//! its hashing and fsync threads) preempted the training thread 45–70 times per 20
//! saves; in the background class 25–33 are left, and they come with the fsyncs
//! (3–6 on tmpfs or with fsyncs skipped, as without checkpoints). Measured by
//! `cargo bench -p relume --bench checkpoint_overhead`; see `docs/DESIGN.md`. A save
//! is never starved for good: whenever the training thread waits for the writer (a
//! full queue, `flush`, the end of fit, preemption) its CPU goes to the writer.
//! Choose [`WriterPriority::Normal`] when training keeps every
//! core busy and saves must still finish promptly.
//!
//! ## Why the writer never polls
//! Waking a sleeping writer at `submit` costs the training thread a system call and
//! a cross-CPU interrupt (10–25 µs of the stall of a small snapshot in the measured
//! VM). An earlier writer avoided it by polling its queue every 5 ms instead, and that was
//! far worse on a large model: every poll ran the writer thread on another CPU in
//! the training process's address space, so each `munmap` of the training step
//! (candle frees large tensors every step) had to interrupt that CPU to flush its
//! TLB. With a 75 MB state (`BENCH_DIMS=1024,2048,2048,10` of the
//! `checkpoint_overhead` bench, one training thread) every step ran 11% slower,
//! saves or not; with the writer asleep between saves, steps away from a save run as
//! fast as without checkpoints.
//!
//! ```text
//! training thread                      writer thread
//! ---------------                      -------------
//! poll()?  -> Vec<Committed>           (retention runs only for these)
//! snapshot = copy tensors
//! submit(name, snapshot) --job-->      [build(snapshot)]          (deferred only)
//!   (no wake-up; polled)               dir.save(name, snapshot)   (durable commit)
//!   blocks while max_in_flight         drop or recycle(snapshot)  (memory freed first)
//!   saves are queued or writing  <--outcome-- Ok(path) | Err(e)
//! ...
//! flush()? at end of fit / on preemption
//! ```
//!
//! ## Bounded memory
//! At most `max_in_flight` (default [`DEFAULT_MAX_IN_FLIGHT`] = 1) saves are queued or
//! being written; `submit` blocks until one of them finishes. The writer drops a
//! snapshot (or gives its buffers to the pool, which holds at most
//! [`crate::BufferPool::max_held`] bytes) *before* it reports the outcome, so a free
//! slot means freed memory. A caller
//! that wants at most `max_in_flight` snapshots alive *including* the one it is about to
//! take calls [`AsyncCheckpointer::wait_for_slot`] before copying the tensors.
//!
//! ## Errors are never lost
//! Every save has exactly one outcome, reported exactly once by [`AsyncCheckpointer::poll`]
//! (non-blocking, at each step boundary) or [`AsyncCheckpointer::flush`] (waits for
//! everything in flight):
//! - a failed save is returned as [`Error::AsyncSaveFailed`], which names the checkpoint
//!   that failed and carries the cause as its source. Failures are reported before any
//!   commit that is still unreported, in submission order, one per call: the next
//!   `poll`/`flush` returns the next failure, then the remaining commits;
//! - a committed save is returned as a [`Committed`] in the `Ok` list. Run retention
//!   (deleting older checkpoints) only for those: a failed save never appears there, so
//!   retention never runs for it and the previous checkpoint survives.
//!
//! Dropping the checkpointer without `flush` still finishes every submitted save (the
//! drop joins the writer thread) and logs each unreported failure with
//! `tracing::error!`. `Drop` never panics.
//!
//! ## What survives what
//! - **A failed save** (full disk, I/O error): its temporary is removed, no checkpoint of
//!   that name exists, and `latest` and every earlier checkpoint are untouched
//!   (see [`crate::commit`]). Later saves are still attempted.
//! - **A panic in the writer** (a bug) is caught and reported as a failure of that save
//!   ([`Error::AsyncWriter`] as the source); the writer goes on with the next one.
//! - **`kill -9` or power loss** while a save is in flight: that save leaves only a
//!   `.tmp-*` directory, removed by the next [`CheckpointDir::open`]; `latest` names the
//!   newest checkpoint that was fully committed before, which stays loadable. Saves still
//!   queued are lost, as is anything not yet submitted: after a kill, resume from
//!   `latest`, never from what `poll` has not yet reported.
//! - **A panic of the training thread**: unwinding drops the checkpointer, which waits for
//!   the submitted saves to commit and logs any failure.
//!
//! ## Example
//! ```
//! use std::sync::Arc;
//! use relume_ckpt::{AsyncCheckpointer, Checkpoint, CheckpointDir};
//! # fn main() -> relume_ckpt::Result<()> {
//! let run = tempfile::tempdir().unwrap();
//! let dir = Arc::new(CheckpointDir::open(run.path())?);
//! let mut saver = AsyncCheckpointer::new(Arc::clone(&dir))?;
//! for step in 1..=3u64 {
//!     // ... a training step, then at the step boundary:
//!     for done in saver.poll()? {
//!         println!("committed {}", done.name); // run retention for `done` here
//!     }
//!     let mut ckpt = Checkpoint::default(); // the snapshot: owned copies of the tensors
//!     ckpt.progress = serde_json::json!({ "step": step });
//!     let _ticket = saver.submit(&format!("step={step:06}"), ckpt)?;
//! }
//! let committed = saver.flush()?; // end of fit
//! assert_eq!(committed.last().map(|c| c.name.as_str()), Some("step=000003"));
//! assert_eq!(dir.latest()?, Some(dir.path().join("step=000003")));
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvError, Sender, TryRecvError};

use crate::checkpoint::Checkpoint;
use crate::commit::check_name;
use crate::dir::CheckpointDir;
use crate::error::{Error, Result};
use crate::snapshot::BufferPool;

/// Saves queued or being written at once, unless set otherwise.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1;

/// Name of the writer thread.
pub const WRITER_THREAD_NAME: &str = "relume-ckpt-writer";

/// How the writer thread is scheduled against the threads that train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriterPriority {
    /// Runs only on CPU time no normal thread wants (Linux `SCHED_IDLE`), so it
    /// never preempts training. Its hashing and fsync threads inherit it. Other
    /// systems have no per-thread equivalent: the writer runs at normal priority
    /// there, with a warning. The default.
    #[default]
    Background,
    /// The priority of the thread that started the writer.
    Normal,
}

/// Settings of an [`AsyncCheckpointer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncOptions {
    /// Saves queued or in flight at once (each holds one snapshot in memory).
    /// Default [`DEFAULT_MAX_IN_FLIGHT`].
    pub max_in_flight: NonZeroUsize,
    /// How the writer thread is scheduled. Default [`WriterPriority::Background`].
    pub priority: WriterPriority,
}

impl Default for AsyncOptions {
    fn default() -> Self {
        AsyncOptions {
            max_in_flight: NonZeroUsize::new(DEFAULT_MAX_IN_FLIGHT).unwrap_or(NonZeroUsize::MIN),
            priority: WriterPriority::default(),
        }
    }
}

/// Puts the calling thread in the scheduling class `priority` names.
///
/// # Errors
/// The system call's error (the writer then runs at normal priority; nothing is
/// lost, saves are only less polite to training).
fn apply_priority(priority: WriterPriority) -> std::io::Result<()> {
    if priority == WriterPriority::Normal {
        return Ok(());
    }
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid `sched_param`; pid 0 is the calling thread
        // (Linux schedules threads, not processes).
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // Elsewhere there is no portable per-thread priority: `setpriority(PRIO_PROCESS,
    // 0, ...)` would renice the whole training process, not the writer. The writer
    // then runs at normal priority, and says so.
    #[cfg(not(target_os = "linux"))]
    return Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "a background priority for one thread is implemented on Linux only",
    ));
    #[cfg(target_os = "linux")]
    Ok(())
}

/// The receipt for a submitted save; its outcome comes later from
/// [`AsyncCheckpointer::poll`] or [`AsyncCheckpointer::flush`] with the same `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a submitted save is not committed yet; its outcome comes from poll() or flush()"]
pub struct SaveTicket {
    seq: u64,
    name: String,
}

impl SaveTicket {
    /// Submission number, starting at 0 for the checkpointer's first save.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The checkpoint name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A save the writer thread has committed: the checkpoint is durable and `latest`
/// named it when it was committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// Submission number (see [`SaveTicket::seq`]).
    pub seq: u64,
    /// The checkpoint name.
    pub name: String,
    /// The committed checkpoint directory.
    pub path: PathBuf,
    /// Time the writer spent committing it (off the training thread).
    pub write_time: Duration,
}

/// What the writer builds a checkpoint from.
type DeferredBuild = Box<dyn FnOnce() -> Result<Checkpoint> + Send>;

enum Source {
    Ready(Checkpoint),
    Deferred(DeferredBuild),
}

struct Job {
    seq: u64,
    name: String,
    source: Source,
    recycle: Option<BufferPool>,
}

struct Outcome {
    seq: u64,
    name: String,
    result: Result<PathBuf>,
    write_time: Duration,
}

/// Commits checkpoints on a background writer thread, with at most `max_in_flight`
/// saves queued or in flight. See the [module docs](self) for the protocol and what
/// survives an error or a kill.
pub struct AsyncCheckpointer {
    dir: Arc<CheckpointDir>,
    max_in_flight: usize,
    jobs: Option<Sender<Job>>,
    outcomes: Receiver<Outcome>,
    writer: Option<JoinHandle<()>>,
    next_seq: u64,
    in_flight: usize,
    /// Outcomes received from the writer but not yet reported, in submission order.
    unreported: VecDeque<Outcome>,
}

impl std::fmt::Debug for AsyncCheckpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncCheckpointer")
            .field("dir", &self.dir.path())
            .field("max_in_flight", &self.max_in_flight)
            .field("in_flight", &self.in_flight)
            .field("unreported", &self.unreported.len())
            .finish()
    }
}

impl AsyncCheckpointer {
    /// Starts a writer thread committing into `dir`, with at most
    /// [`DEFAULT_MAX_IN_FLIGHT`] (1) save queued or in flight.
    ///
    /// # Errors
    /// [`Error::ReadOnly`] when `dir` was opened read-only; [`Error::Io`] when the
    /// thread cannot be spawned.
    pub fn new(dir: Arc<CheckpointDir>) -> Result<Self> {
        Self::with_max_in_flight(dir, NonZeroUsize::MIN)
    }

    /// As [`AsyncCheckpointer::new`], with at most `max_in_flight` saves queued or in
    /// flight (each holds one snapshot in memory).
    ///
    /// # Errors
    /// As [`AsyncCheckpointer::new`].
    pub fn with_max_in_flight(
        dir: Arc<CheckpointDir>,
        max_in_flight: NonZeroUsize,
    ) -> Result<Self> {
        Self::with_options(
            dir,
            AsyncOptions {
                max_in_flight,
                ..AsyncOptions::default()
            },
        )
    }

    /// As [`AsyncCheckpointer::new`], with every setting given.
    ///
    /// # Errors
    /// As [`AsyncCheckpointer::new`].
    pub fn with_options(dir: Arc<CheckpointDir>, options: AsyncOptions) -> Result<Self> {
        let AsyncOptions {
            max_in_flight,
            priority,
        } = options;
        dir.require_writer()?;
        let (jobs, job_rx) = crossbeam_channel::unbounded::<Job>();
        let (outcome_tx, outcomes) = crossbeam_channel::unbounded::<Outcome>();
        let writer_dir = Arc::clone(&dir);
        let writer = std::thread::Builder::new()
            .name(WRITER_THREAD_NAME.into())
            .spawn(move || {
                if let Err(e) = apply_priority(priority) {
                    tracing::warn!(
                        "checkpoint writer runs at normal priority ({e}); it may slow training while it saves"
                    );
                }
                writer_loop(&writer_dir, &job_rx, &outcome_tx)
            })
            .map_err(|source| Error::Io {
                op: "spawn checkpoint writer thread for",
                path: dir.path().to_path_buf(),
                source,
            })?;
        Ok(AsyncCheckpointer {
            dir,
            max_in_flight: max_in_flight.get(),
            jobs: Some(jobs),
            outcomes,
            writer: Some(writer),
            next_seq: 0,
            in_flight: 0,
            unreported: VecDeque::new(),
        })
    }

    /// The checkpoint directory saves are committed into (shared with the caller for
    /// listing and retention).
    pub fn dir(&self) -> &Arc<CheckpointDir> {
        &self.dir
    }

    /// The most saves queued or in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// Saves submitted whose outcome has not yet come back from the writer.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// True when nothing is in flight and every outcome has been reported.
    pub fn is_idle(&self) -> bool {
        self.in_flight == 0 && self.unreported.is_empty()
    }

    /// Hands the snapshot `ckpt` to the writer thread, to be committed as checkpoint
    /// `name`. Blocks while `max_in_flight` saves are queued or in flight. The outcome
    /// is reported later by [`AsyncCheckpointer::poll`] or [`AsyncCheckpointer::flush`].
    ///
    /// `ckpt` must hold owned copies of the live tensors (a snapshot): training may
    /// change the live state as soon as `submit` returns.
    ///
    /// # Errors
    /// [`Error::InvalidName`] for a bad checkpoint name (checked here, so nothing is
    /// queued); [`Error::AsyncWriter`] when the writer thread is gone. A failure of the
    /// write itself is never returned here: it comes from `poll`/`flush`.
    pub fn submit(&mut self, name: &str, ckpt: Checkpoint) -> Result<SaveTicket> {
        self.send(name, Source::Ready(ckpt), None)
    }

    /// As [`AsyncCheckpointer::submit`], but the writer thread first builds the
    /// checkpoint with `build` (so building the JSON leaves, the manifest blocks and
    /// anything else not yet copied happens off the training thread), and after the
    /// commit gives the checkpoint's tensor buffers back to `recycle` (see
    /// [`BufferPool::recycle`]) instead of freeing them.
    ///
    /// `build` must own a snapshot: copies of every tensor and of the small state,
    /// taken before this call returns. An error from `build` is reported, like a
    /// write failure, by `poll`/`flush` as [`Error::AsyncSaveFailed`] naming `name`.
    ///
    /// # Errors
    /// As [`AsyncCheckpointer::submit`].
    pub fn submit_deferred(
        &mut self,
        name: &str,
        build: impl FnOnce() -> Result<Checkpoint> + Send + 'static,
        recycle: Option<BufferPool>,
    ) -> Result<SaveTicket> {
        self.send(name, Source::Deferred(Box::new(build)), recycle)
    }

    fn send(
        &mut self,
        name: &str,
        source: Source,
        recycle: Option<BufferPool>,
    ) -> Result<SaveTicket> {
        check_name(name)?;
        self.wait_for_slot()?;
        let seq = self.next_seq;
        let jobs = self.jobs.as_ref().ok_or_else(writer_gone)?;
        jobs.send(Job {
            seq,
            name: name.to_string(),
            source,
            recycle,
        })
        .map_err(|_| writer_gone())?;
        self.next_seq += 1;
        self.in_flight += 1;
        Ok(SaveTicket {
            seq,
            name: name.to_string(),
        })
    }

    /// Blocks until fewer than `max_in_flight` saves are queued or in flight. Call it
    /// before taking a snapshot to keep at most `max_in_flight` snapshots in memory;
    /// outcomes that arrive meanwhile are kept for the next `poll`/`flush`.
    ///
    /// # Errors
    /// [`Error::AsyncWriter`] when the writer thread is gone.
    pub fn wait_for_slot(&mut self) -> Result<()> {
        while self.in_flight >= self.max_in_flight {
            self.receive_blocking()?;
        }
        Ok(())
    }

    /// Collects the outcomes that are ready, without blocking. Call it at every step
    /// boundary.
    ///
    /// Returns the saves committed since the last call, in submission order: run
    /// retention for these, and only these.
    ///
    /// # Errors
    /// [`Error::AsyncSaveFailed`] naming the first unreported failed save (its cause as
    /// the source); the commits not yet reported are kept for the next call.
    /// [`Error::AsyncWriter`] when the writer thread is gone with saves in flight.
    #[must_use = "run retention for the committed saves, and only for them"]
    pub fn poll(&mut self) -> Result<Vec<Committed>> {
        while self.in_flight > 0 {
            match self.outcomes.try_recv() {
                Ok(o) => self.accept(o),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Err(self.lose_in_flight()),
            }
        }
        self.report()
    }

    /// Waits until every submitted save has its outcome, then reports as
    /// [`AsyncCheckpointer::poll`] does. Call it at the end of fit and on preemption,
    /// before the process exits.
    ///
    /// # Errors
    /// As [`AsyncCheckpointer::poll`]. After an error, call `flush` again to collect
    /// the remaining outcomes.
    #[must_use = "run retention for the committed saves, and only for them"]
    pub fn flush(&mut self) -> Result<Vec<Committed>> {
        while self.in_flight > 0 {
            self.receive_blocking()?;
        }
        self.report()
    }

    fn receive_blocking(&mut self) -> Result<()> {
        match self.outcomes.recv() {
            Ok(o) => {
                self.accept(o);
                Ok(())
            }
            Err(RecvError) => Err(self.lose_in_flight()),
        }
    }

    fn accept(&mut self, o: Outcome) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.unreported.push_back(o);
    }

    /// The writer hung up with saves in flight (it cannot, short of a bug): forget
    /// them so that callers do not wait forever, and say so.
    fn lose_in_flight(&mut self) -> Error {
        let lost = std::mem::take(&mut self.in_flight);
        Error::AsyncWriter {
            reason: format!("stopped with {lost} save(s) in flight"),
        }
    }

    fn report(&mut self) -> Result<Vec<Committed>> {
        if let Some(i) = self.unreported.iter().position(|o| o.result.is_err()) {
            if let Some(Outcome {
                name,
                result: Err(source),
                ..
            }) = self.unreported.remove(i)
            {
                return Err(Error::AsyncSaveFailed {
                    checkpoint: name,
                    source: Box::new(source),
                });
            }
        }
        Ok(self
            .unreported
            .drain(..)
            .filter_map(|o| match o.result {
                Ok(path) => Some(Committed {
                    seq: o.seq,
                    name: o.name,
                    path,
                    write_time: o.write_time,
                }),
                Err(_) => None, // unreachable: failures are reported first
            })
            .collect())
    }
}

impl Drop for AsyncCheckpointer {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what was submitted, then exit.
        drop(self.jobs.take());
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!(
                    "the checkpoint writer thread for {} panicked; saves still in flight were lost (`latest` is intact)",
                    self.dir.path().display()
                );
            }
        }
        self.unreported.extend(self.outcomes.try_iter());
        for o in self.unreported.drain(..) {
            match o.result {
                Err(e) => tracing::error!(
                    "async save of checkpoint {:?} in {} failed and was never reported (dropped without flush): {}",
                    o.name,
                    self.dir.path().display(),
                    error_chain(&e)
                ),
                Ok(path) => tracing::debug!(
                    "async save committed {} (reported only at drop)",
                    path.display()
                ),
            }
        }
    }
}

/// Copies `src` into a new `Vec` for a snapshot: one allocation of exactly
/// `src.len()` bytes and one memcpy, ready for [`crate::TensorBytes::owned`] without
/// another copy.
///
/// (Advising transparent huge pages for large buffers was measured slower: the
/// `async_save` bench went from 1.04–1.09× to 1.18–1.23× a warm memcpy.)
pub fn snapshot_copy(src: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(src.len());
    v.extend_from_slice(src);
    v
}

fn writer_gone() -> Error {
    Error::AsyncWriter {
        reason: "thread is gone".into(),
    }
}

fn writer_loop(dir: &CheckpointDir, jobs: &Receiver<Job>, outcomes: &Sender<Outcome>) {
    // Sleeps until a save is submitted; ends once the queue is closed and empty.
    while let Ok(Job {
        seq,
        name,
        source,
        recycle,
    }) = jobs.recv()
    {
        let start = Instant::now();
        let mut built = None;
        let result = catch_unwind(AssertUnwindSafe(|| {
            let ckpt = match source {
                Source::Ready(c) => c,
                Source::Deferred(build) => build()?,
            };
            let ckpt = built.insert(ckpt);
            dir.save(&name, ckpt)
        }))
        .unwrap_or_else(|payload| {
            Err(Error::AsyncWriter {
                reason: format!("panicked: {}", panic_message(payload.as_ref())),
            })
        });
        // Free (or recycle, bounded by the pool) the snapshot before reporting: a
        // free slot means freed memory.
        match (built, recycle) {
            (Some(ckpt), Some(pool)) => pool.recycle(ckpt.components.into_values()),
            (ckpt, _) => drop(ckpt),
        }
        let write_time = start.elapsed();
        match &result {
            Ok(path) => tracing::debug!(
                "async save committed {} in {:.3}s",
                path.display(),
                write_time.as_secs_f64()
            ),
            Err(e) => tracing::warn!(
                "async save of checkpoint {name:?} failed (reported at the next step boundary): {}",
                error_chain(e)
            ),
        }
        let outcome = Outcome {
            seq,
            name,
            result,
            write_time,
        };
        if let Err(crossbeam_channel::SendError(lost)) = outcomes.send(outcome) {
            // The checkpointer is gone without joining us; cannot happen (Drop joins
            // before the receiver is dropped), but never lose a failure silently.
            if let Err(e) = lost.result {
                tracing::error!(
                    "async save of checkpoint {:?} failed: {}",
                    lost.name,
                    error_chain(&e)
                );
            }
            return;
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// `error: cause: cause ...`, for log lines.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scheduling policy of thread `tid` of this process (field 41 of its
    /// `stat`).
    #[cfg(target_os = "linux")]
    fn policy(tid: &str) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let after_comm = stat.rsplit(')').next().unwrap();
        after_comm
            .split_whitespace()
            .nth(38)
            .unwrap()
            .parse()
            .unwrap()
    }

    #[cfg(target_os = "linux")]
    fn this_thread() -> String {
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() }.to_string()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn background_priority_is_sched_idle_and_inherited() {
        let (own, child) = std::thread::spawn(|| {
            apply_priority(WriterPriority::Background).unwrap();
            let own = policy(&this_thread());
            let child = std::thread::spawn(|| policy(&this_thread()))
                .join()
                .unwrap();
            (own, child)
        })
        .join()
        .unwrap();
        assert_eq!(own, libc::SCHED_IDLE);
        assert_eq!(
            child,
            libc::SCHED_IDLE,
            "hashing and fsync threads inherit it"
        );
        let normal = std::thread::spawn(|| {
            apply_priority(WriterPriority::Normal).unwrap();
            policy(&this_thread())
        })
        .join()
        .unwrap();
        assert_eq!(normal, libc::SCHED_OTHER);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_writer_thread_runs_in_the_background() {
        let run = tempfile::tempdir().unwrap();
        let dir = Arc::new(CheckpointDir::open(run.path()).unwrap());
        let mut saver = AsyncCheckpointer::new(dir).unwrap();
        let _ticket = saver.submit("a", Checkpoint::default()).unwrap();
        assert_eq!(saver.flush().unwrap().len(), 1);
        // Thread names are cut to 15 bytes in `comm`. Every test of this binary
        // leaves the default priority, so every writer thread must be idle-class.
        let comm: String = WRITER_THREAD_NAME.chars().take(15).collect();
        let writers: Vec<i32> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|e| {
                let tid = e.ok()?.file_name().into_string().ok()?;
                let name = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
                (name.trim_end() == comm).then(|| policy(&tid))
            })
            .collect();
        assert!(!writers.is_empty(), "the writer thread is alive until drop");
        assert!(
            writers.iter().all(|&p| p == libc::SCHED_IDLE),
            "{writers:?}"
        );
    }

    #[test]
    fn error_chain_joins_sources() {
        let e = Error::AsyncSaveFailed {
            checkpoint: "step=2".into(),
            source: Box::new(Error::AsyncWriter {
                reason: "panicked: boom".into(),
            }),
        };
        let s = error_chain(&e);
        assert!(s.contains("\"step=2\""), "{s}");
        assert!(
            s.ends_with("panicked: boom; this is a bug in relume, please report it"),
            "{s}"
        );
    }

    #[test]
    fn panic_message_reads_str_and_string() {
        let a: Box<dyn std::any::Any + Send> = Box::new("a");
        let b: Box<dyn std::any::Any + Send> = Box::new(String::from("b"));
        let c: Box<dyn std::any::Any + Send> = Box::new(3u8);
        assert_eq!(panic_message(a.as_ref()), "a");
        assert_eq!(panic_message(b.as_ref()), "b");
        assert_eq!(panic_message(c.as_ref()), "non-string panic payload");
    }

    #[test]
    fn snapshot_copy_copies_exactly() {
        for n in [0, 1, 4095, (4 << 20) + 13] {
            let src: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
            let copy = snapshot_copy(&src);
            assert_eq!(copy, src);
            assert_eq!(copy.capacity(), n);
        }
    }

    #[test]
    fn checkpointer_is_send() {
        fn is_send<T: Send>() {}
        is_send::<AsyncCheckpointer>();
    }
}
