//! The error type of relume-lightning.

use std::path::PathBuf;

/// Every failure reading or converting a PyTorch (Lightning) checkpoint. Each variant
/// names the file, entry, key or tensor involved and, in its message, what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on the checkpoint file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (`"open"`, `"mmap"`).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A tensor's byte length disagrees with dtype × shape.
    #[error("tensor {tensor:?}: {got} bytes but torch dtype {dtype} and shape {shape:?} need {expected}; the tensor data is corrupt or was built wrong")]
    TensorByteLength {
        /// Tensor or storage key.
        tensor: String,
        /// Torch's dtype name (`"float32"`).
        dtype: &'static str,
        /// Declared shape.
        shape: Vec<usize>,
        /// Bytes implied by dtype × shape (`usize::MAX` on overflow).
        expected: usize,
        /// Bytes present.
        got: usize,
    },
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
    /// A tensor's view does not fit its storage (its public shape was changed after the
    /// pickle was read, or the tensor was built inconsistently).
    #[error("{entry}: the tensor view does not fit its storage: {reason}")]
    TorchTensorView {
        /// The storage's zip entry (`"archive/data/0"`).
        entry: String,
        /// What is wrong.
        reason: String,
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
    #[error("{file} at byte {offset}: {limit} limit exceeded ({got} > {max}); the file is corrupt or hostile, or raise relume_lightning::Limits")]
    PickleLimitExceeded {
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
    /// A checkpoint has no `state_dict` tensors, so there is nothing to convert.
    #[error("{path}: no state_dict tensors to convert")]
    NothingToConvert {
        /// The file.
        path: PathBuf,
    },
    /// An optimizer's param groups list another number of parameters than the
    /// `state_dict` has (buffers excluded), so indices cannot be mapped to names.
    #[error("optimizer {optimizer} ({kind}) has {in_groups} parameters in its param groups but the state_dict has {in_state_dict} parameters (buffers excluded); the index-to-name mapping would be wrong (tied or excluded parameters?). Convert the weights alone (`weights_only`)")]
    OptimizerParamCount {
        /// Index of the optimizer in `optimizer_states`.
        optimizer: usize,
        /// The optimizer's kind (`"Adam"`).
        kind: &'static str,
        /// Parameters listed in its param groups.
        in_groups: usize,
        /// Parameters in the `state_dict`.
        in_state_dict: usize,
    },
    /// An optimizer holds state for a parameter index with no parameter.
    #[error("optimizer {optimizer}: state for parameter index {index:?}, which has no parameter; the optimizer state is corrupt or was built over other parameters")]
    OptimizerParamIndex {
        /// Index of the optimizer in `optimizer_states`.
        optimizer: usize,
        /// The parameter index as written in the state.
        index: String,
    },
    /// A per-parameter optimizer tensor does not have its parameter's shape.
    #[error("optimizer {optimizer}: state {key:?} of parameter index {index} has shape {got:?} but {tensor:?} has {expected:?}; the optimizer's parameter order differs from the state_dict order. Convert the weights alone (`weights_only`)")]
    OptimizerStateShape {
        /// Index of the optimizer in `optimizer_states`.
        optimizer: usize,
        /// The state entry (`"exp_avg"`).
        key: String,
        /// The parameter index.
        index: usize,
        /// The parameter the index was mapped to.
        tensor: String,
        /// The parameter's shape.
        expected: Vec<usize>,
        /// The state tensor's shape.
        got: Vec<usize>,
    },
    /// An error of the relume checkpoint format (building a tensor or a state dict,
    /// writing the converted checkpoint).
    #[error(transparent)]
    Format(#[from] relume_ckpt::Error),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
