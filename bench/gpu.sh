#!/usr/bin/env bash
# The benchmark suite in short runs (about 5 minutes; 5.5 on the 2-core CPU) on a GPU machine, into bench/results-gpu/ and
# docs/benchmarks-gpu.md. Without a visible GPU it runs the same short suite on the CPU and says so
# in the report's notes: the figures then only show that the suite works there.
#
#   bash bench/gpu.sh            (creates the virtualenv with `make venv` when there is none)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make venv
PY=.venv/bin/python
export WEIGHTSMITH_BENCH_RESULTS="$PWD/bench/results-gpu"
rm -rf "$WEIGHTSMITH_BENCH_RESULTS"
mkdir -p "$WEIGHTSMITH_BENCH_RESULTS"

if nvidia-smi -L >/dev/null 2>&1; then
  echo "GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader | paste -sd, -)"
  echo "The GPU short suite: each benchmark with few rounds." > "$WEIGHTSMITH_BENCH_RESULTS/MODE"
else
  echo "No GPU visible (nvidia-smi finds none): running the short suite on the CPU instead."
  echo "No GPU was visible: these are CPU figures from the short suite, not GPU ones." \
    > "$WEIGHTSMITH_BENCH_RESULTS/MODE"
fi

# Each step is bounded so that the whole suite stays near 5 minutes even on a slow machine.
run() { timeout "$1" "$PY" "${@:2}" || echo "bench step failed or timed out: ${*:2}"; }
run 60  bench/predict.py --rounds 3 --warmup 1 --calls 20 --window 2 --throughput-rounds 2
run 45  bench/edits.py --rounds 5 --warmup 1
run 40  bench/store.py --rounds 1 --warmup 0
run 60  bench/transfer.py --rounds 3
run 50  bench/finetune.py --rounds 2 --warmup 0 --epochs 2 --examples 4000
run 150 bench/memory.py --rounds 1
run 90  bench/restart.py --models 30 --big 1 --rounds 1
"$PY" bench/report.py --results "$WEIGHTSMITH_BENCH_RESULTS" --output docs/benchmarks-gpu.md \
  --note "$(cat "$WEIGHTSMITH_BENCH_RESULTS/MODE")"
