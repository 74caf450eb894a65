//! The error type of the relume crate.

/// Every failure the trainer and its components report. Each variant names the
/// component, key, parameter or setting involved and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation in candle failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The checkpoint engine reported an error.
    #[error(transparent)]
    Ckpt(#[from] relume_ckpt::Error),
    /// A learning rate (or another hyper-parameter) is NaN, infinite or out of range.
    #[error("{what} = {value} is invalid for {component}: it must be finite and {rule}")]
    InvalidHyperParameter {
        /// Component (`"AdamW param group 0"`, `"CosineAnnealingLR"`, ...).
        component: String,
        /// Setting name (`"lr"`, `"betas.0"`, ...).
        what: String,
        /// The offending value.
        value: f64,
        /// The rule it breaks (`">= 0"`).
        rule: String,
    },
    /// A saved component state belongs to another kind of component.
    #[error("state for {key:?} was saved by a {saved} but the live component is a {live}; the run's configuration changed")]
    StateKind {
        /// State key of the component.
        key: String,
        /// Kind recorded in the checkpoint.
        saved: String,
        /// Kind of the live component.
        live: String,
    },
    /// Saved state does not fit the live component (names, shapes, sizes).
    #[error("state for {component:?} does not fit the live component: {problems:?}")]
    StateMismatch {
        /// Component key.
        component: String,
        /// Every problem found, one line each, naming the parameter or field.
        problems: Vec<String>,
    },
    /// A parameter name is unknown to the parameter store.
    #[error("parameter {name:?} is not in the parameter store")]
    UnknownParameter {
        /// Parameter name.
        name: String,
    },
    /// Reading a dataset failed.
    #[error("dataset {path}: line {line}: {reason}")]
    Dataset {
        /// File the dataset was read from.
        path: std::path::PathBuf,
        /// 1-based line number (0 when not line-specific).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// An I/O operation failed on a path. The OS error is the [`source`]
    /// (printed once by a cause-chain printer such as anyhow's `{:#}`).
    ///
    /// [`source`]: std::error::Error::source
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A dataset index is past the end of the dataset.
    #[error("index {index} is out of range for a dataset of {len} examples")]
    IndexOutOfRange {
        /// The requested index.
        index: usize,
        /// Number of examples.
        len: usize,
    },
    /// In-memory data does not have the shape or type a dataset or batch needs.
    #[error("dataset {what}: expected {expected}, got {got}")]
    DatasetShape {
        /// What was checked (`"features rank"`, `"label at index 3"`, ...).
        what: String,
        /// What was required.
        expected: String,
        /// What was found.
        got: String,
    },
    /// A data loader cursor points past the end of its epoch.
    #[error("data loader cursor (epoch {epoch}, next batch {next_batch}) is past the end of the epoch ({batches_per_epoch} batches); restore a state saved by a loader with the same dataset and batch size")]
    CursorOutOfRange {
        /// Epoch of the cursor.
        epoch: u64,
        /// Index of the next batch.
        next_batch: usize,
        /// Batches in one epoch.
        batches_per_epoch: usize,
    },
    /// A data loader worker thread panicked (or exited) while loading a batch.
    #[error("data loader worker {worker} failed while loading batch {batch}: {message}")]
    WorkerPanicked {
        /// Worker number (`usize::MAX` when no worker is left to name).
        worker: usize,
        /// Batch index within the epoch.
        batch: usize,
        /// The panic message.
        message: String,
    },
    /// A data loader worker thread could not be started.
    #[error("cannot start data loader worker {worker}; lower num_workers")]
    WorkerSpawn {
        /// Worker number.
        worker: usize,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `ReduceLROnPlateau` (or another metric-driven scheduler) was stepped without
    /// the metric it monitors.
    #[error("{scheduler} needs the monitored metric at every step but step() got none; pass the value it monitors (e.g. the validation loss)")]
    MissingMetric {
        /// Scheduler kind.
        scheduler: String,
    },
    /// A scheduler was stepped past the end of its schedule (`OneCycleLR`).
    #[error("{scheduler} was stepped to step {step} but its schedule has only {total_steps} steps; raise total_steps or stop stepping it")]
    ScheduleExhausted {
        /// Scheduler kind.
        scheduler: String,
        /// The step that was requested.
        step: u64,
        /// The length of the schedule.
        total_steps: u64,
    },
    /// A scheduler was built from parts that do not fit together (milestones out of
    /// order, an unsupported child of `SequentialLR`, ...).
    #[error("{scheduler}: {reason}")]
    InvalidSchedule {
        /// Scheduler kind.
        scheduler: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A log file does not match the logger state saved in the checkpoint (it was
    /// truncated, replaced or corrupted after the save).
    #[error("log file {path}: {reason}")]
    LogFile {
        /// The log file.
        path: std::path::PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A preemption signal handler could not be registered.
    #[error("cannot install the {signal} handler for preemption; signals cannot be caught, run without preemption support")]
    SignalHandler {
        /// The signal (`"SIGTERM"`, ...).
        signal: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `ResumePolicy::Required` found nothing to resume from.
    #[error("no checkpoint to resume from in {dir} ({source_desc}); train without `Required`, or point it at an existing checkpoint")]
    NoCheckpoint {
        /// The directory searched.
        dir: std::path::PathBuf,
        /// What was looked for (`"latest"`, `"best"`, a path).
        source_desc: String,
    },
    /// The live state after restore does not hash to the manifest's fingerprint.
    #[error("checkpoint {checkpoint}: state restored into the live objects has fingerprint {live} but the manifest records {saved} (components differing from the loaded data: {differing:?}); the checkpoint or a component's restore is broken, do not train from it")]
    FingerprintMismatch {
        /// Checkpoint directory.
        checkpoint: std::path::PathBuf,
        /// Components whose live state differs from the loaded data (empty when
        /// only the manifest's fingerprint disagrees).
        differing: Vec<String>,
        /// Fingerprint in the manifest.
        saved: String,
        /// Fingerprint recomputed from the live objects.
        live: String,
    },
    /// A result-changing setting differs from the checkpoint's config.
    #[error("checkpoint {checkpoint}: setting {key} was {saved} and is now {live}; resuming would change the run's results: {fix}")]
    ConfigChanged {
        /// Checkpoint directory.
        checkpoint: std::path::PathBuf,
        /// Dotted config key.
        key: String,
        /// Value in the checkpoint (JSON).
        saved: String,
        /// Live value (JSON).
        live: String,
        /// What to do about it, as an API call (a program wrapping the trainer may
        /// name its own flag instead; see [`Error::config_change_is_schedule`]).
        fix: &'static str,
    },
    /// The number of optimizers or schedulers differs from the checkpoint's.
    #[error("checkpoint {checkpoint} holds {saved} {what} but the module configures {live}; `configure_optimizers` changed")]
    ComponentCount {
        /// Checkpoint directory.
        checkpoint: std::path::PathBuf,
        /// `"optimizers"` or `"schedulers"`.
        what: &'static str,
        /// Count in the checkpoint.
        saved: usize,
        /// Live count.
        live: usize,
    },
    /// Strict restore accounting found keys missing, unexpected or mismatched.
    #[error("checkpoint {checkpoint}: restore incomplete: missing {missing:?}, unexpected {unexpected:?}, mismatched {mismatched:?}; fix the model/callbacks, or allow-list these keys explicitly")]
    RestoreIncomplete {
        /// Checkpoint directory.
        checkpoint: std::path::PathBuf,
        /// `component/key` the live run needs but the checkpoint lacks.
        missing: Vec<String>,
        /// `component/key` in the checkpoint that nothing live accepts.
        unexpected: Vec<String>,
        /// `component/key: expected X, got Y`.
        mismatched: Vec<String>,
    },
    /// `Source::Best` was asked for but no callback tracks a best checkpoint.
    #[error("no best checkpoint known in {dir}: no callback (e.g. ModelCheckpoint with a monitor) recorded one")]
    NoBestCheckpoint {
        /// The run directory.
        dir: std::path::PathBuf,
    },
    /// A hook that was called is not implemented by the module.
    #[error("{hook} is not implemented; implement it to use this loop")]
    NotImplemented {
        /// The hook.
        hook: &'static str,
    },
    /// A trainer setting is out of range.
    #[error("trainer setting {setting} = {value} is invalid: it {rule}")]
    InvalidSetting {
        /// Setting name.
        setting: String,
        /// Value given.
        value: String,
        /// The rule it breaks.
        rule: String,
    },
    /// Two optimizers own the same parameter.
    #[error("parameter {param:?} is owned by optimizer {first} and optimizer {second}; give each parameter to one optimizer")]
    ParamOwnedTwice {
        /// Parameter name.
        param: String,
        /// Index of the first optimizer.
        first: usize,
        /// Index of the second optimizer.
        second: usize,
    },
    /// A monitored metric was not logged when it was needed.
    #[error("metric {metric:?} needed by {needed_by} has not been logged; log it (e.g. in validation_step) or change the monitor")]
    MetricNotLogged {
        /// Metric name.
        metric: String,
        /// Who needed it (`"scheduler 0"`).
        needed_by: String,
    },
    /// A callback's state was saved under one key and the live callback of the
    /// same type has another: one of its identity settings changed.
    #[error("checkpoint {checkpoint}: callback state was saved under key {saved_key:?} but the live callback's key is {live_key:?} (the strict restore reports the old key unexpected and the new key missing): an identity setting of this callback (monitor, mode, every_n_*, ...) changed since the checkpoint; restore the setting to resume its state, or allow-list `callbacks/{saved_key}` and `callbacks/{live_key}` to start it fresh")]
    CallbackIdentityChanged {
        /// The checkpoint.
        checkpoint: std::path::PathBuf,
        /// Key in the checkpoint.
        saved_key: String,
        /// Key of the live callback.
        live_key: String,
    },
    /// `Source::Path` names a directory that is not a committed checkpoint. This is
    /// an error under every policy: `IfExists` is for a run directory that may be
    /// empty, not for a path the user typed.
    #[error("resume source {path} is not a checkpoint (no manifest.json there); check the path, or resume from `Source::Last`")]
    CheckpointPathMissing {
        /// The path given.
        path: std::path::PathBuf,
    },
    /// An optimizer holds parameters that the module does not expose in
    /// `params()`: they would never get a gradient, so training would do nothing.
    #[error("optimizer {optimizer} ({kind}) holds parameters that are not in the module's params(): {params:?}; build the optimizer over `module.params()` (or register these variables in the module's ParamStore)")]
    ForeignParams {
        /// Index of the optimizer.
        optimizer: usize,
        /// Its kind (`"AdamW"`).
        kind: String,
        /// The parameter names not in the module.
        params: Vec<String>,
    },
    /// An optimizer step in which none of an optimizer's parameters got a gradient.
    #[error("optimizer {optimizer} ({kind}) got no gradient for any of its {n_params} parameters at step {step}: the loss does not depend on them (detached, or built from other variables); fix the model, or allow it with `TrainerBuilder::allow_steps_without_gradients(true)`")]
    NoGradients {
        /// Index of the optimizer.
        optimizer: usize,
        /// Its kind.
        kind: String,
        /// How many parameters it holds.
        n_params: usize,
        /// The global step about to be taken.
        step: u64,
    },
    /// An optimizer step in which some of an optimizer's parameters got no
    /// gradient: the loss does not reach them, so they would silently never train.
    #[error("optimizer {optimizer} ({kind}) got no gradient for {params:?} at step {step}: the loss does not reach them (an unused layer, a detach, or an op without a backward pass such as candle-nn 0.11's fused LayerNorm/RmsNorm forward; use relume::nn::layer_norm); freeze them (ParamStore::freeze), or allow it with `TrainerBuilder::allow_steps_without_gradients(true)`")]
    MissingGradients {
        /// Index of the optimizer.
        optimizer: usize,
        /// Its kind.
        kind: String,
        /// The parameters without a gradient.
        params: Vec<String>,
        /// The global step about to be taken.
        step: u64,
    },
    /// A monitored metric is never produced: validation ran (or a whole training
    /// epoch passed, when there is no validation) and it was still not logged.
    #[error("{needed_by} monitors {metric:?}, which was never logged (logged so far: {logged:?}); log it (e.g. with ctx.log in validation_step) or monitor one of the logged names")]
    MonitorNeverLogged {
        /// The monitored name.
        metric: String,
        /// Who monitors it.
        needed_by: String,
        /// The metric names that were logged.
        logged: Vec<String>,
    },
    /// A restore failed and rolling the live objects back to their state before it
    /// failed too: the live objects are in an unknown state.
    #[error("checkpoint {checkpoint}: restore failed ({cause}) and putting the live objects back failed too ({rollback}); do not train with these objects, rebuild them")]
    RollbackFailed {
        /// The checkpoint.
        checkpoint: std::path::PathBuf,
        /// Why the restore failed.
        cause: String,
        /// Why the rollback failed.
        rollback: String,
    },
    /// Ranks of a data-parallel run did not arrive at a collective operation in time.
    #[error("rank {rank}: ranks {missing:?} did not arrive at {what} within {waited:?}; a rank died, hangs, or runs another program or config (see its own output); the step is not committed")]
    RankTimeout {
        /// The rank reporting.
        rank: usize,
        /// The ranks that did not arrive.
        missing: Vec<usize>,
        /// The operation (`"the checkpoint at step 12"`).
        what: String,
        /// How long it waited.
        waited: std::time::Duration,
    },
    /// A rank's value differs from rank 0's where every rank must agree (the
    /// configuration, the state fingerprint before a commit, a resume result).
    #[error(
        "rank {rank} disagrees on {what}: {detail}; run the same binary and settings on every rank"
    )]
    RankDisagrees {
        /// The rank that differs.
        rank: usize,
        /// What was compared.
        what: String,
        /// The difference (the first differing setting, the two fingerprints, ...).
        detail: String,
    },
    /// The GPU collective library (NCCL) or the CUDA driver failed on this rank.
    #[error("rank {rank}: {library} failed at {what}: {detail}; check that the rank's GPU is visible (CUDA_VISIBLE_DEVICES), that libcuda and libnccl load, and the NCCL_DEBUG=WARN output")]
    DeviceCollective {
        /// The rank reporting.
        rank: usize,
        /// `"NCCL"` or `"CUDA"`.
        library: &'static str,
        /// The operation (`"gradients of step 12"`).
        what: String,
        /// The library's error code.
        detail: String,
    },
    /// A rank thread of a [`crate::dist::ThreadGroup`] panicked.
    #[error("data-parallel rank {rank} panicked (its message is above)")]
    RankPanicked {
        /// The rank.
        rank: usize,
    },
    /// A parameter is requested with another shape or dtype than the one it
    /// already has in the store (two layers under one name, or a changed model).
    #[error("parameter {name:?} already exists as {existing} but is requested as {requested}; give the layers distinct names (vb.pp(...)) or build the model with the shapes it was saved with")]
    ParamConflict {
        /// Parameter name.
        name: String,
        /// Existing dtype and shape.
        existing: String,
        /// Requested dtype and shape.
        requested: String,
    },
    /// A freeze rule covers no parameter of the module.
    #[error("freeze rule {rule:?} covers no parameter (top-level names: {near:?}); fix the name given to ParamStore::freeze")]
    FreezeMatchesNothing {
        /// The rule as given.
        rule: String,
        /// The store's top-level name components, to spot the typo.
        near: Vec<String>,
    },
    /// An optimizer holds frozen parameters: they would get optimizer state (and
    /// weight decay would change them).
    #[error("optimizer {optimizer} ({kind}) holds frozen parameters {params:?}; build it with `from_store` (which skips frozen parameters) or over `ParamStore::trainable_vars()`")]
    FrozenInOptimizer {
        /// Index of the optimizer.
        optimizer: usize,
        /// Its kind.
        kind: String,
        /// The frozen parameter names it holds.
        params: Vec<String>,
    },
    /// A weights file does not fit the model: names missing from it, names it has
    /// that the model lacks, or dtype/shape mismatches, none of them allow-listed.
    #[error("weights {path} do not fit the model: missing {missing:?}, unexpected {unexpected:?}, mismatched {mismatched:?}; fix the names (WeightsOptions::strip_prefix/add_prefix) or allow them explicitly (WeightsOptions::allow_missing/allow_unexpected/allow_mismatched)")]
    WeightsMismatch {
        /// The weights file or checkpoint.
        path: std::path::PathBuf,
        /// Model parameters (after remapping) that the file lacks.
        missing: Vec<String>,
        /// File tensors (after remapping) that the model lacks.
        unexpected: Vec<String>,
        /// `name: model dtype[shape] vs file dtype[shape]`.
        mismatched: Vec<String>,
    },
    /// An allow-list entry or name remapping of a weights load matched nothing.
    #[error("weights {path}: {what} {entry:?} matches nothing; remove it or fix its name (a rule that matches nothing hides typos)")]
    WeightsRuleUnused {
        /// The weights file or checkpoint.
        path: std::path::PathBuf,
        /// Which rule (`"allow_missing"`, `"strip_prefix"`, ...).
        what: &'static str,
        /// The rule's text.
        entry: String,
    },
}

impl Error {
    /// True for a [`Error::ConfigChanged`] of a scheduler setting while the run is
    /// being continued to a larger `max_epochs`/`max_steps`: the case
    /// [`crate::trainer::TrainerBuilder::extend_schedules`] allows. A program can
    /// then point the user at its own flag for it.
    pub fn config_change_is_schedule(&self) -> bool {
        matches!(self, Error::ConfigChanged { key, fix, .. }
            if key.starts_with("schedulers.") && fix.contains("extend_schedules"))
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
