//! Softmax and log-softmax along any axis, fused forward and backward.

use ndarray::{ArrayD, Axis, Zip};

use crate::shape::normalize_axis;
use crate::{Result, Tensor};

/// Softmax along `ax` of an array, each lane shifted by its max for stability.
pub fn softmax_array(x: &ndarray::ArrayViewD<f32>, ax: usize) -> ArrayD<f32> {
    let mut out = x.as_standard_layout().into_owned();
    let lanes = out.lanes_mut(Axis(ax));
    let f = |mut lane: ndarray::ArrayViewMut1<f32>| {
        let m = lane.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let m = if m.is_finite() { m } else { 0.0 };
        let mut s = 0.0f32;
        lane.mapv_inplace(|v| {
            let e = (v - m).exp();
            s += e;
            e
        });
        lane.mapv_inplace(|v| v / s);
    };
    if x.len() >= crate::parallel::PAR_THRESHOLD {
        Zip::from(lanes).par_for_each(f);
    } else {
        Zip::from(lanes).for_each(f);
    }
    out
}

/// Log-softmax along `ax` of an array.
pub fn log_softmax_array(x: &ndarray::ArrayViewD<f32>, ax: usize) -> ArrayD<f32> {
    let mut out = x.as_standard_layout().into_owned();
    let lanes = out.lanes_mut(Axis(ax));
    let f = |mut lane: ndarray::ArrayViewMut1<f32>| {
        let m = lane.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let m = if m.is_finite() { m } else { 0.0 };
        let s: f32 = lane.iter().map(|&v| (v - m).exp()).sum();
        let lse = m + s.ln();
        lane.mapv_inplace(|v| v - lse);
    };
    if x.len() >= crate::parallel::PAR_THRESHOLD {
        Zip::from(lanes).par_for_each(f);
    } else {
        Zip::from(lanes).for_each(f);
    }
    out
}

impl Tensor {
    /// Softmax along `axis`.
    pub fn softmax(&self, axis: isize) -> Result<Tensor> {
        let ax = normalize_axis("softmax", axis, self.rank())?;
        let y = softmax_array(&self.view(), ax).into_shared();
        let yd = y.clone();
        Ok(Tensor::from_op(y, "softmax", &[self], move |g, _| {
            // dx = y * (g - sum(g * y))
            let mut gx = g;
            Zip::from(gx.lanes_mut(Axis(ax)))
                .and(yd.lanes(Axis(ax)))
                .for_each(|mut gl, yl| {
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
        let y = log_softmax_array(&self.view(), ax).into_shared();
        let yd = y.clone();
        Ok(Tensor::from_op(y, "log_softmax", &[self], move |g, _| {
            // dx = g - exp(y) * sum(g)
            let mut gx = g;
            Zip::from(gx.lanes_mut(Axis(ax)))
                .and(yd.lanes(Axis(ax)))
                .for_each(|mut gl, yl| {
                    let s: f32 = gl.sum();
                    Zip::from(&mut gl)
                        .and(&yl)
                        .for_each(|g, &y| *g -= y.exp() * s);
                });
            Ok(vec![Some(gx)])
        }))
    }
}
