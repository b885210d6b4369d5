//! cuBLAS's `cublasSgemmStridedBatched` on the CPU, reading its arguments exactly as cuBLAS
//! does: column-major storage, transpose flags, leading dimensions and batch strides, and
//! `beta == 0` meaning C is not read; and its bf16-storage form (`cublasGemmStridedBatchedEx`
//! with `CUDA_R_16BF` A and B, C f32 or bf16). A caller that passes row-major thinking, a wrong
//! flag or a wrong leading dimension gets the same wrong numbers (or the same error) as on a GPU.

use crate::error::{Error, Result};
use crate::launcher::{GemmStridedBatched, Transpose};

use super::memory::Memory;

const OP: &str = "gemm_strided_batched";

/// How the operands enter the products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Operands {
    /// As stored (`cublasSgemmStridedBatched`).
    F32,
    /// A and B stored as bf16 (2 bytes each), C written as f32 (`CUDA_R_16BF` operands).
    Bf16Stored,
    /// A and B stored as bf16, C written as bf16, rounded to nearest even.
    Bf16StoredToBf16,
}

impl Operands {
    /// Bytes per stored element of A and B.
    fn ab_size(self) -> usize {
        match self {
            Operands::F32 => 4,
            Operands::Bf16Stored | Operands::Bf16StoredToBf16 => 2,
        }
    }

    /// Bytes per stored element of C.
    fn c_size(self) -> usize {
        if self == Operands::Bf16StoredToBf16 {
            2
        } else {
            4
        }
    }
}

/// The f32 a bf16 value (its bits) stands for: exact.
fn widen_bf16(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// The bits of `x` rounded to the nearest bf16 (ties to even; NaN stays NaN).
fn narrow_bf16(x: f32) -> u16 {
    if x.is_nan() {
        return ((x.to_bits() >> 16) | 0x40) as u16;
    }
    (round_to_bf16(x).to_bits() >> 16) as u16
}

/// `x` rounded to the nearest bf16 (ties to even), as an f32: the top 16 bits kept. NaN stays
/// NaN; a value past bf16's largest finite rounds to infinity, as the hardware conversion does.
pub(crate) fn round_to_bf16(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    f32::from_bits(rounded & 0xffff_0000)
}

/// The element range `[0, len)` one stored operand spans: `rows x cols` with leading
/// dimension `ld`.
fn span(rows: i32, cols: i32, ld: i32) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows as usize - 1) + (cols as usize - 1) * ld as usize + 1
    }
}

/// Checks that every matrix of every batch lies inside live allocations, then computes.
pub(crate) fn run(mem: &Memory, g: &GemmStridedBatched, operands: Operands) -> Result<()> {
    g.validate().map_err(|detail| Error::Emulator {
        op: OP,
        detail: format!("CUBLAS_STATUS_INVALID_VALUE: {detail}"),
    })?;
    let (m, n, k) = (g.m, g.n, g.k);
    if m == 0 || n == 0 || g.batch == 0 {
        return Ok(());
    }
    let (a_rows, a_cols) = if g.transa == Transpose::No {
        (m, k)
    } else {
        (k, m)
    };
    let (b_rows, b_cols) = if g.transb == Transpose::No {
        (k, n)
    } else {
        (n, k)
    };
    let a_span = span(a_rows, a_cols, g.lda);
    let b_span = span(b_rows, b_cols, g.ldb);
    let c_span = span(m, n, g.ldc);
    let (ab_size, c_size) = (operands.ab_size(), operands.c_size());
    let offset = |base: u64, stride: i64, i: i32, size: usize| -> Result<u64> {
        let off = stride
            .checked_mul(i as i64)
            .and_then(|o| o.checked_mul(size as i64))
            .ok_or_else(|| Error::Emulator {
                op: OP,
                detail: format!("batch stride {stride} overflows"),
            })?;
        Ok(base.wrapping_add(off as u64))
    };
    for i in 0..g.batch {
        if k > 0 {
            mem.check_range(
                OP,
                &format!("A of batch {i}"),
                offset(g.a, g.stride_a, i, ab_size)?,
                a_span * ab_size,
            )?;
            mem.check_range(
                OP,
                &format!("B of batch {i}"),
                offset(g.b, g.stride_b, i, ab_size)?,
                b_span * ab_size,
            )?;
        }
        mem.check_range(
            OP,
            &format!("C of batch {i}"),
            offset(g.c, g.stride_c, i, c_size)?,
            c_span * c_size,
        )?;
    }
    let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
    for i in 0..g.batch {
        let a = offset(g.a, g.stride_a, i, ab_size)?;
        let b = offset(g.b, g.stride_b, i, ab_size)?;
        let c = offset(g.c, g.stride_c, i, c_size)?;
        // SAFETY (for `load`): called only with indices inside the spans checked above.
        let load = |base: u64, idx: usize| -> f32 {
            if ab_size == 2 {
                // SAFETY: see above; bf16 elements are 2-byte aligned in their allocation.
                widen_bf16(unsafe { *(base as *const u16).add(idx) })
            } else {
                // SAFETY: see above.
                unsafe { *(base as *const f32).add(idx) }
            }
        };
        for col in 0..n as usize {
            for row in 0..m as usize {
                let mut acc = 0.0f64;
                for kk in 0..k as usize {
                    let ai = if g.transa == Transpose::No {
                        row + kk * lda
                    } else {
                        kk + row * lda
                    };
                    let bi = if g.transb == Transpose::No {
                        kk + col * ldb
                    } else {
                        col + kk * ldb
                    };
                    // ai < a_span and bi < b_span (row < m, col < n, kk < k), and both spans
                    // were checked to lie in live allocations above.
                    acc += load(a, ai) as f64 * load(b, bi) as f64;
                }
                let ci = row + col * ldc;
                // SAFETY: ci < c_span, checked to lie in a live allocation above; the launcher's
                // lock keeps every other user of device memory out meanwhile.
                unsafe {
                    if c_size == 2 {
                        let c = c as *mut u16;
                        let old = if g.beta == 0.0 {
                            0.0
                        } else {
                            widen_bf16(*c.add(ci)) as f64 * g.beta as f64
                        };
                        *c.add(ci) = narrow_bf16((g.alpha as f64 * acc + old) as f32);
                    } else {
                        let c = c as *mut f32;
                        let old = if g.beta == 0.0 {
                            0.0
                        } else {
                            *c.add(ci) as f64 * g.beta as f64
                        };
                        *c.add(ci) = (g.alpha as f64 * acc + old) as f32;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::round_to_bf16;

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        let ulp = 2f32.powi(-7); // bf16's spacing in [1, 2)
        assert_eq!(round_to_bf16(1.0), 1.0);
        // Ties go to the even significand.
        assert_eq!(round_to_bf16(1.0 + ulp / 2.0), 1.0);
        assert_eq!(round_to_bf16(1.0 + 1.5 * ulp), 1.0 + 2.0 * ulp);
        // Past the tie, up; below it, down; negative values mirror.
        assert_eq!(round_to_bf16(1.0 + ulp / 2.0 + 2f32.powi(-20)), 1.0 + ulp);
        assert_eq!(round_to_bf16(-(1.0 + ulp / 2.0 - 2f32.powi(-20))), -1.0);
        assert!(round_to_bf16(f32::NAN).is_nan());
        assert_eq!(round_to_bf16(f32::MAX), f32::INFINITY);
        assert_eq!(round_to_bf16(0.0), 0.0);
    }
}
