"""Times `generate` from Python: performer_rs against performer-pytorch 1.1.4, the same model
(weights moved with `from_torch`), the same prompt and length, on the same CPU, in one run.

Run in the reference environment with the wheel beside it (scripts/test-python.sh leaves it in
target/python/ref-site):

    PYTHONPATH=target/python/ref-site /root/.cache/performer-ref/bin/python \
        crates/performer-py/bench_generate.py [--prompt 256] [--length 128] [--repeats 3]
"""

import argparse
import os
import statistics
import time

import numpy as np
import torch
from performer_pytorch import AutoregressiveWrapper, PerformerLM

import performer_rs


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kwargs = dict(num_tokens=256, max_seq_len=1024, dim=256, depth=4, heads=4, dim_head=64,
                  causal=True)
    ref = AutoregressiveWrapper(PerformerLM(**kwargs)).eval()
    ours = performer_rs.from_torch(ref)
    prompt = torch.randint(0, 256, (1, args.prompt))
    p = prompt.numpy()

    def run_ref():
        with torch.no_grad():
            ref.generate(prompt, args.length)

    def run_ours():
        ours.generate(p, args.length)

    # warm up (allocators, thread pools) with a few tokens each
    with torch.no_grad():
        ref.generate(prompt, 2)
    ours.generate(p, 2)
    t_ours = timed(run_ours, args.repeats)
    print(f"performer_rs done: {t_ours:.2f} s", flush=True)
    t_ref = timed(run_ref, args.repeats)
    print(f"PerformerLM {kwargs}")
    print(f"generate {args.length} tokens after a {args.prompt}-token prompt, batch 1, "
          f"{args.threads} threads, median of {args.repeats}")
    for name, t in [("performer-pytorch 1.1.4", t_ref), ("performer_rs", t_ours)]:
        print(f"  {name:<24} {t * 1e3:9.1f} ms  {args.length / t:9.1f} tokens/s")
    print(f"  speedup {t_ref / t_ours:.1f}x")


if __name__ == "__main__":
    main()
