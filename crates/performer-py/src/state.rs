//! State dicts across the boundary (a dict of numpy arrays with performer-pytorch's names,
//! the `proj_updater.instance.*` aliases included, as `torch.nn.Module.state_dict()` lists
//! them), and the methods every module class shares.

use std::collections::BTreeMap;

use numpy::{IntoPyArray, PyReadonlyArrayDyn};
use performer_models::checkpoint::{pytorch_state_dict, strip_aliases};
use performer_tensor::{Module, StateValue};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{OrRaise, type_error};

/// `module.state_dict()` as a dict of numpy arrays (float32, int64 for the redraw counters).
pub fn to_dict<'py>(py: Python<'py>, module: &dyn Module) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (name, value) in pytorch_state_dict(module) {
        match value {
            StateValue::F32(a) => dict.set_item(name, a.into_owned().into_pyarray(py))?,
            StateValue::I64(a) => dict.set_item(name, a.into_pyarray(py))?,
        }
    }
    Ok(dict)
}

/// A dict of arrays (numpy, torch tensors, anything numpy reads) as module state.
pub fn from_dict(state: &Bound<'_, PyAny>) -> PyResult<BTreeMap<String, StateValue>> {
    let op = "load_state_dict";
    let state = state.cast::<PyDict>().map_err(|_| {
        type_error(
            op,
            "state_dict",
            "must be a dict of arrays (as state_dict() returns)",
        )
    })?;
    let np = state.py().import("numpy")?;
    let mut out = BTreeMap::new();
    for (k, v) in state.iter() {
        let name: String = k
            .extract()
            .map_err(|_| type_error(op, "state_dict", "keys must be strings"))?;
        let v = if v.hasattr("detach")? && v.hasattr("cpu")? {
            v.call_method0("detach")?.call_method0("cpu")?
        } else {
            v
        };
        let arr = np.call_method1("asarray", (v,))?;
        let kind: String = arr.getattr("dtype")?.getattr("kind")?.extract()?;
        let value = match kind.as_str() {
            "f" => {
                let a = arr.call_method1("astype", ("float32",))?;
                let a: PyReadonlyArrayDyn<'_, f32> = a.extract()?;
                StateValue::F32(a.as_array().to_owned().into())
            }
            "i" | "u" => {
                let a = arr.call_method1("astype", ("int64",))?;
                let a: PyReadonlyArrayDyn<'_, i64> = a.extract()?;
                StateValue::I64(a.as_array().to_owned())
            }
            _ => {
                return Err(type_error(
                    op,
                    &name,
                    format!(
                        "must be a float or integer array, got dtype {}",
                        arr.getattr("dtype")?.str()?
                    ),
                ));
            }
        };
        out.insert(name, value);
    }
    Ok(out)
}

/// Loads `state` into `module`. `strict` (PyTorch's default) requires exactly the module's
/// keys; otherwise keys the module lacks are ignored and missing ones keep their values, and
/// the two lists are returned as PyTorch's `(missing_keys, unexpected_keys)`.
pub fn load(
    module: &dyn Module,
    state: &Bound<'_, PyAny>,
    strict: bool,
) -> PyResult<(Vec<String>, Vec<String>)> {
    let given = strip_aliases(from_dict(state)?).or_raise()?;
    if strict {
        module.load_state_dict(&given).or_raise()?;
        return Ok((vec![], vec![]));
    }
    let mut merged = module.state_dict();
    let missing: Vec<String> = merged
        .keys()
        .filter(|k| !given.contains_key(*k))
        .cloned()
        .collect();
    let mut unexpected = Vec::new();
    for (k, v) in given {
        if let Some(slot) = merged.get_mut(&k) {
            *slot = v;
        } else {
            unexpected.push(k);
        }
    }
    module.load_state_dict(&merged).or_raise()?;
    Ok((missing, unexpected))
}

/// The methods every module class has: `train`, `eval`, `training`, `state_dict`,
/// `load_state_dict`, `parameters_count`. `$class` has a `module(&self) -> &dyn Module`.
macro_rules! module_methods {
    ($class:ty) => {
        #[pyo3::pymethods]
        impl $class {
            /// Training mode (dropout on, projection redraws counted), as `nn.Module.train`;
            /// returns the module.
            #[pyo3(signature = (mode = true))]
            fn train(slf: pyo3::Bound<'_, Self>, mode: bool) -> pyo3::Bound<'_, Self> {
                performer_tensor::Module::set_training(slf.get().module(), mode);
                slf
            }

            /// Evaluation mode, as `nn.Module.eval`; returns the module.
            fn eval(slf: pyo3::Bound<'_, Self>) -> pyo3::Bound<'_, Self> {
                performer_tensor::Module::set_training(slf.get().module(), false);
                slf
            }

            /// Whether the module is in training mode.
            #[getter]
            fn training(&self) -> bool {
                performer_models::is_training(self.module())
            }

            /// Every parameter and buffer as numpy arrays, by performer-pytorch's names
            /// (aliases included, as PyTorch lists them).
            fn state_dict<'py>(
                &self,
                py: pyo3::Python<'py>,
            ) -> pyo3::PyResult<pyo3::Bound<'py, pyo3::types::PyDict>> {
                crate::state::to_dict(py, self.module())
            }

            /// Loads a state dict (numpy arrays or torch tensors by performer-pytorch's
            /// names); returns `(missing_keys, unexpected_keys)` as PyTorch does.
            #[pyo3(signature = (state_dict, strict = true))]
            fn load_state_dict(
                &self,
                state_dict: &pyo3::Bound<'_, pyo3::PyAny>,
                strict: bool,
            ) -> pyo3::PyResult<(Vec<String>, Vec<String>)> {
                crate::state::load(self.module(), state_dict, strict)
            }

            /// Names and shapes of the trainable parameters, as `named_parameters()` lists
            /// them.
            fn named_parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
                performer_tensor::Module::named_parameters(self.module())
                    .into_iter()
                    .map(|(n, p)| (n, p.shape()))
                    .collect()
            }

            /// Number of trainable scalars.
            fn num_parameters(&self) -> usize {
                performer_tensor::Module::num_parameters(self.module())
            }
        }
    };
}
pub(crate) use module_methods;
