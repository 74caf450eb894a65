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
//! the boundary's save has committed. The names evicted by a save are also
//! recorded in the state (`pending_deletes`): a run killed between the commit
//! and the deletion deletes them after resuming from that checkpoint. The
//! checkpoint the run resumed from is recorded there too when the top k drop it
//! (its deletion itself is deferred, below), so the list is the same as in an
//! uninterrupted run.
//!
//! ## The checkpoint the run resumed from
//! It is protected for as long as the run may still need it: while the run is
//! in progress it is never deleted (a crash before the next save must find it
//! again). When the top k drop it, it is recorded in the state as a *deferred*
//! deletion (`deferred_deletes`, written only when non-empty) and deleted at
//! the end of a fit that completed ([`Callback::on_fit_end`], after the final
//! save committed and every async save was flushed), if it is then still not
//! wanted (not in the top k, not `last`, not best) and is a plain name inside
//! this run's `checkpoints/`. A preempted, killed, stopped or failed run
//! deletes nothing deferred; the next run inherits the list through the state,
//! and, resumed from a later checkpoint whose `pending_deletes` name it, deletes
//! it on load.
//! At the boundary where training completes ([`Callback::on_train_end`]) the
//! list leaves the state, before the final checkpoint is taken: the deletion is
//! then due right after that checkpoint commits. So a run that was killed and
//! resumed ends with the same checkpoint files and the same final state, byte
//! for byte, as an uninterrupted one. (A crash in the instant between the final
//! commit and the deletion leaves the old checkpoint behind as an ordinary,
//! listed checkpoint; no state is lost.)
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
use super::retention::{best_of, is_plain_name, plan_deletions, plan_top_k, KeepReason, Retain};
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
    deferred_deletes: Vec<String>,
    last_save_step: Option<u64>,
    time_base: f64,
    last_save_time: f64,
    // runtime
    started: Option<Instant>,
    validated: bool,
    /// Deferred deletions taken out of the state at the boundary where training
    /// completes (see [`Callback::on_train_end`]), carried out in `on_fit_end`.
    due_at_fit_end: Vec<String>,
}

const STATE_KEYS: [&str; 4] = ["best_k", "last", "last_save_step", "pending_deletes"];
const TIME_KEYS: [&str; 2] = ["train_time", "last_save_time"];
/// Written only when non-empty, so runs that never deferred a deletion (and
/// checkpoints written before it existed) hold exactly the [`STATE_KEYS`].
const DEFERRED_KEY: &str = "deferred_deletes";

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
            deferred_deletes: Vec::new(),
            due_at_fit_end: Vec::new(),
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

    /// Checkpoints the top k dropped while they were protected as the resume
    /// source; deleted at the end of a completed fit (see the [module docs](self)).
    pub fn deferred_deletes(&self) -> &[String] {
        &self.deferred_deletes
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

    fn check_settings(&self, report: bool) -> Result<()> {
        if self.save_top_k < -1 {
            return Err(Error::InvalidSetting {
                setting: "ModelCheckpoint save_top_k".into(),
                value: self.save_top_k.to_string(),
                rule: "must be -1 (all), 0 (none) or a positive count".into(),
            });
        }
        if report && self.monitor.is_none() && self.save_top_k > 1 {
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
                // Known to be missing for good once validation ran (without a
                // validation loop: see `on_train_epoch_end`).
                None if self.validated => return Err(self.never_logged(m, ctx)),
                None => {
                    tracing::warn!(
                        "ModelCheckpoint: monitored metric {m:?} not logged yet at step {step}; not saving"
                    );
                    return Ok(());
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
        let unique = |base: &str| -> Result<String> {
            let mut name = base.to_string();
            let mut v = 1;
            while tracked_before.contains(&name) || relume_ckpt::name_taken(&ckdir.join(&name))? {
                name = format!("{base}-v{v}");
                v += 1;
            }
            Ok(name)
        };
        let name = unique(&base)?;
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
                let n = unique(&format!("last-{base}"))?;
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
                Retain::Keep {
                    name,
                    reason: KeepReason::ResumedFrom,
                } => {
                    tracing::info!(
                        "ModelCheckpoint: keeping {name} while the run that resumed from it is in progress; it is deleted when the run completes"
                    );
                    if !self.deferred_deletes.contains(&name) {
                        self.deferred_deletes.push(name.clone());
                    }
                    // Evicted by this save all the same: the state records it as an
                    // uninterrupted run's does (a run resumed from a later checkpoint
                    // no longer needs it), so a killed-and-resumed run ends with the
                    // same state, byte for byte.
                    self.pending_deletes.push(name);
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
    /// The error for a monitored metric that is known never to be logged.
    fn never_logged(&self, metric: &str, ctx: &HookCtx<'_>) -> Error {
        Error::MonitorNeverLogged {
            metric: metric.to_string(),
            needed_by: self.state_key(),
            logged: ctx.metrics.keys().cloned().collect(),
        }
    }

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
        if !self.deferred_deletes.is_empty() {
            sd.insert_json(DEFERRED_KEY, serde_json::json!(self.deferred_deletes));
        }
        if self.train_time_interval.is_some() {
            sd.insert_json("train_time", Value::from(self.train_time()));
            sd.insert_json("last_save_time", Value::from(self.last_save_time));
        }
        Ok(sd)
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let mut report = RestoreReport::new();
        let timed = self.train_time_interval.is_some();
        let deferred = state.contains_key(DEFERRED_KEY);
        let keys: Vec<&str> = STATE_KEYS
            .iter()
            .chain(if timed { TIME_KEYS.iter() } else { [].iter() })
            .copied()
            .chain(deferred.then_some(DEFERRED_KEY))
            .collect();
        report.diff_keys(keys.iter().copied(), state);
        if !report.is_clean() {
            return Ok(report);
        }
        self.best_k = Self::parse_best_k(state)?;
        self.last = state.require_value("last")?;
        self.last_save_step = state.require_value("last_save_step")?;
        self.pending_deletes = state.require_value("pending_deletes")?;
        self.deferred_deletes = if deferred {
            state.require_value(DEFERRED_KEY)?
        } else {
            Vec::new()
        };
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

    fn on_fit_start(&mut self, ctx: &mut HookCtx<'_>) -> Result<()> {
        self.check_settings(ctx.is_global_zero())?;
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
            if !self.tracked().contains(&n) && relume_ckpt::is_committed(&ckdir.join(&n))? {
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

    /// Training completes at this boundary: the deferred deletions leave the
    /// state, so the final checkpoint equals an uninterrupted run's; they are
    /// carried out in `on_fit_end`, once that checkpoint committed.
    fn on_train_end(&mut self, _ctx: &mut HookCtx<'_>) -> Result<()> {
        for n in std::mem::take(&mut self.deferred_deletes) {
            if !self.due_at_fit_end.contains(&n) {
                self.due_at_fit_end.push(n);
            }
        }
        Ok(())
    }

    /// The fit completed (the final save committed, async saves flushed): the
    /// deferred deletions of the former resume source are due, for each name
    /// still not wanted, plain, and a checkpoint of this run's directory.
    fn on_fit_end(&mut self, ctx: &mut HookCtx<'_>) -> Result<()> {
        let ckdir = ctx.run_dir.join(relume_ckpt::dir::CHECKPOINTS_DIR);
        let best = self.best_name().map(str::to_string);
        let tracked = self.tracked();
        let mut due = std::mem::take(&mut self.due_at_fit_end);
        for n in &self.deferred_deletes {
            if !due.contains(n) {
                due.push(n.clone());
            }
        }
        for n in &due {
            let wanted = tracked.contains(n) || best.as_ref() == Some(n);
            if !wanted && is_plain_name(n) && relume_ckpt::is_committed(&ckdir.join(n))? {
                tracing::info!("ModelCheckpoint: deleting {n}, the former resume source, now that the run completed");
                ctx.delete_checkpoint(n.clone());
            }
        }
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
        if let Some(m) = &self.monitor {
            // Without validation, every metric the run logs has been logged by the
            // end of its first epoch.
            if !ctx.has_validation() && !ctx.metrics.contains_key(m) {
                return Err(self.never_logged(m, ctx));
            }
        }
        let n = self.epochs();
        if n > 0 && (ctx.progress.epoch + 1) % n == 0 {
            self.trigger(ctx)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::callbacks::{Progress, Request};
    use std::path::Path;

    /// Runs the epoch-end hook at `step` with `val_loss`; returns the requests.
    fn epoch_end(
        mc: &mut ModelCheckpoint,
        epoch: u64,
        val_loss: f64,
        resumed: Option<&Path>,
    ) -> Vec<Request> {
        epoch_end_in(
            mc,
            epoch,
            val_loss,
            resumed,
            Path::new("/nonexistent-relume-run"),
        )
    }

    /// As `epoch_end`, in run directory `run`.
    fn epoch_end_in(
        mc: &mut ModelCheckpoint,
        epoch: u64,
        val_loss: f64,
        resumed: Option<&Path>,
        run: &Path,
    ) -> Vec<Request> {
        let metrics: BTreeMap<String, f64> = [("val_loss".to_string(), val_loss)].into();
        let progress = Progress {
            global_step: (epoch + 1) * 10,
            epoch,
            batch_in_epoch: 10,
        };
        let mut reqs = Vec::new();
        let mut ctx = HookCtx::new(progress, &metrics, run, resumed, &mut reqs);
        mc.on_train_epoch_end(&mut ctx).unwrap();
        reqs
    }

    fn names(reqs: &[Request]) -> (Vec<String>, Vec<String>) {
        let mut saves = Vec::new();
        let mut deletes = Vec::new();
        for r in reqs {
            match r {
                Request::Save { name, .. } => saves.push(name.clone()),
                Request::Delete { name } => deletes.push(name.clone()),
                _ => {}
            }
        }
        (saves, deletes)
    }

    #[test]
    fn top_two_saves_then_evicts_after_requesting_the_new_save() {
        let mut mc = ModelCheckpoint::new()
            .monitor("val_loss", Mode::Min)
            .save_top_k(2)
            .filename("s{step}");
        assert_eq!(
            names(&epoch_end(&mut mc, 0, 0.5, None)),
            (vec!["s10".into()], vec![])
        );
        assert_eq!(
            names(&epoch_end(&mut mc, 1, 0.7, None)),
            (vec!["s20".into()], vec![])
        );
        assert_eq!(names(&epoch_end(&mut mc, 2, 0.9, None)), (vec![], vec![]));
        let reqs = epoch_end(&mut mc, 3, 0.6, None);
        // the save is requested before the deletion (the trainer deletes after commit)
        assert!(matches!(&reqs[0], Request::Save { name, .. } if name == "s40"));
        assert_eq!(names(&reqs), (vec!["s40".into()], vec!["s20".into()]));
        assert_eq!(mc.best_name(), Some("s10"));
        // the state already holds the new checkpoint and the pending deletion
        let sd = mc.state_dict().unwrap();
        let mut back = ModelCheckpoint::new()
            .monitor("val_loss", Mode::Min)
            .save_top_k(2);
        assert!(back.load_state_dict(&sd).unwrap().is_clean());
        assert_eq!(back.best_k(), mc.best_k());
        assert_eq!(back.state_dict().unwrap(), sd);
        assert_eq!(
            back.best_checkpoint(&sd),
            Some(PathBuf::from("s10")),
            "Source::Best resolves through the saved state"
        );
    }

    #[test]
    fn never_deletes_the_resume_source() {
        let mut mc = ModelCheckpoint::new()
            .monitor("val_loss", Mode::Min)
            .save_top_k(1)
            .filename("s{step}");
        epoch_end(&mut mc, 0, 0.5, None);
        let src = Path::new("/nonexistent-relume-run/checkpoints/s10");
        let reqs = epoch_end(&mut mc, 1, 0.4, Some(src));
        assert_eq!(names(&reqs), (vec!["s20".into()], vec![]));
        assert_eq!(mc.best_name(), Some("s20"));
    }

    /// Runs `on_fit_end` in `run`; returns the deletions it requested.
    fn fit_end(mc: &mut ModelCheckpoint, run: &Path) -> Vec<String> {
        let metrics = BTreeMap::new();
        let mut reqs = Vec::new();
        let mut ctx = HookCtx::new(Progress::default(), &metrics, run, None, &mut reqs);
        mc.on_fit_end(&mut ctx).unwrap();
        names(&reqs).1
    }

    #[test]
    fn a_dropped_resume_source_is_deferred_until_the_run_completes() {
        let run = tempfile::tempdir().unwrap();
        let commit = |n: &str| {
            let d = run.path().join("checkpoints").join(n);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("manifest.json"), b"{}").unwrap();
        };
        let new = || {
            ModelCheckpoint::new()
                .monitor("val_loss", Mode::Min)
                .save_top_k(1)
                .filename("s{step}")
        };
        let mut mc = new();
        epoch_end_in(&mut mc, 0, 0.5, None, run.path());
        commit("s10");
        // resumed from s10; s20 is better, so the top 1 drops s10: not deleted
        // now, recorded as deferred in the state the s20 checkpoint holds
        let src = run.path().join("checkpoints/s10");
        let reqs = epoch_end_in(&mut mc, 1, 0.4, Some(&src), run.path());
        assert_eq!(names(&reqs), (vec!["s20".into()], vec![]));
        commit("s20");
        assert_eq!(mc.deferred_deletes(), ["s10".to_string()]);
        let sd = mc.state_dict().unwrap();
        assert_eq!(
            sd.get_json("deferred_deletes"),
            Some(&serde_json::json!(["s10"]))
        );
        // s10 is recorded as evicted by s20 all the same, as in an uninterrupted
        // run's state.
        assert_eq!(
            sd.get_json("pending_deletes"),
            Some(&serde_json::json!(["s10"]))
        );
        // The run is interrupted here (preempted or killed): `on_fit_end` never
        // runs, so nothing deletes s10. The next run resumes from s20 and no
        // longer needs s10: it deletes it on load, as the uninterrupted run did
        // when s20 committed ...
        let mut next = new();
        assert!(next.load_state_dict(&sd).unwrap().is_clean());
        assert_eq!(next.deferred_deletes(), ["s10".to_string()]);
        let metrics = BTreeMap::new();
        let mut reqs = Vec::new();
        let mut ctx = HookCtx::new(Progress::default(), &metrics, run.path(), None, &mut reqs);
        next.on_load_checkpoint(&mut ctx, &run.path().join("checkpoints/s20"))
            .unwrap();
        assert_eq!(names(&reqs), (vec![], vec!["s10".to_string()]));
        // ... and so does its completed fit (a no-op once it is gone), keeping
        // s20, the best. At the
        // boundary where training completes the list leaves the state (the final
        // checkpoint equals an uninterrupted run's), and the deletion is still due.
        let mut reqs = Vec::new();
        let mut ctx = HookCtx::new(Progress::default(), &metrics, run.path(), None, &mut reqs);
        next.on_train_end(&mut ctx).unwrap();
        assert!(next.deferred_deletes().is_empty());
        assert!(next
            .state_dict()
            .unwrap()
            .get_json("deferred_deletes")
            .is_none());
        assert_eq!(fit_end(&mut next, run.path()), vec!["s10".to_string()]);
        assert_eq!(next.best_name(), Some("s20"));
    }

    #[test]
    fn fit_end_never_deletes_a_wanted_gone_or_foreign_checkpoint() {
        let run = tempfile::tempdir().unwrap();
        for n in ["s10", "s20"] {
            let d = run.path().join("checkpoints").join(n);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("manifest.json"), b"{}").unwrap();
        }
        let mut mc = ModelCheckpoint::new().monitor("val_loss", Mode::Min);
        mc.best_k.insert("s20".into(), 0.1);
        mc.deferred_deletes = vec![
            "s20".into(),    // wanted again (best)
            "gone".into(),   // already deleted
            "../s10".into(), // not a plain name
            "s10".into(),    // due
        ];
        assert_eq!(fit_end(&mut mc, run.path()), vec!["s10".to_string()]);
        // without any deferred deletion the state has no such key (unchanged bytes)
        let plain = ModelCheckpoint::new().monitor("val_loss", Mode::Min);
        assert!(plain
            .state_dict()
            .unwrap()
            .get("deferred_deletes")
            .is_none());
    }

    #[test]
    fn save_last_keeps_a_separate_last_when_not_top_k() {
        let mut mc = ModelCheckpoint::new()
            .monitor("val_loss", Mode::Min)
            .save_top_k(1)
            .save_last(true)
            .filename("s{step}");
        assert_eq!(names(&epoch_end(&mut mc, 0, 0.5, None)).0, vec!["s10"]);
        assert_eq!(names(&epoch_end(&mut mc, 1, 0.9, None)).0, vec!["last-s20"]);
        assert_eq!(mc.last_name(), Some("last-s20"));
        let (saves, deletes) = names(&epoch_end(&mut mc, 2, 0.95, None));
        assert_eq!(
            (saves, deletes),
            (vec!["last-s30".into()], vec!["last-s20".into()])
        );
        let (saves, deletes) = names(&epoch_end(&mut mc, 3, 0.1, None));
        assert_eq!(saves, vec!["s40"]);
        assert_eq!(deletes, vec!["last-s30", "s10"]);
        assert_eq!(mc.tracked().into_iter().collect::<Vec<_>>(), vec!["s40"]);
    }

    #[test]
    fn identity_settings_are_in_the_state_key() {
        let a = ModelCheckpoint::new().monitor("val_loss", Mode::Min);
        let b = ModelCheckpoint::new().monitor("val_loss", Mode::Max);
        let c = ModelCheckpoint::new()
            .monitor("val_loss", Mode::Min)
            .every_n_train_steps(100);
        let d = a.clone().save_top_k(5).filename("x{step}");
        assert_ne!(a.state_key(), b.state_key());
        assert_ne!(a.state_key(), c.state_key());
        assert_eq!(
            a.state_key(),
            d.state_key(),
            "top-k and filename are not identity"
        );
        assert!(!a.state_key().contains('/'));
        // time is only saved when a time interval is set
        assert!(a.state_dict().unwrap().get("train_time").is_none());
        let t = ModelCheckpoint::new().train_time_interval(Duration::from_secs(60));
        assert!(t.state_dict().unwrap().get("train_time").is_some());
    }

    #[test]
    fn deletions_pending_at_a_kill_are_carried_out_after_resume() {
        let run = tempfile::tempdir().unwrap();
        for n in ["old", "kept"] {
            let d = run.path().join("checkpoints").join(n);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("manifest.json"), b"{}").unwrap();
        }
        let mut mc = ModelCheckpoint::new().monitor("val_loss", Mode::Min);
        mc.best_k.insert("kept".into(), 0.1);
        mc.pending_deletes = vec!["old".into(), "gone".into()];
        let sd = mc.state_dict().unwrap();
        let mut back = ModelCheckpoint::new().monitor("val_loss", Mode::Min);
        back.load_state_dict(&sd).unwrap();
        let metrics = BTreeMap::new();
        let mut reqs = Vec::new();
        let mut ctx = HookCtx::new(Progress::default(), &metrics, run.path(), None, &mut reqs);
        back.on_load_checkpoint(&mut ctx, Path::new("x")).unwrap();
        assert_eq!(names(&reqs), (vec![], vec!["old".to_string()]));
        // the state is unchanged, so the next checkpoint's bytes match an uninterrupted run's
        assert_eq!(back.state_dict().unwrap(), sd);
    }

    #[test]
    fn step_and_time_triggers_save_once_per_boundary() {
        let run = Path::new("/nonexistent-relume-run");
        let batch_end = |mc: &mut ModelCheckpoint, step: u64, boundary: bool| {
            let metrics = BTreeMap::new();
            let p = Progress {
                global_step: step,
                epoch: 0,
                batch_in_epoch: step,
            };
            let mut reqs = Vec::new();
            let mut ctx = HookCtx::new(p, &metrics, run, None, &mut reqs);
            mc.on_train_batch_end(&mut ctx, boundary).unwrap();
            mc.on_train_epoch_end(&mut ctx).unwrap();
            names(&reqs).0
        };
        // every 5 steps, most recent 1 (no monitor); epoch end at the same step
        // does not save twice (every_n_epochs is off when steps are set)
        let mut mc = ModelCheckpoint::new()
            .every_n_train_steps(5)
            .filename("s{step}");
        assert!(batch_end(&mut mc, 4, true).is_empty());
        assert_eq!(batch_end(&mut mc, 5, true), vec!["s5"]);
        assert!(batch_end(&mut mc, 5, false).is_empty());
        let mut mc = ModelCheckpoint::new()
            .every_n_train_steps(5)
            .every_n_epochs(1)
            .filename("s{step}");
        assert_eq!(
            batch_end(&mut mc, 5, true),
            vec!["s5"],
            "one save per boundary"
        );
        // a zero interval fires at every boundary
        let mut mc = ModelCheckpoint::new()
            .train_time_interval(Duration::ZERO)
            .filename("s{step}");
        mc.started = Some(Instant::now());
        assert_eq!(batch_end(&mut mc, 1, true), vec!["s1"]);
        assert_eq!(batch_end(&mut mc, 2, true), vec!["s2"]);
    }

    #[test]
    fn a_missing_monitor_after_validation_is_an_error() {
        let mut mc = ModelCheckpoint::new().monitor("val_acc", Mode::Max);
        mc.validated = true;
        let metrics = BTreeMap::new();
        let mut reqs = Vec::new();
        let mut ctx = HookCtx::new(
            Progress::default(),
            &metrics,
            Path::new("/nonexistent"),
            None,
            &mut reqs,
        );
        let e = mc.on_train_epoch_end(&mut ctx).unwrap_err();
        assert!(matches!(e, Error::MonitorNeverLogged { ref metric, .. } if metric == "val_acc"));
    }
}
