//! Learning-rate schedulers with exact, exportable state, matching PyTorch.
//!
//! A scheduler is a pure state machine over learning rates: the trainer calls
//! [`LrScheduler::step`] once per step or per epoch (its interval) and applies the
//! returned rates to the optimizer with `Optimizer::set_lr`.

use relume_ckpt::Stateful;

use crate::error::{Error, Result};

/// The interface every scheduler implements.
pub trait LrScheduler: Stateful<Error = Error> + Send {
    /// Kind name, e.g. `"CosineAnnealingLR"`; saved and checked on restore.
    fn kind(&self) -> &'static str;

    /// The current learning rate of every param group (after construction this is
    /// the initial rate, e.g. already warmed by `start_factor` for `LinearLR`).
    fn lrs(&self) -> Vec<f64>;

    /// Advances one step (or epoch) and returns the new rates. `metric` is needed by
    /// `ReduceLROnPlateau` and ignored by the others.
    ///
    /// # Errors
    /// `ReduceLROnPlateau` without a metric; a non-finite rate.
    fn step(&mut self, metric: Option<f64>) -> Result<Vec<f64>>;

    /// The settings that change results, for the checkpoint config diff.
    fn config(&self) -> serde_json::Value;
}
