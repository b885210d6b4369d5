//! performer: the Performer transformer (FAVOR+ linear attention) in Rust; this facade
//! re-exports the workspace crates ([`tensor`], [`favor`], [`layers`], [`models`], [`dist`])
//! and puts the classes of performer-pytorch's README at the top level. The crate
//! documentation below is README.md, whose Rust snippets run as doctests.
#![doc = include_str!("../README.md")]

pub use performer_dist as dist;
pub use performer_favor as favor;
pub use performer_layers as layers;
pub use performer_models as models;
pub use performer_tensor as tensor;

pub use performer_favor::{FastAttention, FastAttentionConfig};
pub use performer_layers::{AttentionConfig, BlockInputs, CrossAttention, SelfAttention};
pub use performer_models::{
    AutoregressiveWrapper, Filter, GenerateOptions, LmInputs, Performer, PerformerConfig,
    PerformerEncDec, PerformerEncDecConfig, PerformerLM, PerformerLMConfig, SeqInputs,
    load_pretrained, save_pretrained,
};
pub use performer_tensor::{Error, Result, Tensor};
