//! The order of an epoch, as a pure function of `(seed, epoch)`.
//!
//! A [`Sampler`] holds no position: the permutation of epoch `e` is drawn from
//! `Rng::for_index(seed, "data", e)`, so any process can recompute the order of
//! any epoch, and a resumed loader only needs the cursor and the seed. Batch `b`
//! of an epoch is the slice `order[b * batch_size .. (b + 1) * batch_size]`, so
//! skipping to batch `b` costs one permutation of indices and loads no data.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::rng::Rng;

/// Name of the [`Rng`] stream the shuffle is drawn from.
pub const SHUFFLE_STREAM: &str = "data";

/// Decides which dataset indices form each batch of each epoch.
///
/// # Example
/// ```
/// use relume::data::Sampler;
/// let s = Sampler::new(10, 4, true, false, 7).unwrap();
/// assert_eq!(s.batches_per_epoch(), 3);
/// let e0 = s.epoch(0);
/// assert_eq!(e0.batch(2).unwrap().len(), 2);
/// assert_eq!(s.epoch(0).indices(), e0.indices()); // pure function of (seed, epoch)
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sampler {
    len: usize,
    batch_size: usize,
    shuffle: bool,
    drop_last: bool,
    seed: u64,
}

impl Sampler {
    /// A sampler over `len` examples.
    ///
    /// # Errors
    /// [`Error::InvalidHyperParameter`] when `batch_size` is 0.
    pub fn new(
        len: usize,
        batch_size: usize,
        shuffle: bool,
        drop_last: bool,
        seed: u64,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(Error::InvalidHyperParameter {
                component: "Sampler".into(),
                what: "batch_size".into(),
                value: 0.0,
                rule: "> 0".into(),
            });
        }
        Ok(Sampler {
            len,
            batch_size,
            shuffle,
            drop_last,
            seed,
        })
    }

    /// Number of examples in the dataset.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the dataset is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Examples per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Whether each epoch is shuffled.
    pub fn shuffle(&self) -> bool {
        self.shuffle
    }

    /// Whether the last incomplete batch is dropped.
    pub fn drop_last(&self) -> bool {
        self.drop_last
    }

    /// Shuffle seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Batches in one epoch: `len / batch_size`, rounded up unless `drop_last`.
    pub fn batches_per_epoch(&self) -> usize {
        if self.drop_last {
            self.len / self.batch_size
        } else {
            self.len.div_ceil(self.batch_size)
        }
    }

    /// The order of `epoch`: `0..len` when shuffle is off, otherwise a
    /// Fisher–Yates permutation drawn from `Rng::for_index(seed, "data", epoch)`.
    /// Costs O(len) index operations and touches no data.
    pub fn epoch(&self, epoch: u64) -> EpochOrder {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            Rng::for_index(self.seed, SHUFFLE_STREAM, epoch).shuffle(&mut order);
        }
        EpochOrder {
            epoch,
            order: order.into(),
            batch_size: self.batch_size,
            num_batches: self.batches_per_epoch(),
        }
    }
}

/// The fixed order of one epoch, cheap to clone and share with worker threads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochOrder {
    epoch: u64,
    order: Arc<[usize]>,
    batch_size: usize,
    num_batches: usize,
}

impl EpochOrder {
    /// The epoch this order belongs to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Every dataset index of the epoch, in order (including a dropped tail).
    pub fn indices(&self) -> &[usize] {
        &self.order
    }

    /// Batches in the epoch.
    pub fn num_batches(&self) -> usize {
        self.num_batches
    }

    /// The dataset indices of batch `batch`, or `None` past the end of the epoch.
    pub fn batch(&self, batch: usize) -> Option<&[usize]> {
        if batch >= self.num_batches {
            return None;
        }
        let start = batch * self.batch_size;
        let end = (start + self.batch_size).min(self.order.len());
        self.order.get(start..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_order_and_last_partial_batch() {
        let s = Sampler::new(10, 4, false, false, 0).unwrap();
        let e = s.epoch(3);
        assert_eq!(e.num_batches(), 3);
        assert_eq!(e.batch(0).unwrap(), &[0, 1, 2, 3]);
        assert_eq!(e.batch(2).unwrap(), &[8, 9]);
        assert_eq!(e.batch(3), None);
    }

    #[test]
    fn drop_last_counts() {
        let cases = [
            (10, 4, false, 3),
            (10, 4, true, 2),
            (8, 4, true, 2),
            (8, 4, false, 2),
            (3, 4, true, 0),
            (3, 4, false, 1),
            (0, 4, false, 0),
        ];
        for (len, bs, drop, want) in cases {
            let s = Sampler::new(len, bs, false, drop, 0).unwrap();
            assert_eq!(s.batches_per_epoch(), want, "len {len} bs {bs} drop {drop}");
            assert_eq!(s.epoch(0).num_batches(), want);
        }
        let s = Sampler::new(10, 4, false, true, 0).unwrap();
        assert_eq!(s.epoch(0).batch(1).unwrap(), &[4, 5, 6, 7]);
        assert_eq!(s.epoch(0).batch(2), None);
    }

    #[test]
    fn shuffle_is_a_pure_function_of_seed_and_epoch() {
        let s = Sampler::new(100, 8, true, false, 42).unwrap();
        let a0 = s.epoch(0);
        let a1 = s.epoch(1);
        assert_eq!(a0, s.epoch(0));
        assert_ne!(a0.indices(), a1.indices());
        assert_ne!(a0.indices(), (0..100).collect::<Vec<_>>().as_slice());
        let mut sorted = a1.indices().to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        let other_seed = Sampler::new(100, 8, true, false, 43).unwrap();
        assert_ne!(other_seed.epoch(0).indices(), a0.indices());
    }

    #[test]
    fn zero_batch_size_is_an_error() {
        let err = Sampler::new(10, 0, false, false, 0).unwrap_err();
        assert!(
            matches!(err, Error::InvalidHyperParameter { ref what, .. } if what == "batch_size")
        );
    }
}
