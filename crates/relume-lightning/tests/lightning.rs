//! Contract tests of the Lightning `.ckpt` reader: real Lightning 2.6.6 files match their
//! `.expected.json` value for value; hostile pickles stay inert; bad input is a clear,
//! bounded error.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use relume_lightning::Error;
use relume_lightning::{
    parse_pickle, CallKind, CheckpointKind, LightningCheckpoint, Limits, MemoryStorages,
    OptimizerKind, PyValue, Severity, TorchDType,
};
use serde_json::Value;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/lightning")
}

// ---------------------------------------------------------------------------------------
// Expected-JSON comparison
// ---------------------------------------------------------------------------------------

/// The fixtures are written by Python's json, which spells non-finite floats as bare
/// `Infinity`/`-Infinity`/`NaN`; turn them into marker strings serde_json accepts.
fn parse_python_json(text: &str) -> Value {
    let mut out = String::with_capacity(text.len());
    let mut in_str = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_str {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let mut matched = false;
        for (token, marker) in [
            ("-Infinity", "\"__-inf__\""),
            ("Infinity", "\"__inf__\""),
            ("NaN", "\"__nan__\""),
        ] {
            if rest.starts_with(token) {
                out.push_str(marker);
                rest = &rest[token.len()..];
                matched = true;
                break;
            }
        }
        if matched {
            continue;
        }
        if c == '"' {
            in_str = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    serde_json::from_str(&out).expect("expected json parses")
}

fn expected_f64(v: &Value, at: &str) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().unwrap(),
        Value::String(s) if s == "__inf__" => f64::INFINITY,
        Value::String(s) if s == "__-inf__" => f64::NEG_INFINITY,
        Value::String(s) if s == "__nan__" => f64::NAN,
        other => panic!("{at}: expected a number, found {other}"),
    }
}

fn close(expected: f64, got: f64, scale: f64) -> bool {
    if expected.is_nan() {
        return got.is_nan();
    }
    if expected.is_infinite() {
        return expected == got;
    }
    (expected - got).abs() <= 1e-6 * (1.0 + scale)
}

/// Compares every value of `expected` with `actual`, counting the leaves checked.
fn compare(expected: &Value, actual: &PyValue, at: &str, checked: &mut usize) {
    match expected {
        Value::Object(map) if map.contains_key("__tensor__") => {
            let spec = &map["__tensor__"];
            let t = actual
                .as_tensor()
                .unwrap_or_else(|| panic!("{at}: expected a tensor, found {}", actual.type_name()));
            assert_eq!(
                t.dtype.torch_name(),
                spec["dtype"].as_str().unwrap(),
                "{at}: dtype"
            );
            let shape: Vec<usize> = spec["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(t.shape, shape, "{at}: shape");
            let abs_sum: f64 = t.to_f64_vec().unwrap().iter().map(|x| x.abs()).sum();
            let want_sum = expected_f64(&spec["sum"], at);
            let sum = t.sum_f64().unwrap();
            assert!(
                close(want_sum, sum, abs_sum),
                "{at}: sum {sum} != expected {want_sum}"
            );
            let want_first = expected_f64(&spec["first"], at);
            let first = t.first_f64().unwrap().unwrap();
            // serde_json's float parsing may be one ulp off the exact decimal; compare at
            // the tensor's own precision.
            assert!(
                want_first.is_nan() && first.is_nan()
                    || want_first == first
                    || (want_first - first).abs() <= 1e-12 * want_first.abs(),
                "{at}: first {first} != expected {want_first}"
            );
            *checked += 4;
        }
        Value::Object(map) => {
            let items = actual
                .dict_items()
                .unwrap_or_else(|| panic!("{at}: expected a dict, found {}", actual.type_name()));
            assert_eq!(
                items.len(),
                map.len(),
                "{at}: key count; got {:?}",
                items.iter().map(|(k, _)| k.key_label()).collect::<Vec<_>>()
            );
            for (k, v) in map {
                let child = actual
                    .get(k)
                    .unwrap_or_else(|| panic!("{at}: key {k:?} missing"));
                compare(v, child, &format!("{at}/{k}"), checked);
            }
        }
        Value::Array(list) => {
            let seq = actual
                .as_seq()
                .unwrap_or_else(|| panic!("{at}: expected a list, found {}", actual.type_name()));
            assert_eq!(seq.len(), list.len(), "{at}: length");
            for (i, (e, a)) in list.iter().zip(seq).enumerate() {
                compare(e, a, &format!("{at}[{i}]"), checked);
            }
        }
        Value::Null => {
            assert_eq!(actual, &PyValue::None, "{at}");
            *checked += 1;
        }
        Value::Bool(b) => {
            assert_eq!(actual, &PyValue::Bool(*b), "{at}");
            *checked += 1;
        }
        Value::String(s) if s.starts_with("__") && s.ends_with("__") && s.len() > 4 => {
            let want = expected_f64(expected, at);
            let got = actual
                .as_f64()
                .unwrap_or_else(|| panic!("{at}: not a float"));
            assert!(close(want, got, 0.0), "{at}: {got} != {want}");
            *checked += 1;
        }
        Value::String(s) => {
            assert_eq!(actual.as_str(), Some(s.as_str()), "{at}");
            *checked += 1;
        }
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                assert_eq!(actual, &PyValue::Int(i), "{at}");
            } else {
                let want = n.as_f64().unwrap();
                let got = match actual {
                    PyValue::Float(f) => *f,
                    other => panic!("{at}: expected a float, found {other:?}"),
                };
                assert!(
                    (want - got).abs() <= 1e-15 * want.abs(),
                    "{at}: {got} != {want}"
                );
            }
            *checked += 1;
        }
    }
}

fn check_fixture(name: &str) -> (LightningCheckpoint, usize) {
    let path = data_dir().join(name);
    let ckpt = LightningCheckpoint::open(&path).unwrap();
    let text = std::fs::read_to_string(data_dir().join(format!("{name}.expected.json"))).unwrap();
    let expected = parse_python_json(&text);
    let mut checked = 0;
    compare(&expected, ckpt.root(), name, &mut checked);
    (ckpt, checked)
}

#[test]
fn adam_steplr_epoch_end_matches_expected_json() {
    let (ckpt, checked) = check_fixture("adam_steplr_epoch_end.ckpt");
    assert!(checked > 150, "only {checked} leaves checked");
    assert_eq!(ckpt.kind(), CheckpointKind::Full);
    assert_eq!(ckpt.format_version(), Some("3"));
    assert_eq!(ckpt.lightning_version(), Some("2.6.6"));
    assert_eq!((ckpt.epoch(), ckpt.global_step()), (Some(1), Some(20)));
    let sd = ckpt.state_dict();
    let names: Vec<&str> = sd.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "body.0.weight",
            "body.0.bias",
            "body.2.weight",
            "body.2.bias"
        ]
    );
    assert_eq!(sd[0].1.shape, [32, 16]);
    let opts = ckpt.optimizers();
    assert_eq!(opts.len(), 1);
    assert_eq!(opts[0].kind, OptimizerKind::Adam);
    assert_eq!(opts[0].param_groups[0].params, [0, 1, 2, 3]);
    assert_eq!(opts[0].state_tensors().len(), 12);
    let sched = ckpt.lr_schedulers();
    assert_eq!(sched[0].kind, "StepLR");
    assert_eq!(sched[0].last_epoch, Some(20));
    assert_eq!(sched[0].last_lr, [0.000625]);
    let cbs = ckpt.callbacks();
    let names: Vec<&str> = cbs.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["EarlyStopping", "ModelCheckpoint"]);
    let mc = &cbs[1];
    let best = mc
        .highlights
        .iter()
        .find(|(k, _)| k == "best_model_score")
        .unwrap()
        .1;
    assert!((best.as_f64().unwrap() - 1.177_053_928_375_244_1).abs() < 1e-12);
    let progress = ckpt.loop_progress().unwrap();
    assert!(!progress.is_mid_epoch());
    assert_eq!(progress.optimizer_steps, 20);
    let codes: Vec<&str> = ckpt.diagnose().iter().map(|f| f.code).collect();
    assert_eq!(codes, ["full-state", "no-rng-state"]);
    assert!(ckpt.is_resumable());
}

#[test]
fn sgd_cosine_mid_epoch_matches_expected_json() {
    let (ckpt, checked) = check_fixture("sgd_cosine_mid_epoch.ckpt");
    assert!(checked > 100, "only {checked} leaves checked");
    assert_eq!(ckpt.optimizers()[0].kind, OptimizerKind::Sgd);
    assert_eq!(ckpt.lr_schedulers()[0].kind, "CosineAnnealingLR");
    let p = ckpt.loop_progress().unwrap();
    assert!(p.is_mid_epoch());
    assert_eq!(p.batches_in_epoch, 7);
    let findings = ckpt.diagnose();
    let mid = findings.iter().find(|f| f.code == "mid-epoch").unwrap();
    assert_eq!(mid.severity, Severity::Warning);
    assert!(mid.message.contains("replays data"), "{}", mid.message);
    assert!(findings.iter().any(|f| f.code == "no-rng-state"));
    assert!(ckpt.is_resumable());
}

#[test]
fn weights_only_matches_expected_json_and_cannot_resume() {
    let (ckpt, checked) = check_fixture("weights_only.ckpt");
    assert!(checked > 50, "only {checked} leaves checked");
    assert_eq!(ckpt.kind(), CheckpointKind::WeightsOnly);
    let findings = ckpt.diagnose();
    let blocker = &findings[0];
    assert_eq!(
        (blocker.severity, blocker.code),
        (Severity::Blocker, "weights-only")
    );
    for key in ["optimizer_states", "lr_schedulers", "callbacks"] {
        assert!(blocker.message.contains(key), "{}", blocker.message);
    }
    assert!(!blocker.message.contains("loops"), "{}", blocker.message);
    // It cannot resume at all, so a warning that a resume would not reproduce is noise.
    assert!(
        findings.iter().all(|f| f.code != "no-rng-state"),
        "{findings:?}"
    );
    assert!(!ckpt.is_resumable());
}

#[test]
fn truncated_fixture_is_a_clear_error() {
    let err = LightningCheckpoint::open(data_dir().join("truncated.ckpt")).unwrap_err();
    assert!(matches!(err, Error::ZipTruncated { .. }), "{err}");
    assert!(err.to_string().contains("truncated.ckpt"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Hand-built pickles and zips
// ---------------------------------------------------------------------------------------

/// A tiny pickle writer for hand-built inputs.
#[derive(Default)]
struct P(Vec<u8>);

impl P {
    fn proto(mut self) -> Self {
        self.0.extend([0x80, 2]);
        self
    }
    fn op(mut self, code: u8) -> Self {
        self.0.push(code);
        self
    }
    fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn global(mut self, module: &str, name: &str) -> Self {
        self.0.push(b'c');
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self
    }
    fn str(mut self, s: &str) -> Self {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn int(mut self, i: i32) -> Self {
        self.0.push(b'J');
        self.0.extend_from_slice(&i.to_le_bytes());
        self
    }
    fn stop(self) -> Vec<u8> {
        self.op(b'.').0
    }
}

fn run(bytes: &[u8]) -> Result<PyValue, Error> {
    parse_pickle(
        bytes,
        "test.pkl",
        &mut MemoryStorages::default(),
        &Limits::small(),
    )
}

fn marker(dir: &Path) -> PathBuf {
    dir.join("pwned")
}

fn assert_inert_call(v: &PyValue, module: &str, name: &str) {
    let PyValue::Call { func, .. } = v else {
        panic!("expected an inert call, got {v:?}");
    };
    assert_eq!(
        **func,
        PyValue::Global {
            module: module.into(),
            name: name.into()
        }
    );
}

#[test]
fn os_system_and_friends_come_back_as_inert_data() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = format!("touch {}", marker(dir.path()).display());
    let py = format!("__import__('os').system('{cmd}')");
    for (module, name, arg) in [
        ("os", "system", cmd.as_str()),
        ("posix", "system", cmd.as_str()),
        ("nt", "system", cmd.as_str()),
        ("builtins", "eval", py.as_str()),
        ("builtins", "exec", py.as_str()),
        ("__builtin__", "eval", py.as_str()),
        ("subprocess", "getoutput", cmd.as_str()),
    ] {
        let bytes = P::default()
            .proto()
            .global(module, name)
            .str(arg)
            .op(0x85) // TUPLE1
            .op(b'R') // REDUCE
            .stop();
        let v = run(&bytes).unwrap();
        assert_inert_call(&v, module, name);
        let PyValue::Call { args, kind, .. } = &v else {
            unreachable!()
        };
        assert_eq!(*kind, CallKind::Reduce);
        assert_eq!(args, &[PyValue::Str(arg.to_string())]);
    }
    // subprocess.check_call(['sh', '-c', cmd]) through STACK_GLOBAL and a list argument.
    let bytes = P::default()
        .proto()
        .op(0x8c)
        .raw(&[10])
        .raw(b"subprocess")
        .op(0x8c)
        .raw(&[10])
        .raw(b"check_call")
        .op(0x93) // STACK_GLOBAL
        .op(b']')
        .op(b'(')
        .str("sh")
        .str("-c")
        .str(&cmd)
        .op(b'e') // APPENDS
        .op(0x85)
        .op(b'R')
        .stop();
    assert_inert_call(&run(&bytes).unwrap(), "subprocess", "check_call");
    // NEWOBJ + BUILD (the __setstate__ route) stays inert too, keeping its state.
    let bytes = P::default()
        .proto()
        .global("os", "system")
        .op(b')')
        .op(0x81) // NEWOBJ
        .op(b'}')
        .str("cmd")
        .str(&cmd)
        .op(b's')
        .op(b'b') // BUILD
        .stop();
    let v = run(&bytes).unwrap();
    assert_inert_call(&v, "os", "system");
    let PyValue::Call { kind, state, .. } = &v else {
        unreachable!()
    };
    assert_eq!(*kind, CallKind::NewObj);
    assert_eq!(
        state.as_ref().unwrap().get("cmd").unwrap().as_str(),
        Some(cmd.as_str())
    );
    assert!(!marker(dir.path()).exists(), "a command ran");
}

#[test]
fn os_system_inside_a_ckpt_zip_is_inert() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = format!("touch {}", marker(dir.path()).display());
    let body = P::default()
        .proto()
        .op(b'}')
        .op(b'(')
        .str("pytorch-lightning_version")
        .str("2.6.6")
        .str("hyper_parameters")
        .global("os", "system")
        .str(&cmd)
        .op(0x85)
        .op(b'R')
        .op(b'u') // SETITEMS
        .stop();
    let path = dir.path().join("evil.ckpt");
    write_zip(
        &path,
        &[
            ("archive/data.pkl", &body),
            ("archive/byteorder", b"little"),
        ],
    );
    let ckpt = LightningCheckpoint::open(&path).unwrap();
    assert_inert_call(ckpt.hyper_parameters().unwrap(), "os", "system");
    assert_eq!(ckpt.kind(), CheckpointKind::WeightsOnly);
    assert!(!marker(dir.path()).exists(), "a command ran");
}

fn write_zip(path: &Path, entries: &[(&str, &[u8])]) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in entries {
        zip.start_file(*name, opts).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap();
}

/// `OrderedDict` of one tensor `name` over storage "0" with the given geometry.
fn state_dict_pickle(
    name: &str,
    storage: &str,
    numel: i32,
    offset: i32,
    size: &[i32],
    stride: &[i32],
) -> Vec<u8> {
    state_dict_ops(
        P::default().proto(),
        name,
        storage,
        numel,
        offset,
        size,
        stride,
    )
    .stop()
}

/// Appends the opcodes that push an `OrderedDict` of one tensor `name` over storage "0".
fn state_dict_ops(
    p: P,
    name: &str,
    storage: &str,
    numel: i32,
    offset: i32,
    size: &[i32],
    stride: &[i32],
) -> P {
    let mut p = p
        .global("collections", "OrderedDict")
        .op(b')')
        .op(b'R')
        .str(name)
        .global("torch._utils", "_rebuild_tensor_v2")
        .op(b'(')
        .op(b'(')
        .str("storage")
        .global("torch", storage)
        .str("0")
        .str("cpu")
        .int(numel)
        .op(b't')
        .op(b'Q') // BINPERSID
        .int(offset)
        .op(b'(');
    for &d in size {
        p = p.int(d);
    }
    p = p.op(b't').op(b'(');
    for &s in stride {
        p = p.int(s);
    }
    p.op(b't')
        .op(0x89)
        .global("collections", "OrderedDict")
        .op(b')')
        .op(b'R')
        .op(b't')
        .op(b'R')
        .op(b's') // SETITEM
}

#[test]
fn plain_torch_save_state_dict_is_weights_only() {
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    // A transposed 3x2 view of a 2x3 storage: exercises strides.
    let pickle = state_dict_pickle("w", "FloatStorage", 6, 0, &[3, 2], &[1, 3]);
    let path = dir.path().join("plain.pt");
    write_zip(
        &path,
        &[
            ("plain/data.pkl", &pickle),
            ("plain/byteorder", b"little"),
            ("plain/data/0", &values),
            ("plain/version", b"3\n"),
        ],
    );
    let ckpt = LightningCheckpoint::open(&path).unwrap();
    assert_eq!(ckpt.kind(), CheckpointKind::PlainStateDict);
    assert_eq!(ckpt.lightning_version(), None);
    let sd = ckpt.state_dict();
    assert_eq!(sd.len(), 1);
    assert_eq!(sd[0].1.shape, [3, 2]);
    assert_eq!(
        sd[0].1.to_f64_vec().unwrap(),
        [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
    );
    let findings = ckpt.diagnose();
    assert_eq!(findings.len(), 1);
    assert_eq!(findings[0].code, "plain-state-dict");
    assert!(findings[0].message.contains("optimizer_states"));
    assert!(!ckpt.is_resumable());
}

#[test]
fn every_storage_dtype_and_offsets_decode() {
    let cases: [(&str, TorchDType, Vec<u8>, f64); 10] = [
        (
            "FloatStorage",
            TorchDType::F32,
            1.5f32.to_le_bytes().to_vec(),
            1.5,
        ),
        (
            "DoubleStorage",
            TorchDType::F64,
            (-2.25f64).to_le_bytes().to_vec(),
            -2.25,
        ),
        (
            "HalfStorage",
            TorchDType::F16,
            half::f16::from_f32(0.5).to_le_bytes().to_vec(),
            0.5,
        ),
        (
            "BFloat16Storage",
            TorchDType::BF16,
            half::bf16::from_f32(3.0).to_le_bytes().to_vec(),
            3.0,
        ),
        (
            "LongStorage",
            TorchDType::I64,
            (-7i64).to_le_bytes().to_vec(),
            -7.0,
        ),
        (
            "IntStorage",
            TorchDType::I32,
            9i32.to_le_bytes().to_vec(),
            9.0,
        ),
        (
            "ShortStorage",
            TorchDType::I16,
            (-3i16).to_le_bytes().to_vec(),
            -3.0,
        ),
        ("CharStorage", TorchDType::I8, vec![0xfe], -2.0),
        ("ByteStorage", TorchDType::U8, vec![200], 200.0),
        ("BoolStorage", TorchDType::Bool, vec![1], 1.0),
    ];
    for (class, dtype, elem, value) in cases {
        // Storage of 3 elements [0, value, 0]; the tensor is element 1 (storage offset 1).
        let mut bytes = vec![0u8; elem.len()];
        bytes.extend_from_slice(&elem);
        bytes.extend(vec![0u8; elem.len()]);
        let mut storages = MemoryStorages::default();
        storages.storages.insert("0".into(), Arc::from(bytes));
        let pickle = state_dict_pickle("t", class, 3, 1, &[1], &[1]);
        let v = parse_pickle(&pickle, "t.pkl", &mut storages, &Limits::small()).unwrap();
        let t = v.get("t").unwrap().as_tensor().unwrap();
        assert_eq!(t.dtype, dtype, "{class}");
        assert_eq!(t.to_f64_vec().unwrap(), [value], "{class}");
    }
}

// ---------------------------------------------------------------------------------------
// Bad input: one test per error variant, each bounded in memory and time
// ---------------------------------------------------------------------------------------

#[test]
fn wrong_magic_is_not_a_zip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.ckpt");
    std::fs::write(&path, b"hello world, not a zip").unwrap();
    let err = LightningCheckpoint::open(&path).unwrap_err();
    assert!(matches!(err, Error::NotAZip { .. }), "{err}");
    // A legacy pickle-format file is named as such.
    std::fs::write(&path, [0x80, 0x02, 0x8a, 0x0a]).unwrap();
    let err = LightningCheckpoint::open(&path).unwrap_err();
    assert!(err.to_string().contains("legacy"), "{err}");
    std::fs::write(&path, b"").unwrap();
    assert!(matches!(
        LightningCheckpoint::open(&path).unwrap_err(),
        Error::NotAZip { .. }
    ));
}

#[test]
fn every_truncation_of_a_real_checkpoint_is_an_error() {
    let bytes = std::fs::read(data_dir().join("sgd_cosine_mid_epoch.ckpt")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.ckpt");
    for cut in (0..bytes.len()).step_by(97).chain([bytes.len() - 1]) {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = LightningCheckpoint::open(&path).unwrap_err();
        assert!(
            matches!(err, Error::ZipTruncated { .. } | Error::NotAZip { .. }),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn flipped_bytes_in_a_real_checkpoint_never_panic() {
    let bytes = std::fs::read(data_dir().join("adam_steplr_epoch_end.ckpt")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flip.ckpt");
    for at in (0..bytes.len()).step_by(41) {
        let mut b = bytes.clone();
        b[at] ^= 0x5a;
        std::fs::write(&path, &b).unwrap();
        // Either an error or a value: never a panic or a hang.
        let _outcome = LightningCheckpoint::open(&path).map(|c| c.diagnose().len());
    }
}

#[test]
fn missing_data_pkl_is_a_missing_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.ckpt");
    write_zip(&path, &[("archive/byteorder", b"little")]);
    let err = LightningCheckpoint::open(&path).unwrap_err();
    assert!(matches!(err, Error::ZipEntryMissing { .. }), "{err}");
    // A tensor whose storage entry is absent names the entry.
    let pickle = state_dict_pickle("w", "FloatStorage", 1, 0, &[1], &[1]);
    write_zip(&path, &[("archive/data.pkl", &pickle)]);
    let err = LightningCheckpoint::open(&path).unwrap_err();
    assert!(
        matches!(&err, Error::ZipEntryMissing { entry, .. } if entry == "archive/data/0"),
        "{err}"
    );
}

#[test]
fn big_endian_byte_order_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.ckpt");
    let pickle = P::default().proto().op(b'}').stop();
    write_zip(
        &path,
        &[("archive/data.pkl", &pickle), ("archive/byteorder", b"big")],
    );
    let err = LightningCheckpoint::open(&path).unwrap_err();
    assert!(matches!(err, Error::UnsupportedByteOrder { .. }), "{err}");
}

#[test]
fn top_level_list_is_a_structure_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.ckpt");
    let pickle = P::default().proto().op(b']').stop();
    write_zip(&path, &[("archive/data.pkl", &pickle)]);
    let err = LightningCheckpoint::open(&path).unwrap_err();
    assert!(matches!(err, Error::LightningStructure { .. }), "{err}");
}

#[test]
fn unknown_opcode_is_named() {
    let err = run(&P::default().proto().op(0xff).stop()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnknownOpcode {
                opcode: 0xff,
                offset: 2,
                ..
            }
        ),
        "{err}"
    );
    // Protocol-0 text opcodes and out-of-band buffers are outside the supported set.
    assert!(matches!(
        run(b"I1\n.").unwrap_err(),
        Error::UnknownOpcode { opcode: b'I', .. }
    ));
    assert!(matches!(
        run(&[0x80, 5, 0x97, b'.']).unwrap_err(),
        Error::UnknownOpcode { opcode: 0x97, .. }
    ));
}

#[test]
fn malformed_pickles_are_pickle_errors() {
    for (what, bytes) in [
        ("empty", vec![]),
        ("no stop", P::default().proto().op(b'N').0),
        ("underflow", P::default().proto().op(b'R').stop()),
        (
            "append to int",
            P::default().proto().int(1).int(2).op(b'a').stop(),
        ),
        ("bad memo", P::default().proto().raw(b"h\x07").stop()),
        ("protocol 6", vec![0x80, 6, b'N', b'.']),
        (
            "pop below mark",
            P::default().proto().op(b'N').op(b'(').op(b'0').stop(),
        ),
        (
            "truncated string",
            P::default().proto().raw(b"X\x10\x00\x00\x00abc").0,
        ),
        (
            "persid not storage",
            P::default().proto().str("x").op(b'Q').stop(),
        ),
        (
            "odd setitems",
            P::default()
                .proto()
                .op(b'}')
                .op(b'(')
                .int(1)
                .op(b'u')
                .stop(),
        ),
    ] {
        let err = run(&bytes).unwrap_err();
        assert!(matches!(err, Error::Pickle { .. }), "{what}: {err}");
    }
    // A storage whose bytes disagree with its declared numel.
    let mut storages = MemoryStorages::default();
    storages
        .storages
        .insert("0".into(), Arc::from(vec![0u8; 5]));
    let pickle = state_dict_pickle("w", "FloatStorage", 2, 0, &[2], &[1]);
    let err = parse_pickle(&pickle, "t.pkl", &mut storages, &Limits::small()).unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    // A view reaching past its storage.
    storages
        .storages
        .insert("0".into(), Arc::from(vec![0u8; 8]));
    let pickle = state_dict_pickle("w", "FloatStorage", 2, 1, &[2], &[1]);
    let err = parse_pickle(&pickle, "t.pkl", &mut storages, &Limits::small()).unwrap_err();
    assert!(matches!(err, Error::Pickle { .. }), "{err}");
}

fn limit_of(err: &Error) -> &'static str {
    match err {
        Error::PickleLimitExceeded { limit, .. } => limit,
        other => panic!("expected PickleLimitExceeded, got {other}"),
    }
}

#[test]
fn huge_declared_sizes_are_limit_errors() {
    // BINUNICODE / BINBYTES8 declaring 4 GiB / 2^63 bytes in a 10-byte input.
    let e = run(&P::default().proto().raw(b"X\xff\xff\xff\xff").stop()).unwrap_err();
    assert_eq!(limit_of(&e), "string length");
    let mut b8 = vec![0x80, 4, 0x8e];
    b8.extend_from_slice(&(1u64 << 63).to_le_bytes());
    assert_eq!(limit_of(&run(&b8).unwrap_err()), "string length");
    // LONG4 with a 2 GiB length, LONG1 over the small limit.
    let e = run(&P::default().proto().raw(b"\x8b\xff\xff\xff\x7f").stop()).unwrap_err();
    assert_eq!(limit_of(&e), "integer length");
    let mut long1 = vec![0x80, 2, 0x8a, 200];
    long1.extend(vec![1u8; 200]);
    long1.push(b'.');
    assert_eq!(limit_of(&run(&long1).unwrap_err()), "integer length");
    // A big LONG1 within limits decodes to a decimal string.
    let mut big = vec![0x80, 2, 0x8a, 9];
    big.extend([0, 0, 0, 0, 0, 0, 0, 0, 1]);
    big.push(b'.');
    assert_eq!(
        run(&big).unwrap(),
        PyValue::BigInt("18446744073709551616".into())
    );
    // A storage declaring 2^40 float elements.
    let pickle = state_dict_pickle("w", "FloatStorage", i32::MAX, 0, &[1], &[1]);
    let e = run(&pickle).unwrap_err();
    assert_eq!(limit_of(&e), "total tensor bytes");
    // A broadcast view (stride 0) that would materialise far more than the storage.
    let mut storages = MemoryStorages::default();
    storages
        .storages
        .insert("0".into(), Arc::from(vec![0u8; 4]));
    let pickle = state_dict_pickle("w", "FloatStorage", 1, 0, &[1 << 20, 1 << 10], &[0, 0]);
    let e = parse_pickle(&pickle, "t.pkl", &mut storages, &Limits::small()).unwrap_err();
    assert_eq!(limit_of(&e), "total tensor bytes");
}

#[test]
fn recursion_bombs_are_limit_errors() {
    // MARK bomb: a million open marks.
    let mut marks = vec![0x80, 2];
    marks.extend(vec![b'('; 1_000_000]);
    assert_eq!(limit_of(&run(&marks).unwrap_err()), "MARK nesting");
    // Deeply nested lists: ] ] ] ... a a a.
    let n = 2_000;
    let mut nested = vec![0x80, 2];
    nested.extend(vec![b']'; n]);
    nested.extend(vec![b'a'; n - 1]);
    nested.push(b'.');
    assert_eq!(limit_of(&run(&nested).unwrap_err()), "nesting depth");
    // A list that contains itself.
    let cycle = P::default()
        .proto()
        .op(b']')
        .raw(b"q\x00h\x00")
        .op(b'a')
        .stop();
    assert_eq!(limit_of(&run(&cycle).unwrap_err()), "nesting depth");
    // Billion laughs: each level is a list holding the previous level twice.
    let mut laughs = P::default().proto().str("lol").raw(b"q\x00");
    for i in 0..40u8 {
        laughs = laughs
            .op(b'(')
            .raw(&[b'h', i, b'h', i])
            .op(b'l')
            .raw(&[b'q', i + 1]);
    }
    let e = run(&laughs.stop()).unwrap_err();
    assert!(
        matches!(limit_of(&e), "decoded value count" | "total string bytes"),
        "{e}"
    );
    // A stack flood.
    let mut flood = vec![0x80, 2];
    flood.extend(vec![b'N'; 100_000]);
    assert_eq!(limit_of(&run(&flood).unwrap_err()), "stack depth");
    // Memo flood with distinct LONG_BINPUT indices.
    let mut memo = P::default().proto().op(b'N');
    for i in 0..10_000u32 {
        memo = memo.op(b'r').raw(&i.to_le_bytes());
    }
    assert_eq!(limit_of(&run(&memo.stop()).unwrap_err()), "memo entries");
}

#[test]
fn default_limits_are_generous_and_public() {
    let d = Limits::default();
    assert_eq!(d.memo_entries, relume_lightning::limits::MAX_MEMO_ENTRIES);
    assert!(d.total_tensor_bytes >= 1 << 30);
    assert!(Limits::small().total_tensor_bytes < d.total_tensor_bytes);
}

#[test]
fn oversized_pickle_is_a_limit_error() {
    let limits = Limits {
        pickle_bytes: 8,
        ..Limits::small()
    };
    let bytes = P::default().proto().str("0123456789").stop();
    let err = parse_pickle(&bytes, "t.pkl", &mut MemoryStorages::default(), &limits).unwrap_err();
    assert_eq!(limit_of(&err), "pickle size");
}

#[test]
fn repeated_calls_on_a_shared_huge_tuple_do_not_copy_it() {
    // A 3000-item tuple, then 3000 inert REDUCEs over it via the memo: linear work, and
    // the decoded tree is bounded by the value budget.
    let mut p = P::default()
        .proto()
        .global("os", "system")
        .raw(b"q\x00")
        .op(b'(');
    for _ in 0..3000 {
        p = p.op(b'N');
    }
    p = p.op(b't').raw(b"q\x01").op(b'0').op(b'0').op(b']');
    for _ in 0..3000 {
        p = p.raw(b"h\x00h\x01").op(b'R').op(b'a');
    }
    let err = run(&p.stop()).unwrap_err();
    assert_eq!(limit_of(&err), "decoded value count");
}

#[test]
fn tensors_convert_to_relume_leaves_except_int8_and_int16() {
    let ckpt = LightningCheckpoint::open(data_dir().join("weights_only.ckpt")).unwrap();
    for (name, t) in ckpt.state_dict() {
        let leaf = t.to_tensor_data(&name).unwrap();
        assert_eq!(leaf.shape(), t.shape.as_slice());
        let as_f64: Vec<f64> = leaf
            .to_f32_vec()
            .unwrap()
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        assert_eq!(as_f64, t.to_f64_vec().unwrap());
    }
    let mut storages = MemoryStorages::default();
    storages
        .storages
        .insert("0".into(), Arc::from(vec![1u8, 2]));
    let pickle = state_dict_pickle("c", "CharStorage", 2, 0, &[2], &[1]);
    let v = parse_pickle(&pickle, "t.pkl", &mut storages, &Limits::small()).unwrap();
    let err = v
        .get("c")
        .unwrap()
        .as_tensor()
        .unwrap()
        .to_tensor_data("c")
        .unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedTorchDType { tensor, dtype: "int8" } if tensor == "c"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// Laziness: reading a checkpoint reads no storage; conversion reads exactly the storages
// ---------------------------------------------------------------------------------------

/// Overwrites 16 bytes at `at` inside the data of stored entry `entry`, so that its
/// CRC-32 no longer matches and any read of the entry fails.
fn damage_entry(path: &Path, entry: &str, at: u64) {
    let start = {
        let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
        let index = zip.index_for_name(entry).unwrap();
        let file = zip.by_index_raw(index).unwrap();
        assert_eq!(file.compression(), zip::CompressionMethod::Stored);
        assert!(at + 16 <= file.size());
        file.data_start().unwrap()
    };
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(std::io::SeekFrom::Start(start + at)).unwrap();
    f.write_all(&[0xab; 16]).unwrap();
}

#[test]
fn inspecting_a_large_storage_reads_none_of_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.ckpt");
    // 64 MiB of float32: a 4096 x 4096 weight in a stored entry, as torch.save writes it.
    let (rows, cols) = (4096i32, 4096i32);
    let bytes = (rows * cols) as usize * 4;
    let p = P::default()
        .proto()
        .op(b'}')
        .op(b'(')
        .str("pytorch-lightning_version")
        .str("2.6.6")
        .str("epoch")
        .int(0)
        .str("global_step")
        .int(0)
        .str("state_dict");
    let pickle = state_dict_ops(
        p,
        "big.weight",
        "FloatStorage",
        rows * cols,
        0,
        &[rows, cols],
        &[cols, 1],
    )
    .op(b'u') // SETITEMS
    .stop();
    write_zip(
        &path,
        &[
            ("big/data.pkl", &pickle),
            ("big/byteorder", b"little"),
            ("big/data/0", &vec![0u8; bytes]),
            ("big/version", b"3\n"),
        ],
    );
    // Damage the storage: reading any of it in full now fails its CRC, so the reader
    // succeeding below proves it did not read it.
    damage_entry(&path, "big/data/0", bytes as u64 / 2);

    let ckpt = LightningCheckpoint::open(&path).unwrap();
    // Everything `relume lightning inspect` shows.
    assert_eq!(ckpt.kind(), CheckpointKind::WeightsOnly);
    let sd = ckpt.state_dict();
    assert_eq!(sd.len(), 1);
    let (name, t) = &sd[0];
    assert_eq!(name, "big.weight");
    assert_eq!(t.shape, [4096, 4096]);
    assert_eq!(t.nbytes(), bytes as u64);
    assert_eq!(t.storage().len(), bytes as u64);
    assert!(t.storage().is_zero_copy());
    assert_eq!(t.scalar_f64(), None);
    let json = ckpt.root().to_json();
    assert_eq!(
        json["state_dict"]["big.weight"]["tensor"]["shape"],
        serde_json::json!([4096, 4096])
    );
    let _ = ckpt.diagnose();
    let _ = (ckpt.optimizers(), ckpt.callbacks(), ckpt.loop_progress());
    assert_eq!(
        ckpt.storage_bytes_read(),
        0,
        "inspection read storage bytes"
    );
    assert_eq!(t.storage().bytes_read(), 0);

    // Reading the tensor does read the storage, and finds the damage.
    let err = t.to_tensor_data(name).unwrap_err();
    assert!(
        matches!(&err, Error::ZipTruncated { reason, .. } if reason.contains("big/data/0") && reason.contains("checksum")),
        "{err}"
    );
}

/// The view `(offset, shape, stride)` of `storage` gathered row-major, element by element.
fn gather(storage: &[u8], offset: u64, shape: &[usize], stride: &[u64], esize: usize) -> Vec<u8> {
    let numel: usize = shape.iter().product();
    let mut out = Vec::with_capacity(numel * esize);
    for flat in 0..numel {
        let (mut rest, mut pos) = (flat, offset as usize);
        for d in (0..shape.len()).rev() {
            pos += (rest % shape[d]) * stride[d] as usize;
            rest /= shape[d];
        }
        out.extend_from_slice(&storage[pos * esize..(pos + 1) * esize]);
    }
    out
}

/// Every tensor of a checkpoint (weights, then optimizer state) with a label.
fn all_tensors(ckpt: &LightningCheckpoint) -> Vec<(String, relume_lightning::TorchTensor)> {
    let mut out: Vec<_> = ckpt
        .state_dict()
        .into_iter()
        .map(|(n, t)| (n, t.clone()))
        .collect();
    for (i, o) in ckpt.optimizers().iter().enumerate() {
        out.extend(
            o.state_tensors()
                .into_iter()
                .map(|(n, t)| (format!("optimizer.{i}/{n}"), t.clone())),
        );
    }
    out
}

#[test]
fn converted_tensors_are_the_stored_bytes_without_a_copy() {
    for fixture in [
        "adam_steplr_epoch_end.ckpt",
        "sgd_cosine_mid_epoch.ckpt",
        "weights_only.ckpt",
    ] {
        let path = data_dir().join(fixture);
        let ckpt = LightningCheckpoint::open(&path).unwrap();
        assert_eq!(ckpt.storage_bytes_read(), 0, "{fixture}");
        let mut zip = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
        let prefix = zip
            .file_names()
            .find_map(|n| n.ok()?.strip_suffix("/data.pkl").map(str::to_string))
            .unwrap();
        let tensors = all_tensors(&ckpt);
        assert!(!tensors.is_empty(), "{fixture}");
        for (name, t) in &tensors {
            let leaf = t.to_tensor_data(name).unwrap();
            // What the eager reader did: inflate the entry (CRC-checked by the zip
            // crate), then copy the view out.
            let mut storage = Vec::new();
            zip.by_name(&format!("{prefix}/data/{}", t.storage_key()))
                .unwrap()
                .read_to_end(&mut storage)
                .unwrap();
            let esize = t.dtype.size_in_bytes();
            let want = gather(&storage, t.storage_offset(), &t.shape, t.stride(), esize);
            assert_eq!(&leaf.bytes()[..], &want[..], "{fixture}: {name}");
            assert!(leaf.bytes().is_mapped(), "{fixture}: {name} was copied");
        }
        assert!(ckpt.storage_bytes_read() > 0, "{fixture}");
    }
}

#[test]
fn a_compressed_storage_is_inflated_on_demand() {
    let src = data_dir().join("adam_steplr_epoch_end.ckpt");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deflated.ckpt");
    {
        let mut from = zip::ZipArchive::new(std::fs::File::open(&src).unwrap()).unwrap();
        let mut to = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for i in 0..from.len() {
            let mut entry = from.by_index(i).unwrap();
            let name = entry.name().unwrap().to_string();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            to.start_file(name, opts).unwrap();
            to.write_all(&bytes).unwrap();
        }
        to.finish().unwrap();
    }
    let stored = LightningCheckpoint::open(&src).unwrap();
    let deflated = LightningCheckpoint::open(&path).unwrap();
    let (a, b) = (all_tensors(&stored), all_tensors(&deflated));
    assert_eq!(a.len(), b.len());
    assert_eq!(deflated.storage_bytes_read(), 0);
    for ((name, s), (_, d)) in a.iter().zip(&b) {
        assert!(!d.storage().is_zero_copy(), "{name}");
        let (s, d) = (
            s.to_tensor_data(name).unwrap(),
            d.to_tensor_data(name).unwrap(),
        );
        assert_eq!(s, d, "{name}");
        assert!(!d.bytes().is_mapped(), "{name}");
    }
    // A scalar's value is one element, read without inflating past it.
    let best = stored
        .callbacks()
        .iter()
        .find_map(|c| c.state.get("best_model_score").cloned());
    let best_d = deflated
        .callbacks()
        .iter()
        .find_map(|c| c.state.get("best_model_score").cloned());
    assert_eq!(
        best.as_ref().and_then(PyValue::as_f64),
        best_d.as_ref().and_then(PyValue::as_f64)
    );
}
