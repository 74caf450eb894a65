//! [`FaultyStorage`]: a storage that fails on demand, for failure-injection tests.

use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{Storage, StorageFile};

/// Wraps a storage and makes every write fail once a byte budget is spent.
///
/// The budget counts bytes written through all files created by this storage (and
/// its clones). Set it with [`FaultyStorage::fail_after_bytes`]; `u64::MAX` (the
/// default) never fails. The failure is an `io::ErrorKind::StorageFull`-style error
/// ("injected write failure"), as a full disk would produce.
///
/// [`FaultyStorage::fail_rename_to`] fails the renames onto one file name instead
/// (and the create-only puts of that name: a remote checkpoint's `COMMIT` marker):
/// for example `"latest"`, the instant after a checkpoint was renamed into place
/// and before `latest` names it, which a kill or a full disk can also hit.
/// [`FaultyStorage::abort_before_rename_to`] aborts the process there instead, as
/// `kill -9` would (for crash tests that run the trainer in a child process).
#[derive(Debug, Clone)]
pub struct FaultyStorage<S> {
    inner: S,
    budget: Arc<AtomicU64>,
    rename_fault: Arc<std::sync::Mutex<Option<RenameFault>>>,
}

/// What [`FaultyStorage`] does to a rename onto a given file name.
#[derive(Debug, Clone)]
struct RenameFault {
    /// The destination file name.
    target: String,
    /// Renames onto it still let through before the fault.
    skip: u64,
    /// Abort the process instead of returning an error.
    abort: bool,
}

impl<S: Storage> FaultyStorage<S> {
    /// Wraps `inner` with an unlimited budget.
    pub fn new(inner: S) -> Self {
        FaultyStorage {
            inner,
            budget: Arc::new(AtomicU64::new(u64::MAX)),
            rename_fault: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// From now on, let `skip` renames onto a file named `target` through, then fail
    /// every later one with an injected error (the source stays where it was).
    pub fn fail_rename_to(&self, target: &str, skip: u64) {
        self.set_rename_fault(target, skip, false);
    }

    /// As [`FaultyStorage::fail_rename_to`], but abort the process (no unwinding, no
    /// destructors: what `kill -9` leaves behind) instead of returning an error.
    pub fn abort_before_rename_to(&self, target: &str, skip: u64) {
        self.set_rename_fault(target, skip, true);
    }

    fn set_rename_fault(&self, target: &str, skip: u64, abort: bool) {
        let mut f = self
            .rename_fault
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *f = Some(RenameFault {
            target: target.to_string(),
            skip,
            abort,
        });
    }

    /// Whether the rename onto `to` is to fail; aborts the process for an abort fault.
    fn rename_faults(&self, to: &Path) -> bool {
        let mut f = self
            .rename_fault
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(fault) = f.as_mut() else {
            return false;
        };
        if to.file_name().and_then(|n| n.to_str()) != Some(fault.target.as_str()) {
            return false;
        }
        if fault.skip > 0 {
            fault.skip -= 1;
            return false;
        }
        if fault.abort {
            std::process::abort();
        }
        true
    }

    /// From now on, let `bytes` more bytes through, then fail every write.
    pub fn fail_after_bytes(&self, bytes: u64) {
        self.budget.store(bytes, Ordering::SeqCst);
    }
}

struct FaultyFile {
    inner: Box<dyn StorageFile>,
    budget: Arc<AtomicU64>,
}

fn injected() -> io::Error {
    io::Error::other("injected write failure (no space left on device)")
}

impl Write for FaultyFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let want = buf.len() as u64;
        let taken = self
            .budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                Some(b.saturating_sub(want))
            })
            .unwrap_or(0);
        if taken == 0 && want > 0 {
            return Err(injected());
        }
        let n = want.min(taken) as usize;
        self.inner.write(&buf[..n])
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl StorageFile for FaultyFile {
    fn sync(&mut self) -> io::Result<()> {
        if self.budget.load(Ordering::SeqCst) == 0 {
            return Err(injected());
        }
        self.inner.sync()
    }
}

impl<S: Storage> Storage for FaultyStorage<S> {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.inner.create_dir_all(path)
    }
    fn create_file(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        if self.budget.load(Ordering::SeqCst) == 0 {
            return Err(injected());
        }
        Ok(Box::new(FaultyFile {
            inner: self.inner.create_file(path)?,
            budget: Arc::clone(&self.budget),
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        if self.rename_faults(to) {
            return Err(injected());
        }
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
    fn is_remote(&self) -> bool {
        self.inner.is_remote()
    }
    fn put_create(&self, path: &Path, bytes: &[u8]) -> io::Result<bool> {
        if self.budget.load(Ordering::SeqCst) == 0 {
            return Err(injected());
        }
        if self.rename_faults(path) {
            return Err(injected());
        }
        self.inner.put_create(path, bytes)
    }
}
