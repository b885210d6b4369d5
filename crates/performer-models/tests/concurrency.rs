//! A model shared across threads (`Arc<PerformerLM>`, eval mode) serves inference from several
//! threads at once with results bit for bit equal to serial calls: forwards, last-position
//! logits, token-by-token decoding and seeded generation.

use std::sync::Arc;

use ndarray::{Array2, Array3};
use performer_models::*;
use performer_tensor::Module;

fn config() -> PerformerLMConfig {
    PerformerLMConfig {
        num_tokens: 50,
        max_seq_len: 64,
        dim: 32,
        depth: 2,
        heads: 4,
        dim_head: 8,
        nb_features: Some(16),
        local_attn_heads: LocalAttnHeads::PerLayer(vec![1, 0]),
        local_window_size: 8,
        causal: true,
        shift_tokens: true,
        ..Default::default()
    }
}

/// Thread `i`'s input: its own tokens and length.
fn input(i: usize) -> Array2<i64> {
    Array2::from_shape_fn((2, 20 + 5 * i), |(b, j)| {
        ((7 * i + 3 * b + 11 * j) % 49 + 1) as i64
    })
}

#[derive(PartialEq, Debug)]
struct Outputs {
    logits: Vec<u32>,
    last: Vec<u32>,
    decoded: Vec<u32>,
    generated: Array2<i64>,
}

fn bits(v: impl IntoIterator<Item = f32>) -> Vec<u32> {
    v.into_iter().map(f32::to_bits).collect()
}

fn serve(ar: &AutoregressiveWrapper, i: usize) -> Outputs {
    let lm = &ar.net;
    let x = input(i);
    // A full forward, with gradients recorded (the graph is per call).
    let logits = lm.forward(&x.view(), &LmInputs::default()).unwrap();
    let last = lm.last_logits(&x.view(), &LmInputs::default()).unwrap();
    let mut state = lm.decoding_state(2, None, None).unwrap();
    let prompt = x.slice(ndarray::s![.., ..10]).to_owned();
    let mut decoded = bits(lm.decode(&mut state, &prompt.view(), None).unwrap());
    for j in 10..14 {
        let step = [x[[0, j]], x[[1, j]]];
        decoded.extend(bits(lm.step(&mut state, &step).unwrap()));
    }
    let opts = GenerateOptions {
        seed: i as u64,
        ..Default::default()
    };
    let generated = ar
        .generate(&prompt.view(), 12, &opts, &SeqInputs::default())
        .unwrap();
    Outputs {
        logits: bits(logits.to_vec()),
        last: bits(last.iter().copied()),
        decoded,
        generated,
    }
}

#[test]
fn shared_model_serves_threads_bit_for_bit_like_serial_calls() {
    performer_tensor::rng::manual_seed(21);
    let ar = Arc::new(AutoregressiveWrapper::new(
        PerformerLM::new(config()).unwrap(),
    ));
    ar.set_training(false);
    let threads = 8;
    let serial: Vec<Outputs> = (0..threads).map(|i| serve(&ar, i)).collect();
    // Twice, so that threads overlap in different phases.
    for round in 0..2 {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let ar = Arc::clone(&ar);
                std::thread::spawn(move || serve(&ar, (i + round) % threads))
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let got = h.join().expect("a serving thread panicked");
            assert!(
                got == serial[(i + round) % threads],
                "thread {i} (round {round}) differs from the serial call"
            );
        }
    }
    // Serving changed nothing: still eval mode, no redraw counted.
    assert!(!is_training(&ar.net));
    assert_eq!(ar.net.performer.proj_updater.calls_since_last_redraw(), 0);
}

#[test]
fn shared_encoder_serves_threads_bit_for_bit() {
    performer_tensor::rng::manual_seed(22);
    let enc = Arc::new(
        PerformerLM::new(PerformerLMConfig {
            causal: false,
            ..config()
        })
        .unwrap(),
    );
    enc.set_training(false);
    let run = |lm: &PerformerLM, i: usize| -> Array3<f32> {
        let x = input(i);
        let mask = Array2::from_shape_fn(x.dim(), |(b, j)| b == 0 || j < 15);
        let h = lm
            .forward(
                &x.view(),
                &LmInputs {
                    mask: Some(mask.view()),
                    return_encodings: true,
                    ..Default::default()
                },
            )
            .unwrap();
        h.to_array().into_dimensionality().unwrap()
    };
    let serial: Vec<Array3<f32>> = (0..6).map(|i| run(&enc, i)).collect();
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let enc = Arc::clone(&enc);
            std::thread::spawn(move || run(&enc, i))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let got = h.join().unwrap();
        assert!(
            bits(got.iter().copied()) == bits(serial[i].iter().copied()),
            "thread {i} differs"
        );
    }
}
