#!/usr/bin/env python
"""End-to-end decode benchmark: HF generate() speed and memory, HF dense attention vs tinyserve.

    PYTHONUNBUFFERED=1 python benchmarks/bench_e2e.py --out benchmarks/results/e2e_h100.json   # TinyLlama + targets, ~7 min (H100)
    PYTHONUNBUFFERED=1 python benchmarks/bench_e2e.py --grid models --out benchmarks/results/e2e_h100_models.json  # 8B/7B, ~7 min
    PYTHONUNBUFFERED=1 python benchmarks/bench_e2e.py --grid sweep --out benchmarks/results/e2e_h100_sweep.json    # batch x context, ~7 min
    python benchmarks/bench_e2e.py --quick --out /tmp/e2e_quick.json                           # the target shapes only (~3 min)
    python benchmarks/bench_e2e.py --models tinyllama --batches 1 4 --contexts 8192 --budgets 1024 2048 --modes hf_static ts_sparse
    python benchmarks/bench_e2e.py --smoke --out /tmp/e2e.json                                 # tiny model, CPU, seconds
    python benchmarks/bench_e2e.py --synthetic-context --models llama3-8b --batches 8 --contexts 65536 --budgets 2048 \
        --modes hf_static ts_dense ts_sparse ts_split                                          # decode only, 64K without a prefill
    python benchmarks/plot_e2e.py benchmarks/results/e2e_h100*.json                             # plots + README table

One invocation of the whole issue grid does not fit 8 minutes: every compiled row compiles its own decode
graph (static shapes: batch and cache capacity; 25-65 s each on an H100, measured), hence three named grids.

Models are random-weight bf16 models built from configs on the GPU (no downloads): TinyLlama-1.1B, the
Llama-3.1-8B shape and the Qwen2.5-7B shape. Speed does not depend on the weights' values; the page
selection sees random-weight queries and keys, so ``fraction_read`` is what the budget allows, not a
statement about real attention patterns.

Rows, per (model, batch, context):
    hf_dynamic          HF default: DynamicCache + SDPA, eager (HF does not compile a dynamic cache)
    hf_static           cache_implementation="static": HF auto-compiles the decode step
                        (torch.compile mode="reduce-overhead", i.e. CUDA graphs)
    ts_dense[_eager]    tinyserve, token_budget="dense": same cache and code path, every page attended
    ts_sparse[_eager]   tinyserve, token_budget=B, the default kernels (fused="auto": the split chain, or the
                        fused row-chained decode where triton_chain.prefer_fused_chain picks it)
    ts_fused[_eager]    tinyserve, token_budget=B, fused=True: the fused row-chained decode
    ts_split            tinyserve, token_budget=B, fused=False: the split chain (score, select, attend) everywhere
"_eager" rows pass ``disable_compile=True`` to generate(); the others let generate() auto-compile the decode
step, as it does for HF's static cache (a patched model's TinyServeCache is static and compileable).

Method (one timed generate() per row):
* Warm-up: one generate() on a SHORT prompt (64 tokens) with a cache of the SAME capacity as the timed run
  (HF static: ``max_cache_len``; tinyserve: ``cache=tinyserve_patch.make_cache(...)``, ``past_key_values=`` before transformers 5.24), so the
  compiled decode graph (which depends on batch and cache capacity, not on the prompt: HF builds the 4D mask
  outside the graph) is compiled and CUDA-graph-recorded before timing. Compiled rows warm up with all
  ``--new-tokens`` steps, eager rows with 3. Before every compiled row ``torch._dynamo.reset()`` frees the
  previous graphs (so the recompile limit is never reached and graph pools do not pile up).
* Timed: generate(prompt of ``context`` tokens, max_new_tokens=min_new_tokens=N, greedy); rows whose
  prefill is cheap (batch * context <= 32768) run it 3 times and keep the run of lowest median step
  (``decode_ms_repeats`` lists all; ``--repeats`` overrides). A logits processor
  records a CUDA event each time it is called, i.e. once per generated token, right after the logits of that
  step; one more event is recorded just before generate() is called.
    prefill_ms   = start event -> first token's logits (time to first token; includes generate()'s host
                   set-up, the dense prefill and the first lm_head)
    decode step i = event i -> event i+1 (N-1 intervals: forward of one token + sampling + HF's per-step
                   bookkeeping, as generate() runs it)
    decode_ms    = MEDIAN of the N-1 decode intervals (robust to one-off costs such as a CUDA-graph
                   re-record when a fresh cache lands at new addresses); decode_ms_mean = (t_N - t_1) / (N-1)
                   is recorded beside it, as are all intervals.
    tokens_per_s = batch * 1000 / decode_ms (decode throughput; the prefill is excluded)
    peak_gib     = torch.cuda.max_memory_allocated over the timed generate() (weights included),
                   after reset_peak_memory_stats; with --decode-peak, a second run gives peak_decode_gib: the
                   same, reset after the prefill (in the logits processor's first call), the decode phase alone.
    compiles     = graphs dynamo compiled during the warm-up / the timed run (0 for a compiled row's timed
                   run means the decode step replayed what the warm-up compiled).
* Floor: the bytes a decode step must read at least -- every weight except the input embedding (lm_head
  included) + the KV cache (dense: every token of the average decode length; sparse: ``dense_layers`` layers
  dense, the others min(length, budget) tokens + the min/max page metadata of every page) -- divided by
  the measured device-to-device copy bandwidth (1 GiB copy, read + write bytes / time).
  x_floor = decode_ms / floor_ms.
* fraction_read: tinyserve_patch.stats(model)["fraction_read"] of the timed run (share of the valid KV tokens
  attended, over all layers and decode steps; the dense rows read 1.0).

Synthetic context (``--synthetic-context``; hf_static and tinyserve rows): decode speed at contexts whose
prefill would take minutes per row (Llama-3-8B B=8/64K: ~10^16 FLOPs of masked attention). The row's cache
(HF ``StaticCache`` / ``TinyServeCache``, capacity context + N) is the one the warm-up compiled on; before each
timed run it is rewound, buffers kept, and every layer is appended ``context`` tokens of N(0, 1) keys and
values per row through the cache's own ``update()`` (tinyserve: the same append op that builds the page
metadata in a prefill). generate() then gets ``context + 1`` prompt tokens, runs the last one as its first
step (``prefill_ms`` is that one step, not a prefill) and decodes N - 1 more. Every decode step runs the whole
model over the full cache, so decode_ms is what a real prefill would be followed by; the keys are random, so
which pages are selected says nothing about real attention (their number, hence the bytes, is the budget's).

Every row runs inside try/except (an OOM or compile error is recorded and the run goes on); rows that
would not fit the GPU (estimated weights + KV + prefill activations) are skipped with the reason; once
``--time-budget`` seconds have passed (or the next row would pass it by the time similar rows took),
the remaining rows are recorded as skipped. The JSON is rewritten after every row, so a run killed from
outside keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GiB = 1024**3

# --------------------------------------------------------------------------------------------- models

MODELS = {
    "tinyllama": dict(
        label="TinyLlama-1.1B", family="llama", hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, intermediate_size=5632, vocab_size=32000, rope_theta=10000.0,
    ),
    "llama3-8b": dict(
        label="Llama-3.1-8B (shape)", family="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
    ),
    "qwen2.5-7b": dict(
        label="Qwen2.5-7B (shape)", family="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, rope_theta=1000000.0,
    ),
    "tiny": dict(  # --smoke
        label="tiny (smoke)", family="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, vocab_size=512, rope_theta=10000.0,
    ),
}

MODES = ("hf_dynamic", "hf_static", "ts_dense", "ts_dense_eager", "ts_sparse", "ts_sparse_eager", "ts_fused", "ts_fused_eager",
         "ts_split")
MODE_LABELS = {
    "hf_dynamic": "HF dynamic (eager)",
    "hf_static": "HF static + compile",
    "ts_dense": "tinyserve dense, compiled",
    "ts_dense_eager": "tinyserve dense, eager",
    "ts_sparse": "tinyserve sparse, compiled",
    "ts_sparse_eager": "tinyserve sparse, eager",
    "ts_fused": "tinyserve sparse fused, compiled",
    "ts_fused_eager": "tinyserve sparse fused, eager",
    "ts_split": "tinyserve sparse split, compiled",
}
WARMUP_PROMPT = 64
SYNTHETIC_FILL_CHUNK = 8192  # tokens per row appended by one update() of --synthetic-context
SYNTHETIC_SETTLE_S = 2.0  # pause between a --synthetic-context fill and the timed generate()
CHEAP_PREFILL_TOKENS = 32768  # rows with batch * context up to this run 3 timed generate() calls (--repeats 0)


def model_dims(name: str) -> dict:
    spec = MODELS[name]
    heads = spec["num_attention_heads"]
    return dict(
        layers=spec["num_hidden_layers"], kv_heads=spec["num_key_value_heads"], head_dim=spec["hidden_size"] // heads,
        hidden=spec["hidden_size"], intermediate=spec["intermediate_size"], vocab=spec["vocab_size"],
    )


def param_count(name: str) -> int:
    d = model_dims(name)
    h, i, v, L = d["hidden"], d["intermediate"], d["vocab"], d["layers"]
    kv = d["kv_heads"] * d["head_dim"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    return L * per_layer + 2 * v * h + h


def build_model(name: str, device: torch.device, dtype: torch.dtype, max_positions: int):
    """A random-weight model built directly on ``device``: HF's weight init is skipped and every matrix is
    filled in place with N(0, 0.02) (norms 1, biases 0), so an 8B model is ready in about a second."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    spec = dict(MODELS[name])
    family = spec.pop("family")
    spec.pop("label")
    cls = LlamaConfig if family == "llama" else Qwen2Config
    config = cls(
        **spec, max_position_embeddings=max(max_positions, 4096), tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from contextlib import nullcontext as no_init_weights
    torch.manual_seed(0)
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, 0.02)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif type(module).__name__.endswith("RMSNorm"):
                module.weight.fill_(1.0)
        for buf_name, buf in model.named_buffers():
            if buf.is_floating_point() and not torch.isfinite(buf).all():
                raise RuntimeError(f"buffer {buf_name} is not finite after building the model")
    return model.eval()


# --------------------------------------------------------------------------------------------- rows


@dataclass
class Row:
    model: str
    batch: int
    context: int
    mode: str
    budget: int | None = None  # tinyserve sparse only
    prefill_chunk: int | None = None  # generate(prefill_chunk_size=...); tinyserve: SparseConfig.prefill_chunk_size
    kv_dtype: str = "auto"  # tinyserve: SparseConfig.kv_cache_dtype ("fp8_e4m3": K/V pages in fp8)
    meta_dtype: str = "auto"  # tinyserve: SparseConfig.page_meta_dtype ("fp8_e4m3": outward-rounded fp8 min/max)
    synthetic: bool = False  # --synthetic-context: the cache filled with random K/V instead of a prefill
    # results
    status: str = "pending"  # ok | error | skipped
    reason: str | None = None
    label: str = ""
    compiled: bool = False
    fused: bool | str = "auto"  # SparseConfig.fused of a tinyserve row
    new_tokens: int = 0
    prefill_ms: float | None = None
    decode_ms: float | None = None
    decode_ms_mean: float | None = None
    decode_ms_min: float | None = None
    tokens_per_s: float | None = None
    peak_gib: float | None = None
    peak_decode_gib: float | None = None
    est_gib: float | None = None
    floor_ms: float | None = None
    x_floor: float | None = None
    weights_read_gib: float | None = None
    kv_read_gib: float | None = None
    fraction_read: float | None = None
    budget_respected: bool | None = None
    compiles_warmup: int | None = None
    compiles_timed: int | None = None
    generated_tokens: int | None = None
    decode_ms_repeats: list = field(default_factory=list)  # median step of each timed run
    warmup_s: float | None = None
    warmup_step_s: list = field(default_factory=list)  # host seconds: prefill, then each warm-up decode step
    compile_phases_s: dict = field(default_factory=dict)  # dynamo/inductor phases timed during the warm-up
    row_s: float | None = None
    step_ms: list = field(default_factory=list)
    profile: dict | None = None  # --profile-steps: device time per decode step by kernel (see profile_decode)

    def key(self):
        return (self.model, self.batch, self.context, self.mode, self.budget, self.prefill_chunk, self.kv_dtype, self.meta_dtype,
                self.synthetic)

    def describe(self) -> str:
        b = f" budget={self.budget}" if self.budget else ""
        c = f" prefill_chunk={self.prefill_chunk}" if self.prefill_chunk else ""
        k = f" kv={self.kv_dtype}" if self.kv_dtype != "auto" else ""
        k += f" meta={self.meta_dtype}" if self.meta_dtype != "auto" else ""
        k += " (synthetic context)" if self.synthetic else ""
        return f"{self.model} B={self.batch} L={self.context} {MODE_LABELS[self.mode]}{b}{c}{k}"


def is_tinyserve(mode: str) -> bool:
    return mode.startswith("ts_")


def is_compiled(mode: str) -> bool:
    return mode in ("hf_static", "ts_dense", "ts_sparse", "ts_fused", "ts_split")


def is_sparse(mode: str) -> bool:
    return mode.startswith(("ts_sparse", "ts_fused", "ts_split"))


def fused_setting(mode: str) -> bool | str:
    """SparseConfig.fused of a tinyserve row."""
    return True if mode.startswith("ts_fused") else False if mode == "ts_split" else "auto"


def rows_for(model, batch, context, modes, budgets, chunk: int | None = None, kv_dtype: str = "auto",
             meta_dtype: str = "auto", synthetic: bool = False) -> list[Row]:
    if synthetic and ("hf_dynamic" in modes or chunk):
        raise SystemExit("--synthetic-context fills a preallocated cache: hf_static and tinyserve rows only, no prefill chunks")
    out = []
    for mode in modes:
        kv = kv_dtype if is_tinyserve(mode) else "auto"
        if is_sparse(mode):
            out += [Row(model, batch, context, mode, budget=b, prefill_chunk=chunk, kv_dtype=kv, meta_dtype=meta_dtype,
                        synthetic=synthetic) for b in budgets]
        else:
            out.append(Row(model, batch, context, mode, prefill_chunk=chunk, kv_dtype=kv, synthetic=synthetic))
    return out


def default_grid(new_tokens: int) -> list[Row]:
    """``--grid default`` (~7 min on one H100): TinyLlama, the targets and the variants the issue asks for at
    the target shape, then eager rows across batch and context as time allows. Ordered by priority: rows past
    --time-budget are skipped. Each compiled row costs a compile (25-55 s for TinyLlama on an H100, measured),
    so compiled configurations are few; ``--grid models`` and ``--grid sweep`` hold the rest."""
    within = 2048 - new_tokens  # every decode step of a row at this context is within budget 2048
    T = "tinyllama"
    g: list[Row] = []
    # 1. targets: B=8 32K (speed), B=4 32K (memory, chunked prefill), B=8 within the budget (no slowdown)
    g += rows_for(T, 8, 32768, ["ts_sparse", "ts_dense", "hf_static", "hf_dynamic"], [2048])
    g += memory_rows(T)
    g += rows_for(T, 8, within, ["ts_sparse", "ts_dense"], [2048])
    # 2. at the target shape: eager sparse, fused selection, the budget sweep
    g += rows_for(T, 8, 32768, ["ts_sparse_eager", "ts_fused"], [2048])
    g += rows_for(T, 8, 32768, ["ts_sparse"], [1024, 4096])
    # 3. breadth (eager: prefill, peak memory vs context; eager decode is host-bound)
    for batch in (8, 4, 1):
        for context in (16384, 8192, 4096) + ((32768,) if batch == 1 else ()):
            g += rows_for(T, batch, context, ["hf_dynamic", "ts_sparse_eager"], [2048])
    return dedupe(g)


def memory_rows(model: str) -> list[Row]:
    """B=4 at 32K: HF default, then tinyserve (compiled as generate() runs it on a GPU, and eager) with the
    prefill in chunks of 1024 tokens (SparseConfig.prefill_chunk_size), HF dynamic with the same chunking
    for reference, tinyserve with one prefill forward, and chunked tinyserve with fp8 K/V pages."""
    g = rows_for(model, 4, 32768, ["hf_dynamic"], [2048])
    g += rows_for(model, 4, 32768, ["ts_sparse", "ts_sparse_eager", "hf_dynamic"], [2048], chunk=1024)
    g += rows_for(model, 4, 32768, ["ts_sparse_eager"], [2048])
    g += rows_for(model, 4, 32768, ["ts_sparse"], [2048], chunk=1024, kv_dtype="fp8_e4m3")
    return g


def models_grid(new_tokens: int) -> list[Row]:
    """``--grid models`` (~7 min): the Llama-3.1-8B and Qwen2.5-7B shapes (a compile costs 35-65 s there)."""
    L8, Q7 = "llama3-8b", "qwen2.5-7b"
    g = rows_for(L8, 1, 32768, ["hf_dynamic", "hf_static", "ts_sparse"], [2048])
    g += rows_for(Q7, 1, 32768, ["hf_dynamic", "hf_static", "ts_sparse"], [2048])
    g += rows_for(L8, 4, 32768, ["hf_dynamic", "hf_static", "ts_sparse"], [2048])
    g += rows_for(L8, 1, 8192, ["hf_dynamic", "hf_static", "ts_sparse"], [2048])
    g += rows_for(L8, 4, 8192, ["hf_dynamic", "hf_static", "ts_sparse"], [2048])
    return dedupe(g)


def sweep_grid(new_tokens: int) -> list[Row]:
    """``--grid sweep`` (~7 min, the tail may be skipped): TinyLlama compiled HF static vs tinyserve sparse
    across batch and context (the default grid has 32K at batch 8)."""
    g: list[Row] = []
    for batch, context in ((8, 16384), (8, 8192), (8, 4096), (1, 32768), (1, 8192), (4, 16384), (4, 4096), (1, 16384), (1, 4096), (4, 8192), (4, 32768)):
        g += rows_for("tinyllama", batch, context, ["hf_static", "ts_sparse"], [2048])
    return dedupe(g)


GRIDS = {"default": default_grid, "models": models_grid, "sweep": sweep_grid, "memory": lambda n: memory_rows("tinyllama")}


def quick_grid(new_tokens: int) -> list[Row]:
    within = 2048 - new_tokens
    g = rows_for("tinyllama", 8, 32768, ["ts_sparse", "ts_dense", "hf_static", "hf_dynamic"], [2048])
    g += rows_for("tinyllama", 8, 32768, ["ts_sparse"], [2048], meta_dtype="fp8_e4m3")
    g += rows_for("tinyllama", 8, within, ["ts_sparse", "ts_dense"], [2048])
    g += memory_rows("tinyllama")
    return dedupe(g)


def smoke_grid(new_tokens: int) -> list[Row]:
    within = 64 - new_tokens
    g = rows_for("tiny", 2, 128, list(MODES), [64])
    g += rows_for("tiny", 1, 128, ["hf_dynamic", "ts_sparse", "ts_sparse_eager"], [64, 96])
    g += rows_for("tiny", 2, within, ["ts_sparse", "ts_dense"], [64])
    g += rows_for("tiny", 2, 128, ["ts_sparse_eager"], [64], chunk=32, kv_dtype="fp8_e4m3")
    g += rows_for("tiny", 2, 128, ["ts_sparse_eager"], [64], meta_dtype="fp8_e4m3")
    g += rows_for("tiny", 2, 128, ["hf_static", "ts_dense", "ts_sparse", "ts_split"], [64], synthetic=True)
    return dedupe(g)


def dedupe(rows: list[Row]) -> list[Row]:
    seen, out = set(), []
    for r in rows:
        if r.key() not in seen:
            seen.add(r.key())
            out.append(r)
    return out


# --------------------------------------------------------------------------------------------- measurement


class StepTimer:
    """Logits processor that records an event each time it is called (once per generated token)."""

    def __init__(self, cuda: bool, reset_peak_after_prefill: bool):
        self.cuda = cuda
        self.reset_peak = reset_peak_after_prefill
        self.marks = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def __call__(self, input_ids, scores):
        self.mark()
        if self.reset_peak and len(self.marks) == 2:  # [start, first token]: the prefill is done
            torch.cuda.reset_peak_memory_stats()
        return scores

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1000 for a, b in zip(self.marks, self.marks[1:])]


class ProfileWindow:
    """Logits processor that starts a torch.profiler capture of CUDA kernels after the first token (the
    prefill is not in it) and stops it ``steps`` decode steps later."""

    def __init__(self, steps: int):
        from torch.profiler import ProfilerActivity, profile

        self.steps = steps
        self.calls = 0
        self.prof = profile(activities=[ProfilerActivity.CUDA])

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == 1:
            torch.cuda.synchronize()
            self.prof.start()
        elif self.calls == self.steps + 1:
            torch.cuda.synchronize()
            self.prof.stop()
        return scores


#: The package's Triton kernels, by the names the profiler gives them (the jitted functions' names).
TINYSERVE_KERNELS = ("_append_kernel", "_score_kernel", "_select_kernel", "_fused_kernel", "_decode_split_kernel",
                     "_decode_merge_kernel", "_record_kernel", "_persistent_kernel")
#: Groups of :func:`kernel_time_summary` after the package's kernels: name substrings, first match wins
#: (inductor's kernels before the others: their names carry the fused ops', e.g. ``triton_poi_fused_select_``).
KERNEL_GROUPS = (
    ("inductor fused", ("triton_",)),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_")),
    ("flash / sdpa", ("flash", "fmha", "attention")),
)


def kernel_group(name: str) -> str:
    """``"tinyserve"`` for the package's kernels (exact names), else the first group of :data:`KERNEL_GROUPS`
    with a substring of the lower-cased name, else ``"other"``."""
    if name in TINYSERVE_KERNELS:
        return "tinyserve"
    low = name.lower()
    return next((g for g, pats in KERNEL_GROUPS if any(p in low for p in pats)), "other")


def kernel_time_summary(per_name: dict[str, tuple[float, int]], steps: int) -> dict:
    """``per_name``: kernel name -> (device ms, launches) over ``steps`` decode steps. Per step: the total
    time and launches, the time per group (:func:`kernel_group`; heaviest first) and the 15 heaviest kernels."""
    groups: dict[str, float] = {}
    for name, (ms, _) in per_name.items():
        group = kernel_group(name)
        groups[group] = groups.get(group, 0.0) + ms / steps
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:15]
    return {
        "steps": steps,
        "kernel_ms_per_step": round(sum(ms for ms, _ in per_name.values()) / steps, 4),
        "kernels_per_step": round(sum(n for _, n in per_name.values()) / steps, 1),
        "groups_ms_per_step": {g: round(v, 4) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top": [{"name": n[:120], "ms_per_step": round(ms / steps, 4), "calls_per_step": round(c / steps, 2)}
                for n, (ms, c) in top],
    }


def profile_decode(model, ids, kw: dict, steps: int) -> dict:
    """One more generate() of ``steps + 1`` tokens with :class:`ProfileWindow`: :func:`kernel_time_summary`
    of the CUDA kernels of ``steps`` decode steps (graph-replayed kernels included: CUPTI reports them). A
    kernel launched with programmatic dependent launch starts before its predecessor ends and waits on the
    device, so its time includes that wait: read the groups as where time is spent, not as a partition."""
    from transformers import LogitsProcessorList

    window = ProfileWindow(steps)
    pkw = dict(kw, max_new_tokens=steps + 1, min_new_tokens=steps + 1)
    model.generate(ids, attention_mask=torch.ones_like(ids), logits_processor=LogitsProcessorList([window]), **pkw)
    torch.cuda.synchronize()
    per_name: dict[str, list] = {}
    for evt in window.prof.events():
        if str(getattr(evt, "device_type", "")).endswith("CUDA") and getattr(evt, "device_time", 0) > 0:
            entry = per_name.setdefault(evt.name, [0.0, 0])
            entry[0] += evt.device_time / 1000.0  # us -> ms
            entry[1] += 1
    return kernel_time_summary({k: (v[0], v[1]) for k, v in per_name.items()}, steps)


def compile_count() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # pragma: no cover
        return -1


def compile_phase_totals() -> dict:
    try:
        from torch._dynamo.utils import compilation_time_metrics

        return {k: float(sum(v)) for k, v in compilation_time_metrics.items()}
    except Exception:  # pragma: no cover
        return {}


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    reps = 10
    for _ in range(3):
        dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        seconds = time.perf_counter() - t
    del src, dst
    return 2 * nbytes * reps / seconds


def weights_read_bytes(model) -> int:
    """Bytes of weights a decode step reads: all parameters but the input embedding (unless tied)."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - emb.numel() * emb.element_size()


def kv_read_bytes(name: str, row: Row, new_tokens: int, dense_layers: int, page_size: int, elem: int) -> int:
    d = model_dims(name)
    length = row.context + new_tokens / 2  # average tokens in the cache over the decode steps
    per_token = 2 * d["head_dim"] * elem  # K and V of one head
    rows_heads = row.batch * d["kv_heads"]
    dense = d["layers"] * rows_heads * length * per_token
    if not is_sparse(row.mode):
        return int(dense)
    n_dense = min(dense_layers, d["layers"])
    meta_elem = 1 if row.meta_dtype == "fp8_e4m3" else elem
    sparse_layer = rows_heads * (min(length, row.budget) * per_token + math.ceil(length / page_size) * 2 * d["head_dim"] * meta_elem)
    return int(n_dense * rows_heads * length * per_token + (d["layers"] - n_dense) * sparse_layer)


def estimate_gib(name: str, row: Row, new_tokens: int, elem: int) -> float:
    """Conservative estimate of the timed generate()'s peak: weights + KV (+ page metadata) + the prefill's
    activations (MLP intermediates, residual, q/k/v) + HF static's [q, capacity] prefill mask."""
    d = model_dims(name)
    tokens = row.batch * (row.context + new_tokens + 1)
    kv_elem = 1 if row.kv_dtype == "fp8_e4m3" else elem
    kv = d["layers"] * tokens * d["kv_heads"] * d["head_dim"] * 2 * kv_elem * (1.13 if is_tinyserve(row.mode) else 1.0)
    chunk = min(row.context, row.prefill_chunk or row.context)
    if row.synthetic:  # no prefill: the warm-up's short prompt and two fill chunks of K / V
        chunk = WARMUP_PROMPT
        kv += 2 * row.batch * d["kv_heads"] * SYNTHETIC_FILL_CHUNK * d["head_dim"] * elem
    act = row.batch * chunk * (3 * d["intermediate"] + 6 * d["hidden"]) * elem
    mask = row.batch * chunk * (row.context + new_tokens) if row.mode == "hf_static" else 0
    if row.prefill_chunk:  # [q, capacity] masks of a chunk: HF's bool, the layer's bool and SDPA's additive one
        mask = row.batch * chunk * (row.context + new_tokens) * (2 + elem)
    if row.mode == "hf_dynamic":  # DynamicCache grows by torch.cat: one layer's KV twice for a moment
        kv += kv / d["layers"]
    return (param_count(name) * elem + kv + act + mask) / GiB


# --------------------------------------------------------------------------------------------- one row


def configure(model, row: Row, args):
    import tinyserve_patch as tp

    if is_tinyserve(row.mode):
        budget = row.budget if is_sparse(row.mode) else "dense"
        tp.patch_model(
            model, token_budget=budget, page_size=args.page_size, dense_layers=args.dense_layers,
            fused=row.fused, collect_stats=not args.no_stats, prefill_chunk_size=row.prefill_chunk,
            kv_cache_dtype=row.kv_dtype, page_meta_dtype=row.meta_dtype,
        )
    else:
        tp.unpatch_model(model)


def generate_kwargs(row: Row, new_tokens: int) -> dict:
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if row.mode == "hf_static" and not row.synthetic:  # synthetic rows pass their own StaticCache
        kw["cache_implementation"] = "static"
    if row.prefill_chunk and not is_tinyserve(row.mode):  # tinyserve rows chunk through their SparseConfig
        kw["prefill_chunk_size"] = row.prefill_chunk
    if not is_compiled(row.mode):
        kw["disable_compile"] = True
    return kw


def row_cache(model, row: Row, new_tokens: int):
    """The cache a --synthetic-context row warms up on and is timed on: capacity context + N tokens."""
    import tinyserve_patch as tp
    from transformers import StaticCache

    if is_tinyserve(row.mode):
        return tp.make_cache(model, row.batch, row.context + new_tokens)
    return StaticCache(config=model.config, max_cache_len=row.context + new_tokens)


@torch.no_grad()
def fill_synthetic(cache, batch: int, context: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device, seed: int = 0) -> None:
    """Rewind every layer of ``cache`` (a ``StaticCache`` or ``TinyServeCache`` that already ran, so its
    buffers exist) to empty, buffers kept where they are (the CUDA graphs recorded on them stay valid), then
    append ``context`` tokens of N(0, 1) keys and values ``[batch, kv_heads, n, head_dim]`` per row through the
    layer's ``update()``, in chunks of ``SYNTHETIC_FILL_CHUNK`` tokens, as a prefill's writes would (tinyserve:
    the append op builds each page's min / max)."""
    from tinyserve_patch.cache import TinyServeLayer

    gen = torch.Generator(device=device).manual_seed(seed)
    for layer in cache.layers:
        tinyserve = isinstance(layer, TinyServeLayer)
        if tinyserve:
            layer.crop(0)  # length 0, buffers kept
            layer.stats.reset()  # the timed run's pages only
        else:
            layer.reset()  # HF: zeroes in place, length 0
        for s in range(0, context, SYNTHETIC_FILL_CHUNK):
            n = min(SYNTHETIC_FILL_CHUNK, context - s)
            keys = torch.randn(batch, kv_heads, n, head_dim, generator=gen, device=device, dtype=dtype)
            values = torch.randn(batch, kv_heads, n, head_dim, generator=gen, device=device, dtype=dtype)
            if tinyserve:  # what the attention pre-hook does at a prefill chunk: no padding
                layer.observe_padding(None, batch, n, device)
            layer.update(keys, values)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        # the fill's random numbers load the GPU for a moment; in the first runs (90023b2, 24b60f5) every
        # row's first decode steps were 5-15% slower than its last ones: let the clocks settle first
        time.sleep(SYNTHETIC_SETTLE_S)


@torch.no_grad()
def run_row(model, row: Row, args, device: torch.device, bandwidth: float) -> None:
    import tinyserve_patch as tp
    from tinyserve_patch.hf_compat import CACHE_KWARG
    from transformers import LogitsProcessorList

    cuda = device.type == "cuda"
    n = args.new_tokens
    row.label = MODE_LABELS[row.mode] + (f" {row.budget}" if row.budget else "") + (
        f", prefill chunks of {row.prefill_chunk}" if row.prefill_chunk else "") + (
        f", {row.kv_dtype} KV" if row.kv_dtype != "auto" else "") + (
        f", {row.meta_dtype} page metadata" if row.meta_dtype != "auto" else "")
    if row.synthetic:
        row.label += ", synthetic context"
    row.compiled = is_compiled(row.mode)
    row.fused = fused_setting(row.mode)
    row.new_tokens = n
    configure(model, row, args)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1234)
    # synthetic: the cache holds `context` tokens; generate() runs the last prompt token as its first step
    ids = torch.randint(3, vocab, (row.batch, row.context + int(row.synthetic)), generator=gen).to(device)
    warm_ids = ids[:, :WARMUP_PROMPT]
    kw = generate_kwargs(row, n)
    if row.mode == "hf_static":
        for attr in ("_previous_max_cache_length", "_cache"):  # HF keeps the largest static cache length seen
            if hasattr(model, attr):
                delattr(model, attr)
        if not row.synthetic:
            kw["max_cache_len"] = row.context + n - 1  # what generate() sizes the timed run's cache to
    if row.compiled and cuda:
        torch._dynamo.reset()
    cache = row_cache(model, row, n) if row.synthetic else None

    # ---- warm-up: short prompt, cache of the timed run's capacity (compiled rows: all N steps)
    t0 = time.perf_counter()
    c0, phases0 = compile_count(), compile_phase_totals()
    warm_kw = dict(kw)
    if not row.compiled:
        warm_kw.update(max_new_tokens=min(3, n), min_new_tokens=min(3, n))
    if cache is not None:
        warm_kw[CACHE_KWARG] = cache
    elif is_tinyserve(row.mode):
        warm_kw[CACHE_KWARG] = tp.make_cache(model, row.batch, row.context + n)
    warm_timer = StepTimer(cuda=False, reset_peak_after_prefill=False)  # host clock: where compile time goes
    warm_timer.mark()
    model.generate(warm_ids, attention_mask=torch.ones_like(warm_ids), logits_processor=LogitsProcessorList([warm_timer]), **warm_kw)
    warm_kw.pop(CACHE_KWARG, None)
    if is_tinyserve(row.mode):
        model._tinyserve_state.last_cache = None
    if cuda:
        torch.cuda.synchronize()
    row.warmup_s = time.perf_counter() - t0
    row.warmup_step_s = [round(x / 1000, 3) for x in warm_timer.intervals_ms()]
    row.compiles_warmup = compile_count() - c0
    phases = {k: v - phases0.get(k, 0.0) for k, v in compile_phase_totals().items()}
    row.compile_phases_s = {k: round(v, 2) for k, v in sorted(phases.items(), key=lambda kv: -kv[1])[:6] if v > 0.05}
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    # ---- timed run(s): rows with a cheap prefill run several times and keep the run of lowest median step
    # (host jitter moves a ~5 ms step by several percent from one generate() to the next)
    reps = args.repeats or (3 if row.synthetic or row.batch * row.context <= CHEAP_PREFILL_TOKENS else 1)
    c1 = compile_count()
    runs = []
    dims = model_dims(row.model)
    for rep in range(reps):
        if cache is not None:
            fill_synthetic(cache, row.batch, row.context, dims["kv_heads"], dims["head_dim"], next(model.parameters()).dtype,
                           device, seed=rep)
            kw[CACHE_KWARG] = cache
            if is_tinyserve(row.mode):  # tp.stats() reads the model's last cache (the warm-up cleared it)
                model._tinyserve_state.last_cache = cache
            if cuda:  # the peak of the decode steps, not of the fill's random chunks
                torch.cuda.reset_peak_memory_stats()
        timer = StepTimer(cuda, reset_peak_after_prefill=False)
        timer.mark()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), logits_processor=LogitsProcessorList([timer]), **kw)
        if cuda:
            torch.cuda.synchronize()
            row.peak_gib = max(row.peak_gib or 0.0, torch.cuda.max_memory_allocated() / GiB)
        row.generated_tokens = int(out.shape[1] - ids.shape[1])
        intervals = timer.intervals_ms()
        del out
        if len(intervals) < 2:
            raise RuntimeError(f"only {len(intervals)} step events recorded; expected {n}")
        runs.append(intervals)
    row.compiles_timed = compile_count() - c1
    row.decode_ms_repeats = [round(statistics.median(r[1:]), 4) for r in runs]
    intervals = min(runs, key=lambda r: statistics.median(r[1:]))
    row.prefill_ms = min(r[0] for r in runs)
    steps = intervals[1:]
    row.step_ms = [round(x, 4) for x in steps]
    row.decode_ms = statistics.median(steps)
    row.decode_ms_mean = sum(steps) / len(steps)
    row.decode_ms_min = min(steps)
    row.tokens_per_s = row.batch * 1000.0 / row.decode_ms

    # ---- decode-phase peak: a second timed run would double the cost; the StepTimer resets the peak after
    # the prefill only when --decode-peak is given (a synthetic row's peak_gib is already its decode peak)
    if cuda and args.decode_peak and not row.synthetic:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        timer2 = StepTimer(cuda, reset_peak_after_prefill=True)
        timer2.mark()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), logits_processor=LogitsProcessorList([timer2]), **kw)
        torch.cuda.synchronize()
        row.peak_decode_gib = torch.cuda.max_memory_allocated() / GiB
        del out

    if cuda and args.profile_steps:
        if cache is not None:
            fill_synthetic(cache, row.batch, row.context, dims["kv_heads"], dims["head_dim"], next(model.parameters()).dtype,
                           device, seed=reps)
        row.profile = profile_decode(model, ids, kw, args.profile_steps)

    # ---- stats and floor
    if is_tinyserve(row.mode):
        s = tp.stats(model)
        row.fraction_read = s.get("fraction_read")
        row.budget_respected = s.get("budget_respected")
        model._tinyserve_state.last_cache = None
    elem = next(model.parameters()).element_size()
    w = weights_read_bytes(model)
    kv = kv_read_bytes(row.model, row, n, args.dense_layers, args.page_size, elem)
    row.weights_read_gib = w / GiB
    row.kv_read_gib = kv / GiB
    row.floor_ms = (w + kv) / bandwidth * 1000
    row.x_floor = row.decode_ms / row.floor_ms
    notes = []
    if row.generated_tokens != n:
        notes.append(f"generated {row.generated_tokens} tokens, expected {n}")
    if row.compiled and not cuda:
        notes.append("CPU: generate() does not auto-compile, ran eager")
    elif row.compiled and row.compiles_warmup == 0:
        notes.append("no graph was compiled in the warm-up (did generate() auto-compile?)")
    if cuda and row.compiles_timed:
        notes.append(f"{row.compiles_timed} graph(s) compiled during the timed run")
    row.reason = "; ".join(notes) or None
    row.status = "ok"


# --------------------------------------------------------------------------------------------- targets


def find(rows, **kw):
    for r in rows:
        if r.status == "ok" and all(getattr(r, k) == v for k, v in kw.items()):
            return r
    return None


def evaluate_targets(rows: list[Row], tgt: dict) -> list[dict]:
    """PASS/FAIL of the issue's targets, from rows of this run."""
    out = []

    def verdict(name, ok, detail):
        out.append({"target": name, "verdict": ("PASS" if ok else "FAIL") if ok is not None else "N/A", "detail": detail})

    m, b, L, bud = tgt["model"], tgt["batch"], tgt["context"], tgt["budget"]
    shape = f"{m} B={b} L={L} budget={bud}"
    for sparse_mode, meta in (("ts_sparse", "auto"), ("ts_fused", "auto"), ("ts_sparse", "fp8_e4m3")):
        sp = find(rows, model=m, batch=b, context=L, mode=sparse_mode, budget=bud, prefill_chunk=None, kv_dtype="auto",
                  meta_dtype=meta)
        if sp is None and meta != "auto":
            continue  # an optional variant: no verdict without its row
        for base_mode, factor in (("hf_static", 4.0), ("ts_dense", 2.0)):
            base = find(rows, model=m, batch=b, context=L, mode=base_mode, prefill_chunk=None, kv_dtype="auto")
            variant = f" ({meta} page metadata)" if meta != "auto" else ""
            name = f"{shape}: {MODE_LABELS[sparse_mode]}{variant} tokens/s >= {factor:g}x {MODE_LABELS[base_mode]}"
            if sp is None or base is None:
                verdict(name, None, "missing row(s)")
                continue
            ratio = sp.tokens_per_s / base.tokens_per_s
            verdict(name, ratio >= factor, f"{ratio:.2f}x ({sp.tokens_per_s:.0f} vs {base.tokens_per_s:.0f} tok/s)")
    # within the budget: every (model, batch, context) with context + N <= budget
    found = False
    for sp in rows:
        if sp.status != "ok" or sp.mode not in ("ts_sparse", "ts_fused"):
            continue
        if sp.context + sp.new_tokens > sp.budget:
            continue
        dense = find(rows, model=sp.model, batch=sp.batch, context=sp.context, mode="ts_dense")
        if dense is None:
            continue
        found = True
        slower = sp.decode_ms / dense.decode_ms - 1
        verdict(
            f"{sp.model} B={sp.batch} L={sp.context} (within budget {sp.budget}): {MODE_LABELS[sp.mode]} no slower than dense (3%)",
            slower <= 0.03, f"{100 * slower:+.1f}% ({sp.decode_ms:.3f} vs {dense.decode_ms:.3f} ms/step)",
        )
    if not found:
        verdict("contexts within the budget: sparse no slower than dense (3%)", None, "no within-budget sparse + dense row pair")
    mb, mL = tgt["mem_batch"], tgt["mem_context"]
    hf = find(rows, model=m, batch=mb, context=mL, mode="hf_dynamic")
    hf = find(rows, model=m, batch=mb, context=mL, mode="hf_dynamic", prefill_chunk=None)  # HF's default
    name = f"{m} B={mb} L={mL} budget={bud}: tinyserve sparse peak memory <= 0.5x HF dynamic"
    found = False
    for sparse_mode in ("ts_sparse", "ts_sparse_eager"):  # every chunking measured, each its own verdict
        for sp in rows:
            if sp.status != "ok" or (sp.model, sp.batch, sp.context, sp.mode, sp.budget) != (m, mb, mL, sparse_mode, bud):
                continue
            if hf is None or sp.peak_gib is None or hf.peak_gib is None:
                continue
            found = True
            ratio = sp.peak_gib / hf.peak_gib
            chunk = f"prefill chunks of {sp.prefill_chunk}" if sp.prefill_chunk else "one prefill forward"
            if sp.kv_dtype != "auto":
                chunk += f", {sp.kv_dtype} KV"
            verdict(f"{name} ({MODE_LABELS[sp.mode]}, {chunk})", ratio <= 0.5,
                    f"{ratio:.2f}x ({sp.peak_gib:.2f} vs {hf.peak_gib:.2f} GiB; peak of the whole generate(), prefill included)")
    if not found:
        verdict(name, None, "missing row(s) or no GPU memory figures")
    return out


def speedups(rows: list[Row]) -> list[dict]:
    """Decode tokens/s of every measured sparse row against the dense rows of the same model, batch, context
    and fill (HF static + compile, tinyserve dense), from this run."""
    out = []
    for sp in rows:
        if sp.status != "ok" or not is_sparse(sp.mode):
            continue
        entry = {"row": sp.describe(), "tokens_per_s": sp.tokens_per_s}
        for base_mode in ("hf_static", "ts_dense"):
            base = find(rows, model=sp.model, batch=sp.batch, context=sp.context, mode=base_mode,
                        prefill_chunk=sp.prefill_chunk, synthetic=sp.synthetic)
            entry[f"vs_{base_mode}"] = None if base is None else sp.tokens_per_s / base.tokens_per_s
        out.append(entry)
    return out


def speedups_markdown(entries: list[dict]) -> str:
    def ratio(x):
        return "-" if x is None else f"{x:.2f}x"

    return "\n".join(f"- {e['row']}: {e['tokens_per_s']:.0f} tok/s = {ratio(e['vs_hf_static'])} HF static + compile, "
                     f"{ratio(e['vs_ts_dense'])} tinyserve dense" for e in entries)


# --------------------------------------------------------------------------------------------- output


def fmt(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def markdown_table(rows: list[Row] | list[dict]) -> str:
    rows = [r if isinstance(r, dict) else asdict(r) for r in rows]
    head = "| model | B | context | method | budget | prefill ms | decode ms/step | tok/s | peak GiB | floor ms | x floor | KV read | status |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        status = r["status"] if r["status"] == "ok" and not r.get("reason") else f"{r['status']}: {r.get('reason') or ''}".strip()
        status = status.replace("|", "/").replace("\n", " ")[:120]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['context']} | {r.get('label') or MODE_LABELS[r['mode']]} | {fmt(r['budget'])} "
            f"| {fmt(r['prefill_ms'], 1)} | {fmt(r['decode_ms'], 3)} | {fmt(r['tokens_per_s'], 1)} | {fmt(r['peak_gib'])} "
            f"| {fmt(r['floor_ms'], 3)} | {fmt(r['x_floor'], 1)} | {fmt(r['fraction_read'], 3)} | {status} |"
        )
    return "\n".join(lines)


def targets_markdown(targets: list[dict]) -> str:
    return "\n".join(f"- **{t['verdict']}** {t['target']}: {t['detail']}" for t in targets)


def git_commit(explicit: str | None) -> str:
    if explicit:
        return explicit
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def versions() -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__, "python": platform.python_version()}


# --------------------------------------------------------------------------------------------- main


def estimate_row_s(row: Row, rows: list[Row], new_tokens: int, new_model: bool) -> float:
    """Seconds this row should take, from the rows of the same model measured so far (for --time-budget):
    warm-up (compile) + two prefills' worth of tokens + the decode steps."""
    done = [r for r in rows if r.model == row.model and r.status == "ok"]
    layers = model_dims(row.model)["layers"]
    tokens = row.batch * row.context
    per_token = max((r.prefill_ms / 1000 / (r.batch * r.context) for r in done if not r.synthetic), default=None)
    if per_token is None:  # ~40% of an H100's bf16 peak, plus attention
        per_token = 2 * param_count(row.model) / 3e14 * (1 + row.context / 16384)
    prefill = 0.0 if row.synthetic else per_token * tokens
    if is_compiled(row.mode):
        warm = max((r.warmup_s for r in done if r.compiled), default=40.0 * layers / 22)
        step = max((r.decode_ms_mean / 1000 for r in done if r.compiled and r.batch == row.batch), default=0.05)
    else:
        warm = max((r.warmup_s for r in done if not r.compiled), default=1.0)
        step = max((r.decode_ms_mean / 1000 for r in done if not r.compiled), default=0.1)
    return warm + 1.2 * prefill + new_tokens * step + (3.0 if new_model else 0.5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="default", choices=[*GRIDS, "all"],
                   help="named grid (each ~7 min on an H100; 'all' = the three, ~20 min with --time-budget 1300)")
    p.add_argument("--models", nargs="+", choices=[m for m in MODELS if m != "tiny"], help="default: the default grid's models")
    p.add_argument("--batches", nargs="+", type=int, help="with --contexts / --budgets: a full grid instead of the default one")
    p.add_argument("--contexts", nargs="+", type=int)
    p.add_argument("--budgets", nargs="+", type=int)
    p.add_argument("--modes", nargs="+", choices=MODES, help="rows of a custom grid (default: all but ts_fused_eager)")
    p.add_argument("--quick", action="store_true", help="target shape only: TinyLlama B=8 at 32K and within budget, B=4 memory")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU (or GPU), context 128, 4 new tokens")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per timed run (default 32; smoke 4)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=None, help="custom grid: prefill in chunks of N tokens (every row)")
    p.add_argument("--synthetic-context", action="store_true",
                   help="custom grid: fill each row's cache with random K/V instead of a prefill (decode speed only; see docstring)")
    p.add_argument("--dense-layers", type=int, default=None, help="tinyserve dense_layers (default 2; smoke 1)")
    p.add_argument("--no-stats", action="store_true", help="patch with collect_stats=False (fraction_read then n/a)")
    p.add_argument("--repeats", type=int, default=0,
                   help="timed generate() calls per row, the lowest median kept (default 0: 3 where batch*context <= 32768, else 1)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="CUDA: one more generate() per row under torch.profiler; device time per step by kernel (row.profile)")
    p.add_argument("--decode-peak", action="store_true", help="a second timed run per row for the decode-phase peak memory")
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds; rows after it are skipped (recorded)")
    p.add_argument("--device", default=None, help="default: cuda if available (smoke: cpu)")
    p.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD, else 'unknown')")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "e2e.json"))
    return p.parse_args(argv)


def build_rows(args) -> tuple[list[Row], dict]:
    n = args.new_tokens
    if args.smoke:
        rows = smoke_grid(n)
        return rows, dict(model="tiny", batch=2, context=128, budget=64, mem_batch=2, mem_context=128)
    tgt = dict(model="tinyllama", batch=8, context=32768, budget=2048, mem_batch=4, mem_context=32768)
    custom = args.batches or args.contexts or args.budgets or args.modes
    if custom:
        default_modes = ("hf_static", "ts_dense", "ts_sparse", "ts_split") if args.synthetic_context else [
            m for m in MODES if m not in ("ts_fused_eager", "ts_split")]
        modes = args.modes or list(default_modes)
        rows = []
        for model in args.models or ["tinyllama"]:
            for b in args.batches or [1]:
                for L in args.contexts or [8192]:
                    rows += rows_for(model, b, L, modes, args.budgets or [2048], chunk=args.prefill_chunk,
                                     synthetic=args.synthetic_context)
        budgets = args.budgets or [2048]
        tgt["budget"] = 2048 if 2048 in budgets else budgets[0]
        return dedupe(rows), tgt
    if args.synthetic_context:
        raise SystemExit("--synthetic-context needs a custom grid (--batches / --contexts / --budgets / --modes)")
    if args.quick:
        rows = quick_grid(n)
    elif args.grid == "all":
        rows = dedupe(default_grid(n) + models_grid(n) + sweep_grid(n))
    else:
        rows = GRIDS[args.grid](n)
    if args.models:
        rows = [r for r in rows if r.model in args.models]
    return rows, tgt


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.new_tokens is None:
        args.new_tokens = 4 if args.smoke else 32
    if args.dense_layers is None:
        args.dense_layers = 1 if args.smoke else 2
    if args.new_tokens < 3:
        raise SystemExit("--new-tokens must be >= 3")
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:
        pass
    import tinyserve_patch  # noqa: F401  (registers the attention implementation and the generate() hook)

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    rows, tgt = build_rows(args)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    total_gib = torch.cuda.get_device_properties(device).total_memory / GiB if cuda else None
    log(f"device={device_name} torch={torch.__version__} dtype={dtype} rows={len(rows)} new_tokens={args.new_tokens} "
        f"time_budget={args.time_budget:.0f}s")
    bandwidth = copy_bandwidth(device, GiB if cuda else 64 * 1024**2)
    log(f"copy bandwidth (read+write): {bandwidth / 1e12:.3f} TB/s")

    result = {
        "benchmark": "bench_e2e",
        "device": device_name,
        "device_type": device.type,
        "gpu_memory_gib": total_gib,
        "versions": versions(),
        "commit": git_commit(args.commit),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": str(dtype).replace("torch.", ""),
        "copy_bandwidth_Bps": bandwidth,
        "args": vars(args),
        "method": "see benchmarks/bench_e2e.py docstring: one timed generate() per row, CUDA events per step from a "
        "logits processor; decode_ms = median step; prefill_ms = time to first token's logits",
        "targets_spec": tgt,
        "rows": [],
        "targets": [],
    }

    def save():
        result["rows"] = [asdict(r) for r in rows]
        result["elapsed_s"] = time.perf_counter() - t_start
        out_path.write_text(json.dumps(result, indent=1))

    model, model_name = None, None
    max_positions = max(r.context for r in rows) + args.new_tokens + 64
    for i, row in enumerate(rows):
        elapsed = time.perf_counter() - t_start
        est_row = estimate_row_s(row, rows, args.new_tokens, model_name != row.model)
        if elapsed + 1.15 * est_row > args.time_budget:
            row.status = "skipped"
            row.reason = f"time budget {args.time_budget:.0f}s (elapsed {elapsed:.0f}s + estimated {est_row:.0f}s for this row)"
            log(f"row {i + 1}/{len(rows)} {row.describe()}: skipped ({row.reason})")
            save()
            continue
        row.est_gib = estimate_gib(row.model, row, args.new_tokens, 2 if cuda else 4)
        if cuda and row.est_gib > 0.92 * total_gib:
            row.status, row.reason = "skipped", f"estimated {row.est_gib:.1f} GiB > 92% of {total_gib:.1f} GiB"
            log(f"row {i + 1}/{len(rows)} {row.describe()}: skipped ({row.reason})")
            save()
            continue
        t_row = time.perf_counter()
        try:
            if model_name != row.model:
                if model is not None:
                    del model
                    model = None
                    gc.collect()
                    if cuda:
                        torch._dynamo.reset()
                        torch.cuda.empty_cache()
                model = build_model(row.model, device, dtype, max_positions)
                model_name = row.model
                with torch.no_grad():  # first-use costs (cuBLAS handles, kernel loading) outside the timed rows
                    model(torch.ones(1, 256, dtype=torch.long, device=device))
                log(f"built {MODELS[row.model]['label']} ({param_count(row.model) / 1e9:.2f}B params) in {time.perf_counter() - t_row:.1f}s")
            run_row(model, row, args, device, bandwidth)
        except Exception as exc:  # noqa: BLE001 - record and go on
            row.status = "error"
            row.reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            tb = traceback.format_exc().strip().splitlines()
            print("\n".join(tb[-6:]), flush=True)
            if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc):
                row.reason = "OOM: " + row.reason
            try:
                import tinyserve_patch as tp

                if model is not None and tp.is_patched(model):
                    model._tinyserve_state.last_cache = None
            except Exception:
                pass
        finally:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        row.row_s = time.perf_counter() - t_row
        if row.status == "ok":
            peak = f", peak {row.peak_gib:.2f} GiB" if row.peak_gib is not None else ""
            kv = f", KV read {row.fraction_read:.3f}" if row.fraction_read is not None else ""
            log(f"row {i + 1}/{len(rows)} {row.describe()}: prefill {row.prefill_ms:.1f} ms, decode {row.decode_ms:.3f} ms/step "
                f"(mean {row.decode_ms_mean:.3f}), {row.tokens_per_s:.1f} tok/s{peak}, {row.x_floor:.1f}x floor{kv}; "
                f"compiles warm-up/timed {row.compiles_warmup}/{row.compiles_timed}; row {row.row_s:.1f}s (warm-up {row.warmup_s:.1f}s)")
            if row.profile:
                prof = row.profile
                log(f"  profile: {prof['kernel_ms_per_step']:.3f} ms of kernels a step ({prof['kernels_per_step']:.0f} kernels): "
                    + ", ".join(f"{g} {ms:.3f}" for g, ms in prof["groups_ms_per_step"].items()))
                for k in prof["top"][:8]:
                    log(f"    {k['ms_per_step']:.4f} ms x{k['calls_per_step']:.0f}  {k['name'][:90]}")
        else:
            log(f"row {i + 1}/{len(rows)} {row.describe()}: {row.status.upper()} {row.reason} (row {row.row_s:.1f}s)")
        save()

    del model
    result["targets"] = evaluate_targets(rows, tgt)
    result["speedups"] = speedups(rows)
    save()
    table = markdown_table(rows)
    targets_md = targets_markdown(result["targets"])
    speedups_md = speedups_markdown(result["speedups"])
    md = (
        f"# End-to-end decode benchmark\n\n{device_name}, torch {result['versions']['torch']}, triton {result['versions']['triton']}, "
        f"transformers {result['versions']['transformers']}, commit {result['commit'][:12]}, {result['date']}; "
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; {args.new_tokens} new tokens; decode ms/step = median step.\n\n"
        f"{table}\n\n## Sparse against dense, same run\n\n{speedups_md}\n\n## Targets\n\n{targets_md}\n"
    )
    out_path.with_suffix(".md").write_text(md)
    print("\n== targets ==", flush=True)
    for t in result["targets"]:
        print(f"{t['verdict']:5} {t['target']}: {t['detail']}", flush=True)
    print("\n== sparse against dense ==\n" + speedups_md, flush=True)
    print(f"\n== results ({time.perf_counter() - t_start:.0f}s; JSON {out_path}, table {out_path.with_suffix('.md')}) ==\n", flush=True)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
