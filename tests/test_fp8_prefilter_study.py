"""The fp8 pre-filter study's bounds (no model: random keys): the inner fp8 bound never exceeds the exact
Quest score, the outer one never falls below it, and the candidates always hold the exact top-k."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("seed", range(4))
def test_candidates_hold_the_exact_top_k(seed, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import fp8_prefilter_study as st

    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 64 * st.PAGE, 32, generator=g) * (0.05 + 3 * seed)  # small to large magnitudes
    q = torch.randn(8, 32, generator=g)
    stats = st.step_stats(q, keys, k_sel=6)
    assert stats["held"] and stats["pages"] == 64
    assert 6 / 64 <= stats["candidates"] <= stats["max_candidates"] <= 1.0


def test_fp8_step_moves_one_grid_point(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.fp8_prefilter_study import fp8_step

    x8 = torch.tensor([-2.0, -0.0, 0.0, 1.0, 1.5, 240.0]).to(torch.float8_e4m3fn)
    up, down = fp8_step(x8, up=True), fp8_step(x8, up=False)
    assert torch.all(up > x8.float()) and torch.all(down < x8.float())
    assert up[3].item() == 1.125 and down[3].item() == 0.9375  # e4m3: 8 steps per binade
