//! Keyword arguments as JSON, the form performer-models reads configurations in (the same
//! reader as the parity fixtures' `config.json`), so every knob keeps performer-pytorch's name
//! and an unknown or mistyped one is an error naming it.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Value};

use crate::errors::type_error;

/// The activations `kernel_fn` accepts, by the lower-cased name of their `torch.nn` class.
const KERNEL_NAMES: &[&str] = &["relu", "gelu", "elu", "softplus", "sigmoid", "tanh", "silu"];

/// `**kwargs` of constructor `op` as a JSON object.
pub fn to_json(op: &str, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Value> {
    let mut map = Map::new();
    if let Some(kwargs) = kwargs {
        for (k, v) in kwargs.iter() {
            let name: String = k.extract()?;
            let value = if name.ends_with("kernel_fn") {
                kernel_fn(op, &name, &v)?
            } else {
                value(op, &name, &v)?
            };
            map.insert(name, value);
        }
    }
    Ok(Value::Object(map))
}

/// One argument's value: None, bool, int, float, str, and lists or tuples of them.
fn value(op: &str, name: &str, v: &Bound<'_, PyAny>) -> PyResult<Value> {
    if v.is_none() {
        return Ok(Value::Null);
    }
    // bool before int: Python's bool is an int.
    if v.is_instance_of::<PyBool>() {
        return Ok(Value::Bool(v.extract()?));
    }
    if v.is_instance_of::<PyInt>() {
        return match v.extract::<i64>() {
            Ok(i) => Ok(Value::from(i)),
            Err(_) => Err(type_error(op, name, "is an integer beyond 64 bits")),
        };
    }
    if v.is_instance_of::<PyFloat>() {
        return Ok(Value::from(v.extract::<f64>()?));
    }
    if v.is_instance_of::<PyString>() {
        return Ok(Value::String(v.extract()?));
    }
    if v.is_instance_of::<PyList>() || v.is_instance_of::<PyTuple>() {
        let items = v
            .try_iter()?
            .map(|item| value(op, name, &item?))
            .collect::<PyResult<Vec<_>>>()?;
        return Ok(Value::Array(items));
    }
    // numpy scalars (np.int64(4), np.float32(0.1)) through their Python value.
    if v.hasattr("item")? && v.hasattr("dtype")? {
        return value(op, name, &v.call_method0("item")?);
    }
    Err(type_error(
        op,
        name,
        format!(
            "must be None, a bool, a number, a string or a list of them, not {}",
            v.get_type().name()?
        ),
    ))
}

/// `kernel_fn`: a name (`"relu"`) or, where torch is installed, an activation module such as
/// `torch.nn.ReLU()` (or its class), recognized by its class name.
fn kernel_fn(op: &str, name: &str, v: &Bound<'_, PyAny>) -> PyResult<Value> {
    if v.is_instance_of::<PyString>() || v.is_none() {
        return value(op, name, v);
    }
    let class = if v.is_instance_of::<pyo3::types::PyType>() {
        v.getattr("__name__")?.extract::<String>()?
    } else {
        v.get_type().name()?.to_string()
    };
    let lower = class.to_lowercase();
    if KERNEL_NAMES.contains(&lower.as_str()) {
        return Ok(Value::String(lower));
    }
    Err(type_error(
        op,
        name,
        format!("must be one of {KERNEL_NAMES:?} or the torch.nn module of one, not {class}"),
    ))
}
