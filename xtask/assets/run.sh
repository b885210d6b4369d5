#!/usr/bin/env bash
# Prepared GPU run of performer-cuda, written by `cargo xtask device-bundle`.
# Usage on the GPU machine: bash .device/run.sh
# Stages: environment, GPU tests, every parity fixture on cuda:0, one train_lm step on cuda:0
# (f32, --amp, under compute-sanitizer memcheck and racecheck), performer-cuda benchmark,
# performer-pytorch + fla benchmark, the PerformerLM training step and generate of performer-rs
# and performer-pytorch, tables. A failing stage is reported and the later stages still run. Logs go to $OUT when set,
# else .device/out; at most 8 files, so that all of them come back from a device run.
set -u

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOGDIR="${OUT:-$HERE/out}"
mkdir -p "$LOGDIR"
SUMMARY="$LOGDIR/summary.txt"
: > "$SUMMARY"
START_ALL=$(date +%s)
FAILED=0

# run_stage NAME TIMEOUT_S LOGFILE CMD...: runs CMD with a time limit, appends its output to
# LOGFILE, records the outcome in summary.txt and never stops the script.
run_stage() {
    local name=$1 limit=$2 log=$3
    shift 3
    local t0 rc
    t0=$(date +%s)
    echo "=== [$name] $* (limit ${limit}s)" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    local secs=$(( $(date +%s) - t0 ))
    local verdict="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        verdict="TIMED OUT"
    elif [ "$rc" -ne 0 ]; then
        verdict="FAILED (exit $rc)"
    fi
    [ "$verdict" = "ok" ] || FAILED=1
    printf '%-44s %-18s %4ss\n' "$name" "$verdict" "$secs" | tee -a "$SUMMARY"
    return 0
}

# --- binaries ----------------------------------------------------------------------------------
# The test binaries and tools travel as one gzip tarball (device-bundle: they compress about
# 3.5x, and what reaches this machine is limited); unpacked beside this script into bin/, tools/.
if [ -f "$HERE/binaries.tar.gz" ]; then
    if ! tar -xzf "$HERE/binaries.tar.gz" -C "$HERE"; then
        echo "unpacking binaries.tar.gz failed: no tests or tools can run" | tee -a "$SUMMARY"
        FAILED=1
    fi
fi

# --- environment -------------------------------------------------------------------------------
ENVLOG="$LOGDIR/env.log"
{
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(uname -a)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi failed"
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1
} > "$ENVLOG" 2>&1
cat "$ENVLOG"

# NVRTC / cuBLAS: the crate finds them itself (/usr/local/cuda/lib64, python's nvidia packages);
# adding the toolkit folder first makes it prefer the toolkit matching the driver.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export PERFORMER_CUDA_REQUIRE_NVRTC=1

# --- GPU tests ---------------------------------------------------------------------------------
TESTLOG="$LOGDIR/tests.log"
: > "$TESTLOG"
for t in "$HERE"/bin/*; do
    name=$(basename "$t")
    [ "$name" = "cuda_bench" ] && continue
    run_stage "test $name" 180 "$TESTLOG" "$t" --test-threads=1 --nocapture
done
grep -E "^(test result|SKIPPED|---- |thread .* panicked)|max rel err above" "$TESTLOG" || true

# --- the whole stack on the real device ----------------------------------------------------------
# Every parity fixture with the module, inputs and gradients on cuda:0 and the CPU's tolerances
# (xtask built with its cuda feature), then one tiny training step of train_lm on cuda:0 under
# compute-sanitizer's memcheck and racecheck (the toolkit's, when the image has it).
# (Into tests.log: the logs stay at 8 files.)
DEVLOG="$TESTLOG"
if [ -x "$HERE/tools/xtask" ]; then
    run_stage "parity --device cuda:0 (every fixture)" 240 "$DEVLOG" \
        "$HERE/tools/xtask" parity --device cuda:0 "$HERE/fixtures"
    grep -E "fixtures on|FAIL" "$DEVLOG" || true
fi
STEPDATA="${TMPDIR:-/tmp}/performer-train-step.txt"
for i in $(seq 1 400); do echo "line $i: the quick brown fox jumps over the lazy dog"; done > "$STEPDATA"
# One tiny training step on cuda:0 (timeout runs programs, not shell functions: an array).
STEP=("$HERE/tools/train_lm" --data "$STEPDATA" --device cuda:0 --steps 1 --dim 32 --depth 1
      --heads 2 --dim-head 16 --nb-features 16 --seq-len 32 --batch-size 2
      --local-window-size 16 --validate-every 1 --val-windows 1 --generate-every 0
      --generate-length 2 --prime-length 2 --no-final-eval)
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -x "$HERE/tools/train_lm" ]; then
    run_stage "train_lm one step on cuda:0" 120 "$DEVLOG" \
        "${STEP[@]}" --out "${TMPDIR:-/tmp}/performer-step-f32"
    run_stage "train_lm one step on cuda:0 --amp" 120 "$DEVLOG" \
        "${STEP[@]}" --amp --out "${TMPDIR:-/tmp}/performer-step-amp"
    if [ -n "$SANITIZER" ]; then
        for tool in memcheck racecheck; do
            run_stage "compute-sanitizer $tool: train step" 240 "$DEVLOG" \
                "$SANITIZER" --tool "$tool" --error-exitcode 1 \
                "${STEP[@]}" --out "${TMPDIR:-/tmp}/performer-step-$tool"
        done
        grep -E "ERROR SUMMARY|========= " "$DEVLOG" | tail -n 20 || true
    else
        echo "compute-sanitizer not found: memcheck and racecheck skipped" | tee -a "$SUMMARY"
    fi
fi

# --- benchmarks --------------------------------------------------------------------------------
CUDA_CSV="$LOGDIR/bench_cuda.csv"
REF_CSV="$LOGDIR/bench_reference.csv"
run_stage "bench performer-cuda" 120 "$LOGDIR/bench_cuda.log" \
    "$HERE/bin/cuda_bench" --n 4096,16384,65536 --batch 1 --heads 8 --dim 64 --features 256 \
    --warmup 3 --iters 10 --csv "$CUDA_CSV"
grep BENCH "$LOGDIR/bench_cuda.log" || true

PYDEPS="${TMPDIR:-/tmp}/performer-cuda-pydeps"
REFLOG="$LOGDIR/bench_reference.log"
: > "$REFLOG"
rm -rf "$PYDEPS"
run_stage "install comparison wheels" 60 "$REFLOG" \
    python3 -m pip install --no-deps --no-index --disable-pip-version-check --target "$PYDEPS" "$HERE"/wheels/*.whl
export PYTHONPATH="$PYDEPS${PYTHONPATH:+:$PYTHONPATH}"
run_stage "bench performer-pytorch + fla" 270 "$REFLOG" \
    python3 "$HERE/bench_reference.py" --n 4096,16384,65536 --batch 1 --heads 8 --dim 64 --features 256 \
    --warmup 3 --iters 10 --csv "$REF_CSV"

# --- PerformerLM: a training step and generate, performer-rs and performer-pytorch ---------------
# The same shapes on both sides (a causal model, vocab 256, dim 512, depth 6, heads 8; training
# batch 8 x 1024 tokens with Adam, f32 and bf16 autocast; generate 64 tokens after 512), one
# warm-up then 5 timed repetitions. JSON lines outside $OUT (8 files at most come back): each
# line is also printed into the stage's log.
LM_OURS="${TMPDIR:-/tmp}/performer-lm-ours.jsonl"
LM_REF="${TMPDIR:-/tmp}/performer-lm-ref.jsonl"
rm -f "$LM_OURS" "$LM_REF"
LM_SHAPE=(--vocab 256 --seq 1024 --prompt 512 --new 64 --gen-batch 1 --warmup 1 --reps 5)
if [ -x "$HERE/tools/lm_bench" ]; then
    run_stage "bench PerformerLM performer-rs" 120 "$LOGDIR/bench_cuda.log" \
        "$HERE/tools/lm_bench" --device cuda:0 --dim 512 --depth 6 --heads 8 --batch 8 \
        "${LM_SHAPE[@]}" --out "$LM_OURS"
fi
run_stage "bench PerformerLM performer-pytorch" 120 "$REFLOG" \
    python3 "$HERE/bench_reference.py" --lm "$LM_REF" --lm-dim 512 --depth 6 --lm-heads 8 \
    --lm-batch 8 "${LM_SHAPE[@]}"

# --- tables (last) -----------------------------------------------------------------------------
TABLE="$LOGDIR/table.txt"
python3 "$HERE/bench_table.py" "$LM_OURS" "$LM_REF" "$CUDA_CSV" "$REF_CSV" > "$TABLE" 2>&1 || echo "table failed" >> "$TABLE"
echo
echo "=== summary ($(( $(date +%s) - START_ALL ))s, logs in $LOGDIR)"
cat "$SUMMARY"
echo
cat "$TABLE"
exit $FAILED
