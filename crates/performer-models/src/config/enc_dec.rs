//! The configuration of performer-pytorch's `PerformerEncDec(...)`, in its flat keyword
//! form (`dim`, `enc_*`, `dec_*`).

use performer_tensor::{Error, Result};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::fields::PerformerLMConfig;
use super::kwargs::parse_kwargs;

/// One keyword of a known type, or `default` when absent; a mistyped value is an error naming
/// the keyword.
fn take_kwarg<T: DeserializeOwned>(
    map: &mut serde_json::Map<String, Value>,
    name: &str,
    default: Option<T>,
) -> Result<T> {
    match map.remove(name) {
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| Error::invalid("PerformerEncDec", name, v, e.to_string())),
        None => default.ok_or_else(|| {
            Error::invalid(
                "PerformerEncDec",
                name,
                "missing",
                format!("{name} is required"),
            )
        }),
    }
}

/// performer-pytorch's `PerformerEncDec(...)`: shared arguments plus `enc_`/`dec_`-prefixed
/// PerformerLM arguments. The decoder is always causal with cross-attention; `dim` and
/// `no_projection` are set on both.
#[derive(Clone, Debug, PartialEq)]
pub struct PerformerEncDecConfig {
    /// Width of both.
    pub dim: usize,
    /// Target value ignored by the loss.
    pub ignore_index: i64,
    /// Padding value of the wrapper (kept for compatibility).
    pub pad_value: i64,
    /// Encoder and decoder share their token embedding.
    pub tie_token_embeds: bool,
    /// No random features (both).
    pub no_projection: bool,
    /// The encoder (its `dim` and `no_projection` are overridden).
    pub enc: PerformerLMConfig,
    /// The decoder (also `causal` and `cross_attend` are forced on).
    pub dec: PerformerLMConfig,
}

impl Default for PerformerEncDecConfig {
    fn default() -> Self {
        PerformerEncDecConfig {
            dim: 512,
            ignore_index: 0,
            pad_value: 0,
            tie_token_embeds: false,
            no_projection: false,
            enc: PerformerLMConfig::default(),
            dec: PerformerLMConfig::default(),
        }
    }
}

impl PerformerEncDecConfig {
    /// The encoder's effective configuration.
    pub fn encoder(&self) -> PerformerLMConfig {
        PerformerLMConfig {
            dim: self.dim,
            no_projection: self.no_projection,
            ..self.enc.clone()
        }
    }

    /// The decoder's effective configuration.
    pub fn decoder(&self) -> PerformerLMConfig {
        PerformerLMConfig {
            dim: self.dim,
            no_projection: self.no_projection,
            causal: true,
            cross_attend: true,
            ..self.dec.clone()
        }
    }

    /// Checks both halves.
    pub fn validate(&self) -> Result<()> {
        self.encoder().validate()?;
        self.decoder().validate()?;
        if self.tie_token_embeds && self.enc.num_tokens != self.dec.num_tokens {
            return Err(Error::invalid(
                "PerformerEncDec",
                "tie_token_embeds",
                true,
                format!(
                    "needs enc_num_tokens ({}) = dec_num_tokens ({})",
                    self.enc.num_tokens, self.dec.num_tokens
                ),
            ));
        }
        Ok(())
    }

    /// Parses the flat keyword form (`{"dim": .., "enc_num_tokens": .., "dec_depth": ..}`).
    pub fn from_kwargs(kwargs: &serde_json::Map<String, serde_json::Value>) -> Result<Self> {
        let mut enc = serde_json::Map::new();
        let mut dec = serde_json::Map::new();
        let mut top = serde_json::Map::new();
        for (k, v) in kwargs {
            if let Some(rest) = k.strip_prefix("enc_") {
                enc.insert(rest.to_string(), v.clone());
            } else if let Some(rest) = k.strip_prefix("dec_") {
                dec.insert(rest.to_string(), v.clone());
            } else {
                top.insert(k.clone(), v.clone());
            }
        }
        let dim: usize = take_kwarg(&mut top, "dim", None)?;
        // Absent keywords take Default's values (written once, in `impl Default`).
        let defaults = Self::default();
        let ignore_index = take_kwarg(&mut top, "ignore_index", Some(defaults.ignore_index))?;
        let pad_value = take_kwarg(&mut top, "pad_value", Some(defaults.pad_value))?;
        let tie_token_embeds = take_kwarg(
            &mut top,
            "tie_token_embeds",
            Some(defaults.tie_token_embeds),
        )?;
        let no_projection = take_kwarg(&mut top, "no_projection", Some(defaults.no_projection))?;
        if let Some(k) = top.keys().next() {
            return Err(Error::invalid(
                "PerformerEncDec",
                k,
                "given",
                "unknown keyword argument (encoder and decoder arguments take enc_ / dec_ prefixes)",
            ));
        }
        for (side, m) in [("enc", &mut enc), ("dec", &mut dec)] {
            if m.contains_key("dim") {
                return Err(Error::invalid(
                    "PerformerEncDec",
                    format!("{side}_dim"),
                    "given",
                    "set dim once for both encoder and decoder",
                ));
            }
            m.insert("dim".into(), serde_json::json!(dim));
        }
        let lm = |m: serde_json::Map<String, serde_json::Value>,
                  side: &str|
         -> Result<PerformerLMConfig> {
            parse_kwargs("PerformerEncDec", &format!("{side}_"), &Value::Object(m))
        };
        Ok(PerformerEncDecConfig {
            dim,
            ignore_index,
            pad_value,
            tie_token_embeds,
            no_projection,
            enc: lm(enc, "enc")?,
            dec: lm(dec, "dec")?,
        })
    }

    /// The flat keyword form.
    pub fn to_kwargs(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut out = serde_json::Map::new();
        out.insert("dim".into(), serde_json::json!(self.dim));
        out.insert("ignore_index".into(), serde_json::json!(self.ignore_index));
        out.insert("pad_value".into(), serde_json::json!(self.pad_value));
        out.insert(
            "tie_token_embeds".into(),
            serde_json::json!(self.tie_token_embeds),
        );
        out.insert(
            "no_projection".into(),
            serde_json::json!(self.no_projection),
        );
        for (prefix, c) in [("enc_", &self.enc), ("dec_", &self.dec)] {
            if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(c) {
                for (k, v) in m {
                    if k != "dim" && k != "no_projection" {
                        out.insert(format!("{prefix}{k}"), v);
                    }
                }
            }
        }
        out
    }
}
