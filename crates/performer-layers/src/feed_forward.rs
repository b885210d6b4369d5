//! The feed-forward block (GELU or GLU) and Chunk, which applies a block to pieces of the
//! sequence and recomputes each piece in the backward, so the block's activations never exist
//! for the whole sequence at once.

use std::sync::Arc;

use ndarray::{Array2, ArrayD, ArrayView2};
use performer_tensor::ops::Activation;
use performer_tensor::rng::{self, RngState};
use performer_tensor::team::Team;
use performer_tensor::{
    CustomOp, Data, Error, Module, Param, Result, Tensor, Visitor, apply_custom_op, enable_grad,
    no_grad,
};

use crate::block::{Block, BlockInputs};
use crate::dropout::Dropout;
use crate::linear::Linear;
use crate::state::BlockState;

/// `w2(dropout(act(w1 x)))`, or with GLU `w2(dropout(act(a) * b))` where `[a | b] = w1 x`.
pub struct FeedForward {
    /// `dim -> dim * mult` (twice that with GLU).
    pub w1: Linear,
    /// `dim * mult -> dim`.
    pub w2: Linear,
    /// GELU by default.
    pub activation: Activation,
    /// After the activation.
    pub dropout: Dropout,
    /// Gated variant.
    pub glu: bool,
}

impl FeedForward {
    /// performer-pytorch's `FeedForward(dim, mult, dropout, glu)` with GELU.
    pub fn new(dim: usize, mult: usize, dropout: f32, glu: bool) -> Self {
        let hidden = dim * mult;
        FeedForward {
            w1: Linear::new(dim, hidden * if glu { 2 } else { 1 }, true),
            w2: Linear::new(hidden, dim, true),
            activation: Activation::Gelu,
            dropout: Dropout::new(dropout),
            glu,
        }
    }
}

impl Module for FeedForward {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.child("w1", &self.w1);
        v.child("dropout", &self.dropout);
        v.child("w2", &self.w2);
    }
}

impl Block for FeedForward {
    fn forward(&self, x: &Tensor, _inputs: &BlockInputs<'_>) -> Result<Tensor> {
        let h = self.w1.forward(x)?;
        let h = if self.glu {
            let parts = h.chunk(2, -1)?;
            self.activation.apply(&parts[0]).mul(&parts[1])?
        } else {
            self.activation.apply(&h)
        };
        self.w2.forward(&self.dropout.forward(&h)?)
    }

    fn decode(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        *state = BlockState::Stateless;
        self.forward(x, inputs)
    }

    fn position_wise(&self) -> bool {
        true
    }

    fn decode_rows(
        &self,
        x: &ArrayView2<f32>,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
        team: &Team,
    ) -> Result<Array2<f32>> {
        if self.dropout.is_training() && self.dropout.p > 0.0 {
            return crate::block::decode_rows_via_tensors(self, x, inputs, state);
        }
        *state = BlockState::Stateless;
        // Both products and the activation in one phase of the team (see `fused_step`).
        crate::fused_step::FeedForwardParts {
            w1: &self.w1,
            w2: &self.w2,
            activation: self.activation,
            glu: self.glu,
        }
        .step(x, team)
    }
}

/// performer-pytorch's `Chunk(chunks, fn, along_dim = 1)`: the sequence is cut as
/// `torch.chunk` cuts it, the block runs on each piece, the results are concatenated. With more
/// than one chunk the block is checkpointed per piece: the forward keeps only the input and
/// the dropout generator's state per piece, the backward recomputes one piece at a time.
/// The wrapped block receives no keyword inputs (it is always a feed-forward in the reference).
pub struct Chunk {
    /// Number of pieces.
    pub chunks: usize,
    /// The wrapped block, named `fn`.
    pub inner: Arc<dyn Block>,
}

impl Chunk {
    /// Wraps `inner`; `chunks` must be positive.
    pub fn new(chunks: usize, inner: Arc<dyn Block>) -> Result<Self> {
        if chunks == 0 {
            return Err(Error::invalid("Chunk", "ff_chunks", 0, "must be positive"));
        }
        Ok(Chunk { chunks, inner })
    }
}

impl Module for Chunk {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.child("fn", self.inner.as_ref());
    }
}

impl Block for Chunk {
    fn forward(&self, x: &Tensor, inputs: &BlockInputs<'_>) -> Result<Tensor> {
        if self.chunks == 1 {
            return self.inner.forward(x, inputs);
        }
        if x.rank() < 2 {
            return Err(Error::shape(
                "Chunk",
                format!("input must be (b, n, ...), got {:?}", x.shape()),
            ));
        }
        // Device tensors: the pieces through the device's ops and autograd, without the
        // host op's recomputation (every piece's activations are kept, as with one chunk).
        if !x.device().is_cpu() {
            let outs = x
                .chunk(self.chunks, 1)?
                .iter()
                .map(|piece| self.inner.forward(piece, &BlockInputs::none()))
                .collect::<Result<Vec<_>>>()?;
            return Tensor::cat(&outs, 1);
        }
        let params = self.inner.parameters();
        let mut op_inputs = vec![x.clone()];
        op_inputs.extend(params.iter().map(Param::tensor));
        let refs: Vec<&Tensor> = op_inputs.iter().collect();
        let op = CheckpointedChunks {
            inner: self.inner.clone(),
            chunks: self.chunks,
            params,
        };
        Ok(apply_custom_op(op, &refs)?.remove(0))
    }

    fn decode(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        // Pieces of a sequence only matter for memory in training; decoding is position-wise here.
        self.inner.decode(x, inputs, state)
    }

    fn position_wise(&self) -> bool {
        self.inner.position_wise()
    }

    fn decode_last(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        self.inner.decode_last(x, inputs, state)
    }

    fn decode_rows(
        &self,
        x: &ArrayView2<f32>,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
        team: &Team,
    ) -> Result<Array2<f32>> {
        self.inner.decode_rows(x, inputs, state, team)
    }
}

struct CheckpointedChunks {
    inner: Arc<dyn Block>,
    chunks: usize,
    params: Vec<Param>,
}

impl CheckpointedChunks {
    fn pieces(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        x.chunk(self.chunks, 1)
    }
}

impl CustomOp for CheckpointedChunks {
    /// The generator's state before each piece.
    type Saved = Vec<RngState>;

    fn name(&self) -> &'static str {
        "Chunk"
    }

    fn forward(&self, inputs: &[&Data], _save: bool) -> Result<(Vec<ArrayD<f32>>, Vec<RngState>)> {
        let x = Tensor::new(inputs[0].clone());
        let mut states = Vec::new();
        let mut outs = Vec::new();
        no_grad(|| -> Result<()> {
            for piece in self.pieces(&x)? {
                states.push(rng::get_state());
                outs.push(self.inner.forward(&piece, &BlockInputs::none())?);
            }
            Ok(())
        })?;
        Ok((vec![Tensor::cat(&outs, 1)?.to_array()], states))
    }

    fn backward(
        &self,
        inputs: &[Data],
        states: &Vec<RngState>,
        grads: &[Option<ArrayD<f32>>],
        needs: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let Some(g) = &grads[0] else {
            return Ok(vec![None; inputs.len()]);
        };
        let x = Tensor::new(inputs[0].clone());
        let g = Tensor::new(g.clone());
        let resume = rng::get_state();
        let mut dx_parts = Vec::new();
        let mut dparams: Vec<Option<ArrayD<f32>>> = vec![None; self.params.len()];
        for ((piece, gp), state) in self
            .pieces(&x)?
            .into_iter()
            .zip(self.pieces(&g)?)
            .zip(states)
        {
            rng::set_state(*state);
            let xv = Tensor::var(piece.to_array());
            let grads = enable_grad(|| self.inner.forward(&xv, &BlockInputs::none()))?
                .backward_with_grad(gp.to_array())?;
            dx_parts.push(Tensor::new(
                grads
                    .get(&xv)
                    .cloned()
                    .unwrap_or_else(|| ArrayD::zeros(xv.data().raw_dim())),
            ));
            for (slot, p) in dparams.iter_mut().zip(&self.params) {
                if let Some(dp) = grads.get_param(p) {
                    match slot {
                        Some(acc) => *acc += dp,
                        None => *slot = Some(dp.clone()),
                    }
                }
            }
        }
        rng::set_state(resume);
        let mut out = vec![
            needs[0]
                .then(|| Tensor::cat(&dx_parts, 1).map(|t| t.to_array()))
                .transpose()?,
        ];
        out.extend(dparams);
        Ok(out)
    }
}
