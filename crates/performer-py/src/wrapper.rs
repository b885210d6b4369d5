//! `AutoregressiveWrapper(net, ignore_index=0, pad_value=0)`: the next-token loss and
//! generation around a `PerformerLM`, sharing its weights (as a PyTorch wrapper holds its net).

use std::sync::Arc;

use performer_models::{AutoregressiveWrapper, SeqInputs};
use performer_tensor::Tensor;
use performer_tensor::no_grad;
use pyo3::prelude::*;

use crate::arrays::{opt_floats, opt_mask, out_tokens, start_tokens, tokens};
use crate::errors::OrRaise;
use crate::generate::SamplingArgs;
use crate::loss::Loss;
use crate::models::PyPerformerLM;

/// A causal `PerformerLM` with performer-pytorch's loss (`wrapper(x)`) and `generate`.
#[pyclass(name = "AutoregressiveWrapper", module = "performer_rs", frozen)]
pub struct PyAutoregressiveWrapper {
    net: Py<PyPerformerLM>,
    /// The Rust wrapper around the same model.
    pub inner: Arc<AutoregressiveWrapper>,
}

impl PyAutoregressiveWrapper {
    fn module(&self) -> &dyn performer_tensor::Module {
        self.inner.as_ref()
    }

    /// Where the loss's gradients go: the wrapped model's store.
    pub fn sink(&self, py: Python<'_>) -> crate::loss::GradientSink {
        self.net.bind(py).get().grads.clone()
    }
}

crate::state::module_methods!(PyAutoregressiveWrapper);

#[pymethods]
impl PyAutoregressiveWrapper {
    #[new]
    #[pyo3(signature = (net, ignore_index = 0, pad_value = 0))]
    fn new(net: Bound<'_, PyPerformerLM>, ignore_index: i64, pad_value: i64) -> Self {
        let inner = AutoregressiveWrapper {
            net: net.get().lm.clone(),
            ignore_index,
            pad_value,
        };
        PyAutoregressiveWrapper {
            net: net.unbind(),
            inner: Arc::new(inner),
        }
    }

    /// The wrapped model.
    #[getter]
    fn net(&self, py: Python<'_>) -> Py<PyPerformerLM> {
        self.net.clone_ref(py)
    }

    /// `ignore_index`.
    #[getter]
    fn ignore_index(&self) -> i64 {
        self.inner.ignore_index
    }

    /// `pad_value`.
    #[getter]
    fn pad_value(&self) -> i64 {
        self.inner.pad_value
    }

    /// `max_seq_len` of the model.
    #[getter]
    fn max_seq_len(&self) -> usize {
        self.inner.net.config().max_seq_len
    }

    /// Mean cross-entropy of predicting `x[:, 1:]` from `x[:, :-1]` (a mask of `x`'s full
    /// length is cut to `n - 1`, as performer-pytorch does): a `Loss`.
    #[pyo3(signature = (x, mask = None, context = None, context_mask = None))]
    fn forward(
        &self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        mask: Option<&Bound<'_, PyAny>>,
        context: Option<&Bound<'_, PyAny>>,
        context_mask: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Loss> {
        let op = "AutoregressiveWrapper";
        let x = tokens(op, "x", x)?;
        let mask = opt_mask(op, "mask", mask)?;
        let context = opt_floats(op, "context", context, Some(3))?.map(Tensor::new);
        let context_mask = opt_mask(op, "context_mask", context_mask)?;
        let inner = self.inner.clone();
        let loss = crate::release::run_released(py, move || {
            inner.loss(
                &x.view(),
                &SeqInputs {
                    mask: mask.as_ref().map(|m| m.view()),
                    context: context.as_ref(),
                    context_mask: context_mask.as_ref().map(|m| m.view()),
                },
            )
        })
        .or_raise()?;
        Ok(Loss::new(loss, self.inner.net.as_ref(), self.sink(py)))
    }

    /// Same as `forward`: `loss = wrapper(x)`.
    #[pyo3(signature = (x, mask = None, context = None, context_mask = None))]
    fn __call__(
        &self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        mask: Option<&Bound<'_, PyAny>>,
        context: Option<&Bound<'_, PyAny>>,
        context_mask: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Loss> {
        self.forward(py, x, mask, context, context_mask)
    }

    /// Up to `seq_len` tokens after `start_tokens` `(b, t)` or `(t,)`, with
    /// performer-pytorch's arguments. A causal model decodes each token in constant time from
    /// a state (the prompt in one pass) instead of re-running the prefix.
    #[pyo3(signature = (start_tokens, seq_len, eos_token = None, temperature = 1.0,
        filter_logits_fn = None, filter_thres = 0.9, repetition_penalty = 1.0,
        repetition_penalty_ctx = 32, mask = None, context = None, context_mask = None,
        seed = None))]
    #[allow(clippy::too_many_arguments)] // performer-pytorch's keyword arguments
    fn generate<'py>(
        &self,
        py: Python<'py>,
        start_tokens: &Bound<'py, PyAny>,
        seq_len: usize,
        eos_token: Option<i64>,
        temperature: f64,
        filter_logits_fn: Option<&Bound<'py, PyAny>>,
        filter_thres: f64,
        repetition_penalty: f64,
        repetition_penalty_ctx: usize,
        mask: Option<&Bound<'py, PyAny>>,
        context: Option<&Bound<'py, PyAny>>,
        context_mask: Option<&Bound<'py, PyAny>>,
        seed: Option<u64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let op = "AutoregressiveWrapper.generate";
        let opts = SamplingArgs {
            eos_token,
            temperature,
            filter_logits_fn,
            filter_thres,
            repetition_penalty,
            repetition_penalty_ctx,
            seed,
        }
        .options(op)?;
        let (start, squeeze) = start_tokens_of(op, start_tokens)?;
        let mask = opt_mask(op, "mask", mask)?;
        let context = opt_floats(op, "context", context, Some(3))?.map(Tensor::new);
        let context_mask = opt_mask(op, "context_mask", context_mask)?;
        let inner = self.inner.clone();
        let out = crate::release::run_released(py, move || {
            no_grad(|| {
                inner.generate(
                    &start.view(),
                    seq_len,
                    &opts,
                    &SeqInputs {
                        mask: mask.as_ref().map(|m| m.view()),
                        context: context.as_ref(),
                        context_mask: context_mask.as_ref().map(|m| m.view()),
                    },
                )
            })
        })
        .or_raise()?;
        Ok(out_tokens(py, out, squeeze))
    }
}

/// The `start_tokens` argument (the parameter's name shadows the reader's).
fn start_tokens_of(op: &str, obj: &Bound<'_, PyAny>) -> PyResult<(ndarray::Array2<i64>, bool)> {
    start_tokens(op, "start_tokens", obj)
}
