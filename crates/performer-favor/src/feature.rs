//! FAVOR+ feature maps on one head's rows: the projection, the stabilized softmax kernel and
//! the generalized kernel, forward and backward.
//!
//! Shapes: rows `x` (n, d), projection `P` (m, d), features (n, m). With the data normalizer
//! `dn` (d^-1/4, or 1 without normalization) and `u = dn * x P^T`:
//! - softmax kernel: `x'_ij = ratio * (exp(u_ij - dn^2 |x_i|^2 / 2 - s_i) + eps)`, `ratio =
//!   m^-1/2`, with the stabilizer `s_i` the row max of `u` for queries and the max of `u` over
//!   the whole head for keys (a constant for the gradient, as the reference detaches it);
//! - generalized kernel: `x'_ij = f(u_ij) + eps`.
//!
//! The fused attention works on transposed blocks of features, (m, l) for l positions
//! ([`FeatureSpec::project_t`], [`FeatureSpec::activate_t`], [`FeatureSpec::backward_t`]): in
//! that layout every product of the linear attention kernels reads its right-hand operand with
//! unit column stride, which the GEMM packs fastest.

use ndarray::{Array2, ArrayView2, ArrayViewMut2, Zip};

use crate::simd;
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

/// The constant performer-pytorch's `softmax_kernel` adds to every feature (its `eps`). The
/// CUDA kernels add the same one (`performer_cuda::ops::FEATURE_EPS`; with the `cuda` feature a
/// compile-time assertion holds the two equal).
pub const SOFTMAX_FEATURE_EPS: f32 = 1e-4;

/// The constant performer-pytorch's `generalized_kernel` adds to every feature (its `eps`).
pub const GENERALIZED_FEATURE_EPS: f32 = 1e-3;

impl FeatureMap {
    /// The epsilon performer-pytorch adds to every feature of this map:
    /// [`SOFTMAX_FEATURE_EPS`] or [`GENERALIZED_FEATURE_EPS`].
    pub fn eps(self) -> f32 {
        match self {
            FeatureMap::Softmax => SOFTMAX_FEATURE_EPS,
            FeatureMap::Generalized(_) => GENERALIZED_FEATURE_EPS,
        }
    }
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

/// A row of an internal buffer as a slice (internal feature blocks have unit column stride).
pub(crate) fn row_slice<'a>(a: &'a ArrayView2<f32>, j: usize) -> &'a [f32] {
    let (rows, cols) = a.dim();
    assert!(
        j < rows && (cols <= 1 || a.strides()[1] == 1),
        "feature rows are contiguous"
    );
    // SAFETY: row j exists and its `cols` elements are contiguous (checked above); the slice
    // borrows `a`.
    unsafe { std::slice::from_raw_parts(a.as_ptr().offset(j as isize * a.strides()[0]), cols) }
}

/// A mutable row of an internal buffer as a slice.
pub(crate) fn row_slice_mut<'a>(a: &'a mut ArrayViewMut2<f32>, j: usize) -> &'a mut [f32] {
    let (rows, cols) = a.dim();
    assert!(
        j < rows && (cols <= 1 || a.strides()[1] == 1),
        "feature rows are contiguous"
    );
    let stride = a.strides()[0];
    // SAFETY: as in `row_slice`, and `a` is borrowed mutably for the slice's lifetime.
    unsafe { std::slice::from_raw_parts_mut(a.as_mut_ptr().offset(j as isize * stride), cols) }
}

impl FeatureSpec {
    /// `u^T = dn * P x^T` for a block: `xt` (d, l), `proj` (m, d), `out` (m, l).
    pub fn project_t(
        &self,
        xt: &ArrayView2<f32>,
        proj: &ArrayView2<f32>,
        out: &mut ArrayViewMut2<f32>,
    ) -> Result<()> {
        gemm_into(out, proj, xt, self.dn, 0.0, Threads::Single)
    }

    /// The keys' stabilizer: the max of `u^T` over a whole head (softmax only).
    pub fn key_stabilizer(&self, u: &ArrayView2<f32>) -> f32 {
        (0..u.nrows())
            .map(|j| simd::max_of(row_slice(u, j)))
            .fold(
                f32::NEG_INFINITY,
                |m, v| if v > m || v.is_nan() { v } else { m },
            )
    }

    /// Turns a transposed block of projections `u` (m, l) of the rows `x` (l, d) into
    /// features in place; `stab` is the keys' fixed stabilizer, or `None` for queries (the
    /// max over each position's features).
    pub fn activate_t(&self, x: &ArrayView2<f32>, u: &mut ArrayViewMut2<f32>, stab: Option<f32>) {
        let (m, l) = u.dim();
        match self.map {
            FeatureMap::Softmax => {
                let half_dn2 = 0.5 * self.dn * self.dn;
                let mut shift: Vec<f32> = x
                    .rows()
                    .into_iter()
                    .map(|r| {
                        half_dn2
                            * match r.as_slice() {
                                Some(r) => simd::dot(r, r),
                                None => r.iter().map(|v| v * v).sum::<f32>(),
                            }
                    })
                    .collect();
                match stab {
                    Some(s) => shift.iter_mut().for_each(|v| *v += s),
                    None => {
                        let mut mx = vec![f32::NEG_INFINITY; l];
                        for j in 0..m {
                            simd::max_into(&mut mx, row_slice(&u.view(), j));
                        }
                        shift.iter_mut().zip(&mx).for_each(|(v, s)| *v += s);
                    }
                }
                let (ratio, add) = (self.ratio, self.ratio * self.eps);
                for j in 0..m {
                    simd::exp_shifted(row_slice_mut(u, j), &shift, ratio, add);
                }
            }
            FeatureMap::Generalized(f) => {
                let eps = self.eps;
                u.mapv_inplace(|v| f.f(v) + eps);
            }
        }
    }

    /// Backward of [`FeatureSpec::project_t`] + [`FeatureSpec::activate_t`] on a block:
    /// from the features `feat` (m, l) and their gradient `g` (m, l; overwritten with the
    /// gradient of `u`), writes the gradient of the rows `x` (l, d)
    /// (transpose `xt`) into `dx` and adds the projection's gradient into `dproj` when given.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_t(
        &self,
        x: &ArrayView2<f32>,
        xt: Option<&ArrayView2<f32>>,
        proj: &ArrayView2<f32>,
        feat: &ArrayView2<f32>,
        g: &mut ArrayViewMut2<f32>,
        dx: &mut ArrayViewMut2<f32>,
        dproj: Option<&mut Array2<f32>>,
    ) -> Result<()> {
        let (m, l) = g.dim();
        let mut colsum = vec![0f32; l];
        match self.map {
            FeatureMap::Softmax => {
                // d feat / d u = feat - ratio * eps (the exponential part).
                let floor = self.ratio * self.eps;
                for j in 0..m {
                    simd::softmax_grad_row(
                        row_slice_mut(g, j),
                        row_slice(feat, j),
                        floor,
                        &mut colsum,
                    );
                }
            }
            FeatureMap::Generalized(f) => {
                let xt = xt.ok_or_else(|| {
                    Error::invalid("generalized_kernel", "transposed rows", 0, "missing")
                })?;
                let mut u = Array2::<f32>::zeros((m, l));
                self.project_t(xt, proj, &mut u.view_mut())?;
                Zip::from(&mut *g)
                    .and(&u)
                    .for_each(|gv, &uv| *gv *= f.df(uv));
            }
        }
        gemm_into(dx, &g.t(), proj, self.dn, 0.0, Threads::Single)?;
        if self.map == FeatureMap::Softmax {
            // The diagonal term -dn^2 |x|^2 / 2 contributes -dn^2 x * colsum(g_u).
            let dn2 = self.dn * self.dn;
            Zip::from(dx.rows_mut())
                .and(x.rows())
                .and(&colsum)
                .for_each(|mut dr, xr, &c| {
                    let s = c * dn2;
                    Zip::from(&mut dr).and(&xr).for_each(|d, &x| *d -= s * x);
                });
        }
        if let Some(dp) = dproj {
            gemm_into(
                &mut dp.view_mut(),
                &g.view(),
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
