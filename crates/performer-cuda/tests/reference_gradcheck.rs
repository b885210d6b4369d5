//! The CPU reference's hand-derived backward formulas against central finite differences in
//! f64. The GPU tests compare the kernels with this reference, so this is what ties the kernels'
//! gradients to the true derivatives. Runs everywhere (no CUDA needed).

use performer_cuda::reference::{self as r, Dims, Rng};

const H: f64 = 1e-5;
const TOL: f64 = 1e-6;

/// Central differences of `loss` at `x`, one coordinate at a time.
fn numeric_grad(x: &[f64], loss: &dyn Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + H;
            let up = loss(&xp);
            xp[i] = orig - H;
            let down = loss(&xp);
            xp[i] = orig;
            (up - down) / (2.0 * H)
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn check(name: &str, analytic: &[f64], numeric: &[f64]) {
    let err = r::max_rel_err(analytic, numeric);
    println!("{name}: max rel err {err:.2e}");
    assert!(
        err < TOL,
        "{name}: analytic vs finite differences max rel err {err:.3e} >= {TOL:e}"
    );
}

/// Shapes that cover more than one reference chunk boundary are irrelevant here (the
/// reference does not chunk); small odd sizes catch index mix-ups between n, d, m and e.
fn dims() -> [Dims; 2] {
    [
        Dims {
            bh: 2,
            n: 7,
            d: 5,
            m: 6,
            e: 3,
        },
        Dims {
            bh: 1,
            n: 9,
            d: 4,
            m: 11,
            e: 6,
        },
    ]
}

#[test]
fn feature_map_backward_matches_finite_differences() {
    for dims in dims() {
        let mut rng = Rng::new(1);
        let x = rng.normal_vec(dims.bh * dims.n * dims.d, 1.0);
        let proj = rng.normal_vec(dims.m * dims.d, 1.0);
        let w = rng.normal_vec(dims.bh * dims.n * dims.m, 1.0);
        for is_query in [true, false] {
            let stab = r::feature_stabilizers(&x, &proj, dims, is_query);
            let feat = r::softmax_features_stabilized(&x, &proj, dims, is_query, &stab);
            assert_eq!(feat, r::softmax_features(&x, &proj, dims, is_query));
            let analytic = r::softmax_features_backward(&x, &proj, &feat, &w, dims);
            let numeric = numeric_grad(&x, &|xv| {
                dot(
                    &r::softmax_features_stabilized(xv, &proj, dims, is_query, &stab),
                    &w,
                )
            });
            check(
                &format!("features is_query={is_query} {dims:?}"),
                &analytic,
                &numeric,
            );
        }
    }
}

fn check_linear(causal: bool) {
    for dims in dims() {
        let mut rng = Rng::new(2);
        let fl = dims.bh * dims.n * dims.m;
        // Positive features, as the softmax map produces.
        let qf: Vec<f64> = rng.normal_vec(fl, 1.0).iter().map(|v| v.exp()).collect();
        let kf: Vec<f64> = rng.normal_vec(fl, 1.0).iter().map(|v| v.exp()).collect();
        let v = rng.normal_vec(dims.bh * dims.n * dims.e, 1.0);
        let g = rng.normal_vec(dims.bh * dims.n * dims.e, 1.0);
        let fwd = |q: &[f64], k: &[f64], vv: &[f64]| {
            if causal {
                r::causal_linear_attention(q, k, vv, dims).0
            } else {
                r::linear_attention(q, k, vv, dims)
            }
        };
        let (dq, dk, dv) = if causal {
            r::causal_linear_attention_backward(&qf, &kf, &v, &g, dims)
        } else {
            r::linear_attention_backward(&qf, &kf, &v, &g, dims)
        };
        let tag = if causal { "causal" } else { "non-causal" };
        check(
            &format!("{tag} dqf {dims:?}"),
            &dq,
            &numeric_grad(&qf, &|x| dot(&fwd(x, &kf, &v), &g)),
        );
        check(
            &format!("{tag} dkf {dims:?}"),
            &dk,
            &numeric_grad(&kf, &|x| dot(&fwd(&qf, x, &v), &g)),
        );
        check(
            &format!("{tag} dv {dims:?}"),
            &dv,
            &numeric_grad(&v, &|x| dot(&fwd(&qf, &kf, x), &g)),
        );
    }
}

#[test]
fn causal_linear_attention_backward_matches_finite_differences() {
    check_linear(true);
}

#[test]
fn linear_attention_backward_matches_finite_differences() {
    check_linear(false);
}

#[test]
fn causal_forward_matches_the_quadratic_definition() {
    // out_i = sum_{j<=i} (q_i.k_j) v_j / (q_i . (sum_{j<=i} k_j + eps)), written out directly.
    let dims = Dims {
        bh: 2,
        n: 10,
        d: 1,
        m: 4,
        e: 3,
    };
    let mut rng = Rng::new(3);
    let qf: Vec<f64> = rng
        .normal_vec(dims.bh * dims.n * dims.m, 1.0)
        .iter()
        .map(|v| v.exp())
        .collect();
    let kf: Vec<f64> = rng
        .normal_vec(dims.bh * dims.n * dims.m, 1.0)
        .iter()
        .map(|v| v.exp())
        .collect();
    let v = rng.normal_vec(dims.bh * dims.n * dims.e, 1.0);
    let (out, _) = r::causal_linear_attention(&qf, &kf, &v, dims);
    let (n, m, e) = (dims.n, dims.m, dims.e);
    for b in 0..dims.bh {
        for i in 0..n {
            let q = &qf[(b * n + i) * m..(b * n + i + 1) * m];
            let mut num = vec![0.0; e];
            let mut den = 0.0;
            for j in 0..=i {
                let k = &kf[(b * n + j) * m..(b * n + j + 1) * m];
                let a = dot(q, k);
                den += a;
                for c in 0..e {
                    num[c] += a * v[(b * n + j) * e + c];
                }
            }
            den += r::CAUSAL_EPS * q.iter().sum::<f64>();
            for c in 0..e {
                let want = num[c] / den;
                let got = out[(b * n + i) * e + c];
                assert!(
                    (want - got).abs() <= 1e-12 * want.abs().max(1.0),
                    "b{b} i{i} c{c}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn full_attention_backward_matches_finite_differences() {
    let dims = Dims {
        bh: 2,
        n: 6,
        d: 4,
        m: 5,
        e: 4,
    };
    let mut rng = Rng::new(4);
    let q = rng.normal_vec(dims.bh * dims.n * dims.d, 1.0);
    let k = rng.normal_vec(dims.bh * dims.n * dims.d, 1.0);
    let v = rng.normal_vec(dims.bh * dims.n * dims.e, 1.0);
    let proj = rng.normal_vec(dims.m * dims.d, 1.0);
    let g = rng.normal_vec(dims.bh * dims.n * dims.e, 1.0);
    for causal in [true, false] {
        let sq = r::feature_stabilizers(&q, &proj, dims, true);
        let sk = r::feature_stabilizers(&k, &proj, dims, false);
        let f = |qq: &[f64], kk: &[f64], vv: &[f64]| {
            let qf = r::softmax_features_stabilized(qq, &proj, dims, true, &sq);
            let kf = r::softmax_features_stabilized(kk, &proj, dims, false, &sk);
            let out = if causal {
                r::causal_linear_attention(&qf, &kf, vv, dims).0
            } else {
                r::linear_attention(&qf, &kf, vv, dims)
            };
            dot(&out, &g)
        };
        let (dq, dk, dv) = r::fast_attention_backward(&q, &k, &v, &proj, &g, dims, causal);
        check(
            &format!("full causal={causal} dq"),
            &dq,
            &numeric_grad(&q, &|x| f(x, &k, &v)),
        );
        check(
            &format!("full causal={causal} dk"),
            &dk,
            &numeric_grad(&k, &|x| f(&q, x, &v)),
        );
        check(
            &format!("full causal={causal} dv"),
            &dv,
            &numeric_grad(&v, &|x| f(&q, &k, x)),
        );
    }
}
