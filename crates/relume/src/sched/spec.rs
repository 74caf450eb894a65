//! A serialisable description of a scheduler ([`SchedulerSpec`]), for configs.

use serde::{Deserialize, Serialize};

use super::{
    CosineAnnealingLR, CosineAnnealingWarmRestarts, ExponentialLR, LinearLR, LrScheduler,
    MultiStepLR, OneCycleLR, OneCycleOptions, PlateauOptions, PolynomialLR, ReduceLROnPlateau,
    SequentialLR, StepLR,
};
use crate::error::Result;

fn one() -> u64 {
    1
}

fn one_f() -> f64 {
    1.0
}

/// Which scheduler to build and its settings, independent of the optimizer's
/// rates: [`SchedulerSpec::build`] turns it into a scheduler for given base rates.
/// Serialises as JSON tagged by `kind`, e.g.
/// `{"kind": "CosineAnnealingLR", "t_max": 25, "eta_min": 0.0}`.
///
/// # Example
/// ```
/// use relume::sched::SchedulerSpec;
/// let spec = SchedulerSpec::warmup_cosine(0.1, 5, 25, 0.0);
/// let sched = spec.build(&[0.1])?;
/// assert_eq!(sched.kind(), "SequentialLR");
/// let text = serde_json::to_string(&spec).unwrap();
/// assert_eq!(serde_json::from_str::<SchedulerSpec>(&text).unwrap(), spec);
/// # Ok::<(), relume::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum SchedulerSpec {
    /// [`StepLR`].
    StepLR {
        /// Steps between decays.
        step_size: u64,
        /// Decay factor.
        gamma: f64,
    },
    /// [`MultiStepLR`].
    MultiStepLR {
        /// Steps at which to decay.
        milestones: Vec<u64>,
        /// Decay factor.
        gamma: f64,
    },
    /// [`ExponentialLR`].
    ExponentialLR {
        /// Decay factor per step.
        gamma: f64,
    },
    /// [`CosineAnnealingLR`].
    CosineAnnealingLR {
        /// Half period in steps.
        t_max: u64,
        /// Lowest rate. Default `0.0`.
        #[serde(default)]
        eta_min: f64,
    },
    /// [`CosineAnnealingWarmRestarts`].
    CosineAnnealingWarmRestarts {
        /// Length of the first cycle.
        t_0: u64,
        /// Growth factor of the cycle length. Default `1`.
        #[serde(default = "one")]
        t_mult: u64,
        /// Lowest rate. Default `0.0`.
        #[serde(default)]
        eta_min: f64,
    },
    /// [`LinearLR`].
    LinearLR {
        /// Factor at step 0.
        start_factor: f64,
        /// Factor from `total_iters` on. Default `1.0`.
        #[serde(default = "one_f")]
        end_factor: f64,
        /// Length of the ramp.
        total_iters: u64,
    },
    /// [`PolynomialLR`].
    PolynomialLR {
        /// Steps until the rate reaches 0.
        total_iters: u64,
        /// Exponent. Default `1.0`.
        #[serde(default = "one_f")]
        power: f64,
    },
    /// [`OneCycleLR`].
    OneCycleLR {
        /// Peak rate per param group (one value applies to every group).
        max_lrs: Vec<f64>,
        /// Length of the schedule.
        total_steps: u64,
        /// Other settings (torch defaults when absent).
        #[serde(flatten)]
        options: OneCycleOptions,
    },
    /// [`ReduceLROnPlateau`].
    ReduceLROnPlateau {
        /// Settings (torch defaults when absent).
        #[serde(flatten)]
        options: PlateauOptions,
    },
    /// [`SequentialLR`].
    SequentialLR {
        /// The chained schedulers.
        children: Vec<SchedulerSpec>,
        /// Steps at which the next child takes over.
        milestones: Vec<u64>,
    },
}

impl SchedulerSpec {
    /// Linear warmup from `start_factor · lr` over `warmup` steps, then cosine
    /// annealing to `eta_min` over `t_max` steps: torch's
    /// `SequentialLR([LinearLR(start_factor, total_iters=warmup),
    /// CosineAnnealingLR(T_max=t_max, eta_min)], milestones=[warmup])`.
    pub fn warmup_cosine(start_factor: f64, warmup: u64, t_max: u64, eta_min: f64) -> Self {
        SchedulerSpec::SequentialLR {
            children: vec![
                SchedulerSpec::LinearLR {
                    start_factor,
                    end_factor: 1.0,
                    total_iters: warmup,
                },
                SchedulerSpec::CosineAnnealingLR { t_max, eta_min },
            ],
            milestones: vec![warmup],
        }
    }

    /// Builds the scheduler for an optimizer whose initial rates are `base_lrs`
    /// (one per param group).
    ///
    /// # Errors
    /// Whatever the scheduler's constructor reports for bad settings
    /// ([`crate::Error::InvalidHyperParameter`], [`crate::Error::InvalidSchedule`]).
    pub fn build(&self, base_lrs: &[f64]) -> Result<Box<dyn LrScheduler>> {
        let b = base_lrs.to_vec();
        Ok(match self {
            SchedulerSpec::StepLR { step_size, gamma } => {
                Box::new(StepLR::new(b, *step_size, *gamma)?)
            }
            SchedulerSpec::MultiStepLR { milestones, gamma } => {
                Box::new(MultiStepLR::new(b, milestones.clone(), *gamma)?)
            }
            SchedulerSpec::ExponentialLR { gamma } => Box::new(ExponentialLR::new(b, *gamma)?),
            SchedulerSpec::CosineAnnealingLR { t_max, eta_min } => {
                Box::new(CosineAnnealingLR::new(b, *t_max, *eta_min)?)
            }
            SchedulerSpec::CosineAnnealingWarmRestarts {
                t_0,
                t_mult,
                eta_min,
            } => Box::new(CosineAnnealingWarmRestarts::new(
                b, *t_0, *t_mult, *eta_min,
            )?),
            SchedulerSpec::LinearLR {
                start_factor,
                end_factor,
                total_iters,
            } => Box::new(LinearLR::new(b, *start_factor, *end_factor, *total_iters)?),
            SchedulerSpec::PolynomialLR { total_iters, power } => {
                Box::new(PolynomialLR::new(b, *total_iters, *power)?)
            }
            SchedulerSpec::OneCycleLR {
                max_lrs,
                total_steps,
                options,
            } => {
                let max_lrs = if max_lrs.len() == 1 {
                    vec![max_lrs[0]; base_lrs.len()]
                } else {
                    max_lrs.clone()
                };
                Box::new(OneCycleLR::new(max_lrs, *total_steps, options.clone())?)
            }
            SchedulerSpec::ReduceLROnPlateau { options } => {
                Box::new(ReduceLROnPlateau::new(b, options.clone())?)
            }
            SchedulerSpec::SequentialLR {
                children,
                milestones,
            } => {
                let built = children
                    .iter()
                    .map(|c| c.build(base_lrs))
                    .collect::<Result<Vec<_>>>()?;
                Box::new(SequentialLR::new(built, milestones.clone())?)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_defaults_and_build() {
        let spec: SchedulerSpec = serde_json::from_str(
            r#"{"kind": "SequentialLR", "milestones": [5], "children": [
                 {"kind": "LinearLR", "start_factor": 0.1, "total_iters": 5},
                 {"kind": "CosineAnnealingLR", "t_max": 25}]}"#,
        )
        .unwrap();
        assert_eq!(spec, SchedulerSpec::warmup_cosine(0.1, 5, 25, 0.0));
        let plateau: SchedulerSpec =
            serde_json::from_str(r#"{"kind": "ReduceLROnPlateau", "patience": 2}"#).unwrap();
        let s = plateau.build(&[0.1, 0.2]).unwrap();
        assert!(s.needs_metric());
        assert_eq!(s.config()["patience"], 2);
        assert_eq!(s.config()["factor"], 0.1);
        let one: SchedulerSpec =
            serde_json::from_str(r#"{"kind": "OneCycleLR", "max_lrs": [0.1], "total_steps": 30}"#)
                .unwrap();
        assert_eq!(one.build(&[0.5, 0.5]).unwrap().lrs().len(), 2);
    }

    #[test]
    fn interval_serialises_lowercase() {
        use crate::sched::Interval;
        assert_eq!(
            serde_json::to_string(&Interval::Epoch).unwrap(),
            "\"epoch\""
        );
        let i: Interval = serde_json::from_str("\"step\"").unwrap();
        assert_eq!(i, Interval::Step);
        assert_eq!(Interval::Step.to_string(), "step");
    }

    #[test]
    fn bad_spec_settings_surface_constructor_errors() {
        let spec = SchedulerSpec::CosineAnnealingLR {
            t_max: 0,
            eta_min: 0.0,
        };
        assert!(matches!(
            spec.build(&[0.1]),
            Err(crate::Error::InvalidHyperParameter { .. })
        ));
    }
}
