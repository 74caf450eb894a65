//! `Trainer::fit`: the training loop, its step boundaries and checkpoints.
//!
//! ## One optimizer step
//! Each training batch: `training_step` → loss ÷ `accumulate_grad_batches` →
//! `backward` → gradients added by parameter name. After `accumulate_grad_batches`
//! batches (or the last batch of the epoch): clip, step **every** optimizer on the
//! gradients of the parameters it owns, `global_step += 1`, step the per-step
//! schedulers. That moment is a *step boundary*.
//!
//! ## What happens at a step boundary, in order
//! 1. validation, when due (mid-epoch `val_check_interval`, or the epoch's end);
//! 2. at an epoch's end: epoch metrics, per-epoch schedulers, `on_train_epoch_end`;
//! 3. the preemption flag and the callbacks' requests are read;
//! 4. checkpoints are committed (built-in policy, requested names, or a forced save
//!    for a stop, an interrupt or the end of training), loggers flushed first;
//! 5. `on_save_checkpoint` for each commit, then requested deletions (retention
//!    strictly after the commit);
//! 6. stop / interrupt / finish.
//!
//! Nothing is saved anywhere else, so a checkpoint always holds accumulation
//! position 0 (see [`super::loop_state`]).
//!
//! ## Preemption and async saves
//! The preemption flag ([`crate::preempt::Preemption`], or `interrupt_flag`) is
//! read only in step 3. With `async_checkpointing`, step 4 snapshots the state
//! and submits it to the writer thread, step 5 happens when the commit is
//! reported (polled at the start of every boundary), and a stop, an interrupt or
//! the end of training waits for every save in flight before `fit` returns (see
//! [`super::async_saves`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use crate::callbacks::{HookCtx, Request};
use crate::data::{Cursor, DataLoader};
use crate::error::{Error, Result};
use crate::optim::{Grads, Optimizer};
use crate::progress::{ProgressBar, ProgressConfig};
use crate::rng::RngStreams;
use crate::trainer::async_saves::AsyncSaves;
use crate::trainer::builder::{ClipAlgorithm, Interrupt, Trainer, TrainerConfig, ValCheck};
use crate::trainer::config::config_json;
use crate::trainer::connector::{restore, Connector, Live};
use crate::trainer::context::{Stage, StepCtx};
use crate::trainer::loop_state::LoopState;
use crate::trainer::metrics::Metrics;
use crate::trainer::module::{Interval, SchedulerConfig, TrainModule};

pub use super::outcome::{FitOutcome, FitSummary};

impl Trainer {
    /// Trains `module` on `train`, validating on `val`.
    ///
    /// Resumes according to the [`ResumePolicy`](super::ResumePolicy) (restore,
    /// verification and config diff as described in [`super::connector`]).
    ///
    /// # Errors
    /// Any error of a step, hook, optimizer, loader or save; the restore errors
    /// ([`Error::NoCheckpoint`], [`Error::ComponentCount`], [`Error::ConfigChanged`],
    /// [`Error::RestoreIncomplete`], [`Error::FingerprintMismatch`]). Callbacks'
    /// `on_exception` runs before the error is returned.
    pub fn fit<M>(
        &mut self,
        module: &mut M,
        train: &mut DataLoader<M::Batch>,
        val: Option<&DataLoader<M::Batch>>,
    ) -> Result<FitOutcome>
    where
        M: TrainModule,
        M::Batch: Send + 'static,
    {
        let res = self.fit_inner(module, train, val);
        if let Err(e) = &res {
            for cb in self.callbacks.iter_mut() {
                cb.on_exception(e);
            }
        }
        res
    }

    fn fit_inner<M>(
        &mut self,
        module: &mut M,
        train: &mut DataLoader<M::Batch>,
        val: Option<&DataLoader<M::Batch>>,
    ) -> Result<FitOutcome>
    where
        M: TrainModule,
        M::Batch: Send + 'static,
    {
        let mut optimizers = Vec::new();
        let mut schedulers = Vec::new();
        for oc in module.configure_optimizers()? {
            optimizers.push(oc.optimizer);
            schedulers.push(oc.scheduler);
        }
        check_ownership(&optimizers)?;
        check_in_module(&optimizers, module.params())?;
        check_frozen(&optimizers, module.params())?;
        let optimizer_params: Vec<Vec<String>> = optimizers
            .iter()
            .map(|o| o.params().into_iter().map(|(n, _)| n).collect())
            .collect();
        for s in schedulers.iter().flatten() {
            if s.frequency == 0 {
                return Err(Error::InvalidSetting {
                    setting: format!("scheduler {} frequency", s.scheduler.kind()),
                    value: "0".into(),
                    rule: "must be at least 1".into(),
                });
            }
        }
        let mut keys: Vec<String> = Vec::new();
        for cb in self.callbacks.iter() {
            let k = cb.state_key();
            if k.is_empty() || k.contains('/') || keys.contains(&k) {
                return Err(Error::InvalidSetting {
                    setting: "callback state_key".into(),
                    value: k,
                    rule: "must be non-empty, without '/', and unique among the run's callbacks"
                        .into(),
                });
            }
            keys.push(k);
        }
        if let Some(c) = &self.cfg.collective {
            super::data_parallel::check_settings(&self.cfg, c.as_ref())?;
        }
        let mut config = config_json(&self.cfg, train, val, &optimizers, &schedulers);
        let frozen = module.params().frozen_names();
        if !frozen.is_empty() {
            // Only when something is frozen, so runs without freezing keep the
            // config block (and fingerprint) they always had.
            config["frozen"] = serde_json::json!(frozen);
        }
        if let Some(c) = &self.cfg.collective {
            config["world_size"] = serde_json::json!(c.world_size());
            super::data_parallel::agree_on_config(c.as_ref(), &config)?;
        }
        let root = self.cfg.collective.as_ref().is_none_or(|c| c.rank() == 0);
        let mut run = FitRun {
            cfg: &self.cfg,
            callbacks: &mut self.callbacks,
            loggers: &mut self.loggers,
            interrupt: self.interrupt.clone(),
            async_saves: None,
            module,
            val,
            optimizers,
            optimizer_params,
            schedulers,
            rng: RngStreams::new(self.cfg.seed),
            state: LoopState {
                callbacks: keys,
                ..LoopState::default()
            },
            connector: Connector::new(&self.cfg.default_root_dir)
                .with_storage(self.cfg.checkpoint_storage.clone()),
            requests: Vec::new(),
            resumed_from: None,
            finished_metrics: None,
            last_checkpoint: None,
            config: Arc::new(config),
            dp_interrupt: None,
            progress: if self.cfg.enable_progress_bar && root {
                ProgressBar::new(
                    ProgressConfig::new()
                        .every_n_steps(self.cfg.log_every_n_steps)
                        .max_epochs(self.cfg.max_epochs),
                )
            } else {
                ProgressBar::disabled()
            },
        };
        run.state.loggers = run.loggers.iter().map(|l| l.name().to_string()).collect();
        let started = Instant::now();
        let out = run.run(train);
        if let (Some(c), Ok(_)) = (&self.cfg.collective, &out) {
            if c.world_size() > 1 {
                let total = started.elapsed().as_secs_f64();
                let spent = c.time_in_exchanges().as_secs_f64();
                tracing::info!(
                    "data-parallel: rank {} of {} spent {:.1}% of fit's {total:.2} s in exchanges with the other ranks",
                    c.rank(),
                    c.world_size(),
                    100.0 * spent / total.max(1e-9)
                );
            }
        }
        out
    }
}

/// Errors when a parameter is owned by two optimizers.
fn check_ownership(optimizers: &[Box<dyn Optimizer>]) -> Result<()> {
    let mut owner: BTreeMap<String, usize> = BTreeMap::new();
    for (i, o) in optimizers.iter().enumerate() {
        for (name, _) in o.params() {
            if let Some(first) = owner.insert(name.clone(), i) {
                return Err(Error::ParamOwnedTwice {
                    param: name,
                    first,
                    second: i,
                });
            }
        }
    }
    Ok(())
}

/// Errors when an optimizer holds a parameter that is not the module's own (by
/// name, or a different variable under a module parameter's name): it would never
/// get a gradient, and the run would train nothing.
fn check_in_module(
    optimizers: &[Box<dyn Optimizer>],
    params: &crate::params::ParamStore,
) -> Result<()> {
    for (i, o) in optimizers.iter().enumerate() {
        let foreign: Vec<String> = o
            .params()
            .into_iter()
            .filter(|(name, var)| {
                params
                    .get(name)
                    .is_none_or(|mine| mine.as_tensor().id() != var.as_tensor().id())
            })
            .map(|(name, _)| name)
            .collect();
        if !foreign.is_empty() {
            return Err(Error::ForeignParams {
                optimizer: i,
                kind: o.kind().to_string(),
                params: foreign,
            });
        }
    }
    Ok(())
}

/// Errors when a freeze rule covers nothing or an optimizer holds a frozen
/// parameter (it would get optimizer state, and weight decay would move it).
fn check_frozen(
    optimizers: &[Box<dyn Optimizer>],
    params: &crate::params::ParamStore,
) -> Result<()> {
    params.check_freeze_rules()?;
    for (i, o) in optimizers.iter().enumerate() {
        let frozen: Vec<String> = o
            .params()
            .into_iter()
            .map(|(name, _)| name)
            .filter(|name| params.is_frozen(name))
            .collect();
        if !frozen.is_empty() {
            return Err(Error::FrozenInOptimizer {
                optimizer: i,
                kind: o.kind().to_string(),
                params: frozen,
            });
        }
    }
    Ok(())
}

/// Clips `grads` in place (PyTorch's `clip_grad_norm_` with the L2 norm, or
/// `clip_grad_value_`).
fn clip(grads: &mut Grads, value: f64, alg: ClipAlgorithm) -> Result<()> {
    match alg {
        ClipAlgorithm::Value => crate::optim::clip_grad_value(grads, value),
        ClipAlgorithm::Norm => crate::optim::clip_grad_norm(grads, value, 2.0).map(|_| ()),
    }
}

/// One `fit` call's state.
pub(super) struct FitRun<'t, M: TrainModule> {
    pub(super) cfg: &'t TrainerConfig,
    pub(super) callbacks: &'t mut Vec<Box<dyn crate::callbacks::Callback>>,
    pub(super) loggers: &'t mut Vec<Box<dyn crate::loggers::Logger>>,
    pub(super) interrupt: Vec<Interrupt>,
    pub(super) async_saves: Option<AsyncSaves>,
    pub(super) module: &'t mut M,
    pub(super) val: Option<&'t DataLoader<M::Batch>>,
    pub(super) optimizers: Vec<Box<dyn Optimizer>>,
    /// The parameter names of each optimizer, in its order.
    pub(super) optimizer_params: Vec<Vec<String>>,
    pub(super) schedulers: Vec<Option<SchedulerConfig>>,
    pub(super) rng: RngStreams,
    pub(super) state: LoopState,
    pub(super) connector: Connector,
    pub(super) requests: Vec<Request>,
    pub(super) resumed_from: Option<PathBuf>,
    /// The metrics of a checkpoint that was already past the live limits (nothing
    /// was restored or trained; see `FitRun::past_the_end`).
    pub(super) finished_metrics: Option<BTreeMap<String, f64>>,
    pub(super) last_checkpoint: Option<PathBuf>,
    pub(super) config: Arc<Value>,
    pub(super) progress: ProgressBar,
    /// Data-parallel: the ranks' agreed preemption flag, exchanged with the last
    /// window's gradients (saves a round trip at the boundary that follows).
    pub(super) dp_interrupt: Option<bool>,
}

/// Calls `hook` on every callback with a fresh [`HookCtx`].
macro_rules! hook {
    ($run:expr, |$cb:ident, $ctx:ident| $body:expr) => {{
        let progress = $run.state.progress();
        let metrics = $run.state.metrics.latest().clone();
        let run_dir = $run.cfg.default_root_dir.clone();
        let resumed = $run.resumed_from.clone();
        let has_val = $run.val.is_some();
        let global_zero = $run.is_root();
        let lrs: Vec<(String, Vec<f64>)> = $run
            .optimizers
            .iter()
            .map(|o| (o.kind().to_string(), o.lrs()))
            .collect();
        for $cb in $run.callbacks.iter_mut() {
            let mut $ctx = HookCtx::new(
                progress,
                &metrics,
                &run_dir,
                resumed.as_deref(),
                &mut $run.requests,
            )
            .with_lrs(lrs.clone())
            .with_validation(has_val)
            .with_global_zero(global_zero);
            $body?;
        }
    }};
}
pub(super) use hook;

impl<M> FitRun<'_, M>
where
    M: TrainModule,
    M::Batch: Send + 'static,
{
    /// True on rank 0 of a data-parallel run and in a single-process one: the
    /// process that writes checkpoints and logs.
    pub(super) fn is_root(&self) -> bool {
        self.cfg.collective.as_ref().is_none_or(|c| c.rank() == 0)
    }

    pub(super) fn summary(&self) -> FitSummary {
        FitSummary {
            global_step: self.state.global_step,
            epoch: self.state.epoch,
            last_checkpoint: self.last_checkpoint.clone(),
            resumed_from: self.resumed_from.clone(),
            metrics: match &self.finished_metrics {
                Some(m) => m.clone(),
                None => self.state.metrics.latest().clone(),
            },
        }
    }

    /// When the checkpoint at `path` was trained to a larger `max_epochs` or
    /// `max_steps` than the live ones and is already past them, there is nothing left
    /// to do, whatever else changed: its position and metrics are taken from its
    /// manifest, nothing is restored, and `fit` reports `AlreadyFinished` (as
    /// Lightning does), instead of a config error about the smaller limit.
    fn past_the_end(&mut self, path: &std::path::Path) -> Result<bool> {
        // The manifest alone (self-checksummed); the data is verified by a restore.
        let manifest = relume_ckpt::read_manifest(path)?;
        let m = &manifest;
        let get = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
        let (epoch, step) = (get(&m.progress, "epoch"), get(&m.progress, "global_step"));
        let (Some(epoch), Some(step)) = (epoch, step) else {
            return Ok(false);
        };
        let smaller_epochs = get(&m.config, "max_epochs").is_some_and(|s| s > self.cfg.max_epochs);
        let smaller_steps = self.cfg.max_steps.is_some_and(|live| {
            m.config
                .get("max_steps")
                .is_some_and(|s| s.as_u64().is_none_or(|s| s > live))
        });
        let past = epoch >= self.cfg.max_epochs || self.cfg.max_steps.is_some_and(|l| step >= l);
        if !(past && (smaller_epochs || smaller_steps)) {
            return Ok(false);
        }
        self.state.epoch = epoch;
        self.state.global_step = step;
        self.finished_metrics = Some(m.metrics.clone());
        self.resumed_from = Some(path.to_path_buf());
        Ok(true)
    }

    pub(super) fn done(&self) -> bool {
        self.state.epoch >= self.cfg.max_epochs
            || self
                .cfg
                .max_steps
                .is_some_and(|m| self.state.global_step >= m)
    }

    /// Borrows the live objects for the connector. The callback/logger lists in
    /// the loop state are the live ones.
    fn with_live<T>(
        &mut self,
        train: &mut DataLoader<M::Batch>,
        f: impl FnOnce(&mut Live<'_>, &mut M) -> Result<T>,
    ) -> Result<T> {
        let mut params = self.module.params().clone();
        let mut live = Live {
            params: &mut params,
            optimizers: &mut self.optimizers,
            schedulers: &mut self.schedulers,
            rng: &mut self.rng,
            loader: train,
            state: &mut self.state,
            callbacks: self.callbacks,
            loggers: self.loggers,
        };
        f(&mut live, self.module)
    }

    fn resume(&mut self, train: &mut DataLoader<M::Batch>) -> Result<bool> {
        if !self.cfg.enable_checkpointing && self.cfg.resume.source().is_none() {
            return Ok(false);
        }
        let resolved = if self.is_root() {
            self.connector.resolve(&self.cfg.resume, self.callbacks)
        } else {
            Ok(None)
        };
        let resolved = match &self.cfg.collective {
            // Rank 0 resolves (and holds the writer lock); every rank resumes from
            // its choice.
            Some(c) => super::data_parallel::broadcast_choice(c.as_ref(), resolved)?,
            None => resolved?,
        };
        let Some(path) = resolved else {
            return Ok(false);
        };
        if self.past_the_end(&path)? {
            return Ok(true);
        }
        let started = Instant::now();
        let config = self.config.clone();
        let cfg = self.cfg;
        let restored = self.with_live(train, |live, module| {
            // (In a data-parallel run every rank restores and verifies; the ranks
            // agree on the outcome below.)
            let live_user = module.on_save_checkpoint()?;
            let module_cell = std::cell::RefCell::new(module);
            restore(
                &path,
                live,
                &config,
                cfg,
                live_user,
                &mut |sd| module_cell.borrow_mut().on_load_checkpoint(sd),
                &|| module_cell.borrow().on_save_checkpoint(),
            )
        });
        let restored = match &self.cfg.collective {
            Some(c) => super::data_parallel::agree_on(c.as_ref(), "the resume", restored)?,
            None => restored?,
        };
        self.resumed_from = Some(restored.path.clone());
        tracing::info!(
            "resumed from {} at step {} (epoch {}, batch {}) in {:.1} ms: restored {}; fingerprint verified",
            restored.path.display(),
            self.state.global_step,
            self.state.epoch,
            self.state.batch_in_epoch,
            started.elapsed().as_secs_f64() * 1e3,
            restored.restored_components.join(", "),
        );
        if !restored.extended.is_empty() {
            tracing::info!(
                "training longer: the schedule follows the new length from step {} ({} take the live settings; counters and rates restored)",
                self.state.global_step,
                restored.extended.join(", ")
            );
        }
        if !restored.allowed.is_empty() {
            tracing::warn!(
                "allow-listed and NOT restored: {}",
                restored.allowed.join(", ")
            );
        }
        // Live lists win from here on (they equal the saved ones unless allow-listed).
        self.state.callbacks = self.callbacks.iter().map(|c| c.state_key()).collect();
        self.state.loggers = self.loggers.iter().map(|l| l.name().to_string()).collect();
        let path = restored.path;
        hook!(self, |cb, ctx| cb.on_load_checkpoint(&mut ctx, &path));
        // Deletions that the resumed checkpoint's save requested and a kill
        // interrupted (`ModelCheckpoint`'s pending deletions, re-requested on load)
        // are due now, not at the next save: the next checkpoint's state does not
        // list them, so a run killed again before its deletions would leave them
        // behind for good.
        let (deletes, rest): (Vec<Request>, Vec<Request>) = std::mem::take(&mut self.requests)
            .into_iter()
            .partition(|r| matches!(r, Request::Delete { .. }));
        self.requests = rest;
        if self.is_root() {
            for r in deletes {
                if let Request::Delete { name } = r {
                    let keep = self.resumed_from.clone();
                    self.connector.delete(&name, keep.as_deref())?;
                }
            }
        }
        Ok(true)
    }

    fn run(&mut self, train: &mut DataLoader<M::Batch>) -> Result<FitOutcome> {
        let resumed = self.resume(train)?;
        let train: &DataLoader<M::Batch> = train;
        if resumed && self.done() {
            let msg = format!(
                "run in {} is already finished (step {}, epoch {} of max_epochs {}, max_steps {:?}); nothing to do: raise max_epochs or max_steps to continue",
                self.cfg.default_root_dir.display(),
                self.state.global_step,
                self.state.epoch,
                self.cfg.max_epochs,
                self.cfg.max_steps,
            );
            tracing::info!("{msg}");
            // The final save's interrupted deletions were carried out on resume.
            return Ok(FitOutcome::AlreadyFinished(self.summary()));
        }
        if !resumed {
            for (i, s) in self.schedulers.iter().enumerate() {
                if let Some(s) = s {
                    for (g, lr) in s.scheduler.lrs().into_iter().enumerate() {
                        self.optimizers[i].set_lr(g, lr)?;
                    }
                }
            }
            if self.is_root() {
                for l in self.loggers.iter_mut() {
                    l.log_hyperparams(&self.config)?;
                }
            }
        }
        hook!(self, |cb, ctx| cb.on_fit_start(&mut ctx));
        let nb_total = train.batches_per_epoch() as u64;
        let nb = self
            .cfg
            .limit_train_batches
            .map_or(nb_total, |l| l.min(nb_total));
        if nb == 0 {
            return Err(Error::InvalidSetting {
                setting: "train loader".into(),
                value: "0 batches per epoch".into(),
                rule: "must yield at least one batch (check the dataset, batch_size, drop_last, limit_train_batches)".into(),
            });
        }
        let accum = self.cfg.accumulate_grad_batches;
        let steps_per_epoch = nb.div_ceil(accum);
        let val_every = match self.cfg.val_check_interval {
            ValCheck::Steps(n) => n,
            ValCheck::Fraction(f) => ((f * steps_per_epoch as f64).round() as u64).max(1),
        };
        'epochs: while !self.done() {
            self.progress.start_epoch(self.state.epoch, steps_per_epoch);
            if self.state.batch_in_epoch == 0 {
                hook!(self, |cb, ctx| cb.on_train_epoch_start(&mut ctx));
            }
            train.set_cursor(Cursor {
                epoch: self.state.epoch,
                next_batch: self.state.batch_in_epoch as usize,
            });
            let mut grads: Option<Grads> = None;
            let mut window = super::data_parallel::Window::default();
            let mut iter = train.epoch_iter()?;
            while self.state.batch_in_epoch < nb {
                let Some(batch) = iter.next() else { break };
                let batch = batch?;
                hook!(self, |cb, ctx| cb.on_train_batch_start(&mut ctx));
                if self.cfg.collective.is_some() {
                    // Data-parallel: this rank computes only the micro-batches it
                    // owns; all are folded in order at the window's end.
                    self.dp_micro_batch(batch, accum, &mut window)?;
                } else {
                    let loss = {
                        let mut ctx = StepCtx::new(
                            Stage::Train,
                            &mut self.rng,
                            &mut self.state.metrics,
                            self.state.global_step,
                            self.state.epoch,
                            self.state.batch_in_epoch,
                        );
                        self.module.training_step(batch, &mut ctx)?
                    };
                    let loss = if accum > 1 {
                        (loss / accum as f64)?
                    } else {
                        loss
                    };
                    let g = Grads::from_backward(&loss.backward()?, self.module.params());
                    match &mut grads {
                        Some(acc) => acc.accumulate(g)?,
                        None => grads = Some(g),
                    }
                }
                self.state.batch_in_epoch += 1;
                self.state.accumulation_position += 1;
                let last = self.state.batch_in_epoch >= nb;
                let boundary = self.state.accumulation_position >= accum || last;
                if boundary {
                    if self.cfg.collective.is_some() {
                        grads = self.dp_fold_window(std::mem::take(&mut window))?;
                    }
                    self.optimizer_step(grads.take().unwrap_or_default())?;
                    let shown = self.state.metrics.prog_bar();
                    self.progress.update(
                        self.state.batch_in_epoch.div_ceil(accum),
                        self.state.global_step,
                        &shown,
                    );
                }
                hook!(self, |cb, ctx| cb.on_train_batch_end(&mut ctx, boundary));
                if boundary && !last {
                    let steps_in_epoch = self.state.batch_in_epoch / accum;
                    if steps_in_epoch % val_every == 0 && self.val_this_epoch() {
                        self.validate_now()?;
                    }
                    if let Some(out) = self.boundary(train, false)? {
                        return Ok(out);
                    }
                    if self.done() {
                        // max_steps reached mid-epoch: that boundary saved the final
                        // checkpoint; stop here, exactly at the step, with the
                        // cursor mid-epoch so that raising max_steps continues from it.
                        let shown = self.state.metrics.prog_bar();
                        self.progress.finish_epoch(&shown);
                        break 'epochs;
                    }
                }
                if last {
                    break;
                }
            }
            drop(iter);
            if self.state.batch_in_epoch < nb {
                return Err(Error::InvalidSetting {
                    setting: "train loader".into(),
                    value: format!("ended after {} of {nb} batches", self.state.batch_in_epoch),
                    rule: "must yield batches_per_epoch() batches every epoch".into(),
                });
            }
            // End of the epoch (always a step boundary: the last batch steps).
            train.set_cursor(Cursor {
                epoch: self.state.epoch + 1,
                next_batch: 0,
            });
            let epoch_metrics = self.state.metrics.take_epoch();
            if self.val_this_epoch() {
                self.validate_now()?;
            }
            self.step_epoch_schedulers()?;
            hook!(self, |cb, ctx| cb.on_train_epoch_end(&mut ctx));
            self.state.epoch += 1;
            self.state.batch_in_epoch = 0;
            let step = self.state.global_step;
            if self.is_root() {
                log_all(self.loggers, step, self.state.epoch - 1, &epoch_metrics)?;
            }
            self.state.logger_step = step;
            let saved_before = self.last_checkpoint.clone();
            let out = self.boundary(train, true)?;
            let shown = self.state.metrics.prog_bar();
            self.progress.finish_epoch(&shown);
            self.print_checkpoint(saved_before.as_deref());
            if let Some(out) = out {
                return Ok(out);
            }
        }
        hook!(self, |cb, ctx| cb.on_fit_end(&mut ctx));
        self.delete_at_fit_end()?;
        if self.is_root() {
            for l in self.loggers.iter_mut() {
                l.flush()?;
            }
        }
        Ok(FitOutcome::Completed(self.summary()))
    }

    pub(super) fn val_this_epoch(&self) -> bool {
        self.val.is_some() && (self.state.epoch + 1) % self.cfg.check_val_every_n_epoch == 0
    }

    /// Clip, step every optimizer, advance the counter and per-step schedulers,
    /// report step metrics.
    fn optimizer_step(&mut self, mut grads: Grads) -> Result<()> {
        if let Some((v, alg)) = self.cfg.gradient_clip {
            clip(&mut grads, v, alg)?;
        }
        if !self.cfg.allow_steps_without_gradients {
            for (i, names) in self.optimizer_params.iter().enumerate() {
                let missing: Vec<&String> =
                    names.iter().filter(|n| grads.get(n).is_none()).collect();
                if missing.is_empty() {
                    continue;
                }
                let kind = self.optimizers[i].kind().to_string();
                let step = self.state.global_step + 1;
                if missing.len() == names.len() {
                    return Err(Error::NoGradients {
                        optimizer: i,
                        kind,
                        n_params: names.len(),
                        step,
                    });
                }
                return Err(Error::MissingGradients {
                    optimizer: i,
                    kind,
                    params: missing.into_iter().cloned().collect(),
                    step,
                });
            }
        }
        for o in self.optimizers.iter_mut() {
            o.step(&grads)?;
        }
        self.state.global_step += 1;
        self.state.accumulation_position = 0;
        let step = self.state.global_step;
        self.step_schedulers(Interval::Step, step)?;
        let step_metrics = self.state.metrics.take_step();
        if step % self.cfg.log_every_n_steps == 0 && !step_metrics.is_empty() && self.is_root() {
            log_all(self.loggers, step, self.state.epoch, &step_metrics)?;
            self.state.logger_step = step;
        }
        Ok(())
    }

    fn step_epoch_schedulers(&mut self) -> Result<()> {
        let n = self.state.epoch + 1;
        self.step_schedulers(Interval::Epoch, n)
    }

    fn step_schedulers(&mut self, interval: Interval, count: u64) -> Result<()> {
        for (i, s) in self.schedulers.iter_mut().enumerate() {
            let Some(s) = s else { continue };
            if s.interval != interval || count % s.frequency != 0 {
                continue;
            }
            let metric = match &s.monitor {
                None => None,
                Some(m) => match self.state.metrics.latest().get(m) {
                    Some(v) => Some(*v),
                    None => {
                        return Err(Error::MetricNotLogged {
                            metric: m.clone(),
                            needed_by: format!("scheduler {i} ({})", s.scheduler.kind()),
                        })
                    }
                },
            };
            let lrs = s.scheduler.step(metric)?;
            for (g, lr) in lrs.into_iter().enumerate() {
                self.optimizers[i].set_lr(g, lr)?;
            }
        }
        Ok(())
    }

    /// Runs validation now and records its metrics.
    fn validate_now(&mut self) -> Result<()> {
        let Some(val) = self.val else { return Ok(()) };
        let n = val.batches_per_epoch() as u64;
        let n = self.cfg.limit_val_batches.map_or(n, |l| l.min(n));
        self.progress.start_validation(n);
        let m = run_eval(
            self.module,
            val,
            Stage::Validate,
            self.cfg.limit_val_batches,
            &mut self.rng,
            self.state.global_step,
            self.state.epoch,
        )?;
        let m = self.state.metrics.absorb_eval(m);
        self.progress.update_validation(n);
        self.progress.finish_validation(&m);
        let step = self.state.global_step;
        if self.is_root() {
            log_all(self.loggers, step, self.state.epoch, &m)?;
        }
        self.state.logger_step = step;
        hook!(self, |cb, ctx| cb.on_validation_end(&mut ctx));
        Ok(())
    }
}

/// Sends `metrics` to every logger at `step`, with the `epoch` they belong to as
/// one more value (as Lightning's loggers record it), unless a metric of that name
/// was logged.
pub(super) fn log_all(
    loggers: &mut [Box<dyn crate::loggers::Logger>],
    step: u64,
    epoch: u64,
    metrics: &BTreeMap<String, f64>,
) -> Result<()> {
    let mut m = metrics.clone();
    m.entry("epoch".to_string()).or_insert(epoch as f64);
    for l in loggers.iter_mut() {
        l.log_metrics(step, &m)?;
    }
    Ok(())
}

/// Runs an evaluation loop (no backward, `training() == false`) and returns its
/// metrics (not yet reduced).
pub(crate) fn run_eval<M: TrainModule>(
    module: &mut M,
    loader: &DataLoader<M::Batch>,
    stage: Stage,
    limit: Option<u64>,
    rng: &mut RngStreams,
    global_step: u64,
    epoch: u64,
) -> Result<Metrics>
where
    M::Batch: Send + 'static,
{
    let mut metrics = Metrics::default();
    loader.set_cursor(Cursor::default());
    let limit = limit.unwrap_or(u64::MAX);
    for (i, batch) in loader.epoch_iter()?.enumerate() {
        if i as u64 >= limit {
            break;
        }
        let mut ctx = StepCtx::new(stage, rng, &mut metrics, global_step, epoch, i as u64);
        match stage {
            Stage::Test => module.test_step(batch?, &mut ctx)?,
            _ => module.validation_step(batch?, &mut ctx)?,
        }
    }
    Ok(metrics)
}
