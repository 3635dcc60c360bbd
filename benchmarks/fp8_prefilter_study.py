"""CPU study: can fp8 page metadata pre-filter an *exact* Quest selection? (no GPU; real trained keys)

    python benchmarks/fp8_prefilter_study.py [--budgets 128 256 512 1024] [--out benchmarks/results/fp8_prefilter_study_cpu.json]

The exact-metadata chain misses 8x on the H200 by its latency, while fp8 metadata (half the score's
bytes) meets it but changes which pages are chosen. A two-level selection would keep the exact choice:
score every page on the fp8 metadata, keep the candidates that can still be in the exact top-k, and
read the exact metadata of those only. fp8 metadata is rounded outward (min down, max up), so one fp8
step the other way bounds the exact values from the inside:

    mn in [mn8, up(mn8)],  mx in [down(mx8), mx8]
    U8(p) = sum_d max(q_d mn8_d, q_d mx8_d)  >=  U(p)  >=  L8(p) = sum_d max(q_d up(mn8)_d, q_d down(mx8)_d)

(per query head; the GQA max of each). With ``T`` the k-th largest exact score and ``t`` the k-th largest
``L8`` (``t <= T``), a page with ``U8(p) < t`` cannot be in the exact top-k, so ``{p : U8(p) >= t}``
holds it. This script measures how many pages that keeps, on the shipped code model's real keys and
queries (CPython source, decode positions 2K-8K, layers past ``dense_layers``), and checks the exact
top-k is inside every candidate set. Bytes per step relative to the exact-metadata score: ``0.5`` (fp8
metadata) ``+ candidates / pages`` (their exact metadata).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.code_model_qk import code_model_qk, study_parser, write_study  # noqa: E402
from tinyserve_patch.ops.reference import fp8_round_directed, meta_to_fp8, page_scores  # noqa: E402

PAGE = 16


def fp8_step(x8: torch.Tensor, up: bool) -> torch.Tensor:
    """The next fp8 value above (``up``) or below ``x8``, as float32."""
    xf = x8.float()
    nudged = torch.nextafter(xf, torch.full_like(xf, float("inf") if up else float("-inf")))
    return fp8_round_directed(nudged, up=up).float()


def step_stats(q: torch.Tensor, keys: torch.Tensor, k_sel: int) -> dict:
    """One decode step of one layer: ``q`` ``[Hq, D]`` against ``keys`` ``[Hkv, T, D]`` (whole pages)."""
    hkv, t, d = keys.shape
    pages = t // PAGE
    paged = keys[:, : pages * PAGE].reshape(hkv, pages, PAGE, d)
    meta = torch.stack([paged.amin(2), paged.amax(2)], dim=2)[None]  # [1, Hkv, P, 2, D]
    meta8 = meta_to_fp8(meta)
    inner = torch.stack([fp8_step(meta8[..., 0, :], up=True), fp8_step(meta8[..., 1, :], up=False)], dim=-2)
    start = torch.zeros(1, dtype=torch.int32)
    end = torch.full((1,), pages * PAGE, dtype=torch.int32)
    exact = page_scores(q[None], meta, start, end, PAGE)[0]  # [Hkv, P]
    upper = page_scores(q[None], meta8.float(), start, end, PAGE)[0]
    lower = page_scores(q[None], inner, start, end, PAGE)[0]
    slack = 1e-5 * (upper.abs() + 1)  # fp32 summation order: keep a page within rounding of the threshold
    t_low = lower.topk(k_sel, dim=-1).values[:, -1:]
    cand = upper + slack >= t_low
    top = exact.topk(k_sel, dim=-1).indices
    held = bool(torch.gather(cand, 1, top).all())
    fp8_top = upper.topk(k_sel, dim=-1).indices  # what fp8 metadata alone chooses
    same = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top, fp8_top)) / (hkv * k_sel)
    return {"pages": pages, "candidates": cand.sum(-1).float().mean().item() / pages,
            "max_candidates": cand.sum(-1).max().item() / pages, "held": held, "fp8_overlap": same}


def main(argv=None) -> int:
    p = study_parser(__doc__)
    p.add_argument("--positions", type=int, default=24, help="decode positions sampled in [2K, tokens)")
    p.add_argument("--source", default=None, help="a text file (default: CPython's own source files)")
    args = p.parse_args(argv)

    qk, n = code_model_qk(args.model, args.tokens, args.source)
    positions = torch.linspace(2048, n - 1, args.positions).long().tolist()
    rows = []
    for budget in args.budgets:
        k_sel = budget // PAGE
        for layer, (q_all, k_all) in enumerate(qk):
            if layer < args.dense_layers:
                continue
            for pos in positions:
                whole = (pos // PAGE) * PAGE  # the pages before the current one (the recent page is forced)
                rows.append(dict(step_stats(q_all[:, pos], k_all[:, :whole], k_sel), budget=budget, layer=layer, position=pos))
    summary = {}
    for budget in args.budgets:
        rs = [r for r in rows if r["budget"] == budget]
        mean_c = sum(r["candidates"] for r in rs) / len(rs)
        summary[str(budget)] = {
            "steps": len(rs), "all_held": all(r["held"] for r in rs), "mean_candidate_fraction": mean_c,
            "max_candidate_fraction": max(r["max_candidates"] for r in rs),
            "bytes_vs_exact_metadata": 0.5 + mean_c,
            "fp8_only_overlap_with_exact_top_k": sum(r["fp8_overlap"] for r in rs) / len(rs),
        }
        s = summary[str(budget)]
        print(f"budget {budget}: {len(rs)} steps, exact top-k inside the candidates: {s['all_held']}; candidates "
              f"{100 * mean_c:.1f}% of pages (max {100 * s['max_candidate_fraction']:.1f}%) -> "
              f"{100 * s['bytes_vs_exact_metadata']:.0f}% of the exact score's bytes; fp8 alone keeps "
              f"{100 * s['fp8_only_overlap_with_exact_top_k']:.1f}% of the exact top-k")
    write_study(args.out, args, n, summary, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
