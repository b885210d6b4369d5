//! Finite-difference checks of every op's backward: random shapes, broadcasting and
//! non-contiguous (permuted, sliced) operands.

use ndarray::{ArrayD, IxDyn, s};
use performer_tensor::{GradcheckOptions, Result, Tensor, gradcheck, rng::Generator};

fn randn(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut g = Generator::seeded(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || g.normal())
}

/// Values in [lo, hi) (for ops with restricted domains).
fn uniform(shape: &[usize], lo: f32, hi: f32, seed: u64) -> ArrayD<f32> {
    let mut g = Generator::seeded(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || lo + (hi - lo) * g.next_f32())
}

/// Values whose magnitude stays away from 0 (kinks of relu, abs, ...).
fn away_from_zero(shape: &[usize], seed: u64) -> ArrayD<f32> {
    randn(shape, seed).mapv(|v| {
        if v.abs() < 0.1 {
            v.signum() * 0.1 + v
        } else {
            v
        }
    })
}

fn check(f: impl Fn(&[Tensor]) -> Result<Tensor>, inputs: &[ArrayD<f32>]) {
    let worst = gradcheck(f, inputs, GradcheckOptions::default()).unwrap();
    assert!(worst.is_finite());
}

/// A permuted (non-contiguous) copy of the transpose of `a`, whose transpose equals `a`.
fn transposed_layout(a: &ArrayD<f32>) -> ArrayD<f32> {
    let t = a.t().as_standard_layout().into_owned();
    t.reversed_axes()
}

#[test]
fn binary_ops_with_broadcasting() {
    let a = randn(&[3, 1, 4], 1);
    let b = randn(&[2, 1], 2);
    check(|x| x[0].add(&x[1]), &[a.clone(), b.clone()]);
    check(|x| x[0].sub(&x[1]), &[a.clone(), b.clone()]);
    check(|x| x[0].mul(&x[1]), &[a.clone(), b.clone()]);
    let pos = uniform(&[2, 1], 0.5, 2.0, 3);
    check(|x| x[0].div(&x[1]), &[a.clone(), pos.clone()]);
    let base = uniform(&[3, 4], 0.5, 2.0, 4);
    let expo = randn(&[4], 5);
    check(|x| x[0].pow(&x[1]), &[base, expo]);
    // maximum/minimum away from ties
    let c = randn(&[3, 4], 6);
    let d = &c + &uniform(&[3, 4], 0.2, 1.0, 7).mapv(|v| if v > 0.6 { v } else { -v });
    check(|x| x[0].maximum(&x[1]), &[c.clone(), d.clone()]);
    check(|x| x[0].minimum(&x[1]), &[c, d]);
}

#[test]
fn binary_ops_non_contiguous() {
    let a = transposed_layout(&randn(&[4, 3], 8));
    let b = randn(&[4, 6], 9).slice(s![.., ..;2]).to_owned().into_dyn();
    assert!(!a.is_standard_layout());
    check(|x| x[0].mul(&x[1]), &[a.clone(), b.clone()]);
    check(|x| Ok(x[0].add(&x[1])?.exp()), &[a, b]);
}

#[test]
fn scalar_and_unary_math() {
    let a = randn(&[2, 5], 10);
    check(|x| Ok(x[0].add_scalar(1.5)), std::slice::from_ref(&a));
    check(|x| Ok(x[0].sub_scalar(0.5)), std::slice::from_ref(&a));
    check(|x| Ok(x[0].mul_scalar(-2.0)), std::slice::from_ref(&a));
    check(|x| Ok(x[0].div_scalar(3.0)), std::slice::from_ref(&a));
    check(|x| Ok(x[0].rsub_scalar(1.0)), std::slice::from_ref(&a));
    check(|x| Ok(x[0].neg()), std::slice::from_ref(&a));
    check(|x| Ok(x[0].exp()), std::slice::from_ref(&a));
    check(|x| Ok(x[0].square()), std::slice::from_ref(&a));
    check(|x| Ok(x[0].tanh()), std::slice::from_ref(&a));
    check(|x| Ok(x[0].sigmoid()), std::slice::from_ref(&a));
    let p = uniform(&[2, 5], 0.5, 3.0, 11);
    check(|x| Ok(x[0].log()), std::slice::from_ref(&p));
    check(|x| Ok(x[0].sqrt()), std::slice::from_ref(&p));
    check(|x| Ok(x[0].recip()), std::slice::from_ref(&p));
    check(|x| Ok(x[0].powf(2.5)), std::slice::from_ref(&p));
    let k = away_from_zero(&[2, 5], 12);
    check(|x| Ok(x[0].abs()), std::slice::from_ref(&k));
    // clamp bounds away from the sample points
    let c = uniform(&[3, 4], -2.0, 2.0, 13).mapv(|v| {
        if (v.abs() - 1.0).abs() < 0.1 {
            v * 0.8
        } else {
            v
        }
    });
    check(
        |x| Ok(x[0].clamp(Some(-1.0), Some(1.0))),
        std::slice::from_ref(&c),
    );
    check(
        |x| Ok(x[0].clamp(Some(-1.0), None)),
        std::slice::from_ref(&c),
    );
}

#[test]
fn activations() {
    let a = away_from_zero(&[3, 7], 14);
    check(|x| Ok(x[0].relu()), std::slice::from_ref(&a));
    check(|x| Ok(x[0].gelu()), std::slice::from_ref(&a));
    // GELU's vectorized kernels take contiguous operands; a transposed view takes the scalar
    // path in both directions.
    check(
        |x| Ok(x[0].transpose(0, 1)?.gelu()),
        std::slice::from_ref(&a),
    );
    check(|x| Ok(x[0].elu()), std::slice::from_ref(&a));
    check(|x| Ok(x[0].softplus()), std::slice::from_ref(&a));
    check(|x| Ok(x[0].silu()), std::slice::from_ref(&a));
    check(|x| Ok(x[0].leaky_relu(0.01)), std::slice::from_ref(&a));
    let big = a.mapv(|v| v * 15.0);
    check(|x| Ok(x[0].softplus()), std::slice::from_ref(&big));
}

#[test]
fn reductions() {
    let a = randn(&[2, 3, 4], 15);
    check(|x| x[0].sum(&[1], false), std::slice::from_ref(&a));
    check(|x| x[0].sum(&[0, 2], true), std::slice::from_ref(&a));
    check(|x| Ok(x[0].sum_all()), std::slice::from_ref(&a));
    check(|x| x[0].mean(&[-1], false), std::slice::from_ref(&a));
    check(|x| Ok(x[0].mean_all()), std::slice::from_ref(&a));
    check(|x| x[0].amax(&[2], false), std::slice::from_ref(&a));
    check(|x| x[0].amax(&[1, 2], true), std::slice::from_ref(&a));
    check(|x| x[0].norm(&[-1], true), std::slice::from_ref(&a));
    check(|x| x[0].norm(&[0, 1], false), std::slice::from_ref(&a));
    let t = transposed_layout(&randn(&[5, 3], 16));
    check(|x| x[0].sum(&[0], false), std::slice::from_ref(&t));
}

#[test]
fn amax_ties_share_the_gradient() {
    let x = Tensor::var(ArrayD::from_shape_vec(IxDyn(&[4]), vec![1.0, 3.0, 3.0, 2.0]).unwrap());
    let g = x.amax(&[0], false).unwrap().backward().unwrap();
    assert_eq!(
        g.get(&x).unwrap().as_slice().unwrap(),
        &[0.0, 0.5, 0.5, 0.0]
    );
}

#[test]
fn matmul_shapes() {
    check(
        |x| x[0].matmul(&x[1]),
        &[randn(&[3, 4], 17), randn(&[4, 5], 18)],
    );
    // batched with broadcast batch dims
    check(
        |x| x[0].matmul(&x[1]),
        &[randn(&[2, 1, 3, 4], 19), randn(&[3, 4, 2], 20)],
    );
    // vector operands
    check(
        |x| x[0].matmul(&x[1]),
        &[randn(&[4], 21), randn(&[4, 3], 22)],
    );
    check(
        |x| x[0].matmul(&x[1]),
        &[randn(&[2, 3, 4], 23), randn(&[4], 24)],
    );
    // transposed operands without copies
    let at = transposed_layout(&randn(&[3, 4], 25));
    let bt = transposed_layout(&randn(&[4, 5], 26));
    check(|x| x[0].matmul(&x[1]), &[at, bt]);
    check(
        |x| x[0].matmul(&x[1].transpose(0, 1)?),
        &[randn(&[3, 4], 27), randn(&[5, 4], 28)],
    );
}

#[test]
fn matmul_add_gradients() {
    // The fused CPU op: 2-D operands, the weight transposed (a Linear's view of its weight).
    check(
        |x| x[0].matmul_add(&x[1].transpose(0, 1)?, &x[2]),
        &[randn(&[5, 4], 40), randn(&[3, 4], 41), randn(&[3], 42)],
    );
    // A permuted input, and the unfused fallback (3-D input).
    check(
        |x| x[0].matmul_add(&x[1], &x[2]),
        &[
            transposed_layout(&randn(&[6, 4], 43)),
            randn(&[4, 3], 44),
            randn(&[3], 45),
        ],
    );
    check(
        |x| x[0].matmul_add(&x[1], &x[2]),
        &[randn(&[2, 5, 4], 46), randn(&[4, 3], 47), randn(&[3], 48)],
    );
}

/// The fused CPU `matmul_add` has the bits of `matmul` then `add`, forward and backward, on
/// products large enough for the parallel paths (and a weight read through a transpose).
#[test]
fn matmul_add_equals_matmul_then_add_bit_for_bit() {
    for (rows, k, n) in [(768, 128, 512), (7, 5, 3), (300, 512, 128)] {
        let run = |fused: bool| {
            let x = Tensor::var(randn(&[rows, k], 50));
            let w = Tensor::var(randn(&[n, k], 51));
            let b = Tensor::var(randn(&[n], 52));
            let wt = w.transpose(0, 1).unwrap();
            let y = if fused {
                x.matmul_add(&wt, &b).unwrap()
            } else {
                x.matmul(&wt).unwrap().add(&b).unwrap()
            };
            let probe = Tensor::new(randn(&[rows, n], 53));
            let grads = y.mul(&probe).unwrap().sum_all().backward().unwrap();
            let mut all = vec![y.to_array()];
            all.extend([&x, &w, &b].map(|t| grads.get(t).unwrap().clone()));
            all
        };
        let (fused, split) = (run(true), run(false));
        for (i, (f, s)) in fused.iter().zip(&split).enumerate() {
            assert_eq!(f.shape(), s.shape(), "{rows}x{k}x{n}: result {i}");
            let same = f.iter().zip(s).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{rows}x{k}x{n}: result {i} differs in bits");
        }
    }
}

#[test]
fn linear_gradients() {
    // The fused CPU op, with and without a bias, on a permuted input and a permuted weight.
    let (x, w, b) = (randn(&[5, 4], 60), randn(&[3, 4], 61), randn(&[3], 62));
    check(
        |x| x[0].linear(&x[1], Some(&x[2])),
        &[x.clone(), w.clone(), b],
    );
    check(|x| x[0].linear(&x[1], None), &[x, w]);
    check(
        |x| x[0].linear(&x[1], None),
        &[
            transposed_layout(&randn(&[6, 4], 63)),
            transposed_layout(&randn(&[3, 4], 64)),
        ],
    );
    // The composed fallback (3-D input).
    check(
        |x| x[0].linear(&x[1], Some(&x[2])),
        &[randn(&[2, 5, 4], 65), randn(&[3, 4], 66), randn(&[3], 67)],
    );
}

/// The fused CPU `linear` has the bits of `matmul_add` against the weight's transposed view
/// (the form it replaced in `Linear`), forward and backward, with and without a bias, on
/// products large enough for the parallel paths and rows of 4 KB.
#[test]
fn linear_equals_matmul_add_on_the_transposed_weight_bit_for_bit() {
    for (rows, k, n) in [
        (768, 128, 512),
        (7, 5, 3),
        (300, 1024, 256),
        (1024, 256, 1024),
    ] {
        for with_bias in [true, false] {
            let run = |fused: bool| {
                let x = Tensor::var(randn(&[rows, k], 70));
                let w = Tensor::var(randn(&[n, k], 71));
                let b = Tensor::var(randn(&[n], 72));
                let bias = with_bias.then_some(&b);
                let y = if fused {
                    x.linear(&w, bias).unwrap()
                } else {
                    let wt = w.transpose(0, 1).unwrap();
                    match bias {
                        Some(b) => x.matmul_add(&wt, b).unwrap(),
                        None => x.matmul(&wt).unwrap(),
                    }
                };
                let probe = Tensor::new(randn(&[rows, n], 73));
                let grads = y.mul(&probe).unwrap().sum_all().backward().unwrap();
                let mut all = vec![y.to_array()];
                all.extend([&x, &w].map(|t| grads.get(t).unwrap().clone()));
                if with_bias {
                    all.push(grads.get(&b).unwrap().clone());
                }
                all
            };
            let (fused, split) = (run(true), run(false));
            assert_eq!(fused.len(), split.len());
            for (i, (f, s)) in fused.iter().zip(&split).enumerate() {
                assert_eq!(f.shape(), s.shape(), "{rows}x{k}x{n}: result {i}");
                let same = f.iter().zip(s).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{rows}x{k}x{n} bias {with_bias}: result {i} differs in bits"
                );
            }
        }
    }
}

#[test]
fn matmul_matches_naive_product() {
    let a = randn(&[2, 17, 33], 29);
    let b = randn(&[33, 9], 30);
    let c = Tensor::new(a.clone())
        .matmul(&Tensor::new(b.clone()))
        .unwrap();
    for bi in 0..2 {
        for i in 0..17 {
            for j in 0..9 {
                let want: f32 = (0..33).map(|k| a[[bi, i, k]] * b[[k, j]]).sum();
                assert!((c.view()[[bi, i, j]] - want).abs() < 1e-4);
            }
        }
    }
}

#[test]
fn layout_ops() {
    let a = randn(&[2, 3, 4], 31);
    check(|x| x[0].reshape(&[6, -1]), std::slice::from_ref(&a));
    check(
        |x| x[0].permute(&[2, 0, 1])?.reshape(&[-1]),
        std::slice::from_ref(&a),
    );
    check(|x| x[0].transpose(0, 2), std::slice::from_ref(&a));
    check(|x| x[0].narrow(1, 1, 2), std::slice::from_ref(&a));
    // Overlapping slices of one input, and the input itself: the second and third gradients
    // to reach it are added into the first (the slices' in place).
    check(
        |x| {
            let (left, right) = (x[0].narrow(2, 0, 3)?, x[0].narrow(2, 1, 3)?);
            left.mul(&right)?.add(&x[0].narrow(2, 1, 3)?.tanh())
        },
        std::slice::from_ref(&a),
    );
    check(
        |x| {
            x[0].narrow(1, 0, 2)?
                .mul(&x[0].narrow(1, 1, 2)?)?
                .add(&x[0].narrow(1, 1, 2)?)
        },
        std::slice::from_ref(&a),
    );
    check(
        |x| x[0].tanh().narrow(0, 1, 1)?.add(&x[0].narrow(0, 0, 1)?),
        std::slice::from_ref(&a),
    );
    check(|x| x[0].select(2, 3), std::slice::from_ref(&a));
    check(|x| x[0].unsqueeze(1)?.squeeze(1), std::slice::from_ref(&a));
    check(|x| x[0].flatten(1, 2), std::slice::from_ref(&a));
    check(
        |x| x[0].broadcast_to(&[5, 2, 3, 4]),
        std::slice::from_ref(&a),
    );
    check(
        |x| Ok(x[0].transpose(0, 1)?.contiguous()),
        std::slice::from_ref(&a),
    );
    check(|x| x[0].pad(1, 2, 1, 0.5), std::slice::from_ref(&a));
    check(
        |x| {
            let parts = x[0].chunk(2, -1)?;
            parts[0].mul(&parts[1])
        },
        std::slice::from_ref(&a),
    );
    check(
        |x| {
            let parts = x[0].split_sizes(&[1, 2], 1)?;
            Tensor::cat(&[parts[1].clone(), parts[0].exp()], 1)
        },
        std::slice::from_ref(&a),
    );
    check(
        |x| Tensor::cat(&[x[0].clone(), x[1].clone()], 0),
        &[randn(&[2, 3], 32), randn(&[4, 3], 33)],
    );
    check(
        |x| Tensor::stack(&[x[0].clone(), x[1].clone()], 1),
        &[randn(&[2, 3], 34), randn(&[2, 3], 35)],
    );
    // reshape of a non-contiguous tensor copies
    let t = transposed_layout(&randn(&[4, 6], 36));
    check(|x| x[0].reshape(&[3, 8]), std::slice::from_ref(&t));
}

#[test]
fn chunk_follows_pytorch() {
    let x = Tensor::zeros(&[10]);
    let sizes: Vec<usize> = x
        .chunk(4, 0)
        .unwrap()
        .iter()
        .map(|t| t.shape()[0])
        .collect();
    assert_eq!(sizes, vec![3, 3, 3, 1]);
    let x = Tensor::zeros(&[6]);
    assert_eq!(x.chunk(4, 0).unwrap().len(), 3); // torch.arange(6).chunk(4) has 3 pieces
}

#[test]
fn index_ops() {
    let table = randn(&[5, 3], 37);
    let ids = ndarray::arr2(&[[0i64, 4, 4], [2, 1, 0]]).into_dyn();
    check(
        |x| x[0].embedding(&ids.view()),
        std::slice::from_ref(&table),
    );
    check(
        |x| x[0].index_select(1, &[2, 0, 2]),
        std::slice::from_ref(&table),
    );
    let idx = ndarray::arr2(&[[0i64, 2], [1, 1], [2, 0], [0, 0], [1, 2]]).into_dyn();
    check(
        |x| x[0].gather(1, &idx.view()),
        std::slice::from_ref(&table),
    );
    let mask = ndarray::arr1(&[true, false, true]).into_dyn();
    check(
        |x| x[0].masked_fill(&mask.view(), -3.0),
        std::slice::from_ref(&table),
    );
    let cond = ndarray::arr2(&[[true], [false], [true], [false], [true]]).into_dyn();
    check(
        |x| Tensor::where_cond(&cond.view(), &x[0], &x[1]),
        &[table.clone(), randn(&[3], 38)],
    );
}

#[test]
fn softmax_family_and_losses() {
    let a = randn(&[2, 3, 4], 39);
    check(|x| x[0].softmax(1), std::slice::from_ref(&a));
    check(|x| x[0].softmax(-1), std::slice::from_ref(&a));
    check(|x| x[0].log_softmax(0), std::slice::from_ref(&a));
    let t = transposed_layout(&randn(&[4, 6], 40));
    check(|x| x[0].softmax(1), std::slice::from_ref(&t));
    let logits = randn(&[2, 5, 3], 41);
    let target = ndarray::arr2(&[[0i64, 4, -100], [3, 3, 1]]).into_dyn();
    check(
        |x| x[0].cross_entropy(&target.view(), Some(-100)),
        std::slice::from_ref(&logits),
    );
    let flat = randn(&[4, 6], 42);
    let target = ndarray::arr1(&[5i64, 0, 2, 0]).into_dyn();
    check(
        |x| x[0].cross_entropy(&target.view(), Some(0)),
        std::slice::from_ref(&flat),
    );
    // classes on axis 1 of a permuted (b, n, c) -> (b, c, n) view, as language models use it
    let bnc = randn(&[2, 3, 5], 43);
    let target = ndarray::arr2(&[[1i64, 2, 3], [4, 0, 1]]).into_dyn();
    check(
        |x| {
            x[0].permute(&[0, 2, 1])?
                .cross_entropy(&target.view(), None)
        },
        std::slice::from_ref(&bnc),
    );
}

#[test]
fn layer_norm_all_inputs() {
    let x = randn(&[2, 3, 6], 44);
    let w = randn(&[6], 45);
    let b = randn(&[6], 46);
    check(
        |t| t[0].layer_norm(Some(&t[1]), Some(&t[2]), 1e-5),
        &[x.clone(), w, b],
    );
    check(
        |t| t[0].layer_norm(None, None, 1e-5),
        std::slice::from_ref(&x),
    );
    let nc = transposed_layout(&randn(&[6, 4], 47));
    check(
        |t| t[0].layer_norm(None, None, 1e-5),
        std::slice::from_ref(&nc),
    );
}

#[test]
fn dropout_replays_with_the_rng_state() {
    let x = randn(&[4, 8], 48);
    performer_tensor::rng::manual_seed(3);
    let state = performer_tensor::rng::get_state();
    let a = Tensor::new(x.clone()).dropout(0.5, true).unwrap().to_vec();
    performer_tensor::rng::set_state(state);
    let b = Tensor::new(x.clone()).dropout(0.5, true).unwrap().to_vec();
    assert_eq!(a, b);
    assert!(a.contains(&0.0));
    let eval = Tensor::new(x.clone()).dropout(0.5, false).unwrap().to_vec();
    assert_eq!(eval, x.iter().copied().collect::<Vec<_>>());
    // gradient with a fixed mask
    performer_tensor::rng::manual_seed(4);
    let v = Tensor::var(x.clone());
    let y = v.dropout(0.25, true).unwrap();
    let g = y.sum_all().backward().unwrap();
    let gv = g.get(&v).unwrap();
    for (&gi, &yi) in gv.iter().zip(y.to_vec().iter()) {
        assert!(gi == 0.0 && yi == 0.0 || (gi - 1.0 / 0.75).abs() < 1e-6);
    }
}

#[test]
fn gradient_accumulates_over_shared_uses() {
    let x = Tensor::var(ndarray::arr1(&[1.0f32, 2.0]).into_dyn());
    let y = x
        .mul(&x)
        .unwrap()
        .add(&x.mul_scalar(3.0))
        .unwrap()
        .sum_all();
    let g = y.backward().unwrap();
    assert_eq!(g.get(&x).unwrap().as_slice().unwrap(), &[5.0, 7.0]);
}

/// gradcheck itself must reject a wrong backward.
#[test]
fn gradcheck_catches_a_wrong_gradient() {
    let wrong_square = |x: &[Tensor]| -> Result<Tensor> {
        let xd = x[0].data().clone();
        Ok(Tensor::from_op(
            xd.mapv(|v| v * v),
            "wrong_square",
            &[&x[0]],
            move |g, _| {
                // d(x^2)/dx is 2x; returning x is wrong by a factor of 2
                Ok(vec![Some(&g * &xd)])
            },
        ))
    };
    let err = gradcheck(
        wrong_square,
        &[randn(&[3], 50)],
        GradcheckOptions::default(),
    );
    assert!(err.is_err(), "a wrong gradient passed gradcheck");
}
