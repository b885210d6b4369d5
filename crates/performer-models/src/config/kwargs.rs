//! Configurations from JSON keyword arguments, with errors that name the keyword.

use performer_tensor::{Error, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Deserializes a configuration from keyword arguments. serde's message for a mistyped field
/// of a struct does not say which field it was, so on error each keyword is tried alone (on
/// top of the defaults) to find and name it: `op: invalid `{prefix}num_tokens` = "ten":
/// invalid type: string "ten", expected usize`. Unknown and missing keywords are named by
/// serde's own message.
pub(crate) fn parse_kwargs<T: DeserializeOwned + Serialize + Default>(
    op: &str,
    prefix: &str,
    kwargs: &Value,
) -> Result<T> {
    let err = match serde_json::from_value::<T>(kwargs.clone()) {
        Ok(c) => return Ok(c),
        Err(e) => e,
    };
    let culprit = kwargs.as_object().and_then(|map| {
        let base = match serde_json::to_value(T::default()) {
            Ok(Value::Object(b)) => b,
            _ => return None,
        };
        map.iter().find_map(|(k, v)| {
            if !base.contains_key(k) {
                return None;
            }
            let mut probe = base.clone();
            probe.insert(k.clone(), v.clone());
            serde_json::from_value::<T>(Value::Object(probe))
                .err()
                .map(|e| (k, v, e))
        })
    });
    Err(match culprit {
        Some((k, v, e)) => Error::invalid(op, format!("{prefix}{k}"), v, e.to_string()),
        None if kwargs.is_object() => Error::invalid(
            op,
            if prefix.is_empty() {
                "kwargs".to_string()
            } else {
                format!("{prefix}*")
            },
            "{...}",
            err.to_string(),
        ),
        None => Error::invalid(
            op,
            "kwargs",
            kwargs,
            "must be an object of keyword arguments",
        ),
    })
}
