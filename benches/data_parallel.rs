//! Data-parallel throughput of the digits job: optimizer steps per second at world
//! size 1 and 2 (`mpirun -np 2`), the ratio, and each rank's share of time spent in
//! the exchange of gradients and agreements, all measured in one run.
//!
//! It runs the release digits binary as a user does, built with MPI:
//!
//! ```text
//! cargo build --release --example digits --features relume/mpi
//! cargo bench --bench data_parallel            # BENCH_EPOCHS (default 30), MICRO (default 2)
//! ```
//!
//! Every configuration trains the same global batch of 32 in `MICRO` micro-batches,
//! and ends with the same bytes; only the split over processes differs.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

fn run(world: usize, epochs: &str, micro: &str, dir: &Path) -> Result<(f64, String), String> {
    let bin = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/release/examples/digits"
    );
    let args = [
        "--micro-batches",
        micro,
        "--max-epochs",
        epochs,
        "--run-dir",
        dir.to_str().ok_or("non-UTF-8 temp dir")?,
    ];
    let mut cmd = if world == 1 {
        Command::new(bin)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["--oversubscribe", "-np", &world.to_string(), bin]);
        c
    };
    cmd.args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RELUME_PROGRESS", "plain");
    let started = Instant::now();
    let out = cmd.output().map_err(|e| {
        format!(
            "{bin}: {e} (build it: cargo build --release --example digits --features relume/mpi)"
        )
    })?;
    let secs = started.elapsed().as_secs_f64();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!("world size {world} failed:\n{text}"));
    }
    let shares: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_once("data-parallel: ").map(|(_, r)| r.to_string()))
        .filter(|r| r.contains("exchanges"))
        .collect();
    Ok((secs, shares.join("\n    ")))
}

fn main() {
    let epochs = std::env::var("BENCH_EPOCHS").unwrap_or_else(|_| "30".into());
    let micro = std::env::var("MICRO").unwrap_or_else(|_| "2".into());
    let steps: f64 = 45.0 * epochs.parse::<f64>().unwrap_or(30.0);
    let mut results = Vec::new();
    for world in [1usize, 2] {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => {
                eprintln!("tempdir: {e}");
                std::process::exit(1);
            }
        };
        match run(world, &epochs, &micro, dir.path()) {
            Ok((secs, shares)) => {
                println!(
                    "world size {world}: {steps} steps in {secs:.2} s (process start to exit) = {:.0} steps/s",
                    steps / secs
                );
                if !shares.is_empty() {
                    println!("    {shares}");
                }
                results.push(secs);
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }
    println!(
        "ratio (world size 2 / world size 1 steps/s): {:.2}x",
        results[0] / results[1]
    );
}
