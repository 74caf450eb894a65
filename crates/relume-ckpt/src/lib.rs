//! # relume-ckpt
//!
//! The checkpoint format and engine of relume: durable, verifiable, crash-safe.
//! It has no ML dependency; the trainer in the `relume` crate builds on it.
//!
//! - [`StateDict`]: a tree of named tensor and JSON leaves.
//! - [`Stateful`]: export and restore a component, with a [`RestoreReport`].
//! - [`fingerprint`](fn@fingerprint): a deterministic hash over every leaf, written in the manifest
//!   and recomputed after a restore.
//! - [`CheckpointDir`]: a run directory's checkpoints: save with the commit protocol
//!   ([`commit`]), list, resolve `latest`, delete safely, behind a writer lock.
//! - [`load`] and [`verify`]: check the manifest and every checksum before any state
//!   is returned; tensors are memory-mapped.
//! - [`migrate`]: pure format migrations v(n) → v(n+1).
//!
//! Reading PyTorch Lightning `.ckpt` files (and converting them into this format) is
//! the separate crate `relume-lightning`, so this one carries no zip or pickle code.
//!
//! ## Modules, bottom up
//! Imports only go one way: `dtype` → `error` → `bytes` ([`TensorBytes`]) → `state`
//! ([`StateDict`]) → {`fingerprint`, `tensor_file`, `snapshot`, `checkpoint`
//! ([`Checkpoint`])} → `manifest` → {`commit`, `read`} → `dir` → `async_writer`.
//!
//! ## Layout (format v1, specified in `docs/FORMAT.md`)
//!
//! ```text
//! run-dir/
//!   checkpoints/
//!     .lock                     writer lock
//!     .tmp-<name>-<uuid>/       save in progress or crashed: never listed, cleaned on open
//!     step=000120-epoch=2/      committed (renamed from .tmp-<name>-<uuid>)
//!       manifest.json           written last; versions, files[{path,bytes,blake3}],
//!                               components, progress, config, metrics, fingerprint,
//!                               complete: true, manifest_blake3
//!       model.safetensors       one safetensors file per component with tensors
//!       optimizer.safetensors
//!       state.json              {"<component>": {"<key>": <json leaf>}}
//!     latest                    names the newest committed checkpoint
//! ```
//!
//! ## Example
//! ```
//! use relume_ckpt::{load, verify, Checkpoint, CheckpointDir, StateDict, TensorData};
//! # fn main() -> relume_ckpt::Result<()> {
//! let run = tempfile::tempdir().unwrap();
//! let dir = CheckpointDir::open(run.path())?;
//! let mut model = StateDict::new();
//! model.insert_tensor("linear.weight", TensorData::from_f32(vec![2], &[0.5, -1.0])?);
//! let mut ckpt = Checkpoint::default();
//! ckpt.components.insert("model".into(), model);
//! ckpt.progress = serde_json::json!({"step": 10, "epoch": 1});
//! let path = dir.save("step=000010", &ckpt)?;
//! assert_eq!(dir.latest()?, Some(path.clone()));
//! assert!(verify(&path).is_ok());
//! let loaded = load(&path)?;
//! let w = loaded.components["model"].require_tensor("linear.weight")?;
//! assert_eq!(w.to_f32_vec()?, vec![0.5, -1.0]);
//! assert!(w.bytes().is_mapped());
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod async_writer;
pub mod bytes;
pub mod checkpoint;
pub mod commit;
pub mod dir;
pub mod dtype;
pub mod error;
pub mod fingerprint;
pub mod location;
pub mod manifest;
pub mod migrate;
mod pages;
pub mod read;
#[cfg(feature = "s3")]
pub mod remote;
pub mod snapshot;
pub mod state;
pub mod stateful;
pub mod storage;
pub mod tensor_file;

pub use async_writer::{
    snapshot_copy, AsyncCheckpointer, AsyncOptions, Committed, SaveTicket, WriterPriority,
    DEFAULT_MAX_IN_FLIGHT, WRITER_THREAD_NAME,
};
pub use bytes::TensorBytes;
pub use checkpoint::Checkpoint;
pub use commit::{write_checkpoint, write_latest};
pub use dir::{is_committed, name_taken, CheckpointDir, CheckpointInfo, LOCK_WAIT};
pub use dtype::DType;
pub use error::{Error, Mismatch, Result};
pub use fingerprint::{canonical_json, fingerprint, fingerprint_state_dict, FINGERPRINT_PREFIX};
pub use location::is_remote;
pub use manifest::{ComponentEntry, FileEntry, Manifest, FORMAT_VERSION};
pub use migrate::{migrate_dir, migrate_in_place};
pub use read::{
    load, read_checkpoint_file, read_manifest, read_safetensors, verify, LoadedCheckpoint,
    VerifyReport,
};
pub use snapshot::{BufferPool, Snapshot};
pub use state::{join_key, Leaf, StateDict, TensorData, KEY_SEPARATOR};
pub use stateful::{AllowList, RestoreReport, Stateful};
pub use storage::{FaultyStorage, LocalStorage, Storage, StorageFile};
