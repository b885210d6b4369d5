//! Ops and optimizers against values computed by PyTorch (fixtures/ops, written by
//! tools/gen_fixtures.py from the reference environment; see fixtures/ops/README.md).
//!
//! Errors are measured as `max |ours - torch| / max |torch|`, so a tolerance reads as "this
//! many units of the largest value": forward values and gradients to 1e-5, optimizer steps
//! to 1e-6.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ndarray::{ArrayD, IxDyn};
use performer_tensor::io::{TensorData, load_safetensors, load_safetensors_metadata};
use performer_tensor::optim::{Adam, Optimizer, Sgd};
use performer_tensor::{Gradients, Param, Tensor};

const FORWARD_TOL: f32 = 1e-5;
const GRAD_TOL: f32 = 1e-5;
const OPTIM_TOL: f32 = 1e-6;

fn fixture(name: &str) -> BTreeMap<String, TensorData> {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "..",
        "..",
        "fixtures",
        "ops",
        name,
    ]
    .iter()
    .collect();
    load_safetensors(&path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

fn hyper(name: &str) -> serde_json::Value {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "..",
        "..",
        "fixtures",
        "ops",
        name,
    ]
    .iter()
    .collect();
    let meta = load_safetensors_metadata(&path).unwrap();
    serde_json::from_str(&meta["hyperparameters"]).unwrap()
}

fn f32s(fx: &BTreeMap<String, TensorData>, key: &str) -> ArrayD<f32> {
    fx.get(key)
        .unwrap_or_else(|| panic!("fixture has no `{key}`"))
        .clone()
        .into_f32(key)
        .unwrap()
}

fn i64s(fx: &BTreeMap<String, TensorData>, key: &str) -> ArrayD<i64> {
    fx.get(key)
        .unwrap_or_else(|| panic!("fixture has no `{key}`"))
        .clone()
        .into_i64(key)
        .unwrap()
}

/// The shared comparison: one shape, finite values, `max |got - want| <= tol * max |want|`.
#[track_caller]
fn assert_close(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>, tol: f32) {
    performer_tensor::testing::assert_close(what, got, want, tol);
}

/// Forward and `grad_x` of `sum(op(x) * probe)` for ops with one input.
fn check_unary_fixture(file: &str, op: impl Fn(&Tensor) -> Tensor) {
    let fx = fixture(file);
    let x = Tensor::var(f32s(&fx, "x"));
    let out = op(&x);
    assert_close(
        &format!("{file}: out"),
        &out.to_array(),
        &f32s(&fx, "out"),
        FORWARD_TOL,
    );
    let probe = Tensor::new(f32s(&fx, "probe"));
    let grads = out.mul(&probe).unwrap().sum_all().backward().unwrap();
    assert_close(
        &format!("{file}: grad_x"),
        grads.get(&x).unwrap(),
        &f32s(&fx, "grad_x"),
        GRAD_TOL,
    );
    if fx.contains_key("deriv") {
        let grads = out.sum_all().backward().unwrap();
        assert_close(
            &format!("{file}: deriv"),
            grads.get(&x).unwrap(),
            &f32s(&fx, "deriv"),
            GRAD_TOL,
        );
    }
}

#[test]
fn softmax_matches_torch() {
    for (file, dim) in [
        ("softmax_last.safetensors", -1),
        ("softmax_mid.safetensors", 1),
    ] {
        assert_eq!(hyper(file)["dim"], dim);
        check_unary_fixture(file, |x| x.softmax(dim).unwrap());
    }
}

#[test]
fn log_softmax_matches_torch() {
    for (file, dim) in [
        ("log_softmax_last.safetensors", -1),
        ("log_softmax_mid.safetensors", 1),
    ] {
        assert_eq!(hyper(file)["dim"], dim);
        check_unary_fixture(file, |x| x.log_softmax(dim).unwrap());
    }
}

#[test]
fn activations_match_torch() {
    check_unary_fixture("gelu.safetensors", Tensor::gelu);
    check_unary_fixture("elu.safetensors", Tensor::elu);
    check_unary_fixture("softplus.safetensors", Tensor::softplus);
    check_unary_fixture("silu.safetensors", Tensor::silu);
    check_unary_fixture("relu.safetensors", Tensor::relu);
    check_unary_fixture("sigmoid.safetensors", Tensor::sigmoid);
    check_unary_fixture("tanh.safetensors", Tensor::tanh);
}

#[test]
fn cross_entropy_matches_torch() {
    for file in [
        "cross_entropy_ignore0.safetensors",
        "cross_entropy_default.safetensors",
    ] {
        let fx = fixture(file);
        let ignore = i64s(&fx, "ignore_index");
        let ignore = *ignore.iter().next().unwrap();
        assert_eq!(hyper(file)["ignore_index"], ignore);
        let logits = Tensor::var(f32s(&fx, "logits"));
        let target = i64s(&fx, "target");
        let loss = logits.cross_entropy(&target.view(), Some(ignore)).unwrap();
        assert_eq!(loss.shape(), &[] as &[usize]);
        assert_close(
            &format!("{file}: loss"),
            &loss.to_array(),
            &f32s(&fx, "loss"),
            FORWARD_TOL,
        );
        let grads = loss.backward().unwrap();
        assert_close(
            &format!("{file}: grad_logits"),
            grads.get(&logits).unwrap(),
            &f32s(&fx, "grad_logits"),
            GRAD_TOL,
        );
    }
}

#[test]
fn layer_norm_matches_torch() {
    let file = "layer_norm.safetensors";
    let fx = fixture(file);
    let eps = hyper(file)["eps"].as_f64().unwrap() as f32;
    let x = Tensor::var(f32s(&fx, "x"));
    let w = Tensor::var(f32s(&fx, "weight"));
    let b = Tensor::var(f32s(&fx, "bias"));
    let out = x.layer_norm(Some(&w), Some(&b), eps).unwrap();
    assert_close(
        "layer_norm: out",
        &out.to_array(),
        &f32s(&fx, "out"),
        FORWARD_TOL,
    );
    let probe = Tensor::new(f32s(&fx, "probe"));
    let grads = out.mul(&probe).unwrap().sum_all().backward().unwrap();
    assert_close(
        "layer_norm: grad_x",
        grads.get(&x).unwrap(),
        &f32s(&fx, "grad_x"),
        GRAD_TOL,
    );
    assert_close(
        "layer_norm: grad_weight",
        grads.get(&w).unwrap(),
        &f32s(&fx, "grad_weight"),
        GRAD_TOL,
    );
    assert_close(
        "layer_norm: grad_bias",
        grads.get(&b).unwrap(),
        &f32s(&fx, "grad_bias"),
        GRAD_TOL,
    );
}

/// The layer-norm fixture through a permuted (non-contiguous) input gives the same values.
#[test]
fn layer_norm_matches_torch_on_a_permuted_view() {
    let fx = fixture("layer_norm.safetensors");
    let x = f32s(&fx, "x"); // (2, 3, 8)
    let xt = x
        .clone()
        .permuted_axes(IxDyn(&[2, 1, 0]))
        .as_standard_layout()
        .into_owned();
    let x_view = Tensor::var(xt).permute(&[2, 1, 0]).unwrap();
    assert!(!x_view.data().is_standard_layout());
    let w = Tensor::new(f32s(&fx, "weight"));
    let b = Tensor::new(f32s(&fx, "bias"));
    let out = x_view.layer_norm(Some(&w), Some(&b), 1e-5).unwrap();
    assert_close(
        "layer_norm (view): out",
        &out.to_array(),
        &f32s(&fx, "out"),
        FORWARD_TOL,
    );
}

/// One parameter through three optimizer steps with PyTorch's gradients; the parameter and
/// the optimizer state must follow PyTorch's at every step.
fn run_optimizer_fixture(
    file: &str,
    mut opt: impl Optimizer,
    p: &Param,
    state_keys: &[(&str, &str)],
) {
    let fx = fixture(file);
    for t in 1..=3 {
        let mut grads = Gradients::new();
        grads
            .accumulate(p.id(), f32s(&fx, &format!("grad{t}")))
            .unwrap();
        opt.step(&grads).unwrap();
        let got = p.value().to_owned();
        assert_close(
            &format!("{file}: param{t}"),
            &got,
            &f32s(&fx, &format!("param{t}")),
            OPTIM_TOL,
        );
        let state = opt.state_dict();
        for (ours, theirs) in state_keys {
            let got = state[*ours].clone().into_f32(ours).unwrap();
            assert_close(
                &format!("{file}: {theirs}{t}"),
                &got,
                &f32s(&fx, &format!("{theirs}{t}")),
                OPTIM_TOL,
            );
        }
    }
}

fn param0(file: &str) -> Param {
    Param::new(f32s(&fixture(file), "param0"))
}

fn adam_config(file: &str) -> (f32, f32, f32, f32) {
    let h = hyper(file);
    assert_eq!(h["betas"], "(0.9, 0.999)");
    let f = |k: &str| h[k].as_f64().unwrap() as f32;
    (f("lr"), f("eps"), f("weight_decay"), 0.0)
}

#[test]
fn adam_matches_torch() {
    for file in ["adam.safetensors", "adam_wd.safetensors"] {
        assert_eq!(hyper(file)["optimizer"], "Adam");
        let (lr, eps, wd, _) = adam_config(file);
        let p = param0(file);
        let mut opt = Adam::new(vec![("w".into(), p.clone())], lr);
        opt.eps = eps;
        opt.weight_decay = wd;
        run_optimizer_fixture(
            file,
            opt,
            &p,
            &[("w.exp_avg", "exp_avg"), ("w.exp_avg_sq", "exp_avg_sq")],
        );
    }
}

#[test]
fn adamw_matches_torch() {
    let file = "adamw.safetensors";
    assert_eq!(hyper(file)["optimizer"], "AdamW");
    let (lr, eps, wd, _) = adam_config(file);
    let p = param0(file);
    let mut opt = Adam::adamw(vec![("w".into(), p.clone())], lr);
    opt.eps = eps;
    assert_eq!(
        opt.weight_decay, wd,
        "AdamW's default weight decay is torch's 0.01"
    );
    run_optimizer_fixture(
        file,
        opt,
        &p,
        &[("w.exp_avg", "exp_avg"), ("w.exp_avg_sq", "exp_avg_sq")],
    );
}

#[test]
fn sgd_momentum_matches_torch() {
    let file = "sgd_momentum.safetensors";
    let h = hyper(file);
    assert_eq!(h["optimizer"], "SGD");
    assert_eq!(h["nesterov"], false);
    let p = param0(file);
    let mut opt = Sgd::new(
        vec![("w".into(), p.clone())],
        h["lr"].as_f64().unwrap() as f32,
    );
    opt.momentum = h["momentum"].as_f64().unwrap() as f32;
    opt.dampening = h["dampening"].as_f64().unwrap() as f32;
    run_optimizer_fixture(file, opt, &p, &[("w.momentum_buffer", "momentum_buffer")]);
}
