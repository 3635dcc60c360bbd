"""The timeline script's analysis on synthetic stamps, and the trace buffer's checks (no GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tl_mod(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from benchmarks import chain_timeline

    return chain_timeline


def _rec(kernel, spans, sm=0):
    """records of one launch: spans = [(start, ready, end)] in ns"""
    return {"kernel": kernel, "start": [s for s, _, _ in spans], "ready": [r for _, r, _ in spans],
            "end": [e for _, _, e in spans], "sm": [sm] * len(spans)}


def test_row_of_maps_every_grid_layout(tl_mod):
    rows, g, hkv = 4, 2, 2  # batch 2 x 2 KV heads, 2 query heads each
    # split score grid (rows, per_row): program = row + rows * j; chained (per_row, rows): j + per_row * row
    assert [tl_mod.row_of("score", "split", p, rows, 3, g, hkv) for p in range(12)] == [0, 1, 2, 3] * 3
    assert [tl_mod.row_of("attention", "chained", p, rows, 3, g, hkv) for p in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [tl_mod.row_of("select", "chained", p, rows, 1, g, hkv) for p in range(4)] == [0, 1, 2, 3]
    # merge program b * Hq + hq, Hq = 4: query heads 0-1 -> KV head 0, 2-3 -> KV head 1
    assert [tl_mod.row_of("merge", "split", p, rows, 2, g, hkv) for p in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_summarise_times_from_first_score_ready(tl_mod):
    us = 1000
    recs = [
        _rec("score", [(0, 1 * us, 10 * us), (0, 2 * us, 20 * us)]),  # split grid, 2 rows x 1 program
        _rec("select", [(5 * us, 21 * us, 25 * us), (6 * us, 21 * us, 30 * us)]),
        _rec("attention", [(22 * us, 31 * us, 40 * us), (23 * us, 31 * us, 45 * us)]),
        _rec("merge", [(40 * us, 46 * us, 47 * us)] * 4),  # b=1, hq=4: KV heads 0, 0, 1, 1
    ]
    s = tl_mod.summarise(recs, "split", rows=2, g=2, hkv=2)
    assert s["span"] == pytest.approx(46.0)  # merge last end (47) - first score ready (1)
    sel = s["kernels"]["select"]
    assert (sel["first_start"], sel["last_start"], sel["first_ready"], sel["last_end"]) == pytest.approx((4, 5, 20, 29))
    assert sel["median_busy"] == pytest.approx(6.5)
    assert s["rows"]["score_done"] == pytest.approx([9, 19])
    assert s["rows"]["select_end"] == pytest.approx([24, 29])
    assert s["rows"]["attention_end"] == pytest.approx([39, 44])
    assert s["rows"]["attention_ready"] == pytest.approx([30, 30])
    assert s["rows"]["attention_but_last"] == pytest.approx([39, 44])  # one program per row: its own end
    # streaming (score, attention) programs busy over [0, 19] and [30, 44]: idle 19-30 and 44-46
    assert s["memory_idle"] == pytest.approx(13.0)
    assert tl_mod.busy_union([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == pytest.approx(4.0)
    med = tl_mod.median_summary([s, s, s])
    assert med["span"] == pytest.approx(46.0) and med["rows"]["select_end"] == pytest.approx([24, 29])
    doc = {"device": "test", "versions": {}, "commit": "x", "date": "d", "args": {}, "results": [
        {"model": "m", "batch": 1, "tokens": 16384, "budget": 4096, "mode": "split", "graph_us_per_step": 40.0,
         "median": med, "steps": [s], "raw_middle_step": recs}]}
    text = tl_mod.render(doc)
    assert "span 46.0 us" in text and "memory idle 13.0 us" in text and "| select | 2 | 4.0 | 5.0 | 20.0 |" in text
    assert "selection end - scores done, per row: min 10.0" in text
    assert "attention tail: the row ending last (1) is ready at 30.0, all but its last program end by 44.0" in text
    assert "Recorded before the script timed dense SDPA" in text  # this result has no dense_sdpa_us
    doc["results"][0]["dense_sdpa_us"] = 480.0
    text = tl_mod.render(doc)
    assert "dense SDPA 480.0 us in the same run" in text and "Recorded before" not in text


def test_attention_tail_per_row(tl_mod):
    """Chained attention grid (per_row, rows): per row its first ready stamp, the end of all but its last
    program and the last end (the inline merge runs in that last program)."""
    us = 1000
    recs = [
        _rec("score_select", [(0, 0, 10 * us)] * 2 + [(0, 0, 20 * us)] * 2),  # 2 rows x 2 programs
        _rec("attention", [(5 * us, 12 * us, 18 * us), (5 * us, 11 * us, 25 * us),  # row 0: ready 11, ends 18 / 25
                           (6 * us, 22 * us, 30 * us), (6 * us, 21 * us, 31 * us)]),  # row 1: ready 21, ends 30 / 31
    ]
    s = tl_mod.summarise(recs, "fused_chained", rows=2, g=4, hkv=2)
    assert s["rows"]["attention_ready"] == pytest.approx([11, 21])
    assert s["rows"]["attention_but_last"] == pytest.approx([18, 30])
    assert s["rows"]["attention_end"] == pytest.approx([25, 31])
    res = {"model": "m", "batch": 1, "tokens": 65536, "budget": 2048, "mode": "fused_chained", "graph_us_per_step": 33.0,
           "median": tl_mod.median_summary([s]), "steps": [s], "raw_middle_step": recs, "dense_sdpa_us": 100.0}
    text = tl_mod.render_one(res)
    assert "the row ending last (1) is ready at 21.0, all but its last program end by 30.0, its last at 31.0 us" in text
    assert "by median 4.0 / max 7.0 us" in text  # each row's last program after its others: 7 and 1


def test_parse_shape(tl_mod):
    assert tl_mod.parse_shape("llama3-8b:8:65536:2048") == ("llama3-8b", 8, 65536, 2048)


def test_kernel_trace_needs_cuda_and_room():
    from tinyserve_patch.ops.trace import KernelTrace

    with pytest.raises(ValueError, match="CUDA device"):
        KernelTrace("cpu")
    if torch.cuda.is_available():
        tr = KernelTrace("cuda", capacity=8)
        tr.region("score", 6, tr.buffer.device)
        with pytest.raises(ValueError, match="trace full"):
            tr.region("select", 3, tr.buffer.device)
