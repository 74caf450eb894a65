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
//! Every entry is read through a size check against [`Limits::zip_entry_bytes`], both on
//! the size the directory declares and on the bytes actually inflated.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::limits::Limits;
use super::pickle::parse_pickle;
use super::tensor::StorageSource;
use super::value::PyValue;
use crate::error::{Error, Result};

/// Local file header magic of a zip archive.
const ZIP_MAGIC: &[u8; 4] = b"PK\x03\x04";
/// End-of-central-directory magic (an empty zip).
const ZIP_EMPTY_MAGIC: &[u8; 4] = b"PK\x05\x06";

/// An open PyTorch zip checkpoint.
pub struct TorchArchive<R: Read + Seek> {
    path: PathBuf,
    zip: zip::ZipArchive<R>,
    prefix: String,
    limits: Limits,
    entries: BTreeMap<String, usize>,
}

impl TorchArchive<BufReader<File>> {
    /// Opens the zip checkpoint at `path`.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be opened, [`Error::NotAZip`],
    /// [`Error::ZipTruncated`], and the errors of [`TorchArchive::new`].
    pub fn open(path: &Path, limits: Limits) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Io {
            op: "open",
            path: path.to_path_buf(),
            source,
        })?;
        TorchArchive::new(BufReader::new(file), path, limits)
    }
}

impl<R: Read + Seek> TorchArchive<R> {
    /// Reads the zip directory of `reader`; `path` names the file in errors.
    ///
    /// # Errors
    /// [`Error::NotAZip`] when the bytes do not start like a zip, [`Error::ZipTruncated`]
    /// when the directory cannot be read, [`Error::ZipEntryMissing`] without a
    /// `<prefix>/data.pkl`, [`Error::UnsupportedByteOrder`] for big-endian data.
    pub fn new(mut reader: R, path: &Path, limits: Limits) -> Result<Self> {
        let io = |op, source| Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        };
        let mut magic = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match reader.read(&mut magic[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io("read", e)),
            }
        }
        if got < 4 || (&magic != ZIP_MAGIC && &magic != ZIP_EMPTY_MAGIC) {
            let reason = if got > 0 && magic[0] == 0x80 {
                "it is a legacy pickle-format torch file; re-save it with torch >= 1.6".to_string()
            } else {
                format!(
                    "starts with {:02x?}, not the zip magic PK\\x03\\x04",
                    &magic[..got]
                )
            };
            return Err(Error::NotAZip {
                path: path.to_path_buf(),
                reason,
            });
        }
        reader
            .seek(std::io::SeekFrom::Start(0))
            .map_err(|e| io("seek", e))?;
        let zip = zip::ZipArchive::new(reader).map_err(|e| Error::ZipTruncated {
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
            zip,
            prefix,
            limits,
            entries,
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

impl<R: Read + Seek> StorageSource for TorchArchive<R> {
    fn load(&mut self, key: &str) -> Result<Arc<[u8]>> {
        let entry = format!("{}/data/{key}", self.prefix);
        self.read_entry(&entry).map(Arc::from)
    }
}
