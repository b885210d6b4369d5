//! Every kernel of kernels/tensor.cu, through `tensor_ops` on the emulated device, against
//! plain CPU math in f64: forward and backward (the backward formulas also by finite
//! differences of the CPU forward), within 1e-5 of the largest reference value unless said.
//! And the device's faults as typed errors: wrong argument lists, out-of-range copies,
//! invalid cuBLAS arguments, out of memory, operands on two devices. Where a GPU is present
//! (the device bundle) the same tests run on it instead, except the emulator's fault checks.

mod common;

use common::{close, down, emulated, on_gpu, round, up};
use performer_cuda::reference::Rng;
use performer_cuda::tensor_ops::{self as ops, Binary, Reduce, Unary};
use performer_cuda::{
    DeviceBuffer, EmulatedLauncher, Error, GemmStridedBatched, KernelArg, LaunchDims,
    SharedLauncher, Transpose,
};
use std::sync::Arc;

const TOL: f64 = 1e-5;

fn ok<T>(r: performer_cuda::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn randn(rng: &mut Rng, len: usize) -> Vec<f64> {
    round(&rng.normal_vec(len, 1.0))
}

/// Central finite difference of `f` at `x` along every coordinate, contracted with `g`.
fn numeric_grad(x: &[f64], g: &[f64], f: &dyn Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    let h = 1e-6;
    (0..x.len())
        .map(|i| {
            let mut xp = x.to_vec();
            let mut xm = x.to_vec();
            xp[i] += h;
            xm[i] -= h;
            let (fp, fm) = (f(&xp), f(&xm));
            fp.iter()
                .zip(&fm)
                .zip(g)
                .map(|((a, b), gg)| (a - b) / (2.0 * h) * gg)
                .sum()
        })
        .collect()
}

fn erf(x: f64) -> f64 {
    // Abramowitz-Stegun 7.1.26 is too coarse for 1e-5; integrate exp(-t^2) by Simpson instead.
    let n = 2000;
    let h = x / n as f64;
    let f = |t: f64| (-t * t).exp();
    let mut s = f(0.0) + f(x);
    for i in 1..n {
        s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
    }
    s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
}

fn unary_cpu(f: Unary, x: f64) -> f64 {
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    match f {
        Unary::Neg => -x,
        Unary::Exp => x.exp(),
        Unary::Log => x.ln(),
        Unary::Sqrt => x.sqrt(),
        Unary::Relu => x.max(0.0),
        Unary::Gelu => 0.5 * x * (1.0 + erf(x / 2f64.sqrt())),
        Unary::Tanh => x.tanh(),
        Unary::Sigmoid => sig(x),
        Unary::Abs => x.abs(),
        Unary::Affine(a, b) => a as f64 * x + b as f64,
        Unary::Pow(a) => x.powf(a as f64),
        Unary::Recip => 1.0 / x,
        Unary::Square => x * x,
        Unary::Silu => x * sig(x),
        Unary::Clamp(lo, hi) => x.clamp(lo as f64, hi as f64),
        Unary::Elu => {
            if x > 0.0 {
                x
            } else {
                x.exp_m1()
            }
        }
        Unary::Softplus => {
            if x > 20.0 {
                x
            } else {
                x.exp().ln_1p()
            }
        }
        Unary::LeakyRelu(a) => {
            if x > 0.0 {
                x
            } else {
                a as f64 * x
            }
        }
    }
}

#[test]
fn unary_ops_and_their_backward() {
    let Some(dev) = emulated("unary_ops_and_their_backward") else {
        return;
    };
    let mut rng = Rng::new(1);
    // Away from the kinks of relu and abs, positive where log, sqrt and pow need it.
    let x: Vec<f64> = round(
        &rng.normal_vec(300, 1.0)
            .iter()
            .map(|v| if v.abs() < 0.05 { v + 0.2 } else { *v })
            .collect::<Vec<_>>(),
    );
    let xpos: Vec<f64> = round(&x.iter().map(|v| v.abs() + 0.5).collect::<Vec<_>>());
    let g = randn(&mut rng, 300);
    let gd = up(&dev, &g);
    let ops_list = [
        Unary::Neg,
        Unary::Exp,
        Unary::Log,
        Unary::Sqrt,
        Unary::Relu,
        Unary::Gelu,
        Unary::Tanh,
        Unary::Sigmoid,
        Unary::Abs,
        Unary::Affine(1.5, -0.25),
        Unary::Pow(1.7),
        Unary::Recip,
        Unary::Square,
        Unary::Silu,
        Unary::Clamp(-0.5, 0.75),
        Unary::Clamp(f32::NEG_INFINITY, 0.3),
        Unary::Elu,
        Unary::Softplus,
        Unary::LeakyRelu(0.1),
    ];
    for f in ops_list {
        let needs_pos = matches!(f, Unary::Log | Unary::Sqrt | Unary::Pow(_) | Unary::Recip);
        let xs = if needs_pos { &xpos } else { &x };
        let xd = up(&dev, xs);
        let y = ok(ops::unary(&xd, f));
        let want: Vec<f64> = xs.iter().map(|&v| unary_cpu(f, v)).collect();
        close(&format!("{f:?}"), &down(&y), &want, TOL);
        let gx = ok(ops::unary_backward(&xd, &y, &gd, f));
        let want_g: Vec<f64> = xs
            .iter()
            .zip(&g)
            .map(|(&v, &gg)| {
                let h = 1e-6;
                (unary_cpu(f, v + h) - unary_cpu(f, v - h)) / (2.0 * h) * gg
            })
            .collect();
        close(&format!("{f:?} backward"), &down(&gx), &want_g, 1e-4);
    }
}

/// Row-major index -> value of a broadcast operand.
fn bcast_get(x: &[f64], shape: &[usize], out: &[usize], idx: usize) -> f64 {
    let mut rem = idx;
    let mut coords = vec![0; out.len()];
    for a in (0..out.len()).rev() {
        coords[a] = rem % out[a];
        rem /= out[a];
    }
    let lead = out.len() - shape.len();
    let mut off = 0;
    for (i, &d) in shape.iter().enumerate() {
        let c = if d == 1 { 0 } else { coords[i + lead] };
        off = off * d + c;
    }
    x[off]
}

#[test]
fn binary_ops_broadcast_forward_and_backward() {
    let Some(dev) = emulated("binary_ops_broadcast_forward_and_backward") else {
        return;
    };
    let mut rng = Rng::new(2);
    let cases: [(&[usize], &[usize]); 4] = [
        (&[4, 5], &[4, 5]),
        (&[2, 3, 4], &[4]),
        (&[3, 1], &[1, 5]),
        (&[2, 1, 4], &[3, 1]),
    ];
    for (sa, sb) in cases {
        let na: usize = sa.iter().product();
        let nb: usize = sb.iter().product();
        let a = randn(&mut rng, na);
        // Keep b away from 0 (division) and from a (max/min ties).
        let b: Vec<f64> = round(
            &randn(&mut rng, nb)
                .iter()
                .map(|v| v + 3.0)
                .collect::<Vec<_>>(),
        );
        // Pow's base positive (its exponent's gradient needs a logarithm).
        let apos: Vec<f64> = round(&a.iter().map(|v| v.abs() + 0.5).collect::<Vec<_>>());
        let (ad, bd, apos_d) = (up(&dev, &a), up(&dev, &b), up(&dev, &apos));
        for op in [
            Binary::Add,
            Binary::Sub,
            Binary::Mul,
            Binary::Div,
            Binary::Max,
            Binary::Min,
            Binary::Pow,
        ] {
            let (a, ad) = if op == Binary::Pow {
                (&apos, &apos_d)
            } else {
                (&a, &ad)
            };
            let f = |x: f64, y: f64| match op {
                Binary::Add => x + y,
                Binary::Sub => x - y,
                Binary::Mul => x * y,
                Binary::Div => x / y,
                Binary::Max => x.max(y),
                Binary::Min => x.min(y),
                Binary::Pow => x.powf(y),
            };
            let (out, shape) = ok(ops::binary(ad, sa, &bd, sb, op));
            let n: usize = shape.iter().product();
            let eval = |a: &[f64], b: &[f64]| -> Vec<f64> {
                (0..n)
                    .map(|i| f(bcast_get(a, sa, &shape, i), bcast_get(b, sb, &shape, i)))
                    .collect()
            };
            close(
                &format!("{op:?} {sa:?} {sb:?}"),
                &down(&out),
                &eval(a, &b),
                TOL,
            );
            let g = randn(&mut rng, n);
            let gd = up(&dev, &g);
            let (ga, gb) = ok(ops::binary_backward(ad, sa, &bd, sb, &gd, op, true, true));
            let want_a = numeric_grad(a, &g, &|x| eval(x, &b));
            let want_b = numeric_grad(&b, &g, &|y| eval(a, y));
            close(
                &format!("{op:?} {sa:?} {sb:?} da"),
                &down(&ga.unwrap()),
                &want_a,
                1e-4,
            );
            close(
                &format!("{op:?} {sa:?} {sb:?} db"),
                &down(&gb.unwrap()),
                &want_b,
                1e-4,
            );
        }
    }
    // Shapes that do not broadcast: a typed error naming them.
    let a = up(&dev, &[1.0; 6]);
    let b = up(&dev, &[1.0; 4]);
    let err = ops::binary(&a, &[2, 3], &b, &[4], Binary::Add).unwrap_err();
    assert!(
        matches!(err, Error::Shape { .. }) && err.to_string().contains("[2, 3]"),
        "{err}"
    );
}

#[test]
fn strided_copy_permutes_and_slices() {
    let Some(dev) = emulated("strided_copy_permutes_and_slices") else {
        return;
    };
    // x (2, 3, 4) -> transpose of the last two axes of x[:, 1:, :] : shape (2, 4, 2).
    let x: Vec<f64> = (0..24).map(|v| v as f64).collect();
    let xd = up(&dev, &x);
    let y = ok(ops::strided_copy(&xd, 4, &[2, 4, 2], &[12, 1, 4]));
    let mut want = vec![];
    for b in 0..2 {
        for c in 0..4 {
            for r in 1..3 {
                want.push(x[b * 12 + r * 4 + c]);
            }
        }
    }
    close("strided copy", &down(&y), &want, 0.0);
    let err = ops::strided_copy(&xd, 5, &[2, 4, 2], &[12, 1, 4]).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
}

#[test]
fn row_reductions_softmax_and_layer_norm() {
    let Some(dev) = emulated("row_reductions_softmax_and_layer_norm") else {
        return;
    };
    let mut rng = Rng::new(3);
    // 300 columns: more than one pass of a 256-thread block; 5 rows.
    let (rows, cols) = (5usize, 300usize);
    let x = randn(&mut rng, rows * cols);
    let xd = up(&dev, &x);
    let row = |r: usize| &x[r * cols..(r + 1) * cols];
    let sums: Vec<f64> = (0..rows).map(|r| row(r).iter().sum()).collect();
    let maxs: Vec<f64> = (0..rows)
        .map(|r| row(r).iter().cloned().fold(f64::MIN, f64::max))
        .collect();
    let sq: Vec<f64> = (0..rows)
        .map(|r| row(r).iter().map(|v| v * v).sum())
        .collect();
    close(
        "sum",
        &down(&ok(ops::reduce_rows(&xd, rows, cols, Reduce::Sum))),
        &sums,
        TOL,
    );
    close(
        "max",
        &down(&ok(ops::reduce_rows(&xd, rows, cols, Reduce::Max))),
        &maxs,
        0.0,
    );
    close(
        "sumsq",
        &down(&ok(ops::reduce_rows(&xd, rows, cols, Reduce::SumSquares))),
        &sq,
        TOL,
    );
    let cs: Vec<f64> = (0..cols)
        .map(|c| (0..rows).map(|r| x[r * cols + c]).sum())
        .collect();
    close(
        "sum_cols",
        &down(&ok(ops::sum_cols(&xd, rows, cols))),
        &cs,
        TOL,
    );

    let softmax = |x: &[f64], log: bool| -> Vec<f64> {
        let mut out = vec![];
        for r in 0..rows {
            let xr = &x[r * cols..(r + 1) * cols];
            let m = xr.iter().cloned().fold(f64::MIN, f64::max);
            let s: f64 = xr.iter().map(|v| (v - m).exp()).sum();
            out.extend(xr.iter().map(|v| {
                if log {
                    v - m - s.ln()
                } else {
                    (v - m).exp() / s
                }
            }));
        }
        out
    };
    let g = randn(&mut rng, rows * cols);
    let gd = up(&dev, &g);
    for log in [false, true] {
        let y = ok(ops::softmax_rows(&xd, rows, cols, log));
        close(
            &format!("softmax log={log}"),
            &down(&y),
            &softmax(&x, log),
            TOL,
        );
        let gx = ok(ops::softmax_rows_backward(&y, &gd, rows, cols, log));
        let want = numeric_grad(&x, &g, &|x| softmax(x, log));
        close(
            &format!("softmax log={log} backward"),
            &down(&gx),
            &want,
            1e-4,
        );
    }

    let gamma = randn(&mut rng, cols);
    let beta = randn(&mut rng, cols);
    let eps = 1e-5;
    let ln = |x: &[f64], gamma: &[f64], beta: &[f64]| -> Vec<f64> {
        let mut out = vec![];
        for r in 0..rows {
            let xr = &x[r * cols..(r + 1) * cols];
            let mean = xr.iter().sum::<f64>() / cols as f64;
            let var = xr.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / cols as f64;
            let rs = 1.0 / (var + eps).sqrt();
            out.extend(
                xr.iter()
                    .enumerate()
                    .map(|(c, v)| (v - mean) * rs * gamma[c] + beta[c]),
            );
        }
        out
    };
    let (gmd, btd) = (up(&dev, &gamma), up(&dev, &beta));
    let fwd = ok(ops::layer_norm_rows(
        &xd,
        Some(&gmd),
        Some(&btd),
        rows,
        cols,
        eps as f32,
    ));
    close("layer norm", &down(&fwd.y), &ln(&x, &gamma, &beta), 1e-5);
    let (gx, dgamma, dbeta) = ok(ops::layer_norm_rows_backward(
        &xd,
        Some(&gmd),
        &fwd,
        &gd,
        rows,
        cols,
    ));
    close(
        "layer norm dx",
        &down(&gx),
        &numeric_grad(&x, &g, &|x| ln(x, &gamma, &beta)),
        1e-4,
    );
    close(
        "layer norm dgamma",
        &down(&dgamma.unwrap()),
        &numeric_grad(&gamma, &g, &|gm| ln(&x, gm, &beta)),
        1e-4,
    );
    close(
        "layer norm dbeta",
        &down(&dbeta.unwrap()),
        &numeric_grad(&beta, &g, &|bt| ln(&x, &gamma, bt)),
        1e-4,
    );
}

#[test]
fn scale_norm_and_its_backward() {
    let Some(dev) = emulated("scale_norm_and_its_backward") else {
        return;
    };
    let mut rng = Rng::new(11);
    let (rows, cols) = (4usize, 300usize);
    let mut x = randn(&mut rng, rows * cols);
    // One row inside the clamp (norm below eps): no gradient flows through its norm there.
    for v in &mut x[cols..2 * cols] {
        *v *= 1e-4;
    }
    let eps = 1e-2f64;
    let g = [1.3f64];
    let sn = |x: &[f64], g: &[f64]| -> Vec<f64> {
        let mut out = vec![];
        for r in 0..rows {
            let xr = &x[r * cols..(r + 1) * cols];
            let n = xr.iter().map(|v| v * v).sum::<f64>().sqrt().max(eps);
            out.extend(xr.iter().map(|v| v / n * g[0]));
        }
        out
    };
    let (xd, gd) = (up(&dev, &x), up(&dev, &g));
    let (y, norm) = ok(ops::scale_norm_rows(&xd, &gd, rows, cols, eps as f32));
    close("scale norm", &down(&y), &sn(&x, &g), TOL);
    let gy = randn(&mut rng, rows * cols);
    let (gx, dg) = ok(ops::scale_norm_rows_backward(
        &xd,
        &gd,
        &norm,
        &up(&dev, &gy),
        rows,
        cols,
        eps as f32,
    ));
    close(
        "scale norm dx",
        &down(&gx),
        &numeric_grad(&x, &gy, &|x| sn(x, &g)),
        1e-4,
    );
    close(
        "scale norm dg",
        &down(&dg),
        &numeric_grad(&g, &gy, &|g| sn(&x, g)),
        1e-4,
    );
}

#[test]
fn embedding_gather_and_scatter_add() {
    let Some(dev) = emulated("embedding_gather_and_scatter_add") else {
        return;
    };
    let mut rng = Rng::new(4);
    let (vocab, dim) = (11usize, 6usize);
    let table = randn(&mut rng, vocab * dim);
    let td = up(&dev, &table);
    // Repeated ids: the backward must add, not overwrite.
    let ids = [3i64, 0, 10, 3, 3, 7];
    let out = ok(ops::embedding(&td, vocab, dim, &ids));
    let want: Vec<f64> = ids
        .iter()
        .flat_map(|&i| table[i as usize * dim..(i as usize + 1) * dim].to_vec())
        .collect();
    close("embedding", &down(&out), &want, 0.0);
    let g = randn(&mut rng, ids.len() * dim);
    let gt = ok(ops::embedding_backward(&up(&dev, &g), &ids, vocab, dim));
    let mut want_g = vec![0.0; vocab * dim];
    for (r, &i) in ids.iter().enumerate() {
        for c in 0..dim {
            want_g[i as usize * dim + c] += g[r * dim + c];
        }
    }
    close("embedding backward", &down(&gt), &want_g, TOL);
    let err = ops::embedding(&td, vocab, dim, &[1, 11]).unwrap_err();
    assert!(
        matches!(err, Error::Shape { .. }) && err.to_string().contains("ids[1] = 11"),
        "{err}"
    );
}

#[test]
fn cross_entropy_with_ignore_index() {
    let Some(dev) = emulated("cross_entropy_with_ignore_index") else {
        return;
    };
    let mut rng = Rng::new(5);
    let (rows, cols) = (7usize, 13usize);
    let x = randn(&mut rng, rows * cols);
    let targets = [2i64, -100, 12, 0, 5, -100, 7];
    let ce = |x: &[f64]| -> Vec<f64> {
        let (mut s, mut n) = (0.0, 0.0);
        for r in 0..rows {
            if targets[r] == -100 {
                continue;
            }
            let xr = &x[r * cols..(r + 1) * cols];
            let m = xr.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + xr.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            s += lse - xr[targets[r] as usize];
            n += 1.0;
        }
        vec![s / n]
    };
    let xd = up(&dev, &x);
    let fwd = ok(ops::cross_entropy(&xd, rows, cols, &targets, -100));
    close("cross entropy", &down(&fwd.loss), &ce(&x), TOL);
    let gl = up(&dev, &[0.7]);
    let gx = ok(ops::cross_entropy_backward(
        &xd, &fwd, &gl, rows, cols, -100,
    ));
    close(
        "cross entropy backward",
        &down(&gx),
        &numeric_grad(&x, &[0.7], &ce),
        1e-4,
    );
    let err = ops::cross_entropy(&xd, rows, cols, &[0, 1, 2, 3, 4, 5, 13], -100).unwrap_err();
    assert!(err.to_string().contains("targets[6] = 13"), "{err}");
}

#[test]
fn dropout_replays_from_its_seed() {
    let Some(dev) = emulated("dropout_replays_from_its_seed") else {
        return;
    };
    let n = 4000;
    let x = vec![1.0; n];
    let xd = up(&dev, &x);
    let a = down(&ok(ops::dropout(&xd, 0.25, 42, 0)));
    let b = down(&ok(ops::dropout(&xd, 0.25, 42, 0)));
    let c = down(&ok(ops::dropout(&xd, 0.25, 43, 0)));
    assert_eq!(a, b, "same seed, same mask");
    assert_ne!(a, c, "another seed, another mask");
    let kept = a.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
    assert!((kept - 0.75).abs() < 0.03, "kept fraction {kept}");
    assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    // The offset continues the stream: elements [100, 200) of a call at offset 0 are those
    // of a call at offset 100.
    let sub = up(&dev, &x[..100]);
    let d = down(&ok(ops::dropout(&sub, 0.25, 42, 100)));
    assert_eq!(&a[100..200], &d[..]);
}

#[test]
fn rotary_and_its_adjoint() {
    let Some(dev) = emulated("rotary_and_its_adjoint") else {
        return;
    };
    let mut rng = Rng::new(6);
    let (groups, n, d) = (3usize, 5usize, 8usize);
    let x = randn(&mut rng, groups * n * d);
    // sin/cos with each value repeated for its pair, as performer-pytorch builds them.
    let mut sin = vec![];
    let mut cos = vec![];
    for t in 0..n {
        for c in 0..d {
            let f = t as f64 / 10f64.powf((c / 2) as f64 * 2.0 / d as f64);
            sin.push((f as f32).sin() as f64);
            cos.push((f as f32).cos() as f64);
        }
    }
    let rot = |x: &[f64]| -> Vec<f64> {
        (0..x.len())
            .map(|i| {
                let c = i % d;
                let p = (i / d) % n * d + c;
                let r = if c % 2 == 0 { -x[i + 1] } else { x[i - 1] };
                x[i] * cos[p] + r * sin[p]
            })
            .collect()
    };
    let (xd, sd, cd) = (up(&dev, &x), up(&dev, &sin), up(&dev, &cos));
    close(
        "rotary",
        &down(&ok(ops::rotary(&xd, &sd, &cd, groups, n, d, false))),
        &rot(&x),
        TOL,
    );
    let g = randn(&mut rng, x.len());
    let gx = ok(ops::rotary(&up(&dev, &g), &sd, &cd, groups, n, d, true));
    close(
        "rotary adjoint",
        &down(&gx),
        &numeric_grad(&x, &g, &rot),
        1e-4,
    );
}

#[test]
fn token_shift_and_its_backward() {
    let Some(dev) = emulated("token_shift_and_its_backward") else {
        return;
    };
    let mut rng = Rng::new(8);
    let (b, n, d) = (2usize, 5usize, 6usize);
    let x = randn(&mut rng, b * n * d);
    let shift_cpu = |x: &[f64], s: i64| -> Vec<f64> {
        (0..x.len())
            .map(|i| {
                let c = i % d;
                let t = (i / d % n) as i64;
                if !(2..4).contains(&c) {
                    return x[i];
                }
                let src = t - s;
                if (0..n as i64).contains(&src) {
                    x[(i as i64 + (src - t) * d as i64) as usize]
                } else {
                    0.0
                }
            })
            .collect()
    };
    let xd = up(&dev, &x);
    close(
        "shift +1",
        &down(&ok(ops::token_shift(&xd, b, n, d, 2..4, 1))),
        &shift_cpu(&x, 1),
        0.0,
    );
    let g = randn(&mut rng, x.len());
    let gx = ok(ops::token_shift(&up(&dev, &g), b, n, d, 2..4, -1));
    close(
        "shift backward",
        &down(&gx),
        &numeric_grad(&x, &g, &|x| shift_cpu(x, 1)),
        1e-6,
    );
}

#[test]
fn optimizers_and_clipping_match_pytorch_rules() {
    let Some(dev) = emulated("optimizers_and_clipping_match_pytorch_rules") else {
        return;
    };
    let mut rng = Rng::new(9);
    let n = 50;
    let p0 = randn(&mut rng, n);
    let grads: Vec<Vec<f64>> = (0..3).map(|_| randn(&mut rng, n)).collect();
    for decoupled in [false, true] {
        let cfg = ops::AdamConfig {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
            decoupled,
        };
        let (p, m, v) = (
            up(&dev, &p0),
            ok(ops::full(&dev, n, 0.0)),
            ok(ops::full(&dev, n, 0.0)),
        );
        let (mut pc, mut mc, mut vc) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
        for (t, g) in grads.iter().enumerate() {
            ok(ops::adam_step(&p, &up(&dev, g), &m, &v, t as u64 + 1, cfg));
            let (b1, b2, lr, wd) = (0.9f64, 0.99f64, 0.01f64, 0.1f64);
            for i in 0..n {
                let mut gi = g[i];
                if decoupled {
                    pc[i] *= 1.0 - lr * wd
                } else {
                    gi += wd * pc[i]
                }
                mc[i] = b1 * mc[i] + (1.0 - b1) * gi;
                vc[i] = b2 * vc[i] + (1.0 - b2) * gi * gi;
                let bc1 = 1.0 - b1.powi(t as i32 + 1);
                let bc2 = 1.0 - b2.powi(t as i32 + 1);
                pc[i] -= lr * (mc[i] / bc1) / ((vc[i] / bc2).sqrt() + 1e-8);
            }
        }
        close(&format!("adam decoupled={decoupled}"), &down(&p), &pc, TOL);
    }
    let cfg = ops::SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        dampening: 0.1,
        weight_decay: 0.01,
        nesterov: true,
    };
    let (p, buf) = (up(&dev, &p0), ok(ops::full(&dev, n, 0.0)));
    let (mut pc, mut bc) = (p0.clone(), vec![0.0; n]);
    for (t, g) in grads.iter().enumerate() {
        ok(ops::sgd_step(&p, &up(&dev, g), &buf, t == 0, cfg));
        for i in 0..n {
            let d = g[i] + 0.01 * pc[i];
            bc[i] = if t == 0 { d } else { 0.9 * bc[i] + 0.9 * d };
            pc[i] -= 0.1 * (d + 0.9 * bc[i]);
        }
    }
    close("sgd nesterov", &down(&p), &pc, TOL);

    let (a, b) = (up(&dev, &grads[0]), up(&dev, &grads[1]));
    let norm: f64 = grads[..2]
        .iter()
        .flatten()
        .map(|v| v * v)
        .sum::<f64>()
        .sqrt();
    let got = ok(ops::clip_grad_norm(&[&a, &b], 1.0));
    close("total norm", &down(&got), &[norm], TOL);
    let scale = 1.0 / (norm + 1e-6);
    let want: Vec<f64> = grads[0].iter().map(|v| v * scale).collect();
    close("clipped", &down(&a), &want, TOL);
}

#[test]
fn matmul_row_major_through_cublas_conventions() {
    let Some(dev) = emulated("matmul_row_major_through_cublas_conventions") else {
        return;
    };
    let mut rng = Rng::new(10);
    let (batch, m, k, n) = (3usize, 4usize, 5usize, 6usize);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = randn(&mut rng, batch * m * k);
        let b = randn(&mut rng, batch * k * n);
        let c = ok(ops::matmul(
            &up(&dev, &a),
            ta,
            &up(&dev, &b),
            tb,
            batch,
            m,
            k,
            n,
        ));
        let mut want = vec![0.0; batch * m * n];
        for z in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    want[z * m * n + i * n + j] = (0..k)
                        .map(|l| {
                            let av = if ta {
                                a[z * m * k + l * m + i]
                            } else {
                                a[z * m * k + i * k + l]
                            };
                            let bv = if tb {
                                b[z * k * n + j * k + l]
                            } else {
                                b[z * k * n + l * n + j]
                            };
                            av * bv
                        })
                        .sum();
                }
            }
        }
        close(&format!("matmul ta={ta} tb={tb}"), &down(&c), &want, TOL);
    }
}

#[test]
fn device_faults_are_typed_errors() {
    if on_gpu() {
        eprintln!("SKIPPED device_faults_are_typed_errors: the emulator's checks, not a GPU's");
        return;
    }
    let Some(dev) = emulated("device_faults_are_typed_errors") else {
        return;
    };
    let buf = ok(DeviceBuffer::alloc(&dev, 8, performer_cuda::Elem::F32));
    // Fresh memory is NaN: an unwritten element cannot pass as zero.
    assert!(ok(buf.to_f32()).iter().all(|v| v.is_nan()));
    // A wrong argument list: fill_f32 takes (float*, i64, float).
    // SAFETY: the emulator refuses the launch before running the kernel.
    let err = unsafe {
        dev.launch(
            "fill_f32",
            LaunchDims::cover(8, 32),
            &[buf.arg(), KernelArg::I32(8), KernelArg::F32(0.0)],
        )
    }
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("argument 1 is a i64, the launch passed a int"),
        "{err}"
    );
    // SAFETY: as above.
    let err =
        unsafe { dev.launch("fill_f32", LaunchDims::cover(8, 32), &[buf.arg()]) }.unwrap_err();
    assert!(err.to_string().contains("takes 3 arguments"), "{err}");
    // A pointer that is not device memory.
    let host = [0f32; 4];
    // SAFETY: as above.
    let err = unsafe {
        dev.launch(
            "fill_f32",
            LaunchDims::cover(8, 32),
            &[
                KernelArg::Ptr(host.as_ptr() as u64),
                KernelArg::I64(4),
                KernelArg::F32(0.0),
            ],
        )
    }
    .unwrap_err();
    assert!(
        err.to_string().contains("not inside a live allocation"),
        "{err}"
    );
    // A copy past the end of a buffer.
    let err = dev.copy_h2d(buf.ptr_at(4), &[0u8; 20]).unwrap_err();
    assert!(err.to_string().contains("run past the end"), "{err}");
    // An unknown kernel.
    // SAFETY: as above.
    let err = unsafe { dev.launch("no_such_kernel", LaunchDims::cover(1, 32), &[]) }.unwrap_err();
    assert!(
        err.to_string().contains("no kernel named no_such_kernel"),
        "{err}"
    );
    // cuBLAS's argument rules: lda below the stored rows is CUBLAS_STATUS_INVALID_VALUE, and a
    // matrix reaching past its buffer (a wrong leading dimension) is a fault.
    let a = ok(ops::full(&dev, 12, 1.0));
    let mut g = GemmStridedBatched {
        transa: Transpose::No,
        transb: Transpose::No,
        m: 3,
        n: 4,
        k: 4,
        alpha: 1.0,
        a: a.ptr(),
        lda: 2,
        stride_a: 0,
        b: a.ptr(),
        ldb: 4,
        stride_b: 0,
        beta: 0.0,
        c: a.ptr(),
        ldc: 3,
        stride_c: 0,
        batch: 1,
    };
    // SAFETY: the emulator checks every matrix against live allocations before computing.
    let err = unsafe { dev.gemm_strided_batched(&g) }.unwrap_err();
    assert!(err.to_string().contains("INVALID_VALUE: lda=2"), "{err}");
    g.lda = 4;
    // SAFETY: as above.
    let err = unsafe { dev.gemm_strided_batched(&g) }.unwrap_err();
    assert!(
        err.to_string().contains("A of batch 0") && err.to_string().contains("run past the end"),
        "{err}"
    );
    // Out of memory past the device's capacity.
    let small: SharedLauncher = Arc::new(ok(EmulatedLauncher::with_capacity(1000)));
    let _first = ok(DeviceBuffer::alloc(&small, 200, performer_cuda::Elem::F32));
    let err = DeviceBuffer::alloc(&small, 200, performer_cuda::Elem::F32).unwrap_err();
    assert!(
        matches!(
            err,
            Error::OutOfMemory {
                requested: 800,
                in_use: 800,
                capacity: 1000,
                ..
            }
        ),
        "{err}"
    );
    // Operands on two devices.
    let other = ok(ops::full(&small, 8, 1.0));
    let err = ops::binary(&buf, &[8], &other, &[8], Binary::Add).unwrap_err();
    assert!(matches!(err, Error::DeviceMismatch { .. }), "{err}");
}
