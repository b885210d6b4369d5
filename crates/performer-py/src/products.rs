//! How products read bfloat16 weights, from Python: `performer_rs.set_bf16_products(mode)` and
//! `performer_rs.bf16_products()` (`performer_tensor::bf16_gemm::Bf16Products`, a per-thread
//! mode: it applies to the calls made from the Python thread that set it).

use performer_tensor::bf16_gemm::{self, Bf16Products};
use pyo3::prelude::*;

/// The mode's name in Python.
fn name(mode: Bf16Products) -> &'static str {
    match mode {
        Bf16Products::Native => "native",
        Bf16Products::Widened => "widened",
    }
}

/// Sets how a bfloat16 model's products run for calls from this Python thread, and returns
/// the previous mode: `"native"` (the default: on a CPU with AVX-512 BF16 its bf16 dot
/// products, each activation rounded to bf16 as it enters a product with a weight; elsewhere
/// the same as `"widened"`) or `"widened"` (every weight widened to float32: exactly what a
/// float32 model with the same rounded weights computes). Any other name raises ValueError.
#[pyfunction]
pub fn set_bf16_products(mode: &str) -> PyResult<&'static str> {
    let parsed = match mode {
        "native" => Bf16Products::Native,
        "widened" => Bf16Products::Widened,
        other => {
            return Err(crate::errors::value_error(
                "set_bf16_products",
                "mode",
                format!("must be \"native\" or \"widened\", got {other:?}"),
            ));
        }
    };
    Ok(name(bf16_gemm::set_bf16_products(parsed)))
}

/// This Python thread's mode for bfloat16 products: `"native"` or `"widened"`.
#[pyfunction]
pub fn bf16_products() -> &'static str {
    name(bf16_gemm::bf16_products())
}
