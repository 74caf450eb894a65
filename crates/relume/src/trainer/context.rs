//! [`StepCtx`]: what a step of a [`TrainModule`](super::TrainModule) can see and do.

use candle_core::Tensor;

use crate::error::Result;
use crate::rng::{Rng, RngStreams};
use crate::trainer::metrics::{LogOpts, Metrics};

/// Which loop is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// `fit`, training batches.
    Train,
    /// Validation (inside `fit` or `validate`).
    Validate,
    /// `test`.
    Test,
    /// `predict`.
    Predict,
}

/// Handed to every `*_step`: logging, named RNG streams, and where the loop is.
pub struct StepCtx<'a> {
    stage: Stage,
    rng: &'a mut RngStreams,
    metrics: &'a mut Metrics,
    global_step: u64,
    epoch: u64,
    batch_idx: u64,
}

impl<'a> StepCtx<'a> {
    pub(crate) fn new(
        stage: Stage,
        rng: &'a mut RngStreams,
        metrics: &'a mut Metrics,
        global_step: u64,
        epoch: u64,
        batch_idx: u64,
    ) -> Self {
        StepCtx {
            stage,
            rng,
            metrics,
            global_step,
            epoch,
            batch_idx,
        }
    }

    /// True only in training batches: use it to enable dropout.
    pub fn training(&self) -> bool {
        self.stage == Stage::Train
    }

    /// The running stage.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The named random stream (`"dropout"`, ...), created from the trainer's seed
    /// on first use and saved in every checkpoint (component `rng`).
    pub fn rng(&mut self, name: &str) -> &mut Rng {
        self.rng.stream(name)
    }

    /// Optimizer steps taken so far.
    pub fn global_step(&self) -> u64 {
        self.global_step
    }

    /// Current epoch (0-based).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Index of this batch within its epoch (or validation/test run).
    pub fn batch_idx(&self) -> u64 {
        self.batch_idx
    }

    /// Logs `value` under `name` with the stage defaults (training: per step;
    /// validation/test: mean over the run). See [`crate::trainer::metrics`].
    pub fn log(&mut self, name: &str, value: f64) {
        self.log_with(name, value, LogOpts::default());
    }

    /// Logs `value` with explicit options.
    pub fn log_with(&mut self, name: &str, value: f64, opts: LogOpts) {
        let training = self.training();
        self.metrics.log(name, value, opts, training);
    }

    /// Logs a scalar tensor (read to `f64` now, so the aggregate is exact).
    ///
    /// # Errors
    /// When `value` is not a scalar (or a one-element tensor).
    pub fn log_tensor(&mut self, name: &str, value: &Tensor, opts: LogOpts) -> Result<()> {
        let v = value
            .flatten_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?;
        let [first] = v.as_slice() else {
            return Err(candle_core::Error::Msg(format!(
                "log_tensor({name}): expected one element, got {}",
                v.len()
            ))
            .into());
        };
        self.log_with(name, *first, opts);
        Ok(())
    }
}
