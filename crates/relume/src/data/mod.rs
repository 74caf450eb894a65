//! Datasets, a seeded sampler with a cursor, and a prefetching data loader.
//!
//! INTERFACE SKETCH — the data helper replaces the `todo!()` bodies; signatures
//! may grow but the ones below are what the trainer codes against.

use std::sync::Arc;

use relume_ckpt::{RestoreReport, StateDict, Stateful};

use crate::error::{Error, Result};

/// Random-access data: a length and an item per index.
pub trait Dataset: Send + Sync + 'static {
    /// One example.
    type Item: Send + 'static;
    /// Number of examples.
    fn len(&self) -> usize;
    /// True when empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The example at `index` (`index < len()`).
    ///
    /// # Errors
    /// When the item cannot be read.
    fn get(&self, index: usize) -> Result<Self::Item>;
}

/// Turns a list of items into one batch (e.g. stacks into candle tensors).
pub trait Collate<T>: Send + Sync + 'static {
    /// The batch type.
    type Batch: Send + 'static;
    /// Builds a batch from items in sampler order.
    ///
    /// # Errors
    /// candle errors.
    fn collate(&self, items: Vec<T>) -> Result<Self::Batch>;
}

/// Loader settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Examples per batch. Default 32.
    pub batch_size: usize,
    /// Shuffle each epoch with a permutation that is a pure function of (seed, epoch). Default false.
    pub shuffle: bool,
    /// Drop the last incomplete batch. Default false.
    pub drop_last: bool,
    /// Shuffle seed. Default 0.
    pub seed: u64,
    /// Worker threads prefetching batches; 0 loads on the calling thread. Default 0.
    pub num_workers: usize,
    /// Bound of the prefetch queue, in batches. Default 2 per worker.
    pub prefetch: usize,
}

/// Position of a loader: the epoch and the index of the next batch to yield.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Cursor {
    /// Epoch (0-based).
    pub epoch: u64,
    /// Index of the next batch within the epoch.
    pub next_batch: usize,
}

/// A deterministic, resumable, prefetching loader yielding batches of type `B`.
pub struct DataLoader<B> {
    _inner: Arc<dyn Fn(&[usize]) -> Result<B> + Send + Sync>,
    _cfg: LoaderConfig,
}

impl<B: Send + 'static> DataLoader<B> {
    /// Builds a loader over `dataset`, batching with `collate`.
    ///
    /// # Errors
    /// A zero batch size.
    pub fn new<D, C>(_dataset: D, _collate: C, _cfg: LoaderConfig) -> Result<Self>
    where
        D: Dataset,
        C: Collate<D::Item, Batch = B>,
    {
        todo!()
    }

    /// Batches per epoch (respecting drop_last).
    pub fn batches_per_epoch(&self) -> usize {
        todo!()
    }

    /// The current cursor (batches already consumed by the caller this epoch).
    pub fn cursor(&self) -> Cursor {
        todo!()
    }

    /// Moves the cursor (e.g. to the next epoch).
    pub fn set_cursor(&self, _cursor: Cursor) {
        todo!()
    }

    /// Iterates over the remaining batches of the cursor's epoch, starting at
    /// `cursor().next_batch`, without loading the skipped ones. Each yielded batch
    /// advances the cursor; the iterator does not borrow the loader mutably, so
    /// `state_dict()` may be called while it is alive. At the end of the epoch the
    /// cursor moves to `(epoch + 1, 0)`.
    ///
    /// # Errors
    /// Worker start-up failures.
    pub fn epoch_iter(&self) -> Result<Box<dyn Iterator<Item = Result<B>> + '_>> {
        todo!()
    }
}

impl<B: Send + 'static> Stateful for DataLoader<B> {
    type Error = Error;
    fn state_dict(&self) -> Result<StateDict> {
        todo!()
    }
    fn load_state_dict(&mut self, _state: &StateDict) -> Result<RestoreReport> {
        todo!()
    }
}
