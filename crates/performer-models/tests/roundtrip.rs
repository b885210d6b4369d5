//! Checkpoints move between performer-rs and performer-pytorch both ways, with the same logits:
//! a Rust model saved here loads in PyTorch (strict) and gives Rust's logits; a PyTorch model
//! exported by tools/roundtrip.py loads here and gives PyTorch's. Needs the reference
//! environment (`PERFORMER_REF_PYTHON`; `tools/setup-reference-venv.sh` makes one, and `.ci/run`
//! runs these tests with it). Without it each test says it was skipped on the terminal (past
//! the test harness's capture) and passes, unless `PERFORMER_REF_REQUIRE=1`, as in CI, where a
//! missing environment fails.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use ndarray::Array2;
use performer_models::*;
use performer_tensor::Module;
use performer_tensor::io::{TensorData, load_safetensors, save_safetensors};

/// The reference Python, or `None` after saying on stderr (not captured by the harness) that
/// `test` is skipped; with `PERFORMER_REF_REQUIRE=1` a missing one fails the test instead.
fn python(test: &str) -> Option<String> {
    if let Some(p) = std::env::var("PERFORMER_REF_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
    {
        return Some(p);
    }
    let why =
        "PERFORMER_REF_PYTHON is not set (tools/setup-reference-venv.sh makes the environment)";
    assert!(
        std::env::var("PERFORMER_REF_REQUIRE").as_deref() != Ok("1"),
        "{test}: PERFORMER_REF_REQUIRE=1 but {why}"
    );
    // Written to the stderr handle itself: print!/eprint! output of a passing test is captured
    // and never shown.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    None
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tools/roundtrip.py")
}

fn config() -> PerformerLMConfig {
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
        reversible: true,
        ff_glu: true,
        ..Default::default()
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("performer-roundtrip-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn rust_checkpoint_loads_in_pytorch_with_the_same_logits() {
    rust_checkpoint_in_pytorch(
        "rust_checkpoint_loads_in_pytorch_with_the_same_logits",
        None,
    );
}

#[test]
fn rust_bf16_checkpoint_loads_in_pytorch_with_the_same_logits() {
    // Its matrices are BF16 in the file; PyTorch's load_state_dict widens them into its
    // float32 module, which then gives the bf16 model's logits.
    rust_checkpoint_in_pytorch(
        "rust_bf16_checkpoint_loads_in_pytorch_with_the_same_logits",
        Some(performer_tensor::DType::BF16),
    );
}

fn rust_checkpoint_in_pytorch(test: &str, dtype: Option<performer_tensor::DType>) {
    let Some(py) = python(test) else {
        return;
    };
    performer_tensor::rng::manual_seed(3);
    let lm = PerformerLM::new(config()).unwrap();
    lm.set_training(false);
    if let Some(d) = dtype {
        lm.to_dtype(d);
    }
    let dir = temp_dir(if dtype.is_some() { "rust-bf16" } else { "rust" });
    save_pretrained(&dir, &lm, &ModelConfig::PerformerLM(config())).unwrap();
    let x = Array2::from_shape_fn((2, 24), |(i, j)| ((i * 7 + j * 3) % 40) as i64);
    // Widened products: PyTorch's f32 module holding the file's weights computes exactly
    // those (the CPU's native bf16 products would round the activations too).
    let logits = performer_tensor::bf16_gemm::with_bf16_products(
        performer_tensor::bf16_gemm::Bf16Products::Widened,
        || lm.forward(&x.view(), &LmInputs::default()),
    )
    .unwrap();
    let probe = BTreeMap::from([
        ("x".to_string(), TensorData::I64(x.into_dyn())),
        ("logits".to_string(), TensorData::F32(logits.to_array())),
    ]);
    save_safetensors(dir.join("probe.safetensors"), &probe, None).unwrap();
    let out = Command::new(&py)
        .arg(script())
        .arg("check")
        .arg(&dir)
        .output()
        .unwrap();
    println!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "PyTorch disagrees with the Rust checkpoint"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn pytorch_checkpoint_loads_in_rust_with_the_same_logits() {
    pytorch_checkpoint_in_rust(
        "pytorch_checkpoint_loads_in_rust_with_the_same_logits",
        "export",
    );
}

#[test]
fn pytorch_bf16_checkpoint_loads_in_rust_with_the_same_logits() {
    // Every float tensor BF16, as `model.to(torch.bfloat16)` saves them: read into an f32 model.
    pytorch_checkpoint_in_rust(
        "pytorch_bf16_checkpoint_loads_in_rust_with_the_same_logits",
        "export-bf16",
    );
}

fn pytorch_checkpoint_in_rust(test: &str, mode: &str) {
    let Some(py) = python(test) else {
        return;
    };
    let dir = temp_dir(&format!("torch-{mode}"));
    let text = serde_json::to_string_pretty(&ModelConfig::PerformerLM(config()).to_json()).unwrap();
    std::fs::write(dir.join("config.json"), text).unwrap();
    let out = Command::new(&py)
        .arg(script())
        .arg(mode)
        .arg(&dir)
        .output()
        .unwrap();
    println!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success());
    // What the file holds: the dtype of the token table in its header.
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let want = if mode == "export-bf16" { "BF16" } else { "F32" };
    assert_eq!(header["token_emb.weight"]["dtype"], want);
    let (_, model) = load_pretrained(&dir).unwrap();
    let AnyModel::PerformerLM(lm) = model else {
        panic!("not a PerformerLM")
    };
    lm.set_training(false);
    let probe = load_safetensors(dir.join("probe.safetensors")).unwrap();
    let x = probe["x"]
        .clone()
        .into_i64("x")
        .unwrap()
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap();
    let want = probe["logits"].clone().into_f32("logits").unwrap();
    let ours = lm
        .forward(&x.view(), &LmInputs::default())
        .unwrap()
        .to_array();
    let err = performer_tensor::testing::assert_close(
        "logits of the PyTorch checkpoint",
        &ours,
        &want,
        1e-4,
    );
    println!("Rust loaded the PyTorch checkpoint: logits differ by {err:.2e} (relative)");
    std::fs::remove_dir_all(&dir).ok();
}
