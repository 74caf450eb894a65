//! The trainer: a [`TrainModule`], a [`Trainer`] with `fit`/`validate`/`test`/
//! `predict`, and the checkpoint connector whose resume is exact and verified.
//!
//! ```text
//! Trainer::builder()...build()?            settings (builder.rs), each with its default
//!   .fit(&mut module, &mut train, Some(&val))
//!      configure_optimizers → resolve ResumePolicy (resume.rs)
//!      → restore: load+checksums → counts → config diff → strict accounting
//!        → fingerprint of the live state == manifest's (connector.rs)
//!      → loop (fit.rs): batches → optimizer-step boundaries → validation,
//!        schedulers, callbacks' requests, checkpoints, preemption flag
//! ```
//!
//! Module map: [`module`] (the trait and optimizer configs), [`context`]
//! (`StepCtx`: log, rng, mode), [`metrics`] (aggregation), [`builder`] (settings),
//! [`resume`] (policy), [`loop_state`] (counters), [`config`] (the config block and
//! its diff), [`connector`] (save/restore), [`outcome`] (what `fit` returns),
//! [`fit`] and [`loops`] (the loops).

pub mod async_saves;
pub mod builder;
pub mod config;
pub mod connector;
pub mod context;
mod data_parallel;
pub mod fit;
pub mod loop_state;
pub mod loops;
pub mod metrics;
pub mod module;
pub mod outcome;
pub mod resume;
mod saving;

pub use builder::{ClipAlgorithm, Trainer, TrainerBuilder, TrainerConfig, ValCheck};
pub use config::diff_config;
pub use connector::{optimizer_component, scheduler_component, Restored};
pub use context::{Stage, StepCtx};
pub use loop_state::LoopState;
pub use metrics::{LogOpts, Metrics};
pub use module::{Interval, OptimizerConfig, SchedulerConfig, TrainModule};
pub use outcome::{FitOutcome, FitSummary};
pub use resume::{ResumePolicy, Source};
