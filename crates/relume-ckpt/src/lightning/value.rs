//! The decoded value model: what a restricted pickle turns into.
//!
//! [`PyValue`] is plain data. Objects the reader does not construct (every global outside
//! the allow-list) stay inert: a [`PyValue::Global`] names the class or function, and a
//! [`PyValue::Call`] records what *would* have been called with which arguments.

use std::sync::Arc;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::state::{TensorBytes, TensorData};

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

/// A tensor rebuilt from a zip storage: contiguous, row-major, little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchTensor {
    /// Element type.
    pub dtype: TorchDType,
    /// Shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// `numel × dtype size` bytes, contiguous and little-endian (views are materialised).
    pub data: Arc<[u8]>,
    /// The zip storage key the tensor was read from (`<prefix>/data/<key>`).
    pub storage_key: String,
    /// Whether the tensor was saved as a parameter or with `requires_grad`.
    pub requires_grad: bool,
}

impl TorchTensor {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Every element widened to `f64` (booleans as 0/1).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        let size = self.dtype.size_in_bytes();
        self.data
            .chunks_exact(size)
            .map(|c| element_f64(self.dtype, c))
            .collect()
    }

    /// The first element as `f64`, `None` for an empty tensor.
    pub fn first_f64(&self) -> Option<f64> {
        let size = self.dtype.size_in_bytes();
        self.data.get(..size).map(|c| element_f64(self.dtype, c))
    }

    /// The sum of all elements, accumulated in `f64`.
    pub fn sum_f64(&self) -> f64 {
        let size = self.dtype.size_in_bytes();
        self.data
            .chunks_exact(size)
            .map(|c| element_f64(self.dtype, c))
            .sum()
    }

    /// A relume tensor leaf with the same dtype, shape and bytes, for conversion.
    ///
    /// # Errors
    /// [`Error::UnsupportedTorchDType`] for int16 and int8, which relume does not store.
    pub fn to_tensor_data(&self, name: &str) -> Result<TensorData> {
        let Some(dtype) = self.dtype.to_relume() else {
            return Err(Error::UnsupportedTorchDType {
                tensor: name.to_string(),
                dtype: self.dtype.torch_name(),
            });
        };
        TensorData::new(
            dtype,
            self.shape.clone(),
            TensorBytes::owned(self.data.to_vec()),
        )
        .map_err(|e| e.with_key(name))
    }

    /// The value of a one-element tensor (a scalar such as a monitored score).
    pub fn scalar_f64(&self) -> Option<f64> {
        if self.numel() == 1 {
            self.first_f64()
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
