//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;

use relume_ckpt::manifest::{parse_sealed, seal};
use relume_ckpt::{Checkpoint, DType, StateDict, TensorBytes, TensorData};
use serde_json::json;

/// A small checkpoint with three components, mixed dtypes and JSON leaves.
pub fn sample(step: u64) -> Checkpoint {
    let mut model = StateDict::new();
    let w: Vec<f32> = (0..64).map(|i| i as f32 * 0.25 + step as f32).collect();
    model.insert_tensor(
        "layer1.weight",
        TensorData::from_f32(vec![8, 8], &w).unwrap(),
    );
    model.insert_tensor(
        "layer1.bias",
        TensorData::from_f64(vec![8], &[step as f64; 8]).unwrap(),
    );
    let half: Vec<u8> = (0..32u8).collect();
    model.insert_tensor(
        "emb.bf16",
        TensorData::new(DType::BF16, vec![4, 4], TensorBytes::owned(half)).unwrap(),
    );
    let mut opt = StateDict::new();
    opt.insert_tensor(
        "0/layer1.weight/exp_avg",
        TensorData::from_f32(vec![8, 8], &w).unwrap(),
    );
    opt.insert_tensor(
        "0/layer1.weight/step",
        TensorData::from_i64(vec![], &[step as i64]).unwrap(),
    );
    opt.insert_json("0/lr", json!(0.01));
    let mut lp = StateDict::new();
    lp.insert_json("step", json!(step));
    lp.insert_json("rng", json!([1u64, 2, 3, step]));
    let mut c = Checkpoint::default();
    c.components.insert("model".into(), model);
    c.components.insert("optimizer".into(), opt);
    c.components.insert("loop".into(), lp);
    c.progress = json!({"step": step, "epoch": step / 10});
    c.config = json!({"lr": 0.01, "batch_size": 4});
    c.metrics.insert("loss".into(), 1.0 / (step as f64 + 1.0));
    c
}

/// Reads the manifest of `ckpt` as JSON (without the self-checksum).
pub fn manifest_json(ckpt: &Path) -> serde_json::Value {
    let p = ckpt.join("manifest.json");
    parse_sealed(&p, &std::fs::read(&p).unwrap()).unwrap()
}

/// Writes `v` as the (correctly sealed) manifest of `ckpt`.
pub fn write_manifest(ckpt: &Path, v: &serde_json::Value) {
    std::fs::write(ckpt.join("manifest.json"), seal(v)).unwrap();
}

/// Replaces file `rel` of `ckpt` with `bytes` and updates the manifest so that its
/// size and checksum match: only the content's own validity is left to check.
pub fn replace_file_consistently(ckpt: &Path, rel: &str, bytes: &[u8]) {
    std::fs::write(ckpt.join(rel), bytes).unwrap();
    let mut v = manifest_json(ckpt);
    for f in v["files"].as_array_mut().unwrap() {
        if f["path"] == rel {
            f["bytes"] = json!(bytes.len());
            f["blake3"] = json!(blake3::hash(bytes).to_hex().to_string());
        }
    }
    write_manifest(ckpt, &v);
}
