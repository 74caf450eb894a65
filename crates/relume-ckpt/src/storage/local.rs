//! [`LocalStorage`]: the commit protocol's file operations on a local filesystem.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use super::{Storage, StorageFile};

/// Buffer size for coalescing small writes (headers, small tensors).
const WRITE_BUFFER: usize = 8 << 20;
/// Writes at least this large bypass the buffer.
const DIRECT_WRITE: usize = 256 << 10;

/// The local filesystem, with real `fsync`s.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalStorage;

struct LocalFile(BufWriter<File>);

impl Write for LocalFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if buf.len() >= DIRECT_WRITE {
            // Large tensors go straight to the file: no copy into the buffer.
            self.0.flush()?;
            self.0.get_mut().write_all(buf)
        } else {
            self.0.write_all(buf)
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl StorageFile for LocalFile {
    fn sync(&mut self) -> io::Result<()> {
        self.0.flush()?;
        self.0.get_ref().sync_all()
    }
}

impl Storage for LocalStorage {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn create_file(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let f = OpenOptions::new().write(true).create_new(true).open(path)?;
        Ok(Box::new(LocalFile(BufWriter::with_capacity(
            WRITE_BUFFER,
            f,
        ))))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
}
