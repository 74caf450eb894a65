//! Shared by `callbacks.rs`, `preempt.rs` and `writer_priority.rs`: a tiny MLP
//! module, a run spec that can be executed in this process or in a fresh child
//! process (this test binary re-executed with `RELUME_CB_CHILD` set, running only
//! its `child` test), and comparison helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use relume::callbacks::{
    Callback, EarlyStopping, HookCtx, LearningRateMonitor, Mode, ModelCheckpoint,
};
use relume::data::{DataLoader, LoaderConfig, TensorCollate, TensorDataset};
use relume::nn::{dropout, Linear};
use relume::optim::{AdamConfig, AdamW, ParamGroup};
use relume::params::ParamStore;
use relume::preempt::Preemption;
use relume::rng::Rng;
use relume::sched::{CosineAnnealingLR, LinearLR, SequentialLR};
use relume::trainer::{
    FitOutcome, LogOpts, OptimizerConfig, ResumePolicy, SchedulerConfig, Source, StepCtx,
    TrainModule, Trainer, TrainerBuilder, ValCheck,
};
use relume::{CsvLogger, Result, TensorBoardLogger};
use relume_ckpt::StateDict;
use serde::{Deserialize, Serialize};

/// Serialises the tests of one binary. A child spawned by one test (fork, then
/// exec) briefly shares every open file description of this process, including
/// another test's checkpoint-directory lock, which then looks held; running the
/// tests one at a time avoids that race.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Exit code of a preempted child (the documented `PREEMPTED_EXIT_CODE`).
pub const PREEMPTED: i32 = relume::PREEMPTED_EXIT_CODE;

/// One run's settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Spec {
    pub max_epochs: u64,
    pub val_steps: Option<u64>,
    /// ModelCheckpoint(monitor val_loss, min) with this top-k, every epoch.
    pub top_k: Option<i64>,
    pub save_last: bool,
    /// Monitor of the ModelCheckpoint (default val_loss).
    pub mc_monitor: String,
    /// EarlyStopping(val_loss, min) patience and min_delta.
    pub early_stop: Option<(u64, f64)>,
    pub es_monitor: String,
    pub lr_monitor: bool,
    pub loggers: bool,
    /// SIGKILL this process at the boundary of this step (before its saves).
    pub kill_at: Option<u64>,
    /// SIGTERM this process at this step (the preemption path).
    pub term_at: Option<u64>,
    /// Print `STEP n` at each step and sleep this long (for signals from outside).
    pub sleep_ms: u64,
    pub async_ckpt: bool,
    pub resume: bool,
    /// Resume from `Source::Best` (required).
    pub resume_best: bool,
    /// Built-in checkpoint every n optimizer steps.
    pub every_n_steps: Option<u64>,
    /// Abort the process (as `kill -9` would) before the n-th rename onto
    /// `latest` (0: the first), right after a checkpoint was renamed into place.
    pub abort_at_latest_rename: Option<u64>,
    /// Fail the save of the checkpoint of this name (its rename into place).
    pub fail_save_of: Option<String>,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            max_epochs: 6,
            val_steps: None,
            top_k: None,
            save_last: false,
            mc_monitor: "val_loss".into(),
            early_stop: None,
            es_monitor: "val_loss".into(),
            lr_monitor: false,
            loggers: false,
            kill_at: None,
            term_at: None,
            sleep_ms: 0,
            async_ckpt: false,
            resume: true,
            resume_best: false,
            every_n_steps: None,
            abort_at_latest_rename: None,
            fail_save_of: None,
        }
    }
}

pub struct Tiny {
    params: ParamStore,
    l1: Linear,
    l2: Linear,
}

impl Tiny {
    pub fn new() -> Result<Self> {
        let params = ParamStore::new(Device::Cpu);
        let mut rng = Rng::new(7, "init");
        let l1 = Linear::new(&params, "l1", 4, 8, &mut rng)?;
        let l2 = Linear::new(&params, "l2", 8, 3, &mut rng)?;
        Ok(Tiny { params, l1, l2 })
    }

    fn forward(&self, x: &Tensor, ctx: &mut StepCtx<'_>) -> Result<Tensor> {
        let h = self.l1.forward(x)?.relu()?;
        let train = ctx.training();
        let h = dropout(&h, 0.25, ctx.rng("dropout"), train)?;
        self.l2.forward(&h)
    }
}

impl TrainModule for Tiny {
    type Batch = (Tensor, Tensor);

    fn params(&self) -> &ParamStore {
        &self.params
    }

    fn training_step(&mut self, (x, y): Self::Batch, ctx: &mut StepCtx<'_>) -> Result<Tensor> {
        let logits = self.forward(&x, ctx)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        ctx.log_tensor("train_loss", &loss, LogOpts::new().on_epoch(true))?;
        Ok(loss)
    }

    fn validation_step(&mut self, (x, y): Self::Batch, ctx: &mut StepCtx<'_>) -> Result<()> {
        let logits = self.forward(&x, ctx)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        let b = x.dim(0)?;
        ctx.log_tensor("val_loss", &loss, LogOpts::new().batch_size(b))?;
        Ok(())
    }

    fn configure_optimizers(&self) -> Result<Vec<OptimizerConfig>> {
        let group = ParamGroup {
            params: self.params.named_vars_with_prefix(""),
            lr: 0.05,
            weight_decay: 0.01,
        };
        let warm = LinearLR::new(vec![0.05], 0.2, 1.0, 3)?;
        let cos = CosineAnnealingLR::new(vec![0.05], 60, 1e-3)?;
        let sched = SequentialLR::new(vec![Box::new(warm), Box::new(cos)], vec![3])?;
        Ok(vec![OptimizerConfig::new(AdamW::new(
            vec![group],
            AdamConfig::adamw(),
        )?)
        .with_scheduler(SchedulerConfig::per_step(sched))])
    }
}

/// Sends itself a signal at a chosen step; optionally prints and sleeps per step.
struct Signaller {
    kill_at: Option<u64>,
    term_at: Option<u64>,
    sleep_ms: u64,
}

impl Callback for Signaller {
    fn state_key(&self) -> String {
        "signaller".into()
    }
    fn on_train_batch_end(&mut self, ctx: &mut HookCtx<'_>, boundary: bool) -> Result<()> {
        if !boundary {
            return Ok(());
        }
        let step = ctx.progress.global_step;
        if self.sleep_ms > 0 {
            println!("STEP {step}");
            std::thread::sleep(Duration::from_millis(self.sleep_ms));
        }
        if self.kill_at == Some(step) {
            // SAFETY: plain libc calls on our own pid.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
        if self.term_at == Some(step) {
            // SAFETY: raise(3) on this thread: the handler (it only sets the
            // preemption flag) has run when it returns.
            unsafe {
                libc::raise(libc::SIGTERM);
            }
        }
        Ok(())
    }
}

fn data(n: usize, seed: u64) -> TensorDataset {
    let mut rng = Rng::new(seed, "synthetic");
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for _ in 0..n {
        let c = rng.below(3) as u32;
        for j in 0..4 {
            let centre = if j as u32 == c { 1.0 } else { 0.0 };
            xs.push(centre + rng.normal_f64() as f32 * 0.8);
        }
        ys.push(c);
    }
    TensorDataset::new(xs, 4, ys).unwrap()
}

/// A loader of `(x, y)` batches.
pub type Loader = DataLoader<(Tensor, Tensor)>;

pub fn loaders() -> (Loader, Loader) {
    let cfg = LoaderConfig::new(5).shuffle(true).seed(3);
    let train = DataLoader::new(data(40, 1), TensorCollate::default(), cfg).unwrap();
    let val =
        DataLoader::new(data(30, 2), TensorCollate::default(), LoaderConfig::new(10)).unwrap();
    (train, val)
}

/// Builds the trainer for `spec` in `run_dir`.
pub fn trainer(spec: &Spec, run_dir: &Path, preempt: Arc<Preemption>) -> Result<Trainer> {
    builder(spec, run_dir, preempt)?.build()
}

/// The builder of [`trainer`], to add more.
pub fn builder(spec: &Spec, run_dir: &Path, preempt: Arc<Preemption>) -> Result<TrainerBuilder> {
    let mut b = Trainer::builder()
        .max_epochs(spec.max_epochs)
        .seed(11)
        .log_every_n_steps(1)
        .default_root_dir(run_dir)
        .enable_progress_bar(false)
        .preemption(preempt)
        .async_checkpointing(spec.async_ckpt)
        .callback(Box::new(Signaller {
            kill_at: spec.kill_at,
            term_at: spec.term_at,
            sleep_ms: spec.sleep_ms,
        }))
        .resume(if spec.resume_best {
            ResumePolicy::Required(Source::Best)
        } else if spec.resume {
            ResumePolicy::IfExists(Source::Last)
        } else {
            ResumePolicy::Never
        });
    if let Some(n) = spec.val_steps {
        b = b.val_check_interval(ValCheck::Steps(n));
    }
    if let Some(n) = spec.every_n_steps {
        b = b.checkpoint_every_n_steps(n);
    }
    if spec.abort_at_latest_rename.is_some() || spec.fail_save_of.is_some() {
        let faulty = relume_ckpt::FaultyStorage::new(relume_ckpt::LocalStorage);
        if let Some(n) = spec.abort_at_latest_rename {
            faulty.abort_before_rename_to("latest", n);
        }
        if let Some(name) = &spec.fail_save_of {
            faulty.fail_rename_to(name, 0);
        }
        b = b.checkpoint_storage(Arc::new(faulty));
    }
    if let Some(k) = spec.top_k {
        b = b.checkpoint_every_n_epochs(0).callback(Box::new(
            ModelCheckpoint::new()
                .monitor(spec.mc_monitor.clone(), Mode::Min)
                .save_top_k(k)
                .save_last(spec.save_last)
                .filename("epoch={epoch}-step={step:03}-val_loss={val_loss:.4f}"),
        ));
    }
    if let Some((patience, delta)) = spec.early_stop {
        b = b.callback(Box::new(
            EarlyStopping::new(spec.es_monitor.clone(), Mode::Min)
                .patience(patience)
                .min_delta(delta),
        ));
    }
    if spec.lr_monitor {
        b = b.callback(Box::new(LearningRateMonitor::new()));
    }
    if spec.loggers {
        let logs = run_dir.join("logs");
        b = b.logger(Box::new(CsvLogger::new(&logs))).logger(Box::new(
            TensorBoardLogger::new(&logs).with_file_name("events.out.tfevents.test")?,
        ));
    }
    Ok(b)
}

/// Runs `spec` in `run_dir` in this process, with a preemption flag that only
/// code sets (signals are for child processes).
pub fn run(spec: &Spec, run_dir: &Path) -> Result<FitOutcome> {
    run_with(spec, run_dir, Arc::new(Preemption::manual()))
}

/// Runs `spec` with `preempt`.
pub fn run_with(spec: &Spec, run_dir: &Path, preempt: Arc<Preemption>) -> Result<FitOutcome> {
    let mut t = trainer(spec, run_dir, preempt)?;
    let mut module = Tiny::new()?;
    let (mut train, val) = loaders();
    t.fit(&mut module, &mut train, Some(&val))
}

pub fn describe(o: &FitOutcome) -> String {
    let kind = match o {
        FitOutcome::Completed(_) => "completed",
        FitOutcome::Stopped { .. } => "stopped",
        FitOutcome::Interrupted(_) => "interrupted",
        FitOutcome::AlreadyFinished(_) => "finished",
    };
    format!("{kind}@{}", o.summary().global_step)
}

/// The child entry point (call it from a `#[test] fn child()`).
pub fn child_main() {
    let Ok(arg) = std::env::var("RELUME_CB_CHILD") else {
        return;
    };
    let (spec, dir): (Spec, PathBuf) = serde_json::from_str(&arg).unwrap();
    // A real training job: SIGTERM/SIGUSR1 only set the flag.
    let preempt = Arc::new(Preemption::install().unwrap());
    let out = run_with(&spec, &dir, preempt).unwrap();
    println!("OUTCOME={}", describe(&out));
    std::process::exit(out.exit_code());
}

/// A child process running `spec`.
pub fn command(spec: &Spec, run_dir: &Path) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(
            "RELUME_CB_CHILD",
            serde_json::to_string(&(spec, run_dir)).unwrap(),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// How a child ended: its exit code (or `-signal`) and outcome line.
pub fn spawn(spec: &Spec, run_dir: &Path) -> (i32, String) {
    use std::os::unix::process::ExitStatusExt;
    let out = command(spec, run_dir).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = out
        .status
        .code()
        .unwrap_or_else(|| -out.status.signal().unwrap_or(0));
    let outcome = stdout
        .lines()
        .find_map(|l| l.split_once("OUTCOME=").map(|(_, o)| o.trim().to_string()))
        .unwrap_or_default();
    if code != 0 && code != PREEMPTED && code != -libc::SIGKILL {
        panic!(
            "child failed ({code}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (code, outcome)
}

pub fn ckdir(run_dir: &Path) -> relume_ckpt::CheckpointDir {
    relume_ckpt::CheckpointDir::open_read_only(run_dir).unwrap()
}

/// Committed checkpoint names, sorted.
pub fn checkpoint_names(run_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = ckdir(run_dir)
        .list()
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    v.sort();
    v
}

pub fn final_components(run_dir: &Path) -> BTreeMap<String, StateDict> {
    let latest = ckdir(run_dir)
        .latest()
        .unwrap()
        .expect("a final checkpoint");
    relume_ckpt::load(&latest).unwrap().components
}

/// Every component of both final checkpoints equal, byte for byte.
pub fn assert_identical(a: &Path, b: &Path) {
    let (ca, cb) = (final_components(a), final_components(b));
    assert_eq!(ca.keys().collect::<Vec<_>>(), cb.keys().collect::<Vec<_>>());
    for (name, sd) in &ca {
        if sd != &cb[name] {
            let differing: Vec<String> = sd
                .json_leaves()
                .filter(|(k, v)| cb[name].get_json(k) != Some(*v))
                .map(|(k, v)| format!("{k}: {v} vs {:?}", cb[name].get_json(k)))
                .collect();
            panic!("component {name} differs after resume: {differing:?}");
        }
    }
    assert_eq!(relume_ckpt::fingerprint(&ca), relume_ckpt::fingerprint(&cb));
}

/// The ModelCheckpoint state saved in the final checkpoint.
pub fn mc_state(run_dir: &Path) -> StateDict {
    let c = final_components(run_dir);
    let cbs = c.get("callbacks").cloned().unwrap_or_default();
    let key = cbs
        .keys()
        .find(|k| k.starts_with("ModelCheckpoint{"))
        .expect("ModelCheckpoint state")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    cbs.sub(&key)
}

/// `best` as `Source::Best` resolves it: the best entry of the saved top k.
pub fn best_name(run_dir: &Path) -> String {
    let mc = ModelCheckpoint::new().monitor("val_loss", Mode::Min);
    let p = mc
        .best_checkpoint(&mc_state(run_dir))
        .expect("a best checkpoint");
    p.to_string_lossy().into_owned()
}
