//! `Loss`: what the language-model losses return, a scalar that reads as a float and, like a
//! PyTorch loss, has `backward()`; the gradients land in the model's `gradients()`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ndarray::ArrayD;
use numpy::IntoPyArray;
use performer_tensor::{Module, Tensor};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::OrRaise;

/// The last gradients a loss of a model computed, by parameter name.
pub type GradientSink = Arc<Mutex<BTreeMap<String, ArrayD<f32>>>>;

/// A scalar loss with the graph that produced it.
#[pyclass(name = "Loss", module = "performer_rs", frozen)]
pub struct Loss {
    value: Tensor,
    params: Vec<(String, performer_tensor::Param)>,
    sink: GradientSink,
}

impl Loss {
    /// The loss `value` of `module`, whose gradients go to `sink`.
    pub fn new(value: Tensor, module: &dyn Module, sink: GradientSink) -> Self {
        Loss {
            value,
            params: module.named_parameters(),
            sink,
        }
    }
}

#[pymethods]
impl Loss {
    /// The value as a Python float.
    fn item(&self) -> PyResult<f64> {
        Ok(f64::from(self.value.item().or_raise()?))
    }

    fn __float__(&self) -> PyResult<f64> {
        self.item()
    }

    fn __repr__(&self) -> PyResult<String> {
        Ok(format!("Loss({})", self.item()?))
    }

    /// Computes the gradient of the loss with respect to every parameter (the GIL released)
    /// and stores it in the model's `gradients()`, replacing the previous ones.
    fn backward(&self, py: Python<'_>) -> PyResult<()> {
        let grads = crate::release::run_released(py, || self.value.backward()).or_raise()?;
        let mut named = BTreeMap::new();
        for (name, p) in &self.params {
            if let Some(g) = grads.get_param(p) {
                named.insert(name.clone(), g.clone());
            }
        }
        *self.sink.lock().map_err(|_| {
            pyo3::exceptions::PyRuntimeError::new_err("backward: the gradient store is poisoned")
        })? = named;
        Ok(())
    }
}

/// The gradients in `sink` as a dict of numpy arrays.
pub fn gradients<'py>(py: Python<'py>, sink: &GradientSink) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    let grads = sink.lock().map_err(|_| {
        pyo3::exceptions::PyRuntimeError::new_err("gradients: the gradient store is poisoned")
    })?;
    for (k, g) in grads.iter() {
        dict.set_item(k, g.clone().into_pyarray(py))?;
    }
    Ok(dict)
}
