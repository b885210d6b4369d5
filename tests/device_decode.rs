//! Decoding on the emulated device keeps its whole state there (issue 17, item 3): a
//! PerformerLM with local heads (window 4, so the window rolls every 4 steps), rotary, token
//! shift, reversible and GLU, and the same with generalized attention and with `no_projection`
//! for its FAVOR+ heads, decodes a prompt and then one token at a time. At every step the
//! logits equal the CPU's within 1e-4 (relative to the largest), and a step copies nothing
//! between host and device but its token ids (up) and its logits (down), counted by
//! `performer_cuda::transfers`. `generate` with one seed samples the CPU's first 16 tokens
//! (generalized attention and `no_projection` here; the softmax kernel's in device_model).
//!
//! The copy counters are process-wide, so every test here holds [`DEVICE`] while it runs.

#![cfg(feature = "cuda")]

use std::sync::Mutex;

use ndarray::Array2;
use performer::models::DecodingState;
use performer::models::LocalAttnHeads;
use performer::tensor::testing::assert_close;
use performer::tensor::testing::emulated_device_available;
use performer::tensor::{Device, Module, Tensor, rng};
use performer::{
    AutoregressiveWrapper, GenerateOptions, PerformerLM, PerformerLMConfig, SeqInputs,
};
use performer_cuda::transfers::{Transfers, transfers};

const DEV: Device = Device::Emulated;

/// Held by every test of this file: the copy counters see the whole process.
static DEVICE: Mutex<()> = Mutex::new(());

const VOCAB: usize = 20;
const BATCH: usize = 2;

/// Causal, one local head of two (window 4), rotary, token shift, reversible, GLU; the FAVOR+
/// head as `generalized_attention` and `no_projection` say.
fn config(generalized_attention: bool, no_projection: bool) -> PerformerLMConfig {
    PerformerLMConfig {
        num_tokens: VOCAB,
        max_seq_len: 32,
        dim: 16,
        depth: 2,
        heads: 2,
        dim_head: 8,
        causal: true,
        local_attn_heads: LocalAttnHeads::All(1),
        local_window_size: 4,
        nb_features: Some(8),
        reversible: true,
        ff_glu: true,
        shift_tokens: true,
        generalized_attention,
        no_projection,
        ..Default::default()
    }
}

/// [`config`] with one layer (the feature maps' tests: the local heads' test has two).
fn one_layer(generalized_attention: bool, no_projection: bool) -> PerformerLMConfig {
    PerformerLMConfig {
        depth: 1,
        ..config(generalized_attention, no_projection)
    }
}

/// Two equal models in eval mode (one seed, fixed projections); the second on the device.
fn pair(config: PerformerLMConfig, seed: u64) -> (PerformerLM, PerformerLM) {
    let build = || {
        rng::manual_seed(seed);
        let m = PerformerLM::new(config.clone()).unwrap();
        m.fix_projection_matrices();
        m.set_training(false);
        m
    };
    let (cpu, dev) = (build(), build());
    dev.to_device(DEV).unwrap();
    (cpu, dev)
}

fn tokens(n: usize, salt: usize) -> Array2<i64> {
    Array2::from_shape_fn((BATCH, n), |(i, j)| ((i * 7 + j * 5 + salt) % VOCAB) as i64)
}

/// The copies one decoding step may make: its token ids up, its logits down, nothing else
/// (the strided kernels' shapes and strides travel as launch parameters, not uploads).
fn assert_step_copies(what: &str, copies: &Transfers) {
    let allowed = Transfers {
        h2d_copies: 1,
        h2d_bytes: (BATCH * 8) as u64,
        d2h_copies: 1,
        d2h_bytes: (BATCH * VOCAB * 4) as u64,
    };
    assert_eq!(copies, &allowed, "{what}: copies between host and device");
}

/// Fresh decoding states of both models; a model that cross-attends gets a context of 6
/// positions (the second sequence's last 2 masked), on the device for the device model.
fn states(cpu: &PerformerLM, dev: &PerformerLM) -> (DecodingState, DecodingState) {
    if !cpu.config().cross_attend {
        return (
            cpu.decoding_state(BATCH, None, None).unwrap(),
            dev.decoding_state(BATCH, None, None).unwrap(),
        );
    }
    let context = Tensor::new(
        ndarray::Array3::from_shape_fn((BATCH, 6, cpu.config().dim), |(b, i, j)| {
            ((b * 31 + i * 7 + j * 3) % 11) as f32 / 11.0 - 0.5
        })
        .into_dyn(),
    );
    let on_device = context.to_device(DEV).unwrap();
    let mask = Array2::from_shape_fn((BATCH, 6), |(b, i)| !(b == 1 && i >= 4));
    (
        cpu.decoding_state(BATCH, Some(&context), Some(mask.view()))
            .unwrap(),
        dev.decoding_state(BATCH, Some(&on_device), Some(mask.view()))
            .unwrap(),
    )
}

/// Decodes a prompt of `prompt_len` (the second sequence's first two tokens masked as padding
/// when `masked`) and then `steps` tokens on both models: the logits agree within 1e-4 at every
/// step and each step copies only what [`assert_step_copies`] allows. A last step masks the
/// second sequence's token (its copies not checked: the mask goes up). Returns the worst
/// relative error.
fn decode_on_both(
    what: &str,
    (cpu, dev): (&PerformerLM, &PerformerLM),
    prompt_len: usize,
    masked: bool,
    steps: usize,
) -> f32 {
    let prompt = tokens(prompt_len, 3);
    let mask = Array2::from_shape_fn((BATCH, prompt_len), |(i, j)| !(i == 1 && j < 2));
    let mask = masked.then(|| mask.view());
    let (mut cs, mut ds) = states(cpu, dev);
    let want = cpu.decode(&mut cs, &prompt.view(), mask).unwrap();
    let got = dev.decode(&mut ds, &prompt.view(), mask).unwrap();
    let mut worst = assert_close(&format!("{what}: prompt logits"), &got, &want, 1e-4);
    for step in 0..steps {
        let next = [(step % VOCAB) as i64, ((step * 3 + 1) % VOCAB) as i64];
        let want = cpu.step(&mut cs, &next).unwrap();
        let before = transfers();
        let got = dev.step(&mut ds, &next).unwrap();
        let copies = transfers().since(&before);
        worst = worst.max(assert_close(
            &format!("{what}: step {step} logits"),
            &got,
            &want,
            1e-4,
        ));
        assert_step_copies(
            &format!("{what}: step {step} (position {})", prompt_len + step),
            &copies,
        );
    }
    assert!(
        ds.on_device(),
        "{what}: the decoding state lives on the device"
    );
    println!("{what}: prompt and {steps} steps, worst relative error {worst:.2e}");
    worst
}

/// A sequence that starts with padding only: the second sequence's prompt of 2 and its first
/// 3 steps are masked, so each of its queries sees no real token and attends uniformly over
/// its whole look-around: the -1 fillers before the sequence (positions 2, 3), the padding 0
/// after the newest position and the cached values (position 4, after the window rolled)
/// all reach the output. Then 3 unmasked steps. Logits within 1e-4 at every step.
fn padding_only_start(what: &str, (cpu, dev): (&PerformerLM, &PerformerLM)) -> f32 {
    let prompt = tokens(2, 5);
    let mask = Array2::from_shape_fn((BATCH, 2), |(i, _)| i == 0);
    let mut cs = cpu.decoding_state(BATCH, None, None).unwrap();
    let mut ds = dev.decoding_state(BATCH, None, None).unwrap();
    let want = cpu
        .decode(&mut cs, &prompt.view(), Some(mask.view()))
        .unwrap();
    let got = dev
        .decode(&mut ds, &prompt.view(), Some(mask.view()))
        .unwrap();
    let mut worst = assert_close(&format!("{what}: prompt logits"), &got, &want, 1e-4);
    for step in 0..6 {
        let next = Array2::from_shape_fn((BATCH, 1), |(i, _)| ((step * 3 + i) % VOCAB) as i64);
        let keep = Array2::from_shape_fn((BATCH, 1), |(i, _)| i == 0 || step >= 3);
        let want = cpu
            .decode(&mut cs, &next.view(), Some(keep.view()))
            .unwrap();
        let got = dev
            .decode(&mut ds, &next.view(), Some(keep.view()))
            .unwrap();
        worst = worst.max(assert_close(
            &format!("{what}: step {step} (position {})", 2 + step),
            &got,
            &want,
            1e-4,
        ));
    }
    println!("{what}: worst relative error {worst:.2e}");
    worst
}

#[test]
fn local_heads_decode_on_the_device_as_on_the_cpu() {
    let _device = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    if !emulated_device_available() {
        return;
    }
    let (cpu, dev) = pair(config(false, false), 31);
    // A prompt shorter than the window: the first steps see the fillers before the sequence.
    decode_on_both("local heads, prompt of 2", (&cpu, &dev), 2, false, 11);
    decode_on_both("local heads, padded prompt of 5", (&cpu, &dev), 5, true, 11);
    padding_only_start("local heads, a sequence of padding", (&cpu, &dev));
}

#[test]
fn generalized_and_unprojected_heads_decode_on_the_device_as_on_the_cpu() {
    let _device = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    if !emulated_device_available() {
        return;
    }
    for (generalized, no_projection) in [(true, false), (false, true)] {
        let what = format!("generalized {generalized}, no projection {no_projection}");
        let (cpu, dev) = pair(one_layer(generalized, no_projection), 32);
        decode_on_both(&what, (&cpu, &dev), 5, true, 10);
    }
}

/// Cross-attention to a context (with a padding mask) while decoding: its sums, computed once,
/// live on the device for every feature map.
#[test]
fn cross_attention_decodes_on_the_device_as_on_the_cpu() {
    let _device = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    if !emulated_device_available() {
        return;
    }
    for (generalized, no_projection) in [(false, false), (true, false), (false, true)] {
        let what =
            format!("cross-attending, generalized {generalized}, no projection {no_projection}");
        let config = PerformerLMConfig {
            cross_attend: true,
            ..one_layer(generalized, no_projection)
        };
        let (cpu, dev) = pair(config, 34);
        decode_on_both(&what, (&cpu, &dev), 3, false, 6);
    }
}

#[test]
fn generate_samples_the_cpus_tokens() {
    let _device = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    if !emulated_device_available() {
        return;
    }
    // (The softmax kernel's generate, local heads included, is device_model's.)
    for (generalized, no_projection) in [(true, false), (false, true)] {
        let (cpu, dev) = pair(one_layer(generalized, no_projection), 33);
        let opts = GenerateOptions {
            seed: 9,
            ..Default::default()
        };
        let prompt = tokens(3, 1);
        let (cw, dw) = (
            AutoregressiveWrapper::new(cpu),
            AutoregressiveWrapper::new(dev),
        );
        let a = cw
            .generate(&prompt.view(), 16, &opts, &SeqInputs::default())
            .unwrap();
        let b = dw
            .generate(&prompt.view(), 16, &opts, &SeqInputs::default())
            .unwrap();
        assert_eq!(a.dim(), (BATCH, 16));
        assert_eq!(
            a, b,
            "generalized {generalized}, no projection {no_projection}: the same 16 tokens"
        );
    }
}
