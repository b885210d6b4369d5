//! The parity runner of `../shared/FIXTURES.md`: loads a fixture directory (config.json,
//! weights, inputs, expected outputs and gradients from performer-pytorch), runs the same module
//! in Rust and reports the worst relative errors of the forward output and of the gradients.
//!
//! [`run_fixture_on`] runs a fixture on a device (`Device::Emulated`, `Device::Cuda(n)`; the
//! `cuda` feature of performer-tensor): the weights are loaded on the host, the module is moved
//! with [`Module::to_device`], the float inputs and the probe are uploaded and made leaves there,
//! and the output and every gradient are downloaded only to be compared, with the CPU's
//! tolerances. An output or a gradient that does not live on the device is a failure: the run
//! must not pass by falling back to the host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, Ix2};
use performer_favor::{FastAttention, FastAttentionConfig, OrthoScaling};
use performer_layers::{AttentionConfig, BlockInputs, CrossAttention, SelfAttention};
use performer_tensor::io::{TensorData, load_safetensors};
use performer_tensor::ops::Activation;
use performer_tensor::{Device, Error, Gradients, Module, Result, Tensor, TensorId};
use serde_json::Value;

use crate::checkpoint::{ModelConfig, strip_aliases, to_state};
use crate::lm::LmInputs;
use crate::{AnyModel, PerformerEncDec};

/// Forward tolerance: max |rust - reference| / max |reference|.
pub const FORWARD_TOLERANCE: f32 = 1e-4;
/// Gradient tolerance, same measure.
pub const GRADIENT_TOLERANCE: f32 = 1e-3;

/// The outcome of one fixture.
#[derive(Clone, Debug)]
pub struct FixtureReport {
    /// The fixture directory's name.
    pub name: String,
    /// Worst forward error.
    pub forward_error: f32,
    /// Worst gradient error over parameters and float inputs.
    pub gradient_error: f32,
    /// The tensor with the worst gradient error.
    pub worst_gradient: String,
    /// Within both tolerances, nothing missing.
    pub passed: bool,
    /// Why it failed, if it did.
    pub problems: Vec<String>,
}

impl std::fmt::Display for FixtureReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<44} forward {:>9.2e}  gradient {:>9.2e}  {}",
            self.name,
            self.forward_error,
            self.gradient_error,
            if self.passed { "PASS" } else { "FAIL" }
        )?;
        for p in &self.problems {
            write!(f, "\n    {p}")?;
        }
        Ok(())
    }
}

/// Every fixture directory under `paths`: a path holding `config.json` is a fixture; any other
/// directory is searched recursively (directories without fixtures are skipped).
pub fn find_fixtures(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        collect(p, &mut out)?;
    }
    out.sort();
    Ok(out)
}

fn collect(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if p.join("config.json").is_file() {
        out.push(p.to_path_buf());
        return Ok(());
    }
    if !p.is_dir() {
        return Err(Error::format(
            p,
            "not a fixture directory (no config.json) nor a folder of them",
        ));
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
        .map_err(|e| Error::io(p, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|e| e.is_dir())
        .collect();
    entries.sort();
    for e in entries {
        collect(&e, out)?;
    }
    Ok(())
}

/// Relative error as FIXTURES.md defines it (absolute where the reference is all zeros): the
/// measure of [`performer_tensor::testing::relative_error`], with a shape mismatch, NaN or
/// infinity on either side counted as infinite.
pub fn relative_error(ours: &ArrayD<f32>, reference: &ArrayD<f32>) -> f32 {
    performer_tensor::testing::relative_error(ours, reference).unwrap_or(f32::INFINITY)
}

/// The keys a fixture may hold in `config.json`, its `call`, and `inputs.safetensors`, per model
/// class: anything else is a fixture this runner would misread, so it is refused.
const CONFIG_KEYS: &[&str] = &["model", "kwargs", "train", "call"];
/// performer-pytorch 1.1.4's `FastAttention(...)` keyword arguments.
const FAST_ATTENTION_KWARGS: &[&str] = &[
    "dim_heads",
    "nb_features",
    "ortho_scaling",
    "causal",
    "generalized_attention",
    "kernel_fn",
    "no_projection",
];

/// The `call` keywords and the inputs a model class takes.
fn call_keys_and_inputs(class: &str) -> (&'static [&'static str], &'static [&'static str]) {
    match class {
        "FastAttention" => (&[], &["q", "k", "v", "probe"]),
        "SelfAttention" | "CrossAttention" | "Performer" => {
            (&[], &["x", "mask", "context", "context_mask", "probe"])
        }
        "PerformerLM" => (&["return_encodings"], &["x", "mask", "probe"]),
        "PerformerEncDec" => (&[], &["x", "y", "enc_mask", "dec_mask", "probe"]),
        _ => (&[], &[]),
    }
}

/// Keys of `keys` outside `known`, as an error naming `what`.
fn refuse_unknown<'k>(
    what: &str,
    keys: impl IntoIterator<Item = &'k String>,
    known: &[&str],
) -> Result<()> {
    let unknown: Vec<&String> = keys
        .into_iter()
        .filter(|k| !known.contains(&k.as_str()))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    Err(Error::invalid(
        "fixture",
        what,
        format!("{unknown:?}"),
        format!("unknown (this runner reads {known:?})"),
    ))
}

/// Refuses a fixture with keys this runner does not read: in `config.json`, its `call`, the
/// FastAttention kwargs (the model classes check their own) and the inputs.
fn check_keys(fx: &Fixture) -> Result<()> {
    let Some(config) = fx.config.as_object() else {
        return Err(Error::invalid(
            "fixture",
            "config.json",
            "not an object",
            "must be an object",
        ));
    };
    refuse_unknown("config.json key", config.keys(), CONFIG_KEYS)?;
    let class = fx.config["model"].as_str().unwrap_or_default();
    let (call_keys, inputs) = call_keys_and_inputs(class);
    match fx.config.get("call") {
        None | Some(Value::Null) => {}
        Some(Value::Object(call)) => refuse_unknown("call keyword", call.keys(), call_keys)?,
        Some(v) => {
            return Err(Error::invalid("fixture", "call", v, "must be an object"));
        }
    }
    if class == "FastAttention"
        && let Some(kw) = fx.kw().as_object()
    {
        refuse_unknown("FastAttention keyword", kw.keys(), FAST_ATTENTION_KWARGS)?;
    }
    refuse_unknown("input", fx.inputs.keys(), inputs)
}

struct Fixture {
    config: Value,
    weights: BTreeMap<String, TensorData>,
    inputs: BTreeMap<String, TensorData>,
    expected: BTreeMap<String, TensorData>,
}

fn load(dir: &Path) -> Result<Fixture> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let config = serde_json::from_str(&text)
        .map_err(|e| Error::format(&path, format!("invalid JSON: {e}")))?;
    Ok(Fixture {
        config,
        weights: load_safetensors(dir.join("weights.safetensors"))?,
        inputs: load_safetensors(dir.join("inputs.safetensors"))?,
        expected: load_safetensors(dir.join("expected.safetensors"))?,
    })
}

impl Fixture {
    fn f32(&self, name: &str) -> Result<Option<ArrayD<f32>>> {
        self.inputs
            .get(name)
            .cloned()
            .map(|t| t.into_f32(name))
            .transpose()
    }
    fn i64_2d(&self, name: &str) -> Result<Option<ndarray::Array2<i64>>> {
        self.inputs
            .get(name)
            .cloned()
            .map(|t| {
                t.into_i64(name)?
                    .into_dimensionality::<Ix2>()
                    .map_err(|e| Error::shape(name, e.to_string()))
            })
            .transpose()
    }
    fn mask(&self, name: &str) -> Result<Option<ndarray::Array2<bool>>> {
        self.inputs
            .get(name)
            .cloned()
            .map(|t| {
                t.into_bool(name)?
                    .into_dimensionality::<Ix2>()
                    .map_err(|e| Error::shape(name, e.to_string()))
            })
            .transpose()
    }
    fn kw(&self) -> &Value {
        &self.config["kwargs"]
    }
}

fn kw_usize(kw: &Value, name: &str, default: Option<usize>) -> Result<Option<usize>> {
    match kw.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
            Error::invalid("fixture kwargs", name, v, "must be a non-negative integer")
        }),
    }
}

fn kw_bool(kw: &Value, name: &str, default: bool) -> Result<bool> {
    match kw.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| Error::invalid("fixture kwargs", name, v, "must be a boolean")),
    }
}

fn kw_f32(kw: &Value, name: &str, default: f32) -> Result<f32> {
    match kw.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| Error::invalid("fixture kwargs", name, v, "must be a number")),
    }
}

fn kw_kernel(kw: &Value) -> Result<Activation> {
    match kw.get("kernel_fn") {
        None | Some(Value::Null) => Ok(Activation::Relu),
        Some(Value::String(s)) => Activation::from_name(s),
        Some(v) => Err(Error::invalid(
            "fixture kwargs",
            "kernel_fn",
            v,
            "must be a name",
        )),
    }
}

/// A `SelfAttention` / `CrossAttention` configuration from performer-pytorch 1.1.4's keyword
/// arguments as JSON (`{"dim": 64, "heads": 4, ...}`; missing keys take its defaults): the
/// reader of fixtures' `config.json`, also used by the Python package. An unknown keyword or
/// a value of the wrong type is an error naming it.
pub fn attention_config(kw: &Value) -> Result<AttentionConfig> {
    let known = [
        "dim",
        "causal",
        "heads",
        "dim_head",
        "local_heads",
        "local_window_size",
        "nb_features",
        "feature_redraw_interval",
        "generalized_attention",
        "kernel_fn",
        "dropout",
        "no_projection",
        "qkv_bias",
        "attn_out_bias",
    ];
    if let Some(obj) = kw.as_object()
        && let Some(k) = obj.keys().find(|k| !known.contains(&k.as_str()))
    {
        return Err(Error::invalid(
            "Attention",
            k,
            "given",
            "unknown keyword argument",
        ));
    }
    let dim = kw_usize(kw, "dim", None)?
        .ok_or_else(|| Error::invalid("Attention", "dim", "missing", "required"))?;
    let base = AttentionConfig::new(dim);
    Ok(AttentionConfig {
        causal: kw_bool(kw, "causal", base.causal)?,
        heads: kw_usize(kw, "heads", Some(base.heads))?.unwrap_or(base.heads),
        dim_head: match kw.get("dim_head") {
            Some(Value::Null) => None,
            _ => kw_usize(kw, "dim_head", base.dim_head)?,
        },
        local_heads: kw_usize(kw, "local_heads", Some(0))?.unwrap_or(0),
        local_window_size: kw_usize(kw, "local_window_size", Some(base.local_window_size))?
            .unwrap_or(base.local_window_size),
        nb_features: kw_usize(kw, "nb_features", None)?,
        feature_redraw_interval: kw_usize(kw, "feature_redraw_interval", Some(1000))?
            .unwrap_or(1000),
        generalized_attention: kw_bool(kw, "generalized_attention", false)?,
        kernel_fn: kw_kernel(kw)?,
        dropout: kw_f32(kw, "dropout", 0.0)?,
        no_projection: kw_bool(kw, "no_projection", false)?,
        qkv_bias: kw_bool(kw, "qkv_bias", base.qkv_bias)?,
        attn_out_bias: kw_bool(kw, "attn_out_bias", base.attn_out_bias)?,
        ..base
    })
}

/// A `FastAttention` configuration from performer-pytorch 1.1.4's keyword arguments as JSON
/// (`{"dim_heads": 16, "causal": true, ...}`), as [`attention_config`] for the attention layers.
pub fn fast_attention_config(kw: &Value) -> Result<FastAttentionConfig> {
    if let Some(obj) = kw.as_object()
        && let Some(k) = obj
            .keys()
            .find(|k| !FAST_ATTENTION_KWARGS.contains(&k.as_str()))
    {
        return Err(Error::invalid(
            "FastAttention",
            k,
            "given",
            "unknown keyword argument",
        ));
    }
    let dim = kw_usize(kw, "dim_heads", None)?
        .ok_or_else(|| Error::invalid("FastAttention", "dim_heads", "missing", "required"))?;
    let ortho_scaling = match kw.get("ortho_scaling") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| Error::invalid("FastAttention", "ortho_scaling", v, "must be 0 or 1"))?,
    };
    Ok(FastAttentionConfig {
        nb_features: kw_usize(kw, "nb_features", None)?,
        ortho_scaling: OrthoScaling::from_code(ortho_scaling)?,
        causal: kw_bool(kw, "causal", false)?,
        generalized_attention: kw_bool(kw, "generalized_attention", false)?,
        kernel_fn: kw_kernel(kw)?,
        no_projection: kw_bool(kw, "no_projection", false)?,
        ..FastAttentionConfig::new(dim)
    })
}

/// What a fixture's module produced: the output and the gradients of `sum(out * probe)`.
struct Run {
    out: Tensor,
    grads: Gradients,
    params: Vec<(String, performer_tensor::Param)>,
    float_inputs: Vec<(String, Tensor)>,
}

fn backprop(
    out: Tensor,
    probe: &ArrayD<f32>,
    module: &dyn Module,
    float_inputs: Vec<(String, Tensor)>,
) -> Result<Run> {
    if probe.shape() != out.shape() {
        return Err(Error::shape(
            "parity",
            format!("probe {:?} vs output {:?}", probe.shape(), out.shape()),
        ));
    }
    // The probe goes where the output is (a host output of a device run is caught by the
    // comparison, which checks where every result lives).
    let probe = Tensor::new(probe.clone()).to_device(out.device())?;
    let grads = out.mul(&probe)?.sum_all().backward()?;
    Ok(Run {
        out,
        grads,
        params: module.named_parameters(),
        float_inputs,
    })
}

/// Loads the fixture's weights into `module` on the host, then moves it to `device` (as a
/// PyTorch user calls `load_state_dict` and then `.cuda()`).
fn load_weights(module: &dyn Module, fx: &Fixture, device: Device) -> Result<()> {
    module.load_state_dict(&strip_aliases(to_state(fx.weights.clone())?)?)?;
    if !device.is_cpu() {
        module.to_device(device)?;
    }
    Ok(())
}

/// A leaf variable over `x` on `device` (uploaded first, so that its gradient lives there).
fn leaf_on(x: ArrayD<f32>, device: Device) -> Result<Tensor> {
    if device.is_cpu() {
        Ok(Tensor::var(x))
    } else {
        Ok(Tensor::new(x).to_device(device)?.to_var())
    }
}

fn run_module(fx: &Fixture, device: Device) -> Result<Run> {
    let class = fx.config["model"].as_str().ok_or_else(|| {
        Error::invalid(
            "fixture",
            "model",
            "missing",
            "config.json needs a model class",
        )
    })?;
    let train = fx.config["train"].as_bool().unwrap_or(false);
    let probe = fx
        .f32("probe")?
        .ok_or_else(|| Error::invalid("fixture", "probe", "missing", "inputs need a probe"))?;
    let var = |name: &str| -> Result<Option<Tensor>> {
        fx.f32(name)?.map(|x| leaf_on(x, device)).transpose()
    };
    let kw = fx.kw();
    match class {
        "FastAttention" => {
            let attn = FastAttention::new(fast_attention_config(kw)?)?;
            load_weights(&attn, fx, device)?;
            let missing =
                || Error::invalid("fixture", "q/k/v", "missing", "FastAttention needs q, k, v");
            let (q, k, v) = (
                var("q")?.ok_or_else(missing)?,
                var("k")?.ok_or_else(missing)?,
                var("v")?.ok_or_else(missing)?,
            );
            let out = attn.forward(&q, &k, &v)?;
            backprop(
                out,
                &probe,
                &attn,
                vec![("q".into(), q), ("k".into(), k), ("v".into(), v)],
            )
        }
        "SelfAttention" | "CrossAttention" => {
            let cfg = attention_config(kw)?;
            let module: Box<dyn performer_layers::Block> = if class == "SelfAttention" {
                Box::new(SelfAttention::new(cfg)?)
            } else {
                Box::new(CrossAttention::new(cfg)?)
            };
            load_weights(module.as_ref(), fx, device)?;
            module.set_training(train);
            let x =
                var("x")?.ok_or_else(|| Error::invalid("fixture", "x", "missing", "needs x"))?;
            let context = var("context")?;
            let (mask, context_mask) = (fx.mask("mask")?, fx.mask("context_mask")?);
            let inputs = BlockInputs {
                mask: mask.as_ref().map(|m| m.view()),
                pos_emb: None,
                context: context.as_ref(),
                context_mask: context_mask.as_ref().map(|m| m.view()),
            };
            let out = module.forward(&x, &inputs)?;
            let mut floats = vec![("x".to_string(), x.clone())];
            if let Some(c) = context {
                floats.push(("context".into(), c));
            }
            backprop(out, &probe, module.as_ref(), floats)
        }
        "Performer" | "PerformerLM" | "PerformerEncDec" => {
            // The fixture's config.json also holds `train` and `call` (FIXTURES.md); the
            // model's part is `model` and `kwargs`.
            let model_part = serde_json::json!({
                "model": class,
                "kwargs": fx.config.get("kwargs").cloned().unwrap_or_else(|| serde_json::json!({})),
            });
            let model = AnyModel::build(&ModelConfig::from_json(&model_part)?)?;
            load_weights(model.module(), fx, device)?;
            model.module().set_training(train);
            match &model {
                AnyModel::Performer(p) => {
                    let x = var("x")?
                        .ok_or_else(|| Error::invalid("fixture", "x", "missing", "needs x"))?;
                    let context = var("context")?;
                    let (mask, context_mask) = (fx.mask("mask")?, fx.mask("context_mask")?);
                    let out = p.forward(
                        &x,
                        mask.as_ref().map(|m| m.view()),
                        None,
                        context.as_ref(),
                        context_mask.as_ref().map(|m| m.view()),
                    )?;
                    let mut floats = vec![("x".to_string(), x.clone())];
                    if let Some(c) = context {
                        floats.push(("context".into(), c));
                    }
                    backprop(out, &probe, p, floats)
                }
                AnyModel::PerformerLM(lm) => {
                    let x = fx
                        .i64_2d("x")?
                        .ok_or_else(|| Error::invalid("fixture", "x", "missing", "needs x"))?;
                    let mask = fx.mask("mask")?;
                    let return_encodings = fx.config["call"]["return_encodings"]
                        .as_bool()
                        .unwrap_or(false);
                    let out = lm.forward(
                        &x.view(),
                        &LmInputs {
                            mask: mask.as_ref().map(|m| m.view()),
                            return_encodings,
                            ..Default::default()
                        },
                    )?;
                    backprop(out, &probe, lm, vec![])
                }
                AnyModel::PerformerEncDec(ed) => run_enc_dec(fx, ed, &probe),
            }
        }
        other => Err(Error::invalid("fixture", "model", other, "unknown class")),
    }
}

fn run_enc_dec(fx: &Fixture, ed: &PerformerEncDec, probe: &ArrayD<f32>) -> Result<Run> {
    let missing = |n: &str| {
        Error::invalid(
            "fixture",
            n.to_string(),
            "missing",
            "PerformerEncDec needs x and y",
        )
    };
    let x = fx.i64_2d("x")?.ok_or_else(|| missing("x"))?;
    let y = fx.i64_2d("y")?.ok_or_else(|| missing("y"))?;
    let (enc_mask, dec_mask) = (fx.mask("enc_mask")?, fx.mask("dec_mask")?);
    let loss = ed.loss(
        &x.view(),
        &y.view(),
        enc_mask.as_ref().map(|m| m.view()),
        dec_mask.as_ref().map(|m| m.view()),
    )?;
    let probe = if probe.ndim() == 0 {
        probe.clone()
    } else {
        probe
            .clone()
            .into_shape_with_order(ndarray::IxDyn(&[]))
            .map_err(|e| Error::shape("probe", e.to_string()))?
    };
    backprop(loss, &probe, ed, vec![])
}

/// Runs one fixture directory on the host.
pub fn run_fixture(dir: &Path) -> FixtureReport {
    run_fixture_on(dir, Device::Cpu)
}

/// Runs one fixture directory on `device` with the CPU's tolerances (see the module's docs).
/// A device the build cannot reach (no `cuda` feature, no driver, no C++ compiler for the
/// emulator) fails the fixture with that error; so does a panic inside the run (the CPU-facing
/// signatures of some ops panic on a device failure), reported with its message instead of
/// ending the whole run.
pub fn run_fixture_on(dir: &Path, device: Device) -> FixtureReport {
    let name = fixture_name(dir);
    let fx = match load(dir) {
        Ok(f) => f,
        Err(e) => return failed(name, format!("cannot load: {e}")),
    };
    if let Err(e) = check_keys(&fx) {
        return failed(name, format!("cannot run: {e}"));
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_module(&fx, device).map(|run| compare(&fx, &run, device, name.clone()))
    }));
    match outcome {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => failed(name, format!("cannot run on {device}: {e}")),
        Err(panic) => failed(
            name,
            format!("panicked on {device}: {}", panic_message(panic.as_ref())),
        ),
    }
}

/// The fixture's directory name with its group (`models/lm_causal`).
fn fixture_name(dir: &Path) -> String {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let group = dir
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned());
    match group {
        Some(g) => format!("{g}/{name}"),
        None => name,
    }
}

/// A report of a fixture that could not be compared at all.
fn failed(name: String, why: String) -> FixtureReport {
    FixtureReport {
        name,
        forward_error: f32::INFINITY,
        gradient_error: f32::INFINITY,
        worst_gradient: String::new(),
        passed: false,
        problems: vec![why],
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// `t`'s values on the host, for comparison; an error when `t` does not live on `device`
/// (a device run must keep its results on the device).
fn download(what: &str, t: &Tensor, device: Device) -> Result<ArrayD<f32>> {
    if t.device() != device {
        return Err(Error::invalid(
            "parity",
            what,
            format!("on {}", t.device()),
            format!("must live on {device}, where the module runs"),
        ));
    }
    Ok(t.to_host()?.to_array())
}

/// The gradient stored under `id`, downloaded (see [`download`]); `None` when none reached it.
fn gradient(
    grads: &Gradients,
    id: TensorId,
    what: &str,
    device: Device,
) -> Result<Option<ArrayD<f32>>> {
    grads
        .tensor(id)
        .map(|g| download(what, &g, device))
        .transpose()
}

/// Compares a run with the fixture's expected output and gradients.
fn compare(fx: &Fixture, run: &Run, device: Device, name: String) -> FixtureReport {
    let mut problems = Vec::new();
    let forward_error = match fx.expected.get("out").cloned().map(|t| t.into_f32("out")) {
        Some(Ok(want)) => match download("output", &run.out, device) {
            Ok(ours) => relative_error(&ours, &want),
            Err(e) => {
                problems.push(e.to_string());
                f32::INFINITY
            }
        },
        _ => {
            problems.push("expected.safetensors has no float `out`".into());
            f32::INFINITY
        }
    };
    let mut gradient_error = 0f32;
    let mut worst_gradient = String::new();
    let mut record = |label: String, err: f32, problems: &mut Vec<String>| {
        if err > gradient_error || err.is_nan() {
            gradient_error = if err.is_nan() { f32::INFINITY } else { err };
            worst_gradient = label.clone();
        }
        if err.is_nan() || err > GRADIENT_TOLERANCE {
            problems.push(format!("{label}: error {err:.2e}"));
        }
    };
    for (name, p) in &run.params {
        let key = format!("grad.{name}");
        let ours = match gradient(&run.grads, p.id(), &key, device) {
            Ok(g) => g,
            Err(e) => {
                record(key.clone(), f32::INFINITY, &mut problems);
                problems.push(e.to_string());
                continue;
            }
        };
        match (fx.expected.get(&key), ours) {
            (Some(want), ours) => {
                let want = match want.clone().into_f32(&key) {
                    Ok(w) => w,
                    Err(e) => {
                        problems.push(e.to_string());
                        continue;
                    }
                };
                match ours {
                    Some(ours) => record(key, relative_error(&ours, &want), &mut problems),
                    None => {
                        record(key.clone(), f32::INFINITY, &mut problems);
                        problems.push(format!("{key}: no gradient reached the Rust parameter"));
                    }
                }
            }
            (None, Some(g)) if g.iter().any(|v| v.abs() > 0.0) => {
                problems.push(format!(
                    "{key}: the reference has no gradient here, ours is nonzero"
                ));
            }
            _ => {}
        }
    }
    let ours_names: std::collections::BTreeSet<String> = run
        .params
        .iter()
        .map(|(n, _)| format!("grad.{n}"))
        .collect();
    for key in fx
        .expected
        .keys()
        .filter(|k| k.starts_with("grad.") && !k.starts_with("grad.input."))
    {
        if !ours_names.contains(key) {
            problems.push(format!("{key}: no such parameter in the Rust model"));
        }
    }
    // Every float input has a reference gradient (FIXTURES.md), and no other input does.
    for (name, t) in &run.float_inputs {
        let key = format!("grad.input.{name}");
        match fx.expected.get(&key).cloned().map(|w| w.into_f32(&key)) {
            Some(Ok(want)) => match gradient(&run.grads, t.id(), &key, device) {
                Ok(Some(ours)) => record(key, relative_error(&ours, &want), &mut problems),
                Ok(None) => {
                    record(key.clone(), f32::INFINITY, &mut problems);
                    problems.push(format!("{key}: no gradient reached the Rust input"));
                }
                Err(e) => {
                    record(key.clone(), f32::INFINITY, &mut problems);
                    problems.push(e.to_string());
                }
            },
            Some(Err(e)) => problems.push(e.to_string()),
            None => problems.push(format!("{key}: missing from expected.safetensors")),
        }
    }
    for key in fx
        .expected
        .keys()
        .filter(|k| *k != "out" && !k.starts_with("grad."))
    {
        problems.push(format!(
            "{key}: not an entry of FIXTURES.md's expected.safetensors"
        ));
    }
    for key in fx.expected.keys().filter(|k| k.starts_with("grad.input.")) {
        let input = &key["grad.input.".len()..];
        if !run.float_inputs.iter().any(|(n, _)| n == input) {
            problems.push(format!(
                "{key}: not a float input of this model (its float inputs: {:?})",
                run.float_inputs.iter().map(|(n, _)| n).collect::<Vec<_>>()
            ));
        }
    }
    if forward_error.is_nan() || forward_error > FORWARD_TOLERANCE {
        problems.push(format!("forward error {forward_error:.2e}"));
    }
    FixtureReport {
        name,
        forward_error,
        gradient_error,
        worst_gradient,
        passed: problems.is_empty(),
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_away_from_the_device_is_refused() {
        let host = Tensor::new(ndarray::ArrayD::zeros(ndarray::IxDyn(&[2, 3])));
        let err = download("output", &host, Device::Emulated).unwrap_err();
        assert!(err.to_string().contains("must live on emulated"), "{err}");
        assert_eq!(
            download("output", &host, Device::Cpu).unwrap().shape(),
            [2, 3]
        );
    }

    #[test]
    fn a_panic_in_a_run_is_a_failed_report_with_its_message() {
        let msg: Box<dyn std::any::Any + Send> = Box::new(String::from("boom"));
        assert_eq!(panic_message(msg.as_ref()), "boom");
        let msg: Box<dyn std::any::Any + Send> = Box::new("static boom");
        assert_eq!(panic_message(msg.as_ref()), "static boom");
    }
}
