//! Reading PyTorch Lightning `.ckpt` files safely.
//!
//! A `.ckpt` is a torch zip archive whose `data.pkl` is a Python pickle. Unpickling with
//! Python runs arbitrary code; this module never does. [`pickle::parse_pickle`] is a
//! restricted interpreter: it builds plain [`PyValue`] data, evaluates only
//! `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` and `_rebuild_parameter`
//! (as pure functions over the zip's storages), and keeps every other global as an inert
//! [`PyValue::Global`] / [`PyValue::Call`]. All sizes are bounded by [`Limits`].
//!
//! - [`archive`]: the zip container, memory-mapped; [`storage`]: lazy handles on its
//!   storages, whose bytes are read only on demand (inspecting reads none).
//! - [`pickle`]: the interpreter; [`value`]: what it produces.
//! - [`LightningCheckpoint`]: typed accessors (epoch, tensors, optimizers, schedulers,
//!   callbacks, loop progress) and the resumability [`diagnose`](LightningCheckpoint::diagnose).
//!
//! ```no_run
//! use relume_ckpt::lightning::LightningCheckpoint;
//! let ckpt = LightningCheckpoint::open("epoch=1.ckpt")?;
//! println!("epoch {:?}, step {:?}", ckpt.epoch(), ckpt.global_step());
//! for finding in ckpt.diagnose() {
//!     println!("{}: {}", finding.severity.label(), finding.message);
//! }
//! # Ok::<(), relume_ckpt::Error>(())
//! ```

pub mod archive;
pub mod checkpoint;
mod heap;
pub mod limits;
mod opcodes;
pub mod pickle;
pub mod storage;
pub mod summary;
mod tensor;
pub mod value;

pub use archive::TorchArchive;
pub use checkpoint::{
    CheckpointKind, Finding, LightningCheckpoint, Severity, RESUME_KEYS, VERSION_KEY,
};
pub use limits::Limits;
pub use pickle::{parse_pickle, MAX_PROTOCOL};
pub use storage::{MemoryStorages, StorageSource, TorchStorage};
pub use summary::{
    CallbackSummary, LoopProgress, OptimizerKind, OptimizerSummary, ParamGroupSummary,
    SchedulerSummary,
};
pub use value::{CallKind, PyValue, TorchDType, TorchTensor};
