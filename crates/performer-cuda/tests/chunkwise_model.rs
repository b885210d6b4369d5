//! A CPU model of the causal kernels' chunkwise decomposition (the formulas of
//! kernels/causal.cu: exclusive chunk states, masked intra-chunk products, the extra
//! ones/dden columns, eps folded into z) checked against the reference's running sums.
//! It pins down the algebra the CUDA code implements, chunk size and masks included, on a
//! machine without a GPU; the GPU tests then check the CUDA indexing.

use performer_cuda::reference::{self as r, Dims, Rng};

const C: usize = 64;

/// chunk_state: per chunk the sum of a^T [b | col] over the chunks before (after, reverse) it.
fn states(
    a: &[f64],
    b: &[f64],
    col: Option<&[f64]>,
    n: usize,
    m: usize,
    e: usize,
    reverse: bool,
) -> (Vec<f64>, Vec<f64>) {
    let nt = n.div_ceil(C);
    let mut s = vec![0.0; nt * m * e];
    let mut sc = vec![0.0; nt * m];
    let mut cur = vec![0.0; m * e];
    let mut curc = vec![0.0; m];
    let order: Vec<usize> = if reverse {
        (0..nt).rev().collect()
    } else {
        (0..nt).collect()
    };
    for c in order {
        s[c * m * e..(c + 1) * m * e].copy_from_slice(&cur);
        sc[c * m..(c + 1) * m].copy_from_slice(&curc);
        for j in c * C..((c + 1) * C).min(n) {
            for f in 0..m {
                for x in 0..e {
                    cur[f * e + x] += a[j * m + f] * b[j * e + x];
                }
                curc[f] += a[j * m + f] * col.map_or(1.0, |cv| cv[j]);
            }
        }
    }
    (s, sc)
}

fn keep(reverse: bool, a: usize, b: usize) -> bool {
    if reverse { b >= a } else { b <= a }
}

/// chunk_output: O[a] = X_a Z_c + sum_{b in mask} (X_a.Y_b) W_b, with den when asked.
#[allow(clippy::too_many_arguments)]
fn output(
    x: &[f64],
    y: &[f64],
    w: &[f64],
    z: &[f64],
    zc: Option<&[f64]>,
    n: usize,
    m: usize,
    e: usize,
    reverse: bool,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; n * e];
    let mut den = vec![0.0; n];
    for a in 0..n {
        let c = a / C;
        let mut o: Vec<f64> = (0..e)
            .map(|col| {
                (0..m)
                    .map(|f| x[a * m + f] * z[(c * m + f) * e + col])
                    .sum()
            })
            .collect();
        let mut d = zc.map_or(0.0, |zc| {
            (0..m)
                .map(|f| x[a * m + f] * (zc[c * m + f] + r::CAUSAL_EPS))
                .sum()
        });
        for b in c * C..((c + 1) * C).min(n) {
            if !keep(reverse, a, b) {
                continue;
            }
            let s: f64 = (0..m).map(|f| x[a * m + f] * y[b * m + f]).sum();
            d += s;
            for col in 0..e {
                o[col] += s * w[b * e + col];
            }
        }
        for col in 0..e {
            out[a * e + col] = if zc.is_some() { o[col] / d } else { o[col] };
        }
        den[a] = d;
    }
    (out, den)
}

/// chunk_grad_feat: O[a] = sum_{b in mask} (X_a.Y_b + xc_a yc_b) W_b + Z_c X_a + xc_a (zc_c + add).
#[allow(clippy::too_many_arguments)]
fn grad_feat(
    x: &[f64],
    xc: Option<&[f64]>,
    y: &[f64],
    yc: Option<&[f64]>,
    w: &[f64],
    z: &[f64],
    zc: &[f64],
    add: f64,
    n: usize,
    m: usize,
    e: usize,
    reverse: bool,
) -> Vec<f64> {
    let mut out = vec![0.0; n * m];
    for a in 0..n {
        let c = a / C;
        let xa = xc.map_or(1.0, |v| v[a]);
        for f in 0..m {
            out[a * m + f] = (0..e)
                .map(|k| x[a * e + k] * z[(c * m + f) * e + k])
                .sum::<f64>()
                + xa * (zc[c * m + f] + add);
        }
        for b in c * C..((c + 1) * C).min(n) {
            if !keep(reverse, a, b) {
                continue;
            }
            let p: f64 = (0..e).map(|k| x[a * e + k] * y[b * e + k]).sum::<f64>()
                + xa * yc.map_or(1.0, |v| v[b]);
            for f in 0..m {
                out[a * m + f] += p * w[b * m + f];
            }
        }
    }
    out
}

#[test]
fn chunkwise_causal_forward_and_backward_match_the_reference() {
    // n spans several chunks and ends mid-chunk, as in the GPU tests.
    for (n, m, e) in [(150, 5, 3), (64, 4, 2), (200, 7, 6)] {
        let dims = Dims {
            bh: 1,
            n,
            d: 1,
            m,
            e,
        };
        let mut rng = Rng::new(n as u64);
        let qf: Vec<f64> = rng.normal_vec(n * m, 1.0).iter().map(|v| v.exp()).collect();
        let kf: Vec<f64> = rng.normal_vec(n * m, 1.0).iter().map(|v| v.exp()).collect();
        let v = rng.normal_vec(n * e, 1.0);
        let g = rng.normal_vec(n * e, 1.0);

        let (h, z) = states(&kf, &v, None, n, m, e, false);
        let (out, den) = output(&qf, &kf, &v, &h, Some(&z), n, m, e, false);
        let (rout, rden) = r::causal_linear_attention(&qf, &kf, &v, dims);
        assert!(r::max_rel_err(&out, &rout) < 1e-12, "out n{n}");
        assert!(r::max_rel_err(&den, &rden) < 1e-12, "den n{n}");

        let dnum: Vec<f64> = (0..n * e).map(|i| g[i] / den[i / e]).collect();
        let dden: Vec<f64> = (0..n)
            .map(|i| -(0..e).map(|c| g[i * e + c] * out[i * e + c]).sum::<f64>() / den[i])
            .collect();
        let dqf = grad_feat(
            &dnum,
            Some(&dden),
            &v,
            None,
            &kf,
            &h,
            &z,
            r::CAUSAL_EPS,
            n,
            m,
            e,
            false,
        );
        let (uu, u) = states(&qf, &dnum, Some(&dden), n, m, e, true);
        let dkf = grad_feat(
            &v,
            None,
            &dnum,
            Some(&dden),
            &qf,
            &uu,
            &u,
            0.0,
            n,
            m,
            e,
            true,
        );
        let (dv, _) = output(&kf, &qf, &dnum, &uu, None, n, m, e, true);
        let (rdq, rdk, rdv) = r::causal_linear_attention_backward(&qf, &kf, &v, &g, dims);
        assert!(
            r::max_rel_err(&dqf, &rdq) < 1e-12,
            "dqf n{n}: {}",
            r::max_rel_err(&dqf, &rdq)
        );
        assert!(
            r::max_rel_err(&dkf, &rdk) < 1e-12,
            "dkf n{n}: {}",
            r::max_rel_err(&dkf, &rdk)
        );
        assert!(
            r::max_rel_err(&dv, &rdv) < 1e-12,
            "dv n{n}: {}",
            r::max_rel_err(&dv, &rdv)
        );
    }
}
