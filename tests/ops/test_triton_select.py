"""select_pages_triton == reference.select_pages exactly (set, order, padding, forced pages, ties)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve_patch.ops import reference as ref
from tinyserve_patch.ops.triton_select import select_pages_triton
from tests.ops.kernel_cases import DEVICE, gen, rows


def _check(scores, start, end, ps, n, sink, recent, ways=None, finish=None):
    out = select_pages_triton(scores, start, end, ps, n, sink, recent, ways=ways, finish=finish)
    expect = ref.select_pages(scores, start, end, ps, n, sink, recent)
    assert out.dtype == torch.int32 and out.shape == expect.shape
    assert torch.equal(out, expect), (out, expect)


@pytest.mark.parametrize("kind", ["randn", "ties", "constant"])
@pytest.mark.parametrize("num_select", [1, 3, 8, 40])
def test_select_matches_reference(kind, num_select):
    g = gen(7)
    b, h, ps, pages = 2, 2, 8, 24
    if kind == "randn":
        scores = torch.randn(b, h, pages, generator=g)
    elif kind == "ties":
        scores = torch.randint(0, 3, (b, h, pages), generator=g).float()
    else:
        scores = torch.zeros(b, h, pages)
    start, end = rows(b, pages * ps, g)
    for sink, recent in ((0, 1), (1, 1), (2, 3)):
        _check(scores.to(DEVICE), start, end, ps, num_select, sink, recent)


def test_select_special_values():
    """-0.0 ties +0.0; +-inf and NaN scores rank like torch.sort; empty and one-page rows."""
    s = torch.tensor([[0.0, -0.0, 1.0, float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 2.0, -1.0]])
    scores = torch.stack([s, s.flip(-1)]).to(DEVICE)  # [2, 1, 10]
    for start, end in (([0, 0], [80, 80]), ([0, 5], [80, 6]), ([3, 7], [3, 7]), ([9, 20], [70, 75])):
        st_ = torch.tensor(start, dtype=torch.int32, device=DEVICE)
        en = torch.tensor(end, dtype=torch.int32, device=DEVICE)
        for n in (1, 2, 4, 10, 12):
            _check(scores, st_, en, 8, n, 0, 1)
            _check(scores, st_, en, 8, n, 1, 2)


def test_select_keys_of_nan_signs_subnormals_and_extremes():
    """The integer keys order every float class as the reference's finite-first sort: NaN of either sign and
    -inf tie the lowest finite float, +inf ties the largest, the smallest subnormals of both signs sit
    just around the tied zeros; ties to the lower page throughout."""
    big = torch.finfo(torch.float32).max
    tiny = torch.finfo(torch.float32).smallest_normal / 2**22  # 2^-148, a subnormal
    neg_nan = -torch.tensor(float("nan"))  # sign bit set
    s = torch.tensor([float("nan"), -big, tiny, 0.0, -tiny, -0.0, big, float("inf"), -float("inf"), 1.0, -1.0, 0.0])
    s[0] = neg_nan
    s = torch.cat([s, s.flip(0), torch.tensor([float("nan"), -tiny, tiny, -0.0])])  # 28 pages
    scores = torch.stack([s, s.roll(7), -s, s.flip(0)]).reshape(2, 2, 28).to(DEVICE)
    start = torch.tensor([0, 8], dtype=torch.int32, device=DEVICE)
    end = torch.tensor([28 * 8, 27 * 8 - 3], dtype=torch.int32, device=DEVICE)
    assert torch.isnan(scores).any() and (scores.view(torch.int32) == -(2**31)).any()  # NaN and -0.0 present
    for n in range(1, 29, 3):
        _check(scores, start, end, 8, n, 0, 0)
        _check(scores, start, end, 8, n, 1, 2)


def test_select_negative_start_counts_as_zero():
    """No position lies below 0: a negative ``seq_start`` (a whole page and more below, or part of one)
    selects exactly what ``seq_start = 0`` selects, sink pages included, in the kernel and the reference."""
    g = gen(31)
    scores = torch.randn(3, 2, 20, generator=g).to(DEVICE)
    end = torch.tensor([160, 77, 9], dtype=torch.int32, device=DEVICE)
    start = torch.tensor([-40, -3, -8], dtype=torch.int32, device=DEVICE)
    for n in (1, 3, 12):
        zero = ref.select_pages(scores, torch.zeros_like(start), end, 8, n, 2, 1)
        assert torch.equal(ref.select_pages(scores, start, end, 8, n, 2, 1), zero)
        _check(scores, start, end, 8, n, 2, 1)


def test_select_large_p_and_strided_scores():
    g = gen(8)
    base = torch.randint(0, 50, (1, 3000, 2), generator=g).float().to(DEVICE)
    scores = base.transpose(1, 2)  # [1, 2, 3000] noncontiguous
    start = torch.tensor([17], dtype=torch.int32, device=DEVICE)
    end = torch.tensor([2990 * 8], dtype=torch.int32, device=DEVICE)
    _check(scores, start, end, 8, 128, 1, 2)


def test_select_rejects_bad_input():
    se = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        select_pages_triton(torch.zeros(1, 1, 4, dtype=torch.float16, device=DEVICE), se, se, 8, 2, 1, 1)
    with pytest.raises(ValueError, match="16384"):
        select_pages_triton(torch.zeros(1, 1, 16385, device=DEVICE), se, se, 8, 2, 1, 1)
    with pytest.raises(ValueError, match="num_select"):
        select_pages_triton(torch.zeros(1, 1, 4, device=DEVICE), se, se, 8, 0, 1, 1)
    with pytest.raises(ValueError, match="ways"):
        select_pages_triton(torch.zeros(1, 1, 4, device=DEVICE), se, se, 8, 2, 1, 1, ways=5)
    with pytest.raises(ValueError, match="finish"):
        select_pages_triton(torch.zeros(1, 1, 4, device=DEVICE), se, se, 8, 2, 1, 1, finish=48)


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 2),
    ps=st.sampled_from([8, 16]),
    pages=st.integers(1, 70),
    num_select=st.integers(1, 80),
    sink=st.integers(0, 3),
    recent=st.integers(0, 3),
    levels=st.sampled_from([0, 2, 5]),
    seed=st.integers(0, 10_000),
    ways=st.sampled_from([0, 1, 2, 3, 4]),
    finish=st.sampled_from([0, 16, 64]),
)
def test_select_hypothesis(b, h, ps, pages, num_select, sink, recent, levels, seed, ways, finish):
    g = gen(seed)
    if levels:
        scores = torch.randint(0, levels, (b, h, pages), generator=g).float()
    else:
        scores = torch.randn(b, h, pages, generator=g)
    start, end = rows(b, pages * ps, g, empty_row=seed % 4 == 0)
    _check(scores.to(DEVICE), start, end, ps, num_select, sink, recent, ways, finish)


@pytest.mark.parametrize("ways", [0, 1, 2, 3, 4])
def test_select_search_ways_agree(ways):
    """The (ways+1)-ary threshold search (counts packed in one int32 / int64 reduction) finds the same k-th
    key for every number of thresholds: distinct, widely spread and heavily tied scores, +-inf."""
    g = gen(ways)
    for levels in (0, 3):
        scores = torch.randint(0, levels, (2, 2, 50), generator=g).float() if levels else torch.randn(2, 2, 50, generator=g) * 1e3
        scores[0, 0, 7] = float("inf")
        scores[1, 1, 3] = float("-inf")
        start, end = rows(2, 50 * 8, g)
        for n in (1, 5, 17, 60):
            out = select_pages_triton(scores.to(DEVICE), start, end, 8, n, 1, 1, ways=ways)
            assert torch.equal(out, ref.select_pages(scores.to(DEVICE), start, end, 8, n, 1, 1))


@pytest.mark.parametrize("ways", [0, 1, 2, 4])
def test_select_search_over_a_bracket_wider_than_int32(ways):
    """The search's bracket spans the whole finite float range (a key width over 2^31, which the uint32
    offsets of its thresholds must carry without wrapping): the largest finite scores of both signs, their
    neighbours and scores around zero, for every number of thresholds and k across the order."""
    big = torch.finfo(torch.float32).max
    base = torch.tensor([-big, big, -big / 2, big / 2, -1e-30, 1e-30, 0.0, -3.0, 3.0, big * 0.999, -big * 0.999, 7.0])
    scores = torch.stack([base, base.flip(0), base.roll(5), -base]).reshape(2, 2, 12)
    start = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    end = torch.full((2,), 12 * 8, dtype=torch.int32, device=DEVICE)
    for n in (1, 2, 5, 9, 12):
        _check(scores.to(DEVICE), start, end, 8, n, 0, 0, ways=ways)


def _spread_scores(kind: str, shape, levels: int, g):
    """Scores of one of three spreads: ``randn``, ``wide`` (over many decades) or ``ties`` (``levels`` values)."""
    if kind == "randn":
        return torch.randn(shape, generator=g)
    if kind == "wide":
        return torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 10)
    return torch.randint(0, levels, shape, generator=g).float()


@pytest.mark.parametrize("kind", ["randn", "wide", "ties"])
def test_select_narrowing_search_through_all_its_phases(kind):
    """ways=0 over 4096 pages: the bracket starts with ~4000 keys, so the search runs 2, then 3 (under
    1024 keys), then 4 thresholds (under 256), dropping the keys above the bracket between phases; the
    kept pages, their order and the ties are the reference's."""
    scores = _spread_scores(kind, (1, 2, 4096), 700, gen(21))
    start = torch.tensor([21], dtype=torch.int32, device=DEVICE)
    end = torch.tensor([4096 * 16 - 5], dtype=torch.int32, device=DEVICE)
    for n in (128, 300, 2000):
        _check(scores.to(DEVICE), start, end, 16, n, 1, 2, ways=0)


@pytest.mark.parametrize("finish", [16, 64, 128])
@pytest.mark.parametrize("kind", ["randn", "wide", "ties"])
def test_select_search_ranking_its_last_keys(finish, kind):
    """finish: the passes stop once the bracket holds <= min(finish, num_select) keys, which are compacted
    through the output row and ranked against each other; the pages (ties to the lower page included) are
    the reference's, for scratch rows shorter than ``finish`` too (num_select 8, 40)."""
    g = gen(22 + finish)
    scores = _spread_scores(kind, (2, 2, 2000), 300, g)
    start, end = rows(2, 2000 * 8, g)
    for n in (8, 40, 130, 1500):
        _check(scores.to(DEVICE), start, end, 8, n, 1, 2, ways=2, finish=finish)
