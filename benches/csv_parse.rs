//! Parsing the digits CSV: relume's own numeric reader (`relume::data::CsvDataset`)
//! against the `csv` crate doing the same job (comments, a label column, every field
//! a number, into the same `TensorDataset`), measured side by side in one run.
//!
//! `cargo bench -p relume --bench csv_parse` (`BENCH_COPIES` repeats the file's rows,
//! default 50, so a pass takes long enough to time).

use std::time::Instant;

use relume::data::{CsvDataset, CsvOptions, Dataset, TensorDataset};

const DIGITS: &str = include_str!("../examples/data/digits.csv");

/// The `csv` crate reading the same format as `CsvDataset::from_reader`.
fn with_csv_crate(text: &[u8]) -> TensorDataset {
    let mut rd = csv::ReaderBuilder::new()
        .has_headers(false)
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .from_reader(text);
    let (mut features, mut labels, mut dim) = (Vec::new(), Vec::new(), 0);
    for rec in rd.records() {
        let rec = rec.expect("a valid record");
        dim = rec.len() - 1;
        labels.push(rec[0].parse::<u32>().expect("an integer label"));
        for f in rec.iter().skip(1) {
            features.push(f.parse::<f32>().expect("a number"));
        }
    }
    TensorDataset::new(features, dim, labels).expect("a dataset")
}

fn best_of<T>(rounds: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..rounds {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(v);
    }
    (best, out.expect("at least one round"))
}

fn main() {
    let copies: usize = std::env::var("BENCH_COPIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let rows: String = DIGITS
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut text = String::from("# header comment\n");
    for _ in 0..copies {
        text.push_str(&rows);
    }
    let bytes = text.as_bytes();
    let opts = CsvOptions::default();
    let (t_own, own) = best_of(7, || {
        CsvDataset::from_reader(bytes, "digits.csv", 0, &opts)
            .expect("parses")
            .into_tensor_dataset()
    });
    let (t_csv, theirs) = best_of(7, || with_csv_crate(bytes));
    assert_eq!(own.len(), theirs.len(), "both read every row");
    assert!(own == theirs, "both read the same values");
    let mb = bytes.len() as f64 / 1e6;
    println!(
        "csv_parse: {} rows, {:.1} MB: relume CsvDataset {:.1} MB/s, csv crate {:.1} MB/s; ratio relume/csv = {:.2}x",
        own.len(),
        mb,
        mb / t_own,
        mb / t_csv,
        t_csv / t_own
    );
}
