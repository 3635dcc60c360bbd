"""The kernel benchmark's target verdicts and report, from a recorded run's rows (no GPU needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
K = 1024


def _row(model, batch, tokens, kind, budget, ms, speedup=None, pct=50.0):
    r = {"model": model, "batch": batch, "tokens": tokens, "kind": kind, "budget": budget, "eager_ms": ms * 2,
         "eager_pct_floor": pct / 2, "floor_ms": ms * pct / 100, "graph_ms": ms, "graph_pct_floor": pct}
    if speedup is not None:
        r["graph_speedup"] = r["eager_speedup"] = speedup
    return r


def _doc():
    rows = [
        _row("llama3-8b", 8, 64 * K, "dense_sdpa", 64 * K, 0.7, 1.0, 100),
        _row("llama3-8b", 8, 64 * K, "score", 2048, 0.05, pct=93),
        _row("llama3-8b", 8, 64 * K, "score", 4096, 0.05, pct=69),  # the worst budget decides
        dict(_row("llama3-8b", 8, 64 * K, "copy_meta", 64 * K, 0.09, pct=88), bytes=134.2e6),  # the size's reference
        _row("llama3-8b", 8, 64 * K, "total_split", 2048, 0.0875, 8.0),
        _row("llama3-8b", 8, 64 * K, "total_split_fp8meta", 2048, 0.07, 10.0),
        _row("tinyllama", 1, 16 * K, "total_split", 2048, 0.012, 1.05),
        _row("tinyllama", 1, 16 * K, "total_split", 4096, 0.0145, 0.88),
        _row("tinyllama", 1, 16 * K, "score", 2048, 0.003, pct=11),  # below 64K: no score verdict
    ]
    return {"device": "GPU", "versions": {"torch": "x"}, "commit": "abc", "date": "today", "copy_bandwidth_Bps": 3e12,
            "args": {"rep": 60}, "rows": rows}


def test_targets_judge_each_shape_on_graph_timings(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.bench_kernels import targets

    lines = targets(_doc()["rows"])
    assert lines[0].startswith("PASS") and "8.00x" in lines[0] and "fp8 page metadata: 10.00x" in lines[0]
    b1 = [line for line in lines if "B=1 16K" in line]
    assert [line[:4] for line in b1] == ["PASS", "FAIL"] and "budget 4096" in b1[1]
    score = [line for line in lines if "byte floor" in line]
    assert len(score) == 1 and score[0].startswith("FAIL") and "69.0%" in score[0]
    assert "a device copy moving 134.2 MB: 88.0%" in score[0]
    assert targets([])[0].startswith("N/A")


def test_report_rewrites_the_markdown_of_a_recorded_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import bench_kernels

    path = tmp_path / "kernels.json"
    path.write_text(json.dumps(_doc()))
    assert bench_kernels.main(["--report", str(path)]) == 0
    md = (tmp_path / "kernels.md").read_text()
    assert "commit abc" in md and "## Targets" in md and "| llama3-8b | 8 | 64K | 2048 | total_split |" in md
    assert "| llama3-8b | 8 | 64K | - | copy_meta |" in md


def test_fused_chain_options_parse():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_kernels

    assert bench_kernels.parse_options("num_splits=8,merge=inline,blocks_per_program=2,finish=32") == {
        "num_splits": 8, "merge": "inline", "fused_options": {"blocks_per_program": 2, "finish": 32}}
    assert bench_kernels.parse_options("") == {}
    assert bench_kernels.parse_options("attn_block_n=64,attn_num_stages=3,num_splits=16") == {
        "attention_options": {"block_n": 64, "num_stages": 3}, "num_splits": 16}


def test_score_plan_parse_and_tag():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_kernels

    assert bench_kernels.parse_plan("blocks_per_program=4,num_stages=4") == {"blocks_per_program": 4, "num_stages": 4}
    assert bench_kernels.plan_tag("blocks_per_program=8,num_warps=8") == "p8w8"
    assert bench_kernels.parse_plan("tma=0") == {"tma": 0} and bench_kernels.plan_tag("tma=1,blocks_per_program=2") == "t1p2"
    for bad in ("stages=4", "num_stages=x", "num_stages"):
        with pytest.raises(ValueError, match="score plan item"):
            bench_kernels.parse_plan(bad)
    with pytest.raises(SystemExit):
        bench_kernels.parse_args(["--score-plan", "num_stages=two"])
    keys = bench_kernels.ATTENTION_PLAN_KEYS
    assert bench_kernels.parse_plan("block_n=64,num_stages=3", keys) == {"block_n": 64, "num_stages": 3}
    assert bench_kernels.plan_tag("block_n=64,num_stages=3", keys) == "n64s3"
    with pytest.raises(ValueError, match="attention plan item"):
        bench_kernels.parse_plan("blocks_per_program=2", keys, "attention")
    with pytest.raises(SystemExit):
        bench_kernels.parse_args(["--attention-plan", "block_p=64"])


def test_persistent_options_parse():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_kernels

    assert bench_kernels.parse_args([]).persistent is None  # not timed unless asked
    assert bench_kernels.parse_args(["--persistent"]).persistent == []  # the default plan only
    assert bench_kernels.parse_args(["--persistent", "lag=16,programs=264", "num_warps=4"]).persistent == ["lag=16,programs=264", "num_warps=4"]
    assert bench_kernels.parse_plan("lag=16,programs=264", bench_kernels.PERSISTENT_KEYS, "persistent") == {"lag": 16, "programs": 264}
    for bad in ("lags=4", "lag=-1", "lag"):
        with pytest.raises(SystemExit):
            bench_kernels.parse_args(["--persistent", bad])
