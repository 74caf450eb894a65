//! [`MpiCollective`]: the [`Collective`] over MPI (the `mpi` crate, OpenMPI on
//! Debian), behind the cargo feature `mpi`.
//!
//! Every operation is a gather at rank 0 followed by rank 0 sending the result to
//! each rank, over point-to-point messages polled with `MPI_Improbe` until a
//! deadline: so a rank that does not arrive is **named** (a collective such as
//! `MPI_Allgather` could only hang), and rank 0 folds in rank order. A rank whose
//! process dies is reported by `mpirun` itself, which then ends the job.
//!
//! After an error the job cannot continue (a message may be half-received), so a
//! program should print it and call [`MpiCollective::abort`], which ends every
//! rank at once instead of leaving them waiting.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mpi::environment::Universe;
use mpi::point_to_point::{Destination, MatchedReceiveVec, Source};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;

use super::{back_off, Collective, ExchangeClock};
use crate::error::{Error, Result};

/// The MPI process group of `mpirun -np N`.
pub struct MpiCollective {
    // Dropped last: finalises MPI.
    inner: Mutex<Inner>,
    rank: usize,
    world: usize,
    timeout: Duration,
    tag: AtomicI32,
    clock: ExchangeClock,
}

struct Inner {
    world: SimpleCommunicator,
    _universe: Universe,
}

// SAFETY: MPI is initialised with `Threading::Serialized` and every MPI call goes
// through the `inner` mutex, so calls are never concurrent, which is what that
// level requires of any thread.
unsafe impl Send for MpiCollective {}
// SAFETY: as above; shared references only reach MPI through the mutex.
unsafe impl Sync for MpiCollective {}

impl std::fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MpiCollective(rank {} of {})", self.rank, self.world)
    }
}

/// True when this process was started by `mpirun`/`mpiexec` (OpenMPI or MPICH).
pub fn launched_by_mpirun() -> bool {
    super::started_by_mpirun()
}

fn encode_all(all: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(all.len() as u64).to_le_bytes());
    for a in all {
        out.extend_from_slice(&(a.len() as u64).to_le_bytes());
        out.extend_from_slice(a);
    }
    out
}

fn decode_all(b: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut pos = 0usize;
    let mut next = |n: usize| -> Option<&[u8]> {
        let end = pos.checked_add(n).filter(|e| *e <= b.len())?;
        let s = &b[pos..end];
        pos = end;
        Some(s)
    };
    let u = |s: &[u8]| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    };
    let n = u(next(8)?) as usize;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = usize::try_from(u(next(8)?)).ok()?;
        out.push(next(len)?.to_vec());
    }
    Some(out)
}

impl MpiCollective {
    /// Initialises MPI (once per process) with `timeout` for every operation.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] when MPI was initialised already or does not
    /// offer serialized threading.
    pub fn init(timeout: Duration) -> Result<Self> {
        let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Serialized)
        else {
            return Err(Error::InvalidSetting {
                setting: "MPI".into(),
                value: "already initialised".into(),
                rule: "create one MpiCollective per process".into(),
            });
        };
        if threading < Threading::Serialized {
            return Err(Error::InvalidSetting {
                setting: "MPI threading".into(),
                value: format!("{threading:?}"),
                rule: "relume needs MPI_THREAD_SERIALIZED (the loader's workers are threads)"
                    .into(),
            });
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(MpiCollective {
            inner: Mutex::new(Inner {
                world,
                _universe: universe,
            }),
            rank,
            world: size,
            timeout,
            tag: AtomicI32::new(0),
            clock: ExchangeClock::default(),
        })
    }

    /// Ends every rank of the job now with `code` (`MPI_Abort`): what a program
    /// does after an error, so that no rank is left waiting for the others.
    pub fn abort(&self, code: i32) -> ! {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        mpi::topology::Communicator::abort(&inner.world, code)
    }

    fn next_tag(&self) -> i32 {
        // Tags from 1 to 30000 (MPI guarantees at least 32767), one per operation,
        // so a late message never matches a later operation.
        self.tag.fetch_add(1, Ordering::Relaxed) % 30000 + 1
    }
}

impl Collective for MpiCollective {
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
        self.clock.time(|| self.exchange(what, mine))
    }
}

impl MpiCollective {
    fn exchange(&self, what: &str, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let tag = self.next_tag();
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let world = &inner.world;
        let deadline = Instant::now() + self.timeout;
        let timeout = |missing: Vec<usize>| Error::RankTimeout {
            rank: self.rank,
            missing,
            what: what.to_string(),
            waited: self.timeout,
        };
        if self.world == 1 {
            return Ok(vec![mine.to_vec()]);
        }
        if self.rank != 0 {
            world.process_at_rank(0).send_with_tag(mine, tag);
            let mut round = 0;
            loop {
                if let Some(probed) = world
                    .process_at_rank(0)
                    .immediate_matched_probe_with_tag(tag)
                {
                    let (bytes, _) = probed.matched_receive_vec::<u8>();
                    return decode_all(&bytes).ok_or_else(|| Error::RankDisagrees {
                        rank: 0,
                        what: what.to_string(),
                        detail: "its reply does not parse: another relume version?".into(),
                    });
                }
                if Instant::now() >= deadline {
                    return Err(timeout(vec![0]));
                }
                back_off(&mut round);
            }
        }
        let mut all: Vec<Option<Vec<u8>>> = vec![None; self.world];
        all[0] = Some(mine.to_vec());
        let mut round = 0;
        while all.iter().any(Option::is_none) {
            for (r, slot) in all.iter_mut().enumerate().skip(1) {
                if slot.is_some() {
                    continue;
                }
                if let Some(probed) = world
                    .process_at_rank(r as i32)
                    .immediate_matched_probe_with_tag(tag)
                {
                    let (bytes, _) = probed.matched_receive_vec::<u8>();
                    *slot = Some(bytes);
                }
            }
            if all.iter().any(Option::is_none) {
                if Instant::now() >= deadline {
                    let missing = (0..self.world).filter(|r| all[*r].is_none()).collect();
                    return Err(timeout(missing));
                }
                back_off(&mut round);
            }
        }
        let all: Vec<Vec<u8>> = all.into_iter().flatten().collect();
        let reply = encode_all(&all);
        for r in 1..self.world {
            world
                .process_at_rank(r as i32)
                .send_with_tag(&reply[..], tag);
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_round_trips() {
        let all = vec![b"a".to_vec(), Vec::new(), vec![0u8; 1000]];
        assert_eq!(decode_all(&encode_all(&all)).unwrap(), all);
        assert!(decode_all(&encode_all(&all)[..10]).is_none());
    }
}
