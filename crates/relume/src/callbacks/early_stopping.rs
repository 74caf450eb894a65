//! [`EarlyStopping`]: stops training when a monitored metric stops improving.
//!
//! Checked after every validation run (or, with
//! [`EarlyStopping::check_on_train_epoch_end`], at the end of every training
//! epoch). In order, like Lightning: a non-finite value stops (`check_finite`);
//! reaching `stopping_threshold` stops; crossing `divergence_threshold` stops; an
//! improvement by more than `min_delta` resets the wait count, anything else
//! increments it, and `wait >= patience` stops. A stop is a request: the trainer
//! saves a checkpoint at that step boundary and returns `FitOutcome::Stopped`.
//!
//! The wait count, the best score and the step it stopped at are saved and
//! strictly restored, so an interrupted and resumed run stops at the same step.
//! A run that was stopped and is resumed again keeps checking with the restored
//! wait count (as Lightning does): it stops at the next check that does not
//! improve.
//!
//! A monitored metric that is missing when checked (e.g. no longer logged after a
//! resume) is [`Error::MetricNotLogged`] naming it, never a silent no-op.

use relume_ckpt::{RestoreReport, StateDict};

use super::monitor::{score_from_json, score_to_json, Mode};
use super::{Callback, HookCtx};
use crate::error::{Error, Result};

/// The early-stopping callback; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct EarlyStopping {
    monitor: String,
    mode: Mode,
    patience: u64,
    min_delta: f64,
    check_finite: bool,
    stopping_threshold: Option<f64>,
    divergence_threshold: Option<f64>,
    on_train_epoch_end: bool,
    // state
    wait: u64,
    best: f64,
    stopped_step: Option<u64>,
}

const KEYS: [&str; 3] = ["best", "stopped_step", "wait"];

impl EarlyStopping {
    /// Monitors `metric` in `mode`; patience 3, min_delta 0, check_finite on,
    /// no thresholds, checked after validation.
    pub fn new(metric: impl Into<String>, mode: Mode) -> Self {
        EarlyStopping {
            monitor: metric.into(),
            mode,
            patience: 3,
            min_delta: 0.0,
            check_finite: true,
            stopping_threshold: None,
            divergence_threshold: None,
            on_train_epoch_end: false,
            wait: 0,
            best: mode.worst(),
            stopped_step: None,
        }
    }

    /// Checks without improvement before stopping. Default 3.
    pub fn patience(mut self, n: u64) -> Self {
        self.patience = n;
        self
    }

    /// The least change that counts as an improvement (>= 0). Default 0.
    pub fn min_delta(mut self, d: f64) -> Self {
        self.min_delta = d.abs();
        self
    }

    /// Stop when the metric is NaN or infinite. Default true.
    pub fn check_finite(mut self, on: bool) -> Self {
        self.check_finite = on;
        self
    }

    /// Stop once the metric is at least this good. Default: none.
    pub fn stopping_threshold(mut self, v: f64) -> Self {
        self.stopping_threshold = Some(v);
        self
    }

    /// Stop once the metric is worse than this. Default: none.
    pub fn divergence_threshold(mut self, v: f64) -> Self {
        self.divergence_threshold = Some(v);
        self
    }

    /// Check at the end of each training epoch instead of after validation.
    /// Default false.
    pub fn check_on_train_epoch_end(mut self, on: bool) -> Self {
        self.on_train_epoch_end = on;
        self
    }

    /// Checks since the last improvement.
    pub fn wait_count(&self) -> u64 {
        self.wait
    }

    /// The best value seen (the mode's worst before any check).
    pub fn best_score(&self) -> f64 {
        self.best
    }

    /// The pure decision for one value: the new wait count, best, and the stop
    /// reason if any.
    pub fn evaluate(&self, current: f64) -> (u64, f64, Option<String>) {
        let m = &self.monitor;
        if self.check_finite && !current.is_finite() {
            return (
                self.wait,
                self.best,
                Some(format!("monitored metric {m} = {current} is not finite")),
            );
        }
        if let Some(t) = self.stopping_threshold {
            if !self.mode.better(t, current, 0.0) {
                return (
                    self.wait,
                    self.best,
                    Some(format!(
                        "monitored metric {m} = {current} reached the stopping threshold {t}"
                    )),
                );
            }
        }
        if let Some(t) = self.divergence_threshold {
            if self.mode.better(t, current, 0.0) {
                return (
                    self.wait,
                    self.best,
                    Some(format!(
                        "monitored metric {m} = {current} crossed the divergence threshold {t}"
                    )),
                );
            }
        }
        if self.mode.better(current, self.best, self.min_delta) {
            return (0, current, None);
        }
        let wait = self.wait + 1;
        let reason = (wait >= self.patience).then(|| {
            format!(
                "monitored metric {m} did not improve by more than {} in the last {wait} checks; best {}",
                self.min_delta, self.best
            )
        });
        (wait, self.best, reason)
    }

    fn check(&mut self, ctx: &mut HookCtx<'_>) -> Result<()> {
        let current = *ctx
            .metrics
            .get(&self.monitor)
            .ok_or_else(|| Error::MetricNotLogged {
                metric: self.monitor.clone(),
                needed_by: self.state_key(),
            })?;
        let (wait, best, stop) = self.evaluate(current);
        self.wait = wait;
        self.best = best;
        if let Some(reason) = stop {
            self.stopped_step = Some(ctx.progress.global_step);
            ctx.stop(format!("EarlyStopping: {reason}"));
        }
        Ok(())
    }
}

impl Callback for EarlyStopping {
    fn state_key(&self) -> String {
        format!(
            "EarlyStopping{{monitor={},mode={}}}",
            self.monitor,
            self.mode.as_str()
        )
    }

    fn state_dict(&self) -> Result<StateDict> {
        let mut sd = StateDict::new();
        sd.insert_json("wait", self.wait.into());
        sd.insert_json("best", score_to_json(self.best));
        sd.insert_json("stopped_step", serde_json::json!(self.stopped_step));
        Ok(sd)
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let mut r = RestoreReport::new();
        r.diff_keys(KEYS, state);
        if !r.is_clean() {
            return Ok(r);
        }
        let best = state.get_json("best").cloned().unwrap_or_default();
        self.best = score_from_json("best", &best)?;
        self.wait = state.require_value("wait")?;
        self.stopped_step = state.require_value("stopped_step")?;
        for k in KEYS {
            r.restored(k);
        }
        Ok(r)
    }

    fn on_validation_end(&mut self, ctx: &mut HookCtx<'_>) -> Result<()> {
        if self.on_train_epoch_end {
            return Ok(());
        }
        self.check(ctx)
    }

    fn on_train_epoch_end(&mut self, ctx: &mut HookCtx<'_>) -> Result<()> {
        if !self.on_train_epoch_end {
            return Ok(());
        }
        self.check(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patience_min_delta_and_thresholds() {
        let mut es = EarlyStopping::new("val_loss", Mode::Min)
            .patience(2)
            .min_delta(0.1);
        let (w, b, s) = es.evaluate(1.0);
        assert_eq!((w, b, s.is_none()), (0, 1.0, true));
        es.wait = w;
        es.best = b;
        let (w, _, s) = es.evaluate(0.95); // not by more than 0.1
        assert_eq!((w, s.is_none()), (1, true));
        es.wait = w;
        let (w, _, s) = es.evaluate(0.95);
        assert_eq!(w, 2);
        assert!(s.unwrap().contains("did not improve"));
        let es = EarlyStopping::new("acc", Mode::Max).stopping_threshold(0.9);
        assert!(es.evaluate(0.95).2.unwrap().contains("stopping threshold"));
        let es = EarlyStopping::new("l", Mode::Min).divergence_threshold(10.0);
        assert!(es.evaluate(11.0).2.unwrap().contains("divergence"));
        let es = EarlyStopping::new("l", Mode::Min);
        assert!(es.evaluate(f64::NAN).2.unwrap().contains("not finite"));
        let es = EarlyStopping::new("l", Mode::Min).check_finite(false);
        assert!(es.evaluate(f64::NAN).2.is_none());
    }

    #[test]
    fn state_round_trips_and_is_strict() {
        let mut es = EarlyStopping::new("val_loss", Mode::Min);
        es.wait = 2;
        es.best = 0.25;
        let sd = es.state_dict().unwrap();
        let mut back = EarlyStopping::new("val_loss", Mode::Min);
        assert!(back.load_state_dict(&sd).unwrap().is_clean());
        assert_eq!((back.wait, back.best), (2, 0.25));
        let mut bad = sd.clone();
        bad.remove("wait");
        assert_eq!(back.load_state_dict(&bad).unwrap().missing, vec!["wait"]);
    }
}
