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
    let lead = g.ndim() - shape.len();
    let axes: Vec<usize> = (0..g.ndim())
        .filter(|&ax| ax < lead || (shape[ax - lead] == 1 && g.shape()[ax] != 1))
        .collect();
    reshape_array(reduce::sum_keep(&g.view(), &axes), shape)
}
