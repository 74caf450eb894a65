//! The committed checkpoints are the truth, `latest` is a hint (issue #7): a pointer
//! that is missing, behind or dangling is reconciled; a re-commit of the same state
//! is idempotent; a boundary group counts only when complete; clearing is
//! crash-safe and needs the writer lock.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::sample;
use relume_ckpt::{CheckpointDir, Error, FaultyStorage, LocalStorage};

fn pointer(dir: &CheckpointDir) -> Option<String> {
    std::fs::read_to_string(dir.path().join("latest"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

fn names(dir: &CheckpointDir) -> Vec<String> {
    dir.list().unwrap().into_iter().map(|c| c.name).collect()
}

/// Total bytes of the files of a checkpoint directory.
fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[test]
fn latest_missing_is_reconciled_not_a_fresh_start() {
    let run = tempfile::tempdir().unwrap();
    let dir = CheckpointDir::open(run.path()).unwrap();
    dir.save("step=000001", &sample(1)).unwrap();
    let p2 = dir.save("step=000002", &sample(2)).unwrap();
    drop(dir);
    std::fs::remove_file(run.path().join("checkpoints/latest")).unwrap();
    // A reader resolves it read-only, writing nothing.
    let ro = CheckpointDir::open_read_only(run.path()).unwrap();
    assert_eq!(ro.latest().unwrap(), Some(p2.clone()));
    assert_eq!(pointer(&ro), None);
    // A writer rewrites the pointer on open.
    let dir = CheckpointDir::open(run.path()).unwrap();
    assert_eq!(pointer(&dir).as_deref(), Some("step=000002"));
    assert_eq!(dir.latest().unwrap(), Some(p2));
}

#[test]
fn latest_behind_after_a_failed_pointer_update_is_reconciled_and_the_step_recommits() {
    let run = tempfile::tempdir().unwrap();
    let faulty = FaultyStorage::new(LocalStorage);
    let dir = CheckpointDir::open_with_storage(run.path(), Arc::new(faulty.clone())).unwrap();
    dir.save("step=000001", &sample(1)).unwrap();
    // The instant between the checkpoint's rename and `latest`'s (a kill there wedged
    // every rerun with "a checkpoint of that name already exists").
    faulty.fail_rename_to("latest", 0);
    let err = dir.save("step=000002", &sample(2)).unwrap_err();
    assert!(err.to_string().contains("latest"), "{err}");
    assert!(run
        .path()
        .join("checkpoints/step=000002/manifest.json")
        .is_file());
    assert_eq!(pointer(&dir).as_deref(), Some("step=000001"));
    drop(dir);
    let ro = CheckpointDir::open_read_only(run.path()).unwrap();
    assert_eq!(
        ro.latest().unwrap(),
        Some(run.path().join("checkpoints/step=000002"))
    );
    let dir = CheckpointDir::open(run.path()).unwrap();
    assert_eq!(pointer(&dir).as_deref(), Some("step=000002"));
    // A deterministic replay of the same step commits idempotently.
    let p = dir.save("step=000002", &sample(2)).unwrap();
    assert_eq!(p, run.path().join("checkpoints/step=000002"));
    // A different state under that name is a conflict naming both fingerprints.
    let err = dir.save("step=000002", &sample(7)).unwrap_err();
    match &err {
        Error::CommitConflict { existing, new, .. } => assert_ne!(existing, new),
        other => panic!("{other}"),
    }
    assert_eq!(names(&dir), vec!["step=000001", "step=000002"]);
}

#[test]
fn full_disk_while_latest_is_replaced_does_not_wedge_the_run() {
    // Measure the checkpoint's size, then allow exactly that much (+1 so the
    // checkpoint's own fsyncs pass): the write of `latest` hits the full disk.
    let probe = tempfile::tempdir().unwrap();
    let pdir = CheckpointDir::open(probe.path()).unwrap();
    let size = dir_bytes(&pdir.save("step=000002", &sample(2)).unwrap());
    let run = tempfile::tempdir().unwrap();
    let faulty = FaultyStorage::new(LocalStorage);
    let dir = CheckpointDir::open_with_storage(run.path(), Arc::new(faulty.clone())).unwrap();
    dir.save("step=000001", &sample(1)).unwrap();
    faulty.fail_after_bytes(size + 1);
    let err = dir.save("step=000002", &sample(2)).unwrap_err();
    assert!(err.to_string().contains(".tmp-latest"), "{err}");
    assert!(run
        .path()
        .join("checkpoints/step=000002/manifest.json")
        .is_file());
    drop(dir);
    // Space is back: the next writer reconciles, and the replayed save is idempotent.
    let dir = CheckpointDir::open(run.path()).unwrap();
    assert_eq!(pointer(&dir).as_deref(), Some("step=000002"));
    assert!(dir.temporaries().unwrap().is_empty());
    dir.save("step=000002", &sample(2)).unwrap();
    dir.save("step=000003", &sample(3)).unwrap();
    assert_eq!(pointer(&dir).as_deref(), Some("step=000003"));
}

#[test]
fn a_corrupt_newest_checkpoint_is_passed_over_when_latest_is_behind() {
    let run = tempfile::tempdir().unwrap();
    let dir = CheckpointDir::open(run.path()).unwrap();
    dir.save("step=000001", &sample(1)).unwrap();
    let p2 = dir.save("step=000002", &sample(2)).unwrap();
    dir.save("step=000003", &sample(3)).unwrap();
    drop(dir);
    std::fs::write(run.path().join("checkpoints/latest"), "step=000001\n").unwrap();
    let f = run.path().join("checkpoints/step=000003/state.json");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(&f, bytes).unwrap();
    let dir = CheckpointDir::open(run.path()).unwrap();
    assert_eq!(dir.latest().unwrap(), Some(p2));
}

#[test]
fn an_incomplete_boundary_group_is_never_latest() {
    let run = tempfile::tempdir().unwrap();
    let dir = CheckpointDir::open(run.path()).unwrap();
    let p1 = dir.save("step=000001", &sample(1)).unwrap();
    let group = vec!["step=000002".to_string(), "epoch=0-step=2".to_string()];
    let mut a = sample(2);
    a.group = group.clone();
    // The first member commits; the second never does (its save failed, or a kill).
    dir.save("step=000002", &a).unwrap();
    assert_eq!(pointer(&dir).as_deref(), Some("step=000001"));
    assert_eq!(dir.latest().unwrap(), Some(p1.clone()));
    drop(dir);
    let dir = CheckpointDir::open(run.path()).unwrap();
    assert_eq!(dir.latest().unwrap(), Some(p1));
    // Replayed: the first member is idempotent, the second completes the group.
    dir.save("step=000002", &a).unwrap();
    let b = dir.save("epoch=0-step=2", &a).unwrap();
    assert_eq!(dir.latest().unwrap(), Some(b));
    assert_eq!(pointer(&dir).as_deref(), Some("epoch=0-step=2"));
}

#[test]
fn a_member_of_an_incomplete_group_is_replaced_by_the_replay_a_complete_one_is_not() {
    let run = tempfile::tempdir().unwrap();
    let dir = CheckpointDir::open(run.path()).unwrap();
    dir.save("step=000001", &sample(1)).unwrap();
    let group = vec!["step=000002".to_string(), "epoch=0-step=2".to_string()];
    let mut first = sample(2);
    first.group = group.clone();
    dir.save("step=000002", &first).unwrap();
    // The replay reaches the same step with other callback bookkeeping (a process
    // resumed from another checkpoint): the orphan is replaced, not a conflict.
    let mut replay = sample(2);
    replay.group = group.clone();
    replay.metrics.insert("other_history".into(), 1.0);
    replay
        .components
        .get_mut("model")
        .unwrap()
        .insert_json("note", serde_json::json!("replayed"));
    let p = dir.save("step=000002", &replay).unwrap();
    let loaded = relume_ckpt::load(&p).unwrap();
    assert_eq!(
        loaded.manifest.fingerprint,
        relume_ckpt::fingerprint(&replay.components)
    );
    assert!(dir.temporaries().unwrap().is_empty());
    // Once the group is complete, other state under a member's name is a conflict.
    dir.save("epoch=0-step=2", &replay).unwrap();
    let err = dir.save("step=000002", &first).unwrap_err();
    assert!(matches!(err, Error::CommitConflict { .. }), "{err}");
}

#[test]
fn same_step_orders_by_commit_sequence() {
    let run = tempfile::tempdir().unwrap();
    let dir = CheckpointDir::open(run.path()).unwrap();
    dir.save("z-step=5", &sample(5)).unwrap();
    let a = dir.save("a-step=5", &sample(5)).unwrap();
    drop(dir);
    std::fs::remove_file(run.path().join("checkpoints/latest")).unwrap();
    let dir = CheckpointDir::open(run.path()).unwrap();
    assert_eq!(dir.latest().unwrap(), Some(a));
    assert_eq!(names(&dir), vec!["z-step=5", "a-step=5"]);
}

#[test]
fn dangling_latest_without_checkpoints_is_an_error_not_a_fresh_start() {
    let run = tempfile::tempdir().unwrap();
    let dir = CheckpointDir::open(run.path()).unwrap();
    std::fs::write(dir.path().join("latest"), "step=000009\n").unwrap();
    let err = dir.latest().unwrap_err();
    assert!(matches!(err, Error::LatestDangling { .. }), "{err}");
    assert!(err.to_string().contains("step=000009"), "{err}");
}

#[test]
fn symlinked_checkpoint_directories_are_not_listed() {
    let run = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let other = CheckpointDir::open(elsewhere.path()).unwrap();
    let target = other.save("step=000009", &sample(9)).unwrap();
    let dir = CheckpointDir::open(run.path()).unwrap();
    let p1 = dir.save("step=000001", &sample(1)).unwrap();
    std::os::unix::fs::symlink(&target, dir.path().join("step=000009")).unwrap();
    assert_eq!(names(&dir), vec!["step=000001"]);
    assert_eq!(dir.latest().unwrap(), Some(p1));
}

#[test]
fn clear_empties_the_directory_and_keeps_the_lock() {
    let run = tempfile::tempdir().unwrap();
    let dir = CheckpointDir::open(run.path()).unwrap();
    for s in 1..=3 {
        dir.save(&format!("step={s:06}"), &sample(s)).unwrap();
    }
    assert_eq!(dir.clear().unwrap(), 3);
    assert!(names(&dir).is_empty());
    assert_eq!(dir.latest().unwrap(), None);
    assert!(dir.temporaries().unwrap().is_empty());
    // Still the writer: a second one is refused, and this one saves on.
    let second = CheckpointDir::open(run.path()).unwrap_err();
    assert!(matches!(second, Error::Locked { .. }), "{second}");
    dir.save("step=000001", &sample(1)).unwrap();
    let ro = CheckpointDir::open_read_only(run.path()).unwrap();
    assert!(matches!(ro.clear(), Err(Error::ReadOnly { .. })));
}

#[test]
fn a_clear_interrupted_midway_is_finished_by_the_next_writer() {
    let run = tempfile::tempdir().unwrap();
    let faulty = FaultyStorage::new(LocalStorage);
    let dir = CheckpointDir::open_with_storage(run.path(), Arc::new(faulty.clone())).unwrap();
    for s in 1..=3 {
        dir.save(&format!("step={s:06}"), &sample(s)).unwrap();
    }
    // The clear stops after moving some entries (as a kill would leave it).
    faulty.fail_rename_to("step=000002", 0);
    assert!(dir.clear().is_err());
    // Half-cleared: readers see an empty run, never a partial one.
    let ro = CheckpointDir::open_read_only(run.path()).unwrap();
    assert!(ro.list().unwrap().is_empty());
    assert_eq!(ro.latest().unwrap(), None);
    drop(dir);
    let dir = CheckpointDir::open(run.path()).unwrap();
    assert!(names(&dir).is_empty());
    assert_eq!(pointer(&dir), None);
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec![".lock".to_string()]);
    // The new run's checkpoints are never taken for the old clear's leftovers.
    dir.save("step=000001", &sample(1)).unwrap();
    drop(dir);
    let dir = CheckpointDir::open(run.path()).unwrap();
    assert_eq!(names(&dir), vec!["step=000001"]);
}
