//! Learning-rate schedulers with exact, exportable state, matching PyTorch.
//!
//! A scheduler is a pure state machine over the learning rates of an optimizer's
//! param groups. It is built from the optimizer's initial rates (`base_lrs`, one per
//! group); after construction [`LrScheduler::lrs`] holds the rates to use for the
//! first step (for [`LinearLR`] already scaled by `start_factor`). The trainer then
//! calls [`LrScheduler::step`] once per optimizer step or once per epoch (its
//! [`Interval`]) and applies the returned rates with `Optimizer::set_lr`.
//!
//! # Matching PyTorch bit for bit
//! Each scheduler replays torch's own arithmetic: where `torch.optim.lr_scheduler`
//! uses the chainable (recursive) `get_lr` form — `CosineAnnealingLR`,
//! `PolynomialLR`, `LinearLR`, `StepLR`, ... multiply or update the *current* rate —
//! relume does the same, in the same operation order, and uses the closed form
//! (`_get_closed_form_lr`) exactly where torch does (a child of [`SequentialLR`]
//! restarted at its milestone). `tests/sched_golden.rs` checks ten sequences that
//! torch itself produced.
//!
//! # State
//! [`Stateful`] exports JSON leaves: `kind`, `config` (the settings, as a JSON
//! string compared byte for byte on restore), `last_epoch`, `base_lrs`, `lrs` and
//! each scheduler's own counters (`t_i`/`t_cur`, `best`/`num_bad_epochs`/
//! `cooldown_counter`, `children/<i>/...` for [`SequentialLR`]). Floats are stored
//! as decimal strings in Rust's shortest round-trip form (`"0.1"`, `"4e-7"`,
//! `"inf"`), because serde_json's default number parser is not exact for every
//! 17-digit value; a string parses back to the very same bits. Restoring a state of
//! another kind is [`Error::StateKind`], a different number
//! of param groups is [`Error::StateMismatch`], a
//! non-finite rate is [`Error::InvalidHyperParameter`].
//! A restore is all or nothing: on any error the live scheduler is unchanged.
//!
//! # Example
//! ```
//! use relume::sched::{CosineAnnealingLR, LinearLR, LrScheduler, SequentialLR};
//! let base = vec![0.1];
//! let warmup = LinearLR::new(base.clone(), 0.1, 1.0, 5)?;
//! let cosine = CosineAnnealingLR::new(base.clone(), 25, 0.0)?;
//! let mut sched = SequentialLR::new(vec![Box::new(warmup), Box::new(cosine)], vec![5])?;
//! assert!((sched.lrs()[0] - 0.01).abs() < 1e-12);
//! for _ in 0..5 {
//!     sched.step(None)?;
//! }
//! assert_eq!(sched.lrs(), vec![0.1]);
//! # Ok::<(), relume::Error>(())
//! ```

use relume_ckpt::Stateful;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod cosine;
mod decay;
mod linear;
mod one_cycle;
mod plateau;
mod sequential;
mod spec;
mod state;

pub use cosine::{CosineAnnealingLR, CosineAnnealingWarmRestarts};
pub use decay::{ExponentialLR, MultiStepLR, StepLR};
pub use linear::{LinearLR, PolynomialLR};
pub use one_cycle::{AnnealStrategy, OneCycleLR, OneCycleOptions};
pub use plateau::{PlateauMode, PlateauOptions, ReduceLROnPlateau, ThresholdMode};
pub use sequential::SequentialLR;
pub use spec::SchedulerSpec;

/// How often the trainer steps a scheduler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interval {
    /// After every optimizer step.
    Step,
    /// After every epoch (after validation, for metric-driven schedulers).
    Epoch,
}

impl Interval {
    /// `"step"` or `"epoch"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Interval::Step => "step",
            Interval::Epoch => "epoch",
        }
    }
}

impl std::fmt::Display for Interval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The interface every scheduler implements.
pub trait LrScheduler: Stateful<Error = Error> + Send {
    /// Kind name, e.g. `"CosineAnnealingLR"`; saved and checked on restore.
    fn kind(&self) -> &'static str;

    /// The current learning rate of every param group (after construction this is
    /// the initial rate, e.g. already warmed by `start_factor` for `LinearLR`).
    fn lrs(&self) -> Vec<f64>;

    /// Advances one step (or epoch) and returns the new rates. `metric` is needed by
    /// `ReduceLROnPlateau` and ignored by the others. On error the scheduler is
    /// unchanged.
    ///
    /// # Errors
    /// `ReduceLROnPlateau` without a metric ([`Error::MissingMetric`]); a non-finite
    /// rate ([`Error::InvalidHyperParameter`]); `OneCycleLR` past its last step
    /// ([`Error::ScheduleExhausted`]).
    fn step(&mut self, metric: Option<f64>) -> Result<Vec<f64>>;

    /// The settings that change results, for the checkpoint config diff.
    fn config(&self) -> serde_json::Value;

    /// True when [`LrScheduler::step`] needs a metric (`ReduceLROnPlateau`).
    /// Default: `false`.
    fn needs_metric(&self) -> bool {
        false
    }

    /// True when [`LrScheduler::restart`] is supported, i.e. the scheduler can
    /// follow a milestone of [`SequentialLR`]. Default: `false`.
    fn supports_restart(&self) -> bool {
        false
    }

    /// Jumps to epoch 0 the way torch's `scheduler.step(0)` does (closed form where
    /// torch has one) and returns the new rates; [`SequentialLR`] calls it when a
    /// milestone hands over to this scheduler.
    ///
    /// # Errors
    /// [`Error::InvalidSchedule`] by default (unsupported); a non-finite rate.
    fn restart(&mut self) -> Result<Vec<f64>> {
        Err(Error::InvalidSchedule {
            scheduler: self.kind().to_string(),
            reason: "this scheduler cannot be restarted at a SequentialLR milestone".into(),
        })
    }
}
