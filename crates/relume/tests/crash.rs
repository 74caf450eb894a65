//! Trainer-level crash test (issue #7): a child process trains with the `Trainer`,
//! checkpointing every few steps; it is killed with SIGKILL at random moments (and,
//! deterministically, right after a checkpoint's rename and before `latest` names
//! it) and rerun until it finishes. Every rerun must resume (never fail, never
//! start over), the chain must always finish, the final state must be byte for
//! byte the uninterrupted run's, and every checkpoint of the uninterrupted run must
//! exist (at most one evicted top-k checkpoint may be left over; see the test).
//!
//! Trials: 30 by default (`RELUME_CRASH_TRIALS` to change). Each trial runs one of
//! four configurations (sync or async saves, with or without a monitored top-k
//! `ModelCheckpoint`, whose epoch-end saves share a boundary with the built-in
//! step saves) and kills each of its first reruns with some probability.

mod cb_common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use cb_common::*;

#[test]
fn child() {
    child_main();
}

fn spec(variant: u64) -> Spec {
    let mc = variant & 1 == 1;
    Spec {
        max_epochs: 4,
        every_n_steps: Some(3),
        async_ckpt: variant & 2 == 2,
        top_k: mc.then_some(2),
        save_last: mc,
        loggers: true,
        ..Spec::default()
    }
}

/// How one child run ended.
#[derive(Debug, PartialEq)]
enum End {
    Finished,
    Killed,
}

/// Runs `spec` in `dir`, SIGKILLing it after `kill_after` if it is still running.
fn run_child(spec: &Spec, dir: &Path, kill_after: Option<Duration>) -> End {
    let mut child = command(spec, dir).spawn().unwrap();
    if let Some(d) = kill_after {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    match (out.status.code(), out.status.signal()) {
        (Some(0), _) => End::Finished,
        (_, Some(s)) if s == libc::SIGKILL || s == libc::SIGABRT => End::Killed,
        _ => panic!(
            "a rerun failed instead of resuming ({:?}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn killed_training_always_resumes_to_the_uninterrupted_result() {
    let trials: u64 = std::env::var("RELUME_CRASH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    // The uninterrupted runs, one per variant, and how long a run takes.
    let refs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut run_ms = 0u64;
    for (v, r) in refs.iter().enumerate() {
        let t = Instant::now();
        assert_eq!(run_child(&spec(v as u64), r.path(), None), End::Finished);
        run_ms = run_ms.max(t.elapsed().as_millis() as u64);
    }
    // Kill timings from relume's own seeded RNG: a failing trial reruns the same way.
    let mut rng = relume::rng::Rng::new(0x5eed_0007, "crash-test");
    let (mut kills, mut aborts, mut reruns, mut leftovers) = (0u64, 0u64, 0u64, 0u64);
    for trial in 0..trials {
        let variant = trial % 4;
        let base = spec(variant);
        let dir = tempfile::tempdir().unwrap();
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            assert!(attempt < 30, "trial {trial}: the chain did not finish");
            let mut s = base.clone();
            let end = if attempt <= 4 && rng.below(4) == 0 {
                // Deterministic: abort right after the n-th checkpoint rename,
                // before `latest` is replaced.
                s.abort_at_latest_rename = Some(rng.below(6));
                aborts += 1;
                run_child(&s, dir.path(), None)
            } else if attempt <= 4 && rng.below(3) != 0 {
                kills += 1;
                let ms = rng.below(run_ms + 1);
                run_child(&s, dir.path(), Some(Duration::from_millis(ms)))
            } else {
                run_child(&s, dir.path(), None)
            };
            if end == End::Finished {
                break;
            }
            reruns += 1;
        }
        assert_identical(refs[variant as usize].path(), dir.path());
        // Every checkpoint of the uninterrupted run exists. A kill can leave one more:
        // a top-k checkpoint that a resumed run had to protect as its resume source
        // and whose deferred deletion the kill cut off (a known retention gap; no
        // state is lost). Anything else is a failure.
        let want = checkpoint_names(refs[variant as usize].path());
        let got = checkpoint_names(dir.path());
        let missing: Vec<&String> = want.iter().filter(|n| !got.contains(n)).collect();
        let extra: Vec<&String> = got.iter().filter(|n| !want.contains(n)).collect();
        assert!(
            missing.is_empty(),
            "trial {trial}: checkpoints lost: {missing:?}"
        );
        assert!(
            extra.iter().all(|n| n.starts_with("epoch=")) && extra.len() <= 1,
            "trial {trial}: unexpected checkpoints left: {extra:?}"
        );
        leftovers += extra.len() as u64;
    }
    println!(
        "crash test: {trials}/{trials} chains finished byte-identical ({kills} random kills, {aborts} aborts after a rename, {reruns} reruns; {leftovers} evicted top-k checkpoints left behind; a run takes about {run_ms} ms)"
    );
}

#[test]
fn a_kill_after_the_rename_before_latest_never_wedges_the_run() {
    // The 6.6% wedge of the issue, on every CI run: the checkpoint is renamed into
    // place, the process dies before `latest` names it, and every rerun used to
    // replay to that step and fail with "a checkpoint of that name already exists".
    for variant in 0..4 {
        let reference = tempfile::tempdir().unwrap();
        assert_eq!(
            run_child(&spec(variant), reference.path(), None),
            End::Finished
        );
        let dir = tempfile::tempdir().unwrap();
        for n in [0u64, 2] {
            let s = Spec {
                abort_at_latest_rename: Some(n),
                ..spec(variant)
            };
            assert_eq!(run_child(&s, dir.path(), None), End::Killed);
        }
        assert_eq!(run_child(&spec(variant), dir.path(), None), End::Finished);
        assert_identical(reference.path(), dir.path());
    }
}
