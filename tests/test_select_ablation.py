"""The selection ablation's cut kernel and pass counter (no GPU: the Triton interpreter, tiny rows)."""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_cut_kernel_parts_and_pass_count(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import select_ablation as sa
    from tinyserve_patch.ops import reference as ref

    g = torch.Generator().manual_seed(0)
    b, h, pages, nsel, ps = 2, 2, 256, 16, 16
    scores = torch.randn(b, h, pages, generator=g)
    start = torch.zeros(b, dtype=torch.int32)
    end = torch.full((b,), pages * ps, dtype=torch.int32)
    out = torch.full((b, h, nsel), -7, dtype=torch.int32)
    aux = torch.empty(b * h, dtype=torch.int32)

    def cut(part):
        sa._cut_kernel[(b * h,)](scores, start, end, out, aux, pages, nsel, h, ps, 1, 1, BLOCK=pages, WAYS=2, PART=part)

    cut(3)  # the whole selection: the reference's pages
    assert torch.equal(out, ref.select_pages(scores, start, end, ps, nsel, 1, 1))
    cut(2)  # the search alone: the threshold t of the k-th largest scored key
    keys = sa._sortable(scores).view(b * h, pages)
    for row, t in zip(keys, aux.tolist()):
        scored = row[1:-1]  # the sink and the recent page are forced
        assert int((scored > t).sum()) <= nsel - 2 <= int((scored >= t).sum())
        assert 1 <= sa.search_passes(scored, nsel - 2, 2) <= 20
        # stopping at <= 64 keys in the bracket never takes more passes; with every key inside, none
        assert sa.search_passes(scored, nsel - 2, 2, finish_at=64) <= sa.search_passes(scored, nsel - 2, 2)
        assert sa.search_passes(scored, nsel - 2, 2, finish_at=scored.numel()) == 0
    # the narrowing search: a threshold as good (it may differ where a count hits k between two keys)
    sa._cut_kernel[(b * h,)](scores, start, end, out, aux, pages, nsel, h, ps, 1, 1, BLOCK=pages, WAYS=0, PART=2)
    for row, t in zip(keys, aux.tolist()):
        assert int((row[1:-1] > t).sum()) <= nsel - 2 <= int((row[1:-1] >= t).sum())
    # ranking the last <= 16 keys of the bracket: the k-th largest key itself, unless a pass counted
    # exactly k keys at a threshold first (then that threshold)
    sa._cut_kernel[(b * h,)](scores, start, end, out, aux, pages, nsel, h, ps, 1, 1, BLOCK=pages, WAYS=2, PART=2, FINISH=16)
    for row, t in zip(keys, aux.tolist()):
        kth = int(row[1:-1].sort(descending=True).values[nsel - 3])
        assert t == kth or int((row[1:-1] >= t).sum()) == nsel - 2


def test_narrowing_search_model_takes_fewer_passes_on_wide_rows(monkeypatch):
    """The pass counter's mirror of ways=0 (2, 3, then 4 thresholds) over 4096 distinct keys: never more
    passes than the ternary search at its slowest, and fewer on average."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import select_ablation as sa

    g = torch.Generator().manual_seed(1)
    rows = [sa._sortable(torch.randn(4096, generator=g) * 10 ** float(e)) for e in range(-3, 4)]
    ternary = [sa.search_passes(r, 126, 2) for r in rows]
    narrowing = [sa.search_passes(r, 126, 0) for r in rows]
    assert max(narrowing) <= max(ternary) and sum(narrowing) < sum(ternary)
