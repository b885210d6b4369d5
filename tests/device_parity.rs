//! The parity fixtures (FIXTURES.md) on the emulated device, with the CPU's tolerances: what
//! `cargo xtask parity --device emulated` runs (performer_models::parity::run_fixture_on). The
//! runner refuses a result that does not live on the device, so a module that silently fell
//! back to the host cannot pass here.

#![cfg(feature = "cuda")]

use std::path::{Path, PathBuf};

use performer::models::parity::{find_fixtures, run_fixture_on};
use performer::tensor::Device;
use performer::tensor::testing::emulated_device_available;

fn fixtures(group: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(group);
    let found = find_fixtures(&[dir]).expect("the committed fixtures are there");
    assert!(!found.is_empty(), "no fixtures under fixtures/{group}");
    found
}

/// Runs `dirs` on the emulated device and fails listing every fixture that failed.
fn assert_pass_on_device(dirs: &[PathBuf]) {
    let failed: Vec<String> = dirs
        .iter()
        .map(|d| run_fixture_on(d, Device::Emulated))
        .filter(|r| !r.passed)
        .map(|r| r.to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} fixtures fail on the emulated device:\n{}",
        failed.len(),
        dirs.len(),
        failed.join("\n")
    );
}

#[test]
fn attention_and_layer_fixtures_pass_on_the_emulated_device() {
    if !emulated_device_available() {
        return;
    }
    let mut dirs = fixtures("fast_attention");
    dirs.extend(fixtures("layers"));
    assert_eq!(dirs.len(), 25);
    assert_pass_on_device(&dirs);
}

/// A few whole models (the rest are slow on the emulator: `xtask parity --device emulated`
/// runs them all, and tests/device_model.rs covers PerformerLM and PerformerEncDec training).
#[test]
fn model_fixtures_pass_on_the_emulated_device() {
    if !emulated_device_available() {
        return;
    }
    let dirs: Vec<PathBuf> = fixtures("models")
        .into_iter()
        .filter(|d| {
            [
                "performer_plain",
                "lm_generalized_causal_relu",
                "performer_scalenorm_cross",
            ]
            .iter()
            .any(|n| d.ends_with(n))
        })
        .collect();
    assert_eq!(dirs.len(), 3);
    assert_pass_on_device(&dirs);
}

/// Every committed fixture (about a minute on the emulator; not in CI): the check.
#[test]
#[ignore = "slow on the emulator; run with --ignored, or `xtask parity --device emulated`"]
fn every_fixture_passes_on_the_emulated_device() {
    if !emulated_device_available() {
        return;
    }
    let mut dirs = fixtures("fast_attention");
    dirs.extend(fixtures("layers"));
    dirs.extend(fixtures("models"));
    assert_pass_on_device(&dirs);
}
