//! The `relume` binary on checkpoints the trainer itself wrote: a tiny MLP trained for
//! two epochs with a checkpoint every 3 steps, then `ls`, `verify`, `inspect`, `diff`
//! and a corrupted copy.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use relume::data::{DataLoader, LoaderConfig, TensorCollate, TensorDataset};
use relume::nn::{dropout, Linear};
use relume::optim::{AdamConfig, AdamW};
use relume::params::ParamStore;
use relume::rng::Rng;
use relume::sched::StepLR;
use relume::trainer::{
    LogOpts, OptimizerConfig, ResumePolicy, SchedulerConfig, StepCtx, TrainModule, Trainer,
};
use serde_json::Value;

fn relume(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_relume"))
        .args(args)
        .output()
        .expect("run relume")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct Mlp {
    params: ParamStore,
    l1: Linear,
    l2: Linear,
}

impl TrainModule for Mlp {
    type Batch = (Tensor, Tensor);

    fn params(&self) -> &ParamStore {
        &self.params
    }

    fn training_step(
        &mut self,
        (x, y): Self::Batch,
        ctx: &mut StepCtx<'_>,
    ) -> relume::Result<Tensor> {
        let train = ctx.training();
        let h = self.l1.forward(&x)?.relu()?;
        let h = dropout(&h, 0.2, ctx.rng("dropout"), train)?;
        let loss = candle_nn::loss::cross_entropy(&self.l2.forward(&h)?, &y)?;
        ctx.log_tensor("train_loss", &loss, LogOpts::new().on_epoch(true))?;
        Ok(loss)
    }

    fn configure_optimizers(&self) -> relume::Result<Vec<OptimizerConfig>> {
        let opt = AdamW::from_store(&self.params, AdamConfig::adamw().with_lr(1e-2))?;
        let sched = StepLR::new(vec![1e-2], 2, 0.5)?;
        Ok(vec![
            OptimizerConfig::new(opt).with_scheduler(SchedulerConfig::per_step(sched))
        ])
    }
}

/// Trains for 2 epochs of 4 steps, saving every 3 steps; returns the checkpoint paths.
fn train(run_dir: &Path) -> Vec<PathBuf> {
    let mut rng = Rng::new(3, "data");
    let features = rng.uniform_vec(40 * 4, -1.0, 1.0);
    let labels: Vec<u32> = (0..40).map(|i| (i % 3) as u32).collect();
    let data = TensorDataset::new(features, 4, labels).unwrap();
    let mut loader = DataLoader::new(
        data,
        TensorCollate::default(),
        LoaderConfig::new(10).shuffle(true).seed(5),
    )
    .unwrap();
    let params = ParamStore::new(Device::Cpu);
    let mut init = Rng::new(1, "init");
    let mut module = Mlp {
        l1: Linear::new(&params, "l1", 4, 16, &mut init).unwrap(),
        l2: Linear::new(&params, "l2", 16, 3, &mut init).unwrap(),
        params,
    };
    let mut trainer = Trainer::builder()
        .max_epochs(2)
        .seed(9)
        .default_root_dir(run_dir)
        .checkpoint_every_n_steps(3)
        .enable_progress_bar(false)
        .resume(ResumePolicy::Never)
        .build()
        .unwrap();
    trainer.fit(&mut module, &mut loader, None).unwrap();
    let dir = relume_ckpt::CheckpointDir::open_read_only(run_dir).unwrap();
    dir.list().unwrap().into_iter().map(|c| c.path).collect()
}

#[test]
fn the_cli_reads_what_the_trainer_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let ckpts = train(&run);
    assert!(
        ckpts.len() >= 3,
        "expected checkpoints at steps 3, 6 and the end: {ckpts:?}"
    );
    let run_s = run.to_str().unwrap();

    // ls: every committed checkpoint, newest marked latest.
    let ls = relume(&["ls", run_s, "--json"]);
    assert_eq!(ls.status.code(), Some(0), "{}", text(&ls));
    let v: Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert!(v.to_string().contains("step=000003"), "{v}");

    // verify the whole run directory.
    let ver = relume(&["verify", run_s]);
    assert_eq!(ver.status.code(), Some(0), "{}", text(&ver));

    // inspect: a trainer checkpoint is resumable and lists the model and optimizer.
    let last = ckpts.last().unwrap().to_str().unwrap();
    let ins = relume(&["inspect", last]);
    assert_eq!(ins.status.code(), Some(0), "{}", text(&ins));
    let out = text(&ins);
    for needle in ["l1.weight", "optimizer", "scheduler", "rng", "train_loader"] {
        assert!(
            out.contains(needle),
            "inspect output lacks {needle}:\n{out}"
        );
    }

    // diff between two checkpoints of the same run: the parameters changed.
    let first = ckpts[0].to_str().unwrap();
    let diff = relume(&["diff", first, last]);
    assert_eq!(diff.status.code(), Some(1), "{}", text(&diff));
    let out = text(&diff);
    assert!(
        out.contains("l1.weight") && out.contains("l2.bias"),
        "{out}"
    );
    let same = relume(&["diff", last, last]);
    assert_eq!(same.status.code(), Some(0), "{}", text(&same));

    // A copy with one flipped byte in the model file: verify exits 1 naming file and tensor.
    let bad = tmp.path().join("bad");
    copy_dir(ckpts.last().unwrap(), &bad);
    let model = bad.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x10; // inside the last tensor's data
    std::fs::write(&model, bytes).unwrap();
    let ver = relume(&["verify", bad.to_str().unwrap()]);
    assert_eq!(ver.status.code(), Some(1), "{}", text(&ver));
    let out = text(&ver);
    assert!(out.contains("model.safetensors"), "{out}");
    assert!(
        out.contains("l2.weight") || out.contains("l2.bias"),
        "{out}"
    );
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}
