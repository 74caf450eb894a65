//! [`LightningCheckpoint`]: a decoded `.ckpt` file with typed accessors and a
//! resumability diagnosis.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::archive::TorchArchive;
use super::limits::Limits;
use super::summary::{CallbackSummary, LoopProgress, OptimizerSummary, SchedulerSummary};
use super::value::{PyValue, TorchTensor};
use crate::error::{Error, Result};

/// The top-level key holding Lightning's version; its absence marks a non-Lightning file.
pub const VERSION_KEY: &str = "pytorch-lightning_version";

/// The keys a Lightning checkpoint needs to resume training, in the order reported.
pub const RESUME_KEYS: [&str; 7] = [
    "state_dict",
    "optimizer_states",
    "lr_schedulers",
    "callbacks",
    "loops",
    "epoch",
    "global_step",
];

/// What kind of file was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    /// A Lightning checkpoint with training state (`optimizer_states` present).
    Full,
    /// A Lightning checkpoint saved with `save_weights_only=True`.
    WeightsOnly,
    /// A plain `torch.save(model.state_dict())`: a dict of tensors, no Lightning keys.
    PlainStateDict,
    /// A dict without Lightning's version key that is not a plain state dict.
    Other,
}

/// How serious a diagnosis finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// For information.
    Info,
    /// Resuming works but will not continue exactly.
    Warning,
    /// Resuming is impossible.
    Blocker,
}

impl Severity {
    /// Lowercase label (`"info"`, `"warning"`, `"blocker"`).
    pub fn label(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Blocker => "blocker",
        }
    }
}

/// One line of the resumability diagnosis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Seriousness.
    pub severity: Severity,
    /// Stable machine-readable code (`"weights-only"`, `"mid-epoch"`, `"no-rng-state"`, ...).
    pub code: &'static str,
    /// A sentence for a person.
    pub message: String,
}

/// A decoded Lightning (or plain torch) checkpoint. Nothing in it was executed, and no
/// tensor bytes were read: its tensors are lazy views of the file's storages.
#[derive(Debug, Clone)]
pub struct LightningCheckpoint {
    path: PathBuf,
    format_version: Option<String>,
    root: PyValue,
    kind: CheckpointKind,
    reads: Arc<AtomicU64>,
}

impl LightningCheckpoint {
    /// Reads the checkpoint at `path` under the default [`Limits`].
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::NotAZip`], [`Error::ZipTruncated`],
    /// [`Error::ZipEntryMissing`], [`Error::UnsupportedByteOrder`], the pickle errors
    /// ([`Error::Pickle`], [`Error::UnknownOpcode`], [`Error::PickleLimitExceeded`]), and
    /// [`Error::LightningStructure`] when the pickle is not a dict.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with_limits(path, Limits::default())
    }

    /// Reads the checkpoint at `path` under `limits`.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub fn open_with_limits(path: impl AsRef<Path>, limits: Limits) -> Result<Self> {
        let path = path.as_ref();
        let mut archive = TorchArchive::open(path, limits)?;
        let format_version = archive.format_version()?;
        let root = archive.load()?;
        let mut ckpt = Self::from_value(path, format_version, root)?;
        ckpt.reads = archive.reads();
        Ok(ckpt)
    }

    /// Wraps an already decoded top-level value.
    ///
    /// # Errors
    /// [`Error::LightningStructure`] when `root` is not a dict.
    pub fn from_value(
        path: impl AsRef<Path>,
        format_version: Option<String>,
        root: PyValue,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let Some(items) = root.dict_items() else {
            return Err(Error::LightningStructure {
                path,
                key: String::new(),
                reason: format!(
                    "the top-level object is a {}, not a dict; this is not a checkpoint",
                    root.type_name()
                ),
            });
        };
        let kind = if root.get(VERSION_KEY).is_some() {
            if root.get("optimizer_states").is_some() {
                CheckpointKind::Full
            } else {
                CheckpointKind::WeightsOnly
            }
        } else if !items.is_empty() && items.iter().all(|(_, v)| v.as_tensor().is_some()) {
            CheckpointKind::PlainStateDict
        } else {
            CheckpointKind::Other
        };
        Ok(LightningCheckpoint {
            path,
            format_version,
            root,
            kind,
            reads: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Storage bytes read so far from the file (0 after [`open`](Self::open): tensors are
    /// lazy). Reading a scalar's value reads its one element; converting a tensor
    /// ([`TorchTensor::to_tensor_data`]) counts its whole storage. Always 0 for a
    /// checkpoint made with [`from_value`](Self::from_value).
    pub fn storage_bytes_read(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What kind of file this is.
    pub fn kind(&self) -> CheckpointKind {
        self.kind
    }

    /// torch's serialization format version (`<prefix>/version`), if recorded.
    pub fn format_version(&self) -> Option<&str> {
        self.format_version.as_deref()
    }

    /// The whole decoded top-level dict.
    pub fn root(&self) -> &PyValue {
        &self.root
    }

    /// A top-level entry.
    pub fn get(&self, key: &str) -> Option<&PyValue> {
        self.root.get(key)
    }

    /// The top-level keys, in file order.
    pub fn keys(&self) -> Vec<String> {
        self.root
            .dict_items()
            .unwrap_or_default()
            .iter()
            .map(|(k, _)| k.key_label())
            .collect()
    }

    /// `pytorch-lightning_version`.
    pub fn lightning_version(&self) -> Option<&str> {
        self.get(VERSION_KEY).and_then(PyValue::as_str)
    }

    /// `epoch`.
    pub fn epoch(&self) -> Option<i64> {
        self.get("epoch").and_then(PyValue::as_i64)
    }

    /// `global_step`.
    pub fn global_step(&self) -> Option<i64> {
        self.get("global_step").and_then(PyValue::as_i64)
    }

    /// The model weights in file order: `state_dict`, or the whole file for a plain
    /// `torch.save(state_dict)`. Non-tensor entries are skipped.
    pub fn state_dict(&self) -> Vec<(String, &TorchTensor)> {
        let dict = match self.kind {
            CheckpointKind::PlainStateDict => Some(&self.root),
            _ => self.get("state_dict"),
        };
        dict.and_then(PyValue::dict_items)
            .unwrap_or_default()
            .iter()
            .filter_map(|(k, v)| v.as_tensor().map(|t| (k.key_label(), t)))
            .collect()
    }

    /// `optimizer_states`, each summarised.
    pub fn optimizers(&self) -> Vec<OptimizerSummary<'_>> {
        self.seq("optimizer_states")
            .iter()
            .filter_map(OptimizerSummary::from_value)
            .collect()
    }

    /// `lr_schedulers`, each summarised.
    pub fn lr_schedulers(&self) -> Vec<SchedulerSummary<'_>> {
        self.seq("lr_schedulers")
            .iter()
            .filter_map(SchedulerSummary::from_value)
            .collect()
    }

    /// `callbacks`, each summarised, in file order.
    pub fn callbacks(&self) -> Vec<CallbackSummary<'_>> {
        self.get("callbacks")
            .and_then(PyValue::dict_items)
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| CallbackSummary::new(k.key_label(), v))
            .collect()
    }

    /// `hyper_parameters`.
    pub fn hyper_parameters(&self) -> Option<&PyValue> {
        self.get("hyper_parameters")
    }

    /// The fit loop's progress from `loops`.
    pub fn loop_progress(&self) -> Option<LoopProgress> {
        self.get("loops").and_then(LoopProgress::from_loops)
    }

    fn seq(&self, key: &str) -> &[PyValue] {
        self.get(key).and_then(PyValue::as_seq).unwrap_or_default()
    }

    /// Whether the diagnosis has no [`Severity::Blocker`].
    pub fn is_resumable(&self) -> bool {
        self.diagnose()
            .iter()
            .all(|f| f.severity < Severity::Blocker)
    }

    /// The resumability diagnosis: what a resume needs, what is missing, and what will
    /// make the resumed run differ from the uninterrupted one.
    pub fn diagnose(&self) -> Vec<Finding> {
        let mut out = Vec::new();
        let missing: Vec<&str> = RESUME_KEYS
            .iter()
            .copied()
            .filter(|k| self.get(k).is_none())
            .collect();
        let full_state = matches!(
            self.kind,
            CheckpointKind::Full | CheckpointKind::WeightsOnly
        ) && missing.is_empty();
        match self.kind {
            CheckpointKind::PlainStateDict => out.push(Finding {
                severity: Severity::Blocker,
                code: "plain-state-dict",
                message: format!(
                    "a plain torch.save(state_dict) with weights only ({} tensors); it cannot resume training: no {}",
                    self.state_dict().len(),
                    missing.join(", ")
                ),
            }),
            CheckpointKind::Other => out.push(Finding {
                severity: Severity::Blocker,
                code: "not-lightning",
                message: format!(
                    "no {VERSION_KEY:?} key: not a Lightning checkpoint; missing {}",
                    missing.join(", ")
                ),
            }),
            CheckpointKind::WeightsOnly | CheckpointKind::Full if !missing.is_empty() => {
                out.push(Finding {
                    severity: Severity::Blocker,
                    code: "weights-only",
                    message: format!(
                        "weights-only checkpoint: it cannot resume training, missing {}; use it to initialise or fine-tune",
                        missing.join(", ")
                    ),
                })
            }
            _ => out.push(Finding {
                severity: Severity::Info,
                code: "full-state",
                message: format!(
                    "has the full training state: {} optimizer(s), {} scheduler(s), {} callback(s), loops",
                    self.optimizers().len(),
                    self.lr_schedulers().len(),
                    self.callbacks().len()
                ),
            }),
        }
        if let Some(p) = self.loop_progress() {
            if p.is_mid_epoch() && !p.loader_state_saved {
                out.push(Finding {
                    severity: Severity::Warning,
                    code: "mid-epoch",
                    message: format!(
                        "mid-epoch checkpoint: {} batch(es) of epoch {} processed, not at the epoch end, and no dataloader state saved; a non-stateful loader restarts the epoch and replays data",
                        p.batches_in_epoch,
                        self.epoch().unwrap_or(p.epochs_completed)
                    ),
                });
            } else if p.is_mid_epoch() {
                out.push(Finding {
                    severity: Severity::Info,
                    code: "mid-epoch-stateful",
                    message: format!(
                        "mid-epoch checkpoint ({} batch(es) into the epoch) with a saved dataloader state",
                        p.batches_in_epoch
                    ),
                });
            }
        }
        // A file that cannot resume at all needs no warning that a resume would not
        // reproduce the run.
        if full_state && !self.has_rng_state() {
            out.push(Finding {
                severity: Severity::Warning,
                code: "no-rng-state",
                message: "no RNG state saved: a resumed run draws different random numbers (shuffling, dropout) and will not reproduce the uninterrupted run".into(),
            });
        }
        out
    }

    /// Whether any top-level or callback key looks like saved RNG state.
    fn has_rng_state(&self) -> bool {
        let looks = |k: &str| {
            let k = k.to_ascii_lowercase();
            k.contains("rng") || k.contains("random_state") || k.contains("generator")
        };
        self.keys().iter().any(|k| looks(k))
            || self.callbacks().iter().any(|c| {
                c.state
                    .dict_items()
                    .unwrap_or_default()
                    .iter()
                    .any(|(k, _)| looks(&k.key_label()))
            })
    }
}
