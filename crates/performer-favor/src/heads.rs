//! Treating `(..., n, d)` arrays as a list of heads: leading axes (batch, heads) flatten into
//! one head index; views of any strides are used as they are.

use ndarray::{
    Array2, Array3, ArrayD, ArrayView2, ArrayViewD, ArrayViewMut1, ArrayViewMut2, Axis, IxDyn,
};
use performer_tensor::{Error, Result};

/// The leading (head) shape of a `(..., rows, cols)` array, checked to be of rank >= 2.
/// (Public for the layer crates, which lay out heads the same way.)
pub fn lead_shape<'a>(op: &str, name: &str, shape: &'a [usize]) -> Result<&'a [usize]> {
    if shape.len() < 2 {
        return Err(Error::shape(
            op,
            format!("`{name}` must be (..., n, d), got {shape:?}"),
        ));
    }
    Ok(&shape[..shape.len() - 2])
}

/// Head `i` (in row-major order of the leading axes) as a 2-D view; an error for an array of
/// rank below 2 or a head index past the heads.
pub fn head<'a>(x: &'a ArrayViewD<'a, f32>, i: usize) -> Result<ArrayView2<'a, f32>> {
    let lead = lead_shape("heads::head", "x", x.shape())?;
    let heads: usize = lead.iter().product();
    if i >= heads {
        return Err(Error::Index {
            op: "heads::head".into(),
            index: i as i64,
            size: heads,
        });
    }
    let mut v = x.view();
    let mut rem = i;
    let mut idx = vec![0; lead.len()];
    for (ax, &d) in lead.iter().enumerate().rev() {
        idx[ax] = rem % d;
        rem /= d;
    }
    for &k in &idx {
        v = v.index_axis_move(Axis(0), k);
    }
    v.into_dimensionality()
        .map_err(|e| Error::shape("heads::head", e.to_string()))
}

/// A contiguous `(heads, rows, cols)` output with its final `lead ++ [rows, cols]` shape.
pub struct HeadsOut {
    /// `(heads, rows, cols)`.
    pub data: Array3<f32>,
    shape: Vec<usize>,
}

impl HeadsOut {
    /// Zeros of `lead ++ [rows, cols]`.
    pub fn zeros(lead: &[usize], rows: usize, cols: usize) -> Self {
        let heads = lead.iter().product();
        let mut shape = lead.to_vec();
        shape.extend([rows, cols]);
        HeadsOut {
            data: Array3::zeros((heads, rows, cols)),
            shape,
        }
    }

    /// Like [`HeadsOut::zeros`], for outputs that the caller overwrites completely before
    /// reading (see [`for_overwrite`] for why it is zeroed all the same).
    pub(crate) fn for_overwrite(lead: &[usize], rows: usize, cols: usize) -> Self {
        let heads = lead.iter().product();
        let mut shape = lead.to_vec();
        shape.extend([rows, cols]);
        HeadsOut {
            data: for_overwrite((heads, rows, cols)),
            shape,
        }
    }

    /// One mutable `(rows, cols)` view per head.
    pub fn views(&mut self) -> Vec<ArrayViewMut2<'_, f32>> {
        self.data.axis_iter_mut(Axis(0)).collect()
    }

    /// The array in its final shape.
    pub fn into_array(self) -> ArrayD<f32> {
        self.data
            .into_shape_with_order(IxDyn(&self.shape))
            .expect("same element count")
    }
}

/// A new array for a buffer that is overwritten completely before anything reads it (GEMM
/// outputs with `beta = 0`, copies). It is zeroed: handing out uninitialized `f32`s, as this
/// once did through `assume_init`, is undefined behaviour however the values are used, and
/// `Array::zeros` takes its memory from `calloc`, which gives a fresh mapping of zero pages for
/// a large buffer without a pass over it (small buffers are cleared by memset, a cost in the
/// noise of the products that fill them).
pub(crate) fn for_overwrite<Sh: ndarray::ShapeBuilder>(shape: Sh) -> ndarray::Array<f32, Sh::Dim> {
    ndarray::Array::zeros(shape)
}

/// Per-head row vectors (normalizers), `(heads, rows)`.
pub(crate) fn row_vectors(heads: usize, rows: usize) -> Array2<f32> {
    Array2::zeros((heads, rows))
}

/// Mutable rows of a `(heads, rows)` array.
pub(crate) fn vector_views(a: &mut Array2<f32>) -> Vec<ArrayViewMut1<'_, f32>> {
    a.axis_iter_mut(Axis(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rank below 2 and a head past the last are errors, not panics.
    #[test]
    fn bad_axes_and_heads_are_errors() {
        let x = ArrayD::<f32>::zeros(IxDyn(&[2, 3, 4, 5]));
        let v = x.view();
        assert_eq!(head(&v, 5).unwrap().shape(), &[4, 5]);
        let err = head(&v, 6).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Index {
                    index: 6,
                    size: 6,
                    ..
                }
            ),
            "{err}"
        );
        let flat = ArrayD::<f32>::zeros(IxDyn(&[5]));
        let err = head(&flat.view(), 0).unwrap_err();
        assert!(err.to_string().contains("(..., n, d)"), "{err}");
    }
}
