"""Where the persistent decode's time goes, item by item, beside the fused row-chained decode (GPU only).

    python benchmarks/persistent_timeline.py [--shapes llama3-8b:8:65536:2048 ...] [--options lag=64 grids=2 ...] [--out t.json]

Both decodes run traced (``tinyserve_patch.ops.trace``: the global timer per program, or per work item
of the persistent grid), ``--calls`` steps (plus a first and a last, not summarised) captured in one
CUDA graph after a warm-up, on rotating caches of the benchmark (``bench_kernels.Copies``); the medians
over the last replay's steps are printed, in microseconds from the step's first stamp:

* ``span``: to the last end; ``score_end``: the last score item (program) scored;
* ``score_busy``: median time of a score item (program) without its selection; ``select``: median and
  max time of a row's selection (the row's last score item, from its scoring to its end);
  ``rows_selected``: first / median / last row selected;
* ``attn_wait``: median time an attention item waits for its row (from taken / started to ready);
  ``attn_busy``: median time of an attention item once ready; ``attn_first_ready``: the first one;
* ``concurrent``: items (programs) running at once, the time-weighted median over the span;
* ``unstamped``: items without all three stamps (dropped from the rest);
* ``step_us``: the graph's time per step (median of 5 replays), ``dense_sdpa_us``: dense SDPA decode of the
  same shape in the same run (CUDA graph), the baseline.

Its first device run (f63ecc4) never printed a line (sampling the concurrency over a span gone astray:
now a sweep that drops unstamped records); its second (fae97b0) ran eagerly and timed the host's launch
of each second grid (the fused chain's attention first ready at 157 us, span 185), hence the graph.
"""

from __future__ import annotations

import argparse
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

from chain_timeline import parse_shape  # noqa: E402


def _items_persistent(rec: dict, rows: int, lag: int, score_items: int, splits: int) -> list[dict]:
    """One traced persistent launch -> items ``{kind, row, start, ready, end}`` (ns), in queue order."""
    lead = lag * score_items
    out = []
    for i, (s, r, e) in enumerate(zip(rec["start"], rec["ready"], rec["end"])):
        if i < lead:
            kind, row = "score", i // score_items
        else:
            j = i - lead
            rnd, w = divmod(j, score_items + splits)
            if rnd < rows - lag:
                kind, row = ("score", rnd + lag) if w < score_items else ("attention", rnd)
            else:
                kind, row = "attention", rows - lag + (j - (rows - lag) * (score_items + splits)) // splits
        out.append({"kind": kind, "row": row, "start": s, "ready": r, "end": e})
    return out


def _items_two_grids(records: list[dict], score_items: int, splits: int) -> list[dict]:
    """The two-grid persistent decode's traced launches (score grid, attention grid) -> items: score item
    ``i`` of row ``i // score_items``; attention item ``i`` of the ``i // splits``-th row selected (its
    "row" here is that rank: the ready list's order, not the row's number)."""
    score, attention = records
    out = [{"kind": "score", "row": i // score_items, "start": s, "ready": r, "end": e}
           for i, (s, r, e) in enumerate(zip(score["start"], score["ready"], score["end"]))]
    return out + [{"kind": "attention", "row": i // splits, "start": s, "ready": r, "end": e}
                  for i, (s, r, e) in enumerate(zip(attention["start"], attention["ready"], attention["end"]))]


def _items_fused_chain(records: list[dict], rows: int) -> list[dict]:
    """The fused chain's two traced launches -> the same items (a program is an item; grids row-major). A
    score program's scoring ends at its end, except the row's selecting one (the last to end), whose
    scoring is taken to end when the row's other programs have (its selection is not stamped apart)."""
    out = []
    for rec in records:
        kind = "score" if rec["kernel"] == "score_select" else "attention"
        per_row = max(1, len(rec["start"]) // rows)
        items = [{"kind": kind, "row": p // per_row, "start": r if kind == "score" else s, "ready": e if kind == "score" else r, "end": e}
                 for p, (s, r, e) in enumerate(zip(rec["start"], rec["ready"], rec["end"]))]
        if kind == "score":
            for row in range(rows):
                mine = sorted((it for it in items if it["row"] == row), key=lambda it: it["end"])
                if len(mine) > 1:
                    mine[-1]["ready"] = max(mine[-2]["end"], mine[-1]["start"])
        out += items
    return out


def concurrency(intervals: list[tuple[float, float]]) -> float:
    """Median number of ``(start, end)`` intervals open at once, weighted by time, from the first start to
    the last end (a sweep over the sorted ends: no sampling, whatever the span)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    spans: dict[int, float] = {}
    level, prev = 0, events[0][0]
    for t, step in events:
        spans[level] = spans.get(level, 0.0) + t - prev
        level, prev = level + step, t
    half, acc = sum(spans.values()) / 2, 0.0
    for n in sorted(spans):
        acc += spans[n]
        if acc >= half:
            return float(n)
    return 0.0


def summarise(items: list[dict], rows: int) -> dict:
    """Medians and extremes of one step's items (see module docstring); items with a missing (zero) stamp
    are dropped and counted in ``unstamped``."""
    stamped = [it for it in items if it["start"] > 0 and it["ready"] > 0 and it["end"] > 0]
    unstamped = len(items) - len(stamped)
    items = stamped
    t0 = min(it["start"] for it in items)
    us = lambda t: (t - t0) / 1e3  # noqa: E731
    score = [it for it in items if it["kind"] == "score"]
    attn = [it for it in items if it["kind"] == "attention"]
    selecting = {}
    for it in score:
        if it["row"] not in selecting or it["end"] > selecting[it["row"]]["end"]:
            selecting[it["row"]] = it
    sel_times = [(it["end"] - it["ready"]) / 1e3 for it in selecting.values()]
    selected = sorted(us(it["end"]) for it in selecting.values())
    return {
        "span": max(us(it["end"]) for it in items),
        "score_end": max(us(it["ready"]) for it in score),
        "score_busy": statistics.median((it["ready"] - it["start"]) / 1e3 for it in score),
        "select_median": statistics.median(sel_times), "select_max": max(sel_times),
        "rows_selected_first": selected[0], "rows_selected_median": statistics.median(selected), "rows_selected_last": selected[-1],
        "attn_wait": statistics.median((it["ready"] - it["start"]) / 1e3 for it in attn),
        "attn_busy": statistics.median((it["end"] - it["ready"]) / 1e3 for it in attn),
        "attn_first_ready": min(us(it["ready"]) for it in attn),
        "concurrent": concurrency([(us(it["start"]), us(it["end"])) for it in items]),
        "unstamped": unstamped,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["llama3-8b:8:65536:2048", "llama3-8b:1:16384:2048"])
    p.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE,...",
                   help="also trace the persistent decode with these integer options (see bench_kernels --persistent)")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--watchdog", type=float, default=0, help="dump every thread's stack after this many seconds (a hang)")
    args = p.parse_args(argv)
    if args.watchdog:
        import faulthandler

        faulthandler.dump_traceback_later(args.watchdog, exit=True)

    import torch

    if not torch.cuda.is_available():
        print("persistent_timeline.py needs a CUDA GPU (the trace reads the GPU's global timer)", file=sys.stderr)
        return 2

    from bench_kernels import MODELS, PAGE, Copies, _bench, _commit, _versions, dense_decode, key_values
    from tinyserve_patch.ops.trace import KernelTrace
    from tinyserve_patch.ops.triton_chain import quest_decode_chained_triton
    from tinyserve_patch.ops.triton_persistent import persistent_plan, quest_decode_persistent_triton, queue_plan
    from tinyserve_patch.ops.triton_score import score_meta

    torch.manual_seed(0)
    results = []
    for text in args.shapes:
        model, batch, length, budget = parse_shape(text)
        hq, hkv, d = MODELS[model]
        rows, nsel = batch * hkv, budget // PAGE
        copies = Copies(batch, hq, hkv, d, length, 3)
        start = torch.zeros(batch, dtype=torch.int32, device="cuda")
        end = torch.full((batch,), length, dtype=torch.int32, device="cuda")
        c0 = copies.items[0]
        _, _, consts = score_meta(c0["q"], c0["meta"], start, end, PAGE, "max")
        plan = persistent_plan(rows, length // PAGE, nsel, PAGE, d, torch.device("cuda"))
        rotation = itertools.cycle(copies.items)  # the baseline of this run: dense SDPA decode, CUDA graph
        dense_us = 1e3 * _bench(lambda: dense_decode(next(rotation), d**-0.5), graph=True, rep=40)
        for name in ["fused_chain", "persistent", *(f"persistent_{t}" for t in args.options)]:
            opts = {k: int(v) for _, k, v in key_values(name.removeprefix("persistent").removeprefix("_"))} if name != "fused_chain" else {}
            queue = queue_plan(consts, rows, length // PAGE, nsel, PAGE, d, torch.device("cuda"), c0["meta"].dtype, **opts)

            def call(c, trace=None, opts=opts, name=name):
                if name == "fused_chain":
                    return quest_decode_chained_triton(c["q"], c["k"], c["v"], c["meta"], start, end, PAGE, nsel, 1, 1, "max", d**-0.5,
                                                       fused=True, merge="inline", num_splits=plan["num_splits"], trace=trace)
                return quest_decode_persistent_triton(c["q"], c["k"], c["v"], c["meta"], start, end, PAGE, nsel, 1, 1, "max",
                                                      d**-0.5, trace=trace, **opts)

            print(f"{text} {name}: warm-up", flush=True)
            for i in range(6):  # compile (traced and not) and allocate outside the capture
                call(copies.items[i % 3])
                call(copies.items[i % 3], KernelTrace("cuda", capacity=65536))
            torch.cuda.synchronize()
            # the steps replayed from one CUDA graph, as the benchmark runs them (eagerly, the host's launch
            # of a second grid comes tens of us after the first and the timeline shows that, not the kernels)
            traces = [KernelTrace("cuda", capacity=65536) for _ in range(args.calls + 2)]
            graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
                for i, trace in enumerate(traces):
                    call(copies.items[i % 3], trace)
            torch.cuda.current_stream().wait_stream(stream)
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            t0, t1, replays = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True), []
            for _ in range(5):  # the graph's time per step (the last replay's stamps are read below)
                t0.record()
                graph.replay()
                t1.record()
                torch.cuda.synchronize()
                replays.append(t0.elapsed_time(t1) * 1e3 / len(traces))
            summaries = []
            for trace in traces[1:-1]:  # the last replay's stamps; the first and last steps not summarised
                recs = trace.records()
                if name == "fused_chain":
                    items = _items_fused_chain(recs, rows)
                elif opts.get("grids", 1) == 2:
                    items = _items_two_grids(recs, queue["score_items"], queue["num_splits"])
                else:
                    items = _items_persistent(recs[0], rows, queue["lag"], queue["score_items"], queue["num_splits"])
                summaries.append(summarise(items, rows))
            del graph
            med = {k: round(statistics.median(s[k] for s in summaries), 2) for k in summaries[0]}
            med.update(step_us=round(statistics.median(replays), 2), dense_sdpa_us=round(dense_us, 2))
            results.append({"shape": text, "decode": name, **med})
            print(f"{text} {name}: " + " ".join(f"{k}={v}" for k, v in med.items()), flush=True)
        copies = None
    doc = {"device": torch.cuda.get_device_name(0), "versions": _versions(), "commit": _commit(), "rows": results}
    out = Path(args.out) if args.out else Path(os.environ.get("OUT", ".")) / "persistent_timeline.json"
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
