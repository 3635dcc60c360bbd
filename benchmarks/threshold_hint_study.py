"""CPU study: would the previous decode step's threshold shorten the selection's search? (no GPU; real keys)

    python benchmarks/threshold_hint_study.py [--budgets 128 256 512 1024] [--out benchmarks/results/threshold_hint_study_cpu.json]

The selection kernel's time is its slowest row's threshold search (``kth_largest_key``: a ternary search
over the int keys of the Quest scores, ~0.4 us a pass at 4096 pages on the H200, 9-13 passes on the
slowest of 64 rows). Each decode step of a layer searches from the whole score range, though the step
before found a threshold that the next query, one token later, may move only a little. A hinted search
would spend its first pass on two thresholds around the previous step's ``t``, ``t -+ r |t|``:

* both counts on either side of ``k``: the bracket is that narrow window (then the usual passes);
* both on one side: the bracket is the range beyond it (one pass spent, half a range cut at most).

This script measures, on the shipped code model's real queries and keys (CPython source, consecutive
positions from 2K to 8K, the sparse layers), how far ``t`` moves from one step to the next and how many
passes the plain and the hinted searches take (the mirror of the kernel's search in
``select_ablation.search_passes``): per row, and for the slowest row of each step and layer, which is
what a kernel launch waits for. The benchmark's random caches cannot show this (their queries are
independent step to step), which is why it is measured here first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.code_model_qk import code_model_qk, study_parser, write_study  # noqa: E402
from benchmarks.select_ablation import _sortable, search_passes  # noqa: E402
from tinyserve_patch.ops.reference import page_scores  # noqa: E402

PAGE = 16
WAYS = 2  # the kernel's default search (SELECT_WAYS)


def exact_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Quest scores ``[Hkv, P]`` of ``q`` ``[Hq, D]`` over the whole pages of ``keys`` ``[Hkv, T, D]``."""
    hkv, t, d = keys.shape
    pages = t // PAGE
    paged = keys[:, : pages * PAGE].reshape(hkv, pages, PAGE, d)
    meta = torch.stack([paged.amin(2), paged.amax(2)], dim=2)[None]
    start = torch.zeros(1, dtype=torch.int32)
    end = torch.full((1,), pages * PAGE, dtype=torch.int32)
    return page_scores(q[None], meta, start, end, PAGE)[0]


def hint_bracket(keys: torch.Tensor, k: int, hint: float, margin: float):
    """The first pass of a hinted search over the int ``keys``: counts at the sortable keys of ``hint -+
    margin * |hint|`` (float scores). ``None`` when a count is exactly ``k`` (the search is done), else
    the bracket ``(lo, hi, keys >= lo, keys > hi)`` of the ``k``-th largest key those counts give."""
    delta = margin * abs(hint) + 1e-30
    c1, c2 = (int(_sortable(torch.tensor([v], dtype=torch.float32))[0]) for v in (hint - delta, hint + delta))
    n1, n2 = int((keys >= c1).sum()), int((keys >= c2).sum())  # c1 < c2, so n1 >= n2
    if k in (n1, n2):
        return None
    if n2 > k:  # the k-th key lies at or above c2
        return c2, int(keys.max()), n2, 0
    if n1 < k:  # below c1
        return int(keys.min()), c1 - 1, keys.numel(), n1
    return c1, c2 - 1, n1, n2  # inside the window


def hinted_passes(keys: torch.Tensor, k: int, hint: float, margin: float) -> int:
    """Passes of the hinted search: its first pass (:func:`hint_bracket`), then ``kth_largest_key``'s
    passes from the bracket it gives."""
    bracket = hint_bracket(keys, k, hint, margin)
    return 1 if bracket is None else 1 + search_passes(keys, k, WAYS, bracket=bracket)


def study(qk, budgets, starts, steps: int, margins, dense_layers: int) -> list[dict]:
    """One row per (budget, layer, start, step, KV head): the threshold's relative move and the passes
    of the plain search and of the hinted one per margin."""
    rows = []
    for budget in budgets:
        k = budget // PAGE
        for layer, (q_all, k_all) in enumerate(qk):
            if layer < dense_layers:
                continue
            for start in starts:
                prev = None
                for pos in range(start, start + steps + 1):
                    whole = (pos // PAGE) * PAGE  # the pages before the current one (the recent page is forced)
                    scores = exact_scores(q_all[:, pos], k_all[:, :whole])
                    t = scores.topk(k, dim=-1).values[:, -1]  # [Hkv]: each head's k-th largest score
                    if prev is not None:
                        for h in range(scores.shape[0]):
                            keys = _sortable(scores[h])
                            row = {"budget": budget, "layer": layer, "start": start, "position": pos, "head": h,
                                   "pages": scores.shape[1], "move": abs(t[h] - prev[h]).item() / (abs(prev[h]).item() + 1e-30),
                                   "plain": search_passes(keys, k, WAYS)}
                            for m in margins:
                                row[f"hinted_{m:g}"] = hinted_passes(keys, k, prev[h].item(), m)
                            rows.append(row)
                    prev = t
    return rows


def summarize(rows: list[dict], margins) -> dict:
    """Per budget: the threshold's move (median, p90) and, per search, mean passes per row and the mean
    and max over (step, layer) of the slowest head's passes."""
    out = {}
    for budget in sorted({r["budget"] for r in rows}):
        rs = [r for r in rows if r["budget"] == budget]
        moves = torch.tensor([r["move"] for r in rs])
        launches: dict[tuple, list[dict]] = {}
        for r in rs:
            launches.setdefault((r["layer"], r["start"], r["position"]), []).append(r)
        entry = {"rows": len(rs), "launches": len(launches), "move_median": moves.median().item(),
                 "move_p90": moves.quantile(0.9).item()}
        for name in ["plain"] + [f"hinted_{m:g}" for m in margins]:
            slowest = [max(r[name] for r in group) for group in launches.values()]
            entry[name] = {"mean_passes": sum(r[name] for r in rs) / len(rs),
                           "slowest_row_mean": sum(slowest) / len(slowest), "slowest_row_max": max(slowest)}
        out[str(budget)] = entry
    return out


def main(argv=None) -> int:
    p = study_parser(__doc__)
    p.add_argument("--starts", type=int, default=8, help="runs of consecutive positions, spread over [2K, tokens)")
    p.add_argument("--steps", type=int, default=8, help="consecutive decode steps per run")
    p.add_argument("--margins", nargs="+", type=float, default=[0.005, 0.02, 0.05, 0.1])
    args = p.parse_args(argv)

    qk, n = code_model_qk(args.model, args.tokens)
    starts = torch.linspace(2048, n - args.steps - 2, args.starts).long().tolist()
    rows = study(qk, args.budgets, starts, args.steps, args.margins, args.dense_layers)
    summary = summarize(rows, args.margins)
    for budget, s in summary.items():
        plain = s["plain"]
        line = (f"budget {budget}: t moves {100 * s['move_median']:.1f}% (p90 {100 * s['move_p90']:.1f}%) a step; "
                f"passes plain {plain['mean_passes']:.2f} (slowest head {plain['slowest_row_mean']:.2f}, max "
                f"{plain['slowest_row_max']})")
        for m in args.margins:
            h = s[f"hinted_{m:g}"]
            line += f"; hint +-{100 * m:g}% {h['mean_passes']:.2f} ({h['slowest_row_mean']:.2f}, {h['slowest_row_max']})"
        print(line)
    write_study(args.out, args, n, summary, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
