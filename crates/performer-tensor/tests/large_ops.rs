//! Tensors past `parallel::PAR_THRESHOLD` take the threaded, blocked code paths of softmax,
//! layer_norm, reductions and cross-entropy. Their results must equal straightforward f64
//! computations, and their gradients the serial paths' on small slices of the same data.

use ndarray::{ArrayD, Axis, IxDyn, Slice};
use performer_tensor::parallel::PAR_THRESHOLD;
use performer_tensor::{Tensor, rng::Generator};

fn randn(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut g = Generator::seeded(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || 2.0 * g.normal())
}

#[track_caller]
fn assert_close(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>, tol: f32) {
    assert_eq!(got.shape(), want.shape(), "{what}");
    for ((pos, &g), &w) in got.indexed_iter().zip(want.iter()) {
        let ok = (g - w).abs() <= tol * (1.0 + w.abs()) || (g.is_nan() && w.is_nan());
        assert!(ok, "{what}: at {pos:?} got {g}, want {w}");
    }
}

/// Softmax / log-softmax along `ax` in f64, lane by lane.
fn naive_softmax(x: &ArrayD<f32>, ax: usize, log: bool) -> ArrayD<f32> {
    let mut out = x.clone();
    for mut lane in out.lanes_mut(Axis(ax)) {
        let m = lane.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let s: f64 = lane.iter().map(|&v| (v as f64 - m).exp()).sum();
        lane.mapv_inplace(|v| {
            if log {
                (v as f64 - m - s.ln()) as f32
            } else {
                ((v as f64 - m).exp() / s) as f32
            }
        });
    }
    out
}

const SHAPE: [usize; 3] = [6, 70, 90];

#[test]
fn softmax_on_every_axis_matches_f64() {
    assert!(SHAPE.iter().product::<usize>() >= PAR_THRESHOLD);
    let mut x = randn(&SHAPE, 1);
    // a masked stretch, as attention masks produce
    x.slice_axis_mut(Axis(2), Slice::from(80..90))
        .fill(f32::NEG_INFINITY);
    x.slice_axis_mut(Axis(2), Slice::from(80..90))
        .slice_axis_mut(Axis(1), Slice::from(0..1))
        .fill(f32::NEG_INFINITY);
    let t = Tensor::new(x.clone());
    for ax in 0..3 {
        let got = t.softmax(ax as isize).unwrap().to_array();
        assert_close(
            &format!("softmax axis {ax}"),
            &got,
            &naive_softmax(&x, ax, false),
            1e-6,
        );
        // a permuted (non-contiguous) input gives the same values
        let p = Tensor::new(
            x.clone()
                .permuted_axes(IxDyn(&[2, 0, 1]))
                .as_standard_layout()
                .into_owned(),
        )
        .permute(&[1, 2, 0])
        .unwrap();
        assert!(!p.data().is_standard_layout());
        assert_close(
            &format!("softmax axis {ax} (view)"),
            &p.softmax(ax as isize).unwrap().to_array(),
            &got,
            0.0,
        );
    }
    let finite = randn(&SHAPE, 2);
    let t = Tensor::new(finite.clone());
    for ax in 0..3 {
        let got = t.log_softmax(ax as isize).unwrap().to_array();
        assert_close(
            &format!("log_softmax axis {ax}"),
            &got,
            &naive_softmax(&finite, ax, true),
            2e-6,
        );
    }
    // a lane of -inf gives NaN, as in PyTorch
    let mut lanes = randn(&[2, 40000], 3);
    lanes.index_axis_mut(Axis(0), 1).fill(f32::NEG_INFINITY);
    let s = Tensor::new(lanes).softmax(-1).unwrap();
    assert!(s.view().index_axis(Axis(0), 1).iter().all(|v| v.is_nan()));
    assert!((s.view().index_axis(Axis(0), 0).sum() - 1.0).abs() < 1e-4);
}

/// The gradient of a large op equals the gradients of the same op on slices along an axis the
/// op treats independently (each slice small enough for the serial path).
fn check_gradient_by_slices(
    x: &ArrayD<f32>,
    slice_axis: usize,
    step: usize,
    op: impl Fn(&Tensor) -> Tensor,
) {
    let seed = randn(x.shape(), 9);
    let v = Tensor::var(x.clone());
    let full = op(&v).backward_with_grad(seed.clone()).unwrap();
    let full = full.get(&v).unwrap();
    let len = x.shape()[slice_axis];
    for start in (0..len).step_by(step) {
        let s = Slice::from(start..(start + step).min(len));
        let part = x.slice_axis(Axis(slice_axis), s).to_owned();
        assert!(part.len() < PAR_THRESHOLD);
        let pv = Tensor::var(part);
        let g = op(&pv)
            .backward_with_grad(seed.slice_axis(Axis(slice_axis), s).to_owned())
            .unwrap();
        assert_close(
            &format!("gradient slice {start}"),
            &full.slice_axis(Axis(slice_axis), s).to_owned(),
            g.get(&pv).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn large_softmax_gradients_match_the_serial_path() {
    let x = randn(&SHAPE, 4);
    check_gradient_by_slices(&x, 0, 2, |t| t.softmax(-1).unwrap());
    check_gradient_by_slices(&x, 0, 2, |t| t.softmax(1).unwrap());
    check_gradient_by_slices(&x, 2, 30, |t| t.softmax(0).unwrap());
    check_gradient_by_slices(&x, 0, 2, |t| t.log_softmax(-1).unwrap());
    check_gradient_by_slices(&x, 1, 20, |t| t.log_softmax(0).unwrap());
}

#[test]
fn large_layer_norm_matches_f64_and_the_serial_gradients() {
    let (rows, d) = (400, 96);
    let x = randn(&[rows, d], 5);
    let w = randn(&[d], 6);
    let b = randn(&[d], 7);
    let (wt, bt) = (Tensor::var(w.clone()), Tensor::var(b.clone()));
    let xt = Tensor::var(x.clone());
    let y = xt.layer_norm(Some(&wt), Some(&bt), 1e-5).unwrap();
    let mut want = x.clone();
    for (mut r, xr) in want.rows_mut().into_iter().zip(x.rows()) {
        let m = xr.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = xr.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / d as f64;
        for j in 0..d {
            r[j] = (((xr[j] as f64 - m) / (var + 1e-5).sqrt()) * w[j] as f64 + b[j] as f64) as f32;
        }
    }
    assert_close("layer_norm", &y.to_array(), &want, 2e-6);
    check_gradient_by_slices(&x, 0, 50, |t| {
        t.layer_norm(Some(&wt), Some(&bt), 1e-5).unwrap()
    });
    // affine gradients: the sum over row blocks of the serial path's
    let seed = randn(&[rows, d], 8);
    let g = y.backward_with_grad(seed.clone()).unwrap();
    let (mut dw, mut db) = (
        ArrayD::<f32>::zeros(IxDyn(&[d])),
        ArrayD::<f32>::zeros(IxDyn(&[d])),
    );
    for start in (0..rows).step_by(50) {
        let s = Slice::from(start..start + 50);
        let part = Tensor::new(x.slice_axis(Axis(0), s).to_owned());
        let yp = part.layer_norm(Some(&wt), Some(&bt), 1e-5).unwrap();
        let gp = yp
            .backward_with_grad(seed.slice_axis(Axis(0), s).to_owned())
            .unwrap();
        dw += gp.get(&wt).unwrap();
        db += gp.get(&bt).unwrap();
    }
    assert_close("layer_norm weight grad", g.get(&wt).unwrap(), &dw, 1e-5);
    assert_close("layer_norm bias grad", g.get(&bt).unwrap(), &db, 1e-5);
}

#[test]
fn large_reductions_match_f64() {
    let x = randn(&SHAPE, 10);
    let t = Tensor::new(x.clone());
    for axes in [vec![0usize], vec![1], vec![2], vec![0, 2], vec![0, 1, 2]] {
        let ia: Vec<isize> = axes.iter().map(|&a| a as isize).collect();
        let mut sum = x.mapv(|v| v as f64);
        let mut max = x.clone();
        let mut sq = x.mapv(|v| (v as f64).powi(2));
        for &ax in axes.iter().rev() {
            sum = sum.sum_axis(Axis(ax)).insert_axis(Axis(ax));
            sq = sq.sum_axis(Axis(ax)).insert_axis(Axis(ax));
            max = max
                .fold_axis(Axis(ax), f32::NEG_INFINITY, |&a, &b| a.max(b))
                .insert_axis(Axis(ax));
        }
        let what = format!("axes {axes:?}");
        assert_close(
            &format!("sum {what}"),
            &t.sum(&ia, true).unwrap().to_array(),
            &sum.mapv(|v| v as f32),
            1e-5,
        );
        assert_close(
            &format!("amax {what}"),
            &t.amax(&ia, true).unwrap().to_array(),
            &max,
            0.0,
        );
        assert_close(
            &format!("norm {what}"),
            &t.norm(&ia, true).unwrap().to_array(),
            &sq.mapv(|v| v.sqrt() as f32),
            1e-5,
        );
    }
    // broadcast gradients reduce in parallel too
    let bias = Tensor::var(randn(&[90], 11));
    let g = t
        .add(&bias)
        .unwrap()
        .mul(&t)
        .unwrap()
        .sum_all()
        .backward()
        .unwrap();
    let want = x.sum_axis(Axis(0)).sum_axis(Axis(0));
    assert_close(
        "bias gradient",
        g.get(&bias).unwrap(),
        &want.into_dyn(),
        1e-5,
    );
}

#[test]
fn large_cross_entropy_matches_f64_and_the_serial_gradients() {
    // (b, n, c) logits seen as (b, c, n), the language models' layout, and a contiguous one
    let (b, n, c) = (3, 200, 64);
    let bnc = randn(&[b, n, c], 12);
    let target = ArrayD::from_shape_fn(IxDyn(&[b, n]), |ix| ((ix[0] * 7 + ix[1] * 13) % c) as i64);
    let ignore = 0i64;
    let mut total = 0.0f64;
    let mut count = 0;
    for i in 0..b {
        for j in 0..n {
            let t = target[[i, j]];
            if t == ignore {
                continue;
            }
            let lane: Vec<f64> = (0..c).map(|k| bnc[[i, j, k]] as f64).collect();
            let m = lane.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + lane.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            total += lse - lane[t as usize];
            count += 1;
        }
    }
    let want = (total / count as f64) as f32;
    let logits = Tensor::var(bnc.clone());
    let bcn = logits.permute(&[0, 2, 1]).unwrap();
    let loss = bcn.cross_entropy(&target.view(), Some(ignore)).unwrap();
    assert!(
        (loss.item().unwrap() - want).abs() < 1e-5 * want.abs(),
        "{} vs {want}",
        loss.item().unwrap()
    );
    let contiguous = Tensor::var(bcn.to_array().as_standard_layout().into_owned());
    let loss2 = contiguous
        .cross_entropy(&target.view(), Some(ignore))
        .unwrap();
    assert!((loss2.item().unwrap() - want).abs() < 1e-5 * want.abs());
    // gradients: each batch row alone (serial path), rescaled from its own mean to the global one
    let g = loss.backward().unwrap();
    let g = g.get(&logits).unwrap();
    let g2 = loss2.backward().unwrap();
    assert_close(
        "layouts agree",
        &g2.get(&contiguous)
            .unwrap()
            .clone()
            .permuted_axes(IxDyn(&[0, 2, 1])),
        g,
        1e-6,
    );
    for i in 0..b {
        let part = Tensor::var(bnc.slice_axis(Axis(0), Slice::from(i..i + 1)).to_owned());
        let tp = target.slice_axis(Axis(0), Slice::from(i..i + 1)).to_owned();
        let kept = tp.iter().filter(|&&t| t != ignore).count();
        let lp = part
            .permute(&[0, 2, 1])
            .unwrap()
            .cross_entropy(&tp.view(), Some(ignore))
            .unwrap();
        let gp = lp
            .backward()
            .unwrap()
            .get(&part)
            .unwrap()
            .mapv(|v| v * kept as f32 / count as f32);
        assert_close(
            &format!("row {i}"),
            &g.slice_axis(Axis(0), Slice::from(i..i + 1)).to_owned(),
            &gp,
            1e-5,
        );
    }
}

/// `a @ b` of the trailing two axes in f64, with broadcast batch axes (rank 3 or 4 here).
fn naive_matmul(a: &ArrayD<f32>, b: &ArrayD<f32>) -> ArrayD<f32> {
    let a4 = a
        .view()
        .into_shape_with_order(IxDyn(
            &[1usize, 1, 1, 1][..4 - a.ndim()]
                .iter()
                .chain(a.shape())
                .copied()
                .collect::<Vec<_>>(),
        ))
        .unwrap();
    let b4 = b
        .view()
        .into_shape_with_order(IxDyn(
            &[1usize, 1, 1, 1][..4 - b.ndim()]
                .iter()
                .chain(b.shape())
                .copied()
                .collect::<Vec<_>>(),
        ))
        .unwrap();
    let (s0, s1) = (
        a4.shape()[0].max(b4.shape()[0]),
        a4.shape()[1].max(b4.shape()[1]),
    );
    let (m, k, n) = (a4.shape()[2], a4.shape()[3], b4.shape()[3]);
    let out = ArrayD::from_shape_fn(IxDyn(&[s0, s1, m, n]), |ix| {
        let (i0a, i1a) = (ix[0].min(a4.shape()[0] - 1), ix[1].min(a4.shape()[1] - 1));
        let (i0b, i1b) = (ix[0].min(b4.shape()[0] - 1), ix[1].min(b4.shape()[1] - 1));
        (0..k)
            .map(|p| a4[[i0a, i1a, ix[2], p]] as f64 * b4[[i0b, i1b, p, ix[3]]] as f64)
            .sum::<f64>() as f32
    });
    let rank = a.ndim().max(b.ndim());
    let keep: Vec<usize> = out.shape()[4 - rank..].to_vec();
    out.into_shape_with_order(IxDyn(&keep)).unwrap()
}

#[test]
fn large_matmuls_write_every_element_under_every_thread_policy() {
    let cases: Vec<(Vec<usize>, Vec<usize>)> = vec![
        (vec![300, 70], vec![70, 200]),         // one product on all threads
        (vec![5, 64, 40], vec![5, 40, 48]),     // small products side by side
        (vec![3, 128, 64], vec![3, 64, 40]),    // a few large products
        (vec![9, 128, 64], vec![9, 64, 40]),    // many large products
        (vec![2, 1, 128, 64], vec![3, 64, 40]), // broadcast batch axes
    ];
    for threads in [1, 2, 3, 8] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            for (i, (sa, sb)) in cases.iter().enumerate() {
                let (a, b) = (randn(sa, 20 + i as u64), randn(sb, 40 + i as u64));
                let got = Tensor::new(a.clone())
                    .matmul(&Tensor::new(b.clone()))
                    .unwrap()
                    .to_array();
                assert_close(
                    &format!("{threads} threads, {sa:?} @ {sb:?}"),
                    &got,
                    &naive_matmul(&a, &b),
                    2e-5,
                );
            }
            let (a, b) = (randn(&[400, 90], 60), randn(&[90, 150], 61));
            let a2 = a.view().into_dimensionality::<ndarray::Ix2>().unwrap();
            let b2 = b.view().into_dimensionality::<ndarray::Ix2>().unwrap();
            for t in [
                performer_tensor::gemm::Threads::All,
                performer_tensor::gemm::Threads::Single,
            ] {
                let got = performer_tensor::gemm::matmul2(&a2, &b2, t)
                    .unwrap()
                    .into_dyn();
                assert_close(&format!("matmul2 {t:?}"), &got, &naive_matmul(&a, &b), 2e-5);
            }
        });
    }
}

#[test]
fn large_elementwise_ops_match_and_follow_their_operands_layout() {
    let x = randn(&SHAPE, 70);
    let xt = Tensor::new(x.clone()).permute(&[2, 0, 1]).unwrap(); // non-contiguous
    let e = xt.exp();
    assert_close(
        "exp of a permuted view",
        &e.to_array(),
        &x.clone().permuted_axes(IxDyn(&[2, 0, 1])).mapv(f32::exp),
        0.0,
    );
    assert_eq!(
        e.data().strides(),
        xt.data().strides(),
        "the result keeps the operand's memory order"
    );
    let row = randn(&[90], 71);
    let sum = Tensor::new(x.clone())
        .add(&Tensor::new(row.clone()))
        .unwrap();
    assert!(sum.data().is_standard_layout());
    assert_close("broadcast add", &sum.to_array(), &(&x + &row), 0.0);
    let prod = xt.mul(&xt).unwrap();
    assert_close(
        "square of a view",
        &prod.to_array(),
        &xt.to_array().mapv(|v| v * v),
        0.0,
    );
    // a tracked unary op's backward over a large input
    let v = Tensor::var(x.clone());
    let g = v.tanh().sum_all().backward().unwrap();
    assert_close(
        "tanh gradient",
        g.get(&v).unwrap(),
        &x.mapv(|v| 1.0 - v.tanh().powi(2)),
        1e-6,
    );
}

/// Element-wise ops on views with gaps between rows (a narrowed last axis), on operands whose
/// last axis is not contiguous (a permutation) and on broadcast operands, small and past the
/// parallel threshold: the row-by-row and slice paths must equal a plain element loop, and the
/// unary backward (three operands) must too.
#[test]
fn elementwise_ops_on_strided_and_broadcast_views() {
    for rows in [6, PAR_THRESHOLD / 64 + 7] {
        let wide = Tensor::new(randn(&[rows, 70], 31));
        let a = wide.narrow(1, 3, 64).unwrap(); // rows with gaps
        let bt = Tensor::new(randn(&[64, rows], 32));
        let b = bt.permute(&[1, 0]).unwrap(); // last axis strided
        let c = Tensor::new(randn(&[64], 33)); // broadcast over rows
        let (av, bv, cv) = (a.to_array(), b.to_array(), c.to_array());
        let want = |f: &dyn Fn(f32, f32) -> f32, y: &ArrayD<f32>| {
            ArrayD::from_shape_fn(IxDyn(&[rows, 64]), |ix| {
                let y = if y.ndim() == 1 {
                    y[[ix[1]]]
                } else {
                    y[[ix[0], ix[1]]]
                };
                f(av[[ix[0], ix[1]]], y)
            })
        };
        assert_close(
            "a + b",
            &a.add(&b).unwrap().to_array(),
            &want(&|x, y| x + y, &bv),
            1e-6,
        );
        assert_close(
            "a * c",
            &a.mul(&c).unwrap().to_array(),
            &want(&|x, y| x * y, &cv),
            1e-6,
        );
        assert_close(
            "a - a",
            &a.sub(&a).unwrap().to_array(),
            &want(&|_, _| 0.0, &bv),
            1e-6,
        );
        // The backward of a unary op zips the gradient, the input and the output.
        let x = Tensor::var(wide.to_array());
        let t = x.narrow(1, 3, 64).unwrap().tanh();
        let g = t.mul(&b).unwrap().sum_all().backward().unwrap();
        let gx = g.get(&x).unwrap();
        let want_g = ArrayD::from_shape_fn(IxDyn(&[rows, 70]), |ix| {
            if (3..67).contains(&ix[1]) {
                let th = av[[ix[0], ix[1] - 3]].tanh();
                (1.0 - th * th) * bv[[ix[0], ix[1] - 3]]
            } else {
                0.0
            }
        });
        assert_close("d tanh", gx, &want_g, 1e-5);
    }
}
