//! The error type of relume-ckpt.

use std::path::PathBuf;

use crate::dtype::DType;

/// A key whose saved and live shape or dtype disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Full key of the leaf.
    pub key: String,
    /// What the live component expects (e.g. `F32[256, 64]`).
    pub expected: String,
    /// What the checkpoint holds.
    pub got: String,
}

/// Every failure relume-ckpt can report. Each variant names the file, key or tensor
/// involved and, in its message, what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor's byte length disagrees with dtype × shape.
    #[error("tensor {tensor:?}: {got} bytes but dtype {dtype} and shape {shape:?} need {expected}; the tensor data is corrupt or was built wrong")]
    TensorByteLength {
        /// Tensor key (empty when the tensor was not yet named).
        tensor: String,
        /// Declared dtype.
        dtype: DType,
        /// Declared shape.
        shape: Vec<usize>,
        /// Bytes implied by dtype × shape (`usize::MAX` on overflow).
        expected: usize,
        /// Bytes present.
        got: usize,
    },
    /// A tensor's byte range lies outside its file.
    #[error("tensor {tensor:?}: bytes {start}..{start}+{len} lie outside the {file_len}-byte file; the file is truncated or corrupt")]
    TensorOutOfBounds {
        /// Tensor key.
        tensor: String,
        /// Start offset.
        start: usize,
        /// Length.
        len: usize,
        /// Length of the file or map.
        file_len: usize,
    },
    /// A tensor leaf has another dtype than the reader needs.
    #[error("key {key:?}: expected dtype {expected}, found {got}")]
    DTypeMismatch {
        /// Leaf key (may be empty when not known).
        key: String,
        /// The dtype needed.
        expected: DType,
        /// The dtype found.
        got: DType,
    },
    /// A required key is absent from a state dict.
    #[error("key {key:?} is missing from the state; the checkpoint was written by a different component or version")]
    MissingKey {
        /// The missing key.
        key: String,
    },
    /// A key holds a tensor where JSON was expected, or the reverse.
    #[error("key {key:?} should hold a {expected} leaf but holds the other kind")]
    LeafKind {
        /// Leaf key.
        key: String,
        /// `"tensor"` or `"json"`.
        expected: &'static str,
    },
    /// A JSON leaf does not have the structure the component expects.
    #[error("key {key:?}: JSON value has the wrong structure: {reason}")]
    JsonValue {
        /// Leaf key.
        key: String,
        /// What serde reported.
        reason: String,
    },
    /// Strict restore found keys that are missing, unexpected or mismatched.
    #[error("strict restore failed: missing {missing:?}, unexpected {unexpected:?}, mismatched {mismatched:?}; fix the model/config or allow-list these keys explicitly")]
    StrictRestore {
        /// Keys the live state needs but the checkpoint lacks.
        missing: Vec<String>,
        /// Keys in the checkpoint the live state does not know.
        unexpected: Vec<String>,
        /// Keys whose shape or dtype disagree.
        mismatched: Vec<Mismatch>,
    },
    /// An I/O operation failed on a path.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (`"write"`, `"fsync"`, `"rename"`, ...).
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint directory has no `manifest.json`: it was never committed.
    #[error("{path}: no manifest.json; this is not a committed checkpoint (a temporary or a partial copy?)")]
    MissingManifest {
        /// The checkpoint directory.
        path: PathBuf,
    },
    /// The manifest does not say `complete: true`.
    #[error("{path}: the manifest is not marked complete; the checkpoint was never committed, do not use it")]
    IncompleteManifest {
        /// The manifest file.
        path: PathBuf,
    },
    /// The manifest is not valid JSON or lacks a required field.
    #[error("{path}: invalid manifest: {reason}")]
    ManifestInvalid {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The manifest's own checksum does not match its bytes.
    #[error("{path}: manifest checksum mismatch (expected {expected}, got {got}); the manifest was modified or corrupted")]
    ManifestChecksum {
        /// The manifest file.
        path: PathBuf,
        /// The checksum recorded in the manifest.
        expected: String,
        /// The checksum of the bytes found.
        got: String,
    },
    /// A bounded quantity (manifest size, header size, tensor count, path length) exceeds its limit.
    #[error("{path}: {what} is {got}, above the limit of {limit}; the file is corrupt or hostile")]
    LimitExceeded {
        /// The file involved.
        path: PathBuf,
        /// What was measured (`"safetensors header bytes"`, ...).
        what: &'static str,
        /// The measured value.
        got: u64,
        /// The limit.
        limit: u64,
    },
    /// The checkpoint's format version is newer than this relume supports.
    #[error("{path}: checkpoint format version {found} is newer than the supported version {supported}; upgrade relume to read it")]
    UnsupportedFormatVersion {
        /// The manifest file.
        path: PathBuf,
        /// Version found.
        found: u64,
        /// Highest version this build reads.
        supported: u64,
    },
    /// The checkpoint's format version is older than the current one and must be migrated first.
    #[error("{path}: checkpoint format version {found} is older than the current version {current}; run `relume migrate {path}` to upgrade it")]
    OldFormatVersion {
        /// The checkpoint directory.
        path: PathBuf,
        /// Version found.
        found: u64,
        /// Current version.
        current: u64,
    },
    /// A path in the manifest is absolute, contains `..`, or is otherwise unsafe.
    #[error("{path}: manifest entry {entry:?} is not a plain relative path inside the checkpoint ({reason}); refusing to read it")]
    UnsafePath {
        /// The manifest file.
        path: PathBuf,
        /// The offending entry.
        entry: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// A file listed in the manifest does not exist.
    #[error("{path}: file is listed in the manifest but missing; the checkpoint is incomplete")]
    MissingFile {
        /// The missing file.
        path: PathBuf,
    },
    /// A file is shorter (or longer) than the manifest says.
    #[error("{path}: {got} bytes but the manifest records {expected}{}; the file was truncated or altered", tensor.as_ref().map(|t| format!(" (tensor {t:?} is cut off)")).unwrap_or_default())]
    FileSize {
        /// The file.
        path: PathBuf,
        /// First tensor whose bytes are cut off, when known.
        tensor: Option<String>,
        /// Size recorded in the manifest.
        expected: u64,
        /// Size found.
        got: u64,
    },
    /// A file's BLAKE3 checksum disagrees with the manifest.
    #[error("{path}: checksum mismatch (expected blake3 {expected}, got {got}){}; the file is corrupt", tensor.as_ref().map(|t| format!(" in the bytes of tensor {t:?}")).unwrap_or_default())]
    ChecksumMismatch {
        /// The file.
        path: PathBuf,
        /// The corrupted tensor, when the damage lies in a tensor's bytes.
        tensor: Option<String>,
        /// Checksum recorded in the manifest.
        expected: String,
        /// Checksum of the bytes found.
        got: String,
    },
    /// A safetensors file's header is malformed.
    #[error("{path}: invalid safetensors header: {reason}")]
    SafetensorsHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor in a file has a byte range that disagrees with its dtype × shape.
    #[error("{path}: tensor {tensor:?} has {got} bytes but dtype {dtype} and shape {shape:?} need {expected}; the file is corrupt")]
    TensorFileLength {
        /// The file.
        path: PathBuf,
        /// The tensor key.
        tensor: String,
        /// Declared dtype.
        dtype: DType,
        /// Declared shape.
        shape: Vec<usize>,
        /// Bytes implied by dtype × shape.
        expected: u64,
        /// Bytes in the file's offsets.
        got: u64,
    },
    /// A tensor in a safetensors file starts after the end of the tensor before it in
    /// offset order, or the first tensor does not start at data offset 0: some bytes
    /// belong to no tensor.
    #[error("{path}: tensor {tensor:?} starts at data offset {got} but {} ends at {expected}, leaving {} bytes that belong to no tensor; the file is corrupt or was not written by a safetensors writer, re-save it", previous.as_ref().map(|p| format!("the previous tensor {p:?}")).unwrap_or_else(|| "the header".into()), got.saturating_sub(*expected))]
    TensorGap {
        /// The file.
        path: PathBuf,
        /// The tensor that starts too late.
        tensor: String,
        /// The tensor before it in offset order (`None` for the first tensor).
        previous: Option<String>,
        /// Data offset where the tensor should start (the previous tensor's end, or 0).
        expected: u64,
        /// Data offset where it starts.
        got: u64,
    },
    /// A tensor in a safetensors file starts before the end of the tensor before it in
    /// offset order: their bytes overlap.
    #[error("{path}: tensor {tensor:?} starts at data offset {got}, inside tensor {previous:?} which ends at {expected}; the two overlap, the file is corrupt or was not written by a safetensors writer, re-save it")]
    TensorOverlap {
        /// The file.
        path: PathBuf,
        /// The tensor that starts too early.
        tensor: String,
        /// The tensor it overlaps (the one before it in offset order).
        previous: String,
        /// Data offset where the tensor should start (the previous tensor's end).
        expected: u64,
        /// Data offset where it starts.
        got: u64,
    },
    /// A safetensors file has bytes after the end of its last tensor.
    #[error("{path}: {} bytes follow the end of the tensor data at byte {data_end}{} in the {file_len}-byte file; the file is corrupt or was not written by a safetensors writer, re-save it", file_len.saturating_sub(*data_end), last_tensor.as_ref().map(|t| format!(" (after tensor {t:?})")).unwrap_or_default())]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// The last tensor in offset order (`None` when the file has no tensors).
        last_tensor: Option<String>,
        /// Absolute byte offset where the tensor data ends.
        data_end: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// A checkpoint directory, or an entry inside it, is a symbolic link.
    #[error("{path}: is a symlink; relume never follows symlinks in a checkpoint, replace it with a regular file or directory")]
    Symlink {
        /// The symlink (the checkpoint directory itself, or the entry inside it).
        path: PathBuf,
    },
    /// Another process holds the run directory's writer lock.
    #[error("{path}: another process is writing checkpoints to this run directory (lock held); stop it or use another run directory")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A checkpoint cannot be deleted because it is being read.
    #[error("{path}: checkpoint is being read by another handle; retry after the reader is done")]
    InUse {
        /// The checkpoint directory.
        path: PathBuf,
    },
    /// Refused to delete the checkpoint `latest` points to.
    #[error("{path}: refusing to delete the newest committed checkpoint (the one `latest` names)")]
    DeleteLatest {
        /// The checkpoint directory.
        path: PathBuf,
    },
    /// No committed checkpoint by that name or path.
    #[error("{name:?}: no committed checkpoint of that name or path in {dir}")]
    NoSuchCheckpoint {
        /// The name or path asked for.
        name: String,
        /// The checkpoints directory searched.
        dir: PathBuf,
    },
    /// A checkpoint or component name is not a safe single path segment.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// The `latest` pointer names a checkpoint that does not exist or is not committed,
    /// and the directory holds no committed checkpoint to fall back on.
    #[error("{path}: `latest` names {name:?}, which is not a committed checkpoint, and no other committed checkpoint exists: the run's checkpoints were removed; restore them, or start over with `CheckpointDir::clear` (`--fresh` in the examples)")]
    LatestDangling {
        /// The pointer file.
        path: PathBuf,
        /// The name it holds.
        name: String,
    },
    /// The manifest and the data files disagree (tensor counts, keys, components).
    #[error("{path}: {reason}")]
    Inconsistent {
        /// The file involved.
        path: PathBuf,
        /// What disagrees.
        reason: String,
    },
    /// A checkpoint of that name already exists.
    #[error(
        "{path}: a checkpoint of that name already exists; choose another name or delete it first"
    )]
    AlreadyExists {
        /// The existing checkpoint directory.
        path: PathBuf,
    },
    /// A write was attempted through a read-only [`crate::CheckpointDir`].
    #[error("{path}: the run directory was opened read-only; open it with `CheckpointDir::open` to write")]
    ReadOnly {
        /// The checkpoints directory.
        path: PathBuf,
    },
    /// A format migration failed.
    #[error("migrating format v{from} to v{}: {reason}", from + 1)]
    Migration {
        /// The version migrated from.
        from: u64,
        /// What went wrong.
        reason: String,
    },
    /// A save handed to the [`crate::AsyncCheckpointer`] failed on the writer thread; it
    /// was not committed, and `latest` and the earlier checkpoints are untouched.
    #[error("async save of checkpoint {checkpoint:?} failed; it was not committed and `latest` still names the previous checkpoint")]
    AsyncSaveFailed {
        /// The name of the checkpoint that failed.
        checkpoint: String,
        /// Why it failed.
        #[source]
        source: Box<Error>,
    },
    /// The async checkpoint writer thread panicked or is gone.
    #[error("the async checkpoint writer {reason}; this is a bug in relume, please report it")]
    AsyncWriter {
        /// What happened to it.
        reason: String,
    },
    /// A checkpoint of the name being committed already exists with other content.
    /// A deterministic run that re-saves a step it already committed produces the same
    /// fingerprint, and that commit succeeds without writing; a different one means the
    /// run is not deterministic, or another run wrote into this directory.
    #[error("{path}: a checkpoint of that name is already committed with fingerprint {existing}, but this save's state has fingerprint {new}; the run is not deterministic or another run wrote here: move the existing checkpoint away (or delete it) and rerun")]
    CommitConflict {
        /// The existing checkpoint directory.
        path: PathBuf,
        /// Its fingerprint (or why it could not be verified).
        existing: String,
        /// The fingerprint of the state being saved.
        new: String,
    },
    /// An object-store operation on an `s3://` URL failed (endpoint unreachable,
    /// credentials refused, bucket missing, or any other error the store returned).
    #[error("{op} {url}: {reason}; {hint}")]
    Remote {
        /// The URL (bucket and key) the operation was on.
        url: String,
        /// What was being done (`put`, `get`, `list`, ...).
        op: &'static str,
        /// What the store said.
        reason: String,
        /// What to do about it.
        hint: String,
    },
    /// Another writer committed a checkpoint of the same name first: the create-only
    /// commit marker already exists and names another attempt with other state.
    #[error("{url}: another writer committed this checkpoint first (attempt {winner}, fingerprint {existing}; this save's state has fingerprint {new}); nothing of this save is kept. Either two writers are saving into one run (stop one of them, or give each its own run URL), or an earlier run that was not deterministic committed this name (delete the checkpoint or use another run URL)")]
    RemoteAlreadyExists {
        /// The checkpoint's URL.
        url: String,
        /// The attempt the existing marker names.
        winner: String,
        /// The committed checkpoint's fingerprint.
        existing: String,
        /// The fingerprint of the state this writer tried to commit.
        new: String,
    },
    /// An `s3://` URL where it cannot be used: a command or operation that only works
    /// on the local filesystem, or a build without the `s3` feature.
    #[error("{url}: {what}; {hint}")]
    RemoteUnsupported {
        /// The URL given.
        url: String,
        /// What cannot be done with it.
        what: String,
        /// What to do instead.
        hint: String,
    },
    /// A deferred snapshot (see [`crate::Snapshot`]) could not be turned into a
    /// checkpoint on the writer thread; nothing was written.
    #[error("could not build the snapshot of component {component:?} for saving")]
    SnapshotBuild {
        /// The component whose state failed.
        component: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Fills in the tensor or key name of errors raised before the name was known.
    pub fn with_key(self, name: &str) -> Self {
        match self {
            Error::TensorByteLength {
                dtype,
                shape,
                expected,
                got,
                ..
            } => Error::TensorByteLength {
                tensor: name.to_string(),
                dtype,
                shape,
                expected,
                got,
            },
            Error::DTypeMismatch { expected, got, .. } => Error::DTypeMismatch {
                key: name.to_string(),
                expected,
                got,
            },
            other => other,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps an I/O error with the operation and path, for `map_err`.
pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
