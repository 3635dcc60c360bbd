"""The end-to-end benchmark's CPU smoke grid runs every mode (fp8 K/V and chunked prefill included) and
writes a complete JSON; its plots/table script reads it back."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_e2e_smoke_grid(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import bench_e2e, plot_e2e

    out = tmp_path / "e2e.json"
    assert bench_e2e.main(["--smoke", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["device_type"] == "cpu" and doc["versions"]["torch"]
    rows = doc["rows"]
    assert rows and all(r["status"] == "ok" for r in rows), [(r["mode"], r["reason"]) for r in rows if r["status"] != "ok"]
    modes = {r["mode"] for r in rows}
    assert {"hf_dynamic", "hf_static", "ts_dense", "ts_sparse", "ts_sparse_eager", "ts_fused"} <= modes
    fp8 = [r for r in rows if r["kv_dtype"] == "fp8_e4m3"]
    assert fp8 and all(r["prefill_chunk"] and r["decode_ms"] > 0 for r in fp8)
    sparse = [r for r in rows if r["mode"].startswith("ts_sparse") and r["budget"] and r["context"] > r["budget"]]
    assert all(r["fraction_read"] < 1 and r["budget_respected"] for r in sparse)
    assert plot_e2e.main([str(out), "--outdir", str(tmp_path)]) == 0
