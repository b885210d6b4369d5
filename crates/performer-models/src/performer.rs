//! `Performer`: a stack of FAVOR+ attention and feed-forward layers (performer-pytorch's class
//! of the same name), with its projection-redraw bookkeeping.

use std::sync::{Arc, Mutex};

use ndarray::ArrayView2;
use performer_favor::{FastAttention, ProjectionUpdater};
use performer_layers::{
    AttentionConfig, Block, BlockInputs, BlockState, Chunk, CrossAttention, FeedForward, Layer,
    PreLayerNorm, PreScaleNorm, PreShiftTokens, ReZero, ReversibleSequence, Route, SelfAttention,
    SequentialSequence,
};
use performer_tensor::rng::Generator;
use performer_tensor::{Error, Module, Result, Tensor, Visitor};

use crate::config::PerformerConfig;

/// The layer stack, sequential or reversible.
enum Net {
    Sequential(SequentialSequence),
    Reversible(ReversibleSequence),
}

impl Net {
    fn block(&self) -> &dyn Block {
        match self {
            Net::Sequential(s) => s,
            Net::Reversible(r) => r,
        }
    }
}

/// A Performer: `depth` layers of (self-attention, feed-forward), each followed by a
/// (cross-attention, feed-forward) layer when `cross_attend`.
pub struct Performer {
    config: PerformerConfig,
    net: Net,
    /// Redraw bookkeeping (`proj_updater.calls_since_last_redraw`).
    pub proj_updater: ProjectionUpdater,
    /// Where redraws draw from instead of the global generator, when set
    /// ([`Performer::set_redraw_generator`]).
    redraw_rng: Mutex<Option<Generator>>,
}

impl Performer {
    /// Builds the stack from a validated configuration.
    pub fn new(config: PerformerConfig) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let dim_head = c.resolved_dim_head();
        let local = c.local_attn_heads.per_layer(c.depth, c.heads)?;
        let wrap = |inner: Arc<dyn Block>| -> Arc<dyn Block> {
            if c.use_scalenorm {
                Arc::new(PreScaleNorm::new(inner))
            } else if c.use_rezero {
                Arc::new(ReZero::new(inner))
            } else {
                Arc::new(PreLayerNorm::new(c.dim, inner))
            }
        };
        let attention = |local_heads: usize, causal: bool| AttentionConfig {
            causal,
            heads: c.heads,
            dim_head: Some(dim_head),
            local_heads,
            local_window_size: c.local_window_size,
            nb_features: c.nb_features,
            generalized_attention: c.generalized_attention,
            kernel_fn: c.kernel_fn.0,
            dropout: c.attn_dropout,
            no_projection: c.no_projection,
            qkv_bias: c.qkv_bias,
            attn_out_bias: c.attn_out_bias,
            ..AttentionConfig::new(c.dim)
        };
        let feed_forward = || -> Result<Arc<dyn Block>> {
            Ok(Arc::new(Chunk::new(
                c.ff_chunks,
                Arc::new(FeedForward::new(c.dim, c.ff_mult, c.ff_dropout, c.ff_glu)),
            )?))
        };
        let mut layers = Vec::new();
        for &local_heads in &local {
            let mut attn: Arc<dyn Block> =
                Arc::new(SelfAttention::new(attention(local_heads, c.causal))?);
            let mut ff = feed_forward()?;
            if c.shift_tokens {
                let shifts = if c.causal { vec![0, 1] } else { vec![-1, 0, 1] };
                attn = Arc::new(PreShiftTokens::new(shifts.clone(), attn));
                ff = Arc::new(PreShiftTokens::new(shifts, ff));
            }
            layers.push(Layer {
                f: wrap(attn),
                g: wrap(ff),
                route: Route::SelfAttention,
            });
            if c.cross_attend {
                // The reference builds cross-attention without `causal` (it attends to a whole context).
                let cross: Arc<dyn Block> = Arc::new(CrossAttention::new(attention(0, false))?);
                layers.push(Layer {
                    f: wrap(cross),
                    g: wrap(feed_forward()?),
                    route: Route::CrossAttention,
                });
            }
        }
        let net = if c.reversible {
            Net::Reversible(ReversibleSequence { layers })
        } else {
            Net::Sequential(SequentialSequence { layers })
        };
        let proj_updater = ProjectionUpdater::new(c.feature_redraw_interval);
        Ok(Performer {
            config,
            net,
            proj_updater,
            redraw_rng: Mutex::new(None),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PerformerConfig {
        &self.config
    }

    /// Calls `f` on every FastAttention of the stack.
    pub fn for_each_fast_attention(&self, f: &mut dyn FnMut(&FastAttention)) {
        self.net.block().for_each_fast_attention(f)
    }

    /// Runs every FAVOR+ attention of the stack on CUDA device `ordinal` (facade feature
    /// `cuda`; see `FastAttention::use_cuda` for what runs there): the model stays on the host
    /// and its attention's inputs and outputs are copied to and from the device. An error, with
    /// every layer back on the CPU, where the feature is off or the device cannot be used.
    pub fn use_cuda(&self, ordinal: usize) -> Result<()> {
        self.use_device(performer_favor::AttentionDevice::Cuda(ordinal))
    }

    /// [`Performer::use_cuda`] on a GPU or on performer-cuda's emulated device.
    pub fn use_device(&self, device: performer_favor::AttentionDevice) -> Result<()> {
        let result = self.try_each_fast_attention(|fa| fa.use_device(device));
        if result.is_err() {
            self.use_cpu();
        }
        result
    }

    /// Every FAVOR+ attention of the stack back on the CPU.
    pub fn use_cpu(&self) {
        self.for_each_fast_attention(&mut |fa| fa.use_cpu());
    }

    /// Redraws every projection now, from the generator set by
    /// [`Performer::set_redraw_generator`] if any, else from the global one.
    pub fn redraw_projections_now(&self) -> Result<()> {
        let mut own = self.redraw_rng.lock().unwrap_or_else(|e| e.into_inner());
        match own.as_mut() {
            Some(rng) => self.try_each_fast_attention(|fa| fa.redraw_projection_matrix_with(rng)),
            None => self.try_each_fast_attention(FastAttention::redraw_projection_matrix),
        }
    }

    /// Makes redraws draw from `rng` (advancing it) instead of the global generator, or from
    /// the global one again with `None` (the default, performer-pytorch's behavior).
    /// Data-parallel training sets, before every step, a generator seeded from a seed shared
    /// by all ranks and the step, so that every rank redraws the same projections while the
    /// global generator keeps each rank's own dropout stream.
    pub fn set_redraw_generator(&self, rng: Option<Generator>) {
        *self.redraw_rng.lock().unwrap_or_else(|e| e.into_inner()) = rng;
    }

    /// Calls `f` on every FastAttention of the stack until the first error, which it returns.
    fn try_each_fast_attention(
        &self,
        mut f: impl FnMut(&FastAttention) -> Result<()>,
    ) -> Result<()> {
        let mut result = Ok(());
        self.for_each_fast_attention(&mut |fa| {
            if result.is_ok() {
                result = f(fa);
            }
        });
        result
    }

    /// Counts one training call and redraws the projections when due (the reference's
    /// `redraw_projections`; `forward` does this itself when `auto_check_redraw`).
    pub fn check_redraw_projections(&self) -> Result<()> {
        self.proj_updater
            .redraw_projections(|| self.redraw_projections_now())
    }

    /// Stops redrawing: the projections stay fixed from now on (`fix_projection_matrices_`).
    pub fn fix_projection_matrices(&self) {
        self.proj_updater.fix_projections();
    }

    /// Applies the stack to `x` `(b, n, dim)`. `pos_emb` is the rotary table of the FAVOR+
    /// heads; `mask` `(b, n)`; `context` `(b, nc, dim)` and `context_mask` `(b, nc)` for
    /// cross-attention.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: Option<ArrayView2<'_, bool>>,
        pos_emb: Option<&Tensor>,
        context: Option<&Tensor>,
        context_mask: Option<ArrayView2<'_, bool>>,
    ) -> Result<Tensor> {
        self.check_inputs(x, mask, pos_emb, context, context_mask)?;
        if self.config.auto_check_redraw {
            self.check_redraw_projections()?;
        }
        self.net.block().forward(
            x,
            &BlockInputs {
                mask,
                pos_emb,
                context,
                context_mask,
            },
        )
    }
}

impl Performer {
    /// Checks the shapes of `forward`'s inputs; errors name the argument, its shape and the
    /// shape it must have.
    pub fn check_inputs(
        &self,
        x: &Tensor,
        mask: Option<ArrayView2<'_, bool>>,
        pos_emb: Option<&Tensor>,
        context: Option<&Tensor>,
        context_mask: Option<ArrayView2<'_, bool>>,
    ) -> Result<()> {
        let dim = self.config.dim;
        if x.rank() != 3 || x.shape()[2] != dim {
            return Err(Error::shape(
                "Performer",
                format!("x {:?} must be (b, n, dim = {dim})", x.shape()),
            ));
        }
        let (b, n) = (x.shape()[0], x.shape()[1]);
        if b == 0 || n == 0 {
            return Err(Error::invalid(
                "Performer",
                "x",
                format!("shape {:?}", x.shape()),
                "needs at least one sequence of one position",
            ));
        }
        if let Some(m) = mask
            && m.dim() != (b, n)
        {
            return Err(Error::shape(
                "Performer",
                format!("mask {:?} must be (b, n) = ({b}, {n})", m.shape()),
            ));
        }
        let dh = self.config.resolved_dim_head();
        if let Some(p) = pos_emb
            && p.shape() != [1, n, dh]
        {
            return Err(Error::shape(
                "Performer",
                format!(
                    "pos_emb {:?} must be (1, n, dim_head) = (1, {n}, {dh})",
                    p.shape()
                ),
            ));
        }
        match (self.config.cross_attend, context) {
            (true, None) => {
                return Err(Error::invalid(
                    "Performer",
                    "context",
                    "None",
                    "cross_attend needs a context",
                ));
            }
            (false, Some(_)) => {
                return Err(Error::invalid(
                    "Performer",
                    "context",
                    "given",
                    "the stack has no cross-attention (cross_attend = false)",
                ));
            }
            _ => {}
        }
        if let Some(ctx) = context {
            if ctx.rank() != 3 || ctx.shape()[0] != b || ctx.shape()[2] != dim {
                return Err(Error::shape(
                    "Performer",
                    format!(
                        "context {:?} must be (b = {b}, nc, dim = {dim})",
                        ctx.shape()
                    ),
                ));
            }
            let nc = ctx.shape()[1];
            if nc == 0 {
                return Err(Error::invalid(
                    "Performer",
                    "context",
                    format!("shape {:?}", ctx.shape()),
                    "needs at least one position to attend to",
                ));
            }
            if let Some(cm) = context_mask
                && cm.dim() != (b, nc)
            {
                return Err(Error::shape(
                    "Performer",
                    format!(
                        "context_mask {:?} must be (b, nc) = ({b}, {nc})",
                        cm.shape()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Incremental decoding of the stack (see `Block::decode`); no redraw bookkeeping.
    pub fn decode(
        &self,
        x: &Tensor,
        mask: Option<ArrayView2<'_, bool>>,
        pos_emb: Option<&Tensor>,
        context: Option<&Tensor>,
        context_mask: Option<ArrayView2<'_, bool>>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        self.net.block().decode(
            x,
            &BlockInputs {
                mask,
                pos_emb,
                context,
                context_mask,
            },
            state,
        )
    }

    /// [`Performer::decode`] returning only the last position's output `(b, 1, dim)` (see
    /// `Block::decode_last`): the prompt's pass, which needs no output but the last.
    pub fn decode_last(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        self.net.block().decode_last(x, inputs, state)
    }

    /// The decoding step on plain rows `x` `(b, dim)`, one position per sequence (see
    /// `Block::decode_rows`), with the products shared over `team`.
    pub fn decode_rows(
        &self,
        x: &ndarray::ArrayView2<f32>,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
        team: &performer_tensor::team::Team,
    ) -> Result<ndarray::Array2<f32>> {
        self.net.block().decode_rows(x, inputs, state, team)
    }
}

impl Module for Performer {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.child("net", self.net.block());
        v.child("proj_updater", &self.proj_updater);
    }
}

impl Block for Performer {
    fn forward(&self, x: &Tensor, inputs: &BlockInputs<'_>) -> Result<Tensor> {
        Performer::forward(
            self,
            x,
            inputs.mask,
            inputs.pos_emb,
            inputs.context,
            inputs.context_mask,
        )
    }

    fn for_each_fast_attention(&self, f: &mut dyn FnMut(&FastAttention)) {
        self.net.block().for_each_fast_attention(f)
    }
}
