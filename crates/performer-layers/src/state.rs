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

impl BlockState {
    /// Whether this state keeps its sums on a device: some attention's FAVOR+ or context sums
    /// or local heads' recent keys, or some token shift's previous position (the states of
    /// blocks run on device tensors).
    pub fn on_device(&self) -> bool {
        match self {
            BlockState::Empty | BlockState::Stateless => false,
            BlockState::Attention(a) => a.sums_on_device(),
            BlockState::Shift(s) => s.prev_device.is_some() || s.inner.on_device(),
            BlockState::Layers(layers) => layers.iter().flatten().any(BlockState::on_device),
        }
    }
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
    /// The FAVOR+ heads' running sums on a device (a layer on device tensors).
    #[cfg(feature = "cuda")]
    pub(crate) favor_device: Option<performer_favor::DeviceCausalState>,
    /// The context's sums on a device.
    #[cfg(feature = "cuda")]
    pub(crate) context_device: Option<performer_favor::DeviceContextState>,
    /// The local heads' recent keys and values on a device.
    #[cfg(feature = "cuda")]
    pub(crate) local_device: Option<crate::local_attention_device::DeviceLocalCache>,
}

impl AttentionState {
    /// Positions seen.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Whether the attention sums (FAVOR+ heads, context, local heads' recent keys) live on a
    /// device.
    pub fn sums_on_device(&self) -> bool {
        #[cfg(feature = "cuda")]
        if self.favor_device.is_some()
            || self.context_device.is_some()
            || self.local_device.is_some()
        {
            return true;
        }
        false
    }
}

/// What token shift remembers while decoding.
#[derive(Default)]
pub struct ShiftState {
    /// The previous position's input `(b, dim)`.
    pub(crate) prev: Option<ndarray::Array2<f32>>,
    /// The previous position's input `(b, 1, dim)` where the block runs on a device.
    pub(crate) prev_device: Option<performer_tensor::Tensor>,
    /// Whether the previous position was a real token, per sequence (None: no mask given).
    pub(crate) prev_keep: Option<Vec<bool>>,
    /// The wrapped block's state.
    pub(crate) inner: BlockState,
}
