//! [`TrainModule`]: the model-side half of training (LightningModule's counterpart).

use candle_core::Tensor;
use relume_ckpt::{RestoreReport, StateDict};

use crate::error::{Error, Result};
use crate::optim::Optimizer;
use crate::params::ParamStore;
use crate::sched::LrScheduler;
use crate::trainer::context::StepCtx;

pub use crate::sched::Interval;

/// A scheduler attached to one optimizer.
pub struct SchedulerConfig {
    /// The scheduler. Its `lrs()` are applied to the optimizer when a fresh run
    /// starts, and the rates returned by each `step` afterwards.
    pub scheduler: Box<dyn LrScheduler>,
    /// Step or epoch.
    pub interval: Interval,
    /// Step the scheduler every `frequency` intervals (>= 1).
    pub frequency: u64,
    /// Metric passed to `step` (for `ReduceLROnPlateau`), e.g. `"val_loss"`; it must
    /// have been logged when the scheduler steps.
    pub monitor: Option<String>,
}

impl SchedulerConfig {
    /// `scheduler` stepping every optimizer step, with no monitored metric.
    pub fn per_step(scheduler: impl LrScheduler + 'static) -> Self {
        SchedulerConfig {
            scheduler: Box::new(scheduler),
            interval: Interval::Step,
            frequency: 1,
            monitor: None,
        }
    }

    /// `scheduler` stepping every epoch, with no monitored metric.
    pub fn per_epoch(scheduler: impl LrScheduler + 'static) -> Self {
        SchedulerConfig {
            scheduler: Box::new(scheduler),
            interval: Interval::Epoch,
            frequency: 1,
            monitor: None,
        }
    }

    /// Steps every `frequency` intervals instead of every one.
    pub fn frequency(mut self, frequency: u64) -> Self {
        self.frequency = frequency;
        self
    }

    /// Passes the latest value of `metric` to `step`.
    pub fn monitor(mut self, metric: impl Into<String>) -> Self {
        self.monitor = Some(metric.into());
        self
    }

    /// The settings that change results (scheduler spec, interval, frequency,
    /// monitor), for the checkpoint config.
    pub fn config(&self) -> serde_json::Value {
        serde_json::json!({
            "spec": self.scheduler.config(),
            "interval": self.interval,
            "frequency": self.frequency,
            "monitor": self.monitor,
        })
    }
}

/// One optimizer with its optional scheduler.
///
/// Each optimizer owns the parameters it was built with (`Optimizer::params`): with
/// several optimizers, build each over the subset of the module's parameters it
/// should update (e.g. `store.named_vars_with_prefix("encoder.")`). A parameter
/// owned by two optimizers is an error.
pub struct OptimizerConfig {
    /// The optimizer.
    pub optimizer: Box<dyn Optimizer>,
    /// Its scheduler, if any.
    pub scheduler: Option<SchedulerConfig>,
}

impl OptimizerConfig {
    /// An optimizer without scheduler.
    pub fn new(optimizer: impl Optimizer + 'static) -> Self {
        OptimizerConfig {
            optimizer: Box::new(optimizer),
            scheduler: None,
        }
    }

    /// Attaches a scheduler.
    pub fn with_scheduler(mut self, scheduler: SchedulerConfig) -> Self {
        self.scheduler = Some(scheduler);
        self
    }
}

/// The model side of training: parameters, steps and optimizers.
///
/// Only [`TrainModule::params`], [`TrainModule::training_step`] and
/// [`TrainModule::configure_optimizers`] are required.
///
/// ## Randomness and modes
/// Use [`StepCtx::rng`] for every random draw in a step (dropout masks), and
/// [`StepCtx::training`] to switch dropout off: validation, test and predict run
/// with `training() == false` and never call `backward`.
///
/// ## User state
/// State that is not a parameter (a running statistic, a curriculum counter) is
/// saved through [`TrainModule::on_save_checkpoint`] as the `user` component and
/// restored with strict accounting by [`TrainModule::on_load_checkpoint`].
pub trait TrainModule {
    /// What one loader batch is.
    type Batch;

    /// Every trainable parameter (the `model` component of checkpoints).
    fn params(&self) -> &ParamStore;

    /// One training step on `batch`; returns the scalar loss to minimise.
    ///
    /// # Errors
    /// Any error aborts `fit`.
    fn training_step(&mut self, batch: Self::Batch, ctx: &mut StepCtx<'_>) -> Result<Tensor>;

    /// One validation step; log metrics with `ctx.log`. Default: nothing.
    ///
    /// # Errors
    /// Any error aborts the loop.
    fn validation_step(&mut self, _batch: Self::Batch, _ctx: &mut StepCtx<'_>) -> Result<()> {
        Ok(())
    }

    /// One test step; log metrics with `ctx.log`. Default: nothing.
    ///
    /// # Errors
    /// Any error aborts the loop.
    fn test_step(&mut self, _batch: Self::Batch, _ctx: &mut StepCtx<'_>) -> Result<()> {
        Ok(())
    }

    /// One prediction step. Default: [`Error::NotImplemented`].
    ///
    /// # Errors
    /// [`Error::NotImplemented`] unless overridden.
    fn predict_step(&mut self, _batch: Self::Batch, _ctx: &mut StepCtx<'_>) -> Result<Tensor> {
        Err(Error::NotImplemented {
            hook: "TrainModule::predict_step",
        })
    }

    /// The optimizers (each with an optional scheduler). Called once per `fit`,
    /// before any restore.
    ///
    /// # Errors
    /// Invalid hyper-parameters.
    fn configure_optimizers(&self) -> Result<Vec<OptimizerConfig>>;

    /// User state to checkpoint as the `user` component. Default: none.
    ///
    /// # Errors
    /// When the state cannot be exported.
    fn on_save_checkpoint(&self) -> Result<StateDict> {
        Ok(StateDict::new())
    }

    /// Restores user state saved by [`TrainModule::on_save_checkpoint`] and accounts
    /// for every key. Default: every saved key is unexpected.
    ///
    /// # Errors
    /// When the state cannot be applied at all.
    fn on_load_checkpoint(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let mut r = RestoreReport::new();
        for k in state.keys() {
            r.unexpected(k);
        }
        Ok(r)
    }
}
