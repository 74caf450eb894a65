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
#[derive(Debug, Clone)]
pub struct FaultyStorage<S> {
    inner: S,
    budget: Arc<AtomicU64>,
}

impl<S: Storage> FaultyStorage<S> {
    /// Wraps `inner` with an unlimited budget.
    pub fn new(inner: S) -> Self {
        FaultyStorage {
            inner,
            budget: Arc::new(AtomicU64::new(u64::MAX)),
        }
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
