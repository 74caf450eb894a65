//! One test per hole of issue #7 that the trainer can fall into: each failed on
//! the main of before the fix (a silent fresh start, a wedged rerun, a silently
//! overwritten model, a run that trains nothing, a dangling `best`, or a resumed
//! state that differs from the uninterrupted one).

mod cb_common;

use std::path::Path;

use candle_core::{Device, Tensor};
use cb_common::*;
use relume::callbacks::{Mode, ModelCheckpoint};
use relume::nn::Linear;
use relume::optim::{AdamConfig, AdamW, Sgd, SgdConfig};
use relume::params::ParamStore;
use relume::rng::Rng;
use relume::trainer::{
    FitOutcome, LogOpts, OptimizerConfig, ResumePolicy, Source, StepCtx, TrainModule, Trainer,
};
use relume::{Error, Result};
use relume_ckpt::Stateful;

#[test]
fn child() {
    child_main();
}

fn step_of(o: &FitOutcome) -> u64 {
    o.summary().global_step
}

// ---- `latest` is a hint: a run with checkpoints never starts fresh ----

#[test]
fn a_missing_latest_resumes_instead_of_starting_fresh() {
    let _serial = serial();
    let reference = tempfile::tempdir().unwrap();
    run(&Spec::default(), reference.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let two = Spec {
        max_epochs: 2,
        ..Spec::default()
    };
    run(&two, dir.path()).unwrap();
    std::fs::remove_file(dir.path().join("checkpoints/latest")).unwrap();
    let out = run(&Spec::default(), dir.path()).unwrap();
    let resumed = out.summary().resumed_from.clone();
    assert!(
        resumed
            .as_ref()
            .is_some_and(|p| p.ends_with("step=000016-epoch=2")),
        "{out:?}"
    );
    assert_identical(reference.path(), dir.path());
}

#[test]
fn a_latest_left_behind_resumes_from_the_newest_checkpoint() {
    let _serial = serial();
    let reference = tempfile::tempdir().unwrap();
    run(&Spec::default(), reference.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    run(
        &Spec {
            max_epochs: 3,
            ..Spec::default()
        },
        dir.path(),
    )
    .unwrap();
    // As a kill between the rename of step 24 and the update of `latest` leaves it.
    std::fs::write(
        dir.path().join("checkpoints/latest"),
        "step=000016-epoch=2\n",
    )
    .unwrap();
    let out = run(&Spec::default(), dir.path()).unwrap();
    assert!(
        out.summary()
            .resumed_from
            .as_ref()
            .is_some_and(|p| p.ends_with("step=000024-epoch=3")),
        "{out:?}"
    );
    assert_identical(reference.path(), dir.path());
}

#[test]
fn a_rerun_after_the_pointer_update_failed_does_not_wedge() {
    let _serial = serial();
    let reference = tempfile::tempdir().unwrap();
    run(&Spec::default(), reference.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The first save's `latest` rename fails (a full disk there did this): the
    // checkpoint is committed, `latest` is behind, the run stops with an error.
    let e = run(
        &Spec {
            fail_save_of: Some("latest".into()),
            ..Spec::default()
        },
        dir.path(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("latest"), "{e}");
    assert!(dir
        .path()
        .join("checkpoints/step=000008-epoch=1/manifest.json")
        .is_file());
    // Every rerun used to replay to step 8 and die with "already exists".
    let out = run(&Spec::default(), dir.path()).unwrap();
    assert!(matches!(out, FitOutcome::Completed(_)), "{out:?}");
    assert_identical(reference.path(), dir.path());
}

// ---- resume sources ----

fn trainer_with(dir: &Path, policy: ResumePolicy) -> Trainer {
    Trainer::builder()
        .max_epochs(2)
        .seed(11)
        .default_root_dir(dir)
        .enable_progress_bar(false)
        .resume(policy)
        .build()
        .unwrap()
}

#[test]
fn a_typo_in_a_source_path_is_an_error_under_every_policy() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    run(&Spec::default(), dir.path()).unwrap();
    let typo = dir.path().join("checkpoints/step=000048-epoch=6-typo");
    for policy in [
        ResumePolicy::IfExists(Source::Path(typo.clone())),
        ResumePolicy::Required(Source::Path(typo.clone())),
    ] {
        let mut t = trainer_with(dir.path(), policy);
        let (mut train, val) = loaders();
        let e = t
            .fit(&mut Tiny::new().unwrap(), &mut train, Some(&val))
            .unwrap_err();
        assert!(
            matches!(&e, Error::CheckpointPathMissing { path } if *path == typo),
            "{e}"
        );
        assert!(e.to_string().contains("typo"), "{e}");
    }
}

// ---- restore is all or nothing ----

/// A one-layer module whose optimizer, gradients and parameter store are chosen by
/// the test.
struct Probe {
    params: ParamStore,
    l1: Linear,
    sgd: bool,
    foreign: bool,
    detached: bool,
}

impl Probe {
    fn new() -> Result<Self> {
        let params = ParamStore::new(Device::Cpu);
        let l1 = Linear::new(&params, "l1", 4, 3, &mut Rng::new(7, "init"))?;
        Ok(Probe {
            params,
            l1,
            sgd: false,
            foreign: false,
            detached: false,
        })
    }
}

impl TrainModule for Probe {
    type Batch = (Tensor, Tensor);
    fn params(&self) -> &ParamStore {
        &self.params
    }
    fn training_step(&mut self, (x, y): Self::Batch, ctx: &mut StepCtx<'_>) -> Result<Tensor> {
        let mut logits = self.l1.forward(&x)?;
        if self.detached {
            logits = logits.detach();
        }
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        ctx.log_tensor("train_loss", &loss, LogOpts::new().on_epoch(true))?;
        Ok(loss)
    }
    fn validation_step(&mut self, (x, y): Self::Batch, ctx: &mut StepCtx<'_>) -> Result<()> {
        let loss = candle_nn::loss::cross_entropy(&self.l1.forward(&x)?, &y)?;
        ctx.log_tensor("val_loss", &loss, LogOpts::new())?;
        Ok(())
    }
    fn configure_optimizers(&self) -> Result<Vec<OptimizerConfig>> {
        let store = if self.foreign {
            // The same names, other variables (a copy of the model, a VarMap...).
            let other = ParamStore::new(Device::Cpu);
            Linear::new(&other, "l1", 4, 3, &mut Rng::new(7, "init"))?;
            other
        } else {
            self.params.clone()
        };
        Ok(vec![if self.sgd {
            OptimizerConfig::new(Sgd::from_store(&store, SgdConfig::default())?)
        } else {
            OptimizerConfig::new(AdamW::from_store(&store, AdamConfig::adamw())?)
        }])
    }
}

fn fit_probe(
    dir: &Path,
    probe: &mut Probe,
    b: relume::trainer::TrainerBuilder,
) -> Result<FitOutcome> {
    let mut t = b
        .max_epochs(2)
        .seed(11)
        .default_root_dir(dir)
        .enable_progress_bar(false)
        .build()?;
    let (mut train, val) = loaders();
    t.fit(probe, &mut train, Some(&val))
}

#[test]
fn a_failed_restore_leaves_the_live_model_untouched() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    fit_probe(dir.path(), &mut Probe::new().unwrap(), Trainer::builder()).unwrap();
    // Resume with another optimizer: the config is overridden, so the failure comes
    // from the optimizer's state, after the model's weights were (until the fix)
    // already written into the caller's model.
    let mut probe = Probe {
        sgd: true,
        ..Probe::new().unwrap()
    };
    let before = relume_ckpt::fingerprint_state_dict(&probe.params.state_dict().unwrap());
    let e = fit_probe(
        dir.path(),
        &mut probe,
        Trainer::builder()
            .max_epochs(3)
            .resume(ResumePolicy::Required(Source::Last))
            .override_config("optimizers"),
    )
    .unwrap_err();
    assert!(matches!(e, Error::RestoreIncomplete { .. }), "{e}");
    let after = relume_ckpt::fingerprint_state_dict(&probe.params.state_dict().unwrap());
    assert_eq!(
        before, after,
        "the failed restore changed the caller's model"
    );
}

// ---- no silent no-op training ----

#[test]
fn an_optimizer_over_foreign_variables_is_refused() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut probe = Probe {
        foreign: true,
        ..Probe::new().unwrap()
    };
    let e = fit_probe(dir.path(), &mut probe, Trainer::builder()).unwrap_err();
    match &e {
        Error::ForeignParams {
            optimizer, params, ..
        } => {
            assert_eq!(*optimizer, 0);
            assert_eq!(
                params,
                &vec!["l1.bias".to_string(), "l1.weight".to_string()]
            );
        }
        other => panic!("{other}"),
    }
    assert!(
        relume_ckpt::CheckpointDir::open_read_only(dir.path())
            .map_or(true, |d| d.list().unwrap().is_empty()),
        "nothing may be saved"
    );
}

#[test]
fn a_step_without_any_gradient_is_an_error_unless_allowed() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut probe = Probe {
        detached: true,
        ..Probe::new().unwrap()
    };
    let e = fit_probe(dir.path(), &mut probe, Trainer::builder()).unwrap_err();
    assert!(
        matches!(
            &e,
            Error::NoGradients {
                optimizer: 0,
                step: 1,
                ..
            }
        ),
        "{e}"
    );
    let other = tempfile::tempdir().unwrap();
    let out = fit_probe(
        other.path(),
        &mut probe,
        Trainer::builder().allow_steps_without_gradients(true),
    )
    .unwrap();
    assert_eq!(step_of(&out), 16);
}

// ---- ModelCheckpoint ----

#[test]
fn a_monitor_that_is_never_logged_is_an_error_with_and_without_validation() {
    let _serial = serial();
    let mc = || Box::new(ModelCheckpoint::new().monitor("val_acc", Mode::Max));
    // With validation: known once validation has run.
    let dir = tempfile::tempdir().unwrap();
    let e = fit_probe(
        dir.path(),
        &mut Probe::new().unwrap(),
        Trainer::builder().callback(mc()),
    )
    .unwrap_err();
    match &e {
        Error::MonitorNeverLogged { metric, logged, .. } => {
            assert_eq!(metric, "val_acc");
            assert!(logged.contains(&"val_loss".to_string()), "{e}");
        }
        other => panic!("{other}"),
    }
    // Without validation: known at the end of the first epoch.
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::builder()
        .max_epochs(2)
        .default_root_dir(dir.path())
        .enable_progress_bar(false)
        .callback(mc())
        .build()
        .unwrap();
    let (mut train, _) = loaders();
    let e = t
        .fit(&mut Probe::new().unwrap(), &mut train, None)
        .unwrap_err();
    assert!(
        matches!(&e, Error::MonitorNeverLogged { metric, logged, .. }
            if metric == "val_acc" && logged.iter().any(|l| l.starts_with("train_loss"))),
        "{e}"
    );
}

fn top_k(async_ckpt: bool) -> Spec {
    Spec {
        top_k: Some(2),
        save_last: true,
        every_n_steps: Some(8),
        async_ckpt,
        ..Spec::default()
    }
}

/// After a run whose second save at one boundary failed, `latest` (resolved as a
/// resume would) must not record a `best` that never committed, and the rerun
/// must finish as the uninterrupted run did.
fn failed_second_save_leaves_no_dangling_best(async_ckpt: bool) {
    let _serial = serial();
    let reference = tempfile::tempdir().unwrap();
    run(&top_k(async_ckpt), reference.path()).unwrap();
    // The name of the top-k save at step 16 (evicted later in the full run).
    let two = tempfile::tempdir().unwrap();
    run(
        &Spec {
            max_epochs: 2,
            ..top_k(async_ckpt)
        },
        two.path(),
    )
    .unwrap();
    let names = checkpoint_names(two.path());
    let second = names
        .iter()
        .find(|n| n.starts_with("epoch=1-step=016"))
        .expect("the top-k save at step 16")
        .clone();
    let dir = tempfile::tempdir().unwrap();
    let e = run(
        &Spec {
            fail_save_of: Some(second.clone()),
            ..top_k(async_ckpt)
        },
        dir.path(),
    )
    .unwrap_err();
    assert!(e.to_string().contains(&second), "{e}");
    // The boundary's built-in save committed; its state names `second` as best.
    assert!(dir
        .path()
        .join("checkpoints/step=000016-epoch=2/manifest.json")
        .is_file());
    let latest = ckdir(dir.path()).latest().unwrap().unwrap();
    let step = relume_ckpt::load(&latest).unwrap().manifest.step();
    assert_eq!(step, Some(8), "{}", latest.display());
    let best = best_name(dir.path());
    assert!(
        dir.path()
            .join("checkpoints")
            .join(&best)
            .join("manifest.json")
            .is_file(),
        "best {best} does not exist"
    );
    // `Source::Best` resolves to a committed checkpoint, and the rerun finishes.
    run(&top_k(async_ckpt), dir.path()).unwrap();
    assert_identical(reference.path(), dir.path());
    assert_eq!(
        checkpoint_names(reference.path()),
        checkpoint_names(dir.path())
    );
}

#[test]
fn a_failed_second_save_at_one_boundary_leaves_no_dangling_best_sync() {
    failed_second_save_leaves_no_dangling_best(false);
}

#[test]
fn a_failed_second_save_at_one_boundary_leaves_no_dangling_best_async() {
    failed_second_save_leaves_no_dangling_best(true);
}

#[test]
fn preemption_with_a_monitored_model_checkpoint_ends_byte_identical() {
    let _serial = serial();
    let spec = Spec {
        top_k: Some(1),
        save_last: true,
        ..Spec::default()
    };
    let reference = tempfile::tempdir().unwrap();
    run(&spec, reference.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (code, _) = spawn(
        &Spec {
            term_at: Some(16),
            ..spec.clone()
        },
        dir.path(),
    );
    assert_eq!(code, PREEMPTED);
    let (code, outcome) = spawn(&spec, dir.path());
    assert_eq!((code, outcome.as_str()), (0, "completed@48"));
    // Callback state included (`pending_deletes` differed before the fix).
    assert_identical(reference.path(), dir.path());
    assert_eq!(mc_state(reference.path()), mc_state(dir.path()));
    // The files differ by design: the checkpoint saved at the preemption is kept
    // (it is what the run resumed from, and ModelCheckpoint does not own it).
}

#[test]
fn clearing_a_run_another_process_is_training_in_is_refused() {
    use std::io::BufRead;
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec {
        max_epochs: 2,
        // Long enough that the child outlives the lock wait (`LOCK_WAIT`, 500 ms).
        sleep_ms: 200,
        ..Spec::default()
    };
    let mut child = command(&spec, dir.path()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    // Wait until the child trains past its first checkpoint.
    for line in lines.by_ref() {
        if line.unwrap().starts_with("STEP 10") {
            break;
        }
    }
    // `--fresh` (CheckpointDir::open, then clear) cannot even start: the lock is held.
    let e = relume_ckpt::CheckpointDir::open(dir.path()).unwrap_err();
    assert!(matches!(e, relume_ckpt::Error::Locked { .. }), "{e}");
    assert!(e.to_string().contains("another process"), "{e}");
    for _ in lines.by_ref() {}
    assert!(child.wait().unwrap().success());
    assert_eq!(
        checkpoint_names(dir.path()),
        vec!["step=000008-epoch=1", "step=000016-epoch=2"]
    );
}

// ---- an eviction interrupted twice is still carried out ----

/// Copies the directory `from` (files and subdirectories) to `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// A run killed between a save's commit and the deletion of the checkpoint that
/// save evicted, resumed, and killed again before its next save: the evicted
/// checkpoint must still go. The resume carries the interrupted deletion out at
/// once; before, it waited for the next save, whose state no longer listed it, so
/// the second kill left it behind for good.
#[test]
fn an_eviction_interrupted_twice_is_still_carried_out() {
    let _serial = serial();
    let spec = |max_epochs| Spec {
        top_k: Some(1),
        max_epochs,
        ..Spec::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let per_epoch = step_of(&run(&spec(1), dir.path()).unwrap());
    let names = checkpoint_names(dir.path());
    let first = names
        .iter()
        .find(|n| n.starts_with("epoch=0-"))
        .unwrap_or_else(|| panic!("no top-k save of epoch 0: {names:?}"))
        .clone();
    let evicted = dir.path().join("checkpoints").join(&first);
    let kept_aside = tempfile::tempdir().unwrap();
    copy_dir(&evicted, kept_aside.path());
    // The second epoch's better checkpoint evicts the first.
    run(&spec(2), dir.path()).unwrap();
    assert!(
        !evicted.exists(),
        "the second epoch did not evict {first}: {:?}",
        checkpoint_names(dir.path())
    );
    // As if killed after the second save committed, before its deletion.
    copy_dir(kept_aside.path(), &evicted);
    assert!(relume_ckpt::is_committed(&evicted).unwrap());
    // Resumed, then killed before its next save.
    let (code, _) = spawn(
        &Spec {
            kill_at: Some(2 * per_epoch + 1),
            ..spec(3)
        },
        dir.path(),
    );
    assert_eq!(code, -libc::SIGKILL, "the kill did not land");
    assert!(
        !evicted.exists(),
        "{first} is still there after the resume: {:?}",
        checkpoint_names(dir.path())
    );
    // And the rerun finishes.
    run(&spec(3), dir.path()).unwrap();
    assert!(!evicted.exists());
    let names = checkpoint_names(dir.path());
    assert_eq!(
        names.iter().filter(|n| n.starts_with("epoch=")).count(),
        1,
        "top-k 1 keeps one: {names:?}"
    );
}
