//! The `xtask` binary as CI runs it. Having an integration test also makes
//! `cargo test --workspace --release` build `target/release/xtask` with the workspace's own
//! feature set, so that `.ci/run` calls that binary instead of `cargo xtask` (which selects only
//! this package, resolves its dependencies' features differently and rebuilds them: minutes).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("the xtask binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A scratch workspace with one crate whose `src` holds `files` (name, contents).
fn scratch_crate(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let root = std::env::temp_dir().join(format!("xtask-cli-{}-{name}", std::process::id()));
    let src = root.join("crates").join("demo").join("src");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&src).unwrap();
    for (file, body) in files {
        std::fs::write(src.join(file), body).unwrap();
    }
    root
}

#[test]
fn tidy_passes_on_this_workspace() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = xtask(&["tidy", "--root", root.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "tidy failed on the workspace:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("crates/performer-tensor/src"));
}

#[test]
fn tidy_refuses_a_module_cycle_and_names_it() {
    let root = scratch_crate(
        "cycle",
        &[
            ("lib.rs", "mod a;\nmod b;\n"),
            ("a.rs", "use crate::b::B;\npub struct A;\n"),
            ("b.rs", "use crate::a::A;\npub struct B;\n"),
        ],
    );
    let out = xtask(&["tidy", "--root", root.to_str().unwrap()]);
    let all = text(&out.stdout) + &text(&out.stderr);
    let _ = std::fs::remove_dir_all(&root);
    assert!(!out.status.success(), "a cycle a <-> b passed tidy:\n{all}");
    assert!(
        all.contains("1 cycle(s)"),
        "the cycle is not counted:\n{all}"
    );
}

#[test]
fn tidy_accepts_one_way_imports() {
    let root = scratch_crate(
        "oneway",
        &[
            ("lib.rs", "mod a;\nmod b;\n"),
            ("a.rs", "use crate::b::B;\npub struct A(B);\n"),
            ("b.rs", "pub struct B;\n"),
        ],
    );
    let out = xtask(&["tidy", "--root", root.to_str().unwrap()]);
    let all = text(&out.stdout) + &text(&out.stderr);
    let _ = std::fs::remove_dir_all(&root);
    assert!(out.status.success(), "one-way imports refused:\n{all}");
}

#[test]
fn an_unknown_command_fails_and_lists_the_commands() {
    let out = xtask(&["no-such-command"]);
    assert!(!out.status.success());
    let err = text(&out.stderr) + &text(&out.stdout);
    for command in ["tidy", "parity", "bench", "quality"] {
        assert!(
            err.contains(command),
            "usage does not list {command}: {err}"
        );
    }
}

#[test]
fn parity_on_a_device_without_the_cuda_feature_says_how_to_build() {
    if cfg!(feature = "cuda") {
        return;
    }
    let out = xtask(&["parity", "--device", "emulated"]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "parity --device emulated ran:\n{err}"
    );
    assert!(
        err.contains("without its `cuda` feature") && err.contains("--features cuda"),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "no fixture may run: {}",
        text(&out.stdout)
    );
}

#[test]
fn parity_refuses_an_unknown_device() {
    let out = xtask(&["parity", "--device", "gpu"]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cuda:N"), "{err}");
}
