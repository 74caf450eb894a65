//! Storages and tensor views: how `_rebuild_tensor_v2` is evaluated without torch.
//!
//! A torch tensor is a view `(storage_offset, size, stride)` into a flat storage saved as
//! the zip entry `<prefix>/data/<key>`. The reader checks that every element the view
//! touches lies inside the storage when the pickle is read; the bytes are taken only when
//! asked for, as a slice of the storage when the view is row-major contiguous, copied
//! out element by element otherwise.

use super::value::TorchDType;

/// Why a view cannot be taken; the interpreter turns it into a positioned error.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ViewError {
    /// Too many dimensions.
    Dims(usize),
    /// The element count or byte size overflows.
    Overflow,
    /// A negative size or stride, or size and stride of different lengths.
    BadGeometry(String),
    /// The view reaches past the storage.
    OutOfBounds { needed: u64, available: u64 },
}

impl std::fmt::Display for ViewError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ViewError::Dims(d) => write!(f, "{d} dimensions"),
            ViewError::Overflow => f.write_str("the tensor size overflows"),
            ViewError::BadGeometry(r) => f.write_str(r),
            ViewError::OutOfBounds { needed, available } => write!(
                f,
                "the view needs {needed} elements but the storage holds {available}"
            ),
        }
    }
}

/// The geometry of a view into a storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct View {
    pub offset: u64,
    pub size: Vec<u64>,
    pub stride: Vec<u64>,
}

impl View {
    /// Checks the view against a storage of `storage_numel` elements and `max_dims`;
    /// returns the element count of the view.
    pub(crate) fn check(&self, storage_numel: u64, max_dims: usize) -> Result<u64, ViewError> {
        if self.size.len() > max_dims {
            return Err(ViewError::Dims(self.size.len()));
        }
        if self.size.len() != self.stride.len() {
            return Err(ViewError::BadGeometry(format!(
                "size has {} dims but stride has {}",
                self.size.len(),
                self.stride.len()
            )));
        }
        let numel = self
            .size
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or(ViewError::Overflow)?;
        if numel == 0 {
            return Ok(0);
        }
        // Highest element index touched: offset + Σ (size_i − 1) · stride_i.
        let last = self
            .size
            .iter()
            .zip(&self.stride)
            .try_fold(self.offset, |acc, (&d, &s)| {
                (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
            })
            .ok_or(ViewError::Overflow)?;
        let needed = last.checked_add(1).ok_or(ViewError::Overflow)?;
        if needed > storage_numel {
            return Err(ViewError::OutOfBounds {
                needed,
                available: storage_numel,
            });
        }
        Ok(numel)
    }

    /// Whether the view is the row-major contiguous layout of its shape.
    pub(crate) fn is_contiguous(&self) -> bool {
        let mut expected = 1u64;
        for (&d, &s) in self.size.iter().zip(&self.stride).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected = expected.saturating_mul(d);
        }
        true
    }

    /// Copies the (already [`check`](Self::check)ed) view of `numel` elements out of
    /// `storage` contiguously.
    pub(crate) fn materialise(&self, storage: &[u8], dtype: TorchDType, numel: u64) -> Vec<u8> {
        let esize = dtype.size_in_bytes();
        let numel = numel as usize;
        if numel == 0 {
            return Vec::new();
        }
        if self.is_contiguous() {
            let start = self.offset as usize * esize;
            return storage[start..start + numel * esize].to_vec();
        }
        let mut out = Vec::with_capacity(numel * esize);
        let dims = self.size.len();
        let mut index = vec![0u64; dims];
        let mut pos = self.offset;
        for _ in 0..numel {
            let at = pos as usize * esize;
            out.extend_from_slice(&storage[at..at + esize]);
            // Advance the multi-index, last dimension fastest.
            for d in (0..dims).rev() {
                index[d] += 1;
                pos += self.stride[d];
                if index[d] < self.size[d] {
                    break;
                }
                pos -= self.stride[d] * index[d];
                index[d] = 0;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(n: u8) -> Vec<u8> {
        (0..n).collect()
    }

    #[test]
    fn transposed_view_is_materialised_row_major() {
        // 2x3 storage [0..6) viewed as its 3x2 transpose.
        let v = View {
            offset: 0,
            size: vec![3, 2],
            stride: vec![1, 3],
        };
        assert_eq!(v.check(6, 8), Ok(6));
        let out = v.materialise(&storage(6), TorchDType::U8, 6);
        assert_eq!(&out[..], &[0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn offset_slice_and_broadcast() {
        let v = View {
            offset: 2,
            size: vec![3],
            stride: vec![1],
        };
        assert_eq!(
            &v.materialise(&storage(6), TorchDType::U8, 3)[..],
            &[2, 3, 4]
        );
        let b = View {
            offset: 1,
            size: vec![2, 2],
            stride: vec![0, 1],
        };
        assert_eq!(b.check(6, 8), Ok(4));
        assert_eq!(
            &b.materialise(&storage(6), TorchDType::U8, 4)[..],
            &[1, 2, 1, 2]
        );
    }

    #[test]
    fn out_of_bounds_and_overflow_are_rejected() {
        let v = View {
            offset: 5,
            size: vec![2],
            stride: vec![1],
        };
        assert_eq!(
            v.check(6, 8),
            Err(ViewError::OutOfBounds {
                needed: 7,
                available: 6
            })
        );
        let huge = View {
            offset: 0,
            size: vec![u64::MAX, 2],
            stride: vec![2, 1],
        };
        assert_eq!(huge.check(6, 8), Err(ViewError::Overflow));
        assert_eq!(huge.check(6, 1), Err(ViewError::Dims(2)));
    }
}
