//! `relume diff A B [--tolerance T]`: what changed between two checkpoints.
//!
//! Reports components and keys present in only one checkpoint, leaves whose kind
//! (tensor or JSON) changed, and per common tensor: equal, or its dtype/shape
//! change, or the number of differing elements with the max absolute and max
//! relative difference. Float tensors (F32, F64, F16, BF16) are compared as f64;
//! integer and bool tensors exactly. JSON leaves and the config are compared
//! deeply, numbers within the tolerance, as stored (floats kept as bit patterns
//! or decimal strings compare exactly; tables show them decoded, see
//! `crate::decode`). Tables fit the terminal: `COLUMNS`, else the terminal's
//! width, else 100 columns; values are cut at the end, long keys at the start, with `…`. Progress and metrics are shown for
//! context and never count as differences.
//!
//! A float tensor differs when its max |a − b| exceeds the tolerance (default 0:
//! any change; NaN equals NaN at the same position). Integer and bool tensors
//! differ on any change, whatever the tolerance. Exit status 1 when anything
//! differs beyond the tolerance.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{bail, Context};
use relume_ckpt::{DType, Leaf, StateDict, TensorData};
use serde::Serialize;
use serde_json::Value;

use super::inspect::{read, resolve_checkpoint};
use super::{print_json, Status, UsageError};
use crate::decode::{decode_leaf, display};
use crate::table::{ellipsize, ellipsize_start, num, terminal_width, Table};

/// Arguments of `relume diff`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  relume diff runs/a/checkpoints/step=000100 runs/b/checkpoints/step=000100\n  relume diff ckpt-before ckpt-after --tolerance 1e-6 --json\n\nA float tensor counts as changed when max |a - b| > TOLERANCE (default 0: any\nchange). Integer and bool tensors must match exactly. Exit status 1 when\nanything differs beyond the tolerance, 0 when the checkpoints agree.\n\nTables fit COLUMNS, else the terminal width, else 100 columns (values cut with …);\n--json is never cut."
)]
pub struct DiffArgs {
    /// The first checkpoint (or a run directory: its `latest`).
    pub a: PathBuf,
    /// The second checkpoint (or a run directory: its `latest`).
    pub b: PathBuf,
    /// Largest absolute difference of float values (tensors, JSON numbers) still counted as equal.
    #[arg(long, default_value_t = 0.0)]
    pub tolerance: f64,
    /// Also list tensors that are equal.
    #[arg(long)]
    pub all: bool,
    /// Print machine-readable JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Validated options of `relume diff`.
#[derive(Debug, Clone)]
pub struct DiffOpts {
    /// First checkpoint.
    pub a: PathBuf,
    /// Second checkpoint.
    pub b: PathBuf,
    /// Float tolerance (finite, ≥ 0).
    pub tolerance: f64,
    /// List equal tensors too.
    pub all: bool,
    /// JSON output.
    pub json: bool,
}

impl DiffArgs {
    /// Resolves both checkpoints and checks the tolerance.
    ///
    /// # Errors
    /// A [`UsageError`] for a missing path or a negative or non-finite tolerance.
    pub fn validate(self) -> anyhow::Result<DiffOpts> {
        if !self.tolerance.is_finite() || self.tolerance < 0.0 {
            bail!(UsageError(format!(
                "--tolerance {} must be a finite number >= 0",
                self.tolerance
            )));
        }
        Ok(DiffOpts {
            a: resolve_checkpoint(&self.a)?,
            b: resolve_checkpoint(&self.b)?,
            tolerance: self.tolerance,
            all: self.all,
            json: self.json,
        })
    }
}

/// How one common tensor compares.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum TensorDiff {
    /// Same dtype, shape and values (within tolerance for floats when `differing > 0`).
    Equal {
        /// Elements that differ at all (0 when bit-identical).
        differing: usize,
        /// Max absolute difference.
        max_abs: f64,
    },
    /// Values differ beyond the tolerance.
    Changed {
        /// Elements that differ.
        differing: usize,
        /// Total elements.
        numel: usize,
        /// Max |a − b|.
        max_abs: f64,
        /// Max |a − b| / max(|a|, |b|) over elements where that is defined.
        max_rel: f64,
    },
    /// Dtype or shape differ; values not compared.
    Layout {
        /// A's dtype and shape.
        a: String,
        /// B's dtype and shape.
        b: String,
    },
}

impl TensorDiff {
    fn is_difference(&self) -> bool {
        !matches!(self, TensorDiff::Equal { .. })
    }
}

/// How to read one element: as f64 (floats) or exactly as i64 (ints, bool).
/// Elements are decoded one at a time, so a diff of two large tensors needs no
/// extra memory.
#[derive(Clone, Copy)]
enum Decoder {
    Float(fn(&[u8]) -> f64),
    Int(fn(&[u8]) -> i64),
}

fn decoder(d: DType) -> Decoder {
    match d {
        DType::F32 => Decoder::Float(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        DType::F64 => {
            Decoder::Float(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        }
        DType::F16 => Decoder::Float(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()),
        DType::BF16 => Decoder::Float(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()),
        DType::I64 => {
            Decoder::Int(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        }
        DType::I32 => Decoder::Int(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        DType::U8 | DType::Bool => Decoder::Int(|c| i64::from(c[0])),
    }
}

/// Compares two tensors.
pub fn compare_tensors(a: &TensorData, b: &TensorData, tolerance: f64) -> TensorDiff {
    if a.dtype() != b.dtype() || a.shape() != b.shape() {
        return TensorDiff::Layout {
            a: format!("{} {:?}", a.dtype(), a.shape()),
            b: format!("{} {:?}", b.dtype(), b.shape()),
        };
    }
    if a.bytes()[..] == b.bytes()[..] {
        return TensorDiff::Equal {
            differing: 0,
            max_abs: 0.0,
        };
    }
    let (mut differing, mut max_abs, mut max_rel) = (0usize, 0f64, 0f64);
    let size = a.dtype().size_in_bytes();
    let pairs = a
        .bytes()
        .chunks_exact(size)
        .zip(b.bytes().chunks_exact(size));
    let exact = match decoder(a.dtype()) {
        Decoder::Float(dec) => {
            for (p, q) in pairs.map(|(x, y)| (dec(x), dec(y))) {
                if p == q || (p.is_nan() && q.is_nan()) {
                    continue;
                }
                differing += 1;
                let d = (p - q).abs();
                let d = if d.is_nan() { f64::INFINITY } else { d };
                max_abs = max_abs.max(d);
                let den = p.abs().max(q.abs());
                if den > 0.0 && den.is_finite() {
                    max_rel = max_rel.max(d / den);
                } else if d > 0.0 {
                    max_rel = f64::INFINITY;
                }
            }
            false
        }
        Decoder::Int(dec) => {
            for (p, q) in pairs.map(|(x, y)| (dec(x), dec(y))) {
                if p != q {
                    differing += 1;
                    let d = (i128::from(p) - i128::from(q)).unsigned_abs() as f64;
                    max_abs = max_abs.max(d);
                    let den = p.unsigned_abs().max(q.unsigned_abs()) as f64;
                    max_rel = max_rel.max(d / den);
                }
            }
            true
        }
    };
    let beyond = if exact {
        differing > 0
    } else {
        max_abs > tolerance
    };
    if beyond {
        TensorDiff::Changed {
            differing,
            numel: a.numel(),
            max_abs,
            max_rel,
        }
    } else {
        TensorDiff::Equal { differing, max_abs }
    }
}

/// Deep JSON equality; numbers are equal within `tolerance` (integers exactly
/// when both are integers).
pub fn json_close(a: &Value, b: &Value, tolerance: f64) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x == y {
                return true;
            }
            if x.is_f64() || y.is_f64() {
                match (x.as_f64(), y.as_f64()) {
                    (Some(p), Some(q)) => (p - q).abs() <= tolerance,
                    _ => false,
                }
            } else {
                false
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_close(p, q, tolerance))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, p)| y.get(k).is_some_and(|q| json_close(p, q, tolerance)))
        }
        _ => a == b,
    }
}

/// Paths (`a.b.0`) where two JSON values differ beyond `tolerance`, with both sides
/// (`null` for a side that lacks the path).
pub fn json_paths(a: &Value, b: &Value, tolerance: f64, path: &str, out: &mut Vec<ValueDiff>) {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = x.get(k).unwrap_or(&Value::Null);
                let q = y.get(k).unwrap_or(&Value::Null);
                if x.contains_key(k) != y.contains_key(k) {
                    out.push(ValueDiff {
                        key: join(k),
                        a: p.clone(),
                        b: q.clone(),
                    });
                } else {
                    json_paths(p, q, tolerance, &join(k), out);
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                json_paths(p, q, tolerance, &join(&i.to_string()), out);
            }
        }
        _ if json_close(a, b, tolerance) => {}
        _ => out.push(ValueDiff {
            key: path.to_string(),
            a: a.clone(),
            b: b.clone(),
        }),
    }
}

/// One side of a differing value for a table: decoded when it is a state leaf
/// stored in an exact encoding (`component/key`), as [`display`] writes it.
fn decoded(d: &ValueDiff, v: &Value, state: bool) -> String {
    match d.key.split_once('/').filter(|_| state) {
        Some((component, key)) => display(&decode_leaf(component, key, v).value),
        None => display(v),
    }
}

/// A JSON value that differs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ValueDiff {
    /// `component/key` for a leaf, a dotted path for config.
    pub key: String,
    /// A's value.
    pub a: Value,
    /// B's value.
    pub b: Value,
}

/// One common tensor's comparison.
#[derive(Debug, Serialize)]
struct TensorRow {
    key: String,
    dtype: String,
    shape: Vec<usize>,
    #[serde(flatten)]
    diff: TensorDiff,
}

/// The diff (JSON output).
#[derive(Debug, Serialize)]
struct Report {
    a: PathBuf,
    b: PathBuf,
    tolerance: f64,
    only_in_a: Vec<String>,
    only_in_b: Vec<String>,
    kind_changed: Vec<String>,
    tensors: Vec<TensorRow>,
    json: Vec<ValueDiff>,
    config: Vec<ValueDiff>,
    progress: [Value; 2],
    metrics: [Value; 2],
    differences: usize,
}

fn compare(
    a: &BTreeMap<String, StateDict>,
    b: &BTreeMap<String, StateDict>,
    tol: f64,
    r: &mut Report,
) {
    let names: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for name in names {
        let (Some(x), Some(y)) = (a.get(name), b.get(name)) else {
            let side = if a.contains_key(name) {
                &mut r.only_in_a
            } else {
                &mut r.only_in_b
            };
            side.push(format!("{name} (component)"));
            continue;
        };
        let keys: BTreeSet<&str> = x.keys().chain(y.keys()).collect();
        for k in keys {
            let full = format!("{name}/{k}");
            match (x.get(k), y.get(k)) {
                (Some(_), None) => r.only_in_a.push(full),
                (None, Some(_)) => r.only_in_b.push(full),
                (Some(Leaf::Tensor(p)), Some(Leaf::Tensor(q))) => r.tensors.push(TensorRow {
                    key: full,
                    dtype: p.dtype().to_string(),
                    shape: p.shape().to_vec(),
                    diff: compare_tensors(p, q, tol),
                }),
                (Some(Leaf::Json(p)), Some(Leaf::Json(q))) => {
                    if !json_close(p, q, tol) {
                        r.json.push(ValueDiff {
                            key: full,
                            a: p.clone(),
                            b: q.clone(),
                        });
                    }
                }
                (Some(_), Some(_)) => r.kind_changed.push(full),
                (None, None) => {}
            }
        }
    }
}

/// Renders the report to fit `width` columns: the JSON and config tables cut their
/// keys to a third of it and share the rest between the two values.
fn render(r: &Report, all: bool, width: usize) -> String {
    let mut out = format!("A  {}\nB  {}\n", r.a.display(), r.b.display());
    for (label, v) in [("progress", &r.progress), ("metrics", &r.metrics)] {
        if v[0] != v[1] {
            let line = format!("{label}: {} -> {}", display(&v[0]), display(&v[1]));
            out.push_str(&ellipsize(&line, width));
            out.push('\n');
        }
    }
    for (label, list) in [
        ("only in A", &r.only_in_a),
        ("only in B", &r.only_in_b),
        ("tensor in one, JSON in the other", &r.kind_changed),
    ] {
        for k in list {
            out.push_str(&format!("{label}: {k}\n"));
        }
    }
    let shown: Vec<&TensorRow> = r
        .tensors
        .iter()
        .filter(|t| all || t.diff.is_difference())
        .collect();
    if !shown.is_empty() {
        out.push_str(&format!("\ntensors (tolerance {}):\n", num(r.tolerance)));
        let mut t = Table::new([
            "  TENSOR",
            "DTYPE",
            "SHAPE",
            "STATUS",
            "DIFFERING",
            "MAX ABS",
            "MAX REL",
        ])
        .right(&[4, 5, 6])
        .fit(width, 0);
        for row in shown {
            let (status, differing, abs, rel) = match &row.diff {
                TensorDiff::Equal { differing, max_abs } => (
                    if *differing == 0 {
                        "equal"
                    } else {
                        "within tolerance"
                    }
                    .to_string(),
                    differing.to_string(),
                    num(*max_abs),
                    String::new(),
                ),
                TensorDiff::Changed {
                    differing,
                    numel,
                    max_abs,
                    max_rel,
                } => (
                    "changed".to_string(),
                    format!("{differing}/{numel}"),
                    num(*max_abs),
                    num(*max_rel),
                ),
                TensorDiff::Layout { a, b } => (
                    format!("layout {a} -> {b}"),
                    String::new(),
                    String::new(),
                    String::new(),
                ),
            };
            t.row([
                format!("  {}", row.key),
                row.dtype.clone(),
                format!("{:?}", row.shape),
                status,
                differing,
                abs,
                rel,
            ]);
        }
        out.push_str(&t.render());
    }
    let equal = r.tensors.iter().filter(|t| !t.diff.is_difference()).count();
    out.push_str(&format!(
        "{equal} of {} common tensors equal\n",
        r.tensors.len()
    ));
    for (label, list, state) in [("JSON state", &r.json, true), ("config", &r.config, false)] {
        if !list.is_empty() {
            out.push_str(&format!("\n{label} that differs:\n"));
            let mut t = Table::new(["  KEY", "A", "B"]);
            let longest = list.iter().map(|d| d.key.chars().count()).max();
            let key_w = longest.unwrap_or(0).min(width / 3);
            // Two spaces of indent and two separators of two spaces each.
            let value_w = (width.saturating_sub(key_w + 6) / 2).max(8);
            for d in list {
                let (a, b) = (decoded(d, &d.a, state), decoded(d, &d.b, state));
                t.row([
                    format!("  {}", ellipsize_start(&d.key, key_w)),
                    ellipsize(&a, value_w),
                    ellipsize(&b, value_w),
                ]);
            }
            out.push_str(&t.render());
        }
    }
    out.push_str(&if r.differences == 0 {
        "\nno differences\n".to_string()
    } else {
        format!(
            "\n{} difference{}\n",
            r.differences,
            if r.differences == 1 { "" } else { "s" }
        )
    });
    out
}

/// Runs `relume diff`.
///
/// # Errors
/// When either checkpoint cannot be read or is damaged.
pub fn run(opts: &DiffOpts) -> anyhow::Result<Status> {
    let a = read(&opts.a).with_context(|| format!("cannot read A {}", opts.a.display()))?;
    let b = read(&opts.b).with_context(|| format!("cannot read B {}", opts.b.display()))?;
    let field = |h: &Value, k: &str| h.get(k).cloned().unwrap_or(Value::Null);
    let mut r = Report {
        a: opts.a.clone(),
        b: opts.b.clone(),
        tolerance: opts.tolerance,
        only_in_a: Vec::new(),
        only_in_b: Vec::new(),
        kind_changed: Vec::new(),
        tensors: Vec::new(),
        json: Vec::new(),
        config: Vec::new(),
        progress: [field(&a.header, "progress"), field(&b.header, "progress")],
        metrics: [field(&a.header, "metrics"), field(&b.header, "metrics")],
        differences: 0,
    };
    compare(&a.components, &b.components, opts.tolerance, &mut r);
    json_paths(
        &field(&a.header, "config"),
        &field(&b.header, "config"),
        opts.tolerance,
        "",
        &mut r.config,
    );
    r.differences = r.only_in_a.len()
        + r.only_in_b.len()
        + r.kind_changed.len()
        + r.tensors.iter().filter(|t| t.diff.is_difference()).count()
        + r.json.len()
        + r.config.len();
    if opts.json {
        print_json(&r)?;
    } else {
        print!("{}", render(&r, opts.all, terminal_width()));
    }
    Ok(Status::problems_if(r.differences > 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use relume_ckpt::TensorBytes;
    use serde_json::json;

    fn f32s(v: &[f32]) -> TensorData {
        TensorData::from_f32(vec![v.len()], v).unwrap()
    }

    #[test]
    fn float_diff_and_tolerance() {
        let a = f32s(&[1.0, 2.0, f32::NAN]);
        let b = f32s(&[1.0, 2.5, f32::NAN]);
        assert_eq!(
            compare_tensors(&a, &b, 0.0),
            TensorDiff::Changed {
                differing: 1,
                numel: 3,
                max_abs: 0.5,
                max_rel: 0.2
            }
        );
        assert_eq!(
            compare_tensors(&a, &b, 0.5),
            TensorDiff::Equal {
                differing: 1,
                max_abs: 0.5
            }
        );
        assert_eq!(
            compare_tensors(&a, &a, 0.0),
            TensorDiff::Equal {
                differing: 0,
                max_abs: 0.0
            }
        );
    }

    #[test]
    fn ints_are_exact_and_layout_is_checked() {
        let a = TensorData::from_i64(vec![2], &[1, 5]).unwrap();
        let b = TensorData::from_i64(vec![2], &[1, 3]).unwrap();
        assert!(matches!(
            compare_tensors(&a, &b, 100.0),
            TensorDiff::Changed { differing: 1, .. }
        ));
        let c = TensorData::from_i64(vec![1, 2], &[1, 5]).unwrap();
        assert!(matches!(
            compare_tensors(&a, &c, 0.0),
            TensorDiff::Layout { .. }
        ));
    }

    #[test]
    fn half_precision_compares_values() {
        let one = half::bf16::from_f32(1.0).to_le_bytes().to_vec();
        let two = half::bf16::from_f32(2.0).to_le_bytes().to_vec();
        let a = TensorData::new(DType::BF16, vec![1], TensorBytes::owned(one)).unwrap();
        let b = TensorData::new(DType::BF16, vec![1], TensorBytes::owned(two)).unwrap();
        assert!(
            matches!(compare_tensors(&a, &b, 0.0), TensorDiff::Changed { max_abs, .. } if max_abs == 1.0)
        );
    }

    #[test]
    fn json_paths_name_each_change() {
        let mut out = Vec::new();
        json_paths(
            &json!({"lr": 0.1, "opt": [{"m": 0.9}], "seed": 1}),
            &json!({"lr": 0.1 + 1e-12, "opt": [{"m": 0.8}], "extra": true, "seed": 1}),
            1e-9,
            "",
            &mut out,
        );
        let keys: Vec<&str> = out.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(keys, ["extra", "opt.0.m"]);
        assert!(!json_close(&json!(1), &json!(2), 5.0), "integers are exact");
    }
}
