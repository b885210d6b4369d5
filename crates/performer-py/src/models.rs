//! `PerformerLM`, `Performer` and `PerformerEncDec`: performer-models' models behind
//! performer-pytorch's constructors (keyword arguments read by
//! [`ModelConfig::from_kwargs`]), forwards on numpy arrays with the GIL released, and
//! checkpoints in the layout of `save_pretrained`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use performer_models::checkpoint::load_pretrained;
use performer_models::{
    AnyModel, LmInputs, ModelConfig, Performer, PerformerEncDec, PerformerLM, save_pretrained,
};
use performer_tensor::no_grad;
use performer_tensor::{Module, Tensor};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::{floats, opt_floats, opt_mask, out_f32, out_tokens, start_tokens, tokens};
use crate::errors::{OrRaise, value_error};
use crate::generate::SamplingArgs;
use crate::kwargs::to_json;
use crate::loss::{GradientSink, Loss, gradients};
use crate::state::module_methods;

/// The configuration `class(**kwargs)` describes.
fn config(class: &str, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<ModelConfig> {
    ModelConfig::from_kwargs(class, &to_json(class, kwargs)?).or_raise()
}

/// A config's keyword arguments as a Python dict (the `kwargs` of its JSON form).
fn kwargs_dict<'py>(py: Python<'py>, config: &ModelConfig) -> PyResult<Bound<'py, PyAny>> {
    let text = config.to_json()["kwargs"].to_string();
    py.import("json")?.call_method1("loads", (text,))
}

/// The model saved in `dir` by `save_pretrained`, which must be of class `class`.
fn load_dir(class: &str, dir: &Path) -> PyResult<AnyModel> {
    let (_, model) = load_pretrained(dir).or_raise()?;
    let found = match &model {
        AnyModel::Performer(_) => "Performer",
        AnyModel::PerformerLM(_) => "PerformerLM",
        AnyModel::PerformerEncDec(_) => "PerformerEncDec",
    };
    if found != class {
        return Err(value_error(
            &format!("{class}.from_pretrained"),
            "path",
            format!("{} holds a {found}, not a {class}", dir.display()),
        ));
    }
    Ok(model)
}

/// `PerformerLM(num_tokens=..., max_seq_len=..., dim=..., depth=..., heads=..., ...)`.
#[pyclass(name = "PerformerLM", module = "performer_rs", frozen)]
pub struct PyPerformerLM {
    config: ModelConfig,
    /// The model, shared with the `AutoregressiveWrapper`s around it.
    pub lm: Arc<PerformerLM>,
    /// Where `Loss.backward()` puts the gradients.
    pub grads: GradientSink,
}

impl PyPerformerLM {
    fn module(&self) -> &dyn Module {
        self.lm.as_ref()
    }

    fn from_model(config: ModelConfig, lm: PerformerLM) -> Self {
        PyPerformerLM {
            config,
            lm: Arc::new(lm),
            grads: GradientSink::default(),
        }
    }
}

module_methods!(PyPerformerLM);

#[pymethods]
impl PyPerformerLM {
    #[new]
    #[pyo3(signature = (**kwargs))]
    fn new(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let config = config("PerformerLM", kwargs)?;
        let AnyModel::PerformerLM(lm) = AnyModel::build(&config).or_raise()? else {
            unreachable!("a PerformerLM config builds a PerformerLM")
        };
        Ok(Self::from_model(config, lm))
    }

    /// Logits `(b, n, num_tokens)` for token ids `x` `(b, n)`, or the final hidden states
    /// `(b, n, dim)` with `return_encodings=True`. `mask` `(b, n)` is True where a token is
    /// real; `context` `(b, nc, dim)` and `context_mask` feed cross-attention
    /// (`cross_attend=True`).
    #[pyo3(signature = (x, mask = None, return_encodings = false, context = None, context_mask = None))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        mask: Option<&Bound<'py, PyAny>>,
        return_encodings: bool,
        context: Option<&Bound<'py, PyAny>>,
        context_mask: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let op = "PerformerLM";
        let x = tokens(op, "x", x)?;
        let mask = opt_mask(op, "mask", mask)?;
        let context = opt_floats(op, "context", context, Some(3))?.map(Tensor::new);
        let context_mask = opt_mask(op, "context_mask", context_mask)?;
        let lm = self.lm.clone();
        let out = crate::release::run_released(py, move || {
            no_grad(|| {
                lm.forward(
                    &x.view(),
                    &LmInputs {
                        mask: mask.as_ref().map(|m| m.view()),
                        context: context.as_ref(),
                        context_mask: context_mask.as_ref().map(|m| m.view()),
                        return_encodings,
                    },
                )
            })
        })
        .or_raise()?;
        Ok(out_f32(py, out.to_array()).into_any())
    }

    /// Same as [`PyPerformerLM::forward`]: `model(x, mask=mask)`.
    #[pyo3(signature = (x, mask = None, return_encodings = false, context = None, context_mask = None))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        mask: Option<&Bound<'py, PyAny>>,
        return_encodings: bool,
        context: Option<&Bound<'py, PyAny>>,
        context_mask: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.forward(py, x, mask, return_encodings, context, context_mask)
    }

    /// Stops the projection redraws: the model outputs deterministically from now on.
    fn fix_projection_matrices_(&self) {
        self.lm.fix_projection_matrices();
    }

    /// Stores the weight matrices (token embedding, every Linear) as `dtype`: `"bfloat16"`
    /// (`"bf16"`, `torch.bfloat16`) for inference at half the bytes per weight, with f32
    /// activations and sums (on a CPU with AVX-512 BF16 each activation is rounded to bf16 as
    /// it enters a product with a weight: `performer_tensor::bf16_gemm`), or `"float32"` back
    /// (exact). Optimizers refuse a bfloat16 model (`ValueError`). Returns the model, as
    /// `torch.nn.Module.to` does.
    fn to_dtype<'py>(
        slf: Bound<'py, Self>,
        dtype: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, Self>> {
        let text = dtype.str()?.to_string();
        let name = text.strip_prefix("torch.").unwrap_or(&text);
        let parsed: performer_tensor::DType = name.parse().or_raise()?;
        slf.get().lm.to_dtype(parsed);
        Ok(slf)
    }

    /// How the weight matrices are stored: `"float32"` or `"bfloat16"`.
    #[getter]
    fn dtype(&self) -> &'static str {
        self.lm.dtype().name()
    }

    /// The constructor's keyword arguments (every knob, defaults filled in).
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        kwargs_dict(py, &self.config)
    }

    /// `max_seq_len`, as performer-pytorch's attribute.
    #[getter]
    fn max_seq_len(&self) -> usize {
        self.lm.config().max_seq_len
    }

    /// `num_tokens`.
    #[getter]
    fn num_tokens(&self) -> usize {
        self.lm.config().num_tokens
    }

    /// The gradients of the last `Loss.backward()` of a loss of this model, by parameter name.
    fn gradients<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        gradients(py, &self.grads)
    }

    /// Writes `config.json` (class and keyword arguments) and `model.safetensors` (the state
    /// dict, aliases included) into `path`, each atomically.
    fn save_pretrained(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| save_pretrained(&path, self.lm.as_ref(), &self.config))
            .or_raise()
    }

    /// The model `save_pretrained` wrote into `path`.
    #[staticmethod]
    fn from_pretrained(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let model = py.detach(|| load_dir("PerformerLM", &path))?;
        let AnyModel::PerformerLM(lm) = model else {
            unreachable!("load_dir checked the class")
        };
        Ok(Self::from_model(
            ModelConfig::PerformerLM(lm.config().clone()),
            lm,
        ))
    }
}

/// `Performer(dim=..., depth=..., heads=..., causal=..., ...)`: the layer stack on float
/// inputs `(b, n, dim)`.
#[pyclass(name = "Performer", module = "performer_rs", frozen)]
pub struct PyPerformer {
    config: ModelConfig,
    model: Arc<Performer>,
}

impl PyPerformer {
    fn module(&self) -> &dyn Module {
        self.model.as_ref()
    }
}

module_methods!(PyPerformer);

#[pymethods]
impl PyPerformer {
    #[new]
    #[pyo3(signature = (**kwargs))]
    fn new(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let config = config("Performer", kwargs)?;
        let AnyModel::Performer(model) = AnyModel::build(&config).or_raise()? else {
            unreachable!("a Performer config builds a Performer")
        };
        Ok(PyPerformer {
            config,
            model: Arc::new(model),
        })
    }

    /// `(b, n, dim)` for `x` `(b, n, dim)`; `mask` `(b, n)`, `context` `(b, nc, dim)` and
    /// `context_mask` `(b, nc)` as in performer-pytorch.
    #[pyo3(signature = (x, mask = None, context = None, context_mask = None))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        mask: Option<&Bound<'py, PyAny>>,
        context: Option<&Bound<'py, PyAny>>,
        context_mask: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let op = "Performer";
        let x = Tensor::new(floats(op, "x", x, Some(3))?);
        let mask = opt_mask(op, "mask", mask)?;
        let context = opt_floats(op, "context", context, Some(3))?.map(Tensor::new);
        let context_mask = opt_mask(op, "context_mask", context_mask)?;
        let model = self.model.clone();
        let out = crate::release::run_released(py, move || {
            no_grad(|| {
                model.forward(
                    &x,
                    mask.as_ref().map(|m| m.view()),
                    None,
                    context.as_ref(),
                    context_mask.as_ref().map(|m| m.view()),
                )
            })
        })
        .or_raise()?;
        Ok(out_f32(py, out.to_array()).into_any())
    }

    /// Same as `forward`.
    #[pyo3(signature = (x, mask = None, context = None, context_mask = None))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        mask: Option<&Bound<'py, PyAny>>,
        context: Option<&Bound<'py, PyAny>>,
        context_mask: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.forward(py, x, mask, context, context_mask)
    }

    /// Stops the projection redraws.
    fn fix_projection_matrices_(&self) {
        self.model.fix_projection_matrices();
    }

    /// The constructor's keyword arguments.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        kwargs_dict(py, &self.config)
    }

    /// Writes `config.json` and `model.safetensors` into `path`.
    fn save_pretrained(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| save_pretrained(&path, self.model.as_ref(), &self.config))
            .or_raise()
    }

    /// The model `save_pretrained` wrote into `path`.
    #[staticmethod]
    fn from_pretrained(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let model = py.detach(|| load_dir("Performer", &path))?;
        let AnyModel::Performer(model) = model else {
            unreachable!("load_dir checked the class")
        };
        Ok(PyPerformer {
            config: ModelConfig::Performer(model.config().clone()),
            model: Arc::new(model),
        })
    }
}

/// `PerformerEncDec(dim=..., enc_num_tokens=..., dec_num_tokens=..., ...)`: `enc_` and `dec_`
/// prefixes as in performer-pytorch.
#[pyclass(name = "PerformerEncDec", module = "performer_rs", frozen)]
pub struct PyPerformerEncDec {
    config: ModelConfig,
    /// The model, shared with trainers.
    pub model: Arc<PerformerEncDec>,
    grads: GradientSink,
}

impl PyPerformerEncDec {
    fn module(&self) -> &dyn Module {
        self.model.as_ref()
    }

    fn from_model(config: ModelConfig, model: PerformerEncDec) -> Self {
        PyPerformerEncDec {
            config,
            model: Arc::new(model),
            grads: GradientSink::default(),
        }
    }
}

module_methods!(PyPerformerEncDec);

#[pymethods]
impl PyPerformerEncDec {
    #[new]
    #[pyo3(signature = (**kwargs))]
    fn new(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let config = config("PerformerEncDec", kwargs)?;
        let AnyModel::PerformerEncDec(model) = AnyModel::build(&config).or_raise()? else {
            unreachable!("a PerformerEncDec config builds a PerformerEncDec")
        };
        Ok(Self::from_model(config, model))
    }

    /// The decoder's next-token loss on `y` given the source `x`: a `Loss` (`float(loss)`,
    /// `loss.backward()`).
    #[pyo3(signature = (x, y, enc_mask = None, dec_mask = None))]
    fn forward(
        &self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        y: &Bound<'_, PyAny>,
        enc_mask: Option<&Bound<'_, PyAny>>,
        dec_mask: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Loss> {
        let op = "PerformerEncDec";
        let x = tokens(op, "x", x)?;
        let y = tokens(op, "y", y)?;
        let enc_mask = opt_mask(op, "enc_mask", enc_mask)?;
        let dec_mask = opt_mask(op, "dec_mask", dec_mask)?;
        let model = self.model.clone();
        let loss = crate::release::run_released(py, move || {
            model.loss(
                &x.view(),
                &y.view(),
                enc_mask.as_ref().map(|m| m.view()),
                dec_mask.as_ref().map(|m| m.view()),
            )
        })
        .or_raise()?;
        Ok(Loss::new(loss, self.model.as_ref(), self.grads.clone()))
    }

    /// Same as `forward`.
    #[pyo3(signature = (x, y, enc_mask = None, dec_mask = None))]
    fn __call__(
        &self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        y: &Bound<'_, PyAny>,
        enc_mask: Option<&Bound<'_, PyAny>>,
        dec_mask: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Loss> {
        self.forward(py, x, y, enc_mask, dec_mask)
    }

    /// Up to `seq_len` target tokens after `seq_out_start` for the source `seq_in`, with
    /// `AutoregressiveWrapper.generate`'s sampling arguments.
    #[pyo3(signature = (seq_in, seq_out_start, seq_len, enc_mask = None, eos_token = None,
        temperature = 1.0, filter_logits_fn = None, filter_thres = 0.9, repetition_penalty = 1.0,
        repetition_penalty_ctx = 32, seed = None))]
    #[allow(clippy::too_many_arguments)] // performer-pytorch's keyword arguments
    fn generate<'py>(
        &self,
        py: Python<'py>,
        seq_in: &Bound<'py, PyAny>,
        seq_out_start: &Bound<'py, PyAny>,
        seq_len: usize,
        enc_mask: Option<&Bound<'py, PyAny>>,
        eos_token: Option<i64>,
        temperature: f64,
        filter_logits_fn: Option<&Bound<'py, PyAny>>,
        filter_thres: f64,
        repetition_penalty: f64,
        repetition_penalty_ctx: usize,
        seed: Option<u64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let op = "PerformerEncDec.generate";
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
        let src = tokens(op, "seq_in", seq_in)?;
        let (start, squeeze) = start_tokens(op, "seq_out_start", seq_out_start)?;
        let enc_mask = opt_mask(op, "enc_mask", enc_mask)?;
        let model = self.model.clone();
        let out = crate::release::run_released(py, move || {
            no_grad(|| {
                model.generate(
                    &src.view(),
                    &start.view(),
                    seq_len,
                    enc_mask.as_ref().map(|m| m.view()),
                    &opts,
                )
            })
        })
        .or_raise()?;
        Ok(out_tokens(py, out, squeeze))
    }

    /// Stops the projection redraws of the encoder and the decoder.
    fn fix_projection_matrices_(&self) {
        self.model.enc.fix_projection_matrices();
        self.model.dec.net.fix_projection_matrices();
    }

    /// The constructor's keyword arguments (`enc_`/`dec_` prefixed).
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        kwargs_dict(py, &self.config)
    }

    /// The gradients of the last `Loss.backward()`, by parameter name.
    fn gradients<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        gradients(py, &self.grads)
    }

    /// Writes `config.json` and `model.safetensors` into `path`.
    fn save_pretrained(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| save_pretrained(&path, self.model.as_ref(), &self.config))
            .or_raise()
    }

    /// The model `save_pretrained` wrote into `path`.
    #[staticmethod]
    fn from_pretrained(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let model = py.detach(|| load_dir("PerformerEncDec", &path))?;
        let AnyModel::PerformerEncDec(model) = model else {
            unreachable!("load_dir checked the class")
        };
        Ok(Self::from_model(
            ModelConfig::PerformerEncDec(model.config().clone()),
            model,
        ))
    }
}
