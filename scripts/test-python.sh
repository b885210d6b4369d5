#!/usr/bin/env bash
# The Python package performer_rs (crates/performer-py), tested as a user gets it:
#   1. maturin builds the wheel (release) in a build venv;
#   2. a fresh venv installs the wheel, numpy and pytest with no Rust toolchain on PATH, and
#      pytest runs crates/performer-py/tests (fixtures' parity, bad inputs, training, ...);
#   3. with a reference environment (PERFORMER_REF_PYTHON: torch + performer-pytorch 1.1.4,
#      tools/setup-reference-venv.sh), the wheel is unpacked beside it (pip --target, the
#      reference venv itself is left as it is) and the torch interop tests run there;
#      PERFORMER_REF_REQUIRE=1 makes them fail instead of skip without it.
# Usage: scripts/test-python.sh [pytest args...]     Work files: target/python/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$root/target/python
py=${PYTHON:-python3}
mkdir -p "$work"

# 1. The wheel.
[[ -x $work/build-venv/bin/maturin ]] || {
  "$py" -m venv "$work/build-venv"
  "$work/build-venv/bin/pip" install -q --disable-pip-version-check 'maturin>=1.5,<2'
}
rm -rf "$work/wheels"
"$work/build-venv/bin/maturin" build --release --quiet -m crates/performer-py/Cargo.toml \
  -o "$work/wheels" >&2
wheel=$(ls "$work"/wheels/performer_rs-*.whl)
echo "built $(basename "$wheel") ($(du -h "$wheel" | cut -f1))" >&2

# 2. A clean venv, no cargo or rustc reachable while installing.
rm -rf "$work/test-venv"
"$py" -m venv "$work/test-venv"
env -u CARGO -u RUSTC PATH=/usr/bin:/bin "$work/test-venv/bin/python" -m pip install -q \
  --disable-pip-version-check "$wheel" pytest
(cd "$work" && env PATH=/usr/bin:/bin "$work/test-venv/bin/python" -c \
  'import performer_rs; print("performer_rs imports from", performer_rs.__file__)')
# (torch is not in this venv: the interop tests skip here and run in step 3)
PERFORMER_REF_REQUIRE=0 "$work/test-venv/bin/python" -m pytest -q -p no:cacheprovider \
  --rootdir "$root/crates/performer-py" "$root/crates/performer-py/tests" "$@"

# 3. Interop with torch and performer-pytorch, in the reference environment.
if [[ -n ${PERFORMER_REF_PYTHON:-} ]]; then
  rm -rf "$work/ref-site"
  "$work/test-venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
    --target "$work/ref-site" "$wheel"
  "$work/test-venv/bin/python" -m pip install -q --disable-pip-version-check \
    --target "$work/ref-site" pytest
  PYTHONPATH=$work/ref-site PERFORMER_REF_REQUIRE=${PERFORMER_REF_REQUIRE:-0} \
    "$PERFORMER_REF_PYTHON" -m pytest -q -p no:cacheprovider \
    --rootdir "$root/crates/performer-py" "$root/crates/performer-py/tests/test_torch.py" "$@"
elif [[ ${PERFORMER_REF_REQUIRE:-0} == 1 ]]; then
  echo "PERFORMER_REF_REQUIRE=1 but PERFORMER_REF_PYTHON is not set" >&2
  exit 1
fi
