//! The reader: verify everything, then hand out zero-copy state.
//!
//! [`load`] checks the manifest (self-checksum, version, `complete`, paths), then the
//! size and BLAKE3 of **every** file, and only then parses the safetensors headers
//! and returns the state, whose tensors are slices of read-only memory maps of the
//! verified files. [`verify`] runs the same checks but collects every problem
//! instead of stopping at the first.
//!
//! Neither follows a symlink: a checkpoint directory that is a symlink, or a symlink
//! anywhere inside one (listed in the manifest or not), is [`Error::Symlink`]; the
//! directory is scanned without following links, and every file is opened with
//! `O_NOFOLLOW` on unix, so a link swapped in after the scan is refused too.
//!
//! While a [`LoadedCheckpoint`] is alive it holds a shared lock on the checkpoint's
//! `manifest.json`; [`crate::CheckpointDir::delete`] needs the exclusive lock, so a
//! checkpoint being read is never deleted.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::Value;

use crate::bytes::TensorBytes;
use crate::error::{io_err, Error, Result};
use crate::manifest::{Manifest, MANIFEST_FILE, MAX_MANIFEST_BYTES, STATE_FILE};
use crate::state::{StateDict, TensorData};
use crate::tensor_file::parse_header;

/// A verified checkpoint, with its state ready for `load_state_dict`.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    /// The checkpoint directory.
    pub path: PathBuf,
    /// Its validated manifest.
    pub manifest: Manifest,
    /// The state of every component; tensors are memory-mapped.
    pub components: BTreeMap<String, StateDict>,
    /// Shared lock on `manifest.json`, held while the maps are alive (none for a
    /// remote checkpoint, whose bytes live in anonymous memory).
    _lock: Option<File>,
}

/// The outcome of [`verify`]: every problem found, and how much was checked.
#[derive(Debug)]
pub struct VerifyReport {
    /// The checkpoint directory.
    pub path: PathBuf,
    /// The manifest, when it could be read and validated.
    pub manifest: Option<Manifest>,
    /// Every problem found, in file order; empty when the checkpoint is intact.
    pub problems: Vec<Error>,
    /// Bytes read and hashed (all files plus the manifest).
    pub bytes_checked: u64,
}

impl VerifyReport {
    /// True when no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// True when `path` itself (not what it points to) is a symlink.
fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// Opens `path` for reading without following a symlink in its last component
/// (`O_NOFOLLOW` on unix, a `symlink_metadata` check elsewhere).
///
/// A symlink is [`Error::Symlink`], a missing file the error `missing` builds.
fn open_nofollow(path: &Path, missing: impl FnOnce() -> Error) -> Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW);
    }
    #[cfg(not(unix))]
    if is_symlink(path) {
        return Err(Error::Symlink {
            path: path.to_path_buf(),
        });
    }
    match options.open(path) {
        Ok(f) => Ok(f),
        Err(_) if is_symlink(path) => Err(Error::Symlink {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(missing()),
        Err(e) => Err(io_err("open", path)(e)),
    }
}

/// Refuses a checkpoint directory that is itself a symlink.
///
/// A missing directory passes: [`open_manifest`] reports it as
/// [`Error::MissingManifest`].
fn check_dir_not_symlink(dir: &Path) -> Result<()> {
    // Rebuilt from its components so that a trailing `/` or `/.`, which makes
    // `lstat` follow the link, is dropped.
    let bare: PathBuf = dir.components().collect();
    match std::fs::symlink_metadata(&bare) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::Symlink {
            path: dir.to_path_buf(),
        }),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("stat", dir)(e)),
    }
}

/// Every symlink inside checkpoint directory `dir`, at any depth, as
/// [`Error::Symlink`] in path order; nothing is followed. A directory that cannot be
/// read is an [`Error::Io`]; a missing `dir` yields nothing (see
/// [`check_dir_not_symlink`]).
fn symlinks_inside(dir: &Path) -> Vec<Error> {
    let mut problems = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(entries) => entries,
            Err(e) if d == dir && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                problems.push(io_err("read directory", &d)(e));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    problems.push(io_err("read directory", &d)(e));
                    continue;
                }
            };
            let path = entry.path();
            // `DirEntry::file_type` does not follow symlinks.
            match entry.file_type() {
                Ok(t) if t.is_symlink() => problems.push(Error::Symlink { path }),
                Ok(t) if t.is_dir() => pending.push(path),
                Ok(_) => {}
                Err(e) => problems.push(io_err("stat", &path)(e)),
            }
        }
    }
    problems.sort_by(|a, b| problem_path(a).cmp(&problem_path(b)));
    problems
}

/// The path an error from [`symlinks_inside`] names.
fn problem_path(e: &Error) -> Option<&Path> {
    match e {
        Error::Symlink { path } | Error::Io { path, .. } => Some(path),
        _ => None,
    }
}

/// Adds `e` to `problems` unless it is a symlink already reported by the scan.
fn push_problem(problems: &mut Vec<Error>, e: Error) {
    if let Error::Symlink { path } = &e {
        if problems
            .iter()
            .any(|p| matches!(p, Error::Symlink { path: q } if q == path))
        {
            return;
        }
    }
    problems.push(e);
}

/// Opens `dir/manifest.json`, takes a shared lock on it and parses it.
fn open_manifest(dir: &Path) -> Result<(File, Manifest, u64)> {
    let mpath = dir.join(MANIFEST_FILE);
    let mut f = open_nofollow(&mpath, || Error::MissingManifest {
        path: dir.to_path_buf(),
    })?;
    fs4::FileExt::lock_shared(&f).map_err(io_err("lock", &mpath))?;
    let len = f.metadata().map_err(io_err("stat", &mpath))?.len();
    if len > MAX_MANIFEST_BYTES {
        return Err(Error::LimitExceeded {
            path: mpath,
            what: "manifest bytes",
            got: len,
            limit: MAX_MANIFEST_BYTES,
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.read_to_end(&mut bytes).map_err(io_err("read", &mpath))?;
    let m = Manifest::parse(&mpath, &bytes)?;
    Ok((f, m, len))
}

/// Checks one file's presence, size and checksum; returns its map when intact.
fn check_file(dir: &Path, m: &Manifest, idx: usize) -> Result<Arc<Mmap>> {
    let fe = &m.files[idx];
    let path = dir.join(&fe.path);
    let file = open_nofollow(&path, || Error::MissingFile { path: path.clone() })?;
    // SAFETY: the map is read-only; checkpoints are immutable once committed and the
    // writer never modifies a file in place (see the module docs of `commit`).
    let map = unsafe { Mmap::map(&file) }.map_err(io_err("mmap", &path))?;
    let mut hasher = blake3::Hasher::new();
    if map.len() as u64 == fe.bytes {
        crate::pages::for_each_piece(&map, 0, map.len(), |p| {
            hasher.update(p);
        });
    }
    check_bytes(&path, m, idx, &map, &hasher.finalize().to_hex())?;
    Ok(Arc::new(map))
}

/// Checks the bytes of file `m.files[idx]` (at `path`, for messages), whose BLAKE3
/// is `got` (not looked at when the size is already wrong): [`Error::FileSize`] or
/// [`Error::ChecksumMismatch`], naming the damaged tensor where the CRC32s tell.
pub(crate) fn check_bytes(
    path: &Path,
    m: &Manifest,
    idx: usize,
    map: &[u8],
    got: &str,
) -> Result<()> {
    let fe = &m.files[idx];
    let path = path.to_path_buf();
    let component = m
        .components
        .values()
        .find(|c| c.file.as_deref() == Some(fe.path.as_str()));
    if map.len() as u64 != fe.bytes {
        let tensor = component.and_then(|_| match parse_header(&path, map, map.len() as u64) {
            Err(Error::FileSize { tensor, .. }) => tensor,
            _ => None,
        });
        return Err(Error::FileSize {
            path,
            tensor,
            expected: fe.bytes,
            got: map.len() as u64,
        });
    }
    if got != fe.blake3 {
        let tensor = component.and_then(|c| {
            let entries = parse_header(&path, map, map.len() as u64).ok()?;
            entries.into_iter().find_map(|e| {
                let crc = crc32fast::hash(&map[e.start as usize..e.end as usize]);
                (c.tensor_crc32.get(&e.key) != Some(&crc)).then_some(e.key)
            })
        });
        return Err(Error::ChecksumMismatch {
            path,
            tensor,
            expected: fe.blake3.clone(),
            got: got.to_string(),
        });
    }
    Ok(())
}

/// Checks every file, in parallel; results are in manifest order.
fn check_all(dir: &Path, m: &Manifest) -> Vec<Result<Arc<Mmap>>> {
    let n = m.files.len();
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .min(n.max(1));
    let mut slots: Vec<Option<Result<Arc<Mmap>>>> = (0..n).map(|_| None).collect();
    std::thread::scope(|s| {
        let chunk = n.div_ceil(threads).max(1);
        for (ci, part) in slots.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                for (j, slot) in part.iter_mut().enumerate() {
                    *slot = Some(check_file(dir, m, ci * chunk + j));
                }
            });
        }
    });
    slots
        .into_iter()
        .map(|s| {
            s.unwrap_or_else(|| {
                Err(Error::Inconsistent {
                    path: dir.to_path_buf(),
                    reason: "file was not checked".into(),
                })
            })
        })
        .collect()
}

/// [`Error::Inconsistent`] when the tensors of component `name`'s file (`path`) are
/// not the ones its manifest entry lists.
pub(crate) fn header_disagrees(
    path: &Path,
    name: &str,
    c: &crate::manifest::ComponentEntry,
    entries: &[crate::tensor_file::TensorEntry],
) -> Option<Error> {
    (entries.len() as u64 != c.tensors
        || entries.iter().any(|e| !c.tensor_crc32.contains_key(&e.key)))
    .then(|| Error::Inconsistent {
        path: path.to_path_buf(),
        reason: format!(
            "holds {} tensors but the manifest lists {} for component {name:?}",
            entries.len(),
            c.tensors
        ),
    })
}

/// [`Error::Inconsistent`] when component `name`'s JSON keys in `state.json`
/// (`path`) are not the ones its manifest entry lists.
pub(crate) fn json_keys_disagree(
    path: &Path,
    name: &str,
    c: &crate::manifest::ComponentEntry,
    keys: &[&String],
) -> Option<Error> {
    (keys.len() != c.json_keys.len() || keys.iter().zip(&c.json_keys).any(|(a, b)| *a != b)).then(
        || Error::Inconsistent {
            path: path.to_path_buf(),
            reason: format!(
                "component {name:?}: JSON keys {keys:?} differ from the manifest's {:?}",
                c.json_keys
            ),
        },
    )
}

/// The loaded checkpoint `path` from its verified manifest and file maps (`dir`
/// names the files in errors), or the first inconsistency between them.
pub(crate) fn assemble(
    dir: &Path,
    path: PathBuf,
    manifest: Manifest,
    maps: &BTreeMap<String, Arc<Mmap>>,
    lock: Option<File>,
) -> Result<LoadedCheckpoint> {
    let mut errors = Vec::new();
    let components = build_components(dir, &manifest, maps, &mut errors);
    if let Some(e) = errors.into_iter().next() {
        return Err(e);
    }
    Ok(LoadedCheckpoint {
        path,
        manifest,
        components,
        _lock: lock,
    })
}

/// Builds the components from verified maps; pushes every inconsistency to `errors`.
pub(crate) fn build_components(
    dir: &Path,
    m: &Manifest,
    maps: &BTreeMap<String, Arc<Mmap>>,
    errors: &mut Vec<Error>,
) -> BTreeMap<String, StateDict> {
    let mut out = BTreeMap::new();
    let state_path = dir.join(STATE_FILE);
    let state: Option<serde_json::Map<String, Value>> = match maps.get(STATE_FILE) {
        Some(map) => match serde_json::from_slice(map) {
            Ok(v) => Some(v),
            Err(e) => {
                errors.push(Error::Inconsistent {
                    path: state_path.clone(),
                    reason: format!("not a JSON object: {e}"),
                });
                None
            }
        },
        None => {
            if !m.files.iter().any(|f| f.path == STATE_FILE) {
                errors.push(Error::Inconsistent {
                    path: state_path.clone(),
                    reason: "state.json is not listed in the manifest".into(),
                });
            }
            None
        }
    };
    for (name, c) in &m.components {
        let mut sd = StateDict::new();
        if let Some(file) = &c.file {
            let path = dir.join(file);
            let Some(map) = maps.get(file) else { continue };
            match parse_header(&path, map, map.len() as u64) {
                Ok(entries) => {
                    if let Some(e) = header_disagrees(&path, name, c, &entries) {
                        errors.push(e);
                        continue;
                    }
                    for e in entries {
                        let t = TensorBytes::mapped(
                            Arc::clone(map),
                            e.start as usize,
                            (e.end - e.start) as usize,
                            &e.key,
                        )
                        .and_then(|b| TensorData::new(e.dtype, e.shape, b))
                        .map_err(|err| err.with_key(&e.key));
                        match t {
                            Ok(t) => sd.insert_tensor(e.key, t),
                            Err(err) => errors.push(err),
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        } else if c.tensors != 0 {
            errors.push(Error::Inconsistent {
                path: dir.join(MANIFEST_FILE),
                reason: format!("component {name:?} lists {} tensors but no file", c.tensors),
            });
        }
        if let Some(state) = &state {
            let leaves = state.get(name).and_then(Value::as_object);
            let keys: Vec<&String> = leaves.map(|l| l.keys().collect()).unwrap_or_default();
            if let Some(e) = json_keys_disagree(&state_path, name, c, &keys) {
                errors.push(e);
            } else if let Some(l) = leaves {
                for (k, v) in l {
                    sd.insert_json(k.clone(), v.clone());
                }
            }
        }
        out.insert(name.clone(), sd);
    }
    out
}

/// Loads a checkpoint directory after verifying the manifest and every checksum.
///
/// Nothing is returned until every file's size and BLAKE3 match the manifest.
/// Tensor bytes are zero-copy slices of memory maps of the verified files.
///
/// # Errors
/// The first problem [`verify`] would report: [`Error::Symlink`] when the directory
/// is a symlink or holds one (listed in the manifest or not), [`Error::MissingManifest`],
/// [`Error::ManifestChecksum`], [`Error::IncompleteManifest`],
/// [`Error::UnsupportedFormatVersion`], [`Error::OldFormatVersion`],
/// [`Error::UnsafePath`], [`Error::MissingFile`], [`Error::FileSize`],
/// [`Error::ChecksumMismatch`], [`Error::LimitExceeded`],
/// [`Error::SafetensorsHeader`], [`Error::TensorFileLength`], [`Error::Inconsistent`].
///
/// An `s3://bucket/.../checkpoints/<name>` URL loads a remote checkpoint (feature
/// `s3`): its `COMMIT` marker, then the manifest it names, then every file, streamed
/// into anonymous memory and verified the same way.
pub fn load(path: impl AsRef<Path>) -> Result<LoadedCheckpoint> {
    let dir = path.as_ref();
    if crate::location::is_remote(dir) {
        #[cfg(feature = "s3")]
        return crate::remote::RemoteDir::load_url(dir);
        #[cfg(not(feature = "s3"))]
        return Err(crate::location::not_built(dir));
    }
    check_dir_not_symlink(dir)?;
    if let Some(e) = symlinks_inside(dir).into_iter().next() {
        return Err(e);
    }
    let (lock, manifest, _) = open_manifest(dir)?;
    let mut maps = BTreeMap::new();
    for (fe, r) in manifest.files.iter().zip(check_all(dir, &manifest)) {
        maps.insert(fe.path.clone(), r?);
    }
    assemble(dir, dir.to_path_buf(), manifest, &maps, Some(lock))
}

/// Reads and validates the manifest of the checkpoint at `path` (a local directory
/// or an `s3://` checkpoint URL) without reading its data: for a listing, or a
/// decision that needs only progress and config. [`load`] verifies the data.
///
/// # Errors
/// [`Error::MissingManifest`], [`Error::ManifestChecksum`], [`Error::Symlink`], the
/// parse errors of [`Manifest::parse`], [`Error::Remote`] for an unreachable store.
pub fn read_manifest(path: impl AsRef<Path>) -> Result<Manifest> {
    let dir = path.as_ref();
    if crate::location::is_remote(dir) {
        #[cfg(feature = "s3")]
        return crate::remote::read_manifest_url(dir);
        #[cfg(not(feature = "s3"))]
        return Err(crate::location::not_built(dir));
    }
    check_dir_not_symlink(dir)?;
    let (_lock, m, _) = open_manifest(dir)?;
    Ok(m)
}

/// The bytes of file `rel` (`manifest.json`, `state.json`, ...) of the checkpoint at
/// `path`, local or an `s3://` URL (the file of its committed attempt), unverified:
/// for listings that read one small file. [`load`] verifies.
///
/// # Errors
/// [`Error::MissingFile`] when it does not exist, [`Error::UnsafePath`] for a `rel`
/// that leaves the checkpoint, [`Error::Io`] / [`Error::Remote`].
pub fn read_checkpoint_file(path: impl AsRef<Path>, rel: &str) -> Result<Vec<u8>> {
    let dir = path.as_ref();
    crate::manifest::check_relative_path(&dir.join(MANIFEST_FILE), rel)?;
    if crate::location::is_remote(dir) {
        #[cfg(feature = "s3")]
        return crate::remote::read_file_url(dir, rel);
        #[cfg(not(feature = "s3"))]
        return Err(crate::location::not_built(dir));
    }
    let fpath = dir.join(rel);
    let mut f = open_nofollow(&fpath, || Error::MissingFile {
        path: fpath.clone(),
    })?;
    let mut out = Vec::new();
    f.read_to_end(&mut out).map_err(io_err("read", &fpath))?;
    Ok(out)
}

/// Reads a standalone safetensors file (any writer's: relume's own component
/// files, `safetensors.torch.save_file`, candle's `safetensors::save`) into a
/// [`StateDict`] of its tensors, keyed by their names. The file is mapped, not
/// copied; it is refused when it is a symlink. safetensors carries no checksum, so
/// what is checked is its structure: the header, each tensor's byte length against
/// dtype × shape, and no gaps, overlaps or trailing bytes.
///
/// # Errors
/// [`Error::MissingFile`], [`Error::Symlink`], [`Error::Io`],
/// [`Error::SafetensorsHeader`], [`Error::LimitExceeded`], [`Error::TensorFileLength`],
/// [`Error::TensorGap`], [`Error::TensorOverlap`], [`Error::TrailingBytes`],
/// [`Error::FileSize`].
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<StateDict> {
    let path = path.as_ref();
    let file = open_nofollow(path, || Error::MissingFile {
        path: path.to_path_buf(),
    })?;
    // SAFETY: read-only map; a concurrent writer of the same file is the caller's
    // bug, and the worst it can cause is wrong values, which the header checks bound.
    let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(io_err("mmap", path))?);
    let mut sd = StateDict::new();
    for e in parse_header(path, &map, map.len() as u64)? {
        let bytes = TensorBytes::mapped(
            Arc::clone(&map),
            e.start as usize,
            (e.end - e.start) as usize,
            &e.key,
        )?;
        let t = TensorData::new(e.dtype, e.shape, bytes).map_err(|err| err.with_key(&e.key))?;
        sd.insert_tensor(e.key, t);
    }
    Ok(sd)
}

/// Verifies a checkpoint directory and reports **every** problem found.
///
/// Scans the directory for symlinks (a checkpoint directory that is itself a symlink
/// is the only problem reported: nothing is read through it), then checks the
/// manifest, then every file (presence, size, BLAKE3, naming the damaged tensor when
/// the damage lies in a tensor's bytes), then the safetensors headers and the
/// agreement between files and manifest. A symlink is reported once, as
/// [`Error::Symlink`], whether the scan or the opening of a listed file found it.
///
/// An `s3://` checkpoint URL is verified remotely (feature `s3`): every object is
/// streamed and hashed, tensor headers are range-read, nothing is copied to disk.
pub fn verify(path: impl AsRef<Path>) -> VerifyReport {
    let dir = path.as_ref();
    if crate::location::is_remote(dir) {
        #[cfg(feature = "s3")]
        return crate::remote::RemoteDir::verify_url(dir);
        #[cfg(not(feature = "s3"))]
        return VerifyReport {
            path: dir.to_path_buf(),
            manifest: None,
            problems: vec![crate::location::not_built(dir)],
            bytes_checked: 0,
        };
    }
    let mut report = VerifyReport {
        path: dir.to_path_buf(),
        manifest: None,
        problems: Vec::new(),
        bytes_checked: 0,
    };
    if let Err(e) = check_dir_not_symlink(dir) {
        report.problems.push(e);
        return report;
    }
    report.problems.extend(symlinks_inside(dir));
    let (_lock, manifest, mlen) = match open_manifest(dir) {
        Ok(v) => v,
        Err(e) => {
            push_problem(&mut report.problems, e);
            return report;
        }
    };
    report.bytes_checked = mlen;
    let mut maps = BTreeMap::new();
    for (fe, r) in manifest.files.iter().zip(check_all(dir, &manifest)) {
        match r {
            Ok(map) => {
                report.bytes_checked += map.len() as u64;
                maps.insert(fe.path.clone(), map);
            }
            Err(e) => push_problem(&mut report.problems, e),
        }
    }
    build_components(dir, &manifest, &maps, &mut report.problems);
    report.manifest = Some(manifest);
    report
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn open_nofollow_refuses_a_symlink_itself() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("target");
        std::fs::write(&target, b"x").unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let missing = || Error::MissingFile { path: link.clone() };
        let err = open_nofollow(&link, missing).unwrap_err();
        assert!(
            matches!(&err, Error::Symlink { path } if *path == link),
            "{err}"
        );
        let dangling = tmp.path().join("dangling");
        std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).unwrap();
        let err = open_nofollow(&dangling, || Error::MissingFile {
            path: dangling.clone(),
        })
        .unwrap_err();
        assert!(matches!(err, Error::Symlink { .. }), "{err}");
        assert!(open_nofollow(&target, || Error::MissingFile {
            path: target.clone()
        })
        .is_ok());
    }

    #[test]
    fn symlinks_inside_finds_nested_links_without_following() {
        let tmp = tempfile::tempdir().unwrap();
        let sub = tmp.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::os::unix::fs::symlink("/", sub.join("root")).unwrap();
        std::os::unix::fs::symlink(&sub, tmp.path().join("loop")).unwrap();
        let found: Vec<PathBuf> = symlinks_inside(tmp.path())
            .into_iter()
            .map(|e| match e {
                Error::Symlink { path } => path,
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(found, [tmp.path().join("loop"), sub.join("root")]);
    }
}
