//! Inference from bf16 weights (`PerformerLM::to_dtype(DType::BF16)`): which weights convert,
//! how close the logits and the sampled tokens stay to f32's on the `generate-512` benchmark's
//! model, that a bf16 model's decoding steps agree with its own full forward, that training one
//! is refused, and bf16 checkpoints (save, load into either storage type, refusals).

use std::collections::BTreeMap;

use ndarray::{Array2, s};
use performer_models::checkpoint::{
    load_state_dict_file, pytorch_state_dict, save_state_dict_file,
};
use performer_models::sampling::sample;
use performer_models::*;
use performer_tensor::bf16_gemm::{Bf16Products, native_available, use_native, with_bf16_products};
use performer_tensor::io::{TensorData, load_safetensors, save_safetensors};
use performer_tensor::optim::{Adam, Optimizer};
use performer_tensor::rng::Generator;
use performer_tensor::testing::relative_error;
use performer_tensor::{DType, Module};

fn tokens(b: usize, n: usize, vocab: usize, seed: u64) -> Array2<i64> {
    let mut g = Generator::seeded(seed);
    Array2::from_shape_simple_fn((b, n), || g.below(vocab as u64) as i64)
}

/// The `generate-512` benchmark's model: the lm-causal-1k shape with max_seq_len 2048.
fn bench_config() -> PerformerLMConfig {
    PerformerLMConfig {
        num_tokens: 256,
        max_seq_len: 2048,
        dim: 256,
        depth: 4,
        heads: 4,
        dim_head: 64,
        nb_features: Some(256),
        causal: true,
        ..Default::default()
    }
}

/// A small causal model with every kind of weight: local heads, shift, GLU, untied logits.
fn small_config() -> PerformerLMConfig {
    PerformerLMConfig {
        num_tokens: 40,
        max_seq_len: 64,
        dim: 32,
        depth: 2,
        heads: 4,
        dim_head: 8,
        nb_features: Some(12),
        causal: true,
        local_attn_heads: LocalAttnHeads::PerLayer(vec![1, 0]),
        local_window_size: 8,
        shift_tokens: true,
        ff_glu: true,
        ..Default::default()
    }
}

/// Two models with the same weights, the second converted to `dtype`.
fn pair(config: PerformerLMConfig, seed: u64, dtype: DType) -> (PerformerLM, PerformerLM) {
    performer_tensor::rng::manual_seed(seed);
    let a = PerformerLM::new(config.clone()).unwrap();
    let b = PerformerLM::new(config).unwrap();
    b.load_state_dict(&a.state_dict()).unwrap();
    b.to_dtype(dtype);
    a.set_training(false);
    b.set_training(false);
    (a, b)
}

#[test]
fn to_dtype_stores_every_matrix_in_bf16_and_nothing_else() {
    let (f32_lm, lm) = pair(small_config(), 1, DType::BF16);
    assert_eq!(lm.dtype(), DType::BF16);
    assert_eq!(f32_lm.dtype(), DType::F32);
    let mut matrices = 0;
    let (params, f32_params) = (lm.named_parameters(), f32_lm.named_parameters());
    assert_eq!(params.len(), f32_params.len());
    for ((name, p), (_, q)) in params.iter().zip(&f32_params) {
        let is_matrix = p.shape().len() == 2;
        let want = if is_matrix { DType::BF16 } else { DType::F32 };
        assert_eq!(p.dtype(), want, "{name}");
        // Values: each the nearest bf16 of the f32 weight (the others untouched).
        let (got, orig) = (p.value(), q.value());
        assert_eq!(got.shape(), orig.shape(), "{name}");
        for (g, o) in got.iter().zip(orig.iter()) {
            let rounded = if is_matrix {
                performer_tensor::dtype::round_bf16(*o)
            } else {
                *o
            };
            assert_eq!(g.to_bits(), rounded.to_bits(), "{name}");
        }
        matrices += is_matrix as usize;
    }
    // token_emb, to_out, and per layer q, k, v, out, ff w1, w2.
    assert_eq!(matrices, 2 + 2 * 6);
    // The lookup without a graph reads the bf16 rows: the rounded table's rows, and ids past
    // the table are refused as the f32 lookup refuses them.
    let ids = ndarray::arr2(&[[3i64, 0, 39], [39, 7, 3]]).into_dyn();
    let rounded = f32_lm
        .token_emb
        .weight
        .value()
        .mapv(performer_tensor::dtype::round_bf16);
    let want = performer_tensor::Tensor::new(rounded.into_shared())
        .embedding(&ids.view())
        .unwrap();
    let got = performer_tensor::no_grad(|| lm.token_emb.forward(&ids.view())).unwrap();
    assert_eq!(got.shape(), &[2, 3, 32]);
    assert_eq!(got.to_array(), want.to_array());
    for bad in [40i64, -1] {
        let ids = ndarray::arr1(&[0i64, bad]).into_dyn();
        let e16 = performer_tensor::no_grad(|| lm.token_emb.forward(&ids.view())).unwrap_err();
        let e32 = f32_lm.token_emb.forward(&ids.view()).unwrap_err();
        assert_eq!(e16.to_string(), e32.to_string());
    }
    // Back to f32: exact, the weights keep their rounding.
    let before = lm.state_dict();
    lm.to_dtype(DType::F32);
    assert_eq!(lm.dtype(), DType::F32);
    assert!(
        lm.named_parameters()
            .iter()
            .all(|(_, p)| p.dtype() == DType::F32)
    );
    assert_eq!(lm.state_dict(), before);
}

/// Primes both models with the same prompt, then feeds both the f32 model's sampled tokens
/// for `steps` steps; returns the worst relative error of the bf16 logits against f32's
/// (`max |bf16 - f32| / max |f32|` per step, the worst step).
fn worst_logit_error(f32_lm: &PerformerLM, lm: &PerformerLM, prompt: usize, steps: usize) -> f32 {
    let x = tokens(1, prompt, 256, 7);
    let mut sa = f32_lm.decoding_state(1, None, None).unwrap();
    let mut sb = lm.decoding_state(1, None, None).unwrap();
    let mut la = f32_lm.decode(&mut sa, &x.view(), None).unwrap();
    let mut lb = lm.decode(&mut sb, &x.view(), None).unwrap();
    let mut worst = 0f32;
    let mut g = Generator::seeded(3);
    for step in 0..=steps {
        let err = relative_error(&lb, &la).unwrap_or_else(|e| panic!("step {step}: {e}"));
        worst = worst.max(err);
        if step == steps {
            break;
        }
        let tok = sample(&la.row(0), &GenerateOptions::default(), &mut g).unwrap();
        la = f32_lm.step(&mut sa, &[tok]).unwrap();
        lb = lm.step(&mut sb, &[tok]).unwrap();
    }
    worst
}

#[test]
fn bf16_logits_stay_within_1e_2_of_f32_over_a_512_token_generation() {
    // Both kinds of products: the CPU's bf16 dot products (activations rounded too, where the
    // CPU has them; the default) and the widened weights (the weights' rounding only).
    let (f32_lm, lm) = pair(bench_config(), 0, DType::BF16);
    for mode in [Bf16Products::Native, Bf16Products::Widened] {
        let worst = with_bf16_products(mode, || worst_logit_error(&f32_lm, &lm, 512, 512));
        println!(
            "bf16 vs f32 logits, 512-token prompt then 512 steps, {mode:?} products{}: worst \
             relative error {worst:.3e}",
            if mode == Bf16Products::Native && !native_available() {
                " (this CPU has no AVX-512 BF16: widened)"
            } else {
                ""
            }
        );
        assert!(worst < 1e-2, "{mode:?}: worst relative error {worst}");
        // Not trivially equal: the weights did change.
        assert!(worst > 0.0);
    }
}

/// Generates 64 tokens after `prime` with the default options (top-k 0.9, seed 0).
fn generate64(net: PerformerLM, prime: &Array2<i64>) -> Array2<i64> {
    let out = AutoregressiveWrapper::new(net)
        .generate(
            &prime.view(),
            64,
            &GenerateOptions::default(),
            &SeqInputs::default(),
        )
        .unwrap();
    assert_eq!(out.dim(), (prime.nrows(), 64));
    out
}

/// How many tokens at the start of `a` and `b` agree (same shapes checked).
fn leading_agreement(a: &Array2<i64>, b: &Array2<i64>) -> usize {
    assert_eq!(a.dim(), b.dim());
    a.iter().zip(b.iter()).take_while(|(p, q)| p == q).count()
}

#[test]
fn bf16_generation_computes_in_f32_what_the_same_weights_give_in_f32() {
    with_bf16_products(Bf16Products::Widened, widened_generation_is_the_f32_models)
}

fn widened_generation_is_the_f32_models() {
    // Widened products (activations and sums in f32): the bf16 model samples exactly what an
    // f32 model holding the same (rounded) weights samples, all 64 tokens, on the benchmark's
    // model.
    let (_, lm) = pair(bench_config(), 0, DType::BF16);
    let same_weights = PerformerLM::new(bench_config()).unwrap();
    same_weights.load_state_dict(&lm.state_dict()).unwrap();
    same_weights.set_training(false);
    assert_eq!(same_weights.dtype(), DType::F32);
    let prime = tokens(1, 512, 256, 5);
    let (a, b) = (generate64(same_weights, &prime), generate64(lm, &prime));
    assert_eq!(leading_agreement(&a, &b), 64, "\n{a}\n{b}");
}

/// `generate` of 64 tokens after `prime` with `seed`, under `mode`.
fn generate64_with(
    model: &AutoregressiveWrapper,
    prime: &Array2<i64>,
    seed: u64,
    mode: Bf16Products,
) -> Array2<i64> {
    let opts = GenerateOptions {
        seed,
        ..Default::default()
    };
    let out = with_bf16_products(mode, || {
        model.generate(&prime.view(), 64, &opts, &SeqInputs::default())
    })
    .unwrap();
    assert_eq!(out.dim(), (prime.nrows(), 64));
    out
}

#[test]
fn bf16_generation_samples_the_f32_models_tokens_on_the_untrained_benchmark_model() {
    // The bar: generate-512-bf16 samples what generate-512 samples, the first 16
    // tokens at least. The benchmark's untrained model has a near-uniform top-k (25 of 256
    // logits within a few hundredths), where the sampler's exponential race moves a draw only
    // when its two best ratios lie within the bf16 error, or the top-k's edge changes under
    // the drawn token.
    for mode in [Bf16Products::Native, Bf16Products::Widened] {
        // generate-512 exactly (bench_workload): seed 0, the model, then the prompt from the
        // global generator, sampler seed 0.
        performer_tensor::rng::manual_seed(0);
        let f32_lm = PerformerLM::new(bench_config()).unwrap();
        let prime = performer_tensor::rng::with_rng(|g| {
            Array2::from_shape_simple_fn((1, 512), || g.below(256) as i64)
        });
        let lm = PerformerLM::new(bench_config()).unwrap();
        lm.load_state_dict(&f32_lm.state_dict()).unwrap();
        lm.to_dtype(DType::BF16);
        let (a, b) = (
            AutoregressiveWrapper::new(f32_lm),
            AutoregressiveWrapper::new(lm),
        );
        a.set_training(false);
        b.set_training(false);
        let bench = leading_agreement(
            &generate64_with(&a, &prime, 0, mode),
            &generate64_with(&b, &prime, 0, mode),
        );
        // Other prompts and sampler seeds on the same model: the bar is not one lucky draw.
        let mut others = Vec::new();
        for prompt_seed in 0..3 {
            let prime = tokens(1, 512, 256, 100 + prompt_seed);
            for seed in 1..4 {
                others.push(leading_agreement(
                    &generate64_with(&a, &prime, seed, mode),
                    &generate64_with(&b, &prime, seed, mode),
                ));
            }
        }
        println!(
            "untrained bench model, {mode:?} products: bf16 generation equals f32's for the \
             first {bench} of 64 tokens; other prompts and seeds: {others:?}"
        );
        assert!(bench >= 16, "{mode:?}: {bench}");
        let short = others.iter().filter(|&&n| n < 16).count();
        assert!(short <= 1, "{mode:?}: {others:?}");
    }
}

/// Tokens of a Markov chain where each token is followed by `(3t + 1) % vocab` four times in
/// five, else by `(5t + 2) % vocab`.
fn markov_tokens(b: usize, n: usize, vocab: i64, seed: u64) -> Array2<i64> {
    let mut g = Generator::seeded(seed);
    let mut out = Array2::zeros((b, n));
    for mut row in out.rows_mut() {
        let mut t = g.below(vocab as u64) as i64;
        for x in row.iter_mut() {
            *x = t;
            t = match g.below(5) {
                0 => (5 * t + 2) % vocab,
                _ => (3 * t + 1) % vocab,
            };
        }
    }
    out
}

#[test]
fn bf16_generation_samples_the_tokens_f32_samples_once_the_model_has_learned() {
    // Against the f32 model it was converted from, the tokens agree as long as no draw falls
    // within the logits' bf16 error of a boundary between two tokens: a model that has
    // learned something (here a Markov chain, 80/20 successors) has such draws rarely. (An
    // untrained model's near-uniform top-k makes them frequent; see the README.)
    let config = PerformerLMConfig {
        num_tokens: 32,
        max_seq_len: 256,
        dim: 64,
        depth: 2,
        heads: 4,
        dim_head: 16,
        nb_features: Some(32),
        causal: true,
        ..Default::default()
    };
    performer_tensor::rng::manual_seed(8);
    let model = AutoregressiveWrapper::new(PerformerLM::new(config.clone()).unwrap());
    model.set_training(true);
    let mut opt = Adam::new(model.named_parameters(), 3e-3);
    let mut last = f32::NAN;
    for step in 0..150 {
        let x = markov_tokens(8, 65, 32, step);
        let loss = model.loss(&x.view(), &SeqInputs::default()).unwrap();
        last = loss.item().unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
    }
    // The chain's entropy is 0.50 nats per token: the model is close to it.
    assert!(last < 0.8, "loss {last} after training");
    model.set_training(false);
    let f32_lm = PerformerLM::new(config).unwrap();
    f32_lm.load_state_dict(&model.net.state_dict()).unwrap();
    f32_lm.set_training(false);
    model.net.to_dtype(DType::BF16);
    let prime = markov_tokens(2, 64, 32, 1000);
    let (a, b) = (generate64(f32_lm, &prime), {
        let bf16 = AutoregressiveWrapper::new(model.net.clone());
        bf16.generate(
            &prime.view(),
            64,
            &GenerateOptions::default(),
            &SeqInputs::default(),
        )
        .unwrap()
    });
    assert_eq!(a.dim(), b.dim());
    let per_row: Vec<usize> = (0..2)
        .map(|i| {
            let (ra, rb) = (a.row(i), b.row(i));
            ra.iter().zip(rb.iter()).take_while(|(p, q)| p == q).count()
        })
        .collect();
    println!("trained model: bf16 generation agrees with f32 for the first {per_row:?} of 64");
    assert!(per_row.iter().all(|&n| n >= 16), "{per_row:?}\n{a}\n{b}");
}

#[test]
fn bf16_decoding_steps_equal_the_bf16_full_forward() {
    with_bf16_products(Bf16Products::Widened, widened_decoding_is_the_full_forward)
}

fn widened_decoding_is_the_full_forward() {
    // Widened products. The steps' matrix-vector products read bf16 directly; the full forward's GEMMs read the
    // widened weights: both must give the same model. The small model has local heads, token
    // shift and GLU; the benchmark's shape splits its products into several chunks. There
    // decoding and the full forward differ by 8.7e-4, and so do they for an f32 model of the
    // same rounded weights (FAVOR+'s stabilizers are per pass): both paths are compared with
    // that model's, which they must equal exactly.
    let (_, lm) = pair(small_config(), 2, DType::BF16);
    let (decoded, forward) = decode_and_forward(&lm);
    assert_eq!(decoded.len(), forward.len());
    for (end, (d, f)) in decoded.iter().zip(&forward).enumerate() {
        let err = relative_error(d, f).unwrap();
        // The tolerance of tests/decoding.rs for f32 models.
        assert!(
            err < 1e-4,
            "decoding vs full forward after {} tokens: {err}",
            end + 8
        );
    }
    let config = PerformerLMConfig {
        max_seq_len: 64,
        ..bench_config()
    };
    let (_, lm) = pair(config.clone(), 2, DType::BF16);
    let rounded = PerformerLM::new(config).unwrap();
    rounded.load_state_dict(&lm.state_dict()).unwrap();
    rounded.set_training(false);
    let (d16, f16) = decode_and_forward(&lm);
    let (d32, f32_) = decode_and_forward(&rounded);
    assert_eq!((d16.len(), f16.len()), (d32.len(), f32_.len()));
    for (a, b) in d16.iter().zip(&d32).chain(f16.iter().zip(&f32_)) {
        assert_eq!(relative_error(a, b).unwrap(), 0.0);
    }
}

#[test]
fn native_bf16_decoding_steps_agree_with_the_native_full_forward() {
    // With the CPU's bf16 dot products (activations rounded to bf16 as they enter each
    // product) the steps and the full forward round slightly different activations (FAVOR+'s
    // stabilizers are per pass), so a rounding can land on the other side of a bf16 step: they
    // agree within the bf16 logits' bar, 1e-2, not to f32 precision. On a CPU without AVX-512
    // BF16 the products are the widened ones, which the test above checks exactly.
    println!("native bf16 products on this CPU: {}", use_native());
    for config in [
        small_config(),
        PerformerLMConfig {
            max_seq_len: 64,
            ..bench_config()
        },
    ] {
        let (f32_lm, lm) = pair(config, 2, DType::BF16);
        let (decoded, forward) = decode_and_forward(&lm);
        let (d32, f32_) = decode_and_forward(&f32_lm);
        assert_eq!(
            (decoded.len(), forward.len()),
            (d32.len(), f32_.len()),
            "the same prefixes for both models"
        );
        assert_eq!(decoded.len(), forward.len());
        let mut worst = 0f32;
        for (end, ((d, f), (a, b))) in decoded
            .iter()
            .zip(&forward)
            .zip(d32.iter().zip(&f32_))
            .enumerate()
        {
            let steps = relative_error(d, f).unwrap();
            let against_f32 = relative_error(d, a)
                .unwrap()
                .max(relative_error(f, b).unwrap());
            worst = worst.max(steps);
            assert!(
                steps < 1e-2 && against_f32 < 1e-2,
                "after {} tokens: decoding vs full forward {steps}, against f32 {against_f32}",
                end + 8
            );
        }
        println!(
            "dim {}: decoding vs full forward, worst {worst:.3e}",
            lm.config().dim
        );
    }
}

/// Logits after each of 8..=30 tokens of two sequences: from the decoding state (the prompt of
/// 8, then one step per token) and from a full forward over each prefix.
fn decode_and_forward(lm: &PerformerLM) -> (Vec<Array2<f32>>, Vec<Array2<f32>>) {
    let total = 30;
    let x = tokens(2, total, lm.config().num_tokens, 11);
    let mut state = lm.decoding_state(2, None, None).unwrap();
    let (mut decoded, mut forward) = (Vec::new(), Vec::new());
    for end in 8..=total {
        decoded.push(if end == 8 {
            lm.decode(&mut state, &x.slice(s![.., ..8]), None).unwrap()
        } else {
            lm.decode(&mut state, &x.slice(s![.., end - 1..end]), None)
                .unwrap()
        });
        forward.push(
            lm.last_logits(&x.slice(s![.., ..end]), &LmInputs::default())
                .unwrap(),
        );
    }
    (decoded, forward)
}

#[test]
fn training_a_bf16_model_is_refused_by_name_and_leaves_it_unchanged() {
    let (_, lm) = pair(small_config(), 4, DType::BF16);
    let model = AutoregressiveWrapper::new(lm);
    model.set_training(true);
    let mut opt = Adam::new(model.named_parameters(), 1e-3);
    let x = tokens(2, 17, 40, 1);
    let params = |m: &AutoregressiveWrapper| -> Vec<_> {
        m.named_parameters()
            .into_iter()
            .map(|(k, p)| (k, p.value()))
            .collect()
    };
    let before = params(&model);
    let grads = model
        .loss(&x.view(), &SeqInputs::default())
        .unwrap()
        .backward()
        .unwrap();
    let err = opt.step(&grads).unwrap_err().to_string();
    assert!(
        err.contains("optimizer step") && err.contains("bfloat16") && err.contains("to_dtype"),
        "{err}"
    );
    assert!(err.contains("`net."), "{err}");
    assert!(params(&model) == before, "a refused step changed the model");
    // Converted back, it trains.
    model.net.to_dtype(DType::F32);
    let grads = model
        .loss(&x.view(), &SeqInputs::default())
        .unwrap()
        .backward()
        .unwrap();
    opt.step(&grads).unwrap();
    assert!(params(&model) != before);
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("performer-bf16-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The dtype of every tensor in a safetensors file, from its header.
fn file_dtypes(path: &std::path::Path) -> BTreeMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| (k.clone(), v["dtype"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn bf16_checkpoints_hold_the_model_exactly_and_load_into_either_storage_type() {
    let config = small_config();
    let (f32_lm, lm) = pair(config.clone(), 6, DType::BF16);
    let dir = temp_dir("ckpt");
    let (p16, p32) = (dir.join("bf16.safetensors"), dir.join("f32.safetensors"));
    save_state_dict_file(&lm, &p16).unwrap();
    save_state_dict_file(&f32_lm, &p32).unwrap();
    // Matrices (and their proj_updater aliases) as BF16, the rest as they were.
    let dtypes = file_dtypes(&p16);
    let named: BTreeMap<String, DType> = pytorch_state_dict(&lm)
        .keys()
        .map(|k| {
            let original = k.replacen("proj_updater.instance.", "net.", 1);
            let d = lm
                .named_parameters()
                .iter()
                .find(|(n, _)| *n == original)
                .map_or(DType::F32, |(_, p)| p.dtype());
            (k.clone(), d)
        })
        .collect();
    assert_eq!(dtypes.len(), named.len());
    let mut bf16_keys = 0;
    for (k, d) in &dtypes {
        let want = match (named[k], k.ends_with("calls_since_last_redraw")) {
            (_, true) => "I64",
            (DType::BF16, _) => "BF16",
            (DType::F32, _) => "F32",
        };
        assert_eq!(d, want, "{k}");
        bf16_keys += (d == "BF16") as usize;
    }
    assert!(bf16_keys >= 14, "{dtypes:?}");
    let (s16, s32) = (
        std::fs::metadata(&p16).unwrap().len(),
        std::fs::metadata(&p32).unwrap().len(),
    );
    assert!(s16 * 10 < s32 * 6, "bf16 file {s16} bytes, f32 file {s32}");

    let x = tokens(2, 20, 40, 9);
    let logits = |m: &PerformerLM| {
        m.forward(&x.view(), &LmInputs::default())
            .unwrap()
            .to_array()
    };
    let want = logits(&lm);
    // Into an f32 model: converted (exactly), the same logits, stays f32.
    performer_tensor::rng::manual_seed(99);
    let fresh = PerformerLM::new(config.clone()).unwrap();
    fresh.set_training(false);
    load_state_dict_file(&fresh, &p16).unwrap();
    assert_eq!(fresh.dtype(), DType::F32);
    assert_eq!(fresh.state_dict(), lm.state_dict());
    assert_eq!(relative_error(&logits(&fresh), &want).unwrap(), 0.0);
    // Into a bf16 model: the same.
    let fresh16 = PerformerLM::new(config.clone()).unwrap();
    fresh16.set_training(false);
    fresh16.to_dtype(DType::BF16);
    load_state_dict_file(&fresh16, &p16).unwrap();
    assert_eq!(fresh16.dtype(), DType::BF16);
    assert_eq!(fresh16.state_dict(), lm.state_dict());
    // An f32 checkpoint into a bf16 model rounds it: the bf16 model of the same weights.
    load_state_dict_file(&fresh16, &p32).unwrap();
    assert_eq!(fresh16.state_dict(), lm.state_dict());

    // Refusals stay typed: a BF16 tensor of the wrong shape, and one for an int64 counter.
    let mut tensors = load_safetensors(&p16).unwrap();
    let key = "token_emb.weight".to_string();
    tensors.insert(
        key.clone(),
        TensorData::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[3, 32]))),
    );
    let bad = dir.join("bad.safetensors");
    performer_tensor::io::save_safetensors_as(&bad, &tensors, None, &|_| DType::BF16).unwrap();
    let err = load_state_dict_file(&fresh, &bad).unwrap_err().to_string();
    assert!(
        err.contains("token_emb.weight") && err.contains("[3, 32]"),
        "{err}"
    );
    let mut tensors = load_safetensors(&p16).unwrap();
    let counter = tensors
        .keys()
        .find(|k| k.ends_with("calls_since_last_redraw"))
        .unwrap()
        .clone();
    tensors.insert(
        counter.clone(),
        TensorData::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[]))),
    );
    save_safetensors(&bad, &tensors, None).unwrap();
    let err = load_state_dict_file(&fresh, &bad).unwrap_err().to_string();
    assert!(err.contains(&counter) && err.contains("dtype"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
