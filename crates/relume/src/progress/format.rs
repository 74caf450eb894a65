//! Pure formatting of the progress lines: rates, durations, the training line.
//!
//! Kept apart from the drawing so that every field can be unit-tested without a
//! terminal or a clock.

use std::time::Duration;

/// The widest a training line may be (bar included), in columns.
pub(crate) const MAX_WIDTH: usize = 100;
/// The widest bar drawn; narrower when the rest of the line needs the room.
const MAX_BAR: usize = 25;
/// Below this many columns the bar is left out rather than drawn uselessly thin.
const MIN_BAR: usize = 6;

/// A rate with a unit and 3 significant digits, like tqdm: `1.23k it/s`,
/// `987 it/s`, `12.3 it/s`; below one step a second, seconds per step
/// (`2.50 s/it`). `? it/s` when there is no rate yet.
pub(crate) fn rate(per_sec: f64) -> String {
    if !per_sec.is_finite() || per_sec <= 0.0 {
        return "? it/s".into();
    }
    if per_sec < 1.0 {
        return format!("{} s/it", si(1.0 / per_sec));
    }
    format!("{} it/s", si(per_sec))
}

/// `x` with 3 significant digits and an SI suffix (k, M, G) from 1000 up.
fn si(x: f64) -> String {
    for (scale, suffix) in [(1.0, ""), (1e3, "k"), (1e6, "M"), (1e9, "G")] {
        let s = sig3(x / scale);
        // 999.6 rounds to "1000": show it as 1.00k instead.
        if s.parse::<f64>().is_ok_and(|v| v < 1000.0) {
            return format!("{s}{suffix}");
        }
    }
    format!("{:.0}G", x / 1e9)
}

/// 3 significant digits for `x` in [0, 1000): `1.23`, `12.3`, `123`.
fn sig3(x: f64) -> String {
    if x >= 99.95 {
        format!("{x:.0}")
    } else if x >= 9.995 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// A duration for a progress line: tenths of a second under a minute (`0.4s`,
/// `12.3s`), then `m:ss`, then `h:mm:ss`.
pub(crate) fn duration(d: Duration) -> String {
    let tenths = (d.as_secs_f64() * 10.0).round() as u64;
    if tenths < 600 {
        return format!("{}.{}s", tenths / 10, tenths % 10);
    }
    let s = (d.as_secs_f64()).round() as u64;
    if s < 3600 {
        format!("{}:{:02}", s / 60, s % 60)
    } else {
        format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
    }
}

/// Everything a training line shows.
#[derive(Debug, Clone)]
pub(crate) struct TrainLine {
    /// The loop's epoch (0-based); shown 1-based, as `N/M` when `max_epochs` is known.
    pub epoch: u64,
    /// The trainer's max_epochs, when known.
    pub max_epochs: Option<u64>,
    /// Steps done in this epoch.
    pub pos: u64,
    /// Steps in the epoch; 0 when unknown.
    pub total: u64,
    /// Time since the epoch's bar started.
    pub elapsed: Duration,
    /// Steps per second.
    pub rate: f64,
    /// The global step, when known.
    pub global_step: Option<u64>,
    /// The metrics, already formatted (`a=0.1 b=0.2`).
    pub metrics: String,
}

impl TrainLine {
    /// `epoch 12/30` (1-based).
    fn epoch(&self) -> String {
        match self.max_epochs {
            Some(m) => format!("epoch {}/{m}", self.epoch + 1),
            None => format!("epoch {}", self.epoch + 1),
        }
    }

    fn pct(&self) -> Option<u64> {
        self.pos.saturating_mul(100).checked_div(self.total)
    }

    /// `23/45`, or `23` when the total is unknown.
    fn count(&self) -> String {
        if self.total == 0 {
            self.pos.to_string()
        } else {
            format!("{}/{}", self.pos, self.total)
        }
    }

    /// `1.2s<1.1s` (elapsed<remaining), or the elapsed time alone when the total is
    /// unknown or there is no rate yet.
    fn times(&self) -> String {
        let elapsed = duration(self.elapsed);
        if self.total == 0 || !self.rate.is_finite() || self.rate <= 0.0 {
            return elapsed;
        }
        let left = self.total.saturating_sub(self.pos) as f64 / self.rate;
        format!("{elapsed}<{}", duration(Duration::from_secs_f64(left)))
    }

    fn tail(&self) -> String {
        let step = self
            .global_step
            .map(|s| format!("step {s}"))
            .unwrap_or_default();
        join(&[
            self.count(),
            self.times(),
            rate(self.rate),
            step,
            self.metrics.clone(),
        ])
    }

    /// The line while the epoch runs: `epoch 2/30 51% 23/45 0.2s<0.2s 987 it/s
    /// step 68 loss=0.1`. With `bar` (a terminal) it also draws a bar after the
    /// percentage when there is room, and cuts the line at [`MAX_WIDTH`] columns
    /// with `…` so that it never wraps; plain mode (`bar = false`) keeps every
    /// field.
    pub fn running(&self, bar: bool) -> String {
        let pct = self.pct().map(|p| format!("{p}%")).unwrap_or_default();
        let head = join(&[self.epoch(), pct]);
        let tail = self.tail();
        if !bar {
            return join(&[head, tail]);
        }
        let used = width(&head) + width(&tail) + 2;
        let room = MAX_WIDTH.saturating_sub(used).min(MAX_BAR);
        let line = if self.total > 0 && room >= MIN_BAR {
            format!("{head} {} {tail}", draw_bar(self.pos, self.total, room))
        } else {
            join(&[head, tail])
        };
        truncate(&line, MAX_WIDTH)
    }

    /// The line kept when the epoch ends:
    /// `epoch 2/30 done 45/45 in 0.4s 1.02k it/s step 90 loss=0.1 val_loss=0.2`.
    pub fn done(&self) -> String {
        let step = self
            .global_step
            .map(|s| format!("step {s}"))
            .unwrap_or_default();
        join(&[
            self.epoch(),
            "done".into(),
            self.count(),
            format!("in {}", duration(self.elapsed)),
            rate(self.rate),
            step,
            self.metrics.clone(),
        ])
    }
}

/// A bar of `cols` columns, `pos/total` full.
pub(crate) fn draw_bar(pos: u64, total: u64, cols: usize) -> String {
    let full = if total == 0 {
        0
    } else {
        ((pos.min(total) as u128 * cols as u128) / total as u128) as usize
    };
    let mut s = "█".repeat(full);
    s.push_str(&"░".repeat(cols - full));
    s
}

/// `s` cut to `cols` columns, ending in `…` when cut.
pub(crate) fn truncate(s: &str, cols: usize) -> String {
    if width(s) <= cols {
        return s.to_string();
    }
    let mut out: String = s.chars().take(cols.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Display width in columns (every character used here is one column wide).
pub(crate) fn width(s: &str) -> usize {
    s.chars().count()
}

/// The non-empty parts joined by single spaces.
pub(crate) fn join(parts: &[String]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_has_three_significant_digits_and_a_unit() {
        let cases = [
            (1225.0042, "1.23k it/s"),
            (987.4, "987 it/s"),
            (12.34, "12.3 it/s"),
            (1.0, "1.00 it/s"),
            (999.6, "1.00k it/s"),
            (99.96, "100 it/s"),
            (45_678.0, "45.7k it/s"),
            (2_500_000.0, "2.50M it/s"),
            (0.4, "2.50 s/it"),
            (0.0, "? it/s"),
            (f64::NAN, "? it/s"),
            (f64::INFINITY, "? it/s"),
        ];
        for (x, want) in cases {
            assert_eq!(rate(x), want, "rate({x})");
        }
    }

    #[test]
    fn duration_shows_tenths_under_a_minute() {
        let cases = [
            (0.0, "0.0s"),
            (0.04, "0.0s"),
            (0.36, "0.4s"),
            (12.34, "12.3s"),
            (59.94, "59.9s"),
            (59.96, "1:00"),
            (61.0, "1:01"),
            (3599.0, "59:59"),
            (3725.0, "1:02:05"),
            (90_000.0, "25:00:00"),
        ];
        for (secs, want) in cases {
            assert_eq!(duration(Duration::from_secs_f64(secs)), want, "{secs}");
        }
    }

    fn line(metrics: &str) -> TrainLine {
        TrainLine {
            epoch: 11,
            max_epochs: Some(30),
            pos: 23,
            total: 45,
            elapsed: Duration::from_millis(230),
            rate: 100.0,
            global_step: Some(518),
            metrics: metrics.to_string(),
        }
    }

    #[test]
    fn running_line_shows_epoch_of_max_step_rate_and_time() {
        let l = line("train_loss=0.0123");
        assert_eq!(
            l.running(false),
            "epoch 12/30 51% 23/45 0.2s<0.2s 100 it/s step 518 train_loss=0.0123"
        );
        let bar = l.running(true);
        assert!(bar.starts_with("epoch 12/30 51% ████████████░"), "{bar}");
        assert!(bar.ends_with(" 23/45 0.2s<0.2s 100 it/s step 518 train_loss=0.0123"));
        assert_eq!(
            l.done(),
            "epoch 12/30 done 23/45 in 0.2s 100 it/s step 518 train_loss=0.0123"
        );
    }

    #[test]
    fn lines_fit_in_100_columns_for_realistic_inputs() {
        // The digits job: three metrics at 4 decimals, 45 steps, 30 epochs.
        let metrics = "train_loss=0.0123 val_acc=0.9721 val_loss=0.1054";
        let mut l = line(metrics);
        for (pos, epoch, step, rate) in [(23, 11, 518, 1225.0), (45, 29, 1350, 987.0)] {
            l.pos = pos;
            l.epoch = epoch;
            l.global_step = Some(step);
            l.rate = rate;
            for s in [l.running(true), l.running(false), l.done()] {
                assert!(width(&s) <= MAX_WIDTH, "{} columns: {s}", width(&s));
            }
        }
        // Long inputs: the terminal line is cut, never wider than MAX_WIDTH.
        l.pos = 9_999;
        l.total = 10_000;
        l.epoch = 998;
        l.max_epochs = Some(1000);
        l.global_step = Some(9_999_999);
        l.elapsed = Duration::from_secs(3725);
        l.rate = 2.7;
        let cut = l.running(true);
        assert_eq!(width(&cut), MAX_WIDTH, "{cut}");
        assert!(cut.ends_with('…'));
        assert!(l.running(false).ends_with("val_loss=0.1054"));
        // Short metrics leave room for a bar of the full width.
        let short = line("loss=0.1234");
        assert!(short.running(true).contains(&"█".repeat(12)));
        assert!(width(&short.running(true)) <= MAX_WIDTH);
    }

    #[test]
    fn unknown_total_and_max_epochs() {
        let mut l = line("");
        l.total = 0;
        l.max_epochs = None;
        l.global_step = None;
        assert_eq!(l.running(true), "epoch 12 23 0.2s 100 it/s");
        assert_eq!(l.done(), "epoch 12 done 23 in 0.2s 100 it/s");
    }

    #[test]
    fn bar_fills_proportionally() {
        assert_eq!(draw_bar(0, 4, 4), "░░░░");
        assert_eq!(draw_bar(2, 4, 4), "██░░");
        assert_eq!(draw_bar(9, 4, 4), "████");
    }
}
