//! [`Trainer`] and its builder: every setting, with its default.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use relume_ckpt::AllowList;

use crate::callbacks::Callback;
use crate::error::{Error, Result};
use crate::loggers::Logger;
use crate::preempt::Preemption;
use crate::trainer::resume::ResumePolicy;

/// When validation runs inside an epoch.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ValCheck {
    /// After every `n` optimizer steps of an epoch (and at its end).
    Steps(u64),
    /// After every `f × steps-per-epoch` optimizer steps (rounded, at least 1);
    /// `1.0` means once, at the end of the epoch.
    Fraction(f64),
}

/// How gradients are clipped before each optimizer step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipAlgorithm {
    /// Scale all gradients so their global L2 norm is at most the value.
    Norm,
    /// Clamp each gradient element to `[-value, value]`.
    Value,
}

/// Every trainer setting. Built by [`TrainerBuilder`]; see its setters for the
/// defaults.
#[derive(Clone, Debug)]
pub struct TrainerConfig {
    /// Epochs to train.
    pub max_epochs: u64,
    /// Optimizer steps to train (None: unbounded).
    pub max_steps: Option<u64>,
    /// Validation cadence inside an epoch.
    pub val_check_interval: ValCheck,
    /// Validate after every n-th epoch.
    pub check_val_every_n_epoch: u64,
    /// Training batches per epoch (None: all).
    pub limit_train_batches: Option<u64>,
    /// Validation batches per run (None: all).
    pub limit_val_batches: Option<u64>,
    /// Test batches per run (None: all).
    pub limit_test_batches: Option<u64>,
    /// Micro-batches per optimizer step.
    pub accumulate_grad_batches: u64,
    /// Clipping threshold and algorithm.
    pub gradient_clip: Option<(f64, ClipAlgorithm)>,
    /// Root seed of the trainer's RNG streams.
    pub seed: u64,
    /// Report step metrics every n optimizer steps.
    pub log_every_n_steps: u64,
    /// The run directory.
    pub default_root_dir: PathBuf,
    /// Whether `fit` writes checkpoints.
    pub enable_checkpointing: bool,
    /// Built-in save every n optimizer steps.
    pub checkpoint_every_n_steps: Option<u64>,
    /// Built-in save every n epochs (0: never).
    pub checkpoint_every_n_epochs: u64,
    /// Resume policy.
    pub resume: ResumePolicy,
    /// Keys exempt from strict restore.
    pub allow: AllowList,
    /// Config keys allowed to differ from the checkpoint's.
    pub config_overrides: Vec<String>,
    /// Print progress lines.
    pub enable_progress_bar: bool,
    /// Commit checkpoints on a background writer thread.
    pub async_checkpointing: bool,
    /// Async saves queued or in flight at once (>= 1).
    pub max_in_flight: usize,
    /// How the async writer thread is scheduled against training.
    pub async_writer_priority: relume_ckpt::WriterPriority,
    /// Storage the checkpoints are written through (None: the local filesystem).
    pub checkpoint_storage: Option<Arc<dyn relume_ckpt::Storage>>,
    /// Allow an optimizer step in which some or all of an optimizer's parameters
    /// got no gradient (otherwise [`crate::Error::MissingGradients`] or
    /// [`crate::Error::NoGradients`]).
    pub allow_steps_without_gradients: bool,
    /// When a resume raises `max_epochs`/`max_steps`, let the schedulers' settings
    /// change with it (see [`TrainerBuilder::extend_schedules`]).
    pub extend_schedules: bool,
    /// The process group of a data-parallel run (None: one process).
    pub collective: Option<Arc<dyn crate::dist::Collective>>,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            max_epochs: 1000,
            max_steps: None,
            val_check_interval: ValCheck::Fraction(1.0),
            check_val_every_n_epoch: 1,
            limit_train_batches: None,
            limit_val_batches: None,
            limit_test_batches: None,
            accumulate_grad_batches: 1,
            gradient_clip: None,
            seed: 0,
            log_every_n_steps: 50,
            default_root_dir: PathBuf::from("runs/default"),
            enable_checkpointing: true,
            checkpoint_every_n_steps: None,
            checkpoint_every_n_epochs: 1,
            resume: ResumePolicy::Never,
            allow: AllowList::none(),
            config_overrides: Vec::new(),
            enable_progress_bar: true,
            async_checkpointing: false,
            max_in_flight: relume_ckpt::DEFAULT_MAX_IN_FLIGHT,
            async_writer_priority: relume_ckpt::WriterPriority::default(),
            checkpoint_storage: None,
            allow_steps_without_gradients: false,
            extend_schedules: false,
            collective: None,
        }
    }
}

/// Runs the loops. Build with [`Trainer::builder`].
///
/// # Example
/// ```no_run
/// use relume::trainer::{ResumePolicy, Source, Trainer};
/// let trainer = Trainer::builder()
///     .max_epochs(30)
///     .default_root_dir("runs/digits")
///     .resume(ResumePolicy::IfExists(Source::Last))
///     .build()
///     .unwrap();
/// ```
pub struct Trainer {
    pub(crate) cfg: TrainerConfig,
    pub(crate) loggers: Vec<Box<dyn Logger>>,
    pub(crate) callbacks: Vec<Box<dyn Callback>>,
    pub(crate) interrupt: Vec<Interrupt>,
}

/// A source of "save and stop now" requests, read at every step boundary.
#[derive(Clone, Debug)]
pub(crate) enum Interrupt {
    /// A plain flag (set by the caller's own signal handler).
    Flag(Arc<AtomicBool>),
    /// relume's preemption handler (SIGTERM/SIGUSR1, optionally SIGINT).
    Preempt(Arc<Preemption>),
}

impl Interrupt {
    /// True when a stop was requested.
    pub(crate) fn is_set(&self) -> bool {
        match self {
            Interrupt::Flag(f) => f.load(std::sync::atomic::Ordering::SeqCst),
            Interrupt::Preempt(p) => p.is_requested(),
        }
    }
}

impl Trainer {
    /// A builder with every default.
    pub fn builder() -> TrainerBuilder {
        TrainerBuilder::default()
    }

    /// The settings.
    pub fn config(&self) -> &TrainerConfig {
        &self.cfg
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.cfg.default_root_dir
    }

    /// Where committed checkpoints live: `<run_dir>/checkpoints`.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.cfg.default_root_dir.join("checkpoints")
    }
}

/// Builds a [`Trainer`]; each setter states its default.
#[derive(Default)]
pub struct TrainerBuilder {
    cfg: TrainerConfig,
    loggers: Vec<Box<dyn Logger>>,
    callbacks: Vec<Box<dyn Callback>>,
    interrupt: Vec<Interrupt>,
}

impl TrainerBuilder {
    /// Epochs to train. Default 1000 (as Lightning). Raising it on resume is allowed.
    pub fn max_epochs(mut self, n: u64) -> Self {
        self.cfg.max_epochs = n;
        self
    }
    /// Stop after `n` optimizer steps. Default: unbounded. Raising it on resume is allowed.
    pub fn max_steps(mut self, n: u64) -> Self {
        self.cfg.max_steps = Some(n);
        self
    }
    /// Validation cadence inside an epoch. Default `ValCheck::Fraction(1.0)` (end of epoch).
    pub fn val_check_interval(mut self, v: ValCheck) -> Self {
        self.cfg.val_check_interval = v;
        self
    }
    /// Validate after every n-th epoch. Default 1.
    pub fn check_val_every_n_epoch(mut self, n: u64) -> Self {
        self.cfg.check_val_every_n_epoch = n;
        self
    }
    /// Use at most `n` training batches per epoch. Default: all.
    pub fn limit_train_batches(mut self, n: u64) -> Self {
        self.cfg.limit_train_batches = Some(n);
        self
    }
    /// Use at most `n` validation batches per run. Default: all.
    pub fn limit_val_batches(mut self, n: u64) -> Self {
        self.cfg.limit_val_batches = Some(n);
        self
    }
    /// Use at most `n` test batches. Default: all.
    pub fn limit_test_batches(mut self, n: u64) -> Self {
        self.cfg.limit_test_batches = Some(n);
        self
    }
    /// Micro-batches whose gradients add up to one optimizer step (the loss is
    /// divided by `n`). Default 1. The last batch of an epoch always steps.
    pub fn accumulate_grad_batches(mut self, n: u64) -> Self {
        self.cfg.accumulate_grad_batches = n;
        self
    }
    /// Clip gradients to `value` before each optimizer step. Default: no clipping.
    pub fn gradient_clip_val(mut self, value: f64) -> Self {
        let alg = self.cfg.gradient_clip.map_or(ClipAlgorithm::Norm, |c| c.1);
        self.cfg.gradient_clip = Some((value, alg));
        self
    }
    /// The clipping algorithm. Default `ClipAlgorithm::Norm` (only used with
    /// `gradient_clip_val`).
    pub fn gradient_clip_algorithm(mut self, alg: ClipAlgorithm) -> Self {
        if let Some(c) = &mut self.cfg.gradient_clip {
            c.1 = alg;
        } else {
            self.cfg.gradient_clip = Some((f64::NAN, alg));
        }
        self
    }
    /// Root seed of the trainer's RNG streams (`ctx.rng(..)`). Default 0.
    pub fn seed(mut self, seed: u64) -> Self {
        self.cfg.seed = seed;
        self
    }
    /// Report step metrics to loggers every n optimizer steps. Default 50.
    pub fn log_every_n_steps(mut self, n: u64) -> Self {
        self.cfg.log_every_n_steps = n;
        self
    }
    /// The run directory (`checkpoints/` lives under it). Default `runs/default`.
    ///
    /// An `s3://bucket/prefix` URL keeps the checkpoints in that bucket (feature `s3`,
    /// on by default): committed with a create-only marker, resumed and verified as
    /// local ones (see `relume_ckpt::remote`). Loggers are given their own, local,
    /// directories and stay local.
    pub fn default_root_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cfg.default_root_dir = dir.into();
        self
    }
    /// Whether `fit` writes checkpoints. Default true.
    pub fn enable_checkpointing(mut self, on: bool) -> Self {
        self.cfg.enable_checkpointing = on;
        self
    }
    /// Built-in save every n optimizer steps. Default: off. (Until a
    /// ModelCheckpoint callback is used.)
    pub fn checkpoint_every_n_steps(mut self, n: u64) -> Self {
        self.cfg.checkpoint_every_n_steps = Some(n);
        self
    }
    /// Built-in save at the end of every n-th epoch; 0 turns it off. Default 1.
    /// The end of training always saves (when checkpointing is enabled).
    pub fn checkpoint_every_n_epochs(mut self, n: u64) -> Self {
        self.cfg.checkpoint_every_n_epochs = n;
        self
    }
    /// Resume policy. Default `ResumePolicy::Never`.
    pub fn resume(mut self, policy: ResumePolicy) -> Self {
        self.cfg.resume = policy;
        self
    }
    /// Keys (of the form `component/key`, e.g. `optimizer/0` as a prefix) exempt
    /// from strict restore, e.g. for a weights-only fine-tune. Default: none.
    pub fn allow(mut self, allow: AllowList) -> Self {
        self.cfg.allow = allow;
        self
    }
    /// Lets the config key `key` (dotted, e.g. `train_loader.batch_size`) differ
    /// from the checkpoint's. Default: none may differ (except raising
    /// `max_epochs`/`max_steps`).
    pub fn override_config(mut self, key: impl Into<String>) -> Self {
        self.cfg.config_overrides.push(key.into());
        self
    }
    /// Adds a logger (saved as component `loggers/<name>`). Default: none.
    pub fn logger(mut self, logger: Box<dyn Logger>) -> Self {
        self.loggers.push(logger);
        self
    }
    /// Adds a callback (saved as component `callbacks/<state_key>`). Default: none.
    pub fn callback(mut self, callback: Box<dyn Callback>) -> Self {
        self.callbacks.push(callback);
        self
    }
    /// Print progress. Default true.
    pub fn enable_progress_bar(mut self, on: bool) -> Self {
        self.cfg.enable_progress_bar = on;
        self
    }
    /// A flag (set by a signal handler) checked at every optimizer-step boundary:
    /// when set, `fit` saves a checkpoint there and returns
    /// `FitOutcome::Interrupted`. Default: none.
    pub fn interrupt_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.interrupt.push(Interrupt::Flag(flag));
        self
    }
    /// relume's preemption handler, checked at every optimizer-step boundary
    /// exactly like [`TrainerBuilder::interrupt_flag`]: when a signal arrived,
    /// `fit` saves there and returns `FitOutcome::Interrupted`; exit with
    /// [`crate::preempt::PREEMPTED_EXIT_CODE`]. Default: none.
    pub fn preemption(mut self, preemption: Arc<Preemption>) -> Self {
        self.interrupt.push(Interrupt::Preempt(preemption));
        self
    }

    /// Commit checkpoints on a background writer thread (the training thread only
    /// copies the state). A failed write surfaces at the next step boundary as an
    /// error naming the checkpoint; every save is awaited at the end of `fit`, on
    /// a stop and on preemption. Default false.
    pub fn async_checkpointing(mut self, on: bool) -> Self {
        self.cfg.async_checkpointing = on;
        self
    }
    /// Async saves queued or in flight at once (each holds a copy of the state).
    /// Default 1 ([`relume_ckpt::DEFAULT_MAX_IN_FLIGHT`]).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.cfg.max_in_flight = n;
        self
    }
    /// How the async writer thread is scheduled: in the background (never
    /// preempting training; Linux `SCHED_IDLE`) or at normal priority, for runs
    /// that keep every core busy (see [`relume_ckpt::WriterPriority`]). Default
    /// [`relume_ckpt::WriterPriority::Background`].
    pub fn async_writer_priority(mut self, priority: relume_ckpt::WriterPriority) -> Self {
        self.cfg.async_writer_priority = priority;
        self
    }
    /// Trains data-parallel over `collective` (see [`crate::dist`]): each rank
    /// computes `accumulate_grad_batches / world_size` of every step's
    /// micro-batches, and every rank folds all of them in micro-batch order, so the
    /// run is byte-identical at every world size that divides
    /// `accumulate_grad_batches`. Rank 0 alone writes checkpoints and logs.
    /// Synchronous checkpointing only (async saves are refused).
    pub fn collective(mut self, collective: Arc<dyn crate::dist::Collective>) -> Self {
        self.cfg.collective = Some(collective);
        self
    }

    /// Writes checkpoints through `storage` (e.g. a [`relume_ckpt::FaultyStorage`]
    /// in failure-injection tests). Default: the local filesystem.
    pub fn checkpoint_storage(mut self, storage: Arc<dyn relume_ckpt::Storage>) -> Self {
        self.cfg.checkpoint_storage = Some(storage);
        self
    }

    /// Allows optimizer steps in which some or all of an optimizer's parameters
    /// got no gradient (for a module that deliberately trains some parameters only
    /// on some steps, such as a mixture of experts). Default `false`: such a step
    /// is [`crate::Error::MissingGradients`] (some) or [`crate::Error::NoGradients`]
    /// (all), because it usually means the loss does not reach those parameters
    /// and they would silently never train.
    pub fn allow_steps_without_gradients(mut self, on: bool) -> Self {
        self.cfg.allow_steps_without_gradients = on;
        self
    }

    /// Training longer: when a resume raises `max_epochs` or `max_steps`, the
    /// learning-rate schedulers may change their settings too (a schedule sized to
    /// the run's length, such as a cosine over every step, does). Their position
    /// (step counters) and current learning rates are restored from the checkpoint;
    /// from the next step on they follow the new settings, from where they stand.
    /// (PyTorch's chainable forms, as if the attribute were raised in place: a
    /// cosine that already reached its minimum stays there.) Every other setting is
    /// still compared, and a scheduler change without a larger limit is still
    /// [`crate::Error::ConfigChanged`]. The continued run equals an uninterrupted
    /// run of the longer length only when the schedule does not depend on the
    /// length. Default `false`.
    pub fn extend_schedules(mut self, on: bool) -> Self {
        self.cfg.extend_schedules = on;
        self
    }

    /// Validates and builds.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] naming the setting (a zero count, a clip value
    /// that is not positive and finite, a fraction outside (0, 1]).
    pub fn build(self) -> Result<Trainer> {
        let c = &self.cfg;
        let positive = [
            ("max_epochs", c.max_epochs),
            ("check_val_every_n_epoch", c.check_val_every_n_epoch),
            ("accumulate_grad_batches", c.accumulate_grad_batches),
            ("log_every_n_steps", c.log_every_n_steps),
            ("max_in_flight", c.max_in_flight as u64),
            (
                "checkpoint_every_n_steps",
                c.checkpoint_every_n_steps.unwrap_or(1),
            ),
            (
                "val_check_interval",
                match c.val_check_interval {
                    ValCheck::Steps(n) => n,
                    ValCheck::Fraction(_) => 1,
                },
            ),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(invalid(name, "0", "must be at least 1"));
            }
        }
        if let ValCheck::Fraction(f) = c.val_check_interval {
            if !(f > 0.0 && f <= 1.0) {
                return Err(invalid(
                    "val_check_interval",
                    &f.to_string(),
                    "a fraction must be in (0, 1]",
                ));
            }
        }
        if let Some((v, _)) = c.gradient_clip {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(
                    "gradient_clip_val",
                    &v.to_string(),
                    "must be finite and > 0 (set it when choosing an algorithm)",
                ));
            }
        }
        Ok(Trainer {
            cfg: self.cfg,
            loggers: self.loggers,
            callbacks: self.callbacks,
            interrupt: self.interrupt,
        })
    }
}

fn invalid(setting: &str, value: &str, rule: &str) -> Error {
    Error::InvalidSetting {
        setting: setting.to_string(),
        value: value.to_string(),
        rule: rule.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_setting_is_named() {
        let e = Trainer::builder()
            .accumulate_grad_batches(0)
            .build()
            .err()
            .unwrap();
        assert!(
            matches!(&e, Error::InvalidSetting { setting, .. } if setting == "accumulate_grad_batches")
        );
        let e = Trainer::builder()
            .gradient_clip_algorithm(ClipAlgorithm::Value)
            .build()
            .err()
            .unwrap();
        assert!(
            matches!(&e, Error::InvalidSetting { setting, .. } if setting == "gradient_clip_val")
        );
        assert!(Trainer::builder().gradient_clip_val(1.0).build().is_ok());
    }
}
