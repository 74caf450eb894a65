//! Small durable-file helpers shared by the loggers.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Maps an I/O error to [`Error::Io`] naming `path`.
pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { op, path, source }
}

/// Creates `dir` (and parents).
pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io("create directory", dir))
}

/// fsyncs a directory so that a rename or a new file in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync directory", dir))
    }
    #[cfg(not(unix))]
    {
        let _unused = dir;
        Ok(())
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory,
/// fsync, rename over `path`, fsync of the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io("rename into place", path))?;
    sync_dir(&dir)
}

/// Opens `path` for appending after truncating it to `len` bytes (creating it
/// when `len` is 0 and it does not exist).
pub(crate) fn open_truncated(path: &Path, len: u64) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(len == 0)
        .truncate(false)
        .open(path)
        .map_err(io("open", path))?;
    f.set_len(len).map_err(io("truncate", path))?;
    f.sync_all().map_err(io("sync", path))?;
    drop(f);
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io("open for append", path))
}

/// The directory holding `path` (`.` for a bare file name).
pub(crate) fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
