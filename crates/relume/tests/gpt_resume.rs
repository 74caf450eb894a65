//! The GPT job's resume contract at a test size: the model of
//! `examples/gpt_model.rs` with dropout on and gradient accumulation, interrupted
//! in fresh processes mid-epoch and inside an accumulation window, resumed, ends
//! with a final checkpoint byte-identical to an uninterrupted run's. Plus the
//! corpus errors (missing, empty, too short) and seeded sampling.
//!
//! Fresh processes are this test binary re-executed with `RELUME_GPT_CHILD` set,
//! running only the `child` test.

#[path = "../../../examples/gpt_model.rs"]
#[allow(dead_code)]
mod gpt_model;
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use gpt_model::{Cadence, Corpus, Gpt, GptConfig, GptModule, OptConfig};
use relume::data::LoaderConfig;
use relume::rng::Rng;
use relume::trainer::{FitOutcome, ResumePolicy, Source};
use relume_ckpt::StateDict;
use serde::{Deserialize, Serialize};
use support::{describe, spawn_child, Interrupter};

const BLOCK: usize = 16;

/// The first 3000 bytes of the shipped corpus: 2700 train / 300 val characters,
/// 84 windows of 17 at stride 32, 11 batches of 8 per epoch.
fn corpus() -> Corpus {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/data/kjv.txt");
    let text = std::fs::read(&path).unwrap();
    Corpus::from_bytes(&text[..3000], BLOCK).unwrap()
}

fn config(vocab: usize) -> GptConfig {
    GptConfig {
        vocab,
        block: BLOCK,
        d_model: 16,
        layers: 2,
        heads: 2,
        dropout: 0.1,
        tied: true,
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Spec {
    /// Raise the interrupt flag after this many training batches in total.
    interrupt_after_batches: Option<u64>,
    resume: bool,
}

/// 14 steps of 2 micro-batches: 6 steps an epoch (after batches 2, 4, 6, 8, 10
/// and 11), so the run ends in its third epoch; a checkpoint every 4 steps,
/// validation on 2 batches every 5.
fn run(spec: &Spec, run_dir: &Path) -> relume::Result<FitOutcome> {
    run_in(spec, run_dir, None)
}

/// [`run`], data-parallel over `group` when given (each rank computes its share of
/// the 2 micro-batches of every step).
fn run_in(
    spec: &Spec,
    run_dir: &Path,
    group: Option<Arc<dyn relume::dist::Collective>>,
) -> relume::Result<FitOutcome> {
    let corpus = corpus();
    let mut train = gpt_model::loader(
        corpus.train.clone(),
        BLOCK,
        32,
        LoaderConfig::new(8).shuffle(true).seed(3),
    )?;
    let val = gpt_model::loader(corpus.val.clone(), BLOCK, BLOCK, LoaderConfig::new(8))?;
    let cadence = Cadence {
        max_steps: 14,
        accumulate: 2,
        val_every: 5,
        val_batches: 2,
        checkpoint_every: 4,
        keep: 2,
    };
    let flag = Arc::new(AtomicBool::new(false));
    let mut builder = gpt_model::trainer_builder(&cadence, train.batches_per_epoch(), 11)
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
        });
    if let Some(g) = group {
        builder = builder.collective(g);
    }
    let mut trainer = builder.build()?;
    let mut module = GptModule {
        model: Gpt::new(config(corpus.vocab.len()), 7)?,
        opt: OptConfig {
            lr: 1e-2,
            weight_decay: 0.1,
            warmup: 3,
            total_steps: 14,
        },
    };
    trainer.fit(&mut module, &mut train, Some(&val))
}

/// The child-process entry point: does nothing unless re-executed by `spawn`.
#[test]
fn child() {
    let Ok(arg) = std::env::var("RELUME_GPT_CHILD") else {
        return;
    };
    let (spec, dir): (Spec, PathBuf) = serde_json::from_str(&arg).unwrap();
    let out = run(&spec, &dir).unwrap();
    println!("OUTCOME={}", describe(&out));
}

fn spawn(spec: &Spec, dir: &Path) -> String {
    spawn_child("RELUME_GPT_CHILD", &(spec, dir))
}

/// The latest checkpoint of a run and its verified components.
fn latest(run_dir: &Path) -> (PathBuf, std::collections::BTreeMap<String, StateDict>) {
    let dir = relume_ckpt::CheckpointDir::open_read_only(run_dir).unwrap();
    let path = dir.latest().unwrap().expect("a final checkpoint");
    let components = relume_ckpt::load(&path).unwrap().components;
    (path, components)
}

#[test]
fn resumes_byte_identically_mid_epoch_and_inside_an_accumulation_window() {
    let reference = tempfile::tempdir().unwrap();
    let clean = Spec {
        interrupt_after_batches: None,
        resume: false,
    };
    let out = run(&clean, reference.path()).unwrap();
    assert_eq!(describe(&out), "completed@14");

    let dir = tempfile::tempdir().unwrap();
    // After batch 5 (epoch 0, inside the window of batches 5-6): honoured at its
    // end, step 3. After batch 16 (epoch 1's fifth, inside the window 16-17):
    // step 9. Each in a fresh process, resuming the previous one.
    for (at, expect) in [(5, "interrupted@3"), (16, "interrupted@9")] {
        let spec = Spec {
            interrupt_after_batches: Some(at),
            resume: true,
        };
        assert_eq!(
            spawn(&spec, dir.path()),
            expect,
            "interrupt after batch {at}"
        );
    }
    let done = Spec {
        interrupt_after_batches: None,
        resume: true,
    };
    assert_eq!(spawn(&done, dir.path()), "completed@14");

    let (a, ca) = latest(reference.path());
    let (b, cb) = latest(dir.path());
    assert_eq!(a.file_name(), b.file_name());
    assert_eq!(ca.keys().collect::<Vec<_>>(), cb.keys().collect::<Vec<_>>());
    for (name, sd) in &ca {
        assert!(sd == &cb[name], "component {name} differs after resume");
    }
    assert_eq!(relume_ckpt::fingerprint(&ca), relume_ckpt::fingerprint(&cb));
    for file in ["model.safetensors", "optimizer.0.safetensors", "state.json"] {
        assert_eq!(
            std::fs::read(a.join(file)).unwrap(),
            std::fs::read(b.join(file)).unwrap(),
            "{file} differs after resume"
        );
    }
    // Dropout was on: its stream advanced and was saved.
    let state = std::fs::read_to_string(b.join("state.json")).unwrap();
    assert!(state.contains("dropout"), "{state}");
}

#[test]
fn a_missing_empty_or_short_corpus_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.txt");
    let e = format!("{:#}", Corpus::from_path(&missing, BLOCK).unwrap_err());
    assert!(
        e.contains("cannot read the corpus") && e.contains("nope.txt"),
        "{e}"
    );
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let e = format!("{:#}", Corpus::from_path(&empty, BLOCK).unwrap_err());
    assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "In the beginning God created").unwrap();
    let e = format!("{:#}", Corpus::from_path(&short, BLOCK).unwrap_err());
    assert!(
        e.contains("short.txt") && e.contains("validation part has 3 bytes"),
        "{e}"
    );
}

#[test]
fn the_split_is_fixed_and_sampling_is_seeded() {
    let c = corpus();
    assert_eq!((c.train.len(), c.val.len()), (2700, 300));
    let text = c.decode(&c.train[..16]);
    assert_eq!(text, "In the beginning");
    assert!(c.val_unigram_entropy() > 2.0 && c.val_unigram_entropy() < 3.5);
    let model = Gpt::new(config(c.vocab.len()), 1).unwrap();
    let prompt = c.encode("And God").unwrap();
    let draw = |seed| {
        model
            .generate(&prompt, 20, 0.8, &mut Rng::new(seed, "sample"))
            .unwrap()
    };
    assert_eq!(draw(4), draw(4));
    assert_ne!(draw(4), draw(5));
    assert_eq!(draw(4).len(), prompt.len() + 20);
    assert!(c.encode("§").is_err());
}

/// `spec` at world size `world` (threads of this process as ranks); every rank's
/// outcome.
fn run_at(world: usize, spec: &Spec, dir: &Path) -> Vec<String> {
    if world == 1 {
        let c: Arc<dyn relume::dist::Collective> = Arc::new(relume::dist::SingleProcess);
        return vec![describe(&run_in(spec, dir, Some(c)).unwrap())];
    }
    let (spec, dir) = (spec.clone(), dir.to_path_buf());
    relume::dist::run_threads(world, std::time::Duration::from_secs(120), move |g| {
        run_in(&spec, &dir, Some(Arc::new(g))).map(|o| describe(&o))
    })
    .unwrap()
}

/// The final checkpoint's state files, byte for byte.
fn final_files(run_dir: &Path) -> Vec<(String, Vec<u8>)> {
    let (p, _) = latest(run_dir);
    ["model.safetensors", "optimizer.0.safetensors", "state.json"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(p.join(f)).unwrap()))
        .collect()
}

#[test]
fn data_parallel_at_two_ranks_equals_one_and_resumes_at_another_world_size() {
    let clean = Spec {
        interrupt_after_batches: None,
        resume: false,
    };
    let one = tempfile::tempdir().unwrap();
    assert_eq!(run_at(1, &clean, one.path()), ["completed@14"]);
    let two = tempfile::tempdir().unwrap();
    assert_eq!(
        run_at(2, &clean, two.path()),
        ["completed@14", "completed@14"]
    );
    assert!(
        final_files(one.path()) == final_files(two.path()),
        "2 ranks differ from 1"
    );
    // Interrupted at world size 2 inside epoch 1, resumed at world size 1.
    let moved = tempfile::tempdir().unwrap();
    let stop = Spec {
        interrupt_after_batches: Some(16),
        resume: true,
    };
    assert_eq!(
        run_at(2, &stop, moved.path()),
        ["interrupted@9", "interrupted@9"]
    );
    let resume = Spec {
        interrupt_after_batches: None,
        resume: true,
    };
    assert_eq!(run_at(1, &resume, moved.path()), ["completed@14"]);
    assert!(
        final_files(one.path()) == final_files(moved.path()),
        "resume at another world size differs"
    );
}

/// The GPT example's `--ranks 2` (data-parallel ranks as threads of one process),
/// run as a user runs it, ends with the same checkpoint as one process with the
/// same batch and accumulation; a window that does not split over the ranks is
/// refused before training, naming the flags to pass.
#[test]
fn the_example_with_ranks_as_threads_ends_as_one_process_does() {
    let exe = support::example("gpt");
    if !exe.exists() {
        panic!(
            "{} is missing: run `cargo test --workspace` (which builds the examples)",
            exe.display()
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let text =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/data/kjv.txt"))
            .unwrap();
    let data = tmp.path().join("corpus.txt");
    std::fs::write(&data, &text[..6000]).unwrap();
    let run = |dir: &str, extra: &[&str]| {
        let out = Command::new(&exe)
            .args([
                "--data",
                data.to_str().unwrap(),
                "--run-dir",
                tmp.path().join(dir).to_str().unwrap(),
            ])
            .args([
                "--d-model",
                "16",
                "--layers",
                "1",
                "--heads",
                "2",
                "--block",
                "16",
                "--max-steps",
                "12",
                "--batch-size",
                "4",
                "--checkpoint-every",
                "5",
                "--val-every",
                "5",
                "--val-batches",
                "1",
                "--dropout",
                "0.1",
            ])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, stdout, stderr) = run("threads", &["--ranks", "2", "--accumulate", "2"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("data-parallel: 2 ranks"), "{stdout}");
    // Rank 0 alone reports, on stdout and in the log.
    assert_eq!(stdout.matches("done: step 12").count(), 1, "{stdout}");
    assert_eq!(
        stdout
            .matches("ModelCheckpoint without monitor keeps")
            .count(),
        1,
        "{stdout}"
    );
    let (code, stdout, stderr) = run("one", &["--accumulate", "2"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    support::assert_identical(&tmp.path().join("threads"), &tmp.path().join("one"));

    let (code, _, stderr) = run("refused", &["--ranks", "2"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("--ranks 2 needs --accumulate a multiple of 2"),
        "{stderr}"
    );
    assert!(!tmp.path().join("refused").join("checkpoints").exists());
}
