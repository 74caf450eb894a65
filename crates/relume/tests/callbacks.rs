//! Callback contracts across restarts: ModelCheckpoint's top-k after a SIGKILL,
//! EarlyStopping's stop step after a preemption, loggers with one continuous
//! series, and the identity and missing-metric errors.
//!
//! Interrupted runs happen in fresh child processes (this binary re-executed with
//! `RELUME_CB_CHILD`, running only the `child` test), which signal themselves at
//! a chosen step: SIGKILL (no save at all) or SIGTERM (through
//! `relume::preempt::Preemption`: save, flush, exit 75).

mod cb_common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use cb_common::*;
use relume::trainer::FitOutcome;
use relume::Error;

#[test]
fn child() {
    child_main();
}

fn top_k_spec() -> Spec {
    Spec {
        top_k: Some(2),
        lr_monitor: true,
        loggers: true,
        ..Spec::default()
    }
}

/// Reads the TensorBoard event files of `dir` with TensorBoard's own reader.
fn tensorboard_series(dir: &Path) -> Option<BTreeMap<String, Vec<(u64, f64)>>> {
    const SCRIPT: &str = r#"
import json, sys
try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError as e:
    print("MISSING " + str(e))
    sys.exit(3)
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(dir)
        .output()
        .ok()?;
    if out.status.code() == Some(3) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install tensorboard"
        );
        eprintln!("note: tensorboard not installed; skipping the reader check");
        return None;
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn top_k_and_logs_survive_sigkill_and_resume() {
    let _serial = serial();
    let reference = tempfile::tempdir().unwrap();
    let spec = Spec {
        resume: false,
        ..top_k_spec()
    };
    let out = run(&spec, reference.path()).unwrap();
    assert_eq!(describe(&out), "completed@48");

    // Killed at step 29 (epoch 3, after the saves of epochs 0..=2), resumed in a
    // fresh process from `latest`.
    let dir = tempfile::tempdir().unwrap();
    let (code, _) = spawn(
        &Spec {
            kill_at: Some(29),
            ..top_k_spec()
        },
        dir.path(),
    );
    assert_eq!(code, -libc::SIGKILL);
    let resumed_from = ckdir(dir.path()).latest().unwrap().unwrap();
    let resumed_name = resumed_from
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let (code, outcome) = spawn(&top_k_spec(), dir.path());
    assert_eq!((code, outcome.as_str()), (0, "completed@48"));

    // The same checkpoints and the same best: the checkpoint the run resumed
    // from was protected while the run was in progress and, once the top k had
    // dropped it, deleted when the run completed.
    let want = checkpoint_names(reference.path());
    assert_eq!(checkpoint_names(dir.path()), want);
    // two top-k checkpoints plus the trainer's final save
    assert_eq!(want.len(), 3, "{want:?}");
    assert_eq!(best_name(dir.path()), best_name(reference.path()));
    assert!(want.contains(&best_name(reference.path())));
    // The top k dropped the resume source (so its deletion was deferred to the
    // end of the run); the deferred deletion left the state at the boundary where
    // training completed: the final state is identical, byte for byte.
    assert!(!want.contains(&resumed_name), "{resumed_name} in {want:?}");
    assert_eq!(deferred_deletes(dir.path()), Vec::<String>::new());
    assert_identical(reference.path(), dir.path());

    // Logs: the CSV is byte-identical (no duplicated or missing step) ...
    let csv = |d: &Path| std::fs::read_to_string(d.join("logs/metrics.csv")).unwrap();
    assert_eq!(csv(dir.path()), csv(reference.path()));
    assert!(csv(dir.path()).lines().next().unwrap().contains("lr-AdamW"));
    // ... and TensorBoard reads one continuous series per tag.
    if let Some(got) = tensorboard_series(&dir.path().join("logs")) {
        let want = tensorboard_series(&reference.path().join("logs")).unwrap();
        assert_eq!(got, want);
        let steps: Vec<u64> = got["lr-AdamW"].iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, (1..=48).collect::<Vec<_>>());
    }
}

#[test]
fn a_dropped_resume_source_survives_a_preemption_and_goes_when_the_run_completes() {
    let _serial = serial();
    let reference = tempfile::tempdir().unwrap();
    run(
        &Spec {
            resume: false,
            ..top_k_spec()
        },
        reference.path(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kill = Spec {
        kill_at: Some(29),
        ..top_k_spec()
    };
    assert_eq!(spawn(&kill, dir.path()).0, -libc::SIGKILL);
    let source = ckdir(dir.path()).latest().unwrap().unwrap();
    let source_name = source.file_name().unwrap().to_string_lossy().into_owned();
    // The top k drop the resume source before the end of the run.
    assert!(!checkpoint_names(reference.path()).contains(&source_name));
    // Resumed, then preempted (SIGTERM) after the top k dropped it: the run did
    // not complete, so the source is still there, recorded as deferred.
    let term = Spec {
        term_at: Some(45),
        ..top_k_spec()
    };
    assert_eq!(spawn(&term, dir.path()).0, PREEMPTED);
    assert_eq!(deferred_deletes(dir.path()), vec![source_name.clone()]);
    // (the trainer's own preemption save, outside ModelCheckpoint's retention)
    let preempt_save = ckdir(dir.path()).latest().unwrap().unwrap();
    let preempt_name = preempt_save
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        relume_ckpt::verify(&source).is_ok(),
        "kept while not completed"
    );
    // The next run inherits the deferred deletion and carries it out when it
    // completes: the same files and best as the uninterrupted run, plus the
    // preemption save.
    let (code, outcome) = spawn(&top_k_spec(), dir.path());
    assert_eq!((code, outcome.as_str()), (0, "completed@48"));
    assert!(!source.exists());
    let mut want = checkpoint_names(reference.path());
    want.push(preempt_name);
    want.sort();
    assert_eq!(checkpoint_names(dir.path()), want);
    assert_eq!(best_name(dir.path()), best_name(reference.path()));
}

/// The `deferred_deletes` of the final ModelCheckpoint state (empty when absent).
fn deferred_deletes(run: &Path) -> Vec<String> {
    mc_state(run)
        .get_json("deferred_deletes")
        .map(|v| serde_json::from_value(v.clone()).unwrap())
        .unwrap_or_default()
}

#[test]
fn source_best_resumes_from_the_best_checkpoint() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec {
        max_epochs: 3,
        ..top_k_spec()
    };
    run(&spec, dir.path()).unwrap();
    let best = ckdir(dir.path()).path().join(best_name(dir.path()));
    assert!(relume_ckpt::verify(&best).is_ok());
    let out = run(
        &Spec {
            max_epochs: 8,
            resume_best: true,
            ..top_k_spec()
        },
        dir.path(),
    )
    .unwrap();
    assert_eq!(out.summary().resumed_from.as_deref(), Some(best.as_path()));
}

#[test]
fn early_stopping_stops_at_the_same_step_after_preemption() {
    let _serial = serial();
    let es = Spec {
        early_stop: Some((2, 0.01)),
        val_steps: Some(2),
        max_epochs: 20,
        ..Spec::default()
    };
    let reference = tempfile::tempdir().unwrap();
    let out = run(
        &Spec {
            resume: false,
            ..es.clone()
        },
        reference.path(),
    )
    .unwrap();
    let FitOutcome::Stopped { summary, reason } = &out else {
        panic!("early stopping never fired: {out:?}")
    };
    assert!(reason.contains("EarlyStopping"), "{reason}");
    let stop = summary.global_step;
    assert!(stop > 6, "stopped too early to interrupt first: {stop}");

    let dir = tempfile::tempdir().unwrap();
    let (code, outcome) = spawn(
        &Spec {
            term_at: Some(stop - 3),
            ..es.clone()
        },
        dir.path(),
    );
    assert_eq!(code, PREEMPTED, "{outcome}");
    assert_eq!(outcome, format!("interrupted@{}", stop - 3));
    let (code, outcome) = spawn(&es, dir.path());
    assert_eq!((code, outcome), (0, format!("stopped@{stop}")));
    assert_identical(reference.path(), dir.path());
}

#[test]
fn changed_identity_setting_is_a_clear_error() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    run(
        &Spec {
            max_epochs: 1,
            ..top_k_spec()
        },
        dir.path(),
    )
    .unwrap();
    let e = run(
        &Spec {
            max_epochs: 2,
            mc_monitor: "train_loss".into(),
            ..top_k_spec()
        },
        dir.path(),
    )
    .unwrap_err();
    let Error::CallbackIdentityChanged {
        saved_key,
        live_key,
        ..
    } = &e
    else {
        panic!("{e}")
    };
    assert!(saved_key.contains("monitor=val_loss"), "{e}");
    assert!(live_key.contains("monitor=train_loss"), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("unexpected") && msg.contains("missing"),
        "{msg}"
    );
}

#[test]
fn a_missing_monitored_metric_is_an_error_naming_it() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let e = run(
        &Spec {
            max_epochs: 1,
            early_stop: Some((2, 0.0)),
            es_monitor: "val_nope".into(),
            ..Spec::default()
        },
        dir.path(),
    )
    .unwrap_err();
    assert!(
        matches!(&e, Error::MetricNotLogged { metric, needed_by } if metric == "val_nope" && needed_by.starts_with("EarlyStopping")),
        "{e}"
    );
}

#[test]
fn timer_stops_and_lr_monitor_logs_every_step() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut t = builder(
        &Spec {
            loggers: true,
            lr_monitor: true,
            resume: false,
            ..Spec::default()
        },
        dir.path(),
        std::sync::Arc::new(relume::preempt::Preemption::manual()),
    )
    .unwrap()
    .callback(Box::new(relume::Timer::new(std::time::Duration::ZERO)))
    .build()
    .unwrap();
    let mut module = Tiny::new().unwrap();
    let (mut train, val) = loaders();
    let out = t.fit(&mut module, &mut train, Some(&val)).unwrap();
    let FitOutcome::Stopped { summary, reason } = &out else {
        panic!("{out:?}")
    };
    assert_eq!(summary.global_step, 1);
    assert!(reason.starts_with("Timer: max_time"), "{reason}");
    // the stop committed a checkpoint holding the Timer's elapsed time
    let c = final_components(dir.path());
    let timer = c["callbacks"].sub("Timer");
    assert!(timer.require_value::<f64>("elapsed").unwrap() >= 0.0);
    let csv = std::fs::read_to_string(dir.path().join("logs/metrics.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == "lr-AdamW").unwrap();
    let row: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    // the first step used the warm-up's starting rate 0.05 * 0.2
    assert_eq!(row[col].parse::<f64>().unwrap(), 0.05 * 0.2);
}

/// Requests the deletion of a checkpoint that does not exist.
struct DeleteGhost;

impl relume::Callback for DeleteGhost {
    fn state_key(&self) -> String {
        "delete_ghost".into()
    }
    fn on_fit_start(&mut self, ctx: &mut relume::HookCtx<'_>) -> relume::Result<()> {
        ctx.delete_checkpoint("epoch=9-step=999-val_loss=0.1");
        Ok(())
    }
}

#[test]
fn deleting_an_already_deleted_checkpoint_is_a_no_op() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut t = builder(
        &Spec {
            max_epochs: 1,
            ..Spec::default()
        },
        dir.path(),
        std::sync::Arc::new(relume::preempt::Preemption::manual()),
    )
    .unwrap()
    .callback(Box::new(DeleteGhost))
    .build()
    .unwrap();
    let (mut train, val) = loaders();
    let out = t
        .fit(&mut Tiny::new().unwrap(), &mut train, Some(&val))
        .unwrap();
    assert_eq!(describe(&out), "completed@8");
}

/// `max_steps` reached mid-epoch (8 batches per epoch, stop at 11) stops exactly
/// there: the last checkpoint is at step 11 and no later step ran. Raising
/// `max_steps` and resuming continues from the mid-epoch cursor to the same final
/// state as one uninterrupted run.
#[test]
fn max_steps_mid_epoch_stops_exactly_and_continues() {
    let _g = serial();
    let fit_to = |dir: &Path, max_steps: u64, resume: bool| {
        let spec = Spec {
            max_epochs: 100,
            resume,
            ..Spec::default()
        };
        let mut t = builder(
            &spec,
            dir,
            std::sync::Arc::new(relume::Preemption::manual()),
        )
        .unwrap()
        .max_steps(max_steps)
        .build()
        .unwrap();
        let mut module = Tiny::new().unwrap();
        let (mut train, val) = loaders();
        t.fit(&mut module, &mut train, Some(&val)).unwrap()
    };
    let split = tempfile::tempdir().unwrap();
    let out = fit_to(split.path(), 11, false);
    assert_eq!(describe(&out), "completed@11");
    assert_eq!(
        checkpoint_names(split.path()),
        ["step=000008-epoch=1", "step=000011-epoch=1"],
        "the run stopped at max_steps, mid-epoch"
    );
    let out = fit_to(split.path(), 20, true);
    assert_eq!(describe(&out), "completed@20");

    let whole = tempfile::tempdir().unwrap();
    assert_eq!(describe(&fit_to(whole.path(), 20, false)), "completed@20");
    assert_eq!(
        checkpoint_names(whole.path()),
        [
            "step=000008-epoch=1",
            "step=000016-epoch=2",
            "step=000020-epoch=2"
        ]
    );
    assert_identical(split.path(), whole.path());
}

#[test]
fn metrics_csv_has_an_epoch_column_as_lightning_writes_it() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    run(
        &Spec {
            max_epochs: 2,
            loggers: true,
            lr_monitor: true,
            ..Spec::default()
        },
        dir.path(),
    )
    .unwrap();
    let text = std::fs::read_to_string(dir.path().join("logs/metrics.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("no {name} column in {header:?}"))
    };
    let (step, epoch, lr) = (col("step"), col("epoch"), col("lr-AdamW"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    for r in &rows {
        let s: u64 = r[step].parse().unwrap();
        let e: f64 = r[epoch].parse().unwrap();
        // 8 steps per epoch; the epoch-end row of step 8 still belongs to epoch 0.
        assert_eq!(e as u64, (s - 1) / 8, "step {s}: {r:?}");
    }
    assert!(rows.iter().any(|r| !r[lr].is_empty()), "{text}");
}
