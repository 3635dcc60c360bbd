#!/usr/bin/env bash
# One device call (<= 10 min on one H100) running the stages named in $STAGES, in order:
#   tests   GPU tests (python -m pytest -m gpu tests/gpu $TEST_ARGS). The whole suite takes ~380 s on the H200
#           and ~650 s on the H100 (bd9f034): there, run it as two calls, TEST_ARGS="-k 'not test_gpu_patch'"
#           and TEST_ARGS="-k test_gpu_patch", with T_TESTS=560
#   opstests tests/ops on the GPU ($OPS_ARGS, e.g. -k fp8)
#   memory  bench_e2e.py --grid memory (B=4/32K peak memory: HF default vs chunked / fp8 tinyserve)
#   tune    tune_decode.py (launch sweep: score walk, attention splits / inline merge, selection warps)
#   kernels bench_kernels.py ($KERNEL_ARGS, default: the full grid)
#   ablation select_ablation.py (the selection cut after each part, per search; $ABLATION_ARGS)
#   timeline chain_timeline.py (per-program timestamps of decode steps, split and chained; $TIMELINE_ARGS)
#   ptimeline persistent_timeline.py (per-item timestamps of the persistent decode beside the fused chain; $PTIMELINE_ARGS)
#   e2e     bench_e2e.py ($E2E_ARGS, default --quick)
#   quick   examples/quickstart.py
# Usage on the device machine, from the repo root:
#   GIT_COMMIT=<sha> STAGES="tests memory tune" bash benchmarks/gpu_session.sh
#   GIT_COMMIT=<sha> STAGES="kernels e2e" bash benchmarks/gpu_session.sh
#   GIT_COMMIT=<sha> STAGES=e2e E2E_ARGS="--synthetic-context --models llama3-8b --batches 8 --contexts 65536 \
#     --budgets 2048 --modes hf_static ts_dense ts_sparse ts_split" bash benchmarks/gpu_session.sh  # ~200 s, H200
# Writes at most 8 files under $OUT (the device tool's return folder); commit the JSON under
# benchmarks/results/. Each stage has its own time limit so one stage cannot eat the others'.
# GIT_COMMIT (required): the literal sha of the commit the copied tree is at, taken on the machine that sends
# it (the copy's .git HEAD may be stale, so neither a default nor $(git rev-parse HEAD) run here will do);
# it goes into the JSON. env.txt also records a hash of the package's sources, to check the pairing
# locally: find tinyserve_patch -name '*.py' | LC_ALL=C sort | xargs cat | sha256sum
# (env.txt files written before 2026-12-02 07:10 UTC hashed in the device's locale order, which ignores punctuation:
# sort the paths by their letters and digits only to reproduce those)
set -u -o pipefail
OUT=${OUT:-/tmp/tinyserve-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STAGES=${STAGES:-tests memory tune}
COMMIT=${GIT_COMMIT:-}
if ! [[ $COMMIT =~ ^[0-9a-f]{7,40}$ ]]; then
  echo "GIT_COMMIT must be the literal sha of the copied tree, from the sending machine; got '$COMMIT'" >&2
  exit 2
fi
export GIT_COMMIT=$COMMIT
T_TESTS=${T_TESTS:-480} T_MEMORY=${T_MEMORY:-190} T_TUNE=${T_TUNE:-170} T_KERNELS=${T_KERNELS:-300}
T_E2E=${T_E2E:-280} T_QUICK=${T_QUICK:-120} T_OPS=${T_OPS:-120} T_ABLATION=${T_ABLATION:-90} T_TIMELINE=${T_TIMELINE:-150}
T_PTIMELINE=${T_PTIMELINE:-150}

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  echo "commit $COMMIT; stages: $STAGES"
  echo "source sha256 $(find tinyserve_patch -name '*.py' | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

for stage in $STAGES; do
  echo "== $stage"
  case $stage in
    tests)
      eval "extra=(${TEST_ARGS:-})"  # shell words, so -k "a or b" stays one argument
      timeout "$T_TESTS" python -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rf "${extra[@]}" 2>&1 | grep -v DEBUG > "$OUT/gpu_tests.log"
      tail -15 "$OUT/gpu_tests.log" ;;
    opstests)  # the CPU suite's kernel tests (tests/ops pick CUDA when present), e.g. OPS_ARGS="-k fp8"
      eval "extra=(${OPS_ARGS:-})"
      timeout "$T_OPS" python -m pytest tests/ops -q -p no:cacheprovider -rf "${extra[@]}" 2>&1 | grep -v DEBUG > "$OUT/ops_tests.log"
      tail -15 "$OUT/ops_tests.log" ;;
    memory)
      timeout "$T_MEMORY" python benchmarks/bench_e2e.py --grid memory --commit "$COMMIT" --time-budget $((T_MEMORY - 20)) \
        --out "$OUT/e2e_memory.json" > "$OUT/e2e_memory.log" 2>&1
      grep -E "^\[|PASS|FAIL" "$OUT/e2e_memory.log" | cut -c1-320 ;;
    tune)
      timeout "$T_TUNE" python benchmarks/tune_decode.py ${TUNE_ARGS:---kernels score attention} --out "$OUT/tune_decode.json" > "$OUT/tune.log" 2>&1
      tail -40 "$OUT/tune.log" ;;
    kernels)
      timeout "$T_KERNELS" python benchmarks/bench_kernels.py --out "$OUT/kernels.json" ${KERNEL_ARGS:-} > "$OUT/kernels.log" 2>&1
      tail -45 "$OUT/kernels.log" ;;
    ablation)
      timeout "$T_ABLATION" python benchmarks/select_ablation.py --out "$OUT/select_ablation.json" ${ABLATION_ARGS:-} > "$OUT/ablation.log" 2>&1
      tail -20 "$OUT/ablation.log" ;;
    ptimeline)
      timeout "$T_PTIMELINE" python benchmarks/persistent_timeline.py --watchdog $((T_PTIMELINE - 10)) \
        --out "$OUT/persistent_timeline.json" ${PTIMELINE_ARGS:-} > "$OUT/persistent_timeline.log" 2>&1
      tail -20 "$OUT/persistent_timeline.log" | cut -c1-600 ;;
    timeline)
      timeout "$T_TIMELINE" python benchmarks/chain_timeline.py --out "$OUT/timeline.json" ${TIMELINE_ARGS:-} > "$OUT/timeline.log" 2>&1
      tail -60 "$OUT/timeline.log" ;;
    e2e)
      timeout "$T_E2E" python benchmarks/bench_e2e.py --commit "$COMMIT" --out "$OUT/e2e.json" --time-budget $((T_E2E - 30)) \
        ${E2E_ARGS:---quick} > "$OUT/e2e.log" 2>&1
      tail -40 "$OUT/e2e.log" ;;
    quick)
      timeout "$T_QUICK" python examples/quickstart.py --json "$OUT/quickstart.json" 2>&1 | tail -12 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
