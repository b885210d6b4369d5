//! Products against bfloat16 weights with the CPU's own bf16 dot products: AVX-512 BF16's
//! `vdpbf16ps`, which multiplies pairs of bf16 values and adds both products to an f32 sum.
//!
//! These are the *native* products of a bf16 model ([`Bf16Products::Native`]): the activation
//! operand of each product is rounded to bf16 (to nearest, ties to even) as it enters the
//! product, each product of two bf16 values is exact in f32, and the sums are f32. The
//! activations between products stay f32. They run at twice the multiply-adds per instruction
//! of f32 FMA, read half the bytes of f32 weights, and skip the widening copy that a bf16
//! weight needs before an f32 GEMM. The price is the activation's rounding: about 2^-9 of its
//! value, the same size as the rounding of the weights themselves.
//!
//! [`Bf16Products::Widened`] keeps the exact path instead (every weight widened to f32, f32
//! activations): a bf16 model then computes exactly what an f32 model with the same (rounded)
//! weights computes. That is also what runs on a CPU without AVX-512 BF16, whatever the mode.
//!
//! The weights are kept in the layout the instruction reads, [`Bf16Pairs`]: the `(k, n)`
//! matrix (a Linear weight's transpose, `(in, out)`) as `k / 2` rows of `n` pairs, each pair
//! the two values of consecutive rows `2p` and `2p + 1` of one column.

use std::cell::Cell;
use std::sync::OnceLock;

use half::bf16;
use ndarray::{ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

use crate::{Error, Result};

/// How a bf16 weight's products are computed (see the module's docs); a per-thread mode, as
/// [`crate::autocast`] is, carried to the worker by [`crate::team::on_pool`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Products {
    /// The CPU's bf16 dot products where it has them (AVX-512 BF16): activations rounded to
    /// bf16 at the product's input, f32 sums. Elsewhere the same as `Widened`. The default.
    Native,
    /// Every weight widened to f32 and multiplied by f32 activations: bit for bit what an f32
    /// model with the same weights computes.
    Widened,
}

thread_local! {
    static PRODUCTS: Cell<Bf16Products> = const { Cell::new(Bf16Products::Native) };
}

/// This thread's mode for the products of bf16 weights.
pub fn bf16_products() -> Bf16Products {
    PRODUCTS.with(|p| p.get())
}

/// Sets this thread's mode until it is set again, and returns the previous one (for a scope,
/// [`with_bf16_products`]; the Python package's `set_bf16_products` calls this).
pub fn set_bf16_products(mode: Bf16Products) -> Bf16Products {
    PRODUCTS.with(|p| p.replace(mode))
}

/// Runs `f` with this thread's bf16 products in `mode` (the previous mode comes back after,
/// also when `f` unwinds).
pub fn with_bf16_products<R>(mode: Bf16Products, f: impl FnOnce() -> R) -> R {
    struct Restore(Bf16Products);
    impl Drop for Restore {
        fn drop(&mut self) {
            set_bf16_products(self.0);
        }
    }
    let _restore = Restore(set_bf16_products(mode));
    f()
}

/// Whether this CPU has the bf16 dot product instruction (AVX-512F and AVX-512 BF16).
pub fn native_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether a bf16 weight's products on this thread take the native path: the mode is
/// [`Bf16Products::Native`] and the CPU has the instruction.
pub fn use_native() -> bool {
    bf16_products() == Bf16Products::Native && native_available()
}

/// Columns of one panel of the packed matrix: the product kernel's block width (two vectors of
/// 16 f32 sums). The last panel is padded with zero columns, so no load needs a mask.
const PACK_COLS: usize = 32;

/// A `(k, n)` bf16 matrix in the layout `vdpbf16ps` reads: 32-bit pairs, the pair at `(p, j)`
/// holding element `(2p, j)` in its low half and `(2p + 1, j)` in its high half, stored in
/// panels of 32 columns, each panel its `ceil(k / 2)` pair rows one after another (128 bytes
/// each). A kernel then reads a panel as one stream. (With whole pair rows one after another,
/// the rows a strip needs lie 1-4 KiB apart: one token through a 256 -> 1024 layer took
/// 7.2 us on one core, against 5.0-5.3 in panels; the prompt's products measured the same.)
/// An odd `k` gets a zero pair half at the end and the columns past `n` are zeros, so neither
/// changes a sum.
#[derive(Clone, Debug)]
pub struct Bf16Pairs {
    pairs: Vec<u32>,
    k: usize,
    n: usize,
    /// Pair rows: `ceil(k / 2)`.
    kp: usize,
}

impl Bf16Pairs {
    /// The transpose of `weight` `(n, k)` (a Linear weight, `(out, in)`), packed: the matrix
    /// the products multiply, `(in, out)`.
    pub fn from_weight(weight: &ArrayView2<bf16>) -> Self {
        let (n, k) = weight.dim();
        let kp = k.div_ceil(2);
        let mut packed = Bf16Pairs {
            pairs: vec![0u32; kp * n.div_ceil(PACK_COLS) * PACK_COLS],
            k,
            n,
            kp,
        };
        for (j, row) in weight.outer_iter().enumerate() {
            for (i, w) in row.iter().enumerate() {
                let at = packed.index(i / 2, j);
                packed.pairs[at] |= (w.to_bits() as u32) << (16 * (i % 2));
            }
        }
        packed
    }

    /// Where the pair at pair row `p`, column `j` is stored.
    fn index(&self, p: usize, j: usize) -> usize {
        (j / PACK_COLS) * self.kp * PACK_COLS + p * PACK_COLS + j % PACK_COLS
    }

    /// Rows of the matrix (the products' contracted size, a Linear's `in`).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of the matrix (a Linear's `out`).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Element `(i, j)` widened to f32.
    ///
    /// # Panics
    /// If `(i, j)` is outside the `(k, n)` matrix.
    pub fn get(&self, i: usize, j: usize) -> f32 {
        assert!(
            i < self.k && j < self.n,
            "Bf16Pairs::get: ({i}, {j}) of {:?}",
            (self.k, self.n)
        );
        let pair = self.pairs[self.index(i / 2, j)];
        bf16::from_bits((pair >> (16 * (i % 2))) as u16).to_f32()
    }
}

/// `x` rounded to bf16 the way `vcvtneps2bf16` rounds: to nearest, ties to even, NaN kept
/// (quiet), and a subnormal input taken as zero of its sign.
pub fn round_activation(x: f32) -> bf16 {
    if x.is_subnormal() {
        return bf16::from_bits(((x.to_bits() >> 16) & 0x8000) as u16);
    }
    bf16::from_f32(x)
}

/// `y += round(x) @ b` for `x` `(m, k)` f32 and `b` the packed `(k, n)` matrix, `y` `(m, n)`:
/// each activation rounded to bf16 ([`round_activation`]), products of bf16 values (exact in
/// f32) summed in f32. Rows are shared over rayon's threads. On a CPU without AVX-512 BF16 a
/// portable loop computes the same sums (in another order).
pub fn matmul_pairs_into(
    y: &mut ArrayViewMut2<f32>,
    x: &ArrayView2<f32>,
    b: &Bf16Pairs,
) -> Result<()> {
    let (m, k) = x.dim();
    if k != b.k || y.dim() != (m, b.n) {
        return Err(Error::shape(
            "matmul_pairs_into",
            format!(
                "x {:?} @ a bf16 ({}, {}) matrix into y {:?}",
                x.shape(),
                b.k,
                b.n,
                y.shape()
            ),
        ));
    }
    if m == 0 || b.n == 0 || k == 0 {
        return Ok(());
    }
    crate::profile::gemm(m, b.n, k, || {
        // Rows per task: whole kernel blocks, about one share per thread (at least one block).
        let threads = rayon::current_num_threads().max(1);
        let rows_per_task = m.div_ceil(threads).div_ceil(ROW_BLOCK).max(1) * ROW_BLOCK;
        y.axis_chunks_iter_mut(Axis(0), rows_per_task)
            .into_par_iter()
            .zip(x.axis_chunks_iter(Axis(0), rows_per_task).into_par_iter())
            .for_each(|(mut y, x)| rows_task(&mut y, &x, b));
    });
    Ok(())
}

/// Rows of x the product kernel takes at once.
const ROW_BLOCK: usize = 8;

/// One task's rows of [`matmul_pairs_into`].
fn rows_task(y: &mut ArrayViewMut2<f32>, x: &ArrayView2<f32>, b: &Bf16Pairs) {
    let (m, k) = x.dim();
    let kp = k.div_ceil(2);
    // The task's activations as bf16 pairs, row-major (m, kp): the kernel broadcasts them.
    let mut xp = vec![0u32; m * kp];
    for (row, out) in x.outer_iter().zip(xp.chunks_mut(kp)) {
        round_row_into_pairs(&row, out);
    }
    #[cfg(target_arch = "x86_64")]
    if native_available() {
        // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (checked just above); `xp` holds
        // `m * kp` pairs and the shapes of `y` and `b` were checked by the caller.
        unsafe { native::rows(y, &xp, kp, b) };
        return;
    }
    for (i, mut yrow) in y.outer_iter_mut().enumerate() {
        let xrow = &xp[i * kp..(i + 1) * kp];
        for (j, yv) in yrow.iter_mut().enumerate() {
            let mut sum = 0f32;
            for (p, &xpair) in xrow.iter().enumerate() {
                sum += pair_dot(xpair, b.pairs[b.index(p, j)]);
            }
            *yv += sum;
        }
    }
}

/// The two products of one pair of bf16 activations and one pair of bf16 weights, summed in
/// f32 (the portable form of one lane of `vdpbf16ps`).
fn pair_dot(x: u32, w: u32) -> f32 {
    let lo = |v: u32| f32::from_bits(v << 16);
    let hi = |v: u32| f32::from_bits(v & 0xffff_0000);
    lo(x) * lo(w) + hi(x) * hi(w)
}

/// One row of activations rounded to bf16 and packed into pairs (an odd length gets a zero
/// high half at the end).
fn round_row_into_pairs(row: &ndarray::ArrayView1<f32>, out: &mut [u32]) {
    match row.as_slice() {
        Some(values) => round_slice_into_pairs(values, out),
        None => {
            let values: Vec<f32> = row.iter().copied().collect();
            round_slice_into_pairs(&values, out)
        }
    }
}

fn round_slice_into_pairs(values: &[f32], out: &mut [u32]) {
    debug_assert_eq!(out.len(), values.len().div_ceil(2));
    #[cfg(target_arch = "x86_64")]
    if native_available() {
        // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (checked just above); `out` holds
        // `ceil(values.len() / 2)` pairs.
        unsafe { native::round_into_pairs(values, out) };
        return;
    }
    for (o, two) in out.iter_mut().zip(values.chunks(2)) {
        let lo = round_activation(two[0]).to_bits() as u32;
        let hi = two
            .get(1)
            .map_or(0, |&v| round_activation(v).to_bits() as u32);
        *o = lo | (hi << 16);
    }
}

/// `out[c] = sum_i round(x[i]) * b[r0 + i][c0 + c]`: the rows `r0..r0 + x.len()` of the packed
/// matrix times the activations `x`, over `out.len()` columns from `c0` (a decoding step's
/// matrix-vector product, or the share of it that a piece of the inputs contributes). Rounding
/// and sums as in [`matmul_pairs_into`].
///
/// # Panics
/// If the rows or columns run past the matrix.
pub fn gemv_pairs(b: &Bf16Pairs, r0: usize, c0: usize, x: &[f32], out: &mut [f32]) {
    assert!(
        r0 + x.len() <= b.k && c0 + out.len() <= b.n,
        "gemv_pairs: rows {r0}..{} and columns {c0}..{} of a ({}, {}) matrix",
        r0 + x.len(),
        c0 + out.len(),
        b.k,
        b.n
    );
    out.fill(0.0);
    let (mut r, mut x) = (r0, x);
    // A row that starts a pair's high half: alone (its pair partner is not in this piece).
    if r % 2 == 1 && !x.is_empty() {
        single_row(b, r, c0, x[0], out);
        r += 1;
        x = &x[1..];
    }
    let whole = x.len() / 2 * 2;
    if whole > 0 {
        PAIRS.with(|scratch| {
            let mut xp = scratch.borrow_mut();
            xp.clear();
            xp.resize(whole / 2, 0);
            round_slice_into_pairs(&x[..whole], &mut xp);
            pairs_times_rows(b, r / 2, &xp, c0, out);
        });
        r += whole;
    }
    // An odd row left at the end.
    if whole < x.len() {
        single_row(b, r, c0, x[whole], out);
    }
}

thread_local! {
    /// [`gemv_pairs`]' activations as bf16 pairs, reused from call to call (a decoding step
    /// makes one call per chunk of every layer).
    static PAIRS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `out[c] += sum_p xp[p] . b[p0 + p][c0 + c]`: the whole pairs of [`gemv_pairs`].
fn pairs_times_rows(b: &Bf16Pairs, p0: usize, xp: &[u32], c0: usize, out: &mut [f32]) {
    // The kernel reads whole vectors of 16 columns inside one panel: columns from a multiple
    // of 16 (every caller's chunks start on one).
    #[cfg(target_arch = "x86_64")]
    if native_available() && c0.is_multiple_of(16) {
        // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (checked just above); pair rows
        // `p0..p0 + xp.len()` and columns `c0..c0 + out.len()` are inside the matrix
        // (`gemv_pairs` asserted them), and `c0` is a multiple of 16.
        unsafe { native::gemv(b, p0, xp, c0, out) };
        return;
    }
    for (p, &xpair) in xp.iter().enumerate() {
        for (c, o) in out.iter_mut().enumerate() {
            *o += pair_dot(xpair, b.pairs[b.index(p0 + p, c0 + c)]);
        }
    }
}

/// `out[c] += round(a) * b[i][c0 + c]`: one row of the packed matrix.
fn single_row(b: &Bf16Pairs, i: usize, c0: usize, a: f32, out: &mut [f32]) {
    let a = round_activation(a).to_f32();
    let shift = 16 * (i % 2);
    for (c, o) in out.iter_mut().enumerate() {
        let w = b.pairs[b.index(i / 2, c0 + c)];
        *o += a * bf16::from_bits((w >> shift) as u16).to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
mod native {
    //! The AVX-512 BF16 kernels.

    use std::arch::x86_64::*;

    use ndarray::ArrayViewMut2;

    use super::{Bf16Pairs, PACK_COLS, ROW_BLOCK};

    /// Rounds `values` to bf16 pairs with `vcvtneps2bf16`, 16 at a time.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 BF16; `out.len() == ceil(values.len() / 2)`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn round_into_pairs(values: &[f32], out: &mut [u32]) {
        let mut chunks = values.chunks_exact(16);
        let mut o = 0;
        for c in &mut chunks {
            // SAFETY: `c` holds 16 floats; `out[o..o + 8]` is in bounds (16 values make 8
            // pairs, and `out` holds a pair for every two values).
            unsafe {
                let h = _mm512_cvtneps_pbh(_mm512_loadu_ps(c.as_ptr()));
                _mm256_storeu_si256(
                    out.as_mut_ptr().add(o) as *mut __m256i,
                    std::mem::transmute::<__m256bh, __m256i>(h),
                );
            }
            o += 8;
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut padded = [0f32; 16];
            padded[..rest.len()].copy_from_slice(rest);
            let mut pairs = [0u32; 8];
            // SAFETY: `padded` holds 16 floats and `pairs` 8 pairs.
            unsafe {
                let h = _mm512_cvtneps_pbh(_mm512_loadu_ps(padded.as_ptr()));
                _mm256_storeu_si256(
                    pairs.as_mut_ptr() as *mut __m256i,
                    std::mem::transmute::<__m256bh, __m256i>(h),
                );
            }
            let n = out.len() - o;
            out[o..].copy_from_slice(&pairs[..n]);
        }
    }

    /// `y += xp @ b` for a task's rows: blocks of [`ROW_BLOCK`] rows by 32 columns, the
    /// columns outermost so each block of the matrix stays in L2 while every row block passes.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 BF16; `xp` holds `y.nrows() * kp` pairs,
    /// `b` has `kp` pair rows and `y.ncols() == b.n`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn rows(y: &mut ArrayViewMut2<f32>, xp: &[u32], kp: usize, b: &Bf16Pairs) {
        let m = y.nrows();
        // Contiguous rows take the sums with vector adds; other layouts go through a buffer.
        let contiguous = y.ncols() <= 1 || y.strides()[1] == 1;
        let row_stride = y.strides()[0];
        for j in (0..b.n).step_by(PACK_COLS) {
            let cols = (b.n - j).min(PACK_COLS);
            let masks = [
                ((1u32 << cols.min(16)) - 1) as __mmask16,
                ((1u64 << cols.saturating_sub(16)) - 1) as __mmask16,
            ];
            let mut i = 0;
            while i < m {
                let rows = (m - i).min(ROW_BLOCK);
                let x = &xp[i * kp..(i + rows) * kp];
                // The panel of columns `j..j + 32`: `kp` pair rows of 32, one after another.
                let w = &b.pairs[b.index(0, j)..b.index(0, j) + kp * PACK_COLS];
                let mut sums = [[_mm512_setzero_ps(); 2]; ROW_BLOCK];
                // SAFETY: `x` holds `rows * kp` pairs and `w` the panel's `kp * 32`.
                unsafe {
                    match rows {
                        8 => block::<8>(x, kp, w, PACK_COLS, &mut sums),
                        7 => block::<7>(x, kp, w, PACK_COLS, &mut sums),
                        6 => block::<6>(x, kp, w, PACK_COLS, &mut sums),
                        5 => block::<5>(x, kp, w, PACK_COLS, &mut sums),
                        4 => block::<4>(x, kp, w, PACK_COLS, &mut sums),
                        3 => block::<3>(x, kp, w, PACK_COLS, &mut sums),
                        2 => block::<2>(x, kp, w, PACK_COLS, &mut sums),
                        _ => block::<1>(x, kp, w, PACK_COLS, &mut sums),
                    }
                }
                for (r, s) in sums.iter().take(rows).enumerate() {
                    if contiguous {
                        // SAFETY: row `i + r` of `y` holds `b.n` contiguous values from this
                        // pointer; the masks cover columns `j..j + cols` only.
                        unsafe {
                            let at = y.as_mut_ptr().offset((i + r) as isize * row_stride).add(j);
                            for (h, &mask) in masks.iter().enumerate() {
                                let p = at.add(16 * h);
                                let before = _mm512_maskz_loadu_ps(mask, p);
                                _mm512_mask_storeu_ps(p, mask, _mm512_add_ps(before, s[h]));
                            }
                        }
                    } else {
                        let mut buf = [0f32; PACK_COLS];
                        // SAFETY: `buf` holds 32 floats.
                        unsafe {
                            _mm512_storeu_ps(buf.as_mut_ptr(), s[0]);
                            _mm512_storeu_ps(buf.as_mut_ptr().add(16), s[1]);
                        }
                        let mut yrow = y.row_mut(i + r);
                        for (c, &v) in buf.iter().take(cols).enumerate() {
                            yrow[j + c] += v;
                        }
                    }
                }
                i += rows;
            }
        }
    }

    /// `R` rows of activation pairs times 32 columns of the matrix: 2R sums of 16 lanes held
    /// in registers over the whole contracted size.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 BF16; `x` holds `R * kp` pairs and `w` at
    /// least `(kp - 1) * stride + 32`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn block<const R: usize>(
        x: &[u32],
        kp: usize,
        w: &[u32],
        stride: usize,
        out: &mut [[__m512; 2]; ROW_BLOCK],
    ) {
        debug_assert!(x.len() >= R * kp && w.len() >= (kp - 1) * stride + 32);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let (x, w) = (x.as_ptr(), w.as_ptr());
        for p in 0..kp {
            // SAFETY: bounds as the function's contract states.
            unsafe {
                let w0: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(w.add(p * stride) as *const _));
                let w1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(w.add(p * stride + 16) as *const _));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*x.add(r * kp + p) as i32));
                    acc[0] = _mm512_dpbf16_ps(acc[0], a, w0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], a, w1);
                }
            }
        }
        out[..R].copy_from_slice(&acc);
    }

    /// Vectors of 16 columns in one strip of [`gemv`]: 128 columns, as `fast_math::gemv_t`'s.
    const STRIP: usize = 8;

    /// `out[c] += sum_p xp[p] . b[p0 + p][c0 + c]`: strips of 128 columns read pair row by
    /// pair row (each vector of 16 columns a stream through its panel), the pairs alternating
    /// between two sets of sums (sixteen chains in flight cover the instruction's latency); the
    /// last strip's loads and stores are masked.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 BF16; pair rows `p0..p0 + xp.len()` and columns
    /// `c0..c0 + out.len()` must be inside `b`, and `c0` a multiple of 16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn gemv(b: &Bf16Pairs, p0: usize, xp: &[u32], c0: usize, out: &mut [f32]) {
        debug_assert!(c0.is_multiple_of(16) && c0 + out.len() <= b.n && p0 + xp.len() <= b.kp);
        let mut c = 0;
        while c < out.len() {
            let left = out.len() - c;
            let masks: [__mmask16; STRIP] = std::array::from_fn(|g| {
                let valid = left.saturating_sub(16 * g).min(16);
                ((1u32 << valid) - 1) as __mmask16
            });
            // Each vector's first pair: row `p0` of its 16 columns, inside one panel because
            // the columns start on a multiple of 16. A vector past the columns keeps the
            // strip's first address and loads nothing (its mask is empty).
            let starts: [*const u32; STRIP] = std::array::from_fn(|g| {
                let col = if masks[g] == 0 {
                    c0 + c
                } else {
                    c0 + c + 16 * g
                };
                b.pairs[b.index(p0, col)..].as_ptr()
            });
            // SAFETY: forwarded from this function's contract: every vector reads `xp.len()`
            // pair rows of its panel from `starts[g]`, 32 pairs apart, only the columns its
            // mask lets through, all inside the matrix.
            let sums = unsafe { strip(&starts, xp, &masks) };
            for (g, (&mask, sum)) in masks.iter().zip(sums).enumerate() {
                // SAFETY: the mask covers only columns inside `out`.
                unsafe {
                    let at = out.as_mut_ptr().add(c + 16 * g);
                    let before = _mm512_maskz_loadu_ps(mask, at);
                    _mm512_mask_storeu_ps(at, mask, _mm512_add_ps(before, sum));
                }
            }
            c += 16 * STRIP;
        }
    }

    /// One strip of [`gemv`]: the sums of eight vectors of 16 columns (masked lanes are zero).
    /// (Whole strips loaded without masks measured the same: 8.3-8.5 us for 256 x 1024.)
    ///
    /// # Safety
    /// As for [`gemv`]: from each `starts[g]`, `xp.len()` pair rows 32 pairs apart hold the
    /// columns that `masks[g]` lets through.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn strip(
        starts: &[*const u32; STRIP],
        xp: &[u32],
        masks: &[__mmask16; STRIP],
    ) -> [__m512; STRIP] {
        let mut even = [_mm512_setzero_ps(); STRIP];
        let mut odd = [_mm512_setzero_ps(); STRIP];
        let load = |p: usize, g: usize| {
            // SAFETY: called with pair rows `p < xp.len()`, inside the panel from `starts[g]`;
            // the mask lets through only columns of the matrix. The transmute reinterprets 16
            // lanes of bf16 pairs as the instruction's operand type (same size, any bits).
            unsafe {
                let at = starts[g].wrapping_add(p * PACK_COLS);
                let w = _mm512_maskz_loadu_epi32(masks[g], at as *const i32);
                std::mem::transmute::<__m512i, __m512bh>(w)
            }
        };
        let broadcast = |p: usize| {
            // SAFETY: a same-size reinterpretation of 16 copies of one bf16 pair.
            unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(xp[p] as i32)) }
        };
        let mut p = 0;
        while p + 1 < xp.len() {
            let (a0, a1) = (broadcast(p), broadcast(p + 1));
            for (g, sum) in even.iter_mut().enumerate() {
                *sum = _mm512_dpbf16_ps(*sum, a0, load(p, g));
            }
            for (g, sum) in odd.iter_mut().enumerate() {
                *sum = _mm512_dpbf16_ps(*sum, a1, load(p + 1, g));
            }
            p += 2;
        }
        if p < xp.len() {
            let a = broadcast(p);
            for (g, sum) in even.iter_mut().enumerate() {
                *sum = _mm512_dpbf16_ps(*sum, a, load(p, g));
            }
        }
        std::array::from_fn(|g| _mm512_add_ps(even[g], odd[g]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// A `(rows, cols)` matrix of assorted values (signs, magnitudes over several octaves).
    fn values(rows: usize, cols: usize, seed: usize) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |(i, j)| {
            let v = ((i * 7919 + j * 104_729 + seed * 13) % 2003) as f32 / 1001.0 - 1.0;
            v * (1.0 + (j % 5) as f32)
        })
    }

    /// Checks `got` against the f64 sums of the bf16-rounded operands: each entry within the
    /// bound of an f32 sum of `k` terms (the products are exact), `k * 2^-24` of the sum of
    /// the terms' magnitudes, plus a little.
    fn assert_close_to_rounded_product(
        got: &Array2<f32>,
        x: &Array2<f32>,
        w: &Array2<bf16>,
        start: &Array2<f32>,
    ) {
        let (m, k) = x.dim();
        let n = w.nrows();
        assert_eq!(got.dim(), (m, n));
        for i in 0..m {
            for j in 0..n {
                let (mut sum, mut size) = (start[[i, j]] as f64, start[[i, j]].abs() as f64);
                for l in 0..k {
                    let t = round_activation(x[[i, l]]).to_f32() as f64 * w[[j, l]].to_f32() as f64;
                    sum += t;
                    size += t.abs();
                }
                let bound = (k as f64 + 2.0) * 2f64.powi(-24) * size + 1e-30;
                let g = got[[i, j]] as f64;
                assert!(
                    (g - sum).abs() <= bound,
                    "({i}, {j}) of {m}x{k}x{n}: {g} vs {sum} (bound {bound})"
                );
            }
        }
    }

    #[test]
    fn packed_pairs_hold_the_transpose_of_the_weight() {
        let w = values(37, 9, 1).mapv(bf16::from_f32);
        let b = Bf16Pairs::from_weight(&w.view());
        assert_eq!((b.k(), b.n()), (9, 37));
        for i in 0..9 {
            for j in 0..37 {
                assert_eq!(b.get(i, j), w[[j, i]].to_f32(), "({i}, {j})");
            }
        }
    }

    #[test]
    fn products_equal_the_sums_of_the_rounded_operands_on_any_shape() {
        // Odd and even k, n off the 32-column blocks, m off the 8-row blocks, one row.
        for (m, k, n) in [
            (1, 1, 1),
            (8, 16, 32),
            (13, 33, 47),
            (70, 256, 96),
            (3, 1031, 5),
        ] {
            let x = values(m, k, 2);
            let w = values(n, k, 3).mapv(bf16::from_f32);
            let b = Bf16Pairs::from_weight(&w.view());
            let start = values(m, n, 4);
            let mut y = start.clone();
            matmul_pairs_into(&mut y.view_mut(), &x.view(), &b).unwrap();
            assert_close_to_rounded_product(&y, &x, &w, &start);
            // A strided (transposed) input computes the same.
            let xt = x.t().as_standard_layout().into_owned();
            let mut y2 = start.clone();
            matmul_pairs_into(&mut y2.view_mut(), &xt.t(), &b).unwrap();
            assert_eq!(y2, y, "{m}x{k}x{n} from a transposed view");
        }
    }

    #[test]
    fn matrix_vector_products_equal_the_sums_on_any_rows_and_columns() {
        let (k, n) = (77, 150);
        let w = values(n, k, 5).mapv(bf16::from_f32);
        let b = Bf16Pairs::from_weight(&w.view());
        let x = values(1, k, 6);
        // Rows from even and odd starts, odd and even lengths; columns off every boundary.
        for (r0, r1) in [(0, k), (1, k), (0, 1), (5, 6), (2, 40), (3, 40), (76, 77)] {
            for (c0, c1) in [(0, n), (1, 150), (64, 129), (149, 150), (3, 3)] {
                let mut out = vec![f32::NAN; c1 - c0];
                gemv_pairs(&b, r0, c0, &x.as_slice().unwrap()[r0..r1], &mut out);
                let got = Array2::from_shape_vec((1, c1 - c0), out).unwrap();
                let xs = x.slice(ndarray::s![.., r0..r1]).to_owned();
                let ws = w.slice(ndarray::s![c0..c1, r0..r1]).to_owned();
                let zero = Array2::zeros((1, c1 - c0));
                assert_close_to_rounded_product(&got, &xs, &ws, &zero);
            }
        }
    }

    #[test]
    #[should_panic(expected = "gemv_pairs: rows")]
    fn matrix_vector_products_refuse_columns_past_the_matrix() {
        let b = Bf16Pairs::from_weight(&values(4, 2, 0).mapv(bf16::from_f32).view());
        gemv_pairs(&b, 0, 3, &[1.0, 1.0], &mut [0.0; 2]);
    }

    #[test]
    fn products_refuse_mismatched_shapes_by_name() {
        let b = Bf16Pairs::from_weight(&values(4, 3, 0).mapv(bf16::from_f32).view());
        let x = values(2, 5, 0);
        let mut y = Array2::zeros((2, 4));
        let err = matmul_pairs_into(&mut y.view_mut(), &x.view(), &b).unwrap_err();
        assert!(err.to_string().contains("matmul_pairs_into"), "{err}");
    }

    #[test]
    fn activations_round_to_nearest_even_and_subnormals_to_zero() {
        // 1 + 2^-8 is halfway between two bf16 values: ties to the even one, 1.
        assert_eq!(round_activation(1.0 + 2f32.powi(-8)).to_f32(), 1.0);
        assert_eq!(
            round_activation(1.0 + 3.0 * 2f32.powi(-8)).to_f32(),
            1.0 + 2f32.powi(-6)
        );
        assert_eq!(round_activation(-1e-40).to_bits(), 0x8000);
        assert!(round_activation(f32::NAN).is_nan());
        // The vector conversion rounds as the scalar one does, tail included.
        let xs: Vec<f32> = (0..37)
            .map(|i| 1.0 + i as f32 * 2f32.powi(-9) - 1e-40 * (i % 2) as f32)
            .collect();
        let mut pairs = vec![0u32; 19];
        round_slice_into_pairs(&xs, &mut pairs);
        for (i, &x) in xs.iter().enumerate() {
            let half = (pairs[i / 2] >> (16 * (i % 2))) as u16;
            assert_eq!(half, round_activation(x).to_bits(), "value {i}");
        }
        assert_eq!(pairs[18] >> 16, 0, "the odd tail's high half is zero");
    }

    #[test]
    fn the_mode_is_per_thread_and_comes_back() {
        assert_eq!(bf16_products(), Bf16Products::Native);
        with_bf16_products(Bf16Products::Widened, || {
            assert_eq!(bf16_products(), Bf16Products::Widened);
            assert!(!use_native());
            std::thread::spawn(|| assert_eq!(bf16_products(), Bf16Products::Native))
                .join()
                .unwrap();
        });
        assert_eq!(bf16_products(), Bf16Products::Native);
    }
}
