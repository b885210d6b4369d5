//! The fields of [`PerformerConfig`] and [`PerformerLMConfig`], one row each: performer-pytorch
//! 1.1.4's keyword argument, its type here and its default (see [`super::table`] for what the
//! rows generate).

use super::table::performer_configs;
use super::values::{KernelFn, LocalAttnHeads};

performer_configs! {
    /// performer-pytorch's `Performer(...)` keyword arguments.
    pub struct PerformerConfig;
    /// performer-pytorch's `PerformerLM(...)` keyword arguments.
    pub struct PerformerLMConfig;

    // name: type = Performer's default, PerformerLM's default;
    shared {
        /// Model width.
        [required] dim: usize = 512, 512;
        /// Number of layers.
        [required] depth: usize = 1, 6;
        /// Heads per attention layer.
        [required] heads: usize = 8, 8;
        /// Local (windowed) heads, per layer or for all layers.
        local_attn_heads: LocalAttnHeads = LocalAttnHeads::All(0), LocalAttnHeads::All(0);
        /// Window of the local heads.
        local_window_size: usize = 256, 256;
        /// Autoregressive attention.
        causal: bool = false, false;
        /// Feed-forward expansion.
        ff_mult: usize = 4, 4;
        /// Random features per head (`None`: `int(d ln d)`).
        nb_features: Option<usize> = None, None;
        /// Redraw the projections every this many training calls (`None`: never).
        feature_redraw_interval: Option<usize> = Some(1000), Some(1000);
        /// Reversible layers (memory constant in depth).
        reversible: bool = false, false;
        /// Feed-forward applied to this many sequence chunks.
        ff_chunks: usize = 1, 1;
        /// Generalized attention instead of the softmax kernel.
        generalized_attention: bool = false, false;
        /// Kernel of generalized attention.
        kernel_fn: KernelFn = KernelFn::default(), KernelFn::default();
        /// ScaleNorm instead of LayerNorm.
        use_scalenorm: bool = false, false;
        /// ReZero instead of LayerNorm.
        use_rezero: bool = false, false;
        /// GLU feed-forward.
        ff_glu: bool = false, false;
        /// Dropout in the feed-forward.
        ff_dropout: f32 = 0.0, 0.0;
        /// Dropout after attention.
        attn_dropout: f32 = 0.0, 0.0;
        /// A cross-attention layer after each self-attention layer (decoders).
        cross_attend: bool = false, false;
        /// No random features.
        no_projection: bool = false, false;
        /// Count calls and redraw projections in `forward`.
        auto_check_redraw: bool = true, true;
        /// Biases on the q/k/v projections.
        qkv_bias: bool = true, false;
        /// Bias on the attention output projection.
        attn_out_bias: bool = true, false;
        /// Token shift before attention and feed-forward.
        shift_tokens: bool = false, false;
    }

    // name: type = default, and its value in `PerformerLMConfig::performer`;
    performer_only {
        /// Size of each head (`None`: `dim / heads`).
        dim_head: Option<usize> = None, from_lm(lm) = Some(lm.dim_head);
    }

    // name: type = default;
    lm_only {
        /// Vocabulary size.
        [required] num_tokens: usize = 256;
        /// Longest sequence.
        [required] max_seq_len: usize = 1024;
        /// Size of each head.
        dim_head: usize = 64;
        /// Dropout after the embeddings.
        emb_dropout: f32 = 0.0;
        /// Logits through the token embedding's transpose.
        tie_embed: bool = false;
        /// Rotary embeddings on the FAVOR+ heads (and a fixed sinusoidal table added to tokens).
        rotary_position_emb: bool = true;
        /// Axial position embeddings (when not rotary).
        axial_position_emb: bool = false;
        /// Their shape (`None`: `(ceil(max_seq_len / 64), 64)`).
        axial_position_shape: Option<Vec<usize>> = None;
    }
}
