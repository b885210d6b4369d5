//! Linear attention on given features, non-causal and causal ([`linear_attention`],
//! [`causal_linear_attention`]).

use ndarray::{ArrayD, Axis};
use performer_tensor::{CustomOp, Data, Result, Tensor, apply_custom_op};
use rayon::prelude::*;

use super::arguments::{DEFAULT_CHUNK, attention_shapes, check_chunk};
use super::head_attention::{
    AttentionSaved, BackwardScratch, FeatureSource, GradSink, HeadContext, HeadGrad, attend_head,
    attend_head_backward, kept_output,
};
use super::save_plan::{SAVE_BUDGET_BYTES, SaveRequest, block_width};
use crate::column_blocks::Blocks;
use crate::heads::{HeadsOut, head, row_vectors, vector_views};

struct LinearAttentionOp {
    causal: bool,
    eps: f32,
    chunk: usize,
    /// Bytes the forward may keep ([`SAVE_BUDGET_BYTES`]).
    budget: usize,
}

impl CustomOp for LinearAttentionOp {
    type Saved = AttentionSaved;

    fn name(&self) -> &'static str {
        if self.causal {
            "causal_linear_attention"
        } else {
            "linear_attention"
        }
    }

    fn forward(&self, inputs: &[&Data], save: bool) -> Result<(Vec<ArrayD<f32>>, Self::Saved)> {
        let sh = attention_shapes(
            self.name(),
            inputs[0].shape(),
            inputs[1].shape(),
            inputs[2].shape(),
            self.causal,
        )?;
        let (q, k, v) = (inputs[0].view(), inputs[1].view(), inputs[2].view());
        // Every row of every head is written by the forward.
        let mut out = HeadsOut::for_overwrite(&sh.lead, sh.n, sh.e);
        let heads = out.data.len_of(Axis(0));
        let mut den = row_vectors(heads, sh.n);
        let plan = SaveRequest {
            save,
            causal: self.causal,
            heads,
            n: sh.n,
            nk: sh.nk,
            m: sh.m,
            e: sh.e,
            chunk: self.chunk,
            with_features: false,
            budget: self.budget,
        }
        .plan();
        let w = block_width(self.causal, self.chunk);
        let contexts: Vec<HeadContext> = out
            .views()
            .into_par_iter()
            .zip(vector_views(&mut den))
            .enumerate()
            .map(|(i, (mut o, mut dn))| {
                let qf = Blocks::transpose_of(&head(&q, i)?, w);
                let kf = Blocks::transpose_of(&head(&k, i)?, w);
                attend_head(
                    &qf,
                    &kf,
                    &head(&v, i)?,
                    self.causal,
                    self.eps,
                    plan,
                    &mut o,
                    &mut dn,
                )
                .map(|(ctx, _)| ctx)
            })
            .collect::<Result<_>>()?;
        let out = out.into_array();
        let kept = kept_output(&out, save);
        Ok((vec![out], (den, kept, contexts)))
    }

    fn backward(
        &self,
        inputs: &[Data],
        saved: &Self::Saved,
        grads: &[Option<ArrayD<f32>>],
        needs: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let Some(g) = &grads[0] else {
            return Ok(vec![None; 3]);
        };
        let sh = attention_shapes(
            self.name(),
            inputs[0].shape(),
            inputs[1].shape(),
            inputs[2].shape(),
            self.causal,
        )?;
        let (den, out, contexts) = saved;
        let (q, k, v, ov, gv) = (
            inputs[0].view(),
            inputs[1].view(),
            inputs[2].view(),
            out.view(),
            g.view(),
        );
        let w = block_width(self.causal, self.chunk);
        // The backward writes every block of every gradient.
        let mut dq = HeadsOut::for_overwrite(&sh.lead, sh.n, sh.m);
        let mut dk = HeadsOut::for_overwrite(&sh.lead, sh.nk, sh.m);
        let mut dv = HeadsOut::for_overwrite(&sh.lead, sh.nk, sh.e);
        dq.views()
            .into_par_iter()
            .zip(dk.views())
            .zip(dv.views())
            .enumerate()
            .try_for_each_init(
                || BackwardScratch::new(self.causal, sh.m, sh.e, w),
                |scratch, (i, ((dqi, dki), mut dvi))| {
                    let qf = Blocks::transpose_of(&head(&q, i)?, w);
                    let kf = Blocks::transpose_of(&head(&k, i)?, w);
                    let grad = HeadGrad {
                        g: head(&gv, i)?,
                        out: head(&ov, i)?,
                        den: den.row(i),
                    };
                    attend_head_backward(
                        scratch,
                        self.causal,
                        w,
                        &contexts[i],
                        &FeatureSource::Kept(&qf),
                        &FeatureSource::Kept(&kf),
                        &head(&v, i)?,
                        &grad,
                        &mut GradSink::Features(dqi),
                        &mut GradSink::Features(dki),
                        &mut dvi,
                        None,
                        sh.m,
                    )
                },
            )?;
        Ok(vec![
            needs[0].then(|| dq.into_array()),
            needs[1].then(|| dk.into_array()),
            needs[2].then(|| dv.into_array()),
        ])
    }
}

/// performer-pytorch's `linear_attention`: `out = D^-1 q'(k'^T v)` with `D = q'(k'^T 1)`, on
/// features `q'` `(..., n, m)`, `k'` `(..., nk, m)` and values `v` `(..., nk, e)`.
pub fn linear_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    linear_attention_chunked(q, k, v, DEFAULT_CHUNK)
}

/// [`linear_attention`] with a chosen row chunk (results do not depend on it beyond rounding).
pub fn linear_attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    check_chunk("linear_attention", chunk)?;
    Ok(apply_custom_op(
        LinearAttentionOp {
            causal: false,
            eps: 0.0,
            chunk,
            budget: SAVE_BUDGET_BYTES,
        },
        &[q, k, v],
    )?
    .remove(0))
}

/// performer-pytorch's causal linear attention: position i attends to positions <= i,
/// `out_i = q'_i sum_{j<=i} k'_j v_j^T / q'_i (sum_{j<=i} k'_j + eps)`, computed chunk by chunk
/// with a running state (no (n, m, d) tensor).
pub fn causal_linear_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    eps: f32,
    chunk: usize,
) -> Result<Tensor> {
    check_chunk("causal_linear_attention", chunk)?;
    Ok(apply_custom_op(
        LinearAttentionOp {
            causal: true,
            eps,
            chunk,
            budget: SAVE_BUDGET_BYTES,
        },
        &[q, k, v],
    )?
    .remove(0))
}
