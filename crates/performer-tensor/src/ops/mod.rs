//! The differentiable ops, one file per family, each forward next to its backward.
//!
//! Every op is a method on [`crate::Tensor`] returning `Result<Tensor>`; errors name the op
//! and the shapes.

mod activation;
mod dropout;
mod elementwise;
mod index;
mod layer_norm;
mod layout;
mod loss;
mod matmul;
mod reduce;
mod softmax;

pub use activation::Activation;
pub use matmul::batched_matmul;

use ndarray::{ArrayD, ArrayViewD, IxDyn, Zip};

use crate::parallel::PAR_THRESHOLD;

/// `f` over every element, in parallel when large. The result has the operand's shape.
pub(crate) fn map_array(x: &ArrayViewD<f32>, f: impl Fn(f32) -> f32 + Sync + Send) -> ArrayD<f32> {
    if x.len() < PAR_THRESHOLD {
        return Zip::from(x).map_collect(|&v| f(v));
    }
    let mut out = crate::alloc::uninit_in_layout_of(x);
    Zip::from(&mut out).and(x).par_for_each(|o, &v| {
        o.write(f(v));
    });
    // SAFETY: the loop above wrote every element.
    unsafe { crate::alloc::assume_init(out) }
}

/// The first operand that is not broadcast (no zero stride on an axis longer than 1), whose
/// memory order the result should follow; the first operand if all are broadcast.
fn layout_source<'a, 'b>(xs: &'a [&'a ArrayViewD<'b, f32>]) -> &'a ArrayViewD<'b, f32> {
    let real = |x: &ArrayViewD<f32>| {
        x.shape()
            .iter()
            .zip(x.strides())
            .all(|(&d, &s)| d <= 1 || s != 0)
    };
    xs.iter().copied().find(|x| real(x)).unwrap_or(xs[0])
}

/// `f` over pairs of elements of two arrays of the same shape.
pub(crate) fn zip_map(
    a: &ArrayViewD<f32>,
    b: &ArrayViewD<f32>,
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) -> ArrayD<f32> {
    if a.len() < PAR_THRESHOLD {
        return Zip::from(a).and(b).map_collect(|&x, &y| f(x, y));
    }
    let mut out = crate::alloc::uninit_in_layout_of(layout_source(&[a, b]));
    Zip::from(&mut out).and(a).and(b).par_for_each(|o, &x, &y| {
        o.write(f(x, y));
    });
    // SAFETY: the loop above wrote every element.
    unsafe { crate::alloc::assume_init(out) }
}

/// `f` over triples of elements of three arrays of the same shape.
pub(crate) fn zip_map3(
    a: &ArrayViewD<f32>,
    b: &ArrayViewD<f32>,
    c: &ArrayViewD<f32>,
    f: impl Fn(f32, f32, f32) -> f32 + Sync + Send,
) -> ArrayD<f32> {
    if a.len() < PAR_THRESHOLD {
        return Zip::from(a)
            .and(b)
            .and(c)
            .map_collect(|&x, &y, &w| f(x, y, w));
    }
    let mut out = crate::alloc::uninit_in_layout_of(layout_source(&[a, b, c]));
    Zip::from(&mut out)
        .and(a)
        .and(b)
        .and(c)
        .par_for_each(|o, &x, &y, &w| {
            o.write(f(x, y, w));
        });
    // SAFETY: the loop above wrote every element.
    unsafe { crate::alloc::assume_init(out) }
}

/// Reshapes an array of any layout, copying only when its strides do not allow a view.
pub(crate) fn reshape_array(a: ArrayD<f32>, shape: &[usize]) -> ArrayD<f32> {
    if a.is_standard_layout() {
        return a
            .into_shape_with_order(IxDyn(shape))
            .expect("element count checked by caller");
    }
    a.as_standard_layout()
        .into_owned()
        .into_shape_with_order(IxDyn(shape))
        .expect("element count checked by caller")
}

/// Sums a gradient of a broadcast result down to the operand's `shape` (the axes the forward
/// broadcast), with the parallel reductions of [`reduce`]; `g` itself when nothing was
/// broadcast.
pub(crate) fn sum_to(g: ArrayD<f32>, shape: &[usize]) -> ArrayD<f32> {
    if g.shape() == shape {
        return g;
    }
    let lead = g.ndim() - shape.len();
    let axes: Vec<usize> = (0..g.ndim())
        .filter(|&ax| ax < lead || (shape[ax - lead] == 1 && g.shape()[ax] != 1))
        .collect();
    reshape_array(reduce::sum_keep(&g.view(), &axes), shape)
}
