//! The step-boundary save logic of `fit` (steps 3–6 of [`super::fit`]'s module
//! docs): the preemption flag and the callbacks' requests are read, the boundary's
//! checkpoints committed (synchronously, or snapshotted and submitted to the async
//! writer of [`super::async_saves`]), `on_save_checkpoint` run for each commit, and
//! retention carried out strictly after it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::callbacks::{HookCtx, Request, SavedCheckpoint};
use crate::data::DataLoader;
use crate::error::{Error, Result};
use crate::trainer::async_saves::{AsyncSaves, SharedSnapshot};
use crate::trainer::builder::Interrupt;
use crate::trainer::connector::View;
use crate::trainer::fit::{hook, log_all, FitRun};
use crate::trainer::loop_state::progress_json;
use crate::trainer::module::TrainModule;
use crate::trainer::outcome::FitOutcome;

impl<M> FitRun<'_, M>
where
    M: TrainModule,
    M::Batch: Send + 'static,
{
    /// Carries out the deletions requested by `on_fit_end`. The fit completed:
    /// the final save committed and every async save was flushed, so the
    /// checkpoint this run resumed from is no longer needed and is not protected
    /// here (a callback asks for it only when it is no longer wanted; see
    /// [`crate::callbacks::ModelCheckpoint`]). Other requests are dropped, as
    /// after any last hook.
    pub(super) fn delete_at_fit_end(&mut self) -> Result<()> {
        if let Some(a) = self.async_saves.as_ref() {
            debug_assert!(a.is_idle(), "the final boundary flushed every async save");
        }
        let root = self.is_root();
        for r in std::mem::take(&mut self.requests) {
            if let Request::Delete { name } = r {
                if root {
                    self.connector.delete(&name, None)?;
                }
            }
        }
        Ok(())
    }

    /// Steps 3–6 of the module docs. `Some(outcome)` ends `fit`.
    pub(super) fn boundary(
        &mut self,
        train: &DataLoader<M::Batch>,
        epoch_end: bool,
    ) -> Result<Option<FitOutcome>> {
        let saved_before = self.last_checkpoint.clone();
        // Preemption hook point: a flag set by a signal handler is read here only.
        let mut interrupted = self.interrupt.iter().any(Interrupt::is_set);
        if let Some(c) = &self.cfg.collective {
            // A signal on any rank stops every rank at this same boundary (agreed
            // with the window's gradients, or here when no window preceded).
            interrupted = match self.dp_interrupt.take() {
                Some(agreed) => agreed,
                None => {
                    let what = format!("the preemption check at step {}", self.state.global_step);
                    c.any(&what, interrupted)?
                }
            };
        }
        let stopping = self
            .requests
            .iter()
            .any(|r| matches!(r, Request::Stop { .. }));
        if self.done() && !stopping && !interrupted {
            // Training completes at this boundary: the last word before the final
            // state is captured.
            hook!(self, |cb, ctx| cb.on_train_end(&mut ctx));
        }
        let requests = std::mem::take(&mut self.requests);
        // Async saves reported since the last boundary: hooks, then their retention;
        // a failed one is an error here, naming it.
        self.collect_async(false)?;
        let stop = requests.iter().find_map(|r| match r {
            Request::Stop { reason } => Some(reason.clone()),
            _ => None,
        });
        let finished = self.done();
        self.state.finished = finished;
        let cfg = self.cfg;
        let builtin = cfg.enable_checkpointing
            && (cfg
                .checkpoint_every_n_steps
                .is_some_and(|n| self.state.global_step % n == 0)
                || (epoch_end
                    && cfg.checkpoint_every_n_epochs > 0
                    && self.state.epoch % cfg.checkpoint_every_n_epochs == 0)
                || finished
                || interrupted
                || stop.is_some());
        let mut saves: Vec<(String, BTreeMap<String, f64>)> = Vec::new();
        if builtin {
            saves.push((
                format!(
                    "step={:06}-epoch={}",
                    self.state.global_step, self.state.epoch
                ),
                BTreeMap::new(),
            ));
        }
        let mut deletes = Vec::new();
        for r in requests {
            match r {
                Request::Save { name, metrics } => {
                    if !cfg.enable_checkpointing {
                        return Err(Error::InvalidSetting {
                            setting: "enable_checkpointing".into(),
                            value: "false".into(),
                            rule: format!("must be true for a callback to save checkpoint {name}"),
                        });
                    }
                    if !saves.iter().any(|(n, _)| *n == name) {
                        saves.push((name, metrics));
                    }
                }
                Request::Delete { name } => deletes.push(name),
                Request::Stop { .. } => {}
                Request::Log { metrics } => {
                    let step = self.state.global_step;
                    // At an epoch's end the loop already stands in the next epoch.
                    let epoch = self.state.epoch - u64::from(epoch_end);
                    if self.is_root() {
                        log_all(self.loggers, step, epoch, &metrics)?;
                    }
                    self.state.logger_step = step;
                }
            }
        }
        if !saves.is_empty() {
            self.save_all(train, saves, &mut deletes)?;
            if let Some(a) = self.async_saves.as_mut() {
                // Retention waits for this boundary's saves to commit.
                deletes = a.defer_deletes(deletes);
            }
        }
        if stop.is_some() || interrupted || finished {
            // The final flush: every async save is awaited before fit returns.
            self.collect_async(true)?;
        }
        for name in deletes {
            if !self.is_root() {
                continue; // rank 0 alone touches the checkpoint directory
            }
            let keep = self.resumed_from.clone();
            self.connector.delete(&name, keep.as_deref())?;
        }
        if !epoch_end {
            // At an epoch end the caller prints it after the epoch's summary line.
            self.print_checkpoint(saved_before.as_deref());
        }
        if let Some(reason) = stop {
            if self.is_root() {
                tracing::info!("stopping at step {}: {reason}", self.state.global_step);
            }
            return Ok(Some(FitOutcome::Stopped {
                summary: self.summary(),
                reason,
            }));
        }
        if interrupted {
            if self.is_root() {
                tracing::info!(
                    "interrupted: saved at step {} to {}",
                    self.state.global_step,
                    self.last_checkpoint
                        .as_ref()
                        .map_or("<nothing>".into(), |p| p.display().to_string())
                );
                for l in self.loggers.iter_mut() {
                    l.flush()?;
                }
            }
            return Ok(Some(FitOutcome::Interrupted(self.summary())));
        }
        Ok(None)
    }

    /// Prints `checkpoint PATH` when a checkpoint newer than `before` was saved.
    pub(super) fn print_checkpoint(&mut self, before: Option<&std::path::Path>) {
        if let Some(p) = &self.last_checkpoint {
            if Some(p.as_path()) != before {
                self.progress
                    .println(&format!("checkpoint {}", p.display()));
            }
        }
    }

    /// Commits every save of this boundary (one snapshot of the state), then runs
    /// `on_save_checkpoint`, collecting further deletions.
    fn save_all(
        &mut self,
        train: &DataLoader<M::Batch>,
        saves: Vec<(String, BTreeMap<String, f64>)>,
        deletes: &mut Vec<String>,
    ) -> Result<()> {
        if self.is_root() {
            for l in self.loggers.iter_mut() {
                l.flush()?;
            }
        }
        let view = View {
            params: self.module.params(),
            optimizers: &self.optimizers,
            schedulers: &self.schedulers,
            rng: &self.rng,
            loader: train,
            state: &self.state,
            callbacks: self.callbacks,
            loggers: self.loggers,
        };
        if self.cfg.async_checkpointing {
            return self.submit_all(train, saves);
        }
        let components = view.components(self.module.on_save_checkpoint()?)?;
        let progress = self.state.progress_json();
        let group = boundary_group(&saves);
        if let Some(c) = &self.cfg.collective {
            // Every replica must hold the same state before rank 0 commits it.
            super::data_parallel::agree_on_state(c.as_ref(), &components, self.state.global_step)?;
        }
        for (name, extra) in saves {
            let mut metrics = self.state.metrics.latest().clone();
            metrics.extend(extra);
            metrics.retain(|_, v| v.is_finite());
            let saved = if self.is_root() {
                self.connector.save(
                    &name,
                    components.clone(),
                    progress.clone(),
                    (*self.config).clone(),
                    metrics.clone(),
                    group.clone(),
                )
            } else {
                Ok(PathBuf::new())
            };
            let path = match &self.cfg.collective {
                Some(c) => super::data_parallel::broadcast_commit(c.as_ref(), &name, saved)?,
                None => saved?,
            };
            tracing::debug!(
                "saved checkpoint {} at step {}",
                path.display(),
                self.state.global_step
            );
            self.last_checkpoint = Some(path.clone());
            let saved = SavedCheckpoint {
                name,
                path,
                progress: self.state.progress(),
                metrics,
            };
            hook!(self, |cb, ctx| cb.on_save_checkpoint(&mut ctx, &saved));
        }
        for r in std::mem::take(&mut self.requests) {
            match r {
                Request::Delete { name } => deletes.push(name),
                other => self.requests.push(other),
            }
        }
        Ok(())
    }

    /// The async half of [`Self::save_all`]: waits for a free slot, reports any
    /// earlier outcome (so a failure surfaces before a snapshot that may name the
    /// failed checkpoint), snapshots once and submits every save of the boundary.
    fn submit_all(
        &mut self,
        train: &DataLoader<M::Batch>,
        saves: Vec<(String, BTreeMap<String, f64>)>,
    ) -> Result<()> {
        if self.async_saves.is_none() {
            let dir = std::sync::Arc::clone(self.connector.shared_dir()?);
            self.async_saves = Some(AsyncSaves::new(
                dir,
                self.cfg.max_in_flight,
                self.cfg.async_writer_priority,
            )?);
        }
        if let Some(a) = self.async_saves.as_mut() {
            a.wait_for_slot()?;
        }
        let pending = std::mem::take(&mut self.requests);
        let collected = self.collect_async(false);
        self.requests.extend(pending);
        collected?;
        let Some(a) = self.async_saves.as_ref() else {
            unreachable!("created above")
        };
        let pool = a.pool().clone();
        let view = View {
            params: self.module.params(),
            optimizers: &self.optimizers,
            schedulers: &self.schedulers,
            rng: &self.rng,
            loader: train,
            state: &self.state,
            callbacks: self.callbacks,
            loggers: self.loggers,
        };
        // The only work on the training thread: tensor bytes copied (large ones
        // into recycled buffers) and plain copies of the small state. JSON, the manifest and the
        // fingerprint are built by the writer thread.
        let snapshot = view.snapshot(self.module.on_save_checkpoint()?, &pool)?;
        let shared = Arc::new(SharedSnapshot::new(snapshot, saves.len()));
        let progress = self.state.progress();
        let finished = self.state.finished;
        let group = boundary_group(&saves);
        let Some(a) = self.async_saves.as_mut() else {
            unreachable!("created above")
        };
        a.snapshot_taken();
        for (name, extra) in saves {
            let mut metrics = self.state.metrics.latest().clone();
            metrics.extend(extra);
            metrics.retain(|_, v| v.is_finite());
            let (shared, config, m, group) = (
                Arc::clone(&shared),
                Arc::clone(&self.config),
                metrics.clone(),
                group.clone(),
            );
            let build = move || {
                Ok(relume_ckpt::Checkpoint {
                    components: shared.take()?,
                    progress: progress_json(progress, finished),
                    config: (*config).clone(),
                    metrics: m,
                    group,
                })
            };
            a.submit_deferred(&name, build, progress, metrics)?;
        }
        Ok(())
    }

    /// Handles the async saves reported so far (all of them, waiting, with
    /// `wait`): for each commit, `on_save_checkpoint`, then the deletions of its
    /// boundary and those the hooks requested. Requests other than deletions stay
    /// queued.
    fn collect_async(&mut self, wait: bool) -> Result<()> {
        let Some(a) = self.async_saves.as_mut() else {
            return Ok(());
        };
        if !wait && a.is_idle() {
            return Ok(());
        }
        let done = a.collect(wait)?;
        for (c, p) in done {
            tracing::debug!(
                "async save committed {} in {:.1} ms",
                c.path.display(),
                c.write_time.as_secs_f64() * 1e3
            );
            self.last_checkpoint = Some(c.path.clone());
            let saved = SavedCheckpoint {
                name: p.name,
                path: c.path,
                progress: p.progress,
                metrics: p.metrics,
            };
            let before = self.requests.len();
            hook!(self, |cb, ctx| cb.on_save_checkpoint(&mut ctx, &saved));
            let mut deletes = p.deletes;
            let new: Vec<Request> = self.requests.drain(before..).collect();
            for r in new {
                match r {
                    Request::Delete { name } => deletes.push(name),
                    other => self.requests.push(other),
                }
            }
            for name in deletes {
                let keep = self.resumed_from.clone();
                self.connector.delete(&name, keep.as_deref())?;
            }
        }
        Ok(())
    }
}

/// The manifest `group` of a boundary's saves: every name when there are several
/// (they share one state, whose callback bookkeeping may name each of them), none
/// for a single save.
fn boundary_group(saves: &[(String, BTreeMap<String, f64>)]) -> Vec<String> {
    if saves.len() > 1 {
        saves.iter().map(|(n, _)| n.clone()).collect()
    } else {
        Vec::new()
    }
}
