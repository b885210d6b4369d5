//! Every committed fixture (fixtures/, generated from performer-pytorch 1.1.4 by
//! tools/gen_fixtures.py) passes FIXTURES.md's tolerances, and the runner refuses what it
//! would misread.

use std::path::{Path, PathBuf};

use performer_models::parity::{find_fixtures, run_fixture};
use performer_tensor::io::{TensorData, load_safetensors, save_safetensors};

/// The committed fixtures, by name (`fixtures/README.md` describes each): a fixture deleted,
/// or one added without being listed here, fails the test.
const FIXTURES: &[&str] = &[
    "fast_attention/generalized_elu",
    "fast_attention/generalized_gelu_ortho1",
    "fast_attention/generalized_relu",
    "fast_attention/generalized_relu_causal",
    "fast_attention/generalized_sigmoid_causal",
    "fast_attention/generalized_silu_causal",
    "fast_attention/generalized_softplus_causal",
    "fast_attention/generalized_tanh",
    "fast_attention/no_projection",
    "fast_attention/no_projection_causal",
    "fast_attention/softmax_causal",
    "fast_attention/softmax_causal_d16",
    "fast_attention/softmax_noncausal",
    "fast_attention/softmax_ortho1",
    "layers/cross_attn_context_mask",
    "layers/cross_attn_generalized_nomask",
    "layers/cross_attn_no_projection",
    "layers/self_attn_all_local_causal_fully_masked",
    "layers/self_attn_causal_mask_global",
    "layers/self_attn_global_mask_generalized",
    "layers/self_attn_local_causal_mask",
    "layers/self_attn_local_causal_nomask",
    "layers/self_attn_local_fully_masked",
    "layers/self_attn_local_mask",
    "layers/self_attn_local_nomask",
    "models/encdec_masks",
    "models/encdec_no_projection_train",
    "models/encdec_tie_token_embeds",
    "models/lm_absolute_pos",
    "models/lm_axial_default_shape",
    "models/lm_causal",
    "models/lm_generalized_causal_relu",
    "models/lm_generalized_mask",
    "models/lm_kitchen_sink",
    "models/lm_local_default_window",
    "models/lm_no_projection_causal",
    "models/lm_no_projection_mask",
    "models/lm_noncausal_local_mask_bias",
    "models/lm_return_encodings",
    "models/lm_reversible_shift_scalenorm",
    "models/lm_tie_embed_axial_shape",
    "models/lm_train_rezero",
    "models/performer_generalized_causal",
    "models/performer_plain",
    "models/performer_reversible_causal",
    "models/performer_reversible_noncausal",
    "models/performer_rezero_shift_causal",
    "models/performer_scalenorm_cross",
];

fn fixtures_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

#[test]
fn all_fixtures_match_performer_pytorch() {
    let root = fixtures_root();
    let dirs = find_fixtures(std::slice::from_ref(&root)).unwrap();
    let mut found: Vec<String> = dirs
        .iter()
        .map(|d| {
            let rel = d.strip_prefix(&root).unwrap();
            rel.to_string_lossy().replace('\\', "/")
        })
        .collect();
    found.sort();
    assert_eq!(
        found, FIXTURES,
        "the fixtures on disk are not exactly the committed ones"
    );
    let mut failed = Vec::new();
    for d in &dirs {
        let r = run_fixture(d);
        println!("{r}");
        if !r.passed {
            failed.push(r.name);
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} fixtures failed: {failed:?}",
        failed.len(),
        dirs.len()
    );
}

/// A copy of the committed fixture `name` in a fresh temporary folder `tag`, checked to pass.
fn copy_fixture(name: &str, tag: &str) -> PathBuf {
    let src = fixtures_root().join(name);
    let dst = std::env::temp_dir().join(format!("performer-parity-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dst).unwrap();
    for f in [
        "config.json",
        "weights.safetensors",
        "inputs.safetensors",
        "expected.safetensors",
    ] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    assert!(
        run_fixture(&dst).passed,
        "the copy must pass before it is altered"
    );
    dst
}

/// Edits a copy's config.json.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
}

/// Asserts the runner fails `dir` with a problem mentioning `needle`, then removes it.
#[track_caller]
fn assert_refused(dir: &Path, needle: &str) {
    let report = run_fixture(dir);
    assert!(
        !report.passed && report.problems.iter().any(|p| p.contains(needle)),
        "{report}"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// A FastAttention keyword the runner does not read (it would run the default instead).
#[test]
fn an_unknown_fast_attention_keyword_is_refused() {
    let dst = copy_fixture("fast_attention/softmax_causal", "kwarg");
    edit_config(&dst, |c| c["kwargs"]["ortho_scalin"] = serde_json::json!(1));
    assert_refused(&dst, "ortho_scalin");
}

/// A `call` keyword or a config.json key the runner does not read.
#[test]
fn unknown_call_and_config_keys_are_refused() {
    let dst = copy_fixture("models/lm_causal", "call");
    edit_config(&dst, |c| {
        c["call"] = serde_json::json!({"return_embeddings": true})
    });
    assert_refused(&dst, "return_embeddings");
    let dst = copy_fixture("fast_attention/softmax_noncausal", "top");
    edit_config(&dst, |c| c["calls"] = serde_json::json!({}));
    assert_refused(&dst, "calls");
}

/// A `grad.input.*` entry for something that is not a float input of the model, and a float
/// input whose reference gradient is missing.
#[test]
fn unexpected_and_missing_input_gradients_are_refused() {
    let dst = copy_fixture("fast_attention/softmax_noncausal", "grad-input");
    let mut expected = load_safetensors(dst.join("expected.safetensors")).unwrap();
    let dq = expected["grad.input.q"].clone();
    expected.insert("grad.input.query".into(), dq);
    save_safetensors(dst.join("expected.safetensors"), &expected, None).unwrap();
    assert_refused(&dst, "grad.input.query");

    let dst = copy_fixture("fast_attention/softmax_noncausal", "no-grad-input");
    let mut expected = load_safetensors(dst.join("expected.safetensors")).unwrap();
    expected.remove("grad.input.v");
    save_safetensors(dst.join("expected.safetensors"), &expected, None).unwrap();
    assert_refused(&dst, "grad.input.v: missing");
}

/// The runner itself must catch a wrong answer: a fixture whose expected output was altered fails.
#[test]
fn a_corrupted_fixture_fails() {
    let dst = copy_fixture("models/lm_causal", "corrupt");
    let mut expected = load_safetensors(dst.join("expected.safetensors")).unwrap();
    let key = expected
        .keys()
        .find(|k| k.starts_with("grad.performer.net.layers.0.0.fn.to_q"))
        .unwrap()
        .clone();
    if let Some(TensorData::F32(g)) = expected.get_mut(&key) {
        let scale = g.iter().map(|v| v.abs()).fold(0f32, f32::max);
        assert!(scale > 0.0 && scale.is_finite(), "{scale}");
        g[[0, 0]] += 0.01 * scale;
    }
    save_safetensors(dst.join("expected.safetensors"), &expected, None).unwrap();
    let report = run_fixture(&dst);
    assert!(
        !report.passed && report.problems.iter().any(|p| p.contains(&key)),
        "{report}"
    );
    std::fs::remove_dir_all(&dst).ok();
}
