//! Vectorized kernels for the hot loops: `exp` (FAVOR+ feature maps, softmax lanes), dot,
//! axpy and the matrix-vector product of token-by-token decoding.
//!
//! libm's `expf` costs 3-5 ns per element here; this polynomial (Cephes' expf: range
//! reduction by ln 2, a degree-6 polynomial, relative error about 1e-7) has no branches, so
//! the loops below vectorize. Each loop is compiled for AVX-512 and for AVX2+FMA and chosen at
//! run time, so the binary still runs on any x86-64 (no `-C target-cpu=native`). NaN stays NaN;
//! +inf gives +inf; inputs below -87.34 (where e^x is no longer a normal float) give 0.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const MAX_X: f32 = 88.722_83;
const MIN_X: f32 = -87.336_55;

/// Adding 1.5 * 2^23 rounds a float of magnitude < 2^22 to an integer held in the low
/// mantissa bits, readable with a bit cast (vectorizes, unlike a saturating `as i32`).
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `e^x`, branch-free for vectorization.
#[inline(always)]
pub fn exp(x_in: f32) -> f32 {
    // Comparisons instead of f32::max/min, which would turn NaN into the bound.
    // Inputs below MIN_X give 0 (selected at the end); their lanes compute e^0 meanwhile.
    // Clamping them to MIN_X instead made `y * pow2` a subnormal product (e^MIN_X is just
    // below the smallest normal float), and on Intel cores every vector multiply with a
    // subnormal result takes a microcode assist of ~100 cycles: softmax rows with masked
    // entries (-f32::MAX) spent most of their time there.
    let x = if x_in > MAX_X { MAX_X } else { x_in };
    let x = if x < MIN_X { 0.0 } else { x };
    let t = x * LOG2E + ROUND_MAGIC;
    let k = t - ROUND_MAGIC;
    let ki = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let r = x - k * LN2_HI - k * LN2_LO;
    let r2 = r * r;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r2 + r + 1.0;
    // 2^k from exponent bits; k is in [-126, 128] after clamping, and 2^128 is not a float, so
    // the top case takes 2^127 and one more factor of 2.
    let big = ki > 127;
    let ke = if big { ki - 1 } else { ki };
    let pow2 = f32::from_bits(((ke + 127) as u32) << 23);
    let y = y * pow2 * if big { 2.0 } else { 1.0 };
    let y = if x_in > MAX_X { f32::INFINITY } else { y };
    // Below the smallest normal result the true value is (nearly) 0.
    if x_in < MIN_X { 0.0 } else { y }
}

/// The error function, branch-free (Abramowitz & Stegun 7.1.26, evaluated in f32 with the
/// vectorizable [`exp`]): absolute error below 6e-7 (a few ulps of values near 1), so GELU's erf
/// form stays within float noise of PyTorch's while the loops that call it vectorize (libm's
/// `erff` is an opaque call).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    erf_with(x, exp(-a * a))
}

/// [`erf`] given `e^(-x^2)` (as `exp(-|x| |x|)`), for callers that need that factor too.
#[inline(always)]
fn erf_with(x: f32, exp_minus_square: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let y = 1.0 - poly * exp_minus_square;
    if x < 0.0 { -y } else { y }
}

macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F (checked just above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

/// For the fused kernels of other modules (the optimizers' update).
pub(crate) use multiversion;

multiversion! {
    /// `x = e^x` for every element.
    pub fn exp_inplace(xs: &mut [f32]) {
        for x in xs.iter_mut() {
            *x = exp(*x);
        }
    }
}

multiversion! {
    /// `x = scale * e^(x - shift) + add` for every element (one row of a FAVOR+ feature map).
    pub fn scaled_exp_inplace(xs: &mut [f32], shift: f32, scale: f32, add: f32) {
        for x in xs.iter_mut() {
            *x = scale * exp(*x - shift) + add;
        }
    }
}

multiversion! {
    /// Softmax of one contiguous lane in place (shifted by its max). A lane of -inf gives NaN
    /// as in PyTorch; a lane of -f32::MAX gives the uniform distribution.
    pub fn softmax_inplace(xs: &mut [f32]) {
        // Max and sum in LANES independent lanes, so that all three passes vectorize (a single
        // running max or sum is a dependency chain the compiler must keep in order).
        let mut lane_max = [f32::NEG_INFINITY; LANES];
        let mut chunks = xs.chunks_exact(LANES);
        for c in &mut chunks {
            for (m, &x) in lane_max.iter_mut().zip(c) {
                *m = if x > *m { x } else { *m };
            }
        }
        let mut m = f32::NEG_INFINITY;
        for &x in chunks.remainder().iter().chain(&lane_max) {
            m = if x > m { x } else { m };
        }
        for x in xs.iter_mut() {
            *x = exp(*x - m);
        }
        let mut lane_sum = [0f32; LANES];
        let mut chunks = xs.chunks_exact(LANES);
        for c in &mut chunks {
            for (s, &x) in lane_sum.iter_mut().zip(c) {
                *s += x;
            }
        }
        let s = lane_sum.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
        let inv = 1.0 / s;
        for x in xs.iter_mut() {
            *x *= inv;
        }
    }
}

/// Lanes of independent partial sums: floating-point addition is not associative, so the
/// compiler vectorizes a reduction only when it is written with separate accumulators.
const LANES: usize = 16;

multiversion! {
    /// `sum x_i y_i` over two slices of equal length.
    pub fn dot(x: &[f32], y: &[f32]) -> f32 {
        let n = x.len().min(y.len());
        let (x, y) = (&x[..n], &y[..n]);
        let mut acc = [0f32; LANES];
        let (xc, yc) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
        let (xr, yr) = (xc.remainder(), yc.remainder());
        for (a, b) in xc.zip(yc) {
            for l in 0..LANES {
                acc[l] += a[l] * b[l];
            }
        }
        let mut s: f32 = acc.iter().sum();
        for (a, b) in xr.iter().zip(yr) {
            s += a * b;
        }
        s
    }
}

multiversion! {
    /// `sum x_i^2` in f64 (each square taken in f64), in `LANES` independent partial sums:
    /// the squared norm of a gradient for clipping. A single running sum was a chain of
    /// dependent adds, about 1 ns an element.
    pub fn sum_of_squares(xs: &[f32]) -> f64 {
        let mut acc = [0f64; LANES];
        let chunks = xs.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for l in 0..LANES {
                let x = c[l] as f64;
                acc[l] += x * x;
            }
        }
        let mut s: f64 = acc.iter().sum();
        for &x in rest {
            s += (x as f64) * (x as f64);
        }
        s
    }
}

multiversion! {
    /// Whether every value is finite (no NaN, no infinity), without an early exit per value:
    /// `x * 0` is 0 for a finite `x` and NaN otherwise, summed in `LANES` lanes.
    pub fn all_finite(xs: &[f32]) -> bool {
        let mut acc = [0f32; LANES];
        let chunks = xs.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for l in 0..LANES {
                acc[l] += c[l] * 0.0;
            }
        }
        acc.iter().chain(rest).all(|x| x.is_finite())
    }
}

multiversion! {
    /// Mean and biased variance of `x`, `(sum x / n, sum (x - mean)^2 / n)`, in two passes of
    /// `LANES` independent partial sums (a single running sum is a chain of dependent
    /// additions that does not vectorize: it made layer norm's statistics cost more than the
    /// rest of it). 0 and NaN for an empty slice.
    pub fn mean_and_variance(x: &[f32]) -> (f32, f32) {
        let inv_n = 1.0 / x.len() as f32;
        let mut acc = [0f32; LANES];
        let chunks = x.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for l in 0..LANES {
                acc[l] += c[l];
            }
        }
        let mean = (acc.iter().sum::<f32>() + rest.iter().sum::<f32>()) * inv_n;
        let mut acc = [0f32; LANES];
        let chunks = x.chunks_exact(LANES);
        for c in chunks {
            for l in 0..LANES {
                let dev = c[l] - mean;
                acc[l] += dev * dev;
            }
        }
        let rest_sq: f32 = rest.iter().map(|&v| (v - mean) * (v - mean)).sum();
        (mean, (acc.iter().sum::<f32>() + rest_sq) * inv_n)
    }
}

multiversion! {
    /// The rotary map of one row: `dst[j] = src[j] cos[j] + src[j ^ 1] (sign sin[j])` for the
    /// pairs `(src[2i], src[2i + 1])`, with tables expanded to the row's width (`cos` repeats
    /// each frequency's cosine twice, `sin` holds `(-sin, sin)` per pair). `sign` -1 rotates
    /// back. Every value of `dst` is written (it may start uninitialized).
    ///
    /// # Panics
    /// If the four slices are not all of one even length.
    pub fn rotate_pairs(
        dst: &mut [std::mem::MaybeUninit<f32>],
        src: &[f32],
        cos: &[f32],
        sin: &[f32],
        sign: f32
    ) {
        let d = dst.len();
        assert!(
            d.is_multiple_of(2) && src.len() == d && cos.len() == d && sin.len() == d,
            "rotate_pairs: rows of {d}, {}, {}, {}",
            src.len(),
            cos.len(),
            sin.len()
        );
        for (((o, x), c), s) in dst
            .chunks_exact_mut(2)
            .zip(src.chunks_exact(2))
            .zip(cos.chunks_exact(2))
            .zip(sin.chunks_exact(2))
        {
            o[0].write(x[0] * c[0] + x[1] * (sign * s[0]));
            o[1].write(x[1] * c[1] + x[0] * (sign * s[1]));
        }
    }
}

multiversion! {
    /// `y += a x` over two slices of equal length.
    pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y += a * x;
        }
    }
}

/// GELU's erf form, `0.5 x (1 + erf(x / sqrt 2))`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// The derivative of [`gelu`]: `Phi(x) + x phi(x)`.
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    // erf's factor e^(-(x/sqrt 2)^2) is the density's e^(-x^2/2): one exp for both (the
    // backward's cost was two of them and erf's division).
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let e = exp(-a * a);
    let cdf = 0.5 * (1.0 + erf_with(z, e));
    cdf + x * FRAC_1_SQRT_2PI * e
}

multiversion! {
    /// `x = gelu(x)` for every element.
    pub fn gelu_inplace(xs: &mut [f32]) {
        for x in xs.iter_mut() {
            *x = gelu(*x);
        }
    }
}

multiversion! {
    /// `out = gelu(x)` element by element (`out` may be uninitialized; lengths must match).
    pub fn gelu_into(xs: &[f32], out: &mut [std::mem::MaybeUninit<f32>]) {
        for (o, &x) in out.iter_mut().zip(xs) {
            o.write(gelu(x));
        }
    }
}

multiversion! {
    /// `out = g * gelu'(x)` element by element: GELU's backward (`out` may be uninitialized).
    pub fn gelu_backward_into(gs: &[f32], xs: &[f32], out: &mut [std::mem::MaybeUninit<f32>]) {
        for ((o, &g), &x) in out.iter_mut().zip(gs).zip(xs) {
            o.write(g * gelu_grad(x));
        }
    }
}

/// Rows of the weight matrix one [`gemv_rows`] pass reads together: each value of `x` loaded
/// from memory is used this many times, and the loop keeps as many accumulators in flight.
const GEMV_ROWS: usize = 4;

/// `sum_c rows[r * k + c] * x[c]` for `GEMV_ROWS` consecutive rows of length `k`.
///
/// The rows are walked as fixed-size chunks zipped with `x`'s, so the loop carries no index
/// arithmetic or bounds checks (indexing each row at `r * k + c` did, and ran at about half
/// the speed the cores can read the weights from L3).
#[inline(always)]
fn dot_rows(rows: &[f32], k: usize, x: &[f32]) -> [f32; GEMV_ROWS] {
    let (x, rows) = (&x[..k], &rows[..GEMV_ROWS * k]);
    let (r0, rest) = rows.split_at(k);
    let (r1, rest) = rest.split_at(k);
    let (r2, r3) = rest.split_at(k);
    let mut acc = [[0f32; LANES]; GEMV_ROWS];
    let chunks = x
        .chunks_exact(LANES)
        .zip(r0.chunks_exact(LANES))
        .zip(r1.chunks_exact(LANES))
        .zip(r2.chunks_exact(LANES))
        .zip(r3.chunks_exact(LANES));
    for ((((xc, c0), c1), c2), c3) in chunks {
        let lanes = |c: &[f32]| -> [f32; LANES] { c.try_into().expect("LANES values") };
        let (xv, v0, v1, v2, v3) = (lanes(xc), lanes(c0), lanes(c1), lanes(c2), lanes(c3));
        for l in 0..LANES {
            acc[0][l] += v0[l] * xv[l];
            acc[1][l] += v1[l] * xv[l];
            acc[2][l] += v2[l] * xv[l];
            acc[3][l] += v3[l] * xv[l];
        }
    }
    let full = k - k % LANES;
    let mut out = [0f32; GEMV_ROWS];
    for ((o, mut a), row) in out.iter_mut().zip(acc).zip([r0, r1, r2, r3]) {
        // A pairwise tree: the lanes are summed in log2(LANES) vector steps.
        let mut width = LANES / 2;
        while width > 0 {
            for l in 0..width {
                a[l] += a[l + width];
            }
            width /= 2;
        }
        let tail = row[full..].iter().zip(&x[full..]);
        *o = tail.fold(a[0], |s, (p, q)| s + p * q);
    }
    out
}

/// `out[r] = sum_c w[r * k + c] * x[c]` with `k = x.len()` and `out.len()` rows of `w`
/// (row-major, PyTorch's `(out, in)` layout of a Linear weight): the matrix-vector product of
/// one token, [`gemv_rows_many`] of a single vector. It is bound by reading `w`, so rows are
/// taken `GEMV_ROWS` at a time against one load of `x`.
///
/// # Panics
/// If `w` holds fewer than `out.len() * x.len()` values.
pub fn gemv_rows(w: &[f32], x: &[f32], out: &mut [f32]) {
    if x.is_empty() {
        out.fill(0.0);
    } else {
        gemv_rows_many(w, x.len(), x, out);
    }
}

multiversion! {
    /// [`gemv_rows`] of several vectors against the same rows: `xs` holds vectors of `k`
    /// values back to back and `out` their results, `out.len() / (xs.len() / k)` apiece in the
    /// same order. Each block of rows of `w` is read once for all the vectors (it stays in L1
    /// while they take turns), so `w` streams from memory once, not once per vector.
    ///
    /// # Panics
    /// If `k` is 0, `xs.len()` is not a multiple of `k`, `out.len()` not a multiple of the
    /// vector count, or `w` holds fewer than `rows * k` values.
    pub fn gemv_rows_many(w: &[f32], k: usize, xs: &[f32], out: &mut [f32]) {
        assert!(k > 0 && xs.len().is_multiple_of(k), "gemv_rows_many: vectors of {k}");
        let vectors = xs.len() / k;
        if vectors == 0 {
            return;
        }
        assert!(out.len().is_multiple_of(vectors), "gemv_rows_many: uneven outputs");
        let rows = out.len() / vectors;
        assert!(w.len() >= rows * k, "gemv_rows_many: weight too small");
        let blocked = rows - rows % GEMV_ROWS;
        for r0 in (0..blocked).step_by(GEMV_ROWS) {
            let block = &w[r0 * k..(r0 + GEMV_ROWS) * k];
            for (x, o) in xs.chunks_exact(k).zip(out.chunks_exact_mut(rows)) {
                o[r0..r0 + GEMV_ROWS].copy_from_slice(&dot_rows(block, k, x));
            }
        }
        for r in blocked..rows {
            for (x, o) in xs.chunks_exact(k).zip(out.chunks_exact_mut(rows)) {
                o[r] = dot(&w[r * k..(r + 1) * k], x);
            }
        }
    }
}

/// Columns of a transposed weight that one [`gemv_t`] pass accumulates together: eight
/// vectors, so that each row of the strip is 512 contiguous bytes (strips of 64 columns read
/// 20% slower, their rows too short for the prefetchers).
pub const GEMV_T_COLS: usize = 8 * LANES;

/// A weight type the matrix-vector products read: f32, or bfloat16 widened to f32 as it is
/// loaded (exact: a shift of its bits), so that activations and sums stay f32 either way.
trait GemvWeight: Copy {
    fn widen(self) -> f32;
}

impl GemvWeight for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl GemvWeight for half::bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// `sum_i x[i] * wt[i * n + c0 + l]` for the `C` columns `l` from `c0`, two rows at a time into
/// two accumulators (consecutive additions then do not wait on each other), summed at the end.
#[inline(always)]
fn gemv_t_strip<W: GemvWeight, const C: usize>(
    wt: &[W],
    n: usize,
    c0: usize,
    x: &[f32],
    out: &mut [f32],
) {
    let mut acc = [[0f32; C]; 2];
    let row =
        |i: usize| -> &[W; C] { wt[i * n + c0..i * n + c0 + C].try_into().expect("C values") };
    for p in 0..x.len() / 2 {
        let (i0, i1) = (2 * p, 2 * p + 1);
        let (a0, a1, r0, r1) = (x[i0], x[i1], row(i0), row(i1));
        for l in 0..C {
            acc[0][l] += a0 * r0[l].widen();
            acc[1][l] += a1 * r1[l].widen();
        }
    }
    if x.len() % 2 == 1 {
        let i = x.len() - 1;
        let (a, r) = (x[i], row(i));
        for l in 0..C {
            acc[0][l] += a * r[l].widen();
        }
    }
    for (l, o) in out[..C].iter_mut().enumerate() {
        *o = acc[0][l] + acc[1][l];
    }
}

/// The body of [`gemv_t`] and [`gemv_t_bf16`] (inlined into each one's target-feature builds).
#[inline(always)]
fn gemv_t_columns<W: GemvWeight>(
    name: &str,
    wt: &[W],
    n: usize,
    j0: usize,
    x: &[f32],
    out: &mut [f32],
) {
    let k = x.len();
    assert!(
        j0 + out.len() <= n,
        "{name}: columns {j0}..{} of {n}",
        j0 + out.len()
    );
    assert!(
        wt.len() >= k * n,
        "{name}: {} weights for {k} x {n}",
        wt.len()
    );
    let mut done = 0;
    while out.len() - done >= GEMV_T_COLS {
        gemv_t_strip::<W, GEMV_T_COLS>(wt, n, j0 + done, x, &mut out[done..]);
        done += GEMV_T_COLS;
    }
    while out.len() - done >= LANES {
        gemv_t_strip::<W, LANES>(wt, n, j0 + done, x, &mut out[done..]);
        done += LANES;
    }
    let tail = &mut out[done..];
    tail.fill(0.0);
    let c0 = j0 + done;
    for (i, &a) in x.iter().enumerate() {
        let row = &wt[i * n + c0..i * n + c0 + tail.len()];
        for (o, &w) in tail.iter_mut().zip(row) {
            *o += a * w.widen();
        }
    }
}

multiversion! {
    /// `out[j] = sum_i x[i] * wt[i * n + j0 + j]` for `out.len()` consecutive columns from
    /// `j0` of the row-major `(k, n)` matrix `wt`, `k = x.len()`: one token times a Linear
    /// weight stored transposed, `(in, out)`, the copy the prompt's GEMMs read
    /// (`Param::transposed`). Decoding steps on that copy read the weights the prompt's pass
    /// just read, instead of a second copy of every weight that the pass pushed out of the
    /// caches. Columns go [`GEMV_T_COLS`] at a time (a strip read row by row), then in
    /// narrower strips; each weight is loaded once and `x` is read from L1.
    ///
    /// # Panics
    /// If `j0 + out.len() > n` or `wt` holds fewer than `k * n` values.
    pub fn gemv_t(wt: &[f32], n: usize, j0: usize, x: &[f32], out: &mut [f32]) {
        gemv_t_columns("gemv_t", wt, n, j0, x, out)
    }
}

multiversion! {
    /// [`gemv_t`] on a bfloat16 `(k, n)` matrix: `out[j] = sum_i x[i] * wt[i * n + j0 + j]`,
    /// every weight widened to f32 as it is loaded and every product and sum in f32, in the
    /// same order as [`gemv_t`] (so the result equals `gemv_t` on the widened weights, bit for
    /// bit). Half the bytes of `gemv_t` to read, which is what bounds a decoding step.
    ///
    /// # Panics
    /// If `j0 + out.len() > n` or `wt` holds fewer than `k * n` values.
    pub fn gemv_t_bf16(wt: &[half::bf16], n: usize, j0: usize, x: &[f32], out: &mut [f32]) {
        gemv_t_columns("gemv_t_bf16", wt, n, j0, x, out)
    }
}

/// Columns of one [`gemv_t_pair`] strip: four vectors for each of the two inputs, two
/// accumulators each (16 registers of sums, as [`GEMV_T_COLS`] takes for one input).
const GEMV_T_PAIR_COLS: usize = 4 * LANES;

/// [`gemv_t_strip`] for two inputs `xa`, `xb` of one length against the same `C` columns:
/// each weight is loaded once for both, and each output takes the additions of
/// `gemv_t_strip`'s in the same order (so it equals a `gemv_t` of its input, bit for bit).
#[inline(always)]
fn gemv_t_pair_strip<const C: usize>(
    wt: &[f32],
    n: usize,
    c0: usize,
    (xa, xb): (&[f32], &[f32]),
    (oa, ob): (&mut [f32], &mut [f32]),
) {
    let mut acc = [[[0f32; C]; 2]; 2];
    let row =
        |i: usize| -> &[f32; C] { wt[i * n + c0..i * n + c0 + C].try_into().expect("C values") };
    for p in 0..xa.len() / 2 {
        let (i0, i1) = (2 * p, 2 * p + 1);
        let (r0, r1) = (row(i0), row(i1));
        for (acc, x) in acc.iter_mut().zip([xa, xb]) {
            let (a0, a1) = (x[i0], x[i1]);
            for l in 0..C {
                acc[0][l] += a0 * r0[l];
                acc[1][l] += a1 * r1[l];
            }
        }
    }
    if xa.len() % 2 == 1 {
        let i = xa.len() - 1;
        let r = row(i);
        for (acc, x) in acc.iter_mut().zip([xa, xb]) {
            for l in 0..C {
                acc[0][l] += x[i] * r[l];
            }
        }
    }
    for (acc, out) in acc.iter().zip([oa, ob]) {
        for (l, o) in out[..C].iter_mut().enumerate() {
            *o = acc[0][l] + acc[1][l];
        }
    }
}

multiversion! {
    /// [`gemv_t`] of two inputs against the same columns, `out_a = xa W[.., j0..]` and
    /// `out_b = xb W[.., j0..]`, with one pass over the weights instead of two: a decoding
    /// step's key and query against the same FAVOR+ projection, where reading the projection
    /// is what the two products cost. Each output equals `gemv_t` of its input, bit for bit.
    ///
    /// # Panics
    /// If the inputs or the outputs differ in length, `j0 + out_a.len() > n`, or `wt` holds
    /// fewer than `k * n` values.
    pub fn gemv_t_pair(
        wt: &[f32],
        n: usize,
        j0: usize,
        xs: (&[f32], &[f32]),
        outs: (&mut [f32], &mut [f32])
    ) {
        let ((xa, xb), (oa, ob)) = (xs, outs);
        assert!(
            xa.len() == xb.len() && oa.len() == ob.len(),
            "gemv_t_pair: inputs of {} and {} values, outputs of {} and {}",
            xa.len(),
            xb.len(),
            oa.len(),
            ob.len()
        );
        let (k, cols) = (xa.len(), oa.len());
        assert!(j0 + cols <= n, "gemv_t_pair: columns {j0}..{} of {n}", j0 + cols);
        assert!(wt.len() >= k * n, "gemv_t_pair: {} weights for {k} x {n}", wt.len());
        let mut done = 0;
        while cols - done >= GEMV_T_PAIR_COLS {
            gemv_t_pair_strip::<GEMV_T_PAIR_COLS>(
                wt,
                n,
                j0 + done,
                (xa, xb),
                (&mut oa[done..], &mut ob[done..]),
            );
            done += GEMV_T_PAIR_COLS;
        }
        // Narrower tails as two single passes (the same sums as gemv_t's).
        gemv_t_columns("gemv_t_pair", wt, n, j0 + done, xa, &mut oa[done..]);
        gemv_t_columns("gemv_t_pair", wt, n, j0 + done, xb, &mut ob[done..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_of_squares_equals_the_running_sum_on_any_length() {
        for n in [0usize, 1, 15, 16, 17, 100, 1001] {
            let xs: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37)
                .collect();
            let want: f64 = xs.iter().map(|&x| (x as f64) * (x as f64)).sum();
            let got = sum_of_squares(&xs);
            assert!(
                (got - want).abs() <= 1e-12 * want.max(1.0),
                "n {n}: {got} against {want}"
            );
        }
        // Integers: exact in any order.
        assert_eq!(sum_of_squares(&[3.0; 33]), 297.0);
    }

    #[test]
    fn all_finite_finds_a_nan_or_an_infinity_anywhere() {
        let xs = vec![1.5f32; 37];
        assert!(all_finite(&xs));
        assert!(all_finite(&[]));
        assert!(all_finite(&[f32::MAX, -f32::MAX, f32::MIN_POSITIVE, -0.0]));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            // In a full chunk of lanes and in the remainder past the last one.
            for at in [0, 5, 15, 16, 31, 32, 36] {
                let mut ys = xs.clone();
                ys[at] = bad;
                assert!(!all_finite(&ys), "{bad} at {at}");
            }
        }
    }

    #[test]
    fn exp_is_accurate_over_the_useful_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    #[test]
    fn exp_edge_values() {
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1e4), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(88.72).is_finite());
        // Below MIN_X (masked softmax entries are -f32::MAX) the result is exactly 0, in the
        // vectorized loops too.
        assert_eq!(exp(-f32::MAX), 0.0);
        assert_eq!(exp(MIN_X - 1e-3), 0.0);
        let mut lanes = [-f32::MAX, -1e30, -87.4, f32::NEG_INFINITY].repeat(9);
        exp_inplace(&mut lanes);
        assert!(lanes.iter().all(|&y| y == 0.0), "{lanes:?}");
    }

    #[test]
    fn gemv_t_matches_dot_products_on_any_column_range() {
        // k odd and even; full strips, 16-lane strips and a scalar tail; ranges starting off
        // the strip grid.
        for (k, n) in [(1usize, 5usize), (7, 128), (256, 300), (33, 150)] {
            let wt: Vec<f32> = (0..k * n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let x: Vec<f32> = (0..k)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
                .collect();
            for (j0, j1) in [(0, n), (1, n), (n / 3, n / 3 + n / 2)] {
                let mut out = vec![f32::NAN; j1 - j0];
                gemv_t(&wt, n, j0, &x, &mut out);
                for (j, &got) in (j0..j1).zip(&out) {
                    let want: f64 = (0..k).map(|i| x[i] as f64 * wt[i * n + j] as f64).sum();
                    assert!(
                        (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "k {k} n {n} column {j}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn gemv_t_pair_equals_two_gemv_t_bit_for_bit() {
        // k odd and even; whole pair strips, then 16-lane strips and a scalar tail; ranges
        // starting off the strip grid.
        for (k, n) in [(1usize, 5usize), (7, 64), (64, 256), (33, 150), (2, 200)] {
            let wt: Vec<f32> = (0..k * n).map(|i| ((i as f32) * 0.731).sin()).collect();
            let xa: Vec<f32> = (0..k).map(|i| ((i as f32) * 1.37).cos()).collect();
            let xb: Vec<f32> = (0..k).map(|i| ((i as f32) * 0.53 + 0.2).sin()).collect();
            for (j0, cols) in [(0, n), (1, n - 1), (n / 3, n / 2), (n - 1, 1), (2, 0)] {
                let (mut wa, mut wb) = (vec![f32::NAN; cols], vec![f32::NAN; cols]);
                gemv_t(&wt, n, j0, &xa, &mut wa);
                gemv_t(&wt, n, j0, &xb, &mut wb);
                let (mut ga, mut gb) = (vec![f32::NAN; cols], vec![f32::NAN; cols]);
                gemv_t_pair(&wt, n, j0, (&xa, &xb), (&mut ga, &mut gb));
                for (got, want) in [(&ga, &wa), (&gb, &wb)] {
                    assert_eq!(got.len(), want.len());
                    for (c, (g, w)) in got.iter().zip(want.iter()).enumerate() {
                        assert_eq!(g.to_bits(), w.to_bits(), "k {k} n {n} column {}", j0 + c);
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "gemv_t_pair: inputs of 2 and 3 values")]
    fn gemv_t_pair_refuses_inputs_of_two_lengths() {
        gemv_t_pair(
            &[0.0; 12],
            4,
            0,
            (&[1.0; 2], &[1.0; 3]),
            (&mut [0.0; 4], &mut [0.0; 4]),
        );
    }

    #[test]
    fn gemv_t_bf16_equals_gemv_t_on_the_widened_weights() {
        let (k, n) = (37, 300);
        let wt16: Vec<half::bf16> = (0..k * n)
            .map(|i| half::bf16::from_f32(((i * 7919) % 1000) as f32 / 250.0 - 2.0))
            .collect();
        let wide: Vec<f32> = wt16.iter().map(|w| w.to_f32()).collect();
        let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
        // Whole strips, narrow strips and a scalar tail, from several first columns.
        for (j0, cols) in [(0, n), (5, 150), (128, 17), (299, 1), (7, 0)] {
            let mut want = vec![f32::NAN; cols];
            let mut got = vec![f32::NAN; cols];
            gemv_t(&wide, n, j0, &x, &mut want);
            gemv_t_bf16(&wt16, n, j0, &x, &mut got);
            assert_eq!(got.len(), want.len());
            for (c, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "column {} from {j0}", j0 + c);
            }
        }
    }

    #[test]
    #[should_panic(expected = "gemv_t_bf16: columns")]
    fn gemv_t_bf16_refuses_columns_past_the_matrix() {
        gemv_t_bf16(&[half::bf16::ZERO; 8], 4, 3, &[1.0, 1.0], &mut [0.0; 2]);
    }

    #[test]
    #[should_panic(expected = "gemv_t: columns")]
    fn gemv_t_refuses_columns_past_the_matrix() {
        gemv_t(&[0.0; 8], 4, 3, &[1.0, 1.0], &mut [0.0; 2]);
    }

    #[test]
    fn gemv_rows_matches_dot_products() {
        // Row counts around the block of 4 and lengths around the 16 lanes.
        for (rows, k) in [(1, 1), (3, 17), (4, 16), (9, 64), (13, 100)] {
            let w: Vec<f32> = (0..rows * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
            let x: Vec<f32> = (0..k).map(|i| 0.5 - (i % 5) as f32 * 0.25).collect();
            let mut out = vec![f32::NAN; rows];
            gemv_rows(&w, &x, &mut out);
            for r in 0..rows {
                let want: f32 = (0..k).map(|c| w[r * k + c] * x[c]).sum();
                assert!(
                    (out[r] - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{rows}x{k} row {r}"
                );
            }
        }
    }

    #[test]
    fn gemv_rows_many_matches_dot_products_per_vector() {
        for (rows, k, vectors) in [(9, 64, 8), (4, 16, 1), (13, 5, 3)] {
            let w: Vec<f32> = (0..rows * k).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
            let xs: Vec<f32> = (0..vectors * k)
                .map(|i| 0.25 * (i % 7) as f32 - 0.5)
                .collect();
            let mut out = vec![f32::NAN; rows * vectors];
            gemv_rows_many(&w, k, &xs, &mut out);
            for (v, (x, o)) in xs.chunks(k).zip(out.chunks(rows)).enumerate() {
                for r in 0..rows {
                    let want: f32 = (0..k).map(|c| w[r * k + c] * x[c]).sum();
                    assert!(
                        (o[r] - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "{rows}x{k}, vector {v} row {r}"
                    );
                }
            }
        }
        // An empty input gives zeros, as a product over nothing.
        let mut out = [f32::NAN; 3];
        gemv_rows(&[], &[], &mut out);
        assert_eq!(out, [0.0; 3]);
    }

    #[test]
    fn mean_and_variance_match_f64() {
        for n in [1usize, 15, 16, 17, 256, 1000] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0 + 3.0)
                .collect();
            let (m, v) = mean_and_variance(&x);
            let mean = x.iter().map(|&a| a as f64).sum::<f64>() / n as f64;
            let var = x.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            assert!(
                (m as f64 - mean).abs() <= 1e-5 * (1.0 + mean.abs()),
                "n {n}: mean {m} vs {mean}"
            );
            assert!(
                (v as f64 - var).abs() <= 1e-5 * (1.0 + var),
                "n {n}: variance {v} vs {var}"
            );
        }
        let (m, v) = mean_and_variance(&[]);
        assert!(m.is_nan() && v.is_nan());
    }

    #[test]
    fn dot_and_axpy() {
        let x: Vec<f32> = (0..37).map(|i| i as f32 * 0.5).collect();
        let y: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.25).collect();
        let want: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert!((dot(&x, &y) - want).abs() < 1e-3);
        let mut z = y.clone();
        axpy(&mut z, 2.0, &x);
        for i in 0..37 {
            assert_eq!(z[i], y[i] + 2.0 * x[i]);
        }
    }

    #[test]
    fn erf_is_accurate() {
        let mut x = -6.0f32;
        while x < 6.0 {
            // `<` fails on NaN too (a running max would skip it).
            let error = (erf(x) as f64 - libm::erf(x as f64)).abs();
            assert!(
                error < 6e-7,
                "x {x}: erf {} against {}",
                erf(x),
                libm::erf(x as f64)
            );
            x += 0.001;
        }
        assert!(erf(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_grad_is_accurate() {
        // Phi(x) + x phi(x) in f64, against the scalar form and the vector kernel.
        let xs: Vec<f32> = (0..12_000).map(|i| -6.0 + i as f32 * 0.001).collect();
        let gs: Vec<f32> = xs.iter().map(|&x| 0.5 + (x * 7.0).sin()).collect();
        let mut out = vec![std::mem::MaybeUninit::<f32>::uninit(); xs.len()];
        gelu_backward_into(&gs, &xs, &mut out);
        for ((&x, &g), o) in xs.iter().zip(&gs).zip(&out) {
            let x64 = x as f64;
            let want = 0.5 * (1.0 + libm::erf(x64 / std::f64::consts::SQRT_2))
                + x64 * (-0.5 * x64 * x64).exp() / (2.0 * std::f64::consts::PI).sqrt();
            // `<=` fails on NaN too.
            let error = (gelu_grad(x) as f64 - want).abs();
            assert!(
                error <= 1e-6,
                "x {x}: gelu_grad {} against {want}",
                gelu_grad(x)
            );
            // SAFETY: gelu_backward_into wrote every element.
            let vector = unsafe { o.assume_init() };
            assert_eq!(vector.to_bits(), (g * gelu_grad(x)).to_bits(), "x {x}");
        }
        assert!(gelu_grad(f32::NAN).is_nan());
    }

    #[test]
    fn vector_kernels_match_the_scalar() {
        let mut xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.05).collect();
        let want: Vec<f32> = xs.iter().map(|&x| 2.0 * exp(x - 1.5) + 0.1).collect();
        scaled_exp_inplace(&mut xs, 1.5, 2.0, 0.1);
        for (a, b) in xs.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6 * b.abs());
        }
        // GELU against its f64 value 0.5 x (1 + erf(x / sqrt 2)).
        let mut xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.013).collect();
        let want: Vec<f64> = xs
            .iter()
            .map(|&x| 0.5 * x as f64 * (1.0 + libm::erf(x as f64 / std::f64::consts::SQRT_2)))
            .collect();
        gelu_inplace(&mut xs);
        for (a, b) in xs.iter().zip(&want) {
            assert!(
                (*a as f64 - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{a} vs {b}"
            );
        }
        let mut lane = vec![1.0f32, 2.0, 3.0, -f32::MAX];
        softmax_inplace(&mut lane);
        let s: f32 = lane.iter().sum();
        assert!((s - 1.0).abs() < 1e-6 && lane[3] == 0.0);
    }
}
