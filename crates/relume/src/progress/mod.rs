//! [`ProgressBar`]: what the trainer shows while it runs, and [`log_writer`] /
//! [`init_logging`], which keep log lines on screen while it does.
//!
//! On a terminal it draws a training bar and, during validation, a validation bar
//! below it. Each epoch leaves one summary line (its metrics) in the scrollback:
//! ```text
//! epoch 12/30 51% ███████████░░░░░░░░░░ 23/45 0.2s<0.2s 1.23k it/s step 518 train_loss=0.0123
//! epoch 12/30 done 45/45 in 0.4s 1.22k it/s step 540 train_loss=0.0121 val_acc=0.9721 val_loss=0.1054
//! ```
//! `epoch N/M` counts from 1 (the loop's epoch 0 is `epoch 1/30`); `step` is the
//! global optimizer step; the rate has 3 significant digits and a unit; times are
//! `elapsed<remaining`, in tenths of a second under a minute. The live line is at
//! most 100 columns (cut with `…` beyond).
//!
//! When stdout is not a terminal (a batch job's log file, CI) it prints the same
//! fields as plain lines instead, one every [`ProgressConfig::every_n_steps`]
//! steps and at the last step, so a log holds the same lines at the same steps on
//! every run:
//! ```text
//! epoch 1/2 50/200 25% 0.1s<0.2s 812 it/s step 50 loss=0.6931
//! validation 50% 20/40 0.0s
//! validation done 40/40 in 0.1s val_loss=0.4410
//! epoch 1/2 done 200/200 in 0.3s 790 it/s step 200 loss=0.4121 val_loss=0.4410
//! ```
//! Progress output is not state: a failed write (a closed pipe) disables further
//! output with one warning instead of stopping training.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressDrawTarget, ProgressStyle};

mod format;
mod log;

pub use log::{init_logging, log_writer, stdout_is_terminal, use_color, LogWriter};

use format::{duration, join, TrainLine};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// Bars when stdout is a terminal ([`stdout_is_terminal`]: not under `mpirun`),
    /// plain lines otherwise.
    #[default]
    Auto,
    /// Always bars (drawn on stdout).
    Bar,
    /// Always plain lines on stdout.
    Plain,
    /// Nothing.
    Disabled,
}

/// Settings of a [`ProgressBar`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressConfig {
    mode: ProgressMode,
    every_n_steps: u64,
    precision: usize,
    max_epochs: Option<u64>,
}

impl Default for ProgressConfig {
    fn default() -> Self {
        ProgressConfig {
            mode: ProgressMode::Auto,
            every_n_steps: 50,
            precision: 4,
            max_epochs: None,
        }
    }
}

impl ProgressConfig {
    /// The defaults: [`ProgressMode::Auto`], a plain line every 50 steps, metrics
    /// with 4 decimals, no max_epochs.
    pub fn new() -> Self {
        ProgressConfig::default()
    }

    /// How progress is shown. Default [`ProgressMode::Auto`].
    pub fn mode(mut self, mode: ProgressMode) -> Self {
        self.mode = mode;
        self
    }

    /// In plain mode, print a line every `n` steps (and at the last step of an
    /// epoch or validation run). Default 50; 0 is taken as 1.
    pub fn every_n_steps(mut self, n: u64) -> Self {
        self.every_n_steps = n.max(1);
        self
    }

    /// Decimals shown for metric values. Default 4.
    pub fn precision(mut self, decimals: usize) -> Self {
        self.precision = decimals;
        self
    }

    /// The number of epochs the run trains, shown as `epoch N/M`. Default none
    /// (`epoch N`).
    pub fn max_epochs(mut self, n: u64) -> Self {
        self.max_epochs = Some(n);
        self
    }

    /// The plain-line interval in steps.
    pub fn get_every_n_steps(&self) -> u64 {
        self.every_n_steps
    }
}

/// Training and validation progress; see the [module docs](self).
pub struct ProgressBar {
    config: ProgressConfig,
    out: Output,
    train: Phase,
    val: Phase,
    /// The prog_bar metrics last shown on the training bar (validation ones merged).
    shown: BTreeMap<String, f64>,
    /// The global step last reported.
    global_step: Option<u64>,
}

impl std::fmt::Debug for ProgressBar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.out {
            Output::Disabled => "disabled",
            Output::Bars { .. } => "bars",
            Output::Plain { .. } => "plain",
        };
        f.debug_struct("ProgressBar")
            .field("output", &kind)
            .field("config", &self.config)
            .finish()
    }
}

enum Output {
    Disabled,
    Bars {
        multi: MultiProgress,
        train: Option<indicatif::ProgressBar>,
        val: Option<indicatif::ProgressBar>,
    },
    Plain {
        writer: Box<dyn Write + Send>,
    },
}

/// Counters of one bar (training epoch or validation run).
#[derive(Debug, Clone, Copy)]
struct Phase {
    epoch: u64,
    total: u64,
    pos: u64,
    /// Position at the first update, for the rate of a resumed epoch.
    base: Option<u64>,
    started: Instant,
}

impl Phase {
    fn new() -> Self {
        Phase {
            epoch: 0,
            total: 0,
            pos: 0,
            base: None,
            started: Instant::now(),
        }
    }

    fn start(&mut self, epoch: u64, total: u64) {
        *self = Phase {
            epoch,
            total,
            ..Phase::new()
        };
    }

    fn advance(&mut self, pos: u64) {
        if self.base.is_none() {
            self.base = Some(pos.saturating_sub(1));
        }
        self.pos = pos;
    }

    /// Steps per second since the first update.
    fn rate(&self) -> f64 {
        let done = self.pos.saturating_sub(self.base.unwrap_or(0));
        let secs = self.started.elapsed().as_secs_f64();
        if secs > 0.0 {
            done as f64 / secs
        } else {
            0.0
        }
    }

    fn is_line_step(&self, every: u64) -> bool {
        self.pos % every == 0 || (self.total > 0 && self.pos == self.total)
    }
}

impl ProgressBar {
    /// Progress shown as `config` says, on stdout.
    pub fn new(config: ProgressConfig) -> Self {
        let bars = match config.mode {
            ProgressMode::Disabled => return ProgressBar::with_output(config, Output::Disabled),
            ProgressMode::Bar => true,
            ProgressMode::Plain => false,
            ProgressMode::Auto => stdout_is_terminal(),
        };
        if bars {
            ProgressBar::with_target(config, ProgressDrawTarget::stdout())
        } else {
            ProgressBar::with_writer(config, Box::new(std::io::stdout()))
        }
    }

    /// Bars drawn on `target`; log lines from [`log_writer`] are printed above
    /// them until this is dropped.
    fn with_target(config: ProgressConfig, target: ProgressDrawTarget) -> Self {
        let multi = MultiProgress::with_draw_target(target);
        log::set_active(Some(multi.clone()));
        ProgressBar::with_output(
            config,
            Output::Bars {
                multi,
                train: None,
                val: None,
            },
        )
    }

    /// Plain lines written to `writer`, whatever the configured mode (for logs
    /// and tests).
    pub fn with_writer(config: ProgressConfig, writer: Box<dyn Write + Send>) -> Self {
        ProgressBar::with_output(config, Output::Plain { writer })
    }

    /// Shows nothing.
    pub fn disabled() -> Self {
        ProgressBar::with_output(
            ProgressConfig::new().mode(ProgressMode::Disabled),
            Output::Disabled,
        )
    }

    fn with_output(config: ProgressConfig, out: Output) -> Self {
        ProgressBar {
            config,
            out,
            train: Phase::new(),
            val: Phase::new(),
            shown: BTreeMap::new(),
            global_step: None,
        }
    }

    /// Starts the bar of `epoch` (0-based, shown 1-based) with `steps_in_epoch`
    /// steps (0 when unknown).
    pub fn start_epoch(&mut self, epoch: u64, steps_in_epoch: u64) {
        self.train.start(epoch, steps_in_epoch);
        self.shown.clear();
        let first = self.train_line().running(true);
        if let Output::Bars { multi, train, .. } = &mut self.out {
            if let Some(old) = train.take() {
                old.finish_and_clear();
                multi.remove(&old);
            }
            let bar = multi.add(new_bar());
            bar.set_message(first);
            *train = Some(bar);
        }
    }

    /// Records that `step` steps of the epoch are done (1-based, so the last is
    /// `steps_in_epoch`; a resumed epoch starts above 1), that the run is at
    /// optimizer step `global_step`, and the prog_bar `metrics`.
    pub fn update(&mut self, step: u64, global_step: u64, metrics: &BTreeMap<String, f64>) {
        self.train.advance(step);
        self.global_step = Some(global_step);
        self.shown
            .extend(metrics.iter().map(|(k, v)| (k.clone(), *v)));
        let line_step = self.train.is_line_step(self.config.every_n_steps);
        match &self.out {
            Output::Disabled => {}
            Output::Bars { train, .. } => {
                if let Some(bar) = train {
                    bar.set_message(self.train_line().running(true));
                }
            }
            Output::Plain { .. } => {
                if line_step {
                    let line = self.train_line().running(false);
                    self.write_line(&line);
                }
            }
        }
    }

    /// Ends the epoch's bar, leaving its summary line with the final `metrics`
    /// (merged into the prog_bar metrics already shown).
    pub fn finish_epoch(&mut self, metrics: &BTreeMap<String, f64>) {
        self.shown
            .extend(metrics.iter().map(|(k, v)| (k.clone(), *v)));
        let line = self.train_line().done();
        match &mut self.out {
            Output::Disabled => {}
            Output::Bars { multi, train, .. } => {
                if let Some(bar) = train.take() {
                    bar.finish_and_clear();
                    multi.remove(&bar);
                }
                self.println(&line);
            }
            Output::Plain { .. } => self.write_line(&line),
        }
    }

    /// Starts a separate validation bar over `n` batches (0 when unknown).
    pub fn start_validation(&mut self, n: u64) {
        self.val.start(self.train.epoch, n);
        let first = val_line(&self.val, true);
        if let Output::Bars { multi, val, .. } = &mut self.out {
            if let Some(old) = val.take() {
                old.finish_and_clear();
                multi.remove(&old);
            }
            let bar = multi.add(new_bar());
            bar.set_message(first);
            *val = Some(bar);
        }
    }

    /// Records that `i` validation batches are done (1-based).
    pub fn update_validation(&mut self, i: u64) {
        self.val.advance(i);
        match &mut self.out {
            Output::Disabled => {}
            Output::Bars { val, .. } => {
                if let Some(bar) = val {
                    bar.set_message(val_line(&self.val, true));
                }
            }
            Output::Plain { .. } => {
                if self.val.is_line_step(self.config.every_n_steps) {
                    let line = val_line(&self.val, false);
                    self.write_line(&line);
                }
            }
        }
    }

    /// Removes the validation bar and shows its `metrics` on the training bar.
    pub fn finish_validation(&mut self, metrics: &BTreeMap<String, f64>) {
        self.shown
            .extend(metrics.iter().map(|(k, v)| (k.clone(), *v)));
        let line = join(&[
            format!(
                "validation done {} in {}",
                count(&self.val),
                duration(self.val.started.elapsed())
            ),
            format_metrics(metrics, self.config.precision),
        ]);
        let text = self.train_line().running(true);
        match &mut self.out {
            Output::Disabled => {}
            Output::Bars { multi, val, train } => {
                if let Some(bar) = val.take() {
                    bar.finish_and_clear();
                    multi.remove(&bar);
                }
                if let Some(bar) = train {
                    bar.set_message(text);
                }
            }
            Output::Plain { .. } => self.write_line(&line),
        }
    }

    /// Prints `msg` on its own line without breaking the bars.
    pub fn println(&mut self, msg: &str) {
        match &mut self.out {
            Output::Disabled => {}
            Output::Bars { multi, .. } => {
                let res = if multi.is_hidden() {
                    // Bar mode forced on a non-terminal draws nothing, but the
                    // line is still wanted.
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{msg}").and_then(|()| out.flush())
                } else {
                    multi.println(msg)
                };
                if let Err(e) = res {
                    tracing::warn!(error = %e, "progress output failed; disabling it");
                    self.disable();
                }
            }
            Output::Plain { .. } => self.write_line(msg),
        }
    }

    /// The training line's fields now.
    fn train_line(&self) -> TrainLine {
        TrainLine {
            epoch: self.train.epoch,
            max_epochs: self.config.max_epochs,
            pos: self.train.pos,
            total: self.train.total,
            elapsed: self.train.started.elapsed(),
            rate: self.train.rate(),
            global_step: self.global_step,
            metrics: format_metrics(&self.shown, self.config.precision),
        }
    }

    /// Writes one plain line; on failure, warns once and disables output.
    fn write_line(&mut self, line: &str) {
        if let Output::Plain { writer } = &mut self.out {
            let res = writeln!(writer, "{line}").and_then(|()| writer.flush());
            if let Err(e) = res {
                tracing::warn!(error = %e, "progress output failed; disabling it");
                self.disable();
            }
        }
    }

    /// Clears any bars and shows nothing from now on.
    fn disable(&mut self) {
        if let Output::Bars { train, val, .. } = &mut self.out {
            for bar in [train.take(), val.take()].into_iter().flatten() {
                bar.finish_and_clear();
            }
            log::set_active(None);
        }
        self.out = Output::Disabled;
    }
}

impl Drop for ProgressBar {
    /// Clears a bar still drawn (an interrupted or failed fit) and sends log
    /// lines back to stdout.
    fn drop(&mut self) {
        self.disable();
    }
}

/// One line style for every bar: relume renders the whole line itself
/// ([`TrainLine`]), so plain and terminal lines share their fields.
/// `wide_msg` cuts it to a narrower terminal.
fn new_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::hidden();
    match ProgressStyle::with_template(BAR_TEMPLATE) {
        Ok(style) => bar.with_style(style),
        // The template is a constant checked by a test; keep the default style
        // rather than fail training over a cosmetic problem.
        Err(_) => bar,
    }
}

const BAR_TEMPLATE: &str = "{wide_msg}";

/// `validation 50% ██████████░░░░░░░░░░ 1/2 0.1s` (no bar in plain mode).
fn val_line(p: &Phase, bar: bool) -> String {
    let pct = p.pos.saturating_mul(100).checked_div(p.total);
    let drawn = match (bar, pct) {
        (true, Some(_)) => format::draw_bar(p.pos, p.total, 20),
        _ => String::new(),
    };
    join(&[
        "validation".into(),
        pct.map(|x| format!("{x}%")).unwrap_or_default(),
        drawn,
        count(p),
        duration(p.started.elapsed()),
    ])
}

fn count(p: &Phase) -> String {
    if p.total == 0 {
        p.pos.to_string()
    } else {
        format!("{}/{}", p.pos, p.total)
    }
}

/// `a=0.1234 b=2.0000`, sorted by name.
fn format_metrics(metrics: &BTreeMap<String, f64>, precision: usize) -> String {
    metrics
        .iter()
        .map(|(k, v)| format!("{k}={v:.precision$}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// Serialises the tests that draw bars: the active bars are global.
    static BARS: Mutex<()> = Mutex::new(());

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect()
        }
    }

    /// Drops the timing fields (times, rate) that vary between runs.
    fn untimed(line: &str) -> String {
        let mut out = Vec::new();
        let mut skip = 0;
        for w in line.split(' ') {
            if skip > 0 {
                skip -= 1;
                continue;
            }
            match w {
                "in" => skip = 1,
                "it/s" | "s/it" => {
                    out.pop();
                }
                w if w.ends_with('s') && w.starts_with(|c: char| c.is_ascii_digit()) => {}
                w if w.contains("s<") => {}
                _ => out.push(w),
            }
        }
        out.join(" ")
    }

    fn m(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn plain_lines_are_periodic_by_step_count() {
        let out = Shared::default();
        let mut p = ProgressBar::with_writer(
            ProgressConfig::new()
                .every_n_steps(4)
                .precision(2)
                .max_epochs(3),
            Box::new(out.clone()),
        );
        p.start_epoch(1, 10);
        for s in 1..=10 {
            p.update(s, 10 + s, &m(&[("loss", 1.0 / s as f64)]));
        }
        p.start_validation(3);
        for i in 1..=3 {
            p.update_validation(i);
        }
        p.finish_validation(&m(&[("val_loss", 0.5)]));
        p.finish_epoch(&m(&[("acc", 0.9)]));
        p.println("checkpoint step=20");
        let lines: Vec<String> = out.lines().iter().map(|l| untimed(l)).collect();
        assert_eq!(
            lines,
            [
                "epoch 2/3 40% 4/10 step 14 loss=0.25",
                "epoch 2/3 80% 8/10 step 18 loss=0.12",
                "epoch 2/3 100% 10/10 step 20 loss=0.10",
                "validation 100% 3/3",
                "validation done 3/3 val_loss=0.50",
                "epoch 2/3 done 10/10 step 20 acc=0.90 loss=0.10 val_loss=0.50",
                "checkpoint step=20",
            ]
        );
        let first = &out.lines()[0];
        assert!(first.contains(" it/s step 14 "), "{first}");
        assert!(first.contains("s<"), "{first}");
    }

    #[test]
    fn resumed_epoch_and_unknown_total() {
        let out = Shared::default();
        let mut p = ProgressBar::with_writer(
            ProgressConfig::new().every_n_steps(0),
            Box::new(out.clone()),
        );
        p.start_epoch(2, 0);
        p.update(7, 100, &BTreeMap::new());
        p.update(8, 101, &BTreeMap::new());
        p.finish_epoch(&BTreeMap::new());
        let lines: Vec<String> = out.lines().iter().map(|l| untimed(l)).collect();
        assert_eq!(
            lines,
            [
                "epoch 3 7 step 100",
                "epoch 3 8 step 101",
                "epoch 3 done 8 step 101"
            ]
        );
    }

    #[test]
    fn failing_writer_disables_output_without_panicking() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut p = ProgressBar::with_writer(ProgressConfig::new(), Box::new(Broken));
        p.println("x");
        assert!(matches!(p.out, Output::Disabled));
    }

    #[test]
    fn bar_mode_and_disabled_run_all_hooks() {
        let _g = BARS.lock().unwrap_or_else(|e| e.into_inner());
        assert!(ProgressStyle::with_template(BAR_TEMPLATE).is_ok());
        for mut p in [
            ProgressBar::with_target(ProgressConfig::new(), ProgressDrawTarget::hidden()),
            ProgressBar::disabled(),
        ] {
            p.start_epoch(0, 3);
            p.update(1, 1, &m(&[("loss", 1.0)]));
            p.start_validation(2);
            p.update_validation(1);
            p.finish_validation(&m(&[("val_loss", 1.0)]));
            p.println("hello");
            p.finish_epoch(&BTreeMap::new());
        }
    }

    const COLS: usize = 120;

    /// A terminal for indicatif: a grid of characters and a cursor, with `\r`,
    /// `\n`, line clearing, cursor moves and a deferred wrap at the right edge, as
    /// a VT100 has; enough to see what a user would see after the bars redraw.
    #[derive(Debug, Default)]
    struct Screen {
        rows: Vec<Vec<char>>,
        row: usize,
        col: usize,
    }

    impl Screen {
        fn put(&mut self, c: char) {
            match c {
                '\r' => self.col = 0,
                '\n' => {
                    self.row += 1;
                    self.col = 0;
                }
                c => {
                    if self.col == COLS {
                        self.row += 1;
                        self.col = 0;
                    }
                    if self.rows.len() <= self.row {
                        self.rows.resize(self.row + 1, Vec::new());
                    }
                    let r = &mut self.rows[self.row];
                    if r.len() <= self.col {
                        r.resize(self.col + 1, ' ');
                    }
                    r[self.col] = c;
                    self.col += 1;
                }
            }
        }
    }

    #[derive(Debug, Clone, Default)]
    struct FakeTerm(Arc<Mutex<Screen>>);

    impl FakeTerm {
        /// The non-blank rows, right-trimmed.
        fn screen(&self) -> Vec<String> {
            let s = self.0.lock().unwrap();
            s.rows
                .iter()
                .map(|r| r.iter().collect::<String>().trim_end().to_string())
                .filter(|r| !r.is_empty())
                .collect()
        }

        /// A write straight to the terminal, as a log line not routed through
        /// the bars is.
        fn stray_line(&self, s: &str) {
            indicatif::TermLike::write_line(self, s).unwrap();
        }
    }

    impl indicatif::TermLike for FakeTerm {
        fn width(&self) -> u16 {
            COLS as u16
        }
        fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
            let mut s = self.0.lock().unwrap();
            s.row = s.row.saturating_sub(n);
            Ok(())
        }
        fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
            self.0.lock().unwrap().row += n;
            Ok(())
        }
        fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
            let mut s = self.0.lock().unwrap();
            s.col = (s.col + n).min(COLS);
            Ok(())
        }
        fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
            let mut s = self.0.lock().unwrap();
            s.col = s.col.saturating_sub(n);
            Ok(())
        }
        fn write_line(&self, line: &str) -> std::io::Result<()> {
            self.write_str(line)?;
            self.write_str("\n")
        }
        fn write_str(&self, text: &str) -> std::io::Result<()> {
            let mut s = self.0.lock().unwrap();
            text.chars().for_each(|c| s.put(c));
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            let mut s = self.0.lock().unwrap();
            let row = s.row;
            if let Some(r) = s.rows.get_mut(row) {
                r.clear();
            }
            s.col = 0;
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Issue #8 A.2: a log line written while the bar is drawn is still on screen
    /// after the bar redraws, and the epoch leaves its summary line.
    #[test]
    fn log_lines_survive_the_bar_on_a_terminal() {
        let _g = BARS.lock().unwrap_or_else(|e| e.into_inner());
        let term = FakeTerm::default();
        let target = ProgressDrawTarget::term_like_with_hz(Box::new(term.clone()), 100);
        let mut p = ProgressBar::with_target(ProgressConfig::new().max_epochs(30), target);
        p.start_epoch(0, 45);
        p.update(1, 1, &m(&[("loss", 1.0)]));
        {
            let mut w = log_writer();
            w.write_all(b"INFO interrupted: saved at step 1\n").unwrap();
        }
        for s in 2..=45 {
            std::thread::sleep(Duration::from_millis(12));
            p.update(s, s, &m(&[("loss", 1.0 / s as f64)]));
        }
        let screen = term.screen();
        assert!(
            screen
                .iter()
                .any(|r| r == "INFO interrupted: saved at step 1"),
            "{screen:#?}"
        );
        assert!(
            screen
                .last()
                .is_some_and(|r| r.starts_with("epoch 1/30 100% ")),
            "{screen:#?}"
        );
        p.finish_epoch(&BTreeMap::new());
        p.println("checkpoint step=000045-epoch=1");
        drop(p);
        let screen = term.screen();
        assert_eq!(screen.len(), 3, "{screen:#?}");
        assert!(
            screen[1].starts_with("epoch 1/30 done 45/45 in "),
            "{screen:#?}"
        );
        assert_eq!(screen[2], "checkpoint step=000045-epoch=1");

        // An epoch interrupted mid-way: its bar, drawn at a rate limit, is cleared
        // when the progress is dropped and leaves no stale line behind.
        let term = FakeTerm::default();
        let target = ProgressDrawTarget::term_like_with_hz(Box::new(term.clone()), 20);
        let mut p = ProgressBar::with_target(ProgressConfig::new().max_epochs(30), target);
        p.start_epoch(0, 45);
        for s in 1..=45 {
            p.update(s, s, &BTreeMap::new());
        }
        p.finish_epoch(&BTreeMap::new());
        p.println("checkpoint 1");
        p.start_epoch(1, 45);
        for s in 1..=33 {
            p.update(s, 45 + s, &BTreeMap::new());
        }
        p.println("checkpoint 2");
        log_writer().write_all(b"INFO interrupted\n").unwrap();
        drop(p);
        let screen = term.screen();
        assert_eq!(screen.len(), 4, "{screen:#?}");
        assert_eq!(
            screen[1..],
            ["checkpoint 1", "checkpoint 2", "INFO interrupted"]
        );

        // The check has teeth: with two bars drawn (training and validation), a
        // line written straight past them is overwritten by their next redraw,
        // as the INFO line after Ctrl-C was (issue #8).
        let term = FakeTerm::default();
        let target = ProgressDrawTarget::term_like_with_hz(Box::new(term.clone()), 100);
        let mut p = ProgressBar::with_target(ProgressConfig::new(), target);
        p.start_epoch(0, 45);
        p.update(1, 1, &BTreeMap::new());
        p.start_validation(3);
        std::thread::sleep(Duration::from_millis(12));
        p.update_validation(1);
        term.stray_line("INFO lost");
        assert!(term.screen().iter().any(|r| r == "INFO lost"));
        std::thread::sleep(Duration::from_millis(12));
        p.update_validation(2);
        assert!(!term.screen().iter().any(|r| r == "INFO lost"));
    }
}
