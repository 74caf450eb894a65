//! Contract tests of the data loader: exact mid-epoch resume, determinism across
//! worker counts, error propagation, state mismatches, and the CSV reader.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::Tensor;
use relume::data::{
    Collate, CsvDataset, Cursor, DataLoader, Dataset, FnCollate, LoaderConfig, TensorCollate,
    TensorDataset,
};
use relume::Error;
use relume_ckpt::Stateful;

/// Features `[i, i / 2, -i]`, label `i % 10`; counts `get` calls; fails or
/// panics at chosen indices.
struct Probe {
    len: usize,
    gets: Arc<AtomicUsize>,
    fail_at: Option<usize>,
    panic_at: Option<usize>,
    /// Sleep a little on some indices so workers finish out of order.
    jitter: bool,
}

impl Probe {
    fn new(len: usize) -> (Self, Arc<AtomicUsize>) {
        let gets = Arc::new(AtomicUsize::new(0));
        let p = Probe {
            len,
            gets: Arc::clone(&gets),
            fail_at: None,
            panic_at: None,
            jitter: false,
        };
        (p, gets)
    }
}

impl Dataset for Probe {
    type Item = (Vec<f32>, u32);
    fn len(&self) -> usize {
        self.len
    }
    fn get(&self, i: usize) -> relume::Result<Self::Item> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        if self.fail_at == Some(i) {
            return Err(Error::IndexOutOfRange { index: i, len: 999 });
        }
        if self.panic_at == Some(i) {
            panic!("probe panics at {i}");
        }
        if self.jitter && i % 3 == 0 {
            std::thread::sleep(std::time::Duration::from_micros(300 * (i % 7) as u64));
        }
        let x = i as f32;
        Ok((vec![x, x / 2.0, -x], (i % 10) as u32))
    }
}

type Rows = (Vec<Vec<f32>>, Vec<u32>);

fn rows(batch: (Tensor, Tensor)) -> Rows {
    (
        batch.0.to_vec2::<f32>().unwrap(),
        batch.1.to_vec1::<u32>().unwrap(),
    )
}

fn loader(len: usize, cfg: LoaderConfig) -> (DataLoader<(Tensor, Tensor)>, Arc<AtomicUsize>) {
    let (p, gets) = Probe::new(len);
    (
        DataLoader::new(p, TensorCollate::default(), cfg).unwrap(),
        gets,
    )
}

fn collect(l: &DataLoader<(Tensor, Tensor)>) -> Vec<Rows> {
    l.epoch_iter().unwrap().map(|b| rows(b.unwrap())).collect()
}

fn cfg(workers: usize) -> LoaderConfig {
    LoaderConfig::new(4)
        .shuffle(true)
        .seed(11)
        .num_workers(workers)
}

#[test]
fn restore_at_every_cursor_position_yields_the_rest_of_the_epoch() {
    for workers in [0, 3] {
        let (full, _) = loader(23, cfg(workers));
        full.set_cursor(Cursor {
            epoch: 1,
            next_batch: 0,
        });
        let expected = collect(&full);
        let nb = full.batches_per_epoch();
        assert_eq!((expected.len(), nb), (6, 6));
        for k in 0..=nb {
            // First process: consume k batches, save while the iterator is alive.
            let (first, _) = loader(23, cfg(workers));
            first.set_cursor(Cursor {
                epoch: 1,
                next_batch: 0,
            });
            let mut it = first.epoch_iter().unwrap();
            let mut seen: Vec<Rows> = (0..k).map(|_| rows(it.next().unwrap().unwrap())).collect();
            let saved = first.state_dict().unwrap();
            assert_eq!(
                first.cursor(),
                Cursor {
                    epoch: 1,
                    next_batch: k
                }
            );
            drop(it);

            // Second process: restore and finish the epoch.
            let (mut second, gets) = loader(23, cfg(workers));
            let report = second.load_state_dict(&saved).unwrap();
            assert!(report.is_clean(), "{report:?}");
            seen.extend(collect(&second));
            assert_eq!(seen, expected, "workers {workers}, resumed at batch {k}");
            // Only the remaining batches were loaded: 4 per batch, 3 in the last.
            let remaining_items = 23 - (4 * k).min(23);
            assert_eq!(
                gets.load(Ordering::SeqCst),
                remaining_items,
                "resumed at {k}"
            );
            assert_eq!(
                second.cursor(),
                Cursor {
                    epoch: 2,
                    next_batch: 0
                }
            );
        }
    }
}

#[test]
fn one_and_four_workers_give_identical_batches() {
    let runs: Vec<Vec<Rows>> = [0, 1, 4]
        .into_iter()
        .map(|w| {
            let (l, _) = loader(
                50,
                cfg(w).batch_size(3).prefetch(if w == 4 { 5 } else { 0 }),
            );
            let mut all = collect(&l);
            all.extend(collect(&l)); // epoch 1
            all
        })
        .collect();
    assert_eq!(runs[0].len(), 2 * 17);
    assert_eq!(runs[1], runs[0]);
    assert_eq!(runs[2], runs[0]);
}

#[test]
fn out_of_order_workers_still_yield_in_batch_order() {
    let expected = {
        let (l, _) = loader(60, cfg(0).batch_size(2));
        collect(&l)
    };
    for workers in [2, 4] {
        let (mut p, _) = Probe::new(60);
        p.jitter = true;
        let l = DataLoader::new(p, TensorCollate::default(), cfg(workers).batch_size(2)).unwrap();
        assert_eq!(collect(&l), expected, "{workers} workers");
    }
}

#[test]
fn epochs_shuffle_differently_but_reproducibly() {
    let (a, _) = loader(40, cfg(2));
    let e0 = collect(&a);
    let e1 = collect(&a);
    assert_ne!(e0, e1);
    let (b, _) = loader(40, cfg(0));
    assert_eq!(collect(&b), e0);
    assert_eq!(collect(&b), e1);
    // Every example appears once per epoch.
    let mut labels: Vec<f32> = e1.iter().flat_map(|r| r.0.iter().map(|x| x[0])).collect();
    labels.sort_by(f32::total_cmp);
    assert_eq!(labels, (0..40).map(|i| i as f32).collect::<Vec<_>>());
    // Without shuffle the order is sequential.
    let (s, _) = loader(10, LoaderConfig::new(4));
    let firsts: Vec<f32> = collect(&s)
        .iter()
        .flat_map(|r| r.0.iter().map(|x| x[0]))
        .collect();
    assert_eq!(firsts, (0..10).map(|i| i as f32).collect::<Vec<_>>());
}

#[test]
fn drop_last_counts_and_sizes() {
    for (drop_last, workers, sizes) in [
        (false, 0, vec![4, 4, 2]),
        (true, 0, vec![4, 4]),
        (true, 2, vec![4, 4]),
    ] {
        let (l, gets) = loader(10, cfg(workers).drop_last(drop_last));
        let got: Vec<usize> = collect(&l).iter().map(|r| r.1.len()).collect();
        assert_eq!(got, sizes);
        assert_eq!(l.batches_per_epoch(), sizes.len());
        assert_eq!(gets.load(Ordering::SeqCst), sizes.iter().sum::<usize>());
    }
}

#[test]
fn cursor_is_readable_mid_epoch_and_moves_to_next_epoch_at_the_end() {
    let (l, _) = loader(10, cfg(2));
    let mut it = l.epoch_iter().unwrap();
    assert_eq!(l.cursor(), Cursor::default());
    it.next().unwrap().unwrap();
    it.next().unwrap().unwrap();
    it.next().unwrap().unwrap();
    // All batches consumed, end not yet reported: still epoch 0.
    assert_eq!(
        l.cursor(),
        Cursor {
            epoch: 0,
            next_batch: 3
        }
    );
    assert!(it.next().is_none());
    assert_eq!(
        l.cursor(),
        Cursor {
            epoch: 1,
            next_batch: 0
        }
    );
    assert!(it.next().is_none());
    assert_eq!(
        l.cursor(),
        Cursor {
            epoch: 1,
            next_batch: 0
        }
    );
}

#[test]
fn dropping_the_iterator_early_stops_the_workers() {
    let (l, gets) = loader(200, cfg(4).batch_size(2).prefetch(3));
    for _ in 0..20 {
        let mut it = l.epoch_iter().unwrap();
        it.next().unwrap().unwrap();
        drop(it);
    }
    // 20 iterators each consumed one batch; prefetch bounded the rest.
    assert_eq!(
        l.cursor(),
        Cursor {
            epoch: 0,
            next_batch: 20
        }
    );
    // Each iterator dispatched at most prefetch + 1 batches of 2 items.
    let loaded = gets.load(Ordering::SeqCst);
    assert!(
        loaded <= 20 * 4 * 2,
        "prefetch was not bounded: {loaded} items"
    );
    assert_eq!(l.epoch_iter().unwrap().count(), 80);
}

#[test]
fn dataset_errors_are_yielded_in_order_and_end_the_epoch() {
    for workers in [0, 4] {
        let (mut p, _) = Probe::new(20);
        p.fail_at = Some(9); // sequential order: batch 2 (items 8..12)
        let l = DataLoader::new(
            p,
            TensorCollate::default(),
            LoaderConfig::new(4).num_workers(workers),
        )
        .unwrap();
        let mut it = l.epoch_iter().unwrap();
        assert!(it.next().unwrap().is_ok());
        assert!(it.next().unwrap().is_ok());
        let err = it.next().unwrap().unwrap_err();
        assert!(
            matches!(err, Error::IndexOutOfRange { index: 9, .. }),
            "{err}"
        );
        assert!(it.next().is_none());
        drop(it);
        // The failed batch was not consumed: a resume retries it.
        assert_eq!(
            l.cursor(),
            Cursor {
                epoch: 0,
                next_batch: 2
            }
        );
    }
}

#[test]
fn a_panicking_worker_is_worker_panicked() {
    let (mut p, _) = Probe::new(20);
    p.panic_at = Some(5);
    let l = DataLoader::new(
        p,
        TensorCollate::default(),
        LoaderConfig::new(4).num_workers(2),
    )
    .unwrap();
    let items: Vec<_> = l.epoch_iter().unwrap().collect();
    assert_eq!(items.len(), 2);
    assert!(items[0].is_ok());
    let err = items[1].as_ref().unwrap_err();
    assert!(
        matches!(err, Error::WorkerPanicked { batch: 1, message, .. } if message.contains("probe panics at 5")),
        "{err}"
    );
}

#[test]
fn cursor_past_the_end_is_cursor_out_of_range() {
    let (l, _) = loader(10, cfg(0));
    l.set_cursor(Cursor {
        epoch: 3,
        next_batch: 4,
    });
    let err = l.epoch_iter().err().unwrap();
    assert!(matches!(
        err,
        Error::CursorOutOfRange {
            epoch: 3,
            next_batch: 4,
            batches_per_epoch: 3
        }
    ));
}

#[test]
fn restoring_into_a_different_loader_is_state_mismatch_naming_each_field() {
    let (l, _) = loader(23, cfg(0));
    let saved = l.state_dict().unwrap();
    let (mut other, _) = loader(30, cfg(0).batch_size(5).drop_last(true));
    let err = other.load_state_dict(&saved).unwrap_err();
    let Error::StateMismatch {
        component,
        problems,
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!(component, "DataLoader");
    assert_eq!(
        problems,
        &vec![
            "dataset_len: saved 23, live 30".to_string(),
            "batch_size: saved 4, live 5".to_string(),
            "drop_last: saved false, live true".to_string(),
        ]
    );
    // Nothing was applied.
    assert_eq!(other.cursor(), Cursor::default());
    let (mut unshuffled, _) = loader(23, cfg(0).shuffle(false));
    let err = unshuffled.load_state_dict(&saved).unwrap_err();
    assert!(
        err.to_string().contains("shuffle: saved true, live false"),
        "{err}"
    );
}

#[test]
fn restore_adopts_the_saved_seed_and_reports_missing_keys() {
    let (l, _) = loader(23, cfg(0).seed(5));
    let expected = collect(&l);
    l.set_cursor(Cursor::default());
    let saved = l.state_dict().unwrap();
    let (mut other, _) = loader(23, cfg(0).seed(6));
    assert!(other.load_state_dict(&saved).unwrap().is_clean());
    assert_eq!(other.config().seed, 5);
    assert_eq!(collect(&other), expected);

    let mut partial = saved.clone();
    partial.remove("seed");
    let (mut third, _) = loader(23, cfg(0));
    let report = third.load_state_dict(&partial).unwrap();
    assert_eq!(report.missing, vec!["seed".to_string()]);
    assert!(report.restored.is_empty());
}

#[test]
fn fn_collate_batches_arbitrary_items() {
    let (p, _) = Probe::new(7);
    let c = FnCollate::new(|items: Vec<(Vec<f32>, u32)>| {
        Ok(items.iter().map(|(_, y)| *y).collect::<Vec<u32>>())
    });
    assert_eq!(c.collate(vec![(vec![], 3)]).unwrap(), vec![3]);
    let l = DataLoader::new(p, c, LoaderConfig::new(3).num_workers(2)).unwrap();
    let got: Vec<Vec<u32>> = l.epoch_iter().unwrap().map(Result::unwrap).collect();
    assert_eq!(got, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
}

fn write_csv(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("bad.csv");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    path
}

#[test]
fn csv_bad_number_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_csv(&dir, "# licence\n0,1,2\n1,3,x4\n");
    let err = CsvDataset::from_path(&path, 0).unwrap_err();
    let Error::Dataset {
        path: p,
        line,
        reason,
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!((p, *line), (&path, 3));
    assert!(
        reason.contains("column 2") && reason.contains("x4"),
        "{reason}"
    );
    let msg = err.to_string();
    assert!(msg.contains("bad.csv") && msg.contains("line 3"), "{msg}");
}

#[test]
fn csv_wrong_column_count_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_csv(&dir, "0,1,2\n\n1,3,4\n# c\n2,5\n");
    let err = CsvDataset::from_path(&path, 0).unwrap_err();
    assert!(
        matches!(&err, Error::Dataset { path: p, line: 5, reason } if p == &path && reason.contains("expected 3 columns")),
        "{err}"
    );
}

#[test]
fn digits_csv_loads_1797_rows_of_64_features() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/data/digits.csv");
    let ds = CsvDataset::from_path(&path, 0).unwrap();
    assert_eq!(ds.len(), 1797);
    assert_eq!(ds.dim(), 64);
    let data = ds.into_tensor_dataset();
    assert_eq!(data.num_classes(), 10);
    let mut counts = [0usize; 10];
    for &y in data.labels() {
        counts[y as usize] += 1;
    }
    assert!(counts.iter().all(|&c| c > 150), "{counts:?}");
    assert!(data.features().iter().all(|&v| (0.0..=16.0).contains(&v)));
    let data = data.scaled(1.0 / 16.0);
    let (train, val) = data.split(0.8, 0).unwrap();
    assert_eq!((train.len(), val.len()), (1438, 359));
    let l = DataLoader::new(
        train,
        TensorCollate::default(),
        LoaderConfig::new(32).shuffle(true).num_workers(2),
    )
    .unwrap();
    let (x, y) = l.epoch_iter().unwrap().next().unwrap().unwrap();
    assert_eq!((x.dims(), y.dims()), (&[32, 64][..], &[32][..]));
    assert!(x.max_all().unwrap().to_scalar::<f32>().unwrap() <= 1.0);
    let _: &TensorDataset = &val;
}
