"""record_decode_triton == reference.record_decode (the decode-step counters), over sequences of steps."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve_patch import ops
from tinyserve_patch.ops import reference as ref
from tinyserve_patch.ops.triton_record import record_decode_triton

from tests.ops.kernel_cases import DEVICE, gen, rows

N = len(ref.DECODE_COUNTS)


def _state(b, h, pages, device=DEVICE):
    return (torch.zeros(N, dtype=torch.float64, device=device), torch.zeros(b, h, pages, dtype=torch.bool, device=device),
            torch.zeros(b, h, dtype=torch.int32, device=device))


def _selection(b, h, pages, s, g, fill=0.7):
    """Distinct pages per (row, head), ascending, ``-1`` padded at the end (as select_pages returns them)."""
    out = torch.full((b, h, s), -1, dtype=torch.int32)
    for i in range(b):
        for j in range(h):
            n = int(torch.randint(0, min(s, pages) + 1, (1,), generator=g)) if torch.rand(1, generator=g) > 1 - fill else min(s, pages)
            out[i, j, :n] = torch.randperm(pages, generator=g)[:n].sort().values.to(torch.int32)
    return out.to(DEVICE)


def _steps(b, h, pages, s, ps, steps, seed, dense_every=0):
    g = gen(seed)
    tri, refs = _state(b, h, pages), _state(b, h, pages)
    for step in range(steps):
        start, end = rows(b, pages * ps, g)
        dense = bool(dense_every) and step % dense_every == dense_every - 1
        idx = _selection(b, h, pages, s, g)
        record_decode_triton(*tri, idx, start, end, ps, dense)
        ref.record_decode(*refs, idx, start, end, ps, dense)
        for a, r in zip(tri, refs):
            assert torch.equal(a, r), f"step {step}"
    return refs


@pytest.mark.parametrize("b,h,pages,s,ps", [(2, 2, 12, 5, 8), (1, 3, 40, 16, 16), (3, 1, 7, 7, 4)])
def test_record_steps_match_reference(b, h, pages, s, ps):
    counts, _, has_prev = _steps(b, h, pages, s, ps, steps=4, seed=b * 100 + pages, dense_every=3)
    assert counts[0] == 3 and counts[1] == 1 and bool((has_prev == 1).all())


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), pages=st.integers(1, 20), s=st.integers(1, 24),
       ps=st.sampled_from([1, 4, 16]), seed=st.integers(0, 10**6))
def test_record_random_shapes(b, h, pages, s, ps, seed):
    _steps(b, h, pages, s, ps, steps=2, seed=seed)


def test_record_negative_start_counts_as_zero():
    """A negative ``seq_start`` counts the row's tokens from position 0, dense and sparse steps alike, in the
    kernel and the reference."""
    idx = torch.tensor([[[0, 2, -1]], [[1, -1, -1]]], dtype=torch.int32, device=DEVICE)
    end = torch.tensor([30, 12], dtype=torch.int32, device=DEVICE)
    start = torch.tensor([-20, -3], dtype=torch.int32, device=DEVICE)
    states = [_state(2, 1, 4) for _ in range(3)]
    for dense in (True, False):
        record_decode_triton(*states[0], idx, start, end, 8, dense)
        ref.record_decode(*states[1], idx, start, end, 8, dense)
        ref.record_decode(*states[2], idx, torch.zeros_like(start), end, 8, dense)
    for a, r, z in zip(*states):
        assert torch.equal(a, r) and torch.equal(r, z)
    assert states[1][0][2] == 42 + 20  # tokens read: 30 + 12 on the dense step; 8 + 8 (pages 0, 2) + 4 (page 1) sparse


def test_reference_counts_by_hand():
    """Row 0 holds tokens [3, 20) of pages of 8: pages 0 (5 valid tokens), 1 (8) and 2 (4)."""
    counts, prev, has_prev = _state(1, 1, 4, "cpu")
    start, end = torch.tensor([3], dtype=torch.int32), torch.tensor([20], dtype=torch.int32)
    ref.record_decode(counts, prev, has_prev, torch.tensor([[[0, 2, -1]]], dtype=torch.int32), start, end, 8, False)
    assert counts.tolist() == [1, 0, 9, 17, 0, 0, 0, 0, 2]
    assert prev.tolist() == [[[True, False, True, False]]] and has_prev.tolist() == [[1]]
    # page 0 again (a hit), page 1 new; the -1 slot must not clear page 0's bit
    ref.record_decode(counts, prev, has_prev, torch.tensor([[[-1, 0, 1]]], dtype=torch.int32), start, end, 8, False)
    assert counts.tolist() == [2, 0, 9 + 13, 34, 1, 2, 0, 0, 4]
    assert prev.tolist() == [[[True, True, False, False]]]
    ref.record_decode(counts, prev, has_prev, torch.zeros(1, 1, 0, dtype=torch.int32), start, end, 8, True)
    assert counts.tolist() == [2, 1, 22 + 17, 51, 1, 2, 0, 0, 4]


def test_record_wrapper_checks():
    counts, prev, has_prev = _state(1, 2, 4, "cpu")
    start, end = torch.tensor([0], dtype=torch.int32), torch.tensor([9], dtype=torch.int32)
    idx = torch.tensor([[[0, -1, -1], [0, -1, -1]]], dtype=torch.int32)
    with pytest.raises(ValueError, match="counts must be float64"):
        ops.record_decode(counts.float(), prev, has_prev, idx, start, end, 4)
    with pytest.raises(ValueError, match="has_prev must be int32"):
        ops.record_decode(counts, prev, has_prev.float(), idx, start, end, 4)
    with pytest.raises(ValueError, match="indices must be int32"):
        ops.record_decode(counts, prev, has_prev, idx.long(), start, end, 4)
    ops.record_decode(counts, prev, has_prev, idx, start, end, 4)
    assert counts[2] == 2 * 4  # page 0 in both heads' selections, 4 valid tokens each


def test_record_compiles_fullgraph():
    """The op traces with no graph break and mutates its counters under torch.compile."""
    counts, prev, has_prev = _state(2, 1, 6, DEVICE)
    start = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
    end = torch.tensor([40, 30], dtype=torch.int32, device=DEVICE)
    idx = torch.tensor([[[0, 3]], [[1, -1]]], dtype=torch.int32, device=DEVICE)

    @torch.compile(fullgraph=True, backend="eager" if DEVICE == "cpu" else "inductor")
    def step(c, p, hp, i):
        ops.record_decode(c, p, hp, i, start, end, 8)

    step(counts, prev, has_prev, idx)
    step(counts, prev, has_prev, idx)
    assert counts[0].item() == 2 and counts[4].item() == 3 and counts[5].item() == 3
