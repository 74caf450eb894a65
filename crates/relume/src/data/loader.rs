//! The resumable, prefetching [`DataLoader`].
//!
//! ## Design
//! - **Order.** The [`Sampler`] fixes the batches of an epoch from `(seed, epoch)`
//!   alone. Workers load batches in any order; the iterator reorders them by
//!   batch index, so what the caller sees is identical for 0, 1 or N workers.
//! - **Bounded prefetch.** The iterator hands batch indices to the workers itself
//!   and keeps at most `prefetch` batches dispatched but not yet yielded, so
//!   memory is bounded whatever a slow worker does.
//! - **Cursor.** `(epoch, next_batch)` counts batches *consumed by the caller*:
//!   it advances when a batch is yielded, not when it is prefetched. It lives
//!   behind a mutex so the trainer can read it (and `state_dict()`) while an
//!   iterator is alive. When the iterator reports the end of the epoch (returns
//!   `None`) the cursor moves to `(epoch + 1, 0)`; a save made after the last
//!   batch but before that point resumes into an empty remainder of the same
//!   epoch, which then ends normally.
//! - **Errors.** A failed `Dataset::get` or collate is yielded as an `Err` in its
//!   batch position; the iterator then ends and the cursor stays on the failed
//!   batch (it was not consumed), so a resume retries it. A panicking worker is
//!   reported the same way ([`Error::WorkerPanicked`]); with 0 workers a panic
//!   simply unwinds through the caller.
//! - **Shutdown.** Dropping the iterator closes the task queue and the result
//!   queue and joins every worker; a worker in the middle of a batch finishes
//!   it, fails to send it, and exits. No thread outlives the iterator.

use std::any::Any;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use relume_ckpt::{RestoreReport, StateDict, Stateful};

use super::collate::Collate;
use super::dataset::Dataset;
use super::sampler::{EpochOrder, Sampler};
use crate::error::{Error, Result};

/// Loader settings. Build with struct syntax over `Default`, or with the setters.
///
/// # Example
/// ```
/// use relume::data::LoaderConfig;
/// let cfg = LoaderConfig::new(32).shuffle(true).seed(7).num_workers(2);
/// assert_eq!(cfg.batch_size, 32);
/// assert!(cfg.shuffle && !cfg.drop_last);
/// ```
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
    /// Bound of the prefetch queue, in batches; 0 means 2 per worker. Default 0.
    pub prefetch: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 32,
            shuffle: false,
            drop_last: false,
            seed: 0,
            num_workers: 0,
            prefetch: 0,
        }
    }
}

impl LoaderConfig {
    /// The default config with `batch_size` examples per batch.
    pub fn new(batch_size: usize) -> Self {
        LoaderConfig {
            batch_size,
            ..LoaderConfig::default()
        }
    }

    /// Sets the batch size. Default 32.
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Shuffles each epoch. Default false.
    pub fn shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// Drops the last incomplete batch. Default false.
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Sets the shuffle seed. Default 0.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the number of worker threads. Default 0 (load on the calling thread).
    pub fn num_workers(mut self, num_workers: usize) -> Self {
        self.num_workers = num_workers;
        self
    }

    /// Sets the prefetch bound in batches. Default 0 (2 per worker).
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// The prefetch bound in effect: `prefetch`, or `2 * num_workers` when 0,
    /// and never below 1.
    pub fn effective_prefetch(&self) -> usize {
        if self.prefetch == 0 {
            (2 * self.num_workers).max(1)
        } else {
            self.prefetch
        }
    }
}

/// Position of a loader: the epoch and the index of the next batch to yield.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Cursor {
    /// Epoch (0-based).
    pub epoch: u64,
    /// Index of the next batch within the epoch.
    pub next_batch: usize,
}

/// Loads the batch made of the given dataset indices.
type LoadFn<B> = Arc<dyn Fn(&[usize]) -> Result<B> + Send + Sync>;

/// A deterministic, resumable, prefetching loader yielding batches of type `B`.
///
/// # Example
/// ```
/// use relume::data::{DataLoader, LoaderConfig, TensorCollate, TensorDataset};
/// let ds = TensorDataset::new((0..20).map(|v| v as f32).collect(), 2, vec![0; 10]).unwrap();
/// let loader = DataLoader::new(ds, TensorCollate::default(), LoaderConfig::new(4)).unwrap();
/// assert_eq!(loader.batches_per_epoch(), 3);
/// let shapes: Vec<_> = loader
///     .epoch_iter()
///     .unwrap()
///     .map(|b| b.unwrap().0.dims().to_vec())
///     .collect();
/// assert_eq!(shapes, vec![vec![4, 2], vec![4, 2], vec![2, 2]]);
/// assert_eq!(loader.cursor().epoch, 1);
/// ```
pub struct DataLoader<B> {
    load: LoadFn<B>,
    sampler: Sampler,
    num_workers: usize,
    prefetch: usize,
    cursor: Mutex<Cursor>,
}

/// The state keys of a [`DataLoader`], in key order.
const STATE_KEYS: [&str; 7] = [
    "batch_size",
    "dataset_len",
    "drop_last",
    "epoch",
    "next_batch",
    "seed",
    "shuffle",
];

impl<B: Send + 'static> DataLoader<B> {
    /// Builds a loader over `dataset`, batching with `collate`.
    ///
    /// # Errors
    /// [`Error::InvalidHyperParameter`] for a zero batch size.
    pub fn new<D, C>(dataset: D, collate: C, cfg: LoaderConfig) -> Result<Self>
    where
        D: Dataset,
        C: Collate<D::Item, Batch = B>,
    {
        let sampler = Sampler::new(
            dataset.len(),
            cfg.batch_size,
            cfg.shuffle,
            cfg.drop_last,
            cfg.seed,
        )?;
        let load: LoadFn<B> = Arc::new(move |indices: &[usize]| {
            let items = indices
                .iter()
                .map(|&i| dataset.get(i))
                .collect::<Result<Vec<_>>>()?;
            collate.collate(items)
        });
        Ok(DataLoader {
            load,
            sampler,
            num_workers: cfg.num_workers,
            prefetch: cfg.effective_prefetch(),
            cursor: Mutex::new(Cursor::default()),
        })
    }

    /// Batches per epoch (respecting drop_last).
    pub fn batches_per_epoch(&self) -> usize {
        self.sampler.batches_per_epoch()
    }

    /// Number of examples in the dataset.
    pub fn dataset_len(&self) -> usize {
        self.sampler.len()
    }

    /// The sampler (batch size, shuffle, drop_last, seed).
    pub fn sampler(&self) -> &Sampler {
        &self.sampler
    }

    /// The settings in effect (the seed is the restored one after a restore).
    pub fn config(&self) -> LoaderConfig {
        LoaderConfig {
            batch_size: self.sampler.batch_size(),
            shuffle: self.sampler.shuffle(),
            drop_last: self.sampler.drop_last(),
            seed: self.sampler.seed(),
            num_workers: self.num_workers,
            prefetch: self.prefetch,
        }
    }

    /// The current cursor (batches already consumed by the caller this epoch).
    pub fn cursor(&self) -> Cursor {
        *self.cursor.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the cursor (e.g. to the next epoch). A live iterator keeps its own
    /// position and overwrites the cursor with it at its next batch.
    pub fn set_cursor(&self, cursor: Cursor) {
        *self.cursor.lock().unwrap_or_else(|p| p.into_inner()) = cursor;
    }

    /// Iterates over the remaining batches of the cursor's epoch, starting at
    /// `cursor().next_batch`, without loading the skipped ones. Each yielded batch
    /// advances the cursor; the iterator does not borrow the loader mutably, so
    /// `state_dict()` may be called while it is alive. At the end of the epoch the
    /// cursor moves to `(epoch + 1, 0)`.
    ///
    /// # Errors
    /// [`Error::CursorOutOfRange`] when the cursor is past the end of the epoch;
    /// [`Error::WorkerSpawn`] when a worker thread cannot be started.
    pub fn epoch_iter(&self) -> Result<Box<dyn Iterator<Item = Result<B>> + '_>> {
        let cursor = self.cursor();
        let end = self.batches_per_epoch();
        if cursor.next_batch > end {
            return Err(Error::CursorOutOfRange {
                epoch: cursor.epoch,
                next_batch: cursor.next_batch,
                batches_per_epoch: end,
            });
        }
        let order = self.sampler.epoch(cursor.epoch);
        let pos = EpochPos {
            cursor: &self.cursor,
            epoch: cursor.epoch,
            next: cursor.next_batch,
            end,
            done: false,
        };
        if self.num_workers == 0 || cursor.next_batch == end {
            return Ok(Box::new(InlineIter {
                pos,
                order,
                load: Arc::clone(&self.load),
            }));
        }
        Ok(Box::new(PrefetchIter::start(
            pos,
            order,
            Arc::clone(&self.load),
            self.num_workers,
            self.prefetch,
        )?))
    }

    fn saved_value<T: serde::de::DeserializeOwned>(state: &StateDict, key: &str) -> Result<T> {
        Ok(state.require_value(key)?)
    }
}

/// Where an epoch iterator stands, and how it publishes that to the loader.
struct EpochPos<'a> {
    cursor: &'a Mutex<Cursor>,
    epoch: u64,
    next: usize,
    end: usize,
    done: bool,
}

impl EpochPos<'_> {
    fn publish(&self, cursor: Cursor) {
        *self.cursor.lock().unwrap_or_else(|p| p.into_inner()) = cursor;
    }

    /// Records one consumed batch.
    fn advance(&mut self) {
        self.next += 1;
        self.publish(Cursor {
            epoch: self.epoch,
            next_batch: self.next,
        });
    }

    /// Ends the epoch: the cursor moves to the start of the next one.
    fn finish(&mut self) {
        self.done = true;
        self.publish(Cursor {
            epoch: self.epoch + 1,
            next_batch: 0,
        });
    }

    /// Turns one batch result into the iterator's item, updating the cursor.
    fn deliver<B>(&mut self, result: Result<B>) -> Option<Result<B>> {
        match result {
            Ok(batch) => {
                self.advance();
                Some(Ok(batch))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Loads each batch on the calling thread.
struct InlineIter<'a, B> {
    pos: EpochPos<'a>,
    order: EpochOrder,
    load: LoadFn<B>,
}

impl<B> Iterator for InlineIter<'_, B> {
    type Item = Result<B>;

    fn next(&mut self) -> Option<Result<B>> {
        if self.pos.done {
            return None;
        }
        if self.pos.next >= self.pos.end {
            self.pos.finish();
            return None;
        }
        let result = match self.order.batch(self.pos.next) {
            Some(indices) => (self.load)(indices),
            None => Err(out_of_range(&self.pos)),
        };
        self.pos.deliver(result)
    }
}

fn out_of_range(pos: &EpochPos<'_>) -> Error {
    Error::CursorOutOfRange {
        epoch: pos.epoch,
        next_batch: pos.next,
        batches_per_epoch: pos.end,
    }
}

/// Loads batches on worker threads and yields them in batch order.
struct PrefetchIter<'a, B> {
    pos: EpochPos<'a>,
    /// Next batch index to hand to a worker.
    dispatched: usize,
    tasks: Option<Sender<usize>>,
    results: Option<Receiver<(usize, Result<B>)>>,
    /// Batches that arrived ahead of their turn.
    pending: BTreeMap<usize, Result<B>>,
    workers: Vec<JoinHandle<()>>,
}

impl<'a, B: Send + 'static> PrefetchIter<'a, B> {
    fn start(
        pos: EpochPos<'a>,
        order: EpochOrder,
        load: LoadFn<B>,
        num_workers: usize,
        prefetch: usize,
    ) -> Result<Self> {
        let (task_tx, task_rx) = crossbeam_channel::unbounded::<usize>();
        // At most `prefetch` batches are dispatched and not yet yielded, so a
        // worker never blocks on this channel.
        let (result_tx, result_rx) = crossbeam_channel::bounded(prefetch);
        let mut it = PrefetchIter {
            dispatched: pos.next,
            pos,
            tasks: Some(task_tx),
            results: Some(result_rx),
            pending: BTreeMap::new(),
            workers: Vec::with_capacity(num_workers),
        };
        let remaining = it.pos.end - it.pos.next;
        for worker in 0..num_workers.min(remaining) {
            let tasks = task_rx.clone();
            let results = result_tx.clone();
            let order = order.clone();
            let load = Arc::clone(&load);
            let handle = std::thread::Builder::new()
                .name(format!("relume-data-{worker}"))
                .spawn(move || worker_loop(worker, &tasks, &results, &order, &*load))
                // On error `it` is dropped, which joins the workers already started.
                .map_err(|source| Error::WorkerSpawn { worker, source })?;
            it.workers.push(handle);
        }
        for _ in 0..prefetch {
            it.dispatch_one();
        }
        Ok(it)
    }

    fn dispatch_one(&mut self) {
        if self.dispatched >= self.pos.end {
            return;
        }
        if let Some(tx) = &self.tasks {
            // The workers hold the receiver until this iterator drops `tasks`, so
            // the send cannot fail; if every worker died, `recv` below reports it.
            if tx.send(self.dispatched).is_ok() {
                self.dispatched += 1;
            }
        }
    }
}

fn worker_loop<B>(
    worker: usize,
    tasks: &Receiver<usize>,
    results: &Sender<(usize, Result<B>)>,
    order: &EpochOrder,
    load: &(dyn Fn(&[usize]) -> Result<B> + Send + Sync),
) {
    while let Ok(batch) = tasks.recv() {
        let result = match order.batch(batch) {
            Some(indices) => {
                catch_unwind(AssertUnwindSafe(|| load(indices))).unwrap_or_else(|payload| {
                    Err(Error::WorkerPanicked {
                        worker,
                        batch,
                        message: panic_message(payload.as_ref()),
                    })
                })
            }
            None => Err(Error::CursorOutOfRange {
                epoch: order.epoch(),
                next_batch: batch,
                batches_per_epoch: order.num_batches(),
            }),
        };
        if results.send((batch, result)).is_err() {
            break; // the iterator was dropped
        }
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

impl<B: Send + 'static> Iterator for PrefetchIter<'_, B> {
    type Item = Result<B>;

    fn next(&mut self) -> Option<Result<B>> {
        if self.pos.done {
            return None;
        }
        if self.pos.next >= self.pos.end {
            self.pos.finish();
            self.shutdown();
            return None;
        }
        let want = self.pos.next;
        let result = loop {
            if let Some(r) = self.pending.remove(&want) {
                break r;
            }
            let received = self.results.as_ref().map(Receiver::recv);
            match received {
                Some(Ok((batch, r))) => {
                    self.pending.insert(batch, r);
                }
                _ => {
                    break Err(Error::WorkerPanicked {
                        worker: usize::MAX,
                        batch: want,
                        message: "every worker exited before delivering this batch".into(),
                    })
                }
            }
        };
        let item = self.pos.deliver(result);
        if self.pos.done {
            self.shutdown();
        } else {
            self.dispatch_one();
        }
        item
    }
}

impl<B> PrefetchIter<'_, B> {
    /// Closes both queues and joins every worker: idle workers see the closed
    /// task queue, a busy one finishes its batch and fails to send it.
    fn shutdown(&mut self) {
        self.tasks = None;
        self.results = None;
        for handle in self.workers.drain(..) {
            // Batches run under catch_unwind, so a join error means the worker
            // loop itself panicked; nothing is lost, the batch was reported.
            if handle.join().is_err() {
                tracing::warn!("a data loader worker panicked outside a batch");
            }
        }
    }
}

impl<B> Drop for PrefetchIter<'_, B> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl<B: Send + 'static> Stateful for DataLoader<B> {
    type Error = Error;

    /// Keys: `epoch`, `next_batch` (the cursor), `seed`, and the settings that
    /// give the cursor its meaning: `dataset_len`, `batch_size`, `shuffle`,
    /// `drop_last`.
    fn state_dict(&self) -> Result<StateDict> {
        let c = self.cursor();
        let s = &self.sampler;
        let mut sd = StateDict::new();
        sd.insert_json("epoch", serde_json::json!(c.epoch));
        sd.insert_json("next_batch", serde_json::json!(c.next_batch));
        sd.insert_json("seed", serde_json::json!(s.seed()));
        sd.insert_json("dataset_len", serde_json::json!(s.len()));
        sd.insert_json("batch_size", serde_json::json!(s.batch_size()));
        sd.insert_json("shuffle", serde_json::json!(s.shuffle()));
        sd.insert_json("drop_last", serde_json::json!(s.drop_last()));
        Ok(sd)
    }

    /// Restores the cursor and adopts the saved seed, so the resumed epoch has the
    /// saved order. Missing keys are reported and nothing is applied.
    ///
    /// # Errors
    /// [`Error::StateMismatch`] naming every field whose saved value differs from
    /// the live loader (`dataset_len`, `batch_size`, `shuffle`, `drop_last`) or a
    /// saved `next_batch` past the end of the epoch; [`Error::Ckpt`] when a value
    /// has the wrong JSON type.
    fn load_state_dict(&mut self, state: &StateDict) -> Result<RestoreReport> {
        let mut report = RestoreReport::new();
        report.diff_keys(STATE_KEYS, state);
        if !report.missing.is_empty() {
            return Ok(report);
        }
        let epoch: u64 = Self::saved_value(state, "epoch")?;
        let next_batch: usize = Self::saved_value(state, "next_batch")?;
        let seed: u64 = Self::saved_value(state, "seed")?;
        let dataset_len: usize = Self::saved_value(state, "dataset_len")?;
        let batch_size: usize = Self::saved_value(state, "batch_size")?;
        let shuffle: bool = Self::saved_value(state, "shuffle")?;
        let drop_last: bool = Self::saved_value(state, "drop_last")?;

        let live = &self.sampler;
        let mut problems = Vec::new();
        let mut check = |field: &str, saved: String, live: String| {
            if saved != live {
                problems.push(format!("{field}: saved {saved}, live {live}"));
            }
        };
        check(
            "dataset_len",
            dataset_len.to_string(),
            live.len().to_string(),
        );
        check(
            "batch_size",
            batch_size.to_string(),
            live.batch_size().to_string(),
        );
        check("shuffle", shuffle.to_string(), live.shuffle().to_string());
        check(
            "drop_last",
            drop_last.to_string(),
            live.drop_last().to_string(),
        );
        if problems.is_empty() && next_batch > live.batches_per_epoch() {
            problems.push(format!(
                "next_batch: saved {next_batch}, but an epoch has only {} batches",
                live.batches_per_epoch()
            ));
        }
        if !problems.is_empty() {
            return Err(Error::StateMismatch {
                component: "DataLoader".into(),
                problems,
            });
        }
        self.sampler = Sampler::new(dataset_len, batch_size, shuffle, drop_last, seed)?;
        self.set_cursor(Cursor { epoch, next_batch });
        for key in STATE_KEYS {
            report.restored(key);
        }
        Ok(report)
    }
}
