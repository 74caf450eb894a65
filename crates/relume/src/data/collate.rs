//! The [`Collate`] trait: turning a list of items into one batch.

use std::marker::PhantomData;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// Turns a list of items into one batch (e.g. stacks into candle tensors).
///
/// It runs on loader worker threads, so it must be `Send + Sync`, and it must be
/// a pure function of the items: the loader's determinism across worker counts
/// relies on it.
pub trait Collate<T>: Send + Sync + 'static {
    /// The batch type.
    type Batch: Send + 'static;
    /// Builds a batch from items in sampler order.
    ///
    /// # Errors
    /// candle errors, or items that cannot form one batch.
    fn collate(&self, items: Vec<T>) -> Result<Self::Batch>;
}

/// Stacks `(features, label)` items into `(Tensor [B, dim] f32, Tensor [B] u32)`
/// on a device: the collate of [`TensorDataset`](super::TensorDataset) and
/// [`CsvDataset`](super::CsvDataset).
#[derive(Clone, Debug)]
pub struct TensorCollate {
    device: Device,
}

impl TensorCollate {
    /// Batches on `device`.
    pub fn new(device: Device) -> Self {
        TensorCollate { device }
    }

    /// The device batches are built on.
    pub fn device(&self) -> &Device {
        &self.device
    }
}

impl Default for TensorCollate {
    /// Batches on the CPU.
    fn default() -> Self {
        TensorCollate::new(Device::Cpu)
    }
}

impl Collate<(Vec<f32>, u32)> for TensorCollate {
    type Batch = (Tensor, Tensor);

    /// # Errors
    /// [`Error::DatasetShape`] when the items do not all have the same number of
    /// features; candle errors.
    fn collate(&self, items: Vec<(Vec<f32>, u32)>) -> Result<Self::Batch> {
        let b = items.len();
        let dim = items.first().map_or(0, |(x, _)| x.len());
        let mut xs = Vec::with_capacity(b * dim);
        let mut ys = Vec::with_capacity(b);
        for (pos, (x, y)) in items.into_iter().enumerate() {
            if x.len() != dim {
                return Err(Error::DatasetShape {
                    what: format!("features of batch item {pos}"),
                    expected: format!("{dim} values (as item 0)"),
                    got: x.len().to_string(),
                });
            }
            xs.extend_from_slice(&x);
            ys.push(y);
        }
        let x = Tensor::from_vec(xs, (b, dim), &self.device)?;
        let y = Tensor::from_vec(ys, b, &self.device)?;
        Ok((x, y))
    }
}

/// A closure as a [`Collate`]: `FnCollate::new(|items: Vec<T>| -> Result<B> { .. })`.
pub struct FnCollate<F, T, B> {
    f: F,
    _types: PhantomData<fn(Vec<T>) -> B>,
}

impl<F, T, B> FnCollate<F, T, B>
where
    F: Fn(Vec<T>) -> Result<B> + Send + Sync + 'static,
{
    /// Wraps `f`.
    pub fn new(f: F) -> Self {
        FnCollate {
            f,
            _types: PhantomData,
        }
    }
}

impl<F, T, B> Collate<T> for FnCollate<F, T, B>
where
    F: Fn(Vec<T>) -> Result<B> + Send + Sync + 'static,
    T: 'static,
    B: Send + 'static,
{
    type Batch = B;

    fn collate(&self, items: Vec<T>) -> Result<B> {
        (self.f)(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_features_and_labels() {
        let (x, y) = TensorCollate::default()
            .collate(vec![(vec![1.0, 2.0], 3), (vec![4.0, 5.0], 6)])
            .unwrap();
        assert_eq!(x.dims(), &[2, 2]);
        assert_eq!(
            x.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 2.0], vec![4.0, 5.0]]
        );
        assert_eq!(y.to_vec1::<u32>().unwrap(), vec![3, 6]);
    }

    #[test]
    fn ragged_items_are_dataset_shape() {
        let err = TensorCollate::default()
            .collate(vec![(vec![1.0, 2.0], 3), (vec![4.0], 6)])
            .unwrap_err();
        assert!(
            matches!(err, Error::DatasetShape { ref what, .. } if what == "features of batch item 1")
        );
    }

    #[test]
    fn fn_collate_calls_the_closure() {
        let c = FnCollate::new(|items: Vec<usize>| Ok(items.iter().sum::<usize>()));
        assert_eq!(c.collate(vec![1, 2, 3]).unwrap(), 6);
    }
}
