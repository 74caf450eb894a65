//! The bytes of a tensor: [`TensorBytes`], owned, a verified view of a memory-mapped
//! file, or a snapshot's staging buffer.
//!
//! This module sits below [`crate::state`] and [`crate::snapshot`]: it knows how bytes
//! are held, not what a tensor or a snapshot is.

use std::ops::Deref;
use std::sync::Arc;

use memmap2::MmapMut;

use crate::error::Error;

/// The bytes of one tensor: owned, a verified slice of a memory-mapped file, or
/// a snapshot's staging buffer (see [`crate::BufferPool`]).
///
/// Cloning is cheap (reference counted). Bytes are little-endian, row-major and
/// contiguous, exactly as safetensors stores them; they carry no alignment
/// guarantee, so read elements with `from_le_bytes`, not by casting the slice.
#[derive(Clone)]
pub struct TensorBytes(Repr);

#[derive(Clone)]
enum Repr {
    Owned(Arc<Vec<u8>>),
    Mapped {
        map: Arc<memmap2::Mmap>,
        start: usize,
        len: usize,
    },
    Staged(Arc<Staged>),
}

impl TensorBytes {
    /// Wraps owned bytes.
    pub fn owned(bytes: Vec<u8>) -> Self {
        TensorBytes(Repr::Owned(Arc::new(bytes)))
    }

    /// A view of `len` bytes at `start` inside a shared memory map.
    ///
    /// # Errors
    /// [`Error::TensorOutOfBounds`] when the range does not lie inside the map.
    pub fn mapped(
        map: Arc<memmap2::Mmap>,
        start: usize,
        len: usize,
        tensor: &str,
    ) -> Result<Self, Error> {
        let end = start.checked_add(len);
        match end {
            Some(end) if end <= map.len() => Ok(TensorBytes(Repr::Mapped { map, start, len })),
            _ => Err(Error::TensorOutOfBounds {
                tensor: tensor.to_string(),
                start,
                len,
                file_len: map.len(),
            }),
        }
    }

    /// Bytes in a staging buffer of a [`crate::BufferPool`].
    pub(crate) fn staged(buf: Staged) -> Self {
        TensorBytes(Repr::Staged(Arc::new(buf)))
    }

    /// True when these bytes are in a snapshot's staging buffer (see
    /// [`crate::BufferPool::copy`]).
    pub fn is_staged(&self) -> bool {
        matches!(self.0, Repr::Staged(_))
    }

    /// The staging buffer back, when these bytes are one and no clone shares it.
    pub(crate) fn into_staged(self) -> Option<Staged> {
        match self.0 {
            Repr::Staged(b) => Arc::try_unwrap(b).ok(),
            _ => None,
        }
    }

    /// True when these bytes are a zero-copy view of a memory-mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Repr::Mapped { .. })
    }

    /// The owned buffer back, when these bytes own one and no clone shares it;
    /// `None` for a mapped view, a staging buffer or a shared buffer.
    pub fn into_vec(self) -> Option<Vec<u8>> {
        match self.0 {
            Repr::Owned(v) => Arc::try_unwrap(v).ok(),
            Repr::Mapped { .. } | Repr::Staged(_) => None,
        }
    }
}

impl TensorBytes {
    /// Calls `f` on the bytes, in order, in pieces of at most 32 MiB. For a mapped view
    /// each piece's pages are dropped from the process's resident set after `f` has
    /// seen it (`madvise(MADV_DONTNEED)` on unix), so one pass over a large mapped
    /// tensor (hashing it, copying it into a file) does not keep it resident; the bytes
    /// read back the same afterwards. Other views are passed to `f` whole.
    ///
    /// # Example
    /// ```
    /// use relume_ckpt::TensorBytes;
    /// let bytes = TensorBytes::owned(vec![1, 2, 3]);
    /// let mut sum = 0u32;
    /// bytes.for_each_piece(|p| sum += p.iter().map(|&b| u32::from(b)).sum::<u32>());
    /// assert_eq!(sum, 6);
    /// ```
    pub fn for_each_piece(&self, mut f: impl FnMut(&[u8])) {
        match &self.0 {
            Repr::Mapped { map, start, len } => crate::pages::for_each_piece(map, *start, *len, f),
            _ => f(self),
        }
    }

    /// Drops the pages of bytes `offset..offset + len` of a mapped view from the
    /// resident set (nothing for other views).
    pub(crate) fn release(&self, offset: usize, len: usize) {
        if let Repr::Mapped { map, start, .. } = &self.0 {
            crate::pages::release(map, start + offset, len);
        }
    }
}

impl Deref for TensorBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Owned(v) => v.as_slice(),
            // In bounds: checked in `TensorBytes::mapped`.
            Repr::Mapped { map, start, len } => &map[*start..*start + *len],
            Repr::Staged(b) => b,
        }
    }
}

impl std::fmt::Debug for TensorBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TensorBytes({} bytes{})",
            self.len(),
            if self.is_mapped() { ", mapped" } else { "" }
        )
    }
}

impl PartialEq for TensorBytes {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

/// A snapshot's copy of one large tensor: the first `len` bytes of an anonymous
/// memory map (see [`crate::snapshot`]).
pub(crate) struct Staged {
    /// The buffer; its capacity is `map.len()`.
    pub(crate) map: MmapMut,
    /// Bytes in use, at most `map.len()`.
    pub(crate) len: usize,
}

impl std::ops::Deref for Staged {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // `len <= map.len()`: set only by `BufferPool::copy`.
        &self.map[..self.len]
    }
}
