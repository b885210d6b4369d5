//! Incremental (recurrent) FAVOR+: causal linear attention is an RNN ("Transformers are RNNs",
//! Katharopoulos et al. 2020). [`CausalState`] carries, per head, the sums over all keys seen so
//! far, so attending from one new position costs O(m d) whatever the length, and equals the
//! reference's parallel forward over the whole prefix.
//!
//! The softmax kernel needs care: the reference shifts every key feature by the max over the
//! sequence it sees (the key stabilizer), so at step t all keys use the max `M_t` over positions
//! `<= t`. With `a_j = u_j - dn^2 |k_j|^2 / 2`, `k'_j = r (exp(a_j - M_t) + eps)`, the state keeps
//! `A = sum_j exp(a_j - R) v_j^T`, `Z = sum_j exp(a_j - R)` with a running reference `R` (= the
//! running max, rescaled when it grows), and `B = sum_j v_j`, `count` for the eps term, and
//! combines them at read time: `sum_j k'_j v_j^T = r A + r eps 1 B^T`. [`ContextState`] does the
//! same for a fixed context (cross-attention): its sums are computed once.

use ndarray::{Array1, Array2, Array3, ArrayView2, ArrayView3, Axis, Zip};
use std::sync::{Arc, Mutex};

use performer_tensor::fast_math::{axpy, dot, gemv_t_pair, scaled_exp_inplace};
use performer_tensor::gemm::{Threads, gemm_into};
use performer_tensor::ops::Activation;
use performer_tensor::team::Team;
use performer_tensor::{Error, Result, Tensor};

use crate::fast_attention::FastAttention;
use crate::feature::{GENERALIZED_FEATURE_EPS, SOFTMAX_FEATURE_EPS};
use crate::ops::CAUSAL_EPS;
use crate::simd;

/// How features are computed, with their constants.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Softmax {
        dn: f32,
        ratio: f32,
        eps: f32,
    },
    Generalized {
        dn: f32,
        eps: f32,
        kernel: Activation,
    },
    /// `no_projection`: queries softmaxed over the head's features, keys `exp(k)` (causal) or
    /// softmaxed over positions (a context).
    NoProjection,
}

fn kind_of(fa: &FastAttention) -> Kind {
    let c = fa.config();
    let dn = (c.dim_heads as f32).powf(-0.25);
    if c.no_projection {
        Kind::NoProjection
    } else if c.generalized_attention {
        Kind::Generalized {
            dn,
            eps: GENERALIZED_FEATURE_EPS,
            kernel: c.kernel_fn,
        }
    } else {
        Kind::Softmax {
            dn,
            ratio: (fa.nb_features() as f32).powf(-0.5),
            eps: SOFTMAX_FEATURE_EPS,
        }
    }
}

/// `u = dn * x P^T` for the rows of `x` (n, d): (n, m).
fn project(x: &ArrayView2<f32>, p: &ArrayView2<f32>, dn: f32) -> Array2<f32> {
    let mut u = Array2::<f32>::zeros((x.nrows(), p.nrows()));
    gemm_into(&mut u.view_mut(), x, &p.t(), dn, 0.0, Threads::Single)
        .expect("shapes match by construction");
    u
}

/// `dn * P x` for one row `x` (d): (m), as dot products with P's contiguous rows.
fn project_row(x: &ndarray::ArrayView1<f32>, p: &ArrayView2<f32>, dn: f32) -> Array1<f32> {
    let xs = x.to_vec();
    Array1::from_iter(p.rows().into_iter().map(|r| match r.as_slice() {
        Some(r) => dn * dot(r, &xs),
        None => dn * r.iter().zip(&xs).map(|(a, b)| a * b).sum::<f32>(),
    }))
}

/// `kv += w v^T` (m, e) and `z += w` for one position's weights `w` (m) and value `v` (e).
fn add_outer(
    kv: &mut ndarray::ArrayViewMut2<f32>,
    z: &mut ndarray::ArrayViewMut1<f32>,
    w: &ndarray::ArrayView1<f32>,
    v: &ndarray::ArrayView1<f32>,
) {
    let vs = v.to_vec();
    for ((mut row, zi), &wi) in kv.rows_mut().into_iter().zip(z.iter_mut()).zip(w) {
        match row.as_slice_mut() {
            Some(r) => axpy(r, wi, &vs),
            None => row.iter_mut().zip(&vs).for_each(|(x, &y)| *x += wi * y),
        }
        *zi += wi;
    }
}

/// `q'^T kv` (e) as a sum of `kv`'s rows.
fn combine_rows(qf: &Array1<f32>, kv: &ndarray::ArrayView2<f32>) -> Array1<f32> {
    let mut out = vec![0f32; kv.ncols()];
    for (row, &w) in kv.rows().into_iter().zip(qf) {
        match row.as_slice() {
            Some(r) => axpy(&mut out, w, r),
            None => out.iter_mut().zip(row).for_each(|(x, &y)| *x += w * y),
        }
    }
    Array1::from(out)
}

/// `kv += w^T v`, `z += sum of w's rows` for weights `w` (n, m) and values `v` (n, e): a GEMM
/// for a prompt, row updates for one position.
fn accumulate(
    kv: &mut ndarray::ArrayViewMut2<f32>,
    z: &mut ndarray::ArrayViewMut1<f32>,
    w: &ArrayView2<f32>,
    v: &ArrayView2<f32>,
) {
    if w.nrows() == 1 {
        add_outer(kv, z, &w.row(0), &v.row(0));
        return;
    }
    gemm_into(kv, &w.t(), v, 1.0, 1.0, Threads::Single).expect("shapes match by construction");
    *z += &w.sum_axis(Axis(0));
}

fn half_sq_norm(x: &ndarray::ArrayView1<f32>, dn: f32) -> f32 {
    0.5 * dn * dn * x.iter().map(|v| v * v).sum::<f32>()
}

/// The query's features (m): per-row stabilizer, as the reference.
fn query_features(kind: Kind, q: &ndarray::ArrayView1<f32>, p: &ArrayView2<f32>) -> Array1<f32> {
    match kind {
        Kind::Softmax { dn, ratio, eps } => {
            let u = project_row(q, p, dn);
            let diag = half_sq_norm(q, dn);
            let s = u.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            u.mapv(|v| ratio * ((v - diag - s).exp() + eps))
        }
        Kind::Generalized { dn, eps, kernel } => project_row(q, p, dn).mapv(|v| kernel.f(v) + eps),
        Kind::NoProjection => {
            let m = q.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let e = q.mapv(|v| (v - m).exp());
            let s = e.sum();
            e / s
        }
    }
}

fn check_heads(op: &str, what: &str, shape: &[usize], heads: usize, dim: usize) -> Result<()> {
    if shape[0] != heads || shape[shape.len() - 1] != dim {
        return Err(Error::shape(
            op,
            format!("{what} {shape:?} must be (heads = {heads}, ..., {dim})"),
        ));
    }
    Ok(())
}

/// Running sums of a causal FastAttention over the keys and values seen so far, per head.
#[derive(Clone, Debug)]
pub struct CausalState {
    heads: usize,
    e: usize,
    /// `sum exp(a_j - R) v_j^T` (softmax) or `sum k'_j v_j^T` (others): (heads, m, e).
    kv: Array3<f32>,
    /// `sum exp(a_j - R)` or `sum k'_j`: (heads, m).
    z: Array2<f32>,
    /// `sum v_j` (softmax only): (heads, e).
    v_sum: Array2<f32>,
    /// Running max of the key projections (softmax only).
    reference: Array1<f32>,
    count: usize,
    /// The projection's transpose `(d, m)`, made on the first step that reads it
    /// ([`FastAttention::begin_step`]), with the projection it was made from.
    projection_t: Option<ProjectionT>,
}

/// The contiguous transpose `(d, m)` of a projection `(m, d)`: a step's feature products walk
/// it row by row into m sums at once (one product per feature, with no sum across lanes).
#[derive(Clone, Debug)]
struct ProjectionT {
    /// The projection it was made from. Holding it keeps its buffer alive, so a projection
    /// that is redrawn or changed (copy-on-write) lives at another address: a pointer
    /// comparison tells whether the transpose is still the current one.
    source: performer_tensor::Data,
    t: Arc<[f32]>,
}

impl ProjectionT {
    /// The transpose of `projection` `(m, d)`.
    fn of(projection: &performer_tensor::Data) -> Result<Self> {
        let p = projection
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|e| Error::shape("FastAttention::begin_step", e.to_string()))?;
        let (m, d) = p.dim();
        let t: Vec<f32> = match p.as_slice() {
            Some(values) => performer_tensor::transpose::transposed(values, m, d),
            None => p.t().iter().copied().collect(),
        };
        Ok(ProjectionT {
            source: projection.clone(),
            t: t.into(),
        })
    }

    /// Whether this is the transpose of `projection`.
    fn made_from(&self, projection: &performer_tensor::Data) -> bool {
        self.source.as_ptr() == projection.as_ptr() && self.source.shape() == projection.shape()
    }
}

impl CausalState {
    /// Number of positions seen.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no position has been seen.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Number of heads (sequences times heads per sequence).
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Bytes held (constant in the number of positions).
    pub fn bytes(&self) -> usize {
        4 * (self.kv.len() + self.z.len() + self.v_sum.len() + self.reference.len())
    }
}

/// Precomputed sums of a non-causal FastAttention over a fixed context, per head.
#[derive(Clone, Debug)]
pub struct ContextState {
    heads: usize,
    /// `k'^T v`: (heads, m, e).
    kv: Array3<f32>,
    /// `k'^T 1`: (heads, m).
    z: Array2<f32>,
}

/// One head's sums as [`FastAttention::extend_state`] hands them out: head index, `kv`, `z`,
/// `v_sum` and the running reference.
type ExtendHead<'a> = (
    usize,
    ndarray::ArrayViewMut2<'a, f32>,
    ndarray::ArrayViewMut1<'a, f32>,
    ndarray::ArrayViewMut1<'a, f32>,
    &'a mut f32,
);

/// `a` cut into pieces of `len` (at least 1) values.
fn slices(a: &mut [f32], len: usize) -> Vec<&mut [f32]> {
    a.chunks_mut(len.max(1)).collect()
}

/// One head's running sums, borrowed for one decoding step.
struct HeadSums<'a> {
    kv: &'a mut [f32],
    z: &'a mut [f32],
    v_sum: &'a mut [f32],
    reference: &'a mut f32,
}

/// One head's running sums and output row, borrowed for one decoding step.
struct HeadStep<'a> {
    /// `dn P k` then `dn P q`, m values each, on entry (softmax and generalized kernels); the
    /// key's and the query's features after.
    features: &'a mut [f32],
    kv: &'a mut [f32],
    z: &'a mut [f32],
    v_sum: &'a mut [f32],
    reference: &'a mut f32,
    out: &'a mut [f32],
}

/// A decoding step of a [`CausalState`] in progress ([`FastAttention::begin_step`]): each
/// head's sums, lent out once to whichever thread steps that head.
pub struct StateStep<'s> {
    kind: Kind,
    /// The projection's transpose `(d, m)`, contiguous (none for `no_projection`).
    projection_t: Option<Arc<[f32]>>,
    d: usize,
    e: usize,
    m: usize,
    /// Positions counted with this one.
    count: usize,
    heads: Vec<Mutex<Option<HeadSums<'s>>>>,
}

impl StateStep<'_> {
    /// Number of heads of the state.
    pub fn heads(&self) -> usize {
        self.heads.len()
    }

    /// Head `h`'s step: folds its new key `k` (d values) and value `v` (e values) into its sums
    /// and writes into `out` (e values) the attention of its query `q` (d values) over every
    /// key so far. Equal to `extend_state` then `query_state` for that head.
    pub fn step_head(
        &self,
        h: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        const OP: &str = "StateStep::step_head";
        let (d, e, m) = (self.d, self.e, self.m);
        if q.len() != d || k.len() != d || v.len() != e || out.len() != e {
            return Err(Error::shape(
                OP,
                format!(
                    "q {}, k {}, v {}, out {} values for heads of d = {d}, e = {e}",
                    q.len(),
                    k.len(),
                    v.len(),
                    out.len()
                ),
            ));
        }
        let sums = self
            .heads
            .get(h)
            .ok_or_else(|| Error::Index {
                op: OP.into(),
                index: h as i64,
                size: self.heads.len(),
            })?
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| Error::invalid(OP, "head", h, "was already stepped in this step"))?;
        let mut features = vec![0f32; 2 * m];
        if let Kind::Softmax { dn, .. } | Kind::Generalized { dn, .. } = self.kind {
            // dn P k then dn P q, in one pass over the transpose's rows (reading the
            // projection is what these products cost).
            let pt = self
                .projection_t
                .as_deref()
                .expect("begin_step transposes the projection of these kinds");
            let (kf, qf) = features.split_at_mut(m);
            gemv_t_pair(pt, m, 0, (k, q), (kf, qf));
            features.iter_mut().for_each(|u| *u *= dn);
        }
        step_head(
            self.kind,
            q,
            k,
            v,
            HeadStep {
                features: &mut features,
                kv: sums.kv,
                z: sums.z,
                v_sum: sums.v_sum,
                reference: sums.reference,
                out,
            },
            self.count,
        );
        Ok(())
    }
}

/// The largest of `start` and `xs`, ignoring NaN as `f32::max` does.
fn max_ignoring_nan(xs: &[f32], start: f32) -> f32 {
    xs.iter().fold(start, |a, &b| a.max(b))
}

/// One position of one head: folds key `k` and value `v` into the sums of `s` and writes the
/// attention of query `q` over every key so far (`count` of them, this one included) to
/// `s.out`. The same arithmetic as [`FastAttention::extend_state`] followed by
/// [`FastAttention::query_state`], with one pass over the sums instead of two.
fn step_head(kind: Kind, q: &[f32], k: &[f32], v: &[f32], s: HeadStep<'_>, count: usize) {
    let m = s.features.len() / 2;
    let (kf, qf) = s.features.split_at_mut(m);
    let mut acc = vec![0f32; v.len()];
    let (decay, numerator_scale, eps_term) = match kind {
        Kind::Softmax { dn, ratio, eps } => {
            let new_ref = max_ignoring_nan(kf, *s.reference);
            let decay = if new_ref > *s.reference && s.reference.is_finite() {
                (*s.reference - new_ref).exp()
            } else {
                1.0
            };
            *s.reference = new_ref;
            let diag = half_sq_norm(&ndarray::ArrayView1::from(k), dn);
            scaled_exp_inplace(kf, diag + new_ref, 1.0, 0.0);
            simd::axpy(s.v_sum, 1.0, v);
            let diag = half_sq_norm(&ndarray::ArrayView1::from(q), dn);
            let top = max_ignoring_nan(qf, f32::NEG_INFINITY);
            scaled_exp_inplace(qf, diag + top, ratio, ratio * eps);
            (decay, ratio, Some((ratio, eps)))
        }
        Kind::Generalized { eps, kernel, .. } => {
            for x in kf.iter_mut().chain(qf.iter_mut()) {
                *x = kernel.f(*x) + eps;
            }
            (1.0, 1.0, None)
        }
        Kind::NoProjection => {
            for (f, &x) in kf.iter_mut().zip(k) {
                *f = x.exp();
            }
            qf.copy_from_slice(q);
            performer_tensor::fast_math::softmax_inplace(qf);
            (1.0, 1.0, None)
        }
    };
    let qz = simd::update_and_read(s.kv, s.z, kf, v, qf, decay, &mut acc);
    let qsum = simd::sum(qf);
    let (den, v_sum_weight) = match eps_term {
        // sum_j k'_j = r Z + r eps count 1, and sum_j k'_j v_j^T = r A + r eps 1 B^T
        Some((ratio, eps)) => (
            ratio * qz + ratio * eps * count as f32 * qsum + CAUSAL_EPS * qsum,
            ratio * eps * qsum,
        ),
        None => (qz + CAUSAL_EPS * qsum, 0.0),
    };
    for ((o, &a), &b) in s.out.iter_mut().zip(&acc).zip(s.v_sum.iter()) {
        *o = (numerator_scale * a + v_sum_weight * b) / den;
    }
}

impl FastAttention {
    /// The projection as the host decoding path reads it: a model moved to a device keeps it
    /// there, while these running sums (generalized attention, `no_projection`, host models)
    /// live in host memory. A host projection is returned as it is (no copy).
    fn host_projection(&self) -> Result<Tensor> {
        self.projection_matrix()?.to_host()
    }

    /// An empty causal state for `heads` heads with values of size `value_dim`.
    pub fn causal_state(&self, heads: usize, value_dim: usize) -> CausalState {
        let m = match kind_of(self) {
            Kind::NoProjection => self.config().dim_heads,
            _ => self.nb_features(),
        };
        CausalState {
            heads,
            e: value_dim,
            kv: Array3::zeros((heads, m, value_dim)),
            z: Array2::zeros((heads, m)),
            v_sum: Array2::zeros((heads, value_dim)),
            reference: Array1::from_elem(heads, f32::NEG_INFINITY),
            count: 0,
            projection_t: None,
        }
    }

    /// Appends keys `k` (heads, n, d) and values `v` (heads, n, e), in order, to `state`.
    pub fn extend_state(
        &self,
        state: &mut CausalState,
        k: &ArrayView3<f32>,
        v: &ArrayView3<f32>,
    ) -> Result<()> {
        let d = self.config().dim_heads;
        check_heads(
            "FastAttention::extend_state",
            "k",
            k.shape(),
            state.heads,
            d,
        )?;
        check_heads(
            "FastAttention::extend_state",
            "v",
            v.shape(),
            state.heads,
            state.e,
        )?;
        if k.shape()[1] != v.shape()[1] {
            return Err(Error::shape(
                "FastAttention::extend_state",
                format!("k {:?} and v {:?} differ in length", k.shape(), v.shape()),
            ));
        }
        let p = self.host_projection()?;
        let p = p
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|e| Error::shape("FastAttention", e.to_string()))?;
        let kind = kind_of(self);
        // Heads are independent: each takes its own sums, in parallel for a prompt.
        let heads: Vec<_> = state
            .kv
            .outer_iter_mut()
            .zip(state.z.outer_iter_mut())
            .zip(state.v_sum.outer_iter_mut())
            .zip(state.reference.iter_mut())
            .enumerate()
            .map(|(h, (((kv, z), vs), reference))| (h, kv, z, vs, reference))
            .collect();
        let extend_head = |(h, mut kv, mut z, mut vs, reference): ExtendHead<'_>| {
            let (kh, vh) = (k.index_axis(Axis(0), h), v.index_axis(Axis(0), h));
            match kind {
                Kind::Softmax { dn, .. } => {
                    let u = project(&kh, &p, dn);
                    let new_max =
                        max_ignoring_nan(u.as_slice().expect("a fresh array"), *reference);
                    if new_max > *reference && reference.is_finite() {
                        let scale = (*reference - new_max).exp();
                        kv.mapv_inplace(|x| x * scale);
                        z.mapv_inplace(|x| x * scale);
                    }
                    *reference = new_max;
                    // w_j = exp(a_j - R), a_j = u_j - dn^2 |k_j|^2 / 2
                    let mut w = u;
                    for (mut row, kr) in w.rows_mut().into_iter().zip(kh.rows()) {
                        let diag = half_sq_norm(&kr, dn);
                        let row = row.as_slice_mut().expect("rows of a fresh array");
                        scaled_exp_inplace(row, diag + new_max, 1.0, 0.0);
                    }
                    accumulate(&mut kv, &mut z, &w.view(), &vh);
                    vs += &vh.sum_axis(Axis(0));
                }
                Kind::Generalized { dn, eps, kernel } => {
                    let kf = project(&kh, &p, dn).mapv(|x| kernel.f(x) + eps);
                    accumulate(&mut kv, &mut z, &kf.view(), &vh);
                }
                Kind::NoProjection => {
                    let kf = kh.mapv(f32::exp);
                    accumulate(&mut kv, &mut z, &kf.view(), &vh);
                }
            }
        };
        if k.shape()[1] > 1 {
            use rayon::prelude::*;
            heads.into_par_iter().for_each(extend_head);
        } else {
            heads.into_iter().for_each(extend_head);
        }
        state.count += k.shape()[1];
        Ok(())
    }

    /// Causal attention of `q`, `k`, `v` `(b, h, n, d)` over themselves, starting from an empty
    /// `state` of `b * h` heads: [`FastAttention::forward`]'s output, with `state` then holding
    /// every key and value as [`FastAttention::extend_state`] would leave it. This is the
    /// prompt's pass while decoding: the running sums are the ones the forward ends with, so
    /// the keys' features and sums are not computed a second time. (The softmax kernel's
    /// forward sums `r (A + eps 1 B^T)` and `r (Z + eps n) + eps'`; the state's `A`, `Z` are
    /// recovered by taking the constant terms out, which keeps the rounding of the forward's
    /// own sums.) `no_projection`, a CUDA device, and inputs that gradients flow through (grad
    /// mode on, a tracked `q`, `k` or `v`) run `forward` and then `extend_state`, so the output
    /// is always `forward`'s, graph included.
    pub fn forward_extending(
        &self,
        state: &mut CausalState,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        const OP: &str = "FastAttention::forward_extending";
        if !self.config().causal {
            return Err(Error::invalid(
                OP,
                "causal",
                false,
                "a decoding state continues causal attention",
            ));
        }
        if !state.is_empty() {
            return Err(Error::invalid(
                OP,
                "state",
                format!("{} positions", state.count),
                "must be empty (extend a used state with extend_state)",
            ));
        }
        let (d, e) = (self.config().dim_heads, state.e);
        for (name, t, last) in [("q", q, d), ("k", k, d), ("v", v, e)] {
            let s = t.shape();
            if s.len() != 4 || s[0] * s[1] != state.heads || s[3] != last || s[2] == 0 {
                return Err(Error::shape(
                    OP,
                    format!(
                        "{name} {s:?} must be (b, h, n > 0, {last}) with b * h = {} heads",
                        state.heads
                    ),
                ));
            }
        }
        let kind = kind_of(self);
        // The fused pass records no graph, so gradients through q, k or v take forward's way.
        let records_graph =
            performer_tensor::is_grad_enabled() && [q, k, v].iter().any(|t| t.is_tracked());
        let on_device = !q.device().is_cpu();
        if matches!(kind, Kind::NoProjection) || self.uses_cuda() || records_graph || on_device {
            let out = self.forward(q, k, v)?;
            let flat = |t: &Tensor| -> Result<Array3<f32>> {
                let s = t.shape();
                // The running sums live on the host: a device tensor's values are copied there.
                let owned = match on_device {
                    true => t.to_host()?.data().to_owned(),
                    false => t.data().as_standard_layout().into_owned(),
                };
                owned
                    .into_shape_with_order((s[0] * s[1], s[2], s[3]))
                    .map_err(|err| Error::shape(OP, err.to_string()))
            };
            self.extend_state(state, &flat(k)?.view(), &flat(v)?.view())?;
            return Ok(out);
        }
        let p = self.host_projection()?;
        let p = p
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|err| Error::shape(OP, err.to_string()))?;
        let map = match kind {
            Kind::Generalized { kernel, .. } => crate::FeatureMap::Generalized(kernel),
            _ => crate::FeatureMap::Softmax,
        };
        let (out, primed) = crate::ops::favor_causal_primed(
            &q.view(),
            &k.view(),
            &v.view(),
            &p,
            map,
            self.chunk_size(),
        )?;
        let n = k.shape()[2];
        let vs = v.view();
        for (h, head) in primed.into_iter().enumerate() {
            let (s, z) = (head.sums.s, head.sums.z);
            let mut kv = state.kv.index_axis_mut(Axis(0), h);
            let mut zs = state.z.row_mut(h);
            match kind {
                Kind::Softmax { ratio, eps, .. } => {
                    // B = sum_j v_j; A = S / r - eps 1 B^T; Z = (z - eps') / r - eps n.
                    let b = crate::heads::head(&vs, h)?.sum_axis(Axis(0));
                    Zip::from(kv.rows_mut())
                        .and(s.rows())
                        .for_each(|mut a, sr| {
                            Zip::from(&mut a)
                                .and(&sr)
                                .and(&b)
                                .for_each(|a, &sv, &bv| *a = sv / ratio - eps * bv);
                        });
                    Zip::from(&mut zs)
                        .and(&z)
                        .for_each(|zo, &zf| *zo = (zf - CAUSAL_EPS) / ratio - eps * n as f32);
                    state.v_sum.row_mut(h).assign(&b);
                    state.reference[h] = head.key_stab;
                }
                _ => {
                    kv.assign(&s);
                    Zip::from(&mut zs)
                        .and(&z)
                        .for_each(|zo, &zf| *zo = zf - CAUSAL_EPS);
                }
            }
        }
        state.count = n;
        Ok(Tensor::new(out))
    }

    /// One new position per head, the decoding step: appends keys `k` (heads, d) and values
    /// `v` (heads, e) to `state` and returns the attention of queries `q` (heads, d) over every
    /// key so far (heads, e). Equal to [`FastAttention::extend_state`] then
    /// [`FastAttention::query_state`], in one pass over each head's sums, with the heads
    /// shared over `team`'s threads ([`FastAttention::begin_step`] head by head).
    pub fn step_state(
        &self,
        state: &mut CausalState,
        q: &ArrayView2<f32>,
        k: &ArrayView2<f32>,
        v: &ArrayView2<f32>,
        team: &Team,
    ) -> Result<Array2<f32>> {
        const OP: &str = "FastAttention::step_state";
        let d = self.config().dim_heads;
        check_heads(OP, "q", q.shape(), state.heads, d)?;
        check_heads(OP, "k", k.shape(), state.heads, d)?;
        check_heads(OP, "v", v.shape(), state.heads, state.e)?;
        let (heads, e) = (state.heads, state.e);
        let (q, k, v) = (
            q.as_standard_layout(),
            k.as_standard_layout(),
            v.as_standard_layout(),
        );
        let std = "standard layout";
        let (q, k, v) = (
            q.as_slice().expect(std),
            k.as_slice().expect(std),
            v.as_slice().expect(std),
        );
        let mut out = Array2::<f32>::zeros((heads, e));
        let outs: Vec<Mutex<&mut [f32]>> = slices(out.as_slice_mut().expect(std), e)
            .into_iter()
            .map(Mutex::new)
            .collect();
        let step = self.begin_step(state)?;
        team.for_each_chunk(heads, &|h| {
            let mut o = outs[h].lock().unwrap_or_else(|e| e.into_inner());
            let (qh, kh, vh) = (
                &q[h * d..(h + 1) * d],
                &k[h * d..(h + 1) * d],
                &v[h * e..(h + 1) * e],
            );
            step.step_head(h, qh, kh, vh, &mut o)
                .expect("lengths checked above, each head stepped once");
        });
        drop(outs);
        Ok(out)
    }

    /// Starts one decoding step of `state` (one new position for every head), to be taken head
    /// by head with [`StateStep::step_head`], from any threads, each head once: callers that
    /// fuse a head's projections with its attention (as `Attention::decode_rows` does) share
    /// the heads out themselves. The state counts the position from here on, so every head
    /// should be stepped before the state is used again.
    pub fn begin_step<'s>(&self, state: &'s mut CausalState) -> Result<StateStep<'s>> {
        const OP: &str = "FastAttention::begin_step";
        let kind = kind_of(self);
        let m = state.z.ncols();
        let want_m = match kind {
            Kind::NoProjection => self.config().dim_heads,
            _ => self.nb_features(),
        };
        if m != want_m {
            return Err(Error::shape(
                OP,
                format!("a state of {m} features for an attention with {want_m}"),
            ));
        }
        let projection_t = match kind {
            Kind::NoProjection => None,
            _ => {
                let projection = self.host_projection()?.data().clone();
                if !state
                    .projection_t
                    .as_ref()
                    .is_some_and(|t| t.made_from(&projection))
                {
                    state.projection_t = Some(ProjectionT::of(&projection)?);
                }
                state.projection_t.as_ref().map(|t| t.t.clone())
            }
        };
        state.count += 1;
        let std = "standard layout";
        let e = state.e;
        let heads = slices(state.kv.as_slice_mut().expect(std), m * e)
            .into_iter()
            .zip(slices(state.z.as_slice_mut().expect(std), m))
            .zip(slices(state.v_sum.as_slice_mut().expect(std), e))
            .zip(state.reference.iter_mut())
            .map(|(((kv, z), v_sum), reference)| {
                Mutex::new(Some(HeadSums {
                    kv,
                    z,
                    v_sum,
                    reference,
                }))
            })
            .collect();
        Ok(StateStep {
            kind,
            projection_t,
            d: self.config().dim_heads,
            e,
            m,
            count: state.count,
            heads,
        })
    }

    /// Attention of one query per head `q` (heads, d) over every key in `state`: (heads, e).
    pub fn query_state(&self, state: &CausalState, q: &ArrayView2<f32>) -> Result<Array2<f32>> {
        check_heads(
            "FastAttention::query_state",
            "q",
            q.shape(),
            state.heads,
            self.config().dim_heads,
        )?;
        if state.count == 0 {
            return Err(Error::invalid(
                "FastAttention::query_state",
                "state",
                "empty",
                "extend it with the current position's key first",
            ));
        }
        let p = self.host_projection()?;
        let p = p
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|e| Error::shape("FastAttention", e.to_string()))?;
        let kind = kind_of(self);
        let mut out = Array2::<f32>::zeros((state.heads, state.e));
        for h in 0..state.heads {
            let qf = query_features(kind, &q.row(h), &p);
            let (kv, z) = (
                state.kv.index_axis(Axis(0), h),
                state.z.index_axis(Axis(0), h),
            );
            let qsum = qf.sum();
            let qz: f32 = qf.iter().zip(z.iter()).map(|(a, b)| a * b).sum();
            let (num, den) = match kind {
                Kind::Softmax { ratio, eps, .. } => {
                    let vs = state.v_sum.row(h);
                    let num =
                        combine_rows(&qf, &kv) * ratio + &(vs.to_owned() * (ratio * eps * qsum));
                    let den =
                        ratio * qz + ratio * eps * state.count as f32 * qsum + CAUSAL_EPS * qsum;
                    (num, den)
                }
                _ => (combine_rows(&qf, &kv), qz + CAUSAL_EPS * qsum),
            };
            Zip::from(out.row_mut(h))
                .and(&num)
                .for_each(|o, &x| *o = x / den);
        }
        Ok(out)
    }

    /// The sums of a fixed context `k` (heads, nc, d), `v` (heads, nc, e) for non-causal
    /// attention (cross-attention while decoding), computed once.
    pub fn context_state(&self, k: &ArrayView3<f32>, v: &ArrayView3<f32>) -> Result<ContextState> {
        let heads = k.shape()[0];
        let d = self.config().dim_heads;
        check_heads("FastAttention::context_state", "k", k.shape(), heads, d)?;
        if v.shape()[0] != heads || v.shape()[1] != k.shape()[1] {
            return Err(Error::shape(
                "FastAttention::context_state",
                format!("k {:?} and v {:?} do not match", k.shape(), v.shape()),
            ));
        }
        let p = self.host_projection()?;
        let p = p
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|e| Error::shape("FastAttention", e.to_string()))?;
        let kind = kind_of(self);
        let e = v.shape()[2];
        let m = if matches!(kind, Kind::NoProjection) {
            d
        } else {
            self.nb_features()
        };
        let mut kv = Array3::<f32>::zeros((heads, m, e));
        let mut z = Array2::<f32>::zeros((heads, m));
        for h in 0..heads {
            let (kh, vh) = (k.index_axis(Axis(0), h), v.index_axis(Axis(0), h));
            let kf = match kind {
                Kind::Softmax { dn, ratio, eps } => {
                    let u = project(&kh, &p, dn);
                    let s = u.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let mut kf = u;
                    for (mut row, kr) in kf.rows_mut().into_iter().zip(kh.rows()) {
                        let diag = half_sq_norm(&kr, dn);
                        row.mapv_inplace(|x| ratio * ((x - diag - s).exp() + eps));
                    }
                    kf
                }
                Kind::Generalized { dn, eps, kernel } => {
                    project(&kh, &p, dn).mapv(|x| kernel.f(x) + eps)
                }
                Kind::NoProjection => {
                    // softmax over positions, per feature
                    let mut kf = kh.to_owned();
                    for mut col in kf.columns_mut() {
                        let mx = col.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                        col.mapv_inplace(|x| (x - mx).exp());
                        let s = col.sum();
                        col.mapv_inplace(|x| x / s);
                    }
                    kf
                }
            };
            gemm_into(
                &mut kv.index_axis_mut(Axis(0), h),
                &kf.t(),
                &vh,
                1.0,
                0.0,
                Threads::Single,
            )?;
            z.index_axis_mut(Axis(0), h).assign(&kf.sum_axis(Axis(0)));
        }
        Ok(ContextState { heads, kv, z })
    }

    /// Attention of one query per head `q` (heads, d) over a fixed context: (heads, e).
    pub fn query_context(&self, state: &ContextState, q: &ArrayView2<f32>) -> Result<Array2<f32>> {
        check_heads(
            "FastAttention::query_context",
            "q",
            q.shape(),
            state.heads,
            self.config().dim_heads,
        )?;
        let p = self.host_projection()?;
        let p = p
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|e| Error::shape("FastAttention", e.to_string()))?;
        let kind = kind_of(self);
        let mut out = Array2::<f32>::zeros((state.heads, state.kv.shape()[2]));
        for h in 0..state.heads {
            let qf = query_features(kind, &q.row(h), &p);
            let num = combine_rows(&qf, &state.kv.index_axis(Axis(0), h));
            let den: f32 = qf.iter().zip(state.z.row(h)).map(|(a, b)| a * b).sum();
            Zip::from(out.row_mut(h))
                .and(&num)
                .for_each(|o, &x| *o = x / den);
        }
        Ok(out)
    }
}
