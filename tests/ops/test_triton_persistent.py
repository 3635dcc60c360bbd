"""quest_decode_persistent_triton == the fused row-chained decode (fused score + select, then the attention
with the same splits, merged inline), bit for bit, for every queue order (lag) and grid size, and leaves
its queue and row counters zeroed after every call, a failed one included.

Under the CPU interpreter the programs run one after another (the first takes every item in queue order,
so every wait passes at once): these tests pin the results, the queue order and the counter protocol;
the concurrency itself is a GPU matter (``tests/gpu``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve_patch.ops import reference as ref
from tinyserve_patch.ops import triton_persistent
from tinyserve_patch.ops._triton_common import ticket_counters
from tinyserve_patch.ops.triton_chain import quest_decode_chained_triton
from tinyserve_patch.ops.triton_persistent import persistent_plan, quest_decode_persistent_triton
from tests.ops.kernel_cases import cache, gen, queue_order, randn, rows

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter only; GPU runs: tests/gpu")


def _case(b, h, g, d, ps, cap, dtype, seed, meta_dtype=None, kv_dtype=None):
    gn = gen(seed)
    k, v, _ = cache(b, h, cap, d, ps, dtype, gn, device="cpu")
    start, end = rows(b, cap, gn, empty_row=b > 2, device="cpu")
    meta = ref.build_meta(k, cap, ps, dtype=meta_dtype) if meta_dtype else ref.build_meta(k, cap, ps)
    if kv_dtype is not None:
        k, v = k.to(kv_dtype), v.to(kv_dtype)
    return randn((b, h * g, d), dtype, gn, device="cpu"), k, v, meta, start, end


def _armed() -> int:
    """Non-zero persistent counters left behind (0: queue and every row re-armed)."""
    return int(ticket_counters(torch.device("cpu"), 1, pool="persistent").count_nonzero())


def _fused_chain(q, k, v, meta, start, end, ps, n, sink, recent, red, scale, softcap, splits):
    return quest_decode_chained_triton(q, k, v, meta, start, end, ps, n, sink, recent, red, scale, softcap, merge="inline",
                                       fused=True, num_splits=splits)


@pytest.mark.parametrize("b,h,g,d,ps,cap,n", [
    (3, 2, 4, 32, 8, 256, 5), (1, 2, 2, 64, 16, 96, 2), (2, 1, 1, 16, 64, 512, 3),
    (2, 1, 2, 16, 8, 2048, 10),  # 256 pages: 4 score items per row, counted before the selection
])
@pytest.mark.parametrize("lag", [0, 1, None])
def test_persistent_equals_fused_chain(b, h, g, d, ps, cap, n, lag):
    q, k, v, meta, start, end = _case(b, h, g, d, ps, cap, torch.float32, 3 + n)
    splits = persistent_plan(b * h, meta.shape[2], n, ps, d, q.device)["num_splits"]
    for _ in range(2):  # a second call on the re-armed counters
        out, idx = quest_decode_persistent_triton(q, k, v, meta, start, end, ps, n, 1, 1, "max", d**-0.5, lag=lag)
        expect_out, expect_idx = _fused_chain(q, k, v, meta, start, end, ps, n, 1, 1, "max", d**-0.5, 0.0, splits)
        assert torch.equal(idx, expect_idx)
        assert torch.equal(out, expect_out)
        assert _armed() == 0


def test_persistent_matches_reference():
    q, k, v, meta, start, end = _case(3, 2, 4, 32, 8, 256, torch.float32, 5)
    out, idx = quest_decode_persistent_triton(q, k, v, meta, start, end, 8, 5, 1, 1, "max", 0.25)
    expect_idx = ref.select_pages(ref.page_scores(q, meta, start, end, 8, "max"), start, end, 8, 5, 1, 1)
    assert torch.equal(idx, expect_idx.to(torch.int32))
    expect = ref.sparse_decode_attention(q, k, v, expect_idx, start, end, 8, 0.25)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_persistent_half_precision_sum_softcap_fp8(dtype):
    """fp8 page metadata and an fp8 cache (each its own query scaling), group sum, soft-capping."""
    for meta_dtype, kv_dtype in ((None, None), (torch.float8_e4m3fn, torch.float8_e4m3fn)):
        q, k, v, meta, start, end = _case(3, 2, 2, 32, 8, 128, dtype, 11, meta_dtype, kv_dtype)
        splits = persistent_plan(6, meta.shape[2], 4, 8, 32, q.device)["num_splits"]
        out, idx = quest_decode_persistent_triton(q, k, v, meta, start, end, 8, 4, 1, 2, "sum", 0.2, softcap=30.0)
        expect_out, expect_idx = _fused_chain(q, k, v, meta, start, end, 8, 4, 1, 2, "sum", 0.2, 30.0, splits)
        assert torch.equal(idx, expect_idx) and torch.equal(out, expect_out)
        assert _armed() == 0


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 2), cap_pages=st.integers(2, 40), n=st.integers(1, 12), grids=st.sampled_from([1, 2]),
       lag=st.integers(0, 6), programs=st.integers(1, 9), attention_programs=st.integers(1, 9), splits=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_persistent_any_queue_order_and_grid(b, h, cap_pages, n, grids, lag, programs, attention_programs, splits, seed):
    """Every lag (one grid; beyond the rows: every score item first), grid size (two grids: of each) and
    split count gives the fused chain's bits."""
    q, k, v, meta, start, end = _case(b, h, 2, 16, 8, 8 * cap_pages, torch.float32, seed)
    opts = {"lag": lag} if grids == 1 else {"grids": 2, "attention_programs": attention_programs}
    out, idx = quest_decode_persistent_triton(q, k, v, meta, start, end, 8, n, 1, 1, "max", 0.25, programs=programs,
                                              num_splits=splits, **opts)
    expect_out, expect_idx = _fused_chain(q, k, v, meta, start, end, 8, n, 1, 1, "max", 0.25, 0.0, splits)
    assert torch.equal(idx, expect_idx) and torch.equal(out, expect_out)
    assert _armed() == 0


def test_persistent_bad_input_and_failed_launch_rearms(monkeypatch):
    q, k, v, meta, start, end = _case(2, 2, 2, 16, 8, 128, torch.float32, 1)
    with pytest.raises(ValueError, match="lag"):
        quest_decode_persistent_triton(q, k, v, meta, start, end, 8, 4, 1, 1, "max", 0.25, lag=-1)
    with pytest.raises(ValueError, match="programs"):
        quest_decode_persistent_triton(q, k, v, meta, start, end, 8, 4, 1, 1, "max", 0.25, programs=0)
    with pytest.raises(ValueError, match="num_select"):
        quest_decode_persistent_triton(q, k, v, meta, start, end, 8, 0, 1, 1, "max", 0.25)
    with pytest.raises(ValueError, match="dtype"):
        quest_decode_persistent_triton(q.half(), k, v, meta, start, end, 8, 4, 1, 1, "max", 0.25)

    class Boom:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                args[11][:7].fill_(3)  # the queue and some rows armed, then a failure
                raise RuntimeError("launch failed")
            return launch

    monkeypatch.setattr(triton_persistent, "_persistent_kernel", Boom())
    with pytest.raises(RuntimeError, match="launch failed"):
        quest_decode_persistent_triton(q, k, v, meta, start, end, 8, 4, 1, 1, "max", 0.25)
    assert _armed() == 0


@pytest.mark.parametrize("b,h,g,d,ps,cap,n", [(3, 2, 4, 32, 8, 256, 5), (2, 1, 2, 16, 8, 2048, 10)])
@pytest.mark.parametrize("programs,attention_programs", [(None, None), (1, 1), (3, 2)])
def test_two_grids_equal_fused_chain(b, h, g, d, ps, cap, n, programs, attention_programs):
    """grids=2: a score grid publishing rows to a ready list, an attention grid taking them; the fused
    chain's bits, and both queues, the ready list and the row counters re-armed after every call."""
    q, k, v, meta, start, end = _case(b, h, g, d, ps, cap, torch.float32, 7 + n)
    splits = persistent_plan(b * h, meta.shape[2], n, ps, d, q.device, grids=2)["num_splits"]
    for _ in range(2):
        out, idx = quest_decode_persistent_triton(q, k, v, meta, start, end, ps, n, 1, 1, "max", d**-0.5, grids=2,
                                                  programs=programs, attention_programs=attention_programs)
        expect_out, expect_idx = _fused_chain(q, k, v, meta, start, end, ps, n, 1, 1, "max", d**-0.5, 0.0, splits)
        assert torch.equal(idx, expect_idx) and torch.equal(out, expect_out)
        assert _armed() == 0


def test_two_grids_plan_fits_one_sm():
    """Two score programs at their register cap and one attention program at its cap fit one SM's 64K
    registers (else the attention grid would not be resident beside the scoring)."""
    plan = persistent_plan(64, 4096, 128, 16, 128, torch.device("cpu"), grids=2)
    assert plan["programs"] == 2 * plan["attention_programs"]
    score_regs = 2 * plan["maxnreg"] * 32 * 8  # the selection's 8 warps at 4096 pages
    assert score_regs + triton_persistent.ATTENTION_REGS * 32 * plan["attention_warps"] <= 65536
    wide = persistent_plan(64, 4096, 128, 16, 128, torch.device("cpu"), grids=2, attention_warps=8)  # the reserve follows the warps
    assert 2 * wide["maxnreg"] * 32 * 8 + triton_persistent.ATTENTION_REGS * 32 * 8 <= 65536


def test_two_grids_bad_options():
    q, k, v, meta, start, end = _case(2, 2, 2, 16, 8, 128, torch.float32, 1)
    for opts, match in (({"grids": 3}, "grids"), ({"grids": 2, "lag": 1}, "lag"), ({"attention_programs": 4}, "grids=2"),
                        ({"grids": 2, "attention_programs": 0}, "attention_programs"),
                        ({"grids": 2, "attention_warps": 3}, "attention_warps")):
        with pytest.raises(ValueError, match=match):
            quest_decode_persistent_triton(q, k, v, meta, start, end, 8, 4, 1, 1, "max", 0.25, **opts)
    assert _armed() == 0


def test_queue_order():
    """The interleaved order of the module docstring, item by item (rows 3, lag 1, 2 score + 2 attention
    items per row), through the device function under the interpreter."""
    expect = [(1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1), (0, 0, 0), (0, 0, 1),
              (1, 2, 0), (1, 2, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1)]
    assert queue_order(3, 1, 2, 2) == expect
