//! FAVOR+ as differentiable ops on tensors of shape `(..., n, d)` (usually `(b, h, n, d)`):
//! the feature maps on their own, linear attention on given features (non-causal and causal),
//! and the fused op that FastAttention runs. Heads run in parallel (rayon), each on transposed
//! features in column blocks ([`Blocks`]). What the forward keeps for the backward (features,
//! causal states and score blocks) is planned against [`SAVE_BUDGET_BYTES`]; past it the
//! backward recomputes features block by block and causal states from one checkpoint per
//! segment, so memory in flight stays O(n d) per head beyond the saved context.

use ndarray::{
    Array2, Array3, ArrayD, ArrayView1, ArrayView2, ArrayViewD, ArrayViewMut1, ArrayViewMut2, Axis,
    s,
};
use performer_tensor::{CustomOp, Data, Error, Result, Tensor, apply_custom_op};
use rayon::prelude::*;

use crate::blocks::{Blocks, transpose_into};
use crate::feature::{FeatureMap, FeatureSpec, check_projection};
use crate::heads::{HeadsOut, head, lead_shape, row_vectors, vector_views};
use crate::kernels::{
    self, CausalBackward, CausalChunk, CausalStates, FinalSums, NonCausalBackward, NonCausalContext,
};

/// Rows per chunk of the causal kernels unless set otherwise. 64 measured fastest on AVX-512
/// (the GEMM tiles 64 columns; 32 leaves half a tile empty, 128 doubles the intra-chunk work).
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

/// Bytes of context (features, causal chunk states) that one attention call may keep for its
/// backward, over all heads; above this the backward recomputes features block by block and
/// causal states from one checkpoint per segment of chunks. At the benchmark's n = 4096
/// everything is kept; at n = 65536 features and most states are recomputed.
pub const SAVE_BUDGET_BYTES: usize = 512 << 20;

/// Positions per segment of the causal backward when states are checkpointed (rounded to
/// whole chunks): the segment's features are recomputed once and its states rebuilt.
const SEGMENT: usize = 256;

/// Positions per block of non-causal attention (its results do not depend on a chunk).
const NONCAUSAL_BLOCK: usize = 256;

/// Feature block width: the chunk for causal attention.
fn block_width(causal: bool, chunk: usize) -> usize {
    if causal { chunk } else { NONCAUSAL_BLOCK }
}

/// What a forward keeps for its backward.
#[derive(Clone, Copy, Debug)]
struct SavePlan {
    save: bool,
    /// Keep the transposed features (fused op only).
    features: bool,
    /// Causal: chunks between saved states (1, or a segment's worth).
    state_every: usize,
    /// Causal: keep each chunk's masked score block.
    scores: bool,
}

impl SavePlan {
    /// In order of work saved per byte kept: the causal score blocks (m / 2 FLOPs per byte),
    /// the features (d / 2), then a state for every chunk rather than one per segment (about
    /// C d / 2 (d + 1)); one state per segment is always kept.
    #[allow(clippy::too_many_arguments)]
    fn new(
        save: bool,
        causal: bool,
        heads: usize,
        n: usize,
        nk: usize,
        m: usize,
        e: usize,
        chunk: usize,
        with_features: bool,
        budget: usize,
    ) -> Self {
        let w = block_width(causal, chunk);
        let chunks = n.div_ceil(chunk);
        let segment = SEGMENT.div_ceil(chunk).max(1);
        let states = |every| {
            if causal {
                heads * CausalStates::state_bytes(chunks, m, e, every)
            } else {
                0
            }
        };
        let mut used = states(segment);
        let score_bytes = heads * CausalStates::score_bytes(chunks, chunk);
        let scores = save && causal && used + score_bytes <= budget;
        if scores {
            used += score_bytes;
        }
        let feature_bytes = heads * (Blocks::bytes(m, n, w) + Blocks::bytes(m, nk, w));
        let features = save && with_features && used + feature_bytes <= budget;
        if features {
            used += feature_bytes;
        }
        let state_every = if used - states(segment) + states(1) <= budget {
            1
        } else {
            segment
        };
        SavePlan {
            save,
            features,
            state_every,
            scores,
        }
    }
}

/// What one head's forward keeps for the backward.
#[derive(Default)]
struct HeadContext {
    /// Non-causal: `k'^T v` and `k'^T 1`.
    noncausal: Option<NonCausalContext>,
    /// Causal: saved states.
    states: Option<CausalStates>,
    /// Transposed features `q'^T`, `k'^T` (fused op only, when the plan keeps them).
    features: Option<(Blocks, Blocks)>,
    /// The keys' softmax stabilizer (fused op only).
    key_stab: f32,
}

/// Normalizers `(heads, n)`, the output, and each head's context.
type AttentionSaved = (Array2<f32>, Data, Vec<HeadContext>);

/// One head's attention forward on transposed features; returns what its backward needs and,
/// for causal attention, the sums over every position.
#[allow(clippy::too_many_arguments)]
fn attend_head(
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
        let sums = kernels::causal_forward(qf, kf, v, eps, out, den, states.as_mut())?;
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
fn features_into(
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
enum FeatureSource<'a> {
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
enum GradSink<'a> {
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
struct HeadGrad<'a> {
    g: ArrayView2<'a, f32>,
    out: ArrayView2<'a, f32>,
    den: ArrayView1<'a, f32>,
}

/// One head's attention backward over blocks of `width` positions: features from `q_src`,
/// `k_src`, their gradients to `q_sink`, `k_sink`, the values' into `dv`.
#[allow(clippy::too_many_arguments)]
fn attend_head_backward(
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
    let mut dqbuf = Array2::<f32>::zeros((m, width));
    let mut dkbuf = Array2::<f32>::zeros((m, width));
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
        let mut bw = CausalBackward::new(m, e, width);
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
                    kernels::advance_state(
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
fn kept_output(out: &ArrayD<f32>, save: bool) -> Data {
    if save {
        out.clone().into_shared()
    } else {
        ArrayD::zeros(ndarray::IxDyn(&[0])).into_shared()
    }
}

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
        let plan = SavePlan::new(
            save,
            self.causal,
            heads,
            sh.n,
            sh.nk,
            sh.m,
            sh.e,
            self.chunk,
            false,
            self.budget,
        );
        let w = block_width(self.causal, self.chunk);
        let contexts: Vec<HeadContext> = out
            .views()
            .into_par_iter()
            .zip(vector_views(&mut den))
            .enumerate()
            .map(|(i, (mut o, mut dn))| {
                let qf = Blocks::transpose_of(&head(&q, i), w);
                let kf = Blocks::transpose_of(&head(&k, i), w);
                attend_head(
                    &qf,
                    &kf,
                    &head(&v, i),
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
            .try_for_each(|(i, ((dqi, dki), mut dvi))| {
                let qf = Blocks::transpose_of(&head(&q, i), w);
                let kf = Blocks::transpose_of(&head(&k, i), w);
                let grad = HeadGrad {
                    g: head(&gv, i),
                    out: head(&ov, i),
                    den: den.row(i),
                };
                attend_head_backward(
                    self.causal,
                    w,
                    &contexts[i],
                    &FeatureSource::Kept(&qf),
                    &FeatureSource::Kept(&kf),
                    &head(&v, i),
                    &grad,
                    &mut GradSink::Features(dqi),
                    &mut GradSink::Features(dki),
                    &mut dvi,
                    None,
                    sh.m,
                )
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

// ---------------------------------------------------------------------------------------------
// The fused op

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
        let plan = SavePlan::new(
            save,
            self.causal,
            heads,
            sh.n,
            sh.nk,
            m,
            sh.e,
            self.chunk,
            true,
            self.budget,
        );
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
                    fused.head(&head(&q, i), &head(&k, i), &head(&v, i), &mut o, &mut dn)?;
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
            .map(|(i, ((dqi, dki), mut dvi))| {
                let (qi, ki, vi) = (head(&q, i), head(&k, i), head(&v, i));
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
                    g: head(&gv, i),
                    out: head(&ov, i),
                    den: den.row(i),
                };
                let mut dp = needs[3].then(|| Array2::<f32>::zeros((m, d)));
                attend_head_backward(
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
/// [`linear_attention`] / [`causal_linear_attention`]; the features are kept for the backward
/// only while they fit [`SAVE_BUDGET_BYTES`], else recomputed block by block.
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
            eps: feature_eps(map),
            causal,
            chunk,
            budget: SAVE_BUDGET_BYTES,
        },
        &[q, k, v, projection],
    )?
    .remove(0))
}

/// The epsilon performer-pytorch adds to every feature of a map.
fn feature_eps(map: FeatureMap) -> f32 {
    match map {
        FeatureMap::Softmax => 1e-4,
        FeatureMap::Generalized(_) => 1e-3,
    }
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
        spec: FeatureSpec::new(map, sh.m, m, true, feature_eps(map)),
        p: p.view(),
        causal: true,
        width: block_width(true, chunk),
        plan: SavePlan::new(false, true, heads, sh.n, sh.nk, m, sh.e, chunk, true, 0),
    };
    let primed = out
        .views()
        .into_par_iter()
        .zip(vector_views(&mut den))
        .enumerate()
        .map(|(i, (mut o, mut dn))| {
            let (ctx, sums) = fused.head(&head(q, i), &head(k, i), &head(v, i), &mut o, &mut dn)?;
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
        let scale = b.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
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
        let eps = if map == FeatureMap::Softmax {
            1e-4
        } else {
            1e-3
        };
        let op = FavorAttentionOp {
            map,
            eps,
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
        assert_eq!(
            SavePlan::new(true, true, 2, n, n, 12, 8, 16, true, 0).state_every,
            16
        );
        assert!(!SavePlan::new(true, true, 2, n, n, 12, 8, 16, true, 0).features);
        let full = SavePlan::new(true, true, 2, n, n, 12, 8, 16, true, usize::MAX);
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
