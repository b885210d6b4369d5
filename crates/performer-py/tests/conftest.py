"""Shared helpers of the performer_rs tests: the repository's fixtures (read with numpy
alone, so the test environment needs no safetensors package) and the comparison measure of
FIXTURES.md."""

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
FIXTURES = Path(os.environ.get("PERFORMER_FIXTURES", REPO / "fixtures"))

_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
           "BOOL": np.bool_, "U8": np.uint8, "F16": np.float16}


def read_safetensors(path):
    """Every tensor of a safetensors file as a numpy array (the format: an 8-byte
    little-endian header length, a JSON header of dtype/shape/offsets, the raw data)."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        arr = np.frombuffer(body[start:end], dtype=_DTYPES[meta["dtype"]])
        out[name] = arr.reshape(meta["shape"]).copy()
    return out


def relative_error(ours, expected):
    """max |ours - expected| / max |expected| (absolute where expected is all zeros); a shape
    mismatch or a non-finite value on either side is infinite."""
    ours = np.asarray(ours, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if ours.shape != expected.shape:
        return float("inf")
    if not (np.isfinite(ours).all() and np.isfinite(expected).all()):
        return float("inf")
    if ours.size == 0:
        return 0.0
    scale = np.abs(expected).max()
    diff = np.abs(ours - expected).max()
    return float(diff / scale) if scale > 0 else float(diff)


def fixture_dirs():
    return sorted(p.parent for p in FIXTURES.glob("*/*/config.json"))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
