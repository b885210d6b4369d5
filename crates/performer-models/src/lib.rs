//! performer-models: the public face of performer-rs — `Performer`, `PerformerLM`,
//! `PerformerEncDec` and `AutoregressiveWrapper` with performer-pytorch 1.1.4's knobs and
//! defaults, checkpoints that move between PyTorch and Rust, and the parity runner.
//!
//! ```
//! use performer_models::{PerformerLM, PerformerLMConfig, LmInputs};
//! # fn main() -> performer_tensor::Result<()> {
//! let model = PerformerLM::new(PerformerLMConfig {
//!     num_tokens: 100, max_seq_len: 64, dim: 32, depth: 2, heads: 4, dim_head: 8, causal: true,
//!     ..Default::default()
//! })?;
//! let x = ndarray::Array2::<i64>::zeros((1, 16));
//! let logits = model.forward(&x.view(), &LmInputs::default())?;
//! assert_eq!(logits.shape(), &[1, 16, 100]);
//! # Ok(())
//! # }
//! ```

mod autoregressive;
pub mod checkpoint;
mod config;
mod enc_dec;
mod finite;
pub mod fuzzing;
mod lm;
mod mode;
pub mod parity;
mod performer;
mod presets;
pub mod sampling;

pub use autoregressive::{AutoregressiveWrapper, SeqInputs};
pub use checkpoint::{AnyModel, ModelConfig, load_pretrained, save_pretrained};
pub use config::{
    KernelFn, LocalAttnHeads, PerformerConfig, PerformerEncDecConfig, PerformerLMConfig,
};
pub use enc_dec::PerformerEncDec;
pub use finite::{check_finite_step, non_finite_gradients, non_finite_parameters};
pub use lm::{DecodingState, LmInputs, PerformerLM, PositionEmbedding};
pub use mode::is_training;
pub use performer::Performer;
pub use presets::AttentionPreset;
pub use sampling::{Filter, GenerateOptions};
