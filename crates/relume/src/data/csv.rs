//! A numeric CSV file as a dataset.
//!
//! The format is deliberately small: one example per line, fields separated by
//! a delimiter (`,` by default), every field a number, one of them an integer
//! class label. Lines starting with `#` are comments (licence headers stay in
//! the file), blank lines are skipped, and an optional header line may be
//! skipped. Every error names the file and the 1-based line.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::dataset::{Dataset, TensorDataset};
use crate::error::{Error, Result};

/// How a CSV file is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsvOptions {
    /// Field separator. Default `','`.
    pub delimiter: char,
    /// Skip the first non-comment line as a header. Default false.
    pub has_header: bool,
    /// Lines whose first non-blank character is this are comments. Default `Some('#')`.
    pub comment: Option<char>,
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions {
            delimiter: ',',
            has_header: false,
            comment: Some('#'),
        }
    }
}

/// Examples read from a numeric CSV file into memory.
///
/// Items are `(features, label)` like [`TensorDataset`]: the features are every
/// column but `label_column`, in file order.
#[derive(Clone, Debug, PartialEq)]
pub struct CsvDataset {
    path: PathBuf,
    data: TensorDataset,
}

impl CsvDataset {
    /// Reads `path` with [`CsvOptions::default`], taking the label from column
    /// `label_column` (0-based).
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read; [`Error::Dataset`] naming the
    /// file and line for a non-numeric field, a wrong column count, a label that
    /// is not a non-negative integer, or a file without data rows.
    pub fn from_path(path: impl AsRef<Path>, label_column: usize) -> Result<Self> {
        Self::from_path_with(path, label_column, &CsvOptions::default())
    }

    /// Reads `path` with explicit options.
    ///
    /// # Errors
    /// As [`from_path`](Self::from_path).
    pub fn from_path_with(
        path: impl AsRef<Path>,
        label_column: usize,
        options: &CsvOptions,
    ) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| Error::Io {
            op: "open dataset",
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_reader(BufReader::new(file), path, label_column, options)
    }

    /// Parses CSV text from `reader`; `path` is only used to name the source in
    /// errors.
    ///
    /// # Errors
    /// As [`from_path`](Self::from_path).
    pub fn from_reader(
        reader: impl BufRead,
        path: impl Into<PathBuf>,
        label_column: usize,
        options: &CsvOptions,
    ) -> Result<Self> {
        let path = path.into();
        let err = |line: usize, reason: String| Error::Dataset {
            path: path.clone(),
            line,
            reason,
        };
        let mut features = Vec::new();
        let mut labels = Vec::new();
        // (column count, line that set it)
        let mut width: Option<(usize, usize)> = None;
        let mut header_pending = options.has_header;
        for (i, line) in reader.lines().enumerate() {
            let lineno = i + 1;
            let line = line.map_err(|source| Error::Io {
                op: "read dataset",
                path: path.clone(),
                source,
            })?;
            let text = line.trim();
            if text.is_empty() || options.comment.is_some_and(|c| text.starts_with(c)) {
                continue;
            }
            if header_pending {
                header_pending = false;
                continue;
            }
            let fields: Vec<&str> = text.split(options.delimiter).map(str::trim).collect();
            match width {
                None => {
                    if label_column >= fields.len() {
                        return Err(err(
                            lineno,
                            format!(
                                "label column {label_column} does not exist: the row has {} columns",
                                fields.len()
                            ),
                        ));
                    }
                    if fields.len() < 2 {
                        return Err(err(
                            lineno,
                            "a row needs a label and at least one feature column".into(),
                        ));
                    }
                    width = Some((fields.len(), lineno));
                }
                Some((w, first)) if w != fields.len() => {
                    return Err(err(
                        lineno,
                        format!(
                            "expected {w} columns (as on line {first}), got {}",
                            fields.len()
                        ),
                    ));
                }
                Some(_) => {}
            }
            for (col, field) in fields.iter().enumerate() {
                if col == label_column {
                    labels.push(parse_label(field).ok_or_else(|| {
                        err(
                            lineno,
                            format!("column {col}: label {field:?} is not a non-negative integer"),
                        )
                    })?);
                } else {
                    let v: f32 = field.parse().map_err(|_| {
                        err(lineno, format!("column {col}: {field:?} is not a number"))
                    })?;
                    if !v.is_finite() {
                        return Err(err(
                            lineno,
                            format!("column {col}: {field:?} is not a finite number"),
                        ));
                    }
                    features.push(v);
                }
            }
        }
        let Some((w, _)) = width else {
            return Err(err(0, "no data rows (only comments or blank lines)".into()));
        };
        let data = TensorDataset::new(features, w - 1, labels)?;
        Ok(CsvDataset { path, data })
    }

    /// The file the examples came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The examples, in memory.
    pub fn data(&self) -> &TensorDataset {
        &self.data
    }

    /// Features per example.
    pub fn dim(&self) -> usize {
        self.data.dim()
    }

    /// The examples as a [`TensorDataset`] (to scale, split, or batch them).
    pub fn into_tensor_dataset(self) -> TensorDataset {
        self.data
    }
}

/// A label: a non-negative integer, also written as `3.0`.
fn parse_label(field: &str) -> Option<u32> {
    if let Ok(v) = field.parse::<u32>() {
        return Some(v);
    }
    let f: f64 = field.parse().ok()?;
    let ok = f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f <= f64::from(u32::MAX);
    ok.then_some(f as u32)
}

impl Dataset for CsvDataset {
    type Item = (Vec<f32>, u32);

    fn len(&self) -> usize {
        self.data.len()
    }

    fn get(&self, index: usize) -> Result<Self::Item> {
        self.data.get(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, label: usize, opts: &CsvOptions) -> Result<CsvDataset> {
        CsvDataset::from_reader(text.as_bytes(), "mem.csv", label, opts)
    }

    #[test]
    fn skips_comments_blanks_and_header() {
        let opts = CsvOptions {
            has_header: true,
            ..CsvOptions::default()
        };
        let d = parse("# licence\n\na,b,label\n1, 2 ,3\n4,5,0.0\n", 2, &opts).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d.dim(), 2);
        assert_eq!(d.get(0).unwrap(), (vec![1.0, 2.0], 3));
        assert_eq!(d.get(1).unwrap(), (vec![4.0, 5.0], 0));
    }

    #[test]
    fn label_column_out_of_range_names_the_line() {
        let err = parse("# c\n1,2\n", 5, &CsvOptions::default()).unwrap_err();
        assert!(matches!(err, Error::Dataset { line: 2, .. }), "{err}");
    }

    #[test]
    fn bad_label_and_non_finite_values_are_errors() {
        let err = parse("1,2\n-1,2\n", 0, &CsvOptions::default()).unwrap_err();
        assert!(
            matches!(err, Error::Dataset { line: 2, ref reason, .. } if reason.contains("label"))
        );
        let err = parse("1,2\n1,inf\n", 0, &CsvOptions::default()).unwrap_err();
        assert!(
            matches!(err, Error::Dataset { line: 2, ref reason, .. } if reason.contains("finite"))
        );
    }

    #[test]
    fn empty_file_is_an_error() {
        let err = parse("# only a comment\n", 0, &CsvOptions::default()).unwrap_err();
        assert!(matches!(err, Error::Dataset { line: 0, .. }));
    }

    #[test]
    fn missing_file_is_io_naming_the_path() {
        let err = CsvDataset::from_path("/nonexistent/relume/x.csv", 0).unwrap_err();
        assert!(matches!(err, Error::Io { ref path, .. } if path.ends_with("x.csv")));
    }
}
