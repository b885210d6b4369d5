//! Config parser: bytes -> JSON -> `ModelConfig::from_json` -> validation -> print/parse round
//! trip -> small models built (`performer_models::fuzzing::config`). Run with
//! `cargo +nightly fuzz run config fuzz/corpus/config` from the repository root.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = performer_models::fuzzing::config(data);
});
