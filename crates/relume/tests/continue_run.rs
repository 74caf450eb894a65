//! Training longer (issue #8, A.1): raising `max_epochs` continues a run; a schedule
//! sized to the run's length follows only with the explicit
//! `TrainerBuilder::extend_schedules`; a smaller `max_epochs` than the run already
//! reached is "nothing to do", not a config error.

mod cb_common;

use std::path::Path;

use candle_core::{Device, Tensor};
use cb_common::*;
use relume::nn::Linear;
use relume::optim::{AdamConfig, AdamW};
use relume::params::ParamStore;
use relume::rng::Rng;
use relume::sched::CosineAnnealingLR;
use relume::trainer::{
    FitOutcome, LogOpts, OptimizerConfig, ResumePolicy, SchedulerConfig, Source, StepCtx,
    TrainModule, Trainer,
};
use relume::{Error, Result};

#[test]
fn child() {
    child_main();
}

#[test]
fn a_length_independent_schedule_continued_equals_the_longer_run() {
    let _serial = serial();
    // cb_common's schedule (warmup, then a cosine of fixed length) does not depend on
    // max_epochs: 3 epochs continued to 6 equal 6 epochs, with extend_schedules on.
    let long = tempfile::tempdir().unwrap();
    run(&Spec::default(), long.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    run(
        &Spec {
            max_epochs: 3,
            ..Spec::default()
        },
        dir.path(),
    )
    .unwrap();
    let mut t = builder(
        &Spec::default(),
        dir.path(),
        std::sync::Arc::new(relume::preempt::Preemption::manual()),
    )
    .unwrap()
    .extend_schedules(true)
    .build()
    .unwrap();
    let (mut train, val) = loaders();
    let out = t
        .fit(&mut Tiny::new().unwrap(), &mut train, Some(&val))
        .unwrap();
    assert!(
        matches!(out, FitOutcome::Completed(ref s) if s.global_step == 48),
        "{out:?}"
    );
    assert_identical(long.path(), dir.path());
}

/// A cosine over every step of the run, as the digits job has.
struct Sized {
    params: ParamStore,
    l1: Linear,
    total_steps: u64,
}

impl Sized {
    fn new(max_epochs: u64) -> Self {
        let params = ParamStore::new(Device::Cpu);
        let l1 = Linear::new(&params, "l1", 4, 3, &mut Rng::new(7, "init")).unwrap();
        Sized {
            params,
            l1,
            total_steps: 8 * max_epochs,
        }
    }
}

impl TrainModule for Sized {
    type Batch = (Tensor, Tensor);
    fn params(&self) -> &ParamStore {
        &self.params
    }
    fn training_step(&mut self, (x, y): Self::Batch, ctx: &mut StepCtx<'_>) -> Result<Tensor> {
        let loss = candle_nn::loss::cross_entropy(&self.l1.forward(&x)?, &y)?;
        ctx.log_tensor("train_loss", &loss, LogOpts::new())?;
        Ok(loss)
    }
    fn configure_optimizers(&self) -> Result<Vec<OptimizerConfig>> {
        let opt = AdamW::from_store(&self.params, AdamConfig::adamw())?;
        let cos = CosineAnnealingLR::new(vec![1e-3], self.total_steps, 1e-5)?;
        Ok(vec![
            OptimizerConfig::new(opt).with_scheduler(SchedulerConfig::per_step(cos))
        ])
    }
}

fn fit_sized(dir: &Path, max_epochs: u64, extend: bool) -> Result<FitOutcome> {
    let mut t = Trainer::builder()
        .max_epochs(max_epochs)
        .seed(11)
        .default_root_dir(dir)
        .enable_progress_bar(false)
        .resume(ResumePolicy::IfExists(Source::Last))
        .extend_schedules(extend)
        .build()?;
    let (mut train, _) = loaders();
    t.fit(&mut Sized::new(max_epochs), &mut train, None)
}

fn final_lr(dir: &Path) -> f64 {
    let c = final_components(dir);
    let lrs = c["scheduler.0"].get_json("lrs").unwrap().clone();
    // Rates are stored exactly, as decimal strings.
    match &lrs[0] {
        serde_json::Value::String(s) => s.parse().unwrap(),
        v => v.as_f64().unwrap(),
    }
}

#[test]
fn a_length_dependent_schedule_follows_only_with_extend_schedules() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    fit_sized(dir.path(), 2, false).unwrap();
    let lr_at_end = final_lr(dir.path());
    // Refused by default, naming the setting and the API call that allows it.
    let e = fit_sized(dir.path(), 4, false).unwrap_err();
    assert!(e.config_change_is_schedule(), "{e}");
    assert!(
        matches!(&e, Error::ConfigChanged { key, fix, .. }
        if key.starts_with("schedulers.0") && fix.contains("extend_schedules(true)")),
        "{e}"
    );
    // The same change without training longer is not a continuation.
    let e = fit_sized(dir.path(), 2, true);
    assert!(matches!(e, Ok(FitOutcome::AlreadyFinished(_))), "{e:?}");
    // Allowed: the counters and rate are restored, the new length applies from here.
    let out = fit_sized(dir.path(), 4, true).unwrap();
    assert!(
        matches!(out, FitOutcome::Completed(ref s) if s.global_step == 32),
        "{out:?}"
    );
    let c = final_components(dir.path());
    assert_eq!(
        c["scheduler.0"].get_json("last_epoch").unwrap().as_u64(),
        Some(32)
    );
    // At the old end the cosine had reached its minimum. Following the longer
    // schedule from where it stands (torch's chainable form, as if T_max were raised
    // in place) it stays there: no jump back to the base rate at the resume.
    assert!((lr_at_end - 1e-5).abs() < 1e-12, "{lr_at_end}");
    assert!(
        (final_lr(dir.path()) - lr_at_end).abs() < 1e-12,
        "{}",
        final_lr(dir.path())
    );
}

#[test]
fn a_smaller_max_epochs_than_the_run_reached_is_nothing_to_do() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    fit_sized(dir.path(), 3, false).unwrap();
    // The schedule's length differs too (it follows max_epochs): still no error,
    // since nothing is left to train.
    let out = fit_sized(dir.path(), 1, false).unwrap();
    match out {
        FitOutcome::AlreadyFinished(s) => {
            assert_eq!((s.global_step, s.epoch), (24, 3));
            assert!(s.metrics.contains_key("train_loss"), "{:?}", s.metrics);
            assert!(s.resumed_from.is_some());
        }
        other => panic!("{other:?}"),
    }
}
