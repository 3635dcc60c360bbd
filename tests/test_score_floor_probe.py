"""The probe's TMA score walk (benchmarks/score_floor_probe.py) equals the reference under the interpreter."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from score_floor_probe import score_tma  # noqa: E402

from tinyserve_patch.ops import reference as ref  # noqa: E402


@pytest.mark.parametrize("batch,hq,hkv,d,pages,per", [(1, 8, 2, 64, 200, 2), (2, 4, 4, 128, 64, 1), (1, 4, 1, 64, 130, 4)])
def test_score_tma_matches_reference(batch, hq, hkv, d, pages, per):
    torch.manual_seed(pages)
    q = torch.randn(batch, hq, d, dtype=torch.bfloat16)
    keys = torch.randn(batch, hkv, pages, 16, d, dtype=torch.bfloat16)
    meta = torch.stack([keys.amin(3), keys.amax(3)], dim=3).contiguous()
    # ragged rows whose valid range starts and ends inside a page; pages past a row's last one read the
    # next head's metadata and must still come out -inf
    start = torch.tensor([5, 40][:batch], dtype=torch.int32)
    end = torch.tensor([pages * 16 - 7, pages * 8][:batch], dtype=torch.int32)
    got = score_tma(q, meta, start, end, 16, per, pdl=False)
    want = ref.page_scores(q, meta, start, end, 16, "max")
    assert torch.equal(got.isneginf(), want.isneginf())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
