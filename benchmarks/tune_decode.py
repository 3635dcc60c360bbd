"""Launch-parameter sweep of the attention, score and selection kernels (GPU only).

    python benchmarks/tune_decode.py [--kernels attention score select] [--out tune.json]

For each shape (model, batch, tokens, budget) it times ``sparse_decode_attention_triton`` under CUDA
graphs (``do_bench_cudagraph``, median, caches rotated beyond the L2 as in ``bench_kernels.py``) over
``num_splits`` x ``block_n`` x ``num_warps`` x ``num_stages`` x ``merge`` (second kernel or inline;
``attention_fp8kv`` over the cache stored as fp8; ``dense``: its dense mode, every page of the row and
no page list, as ``patch_model``'s dense decode steps run it),
``page_scores_triton`` over ``blocks_per_program`` x ``block_p`` x ``num_warps`` x ``num_stages``
(``score``; ``score_fp8meta`` over fp8 page metadata), ``select_pages_triton`` over ``num_warps`` x
``ways`` (thresholds per search pass), and ``score_and_select_triton`` (``fused``) over
``blocks_per_program`` x ``num_warps`` x ``ways``; every configuration's output is first checked against
the default launch (attention: allclose in fp32; score: allclose; selection: identical indices), and
dense SDPA decode on the same caches is timed as the run's baseline. Prints the best configurations per
shape beside the default and the byte floor, and writes JSON (device, versions, commit, rows). The defaults in
``ops/triton_decode.py`` / ``ops/_triton_common.py`` are chosen from this sweep.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_kernels import MODELS, PAGE, Copies, _bench, _commit, _n_copies, _versions, copy_bandwidth  # noqa: E402

SHAPES = [("llama3-8b", 8, 64 * 1024, 2048), ("llama3-8b", 1, 16 * 1024, 2048), ("tinyllama", 1, 16 * 1024, 2048),
          ("tinyllama", 8, 32 * 1024, 2048), ("tinyllama", 1, 16 * 1024, 4096), ("llama3-8b", 1, 64 * 1024, 2048),
          ("tinyllama", 1, 64 * 1024, 2048)]


def parse_shape(text: str) -> tuple[str, int, int, int]:
    """``"llama3-8b:8:65536:2048"`` -> ``("llama3-8b", 8, 65536, 2048)`` (model, batch, tokens, budget)."""
    model, batch, tokens, budget = text.split(":")
    if model not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {model!r}; known: {sorted(MODELS)}")
    return model, int(batch), int(tokens), int(budget)


def sweep(shape, bw: float, l2: int, rep: int, kernels, full_attention: bool = True) -> list[dict]:
    from tinyserve_patch.ops.triton_decode import sparse_decode_attention_triton
    from tinyserve_patch.ops.triton_fused_select import score_and_select_triton
    from tinyserve_patch.ops.triton_score import page_scores_triton
    from tinyserve_patch.ops.triton_select import select_pages_triton

    torch.manual_seed(0)  # the same caches run to run: the selection's time depends on the scores
    model, batch, length, budget = shape
    hq, hkv, d = MODELS[model]
    nsel = budget // PAGE
    kv_bytes = 2 * batch * hkv * length * d * 2
    sel_bytes = 2 * batch * hkv * budget * d * 2 + 2 * batch * hq * d * 2 + batch * hkv * nsel * 4
    fp8_kv = "attention_fp8kv" in kernels  # also the cache stored as float8_e4m3fn (kv_cache_dtype="fp8_e4m3")
    copies = Copies(batch, hq, hkv, d, length, _n_copies(sel_bytes, kv_bytes * (3 if fp8_kv else 2) // 2, l2), fp8_kv)
    start = torch.zeros(batch, dtype=torch.int32, device="cuda")
    end = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    for c in copies.items:
        c["scores"] = page_scores_triton(c["q"], c["meta"], start, end, PAGE, "max")
        c["idx"] = select_pages_triton(c["scores"], start, end, PAGE, nsel, 1, 1)
    base = {"model": model, "batch": batch, "tokens": length, "budget": budget}

    def dense():  # the baseline of this run: dense SDPA decode over the whole cache
        c = copies.next()
        return torch.nn.functional.scaled_dot_product_attention(c["q"][:, :, None, :], c["k"], c["v"], scale=d**-0.5, enable_gqa=True)

    rows = [dict(base, kernel="dense_sdpa", default=True, ok=True, graph_ms=_bench(dense, graph=True, rep=rep),
                 floor_ms=(kv_bytes + 2 * batch * hq * d * 2) / bw * 1e3)]
    c0 = copies.items[0]
    splits_grid = [None, 2, 4, 8, 16, 32] if batch * hkv >= 32 else [None, 4, 8, 16, 32, 64]
    # (the 2026-11-23 H100 sweep over warps 2/4/8 and stages 2/3/4 found 4 warps, 2 stages: kept narrow)
    attention_grid = [{}] + [dict(num_splits=s, merge=m) for s, m in itertools.product(splits_grid, ("kernel", "inline"))]
    if full_attention:
        attention_grid += [dict(num_splits=s, block_n=n, num_warps=w, num_stages=st, merge=m) for s, n, w, st, m in
                           itertools.product(splits_grid, (64, 128), (4, 8), (2, 3), ("kernel", "inline"))]
    # the fp8 cache: its own block / warps / stages (its upcast changes the register budget), default merge
    fp8_grid = [{}] + [dict(num_splits=s, block_n=n, num_warps=w, num_stages=st) for s, n, w, st in
                       itertools.product(splits_grid[:4], (64, 128), (4, 8), (2, 3))]
    # attention over the model-dtype cache and over its fp8 form (half the page bytes)
    fp8_sel = 2 * batch * hkv * budget * d  # the selected pages' bytes saved by the fp8 cache
    for kernel, kv, nbytes, grid in (("attention", ("k", "v"), sel_bytes, attention_grid),
                                     ("attention_fp8kv", ("k8", "v8"), sel_bytes - fp8_sel, fp8_grid)):
        if kernel not in kernels:
            continue
        want = sparse_decode_attention_triton(c0["q"], c0[kv[0]], c0[kv[1]], c0["idx"], start, end, PAGE, d**-0.5).float()
        for kw in grid:
            try:
                got = sparse_decode_attention_triton(c0["q"], c0[kv[0]], c0[kv[1]], c0["idx"], start, end, PAGE, d**-0.5, **kw)
            except Exception as e:  # out of shared memory / registers: not a candidate
                rows.append(dict(base, kernel=kernel, **kw, default=not kw, error=type(e).__name__))
                continue
            ok = torch.allclose(got.float(), want, atol=2e-2, rtol=2e-2)

            def fn(kw=kw, kv=kv):
                c = copies.next()
                return sparse_decode_attention_triton(c["q"], c[kv[0]], c[kv[1]], c["idx"], start, end, PAGE, d**-0.5, **kw)

            ms = _bench(fn, graph=True, rep=rep)
            rows.append(dict(base, kernel=kernel, **kw, default=not kw, ok=ok, graph_ms=ms, floor_ms=nbytes / bw * 1e3))
    if "dense" in kernels:  # the dense decode (patch_model's dense steps): no page list, every page of the row
        rows += dense_sweep(copies, start, end, base, kv_bytes + 2 * batch * hq * d * 2, bw, rep)
    meta_bytes = batch * hkv * (length // PAGE) * 2 * d * 2
    score_grid = [{}] + [dict(blocks_per_program=p, block_p=n, num_warps=w, num_stages=st) for p, n, w, st in
                         itertools.product((None, 1, 2, 4, 8, 16), (64, 128, 256), (4, 8), (2, 3, 4))]
    # score over the model-dtype metadata and over its fp8 form (page_meta_dtype="fp8_e4m3": half the bytes)
    for kernel, key, nbytes in (("score", "meta", meta_bytes), ("score_fp8meta", "meta8", meta_bytes // 2)):
        if kernel not in kernels:
            continue
        want_scores = page_scores_triton(c0["q"], c0[key], start, end, PAGE, "max")
        for kw in score_grid:
            try:
                got = page_scores_triton(c0["q"], c0[key], start, end, PAGE, "max", **kw)
            except Exception as e:  # out of shared memory: not a candidate
                rows.append(dict(base, kernel=kernel, **kw, default=not kw, error=type(e).__name__))
                continue
            ok = bool(torch.equal(torch.isinf(got), torch.isinf(want_scores))) and torch.allclose(got, want_scores, rtol=1e-5, atol=1e-3)

            def fsc(kw=kw, key=key):
                c = copies.next()
                return page_scores_triton(c["q"], c[key], start, end, PAGE, "max", **kw)

            rows.append(dict(base, kernel=kernel, **kw, default=not kw, ok=ok, graph_ms=_bench(fsc, graph=True, rep=rep),
                             floor_ms=nbytes / bw * 1e3))
    want_idx = c0["idx"]
    select_grid = [{}] + [dict(num_warps=w, ways=k) for w, k in itertools.product((1, 2, 4, 8, 16), (0, 1, 2, 3, 4))]
    select_grid += [dict(ways=2, finish=f) for f in (0, 16, 32, 64, 128)]  # the search ranking its last keys
    for kw in select_grid if "select" in kernels else ():
        got = select_pages_triton(c0["scores"], start, end, PAGE, nsel, 1, 1, **kw)

        def fs(kw=kw):
            c = copies.next()
            return select_pages_triton(c["scores"], start, end, PAGE, nsel, 1, 1, **kw)

        rows.append(dict(base, kernel="select", **kw, default=not kw, ok=bool(torch.equal(got, want_idx)),
                         graph_ms=_bench(fs, graph=True, rep=rep)))
    # fused score + select: the same pages as the split pair (random bf16 data: exact up to score ulps)
    fused_grid = [{}] + [dict(blocks_per_program=p, num_warps=w, ways=k) for p, w, k in
                         itertools.product((1, 2, 4, 8), (4, 8), (1, 2))]
    for kw in fused_grid if "fused" in kernels else ():
        got = score_and_select_triton(c0["q"], c0["meta"], start, end, PAGE, nsel, 1, 1, "max", **kw)

        def ff(kw=kw):
            c = copies.next()
            return score_and_select_triton(c["q"], c["meta"], start, end, PAGE, nsel, 1, 1, "max", **kw)

        rows.append(dict(base, kernel="fused", **kw, default=not kw, ok=bool(torch.equal(got, want_idx)),
                         graph_ms=_bench(ff, graph=True, rep=rep), floor_ms=meta_bytes / bw * 1e3))
    return rows


def dense_sweep(copies, start, end, base: dict, nbytes: int, bw: float, rep: int) -> list[dict]:
    """The dense mode of the attention kernel (``indices=None``, every page of each row) over ``num_splits``
    (1 / 2 / 3 / 4 / 6 programs per SM's worth of rows) x ``block_n`` x ``num_warps`` x ``num_stages``
    (merge kernel), and the inline merge at the default block; checked against the default launch."""
    from tinyserve_patch.ops._triton_common import sm_count
    from tinyserve_patch.ops.triton_decode import sparse_decode_attention_triton

    c0 = copies.items[0]
    b, hkv, cap, d = c0["k"].shape
    slots = cap // PAGE
    sms = sm_count(c0["q"].device)

    def run(c, **kw):
        return sparse_decode_attention_triton(c["q"], c["k"], c["v"], None, start, end, PAGE, d**-0.5, slots=slots, **kw)

    want = run(c0).float()
    splits = sorted({-(-m * sms // (b * hkv)) for m in (1, 2, 3, 4, 6)})
    grid = [{}] + [dict(num_splits=s, block_n=n, num_warps=w, num_stages=st) for s, n, w, st in
                   itertools.product(splits, (64, 128), (4, 8), (2, 3))]
    grid += [dict(num_splits=s, merge="inline") for s in splits]
    rows = []
    for kw in grid:
        try:
            got = run(c0, **kw)
        except Exception as e:  # out of shared memory / registers: not a candidate
            rows.append(dict(base, kernel="dense", **kw, default=not kw, error=type(e).__name__))
            continue
        ms = _bench(lambda kw=kw: run(copies.next(), **kw), graph=True, rep=rep)
        rows.append(dict(base, kernel="dense", **kw, default=not kw, ok=torch.allclose(got.float(), want, atol=2e-2, rtol=2e-2),
                         graph_ms=ms, floor_ms=nbytes / bw * 1e3))
    return rows


def summary(rows: list[dict]) -> str:
    lines = []
    for key, group in itertools.groupby(rows, key=lambda r: (r["model"], r["batch"], r["tokens"], r["budget"], r["kernel"])):
        group = [r for r in group if "graph_ms" in r]
        default = next(r for r in group if r["default"])
        good = sorted((r for r in group if r["ok"]), key=lambda r: r["graph_ms"])
        bad = [r for r in group if not r["ok"]]
        lines.append(f"{key}: default {default['graph_ms'] * 1e3:.1f} us; {len(bad)} configs mismatched")
        for r in good[:6]:
            cfg = {k: r.get(k) for k in ("num_splits", "block_n", "blocks_per_program", "block_p", "num_warps", "num_stages", "merge", "ways", "finish") if k in r}
            floor = f" ({100 * r['floor_ms'] / r['graph_ms']:.0f}% floor)" if "floor_ms" in r else ""
            lines.append(f"   {r['graph_ms'] * 1e3:7.1f} us{floor} {cfg}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--rep", type=int, default=20)
    p.add_argument("--kernels", nargs="+", default=["attention", "score", "select"],
                   choices=["attention", "attention_fp8kv", "dense", "score", "score_fp8meta", "select", "fused"])
    p.add_argument("--attention-defaults", action="store_true",
                   help="attention: the default block / warps / stages only, over num_splits x merge")
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                   help="model:batch:tokens:budget shapes (default: all of SHAPES, most important first)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(os.environ.get("OUT", ROOT / "benchmarks/results")) / "tune_decode.json"
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20)
    bw = copy_bandwidth(args.rep)
    t0 = time.time()
    rows = []
    out.parent.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes or SHAPES:  # most important first; the JSON is rewritten after each shape (a timeout keeps it)
        rows += sweep(shape, bw, l2, args.rep, args.kernels, not args.attention_defaults)
        torch.cuda.empty_cache()
        print(f"{shape} done ({time.time() - t0:.0f} s)", flush=True)
        text = summary(rows)
        doc = {"device": torch.cuda.get_device_name(0), "versions": _versions(), "commit": _commit(),
               "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "copy_bandwidth_Bps": bw,
               "seconds": round(time.time() - t0, 1), "rows": rows, "summary": text}
        out.write_text(json.dumps(doc, indent=1))
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
