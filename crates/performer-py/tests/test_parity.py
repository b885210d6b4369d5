"""Every class against performer-pytorch 1.1.4 on the repository's fixtures (FIXTURES.md):
forward within 1e-4 of the reference's largest magnitude, and, where the Python API exposes
them (the encoder-decoder's loss, whose `Loss.backward()` fills `gradients()`), gradients
within 1e-3."""

import json

import numpy as np
import pytest

import performer_rs
from conftest import fixture_dirs, read_safetensors, relative_error

FORWARD_TOLERANCE = 1e-4
GRADIENT_TOLERANCE = 1e-3
DIRS = fixture_dirs()


def test_all_48_fixtures_are_found():
    # The committed set (crates/performer-models/tests/parity.rs requires the same 48).
    assert len(DIRS) == 48, [d.name for d in DIRS]


def run(fixture):
    config = json.loads((fixture / "config.json").read_text())
    cls = getattr(performer_rs, config["model"])
    model = cls(**config.get("kwargs", {}))
    model.load_state_dict(read_safetensors(fixture / "weights.safetensors"))
    model.train(bool(config.get("train", False)))
    inputs = read_safetensors(fixture / "inputs.safetensors")
    inputs.pop("probe")
    call = config.get("call") or {}
    name = config["model"]
    if name == "FastAttention":
        out = model(inputs["q"], inputs["k"], inputs["v"])
    elif name == "PerformerEncDec":
        loss = model(inputs["x"], inputs["y"], enc_mask=inputs.get("enc_mask"),
                     dec_mask=inputs.get("dec_mask"))
        loss.backward()
        return model, np.float32(loss.item()), model.gradients()
    else:
        out = model(**inputs, **call)
    return model, out, None


@pytest.mark.parametrize("fixture", DIRS, ids=[f"{d.parent.name}/{d.name}" for d in DIRS])
def test_fixture(fixture):
    model, out, grads = run(fixture)
    expected = read_safetensors(fixture / "expected.safetensors")
    assert isinstance(out, (np.ndarray, np.floating))
    err = relative_error(out, expected["out"].reshape(np.shape(out)) if np.ndim(out) == 0
                         else expected["out"])
    assert err <= FORWARD_TOLERANCE, f"forward error {err:.2e}"
    if grads is not None:
        want = {k[len("grad."):]: v for k, v in expected.items()
                if k.startswith("grad.") and not k.startswith("grad.input.")}
        assert set(grads) == set(want), set(grads) ^ set(want)
        for k, g in want.items():
            e = relative_error(grads[k], g)
            assert e <= GRADIENT_TOLERANCE, f"gradient of {k}: error {e:.2e}"


def test_a_wrong_weight_fails_the_comparison():
    # The comparison can fail: one perturbed weight moves the output past the tolerance.
    fixture = next(d for d in DIRS if d.name == "lm_causal")
    model, out, _ = run(fixture)
    state = model.state_dict()
    key = next(k for k in state if k.endswith("to_q.weight") and "proj_updater" not in k)
    for k in (key, key.replace("net.", "proj_updater.instance.", 1)):
        state[k] = state[k] * 1.01
    model.load_state_dict(state)
    x = read_safetensors(fixture / "inputs.safetensors")["x"]
    expected = read_safetensors(fixture / "expected.safetensors")["out"]
    assert relative_error(model(x), expected) > FORWARD_TOLERANCE
