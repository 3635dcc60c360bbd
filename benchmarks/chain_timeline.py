"""Timeline of a decode step's kernels on the GPU, program by program (GPU only to record).

    python benchmarks/chain_timeline.py [--out timeline.json]          # record (CUDA)
    python benchmarks/chain_timeline.py --report timeline.json [--plot timeline.png]   # any machine

Kernel timings say how long a chain takes, not where its time goes between and inside the kernels. Here
every program of the score, select, attention and merge launches records the GPU's global timer when it
starts, when its inputs are ready (its wait for the previous grid, or for its row in the row-chained
mode, has passed) and when it ends, with its SM (``tinyserve_patch.ops.trace``). The steps run as the
benchmark runs them: ``--calls`` consecutive decode steps captured in one CUDA graph (each over its own
copy of the cache, so consecutive steps overlap through PDL as they do in ``bench_kernels.py``), replayed
after warm-up; the middle steps are summarised.

Per step, in microseconds from the step's first score program passing its wait: for each kernel the
first start, the last start, the first and last "ready", the last end; per (row, KV head) the time its
scores are complete, its selection ends, its attention is ready, all but its last attention program
have ended (the last one merges, with the inline merge) and its attention ends; the step's span (first score ready to
the last merge end) against the graph's time per step. ``--plot`` draws the middle step as bars per SM.
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

KERNELS = ("score", "score_select", "select", "attention", "merge")
#: split: score, select, attention one grid after another; chained: per-row flags between them
#: (``ops/triton_chain.py``); fused: the fused score + select kernel, then the attention; fused_chained:
#: the fused kernel flags each row as its last score program selects it.
#: groupedN: the batch's (row, KV head) pairs in N groups (by batch rows, else by KV heads), each a split
#: chain on its own stream, so one group's selection runs beside another's memory-bound kernels.
MODES = ("split", "chained", "fused", "fused_chained", "grouped2", "grouped4")
#: (model, batch, tokens, budget): the issue's 8x shape and the batch-1 shapes nearest dense.
DEFAULT_SHAPES = ("llama3-8b:8:65536:2048", "tinyllama:1:16384:4096", "llama3-8b:1:16384:4096")


def parse_shape(text: str) -> tuple[str, int, int, int]:
    model, batch, tokens, budget = text.split(":")
    return model, int(batch), int(tokens), int(budget)


def row_of(kernel: str, mode: str, prog: int, rows: int, per_row: int, g: int, hkv: int) -> int:
    """The (row, KV head) index ``b * Hkv + h`` that program ``prog`` (linear id) of ``kernel`` serves.
    ``per_row``: programs per row of the score or attention grid; ``g``: query heads per KV head."""
    if kernel == "select":
        return prog
    if kernel == "score_select":  # always (per_row, rows)
        return prog // per_row
    if kernel == "merge":  # program b * Hq + hq
        hq = prog % (g * hkv)
        return (prog // (g * hkv)) * hkv + hq // g
    # chained grids are (per_row, rows): row-major; split grids (rows, per_row)
    return prog // per_row if mode.endswith("chained") else prog % rows


#: Kernels whose programs stream the cache (the score's metadata, the attention's pages): while none of
#: them runs, the memory system idles. (A fused score + select program counts whole, its selection too.)
STREAMING = ("score", "score_select", "attention")


def busy_union(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, reach = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > reach:
            total += e - max(s, reach)
            reach = e
    return total


def summarise(records: list[dict], mode: str, rows: int, g: int, hkv: int) -> dict:
    """One step's records (:meth:`KernelTrace.records`, one per launch) -> times in us from the first
    score program's ready stamp: per kernel ``first_start`` / ``last_start`` / ``first_ready`` /
    ``last_ready`` / ``last_end`` / ``programs``, per row ``score_done`` / ``select_end`` / ``attention_end``,
    ``span`` (to the last end of the last kernel) and ``memory_idle`` (the part of the span, after the first
    score program's wait, in which no streaming program of :data:`STREAMING` runs)."""
    by: dict = {}
    for r in records:  # grouped modes launch each kernel once per group: one list of programs per kernel
        if r["kernel"] in by:
            by[r["kernel"]] = {f: by[r["kernel"]][f] + r[f] for f in ("start", "ready", "end", "sm")}
        else:
            by[r["kernel"]] = r
    per_launch = len(by) == len(records)
    t0 = min(by["score" if "score" in by else "score_select"]["ready"])
    us = lambda t: (t - t0) / 1e3  # noqa: E731
    out = {"kernels": {}, "rows": {}}
    for name in KERNELS:
        if name not in by:
            continue
        r = by[name]
        out["kernels"][name] = {
            "programs": len(r["start"]), "first_start": us(min(r["start"])), "last_start": us(max(r["start"])),
            "first_ready": us(min(r["ready"])), "last_ready": us(max(r["ready"])), "last_end": us(max(r["end"])),
            "median_busy": statistics.median((e - s) / 1e3 for s, e in zip(r["ready"], r["end"])),
        }
        if not per_launch:
            continue
        per_row = max(1, len(r["start"]) // rows)
        ends: list[list[float]] = [[] for _ in range(rows)]
        ready = [float("inf")] * rows
        for prog, (rdy, end) in enumerate(zip(r["ready"], r["end"])):
            row = row_of(name, mode, prog, rows, per_row, g, hkv)
            ends[row].append(us(end))
            ready[row] = min(ready[row], us(rdy))
        out["rows"][{"score": "score_done", "score_select": "select_end", "select": "select_end",
                     "attention": "attention_end", "merge": "merge_end"}[name]] = [max(e) for e in ends]
        if name == "attention":  # where a row's attention tail goes: its first program ready, all but its last done
            out["rows"]["attention_ready"] = ready
            out["rows"]["attention_but_last"] = [sorted(e)[-2] if len(e) > 1 else max(e) for e in ends]
    last = [k for k in KERNELS if k in by][-1]
    out["span"] = out["kernels"][last]["last_end"]
    streaming = [(max(0.0, us(s)), us(e)) for k in STREAMING if k in by for s, e in zip(by[k]["ready"], by[k]["end"])]
    out["memory_idle"] = out["span"] - busy_union([(s, min(e, out["span"])) for s, e in streaming if e > 0])
    return out


def median_summary(steps: list[dict]) -> dict:
    """Per kernel and field, the median over steps (the rows' lists element-wise)."""
    med = {"span": statistics.median(s["span"] for s in steps), "kernels": {}, "rows": {}}
    if all("memory_idle" in s for s in steps):
        med["memory_idle"] = statistics.median(s["memory_idle"] for s in steps)
    for name in steps[0]["kernels"]:
        med["kernels"][name] = {f: statistics.median(s["kernels"][name][f] for s in steps) for f in steps[0]["kernels"][name]}
    for field, vals in steps[0]["rows"].items():
        med["rows"][field] = [statistics.median(s["rows"][field][i] for s in steps) for i in range(len(vals))]
    return med


def record(args) -> dict:
    import torch

    from bench_kernels import MODELS, PAGE, Copies, _bench, _commit, _n_copies, _versions, dense_decode
    from tinyserve_patch.ops.trace import KernelTrace
    from tinyserve_patch.ops.triton_chain import quest_decode_chained_triton
    from tinyserve_patch.ops.triton_decode import sparse_decode_attention_triton
    from tinyserve_patch.ops.triton_fused_select import score_and_select_triton
    from tinyserve_patch.ops.triton_score import page_scores_triton
    from tinyserve_patch.ops.triton_select import select_pages_triton

    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20)
    torch.manual_seed(0)
    results = []
    fused_options = {k: v for k, v in (("num_warps", args.fused_warps), ("maxnreg", args.fused_maxnreg)) if v is not None}
    for text in args.shapes:
        model, batch, length, budget = parse_shape(text)
        hq, hkv, d = MODELS[model]
        pages = length // PAGE
        nsel = budget // PAGE
        kv_bytes = 2 * batch * hkv * length * d * 2
        meta_bytes = batch * hkv * pages * 2 * d * 2
        n = max(args.calls, _n_copies(meta_bytes + 2 * batch * hkv * budget * d * 2, kv_bytes + meta_bytes, l2))
        copies = Copies(batch, hq, hkv, d, length, n)
        start = torch.zeros(batch, dtype=torch.int32, device="cuda")
        end = torch.full((batch,), length, dtype=torch.int32, device="cuda")
        scale = d**-0.5
        rotation = itertools.cycle(copies.items)  # the baseline of this run: dense SDPA decode, CUDA graph
        dense_us = 1e3 * _bench(lambda: dense_decode(next(rotation), scale), graph=True, rep=40)
        for mode in args.modes:
            traces = [KernelTrace("cuda", capacity=4 * batch * hq * 64 + 65536) for _ in range(args.calls)]

            groups = int(mode.removeprefix("grouped")) if mode.startswith("grouped") else 1
            streams = [torch.cuda.Stream() for _ in range(groups)]
            g_size = hq // hkv
            if batch >= groups:  # (batch slice, KV-head slice) per group
                parts = [(slice(i * batch // groups, (i + 1) * batch // groups), slice(None)) for i in range(groups)]
            else:
                parts = [(slice(None), slice(i * hkv // groups, (i + 1) * hkv // groups)) for i in range(groups)]

            def grouped(c, trace):
                out = torch.empty(batch, hq, d, dtype=c["q"].dtype, device="cuda")
                cur = torch.cuda.current_stream()
                for st, (bs, hs) in zip(streams, parts):
                    st.wait_stream(cur)
                    qs = slice(None) if hs == slice(None) else slice(hs.start * g_size, hs.stop * g_size)
                    with torch.cuda.stream(st):
                        q = c["q"][bs, qs]
                        s = page_scores_triton(q, c["meta"][bs, hs], start[bs], end[bs], PAGE, "max", trace=trace)
                        idx = select_pages_triton(s, start[bs], end[bs], PAGE, nsel, 1, 1, trace=trace)
                        sparse_decode_attention_triton(q, c["k"][bs, hs], c["v"][bs, hs], idx, start[bs], end[bs], PAGE,
                                                       scale, trace=trace, out=out[bs, qs])
                for st in streams:
                    cur.wait_stream(st)
                return out

            def step(i, trace=None):
                c = copies.items[i % n]
                if groups > 1:
                    return grouped(c, trace)
                if mode.endswith("chained"):
                    return quest_decode_chained_triton(c["q"], c["k"], c["v"], c["meta"], start, end, PAGE, nsel, 1, 1,
                                                       "max", scale, trace=trace, fused=mode == "fused_chained",
                                                       fused_options=fused_options, num_splits=args.splits,
                                                       merge=args.merge)[0]
                if mode == "fused":
                    idx = score_and_select_triton(c["q"], c["meta"], start, end, PAGE, nsel, 1, 1, "max", trace=trace,
                                                  **fused_options)
                else:
                    s = page_scores_triton(c["q"], c["meta"], start, end, PAGE, "max", trace=trace)
                    idx = select_pages_triton(s, start, end, PAGE, nsel, 1, 1, trace=trace)
                return sparse_decode_attention_triton(c["q"], c["k"], c["v"], idx, start, end, PAGE, scale, trace=trace,
                                                      num_splits=args.splits, merge=args.merge)

            if groups > 1:  # the groups' chains give the whole batch's answer (their splits may round differently)
                c = copies.items[0]
                sc = page_scores_triton(c["q"], c["meta"], start, end, PAGE, "max")
                want = sparse_decode_attention_triton(c["q"], c["k"], c["v"], select_pages_triton(sc, start, end, PAGE, nsel, 1, 1),
                                                      start, end, PAGE, scale)
                got = step(0)
                torch.cuda.synchronize()
                assert torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2), f"{mode} differs from the split chain"
            for i in range(2):  # compile (traced and not) and allocate outside the capture
                step(i)
                step(i, KernelTrace("cuda", capacity=traces[0].buffer.shape[0]))
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                with torch.cuda.graph(graph, stream=stream):
                    for i in range(args.calls):
                        step(i, traces[i])
            torch.cuda.current_stream().wait_stream(stream)
            for _ in range(args.warmup):
                graph.replay()
            torch.cuda.synchronize()
            t_start, t_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(args.replays):
                t_start.record()
                graph.replay()
                t_end.record()
                torch.cuda.synchronize()
                times.append(t_start.elapsed_time(t_end) * 1e3 / args.calls)
            steps = [tr.records() for tr in traces]  # the last replay's stamps
            middle = steps[1:-1] if len(steps) > 2 else steps
            rows = batch * hkv
            summaries = [summarise(s, mode, rows, hq // hkv, hkv) for s in middle]
            res = {"model": model, "batch": batch, "tokens": length, "budget": budget, "mode": mode,
                   "q_heads": hq, "kv_heads": hkv, "head_dim": d, "calls": args.calls, "copies": n,
                   "graph_us_per_step": statistics.median(times), "dense_sdpa_us": dense_us,
                   "median": median_summary(summaries),
                   "steps": summaries, "raw_middle_step": middle[len(middle) // 2]}
            results.append(res)
            print(render_one(res), flush=True)
            del graph
        copies = None  # free this shape's caches before the next
        torch.cuda.empty_cache()
    return {"device": props.name, "sms": props.multi_processor_count, "versions": _versions(), "commit": _commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "args": {k: v for k, v in vars(args).items() if k not in ("report", "plot", "out")}, "results": results}


def render_one(res: dict) -> str:
    m = res["median"]
    middle = None  # fields recorded after this result: the middle step's, from its stamps (summarised once)
    if "memory_idle" not in m or ("attention_end" in m["rows"] and "attention_ready" not in m["rows"]
                                  and res.get("raw_middle_step")):
        middle = summarise(res["raw_middle_step"], res["mode"], res["batch"] * res["kv_heads"],
                           res["q_heads"] // res["kv_heads"], res["kv_heads"])
    idle = m["memory_idle"] if "memory_idle" in m else middle["memory_idle"]
    lines = [f"## {res['model']} B={res['batch']} {res['tokens'] // 1024}K budget {res['budget']}, {res['mode']}: "
             f"span {m['span']:.1f} us, graph {res['graph_us_per_step']:.1f} us per step "
             f"(median of {len(res['steps'])} steps)"
             + (f", dense SDPA {res['dense_sdpa_us']:.1f} us in the same run" if "dense_sdpa_us" in res else "")
             + f"; memory idle {idle:.1f} us of the span"
             + (" (at least: the fused programs' selections count as streaming)" if "score_select" in m["kernels"] else ""), "",
             "| kernel | programs | first start | last start | first ready | last ready | last end | median busy |",
             "|---|---|---|---|---|---|---|---|"]
    for name, k in m["kernels"].items():
        lines.append(f"| {name} | {k['programs']} | {k['first_start']:.1f} | {k['last_start']:.1f} | {k['first_ready']:.1f} "
                     f"| {k['last_ready']:.1f} | {k['last_end']:.1f} | {k['median_busy']:.1f} |")
    rows = m["rows"]
    if rows:
        lines += ["", "per row (min / median / max, us): " + "; ".join(
            f"{f} {min(v):.1f} / {statistics.median(v):.1f} / {max(v):.1f}" for f, v in rows.items())]
        if "score_done" in rows and "select_end" in rows:
            lag = [s - d for d, s in zip(rows["score_done"], rows["select_end"])]
            lines.append(f"selection end - scores done, per row: min {min(lag):.1f} / median {statistics.median(lag):.1f} / max {max(lag):.1f} us")
        tail, which = rows, ""
        if "attention_ready" not in rows and middle is not None:
            tail, which = middle["rows"], " (middle step)"
        if "attention_ready" in tail:
            last = max(range(len(tail["attention_end"])), key=tail["attention_end"].__getitem__)
            after = [e - b for b, e in zip(tail["attention_but_last"], tail["attention_end"])]
            lines.append(
                f"attention tail{which}: the row ending last ({last}) is ready at {tail['attention_ready'][last]:.1f}, all but its "
                f"last program end by {tail['attention_but_last'][last]:.1f}, its last at {tail['attention_end'][last]:.1f} us; a "
                f"row's last program ends after the row's others by median {statistics.median(after):.1f} / max {max(after):.1f} us "
                f"(its own later attention, and the merge where the attention merges inline)")
    return "\n".join(lines) + "\n"


def render(doc: dict) -> str:
    head = (f"# Decode-step timeline, {doc['device']}\n\n{doc['versions']}, commit {doc['commit']}, {doc['date']}. "
            f"Command: `python benchmarks/chain_timeline.py` with {doc['args']}. Times in us from the step's first "
            "score program passing its wait; 'ready': the program's wait has passed; 'busy': ready to end.\n")
    if any("dense_sdpa_us" not in r for r in doc["results"]):
        head += ("\nRecorded before the script timed dense SDPA: the dense baseline of these shapes on the same "
                 "machine and day is in the `kernels_*.json` runs beside this file.\n")
    return head + "\n" + "\n".join(render_one(r) for r in doc["results"])


def plot(doc: dict, path: str, shape: str | None = None) -> None:
    """Bars per SM of each result's middle step (only ``shape``'s, ``model:batch:tokens:budget``, if given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in doc["results"]
               if shape is None or (r["model"], r["batch"], r["tokens"], r["budget"]) == parse_shape(shape)]
    fig, axes = plt.subplots(len(results), 1, figsize=(12, 3.2 * len(results)), squeeze=False)
    colors = {"score": "tab:blue", "score_select": "tab:cyan", "select": "tab:red", "attention": "tab:green", "merge": "tab:purple"}
    for ax, res in zip(axes[:, 0], results):
        recs = res["raw_middle_step"]
        t0 = min(next(r for r in recs if r["kernel"] in ("score", "score_select"))["ready"])
        slot: dict = {}
        for r in recs:
            for s, rd, e, sm in zip(r["start"], r["ready"], r["end"], r["sm"]):
                # stack the programs of one SM that overlap in time on separate lanes
                lanes = slot.setdefault(sm, [])
                lane = next((i for i, busy_until in enumerate(lanes) if busy_until <= s), len(lanes))
                if lane == len(lanes):
                    lanes.append(e)
                else:
                    lanes[lane] = e
                y = sm + lane / 4
                ax.plot([(s - t0) / 1e3, (rd - t0) / 1e3], [y, y], color=colors[r["kernel"]], alpha=0.25, lw=1)
                ax.plot([(rd - t0) / 1e3, (e - t0) / 1e3], [y, y], color=colors[r["kernel"]], lw=1.5)
        ax.set_title(f"{res['model']} B={res['batch']} {res['tokens'] // 1024}K budget {res['budget']}, {res['mode']}: "
                     f"span {res['median']['span']:.1f} us (faint: waiting)", fontsize=9)
        ax.set_ylabel("SM")
        ax.set_xlabel("us from the first score program's ready")
    handles = [plt.Line2D([], [], color=c, label=k) for k, c in colors.items()]
    fig.legend(handles=handles, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="model:batch:tokens:budget")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--fused-warps", type=int, default=None, help="warps of the fused score + select kernel (default: tuned)")
    p.add_argument("--fused-maxnreg", type=int, default=None, help="register cap of the fused score + select kernel")
    p.add_argument("--splits", type=int, default=None, help="the attention's splits per row (default: planned)")
    p.add_argument("--merge", choices=["kernel", "inline"], default=None, help="how the attention merges its splits")
    p.add_argument("--calls", type=int, default=8, help="decode steps per graph (the first and last are not summarised)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--replays", type=int, default=10)
    p.add_argument("--out", default=None, help="JSON path (default $OUT/timeline.json, else benchmarks/results/timeline.json)")
    p.add_argument("--report", default=None, help="re-render a recorded JSON instead of recording")
    p.add_argument("--plot", default=None, help="PNG of the middle step of each result (matplotlib)")
    p.add_argument("--plot-shape", default=None, help="plot only this shape's results (model:batch:tokens:budget)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        doc = json.loads(Path(args.report).read_text())
    else:
        doc = record(args)
        out = Path(args.out or (Path(os.environ["OUT"]) / "timeline.json" if os.environ.get("OUT") else ROOT / "benchmarks/results/timeline.json"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc))
        out.with_suffix(".md").write_text(render(doc))
        print(f"wrote {out}")
    if args.report:
        print(render(doc))
    if args.plot:
        plot(doc, args.plot, args.plot_shape)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
