//! [`CsvLogger`]: metrics as one CSV file with a stable column order.
//!
//! # File format
//! `<log_dir>/metrics.csv`, RFC 4180 quoting, `\n` line ends:
//! ```text
//! step,train_loss,val_acc,val_loss
//! 1,0.9,,
//! 2,0.7,0.61,0.8
//! ```
//! - The first column is `step`; the metric columns follow, sorted by name
//!   (byte order), so the layout never depends on logging order.
//! - Calls of [`Logger::log_metrics`] with the same step in a row are merged into
//!   one row (a later value for the same metric wins), so validation metrics
//!   logged at the last training step share its row. The row is written when a
//!   different step arrives or at [`Logger::flush`].
//! - A metric not logged at a step is an empty cell. Values are written with
//!   Rust's shortest round-trip form (`0.1`, `1e-7`, `NaN`, `inf`).
//! - When a metric appears that the header lacks, the file is rewritten with the
//!   new header (a temporary file, fsync, rename, fsync of the directory), and the
//!   earlier rows get empty cells for it.
//!
//! # State
//! `state` (JSON): the columns, the number of rows and the byte length written,
//! and the row not yet written, if any. On restore the file is cut back to that
//! length (and to those columns if a later header rewrite added some), so rows
//! that a killed run logged after its checkpoint are not duplicated.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use relume_ckpt::{RestoreReport, StateDict, Stateful};
use serde::{Deserialize, Serialize};

use super::fsutil::{self, io};
use super::Logger;
use crate::error::{Error, Result};
use crate::state_json::{check_kind, read_single_json, single_json_state};

/// File name of the metrics table inside the log directory.
pub const METRICS_FILE: &str = "metrics.csv";

/// File name of the hyper-parameters written by [`Logger::log_hyperparams`].
pub const HPARAMS_FILE: &str = "hparams.json";

/// State key of the CSV logger.
const STATE_KEY: &str = "state";

/// Kind recorded in the state, checked on restore.
const KIND: &str = "csv";

/// Writes `<log_dir>/metrics.csv`; see the [module docs](self) for the format.
#[derive(Debug)]
pub struct CsvLogger {
    dir: PathBuf,
    path: PathBuf,
    /// Metric columns after `step`, sorted.
    columns: Vec<String>,
    /// Data rows written (the header not counted).
    rows: u64,
    /// Bytes written, header included.
    bytes: u64,
    /// The row being merged: step and formatted values.
    pending: Option<(u64, BTreeMap<String, String>)>,
    /// Append handle; `None` until the first write or a restore.
    file: Option<File>,
}

/// Serialised state of a [`CsvLogger`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct CsvState {
    kind: String,
    file: String,
    columns: Vec<String>,
    rows: u64,
    bytes: u64,
    pending: Option<PendingRow>,
}

/// A merged row not yet written, with values already formatted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct PendingRow {
    step: u64,
    values: BTreeMap<String, String>,
}

impl CsvLogger {
    /// A logger writing `<log_dir>/metrics.csv`. Nothing is touched on disk until
    /// the first write or [`Stateful::load_state_dict`]; a fresh logger's first
    /// write truncates any `metrics.csv` left by an attempt that never
    /// checkpointed.
    pub fn new(log_dir: impl Into<PathBuf>) -> Self {
        let dir = log_dir.into();
        let path = dir.join(METRICS_FILE);
        CsvLogger {
            dir,
            path,
            columns: Vec::new(),
            rows: 0,
            bytes: 0,
            pending: None,
            file: None,
        }
    }

    /// Path of the metrics file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metric columns after `step`, sorted.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Opens the file, truncated to the recorded length, if not yet open.
    fn ensure_open(&mut self) -> Result<()> {
        if self.file.is_some() {
            return Ok(());
        }
        fsutil::create_dir(&self.dir)?;
        if self.bytes == 0 {
            self.file = Some(fsutil::open_truncated(&self.path, 0)?);
            return fsutil::sync_dir(&self.dir);
        }
        self.restore_file()
    }

    /// Cuts the existing file back to the saved columns, rows and length.
    fn restore_file(&mut self) -> Result<()> {
        let content = std::fs::read(&self.path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => self.log_error(format!(
                "is missing but the checkpoint recorded {} bytes of metrics; restore the file or resume from a checkpoint taken with it",
                self.bytes
            )),
            _ => Error::Io { op: "read", path: self.path.clone(), source },
        })?;
        let saved_header = header_line(&self.columns);
        let have = content.len() as u64;
        if content.starts_with(saved_header.as_bytes()) {
            if have < self.bytes {
                return Err(self.log_error(format!(
                    "is {have} bytes but the checkpoint recorded {} bytes; rows logged before the checkpoint were lost (file truncated or replaced after the save)",
                    self.bytes
                )));
            }
            let prefix = &content[..self.bytes as usize];
            let lines = parse_csv(&String::from_utf8_lossy(prefix));
            if prefix.last() != Some(&b'\n') || lines.len() as u64 != self.rows + 1 {
                return Err(self.log_error(format!(
                    "its first {} bytes are not the {} rows the checkpoint recorded; the file was modified after the save",
                    self.bytes, self.rows
                )));
            }
            self.file = Some(fsutil::open_truncated(&self.path, self.bytes)?);
            return Ok(());
        }
        // A header rewrite after the checkpoint added columns: project back.
        let text = String::from_utf8_lossy(&content);
        let table = parse_csv(&text);
        let Some((header, body)) = table.split_first() else {
            return Err(self.log_error("is empty but the checkpoint recorded rows".into()));
        };
        if body.len() < self.rows as usize {
            return Err(self.log_error(format!(
                "has {} rows but the checkpoint recorded {}; rows logged before the checkpoint were lost",
                body.len(),
                self.rows
            )));
        }
        let mut out = saved_header;
        for row in &body[..self.rows as usize] {
            let cells =
                project(header, row, &self.columns).map_err(|reason| self.log_error(reason))?;
            out.push_str(&join_cells(&cells));
        }
        if out.len() as u64 != self.bytes {
            return Err(self.log_error(format!(
                "its first {} rows take {} bytes in the saved columns but the checkpoint recorded {}; the file was modified after the save",
                self.rows,
                out.len(),
                self.bytes
            )));
        }
        fsutil::write_atomic(&self.path, out.as_bytes())?;
        self.file = Some(fsutil::open_truncated(&self.path, self.bytes)?);
        Ok(())
    }

    fn log_error(&self, reason: String) -> Error {
        Error::LogFile {
            path: self.path.clone(),
            reason,
        }
    }

    /// Writes one row, rewriting the file first when it brings new columns.
    fn write_row(&mut self, step: u64, values: &BTreeMap<String, String>) -> Result<()> {
        self.ensure_open()?;
        let new: Vec<&String> = values
            .keys()
            .filter(|k| self.columns.binary_search(k).is_err())
            .collect();
        let mut text = String::new();
        if !new.is_empty() {
            let mut columns = self.columns.clone();
            columns.extend(new.into_iter().cloned());
            columns.sort();
            if self.bytes == 0 {
                self.columns = columns;
                text.push_str(&header_line(&self.columns));
            } else {
                self.rewrite_with(columns)?;
            }
        } else if self.bytes == 0 {
            text.push_str(&header_line(&self.columns));
        }
        let mut cells = vec![step.to_string()];
        cells.extend(
            self.columns
                .iter()
                .map(|c| values.get(c).cloned().unwrap_or_default()),
        );
        text.push_str(&join_cells(&cells));
        let Some(file) = self.file.as_mut() else {
            return Err(self.log_error("is not open after opening it".into()));
        };
        file.write_all(text.as_bytes())
            .map_err(io("append to", &self.path))?;
        self.bytes += text.len() as u64;
        self.rows += 1;
        Ok(())
    }

    /// Rewrites the whole file atomically with `columns` as the header.
    fn rewrite_with(&mut self, columns: Vec<String>) -> Result<()> {
        let content = std::fs::read(&self.path).map_err(io("read", &self.path))?;
        let text = String::from_utf8_lossy(&content[..(self.bytes as usize).min(content.len())]);
        let table = parse_csv(&text);
        let Some((header, body)) = table.split_first() else {
            return Err(self.log_error("lost its header while the run was writing it".into()));
        };
        let mut out = header_line(&columns);
        for row in body {
            let cells = project(header, row, &columns).map_err(|r| self.log_error(r))?;
            out.push_str(&join_cells(&cells));
        }
        self.file = None;
        fsutil::write_atomic(&self.path, out.as_bytes())?;
        self.file = Some(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&self.path)
                .map_err(io("open for append", &self.path))?,
        );
        self.columns = columns;
        self.bytes = out.len() as u64;
        Ok(())
    }

    fn export(&self) -> CsvState {
        CsvState {
            kind: KIND.into(),
            file: METRICS_FILE.into(),
            columns: self.columns.clone(),
            rows: self.rows,
            bytes: self.bytes,
            pending: self.pending.as_ref().map(|(step, values)| PendingRow {
                step: *step,
                values: values.clone(),
            }),
        }
    }
}

impl Logger for CsvLogger {
    fn name(&self) -> &str {
        KIND
    }

    fn log_metrics(&mut self, step: u64, metrics: &BTreeMap<String, f64>) -> Result<()> {
        if metrics.is_empty() {
            return Ok(());
        }
        let formatted = metrics.iter().map(|(k, v)| (k.clone(), format_value(*v)));
        match &mut self.pending {
            Some((s, values)) if *s == step => values.extend(formatted),
            _ => {
                if let Some((s, values)) = self.pending.take() {
                    self.write_row(s, &values)?;
                }
                self.pending = Some((step, formatted.collect()));
            }
        }
        Ok(())
    }

    fn log_hyperparams(&mut self, params: &serde_json::Value) -> Result<()> {
        fsutil::create_dir(&self.dir)?;
        let path = self.dir.join(HPARAMS_FILE);
        let mut text = serde_json::to_string_pretty(params).map_err(|e| Error::LogFile {
            path: path.clone(),
            reason: format!("hyper-parameters do not serialise to JSON: {e}"),
        })?;
        text.push('\n');
        fsutil::write_atomic(&path, text.as_bytes())
    }

    fn flush(&mut self) -> Result<()> {
        if let Some((s, values)) = self.pending.take() {
            self.write_row(s, &values)?;
        }
        if let Some(file) = &self.file {
            file.sync_data().map_err(io("sync", &self.path))?;
        }
        Ok(())
    }
}

impl Stateful for CsvLogger {
    type Error = Error;

    fn state_dict(&self) -> Result<StateDict> {
        single_json_state(STATE_KEY, &self.export())
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let (mut report, s) = read_single_json::<CsvState>(state, STATE_KEY)?;
        let Some(s) = s else {
            return Ok(report);
        };
        check_kind(&format!("loggers/{KIND}"), &s.kind, KIND)?;
        let mut sorted = s.columns.clone();
        sorted.sort();
        sorted.dedup();
        if sorted != s.columns || s.columns.iter().any(|c| c == "step") {
            return Err(Error::StateMismatch {
                component: format!("loggers/{KIND}"),
                problems: vec![format!(
                    "columns {:?} are not sorted, unique and free of \"step\"",
                    s.columns
                )],
            });
        }
        self.columns = s.columns;
        self.rows = s.rows;
        self.bytes = s.bytes;
        self.pending = s.pending.map(|p| (p.step, p.values));
        self.file = None;
        self.ensure_open()?;
        report.restored(STATE_KEY);
        Ok(report)
    }
}

/// Formats a value in Rust's shortest round-trip form.
fn format_value(v: f64) -> String {
    format!("{v:?}")
}

/// The header line for `columns`, `\n` included.
fn header_line(columns: &[String]) -> String {
    let mut cells = vec!["step".to_string()];
    cells.extend(columns.iter().cloned());
    join_cells(&cells)
}

/// Joins cells into one CSV line with RFC 4180 quoting, `\n` included.
fn join_cells(cells: &[String]) -> String {
    let mut line = String::new();
    for (i, cell) in cells.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        if cell.contains([',', '"', '\n', '\r']) {
            line.push('"');
            line.push_str(&cell.replace('"', "\"\""));
            line.push('"');
        } else {
            line.push_str(cell);
        }
    }
    line.push('\n');
    line
}

/// Reorders `row` (laid out as `header`) into `step` + `columns`; a column the
/// header lacks is empty, a non-empty cell whose column is dropped is an error.
fn project(
    header: &[String],
    row: &[String],
    columns: &[String],
) -> std::result::Result<Vec<String>, String> {
    let get = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .and_then(|i| row.get(i))
            .cloned()
            .unwrap_or_default()
    };
    for (i, h) in header.iter().enumerate() {
        let kept = h == "step" || columns.iter().any(|c| c == h);
        if !kept && row.get(i).is_some_and(|v| !v.is_empty()) {
            return Err(format!(
                "a row recorded before the checkpoint has a value for column {h:?}, which the checkpoint does not know; the file was modified after the save"
            ));
        }
    }
    let mut out = vec![get("step")];
    out.extend(columns.iter().map(|c| get(c)));
    Ok(out)
}

/// Parses CSV text with RFC 4180 quoting into rows of cells. A final line
/// without `\n` is kept.
pub(crate) fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut cell = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    let mut dirty = false;
    while let Some(c) = chars.next() {
        dirty = true;
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    cell.push('"');
                    chars.next();
                }
                '"' => quoted = false,
                _ => cell.push(c),
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            ',' => row.push(std::mem::take(&mut cell)),
            '\r' => {}
            '\n' => {
                row.push(std::mem::take(&mut cell));
                rows.push(std::mem::take(&mut row));
                dirty = false;
            }
            _ => cell.push(c),
        }
    }
    if dirty {
        row.push(cell);
        rows.push(row);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn columns_sorted_rows_merged_and_new_columns_rewrite_header() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = CsvLogger::new(dir.path());
        log.log_metrics(1, &m(&[("train_loss", 0.5)])).unwrap();
        log.log_metrics(2, &m(&[("train_loss", 0.25), ("a", 1.0)]))
            .unwrap();
        log.log_metrics(2, &m(&[("val_loss", 1e-7)])).unwrap();
        log.log_metrics(3, &m(&[("train_loss", f64::NAN)])).unwrap();
        log.flush().unwrap();
        let text = std::fs::read_to_string(log.path()).unwrap();
        assert_eq!(
            text,
            "step,a,train_loss,val_loss\n1,,0.5,\n2,1.0,0.25,1e-7\n3,,NaN,\n"
        );
        assert_eq!(log.export().bytes, text.len() as u64);
        assert_eq!(log.export().rows, 3);
    }

    #[test]
    fn quoting_round_trips() {
        let cells: Vec<String> = ["step", "a,b", "q\"x", "plain"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let line = join_cells(&cells);
        assert_eq!(line, "step,\"a,b\",\"q\"\"x\",plain\n");
        assert_eq!(parse_csv(&line), vec![cells]);
    }

    #[test]
    fn pending_row_is_part_of_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = CsvLogger::new(dir.path());
        log.log_metrics(1, &m(&[("loss", 1.0)])).unwrap();
        log.log_metrics(2, &m(&[("loss", 2.0)])).unwrap();
        log.flush().unwrap();
        log.log_metrics(3, &m(&[("loss", 3.0)])).unwrap();
        let sd = log.state_dict().unwrap();
        log.log_metrics(4, &m(&[("loss", 4.0)])).unwrap();
        log.flush().unwrap();
        drop(log);
        let mut log = CsvLogger::new(dir.path());
        assert!(log.load_state_dict(&sd).unwrap().is_clean());
        log.log_metrics(3, &m(&[("acc", 0.5)])).unwrap();
        log.log_metrics(4, &m(&[("loss", 4.5)])).unwrap();
        log.flush().unwrap();
        let text = std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(text, "step,acc,loss\n1,,1.0\n2,,2.0\n3,0.5,3.0\n4,,4.5\n");
    }

    #[test]
    fn restore_after_a_later_header_rewrite_projects_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = CsvLogger::new(dir.path());
        log.log_metrics(1, &m(&[("loss", 1.0)])).unwrap();
        log.flush().unwrap();
        let sd = log.state_dict().unwrap();
        log.log_metrics(2, &m(&[("loss", 2.0), ("extra", 9.0)]))
            .unwrap();
        log.flush().unwrap();
        drop(log);
        let mut log = CsvLogger::new(dir.path());
        log.load_state_dict(&sd).unwrap();
        let text = std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(text, "step,loss\n1,1.0\n");
        log.log_metrics(2, &m(&[("loss", 2.5)])).unwrap();
        log.flush().unwrap();
        let text = std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(text, "step,loss\n1,1.0\n2,2.5\n");
    }

    #[test]
    fn a_file_shorter_than_the_checkpoint_is_a_log_file_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = CsvLogger::new(dir.path());
        for s in 1..=3 {
            log.log_metrics(s, &m(&[("loss", s as f64)])).unwrap();
        }
        log.flush().unwrap();
        let sd = log.state_dict().unwrap();
        drop(log);
        let path = dir.path().join(METRICS_FILE);
        std::fs::write(&path, "step,loss\n1,1.0\n").unwrap();
        let err = CsvLogger::new(dir.path()).load_state_dict(&sd).unwrap_err();
        assert!(
            matches!(&err, Error::LogFile { path: p, .. } if *p == path),
            "{err}"
        );
        assert!(err.to_string().contains("metrics.csv"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let err = CsvLogger::new(dir.path()).load_state_dict(&sd).unwrap_err();
        assert!(err.to_string().contains("is missing"), "{err}");
    }

    #[test]
    fn state_of_another_kind_is_a_state_kind_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut sd = CsvLogger::new(dir.path()).state_dict().unwrap();
        let mut v = sd.require_json(STATE_KEY).unwrap().clone();
        v["kind"] = "tensorboard".into();
        sd.insert_json(STATE_KEY, v);
        let err = CsvLogger::new(dir.path()).load_state_dict(&sd).unwrap_err();
        assert!(matches!(err, Error::StateKind { .. }), "{err}");
    }

    #[test]
    fn unsorted_columns_are_a_state_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let mut sd = CsvLogger::new(dir.path()).state_dict().unwrap();
        let mut v = sd.require_json(STATE_KEY).unwrap().clone();
        v["columns"] = serde_json::json!(["b", "a"]);
        sd.insert_json(STATE_KEY, v);
        let err = CsvLogger::new(dir.path()).load_state_dict(&sd).unwrap_err();
        assert!(matches!(err, Error::StateMismatch { .. }), "{err}");
    }

    #[test]
    fn fresh_logger_truncates_a_stale_file_and_writes_hparams() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(METRICS_FILE), "step,old\n1,2\n").unwrap();
        let mut log = CsvLogger::new(dir.path());
        log.log_hyperparams(&serde_json::json!({"lr": 0.1}))
            .unwrap();
        log.log_metrics(1, &m(&[("loss", 1.0)])).unwrap();
        log.flush().unwrap();
        let text = std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(text, "step,loss\n1,1.0\n");
        let hp = std::fs::read_to_string(dir.path().join(HPARAMS_FILE)).unwrap();
        assert!(hp.contains("\"lr\": 0.1"), "{hp}");
    }
}
