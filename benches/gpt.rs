//! The GPT job's training throughput: relume against a hand-written candle-nn loop,
//! in one run, on the same configuration.
//!
//! - **relume**: the model of `examples/gpt_model.rs` (candle-nn `Linear` and
//!   `Embedding` through `ParamStore::var_builder`, relume's LayerNorm, GELU,
//!   causal attention and fused cross-entropy) under `Trainer::fit` with the job's
//!   settings: fused AdamW, warmup + cosine, clipping at norm 1, the window loader
//!   (no validation, no checkpoints).
//! - **candle-nn**: the same architecture, dimensions, initialisation law, data
//!   order and optimizer settings written as a candle user does: a `VarMap`,
//!   `candle_nn::linear`-style layers, LayerNorm and attention from candle ops
//!   (`candle_nn::ops::softmax`; candle-nn's fused LayerNorm and
//!   `softmax_last_dim` have no backward), `candle_nn::loss::cross_entropy`,
//!   `candle_nn::AdamW`, the same schedule and global-norm clipping by hand.
//!
//! - **relume, thread ranks**: the same job data-parallel over `BENCH_RANKS`
//!   threads of one process (`relume::dist::run_threads`), each rank computing
//!   its share of every step's 32 windows with `threads / ranks` kernel threads;
//!   the same global batch and optimizer, the contract of `relume::dist`. It runs
//!   in a child process of the bench, since kernel thread counts are set per
//!   process.
//!
//! Both use the same thread count (`relume::set_cpu_threads`, default: the
//! available cores). Prints tokens/s for each and the ratios to candle-nn.
//!
//! `cargo bench -p relume --bench gpt` (env: `BENCH_STEPS` timed optimizer steps,
//! default 20, after 2 untimed; `BENCH_THREADS`; `BENCH_RANKS`, default the
//! threads, 1 to skip the thread-rank row). The dimensions are the example's
//! defaults: block 64, d_model 128, 4 layers, 4 heads, batch 32, no dropout.
//! `scripts/torch_gpt.py` is the same model in PyTorch.

#[path = "../examples/gpt_model.rs"]
#[allow(dead_code)]
mod gpt_model;

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{Optimizer as _, VarBuilder, VarMap};
use gpt_model::{linear_params, Cadence, Corpus, Gpt, GptConfig, GptModule, OptConfig};
use relume::data::LoaderConfig;
use relume::dist::{run_threads, Collective, DEFAULT_TIMEOUT};
use std::sync::Arc;

const BLOCK: usize = 64;
const BATCH: usize = 32;
const LR: f64 = 3e-3;
const WEIGHT_DECAY: f64 = 0.1;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(vocab: usize) -> GptConfig {
    GptConfig {
        vocab,
        block: BLOCK,
        d_model: 128,
        layers: 4,
        heads: 4,
        dropout: 0.0,
        tied: true,
    }
}

/// The job's learning rate at optimizer step `step` of `total` (what
/// `GptModule::configure_optimizers` builds: 1% → 100% over `warmup`, then a
/// cosine to 10%).
fn lr_at(step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        LR * (0.01 + 0.99 * step as f64 / warmup as f64)
    } else {
        let t = (step - warmup) as f64 / (total - warmup).max(1) as f64;
        LR / 10.0 + (LR - LR / 10.0) * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0
    }
}

/// relume: `Trainer::fit` over `steps` optimizer steps of `BATCH` windows, in
/// micro-batches of `BATCH / accumulate`, at the collective's rank (one process
/// when `None`); returns the seconds.
fn relume_run(
    corpus: &Corpus,
    steps: u64,
    accumulate: u64,
    collective: Option<Arc<dyn Collective>>,
) -> anyhow::Result<f64> {
    let mut train = gpt_model::loader(
        corpus.train.clone(),
        BLOCK,
        BLOCK,
        LoaderConfig::new(BATCH / accumulate as usize).shuffle(true),
    )?;
    let mut module = GptModule {
        model: Gpt::new(config(corpus.vocab.len()), 0)?,
        opt: OptConfig {
            lr: LR,
            weight_decay: WEIGHT_DECAY,
            warmup: (steps / 20).max(1),
            total_steps: steps,
        },
    };
    let cadence = Cadence {
        max_steps: steps,
        accumulate,
        val_every: steps,
        val_batches: 0,
        checkpoint_every: steps,
        keep: 0,
    };
    let dir = tempfile::tempdir()?;
    let mut builder = gpt_model::trainer_builder(&cadence, train.batches_per_epoch(), 0)
        .default_root_dir(dir.path())
        .enable_checkpointing(false)
        .enable_progress_bar(false);
    if let Some(c) = collective {
        builder = builder.collective(c);
    }
    let mut trainer = builder.build()?;
    let t = Instant::now();
    trainer.fit(&mut module, &mut train, None)?;
    Ok(t.elapsed().as_secs_f64())
}

/// relume data-parallel over `ranks` threads of this process (`ThreadGroup`),
/// every rank computing `1 / ranks` of each step's windows; returns the slowest
/// rank's seconds.
fn relume_threads_run(corpus: &Corpus, steps: u64, ranks: usize) -> anyhow::Result<f64> {
    let corpus = Arc::new(corpus.clone());
    let secs = run_threads(ranks, DEFAULT_TIMEOUT, move |g| {
        let rank = g.rank();
        relume_run(&corpus, steps, ranks as u64, Some(Arc::new(g))).map_err(|e| {
            relume::Error::InvalidSetting {
                setting: "gpt bench".into(),
                value: format!("rank {rank}"),
                rule: format!("{e:#}"),
            }
        })
    })?;
    Ok(secs.into_iter().fold(0.0, f64::max))
}

/// LayerNorm from candle ops (candle-nn's own has no backward).
struct Norm {
    w: Tensor,
    b: Tensor,
}

impl Norm {
    fn new(d: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Norm {
            w: vb.get_with_hints(d, "weight", candle_nn::Init::Const(1.0))?,
            b: vb.get_with_hints(d, "bias", candle_nn::Init::Const(0.0))?,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let c = x.broadcast_sub(&mean)?;
        let var = c.sqr()?.mean_keepdim(D::Minus1)?;
        c.broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(&self.w)?
            .broadcast_add(&self.b)
    }
}

struct CandleBlock {
    ln1: Norm,
    qkv: candle_nn::Linear,
    proj: candle_nn::Linear,
    ln2: Norm,
    fc: candle_nn::Linear,
    out: candle_nn::Linear,
}

/// The same GPT in plain candle-nn.
struct CandleGpt {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<CandleBlock>,
    ln_f: Norm,
    mask: Tensor,
    cfg: GptConfig,
}

impl CandleGpt {
    fn new(cfg: GptConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.d_model;
        let emb = |n: usize, name: &str| {
            vb.pp(name).get_with_hints(
                (n, d),
                "weight",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )
        };
        let resid = 0.02 / (2.0 * cfg.layers as f64).sqrt();
        let blocks = (0..cfg.layers)
            .map(|i| {
                let vb = vb.pp(format!("h.{i}"));
                let linear = |inp, out, std, name: &str| {
                    let (w, b) = linear_params(inp, out, std, vb.pp(name))?;
                    candle_core::Result::Ok(candle_nn::Linear::new(w, Some(b)))
                };
                Ok(CandleBlock {
                    ln1: Norm::new(d, vb.pp("ln1"))?,
                    qkv: linear(d, 3 * d, 0.02, "attn.qkv")?,
                    proj: linear(d, d, resid, "attn.proj")?,
                    ln2: Norm::new(d, vb.pp("ln2"))?,
                    fc: linear(d, 4 * d, 0.02, "mlp.fc")?,
                    out: linear(4 * d, d, resid, "mlp.proj")?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let t = cfg.block;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Ok(CandleGpt {
            wte: emb(cfg.vocab, "wte")?,
            wpe: emb(cfg.block, "wpe")?,
            blocks,
            ln_f: Norm::new(d, vb.pp("ln_f"))?,
            mask: Tensor::from_vec(mask, (t, t), &Device::Cpu)?,
            cfg,
        })
    }

    fn loss(&self, idx: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = idx.dims2()?;
        let (d, h) = (self.cfg.d_model, self.cfg.heads);
        let hd = d / h;
        let tok = candle_nn::Embedding::new(self.wte.clone(), d).forward(idx)?;
        let mut x = tok
            .broadcast_add(&self.wpe.narrow(0, 0, t)?)?
            .reshape((b * t, d))?;
        for blk in &self.blocks {
            let qkv = blk
                .qkv
                .forward(&blk.ln1.forward(&x)?)?
                .reshape((b, t, 3 * d))?;
            let head = |i: usize| {
                qkv.narrow(2, i * d, d)?
                    .reshape((b, t, h, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (head(0)?, head(1)?, head(2)?);
            let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(&self.mask)?;
            let att = candle_nn::ops::softmax(&att, D::Minus1)?;
            let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b * t, d))?;
            x = (x + blk.proj.forward(&y)?)?;
            let m = blk.fc.forward(&blk.ln2.forward(&x)?)?.gelu()?;
            x = (&x + blk.out.forward(&m)?)?;
        }
        let logits = self.ln_f.forward(&x)?.matmul(&self.wte.t()?)?;
        candle_nn::loss::cross_entropy(&logits, &y.flatten_all()?)
    }
}

/// The candle-nn loop over `steps` optimizer steps; returns the seconds.
fn candle_run(corpus: &Corpus, steps: u64) -> anyhow::Result<f64> {
    let train = gpt_model::loader(
        corpus.train.clone(),
        BLOCK,
        BLOCK,
        LoaderConfig::new(BATCH).shuffle(true),
    )?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = CandleGpt::new(config(corpus.vocab.len()), vb)?;
    let vars: Vec<Var> = varmap.all_vars();
    let mut opt = candle_nn::AdamW::new(
        vars.clone(),
        candle_nn::ParamsAdamW {
            lr: LR,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: WEIGHT_DECAY,
        },
    )?;
    let warmup = (steps / 20).max(1);
    let t0 = Instant::now();
    let mut step = 0;
    'outer: loop {
        for batch in train.epoch_iter()? {
            if step == steps {
                break 'outer;
            }
            let (x, y) = batch?;
            let loss = model.loss(&x, &y)?;
            let mut grads = loss.backward()?;
            let mut sq = 0f64;
            for v in &vars {
                if let Some(g) = grads.get(v) {
                    sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
                }
            }
            let norm = sq.sqrt();
            if norm > 1.0 {
                for v in &vars {
                    if let Some(g) = grads.remove(v) {
                        grads.insert(v, (g * (1.0 / (norm + 1e-6)))?);
                    }
                }
            }
            opt.set_learning_rate(lr_at(step, warmup, steps));
            opt.step(&grads)?;
            let _ = loss.to_scalar::<f32>()?;
            step += 1;
        }
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// The thread-rank part, run in a child process of the bench (candle's and relume's
/// kernels read their thread count once per process): prints the seconds of
/// `steps` steps at `ranks` ranks of `threads / ranks` kernel threads each.
fn threads_part(corpus: &Corpus, steps: u64, threads: usize, ranks: usize) -> anyhow::Result<()> {
    relume::set_cpu_threads(threads / ranks);
    relume_threads_run(corpus, 2, ranks)?;
    println!("seconds {}", relume_threads_run(corpus, steps, ranks)?);
    Ok(())
}

/// Runs [`threads_part`] in a child process and returns its seconds.
fn threads_child(steps: u64, threads: usize, ranks: usize) -> anyhow::Result<f64> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .env("BENCH_PART", "threads")
        .env("BENCH_STEPS", steps.to_string())
        .env("BENCH_THREADS", threads.to_string())
        .env("BENCH_RANKS", ranks.to_string())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "the thread-rank run failed ({}): {}{}",
        out.status,
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| l.strip_prefix("seconds ")?.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("the thread-rank run printed no seconds: {text}"))
}

fn main() -> anyhow::Result<()> {
    gpt_model::keep_freed_memory();
    let threads = env(
        "BENCH_THREADS",
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
    );
    let steps = env("BENCH_STEPS", 20) as u64;
    let ranks = env("BENCH_RANKS", threads).clamp(1, threads.max(1));
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/data/kjv.txt");
    let corpus = Corpus::from_path(std::path::Path::new(path), BLOCK)?;
    if std::env::var("BENCH_PART").as_deref() == Ok("threads") {
        return threads_part(&corpus, steps, threads, ranks);
    }
    relume::set_cpu_threads(threads);
    let tokens = (steps as usize * BATCH * BLOCK) as f64;
    println!(
        "gpt bench: block {BLOCK}, d_model 128, 4 layers, 4 heads, batch {BATCH}, vocab {}, {steps} steps, {threads} threads",
        corpus.vocab.len()
    );
    // Warm both up (allocator, thread pools), untimed.
    relume_run(&corpus, 2, 1, None)?;
    candle_run(&corpus, 2)?;
    let r = relume_run(&corpus, steps, 1, None)?;
    let c = candle_run(&corpus, steps)?;
    let (rt, ct) = (tokens / r, tokens / c);
    let row = |name: &str, secs: f64| {
        println!(
            "{name:<34} {:>9.0} tokens/s ({:.1} ms/step)",
            tokens / secs,
            secs * 1e3 / steps as f64
        )
    };
    row("relume, 1 process", r);
    row("candle-nn", c);
    println!("ratio relume / candle-nn: {:.2}x (target >= 1.5x)", rt / ct);
    if ranks > 1 {
        let d = threads_child(steps, threads, ranks)?;
        row(
            &format!("relume, {ranks} thread ranks x {} thread", threads / ranks),
            d,
        );
        println!(
            "ratio relume {ranks} thread ranks / candle-nn: {:.2}x; / relume 1 process: {:.2}x",
            tokens / d / ct,
            r / d
        );
    }
    Ok(())
}
