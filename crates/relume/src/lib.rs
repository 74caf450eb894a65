//! # relume
//!
//! A training framework on candle, in the PyTorch Lightning tradition, whose
//! checkpoints resume bit-for-bit or fail with an error naming what is wrong.
#![deny(missing_docs)]

pub mod convert;
pub mod data;
pub mod dist;
pub mod error;
pub mod loggers;
pub mod nn;
pub mod optim;
pub mod params;
pub mod preempt;
pub mod progress;
pub mod rng;
pub mod sched;
pub mod threads;
pub mod var_builder;
pub mod weights;

pub use error::{Error, Result};
pub use loggers::{CsvLogger, Logger, TensorBoardLogger};
pub use optim::{Adam, AdamConfig, AdamW, Sgd, SgdConfig};
pub use preempt::{Preemption, PreemptionBuilder, Trigger, PREEMPTED_EXIT_CODE};
pub use progress::{ProgressBar, ProgressConfig, ProgressMode};
pub use threads::set_cpu_threads;
pub mod callbacks;
pub(crate) mod state_json;
pub mod trainer;

pub use callbacks::{Callback, HookCtx, Request, SavedCheckpoint};
pub use callbacks::{EarlyStopping, LearningRateMonitor, Mode, ModelCheckpoint, Timer};
pub use trainer::{
    FitOutcome, LogOpts, OptimizerConfig, ResumePolicy, SchedulerConfig, Source, StepCtx,
    TrainModule, Trainer,
};
