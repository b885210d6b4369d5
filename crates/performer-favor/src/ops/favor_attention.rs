//! The fused op that FastAttention runs ([`favor_attention`]): feature maps and linear
//! attention per head, the features kept for the backward while they fit the budget; and the
//! causal prompt pass of decoding ([`favor_causal_primed`]).

use ndarray::{Array2, ArrayD, ArrayView2, ArrayViewD, ArrayViewMut1, ArrayViewMut2, Axis};
use performer_tensor::{CustomOp, Data, Result, Tensor, apply_custom_op};
use rayon::prelude::*;

use super::arguments::{AttnShapes, CAUSAL_EPS, attention_shapes, check_chunk};
use super::feature_maps::sum_heads;
use super::head_attention::{
    AttentionSaved, BackwardScratch, FeatureSource, GradSink, HeadContext, HeadGrad, attend_head,
    attend_head_backward, features_into, kept_output,
};
use super::save_plan::{SAVE_BUDGET_BYTES, SavePlan, SaveRequest, block_width};
use crate::column_blocks::Blocks;
use crate::feature::{FeatureMap, FeatureSpec, check_projection};
use crate::heads::{HeadsOut, head, row_vectors, vector_views};
use crate::linear_math::FinalSums;

/// The fused op's work on one head, from rows to output: features of the queries and keys
/// (transposed, in blocks), then linear attention.
struct FusedHeads<'a> {
    spec: FeatureSpec,
    p: ArrayView2<'a, f32>,
    causal: bool,
    width: usize,
    plan: SavePlan,
}

impl FusedHeads<'_> {
    /// One head: `q` (n, d), `k` (nk, d), `v` (nk, e) into `out` (n, e) and `den` (n). Returns
    /// the head's context for the backward and, for causal attention, its sums over every
    /// position (the keys' softmax stabilizer is in the context).
    fn head(
        &self,
        q: &ArrayView2<f32>,
        k: &ArrayView2<f32>,
        v: &ArrayView2<f32>,
        out: &mut ArrayViewMut2<f32>,
        den: &mut ArrayViewMut1<f32>,
    ) -> Result<(HeadContext, Option<FinalSums>)> {
        let m = self.p.nrows();
        // Projections write every block.
        let mut qf = Blocks::for_overwrite(m, q.nrows(), self.width);
        features_into(&self.spec, q, &self.p, &mut qf, false)?;
        let mut kf = Blocks::for_overwrite(m, k.nrows(), self.width);
        let key_stab = features_into(&self.spec, k, &self.p, &mut kf, true)?;
        let (mut ctx, sums) =
            attend_head(&qf, &kf, v, self.causal, CAUSAL_EPS, self.plan, out, den)?;
        ctx.key_stab = key_stab;
        if self.plan.features {
            ctx.features = Some((qf, kf));
        }
        Ok((ctx, sums))
    }
}

struct FavorAttentionOp {
    map: FeatureMap,
    eps: f32,
    causal: bool,
    chunk: usize,
    /// Bytes the forward may keep ([`SAVE_BUDGET_BYTES`]).
    budget: usize,
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
            m,
            e: sh.e,
            chunk: self.chunk,
            with_features: true,
            budget: self.budget,
        }
        .plan();
        let fused = FusedHeads {
            spec,
            p,
            causal: self.causal,
            width: block_width(self.causal, self.chunk),
            plan,
        };
        let contexts: Vec<HeadContext> = out
            .views()
            .into_par_iter()
            .zip(vector_views(&mut den))
            .enumerate()
            .map(|(i, (mut o, mut dn))| {
                let (ctx, _) =
                    fused.head(&head(&q, i)?, &head(&k, i)?, &head(&v, i)?, &mut o, &mut dn)?;
                Ok(ctx)
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
        let w = block_width(self.causal, self.chunk);
        // The backward writes every block of every gradient.
        let mut dq = HeadsOut::for_overwrite(&sh.lead, sh.n, d);
        let mut dk = HeadsOut::for_overwrite(&sh.lead, sh.nk, d);
        let mut dv = HeadsOut::for_overwrite(&sh.lead, sh.nk, sh.e);
        let parts: Vec<Option<Array2<f32>>> = dq
            .views()
            .into_par_iter()
            .zip(dk.views())
            .zip(dv.views())
            .enumerate()
            .map_init(
                || BackwardScratch::new(self.causal, m, sh.e, w),
                |scratch, (i, ((dqi, dki), mut dvi))| {
                    let (qi, ki, vi) = (head(&q, i)?, head(&k, i)?, head(&v, i)?);
                    let ctx = &contexts[i];
                    let (q_src, k_src) = match &ctx.features {
                        Some((qf, kf)) => (FeatureSource::Kept(qf), FeatureSource::Kept(kf)),
                        None => (
                            FeatureSource::Recompute {
                                spec,
                                x: qi.view(),
                                width: w,
                                proj: p.view(),
                                stab: None,
                            },
                            FeatureSource::Recompute {
                                spec,
                                x: ki.view(),
                                width: w,
                                proj: p.view(),
                                stab: Some(ctx.key_stab),
                            },
                        ),
                    };
                    let grad = HeadGrad {
                        g: head(&gv, i)?,
                        out: head(&ov, i)?,
                        den: den.row(i),
                    };
                    let mut dp = needs[3].then(|| Array2::<f32>::zeros((m, d)));
                    attend_head_backward(
                        scratch,
                        self.causal,
                        w,
                        ctx,
                        &q_src,
                        &k_src,
                        &vi,
                        &grad,
                        &mut GradSink::Rows {
                            spec,
                            x: qi.view(),
                            proj: p.view(),
                            dx: dqi,
                        },
                        &mut GradSink::Rows {
                            spec,
                            x: ki.view(),
                            proj: p.view(),
                            dx: dki,
                        },
                        &mut dvi,
                        dp.as_mut(),
                        m,
                    )?;
                    Ok(dp)
                },
            )
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

/// FAVOR+ attention in one fused op: features of `q` and `k` `(..., n, d)` through `projection`
/// `(m, d)` with the given map, then non-causal or causal linear attention with `v` `(..., nk, e)`.
/// Equal to composing [`softmax_kernel`](crate::softmax_kernel) (or
/// [`generalized_kernel`](crate::generalized_kernel)) with
/// [`linear_attention`](crate::linear_attention) /
/// [`causal_linear_attention`](crate::causal_linear_attention); the features are kept for the
/// backward only while they fit [`SAVE_BUDGET_BYTES`], else recomputed block by block.
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
    Ok(apply_custom_op(
        FavorAttentionOp {
            map,
            eps: map.eps(),
            causal,
            chunk,
            budget: SAVE_BUDGET_BYTES,
        },
        &[q, k, v, projection],
    )?
    .remove(0))
}

/// What causal attention over a sequence from its first position leaves behind, per head, for
/// decoding to continue from.
pub(crate) struct PrimedHead {
    /// The sums over every position.
    pub sums: FinalSums,
    /// The keys' softmax stabilizer (the max of their projections; unused by other maps).
    pub key_stab: f32,
}

/// Causal FAVOR+ attention of `q`, `k`, `v` `(..., n, d)` with projection `p` (m, d), as
/// [`favor_attention`] computes it but recording no graph, and each head's sums after the last
/// position: the prompt's pass of decoding, which would otherwise compute the keys' features
/// and sums a second time. Errors name `FastAttention::forward_extending`, its one caller.
pub(crate) fn favor_causal_primed(
    q: &ArrayViewD<f32>,
    k: &ArrayViewD<f32>,
    v: &ArrayViewD<f32>,
    p: &ArrayView2<f32>,
    map: FeatureMap,
    chunk: usize,
) -> Result<(ArrayD<f32>, Vec<PrimedHead>)> {
    const OP: &str = "FastAttention::forward_extending";
    check_chunk(OP, chunk)?;
    let sh = attention_shapes(OP, q.shape(), k.shape(), v.shape(), true)?;
    check_projection(OP, p.shape(), sh.m)?;
    let m = p.nrows();
    let mut out = HeadsOut::for_overwrite(&sh.lead, sh.n, sh.e);
    let heads = out.data.len_of(Axis(0));
    let mut den = row_vectors(heads, sh.n);
    let fused = FusedHeads {
        spec: FeatureSpec::new(map, sh.m, m, true, map.eps()),
        p: p.view(),
        causal: true,
        width: block_width(true, chunk),
        plan: SaveRequest {
            save: false,
            causal: true,
            heads,
            n: sh.n,
            nk: sh.nk,
            m,
            e: sh.e,
            chunk,
            with_features: true,
            budget: 0,
        }
        .plan(),
    };
    let primed = out
        .views()
        .into_par_iter()
        .zip(vector_views(&mut den))
        .enumerate()
        .map(|(i, (mut o, mut dn))| {
            let (ctx, sums) =
                fused.head(&head(q, i)?, &head(k, i)?, &head(v, i)?, &mut o, &mut dn)?;
            Ok(PrimedHead {
                sums: sums.expect("causal attention ends with its sums"),
                key_stab: ctx.key_stab,
            })
        })
        .collect::<Result<_>>()?;
    Ok((out.into_array(), primed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::{OrthoScaling, gaussian_orthogonal_random_matrix_with};
    use ndarray::IxDyn;
    use performer_tensor::ops::Activation;
    use performer_tensor::rng::Generator;

    fn randn(shape: &[usize], seed: u64, scale: f32) -> ArrayD<f32> {
        let mut g = Generator::seeded(seed);
        ArrayD::from_shape_simple_fn(IxDyn(shape), || scale * g.normal())
    }

    fn rel_err(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
        performer_tensor::testing::relative_error(a, b).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Output and gradients of (q, k, v, projection) of the fused op with a given budget.
    fn run_fused(
        map: FeatureMap,
        causal: bool,
        chunk: usize,
        budget: usize,
        n: usize,
    ) -> Vec<ArrayD<f32>> {
        let (d, m) = (8, 12);
        let q = Tensor::var(randn(&[1, 2, n, d], 1, 0.7));
        let k = Tensor::var(randn(&[1, 2, n, d], 2, 0.7));
        let v = Tensor::var(randn(&[1, 2, n, d], 3, 1.0));
        let p = Tensor::var(
            gaussian_orthogonal_random_matrix_with(
                m,
                d,
                OrthoScaling::Gaussian,
                &mut Generator::seeded(4),
            )
            .unwrap()
            .into_dyn(),
        );
        let op = FavorAttentionOp {
            map,
            eps: map.eps(),
            causal,
            chunk,
            budget,
        };
        let out = apply_custom_op(op, &[&q, &k, &v, &p]).unwrap().remove(0);
        let probe = Tensor::new(randn(out.shape(), 5, 1.0));
        let g = out.mul(&probe).unwrap().sum_all().backward().unwrap();
        let mut res = vec![out.to_array()];
        res.extend([&q, &k, &v, &p].map(|t| g.get(t).unwrap().clone()));
        res
    }

    /// With no budget the backward recomputes features per segment and causal states from one
    /// checkpoint per segment; results equal those of keeping everything.
    #[test]
    fn recomputing_equals_keeping() {
        let n = 300; // two segments, the last with a partial chunk
        let request = |budget| SaveRequest {
            save: true,
            causal: true,
            heads: 2,
            n,
            nk: n,
            m: 12,
            e: 8,
            chunk: 16,
            with_features: true,
            budget,
        };
        assert_eq!(request(0).plan().state_every, 16);
        assert!(!request(0).plan().features);
        let full = request(usize::MAX).plan();
        assert!(full.features && full.state_every == 1);
        for causal in [false, true] {
            for map in [
                FeatureMap::Softmax,
                FeatureMap::Generalized(Activation::Relu),
            ] {
                let kept = run_fused(map, causal, 16, usize::MAX, n);
                let redone = run_fused(map, causal, 16, 0, n);
                for (i, (a, b)) in redone.iter().zip(&kept).enumerate() {
                    let err = rel_err(a, b);
                    assert!(
                        err < 1e-5,
                        "{map:?} causal {causal}: output {i} differs by {err}"
                    );
                }
            }
        }
    }

    /// Heads that share one thread's backward scratch (a one-thread pool runs every head on
    /// it, one after another) get the bits of each head run alone, causal and not, with
    /// features kept and recomputed, and a partial last chunk.
    #[test]
    fn heads_sharing_backward_scratch_equal_heads_alone() {
        let (heads, n, d, m) = (5, 150, 8, 12);
        let q = randn(&[1, heads, n, d], 11, 0.7);
        let k = randn(&[1, heads, n, d], 12, 0.7);
        let v = randn(&[1, heads, n, d], 13, 1.0);
        let probe = randn(&[1, heads, n, d], 14, 1.0);
        let p = gaussian_orthogonal_random_matrix_with(
            m,
            d,
            OrthoScaling::Gaussian,
            &mut Generator::seeded(15),
        )
        .unwrap()
        .into_dyn();
        let grads = |q: ArrayD<f32>, k, v, probe, causal, budget| {
            let (q, k, v) = (Tensor::var(q), Tensor::var(k), Tensor::var(v));
            let op = FavorAttentionOp {
                map: FeatureMap::Softmax,
                eps: FeatureMap::Softmax.eps(),
                causal,
                chunk: 32,
                budget,
            };
            let proj = Tensor::new(p.clone());
            let out = apply_custom_op(op, &[&q, &k, &v, &proj]).unwrap().remove(0);
            let g = out
                .mul(&Tensor::new(probe))
                .unwrap()
                .sum_all()
                .backward()
                .unwrap();
            [&q, &k, &v].map(|t| g.get(t).unwrap().clone())
        };
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let head_of = |a: &ArrayD<f32>, h: usize| {
            a.slice(ndarray::s![.., h..h + 1, .., ..])
                .to_owned()
                .into_dyn()
        };
        for causal in [true, false] {
            for budget in [0, usize::MAX] {
                let shared = one_thread.install(|| {
                    grads(
                        q.clone(),
                        k.clone(),
                        v.clone(),
                        probe.clone(),
                        causal,
                        budget,
                    )
                });
                for h in 0..heads {
                    let alone = grads(
                        head_of(&q, h),
                        head_of(&k, h),
                        head_of(&v, h),
                        head_of(&probe, h),
                        causal,
                        budget,
                    );
                    for (which, (all, one)) in shared.iter().zip(&alone).enumerate() {
                        let all = head_of(all, h);
                        assert_eq!(all.shape(), one.shape());
                        assert!(
                            all.iter().zip(one).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "causal {causal} budget {budget}: head {h}, gradient {which}"
                        );
                    }
                }
            }
        }
    }

    /// Chunk sizes that do and do not divide the segment give the same results.
    #[test]
    fn chunk_size_does_not_change_results() {
        let n = 300;
        let base = run_fused(FeatureMap::Softmax, true, 16, 0, n);
        for chunk in [1, 7, 64, 100, 512] {
            for budget in [0, usize::MAX] {
                let other = run_fused(FeatureMap::Softmax, true, chunk, budget, n);
                for (i, (a, b)) in other.iter().zip(&base).enumerate() {
                    let err = rel_err(a, b);
                    assert!(
                        err < 2e-5,
                        "chunk {chunk} budget {budget}: output {i} differs by {err}"
                    );
                }
            }
        }
    }
}
