//! A real failed write mid-save: a child process with `RLIMIT_FSIZE` (and SIGXFSZ
//! ignored, so `write` fails with EFBIG as on a full disk) tries to save a checkpoint
//! larger than the limit. The error must be clear, the previous checkpoint intact and
//! `latest` still pointing at it.

mod common;

use std::path::Path;
use std::process::Command;

use relume_ckpt::{load, verify, CheckpointDir, StateDict, TensorData};

const CHILD_ENV: &str = "RELUME_FSIZE_CHILD";
const LIMIT: u64 = 64 * 1024;

fn child(run: &Path) -> ! {
    // SAFETY: plain syscalls on this process before any file is written.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let lim = libc::rlimit {
            rlim_cur: LIMIT,
            rlim_max: LIMIT,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
    }
    let dir = CheckpointDir::open(run).expect("open");
    let mut ckpt = common::sample(2);
    let big: Vec<f32> = vec![1.0; 64 * 1024]; // 256 KiB > LIMIT
    let mut extra = StateDict::new();
    extra.insert_tensor(
        "big",
        TensorData::from_f32(vec![64 * 1024], &big).expect("tensor"),
    );
    ckpt.components.insert("extra".into(), extra);
    match dir.save("step=000002", &ckpt) {
        Ok(_) => {
            println!("UNEXPECTED: save succeeded");
            std::process::exit(2)
        }
        Err(e) => {
            println!("SAVE ERROR: {e}");
            std::process::exit(0)
        }
    }
}

#[test]
fn save_beyond_rlimit_fsize_fails_cleanly() {
    if let Some(run) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&run));
    }
    let run = tempfile::tempdir().unwrap();
    let first = CheckpointDir::open(run.path())
        .unwrap()
        .save("step=000001", &common::sample(1))
        .unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "save_beyond_rlimit_fsize_fails_cleanly",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, run.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find_map(|l| l.find("SAVE ERROR").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("no error line in: {text}"));
    assert!(
        line.contains("write")
            && line.contains("step=000002")
            && line.contains("extra.safetensors"),
        "{line}"
    );
    assert!(line.to_lowercase().contains("file too large"), "{line}");
    let dir = CheckpointDir::open(run.path()).unwrap();
    assert_eq!(dir.latest().unwrap(), Some(first.clone()));
    assert!(verify(&first).is_ok());
    assert_eq!(
        load(&first).unwrap().components,
        common::sample(1).components
    );
    assert_eq!(dir.list().unwrap().len(), 1);
    assert!(dir.temporaries().unwrap().is_empty());
}
