//! Small vector loops of the FAVOR+ kernels (feature activation, its gradient, row sums, dots),
//! each compiled for AVX-512 and for AVX2+FMA and chosen at run time (no
//! `-C target-cpu=native`). Reductions keep 16 partial sums or maxima so that the compiler can
//! vectorize them without reassociating floating-point math on its own.

use performer_tensor::fast_math::exp;

/// Compiles `generic` three times (AVX-512F, AVX2+FMA, baseline) and dispatches at run time.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
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

const LANES: usize = 16;

multiversion! {
    /// `x[i] = scale * e^(x[i] - shift[i]) + add` (one feature row of a transposed softmax
    /// feature block: one shift per position).
    pub(crate) fn exp_shifted(xs: &mut [f32], shift: &[f32], scale: f32, add: f32) {
        for (x, &s) in xs.iter_mut().zip(shift) {
            *x = scale * exp(*x - s) + add;
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
                *a += x * y;
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
            *y += a * x;
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
