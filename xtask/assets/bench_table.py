"""Prints the benchmark table of a device run from the CSVs of cuda_bench and
bench_reference.py (impl,n,fwd_ms,fwd_bwd_ms,note), with the ratios the issue targets:
performer-pytorch / performer-cuda full (target >= 10x at n=16k) and
performer-cuda core / fla fp32 (target <= 2x)."""
import csv
import sys


def load(path):
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError as exc:
        print(f"(missing {path}: {exc})")
        return []


def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def fmt(x):
    return f"{x:10.3f}" if x is not None else "         -"


def main():
    rows = []
    for p in sys.argv[1:]:
        rows += load(p)
    by = {(r["impl"], int(r["n"])): r for r in rows if r.get("n")}
    lens = sorted({n for _, n in by})
    print("causal FAVOR+ attention, b1 h8 d64 m256; median ms over CUDA-event-timed runs after warm-up")
    print("fwd: inference forward; fwd+bwd: forward with autograd state + backward")
    print(f"{'n':>6}  {'impl':<34}{'fwd':>10}{'fwd+bwd':>10}  ratio")
    for n in lens:
        ours_full = by.get(("performer-cuda full", n), {})
        ours_core = by.get(("performer-cuda core", n), {})
        for (impl, _), r in sorted(((k, v) for k, v in by.items() if k[1] == n), key=lambda kv: kv[0][0]):
            f, b = num(r["fwd_ms"]), num(r["fwd_bwd_ms"])
            ratio = ""
            if impl.startswith("performer-pytorch"):
                ob = num(ours_full.get("fwd_bwd_ms"))
                if ob and b:
                    ratio = f"performer-cuda full is {b / ob:.1f}x faster (fwd+bwd)"
            elif impl.startswith("fla"):
                oc = num(ours_core.get("fwd_bwd_ms"))
                if oc and b:
                    ratio = f"performer-cuda core takes {oc / b:.2f}x fla's time (fwd+bwd)"
            print(f"{n:>6}  {impl:<34}{fmt(f)}{fmt(b)}  {ratio}")
        print()
    notes = {r["impl"] + ": " + r["note"] for r in rows if r.get("note")}
    for note in sorted(notes):
        print("note:", note)


if __name__ == "__main__":
    main()
