//! Bad numbers in a whole model: a PerformerLM whose token embeddings are huge, forward and
//! backward, and the non-finite detection a trainer uses (`check_finite_step`).
//!
//! What performer-pytorch 1.1.4 does (float32, CPU, the same model sizes, checked in the
//! reference environment): with embeddings scaled by 1e10 or 1e19 the logits, the loss and every
//! gradient stay finite (each layer normalizes its input first); from 1e20 on, the squares in
//! the first LayerNorm's variance overflow float32 and the output, the loss and the gradients
//! of `token_emb.weight` and the first norm are NaN. This crate must be finite wherever the
//! reference is, and where it is not, `check_finite_step` must turn the NaN into a
//! `NonFinite` error that names the step and the parameters.

use ndarray::Array2;
use performer_models::*;
use performer_tensor::{Error, Module};

fn lm(causal: bool) -> AutoregressiveWrapper {
    performer_tensor::rng::manual_seed(11);
    AutoregressiveWrapper::new(
        PerformerLM::new(PerformerLMConfig {
            num_tokens: 20,
            max_seq_len: 32,
            dim: 16,
            depth: 2,
            heads: 2,
            dim_head: 8,
            nb_features: Some(12),
            causal,
            ..Default::default()
        })
        .unwrap(),
    )
}

#[test]
fn huge_embeddings_stay_finite_where_the_reference_does_and_are_reported_where_not() {
    let x = Array2::from_shape_fn((2, 17), |(i, j)| ((3 * i + 5 * j) % 19 + 1) as i64);
    for causal in [true, false] {
        for scale in [1e10f32, 1e19, 1e20, 1e30, 1e38] {
            let ar = lm(causal);
            ar.net
                .token_emb
                .weight
                .update(|w| w.mapv_inplace(|v| v * scale));
            let what = format!("causal {causal}, embeddings x{scale:e}");
            let loss = ar.loss(&x.view(), &SeqInputs::default()).unwrap();
            let value = loss.item().unwrap();
            let grads = loss.backward().unwrap();
            let verdict = check_finite_step(7, value, &ar, &grads);
            if scale <= 1e19 {
                assert!(value.is_finite(), "{what}: loss {value}");
                assert!(verdict.is_ok(), "{what}: {verdict:?}");
                assert!(non_finite_gradients(&ar, &grads).is_empty(), "{what}");
            } else {
                // The reference is NaN here; finite results are fine too, but a NaN must be
                // reported clearly.
                match verdict {
                    Ok(()) => assert!(value.is_finite() && grads.all_finite(), "{what}"),
                    Err(Error::NonFinite(msg)) => {
                        assert!(msg.contains("step 7"), "{what}: {msg}");
                        assert!(
                            !value.is_finite() || msg.contains("token_emb.weight"),
                            "{what}: {msg}"
                        );
                        println!("{what}: {msg}");
                    }
                    Err(e) => panic!("{what}: unexpected {e}"),
                }
            }
        }
    }
}

#[test]
fn check_finite_step_names_the_parameters() {
    let ar = lm(true);
    let x = Array2::from_shape_fn((1, 9), |(_, j)| (j % 19 + 1) as i64);
    let loss = ar.loss(&x.view(), &SeqInputs::default()).unwrap();
    let value = loss.item().unwrap();
    let mut grads = loss.backward().unwrap();
    assert!(check_finite_step(1, value, &ar, &grads).is_ok());
    // A NaN loss is named with its step.
    let e = check_finite_step(12, f32::NAN, &ar, &grads).unwrap_err();
    assert!(matches!(e, Error::NonFinite(_)));
    assert!(
        e.to_string().contains("step 12") && e.to_string().contains("NaN"),
        "{e}"
    );
    // An infinite gradient is named by its parameter.
    let p = ar.net.norm.weight.clone();
    grads.get_mut(p.id()).unwrap()[[3]] = f32::INFINITY;
    let e = check_finite_step(13, value, &ar, &grads).unwrap_err();
    assert!(e.to_string().contains("step 13"), "{e}");
    assert!(e.to_string().contains("net.norm.weight"), "{e}");
    assert_eq!(non_finite_gradients(&ar, &grads), vec!["net.norm.weight"]);
    // Parameters themselves.
    assert!(non_finite_parameters(&ar).is_empty());
    ar.net.token_emb.weight.update(|w| w[[0, 0]] = f32::NAN);
    assert_eq!(non_finite_parameters(&ar), vec!["net.token_emb.weight"]);
    let _ = ar.num_parameters();
}
