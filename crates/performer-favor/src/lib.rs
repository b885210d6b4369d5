//! performer-favor: FAVOR+ (Fast Attention Via positive Orthogonal Random features), exactly as
//! performer-pytorch 1.1.4 computes it.
//!
//! - [`gaussian_orthogonal_random_matrix`]: the random projection (QR through faer, or a system
//!   LAPACK with the `lapack` feature);
//! - [`softmax_kernel`], [`generalized_kernel`]: the feature maps;
//! - [`linear_attention`], [`causal_linear_attention`]: attention on features, as fused ops
//!   with analytic backward, chunked so that no `(n, m, d)` tensor is ever built;
//! - [`favor_attention`]: feature maps and attention fused; the backward reuses the forward's
//!   features and causal states while they fit [`SAVE_BUDGET_BYTES`] and recomputes them
//!   block by block past it;
//! - [`FastAttention`] and [`ProjectionUpdater`]: the modules.
//!
//! ```
//! use performer_favor::{FastAttention, FastAttentionConfig};
//! use performer_tensor::Tensor;
//! # fn main() -> performer_tensor::Result<()> {
//! let attn = FastAttention::new(FastAttentionConfig { nb_features: Some(32), ..FastAttentionConfig::new(16) })?;
//! let (q, k, v) = (Tensor::randn(&[1, 2, 50, 16]), Tensor::randn(&[1, 2, 50, 16]), Tensor::randn(&[1, 2, 50, 16]));
//! let out = attn.forward(&q, &k, &v)?;
//! assert_eq!(out.shape(), &[1, 2, 50, 16]);
//! # Ok(())
//! # }
//! ```

mod column_blocks;
#[cfg(feature = "cuda")]
mod cuda;
mod decoding;
#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
mod device_decoding;
mod fast_attention;
mod feature;
pub mod heads;
mod linear_math;
mod ops;
mod projection;
mod simd;

pub use decoding::{CausalState, ContextState, StateStep};
#[cfg(feature = "cuda")]
pub use device_decoding::{DeviceCausalState, DeviceContextState};
pub use fast_attention::{
    AttentionDevice, FastAttention, FastAttentionConfig, ProjectionUpdater, default_nb_features,
};
pub use feature::{FeatureMap, GENERALIZED_FEATURE_EPS, SOFTMAX_FEATURE_EPS};
pub use ops::{
    CAUSAL_EPS, DEFAULT_CHUNK, SAVE_BUDGET_BYTES, causal_linear_attention, favor_attention,
    generalized_kernel, linear_attention, linear_attention_chunked, softmax_kernel,
};
pub use projection::{
    OrthoScaling, gaussian_orthogonal_random_matrix, gaussian_orthogonal_random_matrix_with,
};
