//! Datasets, a seeded sampler with a cursor, and a prefetching data loader.
//!
//! - [`Dataset`]: random access by index; [`TensorDataset`] holds examples in
//!   memory, [`CsvDataset`] reads them from a numeric CSV file.
//! - [`Collate`]: turns the items of a batch into one batch value;
//!   [`TensorCollate`] stacks `(features, label)` items into candle tensors.
//! - [`Sampler`]: the order of epoch `e` is a pure function of `(seed, e)`, so a
//!   loader's whole position is a [`Cursor`] `(epoch, next_batch)` plus the seed.
//! - [`DataLoader`]: yields the batches of an epoch in a deterministic order
//!   whatever its number of worker threads, and resumes mid-epoch from its
//!   [`Stateful`](relume_ckpt::Stateful) state without loading skipped batches.
//!
//! # Example
//! ```
//! use relume::data::{DataLoader, LoaderConfig, TensorCollate, TensorDataset};
//! use relume_ckpt::Stateful;
//!
//! let ds = TensorDataset::new((0..40).map(|v| v as f32).collect(), 4, (0..10).collect()).unwrap();
//! let cfg = LoaderConfig::new(3).shuffle(true).seed(1).num_workers(2);
//! let loader = DataLoader::new(ds.clone(), TensorCollate::default(), cfg.clone()).unwrap();
//! let mut it = loader.epoch_iter().unwrap();
//! let _first = it.next().unwrap().unwrap();
//! let saved = loader.state_dict().unwrap(); // mid-epoch, iterator still alive
//! drop(it);
//!
//! let mut resumed = DataLoader::new(ds, TensorCollate::default(), cfg).unwrap();
//! assert!(resumed.load_state_dict(&saved).unwrap().is_clean());
//! assert_eq!(resumed.epoch_iter().unwrap().count(), 3); // the 3 remaining batches
//! ```

mod collate;
mod csv;
mod dataset;
mod loader;
mod sampler;

pub use collate::{Collate, FnCollate, TensorCollate};
pub use csv::{CsvDataset, CsvOptions};
pub use dataset::{Dataset, TensorDataset};
pub use loader::{Cursor, DataLoader, LoaderConfig};
pub use sampler::{EpochOrder, Sampler, SHUFFLE_STREAM};
