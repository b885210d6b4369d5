#!/usr/bin/env python3
"""Run one BENCHMARKS.md workload on performer-pytorch 1.1.4 and print its timing as JSON.

Usage:
    $PERFORMER_REF_PYTHON tools/bench_reference.py --workload NAME [--n N] [--reps R]
        [--threads T] [--seed S]
    $PERFORMER_REF_PYTHON tools/bench_reference.py --list

This is the reference half of `cargo xtask bench --reference`, which starts one Python process
per workload (so each one's peak RSS is its own) and measures that process's peak RSS itself.
The Rust half is `examples/bench_workload.rs`; both take the same arguments and print the same
line, so the two are timed the same way:

* the model and inputs are built and seeded first (not timed);
* one warm-up repetition, then R timed repetitions (`time.perf_counter`);
* the last line of stdout is one JSON object
  `{"median_ms": .., "times_ms": [..], "tokens": .., "peak_rss_mib": ..}`
  (`peak_rss_mib` is this process's own ru_maxrss, for standalone use; xtask records the one it
  measures from outside). Everything else goes to stderr.

Workloads (f32, batch 1, seeded random inputs, `torch.set_num_threads(T)`):

* `attn-noncausal-4k`, `attn-causal-1k`, `attn-causal-4k`, `attn-causal-64k`, and the
  families `attn-noncausal` / `attn-causal` (the scaling sweep, `--n` required):
  FastAttention(dim_heads 64, nb_features 256), q, k, v of shape (1, 8, n, 64), forward and
  backward of `out.sum()`. tokens = n.
* `lm-causal-1k`, `lm-noncausal-1k`, `lm-full-1k`: PerformerLM(num_tokens 256, max_seq_len 1024,
  dim 256, depth 4, heads 4, dim_head 64, nb_features 256) in an AutoregressiveWrapper; one
  repetition is loss on 1025 random tokens, backward, Adam step, zero_grad. lm-full-1k adds
  reversible, ff_glu, use_scalenorm, local_attn_heads 2 (local_window_size 256), shift_tokens.
  tokens = 1024 (the positions the model sees).
* `lm-small-64`: the shape of a quick CPU run, PerformerLM(num_tokens 256, max_seq_len 64, dim 128,
  depth 4, heads 4, dim_head 32, nb_features 64, causal, shift_tokens); one repetition is the
  loss on a batch of 12 x 65 random tokens, backward, Adam step, zero_grad.
  tokens = 12 x 64 = 768.
* `generate-512`: the lm-causal-1k model with max_seq_len 2048; one repetition primes with 512
  random tokens and samples 64 more with `generate` (top-k, filter_thres 0.9). tokens = 64.
* `generate-512-bf16`: performer-rs only (its weights in bf16); exits 3, "not implemented yet".
* `matmul-4k`: a (4096 x 512) @ (512 x 2048) matmul, the GEMM floor of the machine in the same
  run (`--n` replaces 4096). tokens = 4096.
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from performer_pytorch import AutoregressiveWrapper, FastAttention, PerformerLM  # noqa: E402

HEADS, DIM_HEAD, NB_FEATURES = 8, 64, 256
LM = dict(num_tokens=256, dim=256, depth=4, heads=4, dim_head=64, nb_features=256)
LM_FULL = dict(
    reversible=True,
    ff_glu=True,
    use_scalenorm=True,
    local_attn_heads=2,
    local_window_size=256,
    shift_tokens=True,
)
# lm-small-64: the shape of a quick CPU run (issue 21), batch 12.
LM_SMALL = dict(dim=128, depth=4, heads=4, dim_head=32, nb_features=64, shift_tokens=True)
SMALL_BATCH = 12


def quiet():
    """performer-pytorch prints to stdout (the causal non-CUDA fallback notice): keep stdout for
    the JSON line."""
    return contextlib.redirect_stdout(sys.stderr)


def attention(causal, n):
    with quiet():
        attn = FastAttention(DIM_HEAD, nb_features=NB_FEATURES, causal=causal)
    q, k, v = (torch.randn(1, HEADS, n, DIM_HEAD, requires_grad=True) for _ in range(3))

    def step():
        for t in (q, k, v):
            t.grad = None
        out = attn(q, k, v)
        out.sum().backward()

    return step, n


def lm_train(causal, full, n, small=False):
    kwargs = dict(LM, max_seq_len=n, causal=causal)
    if full:
        kwargs.update(LM_FULL)
    batch = 1
    if small:
        kwargs.update(LM_SMALL)
        batch = SMALL_BATCH
    with quiet():
        model = AutoregressiveWrapper(PerformerLM(**kwargs))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randint(0, LM["num_tokens"], (batch, n + 1))

    def step():
        with quiet():
            loss = model(x)
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step, batch * n


def generate(prime_len, new_tokens=64):
    with quiet():
        model = AutoregressiveWrapper(PerformerLM(**LM, max_seq_len=2048, causal=True))
    prime = torch.randint(0, LM["num_tokens"], (1, prime_len))

    def step():
        with quiet():
            model.generate(prime, new_tokens, filter_thres=0.9)

    return step, new_tokens


def matmul(m, k=512, n=2048):
    a, b = torch.randn(m, k), torch.randn(k, n)

    def step():
        torch.matmul(a, b)

    return step, m


# name -> (builder taking n, default n or None when --n is required)
WORKLOADS = {
    "attn-noncausal-4k": (lambda n: attention(False, n), 4096),
    "attn-causal-1k": (lambda n: attention(True, n), 1024),
    "attn-causal-4k": (lambda n: attention(True, n), 4096),
    "attn-causal-64k": (lambda n: attention(True, n), 65536),
    "attn-noncausal": (lambda n: attention(False, n), None),
    "attn-causal": (lambda n: attention(True, n), None),
    "lm-causal-1k": (lambda n: lm_train(True, False, n), 1024),
    "lm-noncausal-1k": (lambda n: lm_train(False, False, n), 1024),
    "lm-full-1k": (lambda n: lm_train(True, True, n), 1024),
    "lm-small-64": (lambda n: lm_train(True, False, n, small=True), 64),
    "generate-512": (generate, 512),
    # performer-pytorch's generate is not run in bf16 here: our side only (bench shows n/a).
    "generate-512-bf16": (None, 512),
    "matmul-4k": (matmul, 4096),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", help="workload name (see --list)")
    p.add_argument("--n", type=int, help="sequence length (prompt length for generate-512)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="print the workload names and exit")
    args = p.parse_args()

    if args.list:
        print("\n".join(WORKLOADS))
        return 0
    if args.workload not in WORKLOADS:
        print(f"bench_reference: unknown workload {args.workload!r}; known: {', '.join(WORKLOADS)}", file=sys.stderr)
        return 2
    if args.reps < 1:
        print("bench_reference: --reps must be >= 1", file=sys.stderr)
        return 2
    build, default_n = WORKLOADS[args.workload]
    n = args.n if args.n is not None else default_n
    if n is None:
        print(f"bench_reference: workload {args.workload} needs --n", file=sys.stderr)
        return 2

    if build is None:
        print(f"not implemented yet: {args.workload} is measured on performer-rs only", file=sys.stderr)
        return 3

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    step, tokens = build(n)

    step()  # warm-up
    times_ms = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        step()
        times_ms.append((time.perf_counter() - t0) * 1e3)

    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    line = dict(median_ms=statistics.median(times_ms), times_ms=times_ms, tokens=tokens, peak_rss_mib=peak_rss_mib)
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
