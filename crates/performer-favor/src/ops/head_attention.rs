//! One head's linear attention, forward and backward, on transposed features in column blocks
//! ([`Blocks`]): where the backward finds features (kept or recomputed) and where it sends
//! their gradients (to the features, or through the feature map to the rows).

use ndarray::{
    Array2, Array3, ArrayD, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis, s,
};
use performer_tensor::{Data, Error, Result};

use super::save_plan::SavePlan;
use crate::column_blocks::{Blocks, transpose_into};
use crate::feature::{FeatureMap, FeatureSpec};
use crate::linear_math::{
    self, CausalBackward, CausalChunk, CausalStates, FinalSums, NonCausalBackward, NonCausalContext,
};

/// What one head's forward keeps for the backward.
#[derive(Default)]
pub(super) struct HeadContext {
    /// Non-causal: `k'^T v` and `k'^T 1`.
    pub(super) noncausal: Option<NonCausalContext>,
    /// Causal: saved states.
    pub(super) states: Option<CausalStates>,
    /// Transposed features `q'^T`, `k'^T` (fused op only, when the plan keeps them).
    pub(super) features: Option<(Blocks, Blocks)>,
    /// The keys' softmax stabilizer (fused op only).
    pub(super) key_stab: f32,
}

/// Normalizers `(heads, n)`, the output, and each head's context.
pub(super) type AttentionSaved = (Array2<f32>, Data, Vec<HeadContext>);

/// One head's attention forward on transposed features; returns what its backward needs and,
/// for causal attention, the sums over every position.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_head(
    qf: &Blocks,
    kf: &Blocks,
    v: &ArrayView2<f32>,
    causal: bool,
    eps: f32,
    plan: SavePlan,
    out: &mut ArrayViewMut2<f32>,
    den: &mut ArrayViewMut1<f32>,
) -> Result<(HeadContext, Option<FinalSums>)> {
    let (m, e) = (qf.rows(), v.ncols());
    if causal {
        let mut states = plan.save.then(|| {
            CausalStates::new(qf.count(), m, e, qf.width(), plan.state_every, plan.scores)
        });
        let sums = linear_math::causal_forward(qf, kf, v, eps, out, den, states.as_mut())?;
        Ok((
            HeadContext {
                states,
                ..Default::default()
            },
            Some(sums),
        ))
    } else {
        let mut ctx = NonCausalContext::new(m, e);
        for b in 0..kf.count() {
            let (c0, c1) = kf.range(b);
            ctx.add(&kf.block(b), &v.slice(s![c0..c1, ..]))?;
        }
        for b in 0..qf.count() {
            let (c0, c1) = qf.range(b);
            ctx.readout(
                &qf.block(b),
                &mut out.slice_mut(s![c0..c1, ..]),
                &mut den.slice_mut(s![c0..c1]),
            )?;
        }
        Ok((
            HeadContext {
                noncausal: plan.save.then_some(ctx),
                ..Default::default()
            },
            None,
        ))
    }
}

/// Transposed features of rows `x` (n, d) into `out`, block by block while each block is in
/// cache: queries are stabilized per position; keys by the max of all their projections,
/// which is returned (softmax only).
pub(super) fn features_into(
    spec: &FeatureSpec,
    x: &ArrayView2<f32>,
    proj: &ArrayView2<f32>,
    out: &mut Blocks,
    key: bool,
) -> Result<f32> {
    let softmax_key = key && spec.map == FeatureMap::Softmax;
    let mut stab = f32::NEG_INFINITY;
    for b in 0..out.count() {
        let (c0, c1) = out.range(b);
        let xb = x.slice(s![c0..c1, ..]);
        let mut blk = out.block_mut(b);
        // The GEMM reads the rows' transpose through strides (cheaper than copying it).
        spec.project_t(&xb.t(), proj, &mut blk)?;
        if softmax_key {
            let m = spec.key_stabilizer(&blk.view());
            stab = if m > stab || m.is_nan() { m } else { stab };
        } else if !key {
            spec.activate_t(&xb, &mut blk, None);
        }
    }
    if !key {
        return Ok(0.0);
    }
    let stab = if softmax_key { stab } else { 0.0 };
    for b in 0..out.count() {
        let (c0, c1) = out.range(b);
        spec.activate_t(&x.slice(s![c0..c1, ..]), &mut out.block_mut(b), Some(stab));
    }
    Ok(stab)
}

/// Where a backward finds blocks of transposed features (m, l).
pub(super) enum FeatureSource<'a> {
    /// The whole head's, kept or given.
    Kept(&'a Blocks),
    /// Recomputed from the rows `x` (n, d) in blocks of `width`.
    Recompute {
        spec: FeatureSpec,
        x: ArrayView2<'a, f32>,
        width: usize,
        proj: ArrayView2<'a, f32>,
        stab: Option<f32>,
    },
}

impl FeatureSource<'_> {
    /// Blocks `b0..b1`, recomputed into `scratch` (at least `b1 - b0` blocks) when needed.
    fn blocks<'s>(
        &'s self,
        b0: usize,
        b1: usize,
        scratch: &'s mut Blocks,
    ) -> Result<Vec<ArrayView2<'s, f32>>> {
        match self {
            FeatureSource::Kept(f) => Ok((b0..b1).map(|b| f.block(b)).collect()),
            FeatureSource::Recompute {
                spec,
                x,
                width,
                proj,
                stab,
            } => {
                let mut widths = Vec::with_capacity(b1 - b0);
                for (t, b) in (b0..b1).enumerate() {
                    let (c0, c1) = (b * width, ((b + 1) * width).min(x.nrows()));
                    let xb = x.slice(s![c0..c1, ..]);
                    let mut dst = scratch.block_mut(t);
                    let mut dst = dst.slice_mut(s![.., ..c1 - c0]);
                    spec.project_t(&xb.t(), proj, &mut dst)?;
                    spec.activate_t(&xb, &mut dst, *stab);
                    widths.push(c1 - c0);
                }
                let scratch = &*scratch;
                Ok(widths
                    .into_iter()
                    .enumerate()
                    .map(|(t, l)| scratch.block(t).slice_move(s![.., ..l]))
                    .collect())
            }
        }
    }

    /// Scratch for up to `count` blocks of `m` features and `width` positions (none when kept).
    fn scratch(&self, m: usize, count: usize, width: usize) -> Blocks {
        match self {
            FeatureSource::Kept(_) => Blocks::zeros(m, 0, width),
            // Recomputation writes each block before it is handed out.
            FeatureSource::Recompute { .. } => Blocks::for_overwrite(m, count * width, width),
        }
    }
}

/// Where a backward sends a block of transposed feature gradients (m, l).
pub(super) enum GradSink<'a> {
    /// The op's inputs are the features: their gradient `(n, m)`.
    Features(ArrayViewMut2<'a, f32>),
    /// Through the feature map into the gradient `dx` (n, d) of the rows `x`.
    Rows {
        spec: FeatureSpec,
        x: ArrayView2<'a, f32>,
        proj: ArrayView2<'a, f32>,
        dx: ArrayViewMut2<'a, f32>,
    },
}

impl GradSink<'_> {
    /// Takes the gradient `g` of the features `feat` of positions `c0..c1` (`g` may be
    /// overwritten), adding the projection's gradient into `dproj` when given.
    fn block(
        &mut self,
        (c0, c1): (usize, usize),
        feat: &ArrayView2<f32>,
        g: &mut ArrayViewMut2<f32>,
        dproj: Option<&mut Array2<f32>>,
    ) -> Result<()> {
        match self {
            GradSink::Features(dq) => {
                transpose_into(&g.view(), &mut dq.slice_mut(s![c0..c1, ..]));
                Ok(())
            }
            GradSink::Rows { spec, x, proj, dx } => spec.backward_t(
                &x.slice(s![c0..c1, ..]),
                Some(&x.slice(s![c0..c1, ..]).t()),
                proj,
                feat,
                g,
                &mut dx.slice_mut(s![c0..c1, ..]),
                dproj,
            ),
        }
    }
}

/// The output side of one head's backward: the gradient, the output and its normalizers.
pub(super) struct HeadGrad<'a> {
    pub(super) g: ArrayView2<'a, f32>,
    pub(super) out: ArrayView2<'a, f32>,
    pub(super) den: ArrayView1<'a, f32>,
}

/// The buffers of one head's backward, which it writes before reading: made once per thread
/// and reused head after head (a causal head's backward zeroed about 100 KB of fresh scratch at
/// dim_head 32 and chunk 64, more than its products at small sizes).
pub(super) struct BackwardScratch {
    dq: Array2<f32>,
    dk: Array2<f32>,
    /// Causal attention's reverse sweep (none for non-causal attention).
    causal: Option<CausalBackward>,
}

impl BackwardScratch {
    /// For heads of `m` features and value width `e`, blocks of `width` positions.
    pub(super) fn new(causal: bool, m: usize, e: usize, width: usize) -> Self {
        BackwardScratch {
            dq: Array2::zeros((m, width)),
            dk: Array2::zeros((m, width)),
            causal: causal.then(|| CausalBackward::new(m, e, width)),
        }
    }
}

/// One head's attention backward over blocks of `width` positions: features from `q_src`,
/// `k_src`, their gradients to `q_sink`, `k_sink`, the values' into `dv`; `scratch` must have
/// been made for the same `m`, value width and `width`.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_head_backward(
    scratch: &mut BackwardScratch,
    causal: bool,
    width: usize,
    ctx: &HeadContext,
    q_src: &FeatureSource<'_>,
    k_src: &FeatureSource<'_>,
    v: &ArrayView2<f32>,
    grad: &HeadGrad<'_>,
    q_sink: &mut GradSink<'_>,
    k_sink: &mut GradSink<'_>,
    dv: &mut ArrayViewMut2<f32>,
    mut dproj: Option<&mut Array2<f32>>,
    m: usize,
) -> Result<()> {
    let e = v.ncols();
    let BackwardScratch {
        dq: dqbuf,
        dk: dkbuf,
        causal: causal_scratch,
    } = scratch;
    let wrong_scratch = |what: String| {
        Error::shape(
            "attend_head_backward",
            format!(
                "scratch made for {what}, called with (m, e, width) {:?}",
                (m, e, width)
            ),
        )
    };
    if dqbuf.dim() != (m, width) {
        return Err(wrong_scratch(format!("(m, width) {:?}", dqbuf.dim())));
    }
    let n = grad.g.nrows();
    if causal {
        let states = ctx.states.as_ref().ok_or_else(|| {
            Error::invalid("causal_linear_attention", "saved states", 0, "missing")
        })?;
        let every = states.every;
        let chunks = n.div_ceil(width);
        let mut qscratch = q_src.scratch(m, every, width);
        let mut kscratch = k_src.scratch(m, every, width);
        let mut seg_s = Array3::<f32>::zeros((if every > 1 { every } else { 0 }, m, e));
        let mut seg_z = Array2::<f32>::zeros((if every > 1 { every } else { 0 }, m));
        let bw = match causal_scratch {
            Some(bw) if bw.shape() == (m, e, width) => bw,
            Some(bw) => return Err(wrong_scratch(format!("(m, e, width) {:?}", bw.shape()))),
            None => return Err(wrong_scratch("non-causal attention".into())),
        };
        bw.reset();
        for seg in (0..chunks.div_ceil(every)).rev() {
            let (b0, b1) = (seg * every, ((seg + 1) * every).min(chunks));
            let qs = q_src.blocks(b0, b1, &mut qscratch)?;
            let ks = k_src.blocks(b0, b1, &mut kscratch)?;
            let rows = |b: usize| (b * width, ((b + 1) * width).min(n));
            if every > 1 {
                seg_s
                    .index_axis_mut(Axis(0), 0)
                    .assign(&states.s.index_axis(Axis(0), seg));
                seg_z.row_mut(0).assign(&states.z.row(seg));
                for t in 1..b1 - b0 {
                    let (c0, c1) = rows(b0 + t - 1);
                    let (prev, mut next) =
                        seg_s.multi_slice_mut((s![t - 1, .., ..], s![t, .., ..]));
                    next.assign(&prev);
                    let (zp, mut zn) = seg_z.multi_slice_mut((s![t - 1, ..], s![t, ..]));
                    zn.assign(&zp);
                    linear_math::advance_state(
                        &mut next,
                        &mut zn,
                        &ks[t - 1],
                        &v.slice(s![c0..c1, ..]),
                    )?;
                }
            }
            for t in (0..b1 - b0).rev() {
                let b = b0 + t;
                let (c0, c1) = rows(b);
                let l = c1 - c0;
                let (st, z) = if every > 1 {
                    (seg_s.index_axis(Axis(0), t), seg_z.row(t))
                } else {
                    (states.s.index_axis(Axis(0), b), states.z.row(b))
                };
                let chunk = CausalChunk {
                    qt: qs[t].view(),
                    kt: ks[t].view(),
                    v: v.slice(s![c0..c1, ..]),
                    vt: v.slice(s![c0..c1, ..]).reversed_axes(),
                    g: grad.g.slice(s![c0..c1, ..]),
                    out: grad.out.slice(s![c0..c1, ..]),
                    den: grad.den.slice(s![c0..c1]),
                    s: st,
                    z,
                    scores: states
                        .scores
                        .as_ref()
                        .map(|a| a.index_axis(Axis(0), b).slice_move(s![..l, ..l])),
                };
                let mut dq = dqbuf.slice_mut(s![.., ..l]);
                let mut dk = dkbuf.slice_mut(s![.., ..l]);
                bw.chunk(&chunk, &mut dq, &mut dk, &mut dv.slice_mut(s![c0..c1, ..]))?;
                q_sink.block((c0, c1), &qs[t], &mut dq, dproj.as_deref_mut())?;
                k_sink.block((c0, c1), &ks[t], &mut dk, dproj.as_deref_mut())?;
            }
        }
    } else {
        let nc = ctx
            .noncausal
            .as_ref()
            .ok_or_else(|| Error::invalid("linear_attention", "saved context", 0, "missing"))?;
        let nk = v.nrows();
        let mut qscratch = q_src.scratch(m, 1, width);
        let mut kscratch = k_src.scratch(m, 1, width);
        let mut bw = NonCausalBackward::new(m, e, width);
        for b in 0..n.div_ceil(width) {
            let (c0, c1) = (b * width, ((b + 1) * width).min(n));
            let qs = q_src.blocks(b, b + 1, &mut qscratch)?;
            let mut dq = dqbuf.slice_mut(s![.., ..c1 - c0]);
            bw.queries(
                &qs[0],
                &grad.g.slice(s![c0..c1, ..]),
                &grad.out.slice(s![c0..c1, ..]),
                &grad.den.slice(s![c0..c1]),
                nc,
                &mut dq,
            )?;
            q_sink.block((c0, c1), &qs[0], &mut dq, dproj.as_deref_mut())?;
        }
        for b in 0..nk.div_ceil(width) {
            let (c0, c1) = (b * width, ((b + 1) * width).min(nk));
            let ks = k_src.blocks(b, b + 1, &mut kscratch)?;
            let mut dk = dkbuf.slice_mut(s![.., ..c1 - c0]);
            bw.keys(
                &ks[0],
                &v.slice(s![c0..c1, ..]).t(),
                &mut dk,
                &mut dv.slice_mut(s![c0..c1, ..]),
            )?;
            k_sink.block((c0, c1), &ks[0], &mut dk, dproj.as_deref_mut())?;
        }
    }
    Ok(())
}

/// The saved output, or an empty placeholder when nothing is saved.
pub(super) fn kept_output(out: &ArrayD<f32>, save: bool) -> Data {
    if save {
        out.clone().into_shared()
    } else {
        ArrayD::zeros(ndarray::IxDyn(&[0])).into_shared()
    }
}
