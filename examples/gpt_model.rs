//! The character-level GPT of `examples/gpt.rs`, shared with its resume test
//! (`crates/relume/tests/gpt_resume.rs`) and its bench (`benches/gpt.rs`), which
//! include this file with `#[path]`: the corpus and its train/val split, the
//! window dataset, the model, its [`TrainModule`] and the trainer settings.
//!
//! - **Corpus.** A text file read as bytes; the vocabulary is the sorted set of
//!   distinct bytes of the whole file. The split is a fixed rule: the last
//!   [`VAL_FRACTION`] of the bytes are validation, the rest training.
//! - **Data.** [`Windows`]: window `i` is the `block + 1` characters starting at
//!   `i * stride` (a fixed grid), input = the first `block`, target = the last
//!   `block`. The loader shuffles the window order per epoch from `(seed, epoch)`
//!   and saves its cursor, so a mid-epoch resume continues with the same windows.
//! - **Model.** Token and position embeddings (std 0.02), `layers` pre-LayerNorm
//!   blocks (causal multi-head self-attention, a 4× GELU MLP, dropout after the
//!   embeddings, the attention projection and the MLP), a final LayerNorm and a
//!   head tied to the token embedding (or a separate one). Every layer is a
//!   candle-nn `Linear`/`Embedding` whose variables come from
//!   `ParamStore::var_builder`; normalisation, GELU and attention are relume's
//!   (candle-nn 0.11's fused LayerNorm and softmax have no backward pass).
//! - **Numbers.** f32 throughout: relume's fused CPU kernels (cross-entropy,
//!   AdamW, LayerNorm, attention) are f32, and candle 0.11's CPU bf16 matmul is
//!   slower than f32, so bf16 would only lose precision here.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use relume::callbacks::ModelCheckpoint;
use relume::data::{DataLoader, Dataset, FnCollate, LoaderConfig};
use relume::nn::{causal_self_attention, cross_entropy, dropout, layer_norm, LayerNorm, Linear};
use relume::optim::{AdamConfig, AdamW};
use relume::params::ParamStore;
use relume::rng::Rng;
use relume::sched::{CosineAnnealingLR, LinearLR, SequentialLR};
use relume::trainer::{
    LogOpts, OptimizerConfig, SchedulerConfig, StepCtx, TrainModule, Trainer, TrainerBuilder,
    ValCheck,
};

/// The share of the corpus (its last bytes) used for validation.
pub const VAL_FRACTION: f64 = 0.1;

/// The GPT job's allocator. A training step allocates and frees many tensors of a
/// few MiB; glibc's malloc maps and unmaps each one (page faults, TLB shootdowns),
/// which cost the job about 20% of its step time on 2 cores. mimalloc reuses them.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps the memory the job frees mapped for reuse, instead of returning it to the
/// OS after a delay (mimalloc's default purge) and faulting fresh zeroed pages in at the
/// next step; another 5–10% of step time. The job's working set is the same every
/// step, so its footprint does not grow. Call it first in `main`.
pub fn keep_freed_memory() {
    // `mi_option_purge_delay` is option 15 in mimalloc.h (v2 and v3); -1 never purges.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: mi_option_set only stores the value; mimalloc reads it at each purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

/// A text corpus as token ids, split into training and validation parts.
#[derive(Clone, Debug)]
pub struct Corpus {
    /// Token id → byte.
    pub vocab: Vec<u8>,
    /// The training part (the first 90% of the bytes).
    pub train: Arc<Vec<u32>>,
    /// The validation part (the last 10%).
    pub val: Arc<Vec<u32>>,
}

impl Corpus {
    /// Reads `path` and splits it.
    ///
    /// # Errors
    /// A missing or unreadable file, an empty one, or one too short for a
    /// validation window of `block + 1` characters; each message names the file.
    pub fn from_path(path: &Path, block: usize) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read the corpus {}", path.display()))?;
        Corpus::from_bytes(&bytes, block).with_context(|| format!("corpus {}", path.display()))
    }

    /// Splits `text`: the last [`VAL_FRACTION`] of the bytes are validation.
    ///
    /// # Errors
    /// Empty text, or a part shorter than `block + 1` characters.
    pub fn from_bytes(text: &[u8], block: usize) -> anyhow::Result<Self> {
        if text.is_empty() {
            bail!("the file is empty; a corpus needs text to train on");
        }
        let mut seen = [false; 256];
        for &b in text {
            seen[b as usize] = true;
        }
        let vocab: Vec<u8> = (0..=255u8).filter(|&b| seen[b as usize]).collect();
        let mut id = [0u32; 256];
        for (i, &b) in vocab.iter().enumerate() {
            id[b as usize] = i as u32;
        }
        let n_val = (text.len() as f64 * VAL_FRACTION).round() as usize;
        let (train, val) = text.split_at(text.len() - n_val);
        for (part, len) in [("training", train.len()), ("validation", val.len())] {
            if len < block + 1 {
                bail!(
                    "the {part} part has {len} bytes ({} bytes in all, the last {:.0}% are validation); a window needs {} (--block {block} + 1)",
                    text.len(),
                    VAL_FRACTION * 100.0,
                    block + 1
                );
            }
        }
        let encode = |s: &[u8]| Arc::new(s.iter().map(|&b| id[b as usize]).collect::<Vec<_>>());
        Ok(Corpus {
            train: encode(train),
            val: encode(val),
            vocab,
        })
    }

    /// The token ids of `text`, or an error naming the first byte not in the vocabulary.
    ///
    /// # Errors
    /// A byte the corpus does not contain.
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        text.bytes()
            .map(|b| match self.vocab.binary_search(&b) {
                Ok(i) => Ok(i as u32),
                Err(_) => bail!(
                    "the prompt's character {:?} is not in the corpus",
                    b as char
                ),
            })
            .collect()
    }

    /// The text of token ids (invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .filter_map(|&i| self.vocab.get(i as usize).copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The entropy of the validation part's own character frequencies, in nats per
    /// character: the loss of the best model that ignores context (a unigram model
    /// fitted to the validation text itself).
    pub fn val_unigram_entropy(&self) -> f64 {
        let mut counts = vec![0u64; self.vocab.len()];
        for &t in self.val.iter() {
            counts[t as usize] += 1;
        }
        let n = self.val.len() as f64;
        counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / n;
                -p * p.ln()
            })
            .sum()
    }
}

/// Windows of `block + 1` token ids on a fixed grid: window `i` starts at
/// `i * stride`. An item is the window (input = the first `block`, target = the
/// last `block`).
#[derive(Clone, Debug)]
pub struct Windows {
    tokens: Arc<Vec<u32>>,
    block: usize,
    stride: usize,
}

impl Windows {
    /// Every window of `block + 1` tokens starting at a multiple of `stride` (>= 1).
    pub fn new(tokens: Arc<Vec<u32>>, block: usize, stride: usize) -> Self {
        Windows {
            tokens,
            block,
            stride: stride.max(1),
        }
    }
}

impl Dataset for Windows {
    type Item = Vec<u32>;

    fn len(&self) -> usize {
        match self.tokens.len().checked_sub(self.block + 1) {
            Some(room) => room / self.stride + 1,
            None => 0,
        }
    }

    fn get(&self, index: usize) -> relume::Result<Vec<u32>> {
        let start = index * self.stride;
        match self.tokens.get(start..start + self.block + 1) {
            Some(w) => Ok(w.to_vec()),
            None => Err(relume::Error::IndexOutOfRange {
                index,
                len: self.len(),
            }),
        }
    }
}

/// A batch: inputs `[B, T]` and targets `[B, T]`, u32 token ids.
pub type Batch = (Tensor, Tensor);

/// A loader of [`Windows`] batches `(x, y)`, shuffled per epoch when `shuffle`.
///
/// # Errors
/// A zero batch size.
pub fn loader(
    tokens: Arc<Vec<u32>>,
    block: usize,
    stride: usize,
    cfg: LoaderConfig,
) -> relume::Result<DataLoader<Batch>> {
    let collate = FnCollate::new(move |items: Vec<Vec<u32>>| -> relume::Result<Batch> {
        let b = items.len();
        let mut x = Vec::with_capacity(b * block);
        let mut y = Vec::with_capacity(b * block);
        for w in &items {
            x.extend_from_slice(&w[..block]);
            y.extend_from_slice(&w[1..]);
        }
        Ok((
            Tensor::from_vec(x, (b, block), &Device::Cpu)?,
            Tensor::from_vec(y, (b, block), &Device::Cpu)?,
        ))
    });
    DataLoader::new(Windows::new(tokens, block, stride), collate, cfg)
}

/// The model's dimensions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Context length (positions).
    pub block: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads (`d_model` must be a multiple).
    pub heads: usize,
    /// Dropout probability (embeddings, attention output, MLP output).
    pub dropout: f32,
    /// Tie the output head to the token embedding.
    pub tied: bool,
}

/// The weight `[out, in]`, drawn N(0, std²), and the zero bias `[out]` of a linear
/// layer, both from the VarBuilder (GPT-2's initialisation, not candle-nn's kaiming
/// default).
pub fn linear_params(
    inp: usize,
    out: usize,
    std: f64,
    vb: VarBuilder,
) -> candle_core::Result<(Tensor, Tensor)> {
    let w = vb.get_with_hints(
        (out, inp),
        "weight",
        candle_nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    )?;
    let b = vb.get_with_hints(out, "bias", candle_nn::Init::Const(0.0))?;
    Ok((w, b))
}

/// relume's fused `Linear` over [`linear_params`] (the same names and values as a
/// candle-nn `Linear` would have; one fused op forward and backward).
pub fn linear(inp: usize, out: usize, std: f64, vb: VarBuilder) -> candle_core::Result<Linear> {
    let (w, b) = linear_params(inp, out, std, vb)?;
    Ok(Linear::from_tensors(w, b))
}

/// One pre-LayerNorm transformer block.
struct Block {
    ln1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ln2: LayerNorm,
    fc: Linear,
    out: Linear,
}

impl Block {
    fn new(cfg: &GptConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.d_model;
        // GPT-2: residual projections scaled by 1/sqrt(2 * layers).
        let resid = 0.02 / (2.0 * cfg.layers as f64).sqrt();
        Ok(Block {
            ln1: layer_norm(d, 1e-5, vb.pp("ln1"))?,
            qkv: linear(d, 3 * d, 0.02, vb.pp("attn.qkv"))?,
            proj: linear(d, d, resid, vb.pp("attn.proj"))?,
            ln2: layer_norm(d, 1e-5, vb.pp("ln2"))?,
            fc: linear(d, 4 * d, 0.02, vb.pp("mlp.fc"))?,
            out: linear(4 * d, d, resid, vb.pp("mlp.proj"))?,
        })
    }

    /// `x` is `[B, T, d]`; every layer keeps that shape, so no reshape enters the
    /// autograd graph.
    fn forward(
        &self,
        x: &Tensor,
        heads: usize,
        mut drop: Option<(f32, &mut Rng)>,
    ) -> relume::Result<Tensor> {
        let qkv = self.qkv.forward(&self.ln1.forward(x)?)?;
        let y = causal_self_attention(&qkv, heads)?;
        let y = drop_out(&self.proj.forward(&y)?, &mut drop)?;
        let x = (x + y)?;
        let m = self.fc.forward_gelu(&self.ln2.forward(&x)?)?;
        let m = drop_out(&self.out.forward(&m)?, &mut drop)?;
        Ok((x + m)?)
    }
}

/// Dropout when training (`Some((p, rng))`), the identity otherwise.
fn drop_out(x: &Tensor, drop: &mut Option<(f32, &mut Rng)>) -> relume::Result<Tensor> {
    match drop {
        Some((p, rng)) => dropout(x, *p, rng, true),
        None => Ok(x.clone()),
    }
}

/// The decoder-only transformer.
pub struct Gpt {
    params: ParamStore,
    cfg: GptConfig,
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    head: Option<Linear>,
}

impl Gpt {
    /// A model with parameters drawn from `seed` (each from `(seed, its name)`).
    ///
    /// # Errors
    /// `d_model` not a multiple of `heads`; candle errors.
    pub fn new(cfg: GptConfig, seed: u64) -> relume::Result<Self> {
        if cfg.heads == 0 || cfg.d_model % cfg.heads != 0 {
            return Err(relume::Error::InvalidHyperParameter {
                component: "Gpt".into(),
                what: "d_model / heads".into(),
                value: cfg.d_model as f64 / cfg.heads as f64,
                rule: "heads >= 1 dividing d_model".into(),
            });
        }
        let params = ParamStore::new(Device::Cpu);
        let vb = params.var_builder(seed);
        let emb = |n: usize, name: &str| -> candle_core::Result<Embedding> {
            let w = vb.pp(name).get_with_hints(
                (n, cfg.d_model),
                "weight",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?;
            Ok(Embedding::new(w, cfg.d_model))
        };
        let wte = emb(cfg.vocab, "wte")?;
        let wpe = emb(cfg.block, "wpe")?;
        let blocks = (0..cfg.layers)
            .map(|i| Block::new(&cfg, vb.pp(format!("h.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let ln_f = layer_norm(cfg.d_model, 1e-5, vb.pp("ln_f"))?;
        let head = if cfg.tied {
            None
        } else {
            Some(linear(cfg.d_model, cfg.vocab, 0.02, vb.pp("head"))?)
        };
        Ok(Gpt {
            params,
            cfg,
            wte,
            wpe,
            blocks,
            ln_f,
            head,
        })
    }

    /// The dimensions.
    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// The parameters.
    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// Logits `[B*T, vocab]` for token ids `idx` `[B, T]` (`T <= block`); dropout
    /// with `rng` when given.
    ///
    /// # Errors
    /// A context longer than `block`; candle errors.
    pub fn forward(&self, idx: &Tensor, rng: Option<&mut Rng>) -> relume::Result<Tensor> {
        let (b, t) = idx.dims2()?;
        let d = self.cfg.d_model;
        let pos = Tensor::arange(0u32, t as u32, idx.device())?;
        let x = self
            .wte
            .forward(idx)?
            .broadcast_add(&self.wpe.forward(&pos)?)?;
        let mut drop = match rng {
            Some(r) if self.cfg.dropout > 0.0 => Some((self.cfg.dropout, r)),
            _ => None,
        };
        let mut x = drop_out(&x, &mut drop)?;
        for block in &self.blocks {
            let again = drop.as_mut().map(|(p, r)| (*p, &mut **r));
            x = block.forward(&x, self.cfg.heads, again)?;
        }
        let x = self.ln_f.forward(&x)?.reshape((b * t, d))?;
        Ok(match &self.head {
            Some(head) => head.forward(&x)?,
            None => x.matmul(&self.wte.embeddings().t()?)?,
        })
    }

    /// Mean cross-entropy (nats per character) of the targets `y` `[B, T]`.
    ///
    /// # Errors
    /// As [`Gpt::forward`].
    pub fn loss(&self, x: &Tensor, y: &Tensor, rng: Option<&mut Rng>) -> relume::Result<Tensor> {
        let logits = self.forward(x, rng)?;
        cross_entropy(&logits, &y.flatten_all()?)
    }

    /// `n` characters continuing `prompt` (token ids), each drawn from the softmax
    /// of the logits at `temperature` with `rng`.
    ///
    /// # Errors
    /// candle errors.
    pub fn generate(
        &self,
        prompt: &[u32],
        n: usize,
        temperature: f64,
        rng: &mut Rng,
    ) -> relume::Result<Vec<u32>> {
        let mut ids = prompt.to_vec();
        if ids.is_empty() {
            ids.push(0);
        }
        for _ in 0..n {
            let ctx = &ids[ids.len().saturating_sub(self.cfg.block)..];
            let x = Tensor::from_slice(ctx, (1, ctx.len()), &Device::Cpu)?;
            let logits = self.forward(&x, None)?;
            let last: Vec<f32> = logits.get(ctx.len() - 1)?.to_vec1()?;
            ids.push(draw(&last, temperature, rng) as u32);
        }
        Ok(ids)
    }
}

/// An index drawn from `softmax(logits / temperature)` (the argmax at temperature 0).
fn draw(logits: &[f32], temperature: f64, rng: &mut Rng) -> usize {
    let argmax = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i);
    if temperature <= 0.0 {
        return argmax;
    }
    let max = f64::from(logits[argmax]);
    let w: Vec<f64> = logits
        .iter()
        .map(|&l| ((f64::from(l) - max) / temperature).exp())
        .collect();
    let mut u = rng.uniform_f64() * w.iter().sum::<f64>();
    for (i, wi) in w.iter().enumerate() {
        u -= wi;
        if u < 0.0 {
            return i;
        }
    }
    argmax
}

/// The optimisation settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Linear warmup, in optimizer steps (from 1% of `lr`).
    pub warmup: u64,
    /// Optimizer steps of the run: the cosine falls to `lr / 10` at the last one.
    pub total_steps: u64,
}

/// The GPT as a [`TrainModule`]: AdamW with warmup then cosine.
pub struct GptModule {
    /// The model.
    pub model: Gpt,
    /// Its optimisation.
    pub opt: OptConfig,
}

impl TrainModule for GptModule {
    type Batch = Batch;

    fn params(&self) -> &ParamStore {
        &self.model.params
    }

    fn training_step(&mut self, (x, y): Batch, ctx: &mut StepCtx<'_>) -> relume::Result<Tensor> {
        let loss = self.model.loss(&x, &y, Some(ctx.rng("dropout")))?;
        ctx.log_tensor("train_loss", &loss, LogOpts::new().prog_bar())?;
        Ok(loss)
    }

    fn validation_step(&mut self, (x, y): Batch, ctx: &mut StepCtx<'_>) -> relume::Result<()> {
        let loss = self.model.loss(&x, &y, None)?;
        let chars = y.elem_count();
        ctx.log_tensor(
            "val_loss",
            &loss,
            LogOpts::new().batch_size(chars).prog_bar(),
        )?;
        Ok(())
    }

    fn configure_optimizers(&self) -> relume::Result<Vec<OptimizerConfig>> {
        let OptConfig {
            lr,
            weight_decay,
            warmup,
            total_steps,
        } = self.opt;
        let cfg = AdamConfig::adamw()
            .with_lr(lr)
            .with_betas(0.9, 0.99)
            .with_weight_decay(weight_decay);
        let opt = AdamW::from_store(&self.model.params, cfg)?;
        let warmup = warmup.clamp(1, total_steps.max(2) - 1);
        let sched = SequentialLR::new(
            vec![
                Box::new(LinearLR::new(vec![lr], 0.01, 1.0, warmup)?),
                Box::new(CosineAnnealingLR::new(
                    vec![lr],
                    total_steps.saturating_sub(warmup).max(1),
                    lr / 10.0,
                )?),
            ],
            vec![warmup],
        )?;
        Ok(vec![
            OptimizerConfig::new(opt).with_scheduler(SchedulerConfig::per_step(sched))
        ])
    }
}

/// How often the run validates and saves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cadence {
    /// Optimizer steps of the run.
    pub max_steps: u64,
    /// Micro-batches per optimizer step.
    pub accumulate: u64,
    /// Validate every n optimizer steps (and at the end of each epoch).
    pub val_every: u64,
    /// Validation batches per validation (0: all).
    pub val_batches: u64,
    /// A checkpoint every n optimizer steps; the newest `keep` are kept.
    pub checkpoint_every: u64,
    /// Step checkpoints kept.
    pub keep: i64,
}

/// The job's trainer settings (the example adds loggers, signals and resume):
/// `max_steps` (and the epochs they span over `batches_per_epoch`), gradient-norm
/// clipping at 1, accumulation, validation and a `ModelCheckpoint` saving
/// `step=…` every `checkpoint_every` steps.
pub fn trainer_builder(c: &Cadence, batches_per_epoch: usize, seed: u64) -> TrainerBuilder {
    // An epoch ends with a step even inside an accumulation window.
    let steps_per_epoch = (batches_per_epoch.max(1) as u64).div_ceil(c.accumulate.max(1));
    let epochs = c.max_steps.div_ceil(steps_per_epoch).max(1);
    let mut b = Trainer::builder()
        .max_steps(c.max_steps)
        .max_epochs(epochs)
        .seed(seed)
        .gradient_clip_val(1.0)
        .accumulate_grad_batches(c.accumulate)
        .val_check_interval(ValCheck::Steps(c.val_every.max(1)))
        .log_every_n_steps(10)
        .checkpoint_every_n_epochs(0)
        .callback(Box::new(
            ModelCheckpoint::new()
                .every_n_train_steps(c.checkpoint_every.max(1))
                .save_top_k(c.keep)
                .filename("step={step}"),
        ));
    if c.val_batches > 0 {
        b = b.limit_val_batches(c.val_batches);
    }
    b
}
