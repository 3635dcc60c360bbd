"""The offline sm_90 resource report compiles the decode chain's kernels exactly as the launchers would
launch them (no GPU: Triton's bundled ptxas) and reads properties the kernels rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_resource_report_on_a_small_shape(tmp_path):
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no bundled ptxas")
    out = tmp_path / "rr.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real compile, not the interpreter
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/resource_report.py"), "--model", "tinyllama", "--batch", "1",
         "--tokens", "4096", "--budget", "1024", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["kernel"]: r for r in json.loads(out.read_text())["rows"]}
    chained = ["score (chained)", "select (chained)", "attention (chained)"]
    fp8 = ["score (fp8 metadata)", "attention (fp8 K/V)"]
    big = "score (over 8 MiB of metadata)"
    searches = ["select (narrowing search)", "select (ranking the last 64 keys)"]
    tma = ["score (TMA read, one block a program)", "score + select (fused chain, TMA read)"]
    pages_major = ["score (pages-major products)", "score (pages-major products, fp8 metadata)", "score (pages-major products, TMA read)",
                   "score + select (fused chain, pages-major products)"]
    assert set(rows) == {"score", "select", "attention", "merge", *searches, *chained, *fp8, "score + select (fused chain)",
                         "persistent decode", "persistent decode, two grids: score", "persistent decode, two grids: attention", big,
                         *tma, *pages_major}
    # the TMA reads: the metadata as bulk copies (fewer cp.async left than the metadata's), one program a
    # 64-page block (4 KV heads x 4 blocks); the fused kernel keeps its register cap with them
    for name, plain in zip(tma, ("score", "score + select (fused chain)")):
        assert rows[name]["utmaldg"] > 0 and rows[name]["ldgsts"] < rows[plain]["ldgsts"], (rows[name], rows[plain])
    assert rows["score"]["utmaldg"] == 0 and rows[tma[0]]["ctas"] == 4 * 4
    assert rows[tma[1]]["regs"] <= 65536 // (3 * 32 * rows[tma[1]]["num_warps"])
    # the pages-major products run as warpgroup MMAs (HGMMA) and no mma.sync; the default products the other way round
    for name in pages_major:
        assert rows[name]["hgmma"] > 0 and rows[name]["hmma"] == 0, rows[name]
    assert rows["score"]["hgmma"] == 0 and rows["score"]["hmma"] > 0
    # the fused chain's register cap (fused_chain_plan) holds without spills
    fused = rows["score + select (fused chain)"]
    assert fused["regs"] <= 65536 // (3 * 32 * fused["num_warps"]) and fused["ctas"] == rows["score"]["ctas"]
    assert rows["merge"]["ctas"] == 32  # one program per query head (batch 1, 32 heads)
    # the persistent decode keeps the fused kernel's cap and its 3 CTAs per SM: 3 programs an SM, at most one
    # per item (4 rows x (4 score items + 8 attention splits of 128 tokens))
    persistent = rows["persistent decode"]
    assert persistent["regs"] <= 65536 // (3 * 32 * persistent["num_warps"]) and persistent["ctas_per_sm"] >= 3
    assert persistent["ctas"] == min(3 * 132, 4 * (4 + 8))
    # two grids: two score programs and one attention program fit one SM together (registers and the 228 KB
    # of shared memory less 1 KB reserved per CTA), so the attention grid is resident beside the scoring
    two_s, two_a = rows["persistent decode, two grids: score"], rows["persistent decode, two grids: attention"]
    assert 2 * two_s["regs"] * 32 * two_s["num_warps"] + two_a["regs"] * 32 * two_a["num_warps"] <= 65536
    assert 2 * two_s["smem_bytes"] + two_a["smem_bytes"] + 3 * 1024 <= 228 * 1024
    assert two_s["ctas"] == min(2 * 132, 4 * 4) and two_a["ctas"] == min(132, 4 * 8)
    for r in rows.values():
        assert 0 < r["regs"] <= 255 and r["local_bytes"] == 0, r  # no spills
        assert r["ctas_per_sm"] >= 1 and r["sass_instructions"] > 0
    # 1 query group x 4 KV heads x 4096 / 16 pages: the launch the score planner makes for 1 row
    assert rows["score"]["ctas"] == 4 * 4 and rows["select"]["ctas"] == 4
    # the attention's page gathers are 16-byte cp.async copies (pipelined through shared memory) feeding
    # tensor-core products; the selection's contiguous score row (stride 1, specialised) loads vectorised
    # (2 scores per thread here: 8 bytes; 16 at >= 4 per thread)
    assert rows["attention"]["ldgsts"] > 0 and rows["attention"]["hmma"] > 0
    assert rows["select"]["ldg_128"] + rows["select"]["ldg_64"] > 0
    # the row-chained mode (ops/triton_chain.py) keeps each kernel's launch and occupancy: its spin-waits and
    # counters cost no CTA per SM. (The score here is a one-block plan, 16 programs on 132 SMs, whose
    # one-iteration loop the two modes allocate registers for differently; no SM ever holds two of them.)
    for name in chained:
        split = rows[name.removesuffix(" (chained)")]
        assert rows[name]["ctas"] == split["ctas"], name
        if name != "score (chained)":
            assert rows[name]["ctas_per_sm"] == split["ctas_per_sm"], name
        else:
            assert split["ctas"] <= 132 and min(rows[name]["ctas_per_sm"], split["ctas_per_sm"]) >= 1
    # the scoring kernels prefetch into L2 before their PDL wait (bulk prefetches with warp-uniform operands:
    # one instruction each, no loop over distinct values): every warp its share of the walk (over 8 MiB of
    # metadata, of its head), and the query group. Nothing else does
    scoring = ["score", "score (chained)", "score (fp8 metadata)", "score + select (fused chain)", big, *tma, *pages_major]
    for name, r in rows.items():
        assert r["ublkpf"] == (2 if name in scoring else 0), (name, r["ublkpf"])
        assert r["ublkpf_before_wait"] == r["ublkpf"], (name, r)
    # fp8 metadata / K/V against a bfloat16 query: products in fp16 on a scaled query, so no scalar F2F
    # conversion per loaded value (the fp8 -> bf16 upcast took two per pair and made both kernels
    # conversion-bound on the H200)
    for name in fp8:
        assert rows[name]["f2f"] == 0 and rows[name]["hmma"] > 0, rows[name]


def test_score_shared_bytes_matches_the_sm90_compile(tmp_path):
    """triton_score.score_shared_bytes (the score plan's occupancy estimate) equals the shared memory of the
    score kernel compiled for sm_90 by the installed Triton, at head_dim 64 and 128, bf16 and fp8, 2-4
    stages (a real compile in a subprocess: the tests run under the interpreter)."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no bundled ptxas")
    script = tmp_path / "smem.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path[:0] = [{str(ROOT / 'benchmarks')!r}, {str(ROOT)!r}]\n"
        "import resource_report as rr\n"
        "from tinyserve_patch.ops import triton_score as ts\n"
        "dev = torch.device('meta')\n"
        "for d, dtype, stages in [(64, torch.bfloat16, 3), (128, torch.bfloat16, 2), (128, torch.bfloat16, 4),\n"
        "                         (128, torch.float8_e4m3fn, 2), (64, torch.float8_e4m3fn, 3)]:\n"
        "    q = torch.empty(2, 8, d, dtype=torch.bfloat16, device=dev)\n"
        "    meta = torch.empty(2, 2, 1024, 2, d, dtype=dtype, device=dev)\n"
        "    s = torch.empty(2, dtype=torch.int32, device=dev)\n"
        "    launch = rr.capture_launch(ts._score_kernel, lambda: ts.page_scores_triton(q, meta, s, s, 16, 'max',\n"
        "                               blocks_per_program=4, num_stages=stages))\n"
        "    got = rr.report('score', ts._score_kernel, launch)['smem_bytes']\n"
        "    want = ts.score_shared_bytes(ts.default_block_p(d), d, dtype.itemsize, stages)\n"
        "    print(d, dtype, stages, got, want)\n"
        "    assert got == want, (d, dtype, stages, got, want)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
