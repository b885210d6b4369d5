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
mod release;
mod state;
mod trainer;
mod wrapper;

use pyo3::prelude::*;

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
