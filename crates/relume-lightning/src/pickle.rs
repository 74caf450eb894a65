//! The restricted pickle interpreter.
//!
//! It understands protocols 2–5 and the opcodes `torch.save` emits. It never imports or
//! calls anything: `GLOBAL`/`STACK_GLOBAL` only record a module and name, and `REDUCE`,
//! `NEWOBJ` and `BUILD` on them produce inert [`PyValue::Call`] data. Three constructors
//! are *evaluated* by the reader itself, as pure functions over data:
//!
//! | global | result |
//! |---|---|
//! | `collections.OrderedDict()` | an empty [`PyValue::Dict`] |
//! | `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` | a [`PyValue::Tensor`]: a checked view of a lazy storage, no bytes read |
//! | `torch._utils._rebuild_parameter(tensor, requires_grad, ...)` (and `_with_state`) | the tensor |
//!
//! `torch.<Name>Storage` globals are inert markers naming the dtype of a persistent
//! storage id `('storage', torch.FloatStorage, key, location, numel)`.
//!
//! Every size is checked against [`Limits`] before anything is allocated, so memory is
//! bounded and time is linear in the input. Storage bytes are never read here: a
//! storage's size comes from its [`StorageSource`] (the zip directory), and
//! [`Limits::total_tensor_bytes`] is charged with what the storages and views would
//! cost if they were all materialised.

use std::collections::BTreeMap;

use super::heap::{Converter, Node, Val};
use super::limits::Limits;
use super::opcodes::{decode_long, op};
use super::storage::{StorageSource, TorchStorage};
use super::tensor::{View, ViewError};
use super::value::{CallKind, PyValue, TorchDType, TorchTensor};
use crate::error::{Error, Result};

/// The highest pickle protocol the reader accepts.
pub const MAX_PROTOCOL: u8 = 5;

/// Runs the pickle `data` and returns the value it builds.
///
/// `file` names the pickle in errors (e.g. `"model.ckpt:archive/data.pkl"`); `storages`
/// supplies lazy handles on persistent storages when a tensor is rebuilt.
///
/// # Errors
/// [`Error::UnknownOpcode`] for an opcode outside the supported set,
/// [`Error::PickleLimitExceeded`] when a declared size or a count passes `limits`,
/// [`Error::Pickle`] for any other malformed input (truncation, stack underflow, a bad
/// tensor view), and the errors of `storages`.
pub fn parse_pickle(
    data: &[u8],
    file: &str,
    storages: &mut dyn StorageSource,
    limits: &Limits,
) -> Result<PyValue> {
    if data.len() as u64 > limits.pickle_bytes {
        return Err(Error::PickleLimitExceeded {
            file: file.to_string(),
            offset: 0,
            limit: "pickle size",
            max: limits.pickle_bytes,
            got: data.len() as u64,
        });
    }
    let mut m = Machine {
        data,
        pos: 0,
        op_offset: 0,
        file,
        limits,
        heap: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: BTreeMap::new(),
        storages,
        loaded: BTreeMap::new(),
        tensor_bytes: 0,
    };
    let root = m.run()?;
    let mut conv = Converter::new(&m.heap, limits, file, m.pos as u64);
    conv.convert(root, 0)
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    op_offset: usize,
    file: &'a str,
    limits: &'a Limits,
    heap: Vec<Node>,
    stack: Vec<Val>,
    marks: Vec<usize>,
    memo: BTreeMap<u32, Val>,
    storages: &'a mut dyn StorageSource,
    loaded: BTreeMap<String, TorchStorage>,
    tensor_bytes: u64,
}

impl Machine<'_> {
    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Pickle {
            file: self.file.to_string(),
            offset: self.op_offset as u64,
            reason: reason.into(),
        }
    }

    fn limit(&self, limit: &'static str, max: u64, got: u64) -> Error {
        Error::PickleLimitExceeded {
            file: self.file.to_string(),
            offset: self.op_offset as u64,
            limit,
            max,
            got,
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(self.err(format!(
                "truncated: needs {n} more bytes, {} left",
                self.data.len() - self.pos
            )));
        };
        let slice = &self.data[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Reads a length-prefixed blob after checking `len` against the string limit.
    fn blob(&mut self, len: u64) -> Result<&[u8]> {
        let max = self.limits.string_bytes as u64;
        if len > max {
            return Err(self.limit("string length", max, len));
        }
        self.take(len as usize)
    }

    fn utf8(&mut self, len: u64) -> Result<String> {
        let bytes = self.blob(len)?.to_vec();
        String::from_utf8(bytes).map_err(|e| self.err(format!("string is not valid utf-8: {e}")))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let max = self.limits.string_bytes.min(rest.len());
        let Some(n) = rest[..max].iter().position(|&b| b == b'\n') else {
            return Err(if max == rest.len() {
                self.err("truncated: unterminated GLOBAL line")
            } else {
                self.limit(
                    "string length",
                    self.limits.string_bytes as u64,
                    rest.len() as u64,
                )
            });
        };
        let line = self.take(n)?.to_vec();
        self.pos += 1;
        String::from_utf8(line).map_err(|e| self.err(format!("GLOBAL name is not utf-8: {e}")))
    }

    fn alloc(&mut self, node: Node) -> Val {
        self.heap.push(node);
        Val::Ref(self.heap.len() - 1)
    }

    fn push(&mut self, v: Val) -> Result<()> {
        if self.stack.len() >= self.limits.stack_depth {
            let max = self.limits.stack_depth as u64;
            return Err(self.limit("stack depth", max, max + 1));
        }
        self.stack.push(v);
        Ok(())
    }

    fn push_node(&mut self, node: Node) -> Result<()> {
        let v = self.alloc(node);
        self.push(v)
    }

    fn pop(&mut self) -> Result<Val> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn top(&self) -> Result<Val> {
        self.stack
            .last()
            .copied()
            .ok_or_else(|| self.err("stack underflow: empty stack"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Val>> {
        let Some(mark) = self.marks.pop() else {
            return Err(self.err("no MARK on the stack"));
        };
        Ok(self.stack.split_off(mark))
    }

    fn node(&self, v: Val) -> Option<&Node> {
        match v {
            Val::Ref(id) => self.heap.get(id),
            _ => None,
        }
    }

    fn node_mut(&mut self, v: Val) -> Option<&mut Node> {
        match v {
            Val::Ref(id) => self.heap.get_mut(id),
            _ => None,
        }
    }

    fn memo_put(&mut self, index: u32) -> Result<()> {
        let v = self.top()?;
        if !self.memo.contains_key(&index) && self.memo.len() >= self.limits.memo_entries {
            let max = self.limits.memo_entries as u64;
            return Err(self.limit("memo entries", max, max + 1));
        }
        self.memo.insert(index, v);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Result<()> {
        let Some(v) = self.memo.get(&index).copied() else {
            return Err(self.err(format!("memo index {index} was never stored")));
        };
        self.push(v)
    }

    fn long(&mut self, n: u64) -> Result<()> {
        let max = self.limits.long_bytes as u64;
        if n > max {
            return Err(self.limit("integer length", max, n));
        }
        let bytes = self.take(n as usize)?.to_vec();
        match decode_long(&bytes) {
            Ok(i) => self.push(Val::Int(i)),
            Err(s) => self.push_node(Node::BigInt(s)),
        }
    }

    fn run(&mut self) -> Result<Val> {
        loop {
            self.op_offset = self.pos;
            let code = self.u8()?;
            match code {
                op::PROTO => {
                    let p = self.u8()?;
                    if p > MAX_PROTOCOL {
                        return Err(
                            self.err(format!("pickle protocol {p} is newer than {MAX_PROTOCOL}"))
                        );
                    }
                }
                op::FRAME => {
                    self.u64()?;
                }
                op::STOP => return self.pop(),
                op::MARK => {
                    if self.marks.len() >= self.limits.mark_depth {
                        let max = self.limits.mark_depth as u64;
                        return Err(self.limit("MARK nesting", max, max + 1));
                    }
                    self.marks.push(self.stack.len());
                }
                op::POP => {
                    self.pop()?;
                }
                op::POP_MARK => {
                    self.pop_mark()?;
                }
                op::DUP => {
                    let v = self.top()?;
                    self.push(v)?;
                }
                op::NONE => self.push(Val::None)?,
                op::NEWTRUE => self.push(Val::Bool(true))?,
                op::NEWFALSE => self.push(Val::Bool(false))?,
                op::BININT => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Val::Int(i64::from(v)))?;
                }
                op::BININT1 => {
                    let v = self.u8()?;
                    self.push(Val::Int(i64::from(v)))?;
                }
                op::BININT2 => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Val::Int(i64::from(v)))?;
                }
                op::LONG1 => {
                    let n = self.u8()?;
                    self.long(u64::from(n))?;
                }
                op::LONG4 => {
                    let n = i32::from_le_bytes(self.array()?);
                    let Ok(n) = u64::try_from(n) else {
                        return Err(self.err(format!("LONG4 with negative length {n}")));
                    };
                    self.long(n)?;
                }
                op::BINFLOAT => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push(Val::Float(v))?;
                }
                op::SHORT_BINUNICODE => {
                    let n = self.u8()?;
                    let s = self.utf8(u64::from(n))?;
                    self.push_node(Node::Str(s))?;
                }
                op::BINUNICODE => {
                    let n = self.u32()?;
                    let s = self.utf8(u64::from(n))?;
                    self.push_node(Node::Str(s))?;
                }
                op::BINUNICODE8 => {
                    let n = self.u64()?;
                    let s = self.utf8(n)?;
                    self.push_node(Node::Str(s))?;
                }
                op::SHORT_BINSTRING | op::BINSTRING => {
                    let n = if code == op::SHORT_BINSTRING {
                        i64::from(self.u8()?)
                    } else {
                        i64::from(i32::from_le_bytes(self.array()?))
                    };
                    let Ok(n) = u64::try_from(n) else {
                        return Err(self.err(format!("BINSTRING with negative length {n}")));
                    };
                    let bytes = self.blob(n)?.to_vec();
                    let node = match String::from_utf8(bytes) {
                        Ok(s) => Node::Str(s),
                        Err(e) => Node::Bytes(e.into_bytes()),
                    };
                    self.push_node(node)?;
                }
                op::SHORT_BINBYTES | op::BINBYTES | op::BINBYTES8 | op::BYTEARRAY8 => {
                    let n = match code {
                        op::SHORT_BINBYTES => u64::from(self.u8()?),
                        op::BINBYTES => u64::from(self.u32()?),
                        _ => self.u64()?,
                    };
                    let bytes = self.blob(n)?.to_vec();
                    self.push_node(Node::Bytes(bytes))?;
                }
                op::EMPTY_DICT => self.push_node(Node::Dict(Vec::new()))?,
                op::EMPTY_LIST => self.push_node(Node::List(Vec::new()))?,
                op::EMPTY_TUPLE => self.push_node(Node::Tuple(Vec::new()))?,
                op::EMPTY_SET => self.push_node(Node::Set(Vec::new()))?,
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = usize::from(code - op::TUPLE1 + 1);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push_node(Node::Tuple(items))?;
                }
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.push_node(Node::Tuple(items))?;
                }
                op::LIST => {
                    let items = self.pop_mark()?;
                    self.push_node(Node::List(items))?;
                }
                op::FROZENSET => {
                    let items = self.pop_mark()?;
                    self.push_node(Node::Set(items))?;
                }
                op::DICT => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push_node(Node::Dict(pairs))?;
                }
                op::APPEND => {
                    let v = self.pop()?;
                    self.extend_list(vec![v])?;
                }
                op::APPENDS => {
                    let items = self.pop_mark()?;
                    self.extend_list(items)?;
                }
                op::ADDITEMS => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    match self.node_mut(target) {
                        Some(Node::Set(set)) => set.extend(items),
                        _ => return Err(self.err("ADDITEMS on something that is not a set")),
                    }
                }
                op::SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.extend_dict(vec![(k, v)])?;
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.extend_dict(pairs)?;
                }
                op::BINPUT => {
                    let i = self.u8()?;
                    self.memo_put(u32::from(i))?;
                }
                op::LONG_BINPUT => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                op::MEMOIZE => {
                    let i = u32::try_from(self.memo.len()).unwrap_or(u32::MAX);
                    self.memo_put(i)?;
                }
                op::BINGET => {
                    let i = self.u8()?;
                    self.memo_get(u32::from(i))?;
                }
                op::LONG_BINGET => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                op::GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push_node(Node::Global { module, name })?;
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(Node::Str(module)), Some(Node::Str(name))) =
                        (self.node(module), self.node(name))
                    else {
                        return Err(self.err("STACK_GLOBAL needs two strings"));
                    };
                    let node = Node::Global {
                        module: module.clone(),
                        name: name.clone(),
                    };
                    self.push_node(node)?;
                }
                op::REDUCE => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.reduce(func, args, CallKind::Reduce)?;
                    self.push(v)?;
                }
                op::NEWOBJ => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.check_tuple(args, "NEWOBJ arguments")?;
                    let v = self.inert_call(cls, CallKind::NewObj, args, None);
                    self.push(v)?;
                }
                op::NEWOBJ_EX => {
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.check_tuple(args, "NEWOBJ_EX arguments")?;
                    let v = self.inert_call(cls, CallKind::NewObj, args, Some(kwargs));
                    self.push(v)?;
                }
                op::BUILD => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    // Attribute state on a dict, list or tensor (e.g. a state_dict's
                    // `_metadata`) is dropped; on an inert object it is kept as data.
                    if let Some(Node::Call { state: slot, .. }) = self.node_mut(target) {
                        *slot = Some(state);
                    }
                }
                op::BINPERSID => {
                    let pid = self.pop()?;
                    let storage = self.persistent_storage(pid)?;
                    self.push_node(storage)?;
                }
                other => {
                    return Err(Error::UnknownOpcode {
                        file: self.file.to_string(),
                        offset: self.op_offset as u64,
                        opcode: other,
                    })
                }
            }
        }
    }

    fn pairs(&self, items: Vec<Val>) -> Result<Vec<(Val, Val)>> {
        if items.len() % 2 != 0 {
            return Err(self.err(format!("odd number of items ({}) for a dict", items.len())));
        }
        Ok(items.chunks_exact(2).map(|p| (p[0], p[1])).collect())
    }

    fn extend_list(&mut self, items: Vec<Val>) -> Result<()> {
        let target = self.top()?;
        match self.node_mut(target) {
            Some(Node::List(list)) => list.extend(items),
            Some(Node::Call { list_items, .. }) => list_items.extend(items),
            _ => return Err(self.err("APPEND on something that is not a list")),
        }
        Ok(())
    }

    fn extend_dict(&mut self, pairs: Vec<(Val, Val)>) -> Result<()> {
        let target = self.top()?;
        match self.node_mut(target) {
            Some(Node::Dict(dict)) => dict.extend(pairs),
            Some(Node::Call { dict_items, .. }) => dict_items.extend(pairs),
            _ => return Err(self.err("SETITEM on something that is not a dict")),
        }
        Ok(())
    }

    /// The length of tuple `v` and copies of its first (at most) `n` items; never copies
    /// a whole tuple, so repeated calls on a huge shared tuple stay cheap.
    fn tuple_prefix(&self, v: Val, n: usize, what: &str) -> Result<(usize, Vec<Val>)> {
        match self.node(v) {
            Some(Node::Tuple(items)) => Ok((items.len(), items.iter().take(n).copied().collect())),
            _ => Err(self.err(format!("{what} are not a tuple"))),
        }
    }

    fn check_tuple(&self, v: Val, what: &str) -> Result<()> {
        self.tuple_prefix(v, 0, what).map(|_| ())
    }

    fn inert_call(&mut self, func: Val, kind: CallKind, args: Val, kwargs: Option<Val>) -> Val {
        self.alloc(Node::Call {
            func,
            kind,
            args,
            kwargs,
            state: None,
            list_items: Vec::new(),
            dict_items: Vec::new(),
        })
    }

    fn global_name(&self, v: Val) -> Option<(&str, &str)> {
        match self.node(v) {
            Some(Node::Global { module, name }) => Some((module, name)),
            _ => None,
        }
    }

    /// `REDUCE`: evaluates the allow-listed constructors, records anything else inertly.
    fn reduce(&mut self, func: Val, args: Val, kind: CallKind) -> Result<Val> {
        let (len, prefix) = self.tuple_prefix(args, 7, "REDUCE arguments")?;
        let allowed = match self.global_name(func) {
            Some(("collections", "OrderedDict")) if len == 0 => Some(0),
            Some(("torch._utils", "_rebuild_tensor_v2")) => Some(1),
            Some(("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state")) => {
                Some(2)
            }
            _ => None,
        };
        match allowed {
            Some(0) => Ok(self.alloc(Node::Dict(Vec::new()))),
            Some(1) => self.rebuild_tensor(&prefix),
            Some(_) => self.rebuild_parameter(&prefix),
            None => Ok(self.inert_call(func, kind, args, None)),
        }
    }

    fn int_arg(&self, v: Option<&Val>, what: &str) -> Result<u64> {
        match v {
            Some(Val::Int(i)) => {
                u64::try_from(*i).map_err(|_| self.err(format!("{what} is negative ({i})")))
            }
            _ => Err(self.err(format!("{what} is not an integer"))),
        }
    }

    fn int_tuple(&self, v: Option<&Val>, what: &str) -> Result<Vec<u64>> {
        let Some(Node::Tuple(items)) = v.and_then(|v| self.node(*v)) else {
            return Err(self.err(format!("{what} is not a tuple")));
        };
        if items.len() > self.limits.tensor_dims {
            let max = self.limits.tensor_dims as u64;
            return Err(self.limit("tensor dimensions", max, items.len() as u64));
        }
        items.iter().map(|i| self.int_arg(Some(i), what)).collect()
    }

    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks[, metadata])`.
    fn rebuild_tensor(&mut self, args: &[Val]) -> Result<Val> {
        if args.len() < 4 {
            return Err(self.err(format!(
                "_rebuild_tensor_v2 needs at least 4 arguments, got {}",
                args.len()
            )));
        }
        let Some(Node::Storage { key, dtype, numel }) = self.node(args[0]) else {
            return Err(self.err("_rebuild_tensor_v2: first argument is not a storage"));
        };
        let (key, dtype, storage_numel) = (key.clone(), *dtype, *numel);
        let view = View {
            offset: self.int_arg(args.get(1), "storage offset")?,
            size: self.int_tuple(args.get(2), "tensor size")?,
            stride: self.int_tuple(args.get(3), "tensor stride")?,
        };
        let requires_grad = matches!(args.get(4), Some(Val::Bool(true)));
        let numel = view
            .check(storage_numel, self.limits.tensor_dims)
            .map_err(|e| match e {
                ViewError::Dims(d) => self.limit("tensor dimensions", self.limits.tensor_dims as u64, d as u64),
                ViewError::Overflow => self.err(format!("storage {key}: tensor size overflows")),
                ViewError::BadGeometry(r) => self.err(format!("storage {key}: {r}")),
                ViewError::OutOfBounds { needed, available } => self.err(format!(
                    "storage {key}: the tensor view needs {needed} elements but the storage declares {available}"
                )),
            })?;
        let storage = self.load_storage(&key, dtype, storage_numel)?;
        // What the view would cost materialised, charged as if it were.
        let bytes = numel.saturating_mul(dtype.size_in_bytes() as u64);
        self.charge_tensor_bytes(bytes)?;
        Ok(self.alloc(Node::Tensor(TorchTensor::view(
            dtype,
            &view,
            storage,
            requires_grad,
        ))))
    }

    /// `_rebuild_parameter(data, requires_grad, hooks)`: the tensor, marked trainable.
    fn rebuild_parameter(&mut self, args: &[Val]) -> Result<Val> {
        let Some(&data) = args.first() else {
            return Err(self.err("_rebuild_parameter without arguments"));
        };
        let requires_grad = matches!(args.get(1), Some(Val::Bool(true)));
        match self.node_mut(data) {
            Some(Node::Tensor(t)) => {
                t.requires_grad = requires_grad;
                Ok(data)
            }
            _ => Err(self.err("_rebuild_parameter: argument is not a tensor")),
        }
    }

    fn charge_tensor_bytes(&mut self, bytes: u64) -> Result<()> {
        let total = self.tensor_bytes.saturating_add(bytes);
        if total > self.limits.total_tensor_bytes {
            return Err(self.limit("total tensor bytes", self.limits.total_tensor_bytes, total));
        }
        self.tensor_bytes = total;
        Ok(())
    }

    /// The handle on storage `key`, its size (from the zip directory, no bytes read)
    /// checked against the `numel` the pickle declares.
    fn load_storage(&mut self, key: &str, dtype: TorchDType, numel: u64) -> Result<TorchStorage> {
        if let Some(s) = self.loaded.get(key) {
            return Ok(s.clone());
        }
        let expected = numel.saturating_mul(dtype.size_in_bytes() as u64);
        self.charge_tensor_bytes(expected)?;
        let storage = self.storages.storage(key)?;
        if storage.len() != expected {
            return Err(self.err(format!(
                "storage {key} holds {} bytes but declares {numel} {dtype} elements ({expected} bytes); the checkpoint is corrupt",
                storage.len()
            )));
        }
        self.loaded.insert(key.to_string(), storage.clone());
        Ok(storage)
    }

    /// `BINPERSID` on `('storage', torch.XStorage, key, location, numel)`.
    fn persistent_storage(&self, pid: Val) -> Result<Node> {
        let bad = |why: &str| {
            self.err(format!(
                "persistent id is not a torch storage reference: {why}"
            ))
        };
        let Some(Node::Tuple(items)) = self.node(pid) else {
            return Err(bad("not a tuple"));
        };
        let [tag, class, key, _location, numel] = items.as_slice() else {
            return Err(bad("expected 5 fields"));
        };
        if !matches!(self.node(*tag), Some(Node::Str(s)) if s == "storage") {
            return Err(bad("first field is not 'storage'"));
        }
        let dtype = match self.global_name(*class) {
            Some(("torch", name)) => TorchDType::from_storage_class(name)
                .ok_or_else(|| bad(&format!("unsupported storage type torch.{name}")))?,
            _ => return Err(bad("second field is not a torch storage class")),
        };
        let Some(Node::Str(key)) = self.node(*key) else {
            return Err(bad("key is not a string"));
        };
        let numel = self.int_arg(Some(numel), "storage numel")?;
        let bytes = numel.saturating_mul(dtype.size_in_bytes() as u64);
        if bytes > self.limits.total_tensor_bytes {
            return Err(self.limit("total tensor bytes", self.limits.total_tensor_bytes, bytes));
        }
        Ok(Node::Storage {
            key: key.clone(),
            dtype,
            numel,
        })
    }
}
