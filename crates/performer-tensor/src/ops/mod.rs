//! The differentiable ops, one file per family, each forward next to its backward.
//!
//! Every op is a method on [`crate::Tensor`] returning `Result<Tensor>`; errors name the op
//! and the shapes.

mod activation;
mod arrays;
mod broadcast;
mod dropout;
mod elementwise;
mod index;
mod layer_norm;
mod layout;
mod loss;
mod matmul;
mod reduce;
mod softmax;

pub use activation::Activation;
pub(crate) use arrays::to_standard;
pub use layer_norm::layer_norm_row;
pub use matmul::batched_matmul;
