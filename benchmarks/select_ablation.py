"""Where the selection kernel's time goes (GPU only): the kernel cut after each of its parts.

    python benchmarks/select_ablation.py [--out select_ablation.json]

The selection (``ops/triton_select.py``) is one program per (row, KV head) and is latency-bound: ~8 us
at 4096 pages on an H100 / H200 while its bytes take well under 1 us. This times, under CUDA graphs, the
same program stopped after each part of :func:`_triton_common.select_from_scores`:

* ``load``: the scores row loaded, one reduction (the launch, the load and one barrier round);
* ``keys``: + :func:`selection_keys` (validity, forced pages, int keys, one reduction for k and the
  bracket);
* ``search``: + :func:`kth_largest_key` (the threshold search);
* ``full``: + :func:`write_selection` (the scan that compacts the kept pages, the stores): the kernel.

Also counts the search passes on the same scores (a Python mirror of ``kth_largest_key``), so
``(search - keys) / passes`` is the cost of one pass. Scores come from the score kernel over random
bf16 metadata, as in ``bench_kernels.py``. Writes JSON (device, versions, commit, rows).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_kernels import MODELS, PAGE, _bench, _commit, _versions  # noqa: E402
from tinyserve_patch.ops._triton_common import (  # noqa: E402
    SELECT_WAYS, kth_largest_key, select_from_scores, select_num_warps, selection_keys,
)

PARTS = ("load", "keys", "search", "full")
SHAPES = [("llama3-8b", 8, 64 * 1024, 2048), ("tinyllama", 1, 16 * 1024, 4096), ("llama3-8b", 1, 16 * 1024, 2048)]


@triton.jit
def _cut_kernel(scores_ptr, start_ptr, end_ptr, out_ptr, aux_ptr, num_pages, num_select, kv_heads, page_size, sink,
                recent, BLOCK: tl.constexpr, WAYS: tl.constexpr, PART: tl.constexpr, FINISH: tl.constexpr = 0):
    bh = tl.program_id(0)
    b = bh // kv_heads
    start = tl.load(start_ptr + b).to(tl.int32)
    end = tl.load(end_ptr + b).to(tl.int32)
    offs = tl.arange(0, BLOCK)
    scores = tl.load(scores_ptr + bh.to(tl.int64) * num_pages + offs, mask=offs < num_pages, other=float("-inf"))
    out = out_ptr + bh.to(tl.int64) * num_select
    if PART == 0:
        tl.store(aux_ptr + bh, tl.max(scores, axis=0).to(tl.int32, bitcast=True))
    elif PART == 1:
        key, k, lo, hi, above, n_lo = selection_keys(scores, offs, num_pages, start, end, num_select, page_size, sink, recent)
        tl.store(aux_ptr + bh, k ^ lo ^ hi ^ above ^ n_lo)
    elif PART == 2:
        key, k, lo, hi, above, n_lo = selection_keys(scores, offs, num_pages, start, end, num_select, page_size, sink, recent)
        t, need = kth_largest_key(key, tl.maximum(k, 1), lo, hi, above, n_lo, out, num_select, WAYS, FINISH)
        tl.store(aux_ptr + bh, t)
    else:
        select_from_scores(scores, offs, num_pages, start, end, out, num_select, page_size, sink, recent, BLOCK, WAYS, FINISH)


def _sortable(x: torch.Tensor) -> torch.Tensor:
    bits = torch.where(x == 0, torch.zeros_like(x), x).view(torch.int32).long()
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def search_passes(keys: torch.Tensor, k: int, ways: int, finish_at: int = 0, bracket=None) -> int:
    """Passes of ``kth_largest_key`` over one row's int keys (all scored: no forced / invalid pages);
    ``ways == 0``: the narrowing search. ``finish_at`` > 0 models a search that stops once at most that
    many keys lie inside its bracket (known from the counts at its two ends; the kernel's ``finish``) and
    ranks those directly in one more step (not counted). ``bracket``: ``(lo, hi, keys >= lo, keys > hi)``
    to start from instead of the keys' range (a bracket found by other means, e.g. a hint)."""
    lo, hi = int(keys.min()), int(keys.max())
    n_lo, n_above = keys.numel(), 0  # keys >= lo, keys >= hi + 1
    if bracket is not None:
        lo, hi, n_lo, n_above = bracket
    passes = 0
    narrowing = ways == 0  # 2 thresholds, 3 once <= 1023 keys lie in the bracket, 4 once <= 255
    while lo < hi and not (finish_at and n_lo - n_above <= finish_at):
        passes += 1
        if narrowing:
            ways = 2 if n_lo - n_above > 1023 else 3 if n_lo - n_above > 255 else 4
        step = (hi - lo + 1 + ways) // (ways + 1)
        cs = [min(lo + (i + 1) * step, hi) for i in range(ways)]
        ns = [int((keys >= c).sum()) for c in cs]
        new_lo, new_hi, hit = lo, hi, lo - 1
        for c, n in zip(cs, ns):
            if n >= k:
                new_lo, n_lo = c, n
            elif c - 1 < new_hi:
                new_hi, n_above = c - 1, n
            if n == k:
                hit = c
        lo, hi = (hit, hit) if hit >= lo else (new_lo, new_hi)
    return passes


def run(rep: int, searches=((SELECT_WAYS, 0), (0, 0), (SELECT_WAYS, 64))) -> list[dict]:
    """Rows per shape, search and part; a search is ``(ways, finish)``: thresholds per pass (0: the
    narrowing search) and the bracket size at which it ranks the keys directly (0: never)."""
    from tinyserve_patch.ops.triton_score import page_scores_triton

    torch.manual_seed(0)  # the same scores run to run: the search's pass count depends on them
    rows = []
    for model, batch, length, budget in SHAPES:
        hq, hkv, d = MODELS[model]
        pages, nsel = length // PAGE, budget // PAGE
        meta_rows = torch.randn(batch, hkv, length, d, device="cuda", dtype=torch.bfloat16).view(batch, hkv, pages, PAGE, d)
        meta = torch.stack([meta_rows.amin(3), meta_rows.amax(3)], dim=3).contiguous()
        meta_rows = None
        q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
        start = torch.zeros(batch, dtype=torch.int32, device="cuda")
        end = torch.full((batch,), length, dtype=torch.int32, device="cuda")
        scores = page_scores_triton(q, meta, start, end, PAGE, "max")
        out = torch.empty(batch, hkv, nsel, dtype=torch.int32, device="cuda")
        aux = torch.empty(batch * hkv, dtype=torch.int32, device="cuda")
        block = triton.next_power_of_2(pages)
        warps = select_num_warps(block)
        keys = _sortable(scores.float().cpu()).view(batch * hkv, pages)
        for (ways, fin), part in itertools.product(searches, range(len(PARTS))):
            if (ways, fin) != tuple(searches[0]) and PARTS[part] in ("load", "keys"):
                continue  # the same code whatever the search
            stop = min(fin, nsel) if fin else 0  # where the kernel's passes stop (its scratch is the output row)
            passes = [search_passes(r[1:-1], nsel - 2, ways, finish_at=stop) for r in keys]  # sink and recent forced
            base = dict(model=model, batch=batch, tokens=length, budget=budget, pages=pages, num_warps=warps, ways=ways,
                        finish=fin, passes_mean=sum(passes) / len(passes), passes_max=max(passes))

            def fn(part=part, ways=ways, fin=fin):
                _cut_kernel[(batch * hkv,)](scores, start, end, out, aux, pages, nsel, hkv, PAGE, 1, 1,
                                            BLOCK=block, WAYS=ways, PART=part, FINISH=fin, num_warps=warps)

            rows.append(dict(base, part=PARTS[part], graph_us=1e3 * _bench(fn, graph=True, rep=rep)))
            print(f"{model} B={batch} {length // 1024}K budget {budget} ways {ways} finish {fin}: {PARTS[part]:7s} "
                  f"{rows[-1]['graph_us']:6.2f} us (search passes mean {base['passes_mean']:.1f}, max {base['passes_max']})",
                  flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--rep", type=int, default=60)
    p.add_argument("--searches", nargs="+", default=[f"{SELECT_WAYS}:0", "0:0", f"{SELECT_WAYS}:64"],
                   help="searches to time, WAYS:FINISH (thresholds per pass, 0: narrowing; keys at which the search "
                        "ranks its bracket directly, 0: never)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("select_ablation.py needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = run(args.rep, [tuple(int(x) for x in s.split(":")) for s in args.searches])
    out = Path(args.out) if args.out else Path(os.environ.get("OUT", ROOT / "benchmarks/results")) / "select_ablation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "versions": _versions(), "commit": _commit(),
                               "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "rows": rows},
                              indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
