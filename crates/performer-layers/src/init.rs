//! Weight initializations with PyTorch's defaults (so freshly built models train like the
//! reference's), drawn from the global seeded generator.

use ndarray::{ArrayD, IxDyn};
use performer_tensor::rng;

/// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`: what `nn.Linear` gives both its weight (kaiming
/// uniform with a = sqrt 5) and its bias.
pub fn linear_uniform(shape: &[usize], fan_in: usize) -> ArrayD<f32> {
    let bound = if fan_in > 0 {
        1.0 / (fan_in as f32).sqrt()
    } else {
        0.0
    };
    rng::uniform(shape, -bound, bound)
}

/// Standard normal (`nn.Embedding`).
pub fn normal(shape: &[usize]) -> ArrayD<f32> {
    rng::randn(shape)
}

/// Constant fill.
pub fn constant(shape: &[usize], value: f32) -> ArrayD<f32> {
    ArrayD::from_elem(IxDyn(shape), value)
}
