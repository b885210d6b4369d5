//! Every committed fixture (fixtures/, generated from performer-pytorch 1.1.4 by
//! tools/gen_fixtures.py) passes FIXTURES.md's tolerances.

use std::path::PathBuf;

use performer_models::parity::{find_fixtures, run_fixture};

#[test]
fn all_fixtures_match_performer_pytorch() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let dirs = find_fixtures(&[root]).unwrap();
    assert!(
        dirs.len() >= 40,
        "expected the committed fixtures, found {}",
        dirs.len()
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

/// The runner itself must catch a wrong answer: a fixture whose expected output was altered fails.
#[test]
fn a_corrupted_fixture_fails() {
    use performer_tensor::io::{TensorData, load_safetensors, save_safetensors};
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/lm_causal");
    let dst = std::env::temp_dir().join(format!("performer-parity-corrupt-{}", std::process::id()));
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
    let mut expected = load_safetensors(dst.join("expected.safetensors")).unwrap();
    let key = expected
        .keys()
        .find(|k| k.starts_with("grad.performer.net.layers.0.0.fn.to_q"))
        .unwrap()
        .clone();
    if let Some(TensorData::F32(g)) = expected.get_mut(&key) {
        g[[0, 0]] += 0.01 * g.iter().fold(0f32, |m, v| m.max(v.abs()));
    }
    save_safetensors(dst.join("expected.safetensors"), &expected, None).unwrap();
    let report = run_fixture(&dst);
    assert!(
        !report.passed && report.problems.iter().any(|p| p.contains(&key)),
        "{report}"
    );
    std::fs::remove_dir_all(&dst).ok();
}
