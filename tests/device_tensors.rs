//! Device tensors on the emulated device against the same ops on the CPU: values, gradients
//! (which live on the device), transfers, and the typed errors for operands on two devices
//! and for running out of device memory. Shapes are small: the emulator runs every CUDA thread
//! as a fiber. (performer-tensor's own tests; they live in the facade so that CI runs them in
//! its one build with the optional features.)

#![cfg(feature = "cuda")]

use performer::tensor::optim::{Adam, Optimizer, Sgd, clip_grad_norm};
use performer::tensor::testing::assert_close;
use performer::tensor::testing::emulated_device_available;
use performer::tensor::{
    Buffer, CustomOp, Data, Device, Error, Gradients, Module, Param, StateValue, Tensor, Visitor,
    apply_custom_op, no_grad,
};

const DEV: Device = Device::Emulated;

#[path = "device_tensors/generic_ops.rs"]
mod generic_ops;

fn seeded(shape: &[usize], seed: u64) -> Tensor {
    performer::tensor::rng::manual_seed(seed);
    Tensor::randn(shape)
}

/// The device gradient of `t` (a leaf moved to the device), brought back to compare.
fn device_grad(grads: &Gradients, t: &Tensor, what: &str) -> ndarray::ArrayD<f32> {
    let g = grads
        .tensor(t.id())
        .unwrap_or_else(|| panic!("no gradient reached {what}"));
    assert_eq!(
        g.device(),
        t.device(),
        "{what}'s gradient lives where it does"
    );
    g.to_host().unwrap().to_array()
}

#[test]
fn transfers_keep_values_and_report_devices() {
    if !emulated_device_available() {
        return;
    }
    let x = seeded(&[3, 5], 1);
    let d = x.to_device(DEV).unwrap();
    assert_eq!(d.device(), DEV);
    assert_eq!(d.shape(), &[3, 5]);
    assert_eq!(x.device(), Device::Cpu);
    let back = d.to_host().unwrap();
    assert_eq!(back.device(), Device::Cpu);
    assert_eq!(back.to_vec(), x.to_vec(), "a round trip is exact");
    // A transposed (non-contiguous) host tensor goes over in row-major order.
    let t = x.transpose(0, 1).unwrap();
    assert_eq!(t.to_device(DEV).unwrap().to_vec(), t.to_vec());
    assert_eq!(
        Tensor::scalar(2.5).to_device(DEV).unwrap().item().unwrap(),
        2.5
    );
}

/// A two-layer perceptron with a log-softmax loss, every op of it on the device, against the
/// CPU: the loss within 1e-5 and every gradient within 1e-4 (relative to its largest value).
#[test]
fn mlp_forward_and_gradients_match_the_cpu() {
    if !emulated_device_available() {
        return;
    }
    let x = seeded(&[2, 3, 4], 2);
    let w1 = Tensor::var(seeded(&[4, 6], 3).to_array());
    let b1 = Tensor::var(seeded(&[6], 4).to_array());
    let w2 = Tensor::var(seeded(&[6, 5], 5).to_array());
    let target = seeded(&[2, 3, 5], 6).softmax(-1).unwrap();
    let loss = |x: &Tensor, w1: &Tensor, b1: &Tensor, w2: &Tensor, target: &Tensor| {
        let h = x.matmul(w1).unwrap().add(b1).unwrap().gelu();
        let h = h
            .mul_scalar(0.5)
            .add_scalar(0.1)
            .tanh()
            .sub(&h.sigmoid())
            .unwrap();
        let logits = h.matmul(w2).unwrap().div_scalar(2.0);
        let lp = logits.log_softmax(-1).unwrap();
        let p = logits.softmax(-1).unwrap().square().sqrt().relu();
        lp.mul(target)
            .unwrap()
            .sum(&[-1], false)
            .unwrap()
            .neg()
            .mean_all()
            .add(&p.exp().log().mean_all().mul_scalar(0.01))
            .unwrap()
    };
    let cpu = loss(&x, &w1, &b1, &w2, &target);
    let cpu_grads = cpu.backward().unwrap();

    let dv = |t: &Tensor| t.to_device(DEV).unwrap();
    // Leaves on the device: variables created there (their gradients stay there).
    let (w1d, b1d, w2d) = (dv(&w1).to_var(), dv(&b1).to_var(), dv(&w2).to_var());
    let dev = loss(&dv(&x), &w1d, &b1d, &w2d, &dv(&target));
    assert_eq!(dev.device(), DEV);
    let e = (dev.item().unwrap() - cpu.item().unwrap()).abs() / cpu.item().unwrap().abs();
    assert!(e <= 1e-5, "loss: relative error {e}");
    let grads = dev.backward().unwrap();
    for (what, c, d) in [("w1", &w1, &w1d), ("b1", &b1, &b1d), ("w2", &w2, &w2d)] {
        let expected = cpu_grads.get(c).unwrap();
        assert!(
            grads.get(d).is_none(),
            "a device gradient is not a host array"
        );
        assert_close(
            what,
            &device_grad(&grads, d, what).view(),
            &expected.view(),
            1e-4,
        );
    }
    assert_eq!(grads.len(), 3);
    assert!(grads.all_finite());
}

/// Batched products, permutes, reshapes and sums over inner axes, with a leaf created on the
/// host and moved: its gradient comes back to the host through the move.
#[test]
fn layout_ops_and_batched_products_match_the_cpu() {
    if !emulated_device_available() {
        return;
    }
    let a = Tensor::var(seeded(&[2, 3, 4], 7).to_array());
    let b = Tensor::var(seeded(&[2, 4, 5], 8).to_array());
    let f = |a: &Tensor, b: &Tensor| {
        let c = a.matmul(b).unwrap(); // (2, 3, 5)
        let p = c.permute(&[2, 0, 1]).unwrap(); // (5, 2, 3)
        let r = p.reshape(&[5, 6]).unwrap();
        let s = r.sum(&[0], true).unwrap(); // (1, 6)
        s.mul(&s)
            .unwrap()
            .add(&c.sum(&[0, 2], false).unwrap().sum_all())
            .unwrap()
            .mean_all()
    };
    let cpu = f(&a, &b);
    let cg = cpu.backward().unwrap();
    let dev = f(&a.to_device(DEV).unwrap(), &b.to_device(DEV).unwrap());
    assert_eq!(dev.device(), DEV);
    assert!((dev.item().unwrap() - cpu.item().unwrap()).abs() <= 1e-5 * cpu.item().unwrap().abs());
    let dg = dev.backward().unwrap();
    for (what, t) in [("a", &a), ("b", &b)] {
        // The leaves live on the host: their gradients came back through to_device's backward.
        let g = dg
            .get(t)
            .unwrap_or_else(|| panic!("no host gradient for {what}"));
        assert_close(what, &g.view(), &cg.get(t).unwrap().view(), 1e-4);
    }
}

#[test]
fn operands_on_two_devices_are_a_typed_error() {
    if !emulated_device_available() {
        return;
    }
    let x = seeded(&[2, 3], 9);
    let d = x.to_device(DEV).unwrap();
    for (op, r) in [
        ("add", x.add(&d)),
        ("mul", d.mul(&x)),
        ("matmul", d.matmul(&x.transpose(0, 1).unwrap())),
    ] {
        match r {
            Err(Error::DeviceMismatch { op: o, left, right }) => {
                assert_eq!(o, op);
                let both = [left.as_str(), right.as_str()];
                assert!(
                    both.contains(&"cpu") && both.contains(&"emulated"),
                    "{both:?}"
                );
            }
            other => panic!("{op}: expected a device mismatch, got {other:?}"),
        }
    }
}

#[test]
fn out_of_device_memory_is_a_typed_error() {
    if !emulated_device_available() {
        return;
    }
    // 64 GiB of f32 on an emulated device of 4 GiB.
    match Tensor::full_on(&[1 << 34], 0.0, DEV) {
        Err(Error::OutOfMemory {
            op,
            device,
            requested,
            ..
        }) => {
            assert_eq!(device, "emulated");
            assert_eq!(requested, 4 << 34);
            assert_eq!(op, "full");
        }
        other => panic!("expected out of memory, got {other:?}"),
    }
    // The device still works afterwards.
    let z = no_grad(|| Tensor::full_on(&[3], 1.5, DEV).unwrap().add_scalar(1.0));
    assert_eq!(z.to_vec(), vec![2.5; 3]);
}

/// A module of two layers with a float buffer, written out as a test fixture.
struct Tiny {
    w1: Param,
    b1: Param,
    w2: Param,
    scale: Buffer,
}

impl Tiny {
    fn new(seed: u64) -> Self {
        Tiny {
            w1: Param::new(seeded(&[4, 6], seed).to_array()),
            b1: Param::new(seeded(&[6], seed + 1).to_array()),
            w2: Param::new(seeded(&[6, 3], seed + 2).to_array()),
            scale: Buffer::new(seeded(&[3], seed + 3).to_array()),
        }
    }

    fn loss(&self, x: &Tensor, target: &Tensor) -> Tensor {
        let h = x
            .matmul(&self.w1.tensor())
            .unwrap()
            .add(&self.b1.tensor())
            .unwrap()
            .relu();
        let y = h
            .matmul(&self.w2.tensor())
            .unwrap()
            .mul(&self.scale.tensor().unwrap())
            .unwrap();
        y.sub(target).unwrap().square().mean_all()
    }
}

impl Module for Tiny {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.param("w1", &self.w1);
        v.param("b1", &self.b1);
        v.param("w2", &self.w2);
        v.buffer("scale", &self.scale);
    }
}

/// `Module::to_device` moves every parameter and buffer; three Adam (and AdamW, and SGD with
/// momentum, with clipping) steps on the device give the CPU's weights within 1e-4; the state
/// dict comes back to the host to be written; moving back to the CPU keeps the values.
#[test]
fn module_to_device_and_optimizer_steps_match_the_cpu() {
    if !emulated_device_available() {
        return;
    }
    type MakeOpt = fn(Vec<(String, Param)>) -> Box<dyn Optimizer>;
    let makers: [(&str, MakeOpt); 3] = [
        ("adam", |p| Box::new(Adam::new(p, 1e-2))),
        ("adamw", |p| Box::new(Adam::adamw(p, 1e-2))),
        ("sgd", |p| {
            let mut s = Sgd::new(p, 5e-2);
            s.momentum = 0.9;
            s.nesterov = true;
            s.weight_decay = 1e-3;
            Box::new(s)
        }),
    ];
    let x = seeded(&[5, 4], 20);
    let target = seeded(&[5, 3], 21);
    for (what, make) in makers {
        let cpu = Tiny::new(30);
        let dev = Tiny::new(30);
        dev.to_device(DEV).unwrap();
        for (name, p) in dev.named_parameters() {
            assert_eq!(p.device(), DEV, "{name}");
        }
        assert_eq!(dev.scale.device(), DEV);
        let (xd, td) = (x.to_device(DEV).unwrap(), target.to_device(DEV).unwrap());
        let mut oc = make(cpu.named_parameters());
        let mut od = make(dev.named_parameters());
        for step in 0..3 {
            let mut gc = cpu.loss(&x, &target).backward().unwrap();
            let ld = dev.loss(&xd, &td);
            assert_eq!(ld.device(), DEV);
            let mut gd = ld.backward().unwrap();
            let nc = clip_grad_norm(&mut gc, &cpu.parameters(), 0.5);
            let nd = clip_grad_norm(&mut gd, &dev.parameters(), 0.5);
            assert!(
                (nc - nd).abs() <= 1e-5 * nc,
                "{what} step {step}: norms {nc} {nd}"
            );
            oc.step(&gc).unwrap();
            od.step(&gd).unwrap();
            let (cpu_params, dev_params) = (cpu.named_parameters(), dev.named_parameters());
            assert_eq!(cpu_params.len(), dev_params.len());
            for ((name, pc), (_, pd)) in cpu_params.iter().zip(&dev_params) {
                assert_eq!(pd.device(), DEV);
                assert_close(
                    &format!("{what} step {step} {name}"),
                    &pd.value().view(),
                    &pc.value().view(),
                    1e-4,
                );
            }
        }
        // The optimizer state comes to the host to be written, with the CPU's keys.
        let (sc, sd) = (oc.state_dict(), od.state_dict());
        assert_eq!(
            sc.keys().collect::<Vec<_>>(),
            sd.keys().collect::<Vec<_>>(),
            "{what}"
        );
        let state = dev.state_dict();
        assert_eq!(state.len(), 4);
        dev.to_device(Device::Cpu).unwrap();
        assert_eq!(dev.w1.device(), Device::Cpu);
        for (name, v) in state {
            assert_eq!(v, cpu_value(&dev, &name), "{name} survives the move back");
        }
    }
}

fn cpu_value(m: &Tiny, name: &str) -> StateValue {
    m.state_dict().remove(name).unwrap()
}

/// A custom op (host-only by its signature) takes device operands through a round trip, and
/// its gradient comes back to the device.
#[test]
fn custom_ops_accept_device_operands() {
    if !emulated_device_available() {
        return;
    }
    struct Double;
    impl CustomOp for Double {
        type Saved = ();
        fn name(&self) -> &'static str {
            "double"
        }
        fn forward(
            &self,
            inputs: &[&Data],
            _: bool,
        ) -> performer::tensor::Result<(Vec<ndarray::ArrayD<f32>>, ())> {
            Ok((vec![inputs[0].mapv(|v| 2.0 * v)], ()))
        }
        fn backward(
            &self,
            _: &[Data],
            _: &(),
            g: &[Option<ndarray::ArrayD<f32>>],
            _: &[bool],
        ) -> performer::tensor::Result<Vec<Option<ndarray::ArrayD<f32>>>> {
            Ok(vec![g[0].as_ref().map(|g| g.mapv(|v| 2.0 * v))])
        }
    }
    let x = seeded(&[3], 40).to_device(DEV).unwrap().to_var();
    let y = apply_custom_op(Double, &[&x]).unwrap().pop().unwrap();
    assert_eq!(y.device(), DEV);
    let grads = y.square().sum_all().backward().unwrap();
    let g = device_grad(&grads, &x, "x");
    let expected: Vec<f32> = x.to_vec().iter().map(|v| 8.0 * v).collect();
    assert_eq!(g.iter().copied().collect::<Vec<_>>(), expected);
}

/// Embedding, layer norm (with weight and bias, and with a bias alone) and cross-entropy with
/// an ignored target, as the start and end of a language model, against the CPU: the loss
/// within 1e-5 and every gradient within 1e-4.
#[test]
fn embedding_layer_norm_and_cross_entropy_match_the_cpu() {
    if !emulated_device_available() {
        return;
    }
    let table = Tensor::var(seeded(&[7, 8], 50).to_array());
    let gamma = Tensor::var(seeded(&[8], 51).to_array());
    let beta = Tensor::var(seeded(&[8], 52).to_array());
    let beta2 = Tensor::var(seeded(&[8], 53).to_array());
    let head = Tensor::var(seeded(&[8, 7], 54).to_array());
    let ids = ndarray::arr2(&[[1i64, 3, 3, 6], [0, 2, 5, 1]]).into_dyn();
    let targets = ndarray::arr1(&[3i64, 3, 6, -100, 2, 5, 1, 0]).into_dyn();
    let f = |t: &Tensor, g: &Tensor, b: &Tensor, b2: &Tensor, h: &Tensor| {
        let x = t.embedding(&ids.view()).unwrap(); // (2, 4, 8)
        let x = x.layer_norm(Some(g), Some(b), 1e-5).unwrap();
        let x = x.layer_norm(None, Some(b2), 1e-5).unwrap();
        let logits = x.matmul(h).unwrap().reshape(&[8, 7]).unwrap();
        logits.cross_entropy(&targets.view(), Some(-100)).unwrap()
    };
    let cpu = f(&table, &gamma, &beta, &beta2, &head);
    let cg = cpu.backward().unwrap();
    let on = |t: &Tensor| t.to_device(DEV).unwrap().to_var();
    let leaves = [&table, &gamma, &beta, &beta2, &head].map(on);
    let dev = f(&leaves[0], &leaves[1], &leaves[2], &leaves[3], &leaves[4]);
    assert_eq!(dev.device(), DEV);
    assert_eq!(dev.shape(), cpu.shape());
    let (lc, ld) = (cpu.item().unwrap(), dev.item().unwrap());
    assert!((lc - ld).abs() <= 1e-5 * lc.abs(), "loss {ld} vs {lc}");
    let dg = dev.backward().unwrap();
    let names = ["table", "gamma", "beta", "beta2", "head"];
    for ((what, c), d) in names
        .iter()
        .zip([&table, &gamma, &beta, &beta2, &head])
        .zip(&leaves)
    {
        let expected = cg.get(c).unwrap();
        assert_close(
            what,
            &device_grad(&dg, d, what).view(),
            &expected.view(),
            1e-4,
        );
    }
}
