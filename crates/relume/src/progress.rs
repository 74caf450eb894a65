//! [`ProgressBar`]: what the trainer shows while it runs.
//!
//! On a terminal it draws two [`indicatif`] bars: the training bar (epoch,
//! step/total, elapsed<ETA, it/s and the metrics marked `prog_bar`) and, during
//! validation, a separate validation bar below it. When stdout is not a terminal
//! (a batch job's log file, CI) it prints plain lines instead, one every
//! [`ProgressConfig::every_n_steps`] steps and at the last step, so a log holds
//! the same lines at the same steps on every run:
//! ```text
//! epoch 0 step 50/200 (25%) 812.3 it/s eta 00:00:01 loss=0.6931
//! epoch 0 done 200/200 in 00:00:02 loss=0.4121 val_loss=0.4410
//! validation 20/40 (50%)
//! validation done 40/40 val_loss=0.4410
//! ```
//! Progress output is not state: a failed write (a closed pipe) disables further
//! output with one warning instead of stopping training.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// Bars when stdout is a terminal, plain lines otherwise.
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
}

impl Default for ProgressConfig {
    fn default() -> Self {
        ProgressConfig {
            mode: ProgressMode::Auto,
            every_n_steps: 50,
            precision: 4,
        }
    }
}

impl ProgressConfig {
    /// The defaults: [`ProgressMode::Auto`], a plain line every 50 steps, metrics
    /// with 4 decimals.
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

    /// `step/total (pct%)`, or `step` when the total is unknown.
    fn position(&self) -> String {
        match self.pos.saturating_mul(100).checked_div(self.total) {
            Some(pct) => format!("{}/{} ({pct}%)", self.pos, self.total),
            None => self.pos.to_string(),
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
            ProgressMode::Auto => std::io::stdout().is_terminal(),
        };
        if bars {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
            ProgressBar::with_output(
                config,
                Output::Bars {
                    multi,
                    train: None,
                    val: None,
                },
            )
        } else {
            ProgressBar::with_writer(config, Box::new(std::io::stdout()))
        }
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
        }
    }

    /// Starts the bar of `epoch` with `steps_in_epoch` steps (0 when unknown).
    pub fn start_epoch(&mut self, epoch: u64, steps_in_epoch: u64) {
        self.train.start(epoch, steps_in_epoch);
        self.shown.clear();
        if let Output::Bars { multi, train, .. } = &mut self.out {
            if let Some(old) = train.take() {
                old.finish();
            }
            let bar = multi.add(new_bar(steps_in_epoch, TRAIN_TEMPLATE));
            bar.set_prefix(format!("epoch {epoch}"));
            *train = Some(bar);
        }
    }

    /// Records that `step` steps of the epoch are done (1-based, so the last is
    /// `steps_in_epoch`; a resumed epoch starts above 1), with the prog_bar
    /// `metrics`.
    pub fn update(&mut self, step: u64, metrics: &BTreeMap<String, f64>) {
        self.train.advance(step);
        self.shown
            .extend(metrics.iter().map(|(k, v)| (k.clone(), *v)));
        let text = format_metrics(&self.shown, self.config.precision);
        let line = self.train.is_line_step(self.config.every_n_steps).then(|| {
            let eta = if self.train.total > 0 {
                let rate = self.train.rate();
                let left = self.train.total.saturating_sub(self.train.pos) as f64;
                let eta = if rate > 0.0 { left / rate } else { 0.0 };
                format!(" eta {}", hms(Duration::from_secs_f64(eta)))
            } else {
                String::new()
            };
            join(&[
                format!(
                    "epoch {} step {} {:.1} it/s{eta}",
                    self.train.epoch,
                    self.train.position(),
                    self.train.rate()
                ),
                text.clone(),
            ])
        });
        match &mut self.out {
            Output::Disabled => {}
            Output::Bars { train, .. } => {
                if let Some(bar) = train {
                    bar.set_position(step);
                    bar.set_message(text);
                }
            }
            Output::Plain { .. } => {
                if let Some(line) = line {
                    self.write_line(&line);
                }
            }
        }
    }

    /// Ends the epoch's bar, showing the final `metrics` (merged into the
    /// prog_bar metrics already shown).
    pub fn finish_epoch(&mut self, metrics: &BTreeMap<String, f64>) {
        self.shown
            .extend(metrics.iter().map(|(k, v)| (k.clone(), *v)));
        let text = format_metrics(&self.shown, self.config.precision);
        let line = join(&[
            format!(
                "epoch {} done {} in {}",
                self.train.epoch,
                done_position(&self.train),
                hms(self.train.started.elapsed())
            ),
            text.clone(),
        ]);
        match &mut self.out {
            Output::Disabled => {}
            Output::Bars { train, .. } => {
                if let Some(bar) = train.take() {
                    bar.set_message(text);
                    bar.finish();
                }
            }
            Output::Plain { .. } => self.write_line(&line),
        }
    }

    /// Starts a separate validation bar over `n` batches (0 when unknown).
    pub fn start_validation(&mut self, n: u64) {
        self.val.start(self.train.epoch, n);
        if let Output::Bars { multi, val, .. } = &mut self.out {
            if let Some(old) = val.take() {
                old.finish_and_clear();
            }
            let bar = multi.add(new_bar(n, VAL_TEMPLATE));
            bar.set_prefix("validation");
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
                    bar.set_position(i);
                }
            }
            Output::Plain { .. } => {
                if self.val.is_line_step(self.config.every_n_steps) {
                    let line = format!("validation {}", self.val.position());
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
            format!("validation done {}", done_position(&self.val)),
            format_metrics(metrics, self.config.precision),
        ]);
        let text = format_metrics(&self.shown, self.config.precision);
        match &mut self.out {
            Output::Disabled => {}
            Output::Bars { val, train, .. } => {
                if let Some(bar) = val.take() {
                    bar.finish_and_clear();
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
                if let Err(e) = multi.println(msg) {
                    tracing::warn!(error = %e, "progress output failed; disabling it");
                    self.out = Output::Disabled;
                }
            }
            Output::Plain { .. } => self.write_line(msg),
        }
    }

    /// Writes one plain line; on failure, warns once and disables output.
    fn write_line(&mut self, line: &str) {
        if let Output::Plain { writer } = &mut self.out {
            let res = writeln!(writer, "{line}").and_then(|()| writer.flush());
            if let Err(e) = res {
                tracing::warn!(error = %e, "progress output failed; disabling it");
                self.out = Output::Disabled;
            }
        }
    }
}

const TRAIN_TEMPLATE: &str =
    "{prefix} {bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}, {per_sec}] {msg}";
const VAL_TEMPLATE: &str =
    "{prefix} {bar:30.green/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}]";
const SPINNER_TEMPLATE: &str = "{prefix} {spinner} {pos} [{elapsed_precise}, {per_sec}] {msg}";

fn new_bar(len: u64, template: &str) -> indicatif::ProgressBar {
    let (bar, template) = if len == 0 {
        (indicatif::ProgressBar::no_length(), SPINNER_TEMPLATE)
    } else {
        (indicatif::ProgressBar::new(len), template)
    };
    match ProgressStyle::with_template(template) {
        Ok(style) => bar.with_style(style),
        // The templates are constants checked by a test; keep the default style
        // rather than fail training over a cosmetic problem.
        Err(_) => bar,
    }
}

fn done_position(p: &Phase) -> String {
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

fn join(parts: &[String]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join(" ")
}

/// `HH:MM:SS`.
fn hms(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

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

    /// Drops the timing fields (it/s, eta, duration) that vary between runs.
    fn untimed(line: &str) -> String {
        let mut out = Vec::new();
        let mut skip = 0;
        for w in line.split(' ') {
            if skip > 0 {
                skip -= 1;
                continue;
            }
            match w {
                "eta" | "in" => skip = 1,
                "it/s" => {
                    out.pop();
                }
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
            ProgressConfig::new().every_n_steps(4).precision(2),
            Box::new(out.clone()),
        );
        p.start_epoch(1, 10);
        for s in 1..=10 {
            p.update(s, &m(&[("loss", 1.0 / s as f64)]));
        }
        p.start_validation(3);
        for i in 1..=3 {
            p.update_validation(i);
        }
        p.finish_validation(&m(&[("val_loss", 0.5)]));
        p.println("saved checkpoint step=10");
        p.finish_epoch(&m(&[("acc", 0.9)]));
        let lines: Vec<String> = out.lines().iter().map(|l| untimed(l)).collect();
        assert_eq!(
            lines,
            [
                "epoch 1 step 4/10 (40%) loss=0.25",
                "epoch 1 step 8/10 (80%) loss=0.12",
                "epoch 1 step 10/10 (100%) loss=0.10",
                "validation 3/3 (100%)",
                "validation done 3/3 val_loss=0.50",
                "saved checkpoint step=10",
                "epoch 1 done 10/10 acc=0.90 loss=0.10 val_loss=0.50",
            ]
        );
        assert!(out.lines()[0].contains(" it/s eta "), "{}", out.lines()[0]);
    }

    #[test]
    fn resumed_epoch_and_unknown_total() {
        let out = Shared::default();
        let mut p = ProgressBar::with_writer(
            ProgressConfig::new().every_n_steps(0),
            Box::new(out.clone()),
        );
        p.start_epoch(2, 0);
        p.update(7, &BTreeMap::new());
        p.update(8, &BTreeMap::new());
        p.finish_epoch(&BTreeMap::new());
        let lines: Vec<String> = out.lines().iter().map(|l| untimed(l)).collect();
        assert_eq!(
            lines,
            ["epoch 2 step 7", "epoch 2 step 8", "epoch 2 done 8"]
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
        for template in [TRAIN_TEMPLATE, VAL_TEMPLATE, SPINNER_TEMPLATE] {
            assert!(ProgressStyle::with_template(template).is_ok(), "{template}");
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::hidden());
        let bars = Output::Bars {
            multi,
            train: None,
            val: None,
        };
        for mut p in [
            ProgressBar::with_output(ProgressConfig::new(), bars),
            ProgressBar::disabled(),
        ] {
            p.start_epoch(0, 3);
            p.update(1, &m(&[("loss", 1.0)]));
            p.start_validation(2);
            p.update_validation(1);
            p.finish_validation(&m(&[("val_loss", 1.0)]));
            p.println("hello");
            p.finish_epoch(&BTreeMap::new());
        }
    }

    #[test]
    fn hms_formats_hours() {
        assert_eq!(hms(Duration::from_secs(3725)), "01:02:05");
    }
}
