//! Incremental decoding of [`Attention`] on tensors: the prompt in one pass from an empty state,
//! then one position at a time ([`Attention::decode`], [`Attention::decode_last`]).

use performer_tensor::{Device, Error, Result, Tensor};

use super::layer::Attention;
use crate::block::{BlockInputs, check_decode_length};
use crate::position::{apply_rotary, apply_rotary_pos_emb};
use crate::state::BlockState;

/// `(b, h, n, d)` -> `(b * h, n, d)` as an owned host array (the decoding sums are kept on
/// the host: a device tensor's new positions are copied there).
fn heads_first(t: &Tensor) -> Result<ndarray::Array3<f32>> {
    let s = t.shape().to_vec();
    let owned = match t.device().is_cpu() {
        true => t.data().as_standard_layout().into_owned(),
        false => t.to_host()?.data().to_owned(),
    };
    owned
        .into_shape_with_order((s[0] * s[1], s[2], s[3]))
        .map_err(|e| Error::shape("Attention::decode", e.to_string()))
}

/// `(b * h, d)` -> `(b, h, 1, d)` on `device` (where the layer's input lives).
fn one_position(a: ndarray::Array2<f32>, b: usize, device: Device) -> Result<Tensor> {
    let (bh, d) = a.dim();
    Tensor::new(
        a.into_shape_with_order((b, bh / b, 1, d))
            .map_err(|e| Error::shape("Attention::decode", e.to_string()))?
            .into_dyn(),
    )
    .to_device(device)
}

impl Attention {
    /// Incremental decoding (see [`Block::decode`](crate::Block::decode)): causal self-attention
    /// keeps running FAVOR+ sums and its local heads' recent keys; cross-attention computes the
    /// context's sums once.
    pub fn decode(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        self.decode_positions(x, inputs, state, false)
    }

    /// [`Attention::decode`] returning only the last position's output `(b, 1, dim)` (see
    /// [`Block::decode_last`](crate::Block::decode_last)): from a fresh state, causal
    /// self-attention without local heads projects and attends one query instead of `n`.
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
        // A layer on device tensors keeps its FAVOR+ sums there (every feature map).
        let device_sums = !x.device().is_cpu();
        if cross && device_sums {
            #[cfg(feature = "cuda")]
            outs.push(self.decode_context_on_device(&q, inputs, st)?);
        } else if cross {
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
                    x.device(),
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
                if device_sums {
                    #[cfg(feature = "cuda")]
                    outs.push(self.decode_favor_on_device(
                        &gq,
                        &gk,
                        &gv,
                        st,
                        fresh && !one_query,
                    )?);
                } else {
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
                            x.device(),
                        )?);
                    }
                }
            }
            if let Some(local) = &self.local_attn {
                let lh = c.local_heads;
                let (lq, lk, lv) = (
                    q.narrow(1, global, lh)?,
                    k.narrow(1, global, lh)?,
                    v.narrow(1, global, lh)?,
                );
                if !x.device().is_cpu() {
                    // On a device the cache stays there too (no copy of keys or outputs).
                    #[cfg(feature = "cuda")]
                    outs.push(self.decode_local_on_device(local, &lq, &lk, &lv, inputs, st)?);
                } else if fresh {
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
                        x.device(),
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
}
