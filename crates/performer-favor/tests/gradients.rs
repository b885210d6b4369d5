//! Finite-difference checks of every FAVOR+ op, and the fused op against the composed ones.

use ndarray::{ArrayD, IxDyn};
use performer_favor::*;
use performer_tensor::ops::Activation;
use performer_tensor::rng::Generator;
use performer_tensor::testing::{assert_abs_close, assert_close};
use performer_tensor::{GradcheckOptions, Tensor, gradcheck};

fn randn(shape: &[usize], seed: u64, scale: f32) -> ArrayD<f32> {
    let mut g = Generator::seeded(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || scale * g.normal())
}

fn positive(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut g = Generator::seeded(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || 0.2 + g.next_f32())
}

fn proj(m: usize, d: usize, seed: u64) -> ArrayD<f32> {
    gaussian_orthogonal_random_matrix_with(
        m,
        d,
        OrthoScaling::Gaussian,
        &mut Generator::seeded(seed),
    )
    .unwrap()
    .into_dyn()
}

fn opts() -> GradcheckOptions {
    GradcheckOptions::default()
}

/// The reference's feature maps built from (gradchecked) tensor ops, stabilizer detached.
fn composed_features(x: &Tensor, p: &Tensor, map: FeatureMap, is_query: bool) -> Tensor {
    let d = x.shape()[3] as f32;
    let m = p.shape()[0] as f32;
    let dn = d.powf(-0.25);
    let u = x
        .mul_scalar(dn)
        .matmul(&p.transpose(0, 1).unwrap())
        .unwrap();
    match map {
        FeatureMap::Softmax => {
            let diag = x
                .square()
                .sum(&[-1], true)
                .unwrap()
                .mul_scalar(0.5 * dn * dn);
            let stab = if is_query {
                u.amax(&[-1], true).unwrap()
            } else {
                u.amax(&[-1, -2], true).unwrap()
            }
            .detach();
            u.sub(&diag)
                .unwrap()
                .sub(&stab)
                .unwrap()
                .exp()
                .add_scalar(1e-4)
                .mul_scalar(m.powf(-0.5))
        }
        FeatureMap::Generalized(f) => f.apply(&u).add_scalar(1e-3),
    }
}

/// Forward and gradients (of x and of the projection) of two feature-map implementations agree.
fn assert_same_features(map: FeatureMap, is_query: bool) {
    let xa = randn(&[2, 2, 7, 4], 1, 0.9);
    let pa = proj(6, 4, 2);
    let run = |fused: bool| {
        let (x, p) = (Tensor::var(xa.clone()), Tensor::var(pa.clone()));
        let f = match (fused, map) {
            (false, _) => composed_features(&x, &p, map, is_query),
            (true, FeatureMap::Softmax) => softmax_kernel(&x, &p, is_query, true, 1e-4).unwrap(),
            (true, FeatureMap::Generalized(k)) => {
                generalized_kernel(&x, Some(&p), k, true, 1e-3).unwrap()
            }
        };
        let probe = Tensor::new(randn(f.shape(), 3, 1.0));
        let g = f.mul(&probe).unwrap().sum_all().backward().unwrap();
        (
            f.to_array(),
            g.get(&x).unwrap().clone(),
            g.get(&p).unwrap().clone(),
        )
    };
    let (a, b) = (run(true), run(false));
    for (name, x, y) in [
        ("features", &a.0, &b.0),
        ("dx", &a.1, &b.1),
        ("dproj", &a.2, &b.2),
    ] {
        assert_close(&format!("{map:?} query {is_query}: {name}"), x, y, 1e-5);
    }
}

#[test]
fn softmax_kernel_matches_the_reference_formula_and_its_detached_gradient() {
    assert_same_features(FeatureMap::Softmax, true);
    assert_same_features(FeatureMap::Softmax, false);
}

#[test]
fn generalized_kernel_matches_composition_for_every_kernel() {
    for k in [
        Activation::Relu,
        Activation::Gelu,
        Activation::Elu,
        Activation::Softplus,
        Activation::Sigmoid,
        Activation::Tanh,
        Activation::Silu,
        Activation::LeakyRelu(0.01),
    ] {
        assert_same_features(FeatureMap::Generalized(k), true);
    }
}

/// Smooth kernels have exact gradients (no detached stabilizer): check them by finite differences.
#[test]
fn generalized_kernel_gradients() {
    let x = randn(&[1, 3, 5, 4], 3, 0.8);
    let p = proj(9, 4, 4);
    for k in [
        Activation::Gelu,
        Activation::Softplus,
        Activation::Tanh,
        Activation::Silu,
        Activation::Sigmoid,
    ] {
        gradcheck(
            |t| generalized_kernel(&t[0], Some(&t[1]), k, true, 1e-3),
            &[x.clone(), p.clone()],
            opts(),
        )
        .unwrap_or_else(|e| panic!("{k:?}: {e}"));
    }
    gradcheck(
        |t| generalized_kernel(&t[0], None, Activation::Gelu, true, 1e-3),
        std::slice::from_ref(&x),
        opts(),
    )
    .unwrap();
}

#[test]
fn linear_attention_gradients() {
    let q = positive(&[2, 1, 9, 5], 5);
    let k = positive(&[2, 1, 6, 5], 6);
    let v = randn(&[2, 1, 6, 3], 7, 1.0);
    gradcheck(
        |t| linear_attention_chunked(&t[0], &t[1], &t[2], 4),
        &[q, k, v],
        opts(),
    )
    .unwrap();
}

#[test]
fn causal_linear_attention_gradients() {
    let q = positive(&[1, 2, 11, 5], 8);
    let k = positive(&[1, 2, 11, 5], 9);
    let v = randn(&[1, 2, 11, 3], 10, 1.0);
    for chunk in [1, 4, 64] {
        gradcheck(
            |t| causal_linear_attention(&t[0], &t[1], &t[2], 1e-6, chunk),
            &[q.clone(), k.clone(), v.clone()],
            opts(),
        )
        .unwrap();
    }
}

#[test]
fn favor_attention_gradients_including_the_projection() {
    let q = randn(&[1, 2, 9, 4], 11, 0.6);
    let k = randn(&[1, 2, 9, 4], 12, 0.6);
    let v = randn(&[1, 2, 9, 3], 13, 1.0);
    let p = proj(7, 4, 14);
    for causal in [false, true] {
        // Softmax's stabilizers are detached (the reference's gradient), which finite differences
        // see only through the tiny eps term; smooth positive kernels are exact and well
        // conditioned (kernels that go negative can make the normalizer vanish).
        for map in [
            FeatureMap::Softmax,
            FeatureMap::Generalized(Activation::Softplus),
            FeatureMap::Generalized(Activation::Sigmoid),
        ] {
            gradcheck(
                |t| favor_attention(&t[0], &t[1], &t[2], &t[3], map, causal, 4),
                &[q.clone(), k.clone(), v.clone(), p.clone()],
                opts(),
            )
            .unwrap_or_else(|e| panic!("causal {causal} {map:?}: {e}"));
        }
    }
}

/// The fused op equals the composition of the reference's functions, forward and backward.
#[test]
fn fused_equals_composed() {
    let (qa, ka, va) = (
        randn(&[2, 3, 37, 8], 15, 1.0),
        randn(&[2, 3, 37, 8], 16, 1.0),
        randn(&[2, 3, 37, 8], 17, 1.0),
    );
    let pa = proj(13, 8, 18);
    let maps = [
        FeatureMap::Softmax,
        FeatureMap::Generalized(Activation::Relu),
        FeatureMap::Generalized(Activation::Gelu),
    ];
    for (causal, map) in [false, true].into_iter().flat_map(|c| maps.map(|m| (c, m))) {
        let run = |fused: bool| {
            let (q, k, v) = (
                Tensor::var(qa.clone()),
                Tensor::var(ka.clone()),
                Tensor::var(va.clone()),
            );
            let p = Tensor::new(pa.clone());
            let out = if fused {
                favor_attention(&q, &k, &v, &p, map, causal, 16).unwrap()
            } else {
                let (qf, kf) = match map {
                    FeatureMap::Softmax => (
                        softmax_kernel(&q, &p, true, true, 1e-4).unwrap(),
                        softmax_kernel(&k, &p, false, true, 1e-4).unwrap(),
                    ),
                    FeatureMap::Generalized(f) => (
                        generalized_kernel(&q, Some(&p), f, true, 1e-3).unwrap(),
                        generalized_kernel(&k, Some(&p), f, true, 1e-3).unwrap(),
                    ),
                };
                if causal {
                    causal_linear_attention(&qf, &kf, &v, 1e-6, 5).unwrap()
                } else {
                    linear_attention(&qf, &kf, &v).unwrap()
                }
            };
            let probe = Tensor::new(randn(out.shape(), 19, 1.0));
            let g = out.mul(&probe).unwrap().sum_all().backward().unwrap();
            (
                out.to_array(),
                g.get(&q).unwrap().clone(),
                g.get(&k).unwrap().clone(),
                g.get(&v).unwrap().clone(),
            )
        };
        let (a, b) = (run(true), run(false));
        let what = |name: &str| format!("{map:?} causal {causal}: {name}");
        assert_close(&what("out"), &a.0, &b.0, 1e-5);
        assert_close(&what("dq"), &a.1, &b.1, 1e-4);
        assert_close(&what("dk"), &a.2, &b.2, 1e-4);
        assert_close(&what("dv"), &a.3, &b.3, 1e-4);
    }
}

/// Causal attention equals the naive quadratic sum; the last position equals non-causal
/// attention over the whole prefix; chunk size changes nothing beyond rounding.
#[test]
fn causal_consistency() {
    let n = 70;
    let q = Tensor::new(positive(&[1, 2, n, 6], 20));
    let k = Tensor::new(positive(&[1, 2, n, 6], 21));
    let v = Tensor::new(randn(&[1, 2, n, 4], 22, 1.0));
    let reference = causal_linear_attention(&q, &k, &v, 1e-6, 1).unwrap();
    for chunk in [3, 16, 64, 128] {
        let out = causal_linear_attention(&q, &k, &v, 1e-6, chunk).unwrap();
        assert_abs_close(
            &format!("chunk {chunk}"),
            &out.view(),
            &reference.view(),
            1e-5,
        );
    }
    // naive: out_i = sum_{j<=i} (q_i.k_j) v_j / (q_i.(sum_{j<=i} k_j + eps))
    let (qv, kv, vv, ov) = (q.view(), k.view(), v.view(), reference.view());
    for h in 0..2 {
        for i in [0, 1, 35, n - 1] {
            let mut num = [0f64; 4];
            let mut den = 0f64;
            for j in 0..=i {
                let dot: f64 = (0..6)
                    .map(|f| (qv[[0, h, i, f]] * kv[[0, h, j, f]]) as f64)
                    .sum();
                for e in 0..4 {
                    num[e] += dot * vv[[0, h, j, e]] as f64;
                }
                den += dot;
            }
            den += 1e-6 * (0..6).map(|f| qv[[0, h, i, f]] as f64).sum::<f64>();
            for e in 0..4 {
                assert!(((num[e] / den) as f32 - ov[[0, h, i, e]]).abs() < 1e-5);
            }
        }
    }
    // last position vs non-causal over the prefix (the eps term is negligible at 1e-6)
    let non = linear_attention(&q, &k, &v).unwrap();
    for h in 0..2 {
        for e in 0..4 {
            let (a, b) = (
                reference.view()[[0, h, n - 1, e]],
                non.view()[[0, h, n - 1, e]],
            );
            assert!((a - b).abs() < 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let q = Tensor::zeros(&[1, 2, 5, 4]);
    let p = Tensor::zeros(&[6, 3]);
    assert!(softmax_kernel(&q, &p, true, true, 1e-4).is_err());
    let k = Tensor::zeros(&[1, 2, 6, 4]);
    assert!(causal_linear_attention(&q, &k, &k, 1e-6, 8).is_err());
    assert!(linear_attention(&q, &k, &Tensor::zeros(&[1, 2, 5, 4])).is_err());
    assert!(linear_attention_chunked(&q, &q, &q, 0).is_err());
    let err = favor_attention(
        &q,
        &q,
        &q,
        &Tensor::zeros(&[6, 4]),
        FeatureMap::Softmax,
        true,
        0,
    )
    .unwrap_err();
    assert!(err.to_string().contains("chunk"));
    assert!(
        FastAttention::new(FastAttentionConfig {
            nb_features: Some(0),
            ..FastAttentionConfig::new(8)
        })
        .is_err()
    );
    assert!(
        FastAttention::new(FastAttentionConfig::new(1)).is_err(),
        "int(1 ln 1) = 0 features"
    );
}

/// Causal linear attention written quadratically with tensor ops (the masked n x n product):
/// `out = mask(q k^T) v / (mask(q k^T) 1 + eps * q 1)`.
fn quadratic_causal(q: &Tensor, k: &Tensor, v: &Tensor, eps: f32) -> Tensor {
    let n = q.shape()[2];
    let mask = Tensor::new(ArrayD::from_shape_fn(IxDyn(&[n, n]), |ix| {
        if ix[1] <= ix[0] { 1.0 } else { 0.0 }
    }));
    let a = q
        .matmul(&k.transpose(2, 3).unwrap())
        .unwrap()
        .mul(&mask)
        .unwrap();
    let den = a
        .sum(&[-1], true)
        .unwrap()
        .add(&q.sum(&[-1], true).unwrap().mul_scalar(eps))
        .unwrap();
    a.matmul(v).unwrap().div(&den).unwrap()
}

/// Forward and input gradients (under a random probe) of two attention implementations agree
/// within `tol` of the largest magnitude.
fn assert_same_attention(
    name: &str,
    inputs: [&ArrayD<f32>; 3],
    ours: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    reference: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    tol: f32,
) {
    let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor| {
        let [q, k, v] = inputs.map(|a| Tensor::var(a.clone()));
        let out = f(&q, &k, &v);
        let probe = Tensor::new(randn(out.shape(), 99, 1.0));
        let g = out.mul(&probe).unwrap().sum_all().backward().unwrap();
        let mut res = vec![out.to_array()];
        res.extend([&q, &k, &v].map(|t| g.get(t).unwrap().clone()));
        res
    };
    let (a, b) = (run(&ours), run(&reference));
    for (what, x, y) in ["out", "dq", "dk", "dv"]
        .iter()
        .zip(&a)
        .zip(&b)
        .map(|((w, x), y)| (w, x, y))
    {
        assert_close(&format!("{name}: {what}"), x, y, tol);
    }
}

/// Several backward segments (256 positions each), chunks that do not divide them, and a
/// partial last chunk, against the quadratic form.
#[test]
fn causal_matches_quadratic_form_over_many_segments() {
    let n = 600;
    let q = positive(&[1, 2, n, 6], 30);
    let k = positive(&[1, 2, n, 6], 31);
    let v = randn(&[1, 2, n, 5], 32, 1.0);
    for chunk in [16, 48, 64, 256] {
        assert_same_attention(
            &format!("causal chunk {chunk}"),
            [&q, &k, &v],
            |q, k, v| causal_linear_attention(q, k, v, 1e-6, chunk).unwrap(),
            |q, k, v| quadratic_causal(q, k, v, 1e-6),
            2e-5,
        );
    }
    assert_same_attention(
        "non-causal",
        [&q, &k, &v],
        |q, k, v| linear_attention(q, k, v).unwrap(),
        |q, k, v| {
            let a = q.matmul(&k.transpose(2, 3).unwrap()).unwrap();
            let den = a.sum(&[-1], true).unwrap();
            a.matmul(v).unwrap().div(&den).unwrap()
        },
        2e-5,
    );
}

/// The fused op (FastAttention's) over many segments equals the reference feature map followed
/// by the quadratic causal form.
#[test]
fn fused_causal_matches_quadratic_form_over_many_segments() {
    let n = 520;
    let q = randn(&[1, 2, n, 8], 33, 0.8);
    let k = randn(&[1, 2, n, 8], 34, 0.8);
    let v = randn(&[1, 2, n, 8], 35, 1.0);
    let p = Tensor::new(proj(20, 8, 36));
    for chunk in [32, 64] {
        assert_same_attention(
            &format!("fused chunk {chunk}"),
            [&q, &k, &v],
            |q, k, v| favor_attention(q, k, v, &p, FeatureMap::Softmax, true, chunk).unwrap(),
            |q, k, v| {
                let qf = composed_features(q, &p, FeatureMap::Softmax, true);
                let kf = composed_features(k, &p, FeatureMap::Softmax, false);
                quadratic_causal(&qf, &kf, v, 1e-6)
            },
            1e-4,
        );
    }
}

/// Heads that are strided views (a permuted `(b, n, h, d)` input), a broadcast output gradient,
/// and lengths of 1 and 0 go through the same kernels as contiguous inputs.
#[test]
fn strided_inputs_and_tiny_lengths() {
    let p = Tensor::new(proj(12, 8, 40));
    for causal in [false, true] {
        let n = 70;
        let raw = [41, 42, 43].map(|s| randn(&[1, n, 2, 8], s, 0.8));
        let run = |permuted: bool| {
            let leaves = raw.clone().map(Tensor::var);
            let [q, k, v] = leaves.clone().map(|t| {
                if permuted {
                    t.permute(&[0, 2, 1, 3]).unwrap()
                } else {
                    Tensor::new(
                        t.permute(&[0, 2, 1, 3])
                            .unwrap()
                            .to_array()
                            .as_standard_layout()
                            .to_owned(),
                    )
                }
            });
            let out = favor_attention(&q, &k, &v, &p, FeatureMap::Softmax, causal, 16).unwrap();
            let res = out.to_array();
            if permuted {
                let g = out.sum_all().backward().unwrap();
                (
                    res,
                    leaves
                        .iter()
                        .map(|t| g.get(t).unwrap().clone())
                        .collect::<Vec<_>>(),
                )
            } else {
                (res, vec![])
            }
        };
        let (strided, grads) = run(true);
        let (contiguous, _) = run(false);
        assert_abs_close(
            &format!("causal {causal}: strided heads"),
            &strided,
            &contiguous,
            1e-6,
        );
        assert!(grads.iter().all(|g| g.iter().all(|x| x.is_finite())));
        for n in [1, 0] {
            let [q, k, v] = [44, 45, 46].map(|s| Tensor::var(randn(&[1, 2, n, 8], s, 0.8)));
            let out = favor_attention(&q, &k, &v, &p, FeatureMap::Softmax, causal, 16).unwrap();
            assert_eq!(out.shape(), &[1, 2, n, 8]);
            let g = out.sum_all().backward().unwrap();
            assert_eq!(g.get(&q).unwrap().shape(), &[1, 2, n, 8]);
            if n == 1 && causal {
                // One position attends to itself only: the output is its value (up to the
                // normalizer's eps).
                let (o, vv) = (out.to_array(), v.to_array());
                assert_eq!(o.shape(), vv.shape());
                assert!(
                    o.iter()
                        .zip(vv.iter())
                        .all(|(a, b)| (a - b).abs() < 1e-3 * b.abs() + 1e-5)
                );
            }
        }
    }
}
