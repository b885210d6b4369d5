"""performer-pytorch's logit filters on numpy arrays. `generate(filter_logits_fn=top_k)` runs
the same filter in Rust (it is recognized by name); these are for inspecting logits."""

import numpy as np


def top_k(logits, thres=0.9):
    """Keeps the `int((1 - thres) * num_logits)` largest logits of each row (at least one),
    the rest become -inf. `logits` is `(b, num_logits)`."""
    logits = np.asarray(logits, dtype=np.float32)
    k = max(1, int((1 - thres) * logits.shape[-1]))
    out = np.full_like(logits, -np.inf)
    # stable sort of the negated logits: ties go to the lower index, as in Rust
    idx = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    np.put_along_axis(out, idx, np.take_along_axis(logits, idx, axis=-1), axis=-1)
    return out


def top_p(logits, thres=0.9):
    """Keeps the largest logits of each row until their softmax probability exceeds
    `1 - thres` (the one that crosses stays, the first always stays); the rest become -inf."""
    logits = np.asarray(logits, dtype=np.float32)
    order = np.argsort(-logits, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    shifted = np.exp(sorted_logits - sorted_logits[..., :1])
    cum = np.cumsum(shifted / shifted.sum(axis=-1, keepdims=True), axis=-1)
    remove = cum > np.float32(1 - thres)
    remove[..., 1:] = remove[..., :-1].copy()
    remove[..., 0] = False
    sorted_logits = np.where(remove, -np.inf, sorted_logits).astype(np.float32)
    out = np.empty_like(logits)
    np.put_along_axis(out, order, sorted_logits, axis=-1)
    return out
