"""Times the comparison points of performer-cuda's benchmark on the same GPU (CUDA events,
median after warm-up), writing CSV rows impl,n,fwd_ms,fwd_bwd_ms,note:

* performer-pytorch 1.1.4 FastAttention(causal=True): softmax_kernel feature maps plus whatever
  causal path it selects. Without fast_transformers' CUDA extension (absent on the GPU machine)
  it prints a warning and uses causal_linear_attention_noncuda; the note says which ran.
* flash-linear-attention's chunk_linear_attn on the same softmax features (q, k: K=m=256,
  v: V=64, scale 1, normalize=True), fp32 and bf16, forward and backward.

"fwd" runs under torch.no_grad(); "fwd_bwd" is a forward with autograd plus backward.
Failures (OOM, import errors) are recorded as rows with empty times and the error as the note.
"""
import argparse
import csv
import sys
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="4096,16384,65536")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--csv", required=True)
    a = ap.parse_args()
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
