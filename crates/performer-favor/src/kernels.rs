//! Linear attention on one head, given its features: the non-causal product and the causal
//! prefix sums, each forward and backward, in chunks of rows so the working set stays in cache
//! and no (n, m, d) tensor ever exists.
//!
//! Notation per head: features `q'`, `k'` (n, m), values `v` (n, d), `v+ = [v | 1]` (n, d+1)
//! so that one product yields the numerator and the normalizer together.
//! - non-causal: `[num | den] = q' (k'^T v+)`, `out = num / den` (no epsilon, as the reference);
//! - causal: `[num_i | den_i] = q'_i (sum_{j<=i} k'_j v+_j^T)`, `den_i += eps * sum(q'_i)`
//!   (the reference adds eps to every element of the key prefix sum), `out = num / den`.
//!
//! Causal chunks: with `S` the state of all earlier chunks (m, d+1), a chunk's result is
//! `q'_c S + mask(q'_c k'_c^T) v+_c` and then `S += k'_c^T v+_c`. The backward runs one sweep
//! forward (gradients of `q'`, needing `S`) and one backward (gradients of `k'` and `v`, needing
//! the reverse state `R = sum_{i after the chunk} q'_i dnum+_i^T`), so nothing per chunk is stored.

use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, s};
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
    let n = a.nrows();
    for i in 0..n {
        for j in i + 1..a.ncols() {
            a[[i, j]] = 0.0;
        }
    }
}

/// Rows `range` of `v` with a column of ones appended, into `buf`'s first rows.
fn augmented<'b>(
    v: &ArrayView2<f32>,
    start: usize,
    end: usize,
    buf: &'b mut Array2<f32>,
) -> ArrayViewMut2<'b, f32> {
    let d = v.ncols();
    let mut va = buf.slice_mut(s![..end - start, ..]);
    va.slice_mut(s![.., ..d])
        .assign(&v.slice(s![start..end, ..]));
    va.column_mut(d).fill(1.0);
    va
}

/// Gradient of `[num | den]` from the output's gradient: `dnum = g / den`,
/// `dden = -(g . out) / den`.
fn augmented_grad<'b>(
    g: &ArrayView2<f32>,
    out: &ArrayView2<f32>,
    den: &ArrayView1<f32>,
    start: usize,
    end: usize,
    buf: &'b mut Array2<f32>,
) -> ArrayViewMut2<'b, f32> {
    let d = g.ncols();
    let mut dna = buf.slice_mut(s![..end - start, ..]);
    for (r, i) in (start..end).enumerate() {
        let inv = 1.0 / den[i];
        let mut dot = 0.0f32;
        for e in 0..d {
            let gv = g[[i, e]];
            dot += gv * out[[i, e]];
            dna[[r, e]] = gv * inv;
        }
        dna[[r, d]] = -dot * inv;
    }
    dna
}

/// Writes `out = num / den` for a chunk and records `den`.
fn normalize(
    na: &ArrayView2<f32>,
    extra_den: impl Fn(usize) -> f32,
    start: usize,
    out: &mut ArrayViewMut2<f32>,
    den: &mut ArrayViewMut1<f32>,
) {
    let d = out.ncols();
    for r in 0..na.nrows() {
        let dv = na[[r, d]] + extra_den(r);
        den[start + r] = dv;
        let inv = 1.0 / dv;
        for e in 0..d {
            out[[start + r, e]] = na[[r, e]] * inv;
        }
    }
}

/// Non-causal linear attention forward of one head into `out` (n, d) and `den` (n).
pub(crate) fn noncausal_forward(
    qf: &ArrayView2<f32>,
    kf: &ArrayView2<f32>,
    v: &ArrayView2<f32>,
    chunk: usize,
    out: &mut ArrayViewMut2<f32>,
    den: &mut ArrayViewMut1<f32>,
) -> Result<()> {
    let (n, m) = qf.dim();
    let d = v.ncols();
    let mut va_buf = Array2::<f32>::zeros((chunk, d + 1));
    let mut kv = Array2::<f32>::zeros((m, d + 1));
    for start in (0..kf.nrows()).step_by(chunk) {
        let end = (start + chunk).min(kf.nrows());
        let va = augmented(v, start, end, &mut va_buf);
        mm(
            &mut kv.view_mut(),
            &kf.slice(s![start..end, ..]).t(),
            &va.view(),
            1.0,
            1.0,
        )?;
    }
    let mut na = Array2::<f32>::zeros((chunk, d + 1));
    for start in (0..n).step_by(chunk) {
        let end = (start + chunk).min(n);
        let mut na_c = na.slice_mut(s![..end - start, ..]);
        mm(
            &mut na_c,
            &qf.slice(s![start..end, ..]),
            &kv.view(),
            1.0,
            0.0,
        )?;
        normalize(&na_c.view(), |_| 0.0, start, out, den);
    }
    Ok(())
}

/// Non-causal backward of one head: gradients of `q'`, `k'` (n, m) and `v` (n, d).
#[allow(clippy::too_many_arguments)]
pub(crate) fn noncausal_backward(
    qf: &ArrayView2<f32>,
    kf: &ArrayView2<f32>,
    v: &ArrayView2<f32>,
    g: &ArrayView2<f32>,
    out: &ArrayView2<f32>,
    den: &ArrayView1<f32>,
    chunk: usize,
    dqf: &mut ArrayViewMut2<f32>,
    dkf: &mut ArrayViewMut2<f32>,
    dv: &mut ArrayViewMut2<f32>,
) -> Result<()> {
    let (n, m) = qf.dim();
    let nk = kf.nrows();
    let d = v.ncols();
    let mut va_buf = Array2::<f32>::zeros((chunk, d + 1));
    let mut kv = Array2::<f32>::zeros((m, d + 1));
    for start in (0..nk).step_by(chunk) {
        let end = (start + chunk).min(nk);
        let va = augmented(v, start, end, &mut va_buf);
        mm(
            &mut kv.view_mut(),
            &kf.slice(s![start..end, ..]).t(),
            &va.view(),
            1.0,
            1.0,
        )?;
    }
    // dq' = dnum+ kv^T; T = q'^T dnum+ collects what the keys see.
    let mut dna_buf = Array2::<f32>::zeros((chunk, d + 1));
    let mut t = Array2::<f32>::zeros((m, d + 1));
    for start in (0..n).step_by(chunk) {
        let end = (start + chunk).min(n);
        let dna = augmented_grad(g, out, den, start, end, &mut dna_buf);
        mm(
            &mut dqf.slice_mut(s![start..end, ..]),
            &dna.view(),
            &kv.t(),
            1.0,
            0.0,
        )?;
        mm(
            &mut t.view_mut(),
            &qf.slice(s![start..end, ..]).t(),
            &dna.view(),
            1.0,
            1.0,
        )?;
    }
    let mut dva = Array2::<f32>::zeros((chunk, d + 1));
    for start in (0..nk).step_by(chunk) {
        let end = (start + chunk).min(nk);
        let va = augmented(v, start, end, &mut va_buf);
        mm(
            &mut dkf.slice_mut(s![start..end, ..]),
            &va.view(),
            &t.t(),
            1.0,
            0.0,
        )?;
        let mut dva_c = dva.slice_mut(s![..end - start, ..]);
        mm(
            &mut dva_c,
            &kf.slice(s![start..end, ..]),
            &t.view(),
            1.0,
            0.0,
        )?;
        dv.slice_mut(s![start..end, ..])
            .assign(&dva_c.slice(s![.., ..d]));
    }
    Ok(())
}

/// Causal linear attention forward of one head into `out` (n, d) and `den` (n).
pub(crate) fn causal_forward(
    qf: &ArrayView2<f32>,
    kf: &ArrayView2<f32>,
    v: &ArrayView2<f32>,
    eps: f32,
    chunk: usize,
    out: &mut ArrayViewMut2<f32>,
    den: &mut ArrayViewMut1<f32>,
) -> Result<()> {
    let (n, m) = qf.dim();
    let d = v.ncols();
    let mut state = Array2::<f32>::zeros((m, d + 1));
    let mut va_buf = Array2::<f32>::zeros((chunk, d + 1));
    let mut na = Array2::<f32>::zeros((chunk, d + 1));
    let mut a = Array2::<f32>::zeros((chunk, chunk));
    for start in (0..n).step_by(chunk) {
        let end = (start + chunk).min(n);
        let l = end - start;
        let (q_c, k_c) = (qf.slice(s![start..end, ..]), kf.slice(s![start..end, ..]));
        let va = augmented(v, start, end, &mut va_buf);
        let mut na_c = na.slice_mut(s![..l, ..]);
        mm(&mut na_c, &q_c, &state.view(), 1.0, 0.0)?;
        let mut a_c = a.slice_mut(s![..l, ..l]);
        mm(&mut a_c, &q_c, &k_c.t(), 1.0, 0.0)?;
        mask_future(&mut a_c);
        mm(&mut na_c, &a_c.view(), &va.view(), 1.0, 1.0)?;
        normalize(&na_c.view(), |r| eps * q_c.row(r).sum(), start, out, den);
        mm(&mut state.view_mut(), &k_c.t(), &va.view(), 1.0, 1.0)?;
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
    dqf: &mut ArrayViewMut2<f32>,
    dkf: &mut ArrayViewMut2<f32>,
    dv: &mut ArrayViewMut2<f32>,
) -> Result<()> {
    let (n, m) = qf.dim();
    let d = v.ncols();
    let mut va_buf = Array2::<f32>::zeros((chunk, d + 1));
    let mut dna_buf = Array2::<f32>::zeros((chunk, d + 1));
    let mut a = Array2::<f32>::zeros((chunk, chunk));
    let mut dva = Array2::<f32>::zeros((chunk, d + 1));

    // Forward sweep: dq'_c = dnum+_c S^T + mask(dnum+_c v+_c^T) k'_c + eps * dden_c.
    let mut state = Array2::<f32>::zeros((m, d + 1));
    for start in (0..n).step_by(chunk) {
        let end = (start + chunk).min(n);
        let l = end - start;
        let k_c = kf.slice(s![start..end, ..]);
        let va = augmented(v, start, end, &mut va_buf);
        let dna = augmented_grad(g, out, den, start, end, &mut dna_buf);
        let mut dq_c = dqf.slice_mut(s![start..end, ..]);
        mm(&mut dq_c, &dna.view(), &state.t(), 1.0, 0.0)?;
        let mut a_c = a.slice_mut(s![..l, ..l]);
        mm(&mut a_c, &dna.view(), &va.t(), 1.0, 0.0)?;
        mask_future(&mut a_c);
        mm(&mut dq_c, &a_c.view(), &k_c, 1.0, 1.0)?;
        for r in 0..l {
            let e = eps * dna[[r, d]];
            dq_c.row_mut(r).mapv_inplace(|x| x + e);
        }
        mm(&mut state.view_mut(), &k_c.t(), &va.view(), 1.0, 1.0)?;
    }

    // Backward sweep with R = sum over later rows of q'_i dnum+_i^T:
    // dk'_c = v+_c R^T + mask(dnum+_c v+_c^T)^T q'_c,  dv+_c = k'_c R + mask(q'_c k'_c^T)^T dnum+_c.
    let mut rev = Array2::<f32>::zeros((m, d + 1));
    let starts: Vec<usize> = (0..n).step_by(chunk).collect();
    for &start in starts.iter().rev() {
        let end = (start + chunk).min(n);
        let l = end - start;
        let (q_c, k_c) = (qf.slice(s![start..end, ..]), kf.slice(s![start..end, ..]));
        let va = augmented(v, start, end, &mut va_buf);
        let dna = augmented_grad(g, out, den, start, end, &mut dna_buf);
        let mut dk_c = dkf.slice_mut(s![start..end, ..]);
        mm(&mut dk_c, &va.view(), &rev.t(), 1.0, 0.0)?;
        let mut a_c = a.slice_mut(s![..l, ..l]);
        mm(&mut a_c, &dna.view(), &va.t(), 1.0, 0.0)?;
        mask_future(&mut a_c);
        mm(&mut dk_c, &a_c.t(), &q_c, 1.0, 1.0)?;
        mm(&mut a_c, &q_c, &k_c.t(), 1.0, 0.0)?;
        mask_future(&mut a_c);
        let mut dva_c = dva.slice_mut(s![..l, ..]);
        mm(&mut dva_c, &k_c, &rev.view(), 1.0, 0.0)?;
        mm(&mut dva_c, &a_c.t(), &dna.view(), 1.0, 1.0)?;
        dv.slice_mut(s![start..end, ..])
            .assign(&dva_c.slice(s![.., ..d]));
        mm(&mut rev.view_mut(), &q_c.t(), &dna.view(), 1.0, 1.0)?;
    }
    Ok(())
}
