//! # relume-ckpt
//!
//! The checkpoint format and engine of relume: durable, verifiable, crash-safe.
//! It has no ML dependency; the trainer in the `relume` crate builds on it.
//!
//! - [`StateDict`]: a tree of named tensor and JSON leaves.
//! - [`Stateful`]: export and restore a component, with a [`RestoreReport`].
//! - [`fingerprint`]: a deterministic hash over every leaf, written in the manifest
//!   and recomputed after a restore.
#![deny(missing_docs)]

pub mod dtype;
pub mod error;
pub mod fingerprint;
pub mod state;
pub mod stateful;

pub use dtype::DType;
pub use error::{Error, Result};
pub use fingerprint::{canonical_json, fingerprint, fingerprint_state_dict, FINGERPRINT_PREFIX};
pub use state::{join_key, Leaf, StateDict, TensorBytes, TensorData, KEY_SEPARATOR};
pub use stateful::{AllowList, Mismatch, RestoreReport, Stateful};
pub mod lightning;
pub use lightning::{LightningCheckpoint, PyValue, TorchTensor};
