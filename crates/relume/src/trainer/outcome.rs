//! What `fit` returns: how it ended ([`FitOutcome`]) and where it left the run
//! ([`FitSummary`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

/// How `fit` ended.
#[derive(Clone, Debug, PartialEq)]
pub enum FitOutcome {
    /// `max_epochs` or `max_steps` was reached.
    Completed(FitSummary),
    /// A callback requested a stop; a checkpoint was saved at that step.
    Stopped {
        /// Where the run stands.
        summary: FitSummary,
        /// The reason the callback gave.
        reason: String,
    },
    /// The interrupt flag or the [`Preemption`](crate::preempt::Preemption) was set
    /// (SIGTERM/SIGUSR1); a checkpoint was committed at the next step boundary, the
    /// loggers and async saves flushed. Exit with [`FitOutcome::exit_code`]
    /// ([`crate::PREEMPTED_EXIT_CODE`]) and run again with a `ResumePolicy` to continue.
    Interrupted(FitSummary),
    /// The checkpoint resumed from had already reached `max_epochs`/`max_steps`;
    /// nothing was trained. Raise them to continue.
    AlreadyFinished(FitSummary),
}

impl FitOutcome {
    /// The process exit code for this outcome: [`crate::PREEMPTED_EXIT_CODE`] (75)
    /// for `Interrupted`, so a requeue script can rerun the job; 0 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            FitOutcome::Interrupted(_) => crate::preempt::PREEMPTED_EXIT_CODE,
            _ => 0,
        }
    }

    /// The summary, whatever the outcome.
    pub fn summary(&self) -> &FitSummary {
        match self {
            FitOutcome::Completed(s)
            | FitOutcome::Interrupted(s)
            | FitOutcome::AlreadyFinished(s)
            | FitOutcome::Stopped { summary: s, .. } => s,
        }
    }
}

/// Where a `fit` call left the run.
#[derive(Clone, Debug, PartialEq)]
pub struct FitSummary {
    /// Optimizer steps taken in total (including before a resume).
    pub global_step: u64,
    /// Epoch the loop stands at.
    pub epoch: u64,
    /// The last checkpoint committed by this call.
    pub last_checkpoint: Option<PathBuf>,
    /// The checkpoint this call resumed from.
    pub resumed_from: Option<PathBuf>,
    /// The latest value of every metric.
    pub metrics: BTreeMap<String, f64>,
}
