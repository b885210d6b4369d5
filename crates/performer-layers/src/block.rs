//! The [`Block`] trait: a module applied to a sequence `(b, n, dim)` with the optional inputs
//! that performer-pytorch routes by keyword (`mask`, `pos_emb`, `context`, `context_mask`).

use ndarray::ArrayView2;
use performer_favor::FastAttention;
use performer_tensor::{Module, Result, Tensor};

/// The keyword inputs a block may receive. Sequences route them as the reference does: mask
/// and position embedding to the attention of every layer, context and its mask to the
/// cross-attention layers, nothing to the feed-forwards.
#[derive(Clone, Copy, Default)]
pub struct BlockInputs<'a> {
    /// Key padding mask `(b, n)`, true where a token is real.
    pub mask: Option<ArrayView2<'a, bool>>,
    /// Rotary table for the FAVOR+ heads, `(1, n, dim_head)`.
    pub pos_emb: Option<&'a Tensor>,
    /// The sequence cross-attention attends to, `(b, nc, dim)`.
    pub context: Option<&'a Tensor>,
    /// Padding mask of the context `(b, nc)`.
    pub context_mask: Option<ArrayView2<'a, bool>>,
}

impl<'a> BlockInputs<'a> {
    /// No inputs.
    pub fn none() -> Self {
        Self::default()
    }
}

/// A layer of a Performer stack.
pub trait Block: Module {
    /// Applies the block to `x` `(b, n, dim)`.
    fn forward(&self, x: &Tensor, inputs: &BlockInputs<'_>) -> Result<Tensor>;

    /// Shows every FastAttention inside (for projection redraws).
    fn for_each_fast_attention(&self, _f: &mut dyn FnMut(&FastAttention)) {}
}
