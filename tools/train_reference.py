#!/usr/bin/env python3
"""Train performer-pytorch 1.1.4's byte-level causal PerformerLM the way examples/train_lm.rs does,
for a side-by-side check of the training curve (issue 6's real run).

Usage:
    $PERFORMER_REF_PYTHON tools/train_reference.py --data ../shared/data/tinyshakespeare.txt \
        --dim 256 --depth 4 --heads 4 --dim-head 64 --nb-features 256 --seq-len 256 \
        --batch-size 4 --lr 1e-3 --steps 300 [--threads 2] [--out runs/ref.json]

It follows performer-pytorch's examples/enwik8_simple/train.py (AutoregressiveWrapper loss, Adam,
gradients summed over --grad-accum micro-batches, clip_grad_norm_ to --clip, validation every N
steps) and mirrors train_lm exactly where the two could differ by more than the model's
initialization:

* the data: the same file, the same split (enwik8, recognized by its size of 100,000,000 bytes,
  90M / 5M / 5M; anything else 90% / 5% / 5%; .gz read through gzip);
* the batches: window offsets drawn from the same seeded xoshiro256++ generator (splitmix64
  seeding, `below(n)` by rejection), in the same order, so both see the same bytes at every step;
* validation: the same fixed, evenly spaced windows (`--val-windows`), and at the end every
  non-overlapping window of the validation split; loss / ln 2 = bits per byte.

Weights start from torch.manual_seed(--seed) (PyTorch's initializers; train_lm draws the same
distributions from its own generator). It prints one line per validation and a final JSON object
(also written to --out) with the curves.
"""

import argparse
import gzip
import json
import math
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import contextlib  # noqa: E402

import torch  # noqa: E402

from performer_pytorch import PerformerLM  # noqa: E402
from performer_pytorch.autoregressive_wrapper import AutoregressiveWrapper  # noqa: E402

ENWIK8_BYTES = 100_000_000
MASK = (1 << 64) - 1


def quiet():
    """performer-pytorch prints its causal fallback notice to stdout."""
    return contextlib.redirect_stdout(sys.stderr)


class Generator:
    """xoshiro256++ seeded through splitmix64: performer_tensor::rng::Generator."""

    def __init__(self, seed):
        x = seed & MASK
        s = []
        for _ in range(4):
            x = (x + 0x9E3779B97F4A7C15) & MASK
            z = x
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
            s.append(z ^ (z >> 31))
        self.s = s

    @staticmethod
    def _rotl(x, k):
        return ((x << k) | (x >> (64 - k))) & MASK

    def next_u64(self):
        s = self.s
        result = (self._rotl((s[0] + s[3]) & MASK, 23) + s[0]) & MASK
        t = (s[1] << 17) & MASK
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = self._rotl(s[3], 45)
        return result

    def below(self, n):
        if n == 0:
            return 0
        zone = MASK - (MASK % n)
        while True:
            v = self.next_u64()
            if v < zone:
                return v % n


def read_data(path):
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    n = len(raw)
    if n == ENWIK8_BYTES:
        train_end, val_end = 90_000_000, 95_000_000
    else:
        train_end, val_end = n * 90 // 100, n * 95 // 100
    return raw[:train_end], raw[train_end:val_end], n


def windows(data, offsets, length):
    rows = [list(data[o : o + length]) for o in offsets]
    return torch.tensor(rows, dtype=torch.long)


def val_offsets(data_len, length, count):
    span = data_len - length
    if count <= 1:
        return [0]
    return [i * span // (count - 1) for i in range(count)]


def full_offsets(data_len, length):
    out, o = [], 0
    while o + length <= data_len:
        out.append(o)
        o += length - 1
    return out


def evaluate(model, data, offsets, length, batch):
    model.eval()
    total = 0.0
    with torch.no_grad(), quiet():
        for i in range(0, len(offsets), batch):
            chunk = offsets[i : i + batch]
            loss = model(windows(data, chunk, length)).item()
            total += loss * len(chunk)
    model.train()
    return total / len(offsets) / math.log(2)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim-head", type=int, default=32)
    p.add_argument("--nb-features", type=int, default=64)
    p.add_argument("--feature-redraw-interval", type=int, default=1000, help="0: never")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--validate-every", type=int, default=50)
    p.add_argument("--val-windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-final-eval", action="store_true")
    p.add_argument("--out", help="write the curves here as JSON")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    train, val, total = read_data(a.data)
    length = a.seq_len + 1
    print(
        f"data: {a.data}: {total} bytes, train {len(train)}, validation {len(val)}, test {total - len(train) - len(val)}",
        file=sys.stderr,
    )
    with quiet():
        model = AutoregressiveWrapper(
            PerformerLM(
                num_tokens=256,
                max_seq_len=a.seq_len,
                dim=a.dim,
                depth=a.depth,
                heads=a.heads,
                dim_head=a.dim_head,
                causal=True,
                nb_features=a.nb_features,
                feature_redraw_interval=a.feature_redraw_interval or None,
            )
        )
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: performer-pytorch PerformerLM, {n_params / 1e6:.2f}M parameters", file=sys.stderr)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    sampler = Generator(a.seed)
    vals = val_offsets(len(val), length, max(a.val_windows, 1))
    history = {"train": [], "val": []}
    train_seconds, start = 0.0, time.time()

    for step in range(1, a.steps + 1):
        t0 = time.time()
        loss_sum = 0.0
        for _ in range(a.grad_accum):
            offsets = [sampler.below(len(train) - length) for _ in range(a.batch_size)]
            with quiet():
                loss = model(windows(train, offsets, length))
            loss.backward()
            loss_sum += loss.item()
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        opt.zero_grad()
        train_seconds += time.time() - t0
        loss = loss_sum / a.grad_accum
        history["train"].append({"step": step, "bpb": loss / math.log(2)})
        if step % a.validate_every == 0 or step == a.steps:
            bpb = evaluate(model, val, vals, length, a.batch_size)
            history["val"].append({"step": step, "bpb": bpb})
            tps = step * a.batch_size * a.grad_accum * a.seq_len / train_seconds
            print(
                f"step {step:>6}/{a.steps} | train loss {loss:.4f} ({loss / math.log(2):.3f} bpb) | "
                f"val {bpb:.4f} bpb | {tps:.0f} tok/s | elapsed {time.time() - start:.0f}s",
                flush=True,
            )

    summary = {
        "impl": "performer-pytorch",
        "args": vars(a),
        "steps": a.steps,
        "train_seconds": train_seconds,
        "tokens_per_s": a.steps * a.batch_size * a.grad_accum * a.seq_len / max(train_seconds, 1e-9),
        "final_val_bpb": history["val"][-1]["bpb"] if history["val"] else None,
        "history": history,
    }
    if not a.no_final_eval:
        offs = full_offsets(len(val), length)
        summary["final_val_bpb_all"] = evaluate(model, val, offs, length, a.batch_size)
        summary["final_val_windows_all"] = len(offs)
        print(f"validation (all): {summary['final_val_bpb_all']:.4f} bpb over {len(offs)} windows")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))


if __name__ == "__main__":
    main()
