//! FAVOR+ as differentiable ops on tensors of shape `(..., n, d)` (usually `(b, h, n, d)`):
//! the feature maps on their own, linear attention on given features (non-causal and causal),
//! and the fused op that FastAttention runs. Heads run in parallel (rayon), each on transposed
//! features in column blocks ([`Blocks`]). What the forward keeps for the backward (features,
//! causal states and score blocks) is planned against [`SAVE_BUDGET_BYTES`]; past it the
//! backward recomputes features block by block and causal states from one checkpoint per
//! segment, so memory in flight stays O(n d) per head beyond the saved context.
//!
//! - in [`arguments`]: the chunk, the causal epsilon, shape checks;
//! - in [`feature_maps`]: [`softmax_kernel`], [`generalized_kernel`];
//! - in [`save_plan`]: what a forward keeps for its backward;
//! - in [`head_attention`]: one head's attention forward and backward on transposed features;
//! - in [`linear_attention`](mod@linear_attention): attention on given features;
//! - in [`favor_attention`](mod@favor_attention): feature maps and attention fused.

mod arguments;
mod favor_attention;
mod feature_maps;
mod head_attention;
mod linear_attention;
mod save_plan;

pub use arguments::{CAUSAL_EPS, DEFAULT_CHUNK};
pub use favor_attention::favor_attention;
pub(crate) use favor_attention::favor_causal_primed;
pub use feature_maps::{generalized_kernel, softmax_kernel};
pub use linear_attention::{causal_linear_attention, linear_attention, linear_attention_chunked};
pub use save_plan::SAVE_BUDGET_BYTES;
