//! Arithmetic with PyTorch broadcasting, scalar forms, and element-wise math.

use std::mem::MaybeUninit;

use ndarray::{ArrayD, IxDyn};

use super::arrays::{
    fill_vec, map_array, map_rows_with, rows_are_slices, zip_map, zip_map3, zip_rows_with,
};
use super::broadcast::{sum_to, sum_to_view};
use crate::shape::broadcast_shapes;
use crate::{Result, Tensor};
#[cfg(feature = "cuda")]
use performer_cuda::tensor_ops::Unary::{Affine, Pow};

/// Which binary op: a closed set so forward and backward sit side by side.
#[derive(Clone, Copy)]
enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    Maximum,
    Minimum,
    Pow,
}

impl Binary {
    fn name(self) -> &'static str {
        match self {
            Binary::Add => "add",
            Binary::Sub => "sub",
            Binary::Mul => "mul",
            Binary::Div => "div",
            Binary::Maximum => "maximum",
            Binary::Minimum => "minimum",
            Binary::Pow => "pow",
        }
    }

    fn apply(self, x: f32, y: f32) -> f32 {
        match self {
            Binary::Add => x + y,
            Binary::Sub => x - y,
            Binary::Mul => x * y,
            Binary::Div => x / y,
            Binary::Maximum => x.max(y),
            Binary::Minimum => x.min(y),
            Binary::Pow => x.powf(y),
        }
    }

    /// d(x op y)/dx and d(x op y)/dy at (x, y). Ties of max/min split the gradient evenly,
    /// as PyTorch does.
    fn partials(self, x: f32, y: f32) -> (f32, f32) {
        match self {
            Binary::Add => (1.0, 1.0),
            Binary::Sub => (1.0, -1.0),
            Binary::Mul => (y, x),
            Binary::Div => (1.0 / y, -x / (y * y)),
            Binary::Maximum | Binary::Minimum => {
                let first = matches!(self, Binary::Maximum) == (x > y);
                if x == y {
                    (0.5, 0.5)
                } else if first {
                    (1.0, 0.0)
                } else {
                    (0.0, 1.0)
                }
            }
            Binary::Pow => {
                let dx = if y == 0.0 { 0.0 } else { y * x.powf(y - 1.0) };
                let dy = if x > 0.0 { x.powf(y) * x.ln() } else { 0.0 };
                (dx, dy)
            }
        }
    }
}

fn binary(a: &Tensor, b: &Tensor, op: Binary) -> Result<Tensor> {
    on_device!(crate::cuda::ops::binary(a, b, op.name()));
    let shape = broadcast_shapes(op.name(), a.shape(), b.shape())?;
    let ab = a
        .data()
        .broadcast(IxDyn(&shape))
        .expect("broadcast shape checked");
    let bb = b
        .data()
        .broadcast(IxDyn(&shape))
        .expect("broadcast shape checked");
    let out = zip_map(&ab, &bb, move |x, y| op.apply(x, y));
    let (ad, bd) = (a.data().clone(), b.data().clone());
    Ok(Tensor::from_op(out, op.name(), &[a, b], move |g, needs| {
        let ab = ad
            .broadcast(IxDyn(g.shape()))
            .expect("same broadcast as forward");
        let bb = bd
            .broadcast(IxDyn(g.shape()))
            .expect("same broadcast as forward");
        if let Binary::Add = op {
            // A broadcast operand (a bias) sums its gradient from a view of `g`; an operand of
            // `g`'s own shape takes `g` itself, cloned only when both operands need it whole.
            let reduced = |shape: &[usize], need: bool| {
                (need && shape != g.shape()).then(|| sum_to_view(&g.view(), shape))
            };
            let (ra, rb) = (reduced(ad.shape(), needs[0]), reduced(bd.shape(), needs[1]));
            let (fa, fb) = match (needs[0] && ra.is_none(), needs[1] && rb.is_none()) {
                (true, true) => (Some(g.clone()), Some(g)),
                (true, false) => (Some(g), None),
                (false, true) => (None, Some(g)),
                (false, false) => (None, None),
            };
            return Ok(vec![ra.or(fa), rb.or(fb)]);
        }
        // Sub hands `g` itself to its first operand (after the second took what it needs).
        let mut g = Some(g);
        let partial = |g: &ArrayD<f32>, which: usize| match (op, which) {
            // A product's partials are the other operand: a two-operand loop with the op known
            // at compile time vectorizes (the generic one below picks the op per element).
            // Same values: g * y and g * x are what the generic form multiplies.
            (Binary::Mul, 0) => zip_map(&g.view(), &bb, |g, y| g * y),
            (Binary::Mul, _) => zip_map(&g.view(), &ab, |g, x| g * x),
            _ => zip_map3(&g.view(), &ab, &bb, move |g, x, y| {
                let (da, db) = op.partials(x, y);
                g * if which == 0 { da } else { db }
            }),
        };
        let gb = needs[1].then(|| match op {
            Binary::Sub => map_array(&g.as_ref().expect("present").view(), |v| -v),
            _ => partial(g.as_ref().expect("present"), 1),
        });
        let ga = needs[0].then(|| match op {
            Binary::Sub => g.take().expect("present"),
            _ => partial(g.as_ref().expect("present"), 0),
        });
        Ok(vec![
            ga.map(|g| sum_to(g, ad.shape())),
            gb.map(|g| sum_to(g, bd.shape())),
        ])
    }))
}

/// An element-wise function as slice kernels compiled for the machine's vector units (see
/// `fast_math`), with scalar forms for operands that are not contiguous.
pub(crate) struct UnaryKernels {
    /// `out = f(x)`.
    pub forward: fn(&[f32], &mut [MaybeUninit<f32>]),
    /// `out = g * f'(x)`.
    pub backward: fn(&[f32], &[f32], &mut [MaybeUninit<f32>]),
    /// `f` at one point.
    pub f: fn(f32) -> f32,
    /// `f'` at one point.
    pub df: fn(f32) -> f32,
}

/// [`unary`] through slice kernels where the operands are contiguous: a closure inlined into
/// `map_array` is compiled for the baseline x86-64 only, and GELU's erf there cost as much as
/// a matrix product of the same layer.
pub(crate) fn unary_vectorized(x: &Tensor, name: &'static str, k: UnaryKernels) -> Tensor {
    on_device!(crate::cuda::ops::unary(x, name));
    let xv = x.view();
    let out = match xv.as_slice() {
        Some(xs) => {
            let v = fill_vec(xs.len(), |off, out| {
                (k.forward)(&xs[off..off + out.len()], out)
            });
            ArrayD::from_shape_vec(xv.raw_dim(), v).expect("length of the operand")
        }
        None if rows_are_slices(&xv) => map_rows_with(&xv, k.forward),
        None => map_array(&xv, k.f),
    };
    if !crate::is_grad_enabled() || !x.is_tracked() {
        crate::profile::op_done(name, || 8 * x.numel() as u64);
        return Tensor::new(out);
    }
    let xd = x.data().clone();
    Tensor::from_op(out.into_shared(), name, &[x], move |g, _| {
        let (gv, xv) = (g.view(), xd.view());
        let grad = match (gv.as_slice(), xv.as_slice()) {
            (Some(gs), Some(xs)) if gv.shape() == xv.shape() => {
                let v = fill_vec(gs.len(), |off, out| {
                    let n = out.len();
                    (k.backward)(&gs[off..off + n], &xs[off..off + n], out)
                });
                ArrayD::from_shape_vec(gv.raw_dim(), v).expect("length of the operands")
            }
            _ if gv.shape() == xv.shape() && rows_are_slices(&gv) && rows_are_slices(&xv) => {
                zip_rows_with(&gv, &xv, k.backward)
            }
            _ => zip_map(&gv, &xv, |g, x| g * (k.df)(x)),
        };
        Ok(vec![Some(grad)])
    })
}

/// An element-wise function with its derivative, expressed through the input `x` and the
/// output `y` (whichever is cheaper).
pub(crate) fn unary(
    x: &Tensor,
    name: &'static str,
    f: impl Fn(f32) -> f32 + Sync + Send,
    df: impl Fn(f32, f32) -> f32 + Sync + Send + 'static,
) -> Tensor {
    on_device!(crate::cuda::ops::unary(x, name));
    let out = map_array(&x.view(), f);
    if !crate::is_grad_enabled() || !x.is_tracked() {
        crate::profile::op_done(name, || 8 * x.numel() as u64);
        return Tensor::new(out);
    }
    let xd = x.data().clone();
    let yd = out.into_shared();
    Tensor::from_op(yd.clone(), name, &[x], move |g, _| {
        Ok(vec![Some(zip_map3(
            &g.view(),
            &xd.view(),
            &yd.view(),
            |g, x, y| g * df(x, y),
        ))])
    })
}

impl Tensor {
    /// `self + other`, broadcasting.
    pub fn add(&self, other: &Tensor) -> Result<Tensor> {
        binary(self, other, Binary::Add)
    }

    /// `self - other`, broadcasting.
    pub fn sub(&self, other: &Tensor) -> Result<Tensor> {
        binary(self, other, Binary::Sub)
    }

    /// `self * other`, broadcasting.
    pub fn mul(&self, other: &Tensor) -> Result<Tensor> {
        binary(self, other, Binary::Mul)
    }

    /// `self / other`, broadcasting.
    pub fn div(&self, other: &Tensor) -> Result<Tensor> {
        binary(self, other, Binary::Div)
    }

    /// Element-wise maximum, broadcasting (ties share the gradient).
    pub fn maximum(&self, other: &Tensor) -> Result<Tensor> {
        binary(self, other, Binary::Maximum)
    }

    /// Element-wise minimum, broadcasting (ties share the gradient).
    pub fn minimum(&self, other: &Tensor) -> Result<Tensor> {
        binary(self, other, Binary::Minimum)
    }

    /// `self ^ other`, broadcasting (the exponent's gradient is 0 where the base is <= 0).
    pub fn pow(&self, other: &Tensor) -> Result<Tensor> {
        binary(self, other, Binary::Pow)
    }

    /// `self + s`.
    pub fn add_scalar(&self, s: f32) -> Tensor {
        on_device!(crate::cuda::ops::unary_with(
            self,
            "add_scalar",
            Affine(1.0, s)
        ));
        unary(self, "add_scalar", move |x| x + s, |_, _| 1.0)
    }

    /// `self - s`.
    pub fn sub_scalar(&self, s: f32) -> Tensor {
        on_device!(crate::cuda::ops::unary_with(
            self,
            "sub_scalar",
            Affine(1.0, -s)
        ));
        unary(self, "sub_scalar", move |x| x - s, |_, _| 1.0)
    }

    /// `self * s`.
    pub fn mul_scalar(&self, s: f32) -> Tensor {
        on_device!(crate::cuda::ops::unary_with(
            self,
            "mul_scalar",
            Affine(s, 0.0)
        ));
        unary(self, "mul_scalar", move |x| x * s, move |_, _| s)
    }

    /// `self / s`.
    pub fn div_scalar(&self, s: f32) -> Tensor {
        on_device!(crate::cuda::ops::unary_with(
            self,
            "div_scalar",
            Affine(1.0 / s, 0.0)
        ));
        unary(self, "div_scalar", move |x| x / s, move |_, _| 1.0 / s)
    }

    /// `s - self`.
    pub fn rsub_scalar(&self, s: f32) -> Tensor {
        on_device!(crate::cuda::ops::unary_with(
            self,
            "rsub_scalar",
            Affine(-1.0, s)
        ));
        unary(self, "rsub_scalar", move |x| s - x, |_, _| -1.0)
    }

    /// `self ^ p`.
    pub fn powf(&self, p: f32) -> Tensor {
        on_device!(crate::cuda::ops::unary_with(self, "powf", Pow(p)));
        unary(
            self,
            "powf",
            move |x| x.powf(p),
            move |x, _| if p == 0.0 { 0.0 } else { p * x.powf(p - 1.0) },
        )
    }

    /// `self * self`.
    pub fn square(&self) -> Tensor {
        unary(self, "square", |x| x * x, |x, _| 2.0 * x)
    }

    /// `-self`.
    pub fn neg(&self) -> Tensor {
        unary(self, "neg", |x| -x, |_, _| -1.0)
    }

    /// `e ^ self`.
    pub fn exp(&self) -> Tensor {
        unary(self, "exp", f32::exp, |_, y| y)
    }

    /// Natural logarithm.
    pub fn log(&self) -> Tensor {
        unary(self, "log", f32::ln, |x, _| 1.0 / x)
    }

    /// Square root.
    pub fn sqrt(&self) -> Tensor {
        unary(self, "sqrt", f32::sqrt, |_, y| 0.5 / y)
    }

    /// `1 / self`.
    pub fn recip(&self) -> Tensor {
        unary(self, "recip", |x| 1.0 / x, |_, y| -y * y)
    }

    /// Absolute value (gradient 0 at 0).
    pub fn abs(&self) -> Tensor {
        unary(self, "abs", f32::abs, |x, _| {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        })
    }

    /// Clamps into `[min, max]` (either bound optional). The gradient passes where the input
    /// lies inside the closed interval, as in PyTorch.
    pub fn clamp(&self, min: Option<f32>, max: Option<f32>) -> Tensor {
        let lo = min.unwrap_or(f32::NEG_INFINITY);
        let hi = max.unwrap_or(f32::INFINITY);
        on_device!(crate::cuda::ops::unary_with(
            self,
            "clamp",
            performer_cuda::tensor_ops::Unary::Clamp(lo, hi)
        ));
        unary(
            self,
            "clamp",
            move |x| {
                if x < lo {
                    lo
                } else if x > hi {
                    hi
                } else {
                    x
                }
            },
            move |x, _| if x >= lo && x <= hi { 1.0 } else { 0.0 },
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::Tensor;

    /// GELU of a column slice (rows contiguous, as a GLU's halves) takes the row-by-row
    /// vectorized path and gives the same bits as GELU of a contiguous copy, forward and
    /// backward.
    #[test]
    fn gelu_of_a_column_slice_matches_the_contiguous_copy() {
        let x = Tensor::var(Tensor::randn(&[3, 40, 128]).to_array());
        let half = x.narrow(-1, 64, 64).unwrap();
        assert!(!half.data().is_standard_layout());
        let copy = Tensor::var(half.to_array());
        let weights = Tensor::randn(&[3, 40, 64]);
        let (y_half, y_copy) = (half.gelu(), copy.gelu());
        let bits = |t: &Tensor| t.to_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&y_half), bits(&y_copy));
        let g_half = y_half.mul(&weights).unwrap().sum_all().backward().unwrap();
        let g_copy = y_copy.mul(&weights).unwrap().sum_all().backward().unwrap();
        let gx = g_half.get(&x).unwrap();
        let gx = Tensor::new(gx.clone()).narrow(-1, 64, 64).unwrap();
        assert_eq!(
            bits(&gx),
            bits(&Tensor::new(g_copy.get(&copy).unwrap().clone()))
        );
    }
}
