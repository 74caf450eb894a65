//! The decoded value model: what a restricted pickle turns into.
//!
//! [`PyValue`] is plain data. Objects the reader does not construct (every global outside
//! the allow-list) stay inert: a [`PyValue::Global`] names the class or function, and a
//! [`PyValue::Call`] records what *would* have been called with which arguments.

use std::sync::Arc;

use super::storage::{Backing, StorageBytes, TorchStorage};
use super::tensor::View;
use crate::error::{Error, Result};
use relume_ckpt::DType;
use relume_ckpt::{TensorBytes, TensorData};

/// The element type of a torch tensor, as named by its storage class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TorchDType {
    /// `torch.float32` (`FloatStorage`).
    F32,
    /// `torch.float64` (`DoubleStorage`).
    F64,
    /// `torch.float16` (`HalfStorage`).
    F16,
    /// `torch.bfloat16` (`BFloat16Storage`).
    BF16,
    /// `torch.int64` (`LongStorage`).
    I64,
    /// `torch.int32` (`IntStorage`).
    I32,
    /// `torch.int16` (`ShortStorage`).
    I16,
    /// `torch.int8` (`CharStorage`).
    I8,
    /// `torch.uint8` (`ByteStorage`).
    U8,
    /// `torch.bool` (`BoolStorage`).
    Bool,
}

impl TorchDType {
    /// The dtype of a `torch.<Name>Storage` class; `None` for other names.
    pub fn from_storage_class(name: &str) -> Option<TorchDType> {
        Some(match name {
            "FloatStorage" => TorchDType::F32,
            "DoubleStorage" => TorchDType::F64,
            "HalfStorage" => TorchDType::F16,
            "BFloat16Storage" => TorchDType::BF16,
            "LongStorage" => TorchDType::I64,
            "IntStorage" => TorchDType::I32,
            "ShortStorage" => TorchDType::I16,
            "CharStorage" => TorchDType::I8,
            "ByteStorage" => TorchDType::U8,
            "BoolStorage" => TorchDType::Bool,
            _ => return None,
        })
    }

    /// Torch's name without the `torch.` prefix (`"float32"`, `"bfloat16"`, ...).
    pub fn torch_name(self) -> &'static str {
        match self {
            TorchDType::F32 => "float32",
            TorchDType::F64 => "float64",
            TorchDType::F16 => "float16",
            TorchDType::BF16 => "bfloat16",
            TorchDType::I64 => "int64",
            TorchDType::I32 => "int32",
            TorchDType::I16 => "int16",
            TorchDType::I8 => "int8",
            TorchDType::U8 => "uint8",
            TorchDType::Bool => "bool",
        }
    }

    /// Size of one element in bytes.
    pub fn size_in_bytes(self) -> usize {
        match self {
            TorchDType::F64 | TorchDType::I64 => 8,
            TorchDType::F32 | TorchDType::I32 => 4,
            TorchDType::F16 | TorchDType::BF16 | TorchDType::I16 => 2,
            TorchDType::I8 | TorchDType::U8 | TorchDType::Bool => 1,
        }
    }

    /// The relume dtype with the same layout; `None` for int16 and int8, which relume
    /// checkpoints do not store.
    pub fn to_relume(self) -> Option<DType> {
        Some(match self {
            TorchDType::F32 => DType::F32,
            TorchDType::F64 => DType::F64,
            TorchDType::F16 => DType::F16,
            TorchDType::BF16 => DType::BF16,
            TorchDType::I64 => DType::I64,
            TorchDType::I32 => DType::I32,
            TorchDType::U8 => DType::U8,
            TorchDType::Bool => DType::Bool,
            TorchDType::I16 | TorchDType::I8 => return None,
        })
    }
}

impl std::fmt::Display for TorchDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// A tensor rebuilt from a zip storage: a view `(offset, shape, stride)` of a lazy
/// [`TorchStorage`]. Reading the pickle reads no tensor bytes; [`bytes`](Self::bytes) and
/// the methods built on it read them on demand.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchTensor {
    /// Element type.
    pub dtype: TorchDType,
    /// Shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// Whether the tensor was saved as a parameter or with `requires_grad`.
    pub requires_grad: bool,
    stride: Vec<u64>,
    offset: u64,
    storage: TorchStorage,
}

impl TorchTensor {
    /// A view of `storage`, already checked by the interpreter to lie inside it.
    pub(crate) fn view(
        dtype: TorchDType,
        view: &View,
        storage: TorchStorage,
        requires_grad: bool,
    ) -> Self {
        TorchTensor {
            dtype,
            shape: view.size.iter().map(|&d| d as usize).collect(),
            requires_grad,
            stride: view.stride.clone(),
            offset: view.offset,
            storage,
        }
    }

    /// A contiguous tensor over `bytes` held in memory, as storage `key`.
    ///
    /// # Errors
    /// [`Error::TensorByteLength`] when `bytes` is not `shape`'s element count times the
    /// dtype's size.
    pub fn from_bytes(
        dtype: TorchDType,
        shape: Vec<usize>,
        key: &str,
        bytes: Arc<[u8]>,
    ) -> Result<Self> {
        let expected = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.size_in_bytes()));
        if expected != Some(bytes.len()) {
            return Err(Error::TensorByteLength {
                tensor: key.to_string(),
                dtype: dtype.torch_name(),
                shape,
                expected: expected.unwrap_or(usize::MAX),
                got: bytes.len(),
            });
        }
        let mut stride = vec![0u64; shape.len()];
        let mut step = 1u64;
        for (s, &d) in stride.iter_mut().zip(&shape).rev() {
            *s = step;
            step = step.saturating_mul(d as u64);
        }
        Ok(TorchTensor {
            dtype,
            shape,
            requires_grad: false,
            stride,
            offset: 0,
            storage: TorchStorage::memory(key, bytes),
        })
    }

    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The size of the tensor's bytes (`numel × dtype size`), known without reading them.
    pub fn nbytes(&self) -> u64 {
        (self.numel() as u64).saturating_mul(self.dtype.size_in_bytes() as u64)
    }

    /// The storage the tensor views.
    pub fn storage(&self) -> &TorchStorage {
        &self.storage
    }

    /// The zip storage key the tensor was read from (`<prefix>/data/<key>`).
    pub fn storage_key(&self) -> &str {
        self.storage.key()
    }

    /// The offset of the first element in the storage, in elements.
    pub fn storage_offset(&self) -> u64 {
        self.offset
    }

    /// The strides, in elements, one per dimension.
    pub fn stride(&self) -> &[u64] {
        &self.stride
    }

    fn geometry(&self) -> View {
        View {
            offset: self.offset,
            size: self.shape.iter().map(|&d| d as u64).collect(),
            stride: self.stride.clone(),
        }
    }

    /// The view, re-checked against the storage (the public `shape` may have been
    /// changed since the pickle was read); returns it with its element count.
    fn checked_geometry(&self) -> Result<(View, u64)> {
        let view = self.geometry();
        let esize = self.dtype.size_in_bytes() as u64;
        let numel = view
            .check(self.storage.len() / esize, usize::MAX)
            .map_err(|e| Error::TorchTensorView {
                entry: self.storage.entry().to_string(),
                reason: e.to_string(),
            })?;
        Ok((view, numel))
    }

    /// The tensor's bytes: `numel × dtype size`, contiguous, row-major, little-endian.
    ///
    /// For a contiguous view of a stored entry of a memory-mapped file the bytes are a
    /// slice of the map (no copy, file-backed pages); otherwise they are copied out.
    ///
    /// # Errors
    /// [`Error::ZipTruncated`] when the storage's bytes fail their CRC-32 or cannot be
    /// inflated, [`Error::TorchTensorView`] when the view no longer fits its storage.
    pub fn bytes(&self) -> Result<TensorBytes> {
        let (view, numel) = self.checked_geometry()?;
        let esize = self.dtype.size_in_bytes();
        let storage = self.storage.read_all()?;
        if view.is_contiguous() {
            let start = view.offset as usize * esize;
            let len = numel as usize * esize;
            if let StorageBytes::Archive {
                bytes, start: at, ..
            } = &storage
            {
                if let Backing::Map(map) = &*bytes.0 {
                    return TensorBytes::mapped(
                        Arc::clone(map),
                        at + start,
                        len,
                        self.storage.key(),
                    )
                    .map_err(Error::from);
                }
            }
        }
        Ok(TensorBytes::owned(view.materialise(
            storage.as_slice(),
            self.dtype,
            numel,
        )))
    }

    /// Every element widened to `f64` (booleans as 0/1).
    ///
    /// # Errors
    /// As [`bytes`](Self::bytes).
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        let size = self.dtype.size_in_bytes();
        Ok(self
            .bytes()?
            .chunks_exact(size)
            .map(|c| element_f64(self.dtype, c))
            .collect())
    }

    /// The first element as `f64`, `None` for an empty tensor. Reads that one element.
    ///
    /// # Errors
    /// [`Error::ZipTruncated`] when a compressed storage cannot be inflated that far,
    /// [`Error::TorchTensorView`] when the view no longer fits its storage.
    pub fn first_f64(&self) -> Result<Option<f64>> {
        let (view, numel) = self.checked_geometry()?;
        if numel == 0 {
            return Ok(None);
        }
        let size = self.dtype.size_in_bytes();
        let bytes = self
            .storage
            .read_range(view.offset.saturating_mul(size as u64), size)?;
        Ok(Some(element_f64(self.dtype, &bytes)))
    }

    /// The sum of all elements, accumulated in `f64`.
    ///
    /// # Errors
    /// As [`bytes`](Self::bytes).
    pub fn sum_f64(&self) -> Result<f64> {
        let size = self.dtype.size_in_bytes();
        Ok(self
            .bytes()?
            .chunks_exact(size)
            .map(|c| element_f64(self.dtype, c))
            .sum())
    }

    /// A relume tensor leaf with the same dtype, shape and bytes, for conversion; the
    /// bytes are those of [`bytes`](Self::bytes) (a slice of the mapped file when they can be).
    ///
    /// # Errors
    /// [`Error::UnsupportedTorchDType`] for int16 and int8, which relume does not store,
    /// and the errors of [`bytes`](Self::bytes).
    pub fn to_tensor_data(&self, name: &str) -> Result<TensorData> {
        let Some(dtype) = self.dtype.to_relume() else {
            return Err(Error::UnsupportedTorchDType {
                tensor: name.to_string(),
                dtype: self.dtype.torch_name(),
            });
        };
        let bytes = self.bytes()?;
        TensorData::new(dtype, self.shape.clone(), bytes).map_err(|e| Error::from(e.with_key(name)))
    }

    /// The value of a one-element tensor (a scalar such as a monitored score); reads that
    /// one element. `None` for other tensors, or when the element cannot be read.
    pub fn scalar_f64(&self) -> Option<f64> {
        if self.numel() == 1 {
            self.first_f64().ok().flatten()
        } else {
            None
        }
    }
}

/// Decodes one little-endian element. `chunk` holds exactly `dtype.size_in_bytes()` bytes.
fn element_f64(dtype: TorchDType, chunk: &[u8]) -> f64 {
    let mut b = [0u8; 8];
    b[..chunk.len()].copy_from_slice(chunk);
    match dtype {
        TorchDType::F32 => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        TorchDType::F64 => f64::from_le_bytes(b),
        TorchDType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
        TorchDType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        TorchDType::I64 => i64::from_le_bytes(b) as f64,
        TorchDType::I32 => f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        TorchDType::I16 => f64::from(i16::from_le_bytes([b[0], b[1]])),
        TorchDType::I8 => f64::from(b[0] as i8),
        TorchDType::U8 | TorchDType::Bool => f64::from(b[0]),
    }
}

/// How an inert call was spelled in the pickle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// `REDUCE`: `func(*args)`.
    Reduce,
    /// `NEWOBJ` / `NEWOBJ_EX`: `cls.__new__(cls, *args)`.
    NewObj,
}

/// A value decoded by the restricted pickle reader.
#[derive(Debug, Clone, PartialEq)]
pub enum PyValue {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer that fits in 64 bits.
    Int(i64),
    /// A larger integer, in decimal.
    BigInt(String),
    /// A float.
    Float(f64),
    /// A text string.
    Str(String),
    /// A bytes or bytearray object.
    Bytes(Vec<u8>),
    /// A list.
    List(Vec<PyValue>),
    /// A tuple.
    Tuple(Vec<PyValue>),
    /// A set or frozenset, in pickle order.
    Set(Vec<PyValue>),
    /// A dict or `collections.OrderedDict`, in insertion order, keys unique.
    Dict(Vec<(PyValue, PyValue)>),
    /// A tensor rebuilt from a zip storage.
    Tensor(TorchTensor),
    /// A storage reference that was never wrapped in a tensor.
    Storage {
        /// Zip storage key.
        key: String,
        /// Element type.
        dtype: TorchDType,
        /// Elements declared.
        numel: u64,
    },
    /// A global the reader does not construct (module and name), kept as data.
    Global {
        /// Module path, e.g. `"os"`.
        module: String,
        /// Attribute name, e.g. `"system"`.
        name: String,
    },
    /// An inert call on something the reader does not construct: nothing was executed.
    Call {
        /// What would have been called (usually a [`PyValue::Global`]).
        func: Box<PyValue>,
        /// How it was spelled.
        kind: CallKind,
        /// Positional arguments (for `NEWOBJ_EX`, the keyword dict follows them).
        args: Vec<PyValue>,
        /// The state `BUILD` would have passed to `__setstate__`, if any.
        state: Option<Box<PyValue>>,
        /// Items `APPEND(S)` added to the object.
        list_items: Vec<PyValue>,
        /// Items `SETITEM(S)` added to the object.
        dict_items: Vec<(PyValue, PyValue)>,
    },
}

impl PyValue {
    /// Looks up `key` in a dict (string keys, or integer keys written in decimal). For an
    /// inert dict subclass (a [`PyValue::Call`] with dict items) its items are searched.
    pub fn get(&self, key: &str) -> Option<&PyValue> {
        self.dict_items()?
            .iter()
            .find(|(k, _)| k.key_matches(key))
            .map(|(_, v)| v)
    }

    /// Follows a path of dict keys.
    pub fn get_path(&self, path: &[&str]) -> Option<&PyValue> {
        path.iter().try_fold(self, |v, k| v.get(k))
    }

    /// The items of a dict, or of an inert dict subclass.
    pub fn dict_items(&self) -> Option<&[(PyValue, PyValue)]> {
        match self {
            PyValue::Dict(items) => Some(items),
            PyValue::Call { dict_items, .. } if !dict_items.is_empty() => Some(dict_items),
            _ => None,
        }
    }

    /// The elements of a list or tuple.
    pub fn as_seq(&self) -> Option<&[PyValue]> {
        match self {
            PyValue::List(v) | PyValue::Tuple(v) => Some(v),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            PyValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is one that fits in 64 bits (booleans are not integers here).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            PyValue::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// A number as `f64`: an int, a float, or a one-element tensor.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            PyValue::Int(i) => Some(*i as f64),
            PyValue::Float(f) => Some(*f),
            PyValue::Tensor(t) => t.scalar_f64(),
            _ => None,
        }
    }

    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            PyValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The tensor, if this is one.
    pub fn as_tensor(&self) -> Option<&TorchTensor> {
        match self {
            PyValue::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// Whether this dict key equals `key` (a string, or an integer written in decimal).
    pub fn key_matches(&self, key: &str) -> bool {
        match self {
            PyValue::Str(s) => s == key,
            PyValue::Int(i) => key.parse::<i64>().is_ok_and(|k| k == *i),
            PyValue::BigInt(s) => s == key,
            _ => false,
        }
    }

    /// A short human description of the key (`"name"` for strings, `7` for ints).
    pub fn key_label(&self) -> String {
        match self {
            PyValue::Str(s) => s.clone(),
            PyValue::Int(i) => i.to_string(),
            other => other.type_name().to_string(),
        }
    }

    /// The Python type name of this value (`"dict"`, `"tensor"`, `"os.system"` for a global).
    pub fn type_name(&self) -> String {
        match self {
            PyValue::None => "None".into(),
            PyValue::Bool(_) => "bool".into(),
            PyValue::Int(_) | PyValue::BigInt(_) => "int".into(),
            PyValue::Float(_) => "float".into(),
            PyValue::Str(_) => "str".into(),
            PyValue::Bytes(_) => "bytes".into(),
            PyValue::List(_) => "list".into(),
            PyValue::Tuple(_) => "tuple".into(),
            PyValue::Set(_) => "set".into(),
            PyValue::Dict(_) => "dict".into(),
            PyValue::Tensor(_) => "tensor".into(),
            PyValue::Storage { .. } => "storage".into(),
            PyValue::Global { module, name } => format!("{module}.{name}"),
            PyValue::Call { func, .. } => format!("{}(...)", func.type_name()),
        }
    }

    /// A JSON rendering for display: tensors become `{"tensor": {dtype, shape}}`, inert
    /// globals and calls are named, non-finite floats become strings.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::{json, Value};
        match self {
            PyValue::None => Value::Null,
            PyValue::Bool(b) => Value::Bool(*b),
            PyValue::Int(i) => json!(i),
            PyValue::BigInt(s) => Value::String(s.clone()),
            PyValue::Float(f) => serde_json::Number::from_f64(*f)
                .map(Value::Number)
                .unwrap_or_else(|| Value::String(f.to_string())),
            PyValue::Str(s) => Value::String(s.clone()),
            PyValue::Bytes(b) => json!({ "bytes": b.len() }),
            PyValue::List(v) | PyValue::Tuple(v) | PyValue::Set(v) => {
                Value::Array(v.iter().map(PyValue::to_json).collect())
            }
            PyValue::Dict(items) => Value::Object(
                items
                    .iter()
                    .map(|(k, v)| (k.key_label(), v.to_json()))
                    .collect(),
            ),
            PyValue::Tensor(t) => {
                let mut desc = json!({ "dtype": t.dtype.torch_name(), "shape": t.shape });
                if let Some(v) = t.scalar_f64() {
                    desc["value"] = PyValue::Float(v).to_json();
                }
                json!({ "tensor": desc })
            }
            PyValue::Storage { key, dtype, numel } => {
                json!({ "storage": { "key": key, "dtype": dtype.torch_name(), "numel": numel } })
            }
            PyValue::Global { module, name } => json!({ "global": format!("{module}.{name}") }),
            PyValue::Call { func, args, .. } => json!({
                "inert_call": func.type_name(),
                "args": args.iter().map(PyValue::to_json).collect::<Vec<_>>(),
            }),
        }
    }
}
