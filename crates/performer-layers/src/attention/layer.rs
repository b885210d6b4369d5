//! The layer ([`Attention`]), its construction and the training forward over whole sequences.

use performer_favor::{FastAttention, FastAttentionConfig};
use performer_tensor::{Error, Module, Result, Tensor, Visitor};

use super::config::AttentionConfig;
use crate::block::BlockInputs;
use crate::dropout::Dropout;
use crate::linear::Linear;
use crate::local_attention::LocalAttention;
use crate::position::apply_rotary_pos_emb;

/// Multi-head attention: `to_q`, `to_k`, `to_v`, the FAVOR+ heads (`fast_attention`), the
/// local heads (`local_attn`, the last `local_heads` heads), `to_out` and dropout.
pub struct Attention {
    pub(super) config: AttentionConfig,
    pub(super) dim_head: usize,
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
    pub(super) fn split_heads(&self, t: &Tensor) -> Result<Tensor> {
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
