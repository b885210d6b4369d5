//! Transposed matrices stored as contiguous column blocks.
//!
//! The attention kernels read features transposed, `q'^T` (m, n), a block of positions at a
//! time. Held as one (m, n) array, a block's rows would sit `n` floats apart, a large power of
//! two at the usual lengths, so every row of the block maps to the same cache sets; the
//! measured cost was a third of the kernels' speed. [`Blocks`] stores each block of `width`
//! positions as its own contiguous (rows, width) matrix instead.

use ndarray::{Array3, ArrayView2, ArrayViewMut2, Axis, s};

use crate::heads::for_overwrite;

/// A (rows, len) matrix in column blocks of `width` (the last block may be partial).
pub(crate) struct Blocks {
    data: Array3<f32>,
    len: usize,
}

impl Blocks {
    /// Zeros, `rows` by `len`, in blocks of `width` columns.
    pub fn zeros(rows: usize, len: usize, width: usize) -> Self {
        let width = width.max(1);
        Blocks {
            data: Array3::zeros((len.div_ceil(width), rows, width)),
            len,
        }
    }

    /// For blocks that are written before they are read (a block's columns past the matrix's
    /// end are never read); zeroed, see [`for_overwrite`].
    pub fn for_overwrite(rows: usize, len: usize, width: usize) -> Self {
        let width = width.max(1);
        Blocks {
            data: for_overwrite((len.div_ceil(width), rows, width)),
            len,
        }
    }

    /// The transpose of `x` (len, rows), in blocks of `width` columns.
    pub fn transpose_of(x: &ArrayView2<f32>, width: usize) -> Self {
        let (len, rows) = x.dim();
        // Every column below `len` of every block is written.
        let mut t = Blocks::for_overwrite(rows, len, width);
        let width = t.width();
        for b in 0..t.count() {
            let (c0, c1) = t.range(b);
            let src = x.slice(s![c0..c1, ..]);
            let owned = (!src.is_standard_layout()).then(|| src.to_owned());
            let src = match &owned {
                Some(o) => o.as_slice(),
                None => src.to_slice(),
            }
            .expect("standard layout");
            let mut blk = t.data.index_axis_mut(Axis(0), b);
            let dst = blk.as_slice_mut().expect("blocks are contiguous");
            transpose_tiles(src, c1 - c0, rows, dst, width);
        }
        t
    }

    /// Columns per block.
    pub fn width(&self) -> usize {
        self.data.len_of(Axis(2))
    }

    /// Number of blocks.
    pub fn count(&self) -> usize {
        self.data.len_of(Axis(0))
    }

    /// Rows of the matrix.
    pub fn rows(&self) -> usize {
        self.data.len_of(Axis(1))
    }

    /// Positions `start..end` of block `b`.
    pub fn range(&self, b: usize) -> (usize, usize) {
        let w = self.width();
        (b * w, ((b + 1) * w).min(self.len))
    }

    /// Block `b`, (rows, its width).
    pub fn block(&self, b: usize) -> ArrayView2<'_, f32> {
        let (c0, c1) = self.range(b);
        self.data
            .index_axis(Axis(0), b)
            .slice_move(s![.., ..c1 - c0])
    }

    /// Block `b`, mutable.
    pub fn block_mut(&mut self, b: usize) -> ArrayViewMut2<'_, f32> {
        let (c0, c1) = self.range(b);
        self.data
            .index_axis_mut(Axis(0), b)
            .slice_move(s![.., ..c1 - c0])
    }

    /// Bytes of storage.
    pub fn bytes(rows: usize, len: usize, width: usize) -> usize {
        len.div_ceil(width.max(1)) * rows * width.max(1) * 4
    }
}

/// `dst[j * ld + i] = src[i * cols + j]` for a (rows, cols) row-major `src`, in 16 x 16 tiles
/// so that both sides stay in L1.
fn transpose_tiles(src: &[f32], rows: usize, cols: usize, dst: &mut [f32], ld: usize) {
    transpose_strided(src, rows, cols, cols, dst, ld);
}

/// `dst[j * ld_dst + i] = src[i * ld_src + j]` for `i < rows`, `j < cols`, in 16 x 16 tiles.
fn transpose_strided(
    src: &[f32],
    rows: usize,
    cols: usize,
    ld_src: usize,
    dst: &mut [f32],
    ld_dst: usize,
) {
    const T: usize = 16;
    for i0 in (0..rows).step_by(T) {
        let i1 = (i0 + T).min(rows);
        for j0 in (0..cols).step_by(T) {
            let j1 = (j0 + T).min(cols);
            for i in i0..i1 {
                let row = &src[i * ld_src + j0..i * ld_src + j1];
                for (j, &v) in (j0..j1).zip(row) {
                    dst[j * ld_dst + i] = v;
                }
            }
        }
    }
}

/// `dst = src^T` for (rows, cols) `src` and (cols, rows) `dst`, tiled when both have unit
/// column stride (ndarray's strided `assign` is several times slower).
pub(crate) fn transpose_into(src: &ArrayView2<f32>, dst: &mut ArrayViewMut2<f32>) {
    let (rows, cols) = src.dim();
    debug_assert_eq!(dst.dim(), (cols, rows));
    // Unit column stride and a non-negative row stride: the span from the first element then
    // covers every element, so it can be read as one slice (checked in every build: a negative
    // stride would make the slices below point outside the views).
    let plain = |s: &[isize], c: usize| (c <= 1 || s[1] == 1) && s[0] >= 0;
    if rows == 0 || cols == 0 || !plain(src.strides(), cols) || !plain(dst.strides(), rows) {
        dst.assign(&src.t());
        return;
    }
    let (ls, ld) = (src.strides()[0] as usize, dst.strides()[0] as usize);
    // SAFETY: `src` has unit column stride and row stride `ls >= 0` (checked above), so its
    // elements lie in the `(rows - 1) * ls + cols` floats from its first one, all inside the
    // array it views; they are only read.
    let s = unsafe { std::slice::from_raw_parts(src.as_ptr(), (rows - 1) * ls + cols) };
    // SAFETY: likewise for `dst` (unit column stride, row stride `ld >= 0`); it is borrowed
    // mutably, so nothing else reads or writes that span, and it cannot overlap `src`, which is
    // borrowed shared at the same time.
    let d = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr(), (cols - 1) * ld + rows) };
    transpose_strided(s, rows, cols, ls, d, ld);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn blocks_hold_the_transpose() {
        let x = Array2::from_shape_fn((10, 3), |(i, j)| (i * 3 + j) as f32);
        for width in [1, 3, 4, 10, 16] {
            let t = Blocks::transpose_of(&x.view(), width);
            assert_eq!(
                (t.rows(), t.len, t.count()),
                (3, 10, 10usize.div_ceil(width))
            );
            for b in 0..t.count() {
                let (c0, c1) = t.range(b);
                assert_eq!(t.block(b), x.slice(s![c0..c1, ..]).t());
            }
        }
        let strided = x.slice(s![..;2, ..]);
        let t = Blocks::transpose_of(&strided, 4);
        assert_eq!(t.block(1), strided.slice(s![4..5, ..]).t());
    }

    #[test]
    fn transpose_into_matches_assign() {
        let x = Array2::from_shape_fn((37, 21), |(i, j)| (i * 100 + j) as f32);
        for (r0, r1, c0, c1) in [(0, 37, 0, 21), (3, 30, 2, 19), (5, 6, 0, 21), (0, 37, 4, 5)] {
            let src = x.slice(s![r0..r1, c0..c1]);
            let mut big = Array2::<f32>::zeros((25, 40));
            let mut dst = big.slice_mut(s![1..1 + c1 - c0, 2..2 + r1 - r0]);
            transpose_into(&src, &mut dst);
            assert_eq!(dst, src.t());
        }
        let src = x.t();
        let mut dst = Array2::<f32>::zeros((37, 21));
        transpose_into(&src, &mut dst.view_mut());
        assert_eq!(dst, x);
    }
}
