//! Multi-head attention with FAVOR+ global heads and windowed local heads (performer-pytorch's
//! `Attention`), and its self- and cross-attention forms.
//!
//! - in [`config`]: [`AttentionConfig`];
//! - in [`layer`]: [`Attention`] and its forward over whole sequences;
//! - in [`decode`]: decoding on tensors, the prompt and then one position at a time;
//! - in `decode_device` (feature `cuda`): decoding with the sums kept on a device;
//! - in [`decode_rows`]: the decoding step on plain rows;
//! - in [`self_and_cross`]: [`SelfAttention`] and [`CrossAttention`].

mod config;
mod decode;
#[cfg(feature = "cuda")]
mod decode_device;
mod decode_rows;
mod layer;
mod self_and_cross;

pub use config::AttentionConfig;
pub use layer::Attention;
pub use self_and_cross::{CrossAttention, SelfAttention};
