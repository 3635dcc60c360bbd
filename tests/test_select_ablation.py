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
