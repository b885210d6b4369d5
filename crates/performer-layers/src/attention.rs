//! Multi-head attention with FAVOR+ global heads and windowed local heads (performer-pytorch's
//! `Attention`), and its self- and cross-attention forms.

use ndarray::{Array2, ArrayView2, s};
use performer_favor::{CausalState, ContextState, FastAttention, FastAttentionConfig};
use performer_tensor::ops::Activation;
use performer_tensor::team::Team;
use performer_tensor::{Error, Module, Result, Tensor, Visitor};

use crate::basic::linear_rows;
use crate::basic::{Dropout, Linear};
use crate::block::{Block, BlockInputs, BlockState, check_decode_length, rows_through_tensors};
use crate::fused_step::FavorAttention;
use crate::local_attention::LocalAttention;
use crate::local_attention::LocalCache;
use crate::position::{apply_rotary, apply_rotary_pos_emb, rotate_rows};

/// Settings of [`Attention`], with performer-pytorch's names and defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionConfig {
    /// Model width.
    pub dim: usize,
    /// Causal attention.
    pub causal: bool,
    /// Number of heads.
    pub heads: usize,
    /// Size of each head (`None`: `dim / heads`).
    pub dim_head: Option<usize>,
    /// How many of the heads are local (windowed) instead of FAVOR+.
    pub local_heads: usize,
    /// Window of the local heads.
    pub local_window_size: usize,
    /// Random features per head (`None`: `int(d ln d)`).
    pub nb_features: Option<usize>,
    /// Redraw interval (kept here for completeness; the Performer's updater applies it).
    pub feature_redraw_interval: usize,
    /// Generalized attention instead of the softmax kernel.
    pub generalized_attention: bool,
    /// Kernel of generalized attention.
    pub kernel_fn: Activation,
    /// Dropout after the output projection (and on local attention weights).
    pub dropout: f32,
    /// No random features (see FastAttention).
    pub no_projection: bool,
    /// Biases on `to_q`, `to_k`, `to_v`.
    pub qkv_bias: bool,
    /// Bias on `to_out`.
    pub attn_out_bias: bool,
}

impl AttentionConfig {
    /// performer-pytorch's defaults for `Attention(dim)`.
    pub fn new(dim: usize) -> Self {
        AttentionConfig {
            dim,
            causal: false,
            heads: 8,
            dim_head: Some(64),
            local_heads: 0,
            local_window_size: 256,
            nb_features: None,
            feature_redraw_interval: 1000,
            generalized_attention: false,
            kernel_fn: Activation::Relu,
            dropout: 0.0,
            no_projection: false,
            qkv_bias: false,
            attn_out_bias: true,
        }
    }
}

/// Multi-head attention: `to_q`, `to_k`, `to_v`, the FAVOR+ heads (`fast_attention`), the
/// local heads (`local_attn`, the last `local_heads` heads), `to_out` and dropout.
pub struct Attention {
    config: AttentionConfig,
    dim_head: usize,
    /// The FAVOR+ heads.
    pub fast_attention: FastAttention,
    /// The local heads, if any.
    pub local_attn: Option<LocalAttention>,
    /// Query projection.
    pub to_q: Linear,
    /// Key projection.
    pub to_k: Linear,
    /// Value projection.
    pub to_v: Linear,
    /// Output projection.
    pub to_out: Linear,
    /// Output dropout.
    pub dropout: Dropout,
}

impl Attention {
    /// Builds the layer; bad combinations are errors naming the argument.
    pub fn new(config: AttentionConfig) -> Result<Self> {
        let c = &config;
        if c.heads == 0 {
            return Err(Error::invalid("Attention", "heads", 0, "must be positive"));
        }
        if c.dim == 0 || !c.dim.is_multiple_of(c.heads) {
            return Err(Error::invalid(
                "Attention",
                "dim",
                c.dim,
                format!("must be a positive multiple of heads ({})", c.heads),
            ));
        }
        if c.local_heads > c.heads {
            return Err(Error::invalid(
                "Attention",
                "local_heads",
                c.local_heads,
                format!("must be at most heads ({})", c.heads),
            ));
        }
        if !(0.0..1.0).contains(&c.dropout) {
            return Err(Error::invalid(
                "Attention",
                "dropout",
                c.dropout,
                "must lie in [0, 1)",
            ));
        }
        let dim_head = c.dim_head.unwrap_or(c.dim / c.heads);
        if dim_head == 0 {
            return Err(Error::invalid(
                "Attention",
                "dim_head",
                0,
                "must be positive",
            ));
        }
        let inner = dim_head * c.heads;
        let fast_attention = FastAttention::new(FastAttentionConfig {
            nb_features: c.nb_features,
            causal: c.causal,
            generalized_attention: c.generalized_attention,
            kernel_fn: c.kernel_fn,
            no_projection: c.no_projection,
            ..FastAttentionConfig::new(dim_head)
        })?;
        let local_attn = if c.local_heads > 0 {
            Some(LocalAttention::new(
                c.local_window_size,
                c.causal,
                c.dropout,
                dim_head,
            )?)
        } else {
            None
        };
        Ok(Attention {
            to_q: Linear::new(c.dim, inner, c.qkv_bias),
            to_k: Linear::new(c.dim, inner, c.qkv_bias),
            to_v: Linear::new(c.dim, inner, c.qkv_bias),
            to_out: Linear::new(inner, c.dim, c.attn_out_bias),
            dropout: Dropout::new(c.dropout),
            dim_head,
            fast_attention,
            local_attn,
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AttentionConfig {
        &self.config
    }

    /// Size of each head.
    pub fn dim_head(&self) -> usize {
        self.dim_head
    }

    /// `(b, n, h * d) -> (b, h, n, d)` (a view).
    fn split_heads(&self, t: &Tensor) -> Result<Tensor> {
        let (b, n) = (t.shape()[0] as isize, t.shape()[1] as isize);
        t.reshape(&[b, n, self.config.heads as isize, self.dim_head as isize])?
            .permute(&[0, 2, 1, 3])
    }

    /// Attention of `x` `(b, n, dim)` over itself, or over `context` `(b, nc, dim)` when given.
    /// `mask` `(b, n)` is the key padding mask of self-attention (and the local heads' input
    /// mask); `context_mask` `(b, nc)` that of cross-attention. `pos_emb` is the rotary table
    /// of the FAVOR+ heads, applied in self-attention only.
    pub fn forward(&self, x: &Tensor, inputs: &BlockInputs<'_>) -> Result<Tensor> {
        let c = &self.config;
        if x.rank() != 3 || x.shape()[2] != c.dim {
            return Err(Error::shape(
                "Attention",
                format!("input must be (b, n, dim = {}), got {:?}", c.dim, x.shape()),
            ));
        }
        let (b, n) = (x.shape()[0], x.shape()[1]);
        if b == 0 || n == 0 {
            return Err(Error::invalid(
                "Attention",
                "x",
                format!("shape {:?}", x.shape()),
                "needs at least one sequence of one position",
            ));
        }
        let cross = inputs.context.is_some();
        let context = inputs.context.unwrap_or(x);
        if context.rank() != 3 || context.shape()[0] != b || context.shape()[2] != c.dim {
            return Err(Error::shape(
                "Attention",
                format!(
                    "context must be (b = {b}, nc, dim = {}), got {:?}",
                    c.dim,
                    context.shape()
                ),
            ));
        }
        let nc = context.shape()[1];
        if nc == 0 {
            return Err(Error::invalid(
                "Attention",
                "context",
                format!("shape {:?}", context.shape()),
                "needs at least one position to attend to",
            ));
        }
        if let Some(m) = inputs.mask
            && m.shape() != [b, n]
        {
            return Err(Error::shape(
                "Attention",
                format!("mask {:?} must be (b, n) = ({b}, {n})", m.shape()),
            ));
        }
        let context_mask = if cross {
            inputs.context_mask
        } else {
            inputs.context_mask.or(inputs.mask)
        };
        if let Some(m) = context_mask
            && m.shape() != [b, nc]
        {
            return Err(Error::shape(
                "Attention",
                format!("context_mask {:?} must be (b, nc) = ({b}, {nc})", m.shape()),
            ));
        }
        let global = c.heads - c.local_heads;
        if cross && c.local_heads > 0 {
            return Err(Error::invalid(
                "Attention",
                "local_heads",
                c.local_heads,
                "local attention is not compatible with cross attention",
            ));
        }
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        let mut outs = Vec::with_capacity(2);
        if global > 0 {
            let (mut gq, mut gk, mut gv) = (
                q.narrow(1, 0, global)?,
                k.narrow(1, 0, global)?,
                v.narrow(1, 0, global)?,
            );
            if let Some(m) = context_mask {
                // (b, nc) -> (b, 1, nc, 1): zero the values of padded keys
                let padded =
                    ndarray::Array4::from_shape_fn((b, 1, nc, 1), |(i, _, j, _)| !m[[i, j]]);
                gv = gv.masked_fill(&padded.into_dyn().view(), 0.0)?;
            }
            if let Some(pos) = inputs.pos_emb
                && !cross
            {
                (gq, gk) = apply_rotary_pos_emb(&gq, &gk, pos)?;
            }
            outs.push(self.fast_attention.forward(&gq, &gk, &gv)?);
        }
        if let Some(local) = &self.local_attn {
            let lh = c.local_heads;
            let (lq, lk, lv) = (
                q.narrow(1, global, lh)?,
                k.narrow(1, global, lh)?,
                v.narrow(1, global, lh)?,
            );
            outs.push(local.forward(&lq, &lk, &lv, inputs.mask)?);
        }
        let out = if outs.len() == 1 {
            outs.remove(0)
        } else {
            Tensor::cat(&outs, 1)?
        };
        let out = out.permute(&[0, 2, 1, 3])?.reshape(&[
            b as isize,
            n as isize,
            (c.heads * self.dim_head) as isize,
        ])?;
        self.dropout.forward(&self.to_out.forward(&out)?)
    }
}

/// What an attention layer remembers while decoding.
#[derive(Default)]
pub struct AttentionState {
    /// Positions seen.
    pos: usize,
    /// Running sums of the FAVOR+ heads (causal self-attention).
    favor: Option<CausalState>,
    /// Sums over the context (cross-attention), computed on the first call.
    context: Option<ContextState>,
    /// Recent keys and values of the local heads.
    local: Option<LocalCache>,
}

impl AttentionState {
    /// Positions seen.
    pub fn position(&self) -> usize {
        self.pos
    }
}

/// `(b, h, n, d)` -> `(b * h, n, d)` as an owned array.
fn heads_first(t: &Tensor) -> Result<ndarray::Array3<f32>> {
    let s = t.shape().to_vec();
    t.data()
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((s[0] * s[1], s[2], s[3]))
        .map_err(|e| Error::shape("Attention::decode", e.to_string()))
}

/// `(b * h, d)` -> `(b, h, 1, d)`.
fn one_position(a: ndarray::Array2<f32>, b: usize) -> Result<Tensor> {
    let (bh, d) = a.dim();
    Ok(Tensor::new(
        a.into_shape_with_order((b, bh / b, 1, d))
            .map_err(|e| Error::shape("Attention::decode", e.to_string()))?
            .into_dyn(),
    ))
}

impl Attention {
    /// Incremental decoding (see [`Block::decode`]): causal self-attention keeps running FAVOR+
    /// sums and its local heads' recent keys; cross-attention computes the context's sums once.
    pub fn decode(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        self.decode_positions(x, inputs, state, false)
    }

    /// [`Attention::decode`] returning only the last position's output `(b, 1, dim)` (see
    /// [`Block::decode_last`]): from a fresh state, causal self-attention without local heads
    /// projects and attends one query instead of `n`.
    pub fn decode_last(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        self.decode_positions(x, inputs, state, true)
    }

    /// [`Attention::decode`] of every position, or of the last only.
    fn decode_positions(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
        last_only: bool,
    ) -> Result<Tensor> {
        let c = &self.config;
        let cross = inputs.context.is_some();
        if !cross && !c.causal {
            return Err(Error::invalid(
                "Attention::decode",
                "causal",
                false,
                "non-causal self-attention needs every position at once",
            ));
        }
        if x.rank() != 3 || x.shape()[2] != c.dim {
            return Err(Error::shape(
                "Attention::decode",
                format!("input must be (b, n, dim = {}), got {:?}", c.dim, x.shape()),
            ));
        }
        if matches!(state, BlockState::Empty) {
            *state = BlockState::Attention(Box::default());
        }
        let BlockState::Attention(st) = state else {
            return Err(Error::Other(
                "Attention::decode: the state belongs to another block".into(),
            ));
        };
        let (b, n) = (x.shape()[0], x.shape()[1]);
        let fresh = st.pos == 0;
        check_decode_length("Attention::decode", n, fresh)?;
        if let Some(m) = inputs.mask
            && m.shape() != [b, n]
        {
            return Err(Error::shape(
                "Attention::decode",
                format!(
                    "mask {:?} must cover the new positions ({b}, {n})",
                    m.shape()
                ),
            ));
        }
        let global = c.heads - c.local_heads;
        // One query suffices when only the last output is read and every head reads the
        // running sums (local heads and a context take the general path below).
        let one_query = last_only && fresh && !cross && c.local_heads == 0;
        let q = if one_query {
            self.split_heads(&self.to_q.forward(&x.narrow(1, n - 1, 1)?)?)?
        } else {
            self.split_heads(&self.to_q.forward(x)?)?
        };
        let mut outs = Vec::with_capacity(2);
        if cross {
            let context = inputs.context.expect("checked");
            if st.context.is_none() {
                let (k, v) = (
                    self.split_heads(&self.to_k.forward(context)?)?,
                    self.split_heads(&self.to_v.forward(context)?)?,
                );
                let v = match inputs.context_mask {
                    Some(m) => {
                        let nc = context.shape()[1];
                        if m.shape() != [b, nc] {
                            return Err(Error::shape(
                                "Attention::decode",
                                format!("context_mask {:?} must be ({b}, {nc})", m.shape()),
                            ));
                        }
                        let padded =
                            ndarray::Array4::from_shape_fn((b, 1, nc, 1), |(i, _, j, _)| {
                                !m[[i, j]]
                            });
                        v.masked_fill(&padded.into_dyn().view(), 0.0)?
                    }
                    None => v,
                };
                st.context = Some(
                    self.fast_attention
                        .context_state(&heads_first(&k)?.view(), &heads_first(&v)?.view())?,
                );
            }
            let ctx = st.context.as_ref().expect("set above");
            let qs = heads_first(&q)?;
            let mut rows = Vec::with_capacity(n);
            for t in 0..n {
                rows.push(one_position(
                    self.fast_attention
                        .query_context(ctx, &qs.index_axis(ndarray::Axis(1), t))?,
                    b,
                )?);
            }
            outs.push(if n == 1 {
                rows.remove(0)
            } else {
                Tensor::cat(&rows, 2)?
            });
        } else {
            let k = self.split_heads(&self.to_k.forward(x)?)?;
            let v = self.split_heads(&self.to_v.forward(x)?)?;
            if global > 0 {
                let (mut gq, mut gk, mut gv) = (
                    q.narrow(1, 0, global)?,
                    k.narrow(1, 0, global)?,
                    v.narrow(1, 0, global)?,
                );
                if let Some(m) = inputs.mask {
                    let padded =
                        ndarray::Array4::from_shape_fn((b, 1, n, 1), |(i, _, j, _)| !m[[i, j]]);
                    gv = gv.masked_fill(&padded.into_dyn().view(), 0.0)?;
                }
                if let Some(pos) = inputs.pos_emb {
                    if one_query {
                        // The query sits at the last position, the keys at all of them.
                        gq = apply_rotary(&gq, &pos.narrow(1, n - 1, 1)?)?;
                        gk = apply_rotary(&gk, pos)?;
                    } else {
                        (gq, gk) = apply_rotary_pos_emb(&gq, &gk, pos)?;
                    }
                }
                let favor = st.favor.get_or_insert_with(|| {
                    self.fast_attention.causal_state(b * global, self.dim_head)
                });
                if fresh && !one_query {
                    // Every position's output, with the state taken from the same pass.
                    outs.push(
                        self.fast_attention
                            .forward_extending(favor, &gq, &gk, &gv)?,
                    );
                } else {
                    self.fast_attention.extend_state(
                        favor,
                        &heads_first(&gk)?.view(),
                        &heads_first(&gv)?.view(),
                    )?;
                    let qs = heads_first(&gq)?;
                    outs.push(one_position(
                        self.fast_attention
                            .query_state(favor, &qs.index_axis(ndarray::Axis(1), 0))?,
                        b,
                    )?);
                }
            }
            if let Some(local) = &self.local_attn {
                let lh = c.local_heads;
                let (lq, lk, lv) = (
                    q.narrow(1, global, lh)?,
                    k.narrow(1, global, lh)?,
                    v.narrow(1, global, lh)?,
                );
                if fresh {
                    outs.push(local.forward(&lq, &lk, &lv, inputs.mask)?);
                    st.local = Some(local.cache_from(
                        &heads_first(&lk)?.view(),
                        &heads_first(&lv)?.view(),
                        inputs.mask,
                        b,
                    )?);
                } else {
                    let cache = st.local.as_mut().ok_or_else(|| {
                        Error::Other("Attention::decode: local cache missing".into())
                    })?;
                    let (qs, ks, vs) = (heads_first(&lq)?, heads_first(&lk)?, heads_first(&lv)?);
                    let keep = inputs.mask.map(|m| m.index_axis_move(ndarray::Axis(1), 0));
                    let ax = ndarray::Axis(1);
                    outs.push(one_position(
                        local.step(
                            cache,
                            &qs.index_axis(ax, 0),
                            &ks.index_axis(ax, 0),
                            &vs.index_axis(ax, 0),
                            keep,
                        )?,
                        b,
                    )?);
                }
            }
        }
        st.pos += n;
        let out = if outs.len() == 1 {
            outs.remove(0)
        } else {
            Tensor::cat(&outs, 1)?
        };
        let out = if last_only && !one_query {
            out.narrow(2, n - 1, 1)?
        } else {
            out
        };
        let rows = out.shape()[2];
        let out = out.permute(&[0, 2, 1, 3])?.reshape(&[
            b as isize,
            rows as isize,
            (c.heads * self.dim_head) as isize,
        ])?;
        self.dropout.forward(&self.to_out.forward(&out)?)
    }

    /// The decoding step on plain rows (see [`Block::decode_rows`]): `x` `(b, dim)` holds the
    /// next position of each sequence. The FAVOR+ heads advance their running sums
    /// ([`FastAttention::step_state`]), the local heads their caches, cross-attention reads the
    /// context's sums; the projections are matrix-vector products shared over `team`. A
    /// fresh state (the prompt), a mask or dropout in training mode take [`Attention::decode`].
    pub fn decode_rows(
        &self,
        x: &ArrayView2<f32>,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
        team: &Team,
    ) -> Result<Array2<f32>> {
        let c = &self.config;
        let cross = inputs.context.is_some();
        let ready = match state {
            BlockState::Attention(st) => {
                st.pos > 0
                    && if cross {
                        st.context.is_some()
                    } else {
                        st.favor.is_some() || c.heads == c.local_heads
                    }
            }
            _ => false,
        };
        let dropout = self.dropout.is_training() && self.dropout.p > 0.0;
        if !ready || inputs.mask.is_some() || dropout || (!cross && !c.causal) {
            return rows_through_tensors(x, |t| self.decode(t, inputs, state));
        }
        let BlockState::Attention(st) = state else {
            unreachable!("checked above")
        };
        let (b, dim) = x.dim();
        if dim != c.dim {
            return Err(Error::shape(
                "Attention::decode_rows",
                format!("input must be (b, dim = {}), got {:?}", c.dim, x.shape()),
            ));
        }
        let (heads, dh) = (c.heads, self.dim_head);
        // (b, heads * dh) rows as (b * heads, dh): batch-major heads, as the states keep them.
        let per_head = |a: Array2<f32>| -> Result<Array2<f32>> {
            a.into_shape_with_order((b * heads, dh))
                .map_err(|e| Error::shape("Attention::decode_rows", e.to_string()))
        };
        if !cross && c.local_heads == 0 {
            // Every head FAVOR+: the whole block in one phase of the team.
            let table = inputs.pos_emb.map(|pos| pos.data().as_standard_layout());
            let row = table
                .as_ref()
                .map(|t| t.as_slice().expect("standard layout"));
            let favor = st.favor.as_mut().expect("checked above");
            let parts = FavorAttention {
                to_q: &self.to_q,
                to_k: &self.to_k,
                to_v: &self.to_v,
                to_out: &self.to_out,
                fast_attention: &self.fast_attention,
                heads,
                dim_head: dh,
            };
            let y = parts.step(x, row, favor, team)?;
            st.pos += 1;
            return Ok(y);
        }
        let out = if cross {
            let q = per_head(self.to_q.forward_rows(x, team)?)?;
            let ctx = st.context.as_ref().expect("checked above");
            self.fast_attention.query_context(ctx, &q.view())?
        } else {
            let mut qkv = linear_rows(&[&self.to_q, &self.to_k, &self.to_v], x, team)?;
            let v = per_head(qkv.pop().expect("three"))?;
            let k = per_head(qkv.pop().expect("three"))?;
            let q = per_head(qkv.pop().expect("three"))?;
            let global = heads - c.local_heads;
            // The rows of heads first..first + count of every sequence: (b * count, dh).
            let heads_of = |a: &Array2<f32>, first: usize, count: usize| {
                let a = a
                    .view()
                    .into_shape_with_order((b, heads, dh))
                    .expect("b * heads rows");
                a.slice(s![.., first..first + count, ..])
                    .to_owned()
                    .into_shape_with_order((b * count, dh))
                    .expect("contiguous")
            };
            let mut out = Array2::<f32>::zeros((b * heads, dh));
            let mut out3 = out
                .view_mut()
                .into_shape_with_order((b, heads, dh))
                .expect("b * heads rows");
            if global > 0 {
                let (mut gq, mut gk, gv) = (
                    heads_of(&q, 0, global),
                    heads_of(&k, 0, global),
                    heads_of(&v, 0, global),
                );
                if let Some(pos) = inputs.pos_emb {
                    let table = pos.data().as_standard_layout();
                    let row = table.as_slice().expect("standard layout");
                    rotate_rows(&mut gq.view_mut(), row)?;
                    rotate_rows(&mut gk.view_mut(), row)?;
                }
                let favor = st.favor.as_mut().expect("checked above");
                let o = self.fast_attention.step_state(
                    favor,
                    &gq.view(),
                    &gk.view(),
                    &gv.view(),
                    team,
                )?;
                out3.slice_mut(s![.., ..global, ..]).assign(
                    &o.into_shape_with_order((b, global, dh))
                        .expect("b * global rows"),
                );
            }
            if let Some(local) = &self.local_attn {
                let lh = c.local_heads;
                let cache = st.local.as_mut().ok_or_else(|| {
                    Error::Other("Attention::decode_rows: local cache missing".into())
                })?;
                let o = local.step(
                    cache,
                    &heads_of(&q, global, lh).view(),
                    &heads_of(&k, global, lh).view(),
                    &heads_of(&v, global, lh).view(),
                    None,
                )?;
                out3.slice_mut(s![.., global.., ..])
                    .assign(&o.into_shape_with_order((b, lh, dh)).expect("b * lh rows"));
            }
            out
        };
        st.pos += 1;
        let out = out
            .into_shape_with_order((b, heads * dh))
            .map_err(|e| Error::shape("Attention::decode_rows", e.to_string()))?;
        self.to_out.forward_rows(&out.view(), team)
    }
}

impl Module for Attention {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.child("fast_attention", &self.fast_attention);
        if let Some(l) = &self.local_attn {
            v.child("local_attn", l);
        }
        v.child("to_q", &self.to_q);
        v.child("to_k", &self.to_k);
        v.child("to_v", &self.to_v);
        v.child("to_out", &self.to_out);
        v.child("dropout", &self.dropout);
    }
}

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
