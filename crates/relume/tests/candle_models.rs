//! Real candle-nn models under the Trainer: a model built from
//! `candle_nn::{conv2d, linear, embedding, layer_norm}` through
//! `ParamStore::var_builder` is deterministic across processes, trains, resumes
//! byte-identically in a fresh process (mid-epoch and inside an accumulation
//! window, with dropout on), fine-tunes from a run's weights, and keeps frozen
//! parameters fixed and out of the optimizer state.
//!
//! Fresh processes are this test binary re-executed with `RELUME_CANDLE_CHILD`
//! set, running only the `child` test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{Device, Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, Embedding, Linear};
use relume::data::{DataLoader, LoaderConfig, TensorCollate, TensorDataset};
use relume::nn::{dropout, LayerNorm};
use relume::optim::{AdamConfig, AdamW};
use relume::params::ParamStore;
use relume::rng::Rng;
use relume::sched::CosineAnnealingLR;
use relume::trainer::{
    FitOutcome, LogOpts, OptimizerConfig, ResumePolicy, SchedulerConfig, Source, StepCtx,
    TrainModule, Trainer,
};
use relume::weights::WeightsOptions;
use relume::{Error, Result};
use serde::{Deserialize, Serialize};
use support::{assert_identical, describe, final_components, spawn_child, Interrupter};

mod support;

/// conv → linear → +embedding(bucket) → layer_norm → relu → dropout → linear.
struct Net {
    params: ParamStore,
    conv: Conv2d,
    fc: Linear,
    emb: Embedding,
    ln: LayerNorm,
    head: Linear,
}

impl Net {
    /// Builds the layers in `order` (the values must not depend on it).
    fn new(seed: u64, frozen: &[String], reversed: bool) -> Result<Self> {
        let params = ParamStore::new(Device::Cpu);
        for f in frozen {
            params.freeze(f.clone());
        }
        let vb = params.var_builder(seed);
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let (conv, fc, emb, ln, head);
        if reversed {
            head = candle_nn::linear(8, 3, vb.pp("head"))?;
            ln = relume::nn::layer_norm(8, 1e-5, vb.pp("ln"))?;
            emb = candle_nn::embedding(4, 8, vb.pp("emb"))?;
            fc = candle_nn::linear(32, 8, vb.pp("fc"))?;
            conv = candle_nn::conv2d(1, 2, 3, cfg, vb.pp("conv"))?;
        } else {
            conv = candle_nn::conv2d(1, 2, 3, cfg, vb.pp("conv"))?;
            fc = candle_nn::linear(32, 8, vb.pp("fc"))?;
            emb = candle_nn::embedding(4, 8, vb.pp("emb"))?;
            ln = relume::nn::layer_norm(8, 1e-5, vb.pp("ln"))?;
            head = candle_nn::linear(8, 3, vb.pp("head"))?;
        }
        Ok(Net {
            params,
            conv,
            fc,
            emb,
            ln,
            head,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &mut StepCtx<'_>) -> Result<Tensor> {
        let b = x.dim(0)?;
        let img = x.reshape((b, 1, 4, 4))?;
        let h = self.conv.forward(&img)?.relu()?.flatten_from(1)?;
        let bucket = x.narrow(1, 0, 4)?.argmax(D::Minus1)?;
        let h = (self.fc.forward(&h)? + self.emb.forward(&bucket)?)?;
        let h = self.ln.forward(&h)?.relu()?;
        let train = ctx.training();
        let h = dropout(&h, 0.2, ctx.rng("dropout"), train)?;
        Ok(self.head.forward(&h)?)
    }
}

impl TrainModule for Net {
    type Batch = (Tensor, Tensor);

    fn params(&self) -> &ParamStore {
        &self.params
    }

    fn training_step(&mut self, (x, y): Self::Batch, ctx: &mut StepCtx<'_>) -> Result<Tensor> {
        let loss = candle_nn::loss::cross_entropy(&self.forward(&x, ctx)?, &y)?;
        ctx.log_tensor("train_loss", &loss, LogOpts::new().on_epoch(true))?;
        Ok(loss)
    }

    fn validation_step(&mut self, (x, y): Self::Batch, ctx: &mut StepCtx<'_>) -> Result<()> {
        let loss = candle_nn::loss::cross_entropy(&self.forward(&x, ctx)?, &y)?;
        ctx.log_tensor("val_loss", &loss, LogOpts::new().batch_size(x.dim(0)?))?;
        Ok(())
    }

    fn configure_optimizers(&self) -> Result<Vec<OptimizerConfig>> {
        let opt = AdamW::from_store(&self.params, AdamConfig::adamw().with_lr(0.01))?;
        let sched = CosineAnnealingLR::new(vec![0.01], 40, 1e-4)?;
        Ok(vec![
            OptimizerConfig::new(opt).with_scheduler(SchedulerConfig::per_step(sched))
        ])
    }
}

/// 16 features per example (a 4×4 image); the class shifts 4 of them.
fn data(n: usize, seed: u64) -> TensorDataset {
    let mut rng = Rng::new(seed, "synthetic");
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let c = rng.below(3) as u32;
        for j in 0..16 {
            let centre = if j % 4 == c as usize { 1.0 } else { 0.0 };
            xs.push(centre + rng.normal_f64() as f32 * 0.5);
        }
        ys.push(c);
    }
    TensorDataset::new(xs, 16, ys).unwrap()
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Spec {
    accum: u64,
    frozen: Vec<String>,
    /// Raise the interrupt flag after this many training batches in total.
    interrupt_after_batches: Option<u64>,
    resume: bool,
}

impl Spec {
    fn new() -> Self {
        Spec {
            accum: 1,
            frozen: Vec::new(),
            interrupt_after_batches: None,
            resume: true,
        }
    }
}

fn run(spec: &Spec, run_dir: &Path) -> Result<FitOutcome> {
    let flag = Arc::new(AtomicBool::new(false));
    let mut trainer = Trainer::builder()
        .max_epochs(3)
        .accumulate_grad_batches(spec.accum)
        .seed(5)
        .default_root_dir(run_dir)
        .enable_progress_bar(false)
        .interrupt_flag(flag.clone())
        .callback(Box::new(Interrupter::after(
            flag,
            spec.interrupt_after_batches,
        )))
        .resume(if spec.resume {
            ResumePolicy::IfExists(Source::Last)
        } else {
            ResumePolicy::Never
        })
        .build()?;
    let mut module = Net::new(9, &spec.frozen, false)?;
    let cfg = LoaderConfig::new(6).shuffle(true).seed(2);
    let mut train = DataLoader::new(data(42, 1), TensorCollate::default(), cfg)?;
    let val = DataLoader::new(data(12, 2), TensorCollate::default(), LoaderConfig::new(12))?;
    trainer.fit(&mut module, &mut train, Some(&val))
}

#[derive(Serialize, Deserialize)]
enum Job {
    /// Train (or resume) `Spec` in the directory.
    Fit(Spec, PathBuf),
    /// Build the net with a seed and write its parameters to the file.
    Build(u64, PathBuf),
}

/// The child-process entry point: does nothing unless re-executed by `spawn`.
#[test]
fn child() {
    let Ok(arg) = std::env::var("RELUME_CANDLE_CHILD") else {
        return;
    };
    match serde_json::from_str(&arg).unwrap() {
        Job::Fit(spec, dir) => {
            let out = run(&spec, &dir).unwrap();
            println!("OUTCOME={}", describe(&out));
        }
        Job::Build(seed, file) => {
            let net = Net::new(seed, &[], false).unwrap();
            net.params.save_safetensors(&file).unwrap();
            println!("OUTCOME=built");
        }
    }
}

fn spawn(job: &Job) -> String {
    spawn_child("RELUME_CANDLE_CHILD", job)
}

fn values(store: &ParamStore) -> BTreeMap<String, Vec<f32>> {
    store
        .named_vars()
        .into_iter()
        .map(|(n, v)| {
            let x = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (n, x)
        })
        .collect()
}

#[test]
fn the_same_net_is_bit_identical_in_two_processes_and_in_any_build_order() {
    let dir = tempfile::tempdir().unwrap();
    let here = Net::new(21, &[], false).unwrap();
    let file = dir.path().join("here.safetensors");
    here.params.save_safetensors(&file).unwrap();
    let there = dir.path().join("there.safetensors");
    assert_eq!(spawn(&Job::Build(21, there.clone())), "built");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        std::fs::read(&there).unwrap()
    );
    let reversed = Net::new(21, &[], true).unwrap();
    assert_eq!(values(&here.params), values(&reversed.params));
    assert_eq!(
        here.params.names(),
        [
            "conv.bias",
            "conv.weight",
            "emb.weight",
            "fc.bias",
            "fc.weight",
            "head.bias",
            "head.weight",
            "ln.bias",
            "ln.weight"
        ]
    );
    assert_ne!(
        values(&here.params),
        values(&Net::new(22, &[], false).unwrap().params)
    );
}

/// Interrupts at each point (the first in this process, the rest in fresh ones),
/// finishes in a fresh process, and compares with an uninterrupted run.
fn cell(spec: Spec, points: &[(u64, &str)]) {
    let reference = tempfile::tempdir().unwrap();
    let clean = Spec {
        resume: false,
        ..spec.clone()
    };
    let out = run(&clean, reference.path()).unwrap();
    assert!(matches!(out, FitOutcome::Completed(_)), "{out:?}");
    let dir = tempfile::tempdir().unwrap();
    for (i, (at, expect)) in points.iter().enumerate() {
        let s = Spec {
            interrupt_after_batches: Some(*at),
            ..spec.clone()
        };
        let got = if i == 0 {
            describe(&run(&s, dir.path()).unwrap())
        } else {
            spawn(&Job::Fit(s, dir.path().to_path_buf()))
        };
        assert_eq!(&got, expect, "interrupt after batch {at}");
    }
    let done = spawn(&Job::Fit(spec, dir.path().to_path_buf()));
    assert_eq!(done, format!("completed@{}", out.summary().global_step));
    assert_identical(reference.path(), dir.path());
}

// 42 examples / batch 6 = 7 batches per epoch; 3 epochs = 21 batches.

#[test]
fn resumes_byte_identically_mid_epoch_in_a_fresh_process() {
    cell(Spec::new(), &[(3, "interrupted@3"), (11, "interrupted@11")]);
}

#[test]
fn resumes_byte_identically_from_inside_an_accumulation_window() {
    // accum 2: 7 batches an epoch give steps after batches 2, 4, 6, 7 (epoch 0) and
    // 9, 11, 13, 14 (epoch 1). An interrupt after batch 10 (inside the window of
    // batches 10-11) is honoured at its end, step 6.
    let spec = Spec {
        accum: 2,
        ..Spec::new()
    };
    cell(spec, &[(10, "interrupted@6")]);
}

#[test]
fn frozen_parameters_stay_fixed_have_no_optimizer_state_and_pin_the_resume() {
    let frozen = vec!["conv".to_string(), "emb".to_string()];
    let spec = Spec {
        frozen: frozen.clone(),
        ..Spec::new()
    };
    let reference = tempfile::tempdir().unwrap();
    let out = run(&spec, reference.path()).unwrap();
    assert!(matches!(out, FitOutcome::Completed(_)), "{out:?}");
    let comps = final_components(reference.path());
    let initial = Net::new(9, &[], false).unwrap();
    let init = initial.params.state_dict_values();
    let model = &comps["model"];
    for name in ["conv.weight", "conv.bias", "emb.weight"] {
        let saved = model.get_tensor(name).unwrap().to_f32_vec().unwrap();
        assert_eq!(saved, init[name], "{name} moved although frozen");
    }
    let trained = model.get_tensor("fc.weight").unwrap().to_f32_vec().unwrap();
    assert_ne!(
        trained, init["fc.weight"],
        "the trainable part did not train"
    );
    let opt_keys: Vec<&str> = comps["optimizer.0"].keys().collect();
    assert!(
        opt_keys.iter().any(|k| k.contains("fc.weight")),
        "{opt_keys:?}"
    );
    assert!(
        !opt_keys
            .iter()
            .any(|k| k.contains("conv.") || k.contains("emb.")),
        "frozen parameters have optimizer state: {opt_keys:?}"
    );

    // Interrupted with the frozen set, resumed with another: refused, named.
    let dir = tempfile::tempdir().unwrap();
    let s = Spec {
        interrupt_after_batches: Some(4),
        ..spec.clone()
    };
    assert_eq!(describe(&run(&s, dir.path()).unwrap()), "interrupted@4");
    let other = Spec {
        frozen: vec!["conv".to_string()],
        ..spec.clone()
    };
    match run(&other, dir.path()) {
        Err(e @ Error::ConfigChanged { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("frozen") && msg.contains("ParamStore::freeze"),
                "{msg}"
            );
        }
        other => panic!("expected ConfigChanged, got {other:?}"),
    }
    let none = Spec {
        frozen: Vec::new(),
        ..spec.clone()
    };
    assert!(matches!(
        run(&none, dir.path()),
        Err(Error::ConfigChanged { .. })
    ));
    // With the same frozen set it resumes and ends where the reference did.
    assert_eq!(
        spawn(&Job::Fit(spec, dir.path().to_path_buf())),
        "completed@21"
    );
    assert_identical(reference.path(), dir.path());
}

#[test]
fn a_freeze_typo_or_a_frozen_parameter_in_the_optimizer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec {
        frozen: vec!["convv".to_string()],
        ..Spec::new()
    };
    match run(&spec, dir.path()) {
        Err(e @ Error::FreezeMatchesNothing { .. }) => {
            assert!(e.to_string().contains("\"convv\""), "{e}")
        }
        other => panic!("expected FreezeMatchesNothing, got {other:?}"),
    }
    // An optimizer built over every variable, frozen ones included.
    struct Greedy(Net);
    impl TrainModule for Greedy {
        type Batch = (Tensor, Tensor);
        fn params(&self) -> &ParamStore {
            &self.0.params
        }
        fn training_step(&mut self, b: Self::Batch, ctx: &mut StepCtx<'_>) -> Result<Tensor> {
            self.0.training_step(b, ctx)
        }
        fn configure_optimizers(&self) -> Result<Vec<OptimizerConfig>> {
            let all = self.0.params.named_vars();
            Ok(vec![OptimizerConfig::new(AdamW::from_params(
                all,
                AdamConfig::adamw(),
            )?)])
        }
    }
    let mut m = Greedy(Net::new(9, &["emb".to_string()], false).unwrap());
    let mut trainer = Trainer::builder()
        .max_epochs(1)
        .default_root_dir(dir.path())
        .enable_progress_bar(false)
        .build()
        .unwrap();
    let mut train =
        DataLoader::new(data(12, 1), TensorCollate::default(), LoaderConfig::new(6)).unwrap();
    match trainer.fit(&mut m, &mut train, None) {
        Err(e @ Error::FrozenInOptimizer { .. }) => {
            assert!(e.to_string().contains("emb.weight"), "{e}")
        }
        other => panic!("expected FrozenInOptimizer, got {other:?}"),
    }
}

#[test]
fn fine_tunes_from_a_run_directory_with_strict_accounting() {
    let pre = tempfile::tempdir().unwrap();
    run(&Spec::new(), pre.path()).unwrap();
    let pretrained = final_components(pre.path());
    // A new net (another seed): strict load of the whole run's latest model.
    let net = Net::new(100, &[], false).unwrap();
    let r = net
        .params
        .load_weights(pre.path(), &WeightsOptions::strict())
        .unwrap();
    assert_eq!(r.loaded.len(), 9);
    for (name, v) in net.params.state_dict_values() {
        let want = pretrained["model"]
            .get_tensor(&name)
            .unwrap()
            .to_f32_vec()
            .unwrap();
        assert_eq!(v, want, "{name}");
    }
    // A new 5-class head: strict fails naming it, then the explicit allow-list.
    let store = ParamStore::new(Device::Cpu);
    let vb = store.var_builder(3);
    candle_nn::conv2d(
        1,
        2,
        3,
        Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
        vb.pp("conv"),
    )
    .unwrap();
    candle_nn::linear(32, 8, vb.pp("fc")).unwrap();
    candle_nn::embedding(4, 8, vb.pp("emb")).unwrap();
    relume::nn::layer_norm(8, 1e-5, vb.pp("ln")).unwrap();
    candle_nn::linear(8, 5, vb.pp("head")).unwrap();
    let e = store
        .load_weights(pre.path(), &WeightsOptions::strict())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("head.weight: model F32[5, 8] vs file F32[3, 8]"),
        "{e}"
    );
    let r = store
        .load_weights(
            pre.path(),
            &WeightsOptions::strict().allow_mismatched("head"),
        )
        .unwrap();
    assert_eq!(r.allowed_mismatched, ["head.bias", "head.weight"]);
    assert_eq!(r.loaded.len(), 7);
}

trait Values {
    fn state_dict_values(&self) -> BTreeMap<String, Vec<f32>>;
}

impl Values for ParamStore {
    fn state_dict_values(&self) -> BTreeMap<String, Vec<f32>> {
        values(self)
    }
}

/// candle-nn 0.11's `LayerNorm` has no backward pass on contiguous input; a model
/// built with it must fail loudly, naming the parameters that would never train.
#[test]
fn a_layer_without_backward_is_a_named_error_not_a_silent_freeze() {
    struct CandleNorm {
        params: ParamStore,
        fc: Linear,
        ln: candle_nn::LayerNorm,
        head: Linear,
    }
    impl TrainModule for CandleNorm {
        type Batch = (Tensor, Tensor);
        fn params(&self) -> &ParamStore {
            &self.params
        }
        fn training_step(&mut self, (x, y): Self::Batch, _: &mut StepCtx<'_>) -> Result<Tensor> {
            let h = self.ln.forward(&self.fc.forward(&x)?)?;
            Ok(candle_nn::loss::cross_entropy(&self.head.forward(&h)?, &y)?)
        }
        fn configure_optimizers(&self) -> Result<Vec<OptimizerConfig>> {
            let opt = AdamW::from_store(&self.params, AdamConfig::adamw())?;
            Ok(vec![OptimizerConfig::new(opt)])
        }
    }
    let params = ParamStore::new(Device::Cpu);
    let vb = params.var_builder(0);
    let mut m = CandleNorm {
        fc: candle_nn::linear(16, 8, vb.pp("fc")).unwrap(),
        ln: candle_nn::layer_norm(8, 1e-5, vb.pp("ln")).unwrap(),
        head: candle_nn::linear(8, 3, vb.pp("head")).unwrap(),
        params,
    };
    let dir = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::builder()
        .max_epochs(1)
        .default_root_dir(dir.path())
        .enable_progress_bar(false)
        .build()
        .unwrap();
    let mut train =
        DataLoader::new(data(12, 1), TensorCollate::default(), LoaderConfig::new(6)).unwrap();
    match trainer.fit(&mut m, &mut train, None) {
        Err(e @ Error::MissingGradients { .. }) => {
            let msg = e.to_string();
            for name in ["fc.bias", "fc.weight", "ln.bias", "ln.weight"] {
                assert!(msg.contains(name), "{msg}");
            }
            assert!(
                !msg.contains("head.weight") && msg.contains("relume::nn::layer_norm"),
                "{msg}"
            );
        }
        other => panic!("expected MissingGradients, got {other:?}"),
    }
}
