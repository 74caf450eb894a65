//! The interpreter's object heap and its conversion into a [`PyValue`] tree.
//!
//! While a pickle runs, containers live in a flat arena so that memo references share
//! one object and mutations (`APPENDS` after `BINPUT`) are seen through every reference,
//! exactly as in Python. Nothing here is recursive; only the final conversion walks the
//! graph, under [`Limits::nesting_depth`], [`Limits::values`] and
//! [`Limits::total_string_bytes`], so shared references and cycles cannot blow up.

use std::collections::BTreeMap;

use super::limits::Limits;
use super::value::{CallKind, PyValue, TorchDType, TorchTensor};
use crate::error::{Error, Result};

/// A value on the interpreter stack: small scalars inline, everything else in the heap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Val {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Ref(usize),
}

/// A heap object.
#[derive(Debug)]
pub(crate) enum Node {
    BigInt(String),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Val>),
    Tuple(Vec<Val>),
    Set(Vec<Val>),
    Dict(Vec<(Val, Val)>),
    Global {
        module: String,
        name: String,
    },
    Call {
        func: Val,
        kind: CallKind,
        /// The argument tuple, shared rather than copied.
        args: Val,
        /// `NEWOBJ_EX` keyword arguments.
        kwargs: Option<Val>,
        state: Option<Val>,
        list_items: Vec<Val>,
        dict_items: Vec<(Val, Val)>,
    },
    Storage {
        key: String,
        dtype: TorchDType,
        numel: u64,
    },
    Tensor(TorchTensor),
}

/// A key that can be compared for dict de-duplication.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum KeyId {
    Int(i64),
    Str(String),
}

/// Walks the heap into an owned tree, charging every value to the budgets.
pub(crate) struct Converter<'a> {
    heap: &'a [Node],
    limits: &'a Limits,
    file: &'a str,
    offset: u64,
    values: usize,
    string_bytes: usize,
}

impl<'a> Converter<'a> {
    pub(crate) fn new(heap: &'a [Node], limits: &'a Limits, file: &'a str, offset: u64) -> Self {
        Converter {
            heap,
            limits,
            file,
            offset,
            values: 0,
            string_bytes: 0,
        }
    }

    fn limit(&self, limit: &'static str, max: usize, got: usize) -> Error {
        Error::PickleLimitExceeded {
            file: self.file.to_string(),
            offset: self.offset,
            limit,
            max: max as u64,
            got: got as u64,
        }
    }

    fn charge_string(&mut self, len: usize) -> Result<()> {
        self.string_bytes = self.string_bytes.saturating_add(len);
        if self.string_bytes > self.limits.total_string_bytes {
            return Err(self.limit(
                "total string bytes",
                self.limits.total_string_bytes,
                self.string_bytes,
            ));
        }
        Ok(())
    }

    fn seq(&mut self, items: &[Val], depth: usize) -> Result<Vec<PyValue>> {
        items.iter().map(|v| self.convert(*v, depth + 1)).collect()
    }

    fn pairs(&mut self, items: &[(Val, Val)], depth: usize) -> Result<Vec<(PyValue, PyValue)>> {
        let mut out: Vec<(PyValue, PyValue)> = Vec::with_capacity(items.len());
        let mut index: BTreeMap<KeyId, usize> = BTreeMap::new();
        for (k, v) in items {
            let key = self.convert(*k, depth + 1)?;
            let value = self.convert(*v, depth + 1)?;
            let id = match &key {
                PyValue::Int(i) => Some(KeyId::Int(*i)),
                PyValue::Str(s) => Some(KeyId::Str(s.clone())),
                _ => None,
            };
            // Python semantics: a repeated key keeps its first position, takes the last value.
            match id {
                Some(id) => match index.get(&id) {
                    Some(&at) => out[at].1 = value,
                    None => {
                        index.insert(id, out.len());
                        out.push((key, value));
                    }
                },
                None => out.push((key, value)),
            }
        }
        Ok(out)
    }

    /// Converts one value. `depth` is the container nesting so far.
    pub(crate) fn convert(&mut self, val: Val, depth: usize) -> Result<PyValue> {
        self.values += 1;
        if self.values > self.limits.values {
            return Err(self.limit("decoded value count", self.limits.values, self.values));
        }
        if depth > self.limits.nesting_depth {
            return Err(self.limit("nesting depth", self.limits.nesting_depth, depth));
        }
        let id = match val {
            Val::None => return Ok(PyValue::None),
            Val::Bool(b) => return Ok(PyValue::Bool(b)),
            Val::Int(i) => return Ok(PyValue::Int(i)),
            Val::Float(f) => return Ok(PyValue::Float(f)),
            Val::Ref(id) => id,
        };
        let heap = self.heap;
        let Some(node) = heap.get(id) else {
            return Err(Error::Pickle {
                file: self.file.to_string(),
                offset: self.offset,
                reason: format!("internal reference {id} out of range"),
            });
        };
        Ok(match node {
            Node::BigInt(s) => PyValue::BigInt(s.clone()),
            Node::Str(s) => {
                self.charge_string(s.len())?;
                PyValue::Str(s.clone())
            }
            Node::Bytes(b) => {
                self.charge_string(b.len())?;
                PyValue::Bytes(b.clone())
            }
            Node::List(items) => PyValue::List(self.seq(items, depth)?),
            Node::Tuple(items) => PyValue::Tuple(self.seq(items, depth)?),
            Node::Set(items) => PyValue::Set(self.seq(items, depth)?),
            Node::Dict(items) => PyValue::Dict(self.pairs(items, depth)?),
            Node::Global { module, name } => {
                self.charge_string(module.len() + name.len())?;
                PyValue::Global {
                    module: module.clone(),
                    name: name.clone(),
                }
            }
            Node::Call {
                func,
                kind,
                args,
                kwargs,
                state,
                list_items,
                dict_items,
            } => PyValue::Call {
                func: Box::new(self.convert(*func, depth + 1)?),
                kind: *kind,
                args: {
                    let mut out = match self.convert(*args, depth + 1)? {
                        PyValue::Tuple(items) => items,
                        other => vec![other],
                    };
                    if let Some(kw) = kwargs {
                        out.push(self.convert(*kw, depth + 1)?);
                    }
                    out
                },
                state: match state {
                    Some(s) => Some(Box::new(self.convert(*s, depth + 1)?)),
                    None => None,
                },
                list_items: self.seq(list_items, depth)?,
                dict_items: self.pairs(dict_items, depth)?,
            },
            Node::Storage { key, dtype, numel } => PyValue::Storage {
                key: key.clone(),
                dtype: *dtype,
                numel: *numel,
            },
            Node::Tensor(t) => PyValue::Tensor(t.clone()),
        })
    }
}
