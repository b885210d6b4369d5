//! The generic ops that the models call beyond the basics, on the emulated device against the
//! CPU: narrow / select / split / chunk, pad, cat / stack, broadcast_to, index_select, gather,
//! masked_fill, where, amax (ties), norm (a zero row), clamp, pow of two tensors, max / min
//! (ties), softmax and log-softmax over an inner axis, ELU / softplus / leaky ReLU, scale norm,
//! and dropout (replayed from the generator's state). Forward within 1e-5 and gradients within
//! 1e-4 of the CPU (relative to the largest CPU value); operands on two devices are typed
//! errors; `backward_with_hook` hands device leaves over.

use super::*;
use performer::tensor::rng;
use performer::tensor::testing::{assert_close, gradient};

/// `f` on CPU variables and on the same values as device variables: the output within 1e-5
/// and every input's gradient (of `sum(f(x) * w)` for a fixed random `w`, so that each output
/// element carries its own weight) within 1e-4.
fn check(what: &str, inputs: &[&Tensor], f: impl Fn(&[Tensor]) -> Tensor) {
    let cpu: Vec<Tensor> = inputs.iter().map(|t| Tensor::var(t.to_array())).collect();
    let dev: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_device(DEV).unwrap().to_var())
        .collect();
    let yc = f(&cpu);
    let yd = f(&dev);
    assert_eq!(yd.device(), DEV, "{what}: the output lives on the device");
    assert_close(
        &format!("{what} forward"),
        &yd.to_host().unwrap().to_array().view(),
        &yc.view(),
        1e-5,
    );
    let w = seeded(yc.shape(), 1000);
    let gc = yc.mul(&w).unwrap().sum_all().backward().unwrap();
    let gd = yd
        .mul(&w.to_device(DEV).unwrap())
        .unwrap()
        .sum_all()
        .backward()
        .unwrap();
    assert_eq!(cpu.len(), dev.len(), "{what}: as many inputs on both sides");
    for (i, (c, d)) in cpu.iter().zip(&dev).enumerate() {
        let name = format!("{what} gradient of input {i}");
        assert_close(
            &name,
            &device_grad(&gd, d, &name).view(),
            &gradient(&gc, c, &name).view(),
            1e-4,
        );
    }
}

/// Values rounded to halves: many exact ties.
fn tied(shape: &[usize], seed: u64) -> Tensor {
    let t = seeded(shape, seed);
    Tensor::new(t.to_array().mapv(|v| (v * 2.0).round() / 2.0))
}

#[test]
fn slicing_padding_and_joining_match_the_cpu() {
    if !emulated_device_available() {
        return;
    }
    let x = seeded(&[2, 5, 3], 60);
    let y = seeded(&[2, 2, 3], 61);
    check("narrow", &[&x], |t| t[0].narrow(1, 1, 3).unwrap());
    check("select", &[&x], |t| t[0].select(2, 1).unwrap());
    check("chunk", &[&x], |t| {
        let parts = t[0].chunk(2, 1).unwrap(); // sizes 3 and 2
        Tensor::cat(&[parts[1].clone(), parts[0].clone()], 1).unwrap()
    });
    check("split_sizes", &[&x], |t| {
        let p = t[0].split_sizes(&[1, 2], -1).unwrap();
        p[1].mul(&p[0]).unwrap()
    });
    check("pad", &[&x], |t| t[0].pad(1, 2, 1, 0.5).unwrap());
    check("pad last axis", &[&x], |t| {
        t[0].pad(-1, 0, 2, -1.0).unwrap()
    });
    check("cat", &[&x, &y], |t| {
        Tensor::cat(&[t[0].clone(), t[1].clone(), t[0].clone()], 1).unwrap()
    });
    check("stack", &[&y, &y], |t| {
        Tensor::stack(&[t[0].clone(), t[1].square()], 1).unwrap()
    });
    check("broadcast_to", &[&seeded(&[3, 1], 62)], |t| {
        t[0].broadcast_to(&[2, 3, 4]).unwrap()
    });
    check("contiguous", &[&x], |t| {
        t[0].transpose(0, 2).unwrap().contiguous()
    });
    // A shift along the sequence as the token-shift wrapper builds it.
    check("shift", &[&x], |t| {
        t[0].narrow(1, 0, 4).unwrap().pad(1, 1, 0, 0.0).unwrap()
    });
    // A narrow of zero entries, padded back: nothing is read.
    check("empty narrow", &[&x], |t| {
        t[0].narrow(1, 5, 0).unwrap().pad(1, 2, 0, 1.0).unwrap()
    });
}

#[test]
fn indexing_and_selection_match_the_cpu() {
    if !emulated_device_available() {
        return;
    }
    let x = seeded(&[2, 5, 3], 63);
    check("index_select", &[&x], |t| {
        t[0].index_select(1, &[4, 0, 4, 2]).unwrap()
    });
    check("index_select axis 0", &[&x], |t| {
        t[0].index_select(0, &[1, 1, 0]).unwrap()
    });
    // An index shorter than the input on another axis; repeats along the gathered one.
    let index = ndarray::Array3::from_shape_fn((2, 3, 2), |(b, i, j)| ((b + 2 * i + j) % 5) as i64)
        .into_dyn();
    check("gather", &[&x], |t| t[0].gather(1, &index.view()).unwrap());
    let index0 =
        ndarray::Array3::from_shape_fn((2, 5, 3), |(b, i, j)| ((b + i + j) % 2) as i64).into_dyn();
    check("gather axis 0", &[&x], |t| {
        t[0].gather(0, &index0.view()).unwrap()
    });
    let mask = ndarray::Array2::from_shape_fn((5, 1), |(i, _)| i % 2 == 0).into_dyn();
    check("masked_fill", &[&x], |t| {
        t[0].masked_fill(&mask.view(), -2.5).unwrap()
    });
    let cond =
        ndarray::Array3::from_shape_fn((2, 5, 3), |(b, i, j)| (b + i * j) % 3 == 0).into_dyn();
    check("where", &[&x, &seeded(&[3], 64)], |t| {
        Tensor::where_cond(&cond.view(), &t[0], &t[1]).unwrap()
    });
    // The condition broadcasts too, and so does the result beyond both operands.
    let row = ndarray::arr1(&[true, false, true]).into_dyn();
    check(
        "where broadcast",
        &[&seeded(&[5, 1], 65), &seeded(&[2, 1, 1], 66)],
        |t| Tensor::where_cond(&row.view(), &t[0], &t[1]).unwrap(),
    );
}

#[test]
fn reductions_and_element_wise_ops_match_the_cpu() {
    if !emulated_device_available() {
        return;
    }
    let x = tied(&[2, 5, 3], 67);
    check("amax inner axis with ties", &[&x], |t| {
        t[0].amax(&[1], false).unwrap()
    });
    check("amax two axes keepdim", &[&x], |t| {
        t[0].amax(&[0, 2], true).unwrap()
    });
    check("amax all", &[&x], |t| t[0].amax(&[0, 1, 2], false).unwrap());
    // A row of zeros: the norm's gradient there is 0, not NaN.
    let mut z = seeded(&[2, 5, 3], 68).to_array();
    z.slice_mut(ndarray::s![1, 2, ..]).fill(0.0);
    let z = Tensor::new(z);
    check("norm last axis", &[&z], |t| t[0].norm(&[-1], true).unwrap());
    check("norm outer axes", &[&z], |t| {
        t[0].norm(&[0, 2], false).unwrap()
    });
    check("clamp", &[&x], |t| t[0].clamp(Some(-0.5), Some(0.5)));
    check("clamp below", &[&z], |t| t[0].clamp(Some(1e-5), None));
    check("clamp above", &[&x], |t| t[0].clamp(None, Some(0.0)));
    let base = Tensor::new(seeded(&[2, 5, 3], 69).to_array().mapv(|v| v.abs() + 0.5));
    check("pow", &[&base, &seeded(&[5, 1], 70)], |t| {
        t[0].pow(&t[1]).unwrap()
    });
    let other = tied(&[5, 3], 71);
    check("maximum with ties", &[&x, &other], |t| {
        t[0].maximum(&t[1]).unwrap()
    });
    check("minimum with ties", &[&x, &other], |t| {
        t[0].minimum(&t[1]).unwrap()
    });
    let s = seeded(&[2, 5, 3], 72);
    check("softmax inner axis", &[&s], |t| t[0].softmax(1).unwrap());
    check("log_softmax first axis", &[&s], |t| {
        t[0].log_softmax(0).unwrap()
    });
    check("elu", &[&s], |t| t[0].elu());
    check("softplus", &[&s.mul_scalar(12.0)], |t| t[0].softplus());
    check("leaky_relu", &[&s], |t| t[0].leaky_relu(0.1));
    let mut rows = seeded(&[2, 3, 8], 73).to_array();
    rows.slice_mut(ndarray::s![0, 1, ..]).fill(0.0);
    let rows = Tensor::new(rows);
    let g = Tensor::new(ndarray::arr1(&[1.3f32]).into_dyn());
    check("scale_norm", &[&rows, &g], |t| {
        t[0].scale_norm(&t[1], 1e-5).unwrap()
    });
    // On the host scale_norm is exactly the composition the ScaleNorm layer used.
    let composed = rows
        .div(&rows.norm(&[-1], true).unwrap().clamp(Some(1e-5), None))
        .unwrap()
        .mul(&g)
        .unwrap();
    assert_eq!(
        rows.scale_norm(&g, 1e-5).unwrap().to_vec(),
        composed.to_vec(),
        "scale_norm on the host"
    );
}

/// Matrix products whose batch axes broadcast (and vectors, as PyTorch treats them), and
/// cross-entropy over `(N, C, d)` logits with an ignored target.
#[test]
fn broadcast_products_and_spatial_cross_entropy_match_the_cpu() {
    if !emulated_device_available() {
        return;
    }
    let a = seeded(&[2, 1, 3, 4], 80);
    let b = seeded(&[3, 4, 5], 81);
    check("matmul broadcast batch", &[&a, &b], |t| {
        t[0].matmul(&t[1]).unwrap()
    });
    let m = seeded(&[3, 4], 82);
    check("matmul matrix by batch", &[&m, &b], |t| {
        t[0].matmul(&t[1]).unwrap()
    });
    let v = seeded(&[4], 83);
    check("matmul vector by batch", &[&v, &b], |t| {
        t[0].matmul(&t[1]).unwrap()
    });
    check("matmul batch by vector", &[&a, &v], |t| {
        t[0].matmul(&t[1]).unwrap()
    });
    let logits = seeded(&[2, 5, 3], 84);
    let targets = ndarray::arr2(&[[4i64, 0, -100], [2, 2, 1]]).into_dyn();
    check("cross_entropy (N, C, d)", &[&logits], |t| {
        t[0].cross_entropy(&targets.view(), Some(-100)).unwrap()
    });
}

/// Device dropout: the same generator state gives the same mask (the reversible stack's
/// replay), kept elements are scaled by 1 / (1 - p), about p of them are dropped, the gradient
/// is the same mask, p = 1 drops all, and eval mode is the identity.
#[test]
fn dropout_replays_from_the_generator_state() {
    if !emulated_device_available() {
        return;
    }
    let p = 0.3;
    let x = seeded(&[4, 500], 74).to_device(DEV).unwrap().to_var();
    rng::manual_seed(5);
    let state = rng::get_state();
    let y = x.dropout(p, true).unwrap();
    let after = rng::get_state();
    assert_ne!(state, after, "dropout draws from the global generator");
    rng::set_state(state);
    let replay = x.dropout(p, true).unwrap();
    assert_eq!(rng::get_state(), after);
    let (yv, xv) = (y.to_vec(), x.to_vec());
    assert_eq!(yv, replay.to_vec(), "the same state replays the same mask");
    let other = x.dropout(p, true).unwrap().to_vec();
    assert_ne!(yv, other, "the next call draws a new mask");
    let dropped = yv.iter().filter(|&&v| v == 0.0).count() as f32 / yv.len() as f32;
    assert!((dropped - p).abs() < 0.04, "dropped fraction {dropped}");
    assert_eq!(yv.len(), xv.len());
    for (&yi, &xi) in yv.iter().zip(&xv) {
        assert!(
            yi == 0.0 || (yi - xi / (1.0 - p)).abs() <= 1e-6 * xi.abs().max(1.0),
            "{yi} from {xi}"
        );
    }
    let w = seeded(&[4, 500], 75);
    let grads = y
        .mul(&w.to_device(DEV).unwrap())
        .unwrap()
        .sum_all()
        .backward()
        .unwrap();
    let g = device_grad(&grads, &x, "x");
    let wv = w.to_vec();
    assert_eq!(
        (g.len(), wv.len()),
        (yv.len(), yv.len()),
        "gradient, weights, output"
    );
    for ((&gi, &yi), &wi) in g.iter().zip(&yv).zip(&wv) {
        let want = if yi == 0.0 { 0.0 } else { wi / (1.0 - p) };
        assert!(
            (gi - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{gi} vs {want}"
        );
    }
    assert!(
        x.dropout(1.0, true)
            .unwrap()
            .to_vec()
            .iter()
            .all(|&v| v == 0.0)
    );
    assert_eq!(x.dropout(p, false).unwrap().to_vec(), xv);
}

#[test]
fn mixed_devices_in_the_new_ops_are_typed_errors() {
    if !emulated_device_available() {
        return;
    }
    let h = seeded(&[2, 3], 76);
    let d = h.to_device(DEV).unwrap();
    let g = Tensor::new(ndarray::arr1(&[1.0f32]).into_dyn());
    let cond = ndarray::Array2::from_elem((2, 3), true).into_dyn();
    for (op, r) in [
        ("cat", Tensor::cat(&[d.clone(), h.clone()], 0)),
        ("cat", Tensor::stack(&[h.clone(), d.clone()], 0)),
        ("where", Tensor::where_cond(&cond.view(), &d, &h)),
        ("pow", d.pow(&h)),
        ("maximum", h.maximum(&d)),
        ("scale_norm", d.scale_norm(&g, 1e-5)),
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

/// `backward_with_hook` hands each device leaf's final gradient over (as a host copy equal to
/// the device gradient in the returned store), once.
#[test]
fn backward_with_hook_hands_over_device_leaves() {
    if !emulated_device_available() {
        return;
    }
    let a = seeded(&[3, 4], 77).to_device(DEV).unwrap().to_var();
    let b = seeded(&[4, 2], 78).to_device(DEV).unwrap().to_var();
    let h = Tensor::var(seeded(&[2], 79).to_array());
    let loss = a
        .matmul(&b)
        .unwrap()
        .add(&h.to_device(DEV).unwrap())
        .unwrap()
        .square()
        .mean_all();
    let mut seen = Vec::new();
    let grads = loss
        .backward_with_hook(&mut |id, g| {
            seen.push((id, g.clone()));
            Ok(())
        })
        .unwrap();
    assert_eq!(seen.len(), 3, "one call per leaf");
    for (what, t) in [("a", &a), ("b", &b)] {
        let (_, g) = seen
            .iter()
            .find(|(id, _)| *id == t.id())
            .unwrap_or_else(|| panic!("the hook never saw {what}"));
        assert_eq!(g, &device_grad(&grads, t, what), "{what}");
    }
    let (_, gh) = seen
        .iter()
        .find(|(id, _)| *id == h.id())
        .expect("host leaf");
    assert_eq!(gh, gradient(&grads, &h, "h"));
}
