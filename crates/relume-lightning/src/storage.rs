//! Storages as lazy handles: where a storage's bytes live, read only on demand.
//!
//! Reading a `.ckpt` runs its pickle and looks at the zip directory, nothing more: every
//! storage becomes a [`TorchStorage`] that knows its zip entry, its size (the
//! uncompressed size from the central directory) and how to reach its bytes. Inspecting a
//! checkpoint therefore costs memory proportional to its pickle, not to its tensors.
//!
//! A storage's bytes are reached in one of three ways:
//!
//! | entry | bytes |
//! |---|---|
//! | stored (what `torch.save` writes) | a slice of the memory-mapped file: zero-copy, pages file-backed |
//! | deflated | inflated from the zip entry into memory on each read |
//! | in memory ([`MemoryStorages`]) | the buffer itself |
//!
//! A stored entry's CRC-32 is checked the first time its bytes are handed out in full, so
//! a damaged storage is still an error, as it is when the zip reader inflates an entry.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use relume_ckpt::TensorBytes;

use crate::error::{Error, Result};

/// Where the interpreter gets storages from, by zip storage key.
pub trait StorageSource {
    /// A handle on storage `key`. Implementations look up the storage's size; they do
    /// not read its bytes.
    ///
    /// # Errors
    /// [`Error::ZipEntryMissing`] when there is no such storage,
    /// [`Error::PickleLimitExceeded`] when its entry is larger than the reader accepts.
    fn storage(&mut self, key: &str) -> Result<TorchStorage>;
}

/// Storages held in memory, keyed by storage key; used for pickles outside a zip.
#[derive(Debug, Default, Clone)]
pub struct MemoryStorages {
    /// Storage bytes by key.
    pub storages: BTreeMap<String, Arc<[u8]>>,
}

impl StorageSource for MemoryStorages {
    fn storage(&mut self, key: &str) -> Result<TorchStorage> {
        let Some(bytes) = self.storages.get(key) else {
            return Err(Error::ZipEntryMissing {
                path: "<memory>".into(),
                entry: format!("data/{key}"),
            });
        };
        Ok(TorchStorage::memory(key, Arc::clone(bytes)))
    }
}

/// The bytes of a whole archive file: a read-only memory map, or a buffer.
#[derive(Debug)]
pub(crate) enum Backing {
    /// The file, memory-mapped.
    Map(Arc<memmap2::Mmap>),
    /// The file's bytes in memory (archives built from a buffer).
    Memory(Vec<u8>),
}

/// A cheap, cloneable view of an archive's bytes, readable as a zip through a `Cursor`.
#[derive(Debug, Clone)]
pub(crate) struct ArchiveBytes(pub(crate) Arc<Backing>);

impl AsRef<[u8]> for ArchiveBytes {
    fn as_ref(&self) -> &[u8] {
        match &*self.0 {
            Backing::Map(m) => m,
            Backing::Memory(v) => v,
        }
    }
}

/// The zip archive type storages of a file read their entries through.
pub(crate) type Zip = zip::ZipArchive<Cursor<ArchiveBytes>>;

/// Where a zip storage lives, as the archive found it in the directory.
pub(crate) struct ZipStorage {
    /// The archive file, for errors.
    pub path: PathBuf,
    /// The full entry name.
    pub entry: String,
    /// The uncompressed size the directory declares.
    pub len: u64,
    /// The archive's bytes.
    pub bytes: ArchiveBytes,
    /// The zip, for inflating a compressed entry.
    pub zip: Zip,
    /// The entry's index in `zip`.
    pub index: usize,
    /// For a stored entry: the offset of its data in `bytes`, and its CRC-32.
    pub stored: Option<(usize, u32)>,
    /// The archive's shared count of storage bytes handed out.
    pub reads: Arc<AtomicU64>,
}

/// How one storage's bytes are reached.
enum Location {
    /// A buffer.
    Memory(Arc<[u8]>),
    /// A stored (uncompressed) zip entry: `len` bytes at `start` of the archive.
    Stored {
        bytes: ArchiveBytes,
        start: usize,
        crc32: u32,
        /// The outcome of the CRC check, once made.
        checked: OnceLock<std::result::Result<(), String>>,
    },
    /// A compressed zip entry, inflated on demand.
    Deflated { zip: Zip, index: usize },
}

struct Inner {
    key: String,
    /// The archive file, for errors.
    path: PathBuf,
    /// The full entry name (`<prefix>/data/<key>`).
    entry: String,
    len: u64,
    location: Location,
    /// Storage bytes handed out, shared by every storage of one archive.
    reads: Arc<AtomicU64>,
}

/// A storage's bytes as read: a slice of the mapped archive, or a buffer.
pub(crate) enum StorageBytes {
    /// `len` bytes at `start` of the archive bytes (zero-copy).
    Archive {
        bytes: ArchiveBytes,
        start: usize,
        len: usize,
    },
    /// A buffer.
    Buffer(Arc<[u8]>),
}

impl StorageBytes {
    /// The bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            // In bounds: checked when the storage handle was made.
            StorageBytes::Archive { bytes, start, len } => &bytes.as_ref()[*start..*start + *len],
            StorageBytes::Buffer(b) => b,
        }
    }
}

/// A lazy handle on one torch storage (the zip entry `<prefix>/data/<key>`).
///
/// Cloning is cheap; every tensor viewing a storage shares one handle. Two handles are
/// equal when they name the same key and entry with the same size.
#[derive(Clone)]
pub struct TorchStorage(Arc<Inner>);

impl TorchStorage {
    /// A storage over a buffer, named `key`.
    pub fn memory(key: &str, bytes: Arc<[u8]>) -> Self {
        TorchStorage(Arc::new(Inner {
            key: key.to_string(),
            path: "<memory>".into(),
            entry: format!("data/{key}"),
            len: bytes.len() as u64,
            location: Location::Memory(bytes),
            reads: Arc::new(AtomicU64::new(0)),
        }))
    }

    /// A storage in a zip entry, described by `at`.
    pub(crate) fn in_zip(key: &str, at: ZipStorage) -> Self {
        let location = match at.stored {
            Some((start, crc32)) => Location::Stored {
                bytes: at.bytes,
                start,
                crc32,
                checked: OnceLock::new(),
            },
            None => Location::Deflated {
                zip: at.zip,
                index: at.index,
            },
        };
        TorchStorage(Arc::new(Inner {
            key: key.to_string(),
            path: at.path,
            entry: at.entry,
            len: at.len,
            location,
            reads: at.reads,
        }))
    }

    /// The storage key (the name of `<prefix>/data/<key>`).
    pub fn key(&self) -> &str {
        &self.0.key
    }

    /// The full zip entry name (`"archive/data/0"`; `"data/0"` in memory).
    pub fn entry(&self) -> &str {
        &self.0.entry
    }

    /// The size in bytes, as the zip directory declares it. No bytes are read.
    pub fn len(&self) -> u64 {
        self.0.len
    }

    /// Whether the storage holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }

    /// Whether the bytes are reached without a copy: a stored entry of a mapped file,
    /// or a buffer. `false` for a compressed entry, which is inflated on every read.
    pub fn is_zero_copy(&self) -> bool {
        !matches!(self.0.location, Location::Deflated { .. })
    }

    /// Storage bytes handed out so far by this storage and every other storage of the
    /// same archive (a test of laziness: inspecting a checkpoint leaves it near 0).
    pub fn bytes_read(&self) -> u64 {
        self.0.reads.load(Ordering::Relaxed)
    }

    fn corrupt(&self, reason: impl std::fmt::Display) -> Error {
        Error::ZipTruncated {
            path: self.0.path.clone(),
            reason: format!("entry {}: {reason}", self.0.entry),
        }
    }

    /// The whole storage, its CRC-32 checked (stored entries) or inflated (compressed).
    ///
    /// # Errors
    /// [`Error::ZipTruncated`] when the bytes fail their CRC-32, cannot be inflated, or
    /// their length differs from the declared size.
    pub(crate) fn read_all(&self) -> Result<StorageBytes> {
        let out = match &self.0.location {
            Location::Memory(b) => StorageBytes::Buffer(Arc::clone(b)),
            Location::Stored {
                bytes,
                start,
                crc32,
                checked,
            } => {
                let len = self.0.len as usize;
                let slice = &bytes.as_ref()[*start..*start + len];
                let check = checked.get_or_init(|| {
                    let got = match &*bytes.0 {
                        // In pieces, releasing the pages read: a large storage is
                        // not kept resident by its check.
                        Backing::Map(m) => {
                            let mut h = crc32fast::Hasher::new();
                            match TensorBytes::mapped(Arc::clone(m), *start, len, &self.0.entry) {
                                Ok(view) => view.for_each_piece(|p| h.update(p)),
                                // In bounds: checked when the directory was read.
                                Err(_) => h.update(slice),
                            }
                            h.finalize()
                        }
                        Backing::Memory(_) => crc32fast::hash(slice),
                    };
                    if got == *crc32 {
                        Ok(())
                    } else {
                        Err(format!(
                            "invalid checksum: crc32 {got:08x}, the directory declares {crc32:08x}"
                        ))
                    }
                });
                check.clone().map_err(|r| self.corrupt(r))?;
                StorageBytes::Archive {
                    bytes: bytes.clone(),
                    start: *start,
                    len,
                }
            }
            Location::Deflated { zip, index } => {
                let mut zip = zip.clone();
                let file = zip.by_index(*index).map_err(|e| self.corrupt(e))?;
                let mut buf = Vec::with_capacity(self.0.len.min(1 << 26) as usize);
                file.take(self.0.len.saturating_add(1))
                    .read_to_end(&mut buf)
                    .map_err(|e| self.corrupt(e))?;
                if buf.len() as u64 != self.0.len {
                    return Err(self.corrupt(format!(
                        "inflated to {} bytes, the directory declares {}",
                        buf.len(),
                        self.0.len
                    )));
                }
                StorageBytes::Buffer(Arc::from(buf))
            }
        };
        self.0.reads.fetch_add(self.0.len, Ordering::Relaxed);
        Ok(out)
    }

    /// `len` bytes at byte `start` (already checked to lie inside the storage), without
    /// checking the entry's CRC: for reading one element, such as a scalar's value.
    ///
    /// # Errors
    /// [`Error::ZipTruncated`] when a compressed entry cannot be inflated that far.
    pub(crate) fn read_range(&self, start: u64, len: usize) -> Result<Vec<u8>> {
        let end = start.saturating_add(len as u64);
        if end > self.0.len {
            return Err(self.corrupt(format!(
                "bytes {start}..{end} lie past the end of the {}-byte storage",
                self.0.len
            )));
        }
        let out = match &self.0.location {
            Location::Memory(b) => b[start as usize..end as usize].to_vec(),
            Location::Stored {
                bytes, start: at, ..
            } => {
                let from = at + start as usize;
                bytes.as_ref()[from..from + len].to_vec()
            }
            Location::Deflated { zip, index } => {
                let mut zip = zip.clone();
                let mut file = zip.by_index(*index).map_err(|e| self.corrupt(e))?;
                std::io::copy(&mut (&mut file).take(start), &mut std::io::sink())
                    .map_err(|e| self.corrupt(e))?;
                let mut buf = vec![0u8; len];
                file.read_exact(&mut buf).map_err(|e| self.corrupt(e))?;
                buf
            }
        };
        self.0.reads.fetch_add(len as u64, Ordering::Relaxed);
        Ok(out)
    }
}

impl std::fmt::Debug for TorchStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match self.0.location {
            Location::Memory(_) => "memory",
            Location::Stored { .. } => "stored",
            Location::Deflated { .. } => "deflated",
        };
        write!(
            f,
            "TorchStorage({:?}, {} bytes, {how})",
            self.0.entry, self.0.len
        )
    }
}

impl PartialEq for TorchStorage {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key && self.0.entry == other.0.entry && self.0.len == other.0.len
    }
}
