//! The state tree: named tensor and JSON leaves.
//!
//! A [`StateDict`] is a tree flattened into a sorted map. Keys are paths whose
//! segments are joined with `/` (for example `0/encoder.layer1.weight/exp_avg`);
//! a parameter name keeps its dots. Iteration is always in key order, so nothing
//! in a checkpoint depends on `HashMap` order.

use std::collections::BTreeMap;

pub use crate::bytes::TensorBytes;
use crate::dtype::DType;
use crate::error::Error;

/// Segment separator of state keys.
pub const KEY_SEPARATOR: char = '/';

/// A tensor leaf: dtype, shape and little-endian row-major bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    dtype: DType,
    shape: Vec<usize>,
    bytes: TensorBytes,
}

impl TensorData {
    /// Builds a tensor leaf, checking that the byte length equals dtype × shape.
    ///
    /// # Errors
    /// [`Error::TensorByteLength`] when the lengths disagree or the element count overflows.
    pub fn new(dtype: DType, shape: Vec<usize>, bytes: TensorBytes) -> Result<Self, Error> {
        let expected = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.size_in_bytes()));
        if expected != Some(bytes.len()) {
            return Err(Error::TensorByteLength {
                tensor: String::new(),
                dtype,
                shape,
                expected: expected.unwrap_or(usize::MAX),
                got: bytes.len(),
            });
        }
        Ok(TensorData {
            dtype,
            shape,
            bytes,
        })
    }

    /// The bytes, giving up the dtype and shape.
    pub fn into_bytes(self) -> TensorBytes {
        self.bytes
    }

    /// A f32 tensor from values.
    ///
    /// # Errors
    /// [`Error::TensorByteLength`] when `values.len()` is not the product of `shape`.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Result<Self, Error> {
        TensorData::new(DType::F32, shape, TensorBytes::owned(le_bytes(values)))
    }

    /// A f64 tensor from values.
    ///
    /// # Errors
    /// [`Error::TensorByteLength`] when `values.len()` is not the product of `shape`.
    pub fn from_f64(shape: Vec<usize>, values: &[f64]) -> Result<Self, Error> {
        TensorData::new(DType::F64, shape, TensorBytes::owned(le_bytes(values)))
    }

    /// A i64 tensor from values.
    ///
    /// # Errors
    /// [`Error::TensorByteLength`] when `values.len()` is not the product of `shape`.
    pub fn from_i64(shape: Vec<usize>, values: &[i64]) -> Result<Self, Error> {
        TensorData::new(DType::I64, shape, TensorBytes::owned(le_bytes(values)))
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape (empty for a scalar).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &TensorBytes {
        &self.bytes
    }

    /// Copies the values out as f32.
    ///
    /// # Errors
    /// [`Error::DTypeMismatch`] unless the dtype is F32.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, Error> {
        self.expect_dtype(DType::F32)?;
        Ok(self
            .bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Copies the values out as f64.
    ///
    /// # Errors
    /// [`Error::DTypeMismatch`] unless the dtype is F64.
    pub fn to_f64_vec(&self) -> Result<Vec<f64>, Error> {
        self.expect_dtype(DType::F64)?;
        Ok(self
            .bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect())
    }

    /// Copies the values out as i64.
    ///
    /// # Errors
    /// [`Error::DTypeMismatch`] unless the dtype is I64.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>, Error> {
        self.expect_dtype(DType::I64)?;
        Ok(self
            .bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect())
    }

    fn expect_dtype(&self, want: DType) -> Result<(), Error> {
        if self.dtype == want {
            Ok(())
        } else {
            Err(Error::DTypeMismatch {
                key: String::new(),
                expected: want,
                got: self.dtype,
            })
        }
    }
}

/// The little-endian bytes of `values`: one `memcpy` on little-endian hosts.
fn le_bytes<T: bytemuck::Pod + ToLeBytes>(values: &[T]) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice::<T, u8>(values).to_vec()
    } else {
        values.iter().flat_map(|v| v.to_le_vec()).collect()
    }
}

/// Element types that can be written little-endian.
trait ToLeBytes {
    fn to_le_vec(&self) -> Vec<u8>;
}

impl ToLeBytes for f32 {
    fn to_le_vec(&self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
}

impl ToLeBytes for f64 {
    fn to_le_vec(&self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
}

impl ToLeBytes for i64 {
    fn to_le_vec(&self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
}

/// One leaf of a state tree.
#[derive(Debug, Clone, PartialEq)]
pub enum Leaf {
    /// A tensor, written to a safetensors file.
    Tensor(TensorData),
    /// A JSON value (scalars, strings, small structures), written to `state.json`.
    Json(serde_json::Value),
}

/// A tree of named leaves, stored flat and sorted by key.
///
/// # Example
/// ```
/// use relume_ckpt::{StateDict, TensorData};
/// let mut sd = StateDict::new();
/// sd.insert_tensor("weight", TensorData::from_f32(vec![2], &[1.0, 2.0]).unwrap());
/// sd.insert_json("step", serde_json::json!(3));
/// let mut root = StateDict::new();
/// root.insert_prefixed("model", sd);
/// assert!(root.get_tensor("model/weight").is_some());
/// assert_eq!(root.sub("model").len(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateDict {
    entries: BTreeMap<String, Leaf>,
}

impl StateDict {
    /// An empty state dict.
    pub fn new() -> Self {
        StateDict::default()
    }

    /// Inserts a leaf, replacing any previous one with the same key.
    pub fn insert(&mut self, key: impl Into<String>, leaf: Leaf) {
        self.entries.insert(key.into(), leaf);
    }

    /// Inserts a tensor leaf.
    pub fn insert_tensor(&mut self, key: impl Into<String>, tensor: TensorData) {
        self.insert(key, Leaf::Tensor(tensor));
    }

    /// Inserts a JSON leaf.
    pub fn insert_json(&mut self, key: impl Into<String>, value: serde_json::Value) {
        self.insert(key, Leaf::Json(value));
    }

    /// Inserts every leaf of `child` under `prefix/`.
    pub fn insert_prefixed(&mut self, prefix: &str, child: StateDict) {
        for (k, v) in child.entries {
            self.entries.insert(join_key(prefix, &k), v);
        }
    }

    /// The leaves under `prefix/`, with the prefix stripped.
    pub fn sub(&self, prefix: &str) -> StateDict {
        let start = format!("{prefix}{KEY_SEPARATOR}");
        let entries = self
            .entries
            .range(start.clone()..)
            .take_while(|(k, _)| k.starts_with(&start))
            .map(|(k, v)| (k[start.len()..].to_string(), v.clone()))
            .collect();
        StateDict { entries }
    }

    /// The distinct first segments of all keys, in order.
    pub fn top_level_keys(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for k in self.entries.keys() {
            let head = k.split(KEY_SEPARATOR).next().unwrap_or(k).to_string();
            if out.last() != Some(&head) {
                out.push(head);
            }
        }
        out
    }

    /// The leaf at `key`.
    pub fn get(&self, key: &str) -> Option<&Leaf> {
        self.entries.get(key)
    }

    /// The tensor at `key`, if that key holds a tensor.
    pub fn get_tensor(&self, key: &str) -> Option<&TensorData> {
        match self.entries.get(key) {
            Some(Leaf::Tensor(t)) => Some(t),
            _ => None,
        }
    }

    /// The JSON value at `key`, if that key holds JSON.
    pub fn get_json(&self, key: &str) -> Option<&serde_json::Value> {
        match self.entries.get(key) {
            Some(Leaf::Json(v)) => Some(v),
            _ => None,
        }
    }

    /// The tensor at `key`, or an error naming the key.
    ///
    /// # Errors
    /// [`Error::MissingKey`] when absent, [`Error::LeafKind`] when it is JSON.
    pub fn require_tensor(&self, key: &str) -> Result<&TensorData, Error> {
        match self.entries.get(key) {
            Some(Leaf::Tensor(t)) => Ok(t),
            Some(Leaf::Json(_)) => Err(Error::LeafKind {
                key: key.to_string(),
                expected: "tensor",
            }),
            None => Err(Error::MissingKey {
                key: key.to_string(),
            }),
        }
    }

    /// The JSON value at `key`, or an error naming the key.
    ///
    /// # Errors
    /// [`Error::MissingKey`] when absent, [`Error::LeafKind`] when it is a tensor.
    pub fn require_json(&self, key: &str) -> Result<&serde_json::Value, Error> {
        match self.entries.get(key) {
            Some(Leaf::Json(v)) => Ok(v),
            Some(Leaf::Tensor(_)) => Err(Error::LeafKind {
                key: key.to_string(),
                expected: "json",
            }),
            None => Err(Error::MissingKey {
                key: key.to_string(),
            }),
        }
    }

    /// Deserializes the JSON value at `key`.
    ///
    /// # Errors
    /// [`Error::MissingKey`], [`Error::LeafKind`], or [`Error::JsonValue`] when it does
    /// not have the expected structure.
    pub fn require_value<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T, Error> {
        let v = self.require_json(key)?;
        serde_json::from_value(v.clone()).map_err(|e| Error::JsonValue {
            key: key.to_string(),
            reason: e.to_string(),
        })
    }

    /// Removes and returns the leaf at `key`.
    pub fn remove(&mut self, key: &str) -> Option<Leaf> {
        self.entries.remove(key)
    }

    /// True when `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// Iterates over `(key, leaf)` in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Leaf)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Iterates over the keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Iterates over tensor leaves in key order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &TensorData)> {
        self.entries.iter().filter_map(|(k, v)| match v {
            Leaf::Tensor(t) => Some((k.as_str(), t)),
            Leaf::Json(_) => None,
        })
    }

    /// Iterates over JSON leaves in key order.
    pub fn json_leaves(&self) -> impl Iterator<Item = (&str, &serde_json::Value)> {
        self.entries.iter().filter_map(|(k, v)| match v {
            Leaf::Json(j) => Some((k.as_str(), j)),
            Leaf::Tensor(_) => None,
        })
    }

    /// Number of leaves.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no leaves.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total bytes of all tensor leaves.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors().map(|(_, t)| t.bytes().len() as u64).sum()
    }
}

impl IntoIterator for StateDict {
    type Item = (String, Leaf);
    type IntoIter = std::collections::btree_map::IntoIter<String, Leaf>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

impl FromIterator<(String, Leaf)> for StateDict {
    fn from_iter<I: IntoIterator<Item = (String, Leaf)>>(iter: I) -> Self {
        StateDict {
            entries: iter.into_iter().collect(),
        }
    }
}

/// Joins two key paths with the separator; an empty prefix returns `key` unchanged.
pub fn join_key(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}{KEY_SEPARATOR}{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_length_is_checked() {
        let err = TensorData::new(DType::F32, vec![2, 3], TensorBytes::owned(vec![0; 23]));
        assert!(matches!(
            err,
            Err(Error::TensorByteLength {
                expected: 24,
                got: 23,
                ..
            })
        ));
        let overflow = TensorData::new(DType::F32, vec![usize::MAX, 2], TensorBytes::owned(vec![]));
        assert!(matches!(overflow, Err(Error::TensorByteLength { .. })));
    }

    #[test]
    fn prefix_and_sub_round_trip() {
        let mut child = StateDict::new();
        child.insert_json("a", serde_json::json!(1));
        child.insert_tensor("b.weight", TensorData::from_f32(vec![1], &[2.0]).unwrap());
        let mut root = StateDict::new();
        root.insert_prefixed("opt/0", child.clone());
        root.insert_json("optimizer", serde_json::json!("x"));
        assert_eq!(root.sub("opt/0"), child);
        assert_eq!(root.sub("opt").len(), 2);
        assert_eq!(root.top_level_keys(), vec!["opt", "optimizer"]);
    }

    #[test]
    fn typed_access_errors_name_the_key() {
        let mut sd = StateDict::new();
        sd.insert_json("j", serde_json::json!({"x": 1}));
        assert!(matches!(
            sd.require_tensor("j"),
            Err(Error::LeafKind { .. })
        ));
        assert!(matches!(sd.require_json("nope"), Err(Error::MissingKey { key }) if key == "nope"));
        let v: std::collections::BTreeMap<String, i32> = sd.require_value("j").unwrap();
        assert_eq!(v["x"], 1);
    }

    #[test]
    fn value_round_trips() {
        let t = TensorData::from_f64(vec![2], &[1.5, -2.0]).unwrap();
        assert_eq!(t.to_f64_vec().unwrap(), vec![1.5, -2.0]);
        assert!(t.to_f32_vec().is_err());
        let i = TensorData::from_i64(vec![], &[7]).unwrap();
        assert_eq!(i.to_i64_vec().unwrap(), vec![7]);
    }
}
