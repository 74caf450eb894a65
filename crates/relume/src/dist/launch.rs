//! [`Launched`]: the process group a job was started in, for `main` functions.
//!
//! A job built with the `mpi` feature and started by `mpirun -np N` gets an MPI
//! group of N ranks; started without `mpirun` it gets none (a plain run), or
//! [`SingleProcess`] when it asks for the data-parallel path at world size 1 (to
//! compare with or resume an N-rank run). A job started by `mpirun` but built
//! without the feature is an error rather than N independent runs writing one
//! directory.
//!
//! ```no_run
//! # fn main() -> relume::Result<()> {
//! use relume::dist::{Launched, DEFAULT_TIMEOUT};
//! let launched = Launched::detect(DEFAULT_TIMEOUT, false)?;
//! let mut builder = relume::trainer::Trainer::builder();
//! if let Some(l) = &launched {
//!     builder = builder.collective(l.collective());
//! }
//! // ... fit; on an error under mpirun, `l.abort(1)` ends every rank at once.
//! drop(launched); // finalises MPI before the process exits
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use super::{Collective, SingleProcess};
#[cfg(not(feature = "mpi"))]
use crate::error::Error;
use crate::error::Result;

/// The process group of this job (see the module docs).
#[derive(Debug, Clone)]
pub struct Launched {
    collective: Arc<dyn Collective>,
    #[cfg(feature = "mpi")]
    mpi: Option<Arc<super::MpiCollective>>,
}

/// True when an MPI launcher started this process (OpenMPI, MPICH, PMIx).
pub fn started_by_mpirun() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

impl Launched {
    /// The group: MPI under `mpirun`; otherwise [`SingleProcess`] when
    /// `single_process_dp` (the data-parallel path at world size 1), else `None`.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] under `mpirun` without the `mpi` feature; the MPI
    /// initialisation's error.
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    pub fn detect(timeout: Duration, single_process_dp: bool) -> Result<Option<Launched>> {
        if started_by_mpirun() {
            #[cfg(feature = "mpi")]
            {
                let mpi = Arc::new(super::MpiCollective::init(timeout)?);
                return Ok(Some(Launched {
                    collective: mpi.clone(),
                    mpi: Some(mpi),
                }));
            }
            #[cfg(not(feature = "mpi"))]
            {
                return Err(Error::InvalidSetting {
                    setting: "launcher".into(),
                    value: "mpirun".into(),
                    rule:
                        "this binary was built without MPI: build it with `--features relume/mpi`"
                            .into(),
                });
            }
        }
        Ok(single_process_dp.then(|| Launched {
            collective: Arc::new(SingleProcess),
            #[cfg(feature = "mpi")]
            mpi: None,
        }))
    }

    /// The group of any collective: for example one [`super::ThreadGroup`] handle
    /// per rank thread, to run a job's ranks inside one process.
    /// [`Launched::abort`] then ends this process.
    pub fn from_collective(collective: Arc<dyn Collective>) -> Launched {
        Launched {
            collective,
            #[cfg(feature = "mpi")]
            mpi: None,
        }
    }

    /// The collective to give [`crate::trainer::TrainerBuilder::collective`].
    pub fn collective(&self) -> Arc<dyn Collective> {
        Arc::clone(&self.collective)
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.collective.rank()
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.collective.world_size()
    }

    /// Ends the job with `code`: every MPI rank at once (so no rank waits on a
    /// dead one until its timeout), or this process.
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            m.abort(code);
        }
        std::process::exit(code)
    }
}
