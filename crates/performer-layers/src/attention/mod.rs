//! Multi-head attention with FAVOR+ global heads and windowed local heads (performer-pytorch's
//! `Attention`), and its self- and cross-attention forms.
//!
//! - [`config`]: [`AttentionConfig`];
//! - [`layer`]: [`Attention`] and its forward over whole sequences;
//! - [`decode`]: decoding on tensors, the prompt and then one position at a time;
//! - [`decode_rows`]: the decoding step on plain rows;
//! - [`self_and_cross`]: [`SelfAttention`] and [`CrossAttention`].

mod config;
mod decode;
mod decode_rows;
mod layer;
mod self_and_cross;

pub use config::AttentionConfig;
pub use layer::Attention;
pub use self_and_cross::{CrossAttention, SelfAttention};
