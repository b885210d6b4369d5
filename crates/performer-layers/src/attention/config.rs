//! The settings of an attention layer ([`AttentionConfig`]), with performer-pytorch's names
//! and defaults.

use performer_tensor::ops::Activation;

/// Settings of [`Attention`](crate::Attention), with performer-pytorch's names and defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionConfig {
    /// Model width.
    pub dim: usize,
    /// Causal attention.
    pub causal: bool,
    /// Number of heads.
    pub heads: usize,
    /// Size of each head (`None`: `dim / heads`).
    pub dim_head: Option<usize>,
    /// How many of the heads are local (windowed) instead of FAVOR+.
    pub local_heads: usize,
    /// Window of the local heads.
    pub local_window_size: usize,
    /// Random features per head (`None`: `int(d ln d)`).
    pub nb_features: Option<usize>,
    /// Redraw interval (kept here for completeness; the Performer's updater applies it).
    pub feature_redraw_interval: usize,
    /// Generalized attention instead of the softmax kernel.
    pub generalized_attention: bool,
    /// Kernel of generalized attention.
    pub kernel_fn: Activation,
    /// Dropout after the output projection (and on local attention weights).
    pub dropout: f32,
    /// No random features (see FastAttention).
    pub no_projection: bool,
    /// Biases on `to_q`, `to_k`, `to_v`.
    pub qkv_bias: bool,
    /// Bias on `to_out`.
    pub attn_out_bias: bool,
}

impl AttentionConfig {
    /// performer-pytorch's defaults for `Attention(dim)`.
    pub fn new(dim: usize) -> Self {
        AttentionConfig {
            dim,
            causal: false,
            heads: 8,
            dim_head: Some(64),
            local_heads: 0,
            local_window_size: 256,
            nb_features: None,
            feature_redraw_interval: 1000,
            generalized_attention: false,
            kernel_fn: Activation::Relu,
            dropout: 0.0,
            no_projection: false,
            qkv_bias: false,
            attn_out_bias: true,
        }
    }
}
