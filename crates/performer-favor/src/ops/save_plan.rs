//! What an attention forward keeps for its backward, planned against [`SAVE_BUDGET_BYTES`].

use crate::column_blocks::Blocks;
use crate::linear_math::CausalStates;

/// Bytes of context (features, causal chunk states) that one attention call may keep for its
/// backward, over all heads; above this the backward recomputes features block by block and
/// causal states from one checkpoint per segment of chunks. At the benchmark's n = 4096
/// everything is kept; at n = 65536 features and most states are recomputed.
pub const SAVE_BUDGET_BYTES: usize = 512 << 20;

/// Positions per segment of the causal backward when states are checkpointed (rounded to
/// whole chunks): the segment's features are recomputed once and its states rebuilt.
const SEGMENT: usize = 256;

/// Positions per block of non-causal attention (its results do not depend on a chunk).
const NONCAUSAL_BLOCK: usize = 256;

/// Feature block width: the chunk for causal attention.
pub(super) fn block_width(causal: bool, chunk: usize) -> usize {
    if causal { chunk } else { NONCAUSAL_BLOCK }
}

/// What a forward keeps for its backward.
#[derive(Clone, Copy, Debug)]
pub(super) struct SavePlan {
    pub(super) save: bool,
    /// Keep the transposed features (fused op only).
    pub(super) features: bool,
    /// Causal: chunks between saved states (1, or a segment's worth).
    pub(super) state_every: usize,
    /// Causal: keep each chunk's masked score block.
    pub(super) scores: bool,
}

/// What an attention call asks of the planner: its sizes, whether the backward will run at
/// all, and how many bytes it may keep.
#[derive(Clone, Copy, Debug)]
pub(super) struct SaveRequest {
    /// The forward records a graph (else nothing is kept).
    pub(super) save: bool,
    /// Causal attention (states and score blocks exist only then).
    pub(super) causal: bool,
    /// Heads (every leading axis together).
    pub(super) heads: usize,
    /// Query positions.
    pub(super) n: usize,
    /// Key positions.
    pub(super) nk: usize,
    /// Features per position.
    pub(super) m: usize,
    /// Value width.
    pub(super) e: usize,
    /// Positions per causal chunk.
    pub(super) chunk: usize,
    /// The op computes the features itself, so keeping them is an option (fused op only).
    pub(super) with_features: bool,
    /// Bytes that may be kept over all heads ([`SAVE_BUDGET_BYTES`] outside tests).
    pub(super) budget: usize,
}

impl SaveRequest {
    /// In order of work saved per byte kept: the causal score blocks (m / 2 FLOPs per byte),
    /// the features (d / 2), then a state for every chunk rather than one per segment (about
    /// C d / 2 (d + 1)); one state per segment is always kept.
    pub(super) fn plan(self) -> SavePlan {
        let SaveRequest {
            save,
            causal,
            heads,
            n,
            nk,
            m,
            e,
            chunk,
            with_features,
            budget,
        } = self;
        let w = block_width(causal, chunk);
        let chunks = n.div_ceil(chunk);
        let segment = SEGMENT.div_ceil(chunk).max(1);
        let states = |every| {
            if causal {
                heads * CausalStates::state_bytes(chunks, m, e, every)
            } else {
                0
            }
        };
        let mut used = states(segment);
        let score_bytes = heads * CausalStates::score_bytes(chunks, chunk);
        let scores = save && causal && used + score_bytes <= budget;
        if scores {
            used += score_bytes;
        }
        let feature_bytes = heads * (Blocks::bytes(m, n, w) + Blocks::bytes(m, nk, w));
        let features = save && with_features && used + feature_bytes <= budget;
        if features {
            used += feature_bytes;
        }
        let state_every = if used - states(segment) + states(1) <= budget {
            1
        } else {
            segment
        };
        SavePlan {
            save,
            features,
            state_every,
            scores,
        }
    }
}
