//! The data-parallel contract over real MPI processes: this test binary re-executed
//! under `mpirun --oversubscribe -np 2` (running only the `child` test), against
//! runs in this process at world size 1.
//!
//! Needs the `mpi` feature and OpenMPI (`apt-get install libopenmpi-dev
//! openmpi-bin libclang-dev`):
//! `cargo test -p relume --features mpi,nccl --lib --test mpi --test data_parallel`. As root, set
//! `OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1` (`.ci/run` does).
#![cfg(feature = "mpi")]

mod dp_common;
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dp_common::*;
use relume::dist::{Collective, MpiCollective};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Job {
    /// The spec of each rank (normally all equal).
    specs: Vec<Spec>,
    dir: PathBuf,
    timeout_ms: u64,
    /// This rank sleeps instead of training (a rank that never arrives).
    stall_rank: Option<usize>,
    /// Every rank only reports how it sees its stdout, then ends.
    #[serde(default)]
    report_terminal: bool,
}

/// The MPI rank entry point: does nothing unless started by `mpirun` below.
#[test]
fn child() {
    let Ok(arg) = std::env::var("RELUME_MPI_CHILD") else {
        return;
    };
    let job: Job = serde_json::from_str(&arg).unwrap();
    let c = Arc::new(MpiCollective::init(Duration::from_millis(job.timeout_ms)).unwrap());
    let rank = c.rank();
    if job.report_terminal {
        use std::io::IsTerminal;
        println!(
            "TERMINAL=rank{rank}:pty={}:relume={}:colour={}",
            std::io::stdout().is_terminal(),
            relume::progress::stdout_is_terminal(),
            relume::progress::use_color()
        );
        return;
    }
    if job.stall_rank == Some(rank) {
        std::thread::sleep(Duration::from_secs(600));
    }
    let collective: Arc<dyn Collective> = c.clone();
    match fit(&job.specs[rank], &job.dir, collective) {
        Ok(o) => println!("OUTCOME=rank{rank}:{}", describe(&o)),
        Err(e) => {
            println!("ERROR=rank{rank}:{e}");
            c.abort(3);
        }
    }
}

struct Ran {
    ok: bool,
    outcomes: Vec<String>,
    all: String,
}

fn mpirun(np: usize, job: &Job) -> Ran {
    let out = Command::new("mpirun")
        .args([
            "--oversubscribe",
            "-np",
            &np.to_string(),
            "-x",
            "RELUME_MPI_CHILD",
        ])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env("RELUME_MPI_CHILD", serde_json::to_string(job).unwrap())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap_or_else(|e| panic!("mpirun could not start ({e}): install openmpi-bin"));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut outcomes: Vec<String> = all
        .lines()
        .filter_map(|l| l.split_once("OUTCOME=").map(|(_, o)| o.trim().to_string()))
        .collect();
    outcomes.sort();
    Ran {
        ok: out.status.success(),
        outcomes,
        all,
    }
}

fn job(spec: &Spec, dir: &Path) -> Job {
    Job {
        specs: vec![spec.clone(), spec.clone()],
        dir: dir.to_path_buf(),
        timeout_ms: 60_000,
        stall_rank: None,
        report_terminal: false,
    }
}

fn both(outcome: &str) -> Vec<String> {
    vec![format!("rank0:{outcome}"), format!("rank1:{outcome}")]
}

fn reference() -> tempfile::TempDir {
    let r = tempfile::tempdir().unwrap();
    assert_eq!(fit_at(1, &SPEC, r.path()).unwrap(), ["completed@15"]);
    r
}

#[test]
fn two_mpi_ranks_match_one_process_and_resume_across_world_sizes() {
    let r = reference();
    // Two ranks, uninterrupted: byte-identical to one process.
    let a = tempfile::tempdir().unwrap();
    let ran = mpirun(2, &job(&SPEC, a.path()));
    assert!(ran.ok, "{}", ran.all);
    assert_eq!(ran.outcomes, both("completed@15"));
    assert_same_state(r.path(), a.path());
    // Interrupted at world size 2 (rank 1's flag, mid-window), resumed at 2.
    let b = tempfile::tempdir().unwrap();
    let spec = Spec {
        interrupt: Some((1, 6)),
        ..SPEC
    };
    let ran = mpirun(2, &job(&spec, b.path()));
    assert_eq!(ran.outcomes, both("interrupted@2"), "{}", ran.all);
    let ran = mpirun(2, &job(&SPEC, b.path()));
    assert_eq!(ran.outcomes, both("completed@15"), "{}", ran.all);
    assert_same_state(r.path(), b.path());
    // Written at 2, resumed alone; written alone, resumed at 2.
    let c = tempfile::tempdir().unwrap();
    let ran = mpirun(
        2,
        &job(
            &Spec {
                interrupt: Some((0, 21)),
                ..SPEC
            },
            c.path(),
        ),
    );
    assert_eq!(ran.outcomes, both("interrupted@7"), "{}", ran.all);
    assert_eq!(fit_at(1, &SPEC, c.path()).unwrap(), ["completed@15"]);
    assert_same_state(r.path(), c.path());
    let d = tempfile::tempdir().unwrap();
    let alone = Spec {
        interrupt: Some((0, 9)),
        ..SPEC
    };
    assert_eq!(fit_at(1, &alone, d.path()).unwrap(), ["interrupted@3"]);
    let ran = mpirun(2, &job(&SPEC, d.path()));
    assert_eq!(ran.outcomes, both("completed@15"), "{}", ran.all);
    assert_same_state(r.path(), d.path());
}

#[test]
fn sigterm_to_one_rank_saves_on_all_and_the_resume_is_exact() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec {
        signal: Some((1, 10, libc::SIGTERM)),
        ..SPEC
    };
    let ran = mpirun(2, &job(&spec, dir.path()));
    // The handler runs asynchronously: the flag is seen at the window's end (step 3)
    // or the next one; every rank stops at the same step either way.
    assert!(
        ran.outcomes == both("interrupted@3") || ran.outcomes == both("interrupted@4"),
        "{}",
        ran.all
    );
    let ran = mpirun(2, &job(&SPEC, dir.path()));
    assert_eq!(ran.outcomes, both("completed@15"), "{}", ran.all);
    assert_same_state(r.path(), dir.path());
}

#[test]
fn sigkill_of_one_rank_before_a_save_commits_nothing_and_a_rerun_finishes() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    // Rank 1 dies right after the optimizer step of step 2, before its save.
    let spec = Spec {
        signal: Some((1, 8, libc::SIGKILL)),
        ..SPEC
    };
    let started = Instant::now();
    let ran = mpirun(2, &job(&spec, dir.path()));
    assert!(!ran.ok, "{}", ran.all);
    assert!(
        ran.all.contains("rank 1"),
        "mpirun names the dead rank: {}",
        ran.all
    );
    assert!(started.elapsed() < Duration::from_secs(120));
    let ck = relume_ckpt::CheckpointDir::open_read_only(dir.path()).unwrap();
    let latest = ck.latest().unwrap().unwrap();
    assert!(
        latest.ends_with("step=000001-epoch=0"),
        "{}",
        latest.display()
    );
    assert!(relume_ckpt::verify(&latest).is_ok());
    let ran = mpirun(2, &job(&SPEC, dir.path()));
    assert_eq!(ran.outcomes, both("completed@15"), "{}", ran.all);
    assert_same_state(r.path(), dir.path());
}

#[test]
fn another_config_on_one_rank_and_a_rank_that_never_arrives_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = job(&SPEC, dir.path());
    j.specs[1].max_epochs = 4;
    let ran = mpirun(2, &j);
    assert!(!ran.ok);
    assert!(
        ran.all
            .contains("rank 1 disagrees on the run's configuration: max_epochs"),
        "{}",
        ran.all
    );
    let started = Instant::now();
    let mut j = job(&SPEC, dir.path());
    j.timeout_ms = 3000;
    j.stall_rank = Some(1);
    let ran = mpirun(2, &j);
    assert!(!ran.ok);
    assert!(
        ran.all
            .contains("ERROR=rank0:rank 0: ranks [1] did not arrive at the configuration check"),
        "{}",
        ran.all
    );
    assert!(started.elapsed() < Duration::from_secs(120));
}

#[test]
fn three_mpi_ranks_match_one_process() {
    let six = Spec { accum: 6, ..SPEC };
    let r = tempfile::tempdir().unwrap();
    let alone = fit_at(1, &six, r.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut j = job(&six, dir.path());
    j.specs.push(six.clone());
    let ran = mpirun(3, &j);
    let want: Vec<String> = (0..3).map(|r| format!("rank{r}:{}", alone[0])).collect();
    assert_eq!(ran.outcomes, want, "{}", ran.all);
    assert_same_state(r.path(), dir.path());
}

#[test]
fn ranks_print_plain_lines_though_mpirun_gives_them_a_terminal() {
    // OpenMPI hands each rank a pseudo-terminal even when mpirun's own output is a
    // pipe (as here) or a file: a bar and colour codes would land in the log.
    let dir = tempfile::tempdir().unwrap();
    let mut j = job(&SPEC, dir.path());
    j.report_terminal = true;
    let ran = mpirun(2, &j);
    assert!(ran.ok, "{}", ran.all);
    let mut seen: Vec<&str> = ran
        .all
        .lines()
        .filter_map(|l| l.split_once("TERMINAL=").map(|(_, r)| r.trim()))
        .collect();
    seen.sort();
    assert_eq!(seen.len(), 2, "{}", ran.all);
    for (rank, line) in seen.iter().enumerate() {
        assert!(
            line.starts_with(&format!("rank{rank}:"))
                && line.ends_with(":relume=false:colour=false"),
            "rank {rank} would draw a bar or colour: {line}"
        );
    }
    assert!(!ran.all.contains('\x1b'), "escape codes: {}", ran.all);
}
