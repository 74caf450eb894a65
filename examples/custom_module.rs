//! # custom_module: the README's "Writing your own" guide, compiled and run
//!
//! A small classifier on the shipped digits data, trained with the Lightning-style
//! pieces a new job needs: a `TrainModule` with a scheduled optimizer, callbacks
//! (`ModelCheckpoint`, `EarlyStopping`, `LearningRateMonitor`), loggers (`CsvLogger`,
//! `TensorBoardLogger`), then a fine-tune that starts from the pretrained weights,
//! and a look at what was kept on disk. The README quotes this file; its test
//! `readme_snippets_are_this_file` checks every quoted block is in here verbatim.
//!
//! ```text
//! cargo run --release --example custom_module -- [--max-epochs N] [--run-dir DIR]
//! ```
//!
//! `cargo test --workspace` runs it (2 epochs, in a temporary directory).

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{Device, Tensor};
use relume::callbacks::{EarlyStopping, LearningRateMonitor, Mode, ModelCheckpoint};
use relume::data::{CsvDataset, DataLoader, LoaderConfig, TensorCollate};
use relume::loggers::{CsvLogger, TensorBoardLogger};
use relume::nn::{cross_entropy, Linear};
use relume::optim::{AdamConfig, AdamW};
use relume::params::ParamStore;
use relume::rng::Rng;
use relume::sched::CosineAnnealingLR;
use relume::trainer::{
    LogOpts, OptimizerConfig, ResumePolicy, SchedulerConfig, Source, StepCtx, TrainModule, Trainer,
};
use relume::weights::WeightsOptions;
use relume::Result;
use relume_ckpt::CheckpointDir;

// --8<-- [start:model]
/// A 64-32-10 MLP. Parameters live in a `ParamStore`, named `l1.weight`, ...
struct Classifier {
    params: ParamStore,
    l1: Linear,
    l2: Linear,
    total_steps: u64, // for the cosine schedule
}

impl Classifier {
    fn new(seed: u64, total_steps: u64) -> Result<Self> {
        let params = ParamStore::new(Device::Cpu);
        let mut rng = Rng::new(seed, "init");
        let l1 = Linear::new(&params, "l1", 64, 32, &mut rng)?;
        let l2 = Linear::new(&params, "l2", 32, 10, &mut rng)?;
        Ok(Classifier {
            params,
            l1,
            l2,
            total_steps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.l2.forward(&self.l1.forward_relu(x)?)
    }
}
// --8<-- [end:model]

// --8<-- [start:module]
impl TrainModule for Classifier {
    type Batch = (Tensor, Tensor);

    fn params(&self) -> &ParamStore {
        &self.params
    }

    fn training_step(&mut self, (x, y): Self::Batch, ctx: &mut StepCtx<'_>) -> Result<Tensor> {
        let loss = cross_entropy(&self.forward(&x)?, &y)?;
        let opts = LogOpts::new().on_epoch(true).prog_bar(); // also logs train_loss_epoch
        ctx.log_tensor("train_loss", &loss, opts)?;
        Ok(loss)
    }

    fn validation_step(&mut self, (x, y): Self::Batch, ctx: &mut StepCtx<'_>) -> Result<()> {
        let loss = cross_entropy(&self.forward(&x)?, &y)?;
        let opts = LogOpts::new().batch_size(x.dim(0)?).prog_bar();
        ctx.log_tensor("val_loss", &loss, opts)?;
        Ok(())
    }

    fn configure_optimizers(&self) -> Result<Vec<OptimizerConfig>> {
        let opt = AdamW::from_store(&self.params, AdamConfig::adamw().with_lr(3e-3))?;
        let sched = CosineAnnealingLR::new(vec![3e-3], self.total_steps, 0.0)?;
        Ok(vec![
            OptimizerConfig::new(opt).with_scheduler(SchedulerConfig::per_step(sched))
        ])
    }
}
// --8<-- [end:module]

// --8<-- [start:trainer]
/// A trainer writing to `run_dir`: checkpoints/ and logs/ go under it.
fn trainer(run_dir: &Path, max_epochs: u64) -> anyhow::Result<Trainer> {
    let logs = run_dir.join("logs");
    let trainer = Trainer::builder()
        .max_epochs(max_epochs)
        .seed(0)
        .default_root_dir(run_dir)
        .checkpoint_every_n_epochs(0) // ModelCheckpoint decides what is kept
        .callback(Box::new(
            ModelCheckpoint::new()
                .monitor("val_loss", Mode::Min)
                .save_top_k(2) // the 2 best epochs by val_loss ...
                .save_last(true) // ... and the newest one, as last-...
                .filename("epoch={epoch}-val_loss={val_loss:.4f}"),
        ))
        .callback(Box::new(
            EarlyStopping::new("val_loss", Mode::Min).patience(3),
        ))
        .callback(Box::new(LearningRateMonitor::new())) // logs lr-AdamW
        .logger(Box::new(CsvLogger::new(&logs))) // logs/metrics.csv
        .logger(Box::new(TensorBoardLogger::new(&logs))) // logs/events.out.tfevents.*
        .resume(ResumePolicy::IfExists(Source::Last)) // rerun = resume
        .build()?;
    Ok(trainer)
}
// --8<-- [end:trainer]

/// A loader of `(x, y)` batches.
type Loader = DataLoader<(Tensor, Tensor)>;

/// The digits data, split 80/20 into train and validation loaders.
fn loaders() -> anyhow::Result<(Loader, Loader)> {
    let csv = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/data/digits.csv"
    );
    let data = CsvDataset::from_path(csv, 0)?
        .into_tensor_dataset()
        .scaled(1.0 / 16.0);
    let (train_set, val_set) = data.split(0.8, 42)?;
    let cfg = LoaderConfig::new(32).shuffle(true).seed(0);
    let train = DataLoader::new(train_set, TensorCollate::default(), cfg)?;
    let val = DataLoader::new(val_set, TensorCollate::default(), LoaderConfig::new(256))?;
    Ok((train, val))
}

// --8<-- [start:fit]
/// Trains a fresh `Classifier` in `run_dir` (or resumes it, when it has a checkpoint).
fn pretrain(run_dir: &Path, max_epochs: u64) -> anyhow::Result<()> {
    let (mut train, val) = loaders()?;
    let total_steps = train.batches_per_epoch() as u64 * max_epochs;
    let mut module = Classifier::new(0, total_steps)?;
    let outcome = trainer(run_dir, max_epochs)?.fit(&mut module, &mut train, Some(&val))?;
    println!(
        "pretrain: step {}, {:?}",
        outcome.summary().global_step,
        outcome.summary().metrics
    );
    Ok(())
}
// --8<-- [end:fit]

// --8<-- [start:weights]
/// A new run in `run_dir` that starts from the weights of `pretrained`'s latest
/// checkpoint and trains the output layer only, with a fresh optimizer, schedule,
/// step counter and logs.
fn finetune(pretrained: &Path, run_dir: &Path, max_epochs: u64) -> anyhow::Result<()> {
    let (mut train, val) = loaders()?;
    let total_steps = train.batches_per_epoch() as u64 * max_epochs;
    let mut module = Classifier::new(1, total_steps)?;
    // Verified first (sizes, BLAKE3); strict: every parameter present with its dtype
    // and shape and no extra tensors, or nothing is copied and this names each one.
    let report = module
        .params()
        .load_weights(pretrained, &WeightsOptions::strict())?;
    // No gradient, no optimizer state; still saved, and a resume with another frozen
    // set is refused.
    module.params().freeze("l1");
    let outcome = trainer(run_dir, max_epochs)?.fit(&mut module, &mut train, Some(&val))?;
    println!("finetune ({report}): {:?}", outcome.summary().metrics);
    Ok(())
}
// --8<-- [end:weights]

// --8<-- [start:disk]
/// Prints what a run kept: its committed checkpoints and its log files.
fn show_run_dir(run_dir: &Path) -> anyhow::Result<Vec<String>> {
    let dir = CheckpointDir::open_read_only(run_dir)?;
    let names: Vec<String> = dir.list()?.into_iter().map(|c| c.name).collect();
    println!("checkpoints: {names:?}, latest: {:?}", dir.latest()?);
    for entry in std::fs::read_dir(run_dir.join("logs"))? {
        println!("log file: {}", entry?.path().display());
    }
    Ok(names)
}
// --8<-- [end:disk]

fn run(root: &Path, max_epochs: u64) -> anyhow::Result<()> {
    let (pre, fine) = (root.join("pretrain"), root.join("finetune"));
    pretrain(&pre, max_epochs)?;
    show_run_dir(&pre)?;
    finetune(&pre, &fine, max_epochs)?;
    show_run_dir(&fine)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut max_epochs, mut root) = (5, PathBuf::from("runs/custom_module"));
    while let Some(a) = args.next() {
        match a.as_str() {
            "--max-epochs" => max_epochs = args.next().context("--max-epochs N")?.parse()?,
            "--run-dir" => root = args.next().context("--run-dir DIR")?.into(),
            _ => anyhow::bail!("usage: custom_module [--max-epochs N] [--run-dir DIR]"),
        }
    }
    run(&root, max_epochs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use relume_ckpt::Stateful;

    #[test]
    fn runs_pretrain_finetune_and_keeps_what_it_says() {
        let root = tempfile::tempdir().unwrap();
        run(root.path(), 3).unwrap();
        for run_dir in ["pretrain", "finetune"] {
            let run_dir = root.path().join(run_dir);
            let names = show_run_dir(&run_dir).unwrap();
            // At most 2 epochs kept by ModelCheckpoint (the newest is among them
            // or kept as last-...), plus the trainer's final step=... checkpoint.
            let epochs = names.iter().filter(|n| !n.starts_with("step=")).count();
            assert_eq!(epochs, 2, "{names:?}");
            assert!(names.iter().any(|n| n.starts_with("step=")), "{names:?}");
            let csv = std::fs::read_to_string(run_dir.join("logs/metrics.csv")).unwrap();
            let header = csv.lines().next().unwrap();
            assert!(
                header.contains("lr-AdamW") && header.contains("val_loss"),
                "{header}"
            );
        }
        // The fine-tune started from the pretrained weights, not from its own seed,
        // and its frozen l1 is still exactly the pretrained one.
        let latest = |run: &str| {
            let dir = CheckpointDir::open_read_only(root.path().join(run)).unwrap();
            let ckpt = dir.latest().unwrap().unwrap();
            relume_ckpt::load(&ckpt).unwrap().components["model"].clone()
        };
        let (pre, fine) = (latest("pretrain"), latest("finetune"));
        for name in ["l1.weight", "l1.bias"] {
            assert_eq!(pre.get_tensor(name), fine.get_tensor(name), "{name}");
        }
        assert_ne!(pre.get_tensor("l2.weight"), fine.get_tensor("l2.weight"));
        let (train, _) = loaders().unwrap();
        let module = Classifier::new(1, train.batches_per_epoch() as u64).unwrap();
        assert_ne!(module.params().state_dict().unwrap(), pre);
    }

    /// Every ```rust block of the README's "Writing your own" section is quoted
    /// verbatim from this file.
    #[test]
    fn readme_snippets_are_this_file() {
        let readme = include_str!("../README.md");
        let this = include_str!("custom_module.rs");
        let start = readme.find("### Writing your own").expect("the section");
        let section = &readme[start..];
        let section = &section[..section[4..].find("\n## ").map_or(section.len(), |i| i + 4)];
        let mut n = 0;
        for block in section.split("```rust\n").skip(1) {
            let code = &block[..block.find("```").expect("a closing fence")];
            assert!(
                this.contains(code),
                "README block not in custom_module.rs:\n{code}"
            );
            n += 1;
        }
        assert!(n >= 4, "only {n} rust blocks in the section");
    }
}
