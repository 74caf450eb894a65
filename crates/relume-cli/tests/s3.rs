//! `relume ls|inspect|verify|diff` on `s3://` URLs against the local S3 server
//! (`.ci/run` starts it; without it those tests are skipped loudly, and fail under
//! CI), and the bad-input errors, which need no server.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use relume_ckpt::remote::{store_for, test_bucket, RemoteUrl};
use relume_ckpt::{Checkpoint, CheckpointDir, StateDict, TensorData};

fn relume(args: &[&str], env: &[(&str, &str)], remove: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_relume"));
    c.args(args).env_remove("RELUME_LOG");
    for k in remove {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run relume")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ckpt(step: u64) -> Checkpoint {
    let mut model = StateDict::new();
    let w: Vec<f32> = (0..64).map(|i| i as f32 + step as f32).collect();
    model.insert_tensor(
        "layer.weight",
        TensorData::from_f32(vec![8, 8], &w).unwrap(),
    );
    model.insert_tensor(
        "layer.bias",
        TensorData::from_f32(vec![8], &[0.5; 8]).unwrap(),
    );
    let mut c = Checkpoint::default();
    c.components.insert("model".into(), model);
    c.progress = serde_json::json!({"step": step, "epoch": 0, "global_step": step});
    c.metrics.insert("val_loss".into(), 1.0 / step as f64);
    c
}

/// A run in the test bucket with two checkpoints; its URL.
fn remote_run() -> Option<PathBuf> {
    let b = test_bucket()?;
    let run = PathBuf::from(format!("s3://{b}/cli-{}", uuid::Uuid::new_v4().simple()));
    let dir = CheckpointDir::open(&run).unwrap();
    dir.save("step=000001", &ckpt(1)).unwrap();
    dir.save("step=000002", &ckpt(2)).unwrap();
    Some(run)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn ls_inspect_verify_and_diff_take_s3_urls() {
    let Some(run) = remote_run() else { return };
    let o = relume(&["ls", s(&run)], &[], &[]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(
        out.contains("step=000001") && out.contains("step=000002"),
        "{out}"
    );
    assert!(out.contains("latest"), "{out}");

    let o = relume(&["verify", s(&run)], &[], &[]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(out.contains("step=000002"), "{out}");

    // Exit 1: read and verified, but these bare checkpoints lack the trainer's
    // components, so the verdict is "cannot resume".
    let o = relume(&["inspect", s(&run), "--json"], &[], &[]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(
        out.contains("s3://") && out.contains("step=000002"),
        "{out}"
    );
    assert!(out.contains("\"step\": 2"), "{out}");

    let a = run.join("checkpoints/step=000001");
    let b = run.join("checkpoints/step=000002");
    let o = relume(&["diff", s(&a), s(&b)], &[], &[]);
    let (out, err) = text(&o);
    assert!(out.contains("layer.weight"), "{out}{err}");
    // The same checkpoint locally and in the bucket: no difference.
    let local = tempfile::tempdir().unwrap();
    let lp = CheckpointDir::open(local.path())
        .unwrap()
        .save("step=000002", &ckpt(2))
        .unwrap();
    let o = relume(&["diff", s(&lp), s(&b)], &[], &[]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
}

#[test]
fn verify_names_an_object_altered_in_the_bucket() {
    let Some(run) = remote_run() else { return };
    let u = RemoteUrl::from_path(&run).unwrap();
    let store = store_for(&u.bucket).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = rt.block_on(async {
        use futures_util::StreamExt;
        let prefix = object_store::path::Path::from(format!("{}/checkpoints/step=000001", u.key));
        let mut l = store.list(Some(&prefix));
        let mut found = None;
        while let Some(m) = l.next().await {
            let m = m.unwrap();
            if m.location.as_ref().ends_with("model.safetensors") {
                found = Some(m.location);
            }
        }
        found.unwrap()
    });
    use object_store::ObjectStoreExt;
    let mut bytes = rt
        .block_on(async { store.get(&key).await.unwrap().bytes().await })
        .unwrap()
        .to_vec();
    let n = bytes.len();
    bytes[n - 5] ^= 1;
    rt.block_on(store.put(&key, bytes.into())).unwrap();
    let o = relume(&["verify", s(&run)], &[], &[]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(out.contains("model.safetensors"), "{out}");
    assert!(out.contains("layer."), "the damaged tensor is named: {out}");
    assert!(out.contains("step=000001"), "{out}");
}

#[test]
fn a_missing_bucket_is_named() {
    let Some(_) = test_bucket() else { return };
    let url = format!("s3://relume-missing-{}/run", uuid::Uuid::new_v4().simple());
    let o = relume(&["ls", &url], &[], &[]);
    let (out, err) = text(&o);
    assert_ne!(o.status.code(), Some(0), "{out}");
    assert!(
        err.contains(&url) || err.contains("relume-missing"),
        "{err}"
    );
    assert!(err.contains("bucket does not exist"), "{err}");
}

const CREDS: [&str; 6] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "RELUME_S3_INSTANCE_CREDENTIALS",
];

#[test]
fn missing_credentials_are_named_with_the_fix() {
    let cwd = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_relume"))
        .args(["ls", "s3://some-bucket/run"])
        .current_dir(cwd.path())
        .env_remove("RELUME_LOG")
        .envs(CREDS.iter().map(|k| (*k, "")))
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert_ne!(o.status.code(), Some(0), "{out}");
    assert!(err.contains("s3://some-bucket"), "{err}");
    assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");
    // Nothing fell back to the local filesystem.
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0);
}

#[test]
fn an_unreachable_endpoint_is_named_with_the_fix() {
    let o = relume(
        &["verify", "s3://some-bucket/run"],
        &[
            ("AWS_ENDPOINT", "http://127.0.0.1:9"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "x"),
            ("AWS_SECRET_ACCESS_KEY", "y"),
            ("AWS_REGION", "us-east-1"),
        ],
        &[],
    );
    let (out, err) = text(&o);
    assert_ne!(o.status.code(), Some(0), "{out}");
    assert!(err.contains("s3://some-bucket"), "{err}");
    assert!(err.contains("cannot reach http://127.0.0.1:9"), "{err}");
    assert!(err.contains("AWS_ENDPOINT"), "{err}");
}

#[test]
fn commands_without_s3_support_refuse_urls() {
    for args in [
        vec!["plot", "s3://b/run"],
        vec!["migrate", "s3://b/run/checkpoints/step=1"],
        vec!["lightning", "inspect", "s3://b/x.ckpt"],
    ] {
        let o = relume(&args, &[], &[]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {out}{err}");
        assert!(err.contains("works on local paths only"), "{args:?}: {err}");
        assert!(err.contains("s3://b/"), "{err}");
    }
}
