//! Checkpointing cost seen by the training loop, on an MLP (64-256-128-10,
//! AdamW, batch 32, synthetic data, 100 steps per epoch).
//!
//! (a) **step-time overhead** of a durable checkpoint every 100 steps, sync and
//!     async, against the same run without checkpoints (target ≤ 1%). Runs are
//!     interleaved; medians of `BENCH_ROUNDS` (default 5).
//! (b) **async-save stall**: the time the training thread spends in a step
//!     boundary that saves, minus a boundary that does not (measured by a
//!     callback between `on_train_batch_end` and the next batch), against a
//!     plain memcpy of the same state bytes (target ≤ 1.2×). Sync for contrast.
//!
//! `cargo bench --bench checkpoint_overhead` (`BENCH_STEPS`, default 600).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use relume::callbacks::{Callback, HookCtx};
use relume::data::{DataLoader, LoaderConfig, TensorCollate, TensorDataset};
use relume::nn::Linear;
use relume::optim::{AdamConfig, AdamW};
use relume::params::ParamStore;
use relume::rng::Rng;
use relume::trainer::{OptimizerConfig, StepCtx, TrainModule, Trainer};
use relume::Result;

struct Mlp {
    params: ParamStore,
    l1: Linear,
    l2: Linear,
    l3: Linear,
}

impl Mlp {
    fn new() -> Result<Self> {
        let params = ParamStore::new(Device::Cpu);
        let mut rng = Rng::new(0, "init");
        Ok(Mlp {
            l1: Linear::new(&params, "l1", 64, 256, &mut rng)?,
            l2: Linear::new(&params, "l2", 256, 128, &mut rng)?,
            l3: Linear::new(&params, "l3", 128, 10, &mut rng)?,
            params,
        })
    }
}

impl TrainModule for Mlp {
    type Batch = (Tensor, Tensor);
    fn params(&self) -> &ParamStore {
        &self.params
    }
    fn training_step(&mut self, (x, y): Self::Batch, _ctx: &mut StepCtx<'_>) -> Result<Tensor> {
        let h = self.l1.forward(&x)?.relu()?;
        let h = self.l2.forward(&h)?.relu()?;
        let logits = self.l3.forward(&h)?;
        Ok(candle_nn::loss::cross_entropy(&logits, &y)?)
    }
    fn configure_optimizers(&self) -> Result<Vec<OptimizerConfig>> {
        Ok(vec![OptimizerConfig::new(AdamW::from_store(
            &self.params,
            AdamConfig::adamw().with_lr(1e-3),
        )?)])
    }
}

/// Times every step boundary: from `on_train_batch_end` to the next batch start.
struct BoundaryTimer {
    at: Option<(u64, Instant)>,
    out: Arc<Mutex<Vec<(u64, Duration)>>>,
}

impl Callback for BoundaryTimer {
    fn state_key(&self) -> String {
        "bench_timer".into()
    }
    fn on_train_batch_end(&mut self, ctx: &mut HookCtx<'_>, b: bool) -> Result<()> {
        if b {
            self.at = Some((ctx.progress.global_step, Instant::now()));
        }
        Ok(())
    }
    fn on_train_batch_start(&mut self, _ctx: &mut HookCtx<'_>) -> Result<()> {
        if let Some((step, t)) = self.at.take() {
            if let Ok(mut v) = self.out.lock() {
                v.push((step, t.elapsed()));
            }
        }
        Ok(())
    }
}

fn data() -> TensorDataset {
    let mut rng = Rng::new(1, "bench");
    let n = 3200;
    let xs: Vec<f32> = (0..n * 64).map(|_| rng.normal_f64() as f32).collect();
    let ys: Vec<u32> = (0..n).map(|_| rng.below(10) as u32).collect();
    TensorDataset::new(xs, 64, ys).expect("dataset")
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    None,
    Sync,
    Async,
}

/// One fit of `steps`; returns (seconds, boundary times per step).
fn fit(mode: Mode, steps: u64) -> (f64, Vec<(u64, Duration)>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let times = Arc::new(Mutex::new(Vec::new()));
    let mut b = Trainer::builder()
        .max_epochs(1000)
        .max_steps(steps)
        .log_every_n_steps(1000)
        .default_root_dir(dir.path())
        .enable_progress_bar(false)
        .checkpoint_every_n_epochs(0)
        .callback(Box::new(BoundaryTimer {
            at: None,
            out: Arc::clone(&times),
        }));
    b = match mode {
        Mode::None => b.enable_checkpointing(false),
        Mode::Sync => b.checkpoint_every_n_steps(100),
        Mode::Async => b.checkpoint_every_n_steps(100).async_checkpointing(true),
    };
    let mut t = b.build().expect("trainer");
    let mut m = Mlp::new().expect("model");
    let cfg = LoaderConfig::new(32).shuffle(true).seed(3);
    let mut train = DataLoader::new(data(), TensorCollate::default(), cfg).expect("loader");
    let start = Instant::now();
    t.fit(&mut m, &mut train, None).expect("fit");
    let secs = start.elapsed().as_secs_f64();
    let v = times.lock().map(|v| v.clone()).unwrap_or_default();
    (secs, v)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median boundary time at saving steps minus at other steps, in seconds.
fn stall(times: &[(u64, Duration)]) -> f64 {
    let (save, plain): (Vec<_>, Vec<_>) = times.iter().partition(|(s, _)| s % 100 == 0);
    let f = |v: Vec<&(u64, Duration)>| median(v.iter().map(|(_, d)| d.as_secs_f64()).collect());
    f(save) - f(plain)
}

fn state_bytes() -> usize {
    let m = Mlp::new().expect("model");
    let p: usize = m
        .params
        .named_vars()
        .iter()
        .map(|(_, v)| v.as_tensor().elem_count() * 4)
        .sum();
    p * 3 // parameters + AdamW's two moments
}

fn memcpy_time(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut best = f64::MAX;
    for _ in 0..50 {
        let t = Instant::now();
        let dst = src.clone();
        std::hint::black_box(&dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    let steps: u64 = std::env::var("BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    fit(Mode::None, 50); // warm-up
    let (mut none, mut sync, mut asyn) = (Vec::new(), Vec::new(), Vec::new());
    let (mut sync_stall, mut async_stall) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        none.push(fit(Mode::None, steps).0);
        let (s, t) = fit(Mode::Sync, steps);
        sync.push(s);
        sync_stall.push(stall(&t));
        let (s, t) = fit(Mode::Async, steps);
        asyn.push(s);
        async_stall.push(stall(&t));
    }
    let (n, s, a) = (median(none), median(sync), median(asyn));
    println!(
        "checkpoint_overhead: {steps} steps, checkpoint every 100 steps, {rounds} rounds (medians)"
    );
    println!(
        "  no checkpoints : {:8.1} ms  ({:.3} ms/step)",
        n * 1e3,
        n * 1e3 / steps as f64
    );
    println!(
        "  sync  every 100: {:8.1} ms  overhead {:+.2}%",
        s * 1e3,
        (s / n - 1.0) * 100.0
    );
    println!(
        "  async every 100: {:8.1} ms  overhead {:+.2}%  (target <= 1%)",
        a * 1e3,
        (a / n - 1.0) * 100.0
    );
    let bytes = state_bytes();
    let mc = memcpy_time(bytes);
    let (ss, as_) = (median(sync_stall), median(async_stall));
    println!(
        "  state {:.2} MB; memcpy {:.3} ms",
        bytes as f64 / 1e6,
        mc * 1e3
    );
    println!(
        "  sync  save stall on the training thread: {:.3} ms = {:.1}x memcpy",
        ss * 1e3,
        ss / mc
    );
    println!(
        "  async save stall on the training thread: {:.3} ms = {:.2}x memcpy (target <= 1.2x)",
        as_ * 1e3,
        as_ / mc
    );
}
