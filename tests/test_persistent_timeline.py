"""The persistent timeline's analysis on synthetic stamps (no GPU): its queue order is the kernel's, its
summary reads item times right, unstamped records are dropped instead of stretching the span."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pt(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from benchmarks import persistent_timeline

    return persistent_timeline


@pytest.mark.skipif(torch.cuda.is_available(), reason="the kernel's order runs under the CPU interpreter")
@pytest.mark.parametrize("rows,lag,score_items,splits", [(3, 1, 2, 2), (5, 0, 3, 1), (4, 4, 1, 3), (6, 2, 4, 5)])
def test_items_follow_the_kernels_queue_order(pt, rows, lag, score_items, splits):
    from tests.ops.kernel_cases import queue_order

    total = rows * (score_items + splits)
    rec = {"start": [1] * total, "ready": [2] * total, "end": [3] * total}
    items = pt._items_persistent(rec, rows, lag, score_items, splits)
    assert [(int(it["kind"] == "score"), it["row"]) for it in items] == [o[:2] for o in queue_order(rows, lag, score_items, splits)]


def test_summary_of_a_small_step(pt):
    us = 1000
    t = 10**12  # global timer origin
    items = [  # row 0: two score items, the second selects (scored at 3, selected at 7); one attention item
        {"kind": "score", "row": 0, "start": t, "ready": t + 2 * us, "end": t + 2 * us},
        {"kind": "score", "row": 0, "start": t, "ready": t + 3 * us, "end": t + 7 * us},
        {"kind": "attention", "row": 0, "start": t + 1 * us, "ready": t + 7 * us, "end": t + 9 * us},
        {"kind": "attention", "row": 0, "start": 0, "ready": 0, "end": 0},  # never stamped: dropped
    ]
    s = pt.summarise(items, 1)
    assert s["span"] == 9 and s["score_end"] == 3 and s["unstamped"] == 1
    assert s["select_median"] == s["select_max"] == 4 and s["rows_selected_last"] == 7
    assert s["attn_wait"] == 6 and s["attn_busy"] == 2 and s["attn_first_ready"] == 7
    assert s["score_busy"] == 2.5
    # open at once: 2 during [0, 1), 3 during [1, 2), 2 during [2, 7), 1 during [7, 9): median 2
    assert s["concurrent"] == 2


def test_concurrency_is_a_sweep_not_a_sampling(pt):
    assert pt.concurrency([(0.0, 1.0), (0.0, 1.0), (0.5, 2e12)]) == 1.0  # a huge span ends at once
    assert pt.concurrency([(0.0, 4.0), (0.0, 4.0), (1.0, 4.0)]) == 3.0  # 2 open for 1 us, 3 for 3 us


def test_fused_chain_items_take_the_selecting_program_apart(pt):
    recs = [
        {"kernel": "score_select", "start": [1, 1, 1, 1], "ready": [2, 2, 2, 2], "end": [5, 9, 4, 6], "sm": [0] * 4},
        {"kernel": "attention", "start": [3, 3], "ready": [9, 6], "end": [12, 8], "sm": [0] * 2},
    ]
    items = pt._items_fused_chain(recs, 2)  # 2 rows: score programs 2 a row, attention 1 a row
    score = [it for it in items if it["kind"] == "score"]
    assert [(it["row"], it["start"], it["ready"], it["end"]) for it in score] == [(0, 2, 5, 5), (0, 2, 5, 9), (1, 2, 4, 4), (1, 2, 4, 6)]
    assert [(it["row"], it["start"], it["ready"]) for it in items if it["kind"] == "attention"] == [(0, 3, 9), (1, 3, 6)]


def test_two_grid_items(pt):
    recs = [
        {"kernel": "persistent_score", "start": [1, 1, 2, 2], "ready": [3, 4, 5, 6], "end": [3, 8, 5, 9], "sm": [0] * 4},
        {"kernel": "persistent_attention", "start": [1, 1, 1], "ready": [9, 9, 10], "end": [11, 12, 13], "sm": [0] * 3},
    ]
    items = pt._items_two_grids(recs, 2, 2)  # 2 score items a row, 2 splits a row
    assert [(it["kind"], it["row"]) for it in items] == [("score", 0), ("score", 0), ("score", 1), ("score", 1),
                                                          ("attention", 0), ("attention", 0), ("attention", 1)]
    s = pt.summarise([{**it, "start": it["start"] * 1000, "ready": it["ready"] * 1000, "end": it["end"] * 1000} for it in items], 2)
    assert s["select_max"] == 4 and s["attn_first_ready"] == 8 and s["span"] == 12


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer")
def test_needs_a_gpu(pt, capsys):
    assert pt.main(["--calls", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
