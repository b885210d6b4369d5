//! One residual layer of a stack ([`Layer`]: attention-like branch `f`, feed-forward branch
//! `g`) and how its `f` is routed ([`Route`]); shared by the host stacks (`sequence.rs`) and the
//! reversible stack on device tensors (`reversible_device.rs`), which would otherwise import
//! each other.

use std::sync::Arc;

use crate::block::{Block, BlockInputs};

/// Whether a layer's attention branch attends to the context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Self-attention: receives `mask` and `pos_emb`.
    SelfAttention,
    /// Cross-attention: receives `mask`, `pos_emb`, `context` and `context_mask`.
    CrossAttention,
}

/// One residual layer: attention-like branch `f` and feed-forward branch `g`.
#[derive(Clone)]
pub struct Layer {
    /// The attention branch.
    pub f: Arc<dyn Block>,
    /// The feed-forward branch.
    pub g: Arc<dyn Block>,
    /// What `f` receives.
    pub route: Route,
}

impl Layer {
    pub(crate) fn f_inputs<'a>(&self, inputs: &BlockInputs<'a>) -> BlockInputs<'a> {
        match self.route {
            Route::SelfAttention => BlockInputs {
                mask: inputs.mask,
                pos_emb: inputs.pos_emb,
                context: None,
                context_mask: None,
            },
            Route::CrossAttention => *inputs,
        }
    }
}
