//! The [`Dataset`] trait and the in-memory [`TensorDataset`].

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// Random-access data: a length and an item per index.
///
/// `get` may be called from several loader worker threads at once, so a dataset
/// is `Send + Sync`; it is never asked for an index `>= len()` by the loader.
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

/// A shared dataset is a dataset: hand a loader an `Arc<D>` and keep a handle.
impl<D: Dataset> Dataset for Arc<D> {
    type Item = D::Item;
    fn len(&self) -> usize {
        (**self).len()
    }
    fn get(&self, index: usize) -> Result<Self::Item> {
        (**self).get(index)
    }
}

/// In-memory examples: a row-major f32 feature matrix `[n, dim]` and one class
/// label per row. An item is `(features of the row, label)`; batch items with
/// [`TensorCollate`](super::TensorCollate).
///
/// # Example
/// ```
/// use relume::data::{Dataset, TensorDataset};
/// let ds = TensorDataset::new(vec![0.0, 16.0, 8.0, 4.0], 2, vec![1, 0]).unwrap();
/// let ds = ds.scaled(1.0 / 16.0);
/// assert_eq!(ds.get(0).unwrap(), (vec![0.0, 1.0], 1));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct TensorDataset {
    features: Vec<f32>,
    dim: usize,
    labels: Vec<u32>,
}

impl TensorDataset {
    /// A dataset of `labels.len()` rows of `dim` features each.
    ///
    /// # Errors
    /// [`Error::DatasetShape`] when `dim` is 0 or `features.len() != labels.len() * dim`.
    pub fn new(features: Vec<f32>, dim: usize, labels: Vec<u32>) -> Result<Self> {
        if dim == 0 {
            return Err(Error::DatasetShape {
                what: "feature dimension".into(),
                expected: "> 0".into(),
                got: "0".into(),
            });
        }
        let want = labels.len().checked_mul(dim);
        if want != Some(features.len()) {
            return Err(Error::DatasetShape {
                what: "feature count".into(),
                expected: format!("{} rows x {dim} = {:?}", labels.len(), want),
                got: features.len().to_string(),
            });
        }
        Ok(TensorDataset {
            features,
            dim,
            labels,
        })
    }

    /// A dataset from a float feature tensor `[n, dim]` (converted to f32) and a
    /// label tensor `[n]` of dtype u32, u8 or i64 (every label must fit in u32).
    ///
    /// # Errors
    /// [`Error::DatasetShape`] for a wrong rank, length, label dtype or a
    /// negative label; candle errors.
    pub fn from_tensors(features: &Tensor, labels: &Tensor) -> Result<Self> {
        let (n, dim) = match features.dims() {
            [n, d] => (*n, *d),
            other => {
                return Err(Error::DatasetShape {
                    what: "features shape".into(),
                    expected: "[n, dim]".into(),
                    got: format!("{other:?}"),
                })
            }
        };
        if labels.dims() != [n] {
            return Err(Error::DatasetShape {
                what: "labels shape".into(),
                expected: format!("[{n}]"),
                got: format!("{:?}", labels.dims()),
            });
        }
        let feats = features
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let labs: Vec<u32> = match labels.dtype() {
            DType::U32 => labels.to_vec1::<u32>()?,
            DType::U8 => labels.to_vec1::<u8>()?.into_iter().map(u32::from).collect(),
            DType::I64 => labels
                .to_vec1::<i64>()?
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    u32::try_from(v).map_err(|_| Error::DatasetShape {
                        what: format!("label at index {i}"),
                        expected: "an integer in 0..=4294967295".into(),
                        got: v.to_string(),
                    })
                })
                .collect::<Result<_>>()?,
            other => {
                return Err(Error::DatasetShape {
                    what: "labels dtype".into(),
                    expected: "u32, u8 or i64".into(),
                    got: format!("{other:?}"),
                })
            }
        };
        TensorDataset::new(feats, dim, labs)
    }

    /// Features per example.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The row-major feature matrix `[len, dim]`.
    pub fn features(&self) -> &[f32] {
        &self.features
    }

    /// The label of every example.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// The features of example `index`, or `None` past the end.
    pub fn row(&self, index: usize) -> Option<&[f32]> {
        let start = index.checked_mul(self.dim)?;
        self.features.get(start..start.checked_add(self.dim)?)
    }

    /// `1 + the largest label`, or 0 for an empty dataset.
    pub fn num_classes(&self) -> usize {
        self.labels.iter().max().map_or(0, |m| *m as usize + 1)
    }

    /// Multiplies every feature by `factor` in place (e.g. `1.0 / 16.0` maps the
    /// digits pixels 0..16 onto 0..1).
    pub fn scale(&mut self, factor: f32) {
        for v in &mut self.features {
            *v *= factor;
        }
    }

    /// [`scale`](Self::scale), by value.
    pub fn scaled(mut self, factor: f32) -> Self {
        self.scale(factor);
        self
    }

    /// The examples at `indices`, in that order.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for an index `>= len()`.
    pub fn subset(&self, indices: &[usize]) -> Result<Self> {
        let mut features = Vec::with_capacity(indices.len() * self.dim);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let (Some(row), Some(label)) = (self.row(i), self.labels.get(i)) else {
                return Err(Error::IndexOutOfRange {
                    index: i,
                    len: self.len(),
                });
            };
            features.extend_from_slice(row);
            labels.push(*label);
        }
        TensorDataset::new(features, self.dim, labels)
    }

    /// A deterministic train/validation split: a permutation drawn from
    /// `Rng::for_index(seed, "data/split", 0)` sends `round(train_fraction * len)`
    /// examples to the first part and the rest to the second. Each part keeps the
    /// original relative order of its examples; the same `(seed, fraction)`
    /// always gives the same split.
    ///
    /// # Errors
    /// [`Error::InvalidHyperParameter`] unless `0 <= train_fraction <= 1`.
    pub fn split(&self, train_fraction: f64, seed: u64) -> Result<(Self, Self)> {
        if !(0.0..=1.0).contains(&train_fraction) {
            return Err(Error::InvalidHyperParameter {
                component: "TensorDataset::split".into(),
                what: "train_fraction".into(),
                value: train_fraction,
                rule: "in [0, 1]".into(),
            });
        }
        let n = self.len();
        let n_train = ((train_fraction * n as f64).round() as usize).min(n);
        let mut perm: Vec<usize> = (0..n).collect();
        Rng::for_index(seed, "data/split", 0).shuffle(&mut perm);
        let (train, val) = perm.split_at_mut(n_train);
        train.sort_unstable();
        val.sort_unstable();
        Ok((self.subset(train)?, self.subset(val)?))
    }

    /// The whole dataset as `(features [len, dim] f32, labels [len] u32)` on
    /// `device` (handy for a full-batch evaluation).
    ///
    /// # Errors
    /// candle errors.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let x = Tensor::from_slice(&self.features, (self.len(), self.dim), device)?;
        let y = Tensor::from_slice(&self.labels, self.len(), device)?;
        Ok((x, y))
    }
}

impl Dataset for TensorDataset {
    type Item = (Vec<f32>, u32);

    fn len(&self) -> usize {
        self.labels.len()
    }

    fn get(&self, index: usize) -> Result<Self::Item> {
        match (self.row(index), self.labels.get(index)) {
            (Some(row), Some(label)) => Ok((row.to_vec(), *label)),
            _ => Err(Error::IndexOutOfRange {
                index,
                len: self.len(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(n: usize) -> TensorDataset {
        let feats = (0..n * 3).map(|v| v as f32).collect();
        TensorDataset::new(feats, 3, (0..n as u32).map(|v| v % 4).collect()).unwrap()
    }

    #[test]
    fn get_returns_rows_and_labels() {
        let d = ds(5);
        assert_eq!(d.len(), 5);
        assert_eq!(d.get(2).unwrap(), (vec![6.0, 7.0, 8.0], 2));
        assert_eq!(d.num_classes(), 4);
    }

    #[test]
    fn get_past_the_end_is_index_out_of_range() {
        let err = ds(5).get(5).unwrap_err();
        assert!(matches!(err, Error::IndexOutOfRange { index: 5, len: 5 }));
        assert!(matches!(
            ds(5).subset(&[1, 9]).unwrap_err(),
            Error::IndexOutOfRange { index: 9, len: 5 }
        ));
    }

    #[test]
    fn wrong_feature_count_is_dataset_shape() {
        let err = TensorDataset::new(vec![0.0; 7], 3, vec![0, 1]).unwrap_err();
        assert!(matches!(err, Error::DatasetShape { ref what, .. } if what == "feature count"));
        assert!(TensorDataset::new(vec![], 0, vec![]).is_err());
    }

    #[test]
    fn from_tensors_converts_i64_labels_and_rejects_negatives() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((3, 2))
            .unwrap();
        let y = Tensor::new(&[2i64, 0, 1], &dev).unwrap();
        let d = TensorDataset::from_tensors(&x, &y).unwrap();
        assert_eq!(d.get(2).unwrap(), (vec![4.0, 5.0], 1));
        let bad = Tensor::new(&[2i64, -1, 1], &dev).unwrap();
        let err = TensorDataset::from_tensors(&x, &bad).unwrap_err();
        assert!(
            matches!(err, Error::DatasetShape { ref what, ref got, .. } if what == "label at index 1" && got == "-1")
        );
        let short = Tensor::new(&[2u32, 0], &dev).unwrap();
        assert!(TensorDataset::from_tensors(&x, &short).is_err());
        let (tx, ty) = d.to_tensors(&dev).unwrap();
        assert_eq!(tx.to_vec2::<f32>().unwrap(), x.to_vec2::<f32>().unwrap());
        assert_eq!(ty.to_vec1::<u32>().unwrap(), vec![2, 0, 1]);
    }

    #[test]
    fn split_is_deterministic_disjoint_and_complete() {
        let d = ds(50);
        let (a, b) = d.split(0.8, 9).unwrap();
        assert_eq!((a.len(), b.len()), (40, 10));
        assert_eq!(d.split(0.8, 9).unwrap(), (a.clone(), b.clone()));
        assert_ne!(d.split(0.8, 10).unwrap().1, b);
        // rows are unique (first feature = 3 * index), so the parts partition the set
        let mut firsts: Vec<f32> = a
            .features()
            .chunks(3)
            .chain(b.features().chunks(3))
            .map(|r| r[0])
            .collect();
        firsts.sort_by(f32::total_cmp);
        let all: Vec<f32> = (0..50).map(|i| (3 * i) as f32).collect();
        assert_eq!(firsts, all);
        let err = d.split(1.5, 0).unwrap_err();
        assert!(matches!(err, Error::InvalidHyperParameter { .. }));
    }

    #[test]
    fn scale_multiplies_features() {
        let d = ds(2).scaled(0.5);
        assert_eq!(d.row(1).unwrap(), &[1.5, 2.0, 2.5]);
    }
}
