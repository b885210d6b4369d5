//! `generate(...)`'s keyword arguments, performer-pytorch's names, as [`GenerateOptions`].

use performer_models::{Filter, GenerateOptions};
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::errors::{type_error, value_error};

/// The sampling arguments of performer-pytorch's `AutoregressiveWrapper.generate`, plus
/// `seed` (None: a fresh one per call, as `torch.multinomial` draws from the global RNG).
pub struct SamplingArgs<'a, 'py> {
    /// A token id that ends a sequence.
    pub eos_token: Option<i64>,
    /// Softmax temperature.
    pub temperature: f64,
    /// `top_k` (None: the default, as performer-pytorch's) or `top_p`: the functions of this
    /// package or of performer-pytorch, or their names. `top_k` with `filter_thres=0` keeps
    /// every token.
    pub filter_logits_fn: Option<&'a Bound<'py, PyAny>>,
    /// The filter's threshold.
    pub filter_thres: f64,
    /// Above 1, penalizes recently generated tokens.
    pub repetition_penalty: f64,
    /// How many recent tokens the penalty looks at.
    pub repetition_penalty_ctx: usize,
    /// Seed of the sampler.
    pub seed: Option<u64>,
}

/// The filter named by `filter_logits_fn`: a string, or a function whose `__name__` is
/// `top_k` or `top_p`; None is `top_k`.
fn filter(op: &str, f: Option<&Bound<'_, PyAny>>, thres: f64) -> PyResult<Filter> {
    let Some(f) = f.filter(|f| !f.is_none()) else {
        return Ok(Filter::TopK { thres });
    };
    let name: String = if f.is_instance_of::<PyString>() {
        f.extract()?
    } else if f.hasattr("__name__")? {
        f.getattr("__name__")?.extract()?
    } else {
        return Err(type_error(
            op,
            "filter_logits_fn",
            "must be top_k, top_p, their names or None",
        ));
    };
    match name.as_str() {
        "top_k" => Ok(Filter::TopK { thres }),
        "top_p" => Ok(Filter::TopP { thres }),
        other => Err(value_error(
            op,
            "filter_logits_fn",
            format!("{other:?} is not a filter this package runs in Rust (top_k or top_p)"),
        )),
    }
}

impl SamplingArgs<'_, '_> {
    /// As [`GenerateOptions`] (checked there).
    pub fn options(&self, op: &str) -> PyResult<GenerateOptions> {
        let seed = self.seed.unwrap_or_else(|| {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        });
        Ok(GenerateOptions {
            temperature: self.temperature as f32,
            filter: filter(op, self.filter_logits_fn, self.filter_thres)?,
            eos_token: self.eos_token,
            repetition_penalty: self.repetition_penalty as f32,
            repetition_penalty_ctx: self.repetition_penalty_ctx,
            seed,
        })
    }
}
