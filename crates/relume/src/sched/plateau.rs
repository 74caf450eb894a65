//! Metric-driven decay ([`ReduceLROnPlateau`]).

use relume_ckpt::{RestoreReport, StateDict, Stateful};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::decay::core_accessors;
use super::state::{check_setting, float_from_json, float_to_json, Core};
use super::LrScheduler;
use crate::error::{Error, Result};

/// Whether a lower or a higher metric is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlateauMode {
    /// Lower is better (a loss).
    Min,
    /// Higher is better (an accuracy).
    Max,
}

/// How `threshold` compares a metric with the best so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThresholdMode {
    /// Relative: better than `best * (1 ∓ threshold)`.
    Rel,
    /// Absolute: better than `best ∓ threshold`.
    Abs,
}

/// Settings of [`ReduceLROnPlateau`]; `Default` gives torch's defaults (also for
/// fields left out when deserialized).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlateauOptions {
    /// Default [`PlateauMode::Min`].
    pub mode: PlateauMode,
    /// New rate = rate * factor. Default `0.1`; must be in `[0, 1)`.
    pub factor: f64,
    /// Bad steps tolerated before reducing. Default `10`.
    pub patience: u64,
    /// Minimal significant improvement. Default `1e-4`.
    pub threshold: f64,
    /// Default [`ThresholdMode::Rel`].
    pub threshold_mode: ThresholdMode,
    /// Steps to wait after a reduction before counting bad steps again. Default `0`.
    pub cooldown: u64,
    /// Lower bound of the rate: empty (default) means 0 for every group, one value
    /// applies to every group, otherwise one per group.
    pub min_lrs: Vec<f64>,
    /// A reduction smaller than `eps` is skipped. Default `1e-8`.
    pub eps: f64,
}

impl Default for PlateauOptions {
    fn default() -> Self {
        PlateauOptions {
            mode: PlateauMode::Min,
            factor: 0.1,
            patience: 10,
            threshold: 1e-4,
            threshold_mode: ThresholdMode::Rel,
            cooldown: 0,
            min_lrs: Vec::new(),
            eps: 1e-8,
        }
    }
}

/// Reduces the rate by `factor` when the monitored metric stops improving for more
/// than `patience` steps (torch `ReduceLROnPlateau`). Every `step` needs the
/// metric; a NaN metric counts as no improvement, as in torch.
#[derive(Clone, Debug)]
pub struct ReduceLROnPlateau {
    core: Core,
    options: PlateauOptions,
    min_lrs: Vec<f64>,
    best: f64,
    num_bad_epochs: u64,
    cooldown_counter: u64,
}

const EXTRA_KEYS: [&str; 3] = ["best", "num_bad_epochs", "cooldown_counter"];

impl ReduceLROnPlateau {
    /// Watches a metric and reduces `base_lrs` (one per param group) on plateaus.
    ///
    /// # Errors
    /// [`crate::Error::InvalidHyperParameter`] for `factor` outside `[0, 1)`, a
    /// negative or non-finite threshold, eps, min lr or rate;
    /// [`crate::Error::InvalidSchedule`] for empty `base_lrs` or a `min_lrs` whose
    /// length is neither 0, 1 nor the number of groups.
    pub fn new(base_lrs: Vec<f64>, options: PlateauOptions) -> Result<Self> {
        const KIND: &str = "ReduceLROnPlateau";
        let o = &options;
        check_setting(
            KIND,
            "factor",
            o.factor,
            (0.0..1.0).contains(&o.factor),
            "in [0, 1)",
        )?;
        check_setting(KIND, "threshold", o.threshold, o.threshold >= 0.0, ">= 0")?;
        check_setting(KIND, "eps", o.eps, o.eps >= 0.0, ">= 0")?;
        let core = Core::new(KIND, base_lrs)?;
        let groups = core.lrs.len();
        let min_lrs = match o.min_lrs.len() {
            0 => vec![0.0; groups],
            1 => vec![o.min_lrs[0]; groups],
            n if n == groups => o.min_lrs.clone(),
            n => {
                return Err(Error::InvalidSchedule {
                    scheduler: KIND.into(),
                    reason: format!("min_lrs has {n} values but there are {groups} param groups; give one value or one per group"),
                })
            }
        };
        for (g, &m) in min_lrs.iter().enumerate() {
            check_setting(KIND, &format!("min_lrs.{g}"), m, m >= 0.0, ">= 0")?;
        }
        Ok(ReduceLROnPlateau {
            core,
            min_lrs,
            best: Self::worst(o.mode),
            options,
            num_bad_epochs: 0,
            cooldown_counter: 0,
        })
    }

    fn worst(mode: PlateauMode) -> f64 {
        match mode {
            PlateauMode::Min => f64::INFINITY,
            PlateauMode::Max => f64::NEG_INFINITY,
        }
    }

    fn is_better(&self, a: f64, best: f64) -> bool {
        let t = self.options.threshold;
        match (self.options.mode, self.options.threshold_mode) {
            (PlateauMode::Min, ThresholdMode::Rel) => a < best * (1.0 - t),
            (PlateauMode::Min, ThresholdMode::Abs) => a < best - t,
            (PlateauMode::Max, ThresholdMode::Rel) => a > best * (t + 1.0),
            (PlateauMode::Max, ThresholdMode::Abs) => a > best + t,
        }
    }
}

impl LrScheduler for ReduceLROnPlateau {
    core_accessors!();

    fn step(&mut self, metric: Option<f64>) -> Result<Vec<f64>> {
        let Some(current) = metric else {
            return Err(Error::MissingMetric {
                scheduler: self.core.kind.to_string(),
            });
        };
        let epoch = self.core.last_epoch + 1;
        let (mut best, mut bad, mut cooldown) =
            (self.best, self.num_bad_epochs, self.cooldown_counter);
        if self.is_better(current, best) {
            best = current;
            bad = 0;
        } else {
            bad += 1;
        }
        if cooldown > 0 {
            cooldown -= 1;
            bad = 0;
        }
        let mut lrs = self.core.lrs.clone();
        if bad > self.options.patience {
            for (lr, &min_lr) in lrs.iter_mut().zip(&self.min_lrs) {
                let new_lr = (*lr * self.options.factor).max(min_lr);
                if *lr - new_lr > self.options.eps {
                    *lr = new_lr;
                }
            }
            cooldown = self.options.cooldown;
            bad = 0;
        }
        let out = self.core.commit(epoch, lrs)?;
        self.best = best;
        self.num_bad_epochs = bad;
        self.cooldown_counter = cooldown;
        Ok(out)
    }

    fn config(&self) -> Value {
        let o = &self.options;
        json!({"kind": self.core.kind, "base_lrs": self.core.base_lrs, "mode": o.mode,
               "factor": o.factor, "patience": o.patience, "threshold": o.threshold,
               "threshold_mode": o.threshold_mode, "cooldown": o.cooldown,
               "min_lrs": self.min_lrs, "eps": o.eps})
    }

    fn needs_metric(&self) -> bool {
        true
    }
}

impl Stateful for ReduceLROnPlateau {
    type Error = Error;

    fn state_dict(&self) -> Result<StateDict> {
        let mut sd = self.core.save(&self.config())?;
        sd.insert_json("best", float_to_json(self.best));
        sd.insert_json("num_bad_epochs", Value::from(self.num_bad_epochs));
        sd.insert_json("cooldown_counter", Value::from(self.cooldown_counter));
        Ok(sd)
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let mut report = RestoreReport::new();
        let config = self.config();
        let Some(common) = self.core.load(&config, &EXTRA_KEYS, state, &mut report)? else {
            return Ok(report);
        };
        let best = float_from_json("best", state.require_json("best")?)?;
        let num_bad_epochs: u64 = state.require_value("num_bad_epochs")?;
        let cooldown_counter: u64 = state.require_value("cooldown_counter")?;
        self.core.apply(common);
        self.best = best;
        self.num_bad_epochs = num_bad_epochs;
        self.cooldown_counter = cooldown_counter;
        for k in EXTRA_KEYS {
            report.restored(k);
        }
        Ok(report)
    }
}
