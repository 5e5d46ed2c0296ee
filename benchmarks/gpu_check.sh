#!/usr/bin/env bash
# One prepared GPU check (issue 17): versions, the CUDA test subset, the GPU benchmark.
# Run from the repository root:  bash benchmarks/gpu_check.sh
# Everything is teed to $OUT/log.txt; the benchmark writes $OUT/gpu_bench.{csv,md}. Each section
# runs under `timeout` and the script goes on past a failed one (about 7.5 minutes at most on
# the GPU). Without CUDA it runs a dry mode: the benchmark's tiny CPU run under Triton's
# interpreter, in well under a minute (tests/test_bench.py runs it so it cannot rot).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
LOG="$OUT/log.txt"
: > "$LOG"
section() { echo; echo "=== $1 ($(date +%T)) ==="; }
run() {  # run SECONDS CMD...: logs the exit status, never stops the script
    local limit=$1; shift
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "--- exit $rc: $*"
    return 0
}
{
    section "machine"
    CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
    if [ "$CUDA" = 1 ]; then
        run 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
    fi
    run 60 "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    if [ "$CUDA" = 1 ]; then
        section "CUDA tests"
        BGNORM_TEST_DEVICE=cuda run 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_triton.py
        section "CUDA layer tests (float64 references on the GPU, every engine, issue-13 hardening)"
        BGNORM_TEST_DEVICE=cuda run "${GPU_CHECK_LAYER_TESTS:-150}" "$PY" -m pytest -q \
            -p no:cacheprovider --tb=line -m "not slow" tests/test_functional.py tests/test_layers.py \
            tests/test_hardening_layers.py
        section "benchmark"
        BUDGET="${GPU_CHECK_BUDGET:-240}"  # seconds for the benchmark (it stops cleanly)
        run $((BUDGET + 50)) "$PY" benchmarks/bench_gpu.py --out "$OUT" --budget "$BUDGET"
    else
        section "dry run (no CUDA): benchmark on CPU under TRITON_INTERPRET=1"
        TRITON_INTERPRET=1 run 280 "$PY" benchmarks/bench_gpu.py --out "$OUT" --dry
    fi
    section "done: $OUT"
} 2>&1 | tee -a "$LOG"
