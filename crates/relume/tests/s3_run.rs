//! The Trainer with an `s3://` run directory: killed, preempted and resumed from the
//! bucket, it ends byte-identical to a local uninterrupted run, with sync and with
//! async saves, with ModelCheckpoint retention deleting from the bucket.
//!
//! The bucket is the local S3 server's that `.ci/run` starts (`RELUME_S3_TEST_BUCKET`
//! and the `AWS_*` variables). Without it the cross-process tests are skipped with
//! a loud message, except under CI (`CI` set), where they fail; the in-process test
//! runs against an in-memory store always.
#![cfg(feature = "s3")]

mod cb_common;
mod support;

use std::path::PathBuf;
use std::sync::Arc;

use cb_common::*;

#[test]
fn child() {
    child_main();
}

/// A fresh run URL in the test bucket, or `None` (loudly) when there is none.
fn s3_run(tag: &str) -> Option<PathBuf> {
    let b = relume_ckpt::remote::test_bucket()?;
    Some(PathBuf::from(format!(
        "s3://{b}/trainer-{tag}-{}",
        uuid::Uuid::new_v4().simple()
    )))
}

fn spec(async_ckpt: bool) -> Spec {
    Spec {
        max_epochs: 4,
        top_k: Some(2),
        save_last: true,
        every_n_steps: Some(5),
        async_ckpt,
        ..Spec::default()
    }
}

/// Kill (SIGKILL at step 7), preempt (SIGTERM at step 19), resume to the end; the
/// final checkpoint equals a local uninterrupted run's, and so do the names kept.
fn kill_preempt_resume(async_ckpt: bool) {
    let _serial = serial();
    let Some(run) = s3_run(if async_ckpt { "async" } else { "sync" }) else {
        return;
    };
    let local = tempfile::tempdir().unwrap();
    let base = spec(async_ckpt);
    run_with(
        &base,
        local.path(),
        Arc::new(relume::preempt::Preemption::manual()),
    )
    .unwrap();

    let (code, _) = spawn(
        &Spec {
            kill_at: Some(7),
            ..base.clone()
        },
        &run,
    );
    assert_eq!(code, -libc::SIGKILL);
    if !async_ckpt {
        // A sync save of step 5 committed before the kill at step 7 (an async one
        // may still have been uploading).
        assert_eq!(checkpoint_names(&run), ["step=000005-epoch=0"]);
    }
    let (code, outcome) = spawn(
        &Spec {
            term_at: Some(19),
            ..base.clone()
        },
        &run,
    );
    assert_eq!(code, PREEMPTED, "{outcome}");
    let (code, outcome) = spawn(&base, &run);
    assert_eq!(code, 0, "{outcome}");
    assert_eq!(outcome, "completed@32");
    assert_identical(local.path(), &run);
    // The same checkpoints kept, plus the one the preemption saved.
    let mut expected = checkpoint_names(local.path());
    expected.push("step=000019-epoch=2".into());
    expected.sort();
    assert_eq!(checkpoint_names(&run), expected);
    // Every checkpoint in the bucket verifies; nothing uncommitted is left over
    // from the sync runs (an attempt killed mid-upload is younger than the grace
    // period and stays until a later writer finds it stale).
    for c in ckdir(&run).list().unwrap() {
        let r = relume_ckpt::verify(&c.path);
        assert!(r.is_ok(), "{}: {:?}", c.name, r.problems);
    }
    // A finished run resumed again has nothing left to do.
    let (code, outcome) = spawn(&base, &run);
    assert_eq!((code, outcome.as_str()), (0, "finished@32"));
}

#[test]
fn killed_preempted_and_resumed_from_the_bucket_equals_a_local_run() {
    kill_preempt_resume(false);
}

#[test]
fn async_saves_to_the_bucket_resume_byte_identically() {
    kill_preempt_resume(true);
}

#[test]
fn a_run_in_an_in_memory_store_equals_a_local_run() {
    let _serial = serial();
    let bucket = format!("mem-{}", uuid::Uuid::new_v4().simple());
    relume_ckpt::remote::register_store(&bucket, Arc::new(object_store::memory::InMemory::new()));
    let run = PathBuf::from(format!("s3://{bucket}/run"));
    let local = tempfile::tempdir().unwrap();
    for (s, dir) in [
        (spec(true), local.path().to_path_buf()),
        (spec(true), run.clone()),
    ] {
        let out = run_with(&s, &dir, Arc::new(relume::preempt::Preemption::manual())).unwrap();
        assert_eq!(describe(&out), "completed@32");
    }
    assert_identical(local.path(), &run);
    assert_eq!(checkpoint_names(&run), checkpoint_names(local.path()));
    // ModelCheckpoint deleted evicted checkpoints from the store, as locally.
    assert!(checkpoint_names(&run).len() < 32 / 5 + 4);
}

#[test]
fn a_failed_async_upload_surfaces_and_the_rerun_finishes_equal_to_a_local_run() {
    let _serial = serial();
    let bucket = format!("mem-{}", uuid::Uuid::new_v4().simple());
    relume_ckpt::remote::register_store(&bucket, Arc::new(object_store::memory::InMemory::new()));
    let run = PathBuf::from(format!("s3://{bucket}/run"));
    let manual = || Arc::new(relume::preempt::Preemption::manual());
    // The third commit marker fails to be created.
    let faulty = relume_ckpt::FaultyStorage::new(
        relume_ckpt::remote::RemoteStorage::for_url(run.to_str().unwrap()).unwrap(),
    );
    faulty.fail_rename_to("COMMIT", 2);
    let mut t = builder(&spec(true), &run, manual())
        .unwrap()
        .checkpoint_storage(Arc::new(faulty))
        .build()
        .unwrap();
    let mut module = Tiny::new().unwrap();
    let (mut train, val) = loaders();
    let err = t.fit(&mut module, &mut train, Some(&val)).unwrap_err();
    let msg = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(msg.contains("async save"), "{msg}");
    drop(t);
    let names = checkpoint_names(&run);
    assert_eq!(names.len(), 2, "{names:?}");
    for c in ckdir(&run).list().unwrap() {
        assert!(relume_ckpt::verify(&c.path).is_ok());
    }
    // A local storage for an s3:// run is refused, not written to local paths.
    let err =
        relume_ckpt::CheckpointDir::open_with_storage(&run, Arc::new(relume_ckpt::LocalStorage))
            .unwrap_err();
    assert!(
        matches!(err, relume_ckpt::Error::RemoteUnsupported { .. }),
        "{err}"
    );
    // The rerun resumes from the bucket and ends as a local run does.
    let out = run_with(&spec(true), &run, manual()).unwrap();
    assert_eq!(describe(&out), "completed@32");
    let local = tempfile::tempdir().unwrap();
    run_with(&spec(true), local.path(), manual()).unwrap();
    assert_identical(local.path(), &run);
}

/// The digits job as a user runs it, with `--run-dir s3://...`: killed three times
/// (SIGKILL) and rerun, it ends with the final checkpoint of a local uninterrupted
/// run, and the same checkpoints kept.
#[test]
fn the_digits_job_killed_and_rerun_on_a_bucket_ends_as_a_local_run() {
    use std::os::unix::process::ExitStatusExt;
    let _serial = serial();
    let Some(run) = s3_run("digits") else {
        return;
    };
    let local = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let digits = |dir: &std::path::Path, log: &str| {
        let mut c = std::process::Command::new(support::digits_example());
        c.args(["--max-epochs", "12", "--run-dir"])
            .arg(dir)
            .arg("--log-dir")
            .arg(logs.path().join(log))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c
    };
    let out = digits(local.path(), "local").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut killed = 0;
    for ms in [400, 900, 1600] {
        let mut child = digits(&run, "s3").spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(ms));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        if status.signal() == Some(libc::SIGKILL) {
            killed += 1;
        }
    }
    assert!(killed > 0, "no kill landed before the job finished");
    let out = digits(&run, "s3").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("s3://"), "{text}");
    assert_identical(local.path(), &run);
    assert_eq!(checkpoint_names(&run), checkpoint_names(local.path()));
}
