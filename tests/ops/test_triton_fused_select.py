"""score_and_select_triton == reference select_pages(page_scores(...)).

Exact on integer-valued q / keys (every score exact in fp32, so no summation-order ulps); on random data
the selection must be a top-k of the reference scores up to near-ties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve_patch.ops import reference as ref
from tinyserve_patch.ops.triton_fused_select import score_and_select_triton
from tests.ops.kernel_cases import DEVICE, cache, gen, randint, randn, rows


def _expect(q, meta, start, end, ps, n, sink, recent, red):
    return ref.select_pages(ref.page_scores(q, meta, start, end, ps, red), start, end, ps, n, sink, recent)


def assert_topk_up_to_ties(out, q, meta, start, end, ps, n, sink, recent, red, tol=1e-3):
    """Same count and forced pages as the reference; every selected unforced page scores within ``tol``
    of every unselected valid page it displaced."""
    expect = _expect(q, meta, start, end, ps, n, sink, recent, red)
    scores = ref.page_scores(q, meta, start, end, ps, red)
    pages = scores.shape[-1]
    forced = ref.forced_page_mask(start, end, pages, ps, sink, recent)
    assert torch.equal((out >= 0).sum(-1), (expect >= 0).sum(-1))
    for b in range(out.shape[0]):
        for h in range(out.shape[1]):
            got = set(out[b, h][out[b, h] >= 0].tolist())
            exp = set(expect[b, h][expect[b, h] >= 0].tolist())
            assert sorted(got) == out[b, h][: len(got)].tolist()  # ascending, then -1
            for p in got ^ exp:
                assert not forced[b, p]
            if got != exp:
                lo = min(scores[b, h, p].item() for p in got - exp)
                hi = max(scores[b, h, p].item() for p in exp - got)
                assert hi - lo <= tol * max(1.0, abs(hi))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,h,g,d,ps,cap", [(2, 2, 4, 64, 8, 128), (1, 2, 1, 16, 16, 64), (2, 1, 2, 32, 8, 96)])
@pytest.mark.parametrize("red", ["max", "sum"])
def test_fused_exact_on_integer_inputs(dtype, b, h, g, d, ps, cap, red):
    gn = gen(13)
    _, _, meta = cache(b, h, cap, d, ps, dtype, gn, length=cap - 5, integer=True)
    q = randint(-3, 4, (b, h * g, d), dtype, gn)
    start, end = rows(b, cap - 5, gn, empty_row=True)
    for n, sink, recent in ((1, 0, 1), (3, 1, 1), (7, 2, 2), (100, 1, 1)):
        out = score_and_select_triton(q, meta, start, end, ps, n, sink, recent, red)
        assert torch.equal(out, _expect(q, meta, start, end, ps, n, sink, recent, red))


def test_fused_fp8_meta_exact_on_integer_inputs():
    """fp8 metadata of small-integer keys is exact: the fused kernel selects what the reference does."""
    gn = gen(17)
    k, _, _ = cache(2, 2, 128, 32, 8, torch.bfloat16, gn, integer=True)
    meta = ref.build_meta(k, 123, 8, dtype=torch.float8_e4m3fn)
    q = randint(-3, 4, (2, 8, 32), torch.bfloat16, gn)
    start, end = rows(2, 123, gn, empty_row=True)
    for n, sink, recent in ((3, 1, 1), (7, 2, 2)):
        out = score_and_select_triton(q, meta, start, end, 8, n, sink, recent, "max")
        assert torch.equal(out, _expect(q, meta, start, end, 8, n, sink, recent, "max"))


@pytest.mark.parametrize("per", [1, 3, 10])
@pytest.mark.parametrize("ways", [1, 2, 4])
def test_fused_multi_program_last_block_selects(per, ways):
    """160 pages in 10 blocks of 16: 10, 4 or 1 scoring programs per (row, head) (the walk pipelined when
    a program takes several blocks); the last one to finish selects; the ticket counters are left zeroed,
    so repeated launches agree."""
    from tinyserve_patch.ops._triton_common import ticket_counters

    gn = gen(14)
    _, _, meta = cache(2, 2, 1280, 16, 8, torch.bfloat16, gn, integer=True)  # 160 pages
    q = randint(-3, 4, (2, 4, 16), torch.bfloat16, gn)
    start, end = rows(2, 1280, gn)
    expect = _expect(q, meta, start, end, 8, 20, 1, 2, "max")
    for _ in range(2):
        got = score_and_select_triton(q, meta, start, end, 8, 20, 1, 2, "max", blocks_per_program=per, block_p=16, ways=ways)
        assert torch.equal(got, expect)
    assert not ticket_counters(meta.device, 4)[:4].any()


@pytest.mark.parametrize("per", [1, 3])
def test_fused_tma_read_equals_cp_async(per):
    """The opt-in TMA read of the metadata (``tma=True``) selects the same pages as the default read, one or
    several scoring programs a (row, head), over a view whose pages are strided past the slice."""
    gn = gen(16)
    _, _, full = cache(2, 2, 1280, 16, 8, torch.bfloat16, gn)  # 160 pages
    meta = full[:, :, :150]
    q = randn((2, 4, 16), torch.bfloat16, gn)
    start, end = rows(2, 1200, gn)
    got = score_and_select_triton(q, meta, start, end, 8, 20, 1, 2, "max", blocks_per_program=per, block_p=16, tma=True)
    want = score_and_select_triton(q, meta, start, end, 8, 20, 1, 2, "max", blocks_per_program=per, block_p=16)
    assert torch.equal(got, want)
    assert torch.equal(got, _expect(q, meta, start, end, 8, 20, 1, 2, "max"))


@pytest.mark.parametrize("per", [1, 3])
@pytest.mark.parametrize("tma", [False, True])
def test_fused_pages_major_selects_the_reference_pages(per, tma):
    """The opt-in pages-major products (``pages_major=True``) select the reference's pages: integer data, so
    the scores are exact whatever the summation order; one or several scoring programs a (row, head)."""
    gn = gen(17)
    _, _, meta = cache(2, 2, 1280, 16, 8, torch.bfloat16, gn, integer=True)  # 160 pages
    q = randint(-3, 4, (2, 4, 16), torch.bfloat16, gn)
    start, end = rows(2, 1200, gn)
    got = score_and_select_triton(q, meta, start, end, 8, 20, 1, 2, "max", blocks_per_program=per, block_p=16, tma=tma,
                                  pages_major=True)
    assert torch.equal(got, _expect(q, meta, start, end, 8, 20, 1, 2, "max"))


def test_fused_random_inputs_topk_up_to_ties():
    gn = gen(15)
    _, _, meta = cache(2, 2, 256, 32, 16, torch.bfloat16, gn)
    q = randn((2, 8, 32), torch.bfloat16, gn)
    start, end = rows(2, 256, gn)
    out = score_and_select_triton(q, meta, start, end, 16, 5, 1, 1, "sum")
    assert_topk_up_to_ties(out, q, meta, start, end, 16, 5, 1, 1, "sum")


def test_fused_rejects_bad_input():
    gn = gen(16)
    _, _, meta = cache(1, 1, 32, 16, 8, torch.float32, gn)
    q = randn((1, 2, 16), torch.float32, gn)
    se = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        score_and_select_triton(q.half(), meta, se, se, 8, 2, 1, 1, "max")
    with pytest.raises(ValueError, match="num_select"):
        score_and_select_triton(q, meta, se, se, 8, 0, 1, 1, "max")
    with pytest.raises(ValueError, match="ways"):
        score_and_select_triton(q, meta, se, se, 8, 2, 1, 1, "max", ways=5)
    with pytest.raises(ValueError, match="16384"):
        score_and_select_triton(q, torch.zeros(1, 1, 16400, 2, 16, device=DEVICE), se, se, 8, 2, 1, 1, "max")


@settings(max_examples=10, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 2),
    g=st.sampled_from([1, 2, 4]),
    d=st.sampled_from([16, 32, 64]),
    ps=st.sampled_from([8, 16]),
    pages=st.integers(1, 12),
    n=st.integers(1, 14),
    sink=st.integers(0, 2),
    recent=st.integers(0, 2),
    red=st.sampled_from(["max", "sum"]),
    seed=st.integers(0, 10_000),
)
def test_fused_hypothesis(b, h, g, d, ps, pages, n, sink, recent, red, seed):
    gn = gen(seed)
    cap = pages * ps
    _, _, meta = cache(b, h, cap, d, ps, torch.bfloat16, gn, integer=True)
    q = randint(-3, 4, (b, h * g, d), torch.bfloat16, gn)
    start, end = rows(b, cap, gn, empty_row=seed % 3 == 0)
    out = score_and_select_triton(q, meta, start, end, ps, n, sink, recent, red)
    assert torch.equal(out, _expect(q, meta, start, end, ps, n, sink, recent, red))
