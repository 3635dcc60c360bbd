"""Triton fused Quest scoring + top-k page selection: ``q`` ``[B, Hq, D]``, ``meta`` ``[B, Hkv, P, 2, D]``
-> int32 ``[B, Hkv, num_select]`` (ascending, ``-1`` padded), in one launch.

Grid ``(B * Hkv, NPROG)``. Each program scores a contiguous range of pages (``BLOCK_P`` at a time, with
:func:`triton_score.score_block`) into an fp32 scratch row. With ``NPROG == 1`` (enough (row, head) pairs
to fill the GPU) the program then re-reads its row and selects. With ``NPROG > 1`` (few rows/heads, many
pages: the metadata read is spread over more SMs) each program takes a ticket from a per-(row, head)
counter after its stores (CTA barrier + acq_rel atomic, the usual "last block" pattern); the last one to
finish resets the counter and selects with :func:`_triton_common.select_from_scores`. The counters are a
persistent zeroed buffer per device and stream that every launch leaves zeroed (CUDA-graph safe).

Equal to ``reference.select_pages(reference.page_scores(...))`` whenever the scores are reproduced
exactly; the fp32 score may differ from the reference's by an ulp (summation order), which can only
swap pages whose scores tie to within that ulp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import SELECT_WAYS, check, check_select_pages, search_passes, pdl_enter, select_from_scores, select_num_warps, sm_count, use_pdl
from .triton_score import load_group_query, score_block, score_meta

def _counters(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of n ticket counters, allocated per call.

    Per call rather than cached: a cached buffer first allocated while a CUDA graph is being captured
    lives in the graph's memory pool and outlives it, which CUDA-graph trees reject ("tensor(s) in the
    cudagraph pool not tracked as outputs"). The memset is a few bytes."""
    return torch.zeros(max(n, 1), dtype=torch.int32, device=device)


@triton.jit
def _fused_kernel(
    q_ptr,
    meta_ptr,
    start_ptr,
    end_ptr,
    ws_ptr,
    counter_ptr,
    out_ptr,
    num_pages,
    num_select,
    kv_heads,
    D,
    pages_per_prog,
    stride_qb,
    stride_qh,
    stride_mb,
    stride_mh,
    stride_mp,
    stride_mm,
    page_size,
    sink,
    recent,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    GQA_SUM: tl.constexpr,
    F32: tl.constexpr,
    BLOCK: tl.constexpr,
    WAYS: tl.constexpr,
    PASSES: tl.constexpr,
    NPROG: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    bh = tl.program_id(0)
    pid = tl.program_id(1)
    b = bh // kv_heads
    h = bh % kv_heads
    start = tl.load(start_ptr + b).to(tl.int32)
    end = tl.load(end_ptr + b).to(tl.int32)
    q_pos, q_neg = load_group_query(q_ptr, b, h, stride_qb, stride_qh, G, G_PAD, D, BLOCK_D)
    meta_bh = meta_ptr + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    ws = ws_ptr + bh.to(tl.int64) * num_pages
    p_lo = pid * pages_per_prog
    p_hi = tl.minimum(p_lo + pages_per_prog, num_pages)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        pages = p0 + tl.arange(0, BLOCK_P)
        s = score_block(
            q_pos, q_neg, meta_bh, pages, p_hi, start, end, stride_mp, stride_mm, D, page_size,
            G, G_PAD, BLOCK_D, GQA_SUM, F32,
        )
        tl.store(ws + pages, s, mask=pages < p_hi)
    tl.debug_barrier()  # every thread's scores stored before the row is re-read / the ticket is taken

    offs = tl.arange(0, BLOCK)
    out_bh = out_ptr + bh.to(tl.int64) * num_select
    if NPROG == 1:
        scores = tl.load(ws + offs, mask=offs < num_pages, other=float("-inf"))
        select_from_scores(scores, offs, num_pages, start, end, out_bh, num_select, page_size, sink, recent, BLOCK, WAYS, PASSES)
    else:
        ticket = tl.atomic_add(counter_ptr + bh, 1)  # default: acq_rel, gpu scope
        if ticket == NPROG - 1:  # every other program of this (row, head) has stored its scores
            tl.store(counter_ptr + bh, 0)
            scores = tl.load(ws + offs, mask=offs < num_pages, other=float("-inf"), cache_modifier=".cg")
            select_from_scores(scores, offs, num_pages, start, end, out_bh, num_select, page_size, sink, recent, BLOCK, WAYS, PASSES)


def plan_programs(batch_heads: int, pages: int, block_p: int, sm_count: int) -> tuple[int, int]:
    """``(NPROG, pages_per_prog)``: ~4 programs per SM in all, each at least ``block_p`` pages."""
    nprog = max(1, min(triton.cdiv(pages, block_p), triton.cdiv(4 * sm_count, max(1, batch_heads))))
    per = triton.cdiv(triton.cdiv(pages, nprog), block_p) * block_p
    return triton.cdiv(pages, per), per


def score_and_select_triton(
    q: torch.Tensor,
    meta: torch.Tensor,
    seq_start: torch.Tensor,
    seq_end: torch.Tensor,
    page_size: int,
    num_select: int,
    sink_pages: int,
    recent_pages: int,
    gqa_reduction: str,
    num_programs: int | None = None,
    ways: int | None = None,
    num_warps: int | None = None,
    block_p: int | None = None,
) -> torch.Tensor:
    """int32 ``[B, Hkv, num_select]`` (see module docstring). ``num_programs``, ``ways``, ``num_warps``
    and ``block_p`` override the tuned defaults (tests, tuning)."""
    q, meta, consts = score_meta(q, meta, seq_start, seq_end, page_size, gqa_reduction)
    check(num_select >= 1, f"num_select={num_select} must be >= 1")
    check(sink_pages >= 0 and recent_pages >= 0, "sink_pages / recent_pages must be >= 0")
    b, hkv, pages, _, d = meta.shape
    block = check_select_pages(pages)
    out = torch.empty((b, hkv, num_select), dtype=torch.int32, device=meta.device)
    if b * hkv == 0:
        return out
    block_p = block_p or (128 if consts["BLOCK_D"] <= 64 else 64)  # H100-tuned
    if num_programs is None:
        nprog, per = plan_programs(b * hkv, pages, block_p, sm_count(meta.device))
    else:
        per = triton.cdiv(triton.cdiv(pages, num_programs), block_p) * block_p
        nprog = triton.cdiv(pages, per)
    ws = torch.empty((b * hkv, pages), dtype=torch.float32, device=meta.device)
    counters = _counters(meta.device, b * hkv) if nprog > 1 else ws
    pdl = use_pdl(meta.device)
    _fused_kernel[(b * hkv, nprog)](
        q, meta, seq_start, seq_end, ws, counters, out,
        pages, num_select, hkv, d, per,
        q.stride(0), q.stride(1), meta.stride(0), meta.stride(1), meta.stride(2), meta.stride(3),
        page_size, sink_pages, recent_pages, BLOCK_P=block_p, BLOCK=block,
        WAYS=ways or SELECT_WAYS, PASSES=search_passes(ways or SELECT_WAYS), NPROG=nprog,
        num_warps=num_warps or select_num_warps(block), PDL=pdl, launch_pdl=pdl, **consts,
    )
    return out
