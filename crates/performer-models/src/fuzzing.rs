//! The code paths the fuzz targets drive (`fuzz/fuzz_targets/*.rs`, run with `cargo fuzz`),
//! shared with the test that replays their committed corpora (`tests/fuzz_corpus.rs`), so that
//! every input the fuzzer found interesting keeps being checked by `cargo test` on stable.
//!
//! Each function takes arbitrary bytes, must never panic, and checks the invariants that hold
//! whatever the input: an input is either refused with an error, or accepted and then
//! consistent (a loaded checkpoint runs a forward; a parsed config prints back to itself).

use std::sync::OnceLock;

use ndarray::Array2;
use serde_json::Value;

use crate::checkpoint::{ModelConfig, pytorch_state_dict, strip_aliases, to_state};
use crate::{AnyModel, LmInputs, PerformerLM, PerformerLMConfig};
use performer_tensor::io::{TensorData, from_safetensors_bytes, to_safetensors_bytes};
use performer_tensor::{Module, Result};

/// The model the checkpoint target loads into: small enough that a valid checkpoint of it is
/// a 3 KB seed, with every kind of state (parameters, float buffers, the int64 redraw counter,
/// alias keys).
pub fn fuzz_lm_config() -> PerformerLMConfig {
    PerformerLMConfig {
        num_tokens: 5,
        max_seq_len: 4,
        dim: 4,
        depth: 1,
        heads: 1,
        dim_head: 4,
        nb_features: Some(3),
        causal: true,
        ..Default::default()
    }
}

fn fuzz_lm() -> &'static PerformerLM {
    static LM: OnceLock<PerformerLM> = OnceLock::new();
    LM.get_or_init(|| {
        performer_tensor::rng::manual_seed(0);
        let lm = PerformerLM::new(fuzz_lm_config()).expect("a valid config");
        lm.set_training(false);
        lm
    })
}

/// A valid checkpoint of [`fuzz_lm_config`]'s model, aliases included (the seed of the
/// checkpoint corpus).
pub fn fuzz_checkpoint_seed() -> Vec<u8> {
    let tensors = pytorch_state_dict(fuzz_lm())
        .into_iter()
        .map(|(k, v)| (k, TensorData::from(v)))
        .collect();
    to_safetensors_bytes(&tensors, None).expect("serializable")
}

/// Bytes -> safetensors -> module state -> aliases checked and stripped -> loaded into the
/// small language model -> one forward. Returns how far the input got (for statistics), or
/// the error that stopped it.
pub fn checkpoint(data: &[u8]) -> Result<()> {
    let tensors = from_safetensors_bytes(data)?;
    // Whatever was read serializes again and reads back the same.
    let again = from_safetensors_bytes(&to_safetensors_bytes(&tensors, None)?)?;
    assert!(
        same_tensors(&tensors, &again),
        "a parsed checkpoint does not survive a round trip"
    );
    let state = strip_aliases(to_state(tensors)?)?;
    let lm = fuzz_lm();
    lm.load_state_dict(&state)?;
    // Whatever values were loaded (NaN included), the forward runs without panicking.
    let x = Array2::from_shape_fn((1, 4), |(_, j)| j as i64);
    let out = lm.forward(&x.view(), &LmInputs::default())?;
    assert_eq!(out.shape(), &[1, 4, 5]);
    Ok(())
}

/// Bit-level equality (NaN payloads included) of two tensor maps.
fn same_tensors(
    a: &std::collections::BTreeMap<String, TensorData>,
    b: &std::collections::BTreeMap<String, TensorData>,
) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((ka, va), (kb, vb))| {
            ka == kb
                && va.shape() == vb.shape()
                && match (va, vb) {
                    (TensorData::F32(x), TensorData::F32(y)) => {
                        x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
                    }
                    (TensorData::I64(x), TensorData::I64(y)) => x == y,
                    (TensorData::Bool(x), TensorData::Bool(y)) => x == y,
                    _ => false,
                }
        })
}

/// Models up to this many scalars are built by the config target (bigger ones are only
/// parsed and validated, to keep each execution fast).
const BUILD_LIMIT: u128 = 50_000;

/// Bytes -> JSON -> [`ModelConfig::from_json`] -> validation; a valid config prints back to
/// itself (`to_json` then `from_json` is the identity on the printed form), and a small one
/// builds into a model whose state dict loads back into it.
pub fn config(data: &[u8]) -> Result<()> {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return Ok(());
    };
    let c = ModelConfig::from_json(&v)?;
    match &c {
        ModelConfig::Performer(p) => p.validate()?,
        ModelConfig::PerformerLM(p) => p.validate()?,
        ModelConfig::PerformerEncDec(p) => p.validate()?,
    }
    let printed = c.to_json();
    let back = ModelConfig::from_json(&printed)
        .unwrap_or_else(|e| panic!("a printed config does not parse: {e}\n{printed}"));
    assert_eq!(
        back.to_json(),
        printed,
        "a config does not print back to itself"
    );
    if c.min_elements()? <= BUILD_LIMIT && small_enough(&c) {
        let model = AnyModel::build(&c)?;
        // The model's state names and shapes load back into it.
        model
            .module()
            .load_state_dict(&model.module().state_dict())?;
    }
    Ok(())
}

/// Bounds the build cost beyond the parameter count (layers and chunks are cheap in memory but
/// not in time).
fn small_enough(c: &ModelConfig) -> bool {
    let lm_ok = |l: &PerformerLMConfig| l.depth <= 4 && l.ff_chunks <= 64 && l.heads <= 64;
    match c {
        ModelConfig::Performer(p) => p.depth <= 4 && p.ff_chunks <= 64 && p.heads <= 64,
        ModelConfig::PerformerLM(l) => lm_ok(l),
        ModelConfig::PerformerEncDec(e) => lm_ok(&e.enc) && lm_ok(&e.dec),
    }
}
