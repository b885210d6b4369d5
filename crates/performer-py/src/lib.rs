//! performer-py: the Python package `performer_rs` (its native part, `performer_rs._native`).
//!
//! performer-pytorch's classes and keyword arguments over performer-models: `PerformerLM`,
//! `Performer`, `PerformerEncDec`, `SelfAttention`, `CrossAttention`, `FastAttention`,
//! `AutoregressiveWrapper` and a `Trainer` that runs whole training steps in Rust. Inputs are
//! anything numpy reads (numpy arrays, CPU torch tensors), outputs are numpy arrays, the GIL is
//! released while Rust computes, and every Rust error is a Python exception with the Rust
//! message. Built by maturin (`crates/performer-py/pyproject.toml`); the Python half of the
//! package (torch interop, type stubs) is in `python/performer_rs`.

mod arrays;
mod attention;
mod errors;
mod generate;
mod kwargs;
mod loss;
mod models;
mod products;
mod state;
mod trainer;
mod wrapper;

use pyo3::prelude::*;

/// Runs `f` with the GIL released, on one of rayon's threads
/// (`performer_tensor::team::on_pool`, which carries this thread's generator, gradient mode,
/// autocast and bf16 products' mode over): from the Python thread itself every parallel op
/// would hand its loop to the pool and sleep, and the cores would run three threads. Measured
/// on the 2-core Zen 4, the main job's model (dim 128, depth 3, batch 4 x 256), alternating
/// processes (means of 100 and 50 calls): `loss = wrapper(x); loss.backward()` 47.5 / 47.8 /
/// 46.7 ms -> 44.3 / 43.4 / 45.2 ms, `lm(x)` 13.8 / 15.4 / 14.8 ms -> 14.1 / 13.6 / 13.3 ms.
/// (`Trainer.step` and `generate` already ran on the pool.)
pub(crate) fn run_released<R: Send>(py: Python<'_>, f: impl FnOnce() -> R + Send) -> R {
    py.detach(|| performer_tensor::team::on_pool(f))
}

/// The extension module `performer_rs._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<models::PyPerformerLM>()?;
    m.add_class::<models::PyPerformer>()?;
    m.add_class::<models::PyPerformerEncDec>()?;
    m.add_class::<attention::PySelfAttention>()?;
    m.add_class::<attention::PyCrossAttention>()?;
    m.add_class::<attention::PyFastAttention>()?;
    m.add_class::<wrapper::PyAutoregressiveWrapper>()?;
    m.add_class::<trainer::PyTrainer>()?;
    m.add_class::<loss::Loss>()?;
    m.add_function(wrap_pyfunction!(products::set_bf16_products, m)?)?;
    m.add_function(wrap_pyfunction!(products::bf16_products, m)?)?;
    Ok(())
}
