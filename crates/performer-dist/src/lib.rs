//! performer-dist: data-parallel training for performer-rs.
//!
//! Every rank (process) holds the whole model, computes gradients on its own share of each
//! batch, and the ranks average their gradients before every optimizer step, so all of them
//! take the same step and stay equal. This crate owns:
//!
//! - the [`Communicator`] trait (rank, world size, all-reduce-mean of gradient buffers,
//!   broadcast, barrier) and its back ends: [`SingleProcess`] (the default: one rank, every
//!   collective the identity), `MpiCommunicator` (feature `mpi`: OpenMPI or MPICH through
//!   rsmpi, for `mpirun` on one machine or many) and `NcclCommunicator` (feature `nccl`:
//!   NVIDIA's collectives between GPUs through cudarc, for buffers in device memory);
//! - [`DataParallel`]: gradients packed into a few flat buckets and averaged, each bucket sent
//!   off while the backward is still computing earlier layers;
//! - [`state`]: rank 0's weights and optimizer state copied to every rank, and a check that all
//!   ranks hold bit for bit the same parameters and buffers (FAVOR+ projections included);
//! - [`seed`]: seeds every rank derives alike (projection redraws: shared; dropout: per rank)
//!   and disjoint shares of a batch.
//!
//! No collective waits forever: one that does not complete within the back end's timeout
//! (another rank died or stalled) fails with [`Error::Timeout`], and the job is aborted.
//!
//! ```
//! use performer_dist::{Communicator, DataParallel, SingleProcess};
//! use performer_tensor::{Param, Tensor};
//! # fn main() -> performer_dist::Result<()> {
//! let w = Param::new(Tensor::randn(&[3, 2]).to_array());
//! let comm = SingleProcess; // or MpiCommunicator::init()? under mpirun
//! let mut dp = DataParallel::new(&comm, vec![w.clone()]);
//! let x = Tensor::randn(&[4, 3]); // this rank's share of the batch
//! let loss = x.matmul(&w.tensor())?.relu().mean_all();
//! let grads = dp.backward(&loss, None)?; // averaged over all ranks
//! assert_eq!(grads.get_param(&w).unwrap().shape(), &[3, 2]);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod bucket;
mod communicator;
mod data_parallel;
mod error;
pub mod launch;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
pub mod seed;
pub mod state;

pub use communicator::{
    Communicator, DEFAULT_BUCKET_ELEMS, PendingReduce, SingleProcess, check_root,
};
pub use data_parallel::{CommStats, DataParallel};
pub use error::{Error, Result};
#[cfg(feature = "mpi")]
pub use mpi::{DEFAULT_TIMEOUT, MpiCommunicator};
#[cfg(feature = "nccl")]
pub use nccl::NcclCommunicator;

use std::time::Duration;

/// A back end, by the name users give on a command line (`single`, `mpi`, `nccl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// One process ([`SingleProcess`]).
    Single,
    /// MPI (feature `mpi`).
    Mpi,
    /// NCCL between GPUs, started over MPI (features `nccl` and `mpi`).
    Nccl,
}

impl std::str::FromStr for Backend {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "single" | "none" => Ok(Backend::Single),
            "mpi" => Ok(Backend::Mpi),
            "nccl" => Ok(Backend::Nccl),
            other => Err(Error::invalid(
                "Backend",
                format!("unknown back end `{other}`: expected single, mpi or nccl"),
            )),
        }
    }
}

/// Whether this crate was built with the back end's feature.
pub fn compiled_in(backend: Backend) -> bool {
    match backend {
        Backend::Single => true,
        Backend::Mpi => cfg!(feature = "mpi"),
        Backend::Nccl => cfg!(all(feature = "nccl", feature = "mpi")),
    }
}

/// Joins the job's world through `backend`, with `timeout` for every collective (`None`: the
/// back end's default). `Nccl` uses GPU `rank % visible devices`, bootstrapped over MPI. An
/// [`Error::Invalid`] naming the cargo feature where the back end was not compiled in.
pub fn connect(backend: Backend, timeout: Option<Duration>) -> Result<Box<dyn Communicator>> {
    match backend {
        Backend::Single => Ok(Box::new(SingleProcess)),
        #[cfg(feature = "mpi")]
        Backend::Mpi => {
            let comm = MpiCommunicator::init()?;
            Ok(Box::new(match timeout {
                Some(t) => comm.with_timeout(t),
                None => comm,
            }))
        }
        #[cfg(all(feature = "nccl", feature = "mpi"))]
        Backend::Nccl => {
            let mpi = MpiCommunicator::init()?;
            let mpi = match timeout {
                Some(t) => mpi.with_timeout(t),
                None => mpi,
            };
            Ok(Box::new(NcclCommunicator::over(Box::new(mpi), None)?))
        }
        #[allow(unreachable_patterns)]
        other => {
            let _ = timeout;
            let feature = match other {
                Backend::Nccl => "`nccl` and `mpi`",
                _ => "`mpi`",
            };
            Err(Error::invalid(
                "connect",
                format!(
                    "the {other:?} back end was not compiled in: build performer-dist with the \
                     {feature} feature (the facade's features of the same names)"
                ),
            ))
        }
    }
}
