"""Prints the benchmark table of a device run from the CSVs of cuda_bench and
bench_reference.py (impl,n,fwd_ms,fwd_bwd_ms,note), with the ratios the issue targets:
performer-pytorch / performer-cuda full (target >= 10x at n=16k) and
performer-cuda core / fla fp32 (target <= 2x).

Files ending in .jsonl hold the PerformerLM benchmark instead (lm_bench.rs and
bench_reference.py --lm, one JSON object a line): their table compares tokens/s of the training
step (goal: performer-rs >= 3x performer-pytorch) and of generate (goal >= 100x), and gives the
bf16 autocast speedup of each implementation's training step."""
import csv
import json
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


def load_jsonl(path):
    """The objects of a JSON-lines file; a line that does not parse is reported and skipped."""
    out = []
    try:
        with open(path) as f:
            for i, text in enumerate(f, 1):
                text = text.strip()
                if not text:
                    continue
                try:
                    out.append(json.loads(text))
                except ValueError as exc:
                    print(f"({path}:{i}: not JSON: {exc})")
    except OSError as exc:
        print(f"(missing {path}: {exc})")
    return out


GOALS = {"train_step": 3.0, "generate": 100.0}


def lm_table(lines):
    """The PerformerLM table: one row per (workload, precision, impl), the ratio on ours."""
    by = {(r.get("workload"), r.get("precision"), r.get("impl")): r for r in lines}
    print("PerformerLM on one GPU: median wall ms per repetition after warm-up, tokens/s")
    print(f"{'workload':<12}{'prec':<6}{'impl':<20}{'median ms':>12}{'tokens/s':>14}  ratio")
    for workload in ["train_step", "generate"]:
        for precision in ["f32", "bf16"]:
            ours = by.get((workload, precision, "performer-rs"))
            ref = by.get((workload, precision, "performer-pytorch"))
            for impl, r in [("performer-rs", ours), ("performer-pytorch", ref)]:
                if r is None:
                    continue
                ratio = ""
                if impl == "performer-rs" and ref is not None:
                    a, b = num(r.get("tokens_per_s")), num(ref.get("tokens_per_s"))
                    if a and b:
                        goal = GOALS[workload]
                        verdict = "meets" if a / b >= goal else "misses"
                        ratio = f"{a / b:.2f}x performer-pytorch's tokens/s ({verdict} the goal {goal:g}x)"
                if r.get("error"):
                    ratio = "error: " + str(r["error"])[:120]
                print(f"{workload:<12}{precision:<6}{impl:<20}{fmt(num(r.get('median_ms'))):>12}"
                      f"{fmt(num(r.get('tokens_per_s'))):>14}  {ratio}")
    for impl in ["performer-rs", "performer-pytorch"]:
        f32 = by.get(("train_step", "f32", impl)) or {}
        bf16 = by.get(("train_step", "bf16", impl)) or {}
        a, b = num(f32.get("median_ms")), num(bf16.get("median_ms"))
        if a and b:
            print(f"bf16 autocast speedup of the training step, {impl}: {a / b:.2f}x")
    shapes = {f"{r.get('workload')}: {r.get('shape')}" for r in lines if r.get("shape")}
    for shape in sorted(shapes):
        print("shape:", shape)
    print()


def main():
    rows, lm_lines = [], []
    for p in sys.argv[1:]:
        if p.endswith(".jsonl"):
            lm_lines += load_jsonl(p)
        else:
            rows += load(p)
    if lm_lines:
        lm_table(lm_lines)
    if not rows:
        return
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
