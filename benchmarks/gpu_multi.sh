#!/usr/bin/env bash
# Two-GPU checks in one device call (nvidia-h200-x2; expected ~3 min, hard cap ~7.3 min: every stage has
# its own timeout and none runs past START + TOTAL):
#   1. install lm-eval and what the image lacks of its import path from the wheels carried in .whl/
#      (git-ignored; fetch them with the recipe of /work/.library/device/README.md): lm-eval==0.4.13,
#      datasets==5.0.1 (pyarrow>=21 and huggingface-hub<2: the image's), dill==0.4.1, multiprocess==0.70.19,
#      evaluate==0.4.6, more-itertools==11.2.1, pytablewriter==1.2.1, DataProperty==1.1.1, tabledata==1.3.5,
#      typepy==1.3.5, mbstrdecoder==1.1.5, chardet==5.2.0, pathvalidate==3.3.1, tcolorpy==0.1.7, pytz==2026.6
#      (~11 MB; pyarrow, pandas, xxhash, fsspec, aiohttp, sacrebleu, scikit-learn, pytest are on the image;
#      rouge-score, sqlitedict, word2number are not needed by these tasks);
#   2. the two-GPU device_map test (tests/gpu/test_gpu_patch.py -k two_gpu);
#   3. the same lm-eval run of the shipped code model with a sparse budget, data-parallel over both GPUs
#      (`accelerate launch --multi_gpu --num_processes 2 -m tinyserve_patch.eval ...`) and single-process
#      on one GPU (`python -m tinyserve_patch.eval ...`), then a comparison of the two results.
# Usage on the device machine, from the repo root (carry .whl):
#   GIT_COMMIT=<sha> bash benchmarks/gpu_multi.sh
# Files under $OUT (<= 8): setup.log, gpu_tests.log, eval_dp.log, eval_single.log, results_dp.json,
# results_single.json, multi_gpu.json (summary: GPUs, versions, commit, both metric dicts, agreement,
# wall seconds of each run).
# Knobs (env): TASKS, LIMIT, CTX (metadata context_tokens), BUDGET, BS, DTYPE, GEN_KWARGS, TOL; T_* limits.
# Local dry run of the whole flow without GPUs: TS_DEVICE=cpu SKIP_INSTALL=1 bash benchmarks/gpu_multi.sh
# (the "DP" stage is then `accelerate launch --cpu`, which runs ONE process: data parallelism cannot be
# exercised on CPU, lm-eval's HFLM splits documents over processes only when it sees >1 CUDA device).
set -u -o pipefail
OUT=${OUT:-/tmp/tinyserve-multi}
mkdir -p "$OUT"
START=$(date +%s)
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the device image's NVLink-multicast settings, kept explicitly for the launched processes
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

TS_DEVICE=${TS_DEVICE:-cuda}
MODEL=${MODEL:-tinyserve_patch/models/tinyserve-code-lm}
TASKS=${TASKS:-tinyserve_code_ppl_2k,tinyserve_passkey_4k,tinyserve_passkey_ll_4k}
LIMIT=${LIMIT:-4}
CTX=${CTX:-768}
BUDGET=${BUDGET:-256}
BS=${BS:-1}           # 1: every document is scored alone in both runs, so the runs are comparable exactly
DTYPE=${DTYPE:-float32}
# generate_until (passkey): eager decode. On CUDA HF's generate() would otherwise torch.compile the decode
# step (the TinyServeCache is compileable) in every process, with a recompile per new cache size
GEN_KWARGS=${GEN_KWARGS-disable_compile=True}
TOL=${TOL:-1e-4}      # agreement: |dp - single| <= TOL * max(1, |single|) for every metric
TOTAL=${TOTAL:-420}   # no stage's timeout reaches past START + TOTAL seconds (then the 20 s comparison)
T_INSTALL=${T_INSTALL:-45} T_TESTS=${T_TESTS:-75} T_DP=${T_DP:-150} T_SINGLE=${T_SINGLE:-180}

# stage limit: its own, capped by what is left of TOTAL (at least 5 s)
limit() { local left=$((START + TOTAL - $(date +%s))); [ "$left" -lt 5 ] && left=5; [ "$1" -lt "$left" ] && echo "$1" || echo "$left"; }
now() { date +%s%N; }
secs() { local ns=$(( $(date +%s%N) - $1 )); printf '%d.%03d' $((ns / 1000000000)) $((ns / 1000000 % 1000)); }

if [ -z "${SKIP_INSTALL:-}" ]; then export PYTHONPATH=/tmp/site:$PWD; else export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD; fi
echo "== setup"
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  if [ -z "${SKIP_INSTALL:-}" ]; then
    echo "$(ls .whl/*.whl | wc -l) wheels in .whl/"
    timeout -k 10 "$(limit "$T_INSTALL")" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl && echo "wheels installed into /tmp/site" || echo "WHEEL INSTALL FAILED ($?)"
  fi
  echo "PYTHONPATH=$PYTHONPATH"
  timeout -k 5 "$(limit 60)" "$PY" - <<'EOF'
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0], sys.executable)
for n in ("torch", "triton", "transformers", "accelerate", "huggingface_hub", "lm_eval", "datasets", "pyarrow",
          "fsspec", "pandas", "dill", "multiprocess", "pytablewriter", "pytest"):
    try:
        print(f"{n} {md.version(n)}")
    except Exception as e:
        print(f"{n} MISSING ({e})")
import torch
print("cuda devices", torch.cuda.device_count())
for m in ("datasets", "lm_eval.evaluator", "lm_eval._cli.harness", "tinyserve_patch.eval"):
    try:
        importlib.import_module(m)
        print("import ok", m)
    except Exception as e:
        print("IMPORT FAILED", m, repr(e))
EOF
} > "$OUT/setup.log" 2>&1
cat "$OUT/setup.log"

echo "== two-GPU test"
t=$(now)
timeout -k 10 "$(limit "$T_TESTS")" "$PY" -m pytest -m gpu tests/gpu/test_gpu_patch.py -q -k two_gpu -p no:cacheprovider \
  > "$OUT/gpu_tests.log" 2>&1
RC_TESTS=$?
T_TESTS_S=$(secs "$t")
tail -5 "$OUT/gpu_tests.log"

MODEL_ARGS="pretrained=$MODEL,dtype=$DTYPE,token_budget=$BUDGET,page_size=16"
EVAL_ARGS=(--model_args "$MODEL_ARGS" --tasks "$TASKS" --metadata "{\"context_tokens\": $CTX}"
           --limit "$LIMIT" --batch_size "$BS" --seed 0)
[ -n "$GEN_KWARGS" ] && EVAL_ARGS+=(--gen_kwargs "$GEN_KWARGS")
rm -rf /tmp/ts_eval_dp /tmp/ts_eval_single

echo "== lm-eval, data-parallel over 2 processes"
if [ "$TS_DEVICE" = cpu ]; then LAUNCH=(--cpu); DEV=cpu; else LAUNCH=(--multi_gpu); DEV=cuda; fi
t=$(now)
timeout -k 10 "$(limit "$T_DP")" "$PY" -m accelerate.commands.launch "${LAUNCH[@]}" --num_processes 2 --num_machines 1 \
  --mixed_precision no --dynamo_backend no -m tinyserve_patch.eval "${EVAL_ARGS[@]}" --device "$DEV" \
  --output_path /tmp/ts_eval_dp > "$OUT/eval_dp.log" 2>&1
RC_DP=$?
T_DP_S=$(secs "$t")
tail -22 "$OUT/eval_dp.log"

echo "== lm-eval, single process on one GPU"
[ "$TS_DEVICE" = cpu ] && DEV1=cpu || DEV1=cuda:0
t=$(now)
CUDA_VISIBLE_DEVICES=${SINGLE_GPU:-0} timeout -k 10 "$(limit "$T_SINGLE")" "$PY" -m tinyserve_patch.eval "${EVAL_ARGS[@]}" \
  --device "$DEV1" --output_path /tmp/ts_eval_single > "$OUT/eval_single.log" 2>&1
RC_SINGLE=$?
T_SINGLE_S=$(secs "$t")
tail -22 "$OUT/eval_single.log"

# lm-eval writes <output_path>/<model>/results_<time>.json; bring back flat copies
f=$(ls -t /tmp/ts_eval_dp/*/results_*.json 2>/dev/null | head -1); [ -n "$f" ] && cp "$f" "$OUT/results_dp.json"
f=$(ls -t /tmp/ts_eval_single/*/results_*.json 2>/dev/null | head -1); [ -n "$f" ] && cp "$f" "$OUT/results_single.json"

echo "== compare"
COMMIT=${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export OUT COMMIT RC_TESTS RC_DP RC_SINGLE T_TESTS_S T_DP_S T_SINGLE_S TOL TS_DEVICE LIMIT CTX BUDGET BS DTYPE TASKS MODEL_ARGS START GEN_KWARGS
timeout 20 "$PY" - <<'EOF'
import glob, hashlib, importlib.metadata as md, json, math, os, subprocess, sys, time

E = os.environ
out = E["OUT"]


def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except Exception as e:  # missing or broken results: reported, not fatal
        return {"_error": repr(e)}


def metrics(res):
    """{task: {metric: value}} of the numeric metrics (stderr entries left out)."""
    table = {}
    for task, vals in (res.get("results") or {}).items():
        table[task] = {k: v for k, v in vals.items()
                       if "_stderr" not in k and k != "alias" and isinstance(v, (int, float))}
    return table


def version(n):
    try:
        return md.version(n)
    except Exception:
        return None


dp, single = load("results_dp.json"), load("results_single.json")
m_dp, m_single = metrics(dp), metrics(single)
tol = float(E["TOL"])
diffs, worst = [], 0.0
for task in sorted(set(m_dp) | set(m_single)):
    a, b = m_dp.get(task, {}), m_single.get(task, {})
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            ok = x == y
            d = None
        else:
            d = abs(x - y)
            ok = d <= tol * max(1.0, abs(y))
            worst = max(worst, d / max(1.0, abs(y)))
        diffs.append({"task": task, "metric": k, "dp": x, "single": y, "abs_diff": d, "ok": ok})
agree = bool(diffs) and all(r["ok"] for r in diffs) and not dp.get("_error") and not single.get("_error")
n_dp = {t: v.get("effective") for t, v in (dp.get("n-samples") or {}).items()}
n_single = {t: v.get("effective") for t, v in (single.get("n-samples") or {}).items()}

try:
    gpus = subprocess.run(["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=8).stdout.strip().splitlines()
except Exception as e:
    gpus = [f"nvidia-smi failed: {e!r}"]
src = hashlib.sha256()
for p in sorted(glob.glob("tinyserve_patch/**/*.py", recursive=True)):
    src.update(p.encode()); src.update(open(p, "rb").read())
try:
    import torch
    cuda = {"available": torch.cuda.is_available(), "device_count": torch.cuda.device_count(),
            "names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
except Exception as e:
    cuda = {"error": repr(e)}

import re
try:  # lm-eval logs "Building contexts for <task> on rank <r>..." in every process: which ranks took part
    dp_ranks = sorted({int(r) for r in re.findall(r"on rank (\d+)", open(os.path.join(out, "eval_dp.log")).read())})
except Exception:
    dp_ranks = []
tests_tail = open(os.path.join(out, "gpu_tests.log")).read().strip().splitlines()[-1:] if os.path.exists(os.path.join(out, "gpu_tests.log")) else []
summary = {
    "what": "lm-eval data-parallel (accelerate, 2 processes) vs single process, same arguments",
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "device": E["TS_DEVICE"],
    "gpus": gpus,
    "cuda": cuda,
    "commit": E["COMMIT"],
    "source_sha256": src.hexdigest(),
    "versions": {"python": sys.version.split()[0],
                 **{n: version(n) for n in ("torch", "triton", "transformers", "accelerate", "huggingface_hub",
                                             "lm_eval", "datasets", "pyarrow", "pytest")}},
    "eval_args": {"model_args": E["MODEL_ARGS"], "tasks": E["TASKS"], "limit": int(E["LIMIT"]),
                  "context_tokens": int(E["CTX"]), "batch_size": E["BS"], "gen_kwargs": E["GEN_KWARGS"], "seed": 0},
    "two_gpu_test": {"rc": int(E["RC_TESTS"]), "seconds": round(float(E["T_TESTS_S"]), 2),
                     "last_line": tests_tail[0] if tests_tail else None},
    "dp": {"rc": int(E["RC_DP"]), "wall_s": round(float(E["T_DP_S"]), 2), "ranks_seen": dp_ranks,
           "data_parallel": dp_ranks == [0, 1], "n_samples": n_dp,
           "lm_eval_total_s": dp.get("total_evaluation_time_seconds"), "metrics": m_dp,
           "error": dp.get("_error")},
    "single": {"rc": int(E["RC_SINGLE"]), "wall_s": round(float(E["T_SINGLE_S"]), 2), "n_samples": n_single,
               "lm_eval_total_s": single.get("total_evaluation_time_seconds"), "metrics": m_single,
               "error": single.get("_error")},
    "agreement": {"agree": agree, "tol": tol, "rule": "|dp - single| <= tol * max(1, |single|)",
                  "max_rel_diff": worst, "same_n_samples": n_dp == n_single, "rows": diffs},
    "tinyserve_config": (single.get("config") or dp.get("config") or {}).get("tinyserve"),
    "notes": "dp ran first (cold Triton cache on both ranks); wall_s includes process start, model load and "
             "kernel compilation. lm-eval's HFLM splits documents over processes only when it sees more than "
             "one CUDA device; a CPU dry run (TS_DEVICE=cpu) runs the dp stage as one process (ranks_seen [0]).",
    "total_script_s": round(time.time() - int(E["START"]), 1),
}
with open(os.path.join(out, "multi_gpu.json"), "w") as f:
    json.dump(summary, f, indent=1)
print(f"two-GPU test rc={E['RC_TESTS']} ({summary['two_gpu_test']['last_line']})")
print(f"dp rc={E['RC_DP']} {summary['dp']['wall_s']} s (ranks seen {dp_ranks}); single rc={E['RC_SINGLE']} {summary['single']['wall_s']} s")
for r in diffs:
    print(f"  {r['task']:<26} {r['metric']:<22} dp={r['dp']!s:<22} single={r['single']!s:<22} "
          f"{'ok' if r['ok'] else 'DIFFERS'}")
print(f"n-samples dp={n_dp} single={n_single}")
print(f"AGREE={agree} (max rel diff {worst:.3g}, tol {tol})")
EOF
echo "== done in $(( $(date +%s) - START )) s; files: $(ls "$OUT" | tr '\n' ' ')"
