//! bf16 autocast on the emulated device (performer_tensor::autocast): inside the scope a device
//! matmul equals the f64 product of its operands rounded to bf16 (f32 accumulation), and so do
//! the two products of its backward, even when the backward runs outside the scope; outside it
//! nothing changes; on the CPU autocast changes nothing.

#![cfg(feature = "cuda")]

use ndarray::{ArrayD, IxDyn};
use performer::tensor::autocast::autocast_bf16;
use performer::tensor::testing::relative_error;
use performer::tensor::{DType, Device, Tensor};

const DEV: Device = Device::Emulated;

fn emulator() -> bool {
    match Tensor::full_on(&[1], 0.0, DEV) {
        Ok(_) => true,
        Err(e) if std::env::var("PERFORMER_CUDA_REQUIRE_CXX").as_deref() != Ok("1") => {
            eprintln!("skipped: no emulated device here: {e}");
            false
        }
        Err(e) => panic!("PERFORMER_CUDA_REQUIRE_CXX=1 and the emulated device fails: {e}"),
    }
}

/// `x` rounded to the nearest bf16, ties to even (the reference's own rounding, written apart
/// from the emulator's).
fn bf16(x: f32) -> f32 {
    let b = x.to_bits();
    let lsb = (b >> 16) & 1;
    f32::from_bits(((b as u64 + 0x7fff + lsb as u64) as u32) & 0xffff_0000)
}

fn seeded(shape: &[usize], seed: u64) -> ArrayD<f32> {
    performer::tensor::rng::manual_seed(seed);
    Tensor::randn(shape).to_array()
}

/// `a (b, m, k) @ w (k, n)` in f64 after `round` on every operand.
fn reference(a: &ArrayD<f32>, w: &ArrayD<f32>, round: fn(f32) -> f32) -> ArrayD<f32> {
    let (bt, m, k, n) = (a.shape()[0], a.shape()[1], a.shape()[2], w.shape()[1]);
    ArrayD::from_shape_fn(IxDyn(&[bt, m, n]), |ix| {
        (0..k)
            .map(|p| round(a[[ix[0], ix[1], p]]) as f64 * round(w[[p, ix[2]]]) as f64)
            .sum::<f64>() as f32
    })
}

#[test]
fn autocast_matmul_rounds_operands_to_bf16_forward_and_backward() {
    if !emulator() {
        return;
    }
    let (a, w) = (seeded(&[2, 5, 24], 3), seeded(&[24, 7], 4));
    let g = seeded(&[2, 5, 7], 5);
    let up = |x: &ArrayD<f32>| Tensor::new(x.clone()).to_device(DEV).unwrap().to_var();
    let (ad, wd, gd) = (
        up(&a),
        up(&w),
        Tensor::new(g.clone()).to_device(DEV).unwrap(),
    );
    let out = autocast_bf16(true, || ad.matmul(&wd).unwrap());
    // The product is stored as bf16; its operands stay f32 leaves.
    assert_eq!(out.dtype(), DType::BF16);
    assert_eq!((ad.dtype(), wd.dtype()), (DType::F32, DType::F32));
    // Backward outside the scope: the products still follow the forward's bf16 choice.
    let grads = out.mul(&gd).unwrap().sum_all().backward().unwrap();
    let out = out.to_host().unwrap().to_array();
    // The f64 product of the bf16 operands, rounded once to bf16 (the emulator's f32 sum
    // before that rounding may differ from f64's in the last f32 bit, which moves a bf16
    // rounding only at an exact tie: equality within one bf16 step, 2^-8 relative).
    let want = reference(&a, &w, bf16).mapv(bf16);
    assert_eq!(out.shape(), want.shape());
    for (o, w) in out.iter().zip(&want) {
        assert!((o - w).abs() <= w.abs() * 2f32.powi(-8), "{o} vs {w}");
    }
    let exact = out.iter().zip(&want).filter(|(o, w)| o == w).count();
    assert!(
        exact * 10 >= out.len() * 9,
        "{exact} of {} exact",
        out.len()
    );
    // Far from the f32 product: bf16 keeps 8 significant bits.
    let f32_product = reference(&a, &w, |x| x);
    assert!(relative_error(&out, &f32_product).unwrap() > 1e-4);

    let grad = |t: &Tensor| grads.tensor(t.id()).unwrap().to_host().unwrap().to_array();
    // dA = g @ w^T, dW = a^T @ g (summed over the batch), operands rounded.
    let (ga, gw) = (grad(&ad), grad(&wd));
    let want_ga = ArrayD::from_shape_fn(IxDyn(&[2, 5, 24]), |ix| {
        (0..7)
            .map(|j| bf16(g[[ix[0], ix[1], j]]) as f64 * bf16(w[[ix[2], j]]) as f64)
            .sum::<f64>() as f32
    });
    let want_gw = ArrayD::from_shape_fn(IxDyn(&[24, 7]), |ix| {
        let mut s = 0f64;
        for b in 0..2 {
            for i in 0..5 {
                s += bf16(a[[b, i, ix[0]]]) as f64 * bf16(g[[b, i, ix[1]]]) as f64;
            }
        }
        s as f32
    });
    assert!(relative_error(&ga, &want_ga).unwrap() < 1e-6);
    assert!(relative_error(&gw, &want_gw).unwrap() < 1e-6);
}

#[test]
fn without_autocast_and_on_the_cpu_matmul_stays_f32() {
    if !emulator() {
        return;
    }
    let (a, w) = (seeded(&[2, 5, 24], 3), seeded(&[24, 7], 4));
    let want = reference(&a, &w, |x| x);
    let up = |x: &ArrayD<f32>| Tensor::new(x.clone()).to_device(DEV).unwrap();
    let device = up(&a)
        .matmul(&up(&w))
        .unwrap()
        .to_host()
        .unwrap()
        .to_array();
    assert!(relative_error(&device, &want).unwrap() < 1e-6);
    let cpu = autocast_bf16(true, || {
        Tensor::new(a.clone())
            .matmul(&Tensor::new(w.clone()))
            .unwrap()
            .to_array()
    });
    assert!(relative_error(&cpu, &want).unwrap() < 1e-6);
}
