//! Crash consistency: SIGKILL a process that saves checkpoints in a loop, at random
//! (seeded) moments, and check after every kill that the newest committed checkpoint
//! verifies and loads, that no temporary is ever listed, and that reopening cleans
//! the temporaries.
//!
//! The child is this test binary re-executed with `RELUME_CRASH_CHILD=<run dir>`.
//! Trials: 30 by default, `RELUME_CRASH_TRIALS` to change.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use relume_ckpt::{load, verify, CheckpointDir, StateDict, TensorData};

const CHILD_ENV: &str = "RELUME_CRASH_CHILD";

/// splitmix64: a tiny seeded generator for kill timings (relume's Rng lives in the
/// `relume` crate, which relume-ckpt must not depend on).
struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn child_loop(run: &Path) -> ! {
    let dir = CheckpointDir::open(run).expect("child: open");
    let mut step = dir
        .list()
        .expect("child: list")
        .last()
        .and_then(|i| i.step)
        .unwrap_or(0);
    loop {
        step += 1;
        let mut ckpt = common::sample(step);
        // A larger tensor so saves take long enough to be interrupted mid-write.
        let big: Vec<f32> = (0..(256 * 1024))
            .map(|i| (i as u64 ^ step) as f32)
            .collect();
        let mut extra = StateDict::new();
        extra.insert_tensor(
            "big",
            TensorData::from_f32(vec![256, 1024], &big).expect("tensor"),
        );
        ckpt.components.insert("extra".into(), extra);
        dir.save(&format!("step={step:06}"), &ckpt)
            .expect("child: save");
        // Retention: keep the two newest.
        let list = dir.list().expect("child: list");
        for old in list.iter().take(list.len().saturating_sub(2)) {
            dir.delete(&old.name).expect("child: delete");
        }
    }
}

fn check_run_dir(run: &Path, trial: usize) {
    let ro = CheckpointDir::open_read_only(run).unwrap();
    let listed = ro.list().unwrap();
    for info in &listed {
        assert!(
            !info.name.starts_with('.'),
            "trial {trial}: temporary listed: {}",
            info.name
        );
        let r = verify(&info.path);
        assert!(
            r.is_ok(),
            "trial {trial}: {} does not verify: {:?}",
            info.name,
            r.problems
        );
    }
    if let Some(latest) = ro.latest().unwrap() {
        let l =
            load(&latest).unwrap_or_else(|e| panic!("trial {trial}: latest does not load: {e}"));
        let step = l.manifest.step().unwrap();
        assert_eq!(
            l.components["loop"].require_json("step").unwrap(),
            &serde_json::json!(step)
        );
        // A kill between the directory rename and the pointer update leaves one
        // committed checkpoint newer than `latest`; `latest` itself is always listed.
        assert!(
            listed.iter().any(|i| i.path == latest),
            "trial {trial}: latest is not listed"
        );
    }
    drop(ro);
    let rw = CheckpointDir::open(run).unwrap();
    assert!(
        rw.temporaries().unwrap().is_empty(),
        "trial {trial}: reopen left temporaries"
    );
}

#[test]
fn sigkill_at_random_moments_never_loses_the_latest_checkpoint() {
    if let Some(run) = std::env::var_os(CHILD_ENV) {
        child_loop(Path::new(&run));
    }
    let trials: usize = std::env::var("RELUME_CRASH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let run = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = SplitMix(0x5EED_2026);
    let mut with_temporaries = 0;
    let started = Instant::now();
    for trial in 0..trials {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "sigkill_at_random_moments_never_loses_the_latest_checkpoint",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, run.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if trial == 0 {
            // Let the first child commit something so later trials have a latest.
            let latest = run.path().join("checkpoints/latest");
            let deadline = Instant::now() + Duration::from_secs(60);
            while !latest.exists() {
                assert!(
                    Instant::now() < deadline,
                    "child never committed a checkpoint"
                );
                if let Some(st) = child.try_wait().unwrap() {
                    panic!("child exited early: {st}");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        std::thread::sleep(Duration::from_micros(20_000 + rng.next() % 100_000));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let ro = CheckpointDir::open_read_only(run.path()).unwrap();
        if !ro.temporaries().unwrap().is_empty() {
            with_temporaries += 1;
        }
        drop(ro);
        check_run_dir(run.path(), trial);
    }
    let ro = CheckpointDir::open_read_only(run.path()).unwrap();
    assert!(ro.latest().unwrap().is_some());
    eprintln!(
        "{trials} kills in {:.1}s; {with_temporaries} left a temporary behind (killed mid-save); newest step {:?}",
        started.elapsed().as_secs_f64(),
        ro.list().unwrap().last().and_then(|i| i.step)
    );
}
