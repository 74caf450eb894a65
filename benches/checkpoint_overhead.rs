//! Checkpointing cost seen by the training loop, on an MLP (64-256-128-10,
//! AdamW, batch 32, synthetic data, 100 steps per epoch).
//!
//! (a) **step-time overhead** of a durable checkpoint every 100 steps, sync and
//!     async, against the same run without checkpoints (target ≤ 1%). Runs are
//!     interleaved; medians of `BENCH_ROUNDS` (default 5).
//! (b) **async-save stall**: the time the training thread spends in a step
//!     boundary that saves, minus a boundary that does not (median of each,
//!     measured by a callback between `on_train_batch_end` and the next batch),
//!     against a plain memcpy of the same state bytes (tensor bytes plus the
//!     checkpoint's `state.json` bytes) into a warm, already-mapped destination
//!     buffer, measured in the same run (target ≤ 1.2×). The async path copies
//!     into recycled buffers, so the baseline's destination is warm too. The
//!     dataset has 101 batches per epoch so that saves (every 100 steps) never
//!     fall on an epoch end, whose new-epoch work would count as stall; the
//!     no-checkpoint run's same statistic is printed as a control (≈ 0). Sync
//!     for contrast.
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
///
/// At steps `≡ 50 (mod 100)` (half-way between saves) it also performs the
/// baseline: a plain memcpy of the same bytes as a snapshot (the live parameters
/// three times over, as many bytes as parameters plus AdamW's two moments, and the
/// `state.json` bytes). Destinations follow the snapshot's own policy, so neither
/// side gets warmer memory: buffers under `BufferPool::DEFAULT_MIN_POOLED` (1 MiB;
/// here all of them) are fresh `Vec`s, larger ones are warm (pre-faulted) buffers
/// touched only at those steps, as recycled snapshot buffers are touched only at
/// saves. That boundary's extra time is the memcpy cost in the same conditions as
/// a save.
struct BoundaryTimer {
    at: Option<(u64, Instant)>,
    out: Arc<Mutex<Vec<(u64, Duration)>>>,
    baseline: Baseline,
}

struct Baseline {
    params: ParamStore,
    json: Vec<u8>,
    /// Warm destinations for buffers of at least 1 MiB.
    warm: Vec<Vec<u8>>,
    /// The fresh copies of the last baseline, dropped outside the timed window.
    fresh: Vec<Vec<u8>>,
}

const MIN_POOLED: usize = relume_ckpt::BufferPool::DEFAULT_MIN_POOLED;

impl Baseline {
    fn new(params: ParamStore, json_bytes: usize) -> Self {
        let mut warm: Vec<Vec<u8>> = Vec::new();
        for _ in 0..3 {
            for (_, v) in params.named_vars() {
                let n = v.as_tensor().elem_count() * 4;
                if n >= MIN_POOLED {
                    warm.push(vec![1u8; n]); // mapped and touched
                }
            }
        }
        Baseline {
            params,
            json: vec![7u8; json_bytes],
            warm,
            fresh: Vec::new(),
        }
    }

    fn copy(&mut self) {
        let vars = self.params.named_vars();
        let mut warm = self.warm.iter_mut();
        for _ in 0..3 {
            for (_, v) in &vars {
                let (storage, layout) = v.as_tensor().storage_and_layout();
                let candle_core::Storage::Cpu(cpu) = &*storage else {
                    continue;
                };
                let (Ok(all), Some((a, b))) = (cpu.as_slice::<f32>(), layout.contiguous_offsets())
                else {
                    continue;
                };
                let src: &[u8] = bytemuck::cast_slice(&all[a..b]);
                if src.len() >= MIN_POOLED {
                    if let Some(dst) = warm.next() {
                        dst.copy_from_slice(src);
                    }
                } else {
                    self.fresh.push(src.to_vec());
                }
            }
        }
        self.fresh.push(self.json.clone());
        std::hint::black_box((&mut self.warm, &mut self.fresh));
    }
}

impl Callback for BoundaryTimer {
    fn state_key(&self) -> String {
        "bench_timer".into()
    }
    fn on_train_batch_end(&mut self, ctx: &mut HookCtx<'_>, b: bool) -> Result<()> {
        if b {
            let step = ctx.progress.global_step;
            self.at = Some((step, Instant::now()));
            if step % 100 == 50 {
                self.baseline.copy();
            }
        }
        Ok(())
    }
    fn on_train_batch_start(&mut self, _ctx: &mut HookCtx<'_>) -> Result<()> {
        if let Some((step, t)) = self.at.take() {
            if let Ok(mut v) = self.out.lock() {
                v.push((step, t.elapsed()));
            }
        }
        self.baseline.fresh.clear();
        Ok(())
    }
}

fn data() -> TensorDataset {
    let mut rng = Rng::new(1, "bench");
    let n = 3232; // 101 batches of 32: saves every 100 steps fall mid-epoch
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

/// One fit of `steps` (`json`: `state.json` bytes for the baseline copy);
/// returns (seconds, boundary times per step, bytes of the last checkpoint's
/// `state.json`).
fn fit(mode: Mode, steps: u64, json: usize) -> (f64, Vec<(u64, Duration)>, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let times = Arc::new(Mutex::new(Vec::new()));
    let mut m = Mlp::new().expect("model");
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
            baseline: Baseline::new(m.params.clone(), json),
        }));
    b = match mode {
        Mode::None => b.enable_checkpointing(false),
        Mode::Sync => b.checkpoint_every_n_steps(100),
        Mode::Async => b.checkpoint_every_n_steps(100).async_checkpointing(true),
    };
    let mut t = b.build().expect("trainer");
    let cfg = LoaderConfig::new(32).shuffle(true).seed(3);
    let mut train = DataLoader::new(data(), TensorCollate::default(), cfg).expect("loader");
    let start = Instant::now();
    t.fit(&mut m, &mut train, None).expect("fit");
    let secs = start.elapsed().as_secs_f64();
    let v = times.lock().map(|v| v.clone()).unwrap_or_default();
    (secs, v, json_bytes(dir.path()))
}

/// Size of a `state.json` under `run/checkpoints/*/` (0 when none).
fn json_bytes(run: &std::path::Path) -> usize {
    let Ok(rd) = std::fs::read_dir(run.join("checkpoints")) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::metadata(e.path().join("state.json")).ok())
        .map(|m| m.len() as usize)
        .max()
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median boundary time at steps `≡ at (mod 100)` minus at plain steps (neither
/// saves nor baseline copies), in seconds.
fn stall(times: &[(u64, Duration)], at: u64) -> f64 {
    let pick = |f: &dyn Fn(u64) -> bool| {
        median(
            times
                .iter()
                .filter(|(s, _)| f(*s))
                .map(|(_, d)| d.as_secs_f64())
                .collect(),
        )
    };
    pick(&|s| s % 100 == at) - pick(&|s| s % 100 != 0 && s % 100 != 50)
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

/// Best time of a memcpy of `bytes` into a warm (allocated and touched)
/// destination buffer, back to back (source and destination hot in cache).
fn memcpy_time(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let mut best = f64::MAX;
    for _ in 0..50 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
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
    // Warm-up; also learns the size of `state.json` for the baseline copy.
    let json = fit(Mode::Async, 100, 0).2;
    let (mut none, mut sync, mut asyn) = (Vec::new(), Vec::new(), Vec::new());
    let (mut none_stall, mut sync_stall, mut async_stall) = (Vec::new(), Vec::new(), Vec::new());
    let mut copy_stall = Vec::new();
    for _ in 0..rounds {
        let (s, t, _) = fit(Mode::None, steps, json);
        none.push(s);
        none_stall.push(stall(&t, 0));
        let (s, t, _) = fit(Mode::Sync, steps, json);
        sync.push(s);
        sync_stall.push(stall(&t, 0));
        let (s, t, _) = fit(Mode::Async, steps, json);
        asyn.push(s);
        async_stall.push(stall(&t, 0));
        copy_stall.push(stall(&t, 50));
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
    let tensors = state_bytes();
    let bytes = tensors + json;
    let hot = memcpy_time(bytes);
    let (ns, ss, as_) = (median(none_stall), median(sync_stall), median(async_stall));
    let mc = median(copy_stall);
    println!(
        "  state {:.3} MB = {tensors} tensor bytes + {json} state.json bytes",
        bytes as f64 / 1e6,
    );
    println!(
        "  memcpy of those bytes from the live parameters, destinations as the snapshot's (fresh Vecs under 1 MiB, warm buffers above), at a non-saving boundary of the async run: {:.3} ms ({:.1} GB/s)",
        mc * 1e3,
        bytes as f64 / mc / 1e9
    );
    println!(
        "  memcpy of those bytes back to back, source and warm destination hot in cache: {:.3} ms ({:.1} GB/s)",
        hot * 1e3,
        bytes as f64 / hot / 1e9
    );
    println!(
        "  control: no-checkpoint run, save-step boundary minus plain boundary: {:+.3} ms",
        ns * 1e3
    );
    println!(
        "  sync  save stall on the training thread: {:.3} ms = {:.1}x in-loop memcpy",
        ss * 1e3,
        ss / mc
    );
    println!(
        "  async save stall on the training thread: {:.3} ms = {:.2}x in-loop memcpy (target <= 1.2x), {:.2}x hot back-to-back memcpy",
        as_ * 1e3,
        as_ / mc,
        as_ / hot
    );
}
