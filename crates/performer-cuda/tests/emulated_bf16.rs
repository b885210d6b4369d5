//! bf16 storage on the device (autocast's activations): the conversion kernels against
//! hand-computed bits (ties to even, NaN, infinities, values past bf16's largest finite,
//! subnormals), bf16 uploads and downloads, and the GEMM on bf16 buffers (every transpose, C in
//! f32 and in bf16) against an f64 product of the same bf16 values. Where a GPU is present the
//! same tests run there (cuBLAS's `CUDA_R_16BF` path).

mod common;

use common::emulated;
use performer_cuda::reference::Rng;
use performer_cuda::tensor_ops as ops;
use performer_cuda::{DeviceBuffer, Elem};

fn ok<T>(r: performer_cuda::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn widen(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

#[test]
fn conversion_rounds_to_nearest_even_and_keeps_nan_and_infinities() {
    let Some(dev) = emulated("conversion_rounds_to_nearest_even_and_keeps_nan_and_infinities")
    else {
        return;
    };
    let ulp = 2f32.powi(-7); // bf16's spacing in [1, 2)
    // (input, expected bf16 bits)
    let cases: Vec<(f32, u16)> = vec![
        (1.0, 0x3f80),
        (-2.0, 0xc000),
        (0.0, 0x0000),
        (-0.0, 0x8000),
        // Exactly halfway: ties go to the even significand.
        (1.0 + ulp / 2.0, 0x3f80),
        (1.0 + 1.5 * ulp, 0x3f82),
        (-(1.0 + 1.5 * ulp), 0xbf82),
        // Just past halfway rounds up, just below rounds down.
        (1.0 + ulp / 2.0 + 2f32.powi(-20), 0x3f81),
        (1.0 + ulp / 2.0 - 2f32.powi(-20), 0x3f80),
        (f32::INFINITY, 0x7f80),
        (f32::NEG_INFINITY, 0xff80),
        // bf16's largest finite is 0x7f7f (3.3895e38); f32::MAX lies past it and rounds up to
        // infinity, as does anything at or past the halfway point to 2^128.
        (f32::MAX, 0x7f80),
        (-f32::MAX, 0xff80),
        (widen(0x7f7f), 0x7f7f),
        // A subnormal keeps its top bits (no flush to zero).
        (f32::from_bits(0x0001_8000), 0x0002),
        (f32::from_bits(0x0000_ffff), 0x0001),
    ];
    let x: Vec<f32> = cases
        .iter()
        .map(|c| c.0)
        .chain([f32::NAN, -f32::NAN])
        .collect();
    let up = ok(DeviceBuffer::from_f32(&dev, &x));
    let b = ok(ops::to_bf16(&up));
    assert_eq!(b.elem(), Elem::Bf16);
    assert_eq!(b.len(), x.len());
    let bits = ok(b.to_bf16_bits());
    assert_eq!(bits.len(), x.len());
    for (i, &(v, want)) in cases.iter().enumerate() {
        assert_eq!(bits[i], want, "{v:e} ({:#010x})", v.to_bits());
    }
    let n = cases.len();
    for (i, sign) in [(n, 0), (n + 1, 0x8000)] {
        assert_eq!(bits[i] & 0x8000, sign, "NaN's sign");
        assert!(widen(bits[i]).is_nan(), "NaN stays NaN: {:#06x}", bits[i]);
    }
    // Widening is exact: back to f32 on the device gives the bf16 values themselves.
    let back = ok(ok(ops::to_f32(&b)).to_f32());
    assert_eq!(back.len(), bits.len());
    for (g, &w) in back.iter().zip(&bits) {
        assert!(
            g.to_bits() == widen(w).to_bits() || (g.is_nan() && widen(w).is_nan()),
            "{g:e} vs {:e}",
            widen(w)
        );
    }
    // A host upload of bits round-trips unchanged; wrong element types are typed errors.
    let again = ok(DeviceBuffer::from_bf16_bits(&dev, &bits));
    assert_eq!(ok(again.to_bf16_bits()), bits);
    assert!(again.to_f32().is_err());
    assert!(ops::to_f32(&up).is_err());
    assert!(ops::to_bf16(&b).is_err());
    assert!(ops::unary(&b, ops::Unary::Exp).is_err());
    // A strided copy checks its view in elements: a bf16 buffer is refused, not read as f32
    // past its end.
    assert!(ops::strided_copy(&b, 0, &[b.len()], &[1]).is_err());
}

/// bf16 bits of `x`, rounded to nearest even (the reference for the device's rounding).
fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

#[test]
fn gemm_on_bf16_storage_matches_an_f64_product_for_every_transpose() {
    let Some(dev) = emulated("gemm_on_bf16_storage_matches_an_f64_product_for_every_transpose")
    else {
        return;
    };
    let mut rng = Rng::new(17);
    let (batch, m, k, n) = (2usize, 3usize, 5usize, 4usize);
    for ta in [false, true] {
        for tb in [false, true] {
            let a_bits: Vec<u16> = rng
                .normal_vec(batch * m * k, 1.0)
                .iter()
                .map(|&v| bf16_bits(v as f32))
                .collect();
            let b_bits: Vec<u16> = rng
                .normal_vec(batch * k * n, 1.0)
                .iter()
                .map(|&v| bf16_bits(v as f32))
                .collect();
            let a = ok(DeviceBuffer::from_bf16_bits(&dev, &a_bits));
            let b = ok(DeviceBuffer::from_bf16_bits(&dev, &b_bits));
            // Row-major op(A)[i, p] and op(B)[p, j] of batch z, read as stored.
            let av = |z: usize, i: usize, p: usize| {
                let idx = if ta { p * m + i } else { i * k + p };
                widen(a_bits[z * m * k + idx]) as f64
            };
            let bv = |z: usize, p: usize, j: usize| {
                let idx = if tb { j * k + p } else { p * n + j };
                widen(b_bits[z * k * n + idx]) as f64
            };
            let mut want = vec![0.0f64; batch * m * n];
            for z in 0..batch {
                for i in 0..m {
                    for j in 0..n {
                        want[z * m * n + i * n + j] =
                            (0..k).map(|p| av(z, i, p) * bv(z, p, j)).sum();
                    }
                }
            }
            let c = ok(ops::matmul_bf16_storage(
                &a,
                ta,
                &b,
                tb,
                batch,
                m,
                k,
                n,
                Elem::F32,
            ));
            let got: Vec<f64> = ok(c.to_f32()).into_iter().map(f64::from).collect();
            // f32 accumulation of 5 exact products: within 1e-6 of the largest value.
            common::close(&format!("f32 C, ta={ta} tb={tb}"), &got, &want, 1e-6);
            let c16 = ok(ops::matmul_bf16_storage(
                &a,
                ta,
                &b,
                tb,
                batch,
                m,
                k,
                n,
                Elem::Bf16,
            ));
            assert_eq!(c16.elem(), Elem::Bf16);
            let got16 = ok(c16.to_bf16_bits());
            assert_eq!(got16.len(), want.len());
            for (i, (&g, &w)) in got16.iter().zip(&want).enumerate() {
                // Rounded once from the f32 sum: within half a bf16 ulp (at most 2^-8 of the
                // value: 8 significand bits) of the exact value, plus the f32 sum's rounding.
                let g = widen(g) as f64;
                assert!(
                    (g - w).abs() <= w.abs() * 2f64.powi(-8) * 1.0001 + 1e-6,
                    "bf16 C[{i}], ta={ta} tb={tb}: {g} vs {w}"
                );
            }
        }
    }
    // f32 operands are refused (no silent reinterpretation of their bits).
    let f = ok(DeviceBuffer::from_f32(&dev, &[1.0; 4]));
    assert!(ops::matmul_bf16_storage(&f, false, &f, false, 1, 2, 2, 2, Elem::F32).is_err());
}

#[test]
fn the_peak_counter_follows_allocations() {
    let Some(dev) = emulated("the_peak_counter_follows_allocations") else {
        return;
    };
    dev.reset_peak_bytes();
    let base = dev.bytes_in_use();
    assert_eq!(dev.peak_bytes(), base);
    {
        let _a = ok(DeviceBuffer::alloc(&dev, 1000, Elem::Bf16));
        let _b = ok(DeviceBuffer::alloc(&dev, 1000, Elem::F32));
        assert_eq!(dev.bytes_in_use(), base + 6000);
    }
    assert_eq!(dev.bytes_in_use(), base);
    assert_eq!(dev.peak_bytes(), base + 6000);
    dev.reset_peak_bytes();
    assert_eq!(dev.peak_bytes(), base);
}
