//! Corruption: flip one random bit in each file of a checkpoint, in turn; `verify`
//! and `load` must detect it every time, naming the file, and naming the tensor when
//! the bit lies in a tensor's bytes.

mod common;

use std::path::Path;

use relume_ckpt::tensor_file::parse_header;
use relume_ckpt::{load, verify, CheckpointDir, Error};

const FLIPS_PER_FILE: usize = 40;

fn error_path(e: &Error) -> Option<&Path> {
    match e {
        Error::ManifestChecksum { path, .. }
        | Error::ManifestInvalid { path, .. }
        | Error::IncompleteManifest { path }
        | Error::UnsupportedFormatVersion { path, .. }
        | Error::UnsafePath { path, .. }
        | Error::ChecksumMismatch { path, .. }
        | Error::FileSize { path, .. }
        | Error::LimitExceeded { path, .. } => Some(path),
        _ => None,
    }
}

#[test]
fn every_single_bit_flip_is_detected_and_located() {
    let run = tempfile::tempdir().unwrap();
    let dir = CheckpointDir::open(run.path()).unwrap();
    let ckpt = dir.save("step=000007", &common::sample(7)).unwrap();
    let mut files: Vec<String> = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files.len(), 4, "{files:?}");
    let mut state = 0x00C0_FFEEu64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 33
    };
    let mut located = 0;
    for name in &files {
        let path = ckpt.join(name);
        let original = std::fs::read(&path).unwrap();
        let tensors = if name.ends_with(".safetensors") {
            parse_header(&path, &original, original.len() as u64).unwrap()
        } else {
            Vec::new()
        };
        for _ in 0..FLIPS_PER_FILE {
            let bit = next() as usize % (original.len() * 8);
            let mut b = original.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            std::fs::write(&path, &b).unwrap();
            let report = verify(&ckpt);
            assert!(
                !report.is_ok(),
                "{name}: flip of bit {bit} not detected by verify"
            );
            let err = load(&ckpt).expect_err("load must fail");
            for e in report.problems.iter().chain(std::iter::once(&err)) {
                assert_eq!(error_path(e), Some(path.as_path()), "{name} bit {bit}: {e}");
                assert!(e.to_string().contains(name.as_str()), "{e}");
            }
            let byte = (bit / 8) as u64;
            if let Some(t) = tensors.iter().find(|t| t.start <= byte && byte < t.end) {
                match &err {
                    Error::ChecksumMismatch {
                        tensor: Some(got), ..
                    } => assert_eq!(got, &t.key),
                    other => panic!("{name} bit {bit} in tensor {}: {other}", t.key),
                }
                assert!(err.to_string().contains(&t.key));
                located += 1;
            }
        }
        std::fs::write(&path, &original).unwrap();
        assert!(verify(&ckpt).is_ok());
    }
    assert!(
        located > 0,
        "no flip landed in tensor bytes; the test would prove nothing"
    );
}
