//! FAVOR+ as differentiable ops on tensors of shape `(..., n, d)` (usually `(b, h, n, d)`):
//! the feature maps on their own, linear attention on given features (non-causal and causal),
//! and the fused op that FastAttention runs, which never stores the features: its backward
//! recomputes them head by head, so memory stays O(n (m + d)) per head in flight.

use ndarray::{Array2, ArrayD, ArrayView2};
use performer_tensor::{CustomOp, Data, Error, Result, Tensor, apply_custom_op};
use rayon::prelude::*;

use crate::feature::{FeatureMap, FeatureSpec, check_projection};
use crate::heads::{HeadsOut, head, lead_shape, row_vectors, vector_views};
use crate::kernels;

/// Rows per chunk of the linear attention kernels unless set otherwise.
pub const DEFAULT_CHUNK: usize = 64;

/// Epsilon added to the causal key prefix sums (the reference's value).
pub const CAUSAL_EPS: f32 = 1e-6;

fn check_chunk(op: &str, chunk: usize) -> Result<()> {
    if chunk == 0 {
        return Err(Error::invalid(op, "chunk", 0, "must be positive"));
    }
    Ok(())
}

/// Sums per-head projection gradients.
fn sum_heads(parts: Vec<Array2<f32>>, m: usize, d: usize) -> ArrayD<f32> {
    let mut total = Array2::<f32>::zeros((m, d));
    for p in parts {
        total += &p;
    }
    total.into_dyn()
}

// ---------------------------------------------------------------------------------------------
// Feature maps

struct FeatureMapOp {
    spec: FeatureSpec,
    is_query: bool,
}

impl FeatureMapOp {
    fn shapes(&self, inputs: &[&Data]) -> Result<(Vec<usize>, usize, usize, usize)> {
        let (x, p) = (inputs[0], inputs[1]);
        let lead = lead_shape(self.name(), "data", x.shape())?.to_vec();
        let (n, d) = (x.shape()[x.ndim() - 2], x.shape()[x.ndim() - 1]);
        check_projection(self.name(), p.shape(), d)?;
        Ok((lead, n, d, p.shape()[0]))
    }
}

impl CustomOp for FeatureMapOp {
    type Saved = ();

    fn name(&self) -> &'static str {
        match self.spec.map {
            FeatureMap::Softmax => "softmax_kernel",
            FeatureMap::Generalized(_) => "generalized_kernel",
        }
    }

    fn forward(&self, inputs: &[&Data], _save: bool) -> Result<(Vec<ArrayD<f32>>, ())> {
        let (lead, n, _d, m) = self.shapes(inputs)?;
        let (x, p) = (inputs[0].view(), inputs[1].view());
        let p2: ArrayView2<f32> = p.into_dimensionality().expect("checked 2-D");
        let mut out = HeadsOut::zeros(&lead, n, m);
        out.views()
            .into_par_iter()
            .enumerate()
            .try_for_each(|(i, mut o)| {
                self.spec.features(&head(&x, i), &p2, self.is_query, &mut o)
            })?;
        Ok((vec![out.into_array()], ()))
    }

    fn backward(
        &self,
        inputs: &[Data],
        _: &(),
        grads: &[Option<ArrayD<f32>>],
        needs: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let Some(g) = &grads[0] else {
            return Ok(vec![None, None]);
        };
        let refs: Vec<&Data> = inputs.iter().collect();
        let (lead, n, d, m) = self.shapes(&refs)?;
        let (x, p) = (inputs[0].view(), inputs[1].view());
        let p2: ArrayView2<f32> = p.into_dimensionality().expect("checked 2-D");
        let gv = g.view();
        let mut dx = HeadsOut::zeros(&lead, n, d);
        let parts: Vec<Option<Array2<f32>>> = dx
            .views()
            .into_par_iter()
            .enumerate()
            .map(|(i, mut dxi)| {
                let xi = head(&x, i);
                let mut feat = Array2::<f32>::zeros((n, m));
                self.spec
                    .features(&xi, &p2, self.is_query, &mut feat.view_mut())?;
                let mut gi = head(&gv, i).to_owned();
                let mut dp = needs[1].then(|| Array2::<f32>::zeros((m, d)));
                self.spec.backward(
                    &xi,
                    &p2,
                    &feat.view(),
                    &mut gi.view_mut(),
                    &mut dxi,
                    dp.as_mut(),
                )?;
                Ok(dp)
            })
            .collect::<Result<_>>()?;
        let dp = needs[1].then(|| sum_heads(parts.into_iter().flatten().collect(), m, d));
        Ok(vec![needs[0].then(|| dx.into_array()), dp])
    }
}

/// performer-pytorch's `softmax_kernel`: positive random features of `data` `(..., n, d)`
/// through `projection` `(m, d)`, giving `(..., n, m)`. Queries are stabilized per row, keys
/// by the max over each head (both treated as constants by the gradient, as the reference
/// detaches them).
pub fn softmax_kernel(
    data: &Tensor,
    projection: &Tensor,
    is_query: bool,
    normalize_data: bool,
    eps: f32,
) -> Result<Tensor> {
    let d = *data.shape().last().unwrap_or(&0);
    let m = projection.shape().first().copied().unwrap_or(0);
    let spec = FeatureSpec::new(FeatureMap::Softmax, d, m, normalize_data, eps);
    Ok(apply_custom_op(FeatureMapOp { spec, is_query }, &[data, projection])?.remove(0))
}

/// performer-pytorch's `generalized_kernel`: `kernel(dn * data P^T) + eps`, or without a
/// projection `kernel(dn * data) + eps`.
pub fn generalized_kernel(
    data: &Tensor,
    projection: Option<&Tensor>,
    kernel: performer_tensor::ops::Activation,
    normalize_data: bool,
    eps: f32,
) -> Result<Tensor> {
    let d = *data.shape().last().unwrap_or(&0);
    let Some(projection) = projection else {
        let dn = if normalize_data {
            (d as f32).powf(-0.25)
        } else {
            1.0
        };
        return Ok(kernel.apply(&data.mul_scalar(dn)).add_scalar(eps));
    };
    let m = projection.shape().first().copied().unwrap_or(0);
    let spec = FeatureSpec::new(FeatureMap::Generalized(kernel), d, m, normalize_data, eps);
    Ok(apply_custom_op(
        FeatureMapOp {
            spec,
            is_query: true,
        },
        &[data, projection],
    )?
    .remove(0))
}

// ---------------------------------------------------------------------------------------------
// Linear attention on features

/// Shapes of an attention call: lead, n (queries), nk (keys), m (features or head dim), e (value dim).
struct AttnShapes {
    lead: Vec<usize>,
    n: usize,
    nk: usize,
    m: usize,
    e: usize,
}

fn attention_shapes(
    op: &str,
    q: &[usize],
    k: &[usize],
    v: &[usize],
    causal: bool,
) -> Result<AttnShapes> {
    let lead = lead_shape(op, "q", q)?.to_vec();
    let lk = lead_shape(op, "k", k)?;
    let lv = lead_shape(op, "v", v)?;
    let r = q.len();
    let (n, m) = (q[r - 2], q[r - 1]);
    let (nk, mk) = (k[k.len() - 2], k[k.len() - 1]);
    let (nv, e) = (v[v.len() - 2], v[v.len() - 1]);
    if lk != lead.as_slice() || lv != lead.as_slice() || mk != m || nv != nk || (causal && nk != n)
    {
        return Err(Error::shape(
            op,
            format!(
                "q {q:?}, k {k:?}, v {v:?}: need equal leading axes, q and k of one feature size, \
                 k and v of one length{}",
                if causal {
                    ", and (causal) q and k of one length"
                } else {
                    ""
                }
            ),
        ));
    }
    Ok(AttnShapes { lead, n, nk, m, e })
}

struct LinearAttentionOp {
    causal: bool,
    eps: f32,
    chunk: usize,
}

impl CustomOp for LinearAttentionOp {
    /// Normalizers `(heads, n)` and the output, for the backward.
    type Saved = (Array2<f32>, Data);

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
        let mut out = HeadsOut::zeros(&sh.lead, sh.n, sh.e);
        let mut den = row_vectors(out.data.len_of(ndarray::Axis(0)), sh.n);
        out.views()
            .into_par_iter()
            .zip(vector_views(&mut den))
            .enumerate()
            .try_for_each(|(i, (mut o, mut dn))| {
                let (qi, ki, vi) = (head(&q, i), head(&k, i), head(&v, i));
                if self.causal {
                    kernels::causal_forward(&qi, &ki, &vi, self.eps, self.chunk, &mut o, &mut dn)
                } else {
                    kernels::noncausal_forward(&qi, &ki, &vi, self.chunk, &mut o, &mut dn)
                }
            })?;
        let out = out.into_array();
        let kept = if save {
            out.clone().into_shared()
        } else {
            ArrayD::zeros(ndarray::IxDyn(&[0])).into_shared()
        };
        Ok((vec![out], (den, kept)))
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
        let (den, out) = saved;
        let (q, k, v, ov, gv) = (
            inputs[0].view(),
            inputs[1].view(),
            inputs[2].view(),
            out.view(),
            g.view(),
        );
        let mut dq = HeadsOut::zeros(&sh.lead, sh.n, sh.m);
        let mut dk = HeadsOut::zeros(&sh.lead, sh.nk, sh.m);
        let mut dv = HeadsOut::zeros(&sh.lead, sh.nk, sh.e);
        dq.views()
            .into_par_iter()
            .zip(dk.views())
            .zip(dv.views())
            .enumerate()
            .try_for_each(|(i, ((mut dqi, mut dki), mut dvi))| {
                let (qi, ki, vi, gi, oi) = (
                    head(&q, i),
                    head(&k, i),
                    head(&v, i),
                    head(&gv, i),
                    head(&ov, i),
                );
                if self.causal {
                    kernels::causal_backward(
                        &qi,
                        &ki,
                        &vi,
                        &gi,
                        &oi,
                        &den.row(i),
                        self.eps,
                        self.chunk,
                        &mut dqi,
                        &mut dki,
                        &mut dvi,
                    )
                } else {
                    kernels::noncausal_backward(
                        &qi,
                        &ki,
                        &vi,
                        &gi,
                        &oi,
                        &den.row(i),
                        self.chunk,
                        &mut dqi,
                        &mut dki,
                        &mut dvi,
                    )
                }
            })?;
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
        },
        &[q, k, v],
    )?
    .remove(0))
}

// ---------------------------------------------------------------------------------------------
// The fused op

struct FavorAttentionOp {
    map: FeatureMap,
    eps: f32,
    causal: bool,
    chunk: usize,
}

impl FavorAttentionOp {
    fn specs(&self, d: usize, m: usize) -> FeatureSpec {
        FeatureSpec::new(self.map, d, m, true, self.eps)
    }

    fn check(&self, inputs: &[&Data]) -> Result<(AttnShapes, usize, usize)> {
        let sh = attention_shapes(
            self.name(),
            inputs[0].shape(),
            inputs[1].shape(),
            inputs[2].shape(),
            self.causal,
        )?;
        let d = sh.m;
        check_projection(self.name(), inputs[3].shape(), d)?;
        Ok((sh, d, inputs[3].shape()[0]))
    }
}

impl CustomOp for FavorAttentionOp {
    /// Normalizers `(heads, n)` and the output, for the backward.
    type Saved = (Array2<f32>, Data);

    fn name(&self) -> &'static str {
        "favor_attention"
    }

    fn forward(&self, inputs: &[&Data], save: bool) -> Result<(Vec<ArrayD<f32>>, Self::Saved)> {
        let (sh, d, m) = self.check(inputs)?;
        let spec = self.specs(d, m);
        let (q, k, v) = (inputs[0].view(), inputs[1].view(), inputs[2].view());
        let p: ArrayView2<f32> = inputs[3].view().into_dimensionality().expect("checked 2-D");
        let mut out = HeadsOut::zeros(&sh.lead, sh.n, sh.e);
        let mut den = row_vectors(out.data.len_of(ndarray::Axis(0)), sh.n);
        out.views()
            .into_par_iter()
            .zip(vector_views(&mut den))
            .enumerate()
            .try_for_each(|(i, (mut o, mut dn))| {
                let (qi, ki, vi) = (head(&q, i), head(&k, i), head(&v, i));
                let mut qf = Array2::<f32>::zeros((sh.n, m));
                let mut kf = Array2::<f32>::zeros((sh.nk, m));
                spec.features(&qi, &p, true, &mut qf.view_mut())?;
                spec.features(&ki, &p, false, &mut kf.view_mut())?;
                if self.causal {
                    kernels::causal_forward(
                        &qf.view(),
                        &kf.view(),
                        &vi,
                        CAUSAL_EPS,
                        self.chunk,
                        &mut o,
                        &mut dn,
                    )
                } else {
                    kernels::noncausal_forward(
                        &qf.view(),
                        &kf.view(),
                        &vi,
                        self.chunk,
                        &mut o,
                        &mut dn,
                    )
                }
            })?;
        let out = out.into_array();
        let saved = if save {
            out.clone().into_shared()
        } else {
            ArrayD::zeros(ndarray::IxDyn(&[0])).into_shared()
        };
        Ok((vec![out], (den, saved)))
    }

    fn backward(
        &self,
        inputs: &[Data],
        saved: &Self::Saved,
        grads: &[Option<ArrayD<f32>>],
        needs: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let Some(g) = &grads[0] else {
            return Ok(vec![None; 4]);
        };
        let refs: Vec<&Data> = inputs.iter().collect();
        let (sh, d, m) = self.check(&refs)?;
        let spec = self.specs(d, m);
        let (den, out) = saved;
        let (q, k, v, ov, gv) = (
            inputs[0].view(),
            inputs[1].view(),
            inputs[2].view(),
            out.view(),
            g.view(),
        );
        let p: ArrayView2<f32> = inputs[3].view().into_dimensionality().expect("checked 2-D");
        let mut dq = HeadsOut::zeros(&sh.lead, sh.n, d);
        let mut dk = HeadsOut::zeros(&sh.lead, sh.nk, d);
        let mut dv = HeadsOut::zeros(&sh.lead, sh.nk, sh.e);
        let parts: Vec<Option<Array2<f32>>> = dq
            .views()
            .into_par_iter()
            .zip(dk.views())
            .zip(dv.views())
            .enumerate()
            .map(|(i, ((mut dqi, mut dki), mut dvi))| {
                let (qi, ki, vi) = (head(&q, i), head(&k, i), head(&v, i));
                let mut qf = Array2::<f32>::zeros((sh.n, m));
                let mut kf = Array2::<f32>::zeros((sh.nk, m));
                spec.features(&qi, &p, true, &mut qf.view_mut())?;
                spec.features(&ki, &p, false, &mut kf.view_mut())?;
                let mut dqf = Array2::<f32>::zeros((sh.n, m));
                let mut dkf = Array2::<f32>::zeros((sh.nk, m));
                let (gi, oi, deni) = (head(&gv, i), head(&ov, i), den.row(i));
                if self.causal {
                    kernels::causal_backward(
                        &qf.view(),
                        &kf.view(),
                        &vi,
                        &gi,
                        &oi,
                        &deni,
                        CAUSAL_EPS,
                        self.chunk,
                        &mut dqf.view_mut(),
                        &mut dkf.view_mut(),
                        &mut dvi,
                    )?;
                } else {
                    kernels::noncausal_backward(
                        &qf.view(),
                        &kf.view(),
                        &vi,
                        &gi,
                        &oi,
                        &deni,
                        self.chunk,
                        &mut dqf.view_mut(),
                        &mut dkf.view_mut(),
                        &mut dvi,
                    )?;
                }
                let mut dp = needs[3].then(|| Array2::<f32>::zeros((m, d)));
                spec.backward(
                    &qi,
                    &p,
                    &qf.view(),
                    &mut dqf.view_mut(),
                    &mut dqi,
                    dp.as_mut(),
                )?;
                spec.backward(
                    &ki,
                    &p,
                    &kf.view(),
                    &mut dkf.view_mut(),
                    &mut dki,
                    dp.as_mut(),
                )?;
                Ok(dp)
            })
            .collect::<Result<_>>()?;
        let dp = needs[3].then(|| sum_heads(parts.into_iter().flatten().collect(), m, d));
        Ok(vec![
            needs[0].then(|| dq.into_array()),
            needs[1].then(|| dk.into_array()),
            needs[2].then(|| dv.into_array()),
            dp,
        ])
    }
}

/// FAVOR+ attention in one fused op: features of `q` and `k` `(..., n, d)` through
/// `projection` `(m, d)` with the given map, then non-causal or causal linear attention with
/// `v` `(..., nk, e)`. Equal to composing [`softmax_kernel`] (or [`generalized_kernel`]) with
/// [`linear_attention`] / [`causal_linear_attention`], without storing the features: the
/// backward recomputes them per head.
pub fn favor_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    projection: &Tensor,
    map: FeatureMap,
    causal: bool,
    chunk: usize,
) -> Result<Tensor> {
    check_chunk("favor_attention", chunk)?;
    let eps = match map {
        FeatureMap::Softmax => 1e-4,
        FeatureMap::Generalized(_) => 1e-3,
    };
    Ok(apply_custom_op(
        FavorAttentionOp {
            map,
            eps,
            causal,
            chunk,
        },
        &[q, k, v, projection],
    )?
    .remove(0))
}
