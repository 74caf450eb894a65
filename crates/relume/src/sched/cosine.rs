//! Cosine annealing: [`CosineAnnealingLR`] and [`CosineAnnealingWarmRestarts`].

use std::f64::consts::PI;

use relume_ckpt::{RestoreReport, StateDict, Stateful};
use serde_json::{json, Value};

use super::decay::{core_accessors, core_only_stateful};
use super::state::{check_setting, Core};
use super::LrScheduler;
use crate::error::{Error, Result};

/// Cosine annealing from the base rate to `eta_min` over `t_max` steps, then back
/// up (torch `CosineAnnealingLR`, which keeps following the cosine past `t_max`).
///
/// `step()` uses torch's recursive form, `(1 + cos(πe/T)) / (1 + cos(π(e-1)/T)) ·
/// (lr - eta_min) + eta_min`, so rates agree with torch to the last bit; a restart
/// at a [`SequentialLR`](super::SequentialLR) milestone uses the closed form.
#[derive(Clone, Debug)]
pub struct CosineAnnealingLR {
    core: Core,
    t_max: u64,
    eta_min: f64,
}

impl CosineAnnealingLR {
    /// Anneals `base_lrs` (one per param group) to `eta_min` over `t_max` steps.
    ///
    /// # Errors
    /// [`crate::Error::InvalidHyperParameter`] for `t_max == 0` or a non-finite
    /// `eta_min` or rate; [`crate::Error::InvalidSchedule`] for empty `base_lrs`.
    pub fn new(base_lrs: Vec<f64>, t_max: u64, eta_min: f64) -> Result<Self> {
        const KIND: &str = "CosineAnnealingLR";
        check_setting(KIND, "t_max", t_max as f64, t_max >= 1, ">= 1")?;
        check_setting(KIND, "eta_min", eta_min, eta_min >= 0.0, ">= 0")?;
        Ok(CosineAnnealingLR {
            core: Core::new(KIND, base_lrs)?,
            t_max,
            eta_min,
        })
    }
}

impl LrScheduler for CosineAnnealingLR {
    core_accessors!();

    fn step(&mut self, _metric: Option<f64>) -> Result<Vec<f64>> {
        let epoch = self.core.last_epoch + 1;
        let (e, t, eta) = (epoch as f64, self.t_max as f64, self.eta_min);
        // Python's `%` is a floor modulo: rem_euclid on signed values.
        let phase = (epoch as i128 - 1 - self.t_max as i128).rem_euclid(2 * self.t_max as i128);
        let lrs = self
            .core
            .lrs
            .iter()
            .zip(&self.core.base_lrs)
            .map(|(&lr, &base)| {
                if phase == 0 {
                    lr + (base - eta) * (1.0 - (PI / t).cos()) / 2.0
                } else {
                    (1.0 + (PI * e / t).cos()) / (1.0 + (PI * (e - 1.0) / t).cos()) * (lr - eta)
                        + eta
                }
            })
            .collect();
        self.core.commit(epoch, lrs)
    }

    fn config(&self) -> Value {
        json!({"kind": self.core.kind, "base_lrs": self.core.base_lrs,
               "t_max": self.t_max, "eta_min": self.eta_min})
    }

    fn supports_restart(&self) -> bool {
        true
    }

    fn restart(&mut self) -> Result<Vec<f64>> {
        // torch closed form at last_epoch = 0.
        let eta = self.eta_min;
        let t = self.t_max as f64;
        let lrs = self
            .core
            .base_lrs
            .iter()
            .map(|&base| eta + (base - eta) * (1.0 + (PI * 0.0 / t).cos()) / 2.0)
            .collect();
        self.core.commit(0, lrs)
    }
}

core_only_stateful!(CosineAnnealingLR);

/// Cosine annealing with warm restarts (SGDR; torch
/// `CosineAnnealingWarmRestarts`): the first cycle lasts `t_0` steps, each next one
/// `t_mult` times longer.
#[derive(Clone, Debug)]
pub struct CosineAnnealingWarmRestarts {
    core: Core,
    t_0: u64,
    t_mult: u64,
    eta_min: f64,
    /// Length of the current cycle.
    t_i: u64,
    /// Steps since the last restart.
    t_cur: u64,
}

impl CosineAnnealingWarmRestarts {
    /// Restarts `base_lrs` (one per param group) after `t_0`, then `t_0·t_mult`, ...
    /// steps, annealing to `eta_min` within each cycle.
    ///
    /// # Errors
    /// [`crate::Error::InvalidHyperParameter`] for `t_0 == 0`, `t_mult == 0`, a
    /// non-finite `eta_min` or rate; [`crate::Error::InvalidSchedule`] for empty
    /// `base_lrs`.
    pub fn new(base_lrs: Vec<f64>, t_0: u64, t_mult: u64, eta_min: f64) -> Result<Self> {
        const KIND: &str = "CosineAnnealingWarmRestarts";
        check_setting(KIND, "t_0", t_0 as f64, t_0 >= 1, ">= 1")?;
        check_setting(KIND, "t_mult", t_mult as f64, t_mult >= 1, ">= 1")?;
        check_setting(KIND, "eta_min", eta_min, eta_min >= 0.0, ">= 0")?;
        let mut s = CosineAnnealingWarmRestarts {
            core: Core::new(KIND, base_lrs)?,
            t_0,
            t_mult,
            eta_min,
            t_i: t_0,
            t_cur: 0,
        };
        let lrs = s.compute(0, t_0);
        s.core.commit(0, lrs)?;
        Ok(s)
    }

    fn compute(&self, t_cur: u64, t_i: u64) -> Vec<f64> {
        let eta = self.eta_min;
        self.core
            .base_lrs
            .iter()
            .map(|&base| eta + (base - eta) * (1.0 + (PI * t_cur as f64 / t_i as f64).cos()) / 2.0)
            .collect()
    }
}

impl LrScheduler for CosineAnnealingWarmRestarts {
    core_accessors!();

    fn step(&mut self, _metric: Option<f64>) -> Result<Vec<f64>> {
        let epoch = self.core.last_epoch + 1;
        let mut t_cur = self.t_cur + 1;
        let mut t_i = self.t_i;
        if t_cur >= t_i {
            t_cur -= t_i;
            t_i = t_i
                .checked_mul(self.t_mult)
                .ok_or_else(|| Error::InvalidSchedule {
                    scheduler: self.core.kind.to_string(),
                    reason: format!("cycle length {t_i} * t_mult {} overflows u64", self.t_mult),
                })?;
        }
        let lrs = self.compute(t_cur, t_i);
        let out = self.core.commit(epoch, lrs)?;
        self.t_cur = t_cur;
        self.t_i = t_i;
        Ok(out)
    }

    fn config(&self) -> Value {
        json!({"kind": self.core.kind, "base_lrs": self.core.base_lrs, "t_0": self.t_0,
               "t_mult": self.t_mult, "eta_min": self.eta_min})
    }

    fn supports_restart(&self) -> bool {
        true
    }

    fn restart(&mut self) -> Result<Vec<f64>> {
        // torch step(0): epoch < T_0, so T_i = T_0 and T_cur = 0.
        let lrs = self.compute(0, self.t_0);
        let out = self.core.commit(0, lrs)?;
        self.t_i = self.t_0;
        self.t_cur = 0;
        Ok(out)
    }
}

impl Stateful for CosineAnnealingWarmRestarts {
    type Error = Error;

    fn state_dict(&self) -> Result<StateDict> {
        let mut sd = self.core.save(&self.config())?;
        sd.insert_json("t_i", Value::from(self.t_i));
        sd.insert_json("t_cur", Value::from(self.t_cur));
        Ok(sd)
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let mut report = RestoreReport::new();
        let config = self.config();
        let Some(common) = self
            .core
            .load(&config, &["t_i", "t_cur"], state, &mut report)?
        else {
            return Ok(report);
        };
        let t_i: u64 = state.require_value("t_i")?;
        let t_cur: u64 = state.require_value("t_cur")?;
        if t_i == 0 || t_cur >= t_i {
            return Err(Error::StateMismatch {
                component: self.core.kind.to_string(),
                problems: vec![format!(
                    "t_cur = {t_cur} must be below the cycle length t_i = {t_i} (>= 1)"
                )],
            });
        }
        self.core.apply(common);
        self.t_i = t_i;
        self.t_cur = t_cur;
        report.restored("t_i");
        report.restored("t_cur");
        Ok(report)
    }
}
