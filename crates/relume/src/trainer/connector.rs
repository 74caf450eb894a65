//! The checkpoint connector: what a checkpoint holds, how it is saved, and the
//! strict, verified restore.
//!
//! ## Components
//! | component      | holds                                                         |
//! |----------------|---------------------------------------------------------------|
//! | `model`        | every parameter of the module, keyed by name                  |
//! | `optimizer.<i>`| optimizer `i`'s state (moments, per-parameter steps, groups)  |
//! | `scheduler.<i>`| the scheduler attached to optimizer `i`, if any               |
//! | `rng`          | the trainer's RNG streams, as words                           |
//! | `train_loader` | the data cursor (epoch, next batch, shuffle seed)             |
//! | `loop`         | counters, logger step, metric aggregation, finished flag      |
//! | `callbacks`    | `<state_key>/<key>` for every stateful callback               |
//! | `loggers`      | `<name>/<key>` for every stateful logger                      |
//! | `user`         | [`TrainModule::on_save_checkpoint`](super::TrainModule) state  |
//!
//! Empty components are not written; the `loop` component lists every callback
//! and logger that took part, so a stateless one is still accounted for.
//!
//! ## Restore, in this order
//! 1. [`relume_ckpt::load`] reads the checkpoint and verifies every checksum
//!    before any live object is touched.
//! 2. The optimizer and scheduler counts must match ([`Error::ComponentCount`]).
//! 3. The config diff ([`diff_config`]): a changed result-affecting setting is
//!    [`Error::ConfigChanged`] unless overridden; raising `max_epochs`/`max_steps`
//!    is allowed. (It runs before any state is applied, so a refused resume leaves
//!    the live objects untouched.)
//! 4. Strict accounting: every component is applied and every key accounted for;
//!    anything missing, unexpected or mismatched and not allow-listed is
//!    [`Error::RestoreIncomplete`]. Loggers are applied last, once every other
//!    component was accepted (a logger cuts its files back to the checkpoint).
//! 5. Post-restore verification: the fingerprint recomputed from the live objects
//!    must equal the manifest's ([`Error::FingerprintMismatch`]).
//!
//! **All or nothing.** Before step 4 the live state is copied; if step 4 or 5
//! fails, that copy is put back into every component (loggers aside, which are
//! applied last and only after the others were accepted) and its fingerprint
//! checked, so a failed restore leaves the model, optimizers, schedulers, RNG,
//! loader, loop state and callbacks exactly as they were
//! ([`Error::RollbackFailed`] if even that fails).
//!
//! ## Saving
//! A synchronous save goes through `Connector::save`; with async checkpointing
//! the same components are snapshotted and committed by the writer thread of
//! [`super::async_saves`], into the same directory handle.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use relume_ckpt::{
    BufferPool, Checkpoint, CheckpointDir, RestoreReport, Snapshot, StateDict, Stateful,
};
use serde_json::Value;

use crate::callbacks::Callback;
use crate::error::{Error, Result};
use crate::loggers::Logger;
use crate::optim::Optimizer;
use crate::params::ParamStore;
use crate::rng::RngStreams;
use crate::trainer::builder::TrainerConfig;
pub use crate::trainer::config::{diff_config, GROWABLE_KEYS};
use crate::trainer::config::{is_scheduler_config, run_grows};
use crate::trainer::loop_state::LoopState;
use crate::trainer::module::SchedulerConfig;
use crate::trainer::resume::{ResumePolicy, Source};

/// The live objects a checkpoint is taken from and restored into.
pub(crate) struct Live<'a> {
    pub params: &'a mut ParamStore,
    pub optimizers: &'a mut [Box<dyn Optimizer>],
    pub schedulers: &'a mut [Option<SchedulerConfig>],
    pub rng: &'a mut RngStreams,
    pub loader: &'a mut dyn Stateful<Error = Error>,
    pub state: &'a mut LoopState,
    pub callbacks: &'a mut [Box<dyn Callback>],
    pub loggers: &'a mut [Box<dyn Logger>],
}

/// Component name of optimizer `i`.
pub fn optimizer_component(i: usize) -> String {
    format!("optimizer.{i}")
}

/// Component name of the scheduler of optimizer `i`.
pub fn scheduler_component(i: usize) -> String {
    format!("scheduler.{i}")
}

/// Read-only access to the live objects, for taking a snapshot.
pub(crate) struct View<'a> {
    pub params: &'a ParamStore,
    pub optimizers: &'a [Box<dyn Optimizer>],
    pub schedulers: &'a [Option<SchedulerConfig>],
    pub rng: &'a RngStreams,
    pub loader: &'a dyn Stateful<Error = Error>,
    pub state: &'a LoopState,
    pub callbacks: &'a [Box<dyn Callback>],
    pub loggers: &'a [Box<dyn Logger>],
}

impl Live<'_> {
    pub(crate) fn view(&self) -> View<'_> {
        View {
            params: self.params,
            optimizers: self.optimizers,
            schedulers: self.schedulers,
            rng: self.rng,
            loader: &*self.loader,
            state: self.state,
            callbacks: self.callbacks,
            loggers: self.loggers,
        }
    }
}

impl View<'_> {
    /// Every component's state, as it would be saved. `user` is the module's hook state.
    pub(crate) fn components(&self, user: StateDict) -> Result<BTreeMap<String, StateDict>> {
        // Copied into plain `Vec`s: staging buffers pay off only when recycled.
        self.snapshot(user, &BufferPool::with_min_pooled(usize::MAX))?
            .resolve()
    }

    /// Every component's [`Snapshot`] (tensor bytes copied into `pool`), for an
    /// async save; [`Snapshots::resolve`] builds exactly what
    /// [`View::components`] returns now.
    pub(crate) fn snapshot(&self, user: StateDict, pool: &BufferPool) -> Result<Snapshots> {
        let mut parts = Vec::with_capacity(4 + 2 * self.optimizers.len());
        parts.push(("model".to_string(), self.params.snapshot(pool)?));
        for (i, o) in self.optimizers.iter().enumerate() {
            parts.push((optimizer_component(i), o.snapshot(pool)?));
        }
        for (i, s) in self.schedulers.iter().enumerate() {
            if let Some(s) = s {
                parts.push((scheduler_component(i), s.scheduler.snapshot(pool)?));
            }
        }
        parts.push(("rng".to_string(), self.rng.snapshot(pool)?));
        parts.push(("train_loader".to_string(), self.loader.snapshot(pool)?));
        parts.push(("loop".to_string(), self.state.snapshot(pool)?));
        let mut callbacks = Vec::with_capacity(self.callbacks.len());
        for cb in self.callbacks.iter() {
            callbacks.push((cb.state_key(), cb.state_dict()?));
        }
        let mut loggers = Vec::with_capacity(self.loggers.len());
        for lg in self.loggers.iter() {
            loggers.push((lg.name().to_string(), lg.snapshot(pool)?));
        }
        Ok(Snapshots {
            parts,
            callbacks,
            loggers,
            user,
        })
    }
}

/// The state of every component as taken at a save, before its JSON leaves are
/// built (see [`relume_ckpt::Snapshot`]).
pub(crate) struct Snapshots {
    parts: Vec<(String, Snapshot<Error>)>,
    callbacks: Vec<(String, StateDict)>,
    loggers: Vec<(String, Snapshot<Error>)>,
    user: StateDict,
}

impl Snapshots {
    /// The components map: `callbacks`, `loggers` and `user` only when non-empty.
    ///
    /// # Errors
    /// A component's deferred build failed.
    pub(crate) fn resolve(self) -> Result<BTreeMap<String, StateDict>> {
        self.resolve_named().map_err(|e| e.1)
    }

    /// As [`Snapshots::resolve`], naming the component that failed.
    pub(crate) fn resolve_named(
        self,
    ) -> std::result::Result<BTreeMap<String, StateDict>, Box<(String, Error)>> {
        let mut c = BTreeMap::new();
        for (name, snap) in self.parts {
            match snap.resolve() {
                Ok(sd) => c.insert(name, sd),
                Err(e) => return Err(Box::new((name, e))),
            };
        }
        let mut cbs = StateDict::new();
        for (key, sd) in self.callbacks {
            cbs.insert_prefixed(&key, sd);
        }
        let mut lgs = StateDict::new();
        for (name, snap) in self.loggers {
            match snap.resolve() {
                Ok(sd) => lgs.insert_prefixed(&name, sd),
                Err(e) => return Err(Box::new((format!("loggers/{name}"), e))),
            }
        }
        for (name, sd) in [("callbacks", cbs), ("loggers", lgs), ("user", self.user)] {
            if !sd.is_empty() {
                c.insert(name.to_string(), sd);
            }
        }
        Ok(c)
    }
}

/// A finished restore.
#[derive(Clone, Debug)]
pub struct Restored {
    /// The checkpoint restored from.
    pub path: PathBuf,
    /// Its manifest's progress block.
    pub progress: Value,
    /// Keys restored, per component.
    pub restored_components: Vec<String>,
    /// Keys excused by the allow-list (not restored).
    pub allowed: Vec<String>,
    /// Scheduler settings that follow the new run length
    /// ([`crate::trainer::TrainerBuilder::extend_schedules`]).
    pub extended: Vec<String>,
}

/// Owns the run directory's checkpoint handle.
pub(crate) struct Connector {
    run_dir: PathBuf,
    dir: Option<std::sync::Arc<CheckpointDir>>,
    storage: Option<std::sync::Arc<dyn relume_ckpt::Storage>>,
}

impl Connector {
    pub(crate) fn new(run_dir: &Path) -> Self {
        Connector {
            run_dir: run_dir.to_path_buf(),
            dir: None,
            storage: None,
        }
    }

    /// Writes through `storage` instead of the local filesystem (failure injection).
    pub(crate) fn with_storage(
        mut self,
        storage: Option<std::sync::Arc<dyn relume_ckpt::Storage>>,
    ) -> Self {
        self.storage = storage;
        self
    }

    /// The checkpoint directory, opened (and locked) on first use.
    pub(crate) fn dir(&mut self) -> Result<&CheckpointDir> {
        Ok(self.shared_dir()?.as_ref())
    }

    /// The checkpoint directory as a shared handle (for the async writer).
    pub(crate) fn shared_dir(&mut self) -> Result<&std::sync::Arc<CheckpointDir>> {
        if self.dir.is_none() {
            let d = match &self.storage {
                Some(s) => {
                    CheckpointDir::open_with_storage(&self.run_dir, std::sync::Arc::clone(s))?
                }
                None => CheckpointDir::open(&self.run_dir)?,
            };
            self.dir = Some(std::sync::Arc::new(d));
        }
        match &self.dir {
            Some(d) => Ok(d),
            None => unreachable!("opened above"),
        }
    }

    /// The synchronous save path: commits `components` as checkpoint `name` and
    /// points `latest` at it once all of `group` (every save of the boundary) is
    /// committed. (Async saves go through
    /// [`super::async_saves::AsyncSaves`] on the same directory handle.)
    ///
    /// # Errors
    /// relume-ckpt errors (I/O, an existing name).
    pub(crate) fn save(
        &mut self,
        name: &str,
        components: BTreeMap<String, StateDict>,
        progress: Value,
        config: Value,
        metrics: BTreeMap<String, f64>,
        group: Vec<String>,
    ) -> Result<PathBuf> {
        let ckpt = Checkpoint {
            components,
            progress,
            config,
            metrics,
            group,
        };
        Ok(self.dir()?.save(name, &ckpt)?)
    }

    /// Deletes checkpoint `name` (retention), refusing `keep` (the resume source).
    ///
    /// # Errors
    /// relume-ckpt errors (unknown name, `latest`, in use).
    pub(crate) fn delete(&mut self, name: &str, keep: Option<&Path>) -> Result<bool> {
        let dir = self.dir()?;
        if keep.is_some_and(|k| k == dir.path().join(name)) {
            tracing::info!("retention: keeping {name}, the checkpoint this run resumed from");
            return Ok(false);
        }
        if relume_ckpt::commit::check_name(name).is_ok()
            && !relume_ckpt::is_committed(&dir.path().join(name))?
        {
            // Already gone: a run resumed from an older checkpoint (`Source::Best`,
            // a path) tracks checkpoints that the original run deleted later.
            tracing::info!("retention: {name} is already deleted");
            return Ok(false);
        }
        dir.delete(name)?;
        Ok(true)
    }

    /// Resolves the resume policy to a checkpoint path, or `None` to start fresh.
    ///
    /// # Errors
    /// [`Error::NoCheckpoint`] for `Required` with nothing found,
    /// [`Error::CheckpointPathMissing`] for a `Source::Path` that is not a checkpoint
    /// (under every policy), [`Error::NoBestCheckpoint`], relume-ckpt errors.
    pub(crate) fn resolve(
        &mut self,
        policy: &ResumePolicy,
        callbacks: &[Box<dyn Callback>],
    ) -> Result<Option<PathBuf>> {
        let Some(source) = policy.source() else {
            return Ok(None);
        };
        let ckdir = self.dir()?.path().to_path_buf();
        let found = match source {
            Source::Path(p) => {
                // A path the user typed must exist, whatever the policy.
                if !relume_ckpt::is_committed(p)? {
                    return Err(Error::CheckpointPathMissing { path: p.clone() });
                }
                Some(p.clone())
            }
            Source::Last => self.dir()?.latest()?,
            Source::Best => match self.dir()?.latest()? {
                None => None,
                Some(latest) => {
                    let loaded = relume_ckpt::load(&latest)?;
                    let saved = loaded
                        .components
                        .get("callbacks")
                        .cloned()
                        .unwrap_or_default();
                    let best = callbacks
                        .iter()
                        .find_map(|cb| cb.best_checkpoint(&saved.sub(&cb.state_key())));
                    match best {
                        // A callback names a checkpoint of this directory by name.
                        Some(b) if b.is_relative() => Some(ckdir.join(b)),
                        Some(b) => Some(b),
                        None => {
                            return Err(Error::NoBestCheckpoint {
                                dir: self.run_dir.clone(),
                            })
                        }
                    }
                }
            },
        };
        match (found, policy.is_required()) {
            (Some(p), _) => Ok(Some(p)),
            (None, true) => Err(Error::NoCheckpoint {
                dir: match source {
                    Source::Path(p) => p.clone(),
                    _ => ckdir,
                },
                source_desc: describe(source),
            }),
            (None, false) => {
                // `latest` resolves from the committed checkpoints themselves, so
                // nothing found means the directory holds none.
                tracing::info!("no checkpoint in {}, starting fresh", ckdir.display());
                Ok(None)
            }
        }
    }
}

fn describe(s: &Source) -> String {
    match s {
        Source::Path(p) => format!("path {}", p.display()),
        Source::Last => "latest".into(),
        Source::Best => "best".into(),
    }
}

/// Restores `path` into `live` (steps 1–5 of the module docs).
///
/// `live_config` is the live run's config block, `cfg` supplies the overrides and
/// allow-list; `live_user` is the module's live
/// hook state and `load_user` its restore hook.
///
/// # Errors
/// relume-ckpt load/verify errors, [`Error::ComponentCount`],
/// [`Error::ConfigChanged`], [`Error::RestoreIncomplete`],
/// [`Error::FingerprintMismatch`].
pub(crate) fn restore(
    path: &Path,
    live: &mut Live<'_>,
    live_config: &Value,
    cfg: &TrainerConfig,
    live_user: StateDict,
    load_user: &mut dyn FnMut(&StateDict) -> Result<RestoreReport>,
    user_after: &dyn Fn() -> Result<StateDict>,
) -> Result<Restored> {
    // All or nothing: the live state before anything is applied, put back if any
    // step fails (a copy of the state, held only during the restore).
    let before = live.view().components(user_after()?)?;
    let (rng_before, state_before) = (live.rng.clone(), live.state.clone());
    let cause = match restore_unguarded(
        path,
        live,
        live_config,
        cfg,
        live_user,
        load_user,
        user_after,
    ) {
        Ok(r) => return Ok(r),
        Err(e) => e,
    };
    // The RNG streams and the loop state are plain values: put back as they were
    // (a restore may have created streams that a load of the old state keeps).
    *live.rng = rng_before;
    *live.state = state_before;
    if let Err(rb) = roll_back(live, &before, load_user, user_after) {
        return Err(Error::RollbackFailed {
            checkpoint: path.to_path_buf(),
            cause: cause.to_string(),
            rollback: rb.to_string(),
        });
    }
    Err(cause)
}

/// Puts the state `before` (taken by [`View::components`]) back into `live` and
/// checks that the live state hashes as it did. Loggers are not touched: they are
/// applied last in a restore (see [`restore_unguarded`]), and their files are cut
/// back only once every other component was accepted.
fn roll_back(
    live: &mut Live<'_>,
    before: &BTreeMap<String, StateDict>,
    load_user: &mut dyn FnMut(&StateDict) -> Result<RestoreReport>,
    user_after: &dyn Fn() -> Result<StateDict>,
) -> Result<()> {
    let empty = StateDict::new();
    let get = |n: &str| before.get(n).unwrap_or(&empty);
    live.params.load_state_dict(get("model"))?;
    for (i, o) in live.optimizers.iter_mut().enumerate() {
        o.load_state_dict(get(&optimizer_component(i)))?;
    }
    for (i, s) in live.schedulers.iter_mut().enumerate() {
        if let Some(s) = s {
            s.scheduler.load_state_dict(get(&scheduler_component(i)))?;
        }
    }
    live.loader.load_state_dict(get("train_loader"))?;
    let cbs = get("callbacks");
    for cb in live.callbacks.iter_mut() {
        let sd = cbs.sub(&cb.state_key());
        if !sd.is_empty() {
            cb.load_state_dict(&sd)?;
        }
    }
    if let Some(u) = before.get("user") {
        load_user(u)?;
    }
    let now = live.view().components(user_after()?)?;
    for (name, sd) in before.iter().filter(|(n, _)| n.as_str() != "loggers") {
        let same = now.get(name).is_some_and(|n| {
            relume_ckpt::fingerprint_state_dict(n) == relume_ckpt::fingerprint_state_dict(sd)
        });
        if !same {
            return Err(Error::StateMismatch {
                component: name.clone(),
                problems: vec!["its state differs from the one before the restore".into()],
            });
        }
    }
    Ok(())
}

/// Steps 1–5 of the module docs, applying as it goes; [`restore`] undoes it on error.
fn restore_unguarded(
    path: &Path,
    live: &mut Live<'_>,
    live_config: &Value,
    cfg: &TrainerConfig,
    live_user: StateDict,
    load_user: &mut dyn FnMut(&StateDict) -> Result<RestoreReport>,
    user_after: &dyn Fn() -> Result<StateDict>,
) -> Result<Restored> {
    let (overrides, allow) = (&cfg.config_overrides, &cfg.allow);
    let loaded = relume_ckpt::load(path)?;
    let saved = &loaded.components;
    // 2. counts
    let count = |prefix: &str| saved.keys().filter(|k| k.starts_with(prefix)).count();
    let live_scheds = live.schedulers.iter().filter(|s| s.is_some()).count();
    for (what, prefix, live_n) in [
        ("optimizers", "optimizer.", live.optimizers.len()),
        ("schedulers", "scheduler.", live_scheds),
    ] {
        let saved_n = count(prefix);
        if saved_n != live_n && !allow.allows(prefix.trim_end_matches('.')) {
            return Err(Error::ComponentCount {
                checkpoint: path.to_path_buf(),
                what,
                saved: saved_n,
                live: live_n,
            });
        }
    }
    // 3. config; training longer may let the schedules follow (`extend_schedules`)
    let longer = run_grows(&loaded.manifest.config, live_config);
    let extend = cfg.extend_schedules && longer;
    let mut overrides = overrides.clone();
    if extend {
        overrides.push("schedulers".to_string());
    }
    if let Some((key, s, l)) = diff_config(&loaded.manifest.config, live_config, &overrides)
        .into_iter()
        .next()
    {
        let fix = if key.starts_with("schedulers.") && longer {
            "the run is being trained longer and its schedule depends on its length: let the schedule follow with `TrainerBuilder::extend_schedules(true)`, or keep the old max_epochs/max_steps"
        } else if key == "frozen" || key.starts_with("frozen.") {
            "the set of frozen parameters changed: freeze the same ones as the run that wrote the checkpoint (`ParamStore::freeze`), or start a new run from its weights (`ParamStore::load_weights`)"
        } else {
            "restore the setting, or allow it with `TrainerBuilder::override_config` on that key"
        };
        return Err(Error::ConfigChanged {
            checkpoint: path.to_path_buf(),
            key,
            saved: s,
            live: l,
            fix,
        });
    }
    // 4. accounting
    let mut report = RestoreReport::new();
    let empty = StateDict::new();
    let apply = |name: &str,
                 target: &mut dyn FnMut(&StateDict) -> Result<RestoreReport>,
                 report: &mut RestoreReport,
                 used: &mut Vec<String>|
     -> Result<()> {
        match saved.get(name) {
            Some(sd) => {
                used.push(name.to_string());
                // A component that refuses the state outright (wrong kind, shapes)
                // is reported with the others, so the error lists every problem.
                absorb(report, name, target(sd));
            }
            None => report.missing(name),
        }
        Ok(())
    };
    let mut used_names: Vec<String> = Vec::new();
    apply(
        "loop",
        &mut |sd| live.state.load_state_dict(sd),
        &mut report,
        &mut used_names,
    )?;
    apply(
        "model",
        &mut |sd| live.params.load_state_dict(sd),
        &mut report,
        &mut used_names,
    )?;
    for (i, o) in live.optimizers.iter_mut().enumerate() {
        apply(
            &optimizer_component(i),
            &mut |sd| o.load_state_dict(sd),
            &mut report,
            &mut used_names,
        )?;
    }
    for (i, s) in live.schedulers.iter_mut().enumerate() {
        if let Some(s) = s {
            apply(
                &scheduler_component(i),
                &mut |sd| s.scheduler.load_state_dict(sd),
                &mut report,
                &mut used_names,
            )?;
        }
    }
    apply(
        "rng",
        &mut |sd| live.rng.load_state_dict(sd),
        &mut report,
        &mut used_names,
    )?;
    apply(
        "train_loader",
        &mut |sd| live.loader.load_state_dict(sd),
        &mut report,
        &mut used_names,
    )?;
    // callbacks and loggers: the loop component lists who took part.
    let saved_cbs = live.state.callbacks.clone();
    let cb_state = saved.get("callbacks").unwrap_or(&empty);
    if saved.contains_key("callbacks") {
        used_names.push("callbacks".into());
    }
    let mut seen = Vec::new();
    for cb in live.callbacks.iter_mut() {
        let key = cb.state_key();
        if saved_cbs.contains(&key) {
            let r = cb.load_state_dict(&cb_state.sub(&key));
            absorb(&mut report, &format!("callbacks/{key}"), r);
        } else if cb.state_dict().map_or(true, |sd| !sd.is_empty()) {
            // A stateful callback the checkpoint knows nothing about; a stateless
            // one has nothing to restore and may be added freely.
            report.missing(format!("callbacks/{key}"));
        }
        seen.push(key);
    }
    for k in saved_cbs.iter().filter(|k| !seen.contains(k)) {
        // Saved state without a live owner; a stateless one left nothing behind.
        if !cb_state.sub(k).is_empty() {
            report.unexpected(format!("callbacks/{k}"));
        }
    }
    match saved.get("user") {
        Some(sd) => {
            used_names.push("user".into());
            absorb(&mut report, "user", load_user(sd));
        }
        None if !live_user.is_empty() => report.missing("user"),
        None => {}
    }
    // Extending: a scheduler's settings differ from its saved ones by design; its
    // counters and rates were restored.
    let mut allow = allow.clone();
    let mut extended = Vec::new();
    if extend {
        for m in report
            .mismatched
            .iter()
            .filter(|m| is_scheduler_config(&m.key))
        {
            allow = allow.key(m.key.clone());
            extended.push(m.key.clone());
        }
    }
    let allow = &allow;
    // Everything but the loggers is applied; refuse now, before a logger cuts its
    // files back to the checkpoint.
    if let Some(e) = accounting_error(path, &report, allow) {
        return Err(e);
    }
    let saved_lgs = live.state.loggers.clone();
    let lg_state = saved.get("loggers").unwrap_or(&empty);
    if saved.contains_key("loggers") {
        used_names.push("loggers".into());
    }
    let mut seen = Vec::new();
    for lg in live.loggers.iter_mut() {
        let key = lg.name().to_string();
        if saved_lgs.contains(&key) {
            let r = lg.load_state_dict(&lg_state.sub(&key));
            absorb(&mut report, &format!("loggers/{key}"), r);
        } else if lg.state_dict().map_or(true, |sd| !sd.is_empty()) {
            // A stateful logger the checkpoint knows nothing about; a stateless
            // one has nothing to restore and may be added freely.
            report.missing(format!("loggers/{key}"));
        }
        seen.push(key);
    }
    for k in saved_lgs.iter().filter(|k| !seen.contains(k)) {
        // Saved state without a live owner; a stateless one left nothing behind.
        if !lg_state.sub(k).is_empty() {
            report.unexpected(format!("loggers/{k}"));
        }
    }
    for name in saved.keys() {
        if !used_names.iter().any(|u| u == name) {
            report.unexpected(name.clone());
        }
    }
    if let Some(e) = accounting_error(path, &report, allow) {
        return Err(e);
    }
    let excused: Vec<String> = report
        .missing
        .iter()
        .chain(&report.unexpected)
        .cloned()
        .chain(report.mismatched.iter().map(|m| m.key.clone()))
        .collect();
    let allowed: Vec<String> = excused
        .iter()
        .filter(|k| !extended.contains(k))
        .cloned()
        .collect();
    // 5. verification
    let now = live.view().components(user_after()?)?;
    let differing: Vec<String> = now
        .iter()
        .filter(|(name, sd)| {
            !excused
                .iter()
                .any(|a| a == *name || a.starts_with(&format!("{name}/")))
                && saved.get(*name).is_some_and(|s| {
                    relume_ckpt::fingerprint_state_dict(s)
                        != relume_ckpt::fingerprint_state_dict(sd)
                })
        })
        .map(|(name, _)| name.clone())
        .collect();
    // A partial (allow-listed) restore cannot match the whole-state fingerprint;
    // then each component restored in full is checked against the loaded data.
    let live_fp = relume_ckpt::fingerprint(&now);
    if !differing.is_empty() || (excused.is_empty() && live_fp != loaded.manifest.fingerprint) {
        return Err(Error::FingerprintMismatch {
            checkpoint: path.to_path_buf(),
            differing,
            saved: loaded.manifest.fingerprint.clone(),
            live: live_fp,
        });
    }
    Ok(Restored {
        path: loaded.path.clone(),
        progress: loaded.manifest.progress.clone(),
        restored_components: now.keys().cloned().collect(),
        allowed,
        extended,
    })
}

/// The strict-accounting error for `report`: what is missing, unexpected or
/// mismatched and not allow-listed, if anything.
fn accounting_error(
    path: &Path,
    report: &RestoreReport,
    allow: &relume_ckpt::AllowList,
) -> Option<Error> {
    let strict = |keys: &[String]| {
        keys.iter()
            .filter(|k| !allow.allows(k))
            .cloned()
            .collect::<Vec<_>>()
    };
    let missing = strict(&report.missing);
    let unexpected = strict(&report.unexpected);
    let mismatched: Vec<String> = report
        .mismatched
        .iter()
        .filter(|m| !allow.allows(&m.key))
        .map(|m| format!("{}: expected {}, got {}", m.key, m.expected, m.got))
        .collect();
    if let Some((saved_key, live_key)) = identity_change(&missing, &unexpected) {
        return Some(Error::CallbackIdentityChanged {
            checkpoint: path.to_path_buf(),
            saved_key,
            live_key,
        });
    }
    if !missing.is_empty() || !unexpected.is_empty() || !mismatched.is_empty() {
        return Some(Error::RestoreIncomplete {
            checkpoint: path.to_path_buf(),
            missing,
            unexpected,
            mismatched,
        });
    }
    None
}

/// A missing and an unexpected callback key of the same callback type
/// (`Type{settings}`): `(saved, live)`.
fn identity_change(missing: &[String], unexpected: &[String]) -> Option<(String, String)> {
    let ty = |k: &str| -> Option<String> {
        let k = k.strip_prefix("callbacks/")?;
        let key = k.split('/').next()?;
        let (t, _) = key.split_once('{')?;
        Some(t.to_string())
    };
    let key = |k: &str| {
        k.trim_start_matches("callbacks/")
            .split('/')
            .next()
            .map(str::to_string)
    };
    for m in missing {
        let Some(tm) = ty(m) else { continue };
        if let Some(u) = unexpected
            .iter()
            .find(|u| ty(u).as_deref() == Some(tm.as_str()))
        {
            return Some((key(u)?, key(m)?));
        }
    }
    None
}

/// Merges a component's restore result into `report`; a component that refused
/// the state outright (wrong kind, shapes) is recorded as mismatched, so the final
/// error lists every problem at once.
fn absorb(report: &mut RestoreReport, name: &str, r: Result<RestoreReport>) {
    match r {
        Ok(r) => report.merge_prefixed(name, r),
        Err(e) => report.mismatched(name, "state the live component accepts", e.to_string()),
    }
}
