//! Format migrations, tested on the committed v0 fixture `tests/data/v0/step-5/`.

use std::path::{Path, PathBuf};

use relume_ckpt::migrate::{detect_version, read_any, upgrade, v0, MIGRATIONS};
use relume_ckpt::{load, migrate_dir, migrate_in_place, verify, Error, TensorData, FORMAT_VERSION};
use serde_json::json;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/v0/step-5")
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn check_migrated(p: &Path) {
    assert!(verify(p).is_ok(), "{:?}", verify(p).problems);
    let l = load(p).unwrap();
    assert_eq!(l.manifest.format_version, FORMAT_VERSION);
    assert_eq!(l.manifest.relume_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(l.manifest.progress, json!({"step": 5, "epoch": 1}));
    assert_eq!(l.manifest.config, json!({"lr": 0.1}));
    assert!(l.manifest.metrics.is_empty());
    assert_eq!(
        l.manifest.fingerprint,
        relume_ckpt::fingerprint(&l.components)
    );
    let w = l.components["model"]
        .require_tensor("linear.weight")
        .unwrap();
    assert_eq!(w.to_f32_vec().unwrap(), vec![0.5, -1.0, 2.0, 0.25]);
    assert_eq!(w.shape(), &[2, 2]);
    let m = l.components["optimizer"]
        .require_tensor("0/linear.weight/momentum")
        .unwrap();
    assert_eq!(m.to_f32_vec().unwrap(), vec![0.1, 0.2, 0.3, 0.4]);
    assert_eq!(
        l.components["loop"].require_json("step").unwrap(),
        &json!(5)
    );
    assert_eq!(
        l.components["optimizer"].require_json("0/lr").unwrap(),
        &json!(0.1)
    );
}

#[test]
fn v0_fixture_is_detected_and_not_loaded_silently() {
    assert_eq!(detect_version(&fixture()).unwrap(), 0);
    let err = load(fixture()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::OldFormatVersion {
                found: 0,
                current: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("relume migrate"));
}

#[test]
fn v0_migrates_to_v1_in_a_new_directory() {
    let out = tempfile::tempdir().unwrap();
    let dst = out.path().join("step-5-v1");
    let p = migrate_dir(&fixture(), &dst, FORMAT_VERSION).unwrap();
    assert_eq!(p, dst);
    check_migrated(&p);
    // Migrating an already-current checkpoint is an identity on the state.
    let again = migrate_dir(&p, &out.path().join("again"), FORMAT_VERSION).unwrap();
    assert_eq!(
        load(&again).unwrap().components,
        load(&p).unwrap().components
    );
    assert!(matches!(
        migrate_dir(&fixture(), &dst, 2),
        Err(Error::UnsupportedFormatVersion { .. })
    ));
}

#[test]
fn v0_migrates_in_place_atomically() {
    let out = tempfile::tempdir().unwrap();
    let p = out.path().join("step-5");
    copy_dir(&fixture(), &p);
    migrate_in_place(&p, FORMAT_VERSION).unwrap();
    check_migrated(&p);
    let leftovers: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("step-5")]);
}

#[test]
fn migration_is_a_pure_function_of_manifest_and_state() {
    let (from, m) = read_any(&fixture()).unwrap();
    assert_eq!(from, 0);
    assert_eq!(MIGRATIONS.len() as u64, FORMAT_VERSION);
    let a = upgrade(m.clone(), 0, 1).unwrap();
    let b = v0::to_v1(m.clone()).unwrap();
    assert_eq!(a.manifest, b.manifest);
    assert_eq!(a.components, m.components);
    assert_eq!(a.manifest["created_at"], json!("2025-01-02T03:04:05Z"));
    let mut broken = m;
    broken.manifest["timestamp"] = json!("yesterday");
    assert!(matches!(
        v0::to_v1(broken),
        Err(Error::Migration { from: 0, .. })
    ));
}

#[test]
fn corrupt_v0_fixture_is_rejected() {
    let out = tempfile::tempdir().unwrap();
    let p = out.path().join("step-5");
    copy_dir(&fixture(), &p);
    let f = p.join(v0::V0_TENSORS);
    let mut b = std::fs::read(&f).unwrap();
    let n = b.len();
    b[n - 1] ^= 4;
    std::fs::write(&f, b).unwrap();
    let err = migrate_dir(&p, &out.path().join("x"), FORMAT_VERSION).unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
}

/// Regenerates the committed fixture: `cargo test -p relume-ckpt --test migrate -- --ignored`.
#[test]
#[ignore]
fn regenerate_v0_fixture() {
    let dir = fixture();
    std::fs::create_dir_all(&dir).unwrap();
    let w = TensorData::from_f32(vec![2, 2], &[0.5, -1.0, 2.0, 0.25]).unwrap();
    let b = TensorData::from_f32(vec![2], &[0.0, 1.0]).unwrap();
    let mo = TensorData::from_f32(vec![2, 2], &[0.1, 0.2, 0.3, 0.4]).unwrap();
    let tensors = [
        ("model/linear.bias", &b),
        ("model/linear.weight", &w),
        ("optimizer/0/linear.weight/momentum", &mo),
    ];
    let mut bytes = relume_ckpt::tensor_file::encode_header(&tensors);
    for (_, t) in &tensors {
        bytes.extend_from_slice(t.bytes());
    }
    let state =
        serde_json::to_vec(&json!({"loop": {"step": 5, "epoch": 1}, "optimizer": {"0/lr": 0.1}}))
            .unwrap();
    std::fs::write(dir.join(v0::V0_TENSORS), &bytes).unwrap();
    std::fs::write(dir.join("state.json"), &state).unwrap();
    let entry = |name: &str, b: &[u8]| json!({"name": name, "size": b.len(), "blake3": blake3::hash(b).to_hex().to_string()});
    let manifest = json!({
        "version": 0,
        "relume": "0.0.3",
        "timestamp": 1_735_787_045u64,
        "files": [entry(v0::V0_TENSORS, &bytes), entry("state.json", &state)],
        "components": ["loop", "model", "optimizer"],
        "progress": {"step": 5, "epoch": 1},
        "config": {"lr": 0.1},
        "complete": true
    });
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
}

#[test]
fn in_place_migration_inside_a_run_holds_the_writer_lock() {
    let run = tempfile::tempdir().unwrap();
    let dir = relume_ckpt::CheckpointDir::open(run.path()).unwrap();
    let p = dir.path().join("step-5");
    copy_dir(&fixture(), &p);
    // A training run holds the directory: the migration is refused, nothing changes.
    let err = migrate_in_place(&p, FORMAT_VERSION).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    assert!(verify(&p)
        .problems
        .iter()
        .any(|e| matches!(e, Error::OldFormatVersion { .. })));
    drop(dir);
    migrate_in_place(&p, FORMAT_VERSION).unwrap();
    check_migrated(&p);
}
