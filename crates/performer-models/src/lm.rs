//! `PerformerLM`: token and position embeddings, a Performer, a final LayerNorm and logits
//! (performer-pytorch's class of the same name).

use ndarray::ArrayView2;
use performer_favor::FastAttention;
use performer_layers::{
    AbsolutePositionalEmbedding, AxialPositionalEmbedding, BlockInputs, BlockState, Dropout,
    Embedding, FixedPositionalEmbedding, LayerNorm, Linear,
};
use performer_tensor::{Error, Module, Result, Tensor, Visitor};

use crate::config::PerformerLMConfig;
use crate::performer::Performer;

/// How positions enter the model.
pub enum PositionEmbedding {
    /// Rotary (default): a fixed sinusoidal table added to the tokens, and a per-head table for
    /// the rotary embedding of the FAVOR+ heads.
    Rotary {
        /// Added to the token embeddings (`pos_emb.emb`).
        pos_emb: FixedPositionalEmbedding,
        /// Rotary table of the heads (`layer_pos_emb.emb`).
        layer_pos_emb: FixedPositionalEmbedding,
    },
    /// Axial embeddings (`pos_emb.weights.*`).
    Axial(AxialPositionalEmbedding),
    /// Learned absolute embeddings (`pos_emb.emb.weight`).
    Absolute(AbsolutePositionalEmbedding),
}

/// Optional inputs of [`PerformerLM::forward`].
#[derive(Clone, Copy, Default)]
pub struct LmInputs<'a> {
    /// Padding mask `(b, n)`, true for real tokens.
    pub mask: Option<ArrayView2<'a, bool>>,
    /// Encoder output for cross-attention `(b, nc, dim)`.
    pub context: Option<&'a Tensor>,
    /// Its padding mask `(b, nc)`.
    pub context_mask: Option<ArrayView2<'a, bool>>,
    /// Return the final normalized hidden states instead of logits.
    pub return_encodings: bool,
}

/// A Performer language model.
pub struct PerformerLM {
    config: PerformerLMConfig,
    /// Token embedding (`token_emb.weight`).
    pub token_emb: Embedding,
    /// Position information.
    pub pos: PositionEmbedding,
    /// Dropout after the embeddings.
    pub dropout: Dropout,
    /// The layers.
    pub performer: Performer,
    /// Final norm.
    pub norm: LayerNorm,
    /// Logits projection (absent when `tie_embed`).
    pub to_out: Option<Linear>,
}

impl PerformerLM {
    /// Builds the model (random initialization from the global generator, as PyTorch's defaults).
    pub fn new(config: PerformerLMConfig) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let token_emb = Embedding::new(c.num_tokens, c.dim);
        Self::with_token_embedding(config.clone(), token_emb)
    }

    /// Builds the model around a given token embedding (shared embeddings of encoder-decoders).
    pub fn with_token_embedding(config: PerformerLMConfig, token_emb: Embedding) -> Result<Self> {
        config.validate()?;
        let c = &config;
        if token_emb.weight.shape() != [c.num_tokens, c.dim] {
            return Err(Error::shape(
                "PerformerLM",
                format!(
                    "token embedding {:?} must be (num_tokens, dim) = ({}, {})",
                    token_emb.weight.shape(),
                    c.num_tokens,
                    c.dim
                ),
            ));
        }
        let pos = if c.rotary_position_emb {
            PositionEmbedding::Rotary {
                pos_emb: FixedPositionalEmbedding::new(c.dim, c.max_seq_len),
                layer_pos_emb: FixedPositionalEmbedding::new(c.dim_head, c.max_seq_len),
            }
        } else if c.axial_position_emb {
            PositionEmbedding::Axial(AxialPositionalEmbedding::new(
                c.dim,
                &c.resolved_axial_shape(),
            )?)
        } else {
            PositionEmbedding::Absolute(AbsolutePositionalEmbedding::new(c.dim, c.max_seq_len))
        };
        Ok(PerformerLM {
            token_emb,
            pos,
            dropout: Dropout::new(c.emb_dropout),
            performer: Performer::new(c.performer())?,
            norm: LayerNorm::new(c.dim),
            to_out: (!c.tie_embed).then(|| Linear::new(c.dim, c.num_tokens, true)),
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PerformerLMConfig {
        &self.config
    }

    /// Stores the Linear and token-embedding weights (every matrix of the model: the token
    /// table, the layers' projections and the logits projection) as `dtype`, for inference:
    /// activations, biases, norms, position tables and every sum stay f32. How the products
    /// read the bf16 weights is this thread's `performer_tensor::bf16_gemm::Bf16Products`: by
    /// default, on a CPU with AVX-512 BF16, with its bf16 dot products (each activation
    /// rounded to bf16 as it enters a product), elsewhere widened to f32 as they are read
    /// (exactly an f32 model with the rounded weights). Either way the decoding step's
    /// matrix-vector products read the bf16 values directly, half the bytes of f32. f32 to
    /// bf16 rounds each weight to the nearest bfloat16; bf16 to f32 is exact (the weights keep
    /// their rounding).
    ///
    /// Training a bf16 model is refused with a typed error by the optimizers (an update below
    /// a weight's bf16 spacing would round away): convert back to f32 first.
    pub fn to_dtype(&self, dtype: performer_tensor::DType) {
        for (_, p) in self.weight_matrices() {
            p.to_dtype(dtype);
        }
    }

    /// How the weights that [`PerformerLM::to_dtype`] converts are stored (those of the token
    /// embedding).
    pub fn dtype(&self) -> performer_tensor::DType {
        self.token_emb.weight.dtype()
    }

    /// The parameters [`PerformerLM::to_dtype`] converts, with their names: the token table,
    /// the logits projection and the matrices of the layers (Linear weights; position tables
    /// stay f32: the steps read them whole).
    fn weight_matrices(&self) -> Vec<(String, performer_tensor::Param)> {
        let mut out = vec![(
            "token_emb.weight".to_string(),
            self.token_emb.weight.clone(),
        )];
        if let Some(l) = &self.to_out {
            out.push(("to_out.weight".to_string(), l.weight.clone()));
        }
        out.extend(
            self.performer
                .named_parameters()
                .into_iter()
                .filter(|(_, p)| p.shape().len() == 2)
                .map(|(k, p)| (format!("performer.{k}"), p)),
        );
        out
    }

    /// Stops projection redraws (`fix_projection_matrices_`).
    pub fn fix_projection_matrices(&self) {
        self.performer.fix_projection_matrices();
    }

    /// Checks token ids and masks against the model; errors name the argument and the limit.
    pub fn check_inputs(&self, x: &ArrayView2<i64>, inputs: &LmInputs<'_>) -> Result<()> {
        let (b, n) = x.dim();
        if n > self.config.max_seq_len {
            return Err(Error::invalid(
                "PerformerLM",
                "sequence length",
                n,
                format!("must be at most max_seq_len = {}", self.config.max_seq_len),
            ));
        }
        if n == 0 || b == 0 {
            return Err(Error::invalid(
                "PerformerLM",
                "x",
                format!("shape {:?}", x.shape()),
                "needs at least one sequence of one token",
            ));
        }
        if let Some(&bad) = x
            .iter()
            .find(|&&t| t < 0 || t as usize >= self.config.num_tokens)
        {
            return Err(Error::Index {
                op: "PerformerLM token ids".into(),
                index: bad,
                size: self.config.num_tokens,
            });
        }
        if let Some(m) = inputs.mask
            && m.dim() != (b, n)
        {
            return Err(Error::shape(
                "PerformerLM",
                format!(
                    "mask {:?} must have the tokens' shape ({b}, {n})",
                    m.shape()
                ),
            ));
        }
        if self.config.cross_attend && inputs.context.is_none() {
            return Err(Error::invalid(
                "PerformerLM",
                "context",
                "None",
                "a cross-attending model needs a context",
            ));
        }
        if !self.config.cross_attend && inputs.context.is_some() {
            return Err(Error::invalid(
                "PerformerLM",
                "context",
                "given",
                "the model has no cross-attention (cross_attend = false)",
            ));
        }
        if let Some(ctx) = inputs.context {
            if ctx.rank() != 3 || ctx.shape()[0] != b || ctx.shape()[2] != self.config.dim {
                return Err(Error::shape(
                    "PerformerLM",
                    format!(
                        "context {:?} must be (b = {b}, nc, dim = {})",
                        ctx.shape(),
                        self.config.dim
                    ),
                ));
            }
            if ctx.shape()[1] == 0 {
                return Err(Error::invalid(
                    "PerformerLM",
                    "context",
                    format!("shape {:?}", ctx.shape()),
                    "needs at least one position to attend to",
                ));
            }
            if let Some(cm) = inputs.context_mask
                && cm.dim() != (b, ctx.shape()[1])
            {
                return Err(Error::shape(
                    "PerformerLM",
                    format!(
                        "context_mask {:?} must be (b, nc) = ({b}, {})",
                        cm.shape(),
                        ctx.shape()[1]
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The embeddings entering the layers, `(b, n, dim)` (tokens + positions, dropout).
    pub fn embed(&self, x: &ArrayView2<i64>) -> Result<Tensor> {
        self.embed_at(x, 0)
    }

    /// Embeddings of tokens `x` `(b, n)` standing at positions `start..start + n`.
    pub fn embed_at(&self, x: &ArrayView2<i64>, start: usize) -> Result<Tensor> {
        let n = x.ncols();
        let tokens = self.token_emb.forward(&x.into_dyn())?;
        let positions = match &self.pos {
            PositionEmbedding::Rotary { pos_emb, .. } => {
                pos_emb.forward(start + n)?.narrow(1, start, n)?
            }
            PositionEmbedding::Axial(a) => a.forward(start + n)?.narrow(1, start, n)?,
            PositionEmbedding::Absolute(a) => a.forward(start + n)?.narrow(0, start, n)?,
        };
        self.dropout.forward(&tokens.add(&positions)?)
    }

    /// The rotary table of the heads for `n` positions, if rotary.
    pub fn layer_pos_emb(&self, n: usize) -> Result<Option<Tensor>> {
        self.layer_pos_emb_at(0, n)
    }

    /// The rotary table rows of positions `start..start + n`, if rotary.
    pub fn layer_pos_emb_at(&self, start: usize, n: usize) -> Result<Option<Tensor>> {
        match &self.pos {
            PositionEmbedding::Rotary { layer_pos_emb, .. } => {
                Ok(Some(layer_pos_emb.forward(start + n)?.narrow(1, start, n)?))
            }
            _ => Ok(None),
        }
    }

    /// Logits `(..., num_tokens)` from final hidden states (already normalized).
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        match &self.to_out {
            Some(l) => l.forward(h),
            None => h.matmul(&self.token_emb.weight.tensor().transpose(0, 1)?),
        }
    }

    /// Logits `(b, n, num_tokens)` for tokens `x` `(b, n)`, or the encodings `(b, n, dim)`.
    pub fn forward(&self, x: &ArrayView2<i64>, inputs: &LmInputs<'_>) -> Result<Tensor> {
        self.check_inputs(x, inputs)?;
        let h = self.embed(x)?;
        let pos = self.layer_pos_emb(x.ncols())?;
        let h = self.performer.forward(
            &h,
            inputs.mask,
            pos.as_ref(),
            inputs.context,
            inputs.context_mask,
        )?;
        let h = self.norm.forward(&h)?;
        if inputs.return_encodings {
            Ok(h)
        } else {
            self.logits(&h)
        }
    }

    /// Logits of the last position of each sequence `(b, num_tokens)`.
    pub fn last_logits(
        &self,
        x: &ArrayView2<i64>,
        inputs: &LmInputs<'_>,
    ) -> Result<ndarray::Array2<f32>> {
        performer_tensor::no_grad(|| {
            let h = self.forward(
                x,
                &LmInputs {
                    return_encodings: true,
                    ..*inputs
                },
            )?;
            let last = h.select(1, x.ncols() - 1)?;
            let logits = self.logits(&last)?.to_host()?;
            logits
                .view()
                .into_dimensionality::<ndarray::Ix2>()
                .map(|a| a.to_owned())
                .map_err(|e| Error::shape("PerformerLM", e.to_string()))
        })
    }

    /// Makes projection redraws draw from `rng` instead of the global generator
    /// ([`crate::Performer::set_redraw_generator`]).
    pub fn set_redraw_generator(&self, rng: Option<performer_tensor::rng::Generator>) {
        self.performer.set_redraw_generator(rng)
    }

    /// Calls `f` on every FastAttention.
    pub fn for_each_fast_attention(&self, f: &mut dyn FnMut(&FastAttention)) {
        self.performer.for_each_fast_attention(f)
    }

    /// Runs the model's FAVOR+ attention on CUDA device `ordinal` ([`Performer::use_cuda`]).
    pub fn use_cuda(&self, ordinal: usize) -> Result<()> {
        self.performer.use_cuda(ordinal)
    }

    /// The model's FAVOR+ attention on a GPU or the emulated device ([`Performer::use_device`]).
    pub fn use_device(&self, device: performer_favor::AttentionDevice) -> Result<()> {
        self.performer.use_device(device)
    }

    /// The model's FAVOR+ attention back on the CPU.
    pub fn use_cpu(&self) {
        self.performer.use_cpu()
    }
}

impl Module for PerformerLM {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.child("token_emb", &self.token_emb);
        match &self.pos {
            PositionEmbedding::Rotary {
                pos_emb,
                layer_pos_emb,
            } => {
                v.child("pos_emb", pos_emb);
                v.child("layer_pos_emb", layer_pos_emb);
            }
            PositionEmbedding::Axial(a) => v.child("pos_emb", a),
            PositionEmbedding::Absolute(a) => v.child("pos_emb", a),
        }
        v.child("dropout", &self.dropout);
        v.child("performer", &self.performer);
        v.child("norm", &self.norm);
        if let Some(l) = &self.to_out {
            v.child("to_out", l);
        }
    }
}

/// The state of a causal [`PerformerLM`] while it generates: per layer the running FAVOR+ sums,
/// the local heads' recent keys, the token-shift features and the cross-attention context's
/// sums, so each new token costs the same whatever the position. Feed it the prompt once (one
/// parallel pass), then one token at a time; it is for inference (use the model in eval mode).
pub struct DecodingState {
    net: BlockState,
    pos: usize,
    batch: usize,
    context: Option<Tensor>,
    context_mask: Option<ndarray::Array2<bool>>,
}

impl DecodingState {
    /// Positions fed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Sequences decoded together.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Whether the state's running sums live on a device (those of a model moved there: the
    /// FAVOR+ heads' and the context's sums, the local heads' recent keys and values and the
    /// token shifts' previous positions).
    pub fn on_device(&self) -> bool {
        self.net.on_device()
    }
}

impl PerformerLM {
    /// A fresh decoding state for `batch` sequences (with the encoder output for a decoder).
    pub fn decoding_state(
        &self,
        batch: usize,
        context: Option<&Tensor>,
        context_mask: Option<ArrayView2<'_, bool>>,
    ) -> Result<DecodingState> {
        if !self.config.causal {
            return Err(Error::invalid(
                "PerformerLM::decoding_state",
                "causal",
                false,
                "only causal models decode token by token",
            ));
        }
        if batch == 0 {
            return Err(Error::invalid(
                "PerformerLM::decoding_state",
                "batch",
                0,
                "must be positive",
            ));
        }
        Ok(DecodingState {
            net: BlockState::Empty,
            pos: 0,
            batch,
            context: context.map(Tensor::detach),
            context_mask: context_mask.map(|m| m.to_owned()),
        })
    }

    /// Feeds tokens `(b, n)` to `state` (any `n` for a fresh state — the prompt, in one parallel
    /// pass — then one token at a time) and returns the logits of the last position `(b,
    /// num_tokens)`, equal to those of a full forward over the prefix. `mask` marks real tokens of
    /// the new positions.
    pub fn decode(
        &self,
        state: &mut DecodingState,
        tokens: &ArrayView2<i64>,
        mask: Option<ArrayView2<'_, bool>>,
    ) -> Result<ndarray::Array2<f32>> {
        let (b, n) = tokens.dim();
        if b != state.batch {
            return Err(Error::shape(
                "PerformerLM::decode",
                format!("{b} sequences for a state of {}", state.batch),
            ));
        }
        if state.pos + n > self.config.max_seq_len {
            return Err(Error::invalid(
                "PerformerLM::decode",
                "position",
                state.pos + n,
                format!(
                    "must be at most max_seq_len = {} (generate falls back to a sliding window beyond it)",
                    self.config.max_seq_len
                ),
            ));
        }
        let inputs = LmInputs {
            mask,
            context: state.context.as_ref(),
            context_mask: state.context_mask.as_ref().map(|m| m.view()),
            return_encodings: true,
        };
        // The checks of a full forward, on the new tokens (length vs max_seq_len is checked above).
        self.check_inputs(tokens, &inputs)?;
        // A mask that keeps every token changes nothing (it only zeroes the values of masked
        // positions, and hides them from local heads and token shifts): drop it, so the pass
        // skips the masking copies and a step takes the row path. `generate` passes one.
        let mask = mask.filter(|m| !m.iter().all(|&keep| keep));
        // The row path computes on host arrays; a model on a device steps through tensors.
        let on_host = self.token_emb.weight.device().is_cpu();
        if n == 1 && state.pos > 0 && mask.is_none() && on_host {
            return performer_tensor::no_grad(|| {
                performer_tensor::team::with_team(|team| self.step_rows(state, tokens, team))
            });
        }
        performer_tensor::no_grad(|| {
            let h = self.embed_at(tokens, state.pos)?;
            let pos_emb = self.layer_pos_emb_at(state.pos, n)?;
            let block_inputs = BlockInputs {
                mask,
                pos_emb: pos_emb.as_ref(),
                context: inputs.context,
                context_mask: inputs.context_mask,
            };
            let last = self
                .performer
                .decode_last(&h, &block_inputs, &mut state.net)?;
            state.pos += n;
            let last = self.norm.forward(&last.select(1, 0)?)?;
            // Sampling reads the logits on the host (a copy from a device).
            self.logits(&last)?
                .to_host()?
                .view()
                .into_dimensionality::<ndarray::Ix2>()
                .map(|a| a.to_owned())
                .map_err(|e| Error::shape("PerformerLM::decode", e.to_string()))
        })
    }

    /// One position per sequence after the prompt, on plain rows through `Block::decode_rows`:
    /// no tensor graph, the matrix-vector products shared over `team`.
    fn step_rows(
        &self,
        state: &mut DecodingState,
        tokens: &ArrayView2<i64>,
        team: &performer_tensor::team::Team,
    ) -> Result<ndarray::Array2<f32>> {
        let b = tokens.nrows();
        let h = self.embed_at(tokens, state.pos)?;
        let h = h
            .data()
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order((b, self.config.dim))
            .map_err(|e| Error::shape("PerformerLM::decode", e.to_string()))?;
        let pos_emb = self.layer_pos_emb_at(state.pos, 1)?;
        let inputs = BlockInputs {
            mask: None,
            pos_emb: pos_emb.as_ref(),
            context: state.context.as_ref(),
            context_mask: state.context_mask.as_ref().map(|m| m.view()),
        };
        let h = self
            .performer
            .decode_rows(&h.view(), &inputs, &mut state.net, team)?;
        state.pos += 1;
        let last = self.norm.forward_rows(&h.view())?;
        match &self.to_out {
            Some(l) => l.forward_rows(&last.view(), team),
            None => {
                // Tied weights: the embedding table is the output layer's (vocab, dim) weight.
                let tied = performer_layers::Linear {
                    weight: self.token_emb.weight.clone(),
                    bias: None,
                };
                tied.forward_rows(&last.view(), team)
            }
        }
    }

    /// One token per sequence (`(b)`): [`PerformerLM::decode`] of a single position.
    ///
    /// A step is a chain of matrix-vector products shared with helper threads
    /// (`performer_tensor::team`); a loop of steps inside one
    /// `performer_tensor::team::with_team(|_| ...)` keeps the helpers between tokens instead
    /// of waking them for each, as `generate` does; called from a thread outside rayon's pool
    /// (a program's main thread), put the whole loop in `performer_tensor::team::on_pool` too,
    /// so that no idle pool thread competes with the team for the cores.
    pub fn step(&self, state: &mut DecodingState, tokens: &[i64]) -> Result<ndarray::Array2<f32>> {
        let x = ndarray::Array2::from_shape_vec((tokens.len(), 1), tokens.to_vec())
            .map_err(|e| Error::shape("PerformerLM::step", e.to_string()))?;
        self.decode(state, &x.view(), None)
    }
}
