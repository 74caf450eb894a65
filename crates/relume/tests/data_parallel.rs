//! The data-parallel contract, with ranks as threads (`relume::dist::ThreadGroup`;
//! the MPI runs of the same contract are in `crates/relume-cli/tests/mpi.rs`):
//! - world sizes 1, 2 and 4 end byte-identical (same global batch);
//! - a preemption flag on one rank stops every rank at the same step, and the run
//!   resumes byte-identically, at the same world size and at another one;
//! - a rank that never arrives, a rank with another configuration and an
//!   impossible split are errors naming the rank and the setting.

mod dp_common;
mod support;

use std::sync::Arc;
use std::time::Duration;

use dp_common::*;
use relume::dist::{run_threads, Collective};
use relume::Error;

#[test]
fn world_sizes_one_two_and_four_end_byte_identical() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    for (world, dir) in [1, 2, 4].into_iter().zip(&dirs) {
        let out = fit_at(world, &SPEC, dir.path()).unwrap();
        // 5 steps an epoch (the last window has 1 micro-batch), 3 epochs.
        assert!(
            out.iter().all(|o| o == "completed@15"),
            "world {world}: {out:?}"
        );
    }
    assert_same_state(dirs[0].path(), dirs[1].path());
    assert_same_state(dirs[0].path(), dirs[2].path());
    // The checkpoint records the world size it was written at.
    let m = relume_ckpt::load(
        relume_ckpt::CheckpointDir::open_read_only(dirs[1].path())
            .unwrap()
            .latest()
            .unwrap()
            .unwrap(),
    )
    .unwrap()
    .manifest;
    assert_eq!(m.config["world_size"], 2);
    // Three ranks need a window that splits in three.
    let six = Spec { accum: 6, ..SPEC };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let out = fit_at(1, &six, a.path()).unwrap();
    assert_eq!(out, fit_at(3, &six, b.path()).unwrap()[..1]);
    assert_same_state(a.path(), b.path());
}

#[test]
fn a_signal_on_one_rank_stops_all_and_the_resume_is_exact_at_any_world_size() {
    let reference = tempfile::tempdir().unwrap();
    fit_at(2, &SPEC, reference.path()).unwrap();
    // (interrupted at world, after batch n on rank r) then resumed at world'.
    for (world, rank, batches, resume_world, expect) in [
        (2, 1, 6, 2, "interrupted@2"), // mid-window on rank 1: honoured at step 2
        (2, 0, 21, 1, "interrupted@7"), // a window's last batch: honoured one step later
        (1, 0, 9, 2, "interrupted@3"), // written alone, resumed by two ranks
    ] {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec {
            interrupt: Some((rank, batches)),
            ..SPEC
        };
        let out = fit_at(world, &spec, dir.path()).unwrap();
        assert!(out.iter().all(|o| o == expect), "{out:?}, wanted {expect}");
        let out = fit_at(resume_world, &SPEC, dir.path()).unwrap();
        assert!(out.iter().all(|o| o == "completed@15"), "{out:?}");
        assert_same_state(reference.path(), dir.path());
    }
}

#[test]
fn a_rank_that_dies_before_a_save_is_named_nothing_is_committed_and_a_rerun_finishes() {
    let reference = tempfile::tempdir().unwrap();
    fit_at(2, &SPEC, reference.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let started = std::time::Instant::now();
    // Rank 1 fails right after the optimizer step of step 2 (batch 8), before the
    // boundary where step 2 would be saved.
    let spec = Spec {
        fail: Some((1, 8)),
        ..SPEC
    };
    let out = run_threads(2, Duration::from_millis(1500), move |g| {
        fit(&spec, &d, Arc::new(g)).map(|o| describe(&o))
    });
    let e = out.unwrap_err().to_string();
    assert!(
        e.contains("rank 0: ranks [1] did not arrive") && e.contains("step 2"),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    let ck = relume_ckpt::CheckpointDir::open_read_only(dir.path()).unwrap();
    let latest = ck.latest().unwrap().unwrap();
    assert!(
        latest.ends_with("step=000001-epoch=0"),
        "{}",
        latest.display()
    );
    assert!(relume_ckpt::verify(&latest).is_ok());
    let out = fit_at(2, &SPEC, dir.path()).unwrap();
    assert!(out.iter().all(|o| o == "completed@15"), "{out:?}");
    assert_same_state(reference.path(), dir.path());
}

#[test]
fn another_configuration_on_one_rank_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let out = run_threads(2, Duration::from_secs(30), move |g| {
        let spec = Spec {
            max_epochs: if g.rank() == 1 { 4 } else { 3 },
            ..SPEC
        };
        fit(&spec, &d, Arc::new(g)).map(|o| describe(&o))
    });
    match out {
        Err(e @ Error::RankDisagrees { rank: 1, .. }) => {
            assert!(e.to_string().contains("max_epochs"), "{e}")
        }
        other => panic!("expected RankDisagrees from rank 1, got {other:?}"),
    }
}

#[test]
fn a_window_that_does_not_split_over_the_ranks_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec { accum: 3, ..SPEC };
    match fit_at(2, &spec, dir.path()) {
        Err(e @ Error::InvalidSetting { .. }) => {
            assert!(
                e.to_string().contains("multiple of the world size 2"),
                "{e}"
            )
        }
        other => panic!("expected InvalidSetting, got {other:?}"),
    }
}
