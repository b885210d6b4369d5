#!/usr/bin/env python3
"""Checkpoint round trips between performer-rs and performer-pytorch 1.1.4.

  check DIR   DIR holds a checkpoint saved by Rust (config.json + model.safetensors, the
              layout of performer_models::save_pretrained) and probe.safetensors with tokens
              `x` (int64, b x n) and the Rust model's `logits`. Builds the PyTorch model from
              config.json, loads the state dict with strict=True, and compares its logits.
  export DIR  DIR holds a config.json (written by the Rust test). Builds that model in
              PyTorch with a seeded random initialization, and writes model.safetensors (its
              full state_dict, aliases included) and probe.safetensors with tokens `x` and
              PyTorch's `logits`, for Rust to load and compare.
  export-bf16 DIR  export of the model converted with `.to(torch.bfloat16)`: every float
              tensor of model.safetensors is BF16, as PyTorch writes it; the logits are those
              of the same bf16 values in float32 (`.float()`, exact).

Run with the reference environment: $PERFORMER_REF_PYTHON tools/roundtrip.py check DIR
Exit status 0 when the logits agree within 1e-4 of the largest magnitude.
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_fixtures import build_module, state_dict_tensors  # noqa: E402

TOLERANCE = 1e-4


def load_config(d):
    with open(os.path.join(d, "config.json")) as f:
        return json.load(f)


def logits_of(module, x):
    module.eval()
    with torch.no_grad():
        return module(x)


def check(d):
    config = load_config(d)
    module = build_module(config)
    state = load_file(os.path.join(d, "model.safetensors"))
    module.load_state_dict(state, strict=True)
    probe = load_file(os.path.join(d, "probe.safetensors"))
    ours = logits_of(module, probe["x"])
    theirs = probe["logits"]
    # No broadcasting, no NaN: either would make the error below meaningless.
    if ours.shape != theirs.shape:
        print(f"PyTorch's logits {tuple(ours.shape)} vs Rust's {tuple(theirs.shape)}")
        return 1
    if not (torch.isfinite(ours).all() and torch.isfinite(theirs).all()):
        print("non-finite logits")
        return 1
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    print(f"PyTorch loaded the Rust checkpoint of {config['model']}: logits differ by {err:.2e} (relative)")
    return 0 if err <= TOLERANCE else 1


def export(d, bf16=False):
    config = load_config(d)
    torch.manual_seed(1234)
    module = build_module(config)
    # move every parameter off its default so that a mix-up of names would show
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    if bf16:
        module = module.to(torch.bfloat16)
        # as saved from PyTorch: the tensors as they are (bf16 floats, int64 counters), cloned
        # because the proj_updater aliases share storage
        state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
        assert state["token_emb.weight"].dtype == torch.bfloat16
        module = module.float()
    num_tokens = config["kwargs"]["num_tokens"]
    x = torch.randint(0, num_tokens, (2, 24), generator=torch.Generator().manual_seed(5))
    logits = logits_of(module, x)
    save_file(state if bf16 else state_dict_tensors(module), os.path.join(d, "model.safetensors"))
    save_file({"x": x, "logits": logits.contiguous()}, os.path.join(d, "probe.safetensors"))
    print(f"exported a PyTorch {config['model']} checkpoint to {d}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("check", "export", "export-bf16"):
        print(__doc__)
        sys.exit(2)
    if sys.argv[1] == "check":
        sys.exit(check(sys.argv[2]))
    sys.exit(export(sys.argv[2], bf16=sys.argv[1] == "export-bf16"))
