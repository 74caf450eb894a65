//! Interop: a tensor file written by relume-ckpt loads in Python's `safetensors`
//! (numpy backend) with identical values, and the tensor-file layouts relume's reader
//! rejects (gaps, overlaps, trailing bytes) are rejected by Python's and Rust's
//! `safetensors` too. Needs `python3` with `safetensors` and `numpy`
//! (`pip install -r .ci/requirements.txt`): when they are missing the tests fail if
//! `CI` is set and are skipped with a note otherwise.

use std::path::Path;
use std::process::Command;

use relume_ckpt::tensor_file::{encode_header, parse_header};
use relume_ckpt::{Checkpoint, CheckpointDir, DType, Error, StateDict, TensorBytes, TensorData};
use serde_json::{json, Value};

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
    // IEEE half: 0.5 = 0x3800, -3.0 = 0xc200 (little-endian).
    let f16b: Vec<u8> = vec![0x00, 0x38, 0x00, 0xc2];
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

/// A safetensors file with header `body` (a JSON object) and `data` bytes after it.
fn layout(body: &str, data: usize) -> Vec<u8> {
    let mut bytes = (body.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(body.as_bytes());
    bytes.extend((0..data).map(|i| i as u8));
    bytes
}

/// The name of the error relume reports for a layout, or `"ok"`.
fn relume_verdict(path: &Path, bytes: &[u8]) -> &'static str {
    match parse_header(path, bytes, bytes.len() as u64) {
        Ok(_) => "ok",
        Err(Error::TensorGap { .. }) => "gap",
        Err(Error::TensorOverlap { .. }) => "overlap",
        Err(Error::TrailingBytes { .. }) => "trailing",
        Err(other) => panic!("{}: unexpected error {other}", path.display()),
    }
}

#[test]
fn python_safetensors_rejects_the_layouts_relume_rejects() {
    let one = |k: &str, b: u64| {
        format!(
            r#""{k}":{{"dtype":"F32","shape":[1],"data_offsets":[{b},{}]}}"#,
            b + 4
        )
    };
    let a = TensorData::from_f32(vec![2], &[1.0, 2.0]).unwrap();
    let b = TensorData::from_i64(vec![1], &[7]).unwrap();
    let mut written = encode_header(&[("a", &a), ("b", &b)]);
    written.extend_from_slice(a.bytes());
    written.extend_from_slice(b.bytes());
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("relume_writer", "ok", written),
        (
            "hand_written",
            "ok",
            layout(&format!("{{{},{}}}", one("a", 0), one("b", 4)), 8),
        ),
        (
            "gap",
            "gap",
            layout(&format!("{{{},{}}}", one("a", 0), one("b", 8)), 12),
        ),
        (
            "first_not_at_zero",
            "gap",
            layout(&format!("{{{}}}", one("a", 4)), 8),
        ),
        (
            "overlap",
            "overlap",
            layout(&format!("{{{},{}}}", one("a", 0), one("b", 2)), 6),
        ),
        (
            "same_offsets",
            "overlap",
            layout(&format!("{{{},{}}}", one("a", 0), one("b", 0)), 4),
        ),
        (
            "trailing",
            "trailing",
            layout(&format!("{{{}}}", one("a", 0)), 5),
        ),
        ("trailing_no_tensors", "trailing", layout("{}", 3)),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (name, want, bytes) in &cases {
        let path = tmp.path().join(format!("{name}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(relume_verdict(&path, bytes), *want, "{name}: relume");
        let rust_ok = safetensors::SafeTensors::deserialize(bytes).is_ok();
        assert_eq!(rust_ok, *want == "ok", "{name}: rust safetensors disagrees");
        paths.push(path);
    }

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop_layout.py");
    let out = match Command::new("python3").arg(script).args(&paths).output() {
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
    assert!(out.status.success(), "python check failed: {text}");
    let verdicts: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(verdicts.len(), cases.len(), "{text}");
    for ((name, want, _), v) in cases.iter().zip(&verdicts) {
        for api in ["safe_open", "load_file"] {
            let rejected = !v[api].is_null();
            assert_eq!(
                rejected,
                *want != "ok",
                "{name}: python {api} {} it but relume says {want}: {v}",
                if rejected { "rejects" } else { "accepts" }
            );
        }
    }
}

fn missing(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but the interop check cannot run: {why}; pip install -r .ci/requirements.txt");
    }
    eprintln!("SKIPPED python interop: {why} (pip install -r .ci/requirements.txt to run it)");
}
