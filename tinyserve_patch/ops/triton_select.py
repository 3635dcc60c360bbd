"""Triton top-k page selection: ``scores`` float32 ``[B, Hkv, P]`` -> int32 ``[B, Hkv, num_select]``.

One program per (row, KV head) holds all ``P`` scores (``BLOCK = next_pow2(P)``, ``P <= 16384``) and runs
the exact selection of :func:`_triton_common.select_from_scores` (forced sink/recent pages first, ties to
the lower page, ascending output, ``-1`` padding): equal to :func:`reference.select_pages` bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import (
    check,
    check_page_size,
    check_rows,
    check_select_pages,
    check_finish,
    check_ways,
    pdl_enter,
    pdl_trigger,
    select_from_scores,
    SELECT_FINISH,
    SELECT_WAYS,
    select_num_warps,
    signal_row,
    trace_mark,
    use_pdl,
    wait_row,
)
from .trace import KernelTrace


@triton.jit
def _select_kernel(
    scores_ptr,
    start_ptr,
    end_ptr,
    out_ptr,
    num_pages,
    num_select,
    kv_heads,
    stride_sb,
    stride_sh,
    stride_sp,
    page_size,
    sink,
    recent,
    count_ptr,
    flag_ptr,
    trace_ptr,
    BLOCK: tl.constexpr,
    WAYS: tl.constexpr,
    FINISH: tl.constexpr,
    CHAIN: tl.constexpr,
    PDL: tl.constexpr,
    TRACE: tl.constexpr,
):
    trace_mark(trace_ptr, 0, TRACE)
    bh = tl.program_id(0)
    if CHAIN:  # row-chained (triton_chain): wait until this row's pages are all scored, then re-arm
        pdl_trigger(PDL)
        wait_row(count_ptr + bh, num_pages)
        tl.atomic_xchg(count_ptr + bh, 0)
    else:
        pdl_enter(PDL)
    trace_mark(trace_ptr, 1, TRACE)
    b = bh // kv_heads
    h = bh % kv_heads
    start = tl.load(start_ptr + b).to(tl.int32)
    end = tl.load(end_ptr + b).to(tl.int32)
    offs = tl.arange(0, BLOCK)
    base = scores_ptr + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
    if CHAIN:  # written by a grid still running: past L1
        scores = tl.load(base + offs * stride_sp, mask=offs < num_pages, other=float("-inf"), cache_modifier=".cg")
    else:
        scores = tl.load(base + offs * stride_sp, mask=offs < num_pages, other=float("-inf"))
    select_from_scores(
        scores, offs, num_pages, start, end, out_ptr + bh.to(tl.int64) * num_select, num_select,
        page_size, sink, recent, BLOCK, WAYS, FINISH,
    )
    if CHAIN:
        signal_row(flag_ptr + bh, 1)  # this row's attention programs wait for it
    trace_mark(trace_ptr, 2, TRACE)


def select_pages_triton(
    scores: torch.Tensor,
    seq_start: torch.Tensor,
    seq_end: torch.Tensor,
    page_size: int,
    num_select: int,
    sink_pages: int,
    recent_pages: int,
    ways: int | None = None,
    num_warps: int | None = None,
    finish: int | None = None,
    chain: tuple[torch.Tensor, torch.Tensor] | None = None,
    trace: KernelTrace | None = None,
) -> torch.Tensor:
    """``scores`` float32 ``[B, Hkv, P]`` -> int32 ``[B, Hkv, num_select]`` (see module docstring).
    ``ways`` (thresholds per search pass), ``finish`` (bracket size at which the search ranks directly, 0:
    never) and ``num_warps`` override the tuned defaults. ``chain``:
    ``(counts, flags)``, the row-chained mode (:mod:`triton_chain`): each program waits until its row's
    count reaches ``P`` (every page scored; then zeroes it) instead of waiting for the previous grid, and
    adds 1 to its row's flag once its pages are stored. ``trace``: record each program's timestamps
    (:mod:`trace`)."""
    check(scores.dim() == 3 and scores.dtype == torch.float32, f"scores must be float32 [B, Hkv, P], got {scores.dtype} {tuple(scores.shape)}")
    check(num_select >= 1, f"num_select={num_select} must be >= 1")
    check(sink_pages >= 0 and recent_pages >= 0, "sink_pages / recent_pages must be >= 0")
    check_page_size(page_size)
    b, hkv, pages = scores.shape
    check_rows(seq_start, seq_end, b)
    block = check_select_pages(pages)
    ways = check_ways(SELECT_WAYS if ways is None else ways)
    finish = check_finish(SELECT_FINISH if finish is None else finish)
    out = torch.empty((b, hkv, num_select), dtype=torch.int32, device=scores.device)
    if b * hkv == 0:
        return out
    pdl = use_pdl(scores.device)
    counts, flags = chain if chain is not None else (out, out)
    _select_kernel[(b * hkv,)](
        scores, seq_start, seq_end, out, pages, num_select, hkv,
        scores.stride(0), scores.stride(1), scores.stride(2), page_size, sink_pages, recent_pages,
        counts, flags, out if trace is None else trace.region("select", b * hkv, scores.device),
        BLOCK=block, WAYS=ways, FINISH=finish, CHAIN=chain is not None, TRACE=trace is not None,
        num_warps=num_warps or select_num_warps(block), PDL=pdl, launch_pdl=pdl,
    )
    return out
