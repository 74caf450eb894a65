//! The resume-equivalence contract.
//!
//! Every cell trains a tiny MLP (dropout, shuffled data), interrupts it at a
//! chosen point through the trainer's interrupt flag (the same path as SIGTERM),
//! resumes in a **fresh process** (this test binary re-executed with
//! `RELUME_RESUME_CHILD` set, running only the `child` test), trains to the end,
//! and requires the final checkpoint's components to be byte-identical to an
//! uninterrupted run's.
//!
//! Accumulation: the trainer saves only at optimizer-step boundaries, so an
//! interrupt inside an accumulation window is honoured at the end of that window
//! (the saved window position is always 0).
//!
//! The failure tests each expect one specific error variant.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{Device, Tensor, D};
use relume::callbacks::{Callback, HookCtx};
use relume::data::{DataLoader, LoaderConfig, TensorCollate, TensorDataset};
use relume::nn::{dropout, Linear};
use relume::optim::{AdamConfig, AdamW, ParamGroup, Sgd, SgdConfig};
use relume::params::ParamStore;
use relume::rng::Rng;
use relume::sched::{CosineAnnealingLR, LinearLR, SequentialLR, StepLR};
use relume::trainer::{
    FitOutcome, LogOpts, OptimizerConfig, ResumePolicy, SchedulerConfig, Source, StepCtx,
    TrainModule, Trainer, ValCheck,
};
use relume::{Error, Result};
use relume_ckpt::{RestoreReport, StateDict};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
enum Opt {
    AdamW,
    SgdNesterov,
    Two,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
enum Interrupt {
    /// At the boundary where global_step == n.
    Step(u64),
    /// After the n-th training batch in total (inside an accumulation window).
    Batch(u64),
    /// After the validation run at global_step == n.
    AfterVal(u64),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Spec {
    opt: Opt,
    accum: u64,
    workers: usize,
    hidden: usize,
    batch_size: usize,
    max_epochs: u64,
    val_steps: Option<u64>,
    interrupt: Option<Interrupt>,
    extra_callback: bool,
    resume: bool,
    /// Allow-listed key prefixes.
    allow: Vec<String>,
    /// Config keys allowed to change.
    overrides: Vec<String>,
}

impl Spec {
    fn new(opt: Opt) -> Self {
        Spec {
            opt,
            accum: 1,
            workers: 0,
            hidden: 8,
            batch_size: 5,
            max_epochs: 3,
            val_steps: None,
            interrupt: None,
            extra_callback: false,
            resume: true,
            allow: Vec::new(),
            overrides: Vec::new(),
        }
    }
}

struct Tiny {
    params: ParamStore,
    l1: Linear,
    l2: Linear,
    opt: Opt,
    steps_seen: u64,
}

impl Tiny {
    fn new(spec: &Spec) -> Result<Self> {
        let params = ParamStore::new(Device::Cpu);
        let mut rng = Rng::new(7, "init");
        let l1 = Linear::new(&params, "l1", 4, spec.hidden, &mut rng)?;
        let l2 = Linear::new(&params, "l2", spec.hidden, 3, &mut rng)?;
        Ok(Tiny {
            params,
            l1,
            l2,
            opt: spec.opt,
            steps_seen: 0,
        })
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
        let b = x.dim(0)?;
        ctx.log_tensor(
            "train_loss",
            &loss,
            LogOpts::new().on_epoch(true).batch_size(b),
        )?;
        self.steps_seen += 1;
        Ok(loss)
    }

    fn validation_step(&mut self, (x, y): Self::Batch, ctx: &mut StepCtx<'_>) -> Result<()> {
        let logits = self.forward(&x, ctx)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        let acc = logits
            .argmax(D::Minus1)?
            .eq(&y)?
            .to_dtype(candle_core::DType::F64)?
            .mean_all()?
            .to_scalar::<f64>()?;
        let b = x.dim(0)?;
        ctx.log_tensor("val_loss", &loss, LogOpts::new().batch_size(b))?;
        ctx.log_with("val_acc", acc, LogOpts::new().batch_size(b));
        Ok(())
    }

    fn configure_optimizers(&self) -> Result<Vec<OptimizerConfig>> {
        let group = |prefix: &str, lr: f64| ParamGroup {
            params: self.params.named_vars_with_prefix(prefix),
            lr,
            weight_decay: 0.01,
        };
        let sgd = SgdConfig::default().with_momentum(0.9).with_nesterov(true);
        let per_step = |lr: f64| -> Result<SchedulerConfig> {
            let warm = LinearLR::new(vec![lr], 0.2, 1.0, 3)?;
            let cos = CosineAnnealingLR::new(vec![lr], 20, 1e-4)?;
            Ok(SchedulerConfig::per_step(SequentialLR::new(
                vec![Box::new(warm), Box::new(cos)],
                vec![3],
            )?))
        };
        let per_epoch = |lr: f64| -> Result<SchedulerConfig> {
            Ok(SchedulerConfig::per_epoch(StepLR::new(vec![lr], 1, 0.7)?))
        };
        Ok(match self.opt {
            Opt::AdamW => {
                vec![
                    OptimizerConfig::new(AdamW::new(vec![group("", 0.02)], AdamConfig::adamw())?)
                        .with_scheduler(per_step(0.02)?),
                ]
            }
            Opt::SgdNesterov => vec![OptimizerConfig::new(Sgd::new(vec![group("", 0.05)], sgd)?)
                .with_scheduler(per_epoch(0.05)?)],
            Opt::Two => vec![
                OptimizerConfig::new(Sgd::new(vec![group("l1.", 0.05)], sgd)?)
                    .with_scheduler(per_step(0.05)?),
                OptimizerConfig::new(AdamW::new(vec![group("l2.", 0.02)], AdamConfig::adamw())?)
                    .with_scheduler(per_epoch(0.02)?),
            ],
        })
    }

    fn on_save_checkpoint(&self) -> Result<StateDict> {
        let mut sd = StateDict::new();
        sd.insert_json("steps_seen", self.steps_seen.into());
        Ok(sd)
    }

    fn on_load_checkpoint(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let mut r = RestoreReport::new();
        r.diff_keys(["steps_seen"], state);
        if r.is_clean() {
            self.steps_seen = state.require_value("steps_seen")?;
            r.restored("steps_seen");
        }
        Ok(r)
    }
}

/// Counts batches (stateful) and raises the interrupt flag at a chosen point.
struct Interrupter {
    flag: Arc<AtomicBool>,
    at: Option<Interrupt>,
    batches: u64,
}

impl Callback for Interrupter {
    fn state_key(&self) -> String {
        "interrupter".into()
    }
    fn state_dict(&self) -> Result<StateDict> {
        let mut sd = StateDict::new();
        sd.insert_json("batches", self.batches.into());
        Ok(sd)
    }
    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let mut r = RestoreReport::new();
        r.diff_keys(["batches"], state);
        if r.is_clean() {
            self.batches = state.require_value("batches")?;
            r.restored("batches");
        }
        Ok(r)
    }
    fn on_train_batch_end(&mut self, ctx: &mut HookCtx<'_>, boundary: bool) -> Result<()> {
        self.batches += 1;
        match self.at {
            Some(Interrupt::Step(n)) if boundary && ctx.progress.global_step == n => {
                self.flag.store(true, Ordering::SeqCst)
            }
            Some(Interrupt::Batch(n)) if self.batches == n => {
                self.flag.store(true, Ordering::SeqCst)
            }
            _ => {}
        }
        Ok(())
    }
    fn on_validation_end(&mut self, ctx: &mut HookCtx<'_>) -> Result<()> {
        if self.at == Some(Interrupt::AfterVal(ctx.progress.global_step)) {
            self.flag.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// A stateful callback present only when `extra_callback` is set.
struct Extra;
impl Callback for Extra {
    fn state_key(&self) -> String {
        "extra".into()
    }
    fn state_dict(&self) -> Result<StateDict> {
        let mut sd = StateDict::new();
        sd.insert_json("x", 1.into());
        Ok(sd)
    }
    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let mut r = RestoreReport::new();
        r.diff_keys(["x"], state);
        Ok(r)
    }
}

fn data(n: usize, seed: u64) -> TensorDataset {
    let mut rng = Rng::new(seed, "synthetic");
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for _ in 0..n {
        let c = rng.below(3) as u32;
        for j in 0..4 {
            let centre = if j as u32 == c { 1.5 } else { 0.0 };
            xs.push(centre + rng.normal_f64() as f32 * 0.5);
        }
        ys.push(c);
    }
    TensorDataset::new(xs, 4, ys).unwrap()
}

type Loader = DataLoader<(Tensor, Tensor)>;

fn loaders(spec: &Spec) -> (Loader, Loader) {
    let cfg = LoaderConfig::new(spec.batch_size)
        .shuffle(true)
        .seed(3)
        .num_workers(spec.workers);
    let train = DataLoader::new(data(40, 1), TensorCollate::default(), cfg).unwrap();
    let val = DataLoader::new(data(15, 2), TensorCollate::default(), LoaderConfig::new(8)).unwrap();
    (train, val)
}

/// Runs `spec` in `run_dir` in this process.
fn run(spec: &Spec, run_dir: &Path) -> Result<FitOutcome> {
    let flag = Arc::new(AtomicBool::new(false));
    let mut b = Trainer::builder()
        .max_epochs(spec.max_epochs)
        .accumulate_grad_batches(spec.accum)
        .seed(11)
        .default_root_dir(run_dir)
        .enable_progress_bar(false)
        .interrupt_flag(flag.clone())
        .callback(Box::new(Interrupter {
            flag,
            at: spec.interrupt,
            batches: 0,
        }))
        .resume(if spec.resume {
            ResumePolicy::IfExists(Source::Last)
        } else {
            ResumePolicy::Never
        });
    if let Some(n) = spec.val_steps {
        b = b.val_check_interval(ValCheck::Steps(n));
    }
    if spec.extra_callback {
        b = b.callback(Box::new(Extra));
    }
    let mut allow = relume_ckpt::AllowList::none();
    for a in &spec.allow {
        allow = allow.prefix(a.clone());
    }
    b = b.allow(allow);
    for o in &spec.overrides {
        b = b.override_config(o.clone());
    }
    let mut trainer = b.build()?;
    let mut module = Tiny::new(spec)?;
    let (mut train, val) = loaders(spec);
    trainer.fit(&mut module, &mut train, Some(&val))
}

fn describe(o: &FitOutcome) -> String {
    let kind = match o {
        FitOutcome::Completed(_) => "completed",
        FitOutcome::Stopped { .. } => "stopped",
        FitOutcome::Interrupted(_) => "interrupted",
        FitOutcome::AlreadyFinished(_) => "finished",
    };
    format!("{kind}@{}", o.summary().global_step)
}

/// The child-process entry point: does nothing unless re-executed by `spawn`.
#[test]
fn child() {
    let Ok(arg) = std::env::var("RELUME_RESUME_CHILD") else {
        return;
    };
    let (spec, dir): (Spec, PathBuf) = serde_json::from_str(&arg).unwrap();
    let out = run(&spec, &dir).unwrap();
    println!("OUTCOME={}", describe(&out));
}

/// Runs `spec` in a fresh process; returns its outcome line.
fn spawn(spec: &Spec, run_dir: &Path) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(
            "RELUME_RESUME_CHILD",
            serde_json::to_string(&(spec, run_dir)).unwrap(),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.split_once("OUTCOME=").map(|(_, o)| o.trim().to_string()))
        .unwrap_or_else(|| panic!("no outcome in child output: {stdout}"))
}

fn final_components(run_dir: &Path) -> BTreeMap<String, StateDict> {
    let dir = relume_ckpt::CheckpointDir::open_read_only(run_dir).unwrap();
    let latest = dir.latest().unwrap().expect("a final checkpoint");
    relume_ckpt::load(&latest).unwrap().components
}

fn assert_identical(a: &Path, b: &Path) {
    let (ca, cb) = (final_components(a), final_components(b));
    assert_eq!(ca.keys().collect::<Vec<_>>(), cb.keys().collect::<Vec<_>>());
    for (name, sd) in &ca {
        assert!(sd == &cb[name], "component {name} differs after resume");
    }
    assert_eq!(relume_ckpt::fingerprint(&ca), relume_ckpt::fingerprint(&cb));
}

/// Interrupts `spec` at each point in turn (the first in-process, the rest in
/// fresh processes), then finishes in a fresh process; compares with a clean run.
fn cell(spec: Spec, points: &[(Interrupt, &str)]) {
    let reference = tempfile::tempdir().unwrap();
    let out = run(
        &Spec {
            resume: false,
            ..spec.clone()
        },
        reference.path(),
    )
    .unwrap();
    assert!(matches!(out, FitOutcome::Completed(_)), "{out:?}");
    let dir = tempfile::tempdir().unwrap();
    for (i, (at, expect)) in points.iter().enumerate() {
        let s = Spec {
            interrupt: Some(*at),
            ..spec.clone()
        };
        let got = if i == 0 {
            describe(&run(&s, dir.path()).unwrap())
        } else {
            spawn(&s, dir.path())
        };
        assert_eq!(&got, expect, "interrupt at {at:?}");
    }
    let done = spawn(&spec, dir.path());
    assert_eq!(done, format!("completed@{}", out.summary().global_step));
    assert_identical(reference.path(), dir.path());
}

// 40 examples / batch 5 = 8 batches per epoch; 3 epochs.

#[test]
fn after_step_1_adamw_per_step_schedule() {
    cell(
        Spec::new(Opt::AdamW),
        &[(Interrupt::Step(1), "interrupted@1")],
    );
}

#[test]
fn mid_epoch_sgd_nesterov_per_epoch_schedule_two_workers() {
    let spec = Spec {
        workers: 2,
        ..Spec::new(Opt::SgdNesterov)
    };
    cell(spec, &[(Interrupt::Step(11), "interrupted@11")]);
}

#[test]
fn last_batch_of_epoch_two_optimizers() {
    cell(
        Spec::new(Opt::Two),
        &[(Interrupt::Step(8), "interrupted@8")],
    );
}

#[test]
fn right_after_validation() {
    let spec = Spec {
        val_steps: Some(3),
        ..Spec::new(Opt::AdamW)
    };
    cell(spec, &[(Interrupt::AfterVal(6), "interrupted@6")]);
}

#[test]
fn inside_accumulation_window_snaps_to_its_end() {
    // 8 batches / accumulate 3 → steps after batches 3, 6, 8 of each epoch. An
    // interrupt after batch 4 (window position 1) is saved after batch 6 (step 2).
    let spec = Spec {
        accum: 3,
        ..Spec::new(Opt::SgdNesterov)
    };
    cell(spec, &[(Interrupt::Batch(4), "interrupted@2")]);
}

#[test]
fn resumed_three_times_in_a_row() {
    let spec = Spec {
        workers: 2,
        ..Spec::new(Opt::Two)
    };
    cell(
        spec,
        &[
            (Interrupt::Step(2), "interrupted@2"),
            (Interrupt::Step(9), "interrupted@9"),
            (Interrupt::Step(13), "interrupted@13"),
            (Interrupt::Step(20), "interrupted@20"),
        ],
    );
}

#[test]
fn resuming_a_finished_run_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec {
        max_epochs: 1,
        ..Spec::new(Opt::AdamW)
    };
    assert!(matches!(
        run(&spec, dir.path()).unwrap(),
        FitOutcome::Completed(_)
    ));
    let again = run(&spec, dir.path()).unwrap();
    assert!(
        matches!(again, FitOutcome::AlreadyFinished(ref s) if s.global_step == 8),
        "{again:?}"
    );
    // Raising max_epochs continues the run.
    let more = run(
        &Spec {
            max_epochs: 2,
            ..spec
        },
        dir.path(),
    )
    .unwrap();
    assert!(
        matches!(more, FitOutcome::Completed(ref s) if s.global_step == 16),
        "{more:?}"
    );
}

// ---- failure tests: each expects one error variant ----

/// Trains one epoch of `Spec::new(opt)` into a fresh directory.
fn trained(opt: Opt) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec {
        max_epochs: 1,
        ..Spec::new(opt)
    };
    run(&spec, dir.path()).unwrap();
    dir
}

fn resume_err(dir: &Path, spec: Spec) -> Error {
    run(
        &Spec {
            max_epochs: 2,
            ..spec
        },
        dir,
    )
    .expect_err("resume must fail")
}

#[test]
fn changed_architecture_names_the_parameter() {
    let dir = trained(Opt::AdamW);
    let e = resume_err(
        dir.path(),
        Spec {
            hidden: 9,
            ..Spec::new(Opt::AdamW)
        },
    );
    let Error::RestoreIncomplete { mismatched, .. } = &e else {
        panic!("{e}")
    };
    assert!(
        mismatched.iter().any(|m| m.starts_with("model/l1.weight")),
        "{e}"
    );
}

#[test]
fn extra_or_missing_optimizer_is_a_count_error() {
    let dir = trained(Opt::AdamW);
    let e = resume_err(dir.path(), Spec::new(Opt::Two));
    assert!(
        matches!(
            e,
            Error::ComponentCount {
                what: "optimizers",
                saved: 1,
                live: 2,
                ..
            }
        ),
        "{e}"
    );
    let dir = trained(Opt::Two);
    let e = resume_err(dir.path(), Spec::new(Opt::SgdNesterov));
    assert!(
        matches!(
            e,
            Error::ComponentCount {
                what: "optimizers",
                saved: 2,
                live: 1,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn missing_callback_state_is_an_error() {
    let dir = trained(Opt::AdamW);
    let e = resume_err(
        dir.path(),
        Spec {
            extra_callback: true,
            ..Spec::new(Opt::AdamW)
        },
    );
    let Error::RestoreIncomplete { missing, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(missing, &vec!["callbacks/extra".to_string()]);
}

#[test]
fn swapping_the_optimizer_needs_explicit_allow_and_override() {
    let dir = trained(Opt::AdamW);
    let swapped = Spec::new(Opt::SgdNesterov);
    // Refused by default: the optimizer spec is part of the config.
    let e = resume_err(dir.path(), swapped.clone());
    assert!(
        matches!(&e, Error::ConfigChanged { key, .. } if key.starts_with("optimizers.0")),
        "{e}"
    );
    // Overriding the config alone is not enough: the AdamW state cannot go into SGD.
    let over = Spec {
        overrides: vec!["optimizers".into(), "schedulers".into()],
        ..swapped.clone()
    };
    let e = resume_err(dir.path(), over.clone());
    assert!(matches!(e, Error::RestoreIncomplete { .. }), "{e}");
    // With the optimizer and scheduler allow-listed, the rest is restored and verified.
    let ok = Spec {
        allow: vec!["optimizer.0".into(), "scheduler.0".into()],
        max_epochs: 2,
        ..over
    };
    let out = run(&ok, dir.path()).unwrap();
    assert!(
        matches!(out, FitOutcome::Completed(ref s) if s.global_step == 16),
        "{out:?}"
    );
}

#[test]
fn changed_batch_size_is_a_config_error() {
    let dir = trained(Opt::AdamW);
    let e = resume_err(
        dir.path(),
        Spec {
            batch_size: 4,
            ..Spec::new(Opt::AdamW)
        },
    );
    let Error::ConfigChanged {
        key, saved, live, ..
    } = &e
    else {
        panic!("{e}")
    };
    assert_eq!(
        (key.as_str(), saved.as_str(), live.as_str()),
        ("train_loader.batch_size", "5", "4")
    );
}

#[test]
fn required_with_an_empty_directory_fails() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::builder()
        .default_root_dir(dir.path())
        .resume(ResumePolicy::Required(Source::Last))
        .enable_progress_bar(false)
        .build()
        .unwrap();
    let spec = Spec::new(Opt::AdamW);
    let (mut train, _) = loaders(&spec);
    let e = t
        .fit(&mut Tiny::new(&spec).unwrap(), &mut train, None)
        .unwrap_err();
    assert!(matches!(e, Error::NoCheckpoint { .. }), "{e}");
}

#[test]
fn edited_manifest_fingerprint_is_caught_after_restore() {
    let dir = trained(Opt::AdamW);
    let ck = relume_ckpt::CheckpointDir::open_read_only(dir.path())
        .unwrap()
        .latest()
        .unwrap()
        .unwrap();
    let mpath = ck.join("manifest.json");
    let bytes = std::fs::read(&mpath).unwrap();
    let mut v = relume_ckpt::manifest::parse_sealed(&mpath, &bytes).unwrap();
    v["fingerprint"] = serde_json::json!(format!("blake3:{}", "0".repeat(64)));
    std::fs::write(&mpath, relume_ckpt::manifest::seal(&v)).unwrap();
    assert!(
        relume_ckpt::verify(&ck).is_ok(),
        "only post-restore verification may catch it"
    );
    let e = resume_err(dir.path(), Spec::new(Opt::AdamW));
    assert!(matches!(e, Error::FingerprintMismatch { .. }), "{e}");
}

// ---- the other trainer error variants ----

#[test]
fn best_without_a_tracking_callback_is_an_error() {
    let dir = trained(Opt::AdamW);
    let mut t = Trainer::builder()
        .default_root_dir(dir.path())
        .resume(ResumePolicy::Required(Source::Best))
        .enable_progress_bar(false)
        .build()
        .unwrap();
    let spec = Spec::new(Opt::AdamW);
    let (mut train, _) = loaders(&spec);
    let e = t
        .fit(&mut Tiny::new(&spec).unwrap(), &mut train, None)
        .unwrap_err();
    assert!(matches!(e, Error::NoBestCheckpoint { .. }), "{e}");
}

#[test]
fn predict_without_predict_step_is_not_implemented() {
    let spec = Spec::new(Opt::AdamW);
    let (_, val) = loaders(&spec);
    let mut t = Trainer::builder()
        .enable_progress_bar(false)
        .build()
        .unwrap();
    let e = t.predict(&mut Tiny::new(&spec).unwrap(), &val).unwrap_err();
    assert!(matches!(e, Error::NotImplemented { .. }), "{e}");
    // validate works on the current parameters and returns the reduced metrics
    let m = t.validate(&mut Tiny::new(&spec).unwrap(), &val).unwrap();
    assert!(
        m.contains_key("val_loss") && m.contains_key("val_acc"),
        "{m:?}"
    );
}

/// A module whose optimizers are configured by a closure.
struct Custom<F: Fn(&ParamStore) -> Result<Vec<OptimizerConfig>>> {
    inner: Tiny,
    opts: F,
}

impl<F: Fn(&ParamStore) -> Result<Vec<OptimizerConfig>>> TrainModule for Custom<F> {
    type Batch = (Tensor, Tensor);
    fn params(&self) -> &ParamStore {
        &self.inner.params
    }
    fn training_step(&mut self, batch: Self::Batch, ctx: &mut StepCtx<'_>) -> Result<Tensor> {
        self.inner.training_step(batch, ctx)
    }
    fn configure_optimizers(&self) -> Result<Vec<OptimizerConfig>> {
        (self.opts)(&self.inner.params)
    }
}

fn fit_custom(opts: impl Fn(&ParamStore) -> Result<Vec<OptimizerConfig>>) -> Result<FitOutcome> {
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec::new(Opt::AdamW);
    let (mut train, val) = loaders(&spec);
    let mut m = Custom {
        inner: Tiny::new(&spec)?,
        opts,
    };
    let mut t = Trainer::builder()
        .max_epochs(1)
        .default_root_dir(dir.path())
        .enable_progress_bar(false)
        .build()?;
    t.fit(&mut m, &mut train, Some(&val))
}

#[test]
fn a_parameter_owned_by_two_optimizers_is_an_error() {
    let e = fit_custom(|ps| {
        let sgd = || Sgd::from_store(ps, SgdConfig::default());
        Ok(vec![
            OptimizerConfig::new(sgd()?),
            OptimizerConfig::new(sgd()?),
        ])
    })
    .unwrap_err();
    assert!(
        matches!(
            &e,
            Error::ParamOwnedTwice {
                first: 0,
                second: 1,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn a_monitored_metric_that_was_never_logged_is_an_error() {
    let e = fit_custom(|ps| {
        let s = StepLR::new(vec![0.1], 1, 0.5)?;
        Ok(vec![OptimizerConfig::new(Sgd::from_store(
            ps,
            SgdConfig::default(),
        )?)
        .with_scheduler(
            SchedulerConfig::per_epoch(s).monitor("val_nope"),
        )])
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::MetricNotLogged { metric, .. } if metric == "val_nope"),
        "{e}"
    );
}

// ---- callback requests: save, retention after commit, stop ----

/// Requests a named save at step 3, deletes the step-2 built-in checkpoint once a
/// later one has committed, and stops at step 5.
struct Requester {
    saved: Vec<String>,
}

impl Callback for Requester {
    fn state_key(&self) -> String {
        "requester".into()
    }
    fn on_train_batch_end(&mut self, ctx: &mut HookCtx<'_>, boundary: bool) -> Result<()> {
        match (boundary, ctx.progress.global_step) {
            (true, 3) => ctx.save_checkpoint("named-at-3", BTreeMap::from([("score".into(), 0.5)])),
            (true, 5) => ctx.stop("enough"),
            _ => {}
        }
        Ok(())
    }
    fn on_save_checkpoint(
        &mut self,
        ctx: &mut HookCtx<'_>,
        saved: &relume::callbacks::SavedCheckpoint,
    ) -> Result<()> {
        // Retention: the step-2 checkpoint must still exist here (deletions run
        // only after this commit), and is deleted once "named-at-3" committed.
        self.saved.push(saved.name.clone());
        if saved.name == "named-at-3" {
            assert!(ctx.run_dir.join("checkpoints/step=000002-epoch=0").is_dir());
            ctx.delete_checkpoint("step=000002-epoch=0");
        }
        Ok(())
    }
}

#[test]
fn callbacks_request_saves_deletions_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec::new(Opt::AdamW);
    let (mut train, val) = loaders(&spec);
    let mut t = Trainer::builder()
        .max_epochs(3)
        .checkpoint_every_n_steps(2)
        .default_root_dir(dir.path())
        .enable_progress_bar(false)
        .callback(Box::new(Requester { saved: Vec::new() }))
        .build()
        .unwrap();
    let out = t
        .fit(&mut Tiny::new(&spec).unwrap(), &mut train, Some(&val))
        .unwrap();
    let FitOutcome::Stopped { summary, reason } = &out else {
        panic!("{out:?}")
    };
    assert_eq!((summary.global_step, reason.as_str()), (5, "enough"));
    let ck = dir.path().join("checkpoints");
    assert!(!ck.join("step=000002-epoch=0").exists(), "retention ran");
    let named = relume_ckpt::load(ck.join("named-at-3")).unwrap();
    assert_eq!(named.manifest.metrics.get("score"), Some(&0.5));
    assert!(ck.join("step=000004-epoch=0").is_dir());
    // The stop saved at its own step boundary, and `latest` points there.
    let latest = relume_ckpt::CheckpointDir::open_read_only(dir.path())
        .unwrap()
        .latest()
        .unwrap();
    assert_eq!(latest, Some(ck.join("step=000005-epoch=0")));
}
