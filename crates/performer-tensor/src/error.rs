//! The one error type of the workspace: every fallible public function returns [`Result`].
//!
//! Messages name the operation, the shapes or values involved and the limit that was broken,
//! so that a user can find the bad argument without a debugger.

use std::path::PathBuf;

/// Errors raised by tensors, modules, checkpoints and the crates built on them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Operand shapes do not fit together (matmul inner sizes, broadcasting, cat, ...).
    #[error("{op}: shape mismatch: {detail}")]
    Shape {
        /// The operation that rejected its operands.
        op: String,
        /// What was expected and what was found.
        detail: String,
    },
    /// An axis outside `-rank..rank`.
    #[error("{op}: axis {axis} is out of range for a tensor of rank {rank}")]
    Axis {
        /// The operation.
        op: String,
        /// The axis given (negative axes count from the end).
        axis: isize,
        /// Rank of the tensor.
        rank: usize,
    },
    /// An index (token id, gather index, slice bound) outside its range.
    #[error("{op}: index {index} is out of range for size {size}")]
    Index {
        /// The operation.
        op: String,
        /// The offending index.
        index: i64,
        /// The size it must be below.
        size: usize,
    },
    /// An argument with a value the operation does not accept.
    #[error("{op}: invalid `{arg}` = {value}: {reason}")]
    InvalidArgument {
        /// The operation or constructor.
        op: String,
        /// The argument's name.
        arg: String,
        /// The value given.
        value: String,
        /// The rule it breaks.
        reason: String,
    },
    /// Backward was asked of something that cannot be differentiated.
    #[error("backward: {0}")]
    Backward(String),
    /// A state dict that does not fit the module.
    #[error("load_state_dict: {0}")]
    StateDict(String),
    /// A file that is not what it claims to be.
    #[error("{path}: {detail}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// An operating system error while reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A NaN or infinity where a finite number is required.
    #[error("{0}")]
    NonFinite(String),
    /// A failure inside a compute backend (the CUDA driver, NVRTC, cuBLAS), with the backend's
    /// own error kept as the source.
    #[error("{op}: {source}")]
    Backend {
        /// The operation that called the backend.
        op: String,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Operands of one op live on different devices (move one with `Tensor::to_device`).
    #[error("{op}: operands on different devices: {left} and {right}")]
    DeviceMismatch {
        /// The operation.
        op: String,
        /// The device of the first operand.
        left: String,
        /// The device of the operand that differs from the first.
        right: String,
    },
    /// A device allocation past the device's free memory.
    #[error(
        "{op}: out of memory on {device}: {requested} bytes requested, {in_use} of {capacity} in use"
    )]
    OutOfMemory {
        /// The operation that allocated.
        op: String,
        /// The device.
        device: String,
        /// Bytes asked for.
        requested: usize,
        /// Bytes already allocated on the device.
        in_use: usize,
        /// The device's capacity in bytes (0 where the driver does not say).
        capacity: usize,
    },
    /// An op asked of a tensor on a device where it has no implementation (yet), or a device
    /// this build cannot reach (the `cuda` feature is off).
    #[error("{op}: not available on {device}: {detail}")]
    Unsupported {
        /// The operation.
        op: String,
        /// The device.
        device: String,
        /// What to do instead.
        detail: String,
    },
    /// Anything else, with its explanation.
    #[error("{0}")]
    Other(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A [`Error::Shape`] for `op`.
    pub fn shape(op: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Shape {
            op: op.into(),
            detail: detail.into(),
        }
    }

    /// An [`Error::InvalidArgument`] for `op`.
    pub fn invalid(
        op: impl Into<String>,
        arg: impl Into<String>,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        Error::InvalidArgument {
            op: op.into(),
            arg: arg.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::Backend`] for `op`, keeping the backend's error as the source.
    pub fn backend(
        op: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Backend {
            op: op.into(),
            source: Box::new(source),
        }
    }

    /// An [`Error::Format`] for `path`.
    pub fn format(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            detail: detail.into(),
        }
    }
}
