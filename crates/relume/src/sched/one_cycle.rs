//! The 1cycle policy ([`OneCycleLR`]).

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::decay::{core_accessors, core_only_stateful};
use super::state::{check_setting, Core};
use super::LrScheduler;
use crate::error::{Error, Result};

/// How [`OneCycleLR`] moves between two rates within a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnnealStrategy {
    /// Cosine annealing (torch `"cos"`).
    Cos,
    /// Linear interpolation (torch `"linear"`).
    Linear,
}

/// Settings of [`OneCycleLR`]; `Default` gives torch's defaults (also for fields
/// left out when deserialized).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OneCycleOptions {
    /// Fraction of the steps spent increasing the rate. Default `0.3`.
    pub pct_start: f64,
    /// Annealing shape. Default [`AnnealStrategy::Cos`].
    pub anneal_strategy: AnnealStrategy,
    /// Initial rate = `max_lr / div_factor`. Default `25.0`.
    pub div_factor: f64,
    /// Final rate = initial rate / `final_div_factor`. Default `1e4`.
    pub final_div_factor: f64,
    /// Use three phases (up, back down to the initial rate, then to the final
    /// rate) instead of two. Default `false`.
    pub three_phase: bool,
}

impl Default for OneCycleOptions {
    fn default() -> Self {
        OneCycleOptions {
            pct_start: 0.3,
            anneal_strategy: AnnealStrategy::Cos,
            div_factor: 25.0,
            final_div_factor: 1e4,
            three_phase: false,
        }
    }
}

/// Which of a group's three rates a phase starts or ends at.
#[derive(Clone, Copy, Debug)]
enum Anchor {
    Initial,
    Max,
    Min,
}

#[derive(Clone, Copy, Debug)]
struct Phase {
    end_step: f64,
    start: Anchor,
    end: Anchor,
}

/// The 1cycle policy (torch `OneCycleLR`): from `max_lr / div_factor` up to
/// `max_lr`, then down to `max_lr / div_factor / final_div_factor`, over exactly
/// `total_steps` steps (step it per batch).
///
/// The rates do not depend on the optimizer's initial rates: like torch, the
/// initial rate of every group is `max_lr / div_factor`. Momentum cycling
/// (`cycle_momentum`) is not implemented: relume schedules rates only.
#[derive(Clone, Debug)]
pub struct OneCycleLR {
    core: Core,
    max_lrs: Vec<f64>,
    min_lrs: Vec<f64>,
    total_steps: u64,
    options: OneCycleOptions,
    phases: Vec<Phase>,
}

impl OneCycleLR {
    /// A 1cycle schedule peaking at `max_lrs` (one per param group) over
    /// `total_steps` steps.
    ///
    /// # Errors
    /// [`crate::Error::InvalidHyperParameter`] for `total_steps == 0`, `pct_start`
    /// outside `[0, 1]`, a non-positive or non-finite factor or rate;
    /// [`crate::Error::InvalidSchedule`] for empty `max_lrs`.
    pub fn new(max_lrs: Vec<f64>, total_steps: u64, options: OneCycleOptions) -> Result<Self> {
        const KIND: &str = "OneCycleLR";
        let o = &options;
        check_setting(
            KIND,
            "total_steps",
            total_steps as f64,
            total_steps >= 1,
            ">= 1",
        )?;
        check_setting(
            KIND,
            "pct_start",
            o.pct_start,
            (0.0..=1.0).contains(&o.pct_start),
            "in [0, 1]",
        )?;
        check_setting(KIND, "div_factor", o.div_factor, o.div_factor > 0.0, "> 0")?;
        check_setting(
            KIND,
            "final_div_factor",
            o.final_div_factor,
            o.final_div_factor > 0.0,
            "> 0",
        )?;
        super::state::check_lrs(KIND, &max_lrs)?;
        let initial: Vec<f64> = max_lrs.iter().map(|m| m / o.div_factor).collect();
        let min_lrs: Vec<f64> = initial.iter().map(|i| i / o.final_div_factor).collect();
        let total = total_steps as f64;
        let phases = if o.three_phase {
            vec![
                Phase {
                    end_step: o.pct_start * total - 1.0,
                    start: Anchor::Initial,
                    end: Anchor::Max,
                },
                Phase {
                    end_step: 2.0 * o.pct_start * total - 2.0,
                    start: Anchor::Max,
                    end: Anchor::Initial,
                },
                Phase {
                    end_step: total - 1.0,
                    start: Anchor::Initial,
                    end: Anchor::Min,
                },
            ]
        } else {
            vec![
                Phase {
                    end_step: o.pct_start * total - 1.0,
                    start: Anchor::Initial,
                    end: Anchor::Max,
                },
                Phase {
                    end_step: total - 1.0,
                    start: Anchor::Max,
                    end: Anchor::Min,
                },
            ]
        };
        let mut s = OneCycleLR {
            core: Core::new(KIND, initial)?,
            max_lrs,
            min_lrs,
            total_steps,
            options,
            phases,
        };
        let lrs = s.compute(0)?;
        s.core.commit(0, lrs)?;
        Ok(s)
    }

    /// torch `OneCycleLR.get_lr` at `step_num`.
    fn compute(&self, step_num: u64) -> Result<Vec<f64>> {
        if step_num > self.total_steps {
            return Err(Error::ScheduleExhausted {
                scheduler: self.core.kind.to_string(),
                step: step_num,
                total_steps: self.total_steps,
            });
        }
        let step = step_num as f64;
        let last = self.phases.len() - 1;
        let mut lrs = Vec::with_capacity(self.max_lrs.len());
        for g in 0..self.max_lrs.len() {
            let rate = |a: Anchor| match a {
                Anchor::Initial => self.core.base_lrs[g],
                Anchor::Max => self.max_lrs[g],
                Anchor::Min => self.min_lrs[g],
            };
            let mut start_step = 0.0;
            for (i, phase) in self.phases.iter().enumerate() {
                if step <= phase.end_step || i == last {
                    let pct = (step - start_step) / (phase.end_step - start_step);
                    let (start, end) = (rate(phase.start), rate(phase.end));
                    lrs.push(match self.options.anneal_strategy {
                        AnnealStrategy::Cos => end + (start - end) / 2.0 * ((PI * pct).cos() + 1.0),
                        AnnealStrategy::Linear => (end - start) * pct + start,
                    });
                    break;
                }
                start_step = phase.end_step;
            }
        }
        Ok(lrs)
    }
}

impl LrScheduler for OneCycleLR {
    core_accessors!();

    fn step(&mut self, _metric: Option<f64>) -> Result<Vec<f64>> {
        let epoch = self.core.last_epoch + 1;
        let lrs = self.compute(epoch)?;
        self.core.commit(epoch, lrs)
    }

    fn config(&self) -> Value {
        let o = &self.options;
        json!({"kind": self.core.kind, "max_lrs": self.max_lrs, "total_steps": self.total_steps,
               "pct_start": o.pct_start, "anneal_strategy": o.anneal_strategy,
               "div_factor": o.div_factor, "final_div_factor": o.final_div_factor,
               "three_phase": o.three_phase})
    }

    fn supports_restart(&self) -> bool {
        true
    }

    fn restart(&mut self) -> Result<Vec<f64>> {
        let lrs = self.compute(0)?;
        self.core.commit(0, lrs)
    }
}

core_only_stateful!(OneCycleLR);
