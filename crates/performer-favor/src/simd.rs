//! Small vector loops of the FAVOR+ kernels (feature activation, its gradient, row sums, dots),
//! each compiled for AVX-512 and for AVX2+FMA and chosen at run time (no
//! `-C target-cpu=native`). Reductions keep 16 partial sums or maxima so that the compiler can
//! vectorize them without reassociating floating-point math on its own.

/// Compiles `generic` three times (AVX-512F, AVX2+FMA, baseline) and dispatches at run time.
/// The body sees a const `FMA: bool`, true where fused multiply-adds are single instructions.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(unused)]
            fn generic<const FMA: bool>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { generic::<true>($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { generic::<true>($($arg),*) }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F (checked just above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic::<false>($($arg),*)
        }
    };
}

/// `a * b + c`, fused where `FMA` (a single instruction there; libm's software `fmaf` would
/// be slow elsewhere).
#[inline(always)]
fn fma<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const MAX_X: f32 = 88.722_83;
const MIN_X: f32 = -87.336_55;
/// Adding 1.5 * 2^23 rounds a float of magnitude < 2^22 to an integer held in the low
/// mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `e^x`, branch-free: performer-tensor's `fast_math::exp` (Cephes' expf: range reduction by
/// ln 2, a degree-6 polynomial, relative error about 1e-7) with fused multiply-adds.
#[inline(always)]
fn exp<const FMA: bool>(x_in: f32) -> f32 {
    let x = if x_in > MAX_X { MAX_X } else { x_in };
    let x = if x < MIN_X { MIN_X } else { x };
    let t = fma::<FMA>(x, LOG2E, ROUND_MAGIC);
    let k = t - ROUND_MAGIC;
    let ki = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let r = fma::<FMA>(-k, LN2_LO, fma::<FMA>(-k, LN2_HI, x));
    let r2 = r * r;
    let mut p = 1.987_569_1e-4f32;
    p = fma::<FMA>(p, r, 1.398_199_9e-3);
    p = fma::<FMA>(p, r, 8.333_452e-3);
    p = fma::<FMA>(p, r, 4.166_579_6e-2);
    p = fma::<FMA>(p, r, 1.666_666_5e-1);
    p = fma::<FMA>(p, r, 0.5);
    let y = fma::<FMA>(p, r2, r) + 1.0;
    // 2^k from exponent bits; 2^128 is not a float, so the top case takes 2^127 twice.
    let big = ki > 127;
    let ke = if big { ki - 1 } else { ki };
    let pow2 = f32::from_bits(((ke + 127) as u32) << 23);
    let y = y * pow2 * if big { 2.0 } else { 1.0 };
    let y = if x_in > MAX_X { f32::INFINITY } else { y };
    if x_in < MIN_X { 0.0 } else { y }
}

const LANES: usize = 16;

multiversion! {
    /// `x[i] = scale * e^(x[i] - shift[i]) + add` (one feature row of a transposed softmax
    /// feature block: one shift per position).
    pub(crate) fn exp_shifted(xs: &mut [f32], shift: &[f32], scale: f32, add: f32) {
        for (x, &s) in xs.iter_mut().zip(shift) {
            *x = fma::<FMA>(scale, exp::<FMA>(*x - s), add);
        }
    }
}

multiversion! {
    /// `acc[i] = max(acc[i], x[i])` (NaN in `x` propagates).
    pub(crate) fn max_into(acc: &mut [f32], xs: &[f32]) {
        for (a, &x) in acc.iter_mut().zip(xs) {
            *a = if x > *a || x.is_nan() { x } else { *a };
        }
    }
}

multiversion! {
    /// The largest element (NaN if any element is NaN; -inf for an empty slice).
    pub(crate) fn max_of(xs: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut chunks = xs.chunks_exact(LANES);
        for c in &mut chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a = if x > *a || x.is_nan() { x } else { *a };
            }
        }
        let mut m = f32::NEG_INFINITY;
        for &x in acc.iter().chain(chunks.remainder()) {
            m = if x > m || x.is_nan() { x } else { m };
        }
        m
    }
}

multiversion! {
    /// Sum of the elements.
    pub(crate) fn sum(xs: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let mut chunks = xs.chunks_exact(LANES);
        for c in &mut chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a += x;
            }
        }
        acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
    }
}

multiversion! {
    /// `x . y`.
    pub(crate) fn dot(xs: &[f32], ys: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let mut cx = xs.chunks_exact(LANES);
        let mut cy = ys.chunks_exact(LANES);
        for (a16, b16) in (&mut cx).zip(&mut cy) {
            for ((a, &x), &y) in acc.iter_mut().zip(a16).zip(b16) {
                *a = fma::<FMA>(x, y, *a);
            }
        }
        let tail: f32 = cx.remainder().iter().zip(cy.remainder()).map(|(x, y)| x * y).sum();
        acc.iter().sum::<f32>() + tail
    }
}

multiversion! {
    /// `y += a * x`.
    pub(crate) fn axpy(ys: &mut [f32], a: f32, xs: &[f32]) {
        for (y, &x) in ys.iter_mut().zip(xs) {
            *y = fma::<FMA>(a, x, *y);
        }
    }
}

multiversion! {
    /// `y += a` for every element.
    pub(crate) fn add_scalar(ys: &mut [f32], a: f32) {
        for y in ys.iter_mut() {
            *y += a;
        }
    }
}

multiversion! {
    /// One feature row of the softmax kernel's backward: `g[i] *= f[i] - floor` (the gradient
    /// of the exponent from that of the feature), accumulating `colsum[i] += g[i]`.
    pub(crate) fn softmax_grad_row(g: &mut [f32], f: &[f32], floor: f32, colsum: &mut [f32]) {
        for ((gi, &fi), c) in g.iter_mut().zip(f).zip(colsum.iter_mut()) {
            *gi *= fi - floor;
            *c += *gi;
        }
    }
}

multiversion! {
    /// One decoding step over a head's running sums, in one pass over them: for each feature
    /// `i`, `kv[i, :] = decay kv[i, :] + w[i] v` and `z[i] = decay z[i] + w[i]` (the new
    /// key, after rescaling the old sums by `decay`), then `acc += qf[i] kv[i, :]`. Returns
    /// `sum_i qf[i] z[i]`. `kv` is `(w.len(), v.len())` row-major.
    pub(crate) fn update_and_read(
        kv: &mut [f32],
        z: &mut [f32],
        w: &[f32],
        v: &[f32],
        qf: &[f32],
        decay: f32,
        acc: &mut [f32],
    ) -> f32 {
        let e = v.len();
        let mut qz = 0f32;
        for (((row, zi), &wi), &qi) in kv.chunks_exact_mut(e).zip(z.iter_mut()).zip(w).zip(qf) {
            for ((r, &vj), a) in row.iter_mut().zip(v).zip(acc.iter_mut()) {
                let updated = fma::<FMA>(wi, vj, decay * *r);
                *r = updated;
                *a = fma::<FMA>(qi, updated, *a);
            }
            *zi = fma::<FMA>(decay, *zi, wi);
            qz = fma::<FMA>(qi, *zi, qz);
        }
        qz
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 250.0 - 2.0)
            .collect()
    }

    #[test]
    fn reductions_match_scalar_loops() {
        for n in [0, 1, 15, 16, 17, 100, 1000] {
            let (x, y) = (data(n, 1), data(n, 7));
            let want_sum: f32 = x.iter().sum();
            let want_dot: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
            let want_max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert!((sum(&x) - want_sum).abs() <= 1e-4 * (1.0 + want_sum.abs()));
            assert!((dot(&x, &y) - want_dot).abs() <= 1e-4 * (1.0 + want_dot.abs()));
            assert_eq!(max_of(&x), want_max);
        }
        assert!(max_of(&[1.0, f32::NAN, 2.0]).is_nan());
    }

    #[test]
    fn exp_is_accurate_with_and_without_fma() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            for got in [exp::<true>(x), exp::<false>(x)] {
                worst = worst.max(((got as f64 - want) / want).abs());
            }
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!(exp::<true>(f32::NAN).is_nan());
        assert_eq!(exp::<true>(-1e4), 0.0);
        assert_eq!(exp::<true>(f32::INFINITY), f32::INFINITY);
        assert!(exp::<true>(88.72).is_finite());
    }

    #[test]
    fn elementwise_kernels_match_scalar_loops() {
        let n = 37;
        let (x, s) = (data(n, 3), data(n, 5));
        let mut e = x.clone();
        exp_shifted(&mut e, &s, 0.5, 0.01);
        for i in 0..n {
            let want = 0.5 * ((x[i] - s[i]) as f64).exp() as f32 + 0.01;
            assert!((e[i] - want).abs() <= 1e-6 * want.abs());
        }
        let mut acc = data(n, 9);
        let before = acc.clone();
        max_into(&mut acc, &x);
        for i in 0..n {
            assert_eq!(acc[i], before[i].max(x[i]));
        }
        let (mut g, f) = (data(n, 11), data(n, 13));
        let g0 = g.clone();
        let mut cs = vec![1.0f32; n];
        softmax_grad_row(&mut g, &f, 0.1, &mut cs);
        for i in 0..n {
            let want = g0[i] * (f[i] - 0.1);
            assert!((g[i] - want).abs() <= 1e-6 * (1.0 + want.abs()));
            assert!((cs[i] - 1.0 - want).abs() <= 1e-5 * (1.0 + want.abs()));
        }
    }
}
