//! Aligned plain-text tables for people (the `--json` output is for programs).
//!
//! Columns are separated by two spaces; numbers are right-aligned, text
//! left-aligned; trailing spaces are trimmed. Widths count characters, which is
//! exact for the ASCII names, numbers and units the commands print.

/// How a column's cells are aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Pad on the right.
    Left,
    /// Pad on the left (numbers).
    Right,
}

/// A table with a header row.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
    /// `(width, column)`: cut `column`'s cells so lines fit `width`.
    fit: Option<(usize, usize)>,
}

impl Table {
    /// A table with these column headers, all left-aligned.
    pub fn new<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Self {
        let headers: Vec<String> = headers.into_iter().map(Into::into).collect();
        let align = vec![Align::Left; headers.len()];
        Table {
            headers,
            align,
            rows: Vec::new(),
            fit: None,
        }
    }

    /// Fits lines into `width` characters by cutting the start of the cells of
    /// `column` after their indent (with `…`, never narrower than its header).
    /// Default: no limit.
    pub fn fit(mut self, width: usize, column: usize) -> Self {
        self.fit = Some((width, column));
        self
    }

    /// Right-aligns the columns at `columns` (indices past the end are ignored).
    pub fn right(mut self, columns: &[usize]) -> Self {
        for &c in columns {
            if let Some(a) = self.align.get_mut(c) {
                *a = Align::Right;
            }
        }
        self
    }

    /// Appends a row; missing cells are empty, extra cells are dropped.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        let mut r: Vec<String> = cells.into_iter().map(Into::into).collect();
        r.resize(self.headers.len(), String::new());
        self.rows.push(r);
    }

    /// True when no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Renders the table, one line per row, each ending in `\n`.
    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(width(c));
            }
        }
        let cut = match self.fit {
            Some((max, col)) if col < widths.len() => {
                let total = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
                let floor = width(&self.headers[col]);
                let w = widths[col]
                    .saturating_sub(total.saturating_sub(max))
                    .max(floor);
                widths[col] = w;
                Some((col, w))
            }
            _ => None,
        };
        let mut out = String::new();
        for r in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let cell;
                let c = match cut {
                    Some((col, w)) if col == i && width(c) > w => {
                        // Keep an indent; cut what follows it.
                        let lead = c.len() - c.trim_start_matches(' ').len();
                        cell = format!(
                            "{}{}",
                            &c[..lead],
                            ellipsize_start(&c[lead..], w.saturating_sub(lead))
                        );
                        &cell
                    }
                    _ => c,
                };
                let pad = " ".repeat(widths[i] - width(c));
                match self.align[i] {
                    Align::Left => {
                        line.push_str(c);
                        line.push_str(&pad);
                    }
                    Align::Right => {
                        line.push_str(&pad);
                        line.push_str(c);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Formats a byte count with a binary unit: `512 B`, `1.5 KiB`, `3.0 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut x = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if x < 1024.0 {
            break;
        }
        x /= 1024.0;
        unit = u;
    }
    format!("{x:.1} {unit}")
}

/// Formats a float compactly: integers without decimals, others with up to six
/// significant digits, tiny or huge values in exponent form.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    if x == x.trunc() && x.abs() < 1e15 {
        return format!("{x:.0}");
    }
    let a = x.abs();
    if !(1e-4..1e6).contains(&a) {
        format!("{x:.3e}")
    } else {
        let s = format!("{x:.6}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    }
}

/// Formats one column of numbers so that, right-aligned, they line up on the
/// decimal point: every value gets the same number of decimals. A column whose
/// non-zero magnitudes all lie in `[1e-3, 1e6)` is fixed-point, with enough
/// decimals for four significant digits of its smallest magnitude (one to six;
/// none when every value is an integer); any other column is in exponent form
/// with three decimals and a two-digit exponent (`3.244e-06`). Missing values
/// are `-`; non-finite ones keep their names (`NaN`, `inf`).
pub fn num_column(values: &[Option<f64>]) -> Vec<String> {
    let finite: Vec<f64> = values
        .iter()
        .flatten()
        .copied()
        .filter(|x| x.is_finite())
        .collect();
    let smallest = finite
        .iter()
        .map(|x| x.abs())
        .filter(|a| *a > 0.0)
        .fold(f64::INFINITY, f64::min);
    let largest = finite.iter().map(|x| x.abs()).fold(0.0, f64::max);
    let exponent = smallest.is_finite() && (smallest < 1e-3 || largest >= 1e6);
    let decimals = if finite.iter().all(|x| x.fract() == 0.0) {
        0
    } else {
        // 3 - floor(log10(smallest)), clamped: 0.13 -> 4, 1.7 -> 3, 0.0012 -> 6.
        (3 - smallest.log10().floor() as i64).clamp(1, 6) as usize
    };
    values
        .iter()
        .map(|v| match v {
            None => "-".to_string(),
            Some(x) if !x.is_finite() => x.to_string(),
            Some(x) if exponent => exp_form(*x),
            Some(x) => format!("{x:.decimals$}"),
        })
        .collect()
}

/// `x` as `d.ddde±XX`: three decimals, an exponent of at least two digits.
fn exp_form(x: f64) -> String {
    let s = format!("{x:.3e}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

/// Width used when stdout is not a terminal and `COLUMNS` is unset.
pub const DEFAULT_WIDTH: usize = 100;

/// The width output should fit: `COLUMNS` when it is a positive number, else the
/// width of the terminal on stdout, else [`DEFAULT_WIDTH`].
pub fn terminal_width() -> usize {
    if let Some(n) = std::env::var("COLUMNS")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        return n;
    }
    console::Term::stdout()
        .size_checked()
        .map_or(DEFAULT_WIDTH, |(_, cols)| usize::from(cols))
}

/// Shortens `s` to at most `max` characters, ending in `…` when cut.
pub fn ellipsize(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Shortens `s` to at most `max` characters, keeping its end and starting with
/// `…` when cut (for keys, whose last segment names the leaf).
pub fn ellipsize_start(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max {
        return s.to_string();
    }
    let keep = max.saturating_sub(1);
    let mut out = String::from("…");
    out.extend(s.chars().skip(n - keep));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(["NAME", "SIZE"]).right(&[1]);
        t.row(["a", "1 B"]);
        t.row(["longer", "10.0 KiB"]);
        assert_eq!(
            t.render(),
            "NAME        SIZE\na            1 B\nlonger  10.0 KiB\n"
        );
    }

    #[test]
    fn fits_a_width_by_cutting_one_column() {
        let mut t = Table::new(["KEY", "N"]).right(&[1]).fit(10, 0);
        t.row(["a/very/long/key", "12"]);
        assert_eq!(t.render(), "KEY      N\n…g/key  12\n");
    }

    #[test]
    fn pads_short_rows_and_trims() {
        let mut t = Table::new(["A", "B"]);
        t.row(["x"]);
        assert_eq!(t.render(), "A  B\nx\n");
    }

    #[test]
    fn bytes_and_numbers() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(num(3.0), "3");
        assert_eq!(num(0.25), "0.25");
        assert_eq!(num(1.0 / 3.0), "0.333333");
        assert_eq!(num(1e-7), "1.000e-7");
        assert_eq!(ellipsize("abcdef", 4), "abc…");
        assert_eq!(ellipsize("abc", 4), "abc");
        assert_eq!(ellipsize_start("a/b/leaf", 5), "…leaf");
    }

    #[test]
    fn columns_share_their_decimals() {
        let col = num_column(&[Some(1.7188), Some(0.1313), None, Some(0.98)]);
        assert_eq!(col, ["1.7188", "0.1313", "-", "0.9800"]);
        let col = num_column(&[Some(3.244e-6), Some(1.546e-5), Some(1.2e-12)]);
        assert_eq!(col, ["3.244e-06", "1.546e-05", "1.200e-12"]);
        assert_eq!(num_column(&[Some(3.0), Some(12.0)]), ["3", "12"]);
        assert_eq!(num_column(&[Some(f64::NAN), Some(0.5)]), ["NaN", "0.5000"]);
    }
}
