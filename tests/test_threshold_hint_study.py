"""The threshold-hint study's search model (no model: random scores): a hinted search costs at most one
pass more than the plain one when the hint is far off, and the per-launch summary takes the slowest head."""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_hint_bracket_holds_the_kth_key_and_a_close_hint_saves_passes(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import threshold_hint_study as st
    from benchmarks.select_ablation import _sortable, search_passes

    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        scores = torch.randn(512, generator=g) * 3
        k = 32
        keys = _sortable(scores)
        t = scores.topk(k).values[-1].item()
        kth = int(keys.sort(descending=True).values[k - 1])
        for hint, margin in ((t, 0.001), (t * 5 + 40.0, 0.05), (-t - 40.0, 0.1), (t + 0.3, 0.02)):
            bracket = st.hint_bracket(keys, k, hint, margin)
            if bracket is None:  # a count hit k exactly
                continue
            lo, hi, n_lo, above = bracket
            assert lo <= kth <= hi
            assert n_lo == int((keys >= lo).sum()) and above == int((keys > hi).sum())
        assert st.hinted_passes(keys, k, t, 0.001) <= search_passes(keys, k, st.WAYS)  # the exact t as hint


def test_summary_takes_the_slowest_head_of_each_launch(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import threshold_hint_study as st

    rows = [dict(budget=128, layer=2, start=0, position=5, head=h, move=0.1 * (h + 1), plain=4 + h, **{"hinted_0.1": 3})
            for h in range(2)]
    s = st.summarize(rows, [0.1])["128"]
    assert s["launches"] == 1 and s["plain"]["slowest_row_max"] == 5 and s["plain"]["mean_passes"] == 4.5
    assert s["hinted_0.1"]["slowest_row_mean"] == 3
