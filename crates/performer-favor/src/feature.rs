//! FAVOR+ feature maps on one head's rows: the projection, the stabilized softmax kernel and
//! the generalized kernel, forward and backward.
//!
//! Shapes: rows `x` (n, d), projection `P` (m, d), features (n, m). With the data normalizer
//! `dn` (d^-1/4, or 1 without normalization) and `u = dn * x P^T`:
//! - softmax kernel: `x'_ij = ratio * (exp(u_ij - dn^2 |x_i|^2 / 2 - s_i) + eps)`, `ratio =
//!   m^-1/2`, with the stabilizer `s_i` the row max of `u` for queries and the max of `u` over
//!   the whole head for keys (a constant for the gradient, as the reference detaches it);
//! - generalized kernel: `x'_ij = f(u_ij) + eps`.

use ndarray::{Array2, ArrayView2, ArrayViewMut2, Zip};
use performer_tensor::fast_math::scaled_exp_inplace;
use performer_tensor::gemm::{Threads, gemm_into};
use performer_tensor::ops::Activation;
use performer_tensor::{Error, Result};

/// Which kernel turns projections into features.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FeatureMap {
    /// Positive random features approximating the softmax kernel (FAVOR+).
    Softmax,
    /// `f(u) + eps` for an activation `f` (performer-pytorch's generalized attention).
    Generalized(Activation),
}

/// How the softmax kernel's exponent is stabilized.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Stabilizer {
    /// Per row: the max over features (queries).
    RowMax,
    /// One value for all rows (keys: the max over the head).
    Fixed(f32),
}

/// A feature map with its constants.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FeatureSpec {
    pub map: FeatureMap,
    /// Data normalizer `dn`.
    pub dn: f32,
    /// `m^-1/2` (softmax only).
    pub ratio: f32,
    /// Added to every feature.
    pub eps: f32,
}

impl FeatureSpec {
    pub fn new(
        map: FeatureMap,
        dim: usize,
        nb_features: usize,
        normalize_data: bool,
        eps: f32,
    ) -> Self {
        let dn = if normalize_data {
            (dim as f32).powf(-0.25)
        } else {
            1.0
        };
        FeatureSpec {
            map,
            dn,
            ratio: (nb_features as f32).powf(-0.5),
            eps,
        }
    }

    /// `u = dn * x P^T` into `out`.
    pub fn project(
        &self,
        x: &ArrayView2<f32>,
        proj: &ArrayView2<f32>,
        out: &mut ArrayViewMut2<f32>,
    ) -> Result<()> {
        gemm_into(out, x, &proj.t(), self.dn, 0.0, Threads::Single)
    }

    /// Turns projections `u` (rows of `x`) into features, in place.
    pub fn activate(&self, x: &ArrayView2<f32>, u: &mut ArrayViewMut2<f32>, stab: Stabilizer) {
        match self.map {
            FeatureMap::Softmax => {
                let half_dn2 = 0.5 * self.dn * self.dn;
                let (ratio, eps) = (self.ratio, self.eps);
                Zip::from(u.rows_mut())
                    .and(x.rows())
                    .for_each(|mut ur, xr| {
                        let diag = half_dn2 * xr.iter().map(|v| v * v).sum::<f32>();
                        let s = match stab {
                            Stabilizer::RowMax => {
                                ur.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
                            }
                            Stabilizer::Fixed(s) => s,
                        };
                        match ur.as_slice_mut() {
                            Some(row) => scaled_exp_inplace(row, diag + s, ratio, ratio * eps),
                            None => ur.mapv_inplace(|v| ratio * ((v - diag - s).exp() + eps)),
                        }
                    });
            }
            FeatureMap::Generalized(f) => {
                let eps = self.eps;
                u.mapv_inplace(|v| f.f(v) + eps);
            }
        }
    }

    /// Features of `x` into `out` (n, m); queries stabilize per row, keys over all rows.
    pub fn features(
        &self,
        x: &ArrayView2<f32>,
        proj: &ArrayView2<f32>,
        is_query: bool,
        out: &mut ArrayViewMut2<f32>,
    ) -> Result<()> {
        self.project(x, proj, out)?;
        let stab = if is_query {
            Stabilizer::RowMax
        } else {
            Stabilizer::Fixed(out.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)))
        };
        self.activate(x, out, stab);
        Ok(())
    }

    /// Backward of [`FeatureSpec::features`]: from the features `feat` and their gradient
    /// `dfeat` (overwritten with the gradient of `u`), writes the gradient of `x` into `dx`
    /// and adds the projection's gradient into `dproj` when given.
    pub fn backward(
        &self,
        x: &ArrayView2<f32>,
        proj: &ArrayView2<f32>,
        feat: &ArrayView2<f32>,
        dfeat: &mut ArrayViewMut2<f32>,
        dx: &mut ArrayViewMut2<f32>,
        dproj: Option<&mut Array2<f32>>,
    ) -> Result<()> {
        match self.map {
            FeatureMap::Softmax => {
                // d feat / d u = feat - ratio * eps (the exponential part).
                let floor = self.ratio * self.eps;
                Zip::from(&mut *dfeat)
                    .and(feat)
                    .for_each(|g, &f| *g *= f - floor);
                gemm_into(dx, &dfeat.view(), proj, self.dn, 0.0, Threads::Single)?;
                // The diagonal term -dn^2 |x|^2 / 2 contributes -dn^2 x * rowsum(g_u).
                let dn2 = self.dn * self.dn;
                Zip::from(dx.rows_mut())
                    .and(x.rows())
                    .and(dfeat.rows())
                    .for_each(|mut dr, xr, gr| {
                        let s = gr.sum() * dn2;
                        Zip::from(&mut dr).and(&xr).for_each(|d, &x| *d -= s * x);
                    });
            }
            FeatureMap::Generalized(f) => {
                let mut u = Array2::<f32>::zeros(dfeat.raw_dim());
                self.project(x, proj, &mut u.view_mut())?;
                Zip::from(&mut *dfeat)
                    .and(&u)
                    .for_each(|g, &u| *g *= f.df(u));
                gemm_into(dx, &dfeat.view(), proj, self.dn, 0.0, Threads::Single)?;
            }
        }
        if let Some(dp) = dproj {
            gemm_into(
                &mut dp.view_mut(),
                &dfeat.t(),
                x,
                self.dn,
                1.0,
                Threads::Single,
            )?;
        }
        Ok(())
    }
}

/// Checks that a projection fits the head size.
pub(crate) fn check_projection(op: &str, proj: &[usize], dim: usize) -> Result<()> {
    if proj.len() != 2 || proj[1] != dim || proj[0] == 0 {
        return Err(Error::shape(
            op,
            format!("projection {proj:?} must be (nb_features > 0, {dim})"),
        ));
    }
    Ok(())
}
