//! [`TensorBoardLogger`]: scalar summaries in a TensorBoard event file, written
//! without TensorFlow.
//!
//! # File format
//! `<log_dir>/events.out.tfevents.<unix seconds>.<host>` is a TFRecord file; each
//! record is
//! ```text
//! u64 LE length | u32 LE masked CRC-32C(length bytes) | data | u32 LE masked CRC-32C(data)
//! ```
//! where the mask is `((crc >> 15) | (crc << 17)) + 0xa282ead8`. Each `data` is a
//! protobuf `tensorflow.Event`, encoded by hand:
//! ```text
//! Event   { wall_time = 1 (double), step = 2 (int64),
//!           file_version = 3 (string) | summary = 5 (Summary) }
//! Summary { repeated Value value = 1 }
//! Value   { tag = 1 (string), simple_value = 2 (float) }
//! ```
//! The first record carries `file_version: "brain.Event:2"`; each
//! [`Logger::log_metrics`] call appends one event whose summary holds every
//! metric (as `f32`, the type TensorBoard stores).
//!
//! # State and resume
//! `state` (JSON): the event file name and its byte length (always a record
//! boundary). On restore the file is checked record by record up to that
//! length (framing and CRCs), truncated there and appended to, so TensorBoard
//! reads one continuous series: the events a killed run wrote after its
//! checkpoint are gone and the resumed run writes them once.
//!
//! The log directory holds one event file, the live one: other
//! `events.out.tfevents.*` files there come from attempts that never
//! checkpointed (or from before the restored checkpoint's run) and are removed
//! on the first write or restore, because TensorBoard would merge them into the
//! series and show duplicated steps.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use relume_ckpt::{RestoreReport, StateDict, Stateful};
use serde::{Deserialize, Serialize};

use super::crc32c::masked_crc32c;
use super::fsutil::{self, io};
use super::Logger;
use crate::error::{Error, Result};
use crate::state_json::{check_kind, read_single_json, single_json_state};

/// Prefix of every event file name (TensorBoard finds files by it).
pub const EVENT_FILE_PREFIX: &str = "events.out.tfevents.";

/// The `file_version` of the first record.
pub const FILE_VERSION: &str = "brain.Event:2";

/// State key of the TensorBoard logger.
const STATE_KEY: &str = "state";

/// Kind recorded in the state, checked on restore.
const KIND: &str = "tensorboard";

/// Writes scalar metrics to a TensorBoard event file; see the
/// [module docs](self).
#[derive(Debug)]
pub struct TensorBoardLogger {
    dir: PathBuf,
    /// Event file name; `None` until the first write or a restore.
    file_name: Option<String>,
    /// Bytes written (a record boundary).
    bytes: u64,
    file: Option<File>,
}

/// Serialised state of a [`TensorBoardLogger`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct TbState {
    kind: String,
    file: Option<String>,
    bytes: u64,
}

impl TensorBoardLogger {
    /// A logger writing into `log_dir`. Nothing is touched on disk until the first
    /// write or [`Stateful::load_state_dict`].
    pub fn new(log_dir: impl Into<PathBuf>) -> Self {
        TensorBoardLogger {
            dir: log_dir.into(),
            file_name: None,
            bytes: 0,
            file: None,
        }
    }

    /// Pins the event file name instead of the default
    /// `events.out.tfevents.<unix seconds>.<host>`, which differs between
    /// processes (pin it when two runs' logger states must compare equal). A
    /// restored state's name wins over it.
    ///
    /// # Errors
    /// [`Error::LogFile`] when `name` does not start with [`EVENT_FILE_PREFIX`] or
    /// contains a path separator.
    pub fn with_file_name(mut self, name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        if !valid_file_name(&name) {
            return Err(Error::LogFile {
                path: self.dir.join(&name),
                reason: format!(
                    "is not a valid event file name: it must start with {EVENT_FILE_PREFIX:?} and name a file inside the log directory"
                ),
            });
        }
        self.file_name = Some(name);
        Ok(self)
    }

    /// Path of the live event file, once it exists.
    pub fn path(&self) -> Option<PathBuf> {
        self.file_name.as_ref().map(|n| self.dir.join(n))
    }

    /// Opens (creating or restoring) the event file if not yet open.
    fn ensure_open(&mut self) -> Result<()> {
        if self.file.is_some() {
            return Ok(());
        }
        fsutil::create_dir(&self.dir)?;
        let name = match &self.file_name {
            Some(n) => n.clone(),
            None => {
                let n = new_file_name();
                self.file_name = Some(n.clone());
                self.bytes = 0;
                n
            }
        };
        self.remove_stale(&name)?;
        let path = self.dir.join(&name);
        if self.bytes > 0 {
            self.check_records(&path)?;
        }
        let file = fsutil::open_truncated(&path, self.bytes)?;
        fsutil::sync_dir(&self.dir)?;
        self.file = Some(file);
        if self.bytes == 0 {
            let mut event = Vec::new();
            put_double(&mut event, 1, wall_time());
            put_bytes(&mut event, 3, FILE_VERSION.as_bytes());
            self.append(&event)?;
        }
        Ok(())
    }

    /// Removes event files other than `keep` from the log directory.
    fn remove_stale(&self, keep: &str) -> Result<()> {
        let entries = std::fs::read_dir(&self.dir).map_err(io("list", &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(io("list", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(EVENT_FILE_PREFIX) && name != keep {
                let path = entry.path();
                tracing::info!(
                    path = %path.display(),
                    "removing a stale TensorBoard event file that is not part of this run's history"
                );
                std::fs::remove_file(&path).map_err(io("remove stale event file", &path))?;
            }
        }
        Ok(())
    }

    /// Walks the records of `path` up to `self.bytes`, checking framing and CRCs.
    fn check_records(&self, path: &Path) -> Result<()> {
        let content = std::fs::read(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::LogFile {
                path: path.to_path_buf(),
                reason: format!(
                    "is missing but the checkpoint recorded {} bytes of events; restore the file or resume from a checkpoint taken with it",
                    self.bytes
                ),
            },
            _ => Error::Io { op: "read", path: path.to_path_buf(), source },
        })?;
        let fail = |reason: String| Error::LogFile {
            path: path.to_path_buf(),
            reason,
        };
        if (content.len() as u64) < self.bytes {
            return Err(fail(format!(
                "is {} bytes but the checkpoint recorded {}; events logged before the checkpoint were lost (file truncated or replaced after the save)",
                content.len(),
                self.bytes
            )));
        }
        let end = self.bytes as usize;
        let mut pos = 0usize;
        while pos < end {
            let bad = |what: &str| {
                fail(format!(
                    "{what} in the record at byte {pos}; the file was modified after the save"
                ))
            };
            let header = content
                .get(pos..pos + 12)
                .ok_or_else(|| bad("truncated header"))?;
            let (len_bytes, len_crc) = header.split_at(8);
            let mut len8 = [0u8; 8];
            len8.copy_from_slice(len_bytes);
            let mut crc4 = [0u8; 4];
            crc4.copy_from_slice(len_crc);
            if masked_crc32c(len_bytes) != u32::from_le_bytes(crc4) {
                return Err(bad("length checksum mismatch"));
            }
            let len = usize::try_from(u64::from_le_bytes(len8)).map_err(|_| bad("huge length"))?;
            let data_end = pos
                .checked_add(12)
                .and_then(|p| p.checked_add(len))
                .filter(|&e| e.checked_add(4).is_some_and(|r| r <= end))
                .ok_or_else(|| bad("record runs past the checkpointed length"))?;
            let data = &content[pos + 12..data_end];
            crc4.copy_from_slice(&content[data_end..data_end + 4]);
            if masked_crc32c(data) != u32::from_le_bytes(crc4) {
                return Err(bad("data checksum mismatch"));
            }
            pos = data_end + 4;
        }
        Ok(())
    }

    /// Appends one framed record holding `data`.
    fn append(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        let path = self.path().unwrap_or_else(|| self.dir.clone());
        let Some(file) = self.file.as_mut() else {
            return Err(Error::LogFile {
                path,
                reason: "is not open after opening it".into(),
            });
        };
        file.write_all(&rec).map_err(io("append to", &path))?;
        self.bytes += rec.len() as u64;
        Ok(())
    }
}

impl Logger for TensorBoardLogger {
    fn name(&self) -> &str {
        KIND
    }

    fn log_metrics(&mut self, step: u64, metrics: &BTreeMap<String, f64>) -> Result<()> {
        if metrics.is_empty() {
            return Ok(());
        }
        self.ensure_open()?;
        let mut summary = Vec::new();
        for (tag, value) in metrics {
            let mut v = Vec::new();
            put_bytes(&mut v, 1, tag.as_bytes());
            put_float(&mut v, 2, *value as f32);
            put_bytes(&mut summary, 1, &v);
        }
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_varint_field(&mut event, 2, step);
        put_bytes(&mut event, 5, &summary);
        self.append(&event)
    }

    fn flush(&mut self) -> Result<()> {
        if let Some(file) = &self.file {
            let path = self.path().unwrap_or_else(|| self.dir.clone());
            file.sync_data().map_err(io("sync", &path))?;
        }
        Ok(())
    }
}

impl Stateful for TensorBoardLogger {
    type Error = Error;

    fn state_dict(&self) -> Result<StateDict> {
        let state = TbState {
            kind: KIND.into(),
            file: self.file_name.clone(),
            bytes: self.bytes,
        };
        single_json_state(STATE_KEY, &state)
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let (mut report, s) = read_single_json::<TbState>(state, STATE_KEY)?;
        let Some(s) = s else {
            return Ok(report);
        };
        check_kind(&format!("loggers/{KIND}"), &s.kind, KIND)?;
        let valid_name = s.file.as_deref().is_none_or(valid_file_name);
        if !valid_name || (s.file.is_none() && s.bytes != 0) {
            return Err(Error::StateMismatch {
                component: format!("loggers/{KIND}"),
                problems: vec![format!(
                    "file {:?} with {} bytes is not an event file name inside the log directory",
                    s.file, s.bytes
                )],
            });
        }
        self.file = None;
        self.file_name = s.file;
        self.bytes = s.bytes;
        if self.file_name.is_some() {
            self.ensure_open()?;
        }
        report.restored(STATE_KEY);
        Ok(report)
    }
}

/// An event file name directly inside the log directory.
fn valid_file_name(name: &str) -> bool {
    name.starts_with(EVENT_FILE_PREFIX) && !name.contains(['/', '\\', '\0'])
}

/// `events.out.tfevents.<unix seconds>.<host>`.
fn new_file_name() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{EVENT_FILE_PREFIX}{secs}.{}", hostname())
}

/// The host name, with characters unsafe in a file name replaced.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for `buf.len()` bytes; gethostname writes at most
    // that many and we read up to the first NUL within the buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let raw = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_varint(out, u64::from(field) << 3);
    put_varint(out, v);
}

fn put_double(out: &mut Vec<u8>, field: u32, v: f64) {
    put_varint(out, (u64::from(field) << 3) | 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_float(out: &mut Vec<u8>, field: u32, v: f32) {
    put_varint(out, (u64::from(field) << 3) | 5);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    put_varint(out, (u64::from(field) << 3) | 2);
    put_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protobuf_encoding_matches_hand_computed_bytes() {
        let mut v = Vec::new();
        put_bytes(&mut v, 1, b"loss");
        put_float(&mut v, 2, 1.0);
        assert_eq!(v, [0x0a, 4, b'l', b'o', b's', b's', 0x15, 0, 0, 0x80, 0x3f]);
        let mut e = Vec::new();
        put_varint_field(&mut e, 2, 300);
        assert_eq!(e, [0x10, 0xac, 0x02]);
    }

    #[test]
    fn corrupted_record_is_a_log_file_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = TensorBoardLogger::new(dir.path());
        let metrics: BTreeMap<String, f64> = [("loss".to_string(), 1.0)].into();
        log.log_metrics(1, &metrics).unwrap();
        log.flush().unwrap();
        let sd = log.state_dict().unwrap();
        let path = log.path().unwrap();
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = TensorBoardLogger::new(dir.path())
            .load_state_dict(&sd)
            .unwrap_err();
        assert!(
            matches!(&err, Error::LogFile { path: p, .. } if *p == path),
            "{err}"
        );
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn escaping_file_name_in_state_is_a_state_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let mut sd = StateDict::new();
        sd.insert_json(
            STATE_KEY,
            serde_json::json!({"kind": "tensorboard", "file": "../x", "bytes": 10}),
        );
        let err = TensorBoardLogger::new(dir.path())
            .load_state_dict(&sd)
            .unwrap_err();
        assert!(matches!(err, Error::StateMismatch { .. }), "{err}");
    }

    #[test]
    fn pinned_file_name_is_used_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = TensorBoardLogger::new(dir.path())
            .with_file_name("events.out.tfevents.0.pinned")
            .unwrap();
        let metrics: BTreeMap<String, f64> = [("loss".to_string(), 1.0)].into();
        log.log_metrics(1, &metrics).unwrap();
        assert!(dir.path().join("events.out.tfevents.0.pinned").exists());
        let err = TensorBoardLogger::new(dir.path())
            .with_file_name("../events.out.tfevents.x")
            .unwrap_err();
        assert!(matches!(err, Error::LogFile { .. }), "{err}");
        let err = TensorBoardLogger::new(dir.path())
            .with_file_name("metrics.bin")
            .unwrap_err();
        assert!(matches!(err, Error::LogFile { .. }), "{err}");
    }

    #[test]
    fn fresh_logger_removes_stale_event_files() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("events.out.tfevents.1.old");
        std::fs::write(&stale, b"junk").unwrap();
        let mut log = TensorBoardLogger::new(dir.path());
        let metrics: BTreeMap<String, f64> = [("loss".to_string(), 1.0)].into();
        log.log_metrics(1, &metrics).unwrap();
        assert!(!stale.exists());
        assert!(log.path().unwrap().exists());
    }
}
