//! Corruption: flip one random bit in each file of a checkpoint, in turn; `verify`
//! and `load` must detect it every time, naming the file, and naming the tensor when
//! the bit lies in a tensor's bytes. Symlinks swapped into (or for) a checkpoint are
//! refused by both, even when they point at intact copies.

mod common;

use std::path::{Path, PathBuf};

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

/// A run directory with one committed checkpoint; returns both.
fn saved() -> (tempfile::TempDir, PathBuf) {
    let run = tempfile::tempdir().unwrap();
    let dir = CheckpointDir::open(run.path()).unwrap();
    let ckpt = dir.save("step=000003", &common::sample(3)).unwrap();
    (run, ckpt)
}

/// Asserts that `verify(ckpt)` reports exactly one problem, the symlink `link`, and
/// that `load(ckpt)` fails with it.
fn assert_refused_symlink(ckpt: &Path, link: &Path) {
    let report = verify(ckpt);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(
        matches!(&report.problems[0], Error::Symlink { path } if path == link),
        "{:?}",
        report.problems
    );
    let err = load(ckpt).expect_err("load must refuse a symlink");
    assert!(
        matches!(&err, Error::Symlink { path } if path == link),
        "{err}"
    );
    assert!(err.to_string().contains("never follows symlinks"), "{err}");
}

#[cfg(unix)]
#[test]
fn listed_file_symlinked_to_an_identical_copy_is_refused() {
    let (_run, ckpt) = saved();
    let outside = tempfile::tempdir().unwrap();
    let model = ckpt.join("model.safetensors");
    let copy = outside.path().join("model.safetensors");
    std::fs::copy(&model, &copy).unwrap();
    std::fs::remove_file(&model).unwrap();
    std::os::unix::fs::symlink(&copy, &model).unwrap();
    assert_refused_symlink(&ckpt, &model);
}

#[cfg(unix)]
#[test]
fn checkpoint_directory_symlinked_to_a_copy_is_refused() {
    let (_run, ckpt) = saved();
    let outside = tempfile::tempdir().unwrap();
    let copy = outside.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for e in std::fs::read_dir(&ckpt).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
    }
    assert!(verify(&copy).is_ok(), "the copy itself is intact");
    std::fs::remove_dir_all(&ckpt).unwrap();
    std::os::unix::fs::symlink(&copy, &ckpt).unwrap();
    assert_refused_symlink(&ckpt, &ckpt);
    // A trailing slash would make lstat follow the link; it must not help.
    let slash = PathBuf::from(format!("{}/", ckpt.display()));
    let err = load(&slash).expect_err("load must refuse a symlink");
    assert!(matches!(err, Error::Symlink { .. }), "{err}");
}

#[cfg(unix)]
#[test]
fn unlisted_symlink_to_root_inside_a_checkpoint_is_refused() {
    let (_run, ckpt) = saved();
    let link = ckpt.join("extra");
    std::os::unix::fs::symlink("/", &link).unwrap();
    assert_refused_symlink(&ckpt, &link);
}

#[cfg(unix)]
#[test]
fn state_json_symlinked_to_etc_passwd_is_a_symlink_error() {
    let (_run, ckpt) = saved();
    let state = ckpt.join("state.json");
    std::fs::remove_file(&state).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &state).unwrap();
    // Exactly one problem: the symlink, not a size or checksum mismatch.
    assert_refused_symlink(&ckpt, &state);
}
