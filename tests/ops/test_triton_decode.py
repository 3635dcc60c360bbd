"""sparse_decode_attention_triton vs reference.sparse_decode_attention (fp32: 1e-5, fp16/bf16: 1e-2 relative)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve_patch.ops import reference as ref
from tinyserve_patch.ops.triton_decode import MERGE_TILE_ELEMS, default_stages, merge_tile, plan_splits, sparse_decode_attention_triton
from tests.ops.kernel_cases import DEVICE, cache, gen, randn, random_indices, rel_err, rows

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def _check(q, k, v, idx, start, end, ps, scale, softcap, num_splits=None, **kw):
    out = sparse_decode_attention_triton(q, k, v, idx, start, end, ps, scale, softcap, num_splits=num_splits, **kw)
    # reference in fp32 from the same (rounded) inputs
    expect = ref.sparse_decode_attention(q.float(), k.float(), v.float(), idx, start, end, ps, scale, softcap)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert rel_err(out, expect) < TOL[q.dtype], rel_err(out, expect)
    empty = end <= start
    assert (out[empty] == 0).all()  # rows with no valid token give zeros
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,g,d,ps,cap,sel", [(2, 2, 4, 64, 8, 128, 5), (1, 2, 1, 16, 16, 64, 3), (2, 1, 2, 32, 8, 96, 20), (1, 1, 3, 80, 8, 64, 4)])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_decode_matches_reference(dtype, b, h, g, d, ps, cap, sel, softcap):
    gn = gen(9)
    k, v, _ = cache(b, h, cap, d, ps, dtype, gn)
    q = randn((b, h * g, d), dtype, gn)
    idx = random_indices(b, h, cap // ps, sel, gn, pad=1)
    start, end = rows(b, cap, gn, empty_row=True)
    _check(q, k, v, idx, start, end, ps, d**-0.5, softcap)


@pytest.mark.parametrize("num_splits", [1, 2, 3])
def test_decode_split_counts_agree(num_splits):
    """One split writes the output directly; several go through the workspace + merge kernel."""
    gn = gen(10)
    k, v, _ = cache(2, 2, 256, 32, 8, torch.bfloat16, gn)
    q = randn((2, 4, 32), torch.bfloat16, gn)
    idx = random_indices(2, 2, 32, 24, gn, pad=3)
    start, end = rows(2, 256, gn, empty_row=True)
    _check(q, k, v, idx, start, end, 8, 0.2, 0.0, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_into_a_slice_of_a_larger_output(num_splits):
    """out=: the result lands in a strided slice (rows of a larger batch, or some KV heads' query heads)
    and nothing around it is touched; a wrong shape, dtype or layout is refused."""
    gn = gen(12)
    k, v, _ = cache(3, 2, 128, 32, 8, torch.float32, gn)
    q = randn((3, 4, 32), torch.float32, gn)
    idx = random_indices(3, 2, 16, 6, gn, pad=1)
    start, end = rows(3, 128, gn, empty_row=False)
    want = sparse_decode_attention_triton(q, k, v, idx, start, end, 8, 0.2, num_splits=num_splits)
    big = torch.full((5, 6, 32), 7.0, device=q.device)
    got = sparse_decode_attention_triton(q, k, v, idx, start, end, 8, 0.2, num_splits=num_splits, out=big[1:4, 2:6])
    assert got.data_ptr() == big[1:4, 2:6].data_ptr() and torch.equal(big[1:4, 2:6], want)
    rest = big.clone()
    rest[1:4, 2:6] = 7.0
    assert (rest == 7.0).all()
    # per KV head: the query heads of KV head 1 alone, written into their slice
    part = torch.zeros_like(q)
    sparse_decode_attention_triton(q[:, 2:], k[:, 1:], v[:, 1:], idx[:, 1:], start, end, 8, 0.2, out=part[:, 2:])
    assert torch.allclose(part[:, 2:], want[:, 2:], atol=1e-6)
    with pytest.raises(ValueError, match="out"):
        sparse_decode_attention_triton(q, k, v, idx, start, end, 8, 0.2, out=torch.empty(3, 4, 16, device=q.device))
    with pytest.raises(ValueError, match="out"):
        sparse_decode_attention_triton(q, k, v, idx, start, end, 8, 0.2, out=torch.empty(3, 4, 32, device=q.device, dtype=torch.float16))


def test_merge_tile_reads_every_split_at_once_while_it_fits():
    assert merge_tile(5, 128) == 8 and merge_tile(32, 64) == 32 and merge_tile(64, 128) == 64
    assert merge_tile(100, 128) == MERGE_TILE_ELEMS // 128  # chunked beyond the tile
    assert merge_tile(40, 256) == 32
    assert merge_tile(40, 64, chunk=16) == 16 and merge_tile(3, 64, chunk=16) == 4
    with pytest.raises(ValueError, match="merge_chunk"):
        merge_tile(8, 64, chunk=0)


@pytest.mark.parametrize("d,num_splits,merge_chunk", [(32, 24, None), (32, 24, 4), (32, 24, 1), (256, 48, None)])
def test_decode_merge_tiles_agree(d, num_splits, merge_chunk):
    """The merge over all splits in one tile (default), in chunks of them, and chunked because a tile of
    ``[splits, head_dim]`` would not fit (head_dim 256, 46 splits: chunks of 32) give the reference."""
    gn = gen(13)
    k, v, _ = cache(1, 2, 1024, d, 16, torch.bfloat16, gn)
    q = randn((1, 4, d), torch.bfloat16, gn)
    idx = random_indices(1, 2, 64, 48, gn, pad=2)
    start, end = rows(1, 1024, gn)
    out = _check(q, k, v, idx, start, end, 16, d**-0.5, 0.0, num_splits=num_splits, block_n=16, merge_chunk=merge_chunk)
    one = sparse_decode_attention_triton(q, k, v, idx, start, end, 16, d**-0.5, num_splits=num_splits, block_n=16, merge_chunk=64)
    torch.testing.assert_close(out.float(), one.float(), rtol=1e-2, atol=1e-2)


def test_decode_all_pages_equals_dense_and_head_dim_256():
    gn = gen(11)
    k, v, _ = cache(1, 1, 32, 256, 8, torch.float32, gn)
    q = randn((1, 2, 256), torch.float32, gn)
    idx = torch.arange(4, dtype=torch.int32, device=DEVICE).view(1, 1, 4)
    start = torch.tensor([0], dtype=torch.int32, device=DEVICE)
    end = torch.tensor([29], dtype=torch.int32, device=DEVICE)
    out = _check(q, k, v, idx, start, end, 8, 1 / 16, 0.0)
    dense = ref.dense_decode_attention(q, k, v, start, end, 1 / 16)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots,num_splits", [(16, None), (16, 3), (6, 2)])
def test_decode_dense_mode_equals_every_page_listed(dtype, slots, num_splits):
    """``indices=None, slots=S`` (no page list) gives the same bits as listing each row's pages from its
    first (``reference.dense_page_list``): the blocks it skips past a row's end add nothing; ragged rows,
    one empty. With 6 slots the ranges are cut to fit (windows of at most 4 pages + 2)."""
    gn = gen(21)
    b, h, ps, cap = 3, 2, 8, 128
    k, v, _ = cache(b, h, cap, 32, ps, dtype, gn)
    q = randn((b, 2 * h, 32), dtype, gn)
    start, end = rows(b, cap, gn, empty_row=True)
    if slots < cap // ps:
        start = torch.maximum(start, end - 4 * ps)
    listed = ref.dense_page_list(start, end, ps, slots, h).contiguous()
    want = sparse_decode_attention_triton(q, k, v, listed, start, end, ps, 0.2, num_splits=num_splits)
    got = sparse_decode_attention_triton(q, k, v, None, start, end, ps, 0.2, num_splits=num_splits, slots=slots)
    assert torch.equal(got, want)
    torch.testing.assert_close(got.float(), ref.dense_decode_attention(q, k, v, start, end, 0.2).float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="dense decode needs"):
        sparse_decode_attention_triton(q, k, v, None, start, end, ps, 0.2, slots=cap // ps + 1)


def test_decode_dense_mode_negative_start_counts_as_zero():
    """Dense mode from a negative ``seq_start`` walks the row from page 0 (no position lies below 0): the
    same bits as ``seq_start = 0``, and ``reference.dense_page_list`` lists the same pages."""
    gn = gen(23)
    b, h, ps, cap = 2, 2, 8, 64
    k, v, _ = cache(b, h, cap, 32, ps, torch.float32, gn)
    q = randn((b, 2 * h, 32), torch.float32, gn)
    end = torch.tensor([64, 21], dtype=torch.int32, device=DEVICE)
    start = torch.tensor([-20, -5], dtype=torch.int32, device=DEVICE)
    zero = torch.zeros_like(start)
    assert torch.equal(ref.dense_page_list(start, end, ps, cap // ps, h), ref.dense_page_list(zero, end, ps, cap // ps, h))
    got = sparse_decode_attention_triton(q, k, v, None, start, end, ps, 0.2, slots=cap // ps)
    assert torch.equal(got, sparse_decode_attention_triton(q, k, v, None, zero, end, ps, 0.2, slots=cap // ps))


def test_default_stages():
    """3 stages for the dense decode at head_dim <= 64 (contiguous pages), 2 otherwise (H200 sweep)."""
    assert [default_stages(bd, True) for bd in (16, 64, 128, 256)] == [3, 3, 2, 2]
    assert [default_stages(bd, False) for bd in (16, 64, 128, 256)] == [2, 2, 2, 2]


def test_plan_splits_fills_the_gpu():
    assert plan_splits(1, 64, 16, 64, 132) == (16, 64)  # capped at one BLOCK_N per split
    splits, per = plan_splits(8, 128, 16, 64, 132)
    assert per % 64 == 0 and splits * per >= 128 * 16 and 8 * splits <= 2 * 132 + 8
    assert plan_splits(512, 128, 16, 64, 132) == (1, 2048)


def test_decode_rejects_bad_input():
    gn = gen(12)
    k, v, _ = cache(1, 1, 32, 16, 8, torch.float32, gn)
    q = randn((1, 2, 16), torch.float32, gn)
    se = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    idx = torch.zeros(1, 1, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        sparse_decode_attention_triton(q.half(), k, v, idx, se, se, 8, 1.0)
    with pytest.raises(ValueError, match="indices"):
        sparse_decode_attention_triton(q, k, v, idx.long(), se, se, 8, 1.0)
    with pytest.raises(ValueError, match="block_n"):  # tl.dot needs 16 rows at least
        sparse_decode_attention_triton(q, k, v, idx, se, se, 8, 1.0, block_n=8)
    with pytest.raises(ValueError, match="page_size"):
        sparse_decode_attention_triton(q, k, v, idx, se, se, 6, 1.0)
    big = torch.zeros(1, 1, 32, 320, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        sparse_decode_attention_triton(torch.zeros(1, 1, 320, device=DEVICE), big, big, idx, se, se, 8, 1.0)


@settings(max_examples=10, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 2),
    g=st.sampled_from([1, 2, 4]),
    d=st.sampled_from([16, 32, 64]),
    ps=st.sampled_from([8, 16]),
    pages=st.integers(1, 8),
    sel=st.integers(1, 10),
    softcap=st.sampled_from([0.0, 0.0, 20.0]),
    seed=st.integers(0, 10_000),
)
def test_decode_hypothesis(b, h, g, d, ps, pages, sel, softcap, seed):
    gn = gen(seed)
    cap = pages * ps
    k, v, _ = cache(b, h, cap, d, ps, torch.bfloat16, gn)
    q = randn((b, h * g, d), torch.bfloat16, gn)
    idx = random_indices(b, h, pages, sel, gn, pad=seed % 2)
    start, end = rows(b, cap, gn, empty_row=seed % 3 == 0)
    _check(q, k, v, idx, start, end, ps, d**-0.5, softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_fp8_cache_matches_reference(dtype):
    """K/V stored as float8_e4m3fn, queries in the model's dtype: the kernel upcasts what it loads."""
    gn = gen(12)
    b, h, g, d, ps, cap = 2, 2, 4, 32, 8, 128
    k, v, _ = cache(b, h, cap, d, ps, torch.float32, gn)
    k8, v8 = ref.to_storage(k, torch.float8_e4m3fn), ref.to_storage(v, torch.float8_e4m3fn)
    q = randn((b, h * g, d), dtype, gn)
    idx = random_indices(b, h, cap // ps, 6, gn, pad=1)
    start, end = rows(b, cap, gn)
    out = sparse_decode_attention_triton(q, k8, v8, idx, start, end, ps, d**-0.5)
    expect = ref.sparse_decode_attention(q.float(), k8, v8, idx, start, end, ps, d**-0.5)
    assert out.dtype == q.dtype
    assert rel_err(out, expect) < TOL[dtype], rel_err(out, expect)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")  # the soft-cap's tanh saturating (interpreter)
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_decode_fp8_cache_bf16_query_any_magnitude(softcap):
    """A bfloat16 query against an fp8 cache runs its products in fp16 on a power-of-two-scaled query:
    query groups scaled by 2^-30 .. 2^20 (near-uniform to one-hot attention), bf16 subnormals among the
    elements, still the reference's output."""
    gn = gen(14)
    b, h, g, d, ps, cap = 2, 2, 4, 32, 8, 128
    k, v, _ = cache(b, h, cap, d, ps, torch.float32, gn)
    k8, v8 = ref.to_storage(k, torch.float8_e4m3fn), ref.to_storage(v, torch.float8_e4m3fn)
    q = randn((b, h * g, d), torch.float32, gn)
    q[0, :g] *= 2.0**-30
    q[0, g:] *= 2.0**20
    q[1, :g, :4] = 1e-39
    q = q.to(torch.bfloat16)
    idx = random_indices(b, h, cap // ps, 6, gn, pad=1)
    start, end = rows(b, cap, gn)
    out = sparse_decode_attention_triton(q, k8, v8, idx, start, end, ps, d**-0.5, softcap)
    expect = ref.sparse_decode_attention(q.float(), k8, v8, idx, start, end, ps, d**-0.5, softcap)
    assert torch.isfinite(out).all()
    assert rel_err(out, expect) < TOL[torch.bfloat16], rel_err(out, expect)


@pytest.mark.parametrize("g,d,n_sel,num_splits", [(4, 32, 12, 2), (4, 32, 12, 3), (4, 32, 12, 5), (5, 128, 20, 10)])
def test_decode_inline_merge_equals_reference_call_after_call(g, d, n_sel, num_splits):
    """merge="inline": the last split of each (row, KV head) merges (up to 10 splits of 5 heads x 128
    dims); its counter is reset, so repeated launches (as CUDA graphs replay them) stay right."""
    gn = gen(13)
    b, h, ps, cap = 2, 2, 8, 256
    k, v, _ = cache(b, h, cap, d, ps, torch.bfloat16, gn)
    for step in range(3):
        q = randn((b, h * g, d), torch.bfloat16, gn)
        idx = random_indices(b, h, cap // ps, n_sel, gn, pad=step)
        start, end = rows(b, cap, gn, empty_row=step == 1)
        out = sparse_decode_attention_triton(q, k, v, idx, start, end, ps, d**-0.5, num_splits=num_splits, block_n=16, merge="inline")
        kernel = sparse_decode_attention_triton(q, k, v, idx, start, end, ps, d**-0.5, num_splits=num_splits, block_n=16)
        expect = ref.sparse_decode_attention(q.float(), k.float(), v.float(), idx, start, end, ps, d**-0.5)
        assert rel_err(out, expect) < TOL[torch.bfloat16]
        torch.testing.assert_close(out.float(), kernel.float(), atol=2e-2, rtol=2e-2)
        assert (out[end <= start] == 0).all()
    from tinyserve_patch.ops._triton_common import ticket_counters

    assert not ticket_counters(q.device, b * h)[: b * h].any()  # every counter back to zero
