//! The PyTorch zip container: `<prefix>/data.pkl`, `<prefix>/data/<key>` storages,
//! `<prefix>/byteorder` and `<prefix>/version`.
//!
//! ```text
//! model.ckpt (zip, entries stored uncompressed)
//! ├── archive/data.pkl          pickle of the checkpoint dict (protocol 2)
//! ├── archive/byteorder         "little"
//! ├── archive/version           serialization format version ("3")
//! ├── archive/data/0            raw little-endian bytes of storage "0"
//! └── archive/data/…
//! ```
//!
//! The file is memory-mapped. The small entries (`data.pkl`, `byteorder`, `version`) are
//! read through a size check against [`Limits::zip_entry_bytes`], both on the size the
//! directory declares and on the bytes actually inflated. Storages are not read at all
//! when the archive is loaded: each becomes a lazy [`TorchStorage`] sized from the
//! central directory (checked against the same limit and, by the interpreter, against the
//! element count the pickle declares); its bytes are a slice of the map for a stored entry
//! (CRC-checked on first use) and inflated on demand for a compressed one.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::limits::Limits;
use super::pickle::parse_pickle;
use super::storage::{ArchiveBytes, Backing, StorageSource, TorchStorage, Zip, ZipStorage};
use super::value::PyValue;
use crate::error::{Error, Result};

/// Local file header magic of a zip archive.
const ZIP_MAGIC: &[u8; 4] = b"PK\x03\x04";
/// End-of-central-directory magic (an empty zip).
const ZIP_EMPTY_MAGIC: &[u8; 4] = b"PK\x05\x06";

/// An open PyTorch zip checkpoint.
///
/// A file is memory-mapped, not read: opening it and running its pickle touch only the
/// zip directory, the entry headers and the small entries (`data.pkl`, `byteorder`,
/// `version`). Storages are [`TorchStorage`] handles whose bytes are read on demand.
/// As with every memory map, the file must not be truncated while it is open.
pub struct TorchArchive {
    path: PathBuf,
    bytes: ArchiveBytes,
    zip: Zip,
    prefix: String,
    limits: Limits,
    entries: BTreeMap<String, usize>,
    reads: Arc<AtomicU64>,
}

impl TorchArchive {
    /// Opens the zip checkpoint at `path`, memory-mapping it.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be opened or mapped, and the errors of
    /// [`TorchArchive::from_bytes`].
    pub fn open(path: &Path, limits: Limits) -> Result<Self> {
        let io = |op, source| Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(|e| io("open", e))?;
        // SAFETY: the map is read-only; like every reader of a memory-mapped file this
        // one assumes the file is not truncated or rewritten while it is open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io("mmap", e))?;
        TorchArchive::new(Backing::Map(Arc::new(map)), path, limits)
    }

    /// Reads the zip directory of an archive held in memory; `path` names it in errors.
    ///
    /// # Errors
    /// [`Error::NotAZip`] when the bytes do not start like a zip, [`Error::ZipTruncated`]
    /// when the directory cannot be read, [`Error::ZipEntryMissing`] without a
    /// `<prefix>/data.pkl`, [`Error::UnsupportedByteOrder`] for big-endian data.
    pub fn from_bytes(bytes: Vec<u8>, path: &Path, limits: Limits) -> Result<Self> {
        TorchArchive::new(Backing::Memory(bytes), path, limits)
    }

    fn new(backing: Backing, path: &Path, limits: Limits) -> Result<Self> {
        let bytes = ArchiveBytes(Arc::new(backing));
        let head = bytes.as_ref().get(..4).unwrap_or(bytes.as_ref());
        if head != ZIP_MAGIC && head != ZIP_EMPTY_MAGIC {
            let reason = if head.first() == Some(&0x80) {
                "it is a legacy pickle-format torch file; re-save it with torch >= 1.6".to_string()
            } else {
                format!("starts with {head:02x?}, not the zip magic PK\\x03\\x04")
            };
            return Err(Error::NotAZip {
                path: path.to_path_buf(),
                reason,
            });
        }
        let zip =
            zip::ZipArchive::new(Cursor::new(bytes.clone())).map_err(|e| Error::ZipTruncated {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let mut entries = BTreeMap::new();
        let mut prefix = None;
        for (i, name) in zip.file_names_raw().enumerate() {
            let Ok(name) = std::str::from_utf8(name) else {
                continue;
            };
            if prefix.is_none() {
                if let Some(p) = name.strip_suffix("/data.pkl").filter(|p| !p.contains('/')) {
                    prefix = Some(p.to_string());
                }
            }
            entries.entry(name.to_string()).or_insert(i);
        }
        let Some(prefix) = prefix else {
            return Err(Error::ZipEntryMissing {
                path: path.to_path_buf(),
                entry: "<prefix>/data.pkl".into(),
            });
        };
        let mut archive = TorchArchive {
            path: path.to_path_buf(),
            bytes,
            zip,
            prefix,
            limits,
            entries,
            reads: Arc::new(AtomicU64::new(0)),
        };
        if let Some(order) = archive.read_optional("byteorder")? {
            let order = String::from_utf8_lossy(&order).trim().to_string();
            if order != "little" {
                return Err(Error::UnsupportedByteOrder {
                    path: archive.path.clone(),
                    got: order,
                });
            }
        }
        Ok(archive)
    }

    /// Storage bytes handed out so far by the storages of this archive (0 after
    /// [`load`](Self::load): reading the pickle reads no storage).
    pub fn storage_bytes_read(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// The shared counter behind [`storage_bytes_read`](Self::storage_bytes_read).
    pub(crate) fn reads(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.reads)
    }

    /// The directory name every entry lives under (`"archive"` for recent torch).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The serialization format version from `<prefix>/version`, if recorded.
    ///
    /// # Errors
    /// Read errors of the entry.
    pub fn format_version(&mut self) -> Result<Option<String>> {
        Ok(self
            .read_optional("version")?
            .map(|v| String::from_utf8_lossy(&v).trim().to_string()))
    }

    fn read_optional(&mut self, name: &str) -> Result<Option<Vec<u8>>> {
        let entry = format!("{}/{name}", self.prefix);
        if self.entries.contains_key(&entry) {
            self.read_entry(&entry).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Reads a whole entry by its full name, bounded by [`Limits::zip_entry_bytes`].
    ///
    /// # Errors
    /// [`Error::ZipEntryMissing`], [`Error::PickleLimitExceeded`] for an oversized entry,
    /// [`Error::ZipTruncated`] when the entry's bytes cannot be read or fail their CRC.
    pub fn read_entry(&mut self, entry: &str) -> Result<Vec<u8>> {
        let missing = || Error::ZipEntryMissing {
            path: self.path.clone(),
            entry: entry.to_string(),
        };
        let Some(&index) = self.entries.get(entry) else {
            return Err(missing());
        };
        let label = format!("{}:{entry}", self.path.display());
        let max = self.limits.zip_entry_bytes;
        let corrupt = |e: String| Error::ZipTruncated {
            path: self.path.clone(),
            reason: format!("entry {entry}: {e}"),
        };
        let file = self
            .zip
            .by_index(index)
            .map_err(|e| corrupt(e.to_string()))?;
        let declared = file.size();
        if declared > max {
            return Err(Error::PickleLimitExceeded {
                file: label,
                offset: 0,
                limit: "zip entry size",
                max,
                got: declared,
            });
        }
        let mut buf = Vec::with_capacity(declared.min(1 << 26) as usize);
        file.take(max.saturating_add(1))
            .read_to_end(&mut buf)
            .map_err(|e| corrupt(e.to_string()))?;
        if buf.len() as u64 > max {
            return Err(Error::PickleLimitExceeded {
                file: label,
                offset: 0,
                limit: "zip entry size",
                max,
                got: buf.len() as u64,
            });
        }
        Ok(buf)
    }

    /// Runs `<prefix>/data.pkl` through the restricted interpreter, loading storages from
    /// `<prefix>/data/<key>`.
    ///
    /// # Errors
    /// The errors of [`read_entry`](Self::read_entry) and of
    /// [`parse_pickle`].
    pub fn load(&mut self) -> Result<PyValue> {
        let entry = format!("{}/data.pkl", self.prefix);
        let pickle = self.read_entry(&entry)?;
        let label = format!("{}:{entry}", self.path.display());
        let limits = self.limits;
        parse_pickle(&pickle, &label, self, &limits)
    }
}

impl StorageSource for TorchArchive {
    /// The storage `<prefix>/data/<key>`: its size and location from the zip directory
    /// and its local header; none of its bytes are read.
    fn storage(&mut self, key: &str) -> Result<TorchStorage> {
        let entry = format!("{}/data/{key}", self.prefix);
        let Some(&index) = self.entries.get(&entry) else {
            return Err(Error::ZipEntryMissing {
                path: self.path.clone(),
                entry,
            });
        };
        let corrupt = |e: String| Error::ZipTruncated {
            path: self.path.clone(),
            reason: format!("entry {entry}: {e}"),
        };
        let file = self
            .zip
            .by_index_raw(index)
            .map_err(|e| corrupt(e.to_string()))?;
        let len = file.size();
        let max = self.limits.zip_entry_bytes;
        if len > max {
            return Err(Error::PickleLimitExceeded {
                file: format!("{}:{entry}", self.path.display()),
                offset: 0,
                limit: "zip entry size",
                max,
                got: len,
            });
        }
        let stored = match file.compression() {
            zip::CompressionMethod::Stored => {
                let start = file
                    .data_start()
                    .ok_or_else(|| corrupt("no data offset".into()))?;
                let end = start.checked_add(len);
                let fits = end.is_some_and(|e| e <= self.bytes.as_ref().len() as u64);
                if !fits || file.compressed_size() != len {
                    return Err(corrupt(format!(
                        "a stored entry of {len} bytes at offset {start} does not fit the {}-byte file",
                        self.bytes.as_ref().len()
                    )));
                }
                Some((start as usize, file.crc32()))
            }
            _ => None,
        };
        drop(file);
        Ok(TorchStorage::in_zip(
            key,
            ZipStorage {
                path: self.path.clone(),
                entry,
                len,
                bytes: self.bytes.clone(),
                zip: self.zip.clone(),
                index,
                stored,
                reads: Arc::clone(&self.reads),
            },
        ))
    }
}
