//! Contract of the async checkpoint writer (invariant 10, with retention from 11):
//! failures name the right checkpoint and never reach retention, the previous
//! checkpoint survives, in-flight saves are bounded, async bytes equal sync bytes,
//! every outcome is reported exactly once, and `Drop` finishes and logs.

mod common;

use std::io;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use relume_ckpt::{
    load, verify, AsyncCheckpointer, Checkpoint, CheckpointDir, Committed, Error, FaultyStorage,
    LocalStorage, Storage, StorageFile, TensorData,
};

fn name(step: u64) -> String {
    format!("step={step:06}")
}

/// Called with each file path before the file is created; an error fails the create.
type Hook = Box<dyn Fn(&Path) -> io::Result<()> + Send + Sync>;

/// A storage that calls `hook` with each file path before creating it.
struct Hooked {
    inner: Arc<dyn Storage>,
    hook: Hook,
}

impl std::fmt::Debug for Hooked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hooked")
    }
}

impl Storage for Hooked {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.inner.create_dir_all(path)
    }
    fn create_file(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        (self.hook)(path)?;
        self.inner.create_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.inner.sync_dir(path)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_dir_all(path)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_file(path)
    }
}

/// True when `path` is a file of the temporary of checkpoint `step`.
fn in_save_of(path: &Path, step: u64) -> bool {
    path.to_string_lossy()
        .contains(&format!(".tmp-{}-", name(step)))
}

/// A run directory whose saves of checkpoint `step` fail with an injected error.
fn failing_on(run: &Path, step: u64) -> Arc<CheckpointDir> {
    let storage = Hooked {
        inner: Arc::new(LocalStorage),
        hook: Box::new(move |p| {
            if in_save_of(p, step) {
                Err(io::Error::other("injected failure"))
            } else {
                Ok(())
            }
        }),
    };
    Arc::new(CheckpointDir::open_with_storage(run, Arc::new(storage)).unwrap())
}

/// Bytes a save of `ckpt` as `name` writes through the storage (every file of the
/// checkpoint, manifest included, plus the `latest` pointer).
fn bytes_of_save(ckpt: &Checkpoint, name: &str) -> u64 {
    let scratch = tempfile::tempdir().unwrap();
    let dir = CheckpointDir::open(scratch.path()).unwrap();
    let path = dir.save(name, ckpt).unwrap();
    let files: u64 = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    files + name.len() as u64 + 1
}

/// The step boundary of a trainer: poll, run retention (keep only the newest
/// committed checkpoint) for the committed saves, record failures.
fn step_boundary(
    saver: &mut AsyncCheckpointer,
    committed: &mut Vec<Committed>,
    failures: &mut Vec<Error>,
) {
    match saver.poll() {
        Ok(done) => retain(saver.dir(), done, committed),
        Err(e) => failures.push(e),
    }
}

fn retain(dir: &CheckpointDir, done: Vec<Committed>, committed: &mut Vec<Committed>) {
    for c in done {
        for info in dir.list().unwrap() {
            if info.name != c.name {
                dir.delete(&info.name).unwrap();
            }
        }
        committed.push(c);
    }
}

fn failed_name(e: &Error) -> &str {
    match e {
        Error::AsyncSaveFailed { checkpoint, .. } => checkpoint,
        other => panic!("expected AsyncSaveFailed, got {other:?}"),
    }
}

#[test]
fn failure_from_the_second_save_names_it_and_keeps_the_first() {
    let run = tempfile::tempdir().unwrap();
    let storage = FaultyStorage::new(LocalStorage);
    // Let exactly the first save through (+1: the last fsync needs budget left).
    storage.fail_after_bytes(bytes_of_save(&common::sample(1), &name(1)) + 1);
    let dir = Arc::new(CheckpointDir::open_with_storage(run.path(), Arc::new(storage)).unwrap());
    let mut saver = AsyncCheckpointer::new(Arc::clone(&dir)).unwrap();
    let (mut committed, mut failures) = (Vec::new(), Vec::new());
    for step in 1..=3 {
        step_boundary(&mut saver, &mut committed, &mut failures);
        let ticket = saver.submit(&name(step), common::sample(step)).unwrap();
        assert_eq!(ticket.name(), name(step));
        assert_eq!(ticket.seq(), step - 1);
    }
    while !saver.is_idle() {
        match saver.flush() {
            Ok(done) => retain(&dir, done, &mut committed),
            Err(e) => failures.push(e),
        }
    }
    let failed: Vec<&str> = failures.iter().map(failed_name).collect();
    assert_eq!(failed, [name(2), name(3)]);
    match &failures[0] {
        Error::AsyncSaveFailed { source, .. } => {
            assert!(matches!(**source, Error::Io { .. }), "{source:?}");
            assert!(source.to_string().contains("injected"), "{source}");
        }
        other => panic!("{other:?}"),
    }
    let names: Vec<&str> = committed.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [name(1)],
        "retention ran only for the committed save"
    );
    let first = dir.path().join(name(1));
    assert_eq!(committed[0].path, first);
    assert_eq!(dir.latest().unwrap(), Some(first.clone()));
    let report = verify(&first);
    assert!(report.is_ok(), "{:?}", report.problems);
    let listed: Vec<String> = dir.list().unwrap().into_iter().map(|i| i.name).collect();
    assert_eq!(listed, [name(1)]);
    assert!(dir.temporaries().unwrap().is_empty());
}

#[test]
fn poll_reports_the_failure_at_the_next_step_boundary() {
    let run = tempfile::tempdir().unwrap();
    let storage = FaultyStorage::new(LocalStorage);
    let dir =
        Arc::new(CheckpointDir::open_with_storage(run.path(), Arc::new(storage.clone())).unwrap());
    let mut saver = AsyncCheckpointer::new(Arc::clone(&dir)).unwrap();
    let _t1 = saver.submit(&name(1), common::sample(1)).unwrap();
    let done = saver.flush().unwrap();
    assert_eq!(done.len(), 1);
    storage.fail_after_bytes(0);
    let _t2 = saver.submit(&name(2), common::sample(2)).unwrap();
    // Wait (without reporting) until the writer is done with save 2...
    saver.wait_for_slot().unwrap();
    assert_eq!(saver.in_flight(), 0);
    // ...then the next non-blocking poll must surface it.
    let err = saver.poll().unwrap_err();
    assert_eq!(failed_name(&err), name(2));
    assert!(err.to_string().contains("step=000002"), "{err}");
    assert_eq!(saver.poll().unwrap(), Vec::new(), "reported exactly once");
    assert!(saver.is_idle());
    assert_eq!(dir.latest().unwrap(), Some(dir.path().join(name(1))));
}

/// A gate the test opens; the storage blocks on it in the first file of one save.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
    }
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

/// A run directory whose save of checkpoint `step` blocks until `gate` opens; the
/// returned receiver gets a message when the writer reaches the gate.
fn gated_on(
    run: &Path,
    step: u64,
    gate: &Arc<Gate>,
) -> (Arc<CheckpointDir>, crossbeam_channel::Receiver<()>) {
    let (entered_tx, entered) = crossbeam_channel::unbounded();
    let gate = Arc::clone(gate);
    let storage = Hooked {
        inner: Arc::new(LocalStorage),
        hook: Box::new(move |p| {
            if in_save_of(p, step) {
                let _ = entered_tx.send(());
                gate.wait();
            }
            Ok(())
        }),
    };
    let dir = Arc::new(CheckpointDir::open_with_storage(run, Arc::new(storage)).unwrap());
    (dir, entered)
}

#[test]
fn submit_blocks_while_one_save_is_in_flight() {
    let run = tempfile::tempdir().unwrap();
    let gate = Arc::new(Gate::default());
    let (dir, entered) = gated_on(run.path(), 1, &gate);
    let mut saver = AsyncCheckpointer::new(Arc::clone(&dir)).unwrap();
    assert_eq!(saver.max_in_flight(), 1);
    let _t1 = saver.submit(&name(1), common::sample(1)).unwrap();
    entered.recv().unwrap(); // the writer is now stuck inside save 1
    assert_eq!(saver.in_flight(), 1);

    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = Arc::clone(&events);
    let submitter = std::thread::spawn(move || {
        let _t2 = saver.submit(&name(2), common::sample(2)).unwrap();
        ev.lock().unwrap().push("submit 2 returned");
        saver
    });
    // Give a wrong (non-blocking) submit every chance to return first. With a correct
    // one the order below holds whatever the timing.
    std::thread::sleep(Duration::from_millis(200));
    events.lock().unwrap().push("gate opened");
    gate.open();
    let mut saver = submitter.join().unwrap();
    assert_eq!(
        *events.lock().unwrap(),
        ["gate opened", "submit 2 returned"]
    );
    let done: Vec<String> = saver.flush().unwrap().into_iter().map(|c| c.name).collect();
    assert_eq!(done, [name(1), name(2)]);
    assert_eq!(dir.latest().unwrap(), Some(dir.path().join(name(2))));
}

#[test]
fn two_slots_let_a_second_submit_through_while_one_is_stuck() {
    let run = tempfile::tempdir().unwrap();
    let gate = Arc::new(Gate::default());
    let (dir, entered) = gated_on(run.path(), 1, &gate);
    let two = NonZeroUsize::new(2).unwrap();
    let mut saver = AsyncCheckpointer::with_max_in_flight(Arc::clone(&dir), two).unwrap();
    let _t1 = saver.submit(&name(1), common::sample(1)).unwrap();
    entered.recv().unwrap();
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let submitter = std::thread::spawn(move || {
        let _t2 = saver.submit(&name(2), common::sample(2)).unwrap();
        done_tx.send(()).unwrap();
        // The third must wait for a slot.
        let _t3 = saver.submit(&name(3), common::sample(3)).unwrap();
        saver
    });
    // Generous bound: fails (instead of hanging) if the second submit blocks.
    let returned = done_rx.recv_timeout(Duration::from_secs(60)).is_ok();
    gate.open();
    let mut saver = submitter.join().unwrap();
    assert!(returned, "submit blocked with a free slot");
    let done: Vec<String> = saver.flush().unwrap().into_iter().map(|c| c.name).collect();
    assert_eq!(done, [name(1), name(2), name(3)]);
}

#[test]
fn async_bytes_equal_sync_bytes() {
    let ckpt = common::sample(7);
    let (sync_run, async_run) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sync_path = CheckpointDir::open(sync_run.path())
        .unwrap()
        .save(&name(7), &ckpt)
        .unwrap();
    let dir = Arc::new(CheckpointDir::open(async_run.path()).unwrap());
    let mut saver = AsyncCheckpointer::new(Arc::clone(&dir)).unwrap();
    let _t = saver.submit(&name(7), ckpt.clone()).unwrap();
    let done = saver.flush().unwrap();
    let async_path = done[0].path.clone();

    let files = |p: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| PathBuf::from(e.unwrap().file_name()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(files(&sync_path), files(&async_path));
    for f in files(&sync_path) {
        if f.as_os_str() == "manifest.json" {
            continue; // holds created_at
        }
        let a = std::fs::read(sync_path.join(&f)).unwrap();
        let b = std::fs::read(async_path.join(&f)).unwrap();
        assert!(
            a == b,
            "{} differs between sync and async saves",
            f.display()
        );
    }
    let (a, b) = (load(&sync_path).unwrap(), load(&async_path).unwrap());
    assert_eq!(a.components, b.components);
    assert_eq!(a.components, ckpt.components);
    assert_eq!(a.manifest.fingerprint, b.manifest.fingerprint);
    assert_eq!(a.manifest.files, b.manifest.files);
    assert_eq!(a.manifest.progress, b.manifest.progress);
    assert_eq!(a.manifest.config, b.manifest.config);
    assert_eq!(a.manifest.metrics, b.manifest.metrics);
}

#[test]
fn flush_after_errors_reports_failures_first_then_commits_each_once() {
    let run = tempfile::tempdir().unwrap();
    let dir = failing_on(run.path(), 2);
    let three = NonZeroUsize::new(3).unwrap();
    let mut saver = AsyncCheckpointer::with_max_in_flight(Arc::clone(&dir), three).unwrap();
    for step in 1..=3 {
        let _t = saver.submit(&name(step), common::sample(step)).unwrap();
    }
    let err = saver.flush().unwrap_err();
    assert_eq!(failed_name(&err), name(2));
    let done: Vec<(u64, String)> = saver
        .flush()
        .unwrap()
        .into_iter()
        .map(|c| (c.seq, c.name))
        .collect();
    assert_eq!(done, [(0, name(1)), (2, name(3))]);
    assert_eq!(saver.flush().unwrap(), Vec::new());
    assert!(saver.is_idle());
    // A later successful save is a real commit: `latest` moved on past the failure.
    assert_eq!(dir.latest().unwrap(), Some(dir.path().join(name(3))));
    assert!(!dir.path().join(name(2)).exists());
}

#[test]
fn every_save_failing_reports_each_failure_once() {
    let run = tempfile::tempdir().unwrap();
    let storage = FaultyStorage::new(LocalStorage);
    storage.fail_after_bytes(0);
    let dir = Arc::new(CheckpointDir::open_with_storage(run.path(), Arc::new(storage)).unwrap());
    let mut saver = AsyncCheckpointer::new(Arc::clone(&dir)).unwrap();
    for step in 1..=2 {
        let _t = saver.submit(&name(step), common::sample(step)).unwrap();
    }
    assert_eq!(failed_name(&saver.flush().unwrap_err()), name(1));
    assert_eq!(failed_name(&saver.flush().unwrap_err()), name(2));
    assert_eq!(saver.flush().unwrap(), Vec::new());
    assert_eq!(dir.latest().unwrap(), None);
    assert!(dir.list().unwrap().is_empty());
}

#[test]
fn a_panicking_save_is_a_failure_and_the_writer_goes_on() {
    let run = tempfile::tempdir().unwrap();
    let storage = Hooked {
        inner: Arc::new(LocalStorage),
        hook: Box::new(|p| {
            if in_save_of(p, 2) {
                panic!("storage bug");
            }
            Ok(())
        }),
    };
    let dir = Arc::new(CheckpointDir::open_with_storage(run.path(), Arc::new(storage)).unwrap());
    let mut saver = AsyncCheckpointer::new(Arc::clone(&dir)).unwrap();
    for step in 1..=3 {
        let _t = saver.submit(&name(step), common::sample(step)).unwrap();
    }
    let err = saver.flush().unwrap_err();
    assert_eq!(failed_name(&err), name(2));
    match err {
        Error::AsyncSaveFailed { source, .. } => match *source {
            Error::AsyncWriter { ref reason } => assert!(reason.contains("storage bug")),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    assert_eq!(saver.flush().unwrap().len(), 2);
    assert_eq!(dir.latest().unwrap(), Some(dir.path().join(name(3))));
}

#[test]
fn invalid_name_is_rejected_at_submit() {
    let run = tempfile::tempdir().unwrap();
    let dir = Arc::new(CheckpointDir::open(run.path()).unwrap());
    let mut saver = AsyncCheckpointer::new(dir).unwrap();
    let err = saver.submit("../escape", common::sample(1)).unwrap_err();
    assert!(matches!(err, Error::InvalidName { .. }), "{err:?}");
    assert_eq!(saver.in_flight(), 0);
    assert!(saver.is_idle());
}

#[test]
fn read_only_dir_is_rejected() {
    let run = tempfile::tempdir().unwrap();
    drop(CheckpointDir::open(run.path()).unwrap());
    let ro = Arc::new(CheckpointDir::open_read_only(run.path()).unwrap());
    let err = AsyncCheckpointer::new(ro).unwrap_err();
    assert!(matches!(err, Error::ReadOnly { .. }), "{err:?}");
}

/// Captures log lines written on this thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn drop_without_flush_finishes_saves_and_logs_the_unreported_failure() {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let run = tempfile::tempdir().unwrap();
    let dir = failing_on(run.path(), 2);
    let two = NonZeroUsize::new(2).unwrap();
    let mut saver = AsyncCheckpointer::with_max_in_flight(Arc::clone(&dir), two).unwrap();
    for step in 1..=2 {
        let _t = saver.submit(&name(step), common::sample(step)).unwrap();
    }
    drop(saver); // joins the writer: both saves have finished when it returns
    let first = dir.path().join(name(1));
    assert_eq!(dir.latest().unwrap(), Some(first.clone()));
    assert!(verify(&first).is_ok());
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("never reported"))
        .unwrap_or_else(|| panic!("no error logged; logs:\n{text}"));
    assert!(line.contains("step=000002"), "{line}");
    assert!(line.contains("injected failure"), "{line}");
}

#[test]
fn drop_while_a_save_is_stuck_waits_for_it_without_panicking() {
    let run = tempfile::tempdir().unwrap();
    let gate = Arc::new(Gate::default());
    let (dir, entered) = gated_on(run.path(), 1, &gate);
    let mut saver = AsyncCheckpointer::new(Arc::clone(&dir)).unwrap();
    let _t = saver.submit(&name(1), common::sample(1)).unwrap();
    entered.recv().unwrap();
    let opener = {
        let gate = Arc::clone(&gate);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            gate.open();
        })
    };
    drop(saver);
    opener.join().unwrap();
    assert_eq!(dir.latest().unwrap(), Some(dir.path().join(name(1))));
}

#[test]
fn a_deferred_snapshot_commits_the_same_checkpoint_and_recycles_its_buffers() {
    let ckpt = common::sample(9);
    let tensor_bytes: u64 = ckpt.components.values().map(|sd| sd.tensor_bytes()).sum();
    assert!(tensor_bytes > 0);
    let run = tempfile::tempdir().unwrap();
    let dir = Arc::new(CheckpointDir::open(run.path()).unwrap());
    let mut saver = AsyncCheckpointer::new(Arc::clone(&dir)).unwrap();
    let pool = relume_ckpt::BufferPool::with_min_pooled(0);
    let built = ckpt.clone();
    let _t = saver
        .submit_deferred(&name(9), move || Ok(built), Some(pool.clone()))
        .unwrap();
    let done = saver.flush().unwrap();
    assert_eq!(done.len(), 1);
    let loaded = load(&done[0].path).unwrap();
    assert_eq!(loaded.components, ckpt.components);
    // `ckpt` still shares the buffers the writer saved, so none came back ...
    assert_eq!(pool.held(), 0);
    // ... while a snapshot staged in the pool and owned by the writer alone is
    // recycled after its commit.
    let mut own = common::sample(10);
    for sd in own.components.values_mut() {
        let keys: Vec<String> = sd.tensors().map(|(k, _)| k.to_string()).collect();
        for k in keys {
            let t = sd.get_tensor(&k).unwrap().clone();
            let staged = pool.copy(t.bytes());
            assert!(staged.is_staged());
            sd.insert_tensor(
                k,
                TensorData::new(t.dtype(), t.shape().to_vec(), staged).unwrap(),
            );
        }
    }
    let expect = common::sample(10).components; // no clone: it would share the buffers
    let _t = saver
        .submit_deferred(&name(10), move || Ok(own), Some(pool.clone()))
        .unwrap();
    let done = saver.flush().unwrap();
    assert_eq!(load(&done[0].path).unwrap().components, expect);
    assert_eq!(pool.held() as u64, tensor_bytes);
}

#[test]
fn a_snapshot_that_fails_to_build_is_a_failed_save_naming_it() {
    let run = tempfile::tempdir().unwrap();
    let dir = Arc::new(CheckpointDir::open(run.path()).unwrap());
    let mut saver = AsyncCheckpointer::new(Arc::clone(&dir)).unwrap();
    let _t = saver
        .submit_deferred(
            &name(3),
            || {
                Err(Error::SnapshotBuild {
                    component: "rng".into(),
                    source: "boom".into(),
                })
            },
            None,
        )
        .unwrap();
    let e = saver.flush().unwrap_err();
    assert_eq!(failed_name(&e), name(3));
    let Error::AsyncSaveFailed { source, .. } = &e else {
        unreachable!()
    };
    assert!(
        matches!(**source, Error::SnapshotBuild { ref component, .. } if component == "rng"),
        "{e}"
    );
    assert!(e.to_string().contains("step=000003"), "{e}");
    assert!(dir.list().unwrap().is_empty(), "nothing was written");
    assert!(dir.temporaries().unwrap().is_empty());
}
