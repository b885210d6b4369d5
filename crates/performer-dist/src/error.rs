//! The crate's error type: every failure of a collective is a value naming the back end, the
//! rank and the operation.

use std::time::Duration;

/// What went wrong in a distributed operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A collective did not complete in time: another rank died, stalled or never called it.
    /// The job cannot go on (a half-finished collective cannot be taken back), so the
    /// communicator that reports this aborts the whole job when it is dropped.
    #[error(
        "{backend} rank {rank} of {world}: {op} did not complete within {}s: another rank died, \
         stalled or did not take part; the job cannot continue",
        timeout.as_secs_f64()
    )]
    Timeout {
        /// `"mpi"` or `"nccl"`.
        backend: &'static str,
        /// The operation, e.g. `"all-reduce of 524288 floats"`.
        op: String,
        /// This process's rank.
        rank: usize,
        /// Number of ranks.
        world: usize,
        /// The limit that passed.
        timeout: Duration,
    },
    /// The communication library reported an error or is missing.
    #[error("{backend} {op}: {message}")]
    Backend {
        /// `"mpi"`, `"nccl"` or `"single"`.
        backend: &'static str,
        /// The operation.
        op: String,
        /// What the library said.
        message: String,
    },
    /// An argument this rank can check on its own is wrong (a root out of range, a buffer too
    /// long for the library's counts, a feature that was not compiled in).
    #[error("{op}: {message}")]
    Invalid {
        /// The function.
        op: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// Ranks that must agree do not: different model states, data, lengths or settings.
    #[error("ranks disagree: {0}")]
    Desynchronized(String),
    /// An error of the tensor library (a shape mismatch, a bad state dict).
    #[error(transparent)]
    Tensor(#[from] performer_tensor::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Invalid`].
    pub fn invalid(op: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            op: op.into(),
            message: message.into(),
        }
    }
}
