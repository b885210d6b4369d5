"""Times the comparison points of performer-cuda's benchmark on the same GPU (CUDA events,
median after warm-up), writing CSV rows impl,n,fwd_ms,fwd_bwd_ms,note:

* performer-pytorch 1.1.4 FastAttention(causal=True): softmax_kernel feature maps plus whatever
  causal path it selects. Without fast_transformers' CUDA extension (absent on the GPU machine)
  it prints a warning and uses causal_linear_attention_noncuda; the note says which ran.
* flash-linear-attention's chunk_linear_attn on the same softmax features (q, k: K=m=256,
  v: V=64, scale 1, normalize=True), fp32 and bf16, forward and backward.

"fwd" runs under torch.no_grad(); "fwd_bwd" is a forward with autograd plus backward.
Failures (OOM, import errors) are recorded as rows with empty times and the error as the note.

With --lm FILE it times instead performer-pytorch's PerformerLM (causal) as lm_bench.rs times
performer-rs's, and appends one JSON line per measurement to FILE (and prints it):
* train_step, f32 and bf16 (torch.autocast('cuda', dtype=torch.bfloat16), performer-pytorch's
  amp): AutoregressiveWrapper loss over `batch` windows of `seq + 1` tokens, backward, Adam step,
  loss.item(); tokens per step batch * seq;
* generate (f32): AutoregressiveWrapper.generate of `new` tokens after a `prompt`-token prompt
  (top-k 0.9, its defaults), which re-runs the model over the whole prefix for every token.
Wall-clock times after torch.cuda.synchronize(), `warmup` untimed then `reps` timed repetitions.
"""
import argparse
import csv
import json
import sys
import time
import traceback

import torch


def cuda_time(fn, warmup, iters):
    import time
    t0 = time.time()
    fn()
    torch.cuda.synchronize()
    first = time.time() - t0
    if first > 1.0:  # slow reference path: fewer repetitions to stay inside the run's budget
        warmup, iters = 0, 3
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


class Rows(list):
    """Rows that are also appended to the CSV at once, so a run cut short by the stage's time
    limit still leaves every finished measurement behind."""

    def __init__(self, path):
        super().__init__()
        self.file = open(path, "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(["impl", "n", "fwd_ms", "fwd_bwd_ms", "note"])
        self.file.flush()

    def append(self, row):
        super().append(row)
        self.writer.writerow(row)
        self.file.flush()


def guarded(rows, impl, n, note, fwd_fn, both_fn, warmup, iters):
    try:
        fwd = cuda_time(fwd_fn, warmup, iters)
    except Exception as exc:  # OOM or kernel failure: record and go on
        rows.append([impl, n, "", "", f"{note}; fwd error: {type(exc).__name__}: {str(exc)[:160]}"])
        traceback.print_exc()
        torch.cuda.empty_cache()
        return
    try:
        both = cuda_time(both_fn, warmup, iters)
    except Exception as exc:
        rows.append([impl, n, f"{fwd:.4f}", "", f"{note}; fwd+bwd error: {type(exc).__name__}: {str(exc)[:160]}"])
        traceback.print_exc()
        torch.cuda.empty_cache()
        return
    print(f"BENCH {impl:<32} n={n:<6} fwd {fwd:9.3f} ms  fwd+bwd {both:9.3f} ms  ({note})", flush=True)
    rows.append([impl, n, f"{fwd:.4f}", f"{both:.4f}", note])


def lm_line(path, row):
    print(json.dumps(row), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def wall_times(fn, warmup, reps):
    """Sorted wall-clock ms of `reps` calls of fn after `warmup` untimed ones, synchronised."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)


def lm_bench(a):
    """The PerformerLM training step and generate of lm_bench.rs, with performer-pytorch."""
    dims = f"vocab {a.vocab} dim {a.lm_dim} depth {a.depth} heads {a.lm_heads} causal"

    def measure(workload, precision, tokens, shape, setup):
        """setup() builds the model and inputs (not timed) and returns one repetition."""
        row = {"impl": "performer-pytorch", "workload": workload, "precision": precision,
               "device": torch.cuda.get_device_name(0), "tokens": tokens, "shape": shape}
        try:
            times = wall_times(setup(), a.warmup, a.reps)
            med = times[len(times) // 2]
            row.update(median_ms=med, times_ms=times, tokens_per_s=tokens / (med / 1e3))
        except Exception as exc:  # OOM or import failure: record and go on
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        torch.cuda.empty_cache()
        lm_line(a.lm, row)

    def build():
        from performer_pytorch import PerformerLM
        from performer_pytorch.autoregressive_wrapper import AutoregressiveWrapper
        torch.manual_seed(0)
        net = PerformerLM(num_tokens=a.vocab, max_seq_len=max(a.seq, a.prompt + a.new),
                          dim=a.lm_dim, depth=a.depth, heads=a.lm_heads,
                          dim_head=a.lm_dim // a.lm_heads, causal=True).cuda()
        return AutoregressiveWrapper(net).cuda()

    gen = torch.Generator(device="cuda").manual_seed(1)

    def train_setup(precision):
        def setup():
            model = build()
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            x = torch.randint(1, a.vocab, (a.batch, a.seq + 1), device="cuda", generator=gen)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = model(x)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss.item()  # waits for the device, as lm_bench.rs reads its loss
            return step
        return setup

    for precision in ["f32", "bf16"]:
        measure("train_step", precision, a.batch * a.seq,
                f"{dims}, batch {a.batch} seq {a.seq}, Adam", train_setup(precision))

    def generate_setup():
        model = build().eval()
        prompt = torch.randint(1, a.vocab, (a.gen_batch, a.prompt), device="cuda", generator=gen)

        def generate():
            with torch.no_grad():
                out = model.generate(prompt, a.new)
            assert tuple(out.shape) == (a.gen_batch, a.new), out.shape
        return generate

    measure("generate", "f32", a.gen_batch * a.new,
            f"{dims}, batch {a.gen_batch} prompt {a.prompt} new {a.new}, top-k 0.9", generate_setup)
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="4096,16384,65536")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--csv")
    ap.add_argument("--lm", help="time the PerformerLM workloads instead; JSON lines to this file")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--lm-dim", type=int, default=512)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--lm-heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--lm-batch", dest="batch_lm", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--gen-batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    if a.lm:
        a.batch = a.batch_lm
        print("torch", torch.__version__, "device", torch.cuda.get_device_name(0), flush=True)
        return lm_bench(a)
    if not a.csv:
        ap.error("--csv is required (or --lm FILE)")
    b, h, d, m = a.batch, a.heads, a.dim, a.features
    rows = Rows(a.csv)
    print("torch", torch.__version__, "device", torch.cuda.get_device_name(0), flush=True)

    try:
        import performer_pytorch
        from performer_pytorch import FastAttention
        from performer_pytorch.performer_pytorch import softmax_kernel
        fa = FastAttention(dim_heads=d, nb_features=m, causal=True).cuda()
        fn = fa.causal_linear_fn
        path = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", repr(fn))
        print("performer-pytorch", getattr(performer_pytorch, "__version__", "1.1.4"), "causal path:", path, flush=True)
    except Exception as exc:
        traceback.print_exc()
        fa, path, softmax_kernel = None, f"import failed: {exc}", None

    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as exc:
        traceback.print_exc()
        chunk_linear_attn = None
        fla_error = f"import failed: {type(exc).__name__}: {exc}"

    for n in [int(x) for x in a.n.split(",")]:
        gen = torch.Generator(device="cuda").manual_seed(n)
        q = (torch.randn(b, h, n, d, device="cuda", generator=gen) * 0.5).requires_grad_()
        k = (torch.randn(b, h, n, d, device="cuda", generator=gen) * 0.5).requires_grad_()
        v = torch.randn(b, h, n, d, device="cuda", generator=gen).requires_grad_()
        g = torch.randn(b, h, n, d, device="cuda", generator=gen)

        if fa is not None:
            def ref_fwd():
                with torch.no_grad():
                    fa(q, k, v)

            def ref_both():
                q.grad = k.grad = v.grad = None
                fa(q, k, v).backward(g)

            guarded(rows, "performer-pytorch FastAttention", n, f"causal path {path}", ref_fwd, ref_both, a.warmup, a.iters)
        else:
            rows.append(["performer-pytorch FastAttention", n, "", "", path])

        if chunk_linear_attn is None:
            rows.append(["fla chunk_linear_attn fp32", n, "", "", fla_error])
            continue
        # The same problem as performer-cuda's "core" row: causal attention on softmax features.
        if fa is not None:
            with torch.no_grad():
                qf = softmax_kernel(q, projection_matrix=fa.projection_matrix, is_query=True)
                kf = softmax_kernel(k, projection_matrix=fa.projection_matrix, is_query=False)
        else:
            qf = torch.rand(b, h, n, m, device="cuda", generator=gen)
            kf = torch.rand(b, h, n, m, device="cuda", generator=gen)
        for dtype, tag in [(torch.float32, "fp32"), (torch.bfloat16, "bf16")]:
            # fla takes [B, T, H, K].
            qq = qf.transpose(1, 2).contiguous().to(dtype).requires_grad_()
            kk = kf.transpose(1, 2).contiguous().to(dtype).requires_grad_()
            vv = v.detach().transpose(1, 2).contiguous().to(dtype).requires_grad_()
            gg = g.transpose(1, 2).contiguous().to(dtype)

            def fla_fwd():
                with torch.no_grad():
                    chunk_linear_attn(qq, kk, vv, scale=1.0, normalize=True)

            def fla_both():
                qq.grad = kk.grad = vv.grad = None
                o, _ = chunk_linear_attn(qq, kk, vv, scale=1.0, normalize=True)
                o.backward(gg)

            note = f"{tag} inputs, K={m} V={d}, scale=1, normalize=True"
            if tag == "fp32" and fa is not None and n <= 16384:
                # Same problem check: fla's output vs performer-pytorch's causal attention on these features.
                try:
                    from performer_pytorch.performer_pytorch import causal_linear_attention_noncuda
                    with torch.no_grad():
                        ref = causal_linear_attention_noncuda(qf, kf, v.detach())
                        o, _ = chunk_linear_attn(qq, kk, vv, scale=1.0, normalize=True)
                        err = ((o.transpose(1, 2) - ref).abs().max() / ref.abs().max()).item()
                    note += f"; max rel diff to performer-pytorch {err:.1e}"
                except Exception as exc:
                    note += f"; check failed: {type(exc).__name__}"
            guarded(rows, f"fla chunk_linear_attn {tag}", n, note, fla_fwd, fla_both, a.warmup, a.iters)
            del qq, kk, vv, gg
        del q, k, v, g, qf, kf
        torch.cuda.empty_cache()

    rows.file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
