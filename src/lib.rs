//! performer: the Performer transformer (FAVOR+ linear attention, arXiv 2009.14794) in Rust,
//! feature for feature with performer-pytorch 1.1.4.
//!
//! This facade re-exports the workspace crates, so one dependency gives the whole library:
//! - [`tensor`]: tensors, autograd, ops, modules, optimizers, safetensors IO;
//! - [`favor`]: FAVOR+ random features and linear attention;
//! - [`layers`]: attention blocks, local attention, position embeddings, reversible stacks;
//! - [`models`]: Performer, PerformerLM, PerformerEncDec, AutoregressiveWrapper, checkpoints.
//!
//! The classes of performer-pytorch's README are at the top level.

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
