#!/usr/bin/env python3
"""Re-load every parity fixture and re-run the reference on it (a self-test of gen_fixtures.py).

Usage:
    $PERFORMER_REF_PYTHON tools/check_fixtures.py [FIXTURES_DIR | FIXTURE_DIR ...]

For each fixture directory (one holding config.json) this
  - builds the module from config.json with a *different* seed, so every parameter and buffer
    (projection matrices included) must come from weights.safetensors,
  - loads weights.safetensors with load_state_dict(strict=True) and checks that the file holds
    exactly the module's state_dict keys, dtypes and shapes, and that the
    `proj_updater.instance.` aliases equal their `net.` originals,
  - runs the forward in the recorded mode with the recorded call kwargs and compares `out`,
  - runs the backward of sum(out * probe) and compares every `grad.*` tensor, and checks that the
    set of gradient names is exactly the parameters (no aliases) that receive one plus the float
    inputs.
It also recomputes the core-op fixtures in ops/. Exits non-zero on any mismatch.
"""

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from safetensors.torch import load_file, safe_open  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_fixtures import (  # noqa: E402
    MODELS,
    REPO_ROOT,
    build_module,
    forward_backward,
    rel_err,
)

torch.set_num_threads(1)

TOL = 1e-6  # same torch build, same CPU: the rerun should agree to rounding noise at most
INPUT_NAMES = {
    "FastAttention": ({"q", "k", "v"}, set()),
    "SelfAttention": ({"x"}, {"mask"}),
    "CrossAttention": ({"x", "context"}, {"mask", "context_mask"}),
    "Performer": ({"x"}, {"mask", "context", "context_mask"}),
    "PerformerLM": ({"x"}, {"mask"}),
    "PerformerEncDec": ({"x", "y"}, {"enc_mask", "dec_mask"}),
}


def check_fixture(d):
    problems = []
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    if set(config) != {"model", "kwargs", "train", "call"}:
        problems.append(f"config keys {sorted(config)}")
    if config["model"] not in MODELS:
        return [f"unknown model {config['model']}"]

    weights = load_file(os.path.join(d, "weights.safetensors"))
    inputs = load_file(os.path.join(d, "inputs.safetensors"))
    expected = load_file(os.path.join(d, "expected.safetensors"))

    # dtypes of the files
    for k, v in weights.items():
        want = torch.int64 if k.endswith("calls_since_last_redraw") else torch.float32
        if v.dtype != want:
            problems.append(f"weight {k} dtype {v.dtype}")
    required, optional = INPUT_NAMES[config["model"]]
    names = set(inputs) - {"probe"}
    if "probe" not in inputs or not required <= names or not names <= required | optional:
        problems.append(f"input names {sorted(inputs)}")
    for k, v in inputs.items():
        if k in ("mask", "context_mask", "enc_mask", "dec_mask"):
            ok = v.dtype == torch.bool
        elif config["model"] in ("PerformerLM", "PerformerEncDec") and k in ("x", "y"):
            ok = v.dtype == torch.int64
        else:
            ok = v.dtype == torch.float32
        if not ok:
            problems.append(f"input {k} dtype {v.dtype}")

    # aliases agree with their originals
    for k, v in weights.items():
        if ".proj_updater.instance." in "." + k:
            orig = ("." + k).replace(".proj_updater.instance.", ".net.")[1:]
            if orig not in weights or not torch.equal(weights[orig], v):
                problems.append(f"alias {k} differs from {orig}")

    # a fresh module with other random values, then the recorded state
    torch.manual_seed(987654321)
    module = build_module(config)
    sd = module.state_dict()
    if set(sd) != set(weights):
        problems.append(f"state_dict keys differ: missing {sorted(set(sd) - set(weights))[:5]} "
                        f"extra {sorted(set(weights) - set(sd))[:5]}")
    for k, v in sd.items():
        if k in weights and tuple(v.shape) != tuple(weights[k].shape):
            problems.append(f"{k} shape {tuple(weights[k].shape)} != {tuple(v.shape)}")
    module.load_state_dict(weights, strict=True)

    probe = inputs["probe"]
    fwd_inputs = {k: v for k, v in inputs.items() if k != "probe"}
    out, _, grads = forward_backward(config, module, fwd_inputs, probe=probe)

    if tuple(probe.shape) != tuple(expected["out"].shape):
        problems.append(f"probe shape {tuple(probe.shape)} != out {tuple(expected['out'].shape)}")
    e = rel_err(out, expected["out"])
    worst_grad = 0.0
    if e > TOL:
        problems.append(f"out differs: {e:.2e}")
    got_names = set(grads)
    want_names = set(expected) - {"out"}
    if got_names != want_names:
        problems.append(f"grad names differ: missing {sorted(got_names - want_names)} "
                        f"extra {sorted(want_names - got_names)}")
    param_names = {n for n, _ in module.named_parameters()}
    for k in want_names:
        if not k.startswith("grad."):
            problems.append(f"unexpected tensor {k}")
            continue
        rest = k[len("grad."):]
        if rest.startswith("input."):
            if rest[len("input."):] not in inputs:
                problems.append(f"{k} names no input")
        elif rest not in param_names or ".proj_updater.instance." in "." + rest:
            problems.append(f"{k} names no parameter (or an alias)")
        if k in grads:
            ge = rel_err(grads[k], expected[k])
            worst_grad = max(worst_grad, ge)
            if ge > TOL:
                problems.append(f"{k} differs: {ge:.2e}")
    return problems, e, worst_grad


# ---------------------------------------------------------------------------------------------
# ops


def check_ops(d):
    problems = []
    unary = {
        "softmax_last": lambda t: t.softmax(dim=-1),
        "softmax_mid": lambda t: t.softmax(dim=1),
        "log_softmax_last": lambda t: t.log_softmax(dim=-1),
        "log_softmax_mid": lambda t: t.log_softmax(dim=1),
        "gelu": nn.GELU(),
        "elu": nn.ELU(),
        "softplus": nn.Softplus(),
        "silu": nn.SiLU(),
        "relu": nn.ReLU(),
        "sigmoid": nn.Sigmoid(),
        "tanh": nn.Tanh(),
    }

    def close(name, a, b):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-6, atol=1e-7):
            problems.append(f"ops/{name}")

    for name, fn in unary.items():
        t = load_file(os.path.join(d, name + ".safetensors"))
        x = t["x"].clone().requires_grad_(True)
        out = fn(x)
        (gx,) = torch.autograd.grad((out * t["probe"]).sum(), x)
        close(name + ":out", out.detach(), t["out"])
        close(name + ":grad_x", gx, t["grad_x"])
        if "deriv" in t:
            x2 = t["x"].clone().requires_grad_(True)
            (dv,) = torch.autograd.grad(fn(x2).sum(), x2)
            close(name + ":deriv", dv, t["deriv"])

    for name in ("cross_entropy_ignore0", "cross_entropy_default"):
        t = load_file(os.path.join(d, name + ".safetensors"))
        logits = t["logits"].clone().requires_grad_(True)
        loss = F.cross_entropy(logits, t["target"], ignore_index=int(t["ignore_index"]))
        (gl,) = torch.autograd.grad(loss, logits)
        close(name + ":loss", loss.detach(), t["loss"])
        close(name + ":grad", gl, t["grad_logits"])
        if not (t["target"] == t["ignore_index"]).any():
            problems.append(f"ops/{name}: no ignored target")

    t = load_file(os.path.join(d, "layer_norm.safetensors"))
    x, w, b = (t[k].clone().requires_grad_(True) for k in ("x", "weight", "bias"))
    out = F.layer_norm(x, (x.shape[-1],), w, b, eps=1e-5)
    grads = torch.autograd.grad((out * t["probe"]).sum(), (x, w, b))
    close("layer_norm:out", out.detach(), t["out"])
    for k, gr in zip(("grad_x", "grad_weight", "grad_bias"), grads):
        close("layer_norm:" + k, gr, t[k])

    optims = {
        "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
        "adam_wd": lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.1),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01),
        "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    }
    for name, make in optims.items():
        t = load_file(os.path.join(d, name + ".safetensors"))
        with safe_open(os.path.join(d, name + ".safetensors"), "pt") as f:
            if "optimizer" not in json.loads((f.metadata() or {}).get("hyperparameters", "{}")):
                problems.append(f"ops/{name}: no metadata")
        p = nn.Parameter(t["param0"].clone())
        opt = make([p])
        for step in (1, 2, 3):
            p.grad = t[f"grad{step}"].clone()
            opt.step()
            close(f"{name}:param{step}", p.detach(), t[f"param{step}"])
    return problems


def find_fixture_dirs(paths):
    dirs = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "config.json")):
            dirs.append(path)
            continue
        for root, subdirs, files in os.walk(path):
            subdirs.sort()
            if "config.json" in files:
                dirs.append(root)
    return dirs


def main(argv):
    paths = argv or [os.path.join(REPO_ROOT, "fixtures")]
    failures = 0
    dirs = find_fixture_dirs(paths)
    if not dirs:
        print("no fixtures found")
        return 1
    for d in dirs:
        problems, fe, ge = check_fixture(d)
        status = "PASS" if not problems else "FAIL"
        failures += bool(problems)
        print(f"{status} {os.path.relpath(d, paths[0]) if len(paths) == 1 else d}: "
              f"out {fe:.1e} grads {ge:.1e}")
        for p in problems:
            print("    " + p)
    for path in paths:
        ops = os.path.join(path, "ops")
        if os.path.isdir(ops):
            problems = check_ops(ops)
            failures += bool(problems)
            print(("PASS" if not problems else "FAIL") + " ops")
            for p in problems:
                print("    " + p)
    print(f"{len(dirs)} fixtures, {failures} failing")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
