//! Trainer benchmarks on the digits MLP (64-256-128-10, dropout, batch 32).
//!
//! (a) **overhead**: `Trainer::fit` (no validation, no checkpoints) against a
//!     hand-written loop doing the same steps with the same fused AdamW, scheduler,
//!     loader and loss read-back. Target ≤ 3%.
//! (b) **epoch time**: the full trainer (validation + a durable checkpoint every
//!     epoch, relume's fused layers) against a hand-written candle loop as a candle
//!     user writes it: candle-nn's Linear, dropout, cross-entropy and AdamW, default
//!     candle threading. Target ≤ 0.4×.
//! (c) **resume latency**: process start → first resumed step, by re-executing this
//!     binary in a child mode that resumes a prepared run.
//!
//! `cargo bench --bench trainer` (set `BENCH_EPOCHS` to change the epochs timed, default 30
//! as in the digits job,
//! `RAYON_NUM_THREADS=1` for single-threaded candle kernels, `DIGITS_CSV` for the data).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::Optimizer as _;
use relume::callbacks::{Callback, HookCtx};
use relume::data::{CsvDataset, DataLoader, LoaderConfig, TensorCollate, TensorDataset};
use relume::nn::{dropout, Linear};
use relume::optim::{AdamConfig, AdamW, Grads, Optimizer};
use relume::params::ParamStore;
use relume::rng::Rng;
use relume::sched::{CosineAnnealingLR, LinearLR, LrScheduler, SequentialLR};
use relume::trainer::{
    LogOpts, OptimizerConfig, ResumePolicy, SchedulerConfig, Source, StepCtx, TrainModule, Trainer,
};
use relume::Result;

const LR: f64 = 3e-3;

struct Mlp {
    params: ParamStore,
    l1: Linear,
    l2: Linear,
    l3: Linear,
    steps_per_epoch: u64,
}

impl Mlp {
    fn new(steps_per_epoch: u64) -> Result<Self> {
        let params = ParamStore::new(Device::Cpu);
        let mut rng = Rng::new(0, "init");
        Ok(Mlp {
            l1: Linear::new(&params, "l1", 64, 256, &mut rng)?,
            l2: Linear::new(&params, "l2", 256, 128, &mut rng)?,
            l3: Linear::new(&params, "l3", 128, 10, &mut rng)?,
            params,
            steps_per_epoch,
        })
    }
    fn forward(&self, x: &Tensor, rng: &mut Rng, train: bool) -> Result<Tensor> {
        let h = self.l1.forward_relu(x)?;
        let h = dropout(&h, 0.1, rng, train)?;
        let h = self.l2.forward_relu(&h)?;
        let h = dropout(&h, 0.1, rng, train)?;
        self.l3.forward(&h)
    }
    fn scheduler(&self, epochs: u64) -> Result<SequentialLR> {
        let w = self.steps_per_epoch;
        SequentialLR::new(
            vec![
                Box::new(LinearLR::new(vec![LR], 0.1, 1.0, w)?),
                Box::new(CosineAnnealingLR::new(
                    vec![LR],
                    (w * epochs).saturating_sub(w).max(1),
                    0.0,
                )?),
            ],
            vec![w],
        )
    }
}

struct Module {
    mlp: Mlp,
    epochs: u64,
}

impl TrainModule for Module {
    type Batch = (Tensor, Tensor);
    fn params(&self) -> &ParamStore {
        &self.mlp.params
    }
    fn training_step(&mut self, (x, y): Self::Batch, ctx: &mut StepCtx<'_>) -> Result<Tensor> {
        let logits = self.mlp.forward(&x, ctx.rng("dropout"), true)?;
        let loss = relume::nn::cross_entropy(&logits, &y)?;
        ctx.log_tensor(
            "train_loss",
            &loss,
            LogOpts::new().on_step(false).on_epoch(true),
        )?;
        Ok(loss)
    }
    fn validation_step(&mut self, (x, y): Self::Batch, ctx: &mut StepCtx<'_>) -> Result<()> {
        let logits = self.mlp.forward(&x, ctx.rng("dropout"), false)?;
        let acc = logits
            .argmax(D::Minus1)?
            .eq(&y)?
            .to_dtype(DType::F64)?
            .mean_all()?
            .to_scalar::<f64>()?;
        ctx.log_with("val_acc", acc, LogOpts::new().batch_size(x.dim(0)?));
        Ok(())
    }
    fn configure_optimizers(&self) -> Result<Vec<OptimizerConfig>> {
        let opt = AdamW::from_store(&self.mlp.params, AdamConfig::adamw().with_lr(LR))?;
        Ok(vec![OptimizerConfig::new(opt).with_scheduler(
            SchedulerConfig::per_step(self.mlp.scheduler(self.epochs)?),
        )])
    }
}

fn datasets() -> (TensorDataset, TensorDataset) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/data/digits.csv"
    );
    let data = CsvDataset::from_path(path, 0)
        .unwrap()
        .into_tensor_dataset()
        .scaled(1.0 / 16.0);
    data.split(0.8, 42).unwrap()
}

type Loader = DataLoader<(Tensor, Tensor)>;

fn loaders() -> (Loader, Loader) {
    let (tr, va) = datasets();
    let train = DataLoader::new(
        tr,
        TensorCollate::default(),
        LoaderConfig::new(32).shuffle(true),
    )
    .unwrap();
    let val = DataLoader::new(va, TensorCollate::default(), LoaderConfig::new(256)).unwrap();
    (train, val)
}

/// Seconds for `epochs` epochs of `Trainer::fit`.
fn trainer_run(epochs: u64, full: bool, run_dir: &Path) -> f64 {
    trainer_run_with(epochs, full, full, false, run_dir)
}

/// As [`trainer_run`], choosing validation and checkpointing separately.
fn trainer_run_with(
    epochs: u64,
    validate: bool,
    checkpoint: bool,
    async_saves: bool,
    run_dir: &Path,
) -> f64 {
    let (mut train, val) = loaders();
    let spe = train.batches_per_epoch() as u64;
    let mut m = Module {
        mlp: Mlp::new(spe).unwrap(),
        epochs,
    };
    let mut t = Trainer::builder()
        .max_epochs(epochs)
        .default_root_dir(run_dir)
        .enable_progress_bar(false)
        .enable_checkpointing(checkpoint)
        .async_checkpointing(async_saves)
        .build()
        .unwrap();
    let start = Instant::now();
    t.fit(&mut m, &mut train, if validate { Some(&val) } else { None })
        .unwrap();
    start.elapsed().as_secs_f64()
}

/// Seconds for `epochs` epochs of a hand-written loop with relume's fused AdamW.
fn hand_fused(epochs: u64) -> f64 {
    let (train, _) = loaders();
    let mlp = Mlp::new(train.batches_per_epoch() as u64).unwrap();
    let mut opt = AdamW::from_store(&mlp.params, AdamConfig::adamw().with_lr(LR)).unwrap();
    let mut sched = mlp.scheduler(epochs).unwrap();
    opt.set_lr(0, sched.lrs()[0]).unwrap();
    let mut rng = Rng::new(0, "dropout");
    let start = Instant::now();
    let mut sum = 0.0;
    for _ in 0..epochs {
        for batch in train.epoch_iter().unwrap() {
            let (x, y) = batch.unwrap();
            let logits = mlp.forward(&x, &mut rng, true).unwrap();
            let loss = relume::nn::cross_entropy(&logits, &y).unwrap();
            sum += loss
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let grads = Grads::from_backward(&loss.backward().unwrap(), &mlp.params);
            opt.step(&grads).unwrap();
            opt.set_lr(0, sched.step(None).unwrap()[0]).unwrap();
        }
    }
    std::hint::black_box(sum);
    start.elapsed().as_secs_f64()
}

/// The same MLP written the way a candle user would: candle-nn's `Linear`, ReLU,
/// dropout and cross-entropy, starting from the same initial weights.
struct CandleMlp {
    l1: candle_nn::Linear,
    l2: candle_nn::Linear,
    l3: candle_nn::Linear,
    vars: Vec<candle_core::Var>,
}

impl CandleMlp {
    fn new() -> CandleMlp {
        let init = Mlp::new(1).unwrap();
        let vars: Vec<candle_core::Var> = init
            .params
            .named_vars()
            .into_iter()
            .map(|(_, v)| candle_core::Var::from_tensor(v.as_tensor()).unwrap())
            .collect();
        // named_vars is sorted: l1.bias, l1.weight, l2.bias, ...
        let lin = |i: usize| {
            candle_nn::Linear::new(
                vars[2 * i + 1].as_tensor().clone(),
                Some(vars[2 * i].as_tensor().clone()),
            )
        };
        CandleMlp {
            l1: lin(0),
            l2: lin(1),
            l3: lin(2),
            vars,
        }
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        use candle_core::Module as _;
        let h = self.l1.forward(x)?.relu()?;
        let h = candle_nn::ops::dropout(&h, 0.1)?;
        let h = self.l2.forward(&h)?.relu()?;
        let h = candle_nn::ops::dropout(&h, 0.1)?;
        self.l3.forward(&h)
    }
}

/// Seconds for `epochs` epochs of a hand-written candle loop: candle-nn layers,
/// loss and AdamW, over the same batches.
fn hand_candle_nn(epochs: u64) -> f64 {
    let (train, _) = loaders();
    let mlp = CandleMlp::new();
    let mut opt = candle_nn::AdamW::new(
        mlp.vars.clone(),
        candle_nn::ParamsAdamW {
            lr: LR,
            ..Default::default()
        },
    )
    .unwrap();
    let start = Instant::now();
    for _ in 0..epochs {
        for batch in train.epoch_iter().unwrap() {
            let (x, y) = batch.unwrap();
            let logits = mlp.forward(&x).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
            opt.backward_step(&loss).unwrap();
        }
    }
    start.elapsed().as_secs_f64()
}

/// Child mode for (c): resume the run in `dir`, print `FIRST_STEP` after the
/// first resumed optimizer step and exit.
struct FirstStep;
impl Callback for FirstStep {
    fn state_key(&self) -> String {
        "first_step".into()
    }
    fn on_train_batch_end(&mut self, _ctx: &mut HookCtx<'_>, boundary: bool) -> Result<()> {
        if boundary {
            println!("FIRST_STEP");
            std::process::exit(0);
        }
        Ok(())
    }
}

fn resume_child(dir: &Path) {
    let (mut train, val) = loaders();
    let spe = train.batches_per_epoch() as u64;
    // Same module config as the prepared 2-epoch run; max_epochs raised to 3.
    let mut m = Module {
        mlp: Mlp::new(spe).unwrap(),
        epochs: 2,
    };
    let mut t = Trainer::builder()
        .max_epochs(3)
        .default_root_dir(dir)
        .enable_progress_bar(false)
        .resume(ResumePolicy::Required(Source::Last))
        .callback(Box::new(FirstStep))
        .build()
        .unwrap();
    t.fit(&mut m, &mut train, Some(&val)).unwrap();
}

fn resume_latency(dir: &Path) -> f64 {
    let start = Instant::now();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("RELUME_BENCH_RESUME", dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut seen = false;
    for line in BufReader::new(stdout).lines() {
        if line.unwrap().contains("FIRST_STEP") {
            seen = true;
            break;
        }
    }
    let t = start.elapsed().as_secs_f64();
    assert!(
        seen && child.wait().unwrap().success(),
        "resume child failed"
    );
    t
}

fn main() {
    if let Ok(dir) = std::env::var("RELUME_BENCH_RESUME") {
        resume_child(&PathBuf::from(dir));
        return;
    }
    let epochs: u64 = std::env::var("BENCH_EPOCHS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let tmp = tempfile::tempdir().unwrap();
    // warm-up
    hand_fused(1);
    trainer_run(1, false, &tmp.path().join("warm"));

    let (a_hand, a_tr) = {
        let mut h = f64::INFINITY;
        let mut t = f64::INFINITY;
        for i in 0..3 {
            h = h.min(hand_fused(epochs));
            t = t.min(trainer_run(
                epochs,
                false,
                &tmp.path().join(format!("a{i}")),
            ));
        }
        (h, t)
    };
    println!("(a) overhead, {epochs} epochs, best of 3:");
    println!(
        "    hand-written loop, relume fused AdamW: {:8.1} ms/epoch",
        a_hand / epochs as f64 * 1e3
    );
    println!(
        "    Trainer::fit (no val, no ckpt):        {:8.1} ms/epoch",
        a_tr / epochs as f64 * 1e3
    );
    println!(
        "    overhead: {:+.2}% (target <= 3%)",
        (a_tr / a_hand - 1.0) * 100.0
    );

    let mut ta = f64::INFINITY;
    let (b_nn, b_full, b_val) = {
        let mut h = f64::INFINITY;
        let mut t = f64::INFINITY;
        let mut v = f64::INFINITY;
        for i in 0..3 {
            h = h.min(hand_candle_nn(epochs));
            t = t.min(trainer_run(epochs, true, &tmp.path().join(format!("b{i}"))));
            v = v.min(trainer_run_with(
                epochs,
                true,
                false,
                false,
                &tmp.path().join(format!("v{i}")),
            ));
            ta = ta.min(trainer_run_with(
                epochs,
                true,
                true,
                true,
                &tmp.path().join(format!("async{i}")),
            ));
        }
        (h, t, v)
    };
    println!("(b) digits epoch time, best of 3:");
    println!(
        "    hand-written candle, candle-nn AdamW:  {:8.1} ms/epoch",
        b_nn / epochs as f64 * 1e3
    );
    println!(
        "    relume Trainer, val + ckpt each epoch: {:8.1} ms/epoch",
        b_full / epochs as f64 * 1e3
    );
    println!("    ratio: {:.3}x (target <= 0.4x)", b_full / b_nn);
    println!(
        "    relume Trainer, val + async ckpt each epoch: {:8.1} ms/epoch, ratio {:.3}x",
        ta / epochs as f64 * 1e3,
        ta / b_nn
    );
    println!(
        "    of which validation {:.1} ms/epoch, durable checkpoint {:.1} ms/epoch",
        (b_val - a_tr) / epochs as f64 * 1e3,
        (b_full - b_val) / epochs as f64 * 1e3
    );

    let run = tmp.path().join("resume");
    trainer_run(2, true, &run);
    let lat: Vec<f64> = (0..5).map(|_| resume_latency(&run)).collect();
    let best = lat.iter().cloned().fold(f64::INFINITY, f64::min);
    let mean = lat.iter().sum::<f64>() / lat.len() as f64;
    println!(
        "(c) resume latency (spawn -> first resumed step): best {:.1} ms, mean {:.1} ms",
        best * 1e3,
        mean * 1e3
    );
}
