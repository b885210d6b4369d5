//! The [`Block`] trait: a module applied to a sequence `(b, n, dim)` with the optional inputs
//! that performer-pytorch routes by keyword (`mask`, `pos_emb`, `context`, `context_mask`).

use ndarray::{Array2, ArrayView2, Axis};
use performer_favor::FastAttention;
use performer_tensor::team::Team;
use performer_tensor::{Error, Module, Result, Tensor};

use crate::state::BlockState;

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

    /// Incremental decoding: applies the block to `x` `(b, n, dim)`, the next `n` positions of
    /// sequences whose earlier positions `state` summarizes, with the same result as
    /// [`Block::forward`] over the whole prefix would give for those positions. From an empty
    /// state `n` may be anything (a prompt, in one parallel pass); afterwards positions come one
    /// at a time. `inputs.mask` covers the new positions only. Blocks that are not causal
    /// cannot decode and return an error.
    fn decode(
        &self,
        _x: &Tensor,
        _inputs: &BlockInputs<'_>,
        _state: &mut BlockState,
    ) -> Result<Tensor> {
        Err(Error::invalid(
            "decode",
            "block",
            std::any::type_name::<Self>(),
            "does not support incremental decoding",
        ))
    }

    /// Whether the block maps each position on its own, keeping no state and mixing nothing
    /// along the sequence (a feed-forward, possibly behind a norm): decoding may then skip the
    /// positions whose output nobody reads.
    fn position_wise(&self) -> bool {
        false
    }

    /// [`Block::decode`] of `x` `(b, n, dim)` that returns only the last position's output
    /// `(b, 1, dim)`, for the prompt's pass, where only the next token's logits are read. The
    /// state still takes every position. The default decodes every position and keeps the
    /// last (or, for a position-wise block, decodes the last alone).
    fn decode_last(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        let last = |t: &Tensor| -> Result<Tensor> {
            let n = t.shape().get(1).copied().unwrap_or(0);
            if t.rank() != 3 || n == 0 {
                return Err(Error::shape(
                    "decode_last",
                    format!("expected (b, n > 0, dim), got {:?}", t.shape()),
                ));
            }
            t.narrow(1, n - 1, 1)
        };
        if self.position_wise() {
            return self.decode(&last(x)?, inputs, state);
        }
        last(&self.decode(x, inputs, state)?)
    }

    /// The decoding step on plain rows: `x` `(b, dim)` holds one new position per sequence and
    /// the result is [`Block::decode`]'s for `x` as `(b, 1, dim)`, computed without the tensor
    /// machinery (no graph, no per-op allocation of tensors) and with the matrix products
    /// shared over `team`'s threads. Blocks without such a path use this default, which goes
    /// through [`Block::decode`]; a stack mixes both freely, since they keep the same state.
    fn decode_rows(
        &self,
        x: &ArrayView2<f32>,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
        _team: &Team,
    ) -> Result<Array2<f32>> {
        decode_rows_via_tensors(self, x, inputs, state)
    }
}

/// [`Block::decode_rows`] through [`Block::decode`] on a `(b, 1, dim)` tensor: the default,
/// and the fallback of blocks whose row path does not cover some input (a mask, say).
pub fn decode_rows_via_tensors<B: Block + ?Sized>(
    block: &B,
    x: &ArrayView2<f32>,
    inputs: &BlockInputs<'_>,
    state: &mut BlockState,
) -> Result<Array2<f32>> {
    rows_through_tensors(x, |t| block.decode(t, inputs, state))
}

/// Rows `x` `(b, dim)` as a `(b, 1, dim)` tensor through `f`, and its `(b, 1, d)` result back as
/// rows.
pub(crate) fn rows_through_tensors(
    x: &ArrayView2<f32>,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Array2<f32>> {
    let out = f(&Tensor::new(x.to_owned().insert_axis(Axis(1)).into_dyn()))?;
    let dims = out.shape().to_vec();
    match dims[..] {
        [b, 1, d] => Ok(out
            .data()
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order((b, d))
            .map_err(|e| Error::shape("decode_rows", e.to_string()))?),
        _ => Err(Error::shape(
            "decode_rows",
            format!("one position per sequence expected, got {dims:?}"),
        )),
    }
}

/// The number of positions a decode call may take: any from an empty state, else one.
pub(crate) fn check_decode_length(op: &str, n: usize, fresh: bool) -> Result<()> {
    if n == 0 || (!fresh && n != 1) {
        return Err(Error::invalid(
            op,
            "positions",
            n,
            "decode takes a prompt (any length) first, then one position at a time",
        ));
    }
    Ok(())
}
