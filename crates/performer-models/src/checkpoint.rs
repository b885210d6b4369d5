//! Checkpoints in performer-pytorch's layout: a `state_dict` saved as safetensors (same key
//! names, including the `proj_updater.instance.*` aliases PyTorch lists for every layer
//! parameter, and the int64 redraw counters) and a `config.json` next to it with the class name
//! and its keyword arguments, so a model moves between PyTorch and Rust both ways.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use performer_tensor::io::{TensorData, load_safetensors, save_safetensors, save_safetensors_as};
use performer_tensor::{DType, Entry, Error, Module, Result, StateValue, Visitor};
use serde_json::{Value, json};

use crate::config::{PerformerConfig, PerformerEncDecConfig, PerformerLMConfig, parse_kwargs};
use crate::{AutoregressiveWrapper, Performer, PerformerEncDec, PerformerLM};

/// The part of a key PyTorch repeats under the projection updater.
const ALIAS: &str = "proj_updater.instance.";

/// Adds performer-pytorch's alias keys: for each Performer (found by its
/// `proj_updater.calls_since_last_redraw`), every key under its `net.` appears again under
/// `proj_updater.instance.`.
pub fn add_aliases(state: &mut BTreeMap<String, StateValue>) {
    let prefixes: Vec<String> = state
        .keys()
        .filter_map(|k| {
            k.strip_suffix("proj_updater.calls_since_last_redraw")
                .map(str::to_string)
        })
        .collect();
    for p in prefixes {
        let net = format!("{p}net.");
        let extra: Vec<(String, StateValue)> = state
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(&net)
                    .map(|rest| (format!("{p}{ALIAS}{rest}"), v.clone()))
            })
            .collect();
        state.extend(extra);
    }
}

/// Removes the alias keys, checking that each equals the key it repeats (an alias without its
/// original, or with a different value, is an error naming the key).
pub fn strip_aliases(state: BTreeMap<String, StateValue>) -> Result<BTreeMap<String, StateValue>> {
    let (aliases, mut originals): (BTreeMap<_, _>, BTreeMap<_, _>) =
        state.into_iter().partition(|(k, _)| k.contains(ALIAS));
    for (k, v) in aliases {
        let original = k.replacen(ALIAS, "net.", 1);
        match originals.get(&original) {
            Some(o) if same_bits(o, &v) => {}
            Some(_) => {
                return Err(Error::StateDict(format!(
                    "`{k}` differs from `{original}`, which it should repeat"
                )));
            }
            None => {
                // Only the alias is present: keep its value under the original name.
                originals.insert(original, v);
            }
        }
    }
    Ok(originals)
}

/// Equal shapes and bit patterns: a weight that went NaN is saved twice (key and alias) and
/// must still be recognized as the same value (`NaN != NaN`).
fn same_bits(a: &StateValue, b: &StateValue) -> bool {
    match (a, b) {
        (StateValue::F32(x), StateValue::F32(y)) => {
            x.shape() == y.shape()
                && x.iter()
                    .zip(y.iter())
                    .all(|(p, q)| p.to_bits() == q.to_bits())
        }
        (StateValue::I64(x), StateValue::I64(y)) => x == y,
        _ => false,
    }
}

/// Converts a file's tensors to module state (bool tensors are refused with their name).
pub fn to_state(tensors: BTreeMap<String, TensorData>) -> Result<BTreeMap<String, StateValue>> {
    tensors
        .into_iter()
        .map(|(k, v)| {
            StateValue::try_from(v)
                .map(|s| (k.clone(), s))
                .map_err(|_| Error::StateDict(format!("`{k}` is a bool tensor")))
        })
        .collect()
}

/// Loads a performer-pytorch `state_dict` saved as safetensors into `model`.
pub fn load_state_dict_file(model: &dyn Module, path: impl AsRef<Path>) -> Result<()> {
    let state = strip_aliases(to_state(load_safetensors(path)?)?)?;
    model.load_state_dict(&state)
}

/// The state dict as PyTorch lists it (aliases included).
pub fn pytorch_state_dict(model: &dyn Module) -> BTreeMap<String, StateValue> {
    let mut state = model.state_dict();
    add_aliases(&mut state);
    state
}

/// Saves `model`'s state dict (aliases included) as safetensors, atomically. Each parameter is
/// written in its storage type: those of a model converted with
/// [`PerformerLM::to_dtype`]`(DType::BF16)` as safetensors `BF16` (the bytes PyTorch writes
/// for `torch.bfloat16`, half the size), everything else as float32 and int64, so the file
/// holds the model exactly. PyTorch loads it into a float32 or a bfloat16 module
/// (`load_state_dict` converts), and [`load_state_dict_file`] into a model of either storage
/// type (an f32 model widens bf16 values exactly; a bf16 one rounds f32 values).
pub fn save_state_dict_file(model: &dyn Module, path: impl AsRef<Path>) -> Result<()> {
    let tensors: BTreeMap<String, TensorData> = pytorch_state_dict(model)
        .into_iter()
        .map(|(k, v)| (k, v.into()))
        .collect();
    let bf16 = bf16_parameter_names(model);
    if bf16.is_empty() {
        return save_safetensors(path, &tensors, None);
    }
    // An alias repeats its original, in the same type.
    let dtype = |k: &str| match bf16.contains(k) || bf16.contains(&k.replacen(ALIAS, "net.", 1)) {
        true => DType::BF16,
        false => DType::F32,
    };
    save_safetensors_as(path, &tensors, None, &dtype)
}

/// The state-dict names of `model`'s parameters stored in bf16 (every name of a shared one).
fn bf16_parameter_names(model: &dyn Module) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut f = |name: &str, e: Entry<'_>| {
        if let Entry::Param(p) = e
            && p.dtype() == DType::BF16
        {
            names.insert(name.to_string());
        }
    };
    model.visit(&mut Visitor::new(&mut f));
    names
}

/// A model class and its keyword arguments, as in `config.json`.
#[allow(clippy::large_enum_variant)] // built once per model; boxing would only add noise
#[derive(Clone, Debug, PartialEq)]
pub enum ModelConfig {
    /// `Performer(...)`.
    Performer(PerformerConfig),
    /// `PerformerLM(...)`.
    PerformerLM(PerformerLMConfig),
    /// `PerformerEncDec(...)`.
    PerformerEncDec(PerformerEncDecConfig),
}

impl ModelConfig {
    /// `{"model": CLASS, "kwargs": {...}}`.
    pub fn to_json(&self) -> Value {
        match self {
            ModelConfig::Performer(c) => json!({"model": "Performer", "kwargs": c}),
            ModelConfig::PerformerLM(c) => json!({"model": "PerformerLM", "kwargs": c}),
            ModelConfig::PerformerEncDec(c) => {
                json!({"model": "PerformerEncDec", "kwargs": c.to_kwargs()})
            }
        }
    }

    /// Parses `{"model": CLASS, "kwargs": {...}}`; unknown classes and unknown or mistyped
    /// arguments are errors naming them.
    pub fn from_json(v: &Value) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| {
            Error::invalid(
                "config.json",
                "config",
                short_json(v),
                "must be an object {\"model\": CLASS, \"kwargs\": {...}}",
            )
        })?;
        if let Some(k) = obj.keys().find(|k| *k != "model" && *k != "kwargs") {
            return Err(Error::invalid(
                "config.json",
                k,
                short_json(&obj[k]),
                "unknown key (a config has \"model\" and \"kwargs\")",
            ));
        }
        let class = match obj.get("model") {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => {
                return Err(Error::invalid(
                    "config.json",
                    "model",
                    short_json(other),
                    "must be a class name: Performer, PerformerLM or PerformerEncDec",
                ));
            }
            None => {
                return Err(Error::invalid(
                    "config.json",
                    "model",
                    "missing",
                    "needs a \"model\" class name",
                ));
            }
        };
        let kwargs = obj.get("kwargs").cloned().unwrap_or_else(|| json!({}));
        Self::parse(&format!("config.json ({class})"), class, &kwargs)
    }

    /// A model class and its keyword arguments as JSON, as a constructor call
    /// `PerformerLM(num_tokens=..., ...)` gives them: errors name the class and the argument
    /// (the Python package's constructors go through here).
    pub fn from_kwargs(class: &str, kwargs: &Value) -> Result<Self> {
        Self::parse(class, class, kwargs)
    }

    fn parse(op: &str, class: &str, kwargs: &Value) -> Result<Self> {
        match class {
            "Performer" => Ok(ModelConfig::Performer(parse_kwargs(op, "", kwargs)?)),
            "PerformerLM" => Ok(ModelConfig::PerformerLM(parse_kwargs(op, "", kwargs)?)),
            "PerformerEncDec" => {
                let map = kwargs.as_object().ok_or_else(|| {
                    Error::invalid(op, "kwargs", short_json(kwargs), "must be an object")
                })?;
                Ok(ModelConfig::PerformerEncDec(
                    PerformerEncDecConfig::from_kwargs(map)?,
                ))
            }
            other => Err(Error::invalid(
                op,
                "model",
                other,
                "expected Performer, PerformerLM or PerformerEncDec",
            )),
        }
    }

    /// A lower bound of the scalars the configured model holds (see
    /// [`PerformerLMConfig::min_elements`]).
    pub fn min_elements(&self) -> Result<u128> {
        match self {
            ModelConfig::Performer(c) => c.min_elements(),
            ModelConfig::PerformerLM(c) => c.min_elements(),
            ModelConfig::PerformerEncDec(c) => {
                Ok(c.encoder().min_elements()? + c.decoder().min_elements()?)
            }
        }
    }
}

/// A JSON value for an error message, cut to 80 characters.
fn short_json(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// Any of the model classes, built from a [`ModelConfig`].
#[allow(clippy::large_enum_variant)] // one per loaded model
pub enum AnyModel {
    /// A Performer.
    Performer(Performer),
    /// A language model.
    PerformerLM(PerformerLM),
    /// An encoder-decoder.
    PerformerEncDec(PerformerEncDec),
}

impl AnyModel {
    /// Builds the model the config describes.
    pub fn build(config: &ModelConfig) -> Result<Self> {
        Ok(match config {
            ModelConfig::Performer(c) => AnyModel::Performer(Performer::new(c.clone())?),
            ModelConfig::PerformerLM(c) => AnyModel::PerformerLM(PerformerLM::new(c.clone())?),
            ModelConfig::PerformerEncDec(c) => {
                AnyModel::PerformerEncDec(PerformerEncDec::new(c.clone())?)
            }
        })
    }

    /// As a module.
    pub fn module(&self) -> &dyn Module {
        match self {
            AnyModel::Performer(m) => m,
            AnyModel::PerformerLM(m) => m,
            AnyModel::PerformerEncDec(m) => m,
        }
    }
}

/// Writes `config.json` and `model.safetensors` into `dir` (created if needed), each atomically.
pub fn save_pretrained(
    dir: impl AsRef<Path>,
    model: &dyn Module,
    config: &ModelConfig,
) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let text =
        serde_json::to_string_pretty(&config.to_json()).map_err(|e| Error::Other(e.to_string()))?;
    performer_tensor::io::write_atomic(dir.join("config.json"), text.as_bytes())?;
    save_state_dict_file(model, dir.join("model.safetensors"))
}

/// Reads `config.json` from `dir`.
pub fn load_config(dir: impl AsRef<Path>) -> Result<ModelConfig> {
    let path = dir.as_ref().join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&path, format!("invalid JSON: {e}")))?;
    ModelConfig::from_json(&v)
}

/// Builds the model of `dir/config.json` and loads `dir/model.safetensors` into it.
pub fn load_pretrained(dir: impl AsRef<Path>) -> Result<(ModelConfig, AnyModel)> {
    let dir = dir.as_ref();
    let config = load_config(dir)?;
    let weights = dir.join("model.safetensors");
    check_file_holds(&weights, &config)?;
    let model = AnyModel::build(&config)?;
    load_state_dict_file(model.module(), dir.join("model.safetensors"))?;
    Ok((config, model))
}

/// Refuses a config that describes a model bigger than its weights file could hold (2 bytes per
/// scalar at the least, for float16), before the model is built: a corrupt or hostile
/// config.json must not make the loader allocate more than the files justify.
fn check_file_holds(weights: &Path, config: &ModelConfig) -> Result<()> {
    let len = std::fs::metadata(weights)
        .map_err(|e| Error::io(weights, e))?
        .len();
    let min = config.min_elements()?;
    if (len as u128) < min * 2 {
        return Err(Error::format(
            weights,
            format!(
                "{len} bytes cannot hold the {min} or more parameters and buffers that \
                 config.json describes (at least {} bytes in float16)",
                min * 2
            ),
        ));
    }
    Ok(())
}

/// Wraps a loaded language model for its loss and generation.
pub fn into_autoregressive(model: AnyModel) -> Result<AutoregressiveWrapper> {
    match model {
        AnyModel::PerformerLM(lm) => Ok(AutoregressiveWrapper::new(lm)),
        _ => Err(Error::invalid(
            "into_autoregressive",
            "model",
            "not a PerformerLM",
            "only language models can be wrapped",
        )),
    }
}
