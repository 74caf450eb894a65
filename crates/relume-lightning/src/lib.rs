//! # relume-lightning
//!
//! Reading PyTorch Lightning `.ckpt` files safely, and converting them into relume
//! checkpoints. It builds on `relume-ckpt` for the output format; the `relume lightning`
//! commands of `relume-cli` are thin wrappers over it.
//!
//! A `.ckpt` is a torch zip archive whose `data.pkl` is a Python pickle. Unpickling with
//! Python runs arbitrary code; this crate never does. [`pickle::parse_pickle`] is a
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
//! - [`convert()`]: the file as a relume [`Checkpoint`](relume_ckpt::Checkpoint), optimizer
//!   state mapped from parameter index to name (see [`convert`](mod@convert)).
//! - [`Error`]: every failure; format errors of relume-ckpt pass through as
//!   [`Error::Format`].
//!
//! ## Example
//! ```no_run
//! use relume_lightning::{convert, ConvertOptions, LightningCheckpoint};
//! let ckpt = LightningCheckpoint::open("epoch=1.ckpt")?;
//! println!("epoch {:?}, step {:?}", ckpt.epoch(), ckpt.global_step());
//! for finding in ckpt.diagnose() {
//!     println!("{}: {}", finding.severity.label(), finding.message);
//! }
//! let converted = convert(&ckpt, &ConvertOptions::default())?;
//! relume_ckpt::CheckpointDir::open("runs/converted")?.save(&converted.name, &converted.checkpoint)?;
//! # Ok::<(), relume_lightning::Error>(())
//! ```
#![deny(missing_docs)]

pub mod archive;
pub mod checkpoint;
pub mod convert;
pub mod error;
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
pub use convert::{convert, Conversion, ConvertOptions};
pub use error::{Error, Result};
pub use limits::Limits;
pub use pickle::{parse_pickle, MAX_PROTOCOL};
pub use storage::{MemoryStorages, StorageSource, TorchStorage};
pub use summary::{
    CallbackSummary, LoopProgress, OptimizerKind, OptimizerSummary, ParamGroupSummary,
    SchedulerSummary,
};
pub use value::{CallKind, PyValue, TorchDType, TorchTensor};
