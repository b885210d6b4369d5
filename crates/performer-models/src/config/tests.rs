//! The configurations' defaults, as JSON and as `Default`.

use serde_json::{Value, json};

use super::enc_dec::PerformerEncDecConfig;
use super::fields::{PerformerConfig, PerformerLMConfig};

/// The keyword arguments with only the required ones given, at their defaults.
fn required_only(full: Value, required: &[&str]) -> Value {
    let Value::Object(map) = full else {
        panic!("a configuration serializes to an object")
    };
    Value::Object(
        map.into_iter()
            .filter(|(k, _)| required.contains(&k.as_str()))
            .collect(),
    )
}

/// A JSON of the required keys alone, at Default's values, reads back as exactly
/// `Default::default()` (every absent key takes its row's default), and so does the whole
/// serialized default.
#[test]
fn all_defaults_json_is_default() {
    let perf = serde_json::to_value(PerformerConfig::default()).unwrap();
    let given = required_only(perf.clone(), &["dim", "depth", "heads"]);
    assert_eq!(given.as_object().unwrap().len(), 3, "{given}");
    let read: PerformerConfig = serde_json::from_value(given).unwrap();
    assert_eq!(read, PerformerConfig::default());
    let read: PerformerConfig = serde_json::from_value(perf).unwrap();
    assert_eq!(read, PerformerConfig::default());

    let lm = serde_json::to_value(PerformerLMConfig::default()).unwrap();
    let required = ["num_tokens", "max_seq_len", "dim", "depth", "heads"];
    let given = required_only(lm.clone(), &required);
    assert_eq!(given.as_object().unwrap().len(), required.len(), "{given}");
    let read: PerformerLMConfig = serde_json::from_value(given).unwrap();
    assert_eq!(read, PerformerLMConfig::default());
    let read: PerformerLMConfig = serde_json::from_value(lm).unwrap();
    assert_eq!(read, PerformerLMConfig::default());

    let lm = lm_default();
    let enc_dec = PerformerEncDecConfig::default();
    let mut given = serde_json::Map::new();
    given.insert("dim".into(), json!(enc_dec.dim));
    for side in ["enc", "dec"] {
        for key in ["num_tokens", "max_seq_len", "depth", "heads"] {
            given.insert(format!("{side}_{key}"), lm[key].clone());
        }
    }
    assert_eq!(PerformerEncDecConfig::from_kwargs(&given).unwrap(), enc_dec);
    let full = enc_dec.to_kwargs();
    assert_eq!(PerformerEncDecConfig::from_kwargs(&full).unwrap(), enc_dec);
}

fn lm_default() -> Value {
    serde_json::to_value(PerformerLMConfig::default()).unwrap()
}

/// Each required keyword is required, and `null` is `None` rather than "absent" for an
/// optional field whose default is `Some`.
#[test]
fn required_keys_and_null() {
    let lm = lm_default();
    for key in ["num_tokens", "max_seq_len", "dim", "depth", "heads"] {
        let mut given = lm.clone();
        given.as_object_mut().unwrap().remove(key);
        let err = serde_json::from_value::<PerformerLMConfig>(given).unwrap_err();
        assert_eq!(err.to_string(), format!("missing field `{key}`"));
    }
    let mut given = lm.clone();
    given["feature_redraw_interval"] = Value::Null;
    let read: PerformerLMConfig = serde_json::from_value(given).unwrap();
    assert_eq!(read.feature_redraw_interval, None);
    let mut given = lm;
    given["dimm"] = json!(1);
    let err = serde_json::from_value::<PerformerLMConfig>(given).unwrap_err();
    assert!(err.to_string().starts_with("unknown field `dimm`"), "{err}");
}
