//! What the data-parallel tests share: a small MLP with dropout, its data, a
//! trainer with checkpoints at every step, and helpers to run it at a world size
//! and compare final states.
#![allow(dead_code)]

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use relume::data::{DataLoader, LoaderConfig, TensorCollate, TensorDataset};
use relume::dist::{run_threads, Collective, SingleProcess};
use relume::nn::{dropout, Linear};
use relume::optim::{AdamConfig, AdamW};
use relume::params::ParamStore;
use relume::rng::Rng;
use relume::sched::CosineAnnealingLR;
use relume::trainer::{
    FitOutcome, LogOpts, OptimizerConfig, ResumePolicy, SchedulerConfig, Source, StepCtx,
    TrainModule, Trainer,
};
use relume::Result;

use crate::support::Interrupter;
pub use crate::support::{assert_identical as assert_same_state, describe};

pub struct Mlp {
    params: ParamStore,
    l1: Linear,
    l2: Linear,
}

impl Mlp {
    pub fn new() -> Result<Self> {
        let params = ParamStore::new(Device::Cpu);
        let mut rng = Rng::new(7, "init");
        let l1 = Linear::new(&params, "l1", 4, 16, &mut rng)?;
        let l2 = Linear::new(&params, "l2", 16, 3, &mut rng)?;
        Ok(Mlp { params, l1, l2 })
    }
}

impl TrainModule for Mlp {
    type Batch = (Tensor, Tensor);
    fn params(&self) -> &ParamStore {
        &self.params
    }
    fn training_step(&mut self, (x, y): Self::Batch, ctx: &mut StepCtx<'_>) -> Result<Tensor> {
        let h = self.l1.forward_relu(&x)?;
        let train = ctx.training();
        let h = dropout(&h, 0.25, ctx.rng("dropout"), train)?;
        let loss = relume::nn::cross_entropy(&self.l2.forward(&h)?, &y)?;
        ctx.log_tensor("train_loss", &loss, LogOpts::new().on_epoch(true))?;
        Ok(loss)
    }
    fn validation_step(&mut self, (x, y): Self::Batch, ctx: &mut StepCtx<'_>) -> Result<()> {
        let loss = relume::nn::cross_entropy(&self.l2.forward(&self.l1.forward_relu(&x)?)?, &y)?;
        ctx.log_tensor("val_loss", &loss, LogOpts::new().batch_size(x.dim(0)?))?;
        Ok(())
    }
    fn configure_optimizers(&self) -> Result<Vec<OptimizerConfig>> {
        let opt = AdamW::from_store(&self.params, AdamConfig::adamw().with_lr(0.01))?;
        let sched = CosineAnnealingLR::new(vec![0.01], 30, 1e-4)?;
        Ok(vec![
            OptimizerConfig::new(opt).with_scheduler(SchedulerConfig::per_step(sched))
        ])
    }
}

pub fn data(n: usize, seed: u64) -> TensorDataset {
    let mut rng = Rng::new(seed, "synthetic");
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let c = rng.below(3) as u32;
        for j in 0..4 {
            let centre = if j as u32 == c { 1.5 } else { 0.0 };
            xs.push(centre + rng.normal_f64() as f32 * 0.5);
        }
        ys.push(c);
    }
    TensorDataset::new(xs, 4, ys).unwrap()
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Spec {
    pub accum: u64,
    pub batch_size: usize,
    pub max_epochs: u64,
    /// (rank, batch): that rank raises its interrupt flag after that many batches.
    pub interrupt: Option<(usize, u64)>,
    /// (rank, batch): that rank's hook fails after that many batches.
    pub fail: Option<(usize, u64)>,
    /// (rank, batch, signal): that rank sends itself the signal after that many batches.
    pub signal: Option<(usize, u64, i32)>,
}

pub const SPEC: Spec = Spec {
    accum: 4,
    batch_size: 3,
    max_epochs: 3,
    interrupt: None,
    fail: None,
    signal: None,
};

/// SIGTERM/SIGUSR1 handlers, installed once per process.
fn preemption() -> Result<Arc<relume::preempt::Preemption>> {
    static P: std::sync::OnceLock<Arc<relume::preempt::Preemption>> = std::sync::OnceLock::new();
    if let Some(p) = P.get() {
        return Ok(Arc::clone(p));
    }
    let p = Arc::new(relume::preempt::Preemption::install()?);
    Ok(Arc::clone(P.get_or_init(|| p)))
}

pub fn fit(spec: &Spec, dir: &Path, c: Arc<dyn Collective>) -> Result<FitOutcome> {
    let flag = Arc::new(AtomicBool::new(false));
    let rank = c.rank();
    let mut trainer = Trainer::builder()
        .max_epochs(spec.max_epochs)
        .accumulate_grad_batches(spec.accum)
        .seed(3)
        .default_root_dir(dir)
        .checkpoint_every_n_steps(1)
        .enable_progress_bar(false)
        .interrupt_flag(flag.clone())
        .preemption(preemption()?)
        .callback(Box::new(Interrupter {
            flag,
            at: spec.interrupt,
            fail: spec.fail,
            signal: spec.signal,
            rank,
            batches: 0,
        }))
        .resume(ResumePolicy::IfExists(Source::Last))
        .collective(c)
        .build()?;
    let mut module = Mlp::new()?;
    let cfg = LoaderConfig::new(spec.batch_size).shuffle(true).seed(1);
    // 50 examples / 3 = 17 micro-batches an epoch: windows of 4, 4, 4, 4 and 1.
    let mut train = DataLoader::new(data(50, 1), TensorCollate::default(), cfg)?;
    let val = DataLoader::new(data(12, 2), TensorCollate::default(), LoaderConfig::new(6))?;
    trainer.fit(&mut module, &mut train, Some(&val))
}

/// Runs `spec` at world size `world` in `dir`; every rank's outcome.
pub fn fit_at(world: usize, spec: &Spec, dir: &Path) -> Result<Vec<String>> {
    if world == 1 {
        return Ok(vec![describe(&fit(spec, dir, Arc::new(SingleProcess))?)]);
    }
    let (spec, dir) = (spec.clone(), dir.to_path_buf());
    run_threads(world, Duration::from_secs(60), move |g| {
        fit(&spec, &dir, Arc::new(g)).map(|o| describe(&o))
    })
}
