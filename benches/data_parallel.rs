//! Data-parallel throughput of the two main jobs, digits and GPT: optimizer steps
//! per second at world size 1 and 2 (`mpirun -np 2`), the ratio, and each rank's
//! share of fit spent in the exchanges of gradients and agreements, all measured in
//! one run.
//!
//! It runs the release binaries as a user does, built with MPI:
//!
//! ```text
//! cargo build --release --example digits --example gpt --features relume/mpi
//! cargo bench --bench data_parallel     # JOBS=digits,gpt  BENCH_EPOCHS=30  GPT_STEPS=40
//! ```
//!
//! Every configuration of a job trains the same global batch in the same number of
//! micro-batches (digits: 32 in 2; GPT: 32 windows of 64 characters in 4) and ends
//! with the same bytes; only the split over processes differs.
//!
//! Steps/s is measured **differentially**: each configuration runs for N and for 2N
//! steps, and the rate is N over the difference of the two wall times, so process
//! start-up, data loading and the GPT job's final pass over the validation split
//! cancel out.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// One job to measure: its binary, its arguments for a run of `units`, and how many
/// optimizer steps that is.
struct Job {
    name: &'static str,
    /// Arguments for a run of `units` (epochs for digits, steps for GPT).
    args: fn(u64, &str) -> Vec<String>,
    /// Optimizer steps in `units`.
    steps: fn(u64) -> u64,
    units: u64,
}

fn digits_args(epochs: u64, dir: &str) -> Vec<String> {
    [
        "--micro-batches",
        "2",
        "--max-epochs",
        &epochs.to_string(),
        "--run-dir",
        dir,
    ]
    .map(String::from)
    .to_vec()
}

fn gpt_args(steps: u64, dir: &str) -> Vec<String> {
    let s = steps.to_string();
    [
        "--accumulate",
        "4",
        "--batch-size",
        "8",
        "--max-steps",
        &s,
        "--checkpoint-every",
        &s,
        "--val-every",
        &s,
        "--val-batches",
        "1",
        "--run-dir",
        dir,
    ]
    .map(String::from)
    .to_vec()
}

struct Ran {
    secs: f64,
    /// The ranks' "spent X% of fit in exchanges" lines.
    shares: Vec<String>,
}

fn run(job: &Job, world: usize, units: u64, dir: &Path) -> Result<Ran, String> {
    let bin = format!(
        "{}/../../target/release/examples/{}",
        env!("CARGO_MANIFEST_DIR"),
        job.name
    );
    let dir = dir.to_str().ok_or("non-UTF-8 temp dir")?;
    let mut cmd = if world == 1 {
        Command::new(&bin)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["--oversubscribe", "-np", &world.to_string(), &bin]);
        c
    };
    cmd.args((job.args)(units, dir))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RELUME_PROGRESS", "plain");
    let started = Instant::now();
    let out = cmd.output().map_err(|e| {
        format!(
            "{bin}: {e} (build it: cargo build --release --example digits --example gpt --features relume/mpi)"
        )
    })?;
    let secs = started.elapsed().as_secs_f64();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!(
            "{} at world size {world} failed:\n{text}",
            job.name
        ));
    }
    let shares = text
        .lines()
        .filter_map(|l| l.split_once("data-parallel: ").map(|(_, r)| r.to_string()))
        .filter(|r| r.contains("exchanges"))
        .collect();
    Ok(Ran { secs, shares })
}

/// Steps/s of `job` at `world`, from runs of `units` and `2 × units`.
fn measure(job: &Job, world: usize) -> Result<f64, String> {
    let mut secs = Vec::new();
    for units in [job.units, 2 * job.units] {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let ran = run(job, world, units, dir.path())?;
        println!(
            "  {} world size {world}: {} steps in {:.2} s (process start to exit)",
            job.name,
            (job.steps)(units),
            ran.secs
        );
        for s in &ran.shares {
            println!("      {s}");
        }
        secs.push(ran.secs);
    }
    let steps = ((job.steps)(2 * job.units) - (job.steps)(job.units)) as f64;
    let dt = secs[1] - secs[0];
    if dt <= 0.0 {
        return Err(format!(
            "{}: the longer run was not slower ({:.2} s vs {:.2} s); raise the run length",
            job.name, secs[1], secs[0]
        ));
    }
    Ok(steps / dt)
}

fn env_u64(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|e| format!("{name}={v:?} is not a whole number: {e}")),
        Err(_) => Ok(default),
    }
}

fn main_result() -> Result<(), String> {
    let wanted = std::env::var("JOBS").unwrap_or_else(|_| "digits,gpt".into());
    let jobs = [
        Job {
            name: "digits",
            args: digits_args,
            // 1437 training rows in batches of 16 (the 2 micro-batches of one step).
            steps: |epochs| 45 * epochs,
            units: env_u64("BENCH_EPOCHS", 30)?,
        },
        Job {
            name: "gpt",
            args: gpt_args,
            steps: |steps| steps,
            units: env_u64("GPT_STEPS", 40)?,
        },
    ];
    for job in jobs
        .iter()
        .filter(|j| wanted.split(',').any(|w| w == j.name))
    {
        println!("{}:", job.name);
        let one = measure(job, 1)?;
        let two = measure(job, 2)?;
        println!(
            "{}: world size 1 {one:.2} steps/s, world size 2 {two:.2} steps/s; ratio {:.2}x",
            job.name,
            two / one
        );
    }
    Ok(())
}

fn main() {
    if let Err(e) = main_result() {
        eprintln!("{e}");
        std::process::exit(1);
    }
}
