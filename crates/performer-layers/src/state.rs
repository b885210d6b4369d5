//! What blocks remember of earlier positions while decoding: [`BlockState`], and the states of
//! attention ([`AttentionState`]) and token shift ([`ShiftState`]). The states live apart from
//! their blocks so that the [`Block`](crate::Block) trait, the attention layers and the
//! wrappers all import them, and none of those imports another back.

use performer_favor::{CausalState, ContextState};

use crate::local_attention::LocalCache;

/// What a block remembers of earlier positions while decoding (see
/// [`Block::decode`](crate::Block::decode)). Every state starts [`BlockState::Empty`] and takes its
/// shape the first time its block decodes.
#[derive(Default)]
pub enum BlockState {
    /// Nothing seen yet.
    #[default]
    Empty,
    /// A position-wise block: nothing to remember.
    Stateless,
    /// Attention: running FAVOR+ sums, the local heads' recent keys, the context sums.
    Attention(Box<AttentionState>),
    /// Token shift: the previous position's features, and the wrapped block's state.
    Shift(Box<ShiftState>),
    /// A stack: the states of each layer's two branches.
    Layers(Vec<[BlockState; 2]>),
}

/// What an attention layer remembers while decoding.
#[derive(Default)]
pub struct AttentionState {
    /// Positions seen.
    pub(crate) pos: usize,
    /// Running sums of the FAVOR+ heads (causal self-attention).
    pub(crate) favor: Option<CausalState>,
    /// Sums over the context (cross-attention), computed on the first call.
    pub(crate) context: Option<ContextState>,
    /// Recent keys and values of the local heads.
    pub(crate) local: Option<LocalCache>,
}

impl AttentionState {
    /// Positions seen.
    pub fn position(&self) -> usize {
        self.pos
    }
}

/// What token shift remembers while decoding.
#[derive(Default)]
pub struct ShiftState {
    /// The previous position's input `(b, dim)`.
    pub(crate) prev: Option<ndarray::Array2<f32>>,
    /// Whether the previous position was a real token, per sequence (None: no mask given).
    pub(crate) prev_keep: Option<Vec<bool>>,
    /// The wrapped block's state.
    pub(crate) inner: BlockState,
}
