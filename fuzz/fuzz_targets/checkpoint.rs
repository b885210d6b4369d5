//! Checkpoint loader: bytes -> safetensors -> module state -> aliases -> a small PerformerLM ->
//! one forward (`performer_models::fuzzing::checkpoint`). Run with
//! `cargo +nightly fuzz run checkpoint fuzz/corpus/checkpoint` from the repository root.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = performer_models::fuzzing::checkpoint(data);
});
