//! Rust errors as Python exceptions: the message is the Rust one (it names the operation, the
//! argument and the limit), the class is the one a Python user would catch.

use performer_tensor::Error;
use pyo3::PyErr;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};

/// `ValueError` for a bad argument, shape, index or value; `OSError` for a file the system
/// refused; `RuntimeError` for a state dict that does not fit (as `torch.nn.Module`'s
/// `load_state_dict`) and for failures inside the computation.
pub fn to_py(e: Error) -> PyErr {
    let message = e.to_string();
    match e {
        Error::Shape { .. }
        | Error::Axis { .. }
        | Error::Index { .. }
        | Error::InvalidArgument { .. }
        | Error::NonFinite(_)
        | Error::Format { .. } => PyValueError::new_err(message),
        Error::Io { .. } => PyOSError::new_err(message),
        _ => PyRuntimeError::new_err(message),
    }
}

/// A `TypeError` for argument `arg` of `op`.
pub fn type_error(op: &str, arg: &str, detail: impl std::fmt::Display) -> PyErr {
    PyTypeError::new_err(format!("{op}: `{arg}` {detail}"))
}

/// A `ValueError` for argument `arg` of `op`.
pub fn value_error(op: &str, arg: &str, detail: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("{op}: `{arg}` {detail}"))
}

/// `Result` of the Rust crates into `PyResult`.
pub trait OrRaise<T> {
    /// The error as its Python exception.
    fn or_raise(self) -> pyo3::PyResult<T>;
}

impl<T> OrRaise<T> for performer_tensor::Result<T> {
    fn or_raise(self) -> pyo3::PyResult<T> {
        self.map_err(to_py)
    }
}
