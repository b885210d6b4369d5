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
    if let (Some(xs), Some(block)) = (a.as_slice(), repeated_block(b)) {
        return ArrayD::from_shape_vec(a.raw_dim(), zip_map_repeated(xs, block, false, f))
            .expect("length of the operand");
    }
    if let (Some(block), Some(ys)) = (repeated_block(a), b.as_slice()) {
        return ArrayD::from_shape_vec(b.raw_dim(), zip_map_repeated(ys, block, true, f))
            .expect("length of the operand");
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
    let a = if a.is_standard_layout() {
        a
    } else {
        to_standard(&a.view())
    };
    a.into_shape_with_order(IxDyn(shape))
        .expect("element count checked by caller")
}

/// A standard-layout (row-major) copy of `x`, whatever its strides, written row by row along
/// the last axis: a row whose source is contiguous is one block copy, where ndarray's
/// `as_standard_layout` walks a dynamic-rank index for every element (measured: most of the
/// time of `reshape` after the attention heads' permute). Parallel over rows when large.
pub(crate) fn to_standard(x: &ArrayViewD<f32>) -> ArrayD<f32> {
    if x.is_standard_layout() || x.ndim() == 0 || x.is_empty() {
        return x.as_standard_layout().into_owned();
    }
    let mut out = crate::alloc::uninit_array(x.shape());
    write_rows(out.view_mut(), x);
    // SAFETY: `write_rows` wrote every element of `out` (same shape as `x`).
    unsafe { crate::alloc::assume_init(out) }
}

/// Writes `src` into `dst` (the same shape, rank at least 1) row by row along the last axis:
/// block copies where both rows are contiguous, a strided loop otherwise. Parallel over rows
/// when large. Every element of `dst` is written.
pub(super) fn write_rows(mut dst: ndarray::ArrayViewMutD<MaybeUninit<f32>>, src: &ArrayViewD<f32>) {
    debug_assert_eq!(dst.shape(), src.shape());
    let last = Axis(src.ndim() - 1);
    let row = |mut d: ndarray::ArrayViewMut1<MaybeUninit<f32>>, s: ndarray::ArrayView1<f32>| {
        if let (Some(ds), Some(ss)) = (d.as_slice_mut(), s.as_slice()) {
            for (o, &v) in ds.iter_mut().zip(ss) {
                o.write(v);
            }
        } else {
            Zip::from(d).and(s).for_each(|o, &v| {
                o.write(v);
            });
        }
    };
    let zip = Zip::from(dst.lanes_mut(last)).and(src.lanes(last));
    if src.len() < PAR_THRESHOLD {
        zip.for_each(row);
    } else {
        zip.par_for_each(row);
    }
}

/// The block `b` repeats when it is broadcast over its leading axes: the contiguous values of
/// its trailing axes (a bias broadcast over the rows of an activation), if the leading axes all
/// have stride 0 (or size 1) and the trailing ones are in standard layout.
fn repeated_block<'a>(b: &ArrayViewD<'a, f32>) -> Option<&'a [f32]> {
    let lead = b
        .shape()
        .iter()
        .zip(b.strides())
        .take_while(|&(&d, &s)| d <= 1 || s == 0)
        .count();
    if lead == 0 || lead == b.ndim() {
        return None;
    }
    let mut v = b.clone();
    for _ in 0..lead {
        v = v.index_axis_move(Axis(0), 0);
    }
    v.to_slice().filter(|block| !block.is_empty())
}

/// `f(x, block[j])` over a contiguous `xs` whose rows (of the block's length) pair with the
/// repeated `block`, or `f(block[j], x)` when `block_first`: a bias add as a plain loop over
/// slices (ndarray's `Zip` over the broadcast view walks the rows one by one). Parallel over
/// groups of rows when large.
fn zip_map_repeated(
    xs: &[f32],
    block: &[f32],
    block_first: bool,
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) -> Vec<f32> {
    let l = block.len();
    let rows_per_task = (SLICE_CHUNK / l).max(1);
    let mut v = Vec::with_capacity(xs.len());
    let spare = &mut v.spare_capacity_mut()[..xs.len()];
    let task = |(t, out): (usize, &mut [MaybeUninit<f32>])| {
        let start = t * rows_per_task * l;
        let n = out.len();
        let rows = out.chunks_mut(l).zip(xs[start..start + n].chunks(l));
        for (orow, xrow) in rows {
            if block_first {
                for ((o, &x), &y) in orow.iter_mut().zip(xrow).zip(block) {
                    o.write(f(y, x));
                }
            } else {
                for ((o, &x), &y) in orow.iter_mut().zip(xrow).zip(block) {
                    o.write(f(x, y));
                }
            }
        }
    };
    if xs.len() < PAR_THRESHOLD {
        task((0, spare));
    } else {
        spare
            .par_chunks_mut(rows_per_task * l)
            .enumerate()
            .for_each(task);
    }
    // SAFETY: the chunks of whole rows cover 0..len, and every element of each was written.
    unsafe { v.set_len(xs.len()) };
    v
}

/// Sums a standard-layout `x` over one axis `ax` that is not its last (lanes strided by the
/// size `inner` of the axes after it), keeping `ax` as size 1: each output value adds its lane
/// from the first element to the last, starting at zero, as ndarray's `sum` of a strided lane
/// does (so the values are the same bits), but row by row, so that the loop runs over
/// contiguous values and vectorizes. `None` where that order is not ndarray's (contiguous lanes,
/// lanes of one element) or `x` is not in standard layout.
pub(super) fn sum_strided_axis(x: &ArrayViewD<f32>, ax: usize) -> Option<ArrayD<f32>> {
    let xs = x.as_slice()?;
    let shape = x.shape();
    let len = shape[ax];
    let inner: usize = shape[ax + 1..].iter().product();
    if len < 2 || inner < 2 {
        return None;
    }
    let outer: usize = shape[..ax].iter().product();
    let mut out = vec![0f32; outer * inner];
    // Column pieces of at least 64 values, enough of them to share over the threads.
    let threads = rayon::current_num_threads();
    let par = xs.len() >= PAR_THRESHOLD;
    let piece = if par {
        let per_row = (2 * threads).div_ceil(outer).max(1);
        inner.div_ceil(per_row).max(64)
    } else {
        inner
    };
    let column_piece = |o: usize, c: usize, acc: &mut [f32]| {
        let base = o * len * inner + c * piece;
        for i in 0..len {
            let row = &xs[base + i * inner..base + i * inner + acc.len()];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
    };
    if par {
        out.par_chunks_mut(inner).enumerate().for_each(|(o, row)| {
            row.par_chunks_mut(piece)
                .enumerate()
                .for_each(|(c, acc)| column_piece(o, c, acc));
        });
    } else {
        for (o, row) in out.chunks_mut(inner).enumerate() {
            column_piece(o, 0, row);
        }
    }
    let mut kept = shape.to_vec();
    kept[ax] = 1;
    Some(ArrayD::from_shape_vec(IxDyn(&kept), out).expect("outer x inner values"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tensor;

    fn bits(a: &ArrayViewD<f32>) -> Vec<u32> {
        a.iter().map(|v| v.to_bits()).collect()
    }

    /// Values with ties of sign, a NaN and a wide range, so that a different summation order
    /// or a lost -0.0 shows in the bits.
    fn awkward(shape: &[usize]) -> ArrayD<f32> {
        let mut a = Tensor::randn(shape).to_array();
        for (i, v) in a.iter_mut().enumerate() {
            match i % 97 {
                0 => *v = -0.0,
                1 => *v *= 1e7,
                2 => *v *= 1e-7,
                _ => {}
            }
        }
        a
    }

    #[test]
    fn to_standard_copies_any_layout_bit_for_bit() {
        for shape in [[2usize, 3, 5, 7], [4, 8, 64, 32]] {
            let a = awkward(&shape);
            let views = [
                a.view().permuted_axes(IxDyn(&[0, 2, 1, 3])),
                a.view().permuted_axes(IxDyn(&[3, 1, 2, 0])),
                a.slice_axis(Axis(3), ndarray::Slice::from(1..)).into_dyn(),
                a.slice_axis(Axis(1), ndarray::Slice::new(0, None, 2))
                    .into_dyn(),
            ];
            for v in views {
                let copy = to_standard(&v);
                assert!(copy.is_standard_layout());
                assert_eq!(copy.shape(), v.shape());
                assert_eq!(bits(&copy.view()), bits(&v), "shape {:?}", v.shape());
            }
        }
    }

    #[test]
    fn cat_of_views_matches_ndarray_concatenate() {
        for n in [5usize, 300] {
            let a = Tensor::new(awkward(&[3, n, 40]));
            let b = Tensor::new(awkward(&[3, 40, n]))
                .permute(&[0, 2, 1])
                .unwrap();
            let c = a.narrow(-1, 7, 9).unwrap();
            for (pieces, ax) in [
                (vec![a.clone(), b.clone()], 2usize),
                (vec![a.clone(), b.clone(), a.clone()], 1),
                (vec![b.clone(), a.clone()], 0),
                (vec![c.clone(), a.clone(), c.clone()], 2),
            ] {
                let got = Tensor::cat(&pieces, ax as isize).unwrap();
                let views: Vec<_> = pieces.iter().map(|t| t.view()).collect();
                let want = ndarray::concatenate(Axis(ax), &views).unwrap();
                assert_eq!(got.shape(), want.shape());
                assert_eq!(bits(&got.view()), bits(&want.view()), "n {n}, axis {ax}");
            }
        }
    }

    #[test]
    fn broadcast_block_maps_match_zip_over_the_broadcast() {
        for rows in [3usize, 700] {
            let x = awkward(&[2, rows, 48]);
            for block_shape in [vec![48usize], vec![rows, 48], vec![1, 1, 48]] {
                let b = awkward(&block_shape);
                let bb = b.broadcast(IxDyn(x.shape())).unwrap();
                assert!(repeated_block(&bb).is_some(), "{block_shape:?}");
                let f = |x: f32, y: f32| x * 3.0 - y;
                for (first, second) in [(x.view(), bb.clone()), (bb.clone(), x.view())] {
                    let got = zip_map(&first, &second, f);
                    let want = Zip::from(&first).and(&second).map_collect(|&x, &y| f(x, y));
                    assert_eq!(got.shape(), want.shape());
                    assert_eq!(bits(&got.view()), bits(&want.view()), "{block_shape:?}");
                }
            }
        }
        // A broadcast along the last axis is not a repeated block.
        let col = awkward(&[4, 1]);
        assert!(repeated_block(&col.broadcast(IxDyn(&[4, 6])).unwrap()).is_none());
    }

    #[test]
    fn strided_axis_sums_match_ndarray_lane_sums() {
        for shape in [[3usize, 7, 5], [4, 900, 64], [2, 2, 2]] {
            let mut x = awkward(&shape);
            x[[0, 1, 1]] = f32::NAN;
            for ax in 0..2 {
                let got = sum_strided_axis(&x.view(), ax).expect("a strided axis");
                let want = Zip::from(x.lanes(Axis(ax)))
                    .map_collect(|l| l.sum())
                    .insert_axis(Axis(ax));
                assert_eq!(got.shape(), want.shape());
                assert_eq!(bits(&got.view()), bits(&want.view()), "{shape:?} axis {ax}");
            }
            assert!(sum_strided_axis(&x.view(), 2).is_none(), "contiguous lanes");
        }
        let one = awkward(&[3, 1, 4]);
        assert!(
            sum_strided_axis(&one.view(), 1).is_none(),
            "lanes of one value"
        );
        let t = awkward(&[6, 5]);
        assert!(
            sum_strided_axis(&t.t().into_dyn(), 0).is_none(),
            "not standard"
        );
    }
}
