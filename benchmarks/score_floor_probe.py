"""Where a small score launch's time goes: the score beside read-only kernels of the same bytes (GPU only).

    python benchmarks/score_floor_probe.py [--shapes tinyllama:1:65536 ...] [--out probe.json]
    python benchmarks/score_floor_probe.py --report probe.json      # any machine

The issue asks the score at 64K+ tokens for >= 70% of its byte floor (bytes over the copy bandwidth).
At batch 1 the metadata is 4-17 MB, and the score sits at 37-59% there (H200) while a device copy of the
same bytes reaches 49-80%. This probe asks what any kernel reading those bytes reaches, launched back to
back in a CUDA graph over rotating copies beyond the L2 exactly as ``bench_kernels.py`` times the score:

* ``empty`` / ``empty_pdl``: a kernel with the score's grid that only stores one value a program (plain /
  programmatic dependent launch): the launch and drain cost of a grid of that size
* ``read_walk`` / ``read_walk_pdl``: every program reads the bytes a score program reads (same grid, same
  contiguous range) with plain loads and stores one max: the score without its arithmetic
* ``read_block``: one 16-32 KB block a program (4x-8x the programs)
* ``amax``: ``torch.amax`` over each page's metadata (PyTorch's reduction)
* ``copy_meta``: a device copy of half the metadata (read + write), the reference of ``bench_kernels.py``
* ``score`` (default plan), ``score_cpasync`` (never through the TMA, :func:`triton_score.use_tma`), ``score_noprefetch`` (no L2 prefetch before the wait), ``score_nopdl``
* ``score_pm`` (``_2stages``, ``_cpasync``, ``_resident``): the score with the pages-major products
  (``page_scores_triton(pages_major=True)``: warpgroup MMAs straight from the tiles in shared memory)
* ``score_resident``: the score over one copy, call after call (its metadata stays in L2, and its pages'
  address translations in the TLBs): what the score costs once its bytes no longer come from DRAM
* ``score_prefetch_<n>``: the L2 prefetch before the wait forced on with ``n`` bytes a program instead of the
  default's (64 KB at <= 8 MiB launches, none above): ``n = 256`` moves almost no bytes but makes every
  program's first address translation before its wait (a TLB miss on a fresh 2 MB page costs a page walk)
* ``score_tma``: the score with each block fetched by the tensor-memory accelerator (one bulk copy per min /
  max tile, ``page_scores_triton(tma=True)``) instead of per-thread ``cp.async`` copies, at the walk's
  default plan and prefetch; ``_noprefetch``, ``_per1`` / ``_per2`` (blocks a program), ``_4stages``, ``_per1_b128`` (one
  128-page block) vary one setting; ``score_per1`` / ``score_per2`` / ``score_per1_b128``: the score kernel with that plan

and, per shape, a timestamp trace (``tinyserve_patch.ops.trace``) of ``--calls`` scores back to back in one
graph, for the default score, the resident one and the one prefetching 256 bytes: for the middle calls,
in us from the call's first program passing its wait, the first and last start, the last wait passed and
the last end, and the gap from the previous call's last end to this call's first wait passed (what a
dependent launch costs on this part).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

DEFAULT_SHAPES = ("tinyllama:1:65536", "tinyllama:1:131072", "llama3-8b:1:65536", "llama3-8b:8:65536")


import triton
import triton.language as tl

from tinyserve_patch.ops._triton_common import pdl_enter


@triton.jit
def read_kernel(src, out, elems_per_program, total, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program ``p`` reads elements ``[p * elems_per_program, (p + 1) * elems_per_program)`` of ``src``
    (bf16) and stores their max: the memory traffic of a score program without its arithmetic."""
    pdl_enter(PDL)
    pid = tl.program_id(0)
    lo = pid.to(tl.int64) * elems_per_program
    acc = tl.full([BLOCK], float("-inf"), tl.float32)
    for i in range(0, elems_per_program, BLOCK):
        offs = lo + i + tl.arange(0, BLOCK)
        x = tl.load(src + offs, mask=offs < total, other=float("-inf"))
        acc = tl.maximum(acc, x.to(tl.float32))
    tl.store(out + pid, tl.max(acc, axis=0))


@triton.jit
def empty_kernel(out, PDL: tl.constexpr):
    """One store a program: the launch and drain of a grid."""
    pdl_enter(PDL)
    tl.store(out + tl.program_id(0), 1.0)


def parse_shape(text: str) -> tuple[str, int, int]:
    model, batch, tokens = text.split(":")
    return model, int(batch), int(tokens)


def trace_summary(records: list[list[dict]]) -> dict:
    """Medians over the middle calls of one graph of back-to-back scores (``records[i]``: call ``i``'s one
    traced launch), in us from each call's first wait passed."""
    per_call = []
    for prev, cur in itertools.pairwise(records):
        p, c = prev[0], cur[0]
        t0 = min(c["ready"])
        per_call.append({
            "first_start": (min(c["start"]) - t0) / 1e3, "last_start": (max(c["start"]) - t0) / 1e3,
            "last_ready": (max(c["ready"]) - t0) / 1e3, "last_end": (max(c["end"]) - t0) / 1e3,
            "median_program": statistics.median(e - r for e, r in zip(c["end"], c["ready"])) / 1e3,
            "gap_prev_end_to_ready": (t0 - max(p["end"])) / 1e3,
            "period": (max(c["end"]) - max(p["end"])) / 1e3,
        })
    mid = per_call[1:-1] or per_call
    return {k: statistics.median(d[k] for d in mid) for k in mid[0]}


def probe_shape(text: str, args, bw: float, l2: int, pdl: bool) -> tuple[list[dict], dict]:
    """The timed rows and the trace summary of one ``model:batch:tokens`` shape."""
    import torch
    from bench_kernels import MODELS, PAGE, Copies, _bench, _n_copies, without_pdl

    from tinyserve_patch.ops import reference as ref
    from tinyserve_patch.ops.trace import KernelTrace
    from tinyserve_patch.ops import triton_score
    from tinyserve_patch.ops.triton_score import page_scores_triton, score_meta, score_walk

    model, batch, length = parse_shape(text)
    hq, hkv, d = MODELS[model]
    pages = length // PAGE
    meta_bytes = batch * hkv * pages * 2 * d * 2
    n = max(args.calls, _n_copies(meta_bytes, meta_bytes * 2, l2))
    copies = Copies(batch, hq, hkv, d, length, n)
    for c in copies.items:  # the probe reads metadata only
        del c["k"], c["v"], c["meta8"]
    start = torch.zeros(batch, dtype=torch.int32, device="cuda")
    end = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    c0 = copies.items[0]
    got = page_scores_triton(c0["q"], c0["meta"], start, end, PAGE, "max")
    want = ref.page_scores(c0["q"], c0["meta"], start, end, PAGE, "max")
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-3), f"{text}: score differs from the reference"
    _, _, consts = score_meta(c0["q"], c0["meta"], start, end, PAGE, "max")
    walk = score_walk(consts, c0["meta"])  # the default score's own plan
    programs = batch * hkv * walk["programs_per_row"]
    per_program = walk["blocks_per_program"] * walk["BLOCK_P"] * 2 * d  # elements a score program reads
    block = walk["BLOCK_P"] * 2 * d
    total = c0["meta"].numel()
    sink = torch.empty(max(programs, triton.cdiv(total, block)), dtype=torch.float32, device="cuda")
    half = [c["meta"].view(-1)[: total // 2] for c in copies.items]
    dst = torch.empty_like(half[0])
    rot = itertools.cycle(range(n))
    base = {"model": model, "batch": batch, "tokens": length, "meta_bytes": meta_bytes, "programs": programs,
            "blocks_per_program": walk["blocks_per_program"], "copies": n}

    def reader(elems, with_pdl):
        grid = (triton.cdiv(total, elems),)
        return lambda: read_kernel[grid](copies.items[next(rot)]["meta"], sink, elems, total, BLOCK=min(elems, 4096),
                                         PDL=with_pdl, launch_pdl=with_pdl, num_warps=4, num_stages=3)

    def empty(with_pdl):
        return lambda: empty_kernel[(programs,)](sink, PDL=with_pdl, launch_pdl=with_pdl, num_warps=4)

    def score(resident=False, prefetch_bytes=None, trace_calls=None, **kw):
        """A score call over the next copy (``resident``: always the first); ``prefetch_bytes``: the
        prefetch forced on with that many bytes a program (``triton_score.PREFETCH_BYTES`` is read at
        launch, so also while a graph is captured); ``trace_calls``: a trace per call, in turn."""
        traces = iter(trace_calls or ())
        if prefetch_bytes is not None:
            kw["prefetch"] = True

        def call():
            c = copies.items[0 if resident else next(rot)]
            old = triton_score.PREFETCH_BYTES
            if prefetch_bytes is not None:
                triton_score.PREFETCH_BYTES = prefetch_bytes
            try:
                page_scores_triton(c["q"], c["meta"], start, end, PAGE, "max", trace=next(traces, None), **kw)
            finally:
                triton_score.PREFETCH_BYTES = old
        return call

    got = page_scores_triton(c0["q"], c0["meta"], start, end, PAGE, "max", tma=True)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-3), f"{text}: the TMA score differs from the reference"

    def tma(per=1, stages=None, prefetch=None, block_p=None):
        """The score reading its blocks through the tensor-memory accelerator (``tma=True``), ``per`` blocks a
        program (the default plan's with ``per=None``)."""
        return score(tma=True, blocks_per_program=per or walk["blocks_per_program"], num_stages=stages, block_p=block_p,
                     prefetch=prefetch)

    variants = [
        ("empty", empty(False), 0), ("empty_pdl", empty(pdl), 0),
        ("read_walk", reader(per_program, False), meta_bytes), ("read_walk_pdl", reader(per_program, pdl), meta_bytes),
        ("read_block", reader(block, False), meta_bytes),
        ("amax", lambda: torch.amax(copies.items[next(rot)]["meta"].view(-1, 2 * d), dim=1), meta_bytes),
        ("copy_meta", lambda: dst.copy_(half[next(rot)]), meta_bytes),
        ("score", score(), meta_bytes), ("score_cpasync", score(tma=False), meta_bytes),
        ("score_noprefetch", score(prefetch=False), meta_bytes),
        ("score_nopdl", without_pdl(score()), meta_bytes), ("score_resident", score(resident=True), meta_bytes),
        *((f"score_prefetch_{nb}", score(prefetch_bytes=nb), meta_bytes) for nb in args.prefetch_bytes),
        ("score_tma", tma(per=None), meta_bytes), ("score_tma_noprefetch", tma(per=None, prefetch=False), meta_bytes),
        ("score_tma_per1", tma(per=1), meta_bytes), ("score_tma_per2", tma(per=2), meta_bytes),
        ("score_tma_4stages", tma(per=None, stages=4), meta_bytes), ("score_tma_per1_b128", tma(per=1, block_p=128), meta_bytes),
        ("score_per1", score(blocks_per_program=1), meta_bytes), ("score_per2", score(blocks_per_program=2), meta_bytes),
        ("score_per1_b128", score(blocks_per_program=1, block_p=128), meta_bytes),
        ("score_pm", score(pages_major=True), meta_bytes), ("score_pm_2stages", score(pages_major=True, num_stages=2), meta_bytes),
        ("score_pm_cpasync", score(pages_major=True, tma=False), meta_bytes),
        ("score_pm_resident", score(resident=True, pages_major=True), meta_bytes),
    ]
    if args.only:
        variants = [v for v in variants if v[0] in args.only]
    rows = []
    for kind, fn, nbytes in variants:
        fn()
        torch.cuda.synchronize()
        ms = _bench(fn, graph=True, rep=args.rep)
        rec = dict(base, kind=kind, bytes=nbytes, graph_us=ms * 1e3, floor_us=nbytes / bw * 1e6,
                   pct_floor=100.0 * nbytes / bw / (ms * 1e-3) if nbytes else None)
        rows.append(rec)
        print(f"{text:22s} {kind:18s} {rec['graph_us']:7.2f} us" + (f"  {rec['pct_floor']:5.1f}% of floor" if nbytes else ""),
              flush=True)

    summaries = []
    traced = [("score", {}), ("score_resident", {"resident": True}), ("score_prefetch_256", {"prefetch_bytes": 256})]
    if args.no_trace:
        traced = []
    for kind, kw in traced:
        calls = [KernelTrace("cuda", capacity=programs) for _ in range(args.calls)]
        warm = score(**kw, trace_calls=[KernelTrace("cuda", capacity=programs) for _ in range(2)])
        warm(), warm()  # compile the traced variant outside the capture
        torch.cuda.synchronize()
        fn = score(**kw, trace_calls=calls)
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            for _ in calls:
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
        summary = dict(base, kind=kind, **trace_summary([tr.records() for tr in calls]))
        summaries.append(summary)
        print(f"{text:22s} trace {kind}: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items() if isinstance(v, float)),
              flush=True)
    return rows, summaries


def record(args) -> dict:
    import torch
    from bench_kernels import _commit, _versions, copy_bandwidth

    from tinyserve_patch.ops._triton_common import use_pdl

    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20)
    bw = copy_bandwidth(args.rep)
    pdl = use_pdl(torch.device("cuda"))
    print(f"{props.name}: copy bandwidth {bw / 1e12:.2f} TB/s, L2 {l2 / 2**20:.0f} MiB, PDL {pdl}", flush=True)
    torch.manual_seed(0)
    rows, traces = [], []
    for text in args.shapes:
        r, t = probe_shape(text, args, bw, l2, pdl)
        rows += r
        traces += t
        torch.cuda.empty_cache()
    return {"device": props.name, "versions": _versions(), "commit": _commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "copy_bandwidth_Bps": bw,
            "args": {k: v for k, v in vars(args).items() if k not in ("report", "out")}, "rows": rows, "traces": traces}


def render(doc: dict) -> str:
    out = [f"# Score floor probe, {doc['device']}", "",
           (f"{doc['versions']}, commit {doc['commit']}, {doc['date']}; copy bandwidth {doc['copy_bandwidth_Bps'] / 1e12:.2f} TB/s; "
           "CUDA graphs of back-to-back calls over rotating copies, medians."), "",
           "| shape | MB | programs | kind | us | floor us | % floor |", "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        pct = f"{r['pct_floor']:.0f}%" if r["pct_floor"] else "-"
        out.append(f"| {r['model']} B={r['batch']} {r['tokens'] // 1024}K | {r['meta_bytes'] / 1e6:.1f} | {r['programs']} | "
                   f"{r['kind']} | {r['graph_us']:.2f} | {r['floor_us']:.2f} | {pct} |")
    out += ["", "Trace of back-to-back scores (us from each call's first program past its wait; medians of the middle calls):", "",
            "| shape | score | first start | last start | last ready | median program | last end | gap prev end -> ready | period |",
            "|---|---|---|---|---|---|---|---|---|"]
    for t in doc["traces"]:
        out.append(f"| {t['model']} B={t['batch']} {t['tokens'] // 1024}K | {t.get('kind', 'score')} | {t['first_start']:.2f} | {t['last_start']:.2f} | "
                   f"{t['last_ready']:.2f} | {t['median_program']:.2f} | {t['last_end']:.2f} | {t['gap_prev_end_to_ready']:.2f} | "
                   f"{t['period']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="model:batch:tokens")
    p.add_argument("--rep", type=int, default=40)
    p.add_argument("--calls", type=int, default=8, help="back-to-back scores in the traced graph")
    p.add_argument("--prefetch-bytes", type=int, nargs="*", default=[256, 4096, 65536],
                   help="forced prefetch sizes (bytes a program) timed as score_prefetch_<n>")
    p.add_argument("--only", nargs="+", default=None, metavar="KIND", help="time only these kinds (e.g. score score_tma copy_meta)")
    p.add_argument("--no-trace", action="store_true", help="skip the per-program traces")
    p.add_argument("--out", default=None)
    p.add_argument("--report", default=None, help="re-render a recorded JSON")
    args = p.parse_args(argv)
    if args.report:
        print(render(json.loads(Path(args.report).read_text())))
        return 0
    doc = record(args)
    out = Path(args.out or (Path(os.environ["OUT"]) / "score_floor_probe.json" if os.environ.get("OUT") else
                            ROOT / "benchmarks" / "results" / "score_floor_probe.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(render(doc))
    print(render(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
