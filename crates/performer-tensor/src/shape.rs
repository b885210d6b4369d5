//! Shape arithmetic shared by the ops: axis normalization, broadcasting, reduction of a
//! broadcast gradient back to its operand's shape.

use ndarray::{ArrayD, Axis, IxDyn};

use crate::{Error, Result};

/// Turns a possibly negative axis into an index below `rank`.
pub fn normalize_axis(op: &str, axis: isize, rank: usize) -> Result<usize> {
    let r = rank as isize;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(Error::Axis {
            op: op.to_string(),
            axis,
            rank,
        });
    }
    Ok(a as usize)
}

/// Normalizes a list of axes; duplicates are an error. Sorted ascending.
pub fn normalize_axes(op: &str, axes: &[isize], rank: usize) -> Result<Vec<usize>> {
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let n = normalize_axis(op, a, rank)?;
        if out.contains(&n) {
            return Err(Error::invalid(
                op,
                "axes",
                format!("{axes:?}"),
                "an axis appears twice",
            ));
        }
        out.push(n);
    }
    out.sort_unstable();
    Ok(out)
}

/// The shape two operands broadcast to, by PyTorch's (NumPy's) rules.
pub fn broadcast_shapes(op: &str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            a[i + a.len() - rank]
        } else {
            1
        };
        let db = if i + b.len() >= rank {
            b[i + b.len() - rank]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(Error::shape(
                op,
                format!("shapes {a:?} and {b:?} do not broadcast"),
            ));
        };
    }
    if checked_numel(&out).is_none() {
        return Err(Error::shape(
            op,
            format!("shapes {a:?} and {b:?} broadcast to {out:?}, too large to allocate"),
        ));
    }
    Ok(out)
}

/// Sums a gradient of a broadcast result down to the shape of the operand that was broadcast.
///
/// # Panics
/// If `shape` does not broadcast to `g`'s shape (a broken caller contract, not bad user input:
/// the ops only call it with the operand shape they broadcast in the forward).
pub fn sum_to_shape(g: ArrayD<f32>, shape: &[usize]) -> ArrayD<f32> {
    if g.shape() == shape {
        return g;
    }
    let mut g = g;
    while g.ndim() > shape.len() {
        g = g.sum_axis(Axis(0));
    }
    for (ax, &d) in shape.iter().enumerate() {
        if d == 1 && g.shape()[ax] != 1 {
            g = g.sum_axis(Axis(ax)).insert_axis(Axis(ax));
        }
    }
    g.into_shape_with_order(IxDyn(shape))
        .expect("sum_to_shape keeps the element count")
}

/// Product of the dimensions.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Product of the dimensions if an f32 array of that shape is addressable (its size in bytes
/// fits in `isize`, ndarray's limit); `None` otherwise.
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    let n = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    (n <= isize::MAX as usize / std::mem::size_of::<f32>()).then_some(n)
}
