//! Reductions over chosen axes: sum, mean, amax, L2 norm.

use ndarray::{ArrayD, ArrayView1, ArrayViewD, Axis, IxDyn, Zip};

use super::arrays::{map_array, reshape_array, sum_strided_axis, zip_map, zip_map3};
use crate::parallel::PAR_THRESHOLD;
use crate::shape::normalize_axes;
use crate::{Result, Tensor};

/// Folds every lane along `ax` to one value with `f`, keeping `ax` as size 1. Reads the input
/// in place (no copy) and splits the lanes over threads when the input is large.
fn reduce_axis(
    x: &ArrayViewD<f32>,
    ax: usize,
    f: &(impl Fn(ArrayView1<f32>) -> f32 + Sync),
) -> ArrayD<f32> {
    let z = Zip::from(x.lanes(Axis(ax)));
    let out = if x.len() >= PAR_THRESHOLD {
        z.par_map_collect(f)
    } else {
        z.map_collect(f)
    };
    out.insert_axis(Axis(ax))
}

/// Reduces `x` over `axes` (sorted ascending) with `f`, last axis first, keeping them as size 1.
/// `f` must be associative over the lanes (sum, max).
fn reduce_keep(
    x: &ArrayViewD<f32>,
    axes: &[usize],
    f: &(impl Fn(ArrayView1<f32>) -> f32 + Sync),
) -> ArrayD<f32> {
    let Some((&last, rest)) = axes.split_last() else {
        return x.to_owned();
    };
    let mut out = reduce_axis(x, last, f);
    for &ax in rest.iter().rev() {
        out = reduce_axis(&out.view(), ax, f);
    }
    out
}

/// Sums `x` over `axes` (sorted ascending), keeping them as size 1. An axis whose lanes are
/// strided in a standard-layout array (a bias gradient: the rows of an activation summed) is
/// summed row by row ([`sum_strided_axis`], the same values as the lane loop).
pub(crate) fn sum_keep(x: &ArrayViewD<f32>, axes: &[usize]) -> ArrayD<f32> {
    let lane_sum = |l: ArrayView1<f32>| l.sum();
    let sum_axis = |x: &ArrayViewD<f32>, ax: usize| {
        sum_strided_axis(x, ax).unwrap_or_else(|| reduce_axis(x, ax, &lane_sum))
    };
    let Some((&last, rest)) = axes.split_last() else {
        return x.to_owned();
    };
    let mut out = sum_axis(x, last);
    for &ax in rest.iter().rev() {
        out = sum_axis(&out.view(), ax);
    }
    out
}

/// Maximum of a lane (NaN entries are skipped, as `f32::max` does; written as a comparison so
/// that it vectorizes).
fn lane_max(l: ArrayView1<f32>) -> f32 {
    l.fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// The shape with `axes` set to 1.
fn kept_shape(shape: &[usize], axes: &[usize]) -> Vec<usize> {
    shape
        .iter()
        .enumerate()
        .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
        .collect()
}

/// The shape with `axes` removed.
fn dropped_shape(shape: &[usize], axes: &[usize]) -> Vec<usize> {
    shape
        .iter()
        .enumerate()
        .filter(|(i, _)| !axes.contains(i))
        .map(|(_, &d)| d)
        .collect()
}

/// Expands a reduced gradient (either keepdim layout) back over the reduced axes.
fn expand_back(g: &ArrayD<f32>, in_shape: &[usize], axes: &[usize]) -> ArrayD<f32> {
    let kept = kept_shape(in_shape, axes);
    let g = reshape_array(g.clone(), &kept);
    map_array(
        &g.broadcast(IxDyn(in_shape)).expect("kept shape broadcasts"),
        |v| v,
    )
}

impl Tensor {
    /// Sum over `axes` (negative axes count from the end; an empty list sums nothing).
    pub fn sum(&self, axes: &[isize], keepdim: bool) -> Result<Tensor> {
        let axes = normalize_axes("sum", axes, self.rank())?;
        on_device!(crate::cuda::ops::sum(self, &axes, keepdim));
        let in_shape = self.shape().to_vec();
        let kept = sum_keep(&self.view(), &axes);
        let out = if keepdim {
            kept
        } else {
            reshape_array(kept, &dropped_shape(&in_shape, &axes))
        };
        Ok(Tensor::from_op(out, "sum", &[self], move |g, _| {
            Ok(vec![Some(expand_back(&g, &in_shape, &axes))])
        }))
    }

    /// Sum of all elements (a rank-0 tensor).
    pub fn sum_all(&self) -> Tensor {
        let axes: Vec<isize> = (0..self.rank() as isize).collect();
        self.sum(&axes, false).expect("all axes are valid")
    }

    /// Mean over `axes`.
    pub fn mean(&self, axes: &[isize], keepdim: bool) -> Result<Tensor> {
        let norm = normalize_axes("mean", axes, self.rank())?;
        let count: usize = norm.iter().map(|&a| self.shape()[a]).product();
        Ok(self.sum(axes, keepdim)?.div_scalar(count.max(1) as f32))
    }

    /// Mean of all elements (a rank-0 tensor).
    pub fn mean_all(&self) -> Tensor {
        self.sum_all().div_scalar(self.numel().max(1) as f32)
    }

    /// Maximum over `axes`. The gradient is shared evenly among tied maxima (PyTorch's `amax`).
    pub fn amax(&self, axes: &[isize], keepdim: bool) -> Result<Tensor> {
        let axes = normalize_axes("amax", axes, self.rank())?;
        if let Some(&ax) = axes.iter().find(|&&a| self.shape()[a] == 0) {
            return Err(crate::Error::shape(
                "amax",
                format!("cannot reduce empty axis {ax} of {:?}", self.shape()),
            ));
        }
        on_device!(crate::cuda::row_ops::reduce_axes(
            self,
            &axes,
            keepdim,
            performer_cuda::tensor_ops::Reduce::Max
        ));
        let in_shape = self.shape().to_vec();
        let m = reduce_keep(&self.view(), &axes, &lane_max);
        let kept = m.clone();
        let out = if keepdim {
            m
        } else {
            reshape_array(m, &dropped_shape(&in_shape, &axes))
        };
        let xd = self.data().clone();
        Ok(Tensor::from_op(out, "amax", &[self], move |g, _| {
            let mb = kept
                .broadcast(IxDyn(&in_shape))
                .expect("kept shape broadcasts");
            let is_max = zip_map(&xd.view(), &mb, |x, m| if x == m { 1.0 } else { 0.0 });
            let counts = sum_keep(&is_max.view(), &axes);
            let gk = reshape_array(g, &kept_shape(&in_shape, &axes));
            let scale = zip_map(&gk.view(), &counts.view(), |g, c| g / c);
            let sb = scale
                .broadcast(IxDyn(&in_shape))
                .expect("kept shape broadcasts");
            Ok(vec![Some(zip_map(&is_max.view(), &sb, |w, s| w * s))])
        }))
    }

    /// Euclidean norm over `axes` (the gradient at a zero norm is 0).
    pub fn norm(&self, axes: &[isize], keepdim: bool) -> Result<Tensor> {
        let axes = normalize_axes("norm", axes, self.rank())?;
        on_device!(crate::cuda::row_ops::reduce_axes(
            self,
            &axes,
            keepdim,
            performer_cuda::tensor_ops::Reduce::SumSquares
        ));
        let in_shape = self.shape().to_vec();
        let sq = map_array(&self.view(), |x| x * x);
        let n = sum_keep(&sq.view(), &axes).mapv(f32::sqrt);
        let kept = n.clone();
        let out = if keepdim {
            n
        } else {
            reshape_array(n, &dropped_shape(&in_shape, &axes))
        };
        let xd = self.data().clone();
        Ok(Tensor::from_op(out, "norm", &[self], move |g, _| {
            let gk = reshape_array(g, &kept_shape(&in_shape, &axes));
            let gb = gk
                .broadcast(IxDyn(&in_shape))
                .expect("kept shape broadcasts");
            let nb = kept
                .broadcast(IxDyn(&in_shape))
                .expect("kept shape broadcasts");
            Ok(vec![Some(zip_map3(&xd.view(), &gb, &nb, |x, g, n| {
                if n > 0.0 { g * x / n } else { 0.0 }
            }))])
        }))
    }
}
