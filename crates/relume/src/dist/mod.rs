//! Data-parallel training: a [`Collective`] (rank, world size, barrier, gather,
//! broadcast, deterministic all-reduce, all with timeouts) and the rules that keep
//! an N-process run byte-identical to a 1-process one.
//!
//! ## The contract
//! A data-parallel run is **gradient accumulation spread over processes**. The
//! trainer's `accumulate_grad_batches(n)` window of `n` micro-batches (each of the
//! loader's `batch_size`) is one optimizer step over a global batch of
//! `n × batch_size` examples. With world size `w` (`n % w == 0`), rank `r` computes
//! micro-batches `r·n/w .. (r+1)·n/w` of every window; every rank then gathers every
//! micro-batch's gradients and metric logs and folds them **in micro-batch order**,
//! exactly as one process accumulating `n` micro-batches would. So:
//! - replicas stay bit-identical (every rank folds the same values in the same
//!   order), and the result does not depend on MPI's reduction algorithm or timing;
//! - a run at world size 2 is byte-identical to one at world size 1 with the same
//!   `batch_size` and `accumulate_grad_batches`, and a checkpoint written at one
//!   world size resumes exactly at another (the global batch is the same);
//! - random streams that a step draws from ([`crate::trainer::StepCtx::rng`]) are
//!   derived from (seed, stream, global micro-batch index) in a data-parallel run,
//!   not consumed sequentially, so a micro-batch's dropout mask does not depend on
//!   which rank computes it.
//!
//! Every rank iterates the same loader (the cursor is global) and runs the same
//! hooks; only the forward/backward of its own micro-batches is computed. Rank 0
//! alone writes checkpoints, logs and the progress bar; before it commits, every
//! rank's state fingerprint is gathered and must be equal, so a diverged replica
//! is an error naming the rank, never a checkpoint.
//!
//! Implementations: [`SingleProcess`] (world size 1, the default), [`ThreadGroup`]
//! (N ranks as threads of one process, for tests and for a quick look), and
//! `MpiCollective` behind the cargo feature `mpi` (OpenMPI through the `mpi` crate),
//! and `NcclCollective` behind `nccl` (NCCL on NVIDIA GPUs through cudarc,
//! bootstrapped over MPI; it builds without CUDA and is untested without a GPU).

use std::fmt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

mod launch;
#[cfg(feature = "mpi")]
mod mpi_impl;
#[cfg(feature = "nccl")]
mod nccl_impl;
pub use launch::{started_by_mpirun, Launched};
#[cfg(feature = "mpi")]
pub use mpi_impl::{launched_by_mpirun, MpiCollective};
#[cfg(feature = "nccl")]
pub use nccl_impl::NcclCollective;

/// The default time a rank waits for the others at a collective operation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// A process group: every rank calls the same operations in the same order.
///
/// Every operation names what it is for (`what`, e.g. `"gradients of step 12"`)
/// so that a timeout says where the missing rank did not arrive.
pub trait Collective: Send + Sync + fmt::Debug {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// How long an operation waits for the other ranks.
    fn timeout(&self) -> Duration;
    /// Every rank's `mine`, in rank order, on every rank.
    ///
    /// # Errors
    /// [`Error::RankTimeout`] naming the ranks that did not arrive in time.
    fn all_gather_bytes(&self, what: &str, mine: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Total time this rank has spent inside [`Collective::all_gather_bytes`]
    /// (waiting for the others and moving bytes); zero where not measured.
    fn time_in_exchanges(&self) -> Duration {
        Duration::ZERO
    }

    /// Waits until every rank has arrived.
    ///
    /// # Errors
    /// As [`Collective::all_gather_bytes`].
    fn barrier(&self, what: &str) -> Result<()> {
        self.all_gather_bytes(what, &[]).map(|_| ())
    }

    /// `root`'s `data` on every rank (the others' `data` is replaced).
    ///
    /// # Errors
    /// As [`Collective::all_gather_bytes`].
    fn broadcast_bytes(&self, what: &str, root: usize, data: &mut Vec<u8>) -> Result<()> {
        let mine = if self.rank() == root {
            data.clone()
        } else {
            Vec::new()
        };
        let mut all = self.all_gather_bytes(what, &mine)?;
        *data = std::mem::take(&mut all[root]);
        Ok(())
    }

    /// Sums `buf` over the ranks, in rank order (`((r0 + r1) + r2) + ...`), so the
    /// result is the same bits on every rank and in every run.
    ///
    /// # Errors
    /// As [`Collective::all_gather_bytes`]; [`Error::RankDisagrees`] when the
    /// ranks' buffers differ in length.
    fn all_reduce_sum_f32(&self, what: &str, buf: &mut [f32]) -> Result<()> {
        let all = self.all_gather_bytes(what, bytemuck::cast_slice(buf))?;
        for (r, bytes) in all.iter().enumerate() {
            if bytes.len() != std::mem::size_of_val(buf) {
                return Err(Error::RankDisagrees {
                    rank: r,
                    what: what.to_string(),
                    detail: format!(
                        "{} values, rank {} has {}",
                        bytes.len() / 4,
                        self.rank(),
                        buf.len()
                    ),
                });
            }
        }
        for (i, x) in buf.iter_mut().enumerate() {
            let mut s = 0f32;
            for (r, bytes) in all.iter().enumerate() {
                let v = f32::from_le_bytes([
                    bytes[4 * i],
                    bytes[4 * i + 1],
                    bytes[4 * i + 2],
                    bytes[4 * i + 3],
                ]);
                s = if r == 0 { v } else { s + v };
            }
            *x = s;
        }
        Ok(())
    }

    /// True on every rank when `flag` is true on any (a preemption signal on one
    /// rank stops all of them at the same step).
    ///
    /// # Errors
    /// As [`Collective::all_gather_bytes`].
    fn any(&self, what: &str, flag: bool) -> Result<bool> {
        let all = self.all_gather_bytes(what, &[u8::from(flag)])?;
        Ok(all.iter().any(|b| b.first() == Some(&1)))
    }
}

/// The time a collective has spent in its exchanges
/// ([`Collective::time_in_exchanges`]).
#[derive(Debug, Default)]
pub(crate) struct ExchangeClock(std::sync::atomic::AtomicU64);

impl ExchangeClock {
    /// Runs `f`, adding its duration to the total.
    pub(crate) fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = f();
        self.0.fetch_add(
            started.elapsed().as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        out
    }

    /// The total so far.
    pub(crate) fn total(&self) -> Duration {
        Duration::from_nanos(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// Sleeps a little longer each round of a polling wait: a step's exchange stays
/// fast, a long wait does not spin a core.
#[cfg(any(feature = "mpi", feature = "nccl"))]
pub(crate) fn back_off(round: &mut u32) {
    *round += 1;
    if *round < 2_000 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// World size 1: every operation returns at once.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn timeout(&self) -> Duration {
        DEFAULT_TIMEOUT
    }
    fn all_gather_bytes(&self, _what: &str, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
}

#[derive(Debug)]
struct Exchange {
    generation: u64,
    slots: Vec<Option<Vec<u8>>>,
    result: Arc<Vec<Vec<u8>>>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<Exchange>,
    cv: Condvar,
}

/// `world_size` ranks as threads of one process (one `ThreadGroup` handle per
/// thread, from [`ThreadGroup::new`]): the same contract as MPI without MPI, for
/// tests. A rank that does not arrive within the timeout is named.
#[derive(Debug, Clone)]
pub struct ThreadGroup {
    rank: usize,
    world: usize,
    timeout: Duration,
    shared: Arc<Shared>,
    clock: Arc<ExchangeClock>,
}

impl ThreadGroup {
    /// One handle per rank, in rank order; give handle `r` to the thread of rank `r`.
    pub fn new(world_size: usize, timeout: Duration) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            state: Mutex::new(Exchange {
                generation: 0,
                slots: vec![None; world_size],
                result: Arc::new(Vec::new()),
            }),
            cv: Condvar::new(),
        });
        (0..world_size)
            .map(|rank| ThreadGroup {
                rank,
                world: world_size,
                timeout,
                shared: Arc::clone(&shared),
                clock: Arc::default(),
            })
            .collect()
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
    fn time_in_exchanges(&self) -> Duration {
        self.clock.total()
    }
    fn all_gather_bytes(&self, what: &str, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.clock.time(|| self.gather(what, mine))
    }
}

impl ThreadGroup {
    fn gather(&self, what: &str, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let deadline = Instant::now() + self.timeout;
        let mut g = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let generation = g.generation;
        g.slots[self.rank] = Some(mine.to_vec());
        if g.slots.iter().all(Option::is_some) {
            let all: Vec<Vec<u8>> = g.slots.iter_mut().filter_map(Option::take).collect();
            g.result = Arc::new(all);
            g.generation += 1;
            self.shared.cv.notify_all();
            return Ok(g.result.as_ref().clone());
        }
        loop {
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = g
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.is_none())
                    .map(|(r, _)| r)
                    .collect();
                // Withdraw, so a late rank does not complete a round we left.
                g.slots[self.rank] = None;
                return Err(Error::RankTimeout {
                    rank: self.rank,
                    missing,
                    what: what.to_string(),
                    waited: self.timeout,
                });
            }
            let (ng, _) = self
                .shared
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner());
            g = ng;
            if g.generation != generation {
                return Ok(g.result.as_ref().clone());
            }
        }
    }
}

/// Runs `f(rank_handle)` on `world_size` threads and returns their results in rank
/// order: the quickest way to try a data-parallel configuration in one process.
///
/// # Errors
/// The first rank's error, in rank order; a panicking rank is
/// [`Error::RankPanicked`].
pub fn run_threads<T: Send + 'static>(
    world_size: usize,
    timeout: Duration,
    f: impl Fn(ThreadGroup) -> Result<T> + Send + Sync + 'static,
) -> Result<Vec<T>> {
    let f = Arc::new(f);
    let handles: Vec<_> = ThreadGroup::new(world_size, timeout)
        .into_iter()
        .map(|g| {
            let f = Arc::clone(&f);
            std::thread::spawn(move || f(g))
        })
        .collect();
    let mut out = Vec::with_capacity(world_size);
    let mut first_err = None;
    for (rank, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(Error::RankPanicked { rank });
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// The ranks that own each position of an accumulation window of `window`
/// micro-batches (the last window of an epoch may be shorter than `accum`):
/// position `p` belongs to rank `p / (accum / world)`.
pub(crate) fn owner(position: u64, accum: u64, world: usize) -> usize {
    let per_rank = (accum / world as u64).max(1);
    (position / per_rank) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_group_gathers_in_rank_order_and_reduces_deterministically() {
        let out = run_threads(3, Duration::from_secs(10), |g| {
            let mut v = vec![g.rank() as f32 + 0.1, 1e8, -1e8];
            g.all_reduce_sum_f32("test", &mut v)?;
            let all = g.all_gather_bytes("names", format!("r{}", g.rank()).as_bytes())?;
            let mut b = if g.rank() == 2 {
                b"from 2".to_vec()
            } else {
                Vec::new()
            };
            g.broadcast_bytes("bcast", 2, &mut b)?;
            Ok((v, all, b, g.any("flag", g.rank() == 1)?))
        })
        .unwrap();
        let want = (
            (0.1f32 + 1.1) + 2.1,
            (1e8f32 + 1e8) + 1e8,
            (-1e8f32 - 1e8) - 1e8,
        );
        for (v, all, b, any) in out {
            assert_eq!(v, vec![want.0, want.1, want.2]);
            assert_eq!(all, vec![b"r0".to_vec(), b"r1".to_vec(), b"r2".to_vec()]);
            assert_eq!(b, b"from 2");
            assert!(any);
        }
    }

    #[test]
    fn a_rank_that_never_arrives_is_named_within_the_timeout() {
        let started = Instant::now();
        let out = run_threads(2, Duration::from_millis(300), |g| {
            if g.rank() == 1 {
                return Ok(());
            }
            g.barrier("the save at step 4")
        });
        let e = out.unwrap_err().to_string();
        assert!(e.contains("[1]") && e.contains("the save at step 4"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn ownership_splits_a_window_into_contiguous_ranges() {
        let owners: Vec<usize> = (0..4).map(|p| owner(p, 4, 2)).collect();
        assert_eq!(owners, [0, 0, 1, 1]);
        let owners: Vec<usize> = (0..4).map(|p| owner(p, 4, 1)).collect();
        assert_eq!(owners, [0, 0, 0, 0]);
        let owners: Vec<usize> = (0..4).map(|p| owner(p, 4, 4)).collect();
        assert_eq!(owners, [0, 1, 2, 3]);
    }
}
