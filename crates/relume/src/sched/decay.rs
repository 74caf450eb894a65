//! Multiplicative decay: [`StepLR`], [`MultiStepLR`], [`ExponentialLR`].
//!
//! Like torch, `step()` multiplies the *current* rate by `gamma` (the chainable
//! form) and a restart at a [`SequentialLR`](super::SequentialLR) milestone uses
//! the closed form `base_lr * gamma ** n`.

use serde_json::{json, Value};

use super::state::{check_setting, Core};
use super::LrScheduler;
use crate::error::Result;

/// Implements `Stateful` for a scheduler whose whole state is its [`Core`].
macro_rules! core_only_stateful {
    ($t:ty) => {
        impl relume_ckpt::Stateful for $t {
            type Error = crate::error::Error;

            fn state_dict(&self) -> crate::error::Result<relume_ckpt::StateDict> {
                self.core.save(&super::LrScheduler::config(self))
            }

            fn load_state_dict(
                &mut self,
                state: &relume_ckpt::StateDict,
            ) -> crate::error::Result<relume_ckpt::RestoreReport> {
                let mut report = relume_ckpt::RestoreReport::new();
                let config = super::LrScheduler::config(self);
                if let Some(common) = self.core.load(&config, &[], state, &mut report)? {
                    self.core.apply(common);
                }
                Ok(report)
            }
        }
    };
}
pub(crate) use core_only_stateful;

/// `kind` and `lrs` of an [`LrScheduler`](super::LrScheduler) read from its `core`.
macro_rules! core_accessors {
    () => {
        fn kind(&self) -> &'static str {
            self.core.kind
        }

        fn lrs(&self) -> Vec<f64> {
            self.core.lrs.clone()
        }
    };
}
pub(crate) use core_accessors;

/// Multiplies the rate by `gamma` every `step_size` steps (torch `StepLR`).
#[derive(Clone, Debug)]
pub struct StepLR {
    core: Core,
    step_size: u64,
    gamma: f64,
}

impl StepLR {
    /// Decays `base_lrs` (one per param group) by `gamma` every `step_size` steps.
    ///
    /// # Errors
    /// [`crate::Error::InvalidHyperParameter`] for `step_size == 0`, a non-finite or
    /// negative `gamma` or rate; [`crate::Error::InvalidSchedule`] for empty `base_lrs`.
    pub fn new(base_lrs: Vec<f64>, step_size: u64, gamma: f64) -> Result<Self> {
        const KIND: &str = "StepLR";
        check_setting(KIND, "step_size", step_size as f64, step_size >= 1, ">= 1")?;
        check_setting(KIND, "gamma", gamma, gamma >= 0.0, ">= 0")?;
        Ok(StepLR {
            core: Core::new(KIND, base_lrs)?,
            step_size,
            gamma,
        })
    }
}

impl LrScheduler for StepLR {
    core_accessors!();

    fn step(&mut self, _metric: Option<f64>) -> Result<Vec<f64>> {
        let epoch = self.core.last_epoch + 1;
        let lrs = if epoch % self.step_size != 0 {
            self.core.lrs.clone()
        } else {
            self.core.lrs.iter().map(|lr| lr * self.gamma).collect()
        };
        self.core.commit(epoch, lrs)
    }

    fn config(&self) -> Value {
        json!({"kind": self.core.kind, "base_lrs": self.core.base_lrs,
               "step_size": self.step_size, "gamma": self.gamma})
    }

    fn supports_restart(&self) -> bool {
        true
    }

    fn restart(&mut self) -> Result<Vec<f64>> {
        // torch closed form: base_lr * gamma ** (last_epoch // step_size); at
        // last_epoch 0 the exponent is 0.
        let n = 0.0;
        let lrs = self
            .core
            .base_lrs
            .iter()
            .map(|b| b * self.gamma.powf(n))
            .collect();
        self.core.commit(0, lrs)
    }
}

core_only_stateful!(StepLR);

/// Multiplies the rate by `gamma` at each milestone (torch `MultiStepLR`).
#[derive(Clone, Debug)]
pub struct MultiStepLR {
    core: Core,
    /// Sorted; a repeated milestone decays once per occurrence, as torch's Counter.
    milestones: Vec<u64>,
    gamma: f64,
}

impl MultiStepLR {
    /// Decays `base_lrs` by `gamma` when the step count reaches each milestone.
    ///
    /// # Errors
    /// [`crate::Error::InvalidHyperParameter`] for a non-finite or negative `gamma` or
    /// rate; [`crate::Error::InvalidSchedule`] for empty `base_lrs`.
    pub fn new(base_lrs: Vec<f64>, milestones: Vec<u64>, gamma: f64) -> Result<Self> {
        const KIND: &str = "MultiStepLR";
        check_setting(KIND, "gamma", gamma, gamma >= 0.0, ">= 0")?;
        let mut milestones = milestones;
        milestones.sort_unstable();
        Ok(MultiStepLR {
            core: Core::new(KIND, base_lrs)?,
            milestones,
            gamma,
        })
    }
}

impl LrScheduler for MultiStepLR {
    core_accessors!();

    fn step(&mut self, _metric: Option<f64>) -> Result<Vec<f64>> {
        let epoch = self.core.last_epoch + 1;
        let count = self.milestones.iter().filter(|&&m| m == epoch).count();
        let lrs = if count == 0 {
            self.core.lrs.clone()
        } else {
            let factor = self.gamma.powf(count as f64);
            self.core.lrs.iter().map(|lr| lr * factor).collect()
        };
        self.core.commit(epoch, lrs)
    }

    fn config(&self) -> Value {
        json!({"kind": self.core.kind, "base_lrs": self.core.base_lrs,
               "milestones": self.milestones, "gamma": self.gamma})
    }

    fn supports_restart(&self) -> bool {
        true
    }

    fn restart(&mut self) -> Result<Vec<f64>> {
        // torch closed form: base_lr * gamma ** bisect_right(milestones, 0).
        let n = self.milestones.iter().filter(|&&m| m == 0).count() as f64;
        let lrs = self
            .core
            .base_lrs
            .iter()
            .map(|b| b * self.gamma.powf(n))
            .collect();
        self.core.commit(0, lrs)
    }
}

core_only_stateful!(MultiStepLR);

/// Multiplies the rate by `gamma` at every step (torch `ExponentialLR`).
#[derive(Clone, Debug)]
pub struct ExponentialLR {
    core: Core,
    gamma: f64,
}

impl ExponentialLR {
    /// Decays `base_lrs` by `gamma` per step.
    ///
    /// # Errors
    /// [`crate::Error::InvalidHyperParameter`] for a non-finite or negative `gamma` or
    /// rate; [`crate::Error::InvalidSchedule`] for empty `base_lrs`.
    pub fn new(base_lrs: Vec<f64>, gamma: f64) -> Result<Self> {
        const KIND: &str = "ExponentialLR";
        check_setting(KIND, "gamma", gamma, gamma >= 0.0, ">= 0")?;
        Ok(ExponentialLR {
            core: Core::new(KIND, base_lrs)?,
            gamma,
        })
    }
}

impl LrScheduler for ExponentialLR {
    core_accessors!();

    fn step(&mut self, _metric: Option<f64>) -> Result<Vec<f64>> {
        let epoch = self.core.last_epoch + 1;
        let lrs = self.core.lrs.iter().map(|lr| lr * self.gamma).collect();
        self.core.commit(epoch, lrs)
    }

    fn config(&self) -> Value {
        json!({"kind": self.core.kind, "base_lrs": self.core.base_lrs, "gamma": self.gamma})
    }

    fn supports_restart(&self) -> bool {
        true
    }

    fn restart(&mut self) -> Result<Vec<f64>> {
        // torch closed form: base_lr * gamma ** 0.
        let lrs = self
            .core
            .base_lrs
            .iter()
            .map(|b| b * self.gamma.powf(0.0))
            .collect();
        self.core.commit(0, lrs)
    }
}

core_only_stateful!(ExponentialLR);
