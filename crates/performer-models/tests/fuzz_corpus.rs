//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/*`) through the code path
//! its `cargo fuzz` target drives (`performer_models::fuzzing`), so that CI checks the inputs
//! the fuzzer found on stable Rust: none may panic, and each must give the same verdict on
//! every run.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use performer_models::fuzzing;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

fn files(target: &str) -> Vec<PathBuf> {
    let dir = corpus(target);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// Runs `f` on every file of `target`'s corpus; returns (accepted, refused).
fn replay(target: &str, f: fn(&[u8]) -> performer_tensor::Result<()>) -> (usize, usize) {
    let files = files(target);
    assert!(!files.is_empty(), "no corpus for {target}");
    let (mut ok, mut refused) = (0, 0);
    let mut panics = Vec::new();
    for path in &files {
        let data = std::fs::read(path).unwrap();
        match catch_unwind(AssertUnwindSafe(|| f(&data))) {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                refused += 1;
                assert!(
                    !e.to_string().is_empty(),
                    "{}: empty message",
                    path.display()
                );
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panics.push(format!("{}: {msg}", path.display()));
            }
        }
    }
    assert!(panics.is_empty(), "panics:\n{}", panics.join("\n"));
    println!(
        "{target}: {} files, {ok} accepted, {refused} refused",
        files.len()
    );
    (ok, refused)
}

#[test]
fn checkpoint_corpus_replays_without_panics() {
    let (ok, refused) = replay("checkpoint", fuzzing::checkpoint);
    // The seed (a valid checkpoint) loads; the corrupt inputs are refused.
    assert!(ok >= 1 && refused >= 1, "{ok} accepted, {refused} refused");
}

#[test]
fn config_corpus_replays_without_panics() {
    let (ok, refused) = replay("config", fuzzing::config);
    assert!(ok >= 1 && refused >= 1, "{ok} accepted, {refused} refused");
}

#[test]
fn the_seed_checkpoint_loads() {
    fuzzing::checkpoint(&fuzzing::fuzz_checkpoint_seed()).unwrap();
}

/// Writes the seed inputs the corpora started from (run once with `--ignored`; the fuzzer
/// then adds what it finds).
#[test]
#[ignore]
fn write_seeds() {
    let dir = corpus("checkpoint");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("seed-valid"), fuzzing::fuzz_checkpoint_seed()).unwrap();
    let dir = corpus("config");
    std::fs::create_dir_all(&dir).unwrap();
    let seeds = [
        (
            "seed-lm",
            r#"{"model": "PerformerLM", "kwargs": {"num_tokens": 7, "max_seq_len": 8, "dim": 4, "depth": 1, "heads": 2, "dim_head": 2, "nb_features": 3, "local_attn_heads": [1], "local_window_size": 2, "causal": true, "kernel_fn": "gelu", "ff_glu": true}}"#,
        ),
        (
            "seed-lm-axial",
            r#"{"model": "PerformerLM", "kwargs": {"num_tokens": 3, "max_seq_len": 6, "dim": 4, "depth": 2, "heads": 1, "dim_head": 4, "rotary_position_emb": false, "axial_position_emb": true, "axial_position_shape": [2, 3], "tie_embed": true, "reversible": true, "shift_tokens": true}}"#,
        ),
        (
            "seed-performer",
            r#"{"model": "Performer", "kwargs": {"dim": 6, "depth": 1, "heads": 3, "nb_features": 2, "cross_attend": true, "use_scalenorm": true, "generalized_attention": true, "feature_redraw_interval": null, "ff_chunks": 2}}"#,
        ),
        (
            "seed-enc-dec",
            r#"{"model": "PerformerEncDec", "kwargs": {"dim": 4, "tie_token_embeds": true, "ignore_index": -100, "enc_num_tokens": 5, "enc_max_seq_len": 4, "enc_depth": 1, "enc_heads": 1, "enc_dim_head": 4, "dec_num_tokens": 5, "dec_max_seq_len": 4, "dec_depth": 1, "dec_heads": 2, "dec_dim_head": 2, "dec_use_rezero": true}}"#,
        ),
        (
            "seed-bad-type",
            r#"{"model": "PerformerLM", "kwargs": {"num_tokens": "7", "max_seq_len": 8, "dim": 4, "depth": 1, "heads": 2}}"#,
        ),
        ("seed-bad-class", r#"{"model": "Reformer", "kwargs": {}}"#),
    ];
    for (name, text) in seeds {
        std::fs::write(dir.join(name), text).unwrap();
    }
}
