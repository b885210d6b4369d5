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
    let z = Zip::from(x);
    if x.len() >= PAR_THRESHOLD {
        z.par_map_collect(|&v| f(v))
    } else {
        z.map_collect(|&v| f(v))
    }
}

/// `f` over pairs of elements of two arrays of the same shape.
pub(crate) fn zip_map(
    a: &ArrayViewD<f32>,
    b: &ArrayViewD<f32>,
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) -> ArrayD<f32> {
    let z = Zip::from(a).and(b);
    if a.len() >= PAR_THRESHOLD {
        z.par_map_collect(|&x, &y| f(x, y))
    } else {
        z.map_collect(|&x, &y| f(x, y))
    }
}

/// `f` over triples of elements of three arrays of the same shape.
pub(crate) fn zip_map3(
    a: &ArrayViewD<f32>,
    b: &ArrayViewD<f32>,
    c: &ArrayViewD<f32>,
    f: impl Fn(f32, f32, f32) -> f32 + Sync + Send,
) -> ArrayD<f32> {
    let z = Zip::from(a).and(b).and(c);
    if a.len() >= PAR_THRESHOLD {
        z.par_map_collect(|&x, &y, &w| f(x, y, w))
    } else {
        z.map_collect(|&x, &y, &w| f(x, y, w))
    }
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
