//! Preemption and async checkpointing through the trainer.
//!
//! - SIGTERM sent from outside to a child training process mid-epoch (twice):
//!   it exits with `PREEMPTED_EXIT_CODE` after committing a checkpoint, and a
//!   resume in a fresh process ends byte-identical to an uninterrupted run.
//! - A checkpoint written asynchronously holds the same state as one written
//!   synchronously, and resuming from either ends byte-identical.
//! - An async write failure (injected storage failing from the second save on)
//!   is reported at a step boundary naming that checkpoint; the earlier one
//!   stays on disk and verifies; `latest`, `best` and `last` name existing
//!   checkpoints.

mod cb_common;

use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::time::Duration;

use cb_common::*;
use relume::callbacks::{Callback, HookCtx, SavedCheckpoint};
use relume::preempt::Preemption;
use relume::{Error, Result};
use relume_ckpt::{FaultyStorage, LocalStorage};

#[test]
fn child() {
    child_main();
}

fn latest_progress(dir: &std::path::Path) -> (u64, u64) {
    let latest = ckdir(dir)
        .latest()
        .unwrap()
        .expect("a committed checkpoint");
    assert!(relume_ckpt::verify(&latest).is_ok(), "{latest:?}");
    let m = relume_ckpt::load(&latest).unwrap().manifest.progress;
    (
        m["global_step"].as_u64().unwrap(),
        m["batch_in_epoch"].as_u64().unwrap(),
    )
}

#[test]
fn sigterm_mid_epoch_exits_75_and_resumes_byte_identical() {
    let _serial = serial();
    let reference = tempfile::tempdir().unwrap();
    let spec = Spec::default();
    run(
        &Spec {
            resume: false,
            ..spec.clone()
        },
        reference.path(),
    )
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let slow = Spec {
        sleep_ms: 25,
        ..spec.clone()
    };
    let mut child = command(&slow, dir.path()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let pid = child.id() as libc::pid_t;
    // Keep reading to the end: the child must never write into a closed pipe.
    for line in BufReader::new(stdout).lines() {
        if line.unwrap().trim() == "STEP 12" {
            // Twice: the second arrives while the first is being honoured.
            for _ in 0..2 {
                // SAFETY: kill(2) on our own child's pid.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(relume::PREEMPTED_EXIT_CODE),
        "{status:?}"
    );
    let (step, batch) = latest_progress(dir.path());
    assert!((12..48).contains(&step), "saved at step {step}");
    assert!(batch > 0 || step % 8 == 0, "step {step}, batch {batch}");
    assert!(ckdir(dir.path()).temporaries().unwrap().is_empty());

    let (code, outcome) = spawn(&spec, dir.path());
    assert_eq!((code, outcome.as_str()), (0, "completed@48"));
    assert_identical(reference.path(), dir.path());
}

#[test]
fn async_and_sync_saves_hold_the_same_state_and_resume_identically() {
    let _serial = serial();
    let reference = tempfile::tempdir().unwrap();
    let spec = Spec::default();
    run(
        &Spec {
            resume: false,
            ..spec.clone()
        },
        reference.path(),
    )
    .unwrap();

    let a = tempfile::tempdir().unwrap();
    let s = tempfile::tempdir().unwrap();
    let cut = |async_ckpt| Spec {
        term_at: Some(13),
        async_ckpt,
        ..spec.clone()
    };
    assert_eq!(spawn(&cut(true), a.path()).0, PREEMPTED);
    assert_eq!(spawn(&cut(false), s.path()).0, PREEMPTED);
    assert_eq!(latest_progress(a.path()), (13, 5));
    assert_identical(a.path(), s.path());

    // Resume each the other way round.
    let (code, out) = spawn(
        &Spec {
            async_ckpt: false,
            ..spec.clone()
        },
        a.path(),
    );
    assert_eq!((code, out.as_str()), (0, "completed@48"));
    let (code, out) = spawn(
        &Spec {
            async_ckpt: true,
            ..spec.clone()
        },
        s.path(),
    );
    assert_eq!((code, out.as_str()), (0, "completed@48"));
    assert_identical(reference.path(), a.path());
    assert_identical(reference.path(), s.path());
}

/// Makes every write fail once the first checkpoint has committed.
struct FailAfterFirstSave {
    storage: FaultyStorage<LocalStorage>,
}

impl Callback for FailAfterFirstSave {
    fn state_key(&self) -> String {
        "fail_after_first_save".into()
    }
    fn on_save_checkpoint(
        &mut self,
        _ctx: &mut HookCtx<'_>,
        _saved: &SavedCheckpoint,
    ) -> Result<()> {
        self.storage.fail_after_bytes(0);
        Ok(())
    }
}

#[test]
fn async_write_failure_names_the_checkpoint_and_keeps_the_previous() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let storage = FaultyStorage::new(LocalStorage);
    let spec = Spec {
        top_k: Some(2),
        save_last: true,
        async_ckpt: true,
        resume: false,
        ..Spec::default()
    };
    let mut t = builder(&spec, dir.path(), Arc::new(Preemption::manual()))
        .unwrap()
        .checkpoint_storage(Arc::new(storage.clone()))
        .callback(Box::new(FailAfterFirstSave { storage }))
        .build()
        .unwrap();
    let mut module = Tiny::new().unwrap();
    let (mut train, val) = loaders();
    let e = t.fit(&mut module, &mut train, Some(&val)).unwrap_err();
    let Error::Ckpt(relume_ckpt::Error::AsyncSaveFailed { checkpoint, .. }) = &e else {
        panic!("{e}")
    };
    assert!(checkpoint.starts_with("epoch=1-step=016-"), "{e}");
    assert!(e.to_string().contains(checkpoint.as_str()));

    let names = checkpoint_names(dir.path());
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("epoch=0-step=008-"), "{names:?}");
    let latest = ckdir(dir.path()).latest().unwrap().unwrap();
    assert!(relume_ckpt::verify(&latest).is_ok());
    assert_eq!(latest.file_name().unwrap().to_string_lossy(), names[0]);
    // best and last in the surviving checkpoint's state name existing checkpoints
    let mc = mc_state(dir.path());
    let last: String = mc.require_value("last").unwrap();
    assert_eq!(last, names[0]);
    assert_eq!(best_name(dir.path()), names[0]);
    assert!(ckdir(dir.path()).temporaries().unwrap().is_empty());
}
