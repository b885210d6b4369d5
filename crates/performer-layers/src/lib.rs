//! performer-layers: every building block that performer-pytorch 1.1.4 puts into a Performer,
//! each usable on its own.
//!
//! - [`Linear`], [`Embedding`], [`LayerNorm`], [`Dropout`];
//! - [`PreLayerNorm`], [`PreScaleNorm`], [`ReZero`], [`PreShiftTokens`];
//! - [`FeedForward`] and [`Chunk`];
//! - [`FixedPositionalEmbedding`], [`apply_rotary_pos_emb`], [`AbsolutePositionalEmbedding`],
//!   [`AxialPositionalEmbedding`];
//! - [`LocalAttention`]; [`Attention`], [`SelfAttention`], [`CrossAttention`];
//! - [`SequentialSequence`] and [`ReversibleSequence`] with argument routing.
//!
//! Blocks of a stack implement [`Block`]: `forward(x, inputs)` with the keyword inputs
//! (`mask`, `pos_emb`, `context`, `context_mask`) the reference routes to them.

mod attention;
mod block;
mod dropout;
mod embedding;
mod feed_forward;
mod fused_step;
pub mod init;
mod layer;
mod layer_norm;
mod linear;
mod local_attention;
#[cfg(feature = "cuda")]
mod local_attention_device;
mod position;
#[cfg(feature = "cuda")]
mod reversible_device;
mod scale_norm;
mod sequence;
mod state;
mod token_shift;
mod wrappers;

pub use attention::{Attention, AttentionConfig, CrossAttention, SelfAttention};
pub use block::{Block, BlockInputs, decode_rows_via_tensors};
pub use dropout::Dropout;
pub use embedding::Embedding;
pub use feed_forward::{Chunk, FeedForward};
pub use layer::{Layer, Route};
pub use layer_norm::LayerNorm;
pub use linear::{Linear, linear_rows};
pub use local_attention::{LocalAttention, LocalCache};
pub use position::{
    AbsolutePositionalEmbedding, AxialPositionalEmbedding, FixedPositionalEmbedding, apply_rotary,
    apply_rotary_pos_emb, rotate_every_two, rotate_rows,
};
pub use sequence::{ReversibleSequence, SequentialSequence};
pub use state::{AttentionState, BlockState, ShiftState};
pub use wrappers::{PreLayerNorm, PreScaleNorm, PreShiftTokens, ReZero};
