//! Linear attention on one head, given its features: the non-causal product and the causal
//! prefix sums, each forward and backward; no (n, m, d) tensor ever exists.
//!
//! Notation per head: features `q'` (n, m), `k'` (nk, m), values `v` (nk, d), and `v+ = [v | 1]`
//! (nk, d+1) so that one product yields the numerator and the normalizer together.
//! - non-causal: `[num | den] = q' (k'^T v+)`, `out = num / den` (no epsilon, as the reference);
//! - causal: `[num_i | den_i] = q'_i (sum_{j<=i} k'_j v+_j^T)`, `den_i += eps * sum(q'_i)`
//!   (the reference adds eps to every element of the key prefix sum), `out = num / den`.
//!
//! Causal attention runs over chunks of rows: with `S` the state of all earlier chunks
//! (m, d+1), a chunk's result is `q'_c S + mask(q'_c k'_c^T) v+_c`, then `S += k'_c^T v+_c`.
//! The backward runs one sweep forward (gradients of `q'`, which need `S`) and one backward
//! (gradients of `k'` and `v`, which need the reverse state `R = sum over later rows of
//! q'_i dnum+_i^T`). The forward may keep each chunk's incoming state and its masked score
//! block ([`CausalCache`]) so the backward need not recompute them.

use ndarray::{Array2, Array3, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis, Zip, s};
use performer_tensor::Result;
use performer_tensor::gemm::{Threads, gemm_into};

/// `c = beta * c + alpha * a @ b`, single-threaded (callers are parallel over heads).
#[inline]
fn mm(
    c: &mut ArrayViewMut2<f32>,
    a: &ArrayView2<f32>,
    b: &ArrayView2<f32>,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    gemm_into(c, a, b, alpha, beta, Threads::Single)
}

/// Zeroes the strictly upper triangle (j > i): position i sees positions <= i.
fn mask_future(a: &mut ArrayViewMut2<f32>) {
    for (i, mut row) in a.rows_mut().into_iter().enumerate() {
        row.slice_mut(s![i + 1..]).fill(0.0);
    }
}

/// `[v | 1]` for all rows.
pub(crate) fn augment(v: &ArrayView2<f32>) -> Array2<f32> {
    let (n, d) = v.dim();
    let mut va = Array2::<f32>::ones((n, d + 1));
    va.slice_mut(s![.., ..d]).assign(v);
    va
}

/// Gradient of `[num | den]` from the output's gradient: `dnum = g / den`,
/// `dden = -(g . out) / den`.
pub(crate) fn augmented_grad(
    g: &ArrayView2<f32>,
    out: &ArrayView2<f32>,
    den: &ArrayView1<f32>,
) -> Array2<f32> {
    let (n, d) = g.dim();
    let mut dna = Array2::<f32>::zeros((n, d + 1));
    Zip::from(dna.rows_mut())
        .and(g.rows())
        .and(out.rows())
        .and(den)
        .for_each(|mut r, gr, or, &dv| {
            let inv = 1.0 / dv;
            let mut dot = 0.0f32;
            for ((dst, &gv), &ov) in r.iter_mut().zip(gr).zip(or) {
                dot += gv * ov;
                *dst = gv * inv;
            }
            r[d] = -dot * inv;
        });
    dna
}

/// `out = num / den` from `[num | den]` rows, with `extra(r)` added to each normalizer.
fn normalize(
    na: &ArrayView2<f32>,
    extra: impl Fn(usize) -> f32,
    out: &mut ArrayViewMut2<f32>,
    den: &mut ArrayViewMut1<f32>,
) {
    let d = out.ncols();
    for (r, ((nr, mut or), dv)) in na
        .rows()
        .into_iter()
        .zip(out.rows_mut())
        .zip(den.iter_mut())
        .enumerate()
    {
        let total = nr[d] + extra(r);
        *dv = total;
        let inv = 1.0 / total;
        Zip::from(&mut or)
            .and(&nr.slice(s![..d]))
            .for_each(|o, &x| *o = x * inv);
    }
}

/// Non-causal forward of one head: fills `out` (n, d), `den` (n), and returns `k'^T v+`
/// (m, d+1) for the backward.
pub(crate) fn noncausal_forward(
    qf: &ArrayView2<f32>,
    kf: &ArrayView2<f32>,
    v: &ArrayView2<f32>,
    out: &mut ArrayViewMut2<f32>,
    den: &mut ArrayViewMut1<f32>,
) -> Result<Array2<f32>> {
    let (n, m) = qf.dim();
    let d = v.ncols();
    let va = augment(v);
    let mut kv = Array2::<f32>::zeros((m, d + 1));
    mm(&mut kv.view_mut(), &kf.t(), &va.view(), 1.0, 0.0)?;
    let mut na = Array2::<f32>::zeros((n, d + 1));
    mm(&mut na.view_mut(), qf, &kv.view(), 1.0, 0.0)?;
    normalize(&na.view(), |_| 0.0, out, den);
    Ok(kv)
}

/// Non-causal backward of one head: gradients of `q'`, `k'` (n, m) and `v` (n, d), from the
/// `k'^T v+` of the forward.
#[allow(clippy::too_many_arguments)]
pub(crate) fn noncausal_backward(
    qf: &ArrayView2<f32>,
    kf: &ArrayView2<f32>,
    v: &ArrayView2<f32>,
    kv: &ArrayView2<f32>,
    g: &ArrayView2<f32>,
    out: &ArrayView2<f32>,
    den: &ArrayView1<f32>,
    dqf: &mut ArrayViewMut2<f32>,
    dkf: &mut ArrayViewMut2<f32>,
    dv: &mut ArrayViewMut2<f32>,
) -> Result<()> {
    let m = qf.ncols();
    let d = v.ncols();
    let dna = augmented_grad(g, out, den);
    mm(dqf, &dna.view(), &kv.t(), 1.0, 0.0)?;
    // T = q'^T dnum+ is what every key sees.
    let mut t = Array2::<f32>::zeros((m, d + 1));
    mm(&mut t.view_mut(), &qf.t(), &dna.view(), 1.0, 0.0)?;
    let va = augment(v);
    mm(dkf, &va.view(), &t.t(), 1.0, 0.0)?;
    let mut dva = Array2::<f32>::zeros((kf.nrows(), d + 1));
    mm(&mut dva.view_mut(), kf, &t.view(), 1.0, 0.0)?;
    dv.assign(&dva.slice(s![.., ..d]));
    Ok(())
}

/// What a causal forward may keep for its backward: the state entering each chunk
/// (chunks, m, d+1) and each chunk's masked score block `mask(q'_c k'_c^T)` (chunks, C, C).
pub(crate) struct CausalCache {
    pub states: Array3<f32>,
    pub scores: Array3<f32>,
}

impl CausalCache {
    pub fn new(n: usize, m: usize, d: usize, chunk: usize) -> Self {
        let chunks = n.div_ceil(chunk);
        CausalCache {
            states: Array3::zeros((chunks, m, d + 1)),
            scores: Array3::zeros((chunks, chunk, chunk)),
        }
    }

    /// Bytes it takes for one head.
    pub fn bytes(n: usize, m: usize, d: usize, chunk: usize) -> usize {
        n.div_ceil(chunk) * (m * (d + 1) + chunk * chunk) * 4
    }
}

/// Causal forward of one head into `out` (n, d) and `den` (n); fills `cache` when given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn causal_forward(
    qf: &ArrayView2<f32>,
    kf: &ArrayView2<f32>,
    v: &ArrayView2<f32>,
    eps: f32,
    chunk: usize,
    out: &mut ArrayViewMut2<f32>,
    den: &mut ArrayViewMut1<f32>,
    mut cache: Option<&mut CausalCache>,
) -> Result<()> {
    let (n, m) = qf.dim();
    let d = v.ncols();
    let va = augment(v);
    let mut state = Array2::<f32>::zeros((m, d + 1));
    let mut na = Array2::<f32>::zeros((chunk, d + 1));
    let mut a = Array2::<f32>::zeros((chunk, chunk));
    for (c, start) in (0..n).step_by(chunk).enumerate() {
        let end = (start + chunk).min(n);
        let l = end - start;
        let (q_c, k_c, va_c) = (
            qf.slice(s![start..end, ..]),
            kf.slice(s![start..end, ..]),
            va.slice(s![start..end, ..]),
        );
        let mut na_c = na.slice_mut(s![..l, ..]);
        mm(&mut na_c, &q_c, &state.view(), 1.0, 0.0)?;
        let mut a_c = a.slice_mut(s![..l, ..l]);
        mm(&mut a_c, &q_c, &k_c.t(), 1.0, 0.0)?;
        mask_future(&mut a_c);
        mm(&mut na_c, &a_c.view(), &va_c, 1.0, 1.0)?;
        normalize(
            &na_c.view(),
            |r| eps * q_c.row(r).sum(),
            &mut out.slice_mut(s![start..end, ..]),
            &mut den.slice_mut(s![start..end]),
        );
        if let Some(cache) = cache.as_deref_mut() {
            cache.states.index_axis_mut(Axis(0), c).assign(&state);
            cache
                .scores
                .index_axis_mut(Axis(0), c)
                .slice_mut(s![..l, ..l])
                .assign(&a_c);
        }
        mm(&mut state.view_mut(), &k_c.t(), &va_c, 1.0, 1.0)?;
    }
    Ok(())
}

/// Causal backward of one head: gradients of `q'`, `k'` (n, m) and `v` (n, d).
#[allow(clippy::too_many_arguments)]
pub(crate) fn causal_backward(
    qf: &ArrayView2<f32>,
    kf: &ArrayView2<f32>,
    v: &ArrayView2<f32>,
    g: &ArrayView2<f32>,
    out: &ArrayView2<f32>,
    den: &ArrayView1<f32>,
    eps: f32,
    chunk: usize,
    cache: Option<&CausalCache>,
    dqf: &mut ArrayViewMut2<f32>,
    dkf: &mut ArrayViewMut2<f32>,
    dv: &mut ArrayViewMut2<f32>,
) -> Result<()> {
    let (n, m) = qf.dim();
    let d = v.ncols();
    let va = augment(v);
    let dna = augmented_grad(g, out, den);
    let mut a = Array2::<f32>::zeros((chunk, chunk));
    let mut dva = Array2::<f32>::zeros((chunk, d + 1));
    let starts: Vec<usize> = (0..n).step_by(chunk).collect();

    // Forward sweep: dq'_c = dnum+_c S^T + mask(dnum+_c v+_c^T) k'_c + eps * dden_c.
    let mut running = Array2::<f32>::zeros((m, d + 1));
    for (c, &start) in starts.iter().enumerate() {
        let end = (start + chunk).min(n);
        let l = end - start;
        let (k_c, va_c, dna_c) = (
            kf.slice(s![start..end, ..]),
            va.slice(s![start..end, ..]),
            dna.slice(s![start..end, ..]),
        );
        let state = match cache {
            Some(cache) => cache.states.index_axis(Axis(0), c),
            None => running.view(),
        };
        let mut dq_c = dqf.slice_mut(s![start..end, ..]);
        mm(&mut dq_c, &dna_c, &state.t(), 1.0, 0.0)?;
        let mut a_c = a.slice_mut(s![..l, ..l]);
        mm(&mut a_c, &dna_c, &va_c.t(), 1.0, 0.0)?;
        mask_future(&mut a_c);
        mm(&mut dq_c, &a_c.view(), &k_c, 1.0, 1.0)?;
        Zip::from(dq_c.rows_mut())
            .and(dna_c.column(d))
            .for_each(|mut row, &dden| {
                let e = eps * dden;
                row.mapv_inplace(|x| x + e);
            });
        if cache.is_none() {
            mm(&mut running.view_mut(), &k_c.t(), &va_c, 1.0, 1.0)?;
        }
    }

    // Backward sweep with R = sum over later rows of q'_i dnum+_i^T:
    // dk'_c = v+_c R^T + mask(dnum+_c v+_c^T)^T q'_c,  dv+_c = k'_c R + mask(q'_c k'_c^T)^T dnum+_c.
    let mut rev = Array2::<f32>::zeros((m, d + 1));
    for (c, &start) in starts.iter().enumerate().rev() {
        let end = (start + chunk).min(n);
        let l = end - start;
        let (q_c, k_c) = (qf.slice(s![start..end, ..]), kf.slice(s![start..end, ..]));
        let (va_c, dna_c) = (va.slice(s![start..end, ..]), dna.slice(s![start..end, ..]));
        let mut dk_c = dkf.slice_mut(s![start..end, ..]);
        mm(&mut dk_c, &va_c, &rev.t(), 1.0, 0.0)?;
        let mut a_c = a.slice_mut(s![..l, ..l]);
        mm(&mut a_c, &dna_c, &va_c.t(), 1.0, 0.0)?;
        mask_future(&mut a_c);
        mm(&mut dk_c, &a_c.t(), &q_c, 1.0, 1.0)?;
        let mut dva_c = dva.slice_mut(s![..l, ..]);
        mm(&mut dva_c, &k_c, &rev.view(), 1.0, 0.0)?;
        match cache {
            Some(cache) => {
                let scores = cache.scores.index_axis(Axis(0), c);
                mm(
                    &mut dva_c,
                    &scores.slice(s![..l, ..l]).t(),
                    &dna_c,
                    1.0,
                    1.0,
                )?;
            }
            None => {
                mm(&mut a_c, &q_c, &k_c.t(), 1.0, 0.0)?;
                mask_future(&mut a_c);
                mm(&mut dva_c, &a_c.t(), &dna_c, 1.0, 1.0)?;
            }
        }
        dv.slice_mut(s![start..end, ..])
            .assign(&dva_c.slice(s![.., ..d]));
        mm(&mut rev.view_mut(), &q_c.t(), &dna_c, 1.0, 1.0)?;
    }
    Ok(())
}
