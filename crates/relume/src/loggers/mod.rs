//! Metric loggers: CSV and TensorBoard event files, with a step that continues
//! across resume.
//!
//! # Resume without duplicated or missing rows
//! A logger's [`Stateful`] state records how much of its file belonged to the run
//! at the moment of the checkpoint (a byte length, plus the CSV columns). The
//! trainer calls [`Logger::flush`] before every save, so that length is durable.
//! A killed run may have logged more steps after its last checkpoint; on
//! `load_state_dict` the logger truncates its file back to the saved length, so
//! the resumed run re-logs those steps exactly once.
//!
//! A logger that starts fresh (no state restored) owns its log directory: a
//! `metrics.csv` left by an earlier attempt that never checkpointed is truncated,
//! and stale TensorBoard event files are removed, on the first write.
//!
//! Layout of a run directory's logs:
//! ```text
//! <run_dir>/logs/metrics.csv                        CsvLogger
//! <run_dir>/logs/hparams.json                       CsvLogger::log_hyperparams
//! <run_dir>/logs/events.out.tfevents.<time>.<host>  TensorBoardLogger
//! ```

mod crc32c;
pub mod csv;
mod fsutil;
pub mod tensorboard;

pub use self::csv::CsvLogger;
pub use self::tensorboard::TensorBoardLogger;

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
