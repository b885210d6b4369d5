//! bf16 autocast on the emulated device (performer_tensor::autocast): inside the scope a device
//! matmul equals the f64 product of its operands rounded to bf16 (f32 accumulation), and so do
//! the two products of its backward, even when the backward runs outside the scope; outside it
//! nothing changes; on the CPU autocast changes nothing.

#![cfg(feature = "cuda")]

use ndarray::{ArrayD, IxDyn};
use performer::tensor::autocast::autocast_bf16;
use performer::tensor::testing::emulated_device_available;
use performer::tensor::testing::relative_error;
use performer::tensor::{DType, Device, Tensor};

const DEV: Device = Device::Emulated;

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
    if !emulated_device_available() {
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
    if !emulated_device_available() {
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

/// The dtype rules of autocast's bf16 storage, op by op (PyTorch autocast's): a product is
/// stored as bf16; element-wise ops and dropout keep bf16; bf16 with bf16 stays bf16, bf16
/// with f32 gives f32 (but a linear layer's `matmul_add` is bf16); layout copies (permute,
/// narrow, cat) keep bf16; softmax, norms, reductions and the loss write f32; reshape shares
/// the bf16 buffer; a bf16 tensor read back is its bf16 values widened exactly.
#[test]
fn autocast_stores_products_and_activations_as_bf16_and_the_rest_as_f32() {
    if !emulated_device_available() {
        return;
    }
    let _serial = serial();
    let (a, w) = (seeded(&[2, 5, 24], 3), seeded(&[24, 7], 4));
    let up = |x: &ArrayD<f32>| Tensor::new(x.clone()).to_device(DEV).unwrap();
    let (ad, wd) = (up(&a), up(&w));
    autocast_bf16(true, || {
        let y = ad.matmul(&wd).unwrap();
        assert_eq!(y.dtype(), DType::BF16, "matmul");
        assert_eq!(y.gelu().dtype(), DType::BF16, "gelu");
        assert_eq!(y.exp().dtype(), DType::BF16, "exp");
        assert_eq!(y.mul_scalar(2.0).dtype(), DType::BF16, "mul_scalar");
        assert_eq!(
            y.dropout(0.5, true).unwrap().dtype(),
            DType::BF16,
            "dropout"
        );
        assert_eq!(y.add(&y).unwrap().dtype(), DType::BF16, "bf16 + bf16");
        let bias = up(&seeded(&[7], 6));
        assert_eq!(y.add(&bias).unwrap().dtype(), DType::F32, "bf16 + f32");
        assert_eq!(y.reshape(&[10, 7]).unwrap().dtype(), DType::BF16, "reshape");
        assert_eq!(y.softmax(-1).unwrap().dtype(), DType::F32, "softmax");
        assert_eq!(y.layer_norm(None, None, 1e-5).unwrap().dtype(), DType::F32);
        assert_eq!(y.sum_all().dtype(), DType::F32, "sum");
        assert_eq!(
            y.permute(&[0, 2, 1]).unwrap().dtype(),
            DType::BF16,
            "permute"
        );
        assert_eq!(y.narrow(1, 1, 2).unwrap().dtype(), DType::BF16, "narrow");
        let both = Tensor::cat(&[y.clone(), y.clone()], 0).unwrap();
        assert_eq!(both.dtype(), DType::BF16, "cat");
        // A linear layer's product and bias in one op: bf16 (F.linear under autocast), and
        // the values of the f32 sum rounded once.
        let lin = ad.matmul_add(&wd, &bias).unwrap();
        assert_eq!(lin.dtype(), DType::BF16, "matmul_add");
        let want_lin = reference(&a, &w, bf16);
        let b = seeded(&[7], 6);
        let lin = lin.to_host().unwrap().to_array();
        assert_eq!(lin.shape(), want_lin.shape());
        for (ix, v) in lin.indexed_iter() {
            let exact = want_lin[&ix] + b[[ix[2]]];
            assert!(
                (v - exact).abs() <= exact.abs() * 2f32.powi(-8) + 1e-6,
                "{v} vs {exact}"
            );
        }
        // Read back: the bf16 values, widened exactly.
        let host = y.to_host().unwrap();
        assert_eq!(host.dtype(), DType::F32);
        let want = reference(&a, &w, bf16).mapv(bf16);
        let host = host.to_array();
        assert_eq!(host.len(), want.len());
        assert!(host.iter().all(|v| bf16(*v) == *v), "every value is a bf16");
        assert!(relative_error(&host, &want).unwrap() <= 2f32.powi(-8));
    });
    // Conversions: to bf16 rounds (ties to even), back to f32 is exact; host tensors are f32.
    let x = up(&seeded(&[64], 9));
    let xb = x.to_dtype(DType::BF16).unwrap();
    assert_eq!(xb.dtype(), DType::BF16);
    let back = xb.to_dtype(DType::F32).unwrap();
    assert_eq!(back.dtype(), DType::F32);
    let want = seeded(&[64], 9).mapv(bf16);
    assert_eq!(back.to_host().unwrap().to_array(), want);
    assert!(Tensor::new(want).to_dtype(DType::BF16).is_err());
}

/// A gradient through bf16-stored activations against the CPU on the same bf16 values:
/// `sum(gelu(bf16(x)) * c)`, the GELU's input and output kept as bf16 for its backward, the
/// incoming gradient f32. Its gradient is `c * gelu'(bf16(x))`, which the CPU computes from
/// the rounded input; the device's differs only by f32 rounding (the bf16 output is not read by
/// GELU's derivative). And the same through a bf16 product (`bf16(x) @ w` under autocast).
#[test]
fn gradients_through_bf16_storage_match_the_cpu_on_the_rounded_values() {
    if !emulated_device_available() {
        return;
    }
    let _serial = serial();
    let (x, c) = (seeded(&[4, 6], 21), seeded(&[4, 6], 22));
    let xd = Tensor::new(x.clone()).to_device(DEV).unwrap().to_var();
    let cd = Tensor::new(c.clone()).to_device(DEV).unwrap();
    let h = xd.to_dtype(DType::BF16).unwrap().gelu();
    assert_eq!(h.dtype(), DType::BF16);
    let loss = h.mul(&cd).unwrap();
    assert_eq!(loss.dtype(), DType::F32);
    let grads = loss.sum_all().backward().unwrap();
    let g = grads.tensor(xd.id()).unwrap();
    assert_eq!(g.dtype(), DType::F32, "gradients are f32");
    let g = g.to_host().unwrap().to_array();

    let xc = Tensor::new(x.mapv(bf16)).to_var();
    let cpu = xc.gelu().mul(&Tensor::new(c.clone())).unwrap();
    let want = cpu.sum_all().backward().unwrap();
    let want = want.get(&xc).unwrap();
    assert!(relative_error(&g, want).unwrap() < 1e-5, "gelu");

    // Product: d/dx sum((bf16(x) @ bf16(w)) * c2) = bf16(c2) @ bf16(w)^T (f32 sums).
    let w = seeded(&[6, 3], 23);
    let c2 = seeded(&[4, 3], 24);
    let wd = Tensor::new(w.clone()).to_device(DEV).unwrap();
    let c2d = Tensor::new(c2.clone()).to_device(DEV).unwrap();
    let y = autocast_bf16(true, || xd.matmul(&wd).unwrap());
    let grads = y.mul(&c2d).unwrap().sum_all().backward().unwrap();
    let g = grads.tensor(xd.id()).unwrap().to_host().unwrap().to_array();
    let want = ArrayD::from_shape_fn(IxDyn(&[4, 6]), |ix| {
        (0..3)
            .map(|j| bf16(c2[[ix[0], j]]) as f64 * bf16(w[[ix[1], j]]) as f64)
            .sum::<f64>() as f32
    });
    assert!(relative_error(&g, &want).unwrap() < 1e-6, "matmul");

    // The fused product and bias: the same input gradient, the weight's bf16(x)^T @ bf16(c2),
    // the bias's the f32 column sums of c2.
    let wv = Tensor::new(w.clone()).to_device(DEV).unwrap().to_var();
    let bias = Tensor::new(seeded(&[3], 25))
        .to_device(DEV)
        .unwrap()
        .to_var();
    let y = autocast_bf16(true, || xd.matmul_add(&wv, &bias).unwrap());
    assert_eq!(y.dtype(), DType::BF16);
    let grads = y.mul(&c2d).unwrap().sum_all().backward().unwrap();
    let grad = |t: &Tensor| grads.tensor(t.id()).unwrap().to_host().unwrap().to_array();
    assert!(
        relative_error(&grad(&xd), &want).unwrap() < 1e-6,
        "matmul_add x"
    );
    let want_w = ArrayD::from_shape_fn(IxDyn(&[6, 3]), |ix| {
        (0..4)
            .map(|i| bf16(x[[i, ix[0]]]) as f64 * bf16(c2[[i, ix[1]]]) as f64)
            .sum::<f64>() as f32
    });
    assert!(
        relative_error(&grad(&wv), &want_w).unwrap() < 1e-6,
        "matmul_add w"
    );
    let want_b = ArrayD::from_shape_fn(IxDyn(&[3]), |ix| {
        (0..4).map(|i| c2[[i, ix[0]]] as f64).sum::<f64>() as f32
    });
    assert!(
        relative_error(&grad(&bias), &want_b).unwrap() < 1e-6,
        "matmul_add bias"
    );
}

/// Tests that read the device's peak memory run one at a time (the emulated device and its
/// counter are shared by the process).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A causal PerformerLM (dim 32, depth 1, 2 heads, FAVOR+ features 16), one training step's
/// loss and gradients on the emulated device, in f32 and under autocast, and the device's peak
/// memory of each.
fn lm_step(amp: bool) -> (f32, Vec<(String, ArrayD<f32>)>, usize) {
    use performer::models::{AutoregressiveWrapper, PerformerLM, PerformerLMConfig, SeqInputs};
    use performer::tensor::{Module, device_ops};
    performer::tensor::rng::manual_seed(7);
    let model = PerformerLM::new(PerformerLMConfig {
        num_tokens: 64,
        max_seq_len: 64,
        dim: 32,
        depth: 1,
        heads: 2,
        dim_head: 16,
        causal: true,
        nb_features: Some(16),
        ..Default::default()
    })
    .unwrap();
    model.fix_projection_matrices();
    let wrapper = AutoregressiveWrapper::new(model);
    wrapper.to_device(DEV).unwrap();
    let x = ndarray::Array2::from_shape_fn((4, 33), |(i, j)| ((i * 13 + j * 7) % 64) as i64);
    device_ops::reset_peak_memory(DEV).unwrap();
    let (base, _) = device_ops::memory(DEV).unwrap();
    let loss = autocast_bf16(amp, || {
        wrapper.loss(&x.view(), &SeqInputs::default()).unwrap()
    });
    let grads = loss.backward().unwrap();
    let peak = device_ops::memory(DEV).unwrap().1 - base;
    let grads = wrapper
        .named_parameters()
        .into_iter()
        .map(|(name, p)| {
            let g = grads
                .tensor(p.tensor().id())
                .unwrap_or_else(|| panic!("{name}: no grad"));
            assert_eq!(g.dtype(), DType::F32, "{name}: gradients are f32");
            assert_eq!(
                p.tensor().dtype(),
                DType::F32,
                "{name}: master weights are f32"
            );
            (name, g.to_host().unwrap().to_array())
        })
        .collect();
    (loss.item().unwrap(), grads, peak)
}

/// One LM training step under autocast against f32: the loss within 1e-2 relative and every
/// gradient within 5e-2 of its largest value, and less peak device memory.
///
/// Why those bounds: bf16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3); each product's
/// output and each operand is rounded once, and a value passes through about half a dozen such
/// roundings between the embedding and the loss, which compound to a few 1e-3 of the loss and
/// somewhat more of a gradient (a gradient is a product of a rounded operand and a rounded
/// incoming gradient, and cancellation in its sums amplifies relative error). Measured:
/// printed by the test (`--nocapture`). A bf16 conversion that truncated instead of rounding,
/// or read a wrong half, would be far outside them.
#[test]
fn an_lm_step_under_autocast_is_close_to_f32_and_needs_less_memory() {
    if !emulated_device_available() {
        return;
    }
    let _serial = serial();
    let (l32, g32, peak32) = lm_step(false);
    let (l16, g16, peak16) = lm_step(true);
    assert!(l16.is_finite() && l32.is_finite());
    let loss_err = (l16 - l32).abs() / l32.abs();
    eprintln!(
        "LM step: loss f32 {l32} bf16 {l16} (relative {loss_err:.2e}); peak device memory \
         f32 {peak32} B, autocast {peak16} B ({:.1}%)",
        100.0 * peak16 as f64 / peak32 as f64
    );
    assert!(loss_err < 1e-2, "loss {l16} vs {l32}");
    assert_eq!(g16.len(), g32.len());
    let mut worst = 0f32;
    for ((n16, a), (n32, b)) in g16.iter().zip(&g32) {
        assert_eq!(n16, n32);
        let e = relative_error(a, b).unwrap();
        worst = worst.max(e);
        assert!(e < 5e-2, "{n16}: gradient {e:.2e} from f32");
    }
    eprintln!(
        "LM step: worst gradient relative error {worst:.2e} over {} parameters",
        g16.len()
    );
    assert!(peak16 < peak32, "autocast peak {peak16} B, f32 {peak32} B");
}
