//! The index map of the strided kernels (`StridedIndex` in `kernels/tensor.cu`), passed to them
//! by value as a kernel parameter.
//!
//! It used to travel as a small device array that each launch uploaded, and an upload from
//! pageable host memory waits for the device: every broadcasting add, permute or slice stalled
//! the stream (89-196 times per decoding step of `tests/device_decode.rs`' models). As a
//! parameter it rides in the launch itself, like any scalar argument.

use crate::error::{Error, Result};

/// Most axes an index map holds after [`StridedIndex::new`] merges and drops what it can
/// (`STRIDED_MAX_RANK` in `kernels/tensor.cu`).
pub const STRIDED_MAX_RANK: usize = 8;

/// Most operands (stride sets) an index map describes (`STRIDED_MAX_OPERANDS`).
pub const STRIDED_MAX_OPERANDS: usize = 3;

/// A logical row-major index space and each operand's element strides over it, laid out as the
/// kernels' `struct StridedIndex` (264 bytes; unused entries are 0).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StridedIndex {
    rank: i64,
    shape: [i64; STRIDED_MAX_RANK],
    strides: [[i64; STRIDED_MAX_RANK]; STRIDED_MAX_OPERANDS],
}

// The kernels assert the same size on their side (tensor.cu, and the emulator's argument check
// recognises the struct by it).
const _: () = assert!(std::mem::size_of::<StridedIndex>() == 264);

impl StridedIndex {
    /// The map of `shape`'s row-major index space into operands with element strides
    /// `strides[i]` (each as long as `shape`), simplified without changing any offset: axes of
    /// size 1 are dropped (their index is always 0), and an axis is merged into the one before it
    /// where every operand steps over the pair as over one axis
    /// (`stride[a] == stride[a + 1] * shape[a + 1]`), so a contiguous or broadcast operand
    /// costs one axis, not one per dimension. `op` names the caller in errors: more than
    /// [`STRIDED_MAX_OPERANDS`] operands, a stride set of the wrong length, or more than
    /// [`STRIDED_MAX_RANK`] axes left.
    pub fn new(op: &'static str, shape: &[usize], strides: &[&[i64]]) -> Result<Self> {
        if strides.len() > STRIDED_MAX_OPERANDS {
            return Err(Error::Shape {
                op,
                detail: format!(
                    "a strided kernel takes at most {STRIDED_MAX_OPERANDS} operands, got {}",
                    strides.len()
                ),
            });
        }
        if let Some(bad) = strides.iter().find(|s| s.len() != shape.len()) {
            return Err(Error::Shape {
                op,
                detail: format!("strides {bad:?} do not match the index space's shape {shape:?}"),
            });
        }
        // (size, one stride per operand) of each kept axis, outermost first.
        let mut axes: Vec<(i64, Vec<i64>)> = Vec::with_capacity(shape.len());
        for (a, &size) in shape.iter().enumerate() {
            if size == 1 {
                continue;
            }
            let size = size as i64;
            let own: Vec<i64> = strides.iter().map(|s| s[a]).collect();
            match axes.last_mut() {
                Some((outer_size, outer))
                    if outer.iter().zip(&own).all(|(&o, &s)| o == s * size) =>
                {
                    *outer_size *= size;
                    outer.copy_from_slice(&own);
                }
                _ => axes.push((size, own)),
            }
        }
        if axes.len() > STRIDED_MAX_RANK {
            return Err(Error::Shape {
                op,
                detail: format!(
                    "shape {shape:?} with strides {strides:?} needs {} axes after merging; \
                     strided kernels take at most {STRIDED_MAX_RANK}",
                    axes.len()
                ),
            });
        }
        let mut map = StridedIndex {
            rank: axes.len() as i64,
            shape: [0; STRIDED_MAX_RANK],
            strides: [[0; STRIDED_MAX_RANK]; STRIDED_MAX_OPERANDS],
        };
        for (a, (size, own)) in axes.iter().enumerate() {
            map.shape[a] = *size;
            for (operand, &s) in own.iter().enumerate() {
                map.strides[operand][a] = s;
            }
        }
        Ok(map)
    }

    /// Axes left after merging.
    pub fn rank(&self) -> usize {
        self.rank as usize
    }

    /// The element offset of row-major index `idx` in operand `which`, as the kernels'
    /// `strided_offset` computes it.
    pub fn offset(&self, mut idx: i64, which: usize) -> i64 {
        let mut off = 0;
        for a in (0..self.rank()).rev() {
            let s = self.shape[a];
            off += (idx % s) * self.strides[which][a];
            idx /= s;
        }
        off
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The offsets of every index under the unmerged description, computed directly.
    fn direct_offsets(shape: &[usize], strides: &[i64]) -> Vec<i64> {
        let n: usize = shape.iter().product();
        (0..n)
            .map(|mut idx| {
                let mut off = 0;
                for a in (0..shape.len()).rev() {
                    off += (idx % shape[a]) as i64 * strides[a];
                    idx /= shape[a];
                }
                off
            })
            .collect()
    }

    fn assert_same_offsets(shape: &[usize], sets: &[&[i64]]) -> StridedIndex {
        let map = StridedIndex::new("test", shape, sets).unwrap();
        let n: usize = shape.iter().product();
        for (which, set) in sets.iter().enumerate() {
            let merged: Vec<i64> = (0..n as i64).map(|i| map.offset(i, which)).collect();
            assert_eq!(
                merged,
                direct_offsets(shape, set),
                "shape {shape:?}, operand {which} strides {set:?}, merged into {map:?}"
            );
        }
        map
    }

    #[test]
    fn merging_keeps_every_offset() {
        // Contiguous: one axis.
        assert_eq!(assert_same_offsets(&[2, 3, 4], &[&[12, 4, 1]]).rank(), 1);
        // A bias broadcast over rows next to a contiguous operand: rows and columns stay apart.
        assert_eq!(
            assert_same_offsets(&[2, 3, 4], &[&[12, 4, 1], &[0, 0, 1]]).rank(),
            2
        );
        // Broadcast over the two leading axes merges them (0 == 0 * 3).
        assert_eq!(
            assert_same_offsets(&[2, 3, 4], &[&[12, 4, 1], &[0, 0, 1], &[0, 0, 0]]).rank(),
            2
        );
        // A permute (b, h, n, d) -> (b, n, h, d) of a contiguous tensor.
        assert_same_offsets(&[2, 5, 3, 4], &[&[60, 4, 20, 1]]);
        // A slice of the last axis (row stride larger than the row).
        assert_same_offsets(&[3, 2, 4], &[&[16, 8, 1]]);
        // Size-1 axes anywhere, and an all-ones shape (rank 0: offset 0).
        assert_same_offsets(&[1, 3, 1, 4, 1], &[&[99, 4, 7, 1, 5], &[0, 0, 0, 1, 0]]);
        assert_eq!(assert_same_offsets(&[1, 1], &[&[3, 1]]).rank(), 0);
        // Negative-free but non-mergeable strides (a transpose of a 2-D matrix).
        assert_eq!(assert_same_offsets(&[4, 3], &[&[1, 4]]).rank(), 2);
    }

    #[test]
    fn refuses_what_the_kernels_cannot_hold() {
        // Nine axes that no operand lets merge (strides of a transpose-like pattern).
        let shape = [2usize; 9];
        let strides: Vec<i64> = (0..9).map(|a| 1 << (2 * a)).collect();
        let err = StridedIndex::new("test", &shape, &[&strides]).unwrap_err();
        assert!(err.to_string().contains("at most 8"), "{err}");
        let err =
            StridedIndex::new("test", &[2, 2], &[&[2, 1], &[2, 1], &[2, 1], &[2, 1]]).unwrap_err();
        assert!(err.to_string().contains("at most 3 operands"), "{err}");
        let err = StridedIndex::new("test", &[2, 2], &[&[2]]).unwrap_err();
        assert!(err.to_string().contains("do not match"), "{err}");
    }
}
