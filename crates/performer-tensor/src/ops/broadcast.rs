//! The gradient of a broadcast: summed back down to the operand's shape.

use ndarray::ArrayD;

use super::arrays::reshape_array;
use super::reduce;

/// Sums a gradient of a broadcast result down to the operand's `shape` (the axes the forward
/// broadcast), with the parallel reductions of [`reduce`](super::reduce); `g` itself when nothing was
/// broadcast.
pub(crate) fn sum_to(g: ArrayD<f32>, shape: &[usize]) -> ArrayD<f32> {
    if g.shape() == shape {
        return g;
    }
    sum_to_view(&g.view(), shape)
}

/// [`sum_to`] reading a view of the gradient (a copy when nothing was broadcast): the gradient
/// of a broadcast operand is summed straight from the shared gradient, never from a clone.
pub(crate) fn sum_to_view(g: &ndarray::ArrayViewD<f32>, shape: &[usize]) -> ArrayD<f32> {
    if g.shape() == shape {
        return g.to_owned();
    }
    let lead = g.ndim() - shape.len();
    let axes: Vec<usize> = (0..g.ndim())
        .filter(|&ax| ax < lead || (shape[ax - lead] == 1 && g.shape()[ax] != 1))
        .collect();
    reshape_array(reduce::sum_keep(&g.view(), &axes), shape)
}
