//! Softmax and log-softmax along any axis, fused forward and backward.

use ndarray::{ArrayD, Axis, Zip};
use rayon::prelude::*;

use crate::fast_math;
use crate::parallel::PAR_THRESHOLD;
use crate::shape::normalize_axis;
use crate::{Result, Tensor};

/// How many entries of the trailing axes one task handles when the softmax axis is not the
/// last one (a few cache lines per row, so the rows of a task stay in L1).
const COLUMN_BLOCK: usize = 256;

/// Runs `per_lane` on every contiguous lane of `out` (a standard-layout array whose last axis
/// is the softmax axis), in parallel when large.
fn for_each_last_lane(out: &mut ArrayD<f32>, per_lane: impl Fn(&mut [f32]) + Sync + Send) {
    let len = out.shape().last().copied().unwrap_or(1).max(1);
    let data = out.as_slice_mut().expect("standard layout");
    if data.len() >= PAR_THRESHOLD {
        let rows_per_task = (PAR_THRESHOLD / 4 / len).max(1);
        data.par_chunks_mut(rows_per_task * len)
            .for_each(|c| c.chunks_mut(len).for_each(&per_lane));
    } else {
        data.chunks_mut(len).for_each(per_lane);
    }
}

/// Runs `per_block` on blocks `(len, cols)` of `out` viewed as `(outer, len, inner)`, where
/// `len` is the softmax axis: each block holds `cols <= COLUMN_BLOCK` neighbouring lanes, as
/// rows of contiguous entries, so the per-lane work vectorizes across lanes.
fn for_each_lane_block(
    out: &mut ArrayD<f32>,
    ax: usize,
    per_block: impl Fn(ndarray::ArrayViewMut2<f32>) + Sync + Send,
) {
    let shape = out.shape().to_vec();
    let (outer, len, inner) = (
        shape[..ax].iter().product::<usize>(),
        shape[ax],
        shape[ax + 1..].iter().product::<usize>(),
    );
    let total = out.len();
    let mut v = out
        .view_mut()
        .into_shape_with_order((outer, len, inner))
        .expect("standard layout");
    let run = |mut o: ndarray::ArrayViewMut2<f32>| {
        for block in o.axis_chunks_iter_mut(Axis(1), COLUMN_BLOCK) {
            per_block(block);
        }
    };
    if total >= PAR_THRESHOLD {
        v.axis_iter_mut(Axis(0)).into_par_iter().for_each(|mut o| {
            o.axis_chunks_iter_mut(Axis(1), COLUMN_BLOCK)
                .into_par_iter()
                .for_each(&per_block)
        });
    } else {
        v.axis_iter_mut(Axis(0)).for_each(run);
    }
}

/// Column-wise maximum of the rows of a block, with non-finite maxima replaced by 0 (a lane of
/// -inf then gives 0/0 = NaN, as PyTorch does; a +inf gives inf/inf = NaN).
fn column_max(block: &ndarray::ArrayViewMut2<f32>) -> Vec<f32> {
    let mut m = vec![f32::NEG_INFINITY; block.ncols()];
    for row in block.rows() {
        for (mi, &v) in m.iter_mut().zip(row) {
            *mi = if v > *mi { v } else { *mi };
        }
    }
    m.iter_mut()
        .for_each(|v| *v = if v.is_finite() { *v } else { 0.0 });
    m
}

/// Sum of a slice with eight running sums, so that it vectorizes (a left fold of floats
/// cannot be reordered by the compiler).
pub(crate) fn sum_f32(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Maximum of a slice with a non-finite result replaced by 0 (the shift of a stable softmax:
/// a lane of -inf then gives 0/0 = NaN, as in PyTorch).
fn finite_max(xs: &[f32]) -> f32 {
    let m = xs
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    if m.is_finite() { m } else { 0.0 }
}

/// `log(sum(exp(xs)))` of a contiguous lane, through the vectorized exp.
pub(crate) fn logsumexp(xs: &[f32]) -> f32 {
    let m = finite_max(xs);
    let mut buf = [0.0f32; 256];
    let mut s = 0.0f32;
    for c in xs.chunks(buf.len()) {
        let b = &mut buf[..c.len()];
        b.copy_from_slice(c);
        fast_math::scaled_exp_inplace(b, m, 1.0, 0.0);
        s += sum_f32(b);
    }
    m + s.ln()
}

/// Softmax of one contiguous lane in place.
fn softmax_lane(xs: &mut [f32]) {
    let m = finite_max(xs);
    fast_math::scaled_exp_inplace(xs, m, 1.0, 0.0);
    let inv = 1.0 / sum_f32(xs);
    xs.iter_mut().for_each(|v| *v *= inv);
}

/// Softmax along `ax` of an array, each lane shifted by its max for stability. The result is
/// in standard layout.
pub fn softmax_array(x: &ndarray::ArrayViewD<f32>, ax: usize) -> ArrayD<f32> {
    let mut out = x.as_standard_layout().into_owned();
    if ax + 1 == out.ndim() {
        for_each_last_lane(&mut out, softmax_lane);
        return out;
    }
    for_each_lane_block(&mut out, ax, |mut block| {
        let m = column_max(&block);
        let mut s = vec![0.0f32; m.len()];
        for mut row in block.rows_mut() {
            let row = row.as_slice_mut().expect("contiguous row");
            for ((v, &mi), si) in row.iter_mut().zip(&m).zip(&mut s) {
                *v = fast_math::exp(*v - mi);
                *si += *v;
            }
        }
        s.iter_mut().for_each(|v| *v = 1.0 / *v);
        for mut row in block.rows_mut() {
            row.iter_mut().zip(&s).for_each(|(v, &inv)| *v *= inv);
        }
    });
    out
}

/// Log-softmax along `ax` of an array (standard layout result).
pub fn log_softmax_array(x: &ndarray::ArrayViewD<f32>, ax: usize) -> ArrayD<f32> {
    let mut out = x.as_standard_layout().into_owned();
    if ax + 1 == out.ndim() {
        for_each_last_lane(&mut out, |lane| {
            let lse = logsumexp(lane);
            lane.iter_mut().for_each(|v| *v -= lse);
        });
        return out;
    }
    for_each_lane_block(&mut out, ax, |mut block| {
        let m = column_max(&block);
        let mut s = vec![0.0f32; m.len()];
        for row in block.rows() {
            for ((&v, &mi), si) in row.iter().zip(&m).zip(&mut s) {
                *si += fast_math::exp(v - mi);
            }
        }
        let lse: Vec<f32> = m.iter().zip(&s).map(|(&m, &s)| m + s.ln()).collect();
        for mut row in block.rows_mut() {
            row.iter_mut().zip(&lse).for_each(|(v, &l)| *v -= l);
        }
    });
    out
}

/// `f` over matching lanes along `ax` of a gradient and a saved output, in parallel when large.
fn zip_lanes(
    g: &mut ArrayD<f32>,
    y: &crate::tensor::Data,
    ax: usize,
    f: impl Fn(ndarray::ArrayViewMut1<f32>, ndarray::ArrayView1<f32>) + Sync + Send,
) {
    let large = g.len() >= PAR_THRESHOLD;
    let z = Zip::from(g.lanes_mut(Axis(ax))).and(y.lanes(Axis(ax)));
    if large {
        z.par_for_each(f)
    } else {
        z.for_each(f)
    }
}

impl Tensor {
    /// Softmax along `axis`.
    pub fn softmax(&self, axis: isize) -> Result<Tensor> {
        let ax = normalize_axis("softmax", axis, self.rank())?;
        on_device!(crate::cuda::ops::softmax(self, ax, false));
        let y = softmax_array(&self.view(), ax).into_shared();
        let yd = y.clone();
        Ok(Tensor::from_op(y, "softmax", &[self], move |g, _| {
            // dx = y * (g - sum(g * y))
            let mut gx = g;
            zip_lanes(&mut gx, &yd, ax, |mut gl, yl| {
                let dot: f32 = gl.iter().zip(yl.iter()).map(|(a, b)| a * b).sum();
                Zip::from(&mut gl)
                    .and(&yl)
                    .for_each(|g, &y| *g = y * (*g - dot));
            });
            Ok(vec![Some(gx)])
        }))
    }

    /// Log-softmax along `axis`.
    pub fn log_softmax(&self, axis: isize) -> Result<Tensor> {
        let ax = normalize_axis("log_softmax", axis, self.rank())?;
        on_device!(crate::cuda::ops::softmax(self, ax, true));
        let y = log_softmax_array(&self.view(), ax).into_shared();
        let yd = y.clone();
        Ok(Tensor::from_op(y, "log_softmax", &[self], move |g, _| {
            // dx = g - exp(y) * sum(g)
            let mut gx = g;
            zip_lanes(&mut gx, &yd, ax, |mut gl, yl| {
                let s: f32 = gl.sum();
                Zip::from(&mut gl)
                    .and(&yl)
                    .for_each(|g, &y| *g -= fast_math::exp(y) * s);
            });
            Ok(vec![Some(gx)])
        }))
    }
}
