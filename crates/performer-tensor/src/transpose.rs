//! Out-of-place transposes of row-major matrices, in cache-sized tiles.
//!
//! ndarray's copy of a transposed view walks the destination in order and reads the source a
//! column at a time: every value is a new cache line, and where the rows are a multiple of 4 KB
//! long (1024 floats, a Linear layer's 1024 inputs) all of a column's lines fall into the same
//! few L1 sets. A 1 MB weight took 0.34-0.77 ms that way on the 2-core Zen 4 (the 256 x 1024
//! one the slowest). Here the matrix goes in 16 x 16 tiles, and each tile walks contiguously
//! along whichever side has the longer rows, so the strided side is the one whose lines spread
//! over more sets: 0.03 ms for 256 KB and 0.12 ms for 1 MB on the same box, either shape
//! (medians of 200, one thread).

/// Side of the square tiles: 16 values of the strided side are 16 cache lines, which fit the
/// L1 however the row length falls on its sets, short of a multiple of 4 KB on both sides.
const TILE: usize = 16;

/// Writes the transpose of `src`, `rows x cols` row-major, into `dst`, `cols x rows` row-major.
///
/// # Panics
/// If `src` or `dst` does not hold exactly `rows * cols` values.
pub fn transpose_into<T: Copy>(src: &[T], rows: usize, cols: usize, dst: &mut [T]) {
    assert!(
        src.len() == rows * cols && dst.len() == rows * cols,
        "transpose_into: {} and {} values for a {rows} x {cols} matrix",
        src.len(),
        dst.len()
    );
    for r0 in (0..rows).step_by(TILE) {
        let r1 = (r0 + TILE).min(rows);
        for c0 in (0..cols).step_by(TILE) {
            let c1 = (c0 + TILE).min(cols);
            if cols <= rows {
                // Source rows are the shorter stride: read down the tile's columns (a source
                // line per value, the tile's 16 lines reused) and write destination rows.
                for c in c0..c1 {
                    let out = &mut dst[c * rows + r0..c * rows + r1];
                    for (o, r) in out.iter_mut().zip(r0..r1) {
                        *o = src[r * cols + c];
                    }
                }
            } else {
                // Destination rows are the shorter stride: read source rows, write down the
                // destination's columns.
                for r in r0..r1 {
                    let row = &src[r * cols + c0..r * cols + c1];
                    for (&v, c) in row.iter().zip(c0..c1) {
                        dst[c * rows + r] = v;
                    }
                }
            }
        }
    }
}

/// The transpose of `src`, `rows x cols` row-major, as a new `cols x rows` row-major vector.
///
/// # Panics
/// If `src` does not hold exactly `rows * cols` values.
pub fn transposed<T: Copy + Default>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut dst = vec![T::default(); rows * cols];
    transpose_into(src, rows, cols, &mut dst);
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_the_transposed_view_on_every_kind_of_shape() {
        // Square, tall, wide, off the tiles on either side, rows of 4 KB, empty.
        for (rows, cols) in [
            (1, 1),
            (3, 5),
            (16, 16),
            (17, 33),
            (40, 7),
            (7, 40),
            (1024, 48),
            (48, 1024),
            (0, 5),
            (5, 0),
        ] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5 - 3.0).collect();
            let want = ndarray::ArrayView2::from_shape((rows, cols), &src)
                .unwrap()
                .t()
                .as_standard_layout()
                .into_owned();
            let got = transposed(&src, rows, cols);
            assert_eq!(got.len(), want.len(), "{rows} x {cols}");
            assert!(
                got.iter()
                    .zip(want.iter())
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{rows} x {cols}"
            );
        }
    }

    #[test]
    fn transposes_other_value_types() {
        let src: Vec<half::bf16> = (0..6).map(|i| half::bf16::from_f32(i as f32)).collect();
        let got: Vec<f32> = transposed(&src, 2, 3).iter().map(|v| v.to_f32()).collect();
        assert_eq!(got, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    }

    #[test]
    #[should_panic(expected = "transpose_into")]
    fn refuses_a_buffer_of_the_wrong_size() {
        let mut dst = [0f32; 5];
        transpose_into(&[0f32; 6], 2, 3, &mut dst);
    }
}
