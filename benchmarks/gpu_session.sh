#!/usr/bin/env bash
# One device call (<= 10 min on one H100): GPU tests, kernel benchmark, end-to-end benchmark, quick-start.
# Usage on the device machine, from the repo root:  bash benchmarks/gpu_session.sh
# Writes at most 8 files under $OUT (the device tool's return folder); commit the JSON under
# benchmarks/results/. Each stage has its own time limit so one stage cannot eat the others'.
set -u -o pipefail
OUT=${OUT:-/tmp/tinyserve-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T_TESTS=${T_TESTS:-150} T_KERNELS=${T_KERNELS:-170} T_E2E=${T_E2E:-200} T_QUICK=${T_QUICK:-60}

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  git rev-parse HEAD 2>/dev/null || echo "commit unknown"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== GPU tests"
timeout "$T_TESTS" python -m pytest -m gpu tests/gpu -q -p no:cacheprovider -x 2>&1 | tee "$OUT/gpu_tests.log" | tail -25

echo "== kernel benchmark"
timeout "$T_KERNELS" python benchmarks/bench_kernels.py --out "$OUT/kernels.json" ${KERNEL_ARGS:-} > "$OUT/kernels.log" 2>&1
tail -45 "$OUT/kernels.log"

echo "== end-to-end benchmark"
timeout "$T_E2E" python benchmarks/bench_e2e.py --out "$OUT/e2e.json" --time-budget $((T_E2E - 30)) ${E2E_ARGS:---quick} > "$OUT/e2e.log" 2>&1
tail -40 "$OUT/e2e.log"

echo "== quick-start"
timeout "$T_QUICK" python examples/quickstart.py --json "$OUT/quickstart.json" 2>&1 | tail -12
