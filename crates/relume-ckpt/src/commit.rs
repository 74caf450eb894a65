//! The writer and its commit protocol (invariant 1).
//!
//! [`write_checkpoint`] writes a [`Checkpoint`] as a directory:
//!
//! 1. create `.tmp-<name>-<uuid>/` **inside the destination directory** (same filesystem,
//!    so the final rename is atomic);
//! 2. write each component's tensors to `<component>.safetensors` and the JSON leaves
//!    to `state.json`, hashing the bytes (BLAKE3, on a second thread) while they are
//!    written;
//! 3. write `manifest.json` last (with every file's size and checksum and
//!    `complete: true`), fsync every file, the manifest included, concurrently (one
//!    thread per file, so the device sees one batch rather than a queue of flushes),
//!    and only when all have succeeded fsync the temporary directory;
//! 4. rename the directory to its final name and fsync the parent directory.
//!
//! [`write_latest`] then replaces the `latest` pointer atomically (temporary file,
//! fsync, rename, fsync directory). There is no copy fallback: if a rename fails the
//! save fails.
//!
//! What survives what:
//! - **an error** (full disk, I/O error): the temporary directory is removed on a
//!   best-effort basis, the error is returned, earlier checkpoints and `latest` are
//!   untouched;
//! - **a panic, `kill -9`, or power loss** before step 4: only a `.tmp-*` directory
//!   remains; it is never listed and is removed by the next [`crate::CheckpointDir::open`].
//!   After step 4's fsync the checkpoint is durable; until [`write_latest`] completes
//!   `latest` still names the previous one, which stays valid.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::bytes::TensorBytes;
pub use crate::checkpoint::Checkpoint;
use crate::error::{io_err, Error, Result};
use crate::fingerprint::fingerprint;
use crate::manifest::{
    rfc3339, ComponentEntry, FileEntry, Manifest, FORMAT_VERSION, MANIFEST_FILE, STATE_FILE,
};
use crate::pages::RELEASE_PIECE;
use crate::storage::Storage;
use crate::tensor_file::encode_header;

/// Prefix of temporary names inside a checkpoints directory.
pub const TMP_PREFIX: &str = ".tmp-";
/// Name of the pointer file naming the newest committed checkpoint.
pub const LATEST_FILE: &str = "latest";

/// Checks that `name` is a safe single path segment: 1–200 bytes of
/// `[A-Za-z0-9_.=+-]`, not starting with `.`, and not `latest`.
///
/// # Errors
/// [`Error::InvalidName`] saying why.
pub fn check_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() || name.len() > 200 {
        Some("must be 1 to 200 bytes long")
    } else if name.starts_with('.') {
        Some("must not start with `.` (reserved for temporaries)")
    } else if name == LATEST_FILE {
        Some("`latest` is reserved for the pointer file")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.=+-".contains(&b))
    {
        Some("only ASCII letters, digits and `_.=+-` are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// A written file whose fsync is still due.
struct Unsynced {
    path: PathBuf,
    file: Box<dyn crate::storage::StorageFile>,
}

/// fsyncs every file, concurrently when there are several. Returns the error of
/// the first failing file in `files` order, so the message does not depend on
/// thread timing.
fn sync_all(files: Vec<Unsynced>) -> Result<()> {
    if files.len() <= 1 {
        for mut u in files {
            u.file.sync().map_err(io_err("fsync", &u.path))?;
        }
        return Ok(());
    }
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .into_iter()
            .map(|mut u| s.spawn(move || u.file.sync().map_err(io_err("fsync", &u.path))))
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(r) => r,
                // A panic in an fsync thread is a bug; propagate it.
                Err(p) => std::panic::resume_unwind(p),
            })
            .collect()
    });
    results.into_iter().collect()
}

/// Bytes hashed at a time by both checksums of a tensor (fits in L2 with room).
const HASH_PIECE: usize = 64 << 10;

/// Writes `chunks` to a new file, hashing them on a second thread. The file is
/// returned open, not yet synced. Returns the file entry and the CRC32 of each
/// chunk from index `crc_from` on.
///
/// `sources[i]`, when given, is the tensor whose bytes `chunks[i]` are: a memory-mapped
/// one has its pages released as they are written and hashed (see `crate::pages`), so
/// writing a large mapped tensor does not keep it resident.
fn write_hashed(
    storage: &dyn Storage,
    dir: &Path,
    rel: &str,
    chunks: &[&[u8]],
    sources: &[Option<&TensorBytes>],
    crc_from: usize,
) -> Result<(FileEntry, Vec<u32>, Unsynced)> {
    let path = dir.join(rel);
    let mut file = storage
        .create_file(&path)
        .map_err(io_err("create", &path))?;
    let (hash, crcs, written) = std::thread::scope(|s| {
        let hasher = s.spawn(|| {
            let mut h = blake3::Hasher::new();
            let mut crcs = Vec::with_capacity(chunks.len().saturating_sub(crc_from));
            for (i, c) in chunks.iter().enumerate() {
                if i < crc_from {
                    h.update(c);
                    continue;
                }
                // Both checksums per cache-sized piece: a large tensor is read
                // from memory once, not twice.
                let mut crc = crc32fast::Hasher::new();
                let source = sources.get(i).copied().flatten();
                for (j, piece) in c.chunks(HASH_PIECE).enumerate() {
                    h.update(piece);
                    crc.update(piece);
                    let done = (j + 1) * HASH_PIECE;
                    if let Some(src) = source.filter(|_| done % RELEASE_PIECE == 0) {
                        src.release(done - RELEASE_PIECE, RELEASE_PIECE);
                    }
                }
                if let Some(src) = source {
                    let tail = c.len() % RELEASE_PIECE;
                    src.release(c.len() - tail, tail);
                }
                crcs.push(crc.finalize());
            }
            (h.finalize(), crcs)
        });
        let mut written = Ok(0u64);
        'chunks: for (i, c) in chunks.iter().enumerate() {
            let source = sources.get(i).copied().flatten();
            let mut off = 0;
            for piece in c.chunks(RELEASE_PIECE) {
                if let Err(e) = file.write_all(piece) {
                    written = Err(e);
                    break 'chunks;
                }
                if let Some(src) = source {
                    src.release(off, piece.len());
                }
                off += piece.len();
            }
            if let Ok(n) = &mut written {
                *n += c.len() as u64;
            }
        }
        // A panic in the hasher thread is a bug; propagate it.
        let (h, crcs) = match hasher.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        };
        (h, crcs, written)
    });
    let bytes = written.map_err(io_err("write", &path))?;
    Ok((
        FileEntry {
            path: rel.to_string(),
            bytes,
            blake3: hash.to_hex().to_string(),
        },
        crcs,
        Unsynced { path, file },
    ))
}

/// Writes `ckpt` as `parent/name` with the commit protocol described in the module
/// docs, and returns the final path. `latest` is not touched (see [`write_latest`]).
///
/// A name that is already committed is not an error when the existing checkpoint
/// verifies and holds the same state (same fingerprint): a deterministic run that
/// replays a step it had committed before a crash saves it again, and that commit
/// succeeds without writing.
///
/// # Errors
/// [`Error::InvalidName`] for a bad checkpoint or component name,
/// [`Error::CommitConflict`] when `parent/name` is committed with another
/// fingerprint (or does not verify), [`Error::AlreadyExists`] when `parent/name`
/// exists but is not a committed checkpoint, [`Error::Io`] naming the file and the
/// operation that failed. On error no new checkpoint named `name` exists.
pub fn write_checkpoint(
    storage: &dyn Storage,
    parent: &Path,
    name: &str,
    ckpt: &Checkpoint,
) -> Result<PathBuf> {
    write_checkpoint_seq(storage, parent, name, ckpt, None)
}

/// [`write_checkpoint`] with the manifest's `commit_seq`.
pub(crate) fn write_checkpoint_seq(
    storage: &dyn Storage,
    parent: &Path,
    name: &str,
    ckpt: &Checkpoint,
    commit_seq: Option<u64>,
) -> Result<PathBuf> {
    check_name(name)?;
    for c in ckpt.components.keys() {
        check_name(c)?;
    }
    let final_path = parent.join(name);
    if std::fs::symlink_metadata(&final_path).is_ok() {
        match same_as_existing(&final_path, ckpt) {
            Ok(()) => {
                tracing::info!(
                    "checkpoint {} is already committed with the same fingerprint; not written again",
                    final_path.display()
                );
                return Ok(final_path);
            }
            Err(Error::CommitConflict { .. }) if incomplete_group(parent, &final_path) => {
                return replace_incomplete(storage, parent, name, ckpt, commit_seq);
            }
            Err(e) => return Err(e),
        }
    }
    let tmp = write_temporary_seq(storage, parent, name, ckpt, commit_seq)?;
    storage
        .rename(&tmp, &final_path)
        .map_err(io_err("rename", &final_path))?;
    storage
        .sync_dir(parent)
        .map_err(io_err("fsync directory", parent))?;
    Ok(final_path)
}

/// Whether the committed checkpoint at `path` belongs to a boundary group of which
/// some member never committed (see [`crate::CheckpointDir`]'s reconciliation).
fn incomplete_group(parent: &Path, path: &Path) -> bool {
    let mpath = path.join(MANIFEST_FILE);
    let Ok(bytes) = std::fs::read(&mpath) else {
        return false;
    };
    match Manifest::parse(&mpath, &bytes) {
        Ok(m) => m
            .group
            .iter()
            .any(|g| !parent.join(g).join(MANIFEST_FILE).is_file()),
        Err(_) => false,
    }
}

/// Replaces the checkpoint `parent/name`, a member of a boundary group that never
/// completed, with `ckpt`. Such a checkpoint is never resolved as the newest, so
/// nothing resumes from it; the run that replays its boundary may reach a
/// different callback bookkeeping at that step (which checkpoint the earlier
/// process had resumed from, say) while training state is identical. The new
/// checkpoint is written first; the old one is renamed to a temporary, the new one
/// renamed into place, the old one removed. A kill between the two renames leaves
/// no checkpoint of that name, and the replay writes it again.
fn replace_incomplete(
    storage: &dyn Storage,
    parent: &Path,
    name: &str,
    ckpt: &Checkpoint,
    commit_seq: Option<u64>,
) -> Result<PathBuf> {
    let final_path = parent.join(name);
    tracing::warn!(
        "replacing {}: its boundary group never completed, and the replayed boundary saves other callback state",
        final_path.display()
    );
    let tmp = write_temporary_seq(storage, parent, name, ckpt, commit_seq)?;
    let old = parent.join(format!("{TMP_PREFIX}del-{}", uuid::Uuid::new_v4().simple()));
    storage
        .rename(&final_path, &old)
        .map_err(io_err("rename", &final_path))?;
    storage
        .sync_dir(parent)
        .map_err(io_err("fsync directory", parent))?;
    storage
        .rename(&tmp, &final_path)
        .map_err(io_err("rename", &final_path))?;
    storage
        .sync_dir(parent)
        .map_err(io_err("fsync directory", parent))?;
    storage
        .remove_dir_all(&old)
        .map_err(io_err("remove", &old))?;
    Ok(final_path)
}

/// Checks that the committed checkpoint at `path` verifies and holds exactly the
/// state of `ckpt` (same fingerprint).
///
/// # Errors
/// [`Error::AlreadyExists`] when `path` is not a committed checkpoint,
/// [`Error::CommitConflict`] when it does not verify or its fingerprint differs.
fn same_as_existing(path: &Path, ckpt: &Checkpoint) -> Result<()> {
    let new = fingerprint(&ckpt.components);
    if !path.join(MANIFEST_FILE).is_file() {
        return Err(Error::AlreadyExists {
            path: path.to_path_buf(),
        });
    }
    let report = crate::read::verify(path);
    let existing = match (&report.manifest, report.problems.first()) {
        (Some(m), None) => m.fingerprint.clone(),
        (_, Some(p)) => format!("<does not verify: {p}>"),
        (None, None) => "<no manifest>".to_string(),
    };
    if existing != new {
        return Err(Error::CommitConflict {
            path: path.to_path_buf(),
            existing,
            new,
        });
    }
    Ok(())
}

/// Steps 1–3 of the protocol: a complete, fsynced checkpoint under `parent/.tmp-<label>-<uuid>`.
/// The label (the checkpoint name) is in the temporary's name so that I/O errors, which name the
/// file, also tell which checkpoint was being saved.
pub(crate) fn write_temporary(
    storage: &dyn Storage,
    parent: &Path,
    label: &str,
    ckpt: &Checkpoint,
) -> Result<PathBuf> {
    write_temporary_seq(storage, parent, label, ckpt, None)
}

fn write_temporary_seq(
    storage: &dyn Storage,
    parent: &Path,
    label: &str,
    ckpt: &Checkpoint,
    commit_seq: Option<u64>,
) -> Result<PathBuf> {
    for c in ckpt.components.keys() {
        check_name(c)?;
    }
    let tmp = parent.join(format!(
        "{TMP_PREFIX}{label}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    storage
        .create_dir_all(&tmp)
        .map_err(io_err("create directory", &tmp))?;
    match write_contents(storage, &tmp, ckpt, commit_seq, false) {
        Ok(_) => Ok(tmp),
        Err(e) => {
            if let Err(rm) = storage.remove_dir_all(&tmp) {
                tracing::warn!(
                    "could not remove temporary {}: {rm}; it will be cleaned on the next open",
                    tmp.display()
                );
            }
            Err(e)
        }
    }
}

/// Writes every file of `ckpt` into `tmp`, the manifest last, and makes them durable.
/// Returns the BLAKE3 (hex) of the manifest's bytes.
///
/// With `manifest_after_data`, the data files are synced (for a remote store:
/// their uploads completed) before the manifest is written, so no store ever holds a
/// manifest whose files are still in flight; otherwise all files are synced in one
/// concurrent batch and the directory is fsynced after.
pub(crate) fn write_contents(
    storage: &dyn Storage,
    tmp: &Path,
    ckpt: &Checkpoint,
    commit_seq: Option<u64>,
    manifest_after_data: bool,
) -> Result<String> {
    let mut files = Vec::new();
    let mut unsynced = Vec::new();
    let mut components = BTreeMap::new();
    let mut state = serde_json::Map::new();
    for (name, sd) in &ckpt.components {
        let tensors: Vec<(&str, &crate::state::TensorData)> = sd.tensors().collect();
        let mut entry = ComponentEntry {
            file: None,
            tensors: tensors.len() as u64,
            json_keys: sd.json_leaves().map(|(k, _)| k.to_string()).collect(),
            tensor_crc32: BTreeMap::new(),
        };
        if !tensors.is_empty() {
            let rel = format!("{name}.safetensors");
            let header = encode_header(&tensors);
            let mut chunks: Vec<&[u8]> = Vec::with_capacity(tensors.len() + 1);
            chunks.push(&header);
            chunks.extend(tensors.iter().map(|(_, t)| &t.bytes()[..]));
            let mut sources: Vec<Option<&TensorBytes>> = vec![None];
            sources.extend(tensors.iter().map(|(_, t)| Some(t.bytes())));
            let (fe, crcs, u) = write_hashed(storage, tmp, &rel, &chunks, &sources, 1)?;
            unsynced.push(u);
            entry.tensor_crc32 = tensors
                .iter()
                .map(|(k, _)| k.to_string())
                .zip(crcs)
                .collect();
            entry.file = Some(rel);
            files.push(fe);
        }
        let leaves: serde_json::Map<String, Value> = sd
            .json_leaves()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        state.insert(name.clone(), Value::Object(leaves));
        components.insert(name.clone(), entry);
    }
    let state_bytes = serde_json::to_vec(&Value::Object(state)).map_err(|e| Error::JsonValue {
        key: STATE_FILE.into(),
        reason: e.to_string(),
    })?;
    let (fe, _, u) = write_hashed(storage, tmp, STATE_FILE, &[&state_bytes], &[], 1)?;
    unsynced.push(u);
    files.push(fe);
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        relume_version: env!("CARGO_PKG_VERSION").to_string(),
        created_at: rfc3339(secs),
        files,
        components,
        progress: ckpt.progress.clone(),
        config: ckpt.config.clone(),
        metrics: ckpt.metrics.clone(),
        fingerprint: fingerprint(&ckpt.components),
        complete: true,
        commit_seq,
        group: ckpt.group.clone(),
    };
    let bytes = manifest.to_bytes();
    if manifest_after_data {
        sync_all(std::mem::take(&mut unsynced))?;
    }
    let mpath = tmp.join(MANIFEST_FILE);
    let mut f = storage
        .create_file(&mpath)
        .map_err(io_err("create", &mpath))?;
    f.write_all(&bytes).map_err(io_err("write", &mpath))?;
    unsynced.push(Unsynced {
        path: mpath,
        file: f,
    });
    sync_all(unsynced)?;
    storage
        .sync_dir(tmp)
        .map_err(io_err("fsync directory", tmp))?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// Atomically points `dir/latest` at checkpoint `name`: writes a temporary file,
/// fsyncs it, renames it over `latest`, fsyncs `dir`.
///
/// # Errors
/// [`Error::InvalidName`], or [`Error::Io`] naming the failed operation; on error the
/// previous pointer is intact.
pub fn write_latest(storage: &dyn Storage, dir: &Path, name: &str) -> Result<()> {
    check_name(name)?;
    let tmp = dir.join(format!(
        "{TMP_PREFIX}latest-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let res = (|| {
        let mut f = storage.create_file(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(format!("{name}\n").as_bytes())
            .map_err(io_err("write", &tmp))?;
        f.sync().map_err(io_err("fsync", &tmp))?;
        drop(f);
        let latest = dir.join(LATEST_FILE);
        storage
            .rename(&tmp, &latest)
            .map_err(io_err("rename", &latest))
    })();
    if let Err(e) = res {
        if let Err(rm) = storage.remove_file(&tmp) {
            tracing::warn!(
                "could not remove temporary {}: {rm}; it will be cleaned on the next open",
                tmp.display()
            );
        }
        return Err(e);
    }
    storage
        .sync_dir(dir)
        .map_err(io_err("fsync directory", dir))
}
