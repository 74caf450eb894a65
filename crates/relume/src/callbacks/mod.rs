//! The [`Callback`] trait: hooks into the training loop, with saved state.
//!
//! A callback observes the loop through its hooks and changes it only by
//! **requesting** actions through the [`HookCtx`] it is handed: save a checkpoint
//! under a name, delete a checkpoint (retention), or stop training. The trainer
//! carries the requests out at the next optimizer-step boundary, in a fixed order:
//!
//! 1. every requested save is committed (through the connector's single save
//!    function), or, with `async_checkpointing`, snapshotted and handed to the
//!    writer thread;
//! 2. `on_save_checkpoint` is called on every callback for every commit (for an
//!    async save: when the writer reports the commit, at a later step boundary or
//!    the final flush);
//! 3. only then are requested deletions carried out (never the checkpoint the run
//!    resumed from, never outside the run directory); a save that failed never
//!    gets its deletions;
//! 4. a stop request saves a checkpoint at the boundary (if none was saved there)
//!    and ends `fit` with `FitOutcome::Stopped`.
//!
//! Built-in callbacks: [`ModelCheckpoint`] (top-k, last, schedules; retention in
//! [`retention`] as pure functions), [`EarlyStopping`], [`LearningRateMonitor`]
//! and [`Timer`].
//!
//! This keeps policy (ModelCheckpoint's top-k, EarlyStopping's patience) in plain
//! callbacks that can be unit-tested without a disk, while every write and delete
//! goes through the trainer, after the commit.
//!
//! ## State
//! A callback's state is saved as the checkpoint component
//! `callbacks/<state_key>` and restored strictly: a live callback whose state is
//! absent from the checkpoint, or saved state with no live callback, is an error
//! unless allow-listed. Two callbacks of one type with different identity settings
//! must return different [`Callback::state_key`]s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use relume_ckpt::{RestoreReport, StateDict};

use crate::error::{Error, Result};

pub mod early_stopping;
pub mod filename;
pub mod lr_monitor;
pub mod model_checkpoint;
pub mod monitor;
pub mod retention;
pub mod timer;

pub use early_stopping::EarlyStopping;
pub use lr_monitor::LearningRateMonitor;
pub use model_checkpoint::ModelCheckpoint;
pub use monitor::Mode;
pub use timer::Timer;

/// Where the loop stands when a hook runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Optimizer steps taken so far.
    pub global_step: u64,
    /// Current epoch (0-based); after an epoch ends it is the next epoch.
    pub epoch: u64,
    /// Training batches consumed in the current epoch.
    pub batch_in_epoch: u64,
}

/// An action a hook asks the trainer to carry out at the next step boundary.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    /// Commit a checkpoint named `name` (a directory name under
    /// `<run_dir>/checkpoints/`), recording `metrics` in its manifest.
    Save {
        /// Checkpoint directory name, e.g. `"epoch=3-val_loss=0.1234"`.
        name: String,
        /// Metrics to record (merged over the trainer's current metrics).
        metrics: BTreeMap<String, f64>,
    },
    /// Delete the committed checkpoint `name` after this boundary's saves commit.
    Delete {
        /// Checkpoint directory name.
        name: String,
    },
    /// Stop training: save at this boundary and return `FitOutcome::Stopped`.
    Stop {
        /// Why (logged and returned).
        reason: String,
    },
    /// Report `metrics` to the loggers at the current step (with the step's own
    /// metrics when requested before the optimizer step).
    Log {
        /// Metric name → value.
        metrics: BTreeMap<String, f64>,
    },
}

/// What a hook sees and how it requests actions.
#[derive(Debug)]
pub struct HookCtx<'a> {
    /// Loop position.
    pub progress: Progress,
    /// The latest value of every logged metric (step values, epoch aggregates,
    /// validation results).
    pub metrics: &'a BTreeMap<String, f64>,
    /// The run directory.
    pub run_dir: &'a Path,
    /// The checkpoint this run resumed from, if any (retention must keep it).
    pub resumed_from: Option<&'a Path>,
    requests: &'a mut Vec<Request>,
    lrs: Vec<(String, Vec<f64>)>,
    has_validation: bool,
    global_zero: bool,
}

impl<'a> HookCtx<'a> {
    /// A context recording requests into `requests`.
    pub fn new(
        progress: Progress,
        metrics: &'a BTreeMap<String, f64>,
        run_dir: &'a Path,
        resumed_from: Option<&'a Path>,
        requests: &'a mut Vec<Request>,
    ) -> Self {
        HookCtx {
            progress,
            metrics,
            run_dir,
            resumed_from,
            requests,
            lrs: Vec::new(),
            has_validation: true,
            global_zero: true,
        }
    }

    /// Adds the optimizers' learning rates (kind, rate per group, in optimizer
    /// order), as seen by [`HookCtx::lrs`].
    pub fn with_lrs(mut self, lrs: Vec<(String, Vec<f64>)>) -> Self {
        self.lrs = lrs;
        self
    }

    /// Says whether this fit has a validation loop (default `true`), as seen by
    /// [`HookCtx::has_validation`].
    pub fn with_validation(mut self, on: bool) -> Self {
        self.has_validation = on;
        self
    }

    /// Says whether this process is rank 0 of a data-parallel run (default `true`),
    /// as seen by [`HookCtx::is_global_zero`].
    pub fn with_global_zero(mut self, zero: bool) -> Self {
        self.global_zero = zero;
        self
    }

    /// Whether this is rank 0 (or the only rank): Lightning's
    /// `trainer.is_global_zero`. Every rank runs every hook; a hook that only
    /// reports (a log line, a file of its own) should do so on rank 0 alone.
    pub fn is_global_zero(&self) -> bool {
        self.global_zero
    }

    /// Whether this fit has a validation loop: without one, a metric that is not
    /// logged by the end of a training epoch never will be.
    pub fn has_validation(&self) -> bool {
        self.has_validation
    }

    /// Every optimizer's kind and current learning rate per parameter group.
    pub fn lrs(&self) -> &[(String, Vec<f64>)] {
        &self.lrs
    }

    /// Asks for `metrics` to be reported to the loggers at the current step.
    pub fn log_metrics(&mut self, metrics: BTreeMap<String, f64>) {
        if !metrics.is_empty() {
            self.requests.push(Request::Log { metrics });
        }
    }

    /// Asks for a checkpoint named `name` at the next step boundary.
    pub fn save_checkpoint(&mut self, name: impl Into<String>, metrics: BTreeMap<String, f64>) {
        self.requests.push(Request::Save {
            name: name.into(),
            metrics,
        });
    }

    /// Asks for the checkpoint `name` to be deleted once this boundary's saves
    /// have committed.
    pub fn delete_checkpoint(&mut self, name: impl Into<String>) {
        self.requests.push(Request::Delete { name: name.into() });
    }

    /// Asks the trainer to stop at the next step boundary (after saving).
    pub fn stop(&mut self, reason: impl Into<String>) {
        self.requests.push(Request::Stop {
            reason: reason.into(),
        });
    }

    /// The requests recorded so far.
    pub fn requests(&self) -> &[Request] {
        self.requests
    }
}

/// A committed checkpoint, as reported to [`Callback::on_save_checkpoint`].
#[derive(Clone, Debug, PartialEq)]
pub struct SavedCheckpoint {
    /// Directory name under `checkpoints/`.
    pub name: String,
    /// Full path of the committed checkpoint.
    pub path: PathBuf,
    /// Loop position it holds.
    pub progress: Progress,
    /// Metrics recorded in its manifest.
    pub metrics: BTreeMap<String, f64>,
}

/// A hook into the training loop. Every hook has a no-op default; a stateless
/// callback implements only [`Callback::state_key`] and the hooks it needs.
///
/// Hooks return `Result`: an error aborts `fit` (after `on_exception` runs on
/// every callback) and is returned to the caller.
pub trait Callback: Send {
    /// Stable key of this callback's state (`"ModelCheckpoint{monitor=val_loss,mode=min}"`).
    /// Must differ between two callbacks of one run.
    fn state_key(&self) -> String;

    /// The state to checkpoint. Default: none (a stateless callback).
    ///
    /// # Errors
    /// When the state cannot be exported.
    fn state_dict(&self) -> Result<StateDict> {
        Ok(StateDict::new())
    }

    /// Restores saved state and accounts for every key. Default: every saved key
    /// is unexpected (a stateless callback has nothing to restore).
    ///
    /// # Errors
    /// When the state cannot be applied at all.
    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let mut r = RestoreReport::new();
        for k in state.keys() {
            r.unexpected(k);
        }
        Ok(r)
    }

    /// For `Source::Best`: given this callback's state as saved in the latest
    /// checkpoint, the path of the best checkpoint, if the callback tracks one.
    fn best_checkpoint(&self, _saved_state: &StateDict) -> Option<PathBuf> {
        None
    }

    /// Called once when `fit` starts (after any restore).
    ///
    /// # Errors
    /// Aborts `fit`.
    fn on_fit_start(&mut self, _ctx: &mut HookCtx<'_>) -> Result<()> {
        Ok(())
    }

    /// Called once when `fit` ends normally (not on error).
    ///
    /// # Errors
    /// Aborts `fit`.
    fn on_fit_end(&mut self, _ctx: &mut HookCtx<'_>) -> Result<()> {
        Ok(())
    }

    /// Called once at the step boundary where training completes (`max_epochs` or
    /// `max_steps` reached, no stop requested, not interrupted), before that
    /// boundary's checkpoints are taken: their state is the final state of the
    /// run. Then come the final save, the flush of async saves and
    /// [`Callback::on_fit_end`].
    ///
    /// # Errors
    /// Aborts `fit`.
    fn on_train_end(&mut self, _ctx: &mut HookCtx<'_>) -> Result<()> {
        Ok(())
    }

    /// Called when a training epoch starts from its first batch (not when a run
    /// resumes mid-epoch).
    ///
    /// # Errors
    /// Aborts `fit`.
    fn on_train_epoch_start(&mut self, _ctx: &mut HookCtx<'_>) -> Result<()> {
        Ok(())
    }

    /// Called when a training epoch ends, after its validation and epoch-interval
    /// schedulers, before the epoch's checkpoint.
    ///
    /// # Errors
    /// Aborts `fit`.
    fn on_train_epoch_end(&mut self, _ctx: &mut HookCtx<'_>) -> Result<()> {
        Ok(())
    }

    /// Called before each training batch (micro-batch under accumulation).
    ///
    /// # Errors
    /// Aborts `fit`.
    fn on_train_batch_start(&mut self, _ctx: &mut HookCtx<'_>) -> Result<()> {
        Ok(())
    }

    /// Called after each training batch; `step_boundary` is true when an optimizer
    /// step was just taken (requests are carried out right after this hook).
    ///
    /// # Errors
    /// Aborts `fit`.
    fn on_train_batch_end(&mut self, _ctx: &mut HookCtx<'_>, _step_boundary: bool) -> Result<()> {
        Ok(())
    }

    /// Called after each validation run, with its aggregated metrics in `ctx.metrics`.
    ///
    /// # Errors
    /// Aborts `fit`.
    fn on_validation_end(&mut self, _ctx: &mut HookCtx<'_>) -> Result<()> {
        Ok(())
    }

    /// Called after a checkpoint has **committed** (so retention requested here
    /// runs strictly after the commit). With async checkpointing it runs when the
    /// writer reports the commit; `ctx.progress` is then the loop's current
    /// position and `saved.progress` the checkpoint's.
    ///
    /// # Errors
    /// Aborts `fit`.
    fn on_save_checkpoint(
        &mut self,
        _ctx: &mut HookCtx<'_>,
        _saved: &SavedCheckpoint,
    ) -> Result<()> {
        Ok(())
    }

    /// Called after a resume restored and verified every component (this
    /// callback's state included).
    ///
    /// # Errors
    /// Aborts `fit`.
    fn on_load_checkpoint(&mut self, _ctx: &mut HookCtx<'_>, _checkpoint: &Path) -> Result<()> {
        Ok(())
    }

    /// Called when `fit` fails, before the error is returned. Must not fail.
    fn on_exception(&mut self, _error: &Error) {}
}
