//! The error type of relume-ckpt.

use std::path::PathBuf;

use crate::dtype::DType;
use crate::stateful::Mismatch;

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
    // --- lightning interop ---
    /// The file is not a zip archive (a legacy or foreign file, not a PyTorch checkpoint).
    #[error("{path}: not a PyTorch zip checkpoint ({reason}); only files written by torch.save since torch 1.6 can be read")]
    NotAZip {
        /// The file.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// The file starts like a zip archive but its directory cannot be read.
    #[error("{path}: zip archive is truncated or corrupt ({reason}); the copy was cut short, use an intact copy")]
    ZipTruncated {
        /// The file.
        path: PathBuf,
        /// What the zip reader reported.
        reason: String,
    },
    /// An entry the checkpoint needs is absent from the zip archive.
    #[error("{path}: zip entry {entry:?} is missing; the checkpoint is incomplete or not a torch checkpoint")]
    ZipEntryMissing {
        /// The file.
        path: PathBuf,
        /// The entry name.
        entry: String,
    },
    /// The checkpoint stores tensors in an unsupported byte order.
    #[error("{path}: byte order {got:?} is not supported; only little-endian checkpoints can be read (re-save on a little-endian machine)")]
    UnsupportedByteOrder {
        /// The file.
        path: PathBuf,
        /// The recorded byte order.
        got: String,
    },
    /// The pickle is malformed.
    #[error("{file} at byte {offset}: malformed pickle: {reason}")]
    Pickle {
        /// The pickle (`"x.ckpt:archive/data.pkl"`).
        file: String,
        /// Offset of the opcode being run.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The pickle uses an opcode the restricted reader does not run.
    #[error("{file} at byte {offset}: pickle opcode 0x{opcode:02x} is not supported by the restricted reader; the file is not a torch checkpoint or is corrupt")]
    UnknownOpcode {
        /// The pickle.
        file: String,
        /// Offset of the opcode.
        offset: u64,
        /// The opcode byte.
        opcode: u8,
    },
    /// A declared size or a count passes a reader limit.
    #[error("{file} at byte {offset}: {limit} limit exceeded ({got} > {max}); the file is corrupt or hostile, or raise relume_ckpt::lightning::Limits")]
    LimitExceeded {
        /// The pickle or zip entry.
        file: String,
        /// Offset of the opcode being run (0 for zip entries).
        offset: u64,
        /// Which limit.
        limit: &'static str,
        /// The limit.
        max: u64,
        /// The size or count declared or reached.
        got: u64,
    },
    /// A torch tensor has a dtype relume checkpoints cannot store.
    #[error("tensor {tensor:?}: torch dtype {dtype} has no relume equivalent; cast it (e.g. to int32) before converting")]
    UnsupportedTorchDType {
        /// Tensor name.
        tensor: String,
        /// Torch's dtype name (`"int16"`, `"int8"`).
        dtype: &'static str,
    },
    /// The decoded checkpoint does not have the structure Lightning writes.
    #[error("{path}: key {key:?}: {reason}")]
    LightningStructure {
        /// The file.
        path: PathBuf,
        /// The key involved.
        key: String,
        /// What is wrong.
        reason: String,
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
