//! Linear warmup/decay ([`LinearLR`]) and polynomial decay ([`PolynomialLR`]).

use serde_json::{json, Value};

use super::decay::{core_accessors, core_only_stateful};
use super::state::{check_setting, Core};
use super::LrScheduler;
use crate::error::Result;

/// Scales the base rate by a factor moving linearly from `start_factor` to
/// `end_factor` over `total_iters` steps, then holds it (torch `LinearLR`; the usual
/// warmup is `start_factor = 0.1, end_factor = 1.0`).
#[derive(Clone, Debug)]
pub struct LinearLR {
    core: Core,
    start_factor: f64,
    end_factor: f64,
    total_iters: u64,
}

impl LinearLR {
    /// A linear ramp of `base_lrs` (one per param group). Right after construction
    /// the rates are `base_lr * start_factor`. torch's defaults are
    /// `start_factor = 1/3, end_factor = 1.0, total_iters = 5`.
    ///
    /// # Errors
    /// [`crate::Error::InvalidHyperParameter`] unless `0 < start_factor <= 1`,
    /// `0 <= end_factor <= 1` and `total_iters >= 1`, or for a non-finite rate;
    /// [`crate::Error::InvalidSchedule`] for empty `base_lrs`.
    pub fn new(
        base_lrs: Vec<f64>,
        start_factor: f64,
        end_factor: f64,
        total_iters: u64,
    ) -> Result<Self> {
        const KIND: &str = "LinearLR";
        check_setting(
            KIND,
            "start_factor",
            start_factor,
            start_factor > 0.0 && start_factor <= 1.0,
            "in (0, 1]",
        )?;
        check_setting(
            KIND,
            "end_factor",
            end_factor,
            (0.0..=1.0).contains(&end_factor),
            "in [0, 1]",
        )?;
        check_setting(
            KIND,
            "total_iters",
            total_iters as f64,
            total_iters >= 1,
            ">= 1",
        )?;
        let mut s = LinearLR {
            core: Core::new(KIND, base_lrs)?,
            start_factor,
            end_factor,
            total_iters,
        };
        let lrs = s.core.lrs.iter().map(|lr| lr * start_factor).collect();
        s.core.commit(0, lrs)?;
        Ok(s)
    }
}

impl LrScheduler for LinearLR {
    core_accessors!();

    fn step(&mut self, _metric: Option<f64>) -> Result<Vec<f64>> {
        let epoch = self.core.last_epoch + 1;
        let (s, e) = (self.start_factor, self.end_factor);
        let lrs = if epoch > self.total_iters {
            self.core.lrs.clone()
        } else {
            let factor =
                1.0 + (e - s) / (self.total_iters as f64 * s + (epoch - 1) as f64 * (e - s));
            self.core.lrs.iter().map(|lr| lr * factor).collect()
        };
        self.core.commit(epoch, lrs)
    }

    fn config(&self) -> Value {
        json!({"kind": self.core.kind, "base_lrs": self.core.base_lrs,
               "start_factor": self.start_factor, "end_factor": self.end_factor,
               "total_iters": self.total_iters})
    }

    fn supports_restart(&self) -> bool {
        true
    }

    fn restart(&mut self) -> Result<Vec<f64>> {
        // torch closed form: base * (start + (end - start) * min(total, 0) / total).
        let (s, e, t) = (self.start_factor, self.end_factor, self.total_iters as f64);
        let lrs = self
            .core
            .base_lrs
            .iter()
            .map(|b| b * (s + (e - s) * 0.0 / t))
            .collect();
        self.core.commit(0, lrs)
    }
}

core_only_stateful!(LinearLR);

/// Decays the rate as `(1 - t/total_iters) ** power`, reaching 0 at
/// `total_iters` and staying there (torch `PolynomialLR`, recursive form).
#[derive(Clone, Debug)]
pub struct PolynomialLR {
    core: Core,
    total_iters: u64,
    power: f64,
}

impl PolynomialLR {
    /// Polynomial decay of `base_lrs` over `total_iters` steps. torch's defaults are
    /// `total_iters = 5, power = 1.0`.
    ///
    /// # Errors
    /// [`crate::Error::InvalidHyperParameter`] for `total_iters == 0`, a negative or
    /// non-finite `power` or rate; [`crate::Error::InvalidSchedule`] for empty
    /// `base_lrs`.
    pub fn new(base_lrs: Vec<f64>, total_iters: u64, power: f64) -> Result<Self> {
        const KIND: &str = "PolynomialLR";
        check_setting(
            KIND,
            "total_iters",
            total_iters as f64,
            total_iters >= 1,
            ">= 1",
        )?;
        check_setting(KIND, "power", power, power >= 0.0, ">= 0")?;
        Ok(PolynomialLR {
            core: Core::new(KIND, base_lrs)?,
            total_iters,
            power,
        })
    }
}

impl LrScheduler for PolynomialLR {
    core_accessors!();

    fn step(&mut self, _metric: Option<f64>) -> Result<Vec<f64>> {
        let epoch = self.core.last_epoch + 1;
        let lrs = if epoch > self.total_iters {
            self.core.lrs.clone()
        } else {
            let t = self.total_iters as f64;
            let factor =
                ((1.0 - epoch as f64 / t) / (1.0 - (epoch - 1) as f64 / t)).powf(self.power);
            self.core.lrs.iter().map(|lr| lr * factor).collect()
        };
        self.core.commit(epoch, lrs)
    }

    fn config(&self) -> Value {
        json!({"kind": self.core.kind, "base_lrs": self.core.base_lrs,
               "total_iters": self.total_iters, "power": self.power})
    }

    fn supports_restart(&self) -> bool {
        true
    }

    fn restart(&mut self) -> Result<Vec<f64>> {
        // torch closed form: base * (1 - min(total, 0) / total) ** power.
        let t = self.total_iters as f64;
        let lrs = self
            .core
            .base_lrs
            .iter()
            .map(|b| b * (1.0 - 0.0 / t).powf(self.power))
            .collect();
        self.core.commit(0, lrs)
    }
}

core_only_stateful!(PolynomialLR);
