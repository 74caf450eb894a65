//! Helpers the contract tests share: a stateful callback that interrupts, fails or
//! signals a run at a chosen batch, and the comparison of two runs' final states.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use relume::callbacks::{Callback, HookCtx};
use relume::trainer::FitOutcome;
use relume::{Error, Result};
use relume_ckpt::{RestoreReport, StateDict};

/// `target/<profile>/examples/digits`, built by `cargo test` beside the tests.
pub fn digits_example() -> std::path::PathBuf {
    example("digits")
}

/// `target/<profile>/examples/<name>`, built by `cargo test` beside the tests.
pub fn example(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    dir.join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

/// Raises its rank's interrupt flag after `at` training batches (only on `rank`);
/// fails after `fail` of them (only on that rank).
pub struct Interrupter {
    pub flag: Arc<AtomicBool>,
    pub at: Option<(usize, u64)>,
    pub fail: Option<(usize, u64)>,
    pub signal: Option<(usize, u64, i32)>,
    pub rank: usize,
    pub batches: u64,
}

impl Interrupter {
    /// A single-process run's: raises `flag` after `at` batches.
    pub fn after(flag: Arc<AtomicBool>, at: Option<u64>) -> Self {
        Interrupter {
            flag,
            at: at.map(|n| (0, n)),
            fail: None,
            signal: None,
            rank: 0,
            batches: 0,
        }
    }
}

impl Callback for Interrupter {
    fn state_key(&self) -> String {
        "interrupter".into()
    }
    fn state_dict(&self) -> Result<StateDict> {
        let mut sd = StateDict::new();
        sd.insert_json("batches", self.batches.into());
        Ok(sd)
    }
    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let mut r = RestoreReport::new();
        r.diff_keys(["batches"], state);
        if r.is_clean() {
            self.batches = state.require_value("batches")?;
            r.restored("batches");
        }
        Ok(r)
    }
    fn on_train_batch_end(&mut self, _: &mut HookCtx<'_>, _: bool) -> Result<()> {
        self.batches += 1;
        if self.at == Some((self.rank, self.batches)) {
            self.flag.store(true, Ordering::SeqCst);
        }
        if let Some((r, b, sig)) = self.signal {
            if (r, b) == (self.rank, self.batches) {
                // SAFETY: kill(2) on our own pid with a plain signal number.
                unsafe { libc::kill(libc::getpid(), sig) };
            }
        }
        if self.fail == Some((self.rank, self.batches)) {
            return Err(Error::InvalidSetting {
                setting: "test".into(),
                value: format!("rank {} dies", self.rank),
                rule: "never arrives".into(),
            });
        }
        Ok(())
    }
}

/// `completed@15`, `interrupted@3`, ...
pub fn describe(o: &FitOutcome) -> String {
    let kind = match o {
        FitOutcome::Completed(_) => "completed",
        FitOutcome::Stopped { .. } => "stopped",
        FitOutcome::Interrupted(_) => "interrupted",
        FitOutcome::AlreadyFinished(_) => "finished",
    };
    format!("{kind}@{}", o.summary().global_step)
}

/// The components of the run's latest checkpoint (verified).
pub fn final_components(run_dir: &Path) -> BTreeMap<String, StateDict> {
    let dir = relume_ckpt::CheckpointDir::open_read_only(run_dir).unwrap();
    let latest = dir.latest().unwrap().expect("a final checkpoint");
    relume_ckpt::load(&latest).unwrap().components
}

/// Both runs' latest checkpoints hold the same components, byte for byte.
pub fn assert_identical(a: &Path, b: &Path) {
    let (ca, cb) = (final_components(a), final_components(b));
    assert_eq!(ca.keys().collect::<Vec<_>>(), cb.keys().collect::<Vec<_>>());
    for (name, sd) in &ca {
        assert!(sd == &cb[name], "component {name} differs");
    }
    assert_eq!(relume_ckpt::fingerprint(&ca), relume_ckpt::fingerprint(&cb));
}

/// Runs this test binary again as a fresh process, running only its `child` test
/// with `env_var` set to `payload` as JSON; returns the `OUTCOME=` it prints.
pub fn spawn_child(env_var: &str, payload: &impl serde::Serialize) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(env_var, serde_json::to_string(payload).unwrap())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.split_once("OUTCOME=").map(|(_, o)| o.trim().to_string()))
        .unwrap_or_else(|| panic!("no outcome in child output: {stdout}"))
}
