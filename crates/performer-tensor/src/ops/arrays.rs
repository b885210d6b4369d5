//! Helpers on plain arrays that the ops share: element-wise maps over one, two or three
//! operands (parallel when large, writing each element once), and a reshape of any layout.

use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn, Zip};

use crate::parallel::PAR_THRESHOLD;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Elements per task of the parallel slice loops.
const SLICE_CHUNK: usize = 1 << 14;

/// A new vector of `len` elements, filled chunk by chunk (in parallel when large) by
/// `fill(offset, chunk)`, which must write every element of its chunk. The element-wise fast
/// paths below use it on contiguous operands: a plain loop over slices, which the compiler
/// vectorizes, where ndarray's `Zip` over dynamic-rank views would walk indices.
pub(super) fn fill_vec(
    len: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    let spare = &mut v.spare_capacity_mut()[..len];
    if len < PAR_THRESHOLD {
        fill(0, spare);
    } else {
        spare
            .par_chunks_mut(SLICE_CHUNK)
            .enumerate()
            .for_each(|(i, chunk)| fill(i * SLICE_CHUNK, chunk));
    }
    // SAFETY: `fill` wrote every element of every chunk, and the chunks cover 0..len.
    unsafe { v.set_len(len) };
    v
}

/// Whether the row-by-row paths below pay off: at least two axes and rows long enough that the
/// per-row overhead vanishes.
fn by_rows(a: &ArrayViewD<f32>) -> bool {
    a.ndim() >= 2 && a.shape()[a.ndim() - 1] >= 32
}

/// `f` over pairs of elements of `a` and `b` (same shape), row by row along the last axis into
/// a standard-layout result: operands that are views with gaps between rows (the halves of a
/// reversible block, a slice of the features) still get a vectorized loop per row.
fn zip_map_rows(
    a: &ArrayViewD<f32>,
    b: &ArrayViewD<f32>,
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) -> ArrayD<f32> {
    let last = Axis(a.ndim() - 1);
    let mut out = ArrayD::<f32>::uninit(a.raw_dim());
    let row = |mut o: ndarray::ArrayViewMut1<MaybeUninit<f32>>,
               x: ndarray::ArrayView1<f32>,
               y: ndarray::ArrayView1<f32>| {
        if let (Some(xs), Some(ys)) = (x.as_slice(), y.as_slice())
            && let Some(os) = o.as_slice_mut()
        {
            for ((o, &x), &y) in os.iter_mut().zip(xs).zip(ys) {
                o.write(f(x, y));
            }
        } else {
            Zip::from(o).and(x).and(y).for_each(|o, &x, &y| {
                o.write(f(x, y));
            });
        }
    };
    let zip = Zip::from(out.lanes_mut(last))
        .and(a.lanes(last))
        .and(b.lanes(last));
    if a.len() < PAR_THRESHOLD {
        zip.for_each(row);
    } else {
        zip.par_for_each(row);
    }
    // SAFETY: every row of `out` was written in full.
    unsafe { out.assume_init() }
}

/// [`zip_map_rows`] for three operands.
fn zip_map3_rows(
    a: &ArrayViewD<f32>,
    b: &ArrayViewD<f32>,
    c: &ArrayViewD<f32>,
    f: impl Fn(f32, f32, f32) -> f32 + Sync + Send,
) -> ArrayD<f32> {
    let last = Axis(a.ndim() - 1);
    let mut out = ArrayD::<f32>::uninit(a.raw_dim());
    let row = |mut o: ndarray::ArrayViewMut1<MaybeUninit<f32>>,
               x: ndarray::ArrayView1<f32>,
               y: ndarray::ArrayView1<f32>,
               w: ndarray::ArrayView1<f32>| {
        if let (Some(xs), Some(ys), Some(ws)) = (x.as_slice(), y.as_slice(), w.as_slice())
            && let Some(os) = o.as_slice_mut()
        {
            for (o, ((&x, &y), &w)) in os.iter_mut().zip(xs.iter().zip(ys).zip(ws)) {
                o.write(f(x, y, w));
            }
        } else {
            Zip::from(o).and(x).and(y).and(w).for_each(|o, &x, &y, &w| {
                o.write(f(x, y, w));
            });
        }
    };
    let zip = Zip::from(out.lanes_mut(last))
        .and(a.lanes(last))
        .and(b.lanes(last))
        .and(c.lanes(last));
    if a.len() < PAR_THRESHOLD {
        zip.for_each(row);
    } else {
        zip.par_for_each(row);
    }
    // SAFETY: every row of `out` was written in full.
    unsafe { out.assume_init() }
}

/// Whether `a`'s rows (its last axis) are contiguous slices, long enough for the row paths.
pub(super) fn rows_are_slices(a: &ArrayViewD<f32>) -> bool {
    by_rows(a) && a.strides()[a.ndim() - 1] == 1
}

/// A slice kernel `kernel(x_row, out_row)` over the rows of `x` (last axis contiguous, see
/// [`rows_are_slices`]) into a standard-layout result: a GLU's halves and other column slices
/// get the vectorized kernel row by row instead of a scalar loop over a strided view.
pub(super) fn map_rows_with(
    x: &ArrayViewD<f32>,
    kernel: impl Fn(&[f32], &mut [MaybeUninit<f32>]) + Sync + Send,
) -> ArrayD<f32> {
    let last = Axis(x.ndim() - 1);
    let mut out = ArrayD::<f32>::uninit(x.raw_dim());
    let row = |mut o: ndarray::ArrayViewMut1<MaybeUninit<f32>>, x: ndarray::ArrayView1<f32>| {
        let os = o
            .as_slice_mut()
            .expect("rows of a fresh array are contiguous");
        kernel(x.as_slice().expect("rows checked contiguous"), os);
    };
    let zip = Zip::from(out.lanes_mut(last)).and(x.lanes(last));
    if x.len() < PAR_THRESHOLD {
        zip.for_each(row);
    } else {
        zip.par_for_each(row);
    }
    // SAFETY: every row of `out` was written in full by the kernel.
    unsafe { out.assume_init() }
}

/// [`map_rows_with`] for a kernel of two operands of the same shape, both with contiguous rows.
pub(super) fn zip_rows_with(
    a: &ArrayViewD<f32>,
    b: &ArrayViewD<f32>,
    kernel: impl Fn(&[f32], &[f32], &mut [MaybeUninit<f32>]) + Sync + Send,
) -> ArrayD<f32> {
    let last = Axis(a.ndim() - 1);
    let mut out = ArrayD::<f32>::uninit(a.raw_dim());
    let row = |mut o: ndarray::ArrayViewMut1<MaybeUninit<f32>>,
               x: ndarray::ArrayView1<f32>,
               y: ndarray::ArrayView1<f32>| {
        let os = o
            .as_slice_mut()
            .expect("rows of a fresh array are contiguous");
        kernel(
            x.as_slice().expect("rows checked contiguous"),
            y.as_slice().expect("rows checked contiguous"),
            os,
        );
    };
    let zip = Zip::from(out.lanes_mut(last))
        .and(a.lanes(last))
        .and(b.lanes(last));
    if a.len() < PAR_THRESHOLD {
        zip.for_each(row);
    } else {
        zip.par_for_each(row);
    }
    // SAFETY: every row of `out` was written in full by the kernel.
    unsafe { out.assume_init() }
}

/// `f` over every element, in parallel when large. The result has the operand's shape.
pub(crate) fn map_array(x: &ArrayViewD<f32>, f: impl Fn(f32) -> f32 + Sync + Send) -> ArrayD<f32> {
    if let Some(xs) = x.as_slice() {
        let v = fill_vec(xs.len(), |off, out| {
            let n = out.len();
            for (o, &a) in out.iter_mut().zip(&xs[off..off + n]) {
                o.write(f(a));
            }
        });
        return ArrayD::from_shape_vec(x.raw_dim(), v).expect("length of the operand");
    }
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
pub(super) fn layout_source<'a, 'b>(xs: &'a [&'a ArrayViewD<'b, f32>]) -> &'a ArrayViewD<'b, f32> {
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
    if let (Some(xs), Some(ys)) = (a.as_slice(), b.as_slice()) {
        let v = fill_vec(xs.len(), |off, out| {
            let n = out.len();
            for ((o, &x), &y) in out.iter_mut().zip(&xs[off..off + n]).zip(&ys[off..off + n]) {
                o.write(f(x, y));
            }
        });
        return ArrayD::from_shape_vec(a.raw_dim(), v).expect("length of the operands");
    }
    if by_rows(a) {
        return zip_map_rows(a, b, f);
    }
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
    if let (Some(xs), Some(ys), Some(ws)) = (a.as_slice(), b.as_slice(), c.as_slice()) {
        let v = fill_vec(xs.len(), |off, out| {
            let n = out.len();
            let operands = xs[off..off + n]
                .iter()
                .zip(&ys[off..off + n])
                .zip(&ws[off..off + n]);
            for (o, ((&x, &y), &w)) in out.iter_mut().zip(operands) {
                o.write(f(x, y, w));
            }
        });
        return ArrayD::from_shape_vec(a.raw_dim(), v).expect("length of the operands");
    }
    if by_rows(a) {
        return zip_map3_rows(a, b, c, f);
    }
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
