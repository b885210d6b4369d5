//! The recurrent state reproduces the parallel forward over every prefix (the reference's way
//! of generating), for each feature map, including keys whose projections keep raising the
//! running max of the softmax kernel's stabilizer.

use ndarray::{ArrayD, Axis, IxDyn, s};
use performer_favor::{FastAttention, FastAttentionConfig};
use performer_tensor::ops::Activation;
use performer_tensor::rng::Generator;
use performer_tensor::team::with_team;
use performer_tensor::testing::{assert_abs_close, assert_close, gradient};
use performer_tensor::{Tensor, no_grad};

fn randn(shape: &[usize], seed: u64, scale: f32) -> ArrayD<f32> {
    let mut g = Generator::seeded(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || scale * g.normal())
}

/// One row of `d` normal values per head: a step's queries, keys or values.
fn head_rows(heads: usize, d: usize, seed: u64) -> ndarray::Array2<f32> {
    randn(&[heads, d], seed, 1.0).into_dimensionality().unwrap()
}

fn check(cfg: FastAttentionConfig, label: &str) {
    performer_tensor::rng::manual_seed(1);
    let fa = FastAttention::new(cfg).unwrap();
    let (h, n, d) = (3, 40, 8);
    // growing key norms make the running max increase along the sequence
    let mut k = randn(&[1, h, n, d], 2, 1.0);
    for t in 0..n {
        k.slice_mut(s![.., .., t, ..])
            .mapv_inplace(|x| x * (0.5 + t as f32 / 20.0));
    }
    let q = randn(&[1, h, n, d], 3, 1.0);
    let v = randn(&[1, h, n, d], 4, 1.0);
    let mut state = fa.causal_state(h, d);
    // The same sums advanced by the fused step, with the heads shared over a team of threads.
    let mut stepped = fa.causal_state(h, d);
    for t in 0..n {
        let kt = k
            .slice(s![0, .., t..t + 1, ..])
            .to_owned()
            .into_dimensionality()
            .unwrap();
        let vt = v
            .slice(s![0, .., t..t + 1, ..])
            .to_owned()
            .into_dimensionality()
            .unwrap();
        fa.extend_state(&mut state, &kt.view(), &vt.view()).unwrap();
        let qt = q.slice(s![0, .., t, ..]).to_owned();
        let ours = fa.query_state(&state, &qt.view()).unwrap();
        let prefix =
            |a: &ArrayD<f32>| Tensor::new(a.slice(s![.., .., ..=t, ..]).to_owned().into_dyn());
        let full = no_grad(|| fa.forward(&prefix(&q), &prefix(&k), &prefix(&v))).unwrap();
        let want = full
            .view()
            .index_axis(Axis(2), t)
            .index_axis(Axis(0), 0)
            .to_owned();
        let step = with_team(|team| {
            let kt = kt.index_axis(Axis(1), 0);
            let vt = vt.index_axis(Axis(1), 0);
            fa.step_state(&mut stepped, &qt.view(), &kt, &vt, team)
        })
        .unwrap();
        assert_close(&format!("{label}: position {t}"), &ours, &want, 1e-4);
        assert_close(
            &format!("{label}: step_state at position {t}"),
            &step,
            &want,
            1e-4,
        );
    }
    assert_eq!(state.len(), n);
    assert_eq!(stepped.len(), n);
}

#[test]
fn causal_state_matches_the_parallel_forward_on_every_prefix() {
    let base = FastAttentionConfig {
        nb_features: Some(20),
        causal: true,
        ..FastAttentionConfig::new(8)
    };
    check(base.clone(), "softmax");
    check(
        FastAttentionConfig {
            generalized_attention: true,
            ..base.clone()
        },
        "generalized relu",
    );
    check(
        FastAttentionConfig {
            generalized_attention: true,
            kernel_fn: Activation::Softplus,
            ..base.clone()
        },
        "generalized softplus",
    );
    check(
        FastAttentionConfig {
            no_projection: true,
            ..base
        },
        "no projection",
    );
}

#[test]
fn step_state_refuses_a_state_of_another_attention() {
    let fa = |m| {
        FastAttention::new(FastAttentionConfig {
            nb_features: Some(m),
            causal: true,
            ..FastAttentionConfig::new(8)
        })
        .unwrap()
    };
    let (small, large) = (fa(12), fa(20));
    let mut state = large.causal_state(2, 8);
    let x = ndarray::Array2::<f32>::zeros((2, 8));
    let err = with_team(|team| small.step_state(&mut state, &x.view(), &x.view(), &x.view(), team))
        .unwrap_err();
    assert!(err.to_string().contains("20 features"), "{err}");
    // Heads or widths that do not match the state are errors too.
    let wide = ndarray::Array2::<f32>::zeros((3, 8));
    assert!(
        with_team(|team| large.step_state(&mut state, &wide.view(), &x.view(), &x.view(), team))
            .is_err()
    );
}

#[test]
fn context_state_matches_non_causal_attention() {
    performer_tensor::rng::manual_seed(5);
    for cfg in [
        FastAttentionConfig {
            nb_features: Some(20),
            ..FastAttentionConfig::new(8)
        },
        FastAttentionConfig {
            nb_features: Some(20),
            generalized_attention: true,
            ..FastAttentionConfig::new(8)
        },
        FastAttentionConfig {
            no_projection: true,
            ..FastAttentionConfig::new(8)
        },
    ] {
        let fa = FastAttention::new(cfg).unwrap();
        let (k, v) = (randn(&[1, 2, 13, 8], 6, 1.0), randn(&[1, 2, 13, 8], 7, 1.0));
        let q = randn(&[1, 2, 5, 8], 8, 1.0);
        let st = fa
            .context_state(
                &k.index_axis(Axis(0), 0).into_dimensionality().unwrap(),
                &v.index_axis(Axis(0), 0).into_dimensionality().unwrap(),
            )
            .unwrap();
        let full = no_grad(|| {
            fa.forward(
                &Tensor::new(q.clone()),
                &Tensor::new(k.clone()),
                &Tensor::new(v.clone()),
            )
        })
        .unwrap();
        for t in 0..5 {
            let qt = q.slice(s![0, .., t, ..]).to_owned();
            let ours = fa.query_context(&st, &qt.view()).unwrap();
            let want = full.view().slice(s![0, .., t, ..]).to_owned();
            assert_abs_close(&format!("context query {t}"), &ours, &want, 1e-5);
        }
    }
}

/// `forward_extending` from an empty state gives `forward`'s output and the state that
/// `extend_state` builds: steps after it match the parallel forward over every longer prefix.
fn check_forward_extending(cfg: FastAttentionConfig, label: &str) {
    performer_tensor::rng::manual_seed(3);
    let fa = FastAttention::new(cfg).unwrap();
    // two sequences of three heads; the prompt crosses a chunk border (64)
    let (b, h, n, steps, d, e) = (2, 3, 70, 24, 8, 6);
    let total = n + steps;
    let mut k = randn(&[b, h, total, d], 12, 1.0);
    // key norms growing along the sequence keep raising the softmax kernel's running max
    for t in 0..total {
        k.slice_mut(s![.., .., t, ..])
            .mapv_inplace(|x| x * (0.5 + t as f32 / 40.0));
    }
    let q = randn(&[b, h, total, d], 13, 1.0);
    let v = randn(&[b, h, total, e], 14, 1.0);
    let prefix = |a: &ArrayD<f32>, len: usize| {
        Tensor::new(a.slice(s![.., .., ..len, ..]).to_owned().into_dyn())
    };
    let mut state = fa.causal_state(b * h, e);
    let out = no_grad(|| {
        fa.forward_extending(&mut state, &prefix(&q, n), &prefix(&k, n), &prefix(&v, n))
    })
    .unwrap();
    assert_eq!(state.len(), n);
    let want = no_grad(|| fa.forward(&prefix(&q, n), &prefix(&k, n), &prefix(&v, n))).unwrap();
    assert_close(
        &format!("{label}: prompt output"),
        &out.view(),
        &want.view(),
        1e-6,
    );
    let flat = |a: &ArrayD<f32>, t: usize| {
        a.slice(s![.., .., t, ..])
            .to_owned()
            .into_shape_with_order((b * h, a.shape()[3]))
            .unwrap()
    };
    for t in n..total {
        let got = with_team(|team| {
            fa.step_state(
                &mut state,
                &flat(&q, t).view(),
                &flat(&k, t).view(),
                &flat(&v, t).view(),
                team,
            )
        })
        .unwrap();
        let full =
            no_grad(|| fa.forward(&prefix(&q, t + 1), &prefix(&k, t + 1), &prefix(&v, t + 1)))
                .unwrap();
        let want = flat(&full.to_array(), t);
        assert_close(
            &format!("{label}: step {t} after the prompt"),
            &got,
            &want,
            1e-4,
        );
    }
}

#[test]
fn forward_extending_primes_the_state_the_forward_ends_with() {
    let base = FastAttentionConfig {
        nb_features: Some(20),
        causal: true,
        ..FastAttentionConfig::new(8)
    };
    check_forward_extending(base.clone(), "softmax");
    check_forward_extending(
        FastAttentionConfig {
            generalized_attention: true,
            ..base.clone()
        },
        "generalized relu",
    );
    check_forward_extending(
        FastAttentionConfig {
            generalized_attention: true,
            kernel_fn: Activation::Softplus,
            ..base.clone()
        },
        "generalized softplus",
    );
    check_forward_extending(
        FastAttentionConfig {
            no_projection: true,
            ..base
        },
        "no projection",
    );
}

#[test]
fn forward_extending_refuses_used_states_and_bad_shapes() {
    performer_tensor::rng::manual_seed(4);
    let causal = FastAttention::new(FastAttentionConfig {
        nb_features: Some(12),
        causal: true,
        ..FastAttentionConfig::new(8)
    })
    .unwrap();
    let x = Tensor::new(randn(&[1, 2, 5, 8], 1, 1.0));
    // a state that has seen positions
    let mut used = causal.causal_state(2, 8);
    causal
        .extend_state(
            &mut used,
            &randn(&[2, 1, 8], 2, 1.0)
                .into_dimensionality()
                .unwrap()
                .view(),
            &randn(&[2, 1, 8], 3, 1.0)
                .into_dimensionality()
                .unwrap()
                .view(),
        )
        .unwrap();
    let err = causal.forward_extending(&mut used, &x, &x, &x).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    // heads that do not match the state
    let mut three = causal.causal_state(3, 8);
    let err = causal
        .forward_extending(&mut three, &x, &x, &x)
        .unwrap_err();
    assert!(err.to_string().contains("3 heads"), "{err}");
    // non-causal attention has no state to continue
    let plain = FastAttention::new(FastAttentionConfig {
        nb_features: Some(12),
        ..FastAttentionConfig::new(8)
    })
    .unwrap();
    let mut st = plain.causal_state(2, 8);
    assert!(plain.forward_extending(&mut st, &x, &x, &x).is_err());
}

#[test]
fn forward_extending_keeps_the_graph_when_gradients_flow() {
    performer_tensor::rng::manual_seed(5);
    let attn = FastAttention::new(FastAttentionConfig {
        nb_features: Some(16),
        causal: true,
        ..FastAttentionConfig::new(8)
    })
    .unwrap();
    let q = Tensor::var(randn(&[1, 2, 9, 8], 11, 0.5));
    let (k, v) = (
        Tensor::new(randn(&[1, 2, 9, 8], 12, 0.5)),
        Tensor::new(randn(&[1, 2, 9, 8], 13, 1.0)),
    );
    let mut state = attn.causal_state(2, 8);
    let out = attn.forward_extending(&mut state, &q, &k, &v).unwrap();
    assert!(
        out.is_tracked(),
        "a tracked query must give a tracked output"
    );
    let weights = Tensor::new(randn(&[1, 2, 9, 8], 14, 1.0));
    let got = out.mul(&weights).unwrap().sum_all().backward().unwrap();
    let want = attn
        .forward(&q, &k, &v)
        .unwrap()
        .mul(&weights)
        .unwrap()
        .sum_all()
        .backward()
        .unwrap();
    assert_abs_close(
        "gradient of q against forward's",
        gradient(&got, &q, "q (forward_extending)"),
        gradient(&want, &q, "q (forward)"),
        1e-6,
    );
    assert_eq!(state.len(), 9);
}

#[test]
fn a_step_taken_head_by_head_equals_step_state_and_refuses_misuse() {
    performer_tensor::rng::manual_seed(2);
    let fa = FastAttention::new(FastAttentionConfig {
        nb_features: Some(12),
        causal: true,
        ..FastAttentionConfig::new(8)
    })
    .unwrap();
    let (h, d) = (3, 8);
    let rows = |seed| head_rows(h, d, seed);
    let (mut by_heads, mut together) = (fa.causal_state(h, d), fa.causal_state(h, d));
    for t in 0..5u64 {
        let (q, k, v) = (rows(10 * t + 1), rows(10 * t + 2), rows(10 * t + 3));
        let want =
            with_team(|team| fa.step_state(&mut together, &q.view(), &k.view(), &v.view(), team))
                .unwrap();
        let step = fa.begin_step(&mut by_heads).unwrap();
        assert_eq!(step.heads(), h);
        // Heads in any order.
        for head in [2, 0, 1] {
            let mut out = vec![f32::NAN; d];
            let (qs, ks, vs) = (q.row(head), k.row(head), v.row(head));
            step.step_head(
                head,
                qs.as_slice().unwrap(),
                ks.as_slice().unwrap(),
                vs.as_slice().unwrap(),
                &mut out,
            )
            .unwrap();
            assert_eq!(out.as_slice(), want.row(head).as_slice().unwrap());
        }
        // Each head once per step; no head past the state's; rows of the heads' widths.
        let q0 = q.row(0).to_vec();
        let mut out = vec![0f32; d];
        let again = step.step_head(0, &q0, &q0, &q0, &mut out).unwrap_err();
        assert!(again.to_string().contains("already stepped"), "{again}");
        let past = step.step_head(h, &q0, &q0, &q0, &mut out).unwrap_err();
        assert!(past.to_string().contains("StateStep::step_head"), "{past}");
        let short = step
            .step_head(1, &q0[..d - 1], &q0, &q0, &mut out)
            .unwrap_err();
        assert!(
            short.to_string().contains("StateStep::step_head"),
            "{short}"
        );
    }
    assert_eq!(by_heads.len(), 5);
}

#[test]
fn a_step_after_a_redraw_reads_the_new_projection() {
    // The fused step keeps the projection's transpose in the state between steps; a redrawn
    // projection must replace it, as `extend_state` and `query_state` read the new one.
    performer_tensor::rng::manual_seed(3);
    let fa = FastAttention::new(FastAttentionConfig {
        nb_features: Some(16),
        causal: true,
        ..FastAttentionConfig::new(8)
    })
    .unwrap();
    let (h, d) = (2, 8);
    let rows = |seed| head_rows(h, d, seed);
    let mut stepped = fa.causal_state(h, d);
    for t in 0..6u64 {
        if t == 3 {
            fa.redraw_projection_matrix_with(&mut Generator::seeded(99))
                .unwrap();
        }
        let (q, k, v) = (rows(10 * t + 1), rows(10 * t + 2), rows(10 * t + 3));
        // The two-call path on a copy of the same sums.
        let mut copy = stepped.clone();
        let k3 = k.view().insert_axis(Axis(1));
        let v3 = v.view().insert_axis(Axis(1));
        fa.extend_state(&mut copy, &k3, &v3).unwrap();
        let want = fa.query_state(&copy, &q.view()).unwrap();
        let got =
            with_team(|team| fa.step_state(&mut stepped, &q.view(), &k.view(), &v.view(), team))
                .unwrap();
        assert_close(
            &format!("step {t}"),
            got.view().into_dyn(),
            want.view().into_dyn(),
            1e-5,
        );
    }
}
