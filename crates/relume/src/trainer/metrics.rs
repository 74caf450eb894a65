//! Metric aggregation for `StepCtx::log`.
//!
//! ## How values aggregate
//! - A metric logged with `on_step` is reported to the loggers at the next
//!   logging step (`log_every_n_steps`) with the value of the latest batch.
//! - A metric logged with `on_epoch` is reduced over the epoch (training) or the
//!   whole validation/test run: the **mean weighted by batch size** when
//!   `LogOpts::batch_size` is given, otherwise the plain mean over the calls.
//! - Logged with both, the names get `_step` and `_epoch` suffixes (as in Lightning).
//!
//! Values are read to `f64` when logged (a scalar copy; on CPU this is free), so
//! the aggregation is exact and can be checkpointed mid-epoch: its state is saved
//! in the `loop` component with every `f64` stored as its bit pattern.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How one `log` call is treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LogOpts {
    /// Report the per-batch value at logging steps. `None`: the stage's default
    /// (training: true; validation/test: false).
    pub on_step: Option<bool>,
    /// Reduce over the epoch. `None`: the stage's default (training: false;
    /// validation/test: true).
    pub on_epoch: Option<bool>,
    /// Show in the progress bar. Default false.
    pub prog_bar: bool,
    /// Weight of this value in the epoch mean. Default `None` (weight 1).
    pub batch_size: Option<usize>,
}

impl LogOpts {
    /// Stage defaults, not in the progress bar.
    pub fn new() -> Self {
        LogOpts::default()
    }
    /// Sets `on_step`.
    pub fn on_step(mut self, on: bool) -> Self {
        self.on_step = Some(on);
        self
    }
    /// Sets `on_epoch`.
    pub fn on_epoch(mut self, on: bool) -> Self {
        self.on_epoch = Some(on);
        self
    }
    /// Shows the metric in the progress bar.
    pub fn prog_bar(mut self) -> Self {
        self.prog_bar = true;
        self
    }
    /// Weights the value by `n` in the epoch mean.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = Some(n);
        self
    }
}

/// A running weighted sum.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Agg {
    sum: f64,
    weight: f64,
}

#[derive(Serialize, Deserialize)]
struct AggBits {
    sum: u64,
    weight: u64,
}

/// The saved form of [`Metrics`]: every f64 as its bit pattern.
#[derive(Serialize, Deserialize, Default)]
pub(crate) struct MetricsState {
    epoch: BTreeMap<String, AggBits>,
    latest: BTreeMap<String, u64>,
    prog_bar: Vec<String>,
}

/// Per-stage aggregation plus the latest value of every metric.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    epoch: BTreeMap<String, Agg>,
    step: BTreeMap<String, f64>,
    latest: BTreeMap<String, f64>,
    prog_bar: Vec<String>,
    /// Set in a data-parallel micro-batch: `log` calls are recorded here, to be
    /// replayed on every rank in micro-batch order.
    record: Option<Vec<LogCall>>,
}

/// One recorded `log` call (data-parallel runs replay them in micro-batch order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct LogCall {
    name: String,
    /// The value's bits (exact through JSON).
    value: u64,
    on_step: Option<bool>,
    on_epoch: Option<bool>,
    prog_bar: bool,
    batch_size: Option<usize>,
    training: bool,
}

impl Metrics {
    /// A store that records `log` calls instead of aggregating them.
    pub(crate) fn recorder() -> Self {
        Metrics {
            record: Some(Vec::new()),
            ..Metrics::default()
        }
    }

    /// The calls recorded by a [`Metrics::recorder`].
    pub(crate) fn into_calls(self) -> Vec<LogCall> {
        self.record.unwrap_or_default()
    }

    /// Applies recorded calls, in order, as if they were logged here.
    pub(crate) fn replay(&mut self, calls: &[LogCall]) {
        for c in calls {
            let opts = LogOpts {
                on_step: c.on_step,
                on_epoch: c.on_epoch,
                prog_bar: c.prog_bar,
                batch_size: c.batch_size,
            };
            self.log(&c.name, f64::from_bits(c.value), opts, c.training);
        }
    }

    /// Records one value. `training` picks the stage defaults.
    pub(crate) fn log(&mut self, name: &str, value: f64, opts: LogOpts, training: bool) {
        if let Some(rec) = self.record.as_mut() {
            rec.push(LogCall {
                name: name.to_string(),
                value: value.to_bits(),
                on_step: opts.on_step,
                on_epoch: opts.on_epoch,
                prog_bar: opts.prog_bar,
                batch_size: opts.batch_size,
                training,
            });
            return;
        }
        let on_step = opts.on_step.unwrap_or(training);
        let on_epoch = opts.on_epoch.unwrap_or(!training);
        let (step_name, epoch_name) = if on_step && on_epoch {
            (format!("{name}_step"), format!("{name}_epoch"))
        } else {
            (name.to_string(), name.to_string())
        };
        if on_step {
            self.step.insert(step_name.clone(), value);
            self.latest.insert(step_name.clone(), value);
            if opts.prog_bar && !self.prog_bar.contains(&step_name) {
                self.prog_bar.push(step_name);
            }
        }
        if on_epoch {
            let w = opts.batch_size.map_or(1.0, |n| n as f64);
            let a = self.epoch.entry(epoch_name.clone()).or_default();
            a.sum += value * w;
            a.weight += w;
            if opts.prog_bar && !self.prog_bar.contains(&epoch_name) {
                self.prog_bar.push(epoch_name);
            }
        }
    }

    /// Takes the step values logged since the last call.
    pub(crate) fn take_step(&mut self) -> BTreeMap<String, f64> {
        std::mem::take(&mut self.step)
    }

    /// Reduces and clears the epoch aggregates, storing the means as latest values.
    pub fn take_epoch(&mut self) -> BTreeMap<String, f64> {
        let out: BTreeMap<String, f64> = std::mem::take(&mut self.epoch)
            .into_iter()
            .map(|(k, a)| {
                let mean = if a.weight > 0.0 {
                    a.sum / a.weight
                } else {
                    f64::NAN
                };
                (k, mean)
            })
            .collect();
        for (k, v) in &out {
            self.latest.insert(k.clone(), *v);
        }
        out
    }

    /// Reduces an evaluation run's metrics into the latest values, keeping its
    /// progress-bar marks; returns the reduced values.
    pub(crate) fn absorb_eval(&mut self, mut eval: Metrics) -> BTreeMap<String, f64> {
        let values = eval.take_epoch();
        for (k, v) in &values {
            self.latest.insert(k.clone(), *v);
        }
        for k in eval.prog_bar {
            if !self.prog_bar.contains(&k) {
                self.prog_bar.push(k);
            }
        }
        values
    }

    /// The latest value of every metric.
    pub fn latest(&self) -> &BTreeMap<String, f64> {
        &self.latest
    }

    /// The latest values of the metrics marked `prog_bar`.
    pub fn prog_bar(&self) -> BTreeMap<String, f64> {
        self.prog_bar
            .iter()
            .filter_map(|k| self.latest.get(k).map(|v| (k.clone(), *v)))
            .collect()
    }

    pub(crate) fn to_state(&self) -> MetricsState {
        MetricsState {
            epoch: self
                .epoch
                .iter()
                .map(|(k, a)| {
                    (
                        k.clone(),
                        AggBits {
                            sum: a.sum.to_bits(),
                            weight: a.weight.to_bits(),
                        },
                    )
                })
                .collect(),
            latest: self
                .latest
                .iter()
                .map(|(k, v)| (k.clone(), v.to_bits()))
                .collect(),
            prog_bar: self.prog_bar.clone(),
        }
    }

    pub(crate) fn from_state(s: MetricsState) -> Self {
        Metrics {
            epoch: s
                .epoch
                .into_iter()
                .map(|(k, a)| {
                    (
                        k,
                        Agg {
                            sum: f64::from_bits(a.sum),
                            weight: f64::from_bits(a.weight),
                        },
                    )
                })
                .collect(),
            step: BTreeMap::new(),
            latest: s
                .latest
                .into_iter()
                .map(|(k, v)| (k, f64::from_bits(v)))
                .collect(),
            prog_bar: s.prog_bar,
            record: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_mean_is_weighted_by_batch_size() {
        let mut m = Metrics::default();
        m.log(
            "loss",
            1.0,
            LogOpts::new().on_epoch(true).batch_size(3),
            true,
        );
        m.log(
            "loss",
            3.0,
            LogOpts::new().on_epoch(true).batch_size(1),
            true,
        );
        let e = m.take_epoch();
        assert_eq!(e["loss_epoch"], 1.5);
        assert_eq!(m.take_step()["loss_step"], 3.0);
    }

    #[test]
    fn stage_defaults_and_state_round_trip() {
        let mut m = Metrics::default();
        m.log("val_loss", 0.1, LogOpts::new(), false);
        m.log("val_loss", 0.2, LogOpts::new(), false);
        m.log("train_loss", 0.7, LogOpts::new().prog_bar(), true);
        assert!(m.take_step().contains_key("train_loss"));
        let back = Metrics::from_state(m.to_state());
        assert_eq!(back.epoch, m.epoch);
        assert_eq!(back.prog_bar(), m.prog_bar());
        let e = m.clone().take_epoch();
        assert!((e["val_loss"] - 0.15).abs() < 1e-12);
    }
}
