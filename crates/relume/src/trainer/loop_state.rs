//! [`LoopState`]: the loop's counters, saved as the `loop` component.
//!
//! ## Saves snap to optimizer-step boundaries
//! A checkpoint is only ever written right after an optimizer step (or at the
//! start of an epoch, which is also one), so the position inside the
//! gradient-accumulation window is always 0 when saved. An interrupt or stop
//! request that arrives inside a window is honoured at the end of that window.
//! The position is still saved (`accumulation_position`, always 0) and checked on
//! restore, so a checkpoint written otherwise is rejected rather than resumed
//! inexactly.

use std::collections::BTreeMap;

use relume_ckpt::{RestoreReport, StateDict, Stateful};

use crate::callbacks::Progress;
use crate::error::{Error, Result};
use crate::trainer::metrics::{Metrics, MetricsState};

const KEYS: [&str; 9] = [
    "accumulation_position",
    "batch_in_epoch",
    "callbacks",
    "epoch",
    "finished",
    "global_step",
    "logger_step",
    "loggers",
    "metrics",
];

/// Counters and aggregation state of the fit loop.
#[derive(Clone, Debug, Default)]
pub struct LoopState {
    /// Optimizer steps taken.
    pub global_step: u64,
    /// Current epoch (0-based); after an epoch ends, the next one.
    pub epoch: u64,
    /// Training batches consumed in the current epoch.
    pub batch_in_epoch: u64,
    /// Micro-batches accumulated since the last optimizer step (0 at every save).
    pub accumulation_position: u64,
    /// The step of the last report to the loggers.
    pub logger_step: u64,
    /// True once training reached `max_epochs`/`max_steps`.
    pub finished: bool,
    /// Metric aggregation.
    pub metrics: Metrics,
    /// State keys of the callbacks whose state was saved (including stateless ones).
    pub callbacks: Vec<String>,
    /// Names of the loggers whose state was saved.
    pub loggers: Vec<String>,
}

impl LoopState {
    /// The position as seen by callbacks.
    pub fn progress(&self) -> Progress {
        Progress {
            global_step: self.global_step,
            epoch: self.epoch,
            batch_in_epoch: self.batch_in_epoch,
        }
    }

    /// The manifest's `progress` block.
    pub fn progress_json(&self) -> serde_json::Value {
        progress_json(self.progress(), self.finished)
    }

    /// Latest metric values.
    pub fn latest_metrics(&self) -> &BTreeMap<String, f64> {
        self.metrics.latest()
    }
}

/// The manifest's `progress` block for position `p` (see [`LoopState::progress_json`]).
pub(crate) fn progress_json(p: Progress, finished: bool) -> serde_json::Value {
    serde_json::json!({
        "global_step": p.global_step,
        "epoch": p.epoch,
        "batch_in_epoch": p.batch_in_epoch,
        "finished": finished,
    })
}

fn json_err(key: &str, e: serde_json::Error) -> Error {
    relume_ckpt::Error::JsonValue {
        key: key.to_string(),
        reason: e.to_string(),
    }
    .into()
}

impl Stateful for LoopState {
    type Error = Error;

    /// A copy of the counters; the JSON is built when the snapshot resolves.
    fn snapshot(&self, _pool: &relume_ckpt::BufferPool) -> Result<relume_ckpt::Snapshot<Error>> {
        let copy = self.clone();
        Ok(relume_ckpt::Snapshot::deferred(move || copy.state_dict()))
    }

    fn state_dict(&self) -> Result<StateDict> {
        let mut sd = StateDict::new();
        sd.insert_json("global_step", self.global_step.into());
        sd.insert_json("epoch", self.epoch.into());
        sd.insert_json("batch_in_epoch", self.batch_in_epoch.into());
        sd.insert_json("accumulation_position", self.accumulation_position.into());
        sd.insert_json("logger_step", self.logger_step.into());
        sd.insert_json("finished", self.finished.into());
        sd.insert_json(
            "metrics",
            serde_json::to_value(self.metrics.to_state()).map_err(|e| json_err("metrics", e))?,
        );
        sd.insert_json("callbacks", serde_json::json!(self.callbacks));
        sd.insert_json("loggers", serde_json::json!(self.loggers));
        Ok(sd)
    }

    /// Restores every counter; a non-zero accumulation position is a mismatch (this
    /// trainer only saves at optimizer-step boundaries).
    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let mut report = RestoreReport::new();
        report.diff_keys(KEYS, state);
        if !report.is_clean() {
            return Ok(report);
        }
        let pos: u64 = state.require_value("accumulation_position")?;
        if pos != 0 {
            report.mismatched(
                "accumulation_position",
                "0 (a step boundary)",
                pos.to_string(),
            );
            return Ok(report);
        }
        let ms: MetricsState = state.require_value("metrics")?;
        *self = LoopState {
            global_step: state.require_value("global_step")?,
            epoch: state.require_value("epoch")?,
            batch_in_epoch: state.require_value("batch_in_epoch")?,
            accumulation_position: 0,
            logger_step: state.require_value("logger_step")?,
            finished: state.require_value("finished")?,
            metrics: Metrics::from_state(ms),
            callbacks: state.require_value("callbacks")?,
            loggers: state.require_value("loggers")?,
        };
        for k in KEYS {
            report.restored(k);
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::metrics::LogOpts;

    #[test]
    fn round_trips_and_rejects_mid_window() {
        let mut s = LoopState {
            global_step: 7,
            epoch: 2,
            batch_in_epoch: 3,
            callbacks: vec!["cb".into()],
            ..LoopState::default()
        };
        s.metrics
            .log("loss", 0.25, LogOpts::new().on_epoch(true), true);
        let sd = s.state_dict().unwrap();
        let mut back = LoopState::default();
        assert!(back.load_state_dict(&sd).unwrap().is_clean());
        assert_eq!(back.state_dict().unwrap(), sd);
        let mut bad = sd.clone();
        bad.insert_json("accumulation_position", 2.into());
        let r = LoopState::default().load_state_dict(&bad).unwrap();
        assert_eq!(r.mismatched[0].key, "accumulation_position");
        bad.remove("epoch");
        assert_eq!(
            LoopState::default().load_state_dict(&bad).unwrap().missing,
            vec!["epoch"]
        );
    }
}
