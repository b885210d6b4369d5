//! Incremental decoding of [`Attention`] on device tensors (feature `cuda`): the FAVOR+ heads'
//! running sums, the context's sums ([`performer_favor::DeviceCausalState`],
//! [`performer_favor::DeviceContextState`]) and the local heads' recent keys and values
//! (`DeviceLocalCache`) live on the layer's device, so a decoding step copies nothing of them
//! to the host.

use performer_tensor::{Result, Tensor};

use super::layer::Attention;
use crate::block::BlockInputs;
use crate::local_attention::LocalAttention;
use crate::local_attention_device;
use crate::state::AttentionState;

/// `(b, h, n, d)` -> `(b * h, n, d)` (a view of the device buffer).
fn heads_first(t: &Tensor) -> Result<Tensor> {
    let s = t.shape();
    t.reshape(&[(s[0] * s[1]) as isize, s[2] as isize, s[3] as isize])
}

impl Attention {
    /// The FAVOR+ heads' output for queries `q` and the new keys `k`, values `v`
    /// `(b, h, n, d)`, with their sums added to the device state. `prompt`: a fresh state's
    /// pass, every position's output; otherwise one query per sequence.
    pub(super) fn decode_favor_on_device(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        st: &mut AttentionState,
        prompt: bool,
    ) -> Result<Tensor> {
        let (b, h, e) = (v.shape()[0], v.shape()[1], v.shape()[3]);
        if st.favor_device.is_none() {
            st.favor_device = Some(self.fast_attention.device_causal_state(
                b * h,
                e,
                v.device(),
            )?);
        }
        let sums = st.favor_device.as_mut().expect("set above");
        let fa = &self.fast_attention;
        fa.extend_device_state(sums, &heads_first(k)?, &heads_first(v)?)?;
        if prompt {
            return fa.forward(q, k, v);
        }
        let out = fa.query_device_state(sums, &heads_first(q)?)?;
        out.reshape(&[b as isize, h as isize, 1, e as isize])
    }

    /// Cross-attention of queries `q` `(b, h, n, d)` over the context, whose sums are computed
    /// on the first call and kept on the device.
    pub(super) fn decode_context_on_device(
        &self,
        q: &Tensor,
        inputs: &BlockInputs<'_>,
        st: &mut AttentionState,
    ) -> Result<Tensor> {
        let context = inputs.context.expect("a cross-attention call");
        let (b, h, n) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        if st.context_device.is_none() {
            let k = self.split_heads(&self.to_k.forward(context)?)?;
            let mut v = self.split_heads(&self.to_v.forward(context)?)?;
            if let Some(m) = inputs.context_mask {
                let nc = context.shape()[1];
                if m.shape() != [b, nc] {
                    return Err(performer_tensor::Error::shape(
                        "Attention::decode",
                        format!("context_mask {:?} must be ({b}, {nc})", m.shape()),
                    ));
                }
                let padded =
                    ndarray::Array4::from_shape_fn((b, 1, nc, 1), |(i, _, j, _)| !m[[i, j]]);
                v = v.masked_fill(&padded.into_dyn().view(), 0.0)?;
            }
            st.context_device = Some(
                self.fast_attention
                    .device_context_state(&heads_first(&k)?, &heads_first(&v)?)?,
            );
        }
        let sums = st.context_device.as_ref().expect("set above");
        let out = self
            .fast_attention
            .query_device_context(sums, &heads_first(q)?)?;
        let e = out.shape()[2];
        out.reshape(&[b as isize, h as isize, n as isize, e as isize])
    }

    /// The local heads' output for queries `q` and the new keys `k`, values `v` `(b, lh, n,
    /// d)`: a fresh state's prompt through the parallel forward, with the device cache taken
    /// from its keys and values; then one position at a time from that cache.
    pub(super) fn decode_local_on_device(
        &self,
        local: &LocalAttention,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        inputs: &BlockInputs<'_>,
        st: &mut AttentionState,
    ) -> Result<Tensor> {
        if st.pos == 0 {
            let out = local.forward(q, k, v, inputs.mask)?;
            st.local_device = Some(local_attention_device::cache_from(
                local,
                k,
                v,
                inputs.mask,
            )?);
            return Ok(out);
        }
        let cache = st.local_device.as_mut().ok_or_else(|| {
            performer_tensor::Error::Other(
                "Attention::decode: the local heads' device cache is missing (a state begun \
                 on the host continues on the host)"
                    .into(),
            )
        })?;
        let keep = inputs.mask.map(|m| m.index_axis_move(ndarray::Axis(1), 0));
        local_attention_device::step(cache, q, k, v, keep)
    }
}
