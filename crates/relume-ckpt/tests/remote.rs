//! The remote commit protocol (`s3://` run directories), against an in-memory object
//! store always and against a real S3 server when one is configured.
//!
//! `.ci/run` starts a local S3 server (moto) and exports `RELUME_S3_TEST_BUCKET` and
//! the `AWS_*` variables; every test then also runs against it. Without them the S3
//! half is skipped with a loud message, except under CI (`CI` set), where it fails.
#![cfg(feature = "s3")]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::sample;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use relume_ckpt::remote::{register_store, store_for, RemoteOptions, RemoteStorage, RemoteUrl};
use relume_ckpt::{
    load, verify, Checkpoint, CheckpointDir, Error, FaultyStorage, StateDict, TensorData,
};

use relume_ckpt::remote::test_bucket as s3_bucket;

/// A fresh in-memory bucket.
fn mem_bucket() -> String {
    let b = format!("mem-{}", uuid::Uuid::new_v4().simple());
    register_store(&b, Arc::new(object_store::memory::InMemory::new()));
    b
}

/// Fresh run URLs: one in memory, and one on the S3 server when there is one.
fn runs(tag: &str) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from(format!("s3://{}/{tag}", mem_bucket()))];
    if let Some(b) = s3_bucket() {
        out.push(PathBuf::from(format!(
            "s3://{b}/test-{tag}-{}",
            uuid::Uuid::new_v4().simple()
        )));
    }
    out
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Every key under `url` (a run or checkpoint URL).
fn keys(url: &Path) -> Vec<String> {
    use futures_util::StreamExt;
    let u = RemoteUrl::from_path(url).unwrap();
    let store = store_for(&u.bucket).unwrap();
    rt().block_on(async {
        let mut s = store.list(Some(&object_store::path::Path::from(u.key.as_str())));
        let mut out = Vec::new();
        while let Some(m) = s.next().await {
            out.push(m.unwrap().location.to_string());
        }
        out.sort();
        out
    })
}

fn store_of(url: &Path) -> (Arc<dyn ObjectStore>, String) {
    let u = RemoteUrl::from_path(url).unwrap();
    (store_for(&u.bucket).unwrap(), u.bucket)
}

fn names(dir: &CheckpointDir) -> Vec<String> {
    dir.list().unwrap().into_iter().map(|c| c.name).collect()
}

fn grace(secs: u64) -> RemoteOptions {
    RemoteOptions {
        stale_after: Duration::from_secs(secs),
    }
}

/// A checkpoint with a tensor of `mib` MiB (multipart above the part size).
fn big(step: u64, mib: usize) -> Checkpoint {
    let mut c = sample(step);
    let n = mib << 18;
    let w: Vec<f32> = (0..n)
        .map(|i| (i as f32).mul_add(1e-3, step as f32))
        .collect();
    let mut m = StateDict::new();
    m.insert_tensor("big.weight", TensorData::from_f32(vec![n], &w).unwrap());
    c.components.insert("big".into(), m);
    c
}

fn local_files(path: &Path) -> Vec<(String, String)> {
    let m = relume_ckpt::read_manifest(path).unwrap();
    m.files.into_iter().map(|f| (f.path, f.blake3)).collect()
}

#[test]
fn round_trip_saves_lists_loads_and_verifies_like_a_local_run() {
    let local = tempfile::tempdir().unwrap();
    let ldir = CheckpointDir::open(local.path()).unwrap();
    for run in runs("round-trip") {
        let dir = CheckpointDir::open(&run).unwrap();
        assert!(dir.is_remote());
        assert_eq!(dir.latest().unwrap(), None);
        for step in 1..=3 {
            // Step 2 is 20 MiB: above the 16 MiB part size, a multipart upload.
            let ckpt = if step == 2 { big(2, 20) } else { sample(step) };
            let p = dir.save(&format!("step={step}"), &ckpt).unwrap();
            assert_eq!(p, run.join("checkpoints").join(format!("step={step}")));
            let lp = ldir.save(&format!("step={step}"), &ckpt).unwrap();
            // The same bytes as a local save, file by file.
            assert_eq!(local_files(&p), local_files(&lp), "{}", p.display());
            let report = verify(&p);
            assert!(report.is_ok(), "{:?}", report.problems);
            let remote = load(&p).unwrap();
            let here = load(&lp).unwrap();
            assert_eq!(remote.components, here.components);
            assert_eq!(remote.manifest.fingerprint, here.manifest.fingerprint);
        }
        assert_eq!(names(&dir), ["step=1", "step=2", "step=3"]);
        assert_eq!(dir.latest().unwrap(), Some(run.join("checkpoints/step=3")));
        // A reader sees the same; it writes nothing.
        let before = keys(&run);
        let ro = CheckpointDir::open_read_only(&run).unwrap();
        assert_eq!(names(&ro), names(&dir));
        assert_eq!(ro.latest().unwrap(), dir.latest().unwrap());
        assert!(matches!(
            ro.save("x", &sample(9)),
            Err(Error::ReadOnly { .. })
        ));
        assert_eq!(keys(&run), before);
        // Exactly: per checkpoint one attempt (4 files + manifest) and a marker.
        let step2: Vec<_> = before.iter().filter(|k| k.contains("/step=2/")).collect();
        assert_eq!(step2.len(), 6, "{step2:?}");
        assert!(step2.iter().any(|k| k.ends_with("/COMMIT")));
        // Resolving by name and by URL.
        assert_eq!(
            dir.resolve("step=1").unwrap(),
            run.join("checkpoints/step=1")
        );
        assert!(matches!(
            dir.resolve("step=7"),
            Err(Error::NoSuchCheckpoint { .. })
        ));
        assert!(relume_ckpt::is_committed(&run.join("checkpoints/step=1")).unwrap());
        assert!(!relume_ckpt::is_committed(&run.join("checkpoints/step=7")).unwrap());
    }
}

#[test]
fn eight_writers_race_on_one_step_fifty_rounds_exactly_one_wins() {
    for run in runs("race") {
        let rounds = 50;
        let dirs: Vec<Arc<CheckpointDir>> = (0..8)
            .map(|_| Arc::new(CheckpointDir::open_remote(&run, None, grace(3600)).unwrap()))
            .collect();
        for round in 0..rounds {
            let name = format!("step={round}");
            let barrier = Arc::new(std::sync::Barrier::new(dirs.len()));
            let results: Vec<Result<PathBuf, Error>> = std::thread::scope(|s| {
                let handles: Vec<_> = dirs
                    .iter()
                    .enumerate()
                    .map(|(w, d)| {
                        let (barrier, name) = (Arc::clone(&barrier), name.clone());
                        s.spawn(move || {
                            // Each writer's state differs (writer id in the tensors).
                            let ckpt = sample(1000 * round + w as u64);
                            barrier.wait();
                            d.save(&name, &ckpt)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let won = results.iter().filter(|r| r.is_ok()).count();
            assert_eq!(won, 1, "round {round} on {}: {results:?}", run.display());
            for r in results.iter().filter_map(|r| r.as_ref().err()) {
                assert!(
                    matches!(r, Error::RemoteAlreadyExists { .. }),
                    "round {round}: {r}"
                );
                assert!(r.to_string().contains("another writer committed"), "{r}");
            }
            // The winner's checkpoint is whole; the losers left nothing behind.
            let p = run.join("checkpoints").join(&name);
            assert!(verify(&p).is_ok());
            let attempts: std::collections::BTreeSet<String> = keys(&p)
                .into_iter()
                .filter_map(|k| k.split('/').rev().nth(1).map(str::to_string))
                .filter(|a| a.starts_with("a-"))
                .collect();
            assert_eq!(attempts.len(), 1, "round {round}: {attempts:?}");
        }
        assert_eq!(dirs[0].list().unwrap().len(), rounds as usize);
    }
}

#[test]
fn a_failed_upload_commits_nothing_and_leaves_no_attempt() {
    for run in runs("failed-upload") {
        let url = run.to_str().unwrap();
        let faulty = FaultyStorage::new(RemoteStorage::for_url(url).unwrap());
        let dir =
            CheckpointDir::open_remote(&run, Some(Arc::new(faulty.clone())), grace(3600)).unwrap();
        dir.save("step=1", &sample(1)).unwrap();
        // Fails inside the multipart upload of a 20 MiB tensor.
        faulty.fail_after_bytes(18 << 20);
        let err = dir.save("step=2", &big(2, 20)).unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        faulty.fail_after_bytes(u64::MAX);
        assert_eq!(names(&dir), ["step=1"]);
        assert_eq!(dir.latest().unwrap(), Some(run.join("checkpoints/step=1")));
        assert!(verify(run.join("checkpoints/step=1")).is_ok());
        assert_eq!(dir.temporaries().unwrap(), Vec::<PathBuf>::new());
        assert!(
            keys(&run).iter().all(|k| !k.contains("/step=2/")),
            "{:?}",
            keys(&run)
        );
        // A failing marker write: the data is written, but nothing commits.
        faulty.fail_rename_to("COMMIT", 0);
        let err = dir.save("step=3", &sample(3)).unwrap_err();
        assert!(err.to_string().contains("COMMIT"), "{err}");
        faulty.fail_rename_to("none", 0);
        assert_eq!(names(&dir), ["step=1"]);
        // The step is saved again and commits.
        dir.save("step=3", &sample(3)).unwrap();
        assert_eq!(names(&dir), ["step=1", "step=3"]);
    }
}

/// The object key of file `rel` in the committed attempt of checkpoint `p`.
fn attempt_key(p: &Path, rel: &str) -> String {
    keys(p)
        .into_iter()
        .find(|k| k.ends_with(&format!("/{rel}")) && k.contains("/a-"))
        .unwrap()
}

#[test]
fn an_object_altered_in_the_bucket_is_named_by_verify_and_refused_by_load() {
    for run in runs("corrupt") {
        let dir = CheckpointDir::open(&run).unwrap();
        let p = dir.save("step=1", &sample(1)).unwrap();
        dir.save("step=2", &sample(2)).unwrap();
        let (store, _) = store_of(&run);
        let key = object_store::path::Path::from(attempt_key(&p, "model.safetensors"));
        let rt = rt();
        let mut bytes = rt
            .block_on(async { store.get(&key).await?.bytes().await })
            .unwrap()
            .to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        rt.block_on(store.put(&key, PutPayload::from(bytes.clone())))
            .unwrap();
        let report = verify(&p);
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        match &report.problems[0] {
            Error::ChecksumMismatch { path, tensor, .. } => {
                assert!(
                    path.to_str().unwrap().ends_with("model.safetensors"),
                    "{}",
                    path.display()
                );
                assert!(path.to_str().unwrap().starts_with("s3://"));
                assert!(tensor.is_some(), "the damaged tensor is named");
            }
            other => panic!("{other}"),
        }
        assert!(matches!(load(&p), Err(Error::ChecksumMismatch { .. })));
        // Truncated: the size is named.
        bytes.truncate(bytes.len() - 3);
        rt.block_on(store.put(&key, PutPayload::from(bytes)))
            .unwrap();
        assert!(matches!(
            verify(&p).problems.first(),
            Some(Error::FileSize { .. })
        ));
        assert!(matches!(load(&p), Err(Error::FileSize { .. })));
        // A manifest that no longer matches its marker.
        let mkey = object_store::path::Path::from(attempt_key(&p, "manifest.json"));
        rt.block_on(store.put(&mkey, PutPayload::from_static(b"{}")))
            .unwrap();
        assert!(matches!(
            verify(&p).problems.first(),
            Some(Error::ManifestChecksum { .. })
        ));
        // The other checkpoint is untouched.
        assert!(verify(run.join("checkpoints/step=2")).is_ok());
    }
}

#[test]
fn uncommitted_attempts_are_invisible_and_removed_only_once_stale() {
    for run in runs("stale") {
        let dir = CheckpointDir::open(&run).unwrap();
        dir.save("step=1", &sample(1)).unwrap();
        // What a writer killed mid-save leaves: an attempt without a marker.
        let (store, bucket) = store_of(&run);
        let prefix = RemoteUrl::from_path(&run).unwrap().key;
        let orphan = format!("{prefix}/checkpoints/step=2/a-0000000000001-dead/model.safetensors");
        rt().block_on(store.put(
            &object_store::path::Path::from(orphan.as_str()),
            PutPayload::from_static(b"partial"),
        ))
        .unwrap();
        assert_eq!(names(&dir), ["step=1"]);
        assert_eq!(dir.latest().unwrap(), Some(run.join("checkpoints/step=1")));
        assert!(!relume_ckpt::is_committed(&run.join("checkpoints/step=2")).unwrap());
        let temp = format!("s3://{bucket}/{prefix}/checkpoints/step=2/a-0000000000001-dead");
        assert_eq!(dir.temporaries().unwrap(), [PathBuf::from(&temp)]);
        // A writer within the grace period leaves it (it may be a live upload)...
        drop(CheckpointDir::open_remote(&run, None, grace(3600)).unwrap());
        assert!(keys(&run).contains(&orphan));
        // ...one after it removes it.
        let dir = CheckpointDir::open_remote(&run, None, grace(0)).unwrap();
        assert!(!keys(&run).contains(&orphan));
        assert_eq!(dir.temporaries().unwrap(), Vec::<PathBuf>::new());
        assert_eq!(names(&dir), ["step=1"]);
    }
}

#[test]
fn a_recommit_of_the_same_state_succeeds_and_other_state_is_a_conflict() {
    for run in runs("recommit") {
        let dir = CheckpointDir::open(&run).unwrap();
        dir.save("step=1", &sample(1)).unwrap();
        let before = keys(&run);
        // A deterministic replay after a crash saves the same state again.
        let again = CheckpointDir::open(&run).unwrap();
        again.save("step=1", &sample(1)).unwrap();
        assert_eq!(keys(&run), before, "nothing written");
        // Other state: the marker is never replaced.
        let err = again.save("step=1", &sample(2)).unwrap_err();
        assert!(matches!(err, Error::RemoteAlreadyExists { .. }), "{err}");
        assert_eq!(keys(&run), before);
    }
}

#[test]
fn delete_removes_the_marker_then_the_data_and_refuses_latest() {
    for run in runs("delete") {
        let dir = CheckpointDir::open(&run).unwrap();
        dir.save("step=1", &sample(1)).unwrap();
        dir.save("step=2", &sample(2)).unwrap();
        assert!(matches!(
            dir.delete("step=2"),
            Err(Error::DeleteLatest { .. })
        ));
        dir.delete("step=1").unwrap();
        assert_eq!(names(&dir), ["step=2"]);
        assert!(keys(&run).iter().all(|k| !k.contains("/step=1/")));
        assert!(matches!(
            dir.delete("step=1"),
            Err(Error::NoSuchCheckpoint { .. })
        ));
        // Clear: everything goes; an interrupted clear hides the run until a writer
        // finishes it.
        dir.save("step=3", &sample(3)).unwrap();
        assert_eq!(dir.clear().unwrap(), 2);
        assert!(names(&dir).is_empty());
        assert!(keys(&run).is_empty(), "{:?}", keys(&run));
        dir.save("step=4", &sample(4)).unwrap();
        let (store, _) = store_of(&run);
        let prefix = RemoteUrl::from_path(&run).unwrap().key;
        rt().block_on(store.put(
            &object_store::path::Path::from(format!("{prefix}/checkpoints/.clearing")),
            PutPayload::from_static(b"x"),
        ))
        .unwrap();
        assert!(CheckpointDir::open_read_only(&run)
            .unwrap()
            .list()
            .unwrap()
            .is_empty());
        assert!(CheckpointDir::open_read_only(&run)
            .unwrap()
            .clear_pending()
            .unwrap());
        let dir = CheckpointDir::open(&run).unwrap();
        assert!(!dir.clear_pending().unwrap());
        assert!(keys(&run).is_empty());
    }
}

#[test]
fn an_unreachable_endpoint_is_named_with_the_fix() {
    let bucket = format!("unreachable-{}", uuid::Uuid::new_v4().simple());
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(&bucket)
        .with_region("us-east-1")
        .with_endpoint("http://127.0.0.1:9")
        .with_allow_http(true)
        .with_access_key_id("x")
        .with_secret_access_key("y")
        .with_retry(object_store::RetryConfig {
            max_retries: 0,
            ..Default::default()
        })
        .build()
        .unwrap();
    register_store(&bucket, Arc::new(store));
    let url = format!("s3://{bucket}/run");
    let err = CheckpointDir::open(&url).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Remote { .. }), "{msg}");
    assert!(msg.contains(&url), "{msg}");
    assert!(msg.contains("cannot reach"), "{msg}");
}

#[test]
fn a_missing_bucket_is_named_with_the_fix() {
    let Some(_) = s3_bucket() else { return };
    let url = format!(
        "s3://relume-no-such-bucket-{}/run",
        uuid::Uuid::new_v4().simple()
    );
    let err = CheckpointDir::open(&url).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&url), "{msg}");
    assert!(msg.contains("bucket does not exist"), "{msg}");
}

#[test]
fn malformed_urls_are_refused() {
    for url in ["s3://", "s3:///run", "s3://b/a//c", "s3://b/../x"] {
        let err = CheckpointDir::open(url).unwrap_err();
        assert!(
            matches!(err, Error::RemoteUnsupported { .. }),
            "{url}: {err}"
        );
        assert!(err.to_string().contains("s3://bucket/prefix"), "{err}");
    }
}

/// The child process of the crash test: saves steps 1..=STEPS into the run
/// `RELUME_REMOTE_CRASH_RUN` names (each with an 11 MiB tensor: three 5 MiB parts),
/// skipping nothing: a step already committed re-commits without writing.
const STEPS: u64 = 24;

#[test]
fn crash_child() {
    let Ok(run) = std::env::var("RELUME_REMOTE_CRASH_RUN") else {
        return;
    };
    let dir = CheckpointDir::open(&run).unwrap();
    for step in 1..=STEPS {
        dir.save(&format!("step={step:03}"), &big(step, 11))
            .unwrap();
    }
}

#[test]
fn sigkill_during_multipart_uploads_twenty_trials_then_the_run_finishes() {
    let Some(bucket) = s3_bucket() else { return };
    let run = format!("s3://{bucket}/crash-{}", uuid::Uuid::new_v4().simple());
    let exe = std::env::current_exe().unwrap();
    let spawn = |stale: &str| {
        std::process::Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env("RELUME_REMOTE_CRASH_RUN", &run)
            .env("RELUME_S3_PART_BYTES", (5u64 << 20).to_string())
            .env("RELUME_S3_STALE_AFTER_SECS", stale)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut prev_latest: Option<PathBuf> = None;
    let mut finished_early = 0;
    for trial in 0..20 {
        let mut child = spawn("3600");
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(150 + rng % 900));
        // SIGKILL: no destructor, no abort of the upload in flight.
        child.kill().unwrap();
        let status = child.wait().unwrap();
        if status.success() {
            finished_early += 1;
        }
        let ro = CheckpointDir::open_read_only(&run).unwrap();
        let listed = ro.list().unwrap();
        // Nothing partial is ever listed: every listed checkpoint verifies.
        for c in &listed {
            let r = verify(&c.path);
            assert!(r.is_ok(), "trial {trial}: {} {:?}", c.name, r.problems);
        }
        let latest = ro.latest().unwrap();
        if let (Some(prev), Some(now)) = (&prev_latest, &latest) {
            assert!(
                now >= prev,
                "trial {trial}: latest went back from {} to {}",
                prev.display(),
                now.display()
            );
        }
        if let Some(l) = &latest {
            assert!(load(l).is_ok(), "trial {trial}");
        }
        prev_latest = latest;
    }
    // The kills did land mid-save: attempts without markers were left behind
    // (kept by the writers that followed: younger than their grace period).
    let orphans = CheckpointDir::open_read_only(&run)
        .unwrap()
        .temporaries()
        .unwrap()
        .len();
    assert!(orphans > 0, "no kill interrupted a save");
    // The rerun (past the grace period) removes what the kills left and finishes.
    let status = spawn("0").wait().unwrap();
    assert!(status.success());
    let ro = CheckpointDir::open_read_only(&run).unwrap();
    assert_eq!(ro.list().unwrap().len(), STEPS as usize);
    assert_eq!(ro.temporaries().unwrap(), Vec::<PathBuf>::new());
    for c in ro.list().unwrap() {
        assert!(verify(&c.path).is_ok(), "{}", c.name);
        assert_eq!(
            load(&c.path).unwrap().components,
            big(c.step.unwrap(), 11).components
        );
    }
    eprintln!("crash test: 20 SIGKILLs ({finished_early} after the child had finished, {orphans} uncommitted attempts left), then the run finished");
}
