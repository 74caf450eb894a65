//! The safetensors encoding of a component's tensors.
//!
//! relume writes the format itself instead of calling `safetensors::serialize`, so the
//! tensor bytes go from the live buffers to the file without an intermediate copy and
//! are hashed while they are written. The layout is standard safetensors:
//!
//! ```text
//! u64 LE header length N | N bytes of JSON header, space-padded to 8 | tensor bytes
//! header: {"<key>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}
//! ```
//!
//! Tensors are laid out contiguously in key order; offsets are relative to the end
//! of the header. Every safetensors reader (Python, Rust, C++) can read the file, and
//! [`parse_header`] rejects what they reject: gaps, overlaps and trailing bytes.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::state::TensorData;

/// Largest safetensors header a reader accepts (bytes).
pub const MAX_HEADER_BYTES: u64 = 100 << 20;
/// Largest number of tensors in one safetensors file.
pub const MAX_TENSORS: usize = 1 << 20;

/// One tensor as described by a safetensors header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    /// Full key.
    pub key: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the first byte in the file.
    pub start: u64,
    /// Absolute byte offset one past the last byte in the file.
    pub end: u64,
}

/// Encodes the header (length prefix, JSON, padding) for tensors in the given order.
///
/// Returns the header bytes; tensor `i` then occupies the bytes after it, in order.
pub fn encode_header(tensors: &[(&str, &TensorData)]) -> Vec<u8> {
    let mut map = Map::new();
    let mut offset = 0u64;
    for (key, t) in tensors {
        let len = t.bytes().len() as u64;
        map.insert(
            (*key).to_string(),
            json!({"dtype": t.dtype().as_str(), "shape": t.shape(), "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    map.insert("__metadata__".into(), json!({"format": "relume"}));
    // Serializing a Map of plain values cannot fail.
    let mut body = serde_json::to_vec(&Value::Object(map)).unwrap_or_default();
    while (body.len() + 8) % 8 != 0 {
        body.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Parses and bounds-checks the header of a safetensors file given its first bytes.
///
/// `file_len` is the real length of the file; every tensor must lie inside it and
/// have exactly dtype × shape bytes. The layout rules are those of safetensors'
/// `Metadata::validate`: sorted by offsets, the first tensor starts at data offset 0,
/// each starts exactly where the one before it ends, and the last one ends exactly at
/// the end of the file. Entries are returned in offset order.
///
/// # Errors
/// [`Error::LimitExceeded`] for an oversized header or tensor count,
/// [`Error::SafetensorsHeader`] for malformed JSON or offsets,
/// [`Error::TensorFileLength`] when a tensor's byte range disagrees with dtype × shape,
/// [`Error::TensorGap`] when bytes between two tensors (or before the first) belong
/// to no tensor, [`Error::TensorOverlap`] when two tensors share bytes,
/// [`Error::FileSize`] (naming the tensor) when a tensor lies past the end of the file,
/// [`Error::TrailingBytes`] when bytes follow the last tensor.
pub fn parse_header(path: &Path, bytes: &[u8], file_len: u64) -> Result<Vec<TensorEntry>> {
    let bad = |reason: String| Error::SafetensorsHeader {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < 8 {
        return Err(bad(format!(
            "file is {} bytes, shorter than the 8-byte length prefix",
            bytes.len()
        )));
    }
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(n8);
    if n > MAX_HEADER_BYTES {
        return Err(Error::LimitExceeded {
            path: path.to_path_buf(),
            what: "safetensors header bytes",
            got: n,
            limit: MAX_HEADER_BYTES,
        });
    }
    let data_start = 8 + n;
    if data_start > bytes.len() as u64 {
        return Err(bad(format!(
            "header of {n} bytes runs past the end of the {}-byte file",
            bytes.len()
        )));
    }
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..data_start as usize])
        .map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    if header.len() > MAX_TENSORS + 1 {
        return Err(Error::LimitExceeded {
            path: path.to_path_buf(),
            what: "tensor count",
            got: header.len() as u64,
            limit: MAX_TENSORS as u64,
        });
    }
    let mut out = Vec::with_capacity(header.len());
    for (key, v) in header {
        if key == "__metadata__" {
            continue;
        }
        let dtype_name = v.get("dtype").and_then(Value::as_str).unwrap_or("");
        let dtype = DType::parse(dtype_name)
            .ok_or_else(|| bad(format!("tensor {key:?}: unsupported dtype {dtype_name:?}")))?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad(format!("tensor {key:?}: missing or invalid shape")))?;
        let offs: [u64; 2] = v
            .get("data_offsets")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad(format!("tensor {key:?}: missing or invalid data_offsets")))?;
        if offs[0] > offs[1] {
            return Err(bad(format!(
                "tensor {key:?}: data_offsets {offs:?} are reversed"
            )));
        }
        let got = offs[1] - offs[0];
        let expected = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .and_then(|n| n.checked_mul(dtype.size_in_bytes() as u64));
        if expected != Some(got) {
            return Err(Error::TensorFileLength {
                path: path.to_path_buf(),
                tensor: key,
                dtype,
                shape,
                expected: expected.unwrap_or(u64::MAX),
                got,
            });
        }
        let (start, end) = match (
            data_start.checked_add(offs[0]),
            data_start.checked_add(offs[1]),
        ) {
            (Some(s), Some(e)) => (s, e),
            _ => return Err(bad(format!("tensor {key:?}: data_offsets overflow"))),
        };
        out.push(TensorEntry {
            key,
            dtype,
            shape,
            start,
            end,
        });
    }
    out.sort_by_key(|e| (e.start, e.end));
    let data_end = check_contiguous(path, &out, data_start)?;
    if let Some(cut) = out.iter().find(|e| e.end > file_len) {
        return Err(Error::FileSize {
            path: path.to_path_buf(),
            tensor: Some(cut.key.clone()),
            expected: data_end,
            got: file_len,
        });
    }
    if data_end < file_len {
        return Err(Error::TrailingBytes {
            path: path.to_path_buf(),
            last_tensor: out.last().map(|e| e.key.clone()),
            data_end,
            file_len,
        });
    }
    Ok(out)
}

/// Checks that `entries` (sorted by offsets) tile the data region like safetensors'
/// `Metadata::validate` requires: the first starts at data offset 0 and each starts
/// exactly where the one before it ends. Returns the absolute end of the data.
fn check_contiguous(path: &Path, entries: &[TensorEntry], data_start: u64) -> Result<u64> {
    let mut cursor = data_start;
    let mut previous: Option<&TensorEntry> = None;
    for e in entries {
        if e.start > cursor {
            return Err(Error::TensorGap {
                path: path.to_path_buf(),
                tensor: e.key.clone(),
                previous: previous.map(|p| p.key.clone()),
                expected: cursor - data_start,
                got: e.start - data_start,
            });
        }
        if e.start < cursor {
            return Err(Error::TensorOverlap {
                path: path.to_path_buf(),
                tensor: e.key.clone(),
                // `cursor` only moves past `data_start` after a previous entry.
                previous: previous.map(|p| p.key.clone()).unwrap_or_default(),
                expected: cursor - data_start,
                got: e.start - data_start,
            });
        }
        cursor = e.end;
        previous = Some(e);
    }
    Ok(cursor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_is_aligned() {
        let a = TensorData::from_f32(vec![2, 2], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        let b = TensorData::from_i64(vec![1], &[7]).unwrap();
        let h = encode_header(&[("a", &a), ("b", &b)]);
        assert_eq!(h.len() % 8, 0);
        let total = h.len() as u64 + 24;
        let entries = parse_header(Path::new("x"), &h, total).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].key, "a");
        assert_eq!(entries[1].start, h.len() as u64 + 16);
        assert_eq!(entries[1].end, total);
    }

    #[test]
    fn header_larger_than_bound_is_rejected() {
        let mut bytes = (MAX_HEADER_BYTES + 1).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let err = parse_header(Path::new("m.safetensors"), &bytes, 10).unwrap_err();
        assert!(matches!(
            err,
            Error::LimitExceeded {
                what: "safetensors header bytes",
                ..
            }
        ));
        assert!(err.to_string().contains("m.safetensors"));
    }

    /// A file with header `body` (a JSON object) followed by `data` zero bytes.
    fn file(body: &str, data: usize) -> Vec<u8> {
        let mut bytes = (body.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(body.as_bytes());
        bytes.resize(bytes.len() + data, 0);
        bytes
    }

    fn parse(bytes: &[u8]) -> Result<Vec<TensorEntry>> {
        parse_header(Path::new("m.safetensors"), bytes, bytes.len() as u64)
    }

    #[test]
    fn gap_between_tensors_is_rejected() {
        let bytes = file(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
            12,
        );
        let err = parse(&bytes).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::TensorGap { tensor, previous: Some(p), expected: 4, got: 8, .. }
                    if tensor == "b" && p == "a"
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("m.safetensors") && msg.contains("\"b\"") && msg.contains("re-save"));
    }

    #[test]
    fn first_tensor_not_at_offset_zero_is_a_gap() {
        let bytes = file(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
        );
        let err = parse(&bytes).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::TensorGap { tensor, previous: None, expected: 0, got: 4, .. } if tensor == "a"
            ),
            "{err}"
        );
    }

    #[test]
    fn overlapping_tensors_are_rejected() {
        let bytes = file(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
        );
        let err = parse(&bytes).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::TensorOverlap { tensor, previous, expected: 8, got: 4, .. }
                    if tensor == "b" && previous == "a"
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("\"a\"") && msg.contains("\"b\"") && msg.contains("re-save"));
    }

    #[test]
    fn identical_offsets_overlap() {
        let bytes = file(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            4,
        );
        let err = parse(&bytes).unwrap_err();
        assert!(
            matches!(
                err,
                Error::TensorOverlap {
                    got: 0,
                    expected: 4,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let body = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let bytes = file(body, 7);
        let data_end = 8 + body.len() as u64 + 4;
        let err = parse(&bytes).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::TrailingBytes { last_tensor: Some(t), data_end: d, file_len, .. }
                    if t == "a" && *d == data_end && *file_len == data_end + 3
            ),
            "{err}"
        );
        assert!(err.to_string().contains("3 bytes follow"), "{err}");
        let err = parse(&file("{}", 1)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::TrailingBytes {
                    last_tensor: None,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn truncated_data_is_still_a_file_size_error() {
        let bytes = file(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            2,
        );
        let err = parse(&bytes).unwrap_err();
        assert!(
            matches!(&err, Error::FileSize { tensor: Some(t), .. } if t == "a"),
            "{err}"
        );
    }

    #[test]
    fn empty_tensors_at_boundaries_are_contiguous() {
        let bytes = file(
            r#"{"e0":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"e1":{"dtype":"U8","shape":[0,3],"data_offsets":[4,4]}}"#,
            4,
        );
        let keys: Vec<String> = parse(&bytes).unwrap().into_iter().map(|e| e.key).collect();
        assert_eq!(keys, ["e0", "a", "e1"]);
        assert!(parse(&file("{}", 0)).unwrap().is_empty());
    }

    #[test]
    fn byte_length_disagreeing_with_shape_is_rejected() {
        let body = br#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        let mut bytes = (body.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(body);
        bytes.extend_from_slice(&[0; 8]);
        let err = parse_header(Path::new("m.safetensors"), &bytes, bytes.len() as u64).unwrap_err();
        match &err {
            Error::TensorFileLength {
                tensor,
                expected,
                got,
                ..
            } => {
                assert_eq!((tensor.as_str(), *expected, *got), ("w", 12, 8));
            }
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("\"w\""));
    }
}
