//! The file operations the checkpoint writer performs, behind a trait.
//!
//! Every write of the commit protocol ([`crate::commit`]) goes through a [`Storage`]:
//! creating the temporary directory, creating and fsyncing files, renaming the
//! directory into place, fsyncing directories and removing temporaries. The local
//! filesystem implementation is [`LocalStorage`]. [`FaultyStorage`] wraps another
//! storage and fails writes on demand, so tests can prove that a failed save leaves
//! the previous checkpoint and the `latest` pointer intact.
//!
//! A storage must give two guarantees: `rename` is atomic (the destination either
//! does not exist or is complete), and after `sync_file`/`sync_dir` return, the data
//! and directory entries survive power loss.

mod faulty;
mod local;

use std::io::{self, Write};
use std::path::Path;

pub use faulty::FaultyStorage;
pub use local::LocalStorage;

/// A file opened for writing by a [`Storage`].
pub trait StorageFile: Write + Send {
    /// Flushes buffered bytes and makes the file's contents durable (fsync).
    ///
    /// # Errors
    /// The underlying I/O error.
    fn sync(&mut self) -> io::Result<()>;
}

/// The file operations of the commit protocol.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Creates a directory (and missing parents).
    ///
    /// # Errors
    /// The underlying I/O error.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;

    /// Creates a new file for writing; fails if it exists.
    ///
    /// # Errors
    /// The underlying I/O error (`AlreadyExists` when the file exists).
    fn create_file(&self, path: &Path) -> io::Result<Box<dyn StorageFile>>;

    /// Atomically renames `from` to `to` (a file may replace a file; a directory must
    /// not replace anything).
    ///
    /// # Errors
    /// The underlying I/O error.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;

    /// Makes a directory's entries durable (fsync on the directory).
    ///
    /// # Errors
    /// The underlying I/O error.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;

    /// Removes a directory and everything in it.
    ///
    /// # Errors
    /// The underlying I/O error.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;

    /// Removes a file.
    ///
    /// # Errors
    /// The underlying I/O error.
    fn remove_file(&self, path: &Path) -> io::Result<()>;

    /// True for a storage that writes to an object store (`s3://` paths); a remote
    /// run directory refuses a storage that is not.
    fn is_remote(&self) -> bool {
        false
    }

    /// Creates a file holding `bytes` only if none exists, durably; returns `false`
    /// (and writes nothing) when it exists. The remote protocol's commit marker
    /// (S3 `If-None-Match: *`); the default writes a new file, fsyncs it and its
    /// directory.
    ///
    /// # Errors
    /// The underlying I/O error.
    fn put_create(&self, path: &Path, bytes: &[u8]) -> io::Result<bool> {
        let mut f = match self.create_file(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(e),
        };
        f.write_all(bytes)?;
        f.sync()?;
        if let Some(parent) = path.parent() {
            self.sync_dir(parent)?;
        }
        Ok(true)
    }
}
