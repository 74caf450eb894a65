//! Checkpointing cost seen by the training loop, on an MLP (by default
//! 64-256-128-10, AdamW, batch 32, synthetic data, 101 batches per epoch).
//! `BENCH_DIMS` sets the layer widths (`BENCH_DIMS=1024,2048,2048,10` is a 6.3M
//! parameter model, 75 MB of state) and `BENCH_BATCH` the batch size.
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
//! `ROWS` sets the dataset size (default 101 batches: saves fall mid-epoch; 100
//! batches put every save on an epoch end).
//!
//! (a) times the steps' window (first batch start to the last step boundary), so
//! the fixed cost of the end of `fit` (the final save and the flush that awaits
//! it) is reported separately as whole-fit time. Runs drift by about ±1% against
//! each other, so (a) is backed by a within-run estimate: what a save adds to the
//! 50 steps from it on, against the same run's steps 51–99.
//!
//! Diagnostics: the per-position profile shows where the overhead lands; on Linux
//! the training thread's context switches (preempted: another thread took its
//! CPU; slept: it waited on a lock or channel) and the process's minor page faults
//! per fit show how the writer disturbs training.
//!
//! `cargo bench --bench checkpoint_overhead` (`BENCH_STEPS`, default 2000;
//! `BENCH_ONLY=async` runs one mode; `BENCH_WRITER=normal` gives the async writer
//! normal priority).

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
    layers: Vec<Linear>,
}

/// Layer widths, input first (`BENCH_DIMS`, default 64,256,128,10).
fn dims() -> Vec<usize> {
    let d: Vec<usize> = std::env::var("BENCH_DIMS")
        .unwrap_or_else(|_| "64,256,128,10".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("BENCH_DIMS: comma-separated widths")
        })
        .collect();
    assert!(
        d.len() >= 2,
        "BENCH_DIMS needs at least an input and an output width"
    );
    d
}

/// The async writer's priority (`BENCH_WRITER=normal`; default background).
fn writer_priority() -> relume_ckpt::WriterPriority {
    match std::env::var("BENCH_WRITER").as_deref() {
        Ok("normal") => relume_ckpt::WriterPriority::Normal,
        _ => relume_ckpt::WriterPriority::Background,
    }
}

fn batch() -> usize {
    env_or("BENCH_BATCH", 32)
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

impl Mlp {
    fn new() -> Result<Self> {
        let params = ParamStore::new(Device::Cpu);
        let mut rng = Rng::new(0, "init");
        let d = dims();
        let layers = d
            .windows(2)
            .enumerate()
            .map(|(i, w)| Linear::new(&params, &format!("l{}", i + 1), w[0], w[1], &mut rng))
            .collect::<Result<Vec<_>>>()?;
        Ok(Mlp { params, layers })
    }
}

impl TrainModule for Mlp {
    type Batch = (Tensor, Tensor);
    fn params(&self) -> &ParamStore {
        &self.params
    }
    fn training_step(&mut self, (x, y): Self::Batch, _ctx: &mut StepCtx<'_>) -> Result<Tensor> {
        let (last, hidden) = self.layers.split_last().expect("at least one layer");
        let mut h = x;
        for l in hidden {
            h = l.forward(&h)?.relu()?;
        }
        let logits = last.forward(&h)?;
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
/// with the default widths all of them) are fresh `Vec`s, larger ones are warm
/// (pre-faulted) anonymous maps touched only at those steps, as recycled staging
/// buffers are touched only at saves. That boundary's extra time is the memcpy
/// cost in the same conditions as a save.
struct BoundaryTimer {
    at: Option<(u64, Instant)>,
    out: Arc<Mutex<Vec<(u64, Duration)>>>,
    /// The first batch start and the latest step boundary: the steps' window.
    window: Arc<Mutex<(Option<Instant>, Option<Instant>)>>,
    /// Every batch start, for the per-position profile.
    starts: Arc<Mutex<Vec<Instant>>>,
    baseline: Baseline,
}

struct Baseline {
    params: ParamStore,
    json: Vec<u8>,
    /// Warm destinations for buffers of at least 1 MiB, outside the heap like
    /// the snapshot's staging buffers.
    warm: Vec<memmap2::MmapMut>,
    /// The fresh copies of the last baseline, dropped outside the timed window.
    fresh: Vec<Vec<u8>>,
}

const MIN_POOLED: usize = relume_ckpt::BufferPool::DEFAULT_MIN_POOLED;

impl Baseline {
    fn new(params: ParamStore, json_bytes: usize) -> Self {
        let mut warm = Vec::new();
        for _ in 0..3 {
            for (_, v) in params.named_vars() {
                let n = v.as_tensor().elem_count() * 4;
                if n >= MIN_POOLED {
                    let mut map = memmap2::MmapMut::map_anon(n).expect("anonymous map");
                    map.fill(1); // mapped and touched
                    warm.push(map);
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
                        dst[..src.len()].copy_from_slice(src);
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
            let now = Instant::now();
            if let Ok(mut w) = self.window.lock() {
                w.1 = Some(now);
            }
            self.at = Some((step, now));
            if step % 100 == 50 {
                self.baseline.copy();
            }
        }
        Ok(())
    }
    fn on_train_batch_start(&mut self, _ctx: &mut HookCtx<'_>) -> Result<()> {
        if let Ok(mut w) = self.window.lock() {
            w.0.get_or_insert_with(Instant::now);
        }
        if let Ok(mut v) = self.starts.lock() {
            v.push(Instant::now());
        }
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
    // 101 batches: saves every 100 steps fall mid-epoch.
    let n: usize = env_or("ROWS", 101 * batch());
    let d = dims();
    let (inputs, classes) = (d[0], d[d.len() - 1] as u64);
    let xs: Vec<f32> = (0..n * inputs).map(|_| rng.normal_f64() as f32).collect();
    let ys: Vec<u32> = (0..n).map(|_| rng.below(classes) as u32).collect();
    TensorDataset::new(xs, inputs, ys).expect("dataset")
}

/// Involuntary context switches of the calling thread so far (Linux; 0 elsewhere).
fn preemptions() -> u64 {
    ctxt_switches("nonvoluntary_ctxt_switches:")
}

/// Voluntary context switches of the calling thread so far: how often it slept
/// (waiting on a lock, a channel, I/O).
fn sleeps() -> u64 {
    ctxt_switches("voluntary_ctxt_switches:")
}

/// Minor page faults of the whole process so far (Linux; 0 elsewhere): memory the
/// allocator handed back to the system and touched again.
fn minor_faults() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Field 10, the 8th after the parenthesised command name.
            s.rsplit(')')
                .next()?
                .split_whitespace()
                .nth(7)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn ctxt_switches(field: &str) -> u64 {
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    None,
    Sync,
    Async,
}

/// What one fit measured.
struct Run {
    /// First batch start to the last step boundary: every step, with the saves
    /// they trigger (the one at the last step excepted), without set-up and the
    /// end of `fit` (final save, flush).
    steps_secs: f64,
    /// The whole `fit` call.
    fit_secs: f64,
    /// Boundary times per step.
    boundaries: Vec<(u64, Duration)>,
    /// Bytes of the last checkpoint's `state.json`.
    json: usize,
    /// Mean step time by position after a save (see [`profile`]).
    profile: Vec<f64>,
    /// The training thread's involuntary context switches during `fit`.
    preempted: u64,
    /// The training thread's voluntary context switches during `fit`.
    slept: u64,
    /// The process's minor page faults during `fit`.
    faults: u64,
}

/// One fit of `steps` (`json`: `state.json` bytes for the baseline copy).
fn fit(mode: Mode, steps: u64, json: usize) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let times = Arc::new(Mutex::new(Vec::new()));
    let window = Arc::new(Mutex::new((None, None)));
    let starts = Arc::new(Mutex::new(Vec::new()));
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
            window: Arc::clone(&window),
            starts: Arc::clone(&starts),
            baseline: Baseline::new(m.params.clone(), json),
        }));
    b = match mode {
        Mode::None => b.enable_checkpointing(false),
        Mode::Sync => b.checkpoint_every_n_steps(100),
        Mode::Async => b
            .checkpoint_every_n_steps(100)
            .async_checkpointing(true)
            .async_writer_priority(writer_priority()),
    };
    let mut t = b.build().expect("trainer");
    let cfg = LoaderConfig::new(batch()).shuffle(true).seed(3);
    let mut train = DataLoader::new(data(), TensorCollate::default(), cfg).expect("loader");
    let faults = minor_faults();
    let preempted = preemptions();
    let slept = sleeps();
    let start = Instant::now();
    t.fit(&mut m, &mut train, None).expect("fit");
    let fit_secs = start.elapsed().as_secs_f64();
    let preempted = preemptions() - preempted;
    let slept = sleeps() - slept;
    let faults = minor_faults() - faults;
    let boundaries = times.lock().map(|v| v.clone()).unwrap_or_default();
    let steps_secs = match window.lock().map(|w| *w) {
        Ok((Some(a), Some(b))) => b.duration_since(a).as_secs_f64(),
        _ => f64::NAN,
    };
    Run {
        steps_secs,
        fit_secs,
        boundaries,
        json: json_bytes(dir.path()),
        profile: starts.lock().map(|v| profile(&v)).unwrap_or_default(),
        preempted,
        slept,
        faults,
    }
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

/// Mean step time (batch start to batch start) by position after a save (0: the
/// step whose boundary saves, 1: the next, ... 99).
fn profile(starts: &[Instant]) -> Vec<f64> {
    let mut sum = [0f64; 100];
    let mut n = [0usize; 100];
    for (i, w) in starts.windows(2).enumerate() {
        let pos = (i + 1) % 100;
        sum[pos] += w[1].duration_since(w[0]).as_secs_f64();
        n[pos] += 1;
    }
    sum.iter()
        .zip(n)
        .map(|(s, c)| s / c.max(1) as f64)
        .collect()
}

/// Time a save adds to the 50 steps from its own (position 0) on, against the
/// same run's steps 51–99 (position 50, where the bench copies its memcpy
/// baseline, is left out): a within-run estimate, immune to the drift between
/// runs that limits the step-time comparison to about ±1%.
fn excess_per_save(p: &[f64]) -> f64 {
    let reference = median(p[51..].to_vec());
    p[..50].iter().map(|t| t - reference).sum()
}

fn main() {
    let steps: u64 = env_or("BENCH_STEPS", 2000);
    let rounds: usize = env_or("BENCH_ROUNDS", 5);
    // Warm-up; also learns the size of `state.json` for the baseline copy.
    let json = fit(Mode::Async, 100, 0).json;
    let modes = [Mode::None, Mode::Sync, Mode::Async];
    // `BENCH_ONLY=async` (or none, sync) runs one mode, for profiling.
    let only = std::env::var("BENCH_ONLY").ok();
    let label = |m: Mode| match m {
        Mode::None => "none",
        Mode::Sync => "sync",
        Mode::Async => "async",
    };
    let (mut step_t, mut fit_t, mut stalls) = (
        [vec![], vec![], vec![]],
        [vec![], vec![], vec![]],
        [vec![], vec![], vec![]],
    );
    let mut copy_stall = Vec::new();
    let mut preempted = [vec![], vec![], vec![]];
    let mut excess = [vec![], vec![], vec![]];
    let mut slept = [vec![], vec![], vec![]];
    let mut faults = [vec![], vec![], vec![]];
    let mut profiles: [Vec<f64>; 3] = [vec![0.0; 100], vec![0.0; 100], vec![0.0; 100]];
    for _ in 0..rounds {
        for (i, mode) in modes.iter().enumerate() {
            if only.as_deref().is_some_and(|o| o != label(*mode)) {
                continue;
            }
            let r = fit(*mode, steps, json);
            step_t[i].push(r.steps_secs);
            fit_t[i].push(r.fit_secs);
            stalls[i].push(stall(&r.boundaries, 0));
            preempted[i].push(r.preempted as f64);
            excess[i].push(excess_per_save(&r.profile));
            slept[i].push(r.slept as f64);
            faults[i].push(r.faults as f64);
            for (acc, v) in profiles[i].iter_mut().zip(&r.profile) {
                *acc += v / rounds as f64;
            }
            if *mode == Mode::Async {
                copy_stall.push(stall(&r.boundaries, 50));
            }
        }
    }
    if only.is_some() {
        for (i, m) in modes.iter().enumerate() {
            if !step_t[i].is_empty() {
                println!(
                    "{}: steps {:.1} ms, a save adds {:+.3} ms, stall {:.3} ms, preempted {:.0}, slept {:.0}, page faults {:.0}",
                    label(*m),
                    median(step_t[i].clone()) * 1e3,
                    median(excess[i].clone()) * 1e3,
                    median(stalls[i].clone()) * 1e3,
                    median(preempted[i].clone()),
                    median(slept[i].clone()),
                    median(faults[i].clone())
                );
            }
        }
        return;
    }
    let [n, s, a] = step_t.map(median);
    let [fn_, fs, fa] = fit_t.map(median);
    println!(
        "checkpoint_overhead: MLP {:?}, batch {}, {steps} steps, checkpoint every 100 steps, {rounds} rounds (medians)",
        dims(),
        batch()
    );
    println!("  step-time overhead (first batch to last step boundary; excludes set-up and the end of fit):");
    println!(
        "    no checkpoints : {:8.1} ms  ({:.3} ms/step)",
        n * 1e3,
        n * 1e3 / steps as f64
    );
    println!(
        "    sync  every 100: {:8.1} ms  overhead {:+.2}%",
        s * 1e3,
        (s / n - 1.0) * 100.0
    );
    println!(
        "    async every 100: {:8.1} ms  overhead {:+.2}%  (target <= 1%)",
        a * 1e3,
        (a / n - 1.0) * 100.0
    );
    println!(
        "  whole fit (with set-up, the final save and its flush): none {:.1} ms, sync {:.1} ms ({:+.2}%), async {:.1} ms ({:+.2}%)",
        fn_ * 1e3,
        fs * 1e3,
        (fs / fn_ - 1.0) * 100.0,
        fa * 1e3,
        (fa / fn_ - 1.0) * 100.0
    );
    for (label, p) in ["none ", "sync ", "async"].iter().zip(&profiles) {
        let cells: Vec<String> = p
            .chunks(10)
            .map(|c| format!("{:.3}", c.iter().sum::<f64>() / c.len() as f64 * 1e3))
            .collect();
        println!(
            "  {label} ms/step by steps since the last save (0-9, 10-19, ...): {}",
            cells.join(" ")
        );
    }
    let [en, es, ea] = excess.map(median);
    println!(
        "  time a save adds to its run's next 50 steps (within-run estimate, median of rounds): none {:+.3} ms, sync {:+.3} ms ({:+.2}% of 100 steps), async {:+.3} ms ({:+.2}% of 100 steps)",
        en * 1e3,
        es * 1e3,
        es / (n / steps as f64 * 100.0) * 100.0,
        ea * 1e3,
        ea / (n / steps as f64 * 100.0) * 100.0,
    );
    let [pn, ps, pa] = preempted.map(median);
    let [sn, ss_, sa] = slept.map(median);
    let [fan, fas, faa] = faults.map(median);
    println!(
        "  training thread context switches per fit: preempted none {pn:.0}, sync {ps:.0}, async {pa:.0}; slept none {sn:.0}, sync {ss_:.0}, async {sa:.0}"
    );
    println!("  process minor page faults per fit: none {fan:.0}, sync {fas:.0}, async {faa:.0}");
    let tensors = state_bytes();
    let bytes = tensors + json;
    let hot = memcpy_time(bytes);
    let [ns, ss, as_] = stalls.map(median);
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
