//! Log lines that survive the progress bar.
//!
//! A log line written straight to the terminal while a bar is drawn is erased by
//! the bar's next redraw (the bar moves the cursor up over its old lines and
//! clears them). [`log_writer`] gives a writer that prints each log record
//! *above* the live bar instead, through the bar's [`indicatif::MultiProgress`];
//! with no bar on screen it writes to stdout, where the plain progress lines go,
//! so that a redirected log keeps its lines in order.
//!
//! [`init_logging`] installs a `tracing` subscriber that uses it, with colour only
//! on a terminal (see [`use_color`]):
//! ```no_run
//! relume::progress::init_logging("info")?;
//! # Ok::<(), relume::Error>(())
//! ```
//! or, to build the subscriber yourself:
//! ```no_run
//! tracing_subscriber::fmt()
//!     .with_writer(relume::progress::log_writer)
//!     .with_ansi(relume::progress::use_color())
//!     .init();
//! ```

use std::ffi::OsStr;
use std::io::{IsTerminal, Write};
use std::sync::{Mutex, MutexGuard};

use indicatif::MultiProgress;

use crate::error::{Error, Result};

/// The bars on screen now, if any: set by a drawing [`super::ProgressBar`],
/// cleared when it is dropped.
static ACTIVE: Mutex<Option<MultiProgress>> = Mutex::new(None);

fn active() -> MutexGuard<'static, Option<MultiProgress>> {
    // A panic while holding the lock leaves a valid Option: keep using it.
    ACTIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes `multi` the bars that log lines are printed above.
pub(crate) fn set_active(multi: Option<MultiProgress>) {
    *active() = multi;
}

/// A [`Write`] for one log record that prints it above the live progress bar
/// (or to stdout when none is drawn); see the module docs of `relume::progress`. It buffers
/// and prints when flushed or dropped, which `tracing_subscriber`'s fmt layer does
/// after every record.
#[derive(Debug, Default)]
pub struct LogWriter {
    buf: Vec<u8>,
}

/// A [`LogWriter`]; pass the function itself to
/// `tracing_subscriber::fmt().with_writer(relume::progress::log_writer)`.
pub fn log_writer() -> LogWriter {
    LogWriter::default()
}

impl LogWriter {
    fn emit(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::take(&mut self.buf);
        let multi = active().clone();
        match multi {
            Some(m) if !m.is_hidden() => {
                let text = String::from_utf8_lossy(&bytes);
                m.println(text.strip_suffix('\n').unwrap_or(&text))
            }
            _ => {
                let mut out = std::io::stdout().lock();
                out.write_all(&bytes)?;
                out.flush()
            }
        }
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.emit()
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        // Logging must not fail the program; a closed stdout loses the line.
        let _ = self.emit();
    }
}

/// Whether stdout is a terminal a person watches: a terminal, and not a rank
/// started by `mpirun`. mpirun gives every rank a pseudo-terminal even when its own
/// output goes to a file or a pipe, and interleaves the ranks' lines, so a bar
/// redrawn with `\r` and colour codes would land in the log; under an MPI launcher
/// relume prints plain lines.
pub fn stdout_is_terminal() -> bool {
    terminal_wanted(
        std::io::stdout().is_terminal(),
        crate::dist::started_by_mpirun(),
    )
}

/// The rule of [`stdout_is_terminal`], apart from the environment.
pub(crate) fn terminal_wanted(is_terminal: bool, under_mpirun: bool) -> bool {
    is_terminal && !under_mpirun
}

/// Whether log output on stdout should be coloured: only when
/// [`stdout_is_terminal`] and `NO_COLOR` is unset or empty (<https://no-color.org>).
pub fn use_color() -> bool {
    color_wanted(
        stdout_is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// The rule of [`use_color`], apart from the environment.
pub(crate) fn color_wanted(is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// Installs the global `tracing` subscriber the examples use: records from the
/// `RUST_LOG` filter (or `default_filter` when `RUST_LOG` is unset or empty, e.g.
/// `"info"`), without targets, printed through [`log_writer`] so that they survive
/// the progress bar, coloured only when [`use_color`] says so.
///
/// # Errors
/// [`Error::InvalidSetting`] when `RUST_LOG` or `default_filter` is not a valid
/// filter, or when a global subscriber is already installed.
///
/// # Example
/// ```no_run
/// fn main() -> anyhow::Result<()> {
///     relume::progress::init_logging("info")?;
///     tracing::info!("this line stays on screen while a bar is drawn");
///     Ok(())
/// }
/// ```
pub fn init_logging(default_filter: &str) -> Result<()> {
    use tracing_subscriber::EnvFilter;
    let (setting, value) = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => ("RUST_LOG", v),
        _ => ("default_filter", default_filter.to_string()),
    };
    let filter = EnvFilter::try_new(&value).map_err(|e| Error::InvalidSetting {
        setting: setting.into(),
        value: value.clone(),
        rule: format!("must be a tracing filter such as `info` or `relume=debug` ({e})"),
    })?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(use_color())
        .with_writer(log_writer)
        .try_init()
        .map_err(|e| Error::InvalidSetting {
            setting: "global tracing subscriber".into(),
            value: "already installed".into(),
            rule: format!(
                "init_logging must be called once, before any other subscriber is set ({e})"
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(color_wanted(true, None));
        assert!(color_wanted(true, Some(OsStr::new(""))));
        assert!(!color_wanted(true, Some(OsStr::new("1"))));
        assert!(!color_wanted(true, Some(OsStr::new("0"))));
        assert!(!color_wanted(false, None));
    }

    #[test]
    fn a_rank_under_mpirun_is_not_a_terminal_even_on_a_pty() {
        assert!(terminal_wanted(true, false));
        assert!(!terminal_wanted(true, true));
        assert!(!terminal_wanted(false, false));
    }
}
