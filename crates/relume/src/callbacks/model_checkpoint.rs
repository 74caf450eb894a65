//! [`ModelCheckpoint`]: saves on a schedule, keeps the top k by a monitored
//! metric (and optionally the last), with its bookkeeping saved and restored.
//!
//! ## When it saves
//! - `every_n_train_steps(n)`: at the step boundary after every n-th optimizer
//!   step (`on_train_batch_end`);
//! - `train_time_interval(d)`: at the first step boundary after `d` of training
//!   time since its last save;
//! - `every_n_epochs(n)` (the default, n = 1, when neither of the above is
//!   set): at the end of every n-th epoch, after that epoch's validation.
//!
//! ## What it keeps
//! The top-k rule and the deletion rules are pure functions in
//! [`super::retention`]. The decision is taken **before** the save is
//! requested, so the checkpoint's own copy of this callback's state already
//! lists it among the best (a resume from it knows it). Names that leave the
//! kept set are requested for deletion; the trainer deletes them only after
//! the boundary's save has committed, and never the checkpoint the run resumed
//! from. The names evicted by a save are also recorded in the state
//! (`pending_deletes`): a run killed between the commit and the deletion
//! deletes them after resuming from that checkpoint.
//!
//! `save_last`: the newest checkpoint of this callback is always kept as
//! `last`: the top-k checkpoint saved at that boundary, or else a checkpoint
//! named `last-<name>`, replacing the previous `last-*` after it commits.
//!
//! Without a monitor, the score is the global step in `max` mode: the k most
//! recent checkpoints are kept.
//!
//! ## State and identity
//! The state key contains the identity settings (monitor, mode,
//! every_n_train_steps, every_n_epochs, train_time_interval), so two instances
//! with different settings never share state and a changed setting is
//! reported on resume ([`crate::Error::CallbackIdentityChanged`]). The state
//! holds the top k with their scores, `last`, the pending deletions and the
//! step of the last save; the training time (elapsed, and at the last save) is
//! saved **only** when `train_time_interval` is set, because wall-clock time
//! differs between runs and would break byte-identical resume comparisons.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use relume_ckpt::{RestoreReport, StateDict};
use serde_json::Value;

use super::filename::format_name;
use super::monitor::{score_from_json, score_to_json, Mode};
use super::retention::{best_of, plan_deletions, plan_top_k, KeepReason, Retain};
use super::{Callback, HookCtx};
use crate::error::{Error, Result};

/// The checkpoint callback; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct ModelCheckpoint {
    monitor: Option<String>,
    mode: Mode,
    save_top_k: i64,
    every_n_train_steps: u64,
    every_n_epochs: Option<u64>,
    train_time_interval: Option<Duration>,
    save_last: bool,
    filename: String,
    // state
    best_k: BTreeMap<String, f64>,
    last: Option<String>,
    pending_deletes: Vec<String>,
    last_save_step: Option<u64>,
    time_base: f64,
    last_save_time: f64,
    // runtime
    started: Option<Instant>,
    validated: bool,
}

const STATE_KEYS: [&str; 4] = ["best_k", "last", "last_save_step", "pending_deletes"];
const TIME_KEYS: [&str; 2] = ["train_time", "last_save_time"];

impl Default for ModelCheckpoint {
    fn default() -> Self {
        Self::new()
    }
}

impl ModelCheckpoint {
    /// No monitor, `save_top_k(1)`, every epoch, template `epoch={epoch}-step={step}`.
    pub fn new() -> Self {
        ModelCheckpoint {
            monitor: None,
            mode: Mode::Min,
            save_top_k: 1,
            every_n_train_steps: 0,
            every_n_epochs: None,
            train_time_interval: None,
            save_last: false,
            filename: "epoch={epoch}-step={step}".into(),
            best_k: BTreeMap::new(),
            last: None,
            pending_deletes: Vec::new(),
            last_save_step: None,
            time_base: 0.0,
            last_save_time: 0.0,
            started: None,
            validated: false,
        }
    }

    /// Ranks checkpoints by `metric` in `mode`. Default: no monitor (most recent).
    pub fn monitor(mut self, metric: impl Into<String>, mode: Mode) -> Self {
        self.monitor = Some(metric.into());
        self.mode = mode;
        self
    }

    /// Keeps the best `k` (0: none, -1: all). Default 1.
    pub fn save_top_k(mut self, k: i64) -> Self {
        self.save_top_k = k;
        self
    }

    /// Saves every `n` optimizer steps (0: off). Default 0.
    pub fn every_n_train_steps(mut self, n: u64) -> Self {
        self.every_n_train_steps = n;
        self
    }

    /// Saves at the end of every `n`-th epoch (0: off). Default 1 when neither
    /// `every_n_train_steps` nor `train_time_interval` is set, else off.
    pub fn every_n_epochs(mut self, n: u64) -> Self {
        self.every_n_epochs = Some(n);
        self
    }

    /// Saves at the first step boundary after `d` of training time since the
    /// last save. Default: off. (Time is saved in the state when this is set.)
    pub fn train_time_interval(mut self, d: Duration) -> Self {
        self.train_time_interval = Some(d);
        self
    }

    /// Always keeps the newest checkpoint as `last`. Default false.
    pub fn save_last(mut self, on: bool) -> Self {
        self.save_last = on;
        self
    }

    /// The name template (see [`super::filename`]). Default `epoch={epoch}-step={step}`.
    pub fn filename(mut self, template: impl Into<String>) -> Self {
        self.filename = template.into();
        self
    }

    fn epochs(&self) -> u64 {
        match self.every_n_epochs {
            Some(n) => n,
            None if self.every_n_train_steps == 0 && self.train_time_interval.is_none() => 1,
            None => 0,
        }
    }

    /// The top k (name → score) as tracked now.
    pub fn best_k(&self) -> &BTreeMap<String, f64> {
        &self.best_k
    }

    /// The best checkpoint's name, if any.
    pub fn best_name(&self) -> Option<&str> {
        best_of(&self.best_k, self.mode).map(|(n, _)| n.as_str())
    }

    /// The newest checkpoint kept as `last` (with `save_last`).
    pub fn last_name(&self) -> Option<&str> {
        self.last.as_deref()
    }

    /// Every checkpoint name this callback keeps.
    pub fn tracked(&self) -> BTreeSet<String> {
        self.best_k
            .keys()
            .cloned()
            .chain(self.last.clone())
            .collect()
    }

    fn train_time(&self) -> f64 {
        self.time_base + self.started.map_or(0.0, |s| s.elapsed().as_secs_f64())
    }

    fn check_settings(&self) -> Result<()> {
        if self.save_top_k < -1 {
            return Err(Error::InvalidSetting {
                setting: "ModelCheckpoint save_top_k".into(),
                value: self.save_top_k.to_string(),
                rule: "must be -1 (all), 0 (none) or a positive count".into(),
            });
        }
        if self.monitor.is_none() && self.save_top_k > 1 {
            tracing::info!(
                "ModelCheckpoint without monitor keeps the {} most recent checkpoints",
                self.save_top_k
            );
        }
        Ok(())
    }

    /// A save trigger fired at this boundary: decide, request the save and the
    /// deletions, and update the state the checkpoint will hold.
    fn trigger(&mut self, ctx: &mut HookCtx<'_>) -> Result<()> {
        let step = ctx.progress.global_step;
        if self.last_save_step == Some(step) {
            return Ok(());
        }
        let score = match &self.monitor {
            None => step as f64,
            Some(m) => match ctx.metrics.get(m) {
                Some(v) => *v,
                None if !self.validated => {
                    tracing::warn!(
                        "ModelCheckpoint: monitored metric {m:?} not logged yet at step {step}; not saving"
                    );
                    return Ok(());
                }
                None => {
                    return Err(Error::MetricNotLogged {
                        metric: m.clone(),
                        needed_by: self.state_key(),
                    })
                }
            },
        };
        let mode = if self.monitor.is_some() {
            self.mode
        } else {
            Mode::Max
        };
        let base = format_name(&self.filename, ctx.progress, ctx.metrics)?;
        let ckdir = ctx.run_dir.join(relume_ckpt::dir::CHECKPOINTS_DIR);
        let tracked_before = self.tracked();
        let unique = |base: &str| {
            let mut name = base.to_string();
            let mut v = 1;
            while tracked_before.contains(&name) || ckdir.join(&name).exists() {
                name = format!("{base}-v{v}");
                v += 1;
            }
            name
        };
        let name = unique(&base);
        let plan = plan_top_k(&self.best_k, &name, score, self.save_top_k, mode);
        let mut saved = false;
        if plan.save {
            ctx.save_checkpoint(name.clone(), BTreeMap::new());
            saved = true;
        }
        self.best_k = plan.best_k;
        if self.save_last {
            let last = if plan.save {
                name
            } else {
                let n = unique(&format!("last-{base}"));
                ctx.save_checkpoint(n.clone(), BTreeMap::new());
                saved = true;
                n
            };
            self.last = Some(last);
        } else {
            self.last = None;
        }
        if !saved {
            return Ok(());
        }
        self.last_save_step = Some(step);
        self.last_save_time = self.train_time();
        let resumed = ctx
            .resumed_from
            .filter(|p| p.parent() == Some(ckdir.as_path()))
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        self.pending_deletes.clear();
        for r in plan_deletions(&tracked_before, &self.tracked(), resumed.as_deref()) {
            match r {
                Retain::Delete(n) => {
                    ctx.delete_checkpoint(n.clone());
                    self.pending_deletes.push(n);
                }
                Retain::Keep { name, reason } => {
                    let why = match reason {
                        KeepReason::ResumedFrom => "the run resumed from it",
                        KeepReason::OutsideDirectory => "it is not a plain name in checkpoints/",
                        KeepReason::LastOne => "it is the only checkpoint left",
                    };
                    tracing::info!("ModelCheckpoint: keeping {name}: {why}");
                }
            }
        }
        Ok(())
    }

    /// Parses the saved `best_k` object.
    fn parse_best_k(state: &StateDict) -> Result<BTreeMap<String, f64>> {
        let v = state.get_json("best_k").cloned().unwrap_or(Value::Null);
        let Value::Object(m) = v else {
            return Err(relume_ckpt::Error::JsonValue {
                key: "best_k".into(),
                reason: format!("expected an object of name -> score, got {v}"),
            }
            .into());
        };
        m.iter()
            .map(|(k, v)| Ok((k.clone(), score_from_json(&format!("best_k/{k}"), v)?)))
            .collect()
    }
}

impl Callback for ModelCheckpoint {
    fn state_key(&self) -> String {
        format!(
            "ModelCheckpoint{{monitor={},mode={},every_n_train_steps={},every_n_epochs={},train_time_interval={}}}",
            self.monitor.as_deref().unwrap_or("none"),
            self.mode.as_str(),
            self.every_n_train_steps,
            self.epochs(),
            self.train_time_interval
                .map_or("none".to_string(), |d| format!("{}s", d.as_secs_f64())),
        )
    }

    fn state_dict(&self) -> Result<StateDict> {
        let mut sd = StateDict::new();
        let best: serde_json::Map<String, Value> = self
            .best_k
            .iter()
            .map(|(k, v)| (k.clone(), score_to_json(*v)))
            .collect();
        sd.insert_json("best_k", Value::Object(best));
        sd.insert_json("last", serde_json::json!(self.last));
        sd.insert_json("last_save_step", serde_json::json!(self.last_save_step));
        sd.insert_json("pending_deletes", serde_json::json!(self.pending_deletes));
        if self.train_time_interval.is_some() {
            sd.insert_json("train_time", Value::from(self.train_time()));
            sd.insert_json("last_save_time", Value::from(self.last_save_time));
        }
        Ok(sd)
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let mut report = RestoreReport::new();
        let timed = self.train_time_interval.is_some();
        let keys: Vec<&str> = STATE_KEYS
            .iter()
            .chain(if timed { TIME_KEYS.iter() } else { [].iter() })
            .copied()
            .collect();
        report.diff_keys(keys.iter().copied(), state);
        if !report.is_clean() {
            return Ok(report);
        }
        self.best_k = Self::parse_best_k(state)?;
        self.last = state.require_value("last")?;
        self.last_save_step = state.require_value("last_save_step")?;
        self.pending_deletes = state.require_value("pending_deletes")?;
        if timed {
            self.time_base = state.require_value("train_time")?;
            self.last_save_time = state.require_value("last_save_time")?;
        }
        for k in keys {
            report.restored(k);
        }
        Ok(report)
    }

    fn best_checkpoint(&self, saved_state: &StateDict) -> Option<PathBuf> {
        let best_k = Self::parse_best_k(saved_state).ok()?;
        let mode = if self.monitor.is_some() {
            self.mode
        } else {
            Mode::Max
        };
        best_of(&best_k, mode).map(|(n, _)| PathBuf::from(n))
    }

    fn on_fit_start(&mut self, _ctx: &mut HookCtx<'_>) -> Result<()> {
        self.check_settings()?;
        self.started = Some(Instant::now());
        Ok(())
    }

    fn on_load_checkpoint(
        &mut self,
        ctx: &mut HookCtx<'_>,
        _checkpoint: &std::path::Path,
    ) -> Result<()> {
        // The checkpoint resumed from committed, so the deletions its save
        // requested are due; a killed run may not have carried them out.
        let ckdir = ctx.run_dir.join(relume_ckpt::dir::CHECKPOINTS_DIR);
        for n in self.pending_deletes.clone() {
            if !self.tracked().contains(&n) && ckdir.join(&n).join("manifest.json").is_file() {
                tracing::info!("ModelCheckpoint: deleting {n}, evicted before the restart");
                ctx.delete_checkpoint(n);
            }
        }
        self.validated = self
            .monitor
            .as_ref()
            .is_some_and(|m| ctx.metrics.contains_key(m));
        Ok(())
    }

    fn on_validation_end(&mut self, _ctx: &mut HookCtx<'_>) -> Result<()> {
        self.validated = true;
        Ok(())
    }

    fn on_train_batch_end(&mut self, ctx: &mut HookCtx<'_>, step_boundary: bool) -> Result<()> {
        if !step_boundary {
            return Ok(());
        }
        let step = ctx.progress.global_step;
        let by_steps = self.every_n_train_steps > 0 && step % self.every_n_train_steps == 0;
        let by_time = self
            .train_time_interval
            .is_some_and(|d| self.train_time() - self.last_save_time >= d.as_secs_f64());
        if by_steps || by_time {
            self.trigger(ctx)?;
        }
        Ok(())
    }

    fn on_train_epoch_end(&mut self, ctx: &mut HookCtx<'_>) -> Result<()> {
        let n = self.epochs();
        if n > 0 && (ctx.progress.epoch + 1) % n == 0 {
            self.trigger(ctx)?;
        }
        Ok(())
    }
}
