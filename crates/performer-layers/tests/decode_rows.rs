//! The decoding step's row kernels equal the tensor ops they stand in for: Linear (one layer and
//! several in one phase, with and without bias, shapes off the kernels' blocks of 4 rows and
//! 16 lanes), LayerNorm, ScaleNorm, the rotary map and a whole feed-forward block (GELU and
//! GLU), each with one helper thread and without.

use ndarray::{Array2, ArrayD, Axis, IxDyn};
use performer_layers::*;
use performer_tensor::rng::Generator;
use performer_tensor::team::{Team, with_team};
use performer_tensor::{Module, Tensor, no_grad};

fn randn(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut g = Generator::seeded(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || g.normal())
}

fn rows(shape: (usize, usize), seed: u64) -> Array2<f32> {
    randn(&[shape.0, shape.1], seed)
        .into_dimensionality()
        .unwrap()
}

/// `(b, d)` of a `(b, d)` or `(b, 1, d)` tensor.
fn as_rows(t: &Tensor) -> Array2<f32> {
    let s = t.shape().to_vec();
    t.to_array()
        .into_shape_with_order((s[0], *s.last().unwrap()))
        .unwrap()
}

fn assert_close(got: &Array2<f32>, want: &Array2<f32>, what: &str) {
    performer_tensor::testing::assert_close(what, got, want, 1e-5);
}

/// Runs `f` with a team of the calling thread alone and with rayon's helpers.
fn with_both(f: impl Fn(&Team, &str)) {
    f(&Team::single(), "single");
    with_team(|team| f(team, "team"));
}

#[test]
fn linear_rows_equal_linear_forward() {
    with_both(|team, label| {
        for (b, inf, outf, bias) in [(1, 256, 768, false), (3, 37, 70, true), (2, 1024, 5, true)] {
            let layer = Linear::new(inf, outf, bias);
            let x = rows((b, inf), 7);
            let want = no_grad(|| layer.forward(&Tensor::new(x.clone().into_dyn()))).unwrap();
            let got = layer.forward_rows(&x.view(), team).unwrap();
            assert_close(&got, &as_rows(&want), &format!("{label} {b}x{inf}->{outf}"));
        }
        // Several layers in one phase, each with its own width.
        let layers = [
            Linear::new(19, 9, true),
            Linear::new(19, 130, false),
            Linear::new(19, 4, true),
        ];
        let x = rows((2, 19), 8);
        let got = linear_rows(&layers.iter().collect::<Vec<_>>(), &x.view(), team).unwrap();
        for (l, g) in layers.iter().zip(&got) {
            let want = no_grad(|| l.forward(&Tensor::new(x.clone().into_dyn()))).unwrap();
            assert_close(g, &as_rows(&want), &format!("{label} several layers"));
        }
        // A width that does not match, or a bias of another length, is an error naming the
        // layer.
        let err = Linear::new(8, 4, false)
            .forward_rows(&rows((1, 9), 1).view(), team)
            .unwrap_err();
        assert!(err.to_string().contains("Linear"), "{err}");
        let bad_bias = Linear {
            bias: Linear::new(8, 5, true).bias,
            ..Linear::new(8, 4, false)
        };
        let err = bad_bias
            .forward_rows(&rows((1, 8), 1).view(), team)
            .unwrap_err();
        assert!(err.to_string().contains("bias"), "{err}");
    });
}

#[test]
fn norms_and_rotary_rows_equal_their_tensor_forms() {
    let x = rows((3, 64), 3);
    let t = Tensor::new(x.clone().into_dyn());
    let ln = LayerNorm::new(64);
    ln.weight.set(randn(&[64], 4)).unwrap();
    ln.bias.set(randn(&[64], 5)).unwrap();
    let want = no_grad(|| ln.forward(&t)).unwrap();
    assert_close(
        &ln.forward_rows(&x.view()).unwrap(),
        &as_rows(&want),
        "LayerNorm",
    );
    assert!(LayerNorm::new(8).forward_rows(&x.view()).is_err());

    let sn = PreScaleNorm::new(std::sync::Arc::new(FeedForward::new(64, 1, 0.0, false)));
    sn.g.set(ArrayD::from_elem(IxDyn(&[1]), 1.7)).unwrap();
    let want = no_grad(|| sn.normalize(&t)).unwrap();
    assert_close(&sn.normalize_rows(&x.view()), &as_rows(&want), "ScaleNorm");

    // One position's rotary row applied to (b * heads) rows vs the map on (b, heads, 1, d).
    let table = FixedPositionalEmbedding::new(64, 40).forward(40).unwrap();
    let row = table.narrow(1, 29, 1).unwrap();
    let q = Tensor::new(
        x.clone()
            .into_shape_with_order((3, 1, 1, 64))
            .unwrap()
            .into_dyn(),
    );
    let (want, _) = no_grad(|| apply_rotary_pos_emb(&q, &q, &row)).unwrap();
    let alone = no_grad(|| apply_rotary(&q, &row)).unwrap();
    assert_close(&as_rows(&alone), &as_rows(&want), "apply_rotary");
    let mut got = x.clone();
    let row_values = row.to_array().iter().copied().collect::<Vec<_>>();
    rotate_rows(&mut got.view_mut(), &row_values).unwrap();
    assert_close(&got, &as_rows(&want), "rotary");
    assert!(rotate_rows(&mut got.view_mut(), &row_values[..10]).is_err());
}

#[test]
fn feed_forward_rows_equal_its_decode() {
    with_both(|team, label| {
        // Hidden widths of one block of 128 units, two with a partial one (216) and eight.
        for (dim, mult, b, glu) in [
            (32, 4, 2, false),
            (32, 4, 2, true),
            (24, 9, 3, false),
            (24, 9, 3, true),
            (256, 4, 1, false),
        ] {
            let ff = FeedForward::new(dim, mult, 0.1, glu);
            ff.set_training(false);
            let x = rows((b, dim), 9);
            let want = no_grad(|| {
                ff.decode(
                    &Tensor::new(x.clone().insert_axis(Axis(1)).into_dyn()),
                    &BlockInputs::none(),
                    &mut BlockState::Empty,
                )
            })
            .unwrap();
            let got = ff
                .decode_rows(
                    &x.view(),
                    &BlockInputs::none(),
                    &mut BlockState::Empty,
                    team,
                )
                .unwrap();
            assert_close(
                &got,
                &as_rows(&want),
                &format!("{label} {b}x{dim} mult {mult} glu {glu}"),
            );
        }
    });
}

#[test]
fn attention_step_refuses_a_state_of_another_batch_and_leaves_it_as_it_was() {
    let attn = SelfAttention::new(AttentionConfig {
        causal: true,
        heads: 2,
        dim_head: Some(8),
        nb_features: Some(8),
        ..AttentionConfig::new(16)
    })
    .unwrap();
    attn.set_training(false);
    let prompt = Tensor::new(randn(&[1, 3, 16], 40));
    let (mut state, mut twin) = (BlockState::Empty, BlockState::Empty);
    for st in [&mut state, &mut twin] {
        no_grad(|| attn.decode(&prompt, &BlockInputs::none(), st)).unwrap();
    }
    // Two sequences against the state of one: an error naming the op, before the state counts
    // the position (a twin that never saw the bad call steps to the same values afterwards).
    let err = with_team(|team| {
        attn.decode_rows(
            &rows((2, 16), 41).view(),
            &BlockInputs::none(),
            &mut state,
            team,
        )
    })
    .unwrap_err();
    assert!(err.to_string().contains("Attention::decode_rows"), "{err}");
    let x = rows((1, 16), 42);
    let [a, b] = [&mut state, &mut twin].map(|st| {
        with_team(|team| attn.decode_rows(&x.view(), &BlockInputs::none(), st, team)).unwrap()
    });
    assert_eq!(a, b);
}
