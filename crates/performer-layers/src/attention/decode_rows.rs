//! The decoding step of [`Attention`] on plain rows ([`Attention::decode_rows`]): no graph, the
//! products shared over a team of threads.

use ndarray::{Array2, ArrayView2, s};
use performer_tensor::team::Team;
use performer_tensor::{Error, Result};

use super::layer::Attention;
use crate::block::{BlockInputs, rows_through_tensors};
use crate::fused_step::FavorAttention;
use crate::linear::linear_rows;
use crate::position::rotate_rows;
use crate::state::BlockState;

impl Attention {
    /// The decoding step on plain rows (see [`Block::decode_rows`](crate::Block::decode_rows)): `x`
    /// `(b, dim)` holds the next position of each sequence. The FAVOR+ heads advance their running
    /// sums ([`FastAttention::step_state`](performer_favor::FastAttention::step_state)), the local
    /// heads their caches, cross-attention reads the context's sums; the projections are
    /// matrix-vector products shared over `team`. A fresh state (the prompt), a mask or dropout in
    /// training mode take [`Attention::decode`].
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
