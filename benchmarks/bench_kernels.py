"""Benchmark of the sparse-decode Triton kernels against dense SDPA decode (GPU only).

    python benchmarks/bench_kernels.py [--quick] [--out kernels.json]

Shapes: TinyLlama (32 q / 4 kv heads, d 64) and Llama-3-8B (32 / 8, d 128); batch 1 and 8; 4K, 16K, 64K
and 128K cached tokens; token budgets 1024 / 2048 / 4096; page 16; bf16. Rows: dense SDPA decode
(``enable_gqa``), ``patch_model``'s dense decode step on CUDA (``dense_paged``:
``ops.dense_decode_attention``, the paged kernel walking every page of the row, no page list), each kernel alone (score, select, fused score+select, sparse attention), the default
pipeline (``total_default``: ``torch.ops.tinyserve.quest_decode`` as ``patch_model`` runs it, i.e. the split
chain or, where ``triton_chain.prefer_fused_chain`` picks it, the fused row-chained decode), and the two
sparse pipelines (split: score + select + attend; fused: score_select + attend), the split pipeline with
plain launches instead of programmatic dependent launches (``total_split_nopdl``, ``TINYSERVE_PDL=0``:
what the launch overlap gains on Hopper) and with the attention's other way of merging its splits
(``total_split_merge_inline`` or ``total_split_merge_kernel``, whichever is not
``triton_decode.DEFAULT_MERGE``: the evidence for that default); then the score kernel
and the split pipeline again over fp8 page metadata (``SparseConfig.page_meta_dtype="fp8_e4m3"``: half
the metadata bytes). Options add rows for a non-default plan, each alone and in the split chain:
``--select-ways`` / ``--select-finish`` (the selection's search), ``--merge-chunk`` (splits per tile of the attention's merge
kernel), ``--score-plan`` / ``--fp8-score-plan`` (score launch plans), ``--fp8-kv`` (an fp8 K/V cache).

Timing: ``triton.testing.do_bench`` (median, L2 flushed before each call) and, for every row, the same
calls captured in a CUDA graph (``do_bench_cudagraph``, no launch overhead); each call rotates through
enough copies of the cache that the bytes touched exceed twice the L2. The byte floor of a row is its
bytes over the measured device-to-device copy bandwidth (read + write bytes / time):

* dense: ``2 * B * Hkv * L * D * 2`` (+ q / out)
* sparse pipeline: metadata ``B * Hkv * P * 2 * D * 2`` + selected K/V ``2 * B * Hkv * budget * D * 2`` + q / out
* score: metadata + q + fp32 scores; select: fp32 scores + indices; fused: metadata + q + indices;
  attention: selected K/V + q + out + indices
* ``copy_meta``: a device copy of half the metadata (read + write: the bytes the score reads), the
  reference for the score at that size: what a plain memory-bound kernel reaches once launch and DRAM
  latency weigh on a small transfer

Prints a markdown table and the issue's targets (:func:`targets`), and writes JSON (device, versions,
commit, date, copy bandwidth, rows) to ``--out`` (default ``$OUT/kernels.json`` when ``$OUT`` is set, else
``benchmarks/results/kernels.json``) with the markdown report beside it (``.md``);
``--report RUN.json`` re-renders a recorded run's report on any machine.
Importable without CUDA; needs a GPU to run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = {"tinyllama": (32, 4, 64), "llama3-8b": (32, 8, 128)}
K = 1024
PAGE = 16
DTYPE = torch.bfloat16
MEM_LIMIT = 40 * 2**30  # bytes of cache copies per configuration (all rows together stay < 70 GB)


# ---------------------------------------------------------------------------------------------- helpers


def _versions() -> dict:
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # pragma: no cover - optional
            out[name] = None
    return out


def _commit() -> str | None:
    """``$GIT_COMMIT`` when set (a copied tree's git HEAD can be stale, as on the device machine), else git's HEAD."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return None


def _bench(fn, graph: bool, rep: int) -> float:
    import triton.testing

    if graph:  # the graph unrolls rep / t calls: a shorter window keeps capture time down
        return float(triton.testing.do_bench_cudagraph(fn, rep=max(10, rep // 3), return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=max(5, rep // 4), rep=rep, return_mode="median"))


def copy_bandwidth(rep: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    n = 2**30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), graph=False, rep=max(rep, 50))
    src = dst = None  # noqa: F841 (free the buffers)
    return 2 * n / (ms * 1e-3)


class Copies:
    """``n`` independent caches of one configuration (k, v, meta, its fp8 form meta8, q; with ``fp8_kv``
    also k8 / v8, the cache stored as float8_e4m3fn), rotated call by call."""

    def __init__(self, batch, hq, hkv, d, length, n, fp8_kv=False):
        from tinyserve_patch.ops.reference import meta_to_fp8, to_storage

        self.items = []
        for _ in range(n):
            k = torch.randn(batch, hkv, length, d, device="cuda", dtype=DTYPE)
            v = torch.randn(batch, hkv, length, d, device="cuda", dtype=DTYPE)
            paged = k.view(batch, hkv, length // PAGE, PAGE, d)
            meta = torch.stack([paged.amin(3), paged.amax(3)], dim=3).contiguous()
            q = torch.randn(batch, hq, d, device="cuda", dtype=DTYPE)
            self.items.append({"k": k, "v": v, "meta": meta, "meta8": meta_to_fp8(meta), "q": q})
            if fp8_kv:
                self.items[-1].update(k8=to_storage(k, torch.float8_e4m3fn), v8=to_storage(v, torch.float8_e4m3fn))
        self._it = itertools.cycle(range(n))

    def next(self) -> dict:
        return self.items[next(self._it)]


def without_pdl(fn):
    """``fn`` with every Triton launch a plain one (``TINYSERVE_PDL=0``): the same-run baseline of the
    programmatic-dependent-launch overlap (the setting is read at launch, so also while a graph is captured)."""

    def call():
        old = os.environ.get("TINYSERVE_PDL")
        os.environ["TINYSERVE_PDL"] = "0"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["TINYSERVE_PDL"]
            else:
                os.environ["TINYSERVE_PDL"] = old

    return call


def key_values(text: str):
    """``"a=1,b=x"`` -> ``("a=1", "a", "1"), ("b=x", "b", "x")``: the items of a ``KEY=VALUE,...`` option."""
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        yield item, key, value


def parse_options(text: str) -> dict:
    """``"num_splits=8,merge=inline,finish=32,attn_block_n=64"`` -> keyword arguments of the fused
    row-chained decode: integers where the value is one, the rest as strings; ``attn_<option>`` goes under
    ``attention_options`` (the attention launch), the other fused-kernel options under ``fused_options``."""
    chain_keys = {"num_splits", "merge"}
    out: dict = {}
    for _, key, value in key_values(text):
        val = int(value) if value.lstrip("-").isdigit() else value
        if key in chain_keys:
            out[key] = val
        elif key.startswith("attn_"):
            out.setdefault("attention_options", {})[key.removeprefix("attn_")] = val
        else:
            out.setdefault("fused_options", {})[key] = val
    return out


#: Options of a score launch plan (``--score-plan``) and their initials in row names.
SCORE_PLAN_KEYS = {"blocks_per_program": "p", "num_stages": "s", "num_warps": "w", "block_p": "b", "tma": "t", "pages_major": "m"}
#: Options of an attention launch plan (``--attention-plan``) and their initials in row names (after an ``a``).
ATTENTION_PLAN_KEYS = {"block_n": "n", "num_stages": "s", "num_warps": "w", "num_splits": "k"}
#: Integer options of the persistent decode (``--persistent``).
PERSISTENT_KEYS = dict.fromkeys(("lag", "programs", "num_splits", "blocks_per_program", "num_warps", "maxnreg", "block_n", "grids",
                                 "attention_programs", "attention_warps"), "")


def parse_plan(text: str, keys: dict = SCORE_PLAN_KEYS, what: str = "score") -> dict:
    """``"blocks_per_program=4,num_stages=4"`` -> keyword arguments of the launcher whose plan options are
    ``keys`` (integers; an unknown key or a non-integer value is an error naming the ``what`` plan)."""
    out = {}
    for item, key, value in key_values(text):
        if key not in keys or not value.isdigit():
            raise ValueError(f"{what} plan item {item!r}: expected one of {', '.join(keys)} = a positive integer")
        out[key] = int(value)
    return out


def plan_tag(text: str, keys: dict = SCORE_PLAN_KEYS) -> str:
    """Row-name suffix of a plan: ``"blocks_per_program=4,num_stages=4"`` -> ``"p4s4"`` (keys' initials)."""
    return "".join(f"{keys[k]}{v}" for k, v in parse_plan(text, keys).items())


def dense_decode(c: dict, scale: float) -> torch.Tensor:
    """The dense baseline: SDPA decode of ``c["q"]`` ``[B, Hq, D]`` over the whole cache ``c["k"]`` /
    ``c["v"]`` ``[B, Hkv, L, D]`` (``enable_gqa``), ``[B, Hq, 1, D]``."""
    return torch.nn.functional.scaled_dot_product_attention(c["q"][:, :, None, :], c["k"], c["v"], scale=scale, enable_gqa=True)


def _n_copies(touched: int, per_copy: int, l2: int) -> int:
    want = max(2, math.ceil(2 * l2 / max(1, touched)))
    return max(1, min(want, 64, MEM_LIMIT // max(1, per_copy)))


# ---------------------------------------------------------------------------------------------- checks


def correctness_check(chained: bool = False, fp8_kv: bool = False, persistent: bool = False) -> None:
    """Every kernel vs the reference on one small shape (aborts the benchmark on a mismatch); ``chained``:
    the row-chained decode against the split kernels too; ``fp8_kv``: the attention over an fp8 cache."""
    from tinyserve_patch.ops import dense_decode_attention
    from tinyserve_patch.ops import reference as ref
    from tinyserve_patch.ops.triton_decode import sparse_decode_attention_triton
    from tinyserve_patch.ops.triton_fused_select import score_and_select_triton
    from tinyserve_patch.ops.triton_score import page_scores_triton
    from tinyserve_patch.ops.triton_select import select_pages_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    b, hq, hkv, d, L = 2, 32, 8, 128, 4096
    k = torch.randn(b, hkv, L, d, device="cuda", generator=g).to(DTYPE)
    v = torch.randn(b, hkv, L, d, device="cuda", generator=g).to(DTYPE)
    q = torch.randn(b, hq, d, device="cuda", generator=g).to(DTYPE)
    meta = ref.build_meta(k, L - 7, PAGE)
    start = torch.tensor([0, 40], dtype=torch.int32, device="cuda")
    end = torch.tensor([L - 7, L - 300], dtype=torch.int32, device="cuda")
    n = 64
    s = page_scores_triton(q, meta, start, end, PAGE, "max")
    e = ref.page_scores(q, meta, start, end, PAGE, "max")
    fin = torch.isfinite(e)
    assert torch.equal(torch.isinf(s), torch.isinf(e)), "score: -inf pattern differs"
    assert torch.allclose(s[fin], e[fin], rtol=1e-5, atol=1e-3), "score: values differ"
    meta8 = ref.meta_to_fp8(meta)
    s8 = page_scores_triton(q, meta8, start, end, PAGE, "max")
    e8 = ref.page_scores(q, meta8, start, end, PAGE, "max")
    assert torch.allclose(s8[fin], e8[fin], rtol=1e-5, atol=1e-3), "score (fp8 metadata): values differ"
    assert (e8[fin] >= e[fin] - 1e-3).all(), "fp8 metadata must only loosen the bound"
    idx = select_pages_triton(s, start, end, PAGE, n, 1, 1)
    assert torch.equal(idx, ref.select_pages(s, start, end, PAGE, n, 1, 1)), "select differs"
    qi = torch.randint(-3, 4, q.shape, device="cuda", generator=g).to(DTYPE)
    mi = torch.randint(-3, 4, meta.shape, device="cuda", generator=g).to(DTYPE).sort(dim=3).values  # min <= max
    fused = score_and_select_triton(qi, mi, start, end, PAGE, n, 1, 1, "max")
    exp = ref.select_pages(ref.page_scores(qi, mi, start, end, PAGE, "max"), start, end, PAGE, n, 1, 1)
    assert torch.equal(fused, exp), "fused score+select differs"
    out = sparse_decode_attention_triton(q, k, v, idx, start, end, PAGE, d**-0.5, 0.0)
    expect = ref.sparse_decode_attention(q.float(), k.float(), v.float(), idx, start, end, PAGE, d**-0.5)
    err = ((out.float() - expect).norm() / expect.norm()).item()
    assert err < 1e-2, f"attention: relative error {err}"
    if fp8_kv:
        k8, v8 = ref.to_storage(k, torch.float8_e4m3fn), ref.to_storage(v, torch.float8_e4m3fn)
        out8 = sparse_decode_attention_triton(q, k8, v8, idx, start, end, PAGE, d**-0.5, 0.0)
        expect8 = ref.sparse_decode_attention(q.float(), k8, v8, idx, start, end, PAGE, d**-0.5)
        err8 = ((out8.float() - expect8).norm() / expect8.norm()).item()
        assert err8 < 1e-2, f"attention over an fp8 cache: relative error {err8}"
    if chained:
        from tinyserve_patch.ops.triton_chain import fused_chain_plan, quest_decode_chained_triton

        c_out, c_idx = quest_decode_chained_triton(q, k, v, meta, start, end, PAGE, n, 1, 1, "max", d**-0.5)
        assert torch.equal(c_idx, idx) and torch.equal(c_out, out), "row-chained decode differs from the split chain"
        f_idx = score_and_select_triton(q, meta, start, end, PAGE, n, 1, 1, "max")
        plan = fused_chain_plan(b * hkv, meta.shape[2], n, PAGE, d, q.device)
        f_out = sparse_decode_attention_triton(q, k, v, f_idx, start, end, PAGE, d**-0.5, num_splits=plan["num_splits"],
                                               merge=plan["merge"])
        c_out, c_idx = quest_decode_chained_triton(q, k, v, meta, start, end, PAGE, n, 1, 1, "max", d**-0.5, fused=True)
        assert torch.equal(c_idx, f_idx) and torch.equal(c_out, f_out), "fused row-chained decode differs from fused + attention"
    if persistent:
        from tinyserve_patch.ops.triton_chain import quest_decode_chained_triton
        from tinyserve_patch.ops.triton_persistent import persistent_plan, quest_decode_persistent_triton

        splits = persistent_plan(b * hkv, meta.shape[2], n, PAGE, d, q.device)["num_splits"]
        f_out, f_idx = quest_decode_chained_triton(q, k, v, meta, start, end, PAGE, n, 1, 1, "max", d**-0.5, fused=True,
                                                   merge="inline", num_splits=splits)
        p_out, p_idx = quest_decode_persistent_triton(q, k, v, meta, start, end, PAGE, n, 1, 1, "max", d**-0.5)
        assert torch.equal(p_idx, f_idx) and torch.equal(p_out, f_out), "persistent decode differs from the fused chain"
    from tinyserve_patch.ops.triton_chain import quest_decode_triton

    d_out, d_idx = quest_decode_triton(q, k, v, meta, start, end, PAGE, n, 1, 1, "max", d**-0.5)  # the default: split here
    assert torch.equal(d_idx, idx) and torch.equal(d_out, out), "quest_decode (the default path) differs from the split chain"
    every = torch.arange(L // PAGE, dtype=torch.int32, device="cuda").expand(b, hkv, L // PAGE)
    dense = dense_decode_attention(q, k, v, start, end, PAGE, d**-0.5)
    expect_dense = ref.sparse_decode_attention(q.float(), k.float(), v.float(), every, start, end, PAGE, d**-0.5)
    err_dense = ((dense.float() - expect_dense).norm() / expect_dense.norm()).item()
    assert err_dense < 1e-2, f"dense paged decode: relative error {err_dense}"
    print(f"correctness check passed (attention rel err {err:.2e})")


# ---------------------------------------------------------------------------------------------- benchmark


def run(args) -> dict:
    from tinyserve_patch.ops import dense_decode_attention
    from tinyserve_patch.ops.triton_decode import DEFAULT_MERGE, sparse_decode_attention_triton
    from tinyserve_patch.ops.triton_chain import quest_decode_chained_triton, quest_decode_triton
    from tinyserve_patch.ops.triton_fused_select import score_and_select_triton
    from tinyserve_patch.ops.triton_persistent import quest_decode_persistent_triton
    from tinyserve_patch.ops.triton_score import page_scores_triton
    from tinyserve_patch.ops.triton_select import select_pages_triton

    other_merge = "kernel" if DEFAULT_MERGE == "inline" else "inline"
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20)
    bw = copy_bandwidth(args.rep)
    print(f"device {props.name}: {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB, copy bandwidth {bw / 1e12:.2f} TB/s")

    torch.manual_seed(0)  # the same caches run to run: the selection's time depends on the scores
    rows = []
    t_start = time.time()
    for model, batch, length in itertools.product(args.models, args.batches, args.lengths):
        hq, hkv, d = MODELS[model]
        pages = length // PAGE
        kv_bytes = 2 * batch * hkv * length * d * 2
        meta_bytes = batch * hkv * pages * 2 * d * 2
        qo_bytes = 2 * batch * hq * d * 2
        min_touched = meta_bytes + 2 * batch * hkv * min(args.budgets) * d * 2
        n = _n_copies(min_touched, kv_bytes * (3 if args.fp8_kv else 2) // 2 + meta_bytes, l2)
        copies = Copies(batch, hq, hkv, d, length, n, args.fp8_kv)
        start = torch.zeros(batch, dtype=torch.int32, device="cuda")
        end = torch.full((batch,), length, dtype=torch.int32, device="cuda")
        scale = d**-0.5
        base = {"model": model, "batch": batch, "tokens": length, "q_heads": hq, "kv_heads": hkv, "head_dim": d,
                "page_size": PAGE, "copies": n}

        def add(kind, budget, nbytes, fn, dense_ms=None):
            rec = dict(base, kind=kind, budget=budget, bytes=nbytes, floor_ms=nbytes / bw * 1e3)
            for mode in ("eager", "graph") if args.graph else ("eager",):
                ms = _bench(fn, graph=mode == "graph", rep=args.rep)
                rec[f"{mode}_ms"] = ms
                rec[f"{mode}_pct_floor"] = 100.0 * rec["floor_ms"] / ms
                if dense_ms is not None:
                    rec[f"{mode}_speedup"] = dense_ms[mode] / ms
            rows.append(rec)
            return rec

        def dense():
            return dense_decode(copies.next(), scale)

        drec = add("dense_sdpa", length, kv_bytes + qo_bytes, dense)
        dense_ms = {m: drec[f"{m}_ms"] for m in ("eager", "graph") if f"{m}_ms" in drec}
        drec.update({f"{m}_speedup": 1.0 for m in dense_ms})

        def dense_paged():  # patch_model's dense decode step on CUDA: the paged kernel over every page
            c = copies.next()
            return dense_decode_attention(c["q"], c["k"], c["v"], start, end, PAGE, scale)

        add("dense_paged", length, kv_bytes + qo_bytes, dense_paged, dense_ms)
        half = copies.items[0]["meta"].numel() // 2
        meta_dst = torch.empty(half, dtype=DTYPE, device="cuda")

        def copy_meta():  # a plain device copy moving the score's bytes: half the metadata read, then written
            return meta_dst.copy_(copies.next()["meta"].view(-1)[:half])

        add("copy_meta", length, meta_bytes, copy_meta)
        meta_dst = None

        for budget in args.budgets:
            nsel = budget // PAGE
            sel_kv = 2 * batch * hkv * min(budget, length) * d * 2
            idx_bytes = batch * hkv * nsel * 4
            score_bytes = batch * hkv * pages * 4
            for c in copies.items:  # inputs of the kernels timed alone
                c["scores"] = page_scores_triton(c["q"], c["meta"], start, end, PAGE, "max")
                c["idx"] = select_pages_triton(c["scores"], start, end, PAGE, nsel, 1, 1)

            def scorer(key, **plan):  # the score kernel over c[key]: "meta" (model dtype) or "meta8" (fp8)
                def score():
                    c = copies.next()
                    return page_scores_triton(c["q"], c[key], start, end, PAGE, "max", **plan)

                return score

            def split_over(key, kv=("k", "v"), ways=None, finish=None, attention=None, **plan):
                # score (over c[key], launch plan) + select (ways, finish) + attend (over c[kv]; attention: its launch
                # options, e.g. merge, merge_chunk or an attention plan)
                def split_total():
                    c = copies.next()
                    s = page_scores_triton(c["q"], c[key], start, end, PAGE, "max", **plan)
                    i = select_pages_triton(s, start, end, PAGE, nsel, 1, 1, ways=ways, finish=finish)
                    return sparse_decode_attention_triton(c["q"], c[kv[0]], c[kv[1]], i, start, end, PAGE, scale, 0.0,
                                                          **(attention or {}))

                return split_total

            def select(ways=None, finish=None):
                c = copies.next()
                return select_pages_triton(c["scores"], start, end, PAGE, nsel, 1, 1, ways=ways, finish=finish)

            def fused():
                c = copies.next()
                return score_and_select_triton(c["q"], c["meta"], start, end, PAGE, nsel, 1, 1, "max")

            def attend(kv=("k", "v"), **launch):  # launch: merge_chunk or an attention plan
                c = copies.next()
                return sparse_decode_attention_triton(c["q"], c[kv[0]], c[kv[1]], c["idx"], start, end, PAGE, scale, 0.0,
                                                      **launch)

            def chained_total(fused=False, **options):
                c = copies.next()
                return quest_decode_chained_triton(c["q"], c["k"], c["v"], c["meta"], start, end, PAGE, nsel, 1, 1, "max", scale,
                                                   fused=fused, **options)

            def default_total():  # what patch_model runs: ops.quest_decode with fused="auto" (split or fused chain by shape)
                c = copies.next()
                return quest_decode_triton(c["q"], c["k"], c["v"], c["meta"], start, end, PAGE, nsel, 1, 1, "max", scale)

            def persistent_total(**options):
                c = copies.next()
                return quest_decode_persistent_triton(c["q"], c["k"], c["v"], c["meta"], start, end, PAGE, nsel, 1, 1, "max",
                                                      scale, **options)

            def fused_total():
                c = copies.next()
                i = score_and_select_triton(c["q"], c["meta"], start, end, PAGE, nsel, 1, 1, "max")
                return sparse_decode_attention_triton(c["q"], c["k"], c["v"], i, start, end, PAGE, scale, 0.0)

            total_bytes = meta_bytes + sel_kv + qo_bytes

            def plan_rows(key, suffix, **plan):  # the score over c[key] ("meta" / "meta8") with a launch plan, alone and in the chain
                mb = meta_bytes if key == "meta" else meta_bytes // 2
                c = copies.items[0]  # correctness first: the plan's scores are the default's at this shape (up to summation order)
                got = page_scores_triton(c["q"], c[key], start, end, PAGE, "max", **plan)
                want = page_scores_triton(c["q"], c[key], start, end, PAGE, "max")
                fin = torch.isfinite(want)
                assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"score{suffix}: other pages masked"
                assert torch.allclose(got[fin], want[fin], rtol=1e-5, atol=1e-3), f"score{suffix}: scores differ from the default's"
                add(f"score{suffix}", budget, mb + qo_bytes // 2 + score_bytes, scorer(key, **plan))
                add(f"total_split{suffix}", budget, total_bytes - (meta_bytes - mb), split_over(key, **plan), dense_ms)

            add("score", budget, meta_bytes + qo_bytes // 2 + score_bytes, scorer("meta"))
            add("select", budget, score_bytes + idx_bytes, select)
            add("fused_score_select", budget, meta_bytes + qo_bytes // 2 + idx_bytes, fused)
            add("sparse_attention", budget, sel_kv + qo_bytes + idx_bytes, attend, dense_ms)
            add("total_default", budget, total_bytes, default_total, dense_ms)
            add("total_split", budget, total_bytes, split_over("meta"), dense_ms)
            add("total_split_nopdl", budget, total_bytes, without_pdl(split_over("meta")), dense_ms)
            add(f"total_split_merge_{other_merge}", budget, total_bytes, split_over("meta", attention={"merge": other_merge}), dense_ms)
            add("total_fused", budget, total_bytes, fused_total, dense_ms)
            if args.chained:
                add("total_chained", budget, total_bytes, chained_total, dense_ms)
                add("total_chained_fused", budget, total_bytes, lambda: chained_total(fused=True), dense_ms)
                for text in args.fused_chain:  # the fused row-chained decode with other launch options
                    opts = parse_options(text)
                    add(f"total_chained_fused_{text.replace('=', '').replace(',', '_')}", budget, total_bytes,
                        lambda opts=opts: chained_total(fused=True, **opts), dense_ms)
            if args.persistent is not None:  # the persistent decode, by default and with each set of options
                for text in ["", *args.persistent]:
                    opts = {key: int(value) for _, key, value in key_values(text)}
                    add("total_persistent" + "".join(f"_{k}{v}" for k, v in opts.items()), budget, total_bytes,
                        lambda opts=opts: persistent_total(**opts), dense_ms)
            plan_rows("meta8", "_fp8meta")  # the default plan over fp8 metadata
            for text in args.score_plan:
                plan_rows("meta", "_" + plan_tag(text), **parse_plan(text))
            for text in args.attention_plan:  # the attention with another launch plan, alone and in the split chain
                plan, tag = parse_plan(text, ATTENTION_PLAN_KEYS), "_a" + plan_tag(text, ATTENTION_PLAN_KEYS)
                add(f"sparse_attention{tag}", budget, sel_kv + qo_bytes + idx_bytes, lambda plan=plan: attend(**plan), dense_ms)
                add(f"total_split{tag}", budget, total_bytes, split_over("meta", attention=plan), dense_ms)
            if args.fp8_score_plan:
                warps, stages = args.fp8_score_plan
                plan_rows("meta8", f"_fp8meta_w{warps}s{stages}", num_warps=warps, num_stages=stages)
            def search_rows(suffix, **search):  # the selection with another search, alone and in the chain
                add(f"select{suffix}", budget, score_bytes + idx_bytes, lambda: select(**search))
                add(f"total_split{suffix}", budget, total_bytes, split_over("meta", **search), dense_ms)

            for ways in args.select_ways:  # thresholds per pass (0: the narrowing search)
                search_rows(f"_ways{ways}", ways=ways)
            for finish in args.select_finish:  # stopping at this many keys and ranking them
                search_rows(f"_finish{finish}", finish=finish)
            for chunk in args.merge_chunk:  # the merge kernel reading this many splits per tile
                add(f"sparse_attention_chunk{chunk}", budget, sel_kv + qo_bytes + idx_bytes,
                    lambda chunk=chunk: attend(merge_chunk=chunk), dense_ms)
                add(f"total_split_chunk{chunk}", budget, total_bytes, split_over("meta", attention={"merge_chunk": chunk}), dense_ms)
            if args.fp8_kv:  # K/V stored as float8_e4m3fn (kv_cache_dtype="fp8_e4m3"): half the page bytes
                fp8 = ("k8", "v8")
                add("sparse_attention_fp8kv", budget, sel_kv // 2 + qo_bytes + idx_bytes, lambda: attend(fp8), dense_ms)
                add("total_split_fp8kv", budget, total_bytes - sel_kv // 2, split_over("meta", kv=fp8), dense_ms)
        copies = None  # free this configuration's caches
        torch.cuda.empty_cache()
        print(f"  {model} batch {batch} {length // K}K done ({time.time() - t_start:.0f} s)", flush=True)
    return {"copy_bandwidth_Bps": bw, "l2_bytes": l2, "rows": rows}


def markdown(rows: list[dict], graph: bool) -> str:
    cols = ["model", "B", "tokens", "budget", "kind", "ms", "floor ms", "% floor", "x dense"]
    if graph:
        cols += ["graph ms", "graph % floor", "graph x dense"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["model"], str(r["batch"]), f"{r['tokens'] // K}K", "-" if r["kind"] in ("dense_sdpa", "dense_paged", "copy_meta") else str(r["budget"]),
                 r["kind"], f"{r['eager_ms']:.4f}", f"{r['floor_ms']:.4f}", f"{r['eager_pct_floor']:.0f}%",
                 f"{r['eager_speedup']:.2f}" if "eager_speedup" in r else "-"]
        if graph:
            cells += [f"{r['graph_ms']:.4f}", f"{r['graph_pct_floor']:.0f}%",
                      f"{r['graph_speedup']:.2f}" if "graph_speedup" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The decode chains judged by :func:`targets` (rows of these kinds, where the run has them).
CHAINS = ("total_default", "total_split", "total_chained", "total_chained_fused", "total_persistent")


def targets(rows: list[dict]) -> list[str]:
    """The issue's kernel targets, judged on the CUDA-graph timings of ``rows`` (one run): ``PASS``/``FAIL``
    lines, ``N/A`` where the run lacks the shape. Speed-ups are against the same run's dense SDPA.

    * Llama-3-8B, batch 8, 64K tokens, budget 2048: each chain of :data:`CHAINS` >= 8x dense (also shown:
      fp8 metadata)
    * batch 1, 16K tokens: each chain no slower than dense (every model and budget of the run)
    * the score kernel at 64K+ tokens: >= 70% of its byte floor (every model, batch and length of the run)
    """

    def find(model, batch, tokens, kind, budget=None):
        return [r for r in rows if r["model"] == model and r["batch"] == batch and r["tokens"] == tokens
                and r["kind"] == kind and (budget is None or r["budget"] == budget) and "graph_ms" in r]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    out = []
    for chain in CHAINS:
        name = chain.removeprefix("total_")
        big = find("llama3-8b", 8, 64 * K, chain, 2048)
        if big:
            r = big[0]
            line = f"{verdict(r['graph_speedup'] >= 8)}  llama3-8b B=8 64K budget 2048: {name} >= 8x dense: {r['graph_speedup']:.2f}x"
            fp8 = find("llama3-8b", 8, 64 * K, f"{chain}_fp8meta", 2048)
            if fp8:
                line += f" (fp8 page metadata: {fp8[0]['graph_speedup']:.2f}x)"
            out.append(line)
        elif chain == "total_split":
            out.append("N/A   llama3-8b B=8 64K budget 2048: not in this run")
        small = sorted((r for r in rows if r["batch"] == 1 and r["tokens"] == 16 * K and r["kind"] == chain and "graph_ms" in r),
                       key=lambda r: (r["model"], r["budget"]))
        for r in small:
            out.append(f"{verdict(r['graph_speedup'] >= 1)}  {r['model']} B=1 16K budget {r['budget']}: {name} no slower than dense: "
                       f"{r['graph_speedup']:.2f}x ({r['graph_ms'] * 1e3:.1f} vs {r['graph_ms'] * r['graph_speedup'] * 1e3:.1f} us)")
        if not small and chain == "total_split":
            out.append("N/A   B=1 16K: not in this run")
    seen = set()
    for r in rows:
        key = (r["model"], r["batch"], r["tokens"])
        if r["kind"] != "score" or r["tokens"] < 64 * K or key in seen or "graph_ms" not in r:
            continue
        seen.add(key)
        worst = min(x["graph_pct_floor"] for x in find(*key, "score"))
        line = f"{verdict(worst >= 70)}  {r['model']} B={r['batch']} {r['tokens'] // K}K: score >= 70% of its byte floor: {worst:.1f}%"
        copy = find(*key, "copy_meta")
        if copy:  # the reference at this size: a device copy (its bytes moved, read + write, and % of floor)
            line += f" (a device copy moving {copy[0]['bytes'] / 1e6:.1f} MB: {copy[0]['graph_pct_floor']:.1f}%)"
        out.append(line)
    if not seen:
        out.append("N/A   score at 64K+: not in this run")
    return out


def render(doc: dict) -> str:
    """The markdown report of one run's JSON: header (device, versions, commit, date), targets, table."""
    head = (f"# Kernel benchmark, {doc['device']}\n\n{doc['versions']}, commit {doc['commit']}, {doc['date']}; "
            f"copy bandwidth {doc['copy_bandwidth_Bps'] / 1e12:.2f} TB/s. Command: `python benchmarks/bench_kernels.py` with "
            f"{doc.get('args', {})}. `total_split_nopdl`: the split pipeline with plain launches (`TINYSERVE_PDL=0`); "
            "`total_split_merge_*`: with the attention's non-default merge of its splits; same run.\n\n")
    lines = targets(doc["rows"])
    return head + "## Targets (CUDA graphs)\n\n```\n" + "\n".join(lines) + "\n```\n\n" + markdown(doc["rows"], True) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few shapes, short timing (a smoke run)")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/kernels.json or benchmarks/results/kernels.json)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--lengths", nargs="+", type=int, default=[4 * K, 16 * K, 64 * K, 128 * K])
    p.add_argument("--budgets", nargs="+", type=int, default=[1024, 2048, 4096])
    p.add_argument("--rep", type=int, default=60, help="ms of timed repetitions per measurement")
    p.add_argument("--no-graph", dest="graph", action="store_false", help="skip the CUDA-graph timings")
    p.add_argument("--chained", action="store_true",
                   help="also time the row-chained decode (ops/triton_chain.py) as total_chained, and with the fused score + "
                        "select kernel as total_chained_fused; run its GPU test "
                        "first: a wrong wait hangs instead of failing")
    p.add_argument("--fused-chain", nargs="+", default=[], metavar="KEY=VALUE,...",
                   help="with --chained, also time the fused row-chained decode with these options, one row each: "
                        "num_splits, merge, any option of the fused launch (num_warps, maxnreg, blocks_per_program, "
                        "finish, ways, num_stages) or of the attention's as attn_<option> (attn_block_n, attn_num_stages, "
                        "attn_num_warps), e.g. blocks_per_program=2,finish=32 or attn_block_n=64,attn_num_stages=3")
    p.add_argument("--persistent", nargs="*", default=None, metavar="KEY=VALUE,...",
                   help="also time the persistent decode (ops/triton_persistent.py) as total_persistent, and with each set "
                        "of integer options (lag, programs, num_splits, blocks_per_program, num_warps, maxnreg, block_n) as "
                        "total_persistent_<options>, e.g. lag=16 lag=32,programs=264")
    p.add_argument("--score-plan", nargs="+", default=[], metavar="KEY=VALUE,...",
                   help="also time the score with this launch plan (blocks_per_program, num_stages, num_warps, block_p; "
                        "tma=0/1 forces the TMA read off/on), alone and in the split chain, one pair of rows each "
                        "(score_<plan>, total_split_<plan>), e.g. blocks_per_program=4,num_stages=4 or tma=0")
    p.add_argument("--attention-plan", nargs="+", default=[], metavar="KEY=VALUE,...",
                   help="also time the attention with this launch plan (block_n, num_stages, num_warps, num_splits), "
                        "alone and in the split chain, one pair of rows each (sparse_attention_a<plan>, "
                        "total_split_a<plan>), e.g. block_n=64,num_stages=3")
    p.add_argument("--fp8-score-plan", nargs=2, type=int, metavar=("WARPS", "STAGES"),
                   help="also time the fp8-metadata score with this launch plan, alone and in the split chain")
    p.add_argument("--fp8-kv", action="store_true",
                   help="also time the attention and the split chain over an fp8 K/V cache (sparse_attention_fp8kv, "
                        "total_split_fp8kv)")
    p.add_argument("--select-ways", nargs="+", type=int, default=[], metavar="WAYS",
                   help="also time the selection with this search (thresholds per pass; 0: narrowing), alone and in "
                        "the split chain (select_waysW, total_split_waysW)")
    p.add_argument("--select-finish", nargs="+", type=int, default=[], metavar="KEYS",
                   help="also time the selection whose search ranks its bracket directly once it holds this many keys "
                        "(0: never), alone and in the split chain (select_finishN, total_split_finishN)")
    p.add_argument("--merge-chunk", nargs="+", type=int, default=[], metavar="SPLITS",
                   help="also time the attention whose merge kernel reads this many splits per tile, alone and in the "
                        "split chain (sparse_attention_chunkN, total_split_chunkN)")
    p.add_argument("--report", metavar="JSON", help="no run: print the targets and write JSON.md next to a recorded run (CPU)")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.lengths, args.budgets, args.rep = ["llama3-8b"], [1, 8], [16 * K, 64 * K], [2048], 25
    try:
        for text in args.score_plan:
            parse_plan(text)
        for text in args.attention_plan:
            parse_plan(text, ATTENTION_PLAN_KEYS, "attention")
        for text in args.persistent or []:
            parse_plan(text, PERSISTENT_KEYS, "persistent")
    except ValueError as e:
        p.error(str(e))
    for b in args.budgets:
        if b % PAGE:
            p.error(f"budget {b} is not a multiple of the page size {PAGE}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        doc = json.loads(Path(args.report).read_text())
        report = render(doc)
        Path(args.report).with_suffix(".md").write_text(report)
        print("\n".join(targets(doc["rows"])))
        return 0
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "kernels.json" if os.environ.get("OUT") else ROOT / "benchmarks/results/kernels.json")
    t0 = time.time()
    correctness_check(args.chained, args.fp8_kv, args.persistent is not None)
    result = run(args)
    table = markdown(result["rows"], args.graph)
    print(table)
    print("\n".join(targets(result["rows"])))
    doc = {
        "device": torch.cuda.get_device_name(0),
        "versions": _versions(),
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "dtype": str(DTYPE),
        "seconds": round(time.time() - t0, 1),
        **result,
        "markdown": table,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(render(doc))
    print(f"wrote {out} ({doc['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
