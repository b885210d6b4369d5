//! `SelfAttention`, `CrossAttention` and `FastAttention`: the attention layers alone, with the
//! keyword arguments of performer-pytorch's constructors (read by the parity runner's
//! [`attention_config`] and [`fast_attention_config`]).

use std::sync::Arc;

use performer_favor::FastAttention;
use performer_layers::{Block, BlockInputs, CrossAttention, SelfAttention};
use performer_models::parity::{attention_config, fast_attention_config};
use performer_tensor::no_grad;
use performer_tensor::{Module, Tensor};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::{floats, opt_floats, opt_mask, out_f32};
use crate::errors::{OrRaise, value_error};
use crate::kwargs::to_json;
use crate::state::module_methods;

/// `kwargs` with the first positional argument (`SelfAttention(512, heads=8)`, as torch's
/// constructors take it) added under its name.
fn with_first<'py>(
    name: &str,
    first: Option<&Bound<'py, PyAny>>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Option<Bound<'py, PyDict>>> {
    let Some(first) = first else {
        return Ok(kwargs.cloned());
    };
    let merged = match kwargs {
        Some(k) => k.copy()?,
        None => PyDict::new(first.py()),
    };
    merged.set_item(name, first)?;
    Ok(Some(merged))
}

/// A `SelfAttention` or `CrossAttention` layer.
fn forward_block<'py>(
    py: Python<'py>,
    op: &str,
    block: Arc<dyn Block>,
    x: &Bound<'py, PyAny>,
    mask: Option<&Bound<'py, PyAny>>,
    context: Option<&Bound<'py, PyAny>>,
    context_mask: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let x = Tensor::new(floats(op, "x", x, Some(3))?);
    let mask = opt_mask(op, "mask", mask)?;
    let context = opt_floats(op, "context", context, Some(3))?.map(Tensor::new);
    let context_mask = opt_mask(op, "context_mask", context_mask)?;
    let out = crate::release::run_released(py, move || {
        no_grad(|| {
            block.forward(
                &x,
                &BlockInputs {
                    mask: mask.as_ref().map(|m| m.view()),
                    pos_emb: None,
                    context: context.as_ref(),
                    context_mask: context_mask.as_ref().map(|m| m.view()),
                },
            )
        })
    })
    .or_raise()?;
    Ok(out_f32(py, out.to_array()).into_any())
}

/// `SelfAttention(dim=..., heads=8, causal=False, ...)`: `(b, n, dim)` to `(b, n, dim)`.
#[pyclass(name = "SelfAttention", module = "performer_rs", frozen)]
pub struct PySelfAttention {
    layer: Arc<SelfAttention>,
}

impl PySelfAttention {
    fn module(&self) -> &dyn Module {
        self.layer.as_ref()
    }
}

module_methods!(PySelfAttention);

#[pymethods]
impl PySelfAttention {
    #[new]
    #[pyo3(signature = (dim = None, **kwargs))]
    fn new(dim: Option<&Bound<'_, PyAny>>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let kwargs = with_first("dim", dim, kwargs)?;
        let kwargs = kwargs.as_ref();
        let config = attention_config(&to_json("SelfAttention", kwargs)?).or_raise()?;
        Ok(PySelfAttention {
            layer: Arc::new(SelfAttention::new(config).or_raise()?),
        })
    }

    /// `x` `(b, n, dim)` attending to itself; `mask` `(b, n)` True where a position is real.
    #[pyo3(signature = (x, mask = None, context = None, context_mask = None))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        mask: Option<&Bound<'py, PyAny>>,
        context: Option<&Bound<'py, PyAny>>,
        context_mask: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if context.is_some_and(|c| !c.is_none()) {
            return Err(value_error(
                "SelfAttention",
                "context",
                "is for CrossAttention (self-attention attends to x)",
            ));
        }
        let layer: Arc<dyn Block> = self.layer.clone();
        forward_block(py, "SelfAttention", layer, x, mask, None, context_mask)
    }
}

/// `CrossAttention(dim=..., heads=8, ...)`: `x` `(b, n, dim)` attending to `context`
/// `(b, nc, dim)`.
#[pyclass(name = "CrossAttention", module = "performer_rs", frozen)]
pub struct PyCrossAttention {
    layer: Arc<CrossAttention>,
}

impl PyCrossAttention {
    fn module(&self) -> &dyn Module {
        self.layer.as_ref()
    }
}

module_methods!(PyCrossAttention);

#[pymethods]
impl PyCrossAttention {
    #[new]
    #[pyo3(signature = (dim = None, **kwargs))]
    fn new(dim: Option<&Bound<'_, PyAny>>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let kwargs = with_first("dim", dim, kwargs)?;
        let kwargs = kwargs.as_ref();
        let config = attention_config(&to_json("CrossAttention", kwargs)?).or_raise()?;
        Ok(PyCrossAttention {
            layer: Arc::new(CrossAttention::new(config).or_raise()?),
        })
    }

    /// `x` `(b, n, dim)` attending to `context` `(b, nc, dim)`; `mask` `(b, n)`,
    /// `context_mask` `(b, nc)`.
    #[pyo3(signature = (x, context = None, mask = None, context_mask = None))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        context: Option<&Bound<'py, PyAny>>,
        mask: Option<&Bound<'py, PyAny>>,
        context_mask: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let layer: Arc<dyn Block> = self.layer.clone();
        forward_block(py, "CrossAttention", layer, x, mask, context, context_mask)
    }
}

/// `FastAttention(dim_heads=..., nb_features=None, causal=False, ...)`: FAVOR+ on queries,
/// keys and values with the heads split, `(b, h, n, d)`.
#[pyclass(name = "FastAttention", module = "performer_rs", frozen)]
pub struct PyFastAttention {
    attn: Arc<FastAttention>,
}

impl PyFastAttention {
    fn module(&self) -> &dyn Module {
        self.attn.as_ref()
    }
}

module_methods!(PyFastAttention);

#[pymethods]
impl PyFastAttention {
    #[new]
    #[pyo3(signature = (dim_heads = None, **kwargs))]
    fn new(
        dim_heads: Option<&Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let kwargs = with_first("dim_heads", dim_heads, kwargs)?;
        let kwargs = kwargs.as_ref();
        let config = fast_attention_config(&to_json("FastAttention", kwargs)?).or_raise()?;
        Ok(PyFastAttention {
            attn: Arc::new(FastAttention::new(config).or_raise()?),
        })
    }

    /// `(b, h, n, d)` for `q`, `k`, `v` `(b, h, n, d)`.
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        k: &Bound<'py, PyAny>,
        v: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let op = "FastAttention";
        let q = Tensor::new(floats(op, "q", q, Some(4))?);
        let k = Tensor::new(floats(op, "k", k, Some(4))?);
        let v = Tensor::new(floats(op, "v", v, Some(4))?);
        let attn = self.attn.clone();
        let out = crate::release::run_released(py, move || no_grad(|| attn.forward(&q, &k, &v)))
            .or_raise()?;
        Ok(out_f32(py, out.to_array()).into_any())
    }

    /// Draws a new projection matrix (performer-pytorch's `redraw_projection_matrix`).
    fn redraw_projection_matrix(&self, py: Python<'_>) -> PyResult<()> {
        let attn = self.attn.clone();
        py.detach(move || attn.redraw_projection_matrix())
            .or_raise()
    }
}
