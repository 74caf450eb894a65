//! [`Preemption`]: SIGTERM and SIGUSR1 only set a flag (invariant 9).
//!
//! Preemptible schedulers (SLURM, Kubernetes, spot instances) warn a job with SIGTERM
//! or SIGUSR1 before killing it. [`Preemption::install`] registers handlers, with
//! `signal-hook`, whose whole work is one atomic store into a shared flag: **nothing
//! is written, allocated or locked inside a signal handler**. The training loop calls
//! [`Preemption::is_requested`] at each step boundary; when it is set, the loop saves a
//! checkpoint, flushes the loggers and the async saves, and the process exits with
//! [`PREEMPTED_EXIT_CODE`] so that a requeue script (see `scripts/requeue.sh`) can tell
//! "preempted, run me again" from success (0) and failure (1, 2, 101).
//!
//! ## Repeated signals
//! The handlers stay installed until the `Preemption` is dropped; there is no
//! "second signal kills" escalation. A second SIGTERM while the checkpoint is being
//! saved sets the flag again and does nothing else, so it can neither kill the process
//! nor corrupt the save. To stop a process at once use SIGKILL: the commit protocol
//! keeps the previous checkpoint loadable (invariant 1).
//!
//! ## Scope
//! Signal dispositions are per process: every live `Preemption` sees every signal it
//! registered for. When a `Preemption` is dropped its actions are removed, but
//! `signal-hook` cannot restore the default disposition, so from then on the process
//! *ignores* the signals it handled (SIGTERM no longer terminates it). Keep one
//! `Preemption` for the life of the training job, typically ending in `main`.
//!
//! ## Example
//! ```no_run
//! use relume::preempt::{Preemption, PREEMPTED_EXIT_CODE};
//! # fn save_and_flush() {}
//! # fn main() -> relume::Result<()> {
//! let preempt = Preemption::builder().sigint(true).install()?;
//! for _step in 0..1000 {
//!     // ... one optimizer step ...
//!     if preempt.is_requested() {
//!         save_and_flush();
//!         std::process::exit(PREEMPTED_EXIT_CODE);
//!     }
//! }
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use signal_hook::consts::signal::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook::SigId;

use crate::error::{Error, Result};

/// Exit code of a run that stopped because it was preempted, after committing a
/// checkpoint: 75, `EX_TEMPFAIL` in BSD `sysexits.h` ("temporary failure, the user is
/// invited to retry"). It differs from success (0), errors (1), usage errors (2) and
/// Rust panics (101). A requeue script reruns the command while it exits with 75.
pub const PREEMPTED_EXIT_CODE: i32 = 75;

/// Flag value stored by [`Preemption::request`] (signal numbers are small positive
/// integers, and 0 means "not requested").
const REQUESTED_IN_CODE: usize = usize::MAX;

/// What asked for preemption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A signal, by number (`libc::SIGTERM`, ...).
    Signal(i32),
    /// [`Preemption::request`] was called.
    Request,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::Signal(s) => match signal_hook::low_level::signal_name(*s) {
                Some(name) => f.write_str(name),
                None => write!(f, "signal {s}"),
            },
            Trigger::Request => f.write_str("a programmatic request"),
        }
    }
}

/// Builds a [`Preemption`]: which signals set the flag.
#[derive(Debug, Clone, Default)]
#[must_use = "call install() to register the handlers"]
pub struct PreemptionBuilder {
    sigint: bool,
}

impl PreemptionBuilder {
    /// Also treat SIGINT (Ctrl-C) as a preemption request: save, then exit with
    /// [`PREEMPTED_EXIT_CODE`]. Default: `false` (Ctrl-C keeps its default action and
    /// kills the process; the last committed checkpoint stays loadable).
    pub fn sigint(mut self, on: bool) -> Self {
        self.sigint = on;
        self
    }

    /// Registers the handlers: SIGTERM and SIGUSR1, plus SIGINT if asked.
    ///
    /// # Errors
    /// [`Error::SignalHandler`] naming the signal whose handler could not be
    /// registered; handlers registered before it are removed again.
    pub fn install(self) -> Result<Preemption> {
        let mut signals = vec![SIGTERM, SIGUSR1];
        if self.sigint {
            signals.push(SIGINT);
        }
        let flag = Arc::new(AtomicUsize::new(0));
        let mut ids = Vec::with_capacity(signals.len());
        for &signal in &signals {
            // The handler is a single atomic store: async-signal-safe, writes nothing.
            // A signal number is a small positive integer, so it fits a usize.
            match signal_hook::flag::register_usize(signal, Arc::clone(&flag), signal as usize) {
                Ok(id) => ids.push(id),
                Err(source) => {
                    for id in ids {
                        signal_hook::low_level::unregister(id);
                    }
                    return Err(Error::SignalHandler {
                        signal: Trigger::Signal(signal).to_string(),
                        source,
                    });
                }
            }
        }
        Ok(Preemption { flag, ids, signals })
    }
}

/// The preemption flag of a training job, set by SIGTERM/SIGUSR1 (and optionally
/// SIGINT) or by [`Preemption::request`]. See the [module docs](self).
#[derive(Debug)]
pub struct Preemption {
    flag: Arc<AtomicUsize>,
    ids: Vec<SigId>,
    signals: Vec<i32>,
}

impl Preemption {
    /// A builder; [`PreemptionBuilder::install`] registers the handlers.
    pub fn builder() -> PreemptionBuilder {
        PreemptionBuilder::default()
    }

    /// Registers SIGTERM and SIGUSR1 handlers that set the flag (no SIGINT).
    ///
    /// # Errors
    /// As [`PreemptionBuilder::install`].
    pub fn install() -> Result<Self> {
        Self::builder().install()
    }

    /// A flag with no signal handler: only [`Preemption::request`] sets it. For tests
    /// and embedders that handle signals themselves.
    pub fn manual() -> Self {
        Preemption {
            flag: Arc::new(AtomicUsize::new(0)),
            ids: Vec::new(),
            signals: Vec::new(),
        }
    }

    /// True once a handled signal arrived or [`Preemption::request`] was called.
    /// Cheap (one atomic load): call it at every step boundary.
    pub fn is_requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst) != 0
    }

    /// What set the flag most recently, if anything.
    pub fn trigger(&self) -> Option<Trigger> {
        match self.flag.load(Ordering::SeqCst) {
            0 => None,
            REQUESTED_IN_CODE => Some(Trigger::Request),
            s => Some(Trigger::Signal(i32::try_from(s).unwrap_or(i32::MAX))),
        }
    }

    /// Requests preemption from code, exactly as a signal would: the loop saves and
    /// exits with [`PREEMPTED_EXIT_CODE`] at the next step boundary. Meant for tests
    /// (preempt at a chosen step without sending signals to the test process) and for
    /// embedders with their own shutdown logic.
    pub fn request(&self) {
        self.flag.store(REQUESTED_IN_CODE, Ordering::SeqCst);
    }

    /// The signals whose handlers this `Preemption` registered (empty for
    /// [`Preemption::manual`]).
    pub fn signals(&self) -> &[i32] {
        &self.signals
    }
}

impl Drop for Preemption {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Signals reach every live `Preemption` in this process: run the tests that raise
    /// them one at a time.
    static SIGNALS: Mutex<()> = Mutex::new(());

    fn raise(signal: i32) {
        // SAFETY: raise(3) on the calling thread; a handler is installed for `signal`,
        // and it runs to completion before raise returns.
        let rc = unsafe { libc::raise(signal) };
        assert_eq!(rc, 0, "raise({signal}) failed");
    }

    #[test]
    fn sigusr1_sets_the_flag_and_the_process_lives() {
        let _serial = SIGNALS.lock().unwrap_or_else(|p| p.into_inner());
        let p = Preemption::install().unwrap();
        assert_eq!(p.signals(), [SIGTERM, SIGUSR1]);
        raise(SIGUSR1);
        assert!(p.is_requested());
        assert_eq!(p.trigger(), Some(Trigger::Signal(SIGUSR1)));
        assert_eq!(p.trigger().unwrap().to_string(), "SIGUSR1");
    }

    #[test]
    fn repeated_sigterm_only_sets_the_flag() {
        let _serial = SIGNALS.lock().unwrap_or_else(|p| p.into_inner());
        let p = Preemption::install().unwrap();
        assert!(!p.is_requested());
        raise(SIGTERM);
        assert!(p.is_requested());
        // "During the save": more SIGTERMs neither kill us nor clear the flag.
        raise(SIGTERM);
        raise(SIGTERM);
        assert!(p.is_requested());
        assert_eq!(p.trigger(), Some(Trigger::Signal(SIGTERM)));
        assert_eq!(p.trigger().unwrap().to_string(), "SIGTERM");
    }

    #[test]
    fn sigint_is_handled_only_when_asked() {
        let _serial = SIGNALS.lock().unwrap_or_else(|p| p.into_inner());
        let p = Preemption::builder().sigint(true).install().unwrap();
        assert_eq!(p.signals(), [SIGTERM, SIGUSR1, SIGINT]);
        raise(SIGINT);
        assert_eq!(p.trigger(), Some(Trigger::Signal(SIGINT)));
        // Not raising SIGINT at a default instance: that would kill the test process.
        assert_eq!(Preemption::install().unwrap().signals(), [SIGTERM, SIGUSR1]);
    }

    #[test]
    fn every_live_instance_sees_the_signal_and_dropped_ones_do_not_matter() {
        let _serial = SIGNALS.lock().unwrap_or_else(|p| p.into_inner());
        let a = Preemption::install().unwrap();
        let b = Preemption::install().unwrap();
        drop(Preemption::install().unwrap());
        raise(SIGUSR1);
        assert!(a.is_requested() && b.is_requested());
    }

    #[test]
    fn request_sets_the_flag_without_signals() {
        let p = Preemption::manual();
        assert!(p.signals().is_empty());
        assert!(!p.is_requested());
        assert_eq!(p.trigger(), None);
        p.request();
        assert!(p.is_requested());
        assert_eq!(p.trigger(), Some(Trigger::Request));
        assert_eq!(Trigger::Request.to_string(), "a programmatic request");
        assert_eq!(Trigger::Signal(1000).to_string(), "signal 1000");
    }

    #[test]
    fn exit_code_is_distinct_from_success_errors_and_panics() {
        for other in [0, 1, 2, 101] {
            assert_ne!(PREEMPTED_EXIT_CODE, other);
        }
        assert_eq!(PREEMPTED_EXIT_CODE, 75);
    }

    #[test]
    fn signal_handler_error_names_the_signal_and_keeps_the_cause() {
        // sigaction does not fail for SIGTERM/SIGUSR1/SIGINT, so the variant is built
        // here as `install` builds it.
        let e = Error::SignalHandler {
            signal: Trigger::Signal(SIGUSR1).to_string(),
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        };
        assert!(e.to_string().contains("SIGUSR1"), "{e}");
        let cause = std::error::Error::source(&e).map(|c| c.to_string());
        assert!(cause.is_some_and(|c| c.contains("Invalid argument")));
    }

    /// Set in the child process of `sigterm_storm_during_the_final_save_*`.
    const CHILD_ENV: &str = "RELUME_PREEMPT_CHILD_RUN_DIR";

    /// A state of `mib` MiB whose bytes and progress depend on `step`.
    fn state(step: u64, mib: usize) -> relume_ckpt::Checkpoint {
        let mut model = relume_ckpt::StateDict::new();
        let bytes: Vec<u8> = (0..mib << 20).map(|i| (i as u64 ^ step) as u8).collect();
        let t = relume_ckpt::TensorData::new(
            relume_ckpt::DType::U8,
            vec![bytes.len()],
            relume_ckpt::TensorBytes::owned(bytes),
        )
        .unwrap();
        model.insert_tensor("w", t);
        let mut c = relume_ckpt::Checkpoint::default();
        c.components.insert("model".into(), model);
        c.progress = serde_json::json!({ "step": step });
        c
    }

    /// The child: a fake training loop that saves asynchronously every 10 steps and,
    /// once preempted, submits a final save, flushes it and exits with the code.
    #[test]
    fn preempt_child_entry() {
        let Some(run) = std::env::var_os(CHILD_ENV) else {
            return; // not the child: nothing to do
        };
        let p = Preemption::install().unwrap();
        let dir = Arc::new(relume_ckpt::CheckpointDir::open(&run).unwrap());
        let mut saver = relume_ckpt::AsyncCheckpointer::new(dir).unwrap();
        println!("ready");
        for step in 1u64.. {
            std::thread::sleep(std::time::Duration::from_millis(2)); // "a training step"
            let _committed = saver.poll().unwrap();
            if p.is_requested() {
                let _t = saver
                    .submit(&format!("step={step:06}"), state(step, 64))
                    .unwrap();
                let _committed = saver.flush().unwrap();
                std::process::exit(PREEMPTED_EXIT_CODE);
            }
            if step % 10 == 0 {
                let _t = saver
                    .submit(&format!("step={step:06}"), state(step, 1))
                    .unwrap();
            }
        }
    }

    #[test]
    fn sigterm_storm_during_the_final_save_exits_preempted_with_a_committed_checkpoint() {
        use std::io::BufRead;
        let run = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "preempt::tests::preempt_child_entry",
                "--exact",
                "--nocapture",
            ])
            .env(CHILD_ENV, run.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        assert!(
            lines.any(|l| l.is_ok_and(|l| l.trim() == "ready")),
            "child never became ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(50)); // a few periodic saves
        let pid = i32::try_from(child.id()).unwrap();
        // SIGTERM, then keep sending SIGTERM (and SIGUSR1) while the final save runs.
        let mut sent = 0u32;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            let sig = if sent % 2 == 0 { SIGTERM } else { SIGUSR1 };
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, sig) };
            sent += 1;
            std::thread::sleep(std::time::Duration::from_micros(500));
        };
        assert_eq!(
            status.code(),
            Some(PREEMPTED_EXIT_CODE),
            "{status:?} after {sent} signals"
        );
        assert!(sent > 1, "the storm overlapped the save");
        let dir = relume_ckpt::CheckpointDir::open(run.path()).unwrap();
        let latest = dir.latest().unwrap().expect("a committed checkpoint");
        let report = relume_ckpt::verify(&latest);
        assert!(report.is_ok(), "{:?}", report.problems);
        let loaded = relume_ckpt::load(&latest).unwrap();
        let step = loaded.manifest.progress["step"].as_u64().unwrap();
        assert_eq!(
            latest.file_name().unwrap().to_string_lossy(),
            format!("step={step:06}")
        );
        assert_eq!(
            loaded.components,
            state(step, 64).components,
            "the final save, intact"
        );
    }

    #[test]
    fn preemption_is_send_and_sync() {
        fn ok<T: Send + Sync>() {}
        ok::<Preemption>();
    }
}
