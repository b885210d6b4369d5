//! The two forms a stack uses: [`SelfAttention`] (no context) and [`CrossAttention`] (a
//! context, no local heads), each a [`Block`].

use ndarray::{Array2, ArrayView2};
use performer_favor::FastAttention;
use performer_tensor::team::Team;
use performer_tensor::{Error, Module, Result, Tensor, Visitor};

use super::config::AttentionConfig;
use super::layer::Attention;
use crate::block::{Block, BlockInputs};
use crate::state::BlockState;

/// SelfAttention's check: no context.
fn refuse_context(inputs: &BlockInputs<'_>) -> Result<()> {
    if inputs.context.is_some() {
        return Err(Error::invalid(
            "SelfAttention",
            "context",
            "given",
            "self attention should not receive context",
        ));
    }
    Ok(())
}

/// CrossAttention's check: a context.
fn require_context(inputs: &BlockInputs<'_>) -> Result<()> {
    if inputs.context.is_none() {
        return Err(Error::invalid(
            "CrossAttention",
            "context",
            "None",
            "cross attention should receive context",
        ));
    }
    Ok(())
}

/// Self-attention: an [`Attention`] that refuses a context.
pub struct SelfAttention(pub Attention);

impl SelfAttention {
    /// Builds the layer.
    pub fn new(config: AttentionConfig) -> Result<Self> {
        Ok(SelfAttention(Attention::new(config)?))
    }
}

impl Module for SelfAttention {
    fn visit(&self, v: &mut Visitor<'_>) {
        self.0.visit(v)
    }
}

impl Block for SelfAttention {
    fn forward(&self, x: &Tensor, inputs: &BlockInputs<'_>) -> Result<Tensor> {
        refuse_context(inputs)?;
        self.0.forward(x, inputs)
    }

    fn for_each_fast_attention(&self, f: &mut dyn FnMut(&FastAttention)) {
        f(&self.0.fast_attention)
    }

    fn decode(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        refuse_context(inputs)?;
        self.0.decode(x, inputs, state)
    }

    fn decode_rows(
        &self,
        x: &ArrayView2<f32>,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
        team: &Team,
    ) -> Result<Array2<f32>> {
        refuse_context(inputs)?;
        self.0.decode_rows(x, inputs, state, team)
    }

    fn decode_last(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        refuse_context(inputs)?;
        self.0.decode_last(x, inputs, state)
    }
}

/// Cross-attention: an [`Attention`] that requires a context and has no local heads.
pub struct CrossAttention(pub Attention);

impl CrossAttention {
    /// Builds the layer; local heads are refused.
    pub fn new(config: AttentionConfig) -> Result<Self> {
        if config.local_heads > 0 {
            return Err(Error::invalid(
                "CrossAttention",
                "local_heads",
                config.local_heads,
                "local attention is not compatible with cross attention",
            ));
        }
        Ok(CrossAttention(Attention::new(config)?))
    }
}

impl Module for CrossAttention {
    fn visit(&self, v: &mut Visitor<'_>) {
        self.0.visit(v)
    }
}

impl Block for CrossAttention {
    fn forward(&self, x: &Tensor, inputs: &BlockInputs<'_>) -> Result<Tensor> {
        require_context(inputs)?;
        self.0.forward(x, inputs)
    }

    fn for_each_fast_attention(&self, f: &mut dyn FnMut(&FastAttention)) {
        f(&self.0.fast_attention)
    }

    fn decode(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        require_context(inputs)?;
        self.0.decode(x, inputs, state)
    }

    fn decode_rows(
        &self,
        x: &ArrayView2<f32>,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
        team: &Team,
    ) -> Result<Array2<f32>> {
        require_context(inputs)?;
        self.0.decode_rows(x, inputs, state, team)
    }

    fn decode_last(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        require_context(inputs)?;
        self.0.decode_last(x, inputs, state)
    }
}
