//! Metric loggers: CSV and TensorBoard event files, with a step that continues
//! across resume.

use std::collections::BTreeMap;

use relume_ckpt::Stateful;

use crate::error::{Error, Result};

/// A metrics sink. `Stateful` holds what is needed to continue after a resume
/// without duplicating or losing rows (e.g. the byte length written so far).
pub trait Logger: Stateful<Error = Error> + Send {
    /// Stable state key, e.g. `"csv"` or `"tensorboard"`.
    fn name(&self) -> &str;

    /// Records `metrics` at `step`.
    ///
    /// # Errors
    /// I/O errors naming the file.
    fn log_metrics(&mut self, step: u64, metrics: &BTreeMap<String, f64>) -> Result<()>;

    /// Records the run's hyper-parameters once, at the start of fit.
    ///
    /// # Errors
    /// I/O errors naming the file.
    fn log_hyperparams(&mut self, _params: &serde_json::Value) -> Result<()> {
        Ok(())
    }

    /// Makes everything logged so far durable on disk (called before every
    /// checkpoint save and at the end of fit).
    ///
    /// # Errors
    /// I/O errors naming the file.
    fn flush(&mut self) -> Result<()>;
}
