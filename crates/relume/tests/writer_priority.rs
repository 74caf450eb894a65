//! `TrainerBuilder::async_writer_priority` reaches the writer thread: its
//! scheduling class, read from `/proc` while training runs, is Linux's
//! `SCHED_IDLE` by default and the normal class when asked. (Its own test binary:
//! no other test's writer thread is alive in this process.)
#![cfg(target_os = "linux")]

use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use relume::callbacks::{Callback, HookCtx, SavedCheckpoint};
use relume::data::{DataLoader, LoaderConfig, TensorCollate, TensorDataset};
use relume::nn::Linear;
use relume::optim::{Sgd, SgdConfig};
use relume::params::ParamStore;
use relume::rng::Rng;
use relume::trainer::{OptimizerConfig, StepCtx, TrainModule, Trainer};
use relume_ckpt::{WriterPriority, WRITER_THREAD_NAME};

struct Model {
    params: ParamStore,
    layer: Linear,
}

impl TrainModule for Model {
    type Batch = (Tensor, Tensor);
    fn params(&self) -> &ParamStore {
        &self.params
    }
    fn training_step(
        &mut self,
        (x, y): Self::Batch,
        _ctx: &mut StepCtx<'_>,
    ) -> relume::Result<Tensor> {
        Ok(candle_nn::loss::cross_entropy(
            &self.layer.forward(&x)?,
            &y,
        )?)
    }
    fn configure_optimizers(&self) -> relume::Result<Vec<OptimizerConfig>> {
        Ok(vec![OptimizerConfig::new(Sgd::from_store(
            &self.params,
            SgdConfig::default().with_lr(0.1),
        )?)])
    }
}

/// The scheduling policy of every writer thread alive now.
fn writer_policies() -> Vec<i32> {
    let comm: String = WRITER_THREAD_NAME.chars().take(15).collect();
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| {
            let tid = e.ok()?.file_name().into_string().ok()?;
            let name = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
            if name.trim_end() != comm {
                return None;
            }
            let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
            stat.rsplit(')')
                .next()?
                .split_whitespace()
                .nth(38)?
                .parse()
                .ok()
        })
        .collect()
}

/// Records the writer threads' policies when the first async save is reported
/// committed: the writer has run by then (it sets its name and class when it
/// starts) and lives until `fit` returns.
struct Probe(Arc<Mutex<Option<Vec<i32>>>>);

impl Callback for Probe {
    fn state_key(&self) -> String {
        "probe".into()
    }
    fn on_save_checkpoint(
        &mut self,
        _ctx: &mut HookCtx<'_>,
        _saved: &SavedCheckpoint,
    ) -> relume::Result<()> {
        let mut seen = self.0.lock().unwrap();
        if seen.is_none() {
            *seen = Some(writer_policies());
        }
        Ok(())
    }
}

fn policies_during_fit(priority: Option<WriterPriority>) -> Vec<i32> {
    let run = tempfile::tempdir().unwrap();
    let params = ParamStore::new(Device::Cpu);
    let layer = Linear::new(&params, "l", 4, 3, &mut Rng::new(0, "init")).unwrap();
    let mut model = Model { params, layer };
    let seen = Arc::new(Mutex::new(None));
    let mut b = Trainer::builder()
        .max_epochs(1)
        .default_root_dir(run.path())
        .enable_progress_bar(false)
        .checkpoint_every_n_steps(2)
        .async_checkpointing(true)
        .callback(Box::new(Probe(Arc::clone(&seen))));
    if let Some(p) = priority {
        b = b.async_writer_priority(p);
    }
    let mut trainer = b.build().unwrap();
    let xs: Vec<f32> = (0..32).map(|i| i as f32 / 32.0).collect();
    let data = TensorDataset::new(xs, 4, vec![0, 1, 2, 0, 1, 2, 0, 1]).unwrap();
    let mut train = DataLoader::new(data, TensorCollate::default(), LoaderConfig::new(2)).unwrap();
    trainer.fit(&mut model, &mut train, None).unwrap();
    let seen = seen.lock().unwrap().clone();
    seen.expect("an async save was reported during fit")
}

#[test]
fn async_writer_priority_reaches_the_writer_thread() {
    assert_eq!(policies_during_fit(None), vec![libc::SCHED_IDLE], "default");
    assert_eq!(
        policies_during_fit(Some(WriterPriority::Normal)),
        vec![libc::SCHED_OTHER]
    );
    assert_eq!(
        policies_during_fit(Some(WriterPriority::Background)),
        vec![libc::SCHED_IDLE]
    );
}
