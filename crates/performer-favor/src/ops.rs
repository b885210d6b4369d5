//! FAVOR+ as differentiable ops on tensors of shape `(..., n, d)` (usually `(b, h, n, d)`):
//! the feature maps on their own, linear attention on given features (non-causal and causal),
//! and the fused op that FastAttention runs, which never stores the features: its backward
//! recomputes them head by head, so memory stays O(n (m + d)) per head in flight.

use ndarray::{Array2, ArrayD, ArrayView2};
use performer_tensor::{CustomOp, Data, Error, Result, Tensor, apply_custom_op};
use rayon::prelude::*;

use crate::feature::{FeatureMap, FeatureSpec, check_projection};
use crate::heads::{HeadsOut, head, lead_shape, row_vectors, vector_views};
use crate::kernels::{self, CausalCache};

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

/// Bytes of per-head context (features, causal chunk states and score blocks) that a forward
/// may keep for its backward; above this the backward recomputes them. At the benchmark's
/// n = 4096 everything is kept; at n = 65536 the features are recomputed.
pub const SAVE_BUDGET_BYTES: usize = 512 << 20;

/// What one head's forward keeps for the backward.
#[derive(Default)]
struct HeadContext {
    /// `k'^T v+` (non-causal).
    kv: Option<Array2<f32>>,
    /// Chunk states and score blocks (causal).
    cache: Option<CausalCache>,
    /// The features (fused op only).
    features: Option<(Array2<f32>, Array2<f32>)>,
}

/// Normalizers `(heads, n)`, the output, and each head's context.
type AttentionSaved = (Array2<f32>, Data, Vec<HeadContext>);

/// What to keep, given the sizes: causal caches first (they save the most work per byte),
/// then features if they fit too.
fn save_plan(
    save: bool,
    causal: bool,
    heads: usize,
    n: usize,
    nk: usize,
    m: usize,
    e: usize,
    chunk: usize,
    with_features: bool,
) -> (bool, bool) {
    if !save {
        return (false, false);
    }
    let cache_bytes = if causal {
        heads * CausalCache::bytes(n, m, e, chunk)
    } else {
        0
    };
    let keep_cache = causal && cache_bytes <= SAVE_BUDGET_BYTES;
    let used = if keep_cache { cache_bytes } else { 0 };
    let feature_bytes = heads * (n + nk) * m * 4;
    (
        keep_cache,
        with_features && used + feature_bytes <= SAVE_BUDGET_BYTES,
    )
}

struct LinearAttentionOp {
    causal: bool,
    eps: f32,
    chunk: usize,
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
        let mut out = HeadsOut::zeros(&sh.lead, sh.n, sh.e);
        let heads = out.data.len_of(ndarray::Axis(0));
        let mut den = row_vectors(heads, sh.n);
        let (keep_cache, _) = save_plan(
            save,
            self.causal,
            heads,
            sh.n,
            sh.nk,
            sh.m,
            sh.e,
            self.chunk,
            false,
        );
        let contexts: Vec<HeadContext> = out
            .views()
            .into_par_iter()
            .zip(vector_views(&mut den))
            .enumerate()
            .map(|(i, (mut o, mut dn))| {
                let (qi, ki, vi) = (head(&q, i), head(&k, i), head(&v, i));
                attend_head(
                    &qi,
                    &ki,
                    &vi,
                    self.causal,
                    self.eps,
                    self.chunk,
                    keep_cache,
                    &mut o,
                    &mut dn,
                )
            })
            .collect::<Result<_>>()?;
        let out = out.into_array();
        let kept = if save {
            out.clone().into_shared()
        } else {
            ArrayD::zeros(ndarray::IxDyn(&[0])).into_shared()
        };
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
        let mut dq = HeadsOut::zeros(&sh.lead, sh.n, sh.m);
        let mut dk = HeadsOut::zeros(&sh.lead, sh.nk, sh.m);
        let mut dv = HeadsOut::zeros(&sh.lead, sh.nk, sh.e);
        dq.views()
            .into_par_iter()
            .zip(dk.views())
            .zip(dv.views())
            .enumerate()
            .try_for_each(|(i, ((mut dqi, mut dki), mut dvi))| {
                let (qi, ki, vi) = (head(&q, i), head(&k, i), head(&v, i));
                let grad = HeadGrad {
                    g: head(&gv, i),
                    out: head(&ov, i),
                    den: den.row(i),
                };
                attend_head_backward(
                    &qi,
                    &ki,
                    &vi,
                    &grad,
                    &contexts[i],
                    self.causal,
                    self.eps,
                    self.chunk,
                    &mut dqi,
                    &mut dki,
                    &mut dvi,
                )
            })?;
        Ok(vec![
            needs[0].then(|| dq.into_array()),
            needs[1].then(|| dk.into_array()),
            needs[2].then(|| dv.into_array()),
        ])
    }
}

/// One head's attention forward on features; returns what its backward needs.
#[allow(clippy::too_many_arguments)]
fn attend_head(
    qf: &ArrayView2<f32>,
    kf: &ArrayView2<f32>,
    v: &ArrayView2<f32>,
    causal: bool,
    eps: f32,
    chunk: usize,
    keep_cache: bool,
    out: &mut ndarray::ArrayViewMut2<f32>,
    den: &mut ndarray::ArrayViewMut1<f32>,
) -> Result<HeadContext> {
    if causal {
        let mut cache =
            keep_cache.then(|| CausalCache::new(qf.nrows(), qf.ncols(), v.ncols(), chunk));
        kernels::causal_forward(qf, kf, v, eps, chunk, out, den, cache.as_mut())?;
        Ok(HeadContext {
            cache,
            ..Default::default()
        })
    } else {
        let kv = kernels::noncausal_forward(qf, kf, v, out, den)?;
        Ok(HeadContext {
            kv: Some(kv),
            ..Default::default()
        })
    }
}

/// The output side of one head's backward: the gradient, the output and its normalizers.
struct HeadGrad<'a> {
    g: ArrayView2<'a, f32>,
    out: ArrayView2<'a, f32>,
    den: ndarray::ArrayView1<'a, f32>,
}

/// One head's attention backward on features.
#[allow(clippy::too_many_arguments)]
fn attend_head_backward(
    qf: &ArrayView2<f32>,
    kf: &ArrayView2<f32>,
    v: &ArrayView2<f32>,
    grad: &HeadGrad<'_>,
    ctx: &HeadContext,
    causal: bool,
    eps: f32,
    chunk: usize,
    dqf: &mut ndarray::ArrayViewMut2<f32>,
    dkf: &mut ndarray::ArrayViewMut2<f32>,
    dv: &mut ndarray::ArrayViewMut2<f32>,
) -> Result<()> {
    if causal {
        kernels::causal_backward(
            qf,
            kf,
            v,
            &grad.g,
            &grad.out,
            &grad.den,
            eps,
            chunk,
            ctx.cache.as_ref(),
            dqf,
            dkf,
            dv,
        )
    } else {
        let kv = match &ctx.kv {
            Some(kv) => kv.clone(),
            None => {
                let va = kernels::augment(v);
                let mut kv = Array2::<f32>::zeros((qf.ncols(), va.ncols()));
                performer_tensor::gemm::gemm_into(
                    &mut kv.view_mut(),
                    &kf.t(),
                    &va.view(),
                    1.0,
                    0.0,
                    performer_tensor::gemm::Threads::Single,
                )?;
                kv
            }
        };
        kernels::noncausal_backward(
            qf,
            kf,
            v,
            &kv.view(),
            &grad.g,
            &grad.out,
            &grad.den,
            dqf,
            dkf,
            dv,
        )
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
    fn spec(&self, d: usize, m: usize) -> FeatureSpec {
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

    /// Features of head `i`'s queries and keys.
    fn head_features(
        &self,
        spec: &FeatureSpec,
        qi: &ArrayView2<f32>,
        ki: &ArrayView2<f32>,
        p: &ArrayView2<f32>,
    ) -> Result<(Array2<f32>, Array2<f32>)> {
        let m = p.nrows();
        let mut qf = Array2::<f32>::zeros((qi.nrows(), m));
        let mut kf = Array2::<f32>::zeros((ki.nrows(), m));
        spec.features(qi, p, true, &mut qf.view_mut())?;
        spec.features(ki, p, false, &mut kf.view_mut())?;
        Ok((qf, kf))
    }
}

impl CustomOp for FavorAttentionOp {
    type Saved = AttentionSaved;

    fn name(&self) -> &'static str {
        "favor_attention"
    }

    fn forward(&self, inputs: &[&Data], save: bool) -> Result<(Vec<ArrayD<f32>>, Self::Saved)> {
        let (sh, d, m) = self.check(inputs)?;
        let spec = self.spec(d, m);
        let (q, k, v) = (inputs[0].view(), inputs[1].view(), inputs[2].view());
        let p: ArrayView2<f32> = inputs[3].view().into_dimensionality().expect("checked 2-D");
        let mut out = HeadsOut::zeros(&sh.lead, sh.n, sh.e);
        let heads = out.data.len_of(ndarray::Axis(0));
        let mut den = row_vectors(heads, sh.n);
        let (keep_cache, keep_features) = save_plan(
            save,
            self.causal,
            heads,
            sh.n,
            sh.nk,
            m,
            sh.e,
            self.chunk,
            true,
        );
        let contexts: Vec<HeadContext> = out
            .views()
            .into_par_iter()
            .zip(vector_views(&mut den))
            .enumerate()
            .map(|(i, (mut o, mut dn))| {
                let (qi, ki, vi) = (head(&q, i), head(&k, i), head(&v, i));
                let (qf, kf) = self.head_features(&spec, &qi, &ki, &p)?;
                let mut ctx = attend_head(
                    &qf.view(),
                    &kf.view(),
                    &vi,
                    self.causal,
                    CAUSAL_EPS,
                    self.chunk,
                    keep_cache,
                    &mut o,
                    &mut dn,
                )?;
                if keep_features {
                    ctx.features = Some((qf, kf));
                }
                Ok(ctx)
            })
            .collect::<Result<_>>()?;
        let out = out.into_array();
        let kept = if save {
            out.clone().into_shared()
        } else {
            ArrayD::zeros(ndarray::IxDyn(&[0])).into_shared()
        };
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
            return Ok(vec![None; 4]);
        };
        let refs: Vec<&Data> = inputs.iter().collect();
        let (sh, d, m) = self.check(&refs)?;
        let spec = self.spec(d, m);
        let (den, out, contexts) = saved;
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
                let ctx = &contexts[i];
                let recomputed;
                let (qf, kf) = match &ctx.features {
                    Some((qf, kf)) => (qf, kf),
                    None => {
                        recomputed = self.head_features(&spec, &qi, &ki, &p)?;
                        (&recomputed.0, &recomputed.1)
                    }
                };
                let mut dqf = Array2::<f32>::zeros((sh.n, m));
                let mut dkf = Array2::<f32>::zeros((sh.nk, m));
                let grad = HeadGrad {
                    g: head(&gv, i),
                    out: head(&ov, i),
                    den: den.row(i),
                };
                attend_head_backward(
                    &qf.view(),
                    &kf.view(),
                    &vi,
                    &grad,
                    ctx,
                    self.causal,
                    CAUSAL_EPS,
                    self.chunk,
                    &mut dqf.view_mut(),
                    &mut dkf.view_mut(),
                    &mut dvi,
                )?;
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
