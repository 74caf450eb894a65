//! `validate`, `test` and `predict`: evaluation loops outside `fit`.
//!
//! They run on the module's current parameters, in eval mode
//! (`ctx.training() == false`), without `backward`, and change no training state:
//! they draw from a private RNG stream set seeded by the trainer's seed.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::data::{Cursor, DataLoader};
use crate::error::Result;
use crate::rng::RngStreams;
use crate::trainer::builder::Trainer;
use crate::trainer::context::{Stage, StepCtx};
use crate::trainer::fit::run_eval;
use crate::trainer::metrics::Metrics;
use crate::trainer::module::TrainModule;

impl Trainer {
    /// Runs `validation_step` over `loader` (at most `limit_val_batches`) and returns
    /// the reduced metrics.
    ///
    /// # Errors
    /// Any error of a step or of the loader.
    pub fn validate<M>(
        &mut self,
        module: &mut M,
        loader: &DataLoader<M::Batch>,
    ) -> Result<BTreeMap<String, f64>>
    where
        M: TrainModule,
        M::Batch: Send + 'static,
    {
        let mut rng = RngStreams::new(self.cfg.seed);
        let mut m = run_eval(
            module,
            loader,
            Stage::Validate,
            self.cfg.limit_val_batches,
            &mut rng,
            0,
            0,
        )?;
        Ok(m.take_epoch())
    }

    /// Runs `test_step` over `loader` (at most `limit_test_batches`) and returns the
    /// reduced metrics.
    ///
    /// # Errors
    /// Any error of a step or of the loader.
    pub fn test<M>(
        &mut self,
        module: &mut M,
        loader: &DataLoader<M::Batch>,
    ) -> Result<BTreeMap<String, f64>>
    where
        M: TrainModule,
        M::Batch: Send + 'static,
    {
        let mut rng = RngStreams::new(self.cfg.seed);
        let mut m = run_eval(
            module,
            loader,
            Stage::Test,
            self.cfg.limit_test_batches,
            &mut rng,
            0,
            0,
        )?;
        Ok(m.take_epoch())
    }

    /// Runs `predict_step` over every batch of `loader` and returns the outputs in
    /// loader order.
    ///
    /// # Errors
    /// [`crate::Error::NotImplemented`] when the module has no `predict_step`; any
    /// error of a step or of the loader.
    pub fn predict<M>(
        &mut self,
        module: &mut M,
        loader: &DataLoader<M::Batch>,
    ) -> Result<Vec<Tensor>>
    where
        M: TrainModule,
        M::Batch: Send + 'static,
    {
        let mut rng = RngStreams::new(self.cfg.seed);
        let mut metrics = Metrics::default();
        loader.set_cursor(Cursor::default());
        let mut out = Vec::new();
        for (i, batch) in loader.epoch_iter()?.enumerate() {
            let mut ctx = StepCtx::new(Stage::Predict, &mut rng, &mut metrics, 0, 0, i as u64);
            out.push(module.predict_step(batch?, &mut ctx)?);
        }
        Ok(out)
    }
}
