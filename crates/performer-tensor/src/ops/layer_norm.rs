//! Layer normalization over the last axis, fused: one pass for the statistics and the output,
//! one for the input's gradient and one for the affine parameters' gradients. Rows are split
//! over threads when the tensor is large. The forward keeps only the per-row mean and inverse
//! standard deviation (the input is shared, not copied); the backward recomputes the
//! normalized values from them.

use ndarray::{Array1, Array2, ArrayD, ArrayView2, IxDyn, Zip};
use rayon::prelude::*;

use crate::parallel::PAR_THRESHOLD;
use crate::{Error, Result, Tensor};

/// Rows per task of the parameter-gradient reduction.
const ROWS_PER_TASK: usize = 64;

/// The values of a 1-D tensor (the affine parameters), as a vector.
fn values(t: Option<&Tensor>) -> Option<Vec<f32>> {
    t.map(|t| t.data().iter().copied().collect())
}

/// One row of [`Tensor::layer_norm`]: `y = (x - mean) * rstd * weight + bias` with
/// `rstd = 1 / sqrt(var + eps)` (biased variance); returns `(mean, rstd)`. The decoding step
/// normalizes its rows with it too, so both paths share one arithmetic.
pub fn layer_norm_row(
    x: &[f32],
    y: &mut [f32],
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f32,
) -> (f32, f32) {
    let (m, var) = crate::fast_math::mean_and_variance(x);
    let rs = 1.0 / (var + eps).sqrt();
    match (weight, bias) {
        (Some(w), Some(b)) => {
            for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                *y = (x - m) * rs * w + b;
            }
        }
        (Some(w), None) => {
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = (x - m) * rs * w;
            }
        }
        (None, Some(b)) => {
            for ((y, &x), &b) in y.iter_mut().zip(x).zip(b) {
                *y = (x - m) * rs + b;
            }
        }
        (None, None) => {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x - m) * rs;
            }
        }
    }
    (m, rs)
}

impl Tensor {
    /// performer-pytorch's ScaleNorm over the last axis: `x / max(|x|, eps) * g` with a learned
    /// one-element `g`. On the host it is exactly `x.div(x.norm([-1]).clamp(eps))?.mul(g)`; on
    /// a device one kernel each way.
    pub fn scale_norm(&self, g: &Tensor, eps: f32) -> Result<Tensor> {
        if self.rank() == 0 {
            return Err(Error::shape("scale_norm", "needs rank >= 1"));
        }
        if g.numel() != 1 || g.rank() > self.rank() {
            return Err(Error::shape(
                "scale_norm",
                format!(
                    "g {:?} must hold one element (input {:?})",
                    g.shape(),
                    self.shape()
                ),
            ));
        }
        on_device!(crate::cuda::row_ops::scale_norm(self, g, eps));
        let n = self.norm(&[-1], true)?.clamp(Some(eps), None);
        self.div(&n)?.mul(g)
    }

    /// `(x - mean) / sqrt(var + eps) * weight + bias` over the last axis (biased variance, as
    /// `torch.nn.LayerNorm`). `weight` and `bias`, when given, have the last axis's size.
    pub fn layer_norm(
        &self,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        let Some(&d) = self.shape().last() else {
            return Err(Error::shape("layer_norm", "needs rank >= 1"));
        };
        for (name, p) in [("weight", weight), ("bias", bias)] {
            if let Some(p) = p
                && p.shape() != [d]
            {
                return Err(Error::shape(
                    "layer_norm",
                    format!("{name} {:?} must be [{d}]", p.shape()),
                ));
            }
        }
        on_device!(crate::cuda::ops::layer_norm(self, weight, bias, eps));
        let rows = self.numel() / d.max(1);
        let large = self.numel() >= PAR_THRESHOLD;
        let x = self.data().as_standard_layout();
        let x2 = x
            .view()
            .into_shape_with_order((rows, d))
            .expect("standard layout");
        let (w, b) = (values(weight), values(bias));
        let mut mean = Array1::<f32>::zeros(rows);
        let mut rstd = Array1::<f32>::zeros(rows);
        let mut y = Array2::<f32>::zeros((rows, d));
        let body = |xr: ndarray::ArrayView1<f32>,
                    mu: &mut f32,
                    r: &mut f32,
                    mut yr: ndarray::ArrayViewMut1<f32>| {
            let (xr, yr) = (xr.as_slice().expect("row"), yr.as_slice_mut().expect("row"));
            (*mu, *r) = layer_norm_row(xr, yr, w.as_deref(), b.as_deref(), eps);
        };
        let z = Zip::from(x2.rows())
            .and(&mut mean)
            .and(&mut rstd)
            .and(y.rows_mut());
        if large {
            z.par_for_each(body);
        } else {
            z.for_each(body);
        }
        let shape = self.shape().to_vec();
        let y = y.into_shape_with_order(IxDyn(&shape)).expect("size");
        let mut inputs = vec![self];
        let wi = weight.map(|w| {
            inputs.push(w);
            inputs.len() - 1
        });
        let bi = bias.map(|b| {
            inputs.push(b);
            inputs.len() - 1
        });
        let xd = self.data().clone();
        Ok(Tensor::from_op(
            y,
            "layer_norm",
            &inputs,
            move |g, needs| {
                let xs = xd.as_standard_layout();
                let x2 = xs
                    .view()
                    .into_shape_with_order((rows, d))
                    .expect("standard layout");
                let gs = g.as_standard_layout();
                let g2 = gs
                    .view()
                    .into_shape_with_order((rows, d))
                    .expect("standard layout");
                let mut grads: Vec<Option<ArrayD<f32>>> = vec![None; needs.len()];
                if needs[0] {
                    let dx = input_grad(&x2, &g2, &mean, &rstd, w.as_deref(), large);
                    grads[0] = Some(dx.into_shape_with_order(IxDyn(&shape)).expect("size"));
                }
                let need_w = wi.is_some_and(|i| needs[i]);
                let need_b = bi.is_some_and(|i| needs[i]);
                if need_w || need_b {
                    let (dw, db) = affine_grads(&x2, &g2, &mean, &rstd, large);
                    if let Some(i) = wi.filter(|_| need_w) {
                        grads[i] = Some(dw.into_dyn());
                    }
                    if let Some(i) = bi.filter(|_| need_b) {
                        grads[i] = Some(db.into_dyn());
                    }
                }
                Ok(grads)
            },
        ))
    }
}

/// `dx = rstd * (gh - mean(gh) - xhat * mean(gh * xhat))` per row, with `gh = g * weight`.
fn input_grad(
    x2: &ArrayView2<f32>,
    g2: &ArrayView2<f32>,
    mean: &Array1<f32>,
    rstd: &Array1<f32>,
    w: Option<&[f32]>,
    large: bool,
) -> Array2<f32> {
    let d = x2.ncols();
    let inv_d = 1.0 / d.max(1) as f32;
    let mut dx = Array2::<f32>::zeros(x2.raw_dim());
    // No weight multiplies by 1, as `g * w.map_or(1.0, ..)` did.
    let ones = if w.is_none() {
        vec![1.0f32; d]
    } else {
        Vec::new()
    };
    let wr: &[f32] = w.unwrap_or(&ones);
    let body = |xr: ndarray::ArrayView1<f32>,
                gr: ndarray::ArrayView1<f32>,
                &m: &f32,
                &r: &f32,
                mut dr: ndarray::ArrayViewMut1<f32>| {
        let (xr, gr, dr) = (
            xr.as_slice().expect("row"),
            gr.as_slice().expect("row"),
            dr.as_slice_mut().expect("row"),
        );
        // Loops over zipped slices (no indexing, so no bounds checks in them): the second
        // vectorizes; the sums of the first keep their order, element by element.
        let (mut m1, mut m2) = (0.0f32, 0.0f32);
        for ((&g, &x), &wj) in gr.iter().zip(xr).zip(wr) {
            let g = g * wj;
            m1 += g;
            m2 += g * (x - m) * r;
        }
        let (m1, m2) = (m1 * inv_d, m2 * inv_d);
        for (((d, &g), &x), &wj) in dr.iter_mut().zip(gr).zip(xr).zip(wr) {
            *d = r * (g * wj - m1 - (x - m) * r * m2);
        }
    };
    let z = Zip::from(x2.rows())
        .and(g2.rows())
        .and(mean)
        .and(rstd)
        .and(dx.rows_mut());
    if large {
        z.par_for_each(body);
    } else {
        z.for_each(body);
    }
    dx
}

/// Gradients of the weight (`sum over rows of g * xhat`) and the bias (`sum of g`), summed by
/// blocks of rows in parallel.
fn affine_grads(
    x2: &ArrayView2<f32>,
    g2: &ArrayView2<f32>,
    mean: &Array1<f32>,
    rstd: &Array1<f32>,
    large: bool,
) -> (Array1<f32>, Array1<f32>) {
    let (rows, d) = x2.dim();
    let block = |start: usize| {
        let (mut dw, mut db) = (vec![0.0f32; d], vec![0.0f32; d]);
        for i in start..(start + ROWS_PER_TASK).min(rows) {
            let (xr, gr) = (x2.row(i), g2.row(i));
            let (xr, gr) = (xr.as_slice().expect("row"), gr.as_slice().expect("row"));
            let (m, r) = (mean[i], rstd[i]);
            // Zipped slices: one vectorized pass per row, each column's sums in row order.
            for (((dwj, dbj), &g), &x) in dw.iter_mut().zip(db.iter_mut()).zip(gr).zip(xr) {
                *dwj += g * (x - m) * r;
                *dbj += g;
            }
        }
        (dw, db)
    };
    let add = |(mut aw, mut ab): (Vec<f32>, Vec<f32>), (bw, bb): (Vec<f32>, Vec<f32>)| {
        aw.iter_mut().zip(&bw).for_each(|(a, b)| *a += b);
        ab.iter_mut().zip(&bb).for_each(|(a, b)| *a += b);
        (aw, ab)
    };
    let zero = || (vec![0.0f32; d], vec![0.0f32; d]);
    let starts = (0..rows).step_by(ROWS_PER_TASK);
    let (dw, db) = if large {
        starts
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(block)
            .reduce(zero, add)
    } else {
        starts.map(block).fold(zero(), add)
    };
    (Array1::from(dw), Array1::from(db))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// The backward's gradients have the bits of the formulas written index by index (the
    /// loops before they ran over zipped slices), with and without a weight, serial and
    /// parallel.
    #[test]
    fn gradients_match_the_indexed_formulas_bit_for_bit() {
        for (rows, d, large) in [(7, 5, false), (300, 128, true)] {
            let x: Array2<f32> = crate::rng::randn(&[rows, d]).into_dimensionality().unwrap();
            let g: Array2<f32> = crate::rng::randn(&[rows, d]).into_dimensionality().unwrap();
            let wv: Vec<f32> = crate::rng::randn(&[d])
                .iter()
                .map(|v| 1.0 + 0.5 * v)
                .collect();
            let mut mean = Array1::<f32>::zeros(rows);
            let mut rstd = Array1::<f32>::zeros(rows);
            let mut y = vec![0.0f32; d];
            for i in 0..rows {
                let xr = x.row(i);
                (mean[i], rstd[i]) =
                    layer_norm_row(xr.as_slice().unwrap(), &mut y, None, None, 1e-5);
            }
            let inv_d = 1.0 / d as f32;
            for w in [None, Some(&wv[..])] {
                let dx = input_grad(&x.view(), &g.view(), &mean, &rstd, w, large);
                for i in 0..rows {
                    let (m, r) = (mean[i], rstd[i]);
                    let gh = |j: usize| g[[i, j]] * w.map_or(1.0, |w| w[j]);
                    let (mut m1, mut m2) = (0.0f32, 0.0f32);
                    for j in 0..d {
                        m1 += gh(j);
                        m2 += gh(j) * (x[[i, j]] - m) * r;
                    }
                    let (m1, m2) = (m1 * inv_d, m2 * inv_d);
                    for j in 0..d {
                        let want = r * (gh(j) - m1 - (x[[i, j]] - m) * r * m2);
                        assert_eq!(
                            dx[[i, j]].to_bits(),
                            want.to_bits(),
                            "{rows}x{d} weight {}: dx[{i}, {j}]",
                            w.is_some()
                        );
                    }
                }
            }
            let (dw, db) = affine_grads(&x.view(), &g.view(), &mean, &rstd, large);
            let starts: Vec<usize> = (0..rows).step_by(ROWS_PER_TASK).collect();
            for j in 0..d {
                let (mut want_w, mut want_b) = (0.0f32, 0.0f32);
                for &start in &starts {
                    let (mut bw, mut bb) = (0.0f32, 0.0f32);
                    for i in start..(start + ROWS_PER_TASK).min(rows) {
                        bw += g[[i, j]] * (x[[i, j]] - mean[i]) * rstd[i];
                        bb += g[[i, j]];
                    }
                    want_w += bw;
                    want_b += bb;
                }
                if !large {
                    assert_eq!(dw[j].to_bits(), want_w.to_bits(), "{rows}x{d}: dw[{j}]");
                    assert_eq!(db[j].to_bits(), want_b.to_bits(), "{rows}x{d}: db[{j}]");
                } else {
                    // rayon's reduce tree may pair blocks in another order than a left fold.
                    assert!(
                        (dw[j] - want_w).abs() <= 1e-4 * (1.0 + want_w.abs()),
                        "dw[{j}]"
                    );
                    assert!(
                        (db[j] - want_b).abs() <= 1e-4 * (1.0 + want_b.abs()),
                        "db[{j}]"
                    );
                }
            }
        }
    }
}
