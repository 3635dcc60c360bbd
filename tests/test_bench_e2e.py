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
    synthetic = [r for r in rows if r["synthetic"]]
    assert {r["mode"] for r in synthetic} == {"hf_static", "ts_dense", "ts_sparse", "ts_split"}
    assert all(r["generated_tokens"] == r["new_tokens"] for r in synthetic)
    assert all(r["fraction_read"] < 1 for r in synthetic if r["budget"])
    assert [r["fused"] for r in synthetic if r["budget"]] == ["auto", False]
    ratios = {e["row"]: e for e in doc["speedups"]}
    assert all(e["vs_hf_static"] > 0 and e["vs_ts_dense"] > 0 for row, e in ratios.items() if "synthetic" in row)
    assert plot_e2e.main([str(out), "--outdir", str(tmp_path)]) == 0


def test_fill_synthetic_rewinds_and_appends_through_update(monkeypatch):
    """The --synthetic-context fill: a cache that already ran is rewound (buffers kept) and holds exactly
    ``context`` random tokens per row; a TinyServeCache's page metadata is the min / max of those keys."""
    monkeypatch.syspath_prepend(str(ROOT))
    import torch
    from benchmarks import bench_e2e
    from transformers import StaticCache

    import tinyserve_patch as tp
    from tinyserve_patch.hf_compat import CACHE_KWARG
    from tinyserve_patch.ops import reference

    model = bench_e2e.build_model("tiny", torch.device("cpu"), torch.float32, 256)
    dims = bench_e2e.model_dims("tiny")
    batch, context, page = 2, 44, 8
    tp.patch_model(model, token_budget=32, page_size=page)
    ts_cache = tp.make_cache(model, batch, context + 4)
    hf_cache = StaticCache(config=model.config, max_cache_len=context + 4)
    ids = torch.randint(3, 500, (batch, 20))
    model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, **{CACHE_KWARG: ts_cache})
    tp.unpatch_model(model)
    model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, **{CACHE_KWARG: hf_cache})
    for cache in (ts_cache, hf_cache):
        keys_before = cache.layers[0].keys
        bench_e2e.fill_synthetic(cache, batch, context, dims["kv_heads"], dims["head_dim"], torch.float32, torch.device("cpu"))
        assert int(cache.get_seq_length()) == context
        assert cache.layers[0].keys is keys_before  # rewound in place
    for layer in ts_cache.layers:
        assert layer.row_lengths().tolist() == [context] * batch
        pages = -(-context // page)
        for p in range(pages):
            block = layer.keys[:, :, p * page : min(context, (p + 1) * page)]
            lo, hi = reference.page_bounds(block, 2, layer.meta.dtype)
            assert torch.equal(layer.meta[:, :, p, 0], lo) and torch.equal(layer.meta[:, :, p, 1], hi)
        assert layer.keys[:, :, :context].abs().sum() > 0
    for ts_layer, hf_layer in zip(ts_cache.layers, hf_cache.layers):  # same seed: the same random tokens
        assert torch.equal(ts_layer.keys[:, :, :context], hf_layer.keys[:, :, :context])


def test_kernel_time_summary_groups_per_step(monkeypatch):
    """--profile-steps' summary: per-step totals, groups by the first matching name pattern, heaviest first."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import bench_e2e

    per_name = {
        "_decode_split_kernel": (4.0, 8),
        "nvjet_sm90_tst_64x8_TNT": (2.0, 16),
        "triton_poi_fused_add_mul_0": (1.0, 8),
        "void at::native::vectorized_elementwise_kernel": (0.5, 4),
        "cudnn_generated_fort_native_sdpa_sm80_flash_fprop": (0.5, 4),
    }
    out = bench_e2e.kernel_time_summary(per_name, steps=4)
    assert out["kernel_ms_per_step"] == 2.0 and out["kernels_per_step"] == 10.0
    assert out["groups_ms_per_step"] == {"tinyserve": 1.0, "gemm": 0.5, "inductor fused": 0.25,
                                         "other": 0.125, "flash / sdpa": 0.125}
    # inductor's kernel names carry the ops they fuse: never taken for the package's kernels
    assert bench_e2e.kernel_group("triton_poi_fused_select_scatter_0") == "inductor fused"
    assert bench_e2e.kernel_group("triton_red_fused__scaled_dot_product_cudnn_attention_1") == "inductor fused"
    assert bench_e2e.kernel_group("_select_kernel") == "tinyserve"
    assert [k["name"] for k in out["top"][:2]] == ["_decode_split_kernel", "nvjet_sm90_tst_64x8_TNT"]
    assert out["top"][0] == {"name": "_decode_split_kernel", "ms_per_step": 1.0, "calls_per_step": 2.0}
