//! [`NcclCollective`]: the [`Collective`] over NCCL on NVIDIA GPUs, behind the cargo
//! feature `nccl` (cudarc, which loads `libcuda` and `libnccl` at run time, so the
//! feature builds on a machine without CUDA).
//!
//! NCCL needs a process group to start from (to share its unique id) and has no
//! timeouts of its own, so an `NcclCollective` is built **over a bootstrap
//! collective** (in practice [`super::MpiCollective`] of `mpirun -np N`, one rank
//! per GPU):
//! - the unique id is broadcast from rank 0 over the bootstrap;
//! - every exchange first agrees on the sizes over the bootstrap, so a rank that
//!   does not arrive is **named** within the bootstrap's timeout, exactly as with
//!   MPI alone;
//! - the bytes then go through `ncclAllGather` on the rank's GPU, and the host
//!   waits for them by polling a CUDA event until the deadline, so a device that
//!   hangs is an error rather than a hang.
//!
//! The fold stays the trait's: every rank gathers every rank's buffer and sums in
//! rank order, so the bits do not depend on NCCL's ring or tree algorithm and an
//! N-GPU run keeps the byte-identity contract of the module docs.
//!
//! Built in CI (`cargo check --features relume/nccl`), never run there: the CI
//! machine has no GPU.
//!
//! ```no_run
//! # fn main() -> relume::Result<()> {
//! use std::sync::Arc;
//! use relume::dist::{Launched, NcclCollective, DEFAULT_TIMEOUT};
//! // mpirun -np 4 my_job: one rank per GPU.
//! let Some(launched) = Launched::detect(DEFAULT_TIMEOUT, false)? else {
//!     return Ok(()); // not under mpirun: a plain run
//! };
//! let device = launched.rank() % 4; // or the launcher's local rank
//! let nccl = NcclCollective::init(launched.collective(), device)?;
//! let builder = relume::trainer::Trainer::builder().collective(Arc::new(nccl));
//! # let _ = builder;
//! # Ok(())
//! # }
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id};

use super::{back_off, Collective, ExchangeClock};
use crate::error::{Error, Result};

/// Bytes of an NCCL unique id (`ncclUniqueId`).
const ID_BYTES: usize = 128;

/// The NCCL process group, one rank per GPU, over a bootstrap collective.
pub struct NcclCollective {
    inner: Mutex<Inner>,
    bootstrap: Arc<dyn Collective>,
    rank: usize,
    world: usize,
    clock: ExchangeClock,
}

struct Inner {
    comm: Comm,
    stream: Arc<CudaStream>,
}

// SAFETY: an NCCL communicator and a CUDA stream may be used from any thread as
// long as calls on them are not concurrent; every use goes through the `inner`
// mutex (cudarc binds the stream's context to the calling thread on each call).
unsafe impl Send for NcclCollective {}
// SAFETY: as above; shared references reach the communicator only through the mutex.
unsafe impl Sync for NcclCollective {}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclCollective(rank {} of {})", self.rank, self.world)
    }
}

fn nccl_error(rank: usize, what: &str, e: &cudarc::nccl::result::NcclError) -> Error {
    Error::DeviceCollective {
        rank,
        library: "NCCL",
        what: what.to_string(),
        detail: format!("{:?}", e.0),
    }
}

fn cuda_error(rank: usize, what: &str, e: &cudarc::driver::DriverError) -> Error {
    Error::DeviceCollective {
        rank,
        library: "CUDA",
        what: what.to_string(),
        detail: format!("{e:?}"),
    }
}

/// Every rank's buffer padded to the longest, concatenated in rank order, cut back
/// into the ranks' own lengths.
fn split_padded(all: &[u8], lens: &[usize], padded: usize) -> Vec<Vec<u8>> {
    lens.iter()
        .enumerate()
        .map(|(r, len)| all[r * padded..r * padded + len].to_vec())
        .collect()
}

/// The ranks' lengths from the bootstrap's gather of 8-byte little-endian sizes.
fn parse_lens(what: &str, sizes: &[Vec<u8>]) -> Result<Vec<usize>> {
    sizes
        .iter()
        .enumerate()
        .map(|(r, b)| {
            <[u8; 8]>::try_from(b.as_slice())
                .ok()
                .and_then(|a| usize::try_from(u64::from_le_bytes(a)).ok())
                .ok_or_else(|| Error::RankDisagrees {
                    rank: r,
                    what: format!("{what} (sizes)"),
                    detail: format!("sent {} bytes for its size, not 8", b.len()),
                })
        })
        .collect()
}

impl NcclCollective {
    /// Joins the NCCL group of `bootstrap`'s ranks on GPU `device` of this host.
    ///
    /// # Errors
    /// The bootstrap's [`Error::RankTimeout`] when a rank does not arrive;
    /// [`Error::DeviceCollective`] when CUDA or NCCL cannot be loaded or started.
    pub fn init(bootstrap: Arc<dyn Collective>, device: usize) -> Result<Self> {
        let (rank, world) = (bootstrap.rank(), bootstrap.world_size());
        // cudarc panics on the first call into a library it cannot load: look first.
        // SAFETY: these only try to dlopen the libraries by their usual names.
        let (cuda, nccl) = unsafe {
            (
                cudarc::driver::sys::is_culib_present(),
                cudarc::nccl::sys::is_culib_present(),
            )
        };
        for (present, library, file) in [(cuda, "CUDA", "libcuda.so"), (nccl, "NCCL", "libnccl.so")]
        {
            if !present {
                return Err(Error::DeviceCollective {
                    rank,
                    library,
                    what: "loading the library".into(),
                    detail: format!("{file} was not found on the library path (LD_LIBRARY_PATH); install the NVIDIA driver and NCCL, or run without the nccl collective"),
                });
            }
        }
        let what = "the NCCL unique id";
        let mut id_bytes = Vec::new();
        if rank == 0 {
            let id = Id::new().map_err(|e| nccl_error(rank, what, &e))?;
            id_bytes = id.internal().iter().map(|c| *c as u8).collect();
        }
        bootstrap.broadcast_bytes(what, 0, &mut id_bytes)?;
        let internal: [std::ffi::c_char; ID_BYTES] = id_bytes
            .iter()
            .map(|b| *b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|v: Vec<std::ffi::c_char>| Error::RankDisagrees {
                rank: 0,
                what: what.into(),
                detail: format!("{} bytes, not {ID_BYTES}", v.len()),
            })?;
        let ctx = CudaContext::new(device)
            .map_err(|e| cuda_error(rank, &format!("opening GPU {device}"), &e))?;
        let stream = ctx.default_stream();
        // Every rank is about to block in ncclCommInitRank, which has no timeout:
        // meet first where a missing rank is named.
        bootstrap.barrier("the NCCL initialisation")?;
        let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(internal))
            .map_err(|e| nccl_error(rank, "the NCCL initialisation", &e))?;
        Ok(NcclCollective {
            inner: Mutex::new(Inner { comm, stream }),
            bootstrap,
            rank,
            world,
            clock: ExchangeClock::default(),
        })
    }

    fn exchange(&self, what: &str, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let sizes = self.bootstrap.all_gather_bytes(
            &format!("{what} (sizes)"),
            &(mine.len() as u64).to_le_bytes(),
        )?;
        let lens = parse_lens(what, &sizes)?;
        let padded = lens.iter().copied().max().unwrap_or(0);
        if padded == 0 {
            return Ok(vec![Vec::new(); self.world]);
        }
        let cuda = |e: cudarc::driver::DriverError| cuda_error(self.rank, what, &e);
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut send = mine.to_vec();
        send.resize(padded, 0);
        let send = inner.stream.clone_htod(&send).map_err(cuda)?;
        let mut recv = inner
            .stream
            .alloc_zeros::<u8>(padded * self.world)
            .map_err(cuda)?;
        inner
            .comm
            .all_gather(&send, &mut recv)
            .map_err(|e| nccl_error(self.rank, what, &e))?;
        let done = inner.stream.record_event(None).map_err(cuda)?;
        let deadline = Instant::now() + self.bootstrap.timeout();
        let mut round = 0u32;
        while !done.try_is_complete().map_err(cuda)? {
            if Instant::now() >= deadline {
                return Err(Error::DeviceCollective {
                    rank: self.rank,
                    library: "NCCL",
                    what: what.to_string(),
                    detail: format!(
                        "the all-gather did not complete within {:?} although every rank \
                         arrived; end the job (the communicator is unusable)",
                        self.bootstrap.timeout()
                    ),
                });
            }
            back_off(&mut round);
        }
        let all = inner.stream.clone_dtoh(&recv).map_err(cuda)?;
        Ok(split_padded(&all, &lens, padded))
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn timeout(&self) -> Duration {
        self.bootstrap.timeout()
    }
    fn time_in_exchanges(&self) -> Duration {
        self.clock.total()
    }
    fn all_gather_bytes(&self, what: &str, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.clock.time(|| self.exchange(what, mine))
    }
    fn barrier(&self, what: &str) -> Result<()> {
        // No bytes to move: the bootstrap's meeting is the barrier.
        self.bootstrap.barrier(what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_gather_is_cut_back_to_each_ranks_length() {
        let all = [b"ab\0\0".as_slice(), b"wxyz", b"\0\0\0\0"].concat();
        let got = split_padded(&all, &[2, 4, 0], 4);
        assert_eq!(got, vec![b"ab".to_vec(), b"wxyz".to_vec(), Vec::new()]);
    }

    #[test]
    fn sizes_from_the_bootstrap_parse_or_name_the_rank() {
        let ok = vec![3u64.to_le_bytes().to_vec(), 0u64.to_le_bytes().to_vec()];
        assert_eq!(parse_lens("x", &ok).unwrap(), vec![3, 0]);
        let bad = vec![3u64.to_le_bytes().to_vec(), vec![1, 2]];
        match parse_lens("grads", &bad) {
            Err(Error::RankDisagrees { rank: 1, what, .. }) => assert!(what.contains("grads")),
            other => panic!("expected RankDisagrees from rank 1, got {other:?}"),
        }
    }

    #[test]
    fn without_a_gpu_init_is_a_named_error_not_a_panic() {
        // On a machine without libcuda (CI) the driver cannot be loaded; with a
        // GPU this starts a one-rank NCCL group and gathers through it.
        match NcclCollective::init(Arc::new(super::super::SingleProcess), 0) {
            Ok(nccl) => {
                let all = nccl.all_gather_bytes("a test", b"hello").unwrap();
                assert_eq!(all, vec![b"hello".to_vec()]);
            }
            Err(Error::DeviceCollective { rank: 0, .. }) => {}
            Err(e) => panic!("expected DeviceCollective, got {e}"),
        }
    }
}
