//! Arrays across the boundary: anything that implements the array protocol comes in (numpy
//! arrays, lists, CPU torch tensors), is checked for its kind of element and its rank, and is
//! copied into an owned ndarray so the computation can run without the GIL; results go out as
//! numpy arrays.

use ndarray::{Array2, ArrayD, Ix2};
use numpy::{IntoPyArray, PyArrayDyn, PyReadonlyArrayDyn};
use pyo3::prelude::*;

use crate::errors::{type_error, value_error};

/// numpy's array of `obj`: a torch tensor is detached and moved to the CPU first (numpy cannot
/// read one that requires grad or lives on a GPU).
fn as_numpy<'py>(obj: &Bound<'py, PyAny>) -> PyResult<(Bound<'py, PyAny>, String)> {
    let py = obj.py();
    let obj = if obj.hasattr("detach")? && obj.hasattr("cpu")? && obj.hasattr("numpy")? {
        obj.call_method0("detach")?.call_method0("cpu")?
    } else {
        obj.clone()
    };
    let arr = py.import("numpy")?.call_method1("asarray", (obj,))?;
    let kind: String = arr.getattr("dtype")?.getattr("kind")?.extract()?;
    Ok((arr, kind))
}

fn check_rank(op: &str, name: &str, arr: &Bound<'_, PyAny>, rank: Option<usize>) -> PyResult<()> {
    let shape: Vec<usize> = arr.getattr("shape")?.extract()?;
    match rank {
        Some(r) if shape.len() != r => Err(value_error(
            op,
            name,
            format!("must have {r} dimensions, got shape {shape:?}"),
        )),
        _ => Ok(()),
    }
}

fn dtype(arr: &Bound<'_, PyAny>) -> PyResult<String> {
    Ok(arr.getattr("dtype")?.str()?.to_string())
}

/// Token ids `(b, n)`: integers of any width, as int64.
pub fn tokens(op: &str, name: &str, obj: &Bound<'_, PyAny>) -> PyResult<Array2<i64>> {
    let (arr, kind) = as_numpy(obj)?;
    if kind != "i" && kind != "u" {
        return Err(type_error(
            op,
            name,
            format!("must hold integer token ids, got dtype {}", dtype(&arr)?),
        ));
    }
    check_rank(op, name, &arr, Some(2))?;
    let arr = arr.call_method1("astype", ("int64",))?;
    let view: PyReadonlyArrayDyn<'_, i64> = arr.extract()?;
    view.as_array()
        .to_owned()
        .into_dimensionality::<Ix2>()
        .map_err(|e| value_error(op, name, e))
}

/// A float array of rank `rank` (any float width, as float32; integers are refused, as torch
/// refuses them in a float matmul).
pub fn floats(
    op: &str,
    name: &str,
    obj: &Bound<'_, PyAny>,
    rank: Option<usize>,
) -> PyResult<ArrayD<f32>> {
    let (arr, kind) = as_numpy(obj)?;
    if kind != "f" {
        return Err(type_error(
            op,
            name,
            format!(
                "must hold floating-point numbers, got dtype {}",
                dtype(&arr)?
            ),
        ));
    }
    check_rank(op, name, &arr, rank)?;
    let arr = arr.call_method1("astype", ("float32",))?;
    let view: PyReadonlyArrayDyn<'_, f32> = arr.extract()?;
    Ok(view.as_array().to_owned())
}

/// A boolean mask `(b, n)` (True = keep, as performer-pytorch's masks).
pub fn mask(op: &str, name: &str, obj: &Bound<'_, PyAny>) -> PyResult<Array2<bool>> {
    let (arr, kind) = as_numpy(obj)?;
    if kind != "b" {
        return Err(type_error(
            op,
            name,
            format!("must be a bool array, got dtype {}", dtype(&arr)?),
        ));
    }
    check_rank(op, name, &arr, Some(2))?;
    let view: PyReadonlyArrayDyn<'_, bool> = arr.extract()?;
    view.as_array()
        .to_owned()
        .into_dimensionality::<Ix2>()
        .map_err(|e| value_error(op, name, e))
}

/// An optional mask argument.
pub fn opt_mask(
    op: &str,
    name: &str,
    obj: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<Array2<bool>>> {
    obj.filter(|o| !o.is_none())
        .map(|o| mask(op, name, o))
        .transpose()
}

/// An optional float argument.
pub fn opt_floats(
    op: &str,
    name: &str,
    obj: Option<&Bound<'_, PyAny>>,
    rank: Option<usize>,
) -> PyResult<Option<ArrayD<f32>>> {
    obj.filter(|o| !o.is_none())
        .map(|o| floats(op, name, o, rank))
        .transpose()
}

/// A float32 result as a numpy array.
pub fn out_f32(py: Python<'_>, a: ArrayD<f32>) -> Bound<'_, PyArrayDyn<f32>> {
    a.into_pyarray(py)
}

/// Start tokens for generation: `(b, t)`, or `(t,)` as one sequence (the output then drops
/// the batch axis too, as performer-pytorch's `generate`).
pub fn start_tokens(op: &str, name: &str, obj: &Bound<'_, PyAny>) -> PyResult<(Array2<i64>, bool)> {
    let (arr, _) = as_numpy(obj)?;
    let ndim: usize = arr.getattr("ndim")?.extract()?;
    if ndim == 1 {
        let arr = arr.call_method1("reshape", ((1, -1),))?;
        Ok((tokens(op, name, &arr)?, true))
    } else {
        Ok((tokens(op, name, &arr)?, false))
    }
}

/// Generated tokens as numpy, `(b, n)` or `(n,)` when the start tokens had no batch axis.
pub fn out_tokens(py: Python<'_>, a: Array2<i64>, squeeze: bool) -> Bound<'_, PyAny> {
    if squeeze {
        a.row(0).to_owned().into_pyarray(py).into_any()
    } else {
        a.into_pyarray(py).into_any()
    }
}
