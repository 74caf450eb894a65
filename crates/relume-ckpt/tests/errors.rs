//! One test per error a reader or the run directory reports on bad input.

mod common;

use std::path::PathBuf;

use common::{manifest_json, replace_file_consistently, sample, write_manifest};
use relume_ckpt::tensor_file::MAX_HEADER_BYTES;
use relume_ckpt::{load, verify, CheckpointDir, Error};
use serde_json::json;

fn saved() -> (tempfile::TempDir, PathBuf) {
    let run = tempfile::tempdir().unwrap();
    let dir = CheckpointDir::open(run.path()).unwrap();
    let p = dir.save("step=000001", &sample(1)).unwrap();
    (run, p)
}

fn assert_names(err: &Error, what: &str) {
    assert!(err.to_string().contains(what), "{err} should name {what}");
}

#[test]
fn round_trip_is_exact_and_mapped() {
    let (_run, p) = saved();
    let l = load(&p).unwrap();
    let want = sample(1);
    assert_eq!(l.components, want.components);
    assert_eq!(
        l.manifest.fingerprint,
        relume_ckpt::fingerprint(&want.components)
    );
    assert_eq!(l.manifest.metrics["loss"], 0.5);
    assert!(l.components["model"]
        .require_tensor("layer1.weight")
        .unwrap()
        .bytes()
        .is_mapped());
    let r = verify(&p);
    assert!(r.is_ok(), "{:?}", r.problems);
    assert!(r.bytes_checked > 0);
}

#[test]
fn missing_manifest() {
    let (_run, p) = saved();
    std::fs::remove_file(p.join("manifest.json")).unwrap();
    let err = load(&p).unwrap_err();
    assert!(matches!(err, Error::MissingManifest { .. }), "{err}");
    assert_names(&err, "step=000001");
}

#[test]
fn manifest_not_complete() {
    let (_run, p) = saved();
    let mut v = manifest_json(&p);
    v["complete"] = json!(false);
    write_manifest(&p, &v);
    let err = load(&p).unwrap_err();
    assert!(matches!(err, Error::IncompleteManifest { .. }), "{err}");
    assert_names(&err, "manifest.json");
}

#[test]
fn checksum_mismatch_names_file_and_tensor() {
    let (_run, p) = saved();
    let f = p.join("model.safetensors");
    let mut b = std::fs::read(&f).unwrap();
    let n = b.len();
    b[n - 1] ^= 0x10; // last byte belongs to the last tensor in offset order
    std::fs::write(&f, &b).unwrap();
    let err = load(&p).unwrap_err();
    match &err {
        Error::ChecksumMismatch {
            tensor: Some(t), ..
        } => assert_eq!(t, "layer1.weight"),
        other => panic!("{other}"),
    }
    assert_names(&err, "model.safetensors");
    assert_names(&err, "layer1.weight");
}

#[test]
fn truncated_file_names_tensor() {
    let (_run, p) = saved();
    let f = p.join("optimizer.safetensors");
    let b = std::fs::read(&f).unwrap();
    std::fs::write(&f, &b[..b.len() - 3]).unwrap();
    let err = load(&p).unwrap_err();
    match &err {
        Error::FileSize {
            tensor: Some(t),
            got,
            expected,
            ..
        } => {
            assert_eq!(*got + 3, *expected);
            assert_eq!(t, "0/layer1.weight/step");
        }
        other => panic!("{other}"),
    }
    assert_names(&err, "optimizer.safetensors");
}

#[test]
fn future_format_version() {
    let (_run, p) = saved();
    let mut v = manifest_json(&p);
    v["format_version"] = json!(7);
    write_manifest(&p, &v);
    let err = load(&p).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnsupportedFormatVersion {
                found: 7,
                supported: 1,
                ..
            }
        ),
        "{err}"
    );
    assert_names(&err, "manifest.json");
}

#[test]
fn absolute_or_parent_paths() {
    for bad in ["/etc/passwd", "../../outside.json", "sub/../../x"] {
        let (_run, p) = saved();
        let mut v = manifest_json(&p);
        v["files"][0]["path"] = json!(bad);
        write_manifest(&p, &v);
        let err = load(&p).unwrap_err();
        assert!(matches!(err, Error::UnsafePath { .. }), "{bad}: {err}");
        assert_names(&err, bad);
    }
}

#[test]
fn safetensors_header_above_bound() {
    let (_run, p) = saved();
    let mut b = std::fs::read(p.join("model.safetensors")).unwrap();
    b[..8].copy_from_slice(&(MAX_HEADER_BYTES + 1).to_le_bytes());
    replace_file_consistently(&p, "model.safetensors", &b);
    let err = load(&p).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LimitExceeded {
                what: "safetensors header bytes",
                ..
            }
        ),
        "{err}"
    );
    assert_names(&err, "model.safetensors");
}

#[test]
fn tensor_length_disagrees_with_shape() {
    let (_run, p) = saved();
    let body = br#"{"layer1.bias":{"dtype":"F64","shape":[9],"data_offsets":[0,64]}}"#;
    let mut b = (body.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(body);
    b.extend_from_slice(&[0u8; 64]);
    replace_file_consistently(&p, "model.safetensors", &b);
    let err = load(&p).unwrap_err();
    match &err {
        Error::TensorFileLength {
            tensor,
            expected: 72,
            got: 64,
            ..
        } => assert_eq!(tensor, "layer1.bias"),
        other => panic!("{other}"),
    }
    assert_names(&err, "model.safetensors");
}

/// Replaces `model.safetensors` (consistently with the manifest) with header `body`
/// and `data` bytes; returns what `verify` reported and what `load` returned.
fn with_model_layout(body: &str, data: usize) -> (Vec<Error>, Error) {
    let (_run, p) = saved();
    let mut b = (body.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(body.as_bytes());
    b.resize(b.len() + data, 0);
    replace_file_consistently(&p, "model.safetensors", &b);
    let report = verify(&p);
    let err = load(&p).unwrap_err();
    assert_names(&err, "model.safetensors");
    (report.problems, err)
}

#[test]
fn tensor_gap_is_reported_by_verify_and_load() {
    let (problems, err) = with_model_layout(
        r#"{"layer1.bias":{"dtype":"F64","shape":[8],"data_offsets":[8,72]}}"#,
        72,
    );
    let gap = |e: &Error| matches!(e, Error::TensorGap { tensor, previous: None, expected: 0, got: 8, .. } if tensor == "layer1.bias");
    assert!(gap(&err), "{err}");
    assert!(problems.iter().any(gap), "{problems:?}");
}

#[test]
fn tensor_overlap_is_reported_by_verify_and_load() {
    let (problems, err) = with_model_layout(
        r#"{"a":{"dtype":"F64","shape":[8],"data_offsets":[0,64]},"b":{"dtype":"F64","shape":[1],"data_offsets":[56,64]}}"#,
        64,
    );
    let overlap = |e: &Error| matches!(e, Error::TensorOverlap { tensor, previous, .. } if tensor == "b" && previous == "a");
    assert!(overlap(&err), "{err}");
    assert!(problems.iter().any(overlap), "{problems:?}");
}

#[test]
fn trailing_bytes_are_reported_by_verify_and_load() {
    let (problems, err) = with_model_layout(
        r#"{"layer1.bias":{"dtype":"F64","shape":[8],"data_offsets":[0,64]}}"#,
        65,
    );
    let trailing = |e: &Error| matches!(e, Error::TrailingBytes { last_tensor: Some(t), .. } if t == "layer1.bias");
    assert!(trailing(&err), "{err}");
    assert!(problems.iter().any(trailing), "{problems:?}");
}

#[test]
fn missing_file() {
    let (_run, p) = saved();
    std::fs::remove_file(p.join("state.json")).unwrap();
    let err = load(&p).unwrap_err();
    assert!(matches!(err, Error::MissingFile { .. }), "{err}");
    assert_names(&err, "state.json");
}

#[test]
fn two_writers_on_one_run_dir() {
    let run = tempfile::tempdir().unwrap();
    let _first = CheckpointDir::open(run.path()).unwrap();
    let err = CheckpointDir::open(run.path()).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    assert_names(&err, ".lock");
    assert!(err.to_string().contains("another process"));
    // Readers are not blocked by the writer.
    assert!(CheckpointDir::open_read_only(run.path()).is_ok());
    drop(_first);
    assert!(CheckpointDir::open(run.path()).is_ok());
}

#[test]
fn verify_reports_every_problem() {
    let (_run, p) = saved();
    std::fs::remove_file(p.join("state.json")).unwrap();
    let f = p.join("model.safetensors");
    let mut b = std::fs::read(&f).unwrap();
    let n = b.len();
    b[n - 1] ^= 1;
    std::fs::write(&f, &b).unwrap();
    let o = p.join("optimizer.safetensors");
    let ob = std::fs::read(&o).unwrap();
    std::fs::write(&o, &ob[..ob.len() - 1]).unwrap();
    let r = verify(&p);
    assert!(!r.is_ok());
    let kinds: Vec<&str> = r
        .problems
        .iter()
        .map(|e| match e {
            Error::MissingFile { .. } => "missing",
            Error::ChecksumMismatch { .. } => "checksum",
            Error::FileSize { .. } => "size",
            _ => "other",
        })
        .collect();
    assert!(
        kinds.contains(&"missing") && kinds.contains(&"checksum") && kinds.contains(&"size"),
        "{:?}",
        r.problems
    );
}

#[test]
fn delete_is_safe() {
    let run = tempfile::tempdir().unwrap();
    let dir = CheckpointDir::open(run.path()).unwrap();
    let a = dir.save("a", &sample(1)).unwrap();
    let b = dir.save("b", &sample(2)).unwrap();
    assert!(matches!(dir.delete("b"), Err(Error::DeleteLatest { .. })));
    assert!(matches!(dir.delete("../b"), Err(Error::InvalidName { .. })));
    assert!(matches!(
        dir.delete("nope"),
        Err(Error::NoSuchCheckpoint { .. })
    ));
    let reader = load(&a).unwrap();
    let err = dir.delete("a").unwrap_err();
    assert!(matches!(err, Error::InUse { .. }), "{err}");
    drop(reader);
    dir.delete("a").unwrap();
    assert!(!a.exists());
    assert!(b.exists());
    assert_eq!(dir.list().unwrap().len(), 1);
    assert!(dir.temporaries().unwrap().is_empty());
    let ro = CheckpointDir::open_read_only(run.path()).unwrap();
    assert!(matches!(ro.delete("b"), Err(Error::ReadOnly { .. })));
}

#[test]
fn list_latest_resolve() {
    let run = tempfile::tempdir().unwrap();
    let dir = CheckpointDir::open(run.path()).unwrap();
    assert_eq!(dir.latest().unwrap(), None);
    dir.save("step=10", &sample(10)).unwrap();
    let p2 = dir.save("step=2", &sample(2)).unwrap();
    std::fs::create_dir(dir.path().join(".tmp-crashed")).unwrap();
    std::fs::create_dir(dir.path().join("not-a-checkpoint")).unwrap();
    let names: Vec<String> = dir.list().unwrap().into_iter().map(|i| i.name).collect();
    assert_eq!(names, vec!["step=2", "step=10"]);
    // `latest` is a hint: the newest committed checkpoint by step wins.
    let p10 = dir.path().join("step=10");
    assert_eq!(dir.latest().unwrap(), Some(p10.clone()));
    assert_eq!(dir.resolve("last").unwrap(), p10);
    assert_eq!(dir.resolve("step=10").unwrap(), dir.path().join("step=10"));
    assert_eq!(dir.resolve(p2.to_str().unwrap()).unwrap(), p2);
    assert!(matches!(
        dir.resolve("step=3"),
        Err(Error::NoSuchCheckpoint { .. })
    ));
    // The same state again is an idempotent commit; other state is a conflict.
    assert_eq!(dir.save("step=2", &sample(2)).unwrap(), p2);
    let err = dir.save("step=2", &sample(3)).unwrap_err();
    assert!(matches!(err, Error::CommitConflict { .. }), "{err}");
    assert_names(&err, "step=2");
    let ro = CheckpointDir::open_read_only(run.path()).unwrap();
    assert_eq!(
        ro.temporaries().unwrap(),
        vec![dir.path().join(".tmp-crashed")]
    );
    drop(dir);
    let dir = CheckpointDir::open(run.path()).unwrap();
    assert!(dir.temporaries().unwrap().is_empty());
    // A pointer naming nothing falls back on the committed checkpoints...
    std::fs::write(dir.path().join("latest"), "gone\n").unwrap();
    assert_eq!(dir.latest().unwrap(), Some(p10));
    // ...and is an error only when there are none.
    let empty = tempfile::tempdir().unwrap();
    let dir = CheckpointDir::open(empty.path()).unwrap();
    std::fs::write(dir.path().join("latest"), "gone\n").unwrap();
    let err = dir.latest().unwrap_err();
    assert!(matches!(err, Error::LatestDangling { .. }), "{err}");
    assert_names(&err, "gone");
}

#[test]
fn failed_write_keeps_previous_checkpoint() {
    use relume_ckpt::{FaultyStorage, LocalStorage};
    use std::sync::Arc;
    let run = tempfile::tempdir().unwrap();
    let storage = FaultyStorage::new(LocalStorage);
    let dir = CheckpointDir::open_with_storage(run.path(), Arc::new(storage.clone())).unwrap();
    let first = dir.save("step=1", &sample(1)).unwrap();
    // The last budget lets every data file through and fails the manifest write.
    let data_bytes = dir.list().unwrap()[0].bytes;
    for budget in [0u64, 10, 300, data_bytes] {
        storage.fail_after_bytes(budget);
        let err = dir.save("step=2", &sample(2)).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert!(err.to_string().contains("injected write failure"), "{err}");
        assert!(
            err.to_string().contains(".tmp-"),
            "error names the file: {err}"
        );
        assert_eq!(dir.latest().unwrap(), Some(first.clone()));
        assert!(verify(&first).is_ok());
        assert!(dir.temporaries().unwrap().is_empty());
        assert_eq!(dir.list().unwrap().len(), 1);
    }
    storage.fail_after_bytes(u64::MAX);
    dir.save("step=2", &sample(2)).unwrap();
}

/// Every byte (data files and manifest) is written, then the concurrent fsyncs
/// fail: the error names the fsync and a file of the temporary, and nothing of the
/// failed save remains.
#[test]
fn failed_fsync_keeps_previous_checkpoint() {
    use relume_ckpt::{FaultyStorage, LocalStorage};
    use std::sync::Arc;
    let scratch = tempfile::tempdir().unwrap();
    let probe = CheckpointDir::open(scratch.path()).unwrap();
    let probe_path = probe.save("step=2", &sample(2)).unwrap();
    let all_bytes: u64 = std::fs::read_dir(&probe_path)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();

    let run = tempfile::tempdir().unwrap();
    let storage = FaultyStorage::new(LocalStorage);
    let dir = CheckpointDir::open_with_storage(run.path(), Arc::new(storage.clone())).unwrap();
    let first = dir.save("step=1", &sample(1)).unwrap();
    storage.fail_after_bytes(all_bytes);
    let err = dir.save("step=2", &sample(2)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(
        msg.contains("fsync") && msg.contains(".tmp-step=2"),
        "{msg}"
    );
    assert_eq!(dir.latest().unwrap(), Some(first.clone()));
    assert!(verify(&first).is_ok());
    assert!(dir.temporaries().unwrap().is_empty());
    assert_eq!(dir.list().unwrap().len(), 1);
}

#[test]
fn malformed_safetensors_header() {
    let (_run, p) = saved();
    let body = b"{not json}";
    let mut b = (body.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(body);
    replace_file_consistently(&p, "model.safetensors", &b);
    let err = load(&p).unwrap_err();
    assert!(matches!(err, Error::SafetensorsHeader { .. }), "{err}");
    assert_names(&err, "model.safetensors");
}

#[test]
fn state_json_disagreeing_with_manifest() {
    let (_run, p) = saved();
    let state = br#"{"loop":{"step":1},"model":{},"optimizer":{"0/lr":0.01}}"#;
    replace_file_consistently(&p, "state.json", state);
    let err = load(&p).unwrap_err();
    assert!(matches!(err, Error::Inconsistent { .. }), "{err}");
    assert_names(&err, "state.json");
    assert_names(&err, "loop");
}

#[test]
fn oversized_manifest() {
    let (_run, p) = saved();
    let f = std::fs::File::options()
        .append(true)
        .open(p.join("manifest.json"))
        .unwrap();
    f.set_len(relume_ckpt::manifest::MAX_MANIFEST_BYTES + 1)
        .unwrap();
    let err = load(&p).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LimitExceeded {
                what: "manifest bytes",
                ..
            }
        ),
        "{err}"
    );
    assert_names(&err, "manifest.json");
}

#[test]
fn invalid_names_are_rejected() {
    let run = tempfile::tempdir().unwrap();
    let dir = CheckpointDir::open(run.path()).unwrap();
    for bad in ["", ".hidden", "latest", "a/b", "../x", "sp ace"] {
        let err = dir.save(bad, &sample(1)).unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err}");
    }
    let mut c = sample(1);
    let m = c.components.remove("model").unwrap();
    c.components.insert("../model".into(), m);
    assert!(matches!(dir.save("ok", &c), Err(Error::InvalidName { .. })));
    assert!(dir.list().unwrap().is_empty());
    assert!(dir.temporaries().unwrap().is_empty());
}
