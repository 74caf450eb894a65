//! Interop: a tensor file written by relume-ckpt loads in Python's `safetensors`
//! (numpy backend) with identical values. Needs `python3` with `safetensors` and
//! `numpy` (`pip install -r .ci/requirements.txt`): when they are missing the test
//! fails if `CI` is set and is skipped with a note otherwise.

use std::process::Command;

use relume_ckpt::{Checkpoint, CheckpointDir, DType, StateDict, TensorBytes, TensorData};
use serde_json::json;

#[test]
fn python_safetensors_reads_relume_files() {
    let mut sd = StateDict::new();
    let mut expected = serde_json::Map::new();
    let mut add = |key: &str,
                   dtype: DType,
                   numpy: &str,
                   shape: Vec<usize>,
                   bytes: Vec<u8>,
                   values: serde_json::Value| {
        sd.insert_tensor(
            key,
            TensorData::new(dtype, shape.clone(), TensorBytes::owned(bytes)).unwrap(),
        );
        expected.insert(
            key.into(),
            json!({"numpy": numpy, "shape": shape, "values": values}),
        );
    };
    let f32s = [1.5f32, -2.25, 3.0e-8, 1.0e30, 0.0, -0.0];
    add(
        "layer.weight",
        DType::F32,
        "float32",
        vec![2, 3],
        f32s.iter().flat_map(|v| v.to_le_bytes()).collect(),
        json!(f32s),
    );
    let f64s = [std::f64::consts::PI, -1.0e-300];
    add(
        "layer.bias",
        DType::F64,
        "float64",
        vec![2],
        f64s.iter().flat_map(|v| v.to_le_bytes()).collect(),
        json!(f64s),
    );
    let i64s = [i64::MIN, -1, 0, i64::MAX];
    add(
        "0/step",
        DType::I64,
        "int64",
        vec![4],
        i64s.iter().flat_map(|v| v.to_le_bytes()).collect(),
        json!(i64s),
    );
    let i32s = [7i32, -7];
    add(
        "idx",
        DType::I32,
        "int32",
        vec![1, 2],
        i32s.iter().flat_map(|v| v.to_le_bytes()).collect(),
        json!(i32s),
    );
    add(
        "bytes",
        DType::U8,
        "uint8",
        vec![3],
        vec![0, 128, 255],
        json!([0, 128, 255]),
    );
    add(
        "mask",
        DType::Bool,
        "bool",
        vec![2],
        vec![1, 0],
        json!([true, false]),
    );
    let f16s = [0.5f32, -3.0];
    let f16b: Vec<u8> = f16s
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    add("half", DType::F16, "float16", vec![2], f16b, json!(f16s));
    add(
        "scalar",
        DType::F32,
        "float32",
        vec![],
        42.0f32.to_le_bytes().to_vec(),
        json!(42.0),
    );
    add(
        "empty",
        DType::F32,
        "float32",
        vec![0, 4],
        vec![],
        json!([]),
    );

    let run = tempfile::tempdir().unwrap();
    let dir = CheckpointDir::open(run.path()).unwrap();
    let mut ckpt = Checkpoint::default();
    ckpt.components.insert("model".into(), sd);
    let path = dir.save("interop", &ckpt).unwrap();
    let expected_path = run.path().join("expected.json");
    std::fs::write(&expected_path, serde_json::to_vec(&expected).unwrap()).unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop_check.py");
    let out = match Command::new("python3")
        .arg(script)
        .arg(path.join("model.safetensors"))
        .arg(&expected_path)
        .output()
    {
        Ok(o) => o,
        Err(e) => return missing(&format!("cannot run python3: {e}")),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.code() == Some(3) {
        return missing(&text);
    }
    assert!(out.status.success(), "python safetensors disagrees: {text}");
    assert!(text.contains("ok: 9 tensors identical"), "{text}");
}

fn missing(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but the interop check cannot run: {why}; pip install -r .ci/requirements.txt");
    }
    eprintln!("SKIPPED python interop: {why} (pip install -r .ci/requirements.txt to run it)");
}
