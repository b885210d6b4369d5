#!/usr/bin/env bash
# The reference environment: performer-pytorch 1.1.4 and the versions the fixtures were made
# with, from PyPI, in a virtual environment. Used by the checkpoint round trips
# (crates/performer-models/tests/roundtrip.rs, run by .ci/run), tools/gen_fixtures.py and
# `cargo xtask bench --reference`.
#
# Usage: tools/setup-reference-venv.sh [DIR]   (default: ~/.cache/performer-ref)
# Prints the environment's python (for PERFORMER_REF_PYTHON) on stdout, progress on stderr.
# Idempotent: an environment that already has these versions is left as it is (seconds);
# creating one downloads torch (a few minutes).
set -euo pipefail
dir=${1:-$HOME/.cache/performer-ref}
py=$dir/bin/python
packages=(torch==2.15.0 performer-pytorch==1.1.4 local-attention==1.11.2
  axial-positional-embedding==0.3.12 einops safetensors numpy)

ready() {
  [[ -x $py ]] && "$py" - <<'PY' 2>/dev/null
import importlib.metadata as m
want = {"torch": "2.15.0", "performer-pytorch": "1.1.4", "local-attention": "1.11.2",
        "axial-positional-embedding": "0.3.12"}
for name, version in want.items():
    assert m.version(name).split("+")[0] == version, name
import torch, performer_pytorch, local_attention, safetensors, numpy, einops
assert float(torch.ones(2).sum()) == 2.0
PY
}

if ready; then
  echo "reference environment ready: $py" >&2
else
  echo "creating the reference environment in $dir (torch from PyPI: a few minutes)" >&2
  [[ -x $py ]] || python3 -m venv "$dir"
  "$dir/bin/pip" install -q --disable-pip-version-check "${packages[@]}" >&2
  ready || { echo "the reference environment in $dir does not import" >&2; exit 1; }
fi
echo "$py"
