//! [`LearningRateMonitor`]: logs every parameter group's learning rate.
//!
//! Names follow Lightning: `lr-<Optimizer>` for an optimizer with one group,
//! `lr-<Optimizer>/pg<i>` (1-based) with several; a second optimizer of the same
//! kind gets `-1`, `-2`, ... appended to `<Optimizer>`. The rate logged at step
//! `s` is the one the optimizer used for step `s` (read before the step), and it
//! goes through the trainer's loggers with the step metrics (so it follows
//! `log_every_n_steps`). With [`LearningRateMonitor::logging_interval_epoch`] the
//! rates are logged once per epoch instead. Stateless.

use std::collections::BTreeMap;

use super::{Callback, HookCtx};
use crate::error::Result;

/// The learning-rate logging callback; see the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct LearningRateMonitor {
    per_epoch: bool,
    pending: Option<BTreeMap<String, f64>>,
}

impl LearningRateMonitor {
    /// Logs at every optimizer step (default).
    pub fn new() -> Self {
        Self::default()
    }

    /// Logs once per epoch (at its start) instead of every step. Default: per step.
    pub fn logging_interval_epoch(mut self) -> Self {
        self.per_epoch = true;
        self
    }

    /// The metric names and values for `lrs` (optimizer kind, rate per group), in
    /// optimizer order.
    pub fn names(lrs: &[(String, Vec<f64>)]) -> BTreeMap<String, f64> {
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        let mut out = BTreeMap::new();
        for (kind, groups) in lrs {
            let n = seen.entry(kind.as_str()).or_insert(0);
            let base = if *n == 0 {
                format!("lr-{kind}")
            } else {
                format!("lr-{kind}-{n}")
            };
            *n += 1;
            if groups.len() == 1 {
                out.insert(base, groups[0]);
            } else {
                for (g, lr) in groups.iter().enumerate() {
                    out.insert(format!("{base}/pg{}", g + 1), *lr);
                }
            }
        }
        out
    }
}

impl Callback for LearningRateMonitor {
    fn state_key(&self) -> String {
        "LearningRateMonitor".into()
    }

    fn on_train_epoch_start(&mut self, ctx: &mut HookCtx<'_>) -> Result<()> {
        if self.per_epoch {
            ctx.log_metrics(Self::names(ctx.lrs()));
        }
        Ok(())
    }

    fn on_train_batch_start(&mut self, ctx: &mut HookCtx<'_>) -> Result<()> {
        if !self.per_epoch && self.pending.is_none() {
            // The first micro-batch of a step: the rates this step will use.
            self.pending = Some(Self::names(ctx.lrs()));
        }
        Ok(())
    }

    fn on_train_batch_end(&mut self, ctx: &mut HookCtx<'_>, step_boundary: bool) -> Result<()> {
        if step_boundary {
            if let Some(m) = self.pending.take() {
                ctx.log_metrics(m);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_lightning() {
        let lrs = vec![
            ("Adam".to_string(), vec![0.1]),
            ("Sgd".to_string(), vec![0.2, 0.3]),
            ("Adam".to_string(), vec![0.4]),
        ];
        let m = LearningRateMonitor::names(&lrs);
        let want: BTreeMap<String, f64> = [
            ("lr-Adam", 0.1),
            ("lr-Sgd/pg1", 0.2),
            ("lr-Sgd/pg2", 0.3),
            ("lr-Adam-1", 0.4),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
        assert_eq!(m, want);
    }
}
