"""quest_decode_staged_triton == the split chain (score -> select -> attention kernels), bit for bit.

The staged launches run the split kernels' own program bodies over row groups, so every group count
(one group, more groups than rows, ragged rows, an empty row, GQA sum, soft-capping, fp8 metadata)
gives exactly the split chain's pages and output."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve_patch.ops import reference as ref
from tinyserve_patch.ops.triton_decode import sparse_decode_attention_triton
from tinyserve_patch.ops.triton_pipeline import group_bounds, quest_decode_staged_triton
from tinyserve_patch.ops.triton_score import page_scores_triton
from tinyserve_patch.ops.triton_select import select_pages_triton
from tests.ops.kernel_cases import cache, gen, randn, rel_err, rows


def _split(q, k, v, meta, start, end, ps, n, sink, recent, red, scale, softcap=0.0, merge=None):
    scores = page_scores_triton(q, meta, start, end, ps, red)
    idx = select_pages_triton(scores, start, end, ps, n, sink, recent)
    return sparse_decode_attention_triton(q, k, v, idx, start, end, ps, scale, softcap, merge=merge), idx


def _case(b, h, g, d, ps, cap, dtype, seed, meta_dtype=None):
    gn = gen(seed)
    k, v, _ = cache(b, h, cap, d, ps, dtype, gn)
    start, end = rows(b, cap, gn, empty_row=b > 2)
    meta = ref.build_meta(k, cap, ps, dtype=meta_dtype) if meta_dtype else ref.build_meta(k, cap, ps)
    q = randn((b, h * g, d), dtype, gn)
    return q, k, v, meta, start, end


@pytest.mark.parametrize("groups", [1, 2, 3, 64])
@pytest.mark.parametrize("b,h,g,d,ps,cap,n", [(3, 2, 4, 32, 8, 128, 5), (1, 2, 2, 64, 16, 96, 2), (2, 1, 1, 16, 8, 64, 20)])
def test_staged_equals_split_chain(groups, b, h, g, d, ps, cap, n):
    q, k, v, meta, start, end = _case(b, h, g, d, ps, cap, torch.float32, 3 + groups)
    out, idx = quest_decode_staged_triton(q, k, v, meta, start, end, ps, n, 1, 1, "max", d**-0.5, groups=groups)
    expect_out, expect_idx = _split(q, k, v, meta, start, end, ps, n, 1, 1, "max", d**-0.5)
    assert torch.equal(idx, expect_idx)
    assert torch.equal(out, expect_out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_staged_half_precision_sum_softcap_inline_merge(dtype):
    q, k, v, meta, start, end = _case(3, 2, 2, 32, 8, 128, dtype, 11)
    out, idx = quest_decode_staged_triton(
        q, k, v, meta, start, end, 8, 4, 1, 2, "sum", 0.2, softcap=30.0, groups=2, merge="inline"
    )
    expect_out, expect_idx = _split(q, k, v, meta, start, end, 8, 4, 1, 2, "sum", 0.2, 30.0, merge="inline")
    assert torch.equal(idx, expect_idx)
    assert torch.equal(out, expect_out)
    ref_out = ref.sparse_decode_attention(q.float(), k.float(), v.float(), idx, start, end, 8, 0.2, 30.0)
    assert rel_err(out, ref_out) < 2e-2


def test_staged_fp8_meta():
    q, k, v, meta, start, end = _case(2, 2, 2, 32, 8, 96, torch.bfloat16, 5, meta_dtype=torch.float8_e4m3fn)
    out, idx = quest_decode_staged_triton(q, k, v, meta, start, end, 8, 3, 1, 1, "max", 0.1, groups=2)
    expect_out, expect_idx = _split(q, k, v, meta, start, end, 8, 3, 1, 1, "max", 0.1)
    assert torch.equal(idx, expect_idx)
    assert torch.equal(out, expect_out)


@settings(max_examples=8, deadline=None)
@given(
    b=st.integers(1, 3), h=st.integers(1, 3), g=st.sampled_from([1, 2, 4]), pages=st.integers(2, 12),
    n=st.integers(1, 14), groups=st.integers(1, 5), seed=st.integers(0, 2**16),
)
def test_staged_equals_split_chain_random_shapes(b, h, g, pages, n, groups, seed):
    ps, d = 8, 16
    q, k, v, meta, start, end = _case(b, h, g, d, ps, pages * ps, torch.float32, seed)
    out, idx = quest_decode_staged_triton(q, k, v, meta, start, end, ps, n, 1, 1, "max", 0.25, groups=groups)
    expect_out, expect_idx = _split(q, k, v, meta, start, end, ps, n, 1, 1, "max", 0.25)
    assert torch.equal(idx, expect_idx)
    assert torch.equal(out, expect_out)


def test_group_bounds_cover_every_pair_once():
    for pairs in (1, 2, 7, 64):
        for groups in (1, 2, 3, 100):
            bounds = group_bounds(pairs, groups)
            assert bounds[0] == 0 and bounds[-1] == pairs
            assert all(lo < hi for lo, hi in zip(bounds, bounds[1:]))
            assert len(bounds) - 1 == min(groups, pairs)


def test_staged_rejects_bad_input():
    q, k, v, meta, start, end = _case(1, 2, 2, 16, 8, 64, torch.float32, 1)
    with pytest.raises(ValueError, match="groups"):
        quest_decode_staged_triton(q, k, v, meta, start, end, 8, 2, 1, 1, "max", 0.25, groups=0)
    with pytest.raises(ValueError, match="num_select"):
        quest_decode_staged_triton(q, k, v, meta, start, end, 8, 0, 1, 1, "max", 0.25)
    with pytest.raises(ValueError, match="capacity"):
        quest_decode_staged_triton(q, k[:, :, :32], v[:, :, :32], meta, start, end, 8, 2, 1, 1, "max", 0.25)
