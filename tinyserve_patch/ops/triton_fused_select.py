"""Triton fused Quest scoring + top-k page selection: ``q`` ``[B, Hq, D]``, ``meta`` ``[B, Hkv, P, 2, D]``
-> int32 ``[B, Hkv, num_select]`` (ascending, ``-1`` padded), in one launch.

Grid ``(programs_per_row, B * Hkv)``: the scoring programs of one (row, KV head) are adjacent in launch
order, so rows finish scoring one after another and the selection of a finished row overlaps the scoring
of later ones. Each program scores ``blocks_per_program`` blocks of ``BLOCK_P`` pages exactly as the
score kernel does (:func:`triton_score.score_blocks`, the same launch plan) into an fp32 scratch row. With one
program per row it then re-reads its row and selects; otherwise each program takes a ticket from a
per-(row, head) counter after its stores (CTA barrier + acq_rel atomic, the usual "last block" pattern)
and the last one to finish resets the counter and selects with :func:`_triton_common.select_from_scores`.
The counters are the persistent per-device buffer of :func:`_triton_common.ticket_counters` that every
launch leaves zeroed (no memset per call; CUDA-graph safe).

Equal to ``reference.select_pages(reference.page_scores(...))`` whenever the scores are reproduced
exactly; the fp32 score may differ from the reference's by an ulp (summation order), which can only
swap pages whose scores tie to within that ulp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import SELECT_FINISH, SELECT_WAYS, check, check_finish, check_select_pages, check_ways, pdl_enter, select_from_scores, select_num_warps, signal_row, ticket_counters, trace_mark, use_pdl
from .trace import KernelTrace
from .triton_score import launch_prefetch, meta_descriptor, plan_walk, prefetch_meta, prefetch_query, score_blocks, score_meta, use_tma


@triton.jit
def score_part(q_ptr, meta_ptr, ws_ptr, b, h, bh, part, blocks_per_program, num_pages, start, end, stride_qb, stride_qh,
               stride_mb, stride_mh, stride_mp, stride_mm, D, page_size, G: tl.constexpr, G_PAD: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, GQA_SUM: tl.constexpr, F32: tl.constexpr,
               SCALED_F16: tl.constexpr, STAGES: tl.constexpr, WALK: tl.constexpr, desc=None, TMA: tl.constexpr = False,
               PAGES_MAJOR: tl.constexpr = False):
    """Score blocks ``[part * blocks_per_program, ...)`` of (row ``b``, KV head ``h``) = ``bh`` into its fp32
    scratch row (:func:`triton_score.score_blocks`, through the TMA descriptor ``desc`` with ``TMA``); returns
    that row's pointer once every thread's scores are stored (CTA barrier: the row may be re-read or its
    ticket taken next)."""
    meta_bh = meta_ptr + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    ws = ws_ptr + bh.to(tl.int64) * num_pages
    first = part * blocks_per_program
    last = tl.minimum(first + blocks_per_program, tl.cdiv(num_pages, BLOCK_P))
    score_blocks(
        q_ptr, b, h, stride_qb, stride_qh, meta_bh, ws, first, last, num_pages, start, end, stride_mp, stride_mm, D, page_size,
        G, G_PAD, BLOCK_D, BLOCK_P, GQA_SUM, F32, SCALED_F16, STAGES, WALK, desc, TMA, PAGES_MAJOR,
    )
    tl.debug_barrier()
    return ws


@triton.jit
def select_if_last(ticket_ptr, parts, ws, offs, num_pages, start, end, out_ptr, num_select, page_size, sink, recent, notify_ptr,
                   ready_len_ptr, tag, BLOCK: tl.constexpr, WAYS: tl.constexpr, FINISH: tl.constexpr, NOTIFY: tl.constexpr):
    """After a program's :func:`score_part` (``offs`` = ``tl.arange(0, BLOCK)``): take a ticket of the row's ``parts`` (acq_rel, GPU scope: the
    usual "last block" pattern); the last one re-arms the ticket, re-reads the row's scores ``ws`` past L1,
    selects into ``out_ptr`` and, once the pages are stored, tells the row's attention (release): ``NOTIFY``
    0 nobody; 1 adds 1 to the row's flag at ``notify_ptr``; 2 appends ``tag`` to the ready list at
    ``notify_ptr``, whose length is at ``ready_len_ptr`` (:mod:`triton_persistent`, two grids)."""
    ticket = tl.atomic_add(ticket_ptr, 1)  # default: acq_rel, gpu scope
    if ticket == parts - 1:  # every other part of this (row, head) has stored its scores
        tl.store(ticket_ptr, 0)
        scores = tl.load(ws + offs, mask=offs < num_pages, other=float("-inf"), cache_modifier=".cg")
        select_from_scores(scores, offs, num_pages, start, end, out_ptr, num_select, page_size, sink, recent, BLOCK, WAYS, FINISH)
        if NOTIFY == 1:
            signal_row(notify_ptr, 1)
        elif NOTIFY == 2:
            tl.debug_barrier()
            slot = tl.atomic_add(ready_len_ptr, 1, sem="relaxed")
            tl.atomic_xchg(notify_ptr + slot, tag, sem="release", scope="gpu")

@triton.jit
def _fused_kernel(
    q_ptr,
    meta_ptr,
    desc,
    start_ptr,
    end_ptr,
    ws_ptr,
    counter_ptr,
    out_ptr,
    num_pages,
    num_select,
    kv_heads,
    D,
    blocks_per_program,
    programs_per_row,
    stride_qb,
    stride_qh,
    stride_mb,
    stride_mh,
    stride_mp,
    stride_mm,
    page_size,
    sink,
    recent,
    flag_ptr,
    trace_ptr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    GQA_SUM: tl.constexpr,
    F32: tl.constexpr,
    SCALED_F16: tl.constexpr,
    STAGES: tl.constexpr,
    WALK: tl.constexpr,
    BLOCK: tl.constexpr,
    WAYS: tl.constexpr,
    FINISH: tl.constexpr,
    SINGLE: tl.constexpr,
    CHAIN: tl.constexpr,
    PDL: tl.constexpr,
    TRACE: tl.constexpr,
    PREFETCH: tl.constexpr,
    PREFETCH_BYTES: tl.constexpr,
    PREFETCH_Q: tl.constexpr,
    TMA: tl.constexpr,
    PAGES_MAJOR: tl.constexpr,
):
    trace_mark(trace_ptr, 0, TRACE)
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // kv_heads
    h = bh % kv_heads
    prefetch_meta(meta_ptr, b, h, pid, blocks_per_program, num_pages, stride_mb, stride_mh, stride_mp, stride_mm, D, BLOCK_P,
                  PREFETCH, PREFETCH_BYTES)
    prefetch_query(q_ptr, b, h, stride_qb, stride_qh, D, G, PREFETCH_Q)
    pdl_enter(PDL)
    trace_mark(trace_ptr, 1, TRACE)
    start = tl.load(start_ptr + b).to(tl.int32)
    end = tl.load(end_ptr + b).to(tl.int32)
    ws = score_part(q_ptr, meta_ptr, ws_ptr, b, h, bh, pid, blocks_per_program, num_pages, start, end, stride_qb, stride_qh,
                    stride_mb, stride_mh, stride_mp, stride_mm, D, page_size, G, G_PAD, BLOCK_D, BLOCK_P, GQA_SUM, F32,
                    SCALED_F16, STAGES, WALK, desc, TMA, PAGES_MAJOR)
    offs = tl.arange(0, BLOCK)
    out_bh = out_ptr + bh.to(tl.int64) * num_select
    NOTIFY: tl.constexpr = 1 if CHAIN else 0  # select_if_last: flag the row for its attention programs
    if SINGLE:
        scores = tl.load(ws + offs, mask=offs < num_pages, other=float("-inf"))
        select_from_scores(scores, offs, num_pages, start, end, out_bh, num_select, page_size, sink, recent, BLOCK, WAYS, FINISH)
        if CHAIN:
            signal_row(flag_ptr + bh, 1)  # this row's attention programs wait for it
    else:
        select_if_last(counter_ptr + bh, programs_per_row, ws, offs, num_pages, start, end, out_bh, num_select, page_size, sink, recent,
                       flag_ptr + bh, flag_ptr, 0, BLOCK, WAYS, FINISH, NOTIFY)
    trace_mark(trace_ptr, 2, TRACE)


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
    blocks_per_program: int | None = None,
    ways: int | None = None,
    finish: int | None = None,
    num_warps: int | None = None,
    block_p: int | None = None,
    num_stages: int | None = None,
    flags: torch.Tensor | None = None,
    trace: KernelTrace | None = None,
    maxnreg: int | None = None,
    prefetch: bool | None = None,
    tma: bool = False,
    pages_major: bool = False,
) -> torch.Tensor:
    """int32 ``[B, Hkv, num_select]`` (see module docstring). ``blocks_per_program``, ``ways``, ``finish``,
    ``num_warps``, ``block_p`` and ``num_stages`` override the tuned defaults (tests, tuning). ``flags``
    (int32 ``[>= B * Hkv]``, zeroed): the row-chained mode (:mod:`triton_chain`), the program that selects a
    row adds 1 to its flag once the row's pages are stored. ``trace``: record each program's timestamps
    (:mod:`trace`). ``maxnreg``: cap the registers per thread (tuning the occupancy of the score part).
    ``prefetch``: force the L2 prefetch of the metadata and the query before the wait on / off (:func:`triton_score.prefetch_plan`).
    ``tma``: read the metadata through the tensor-memory accelerator (:func:`triton_score.use_tma`, forced;
    the walk's plan unchanged). Off by default: not yet timed in this kernel (the score kernel's own rule
    comes from its measurements); the same scores either way. ``pages_major``: the score's products as
    ``[pages, D] x [D, G]`` (:func:`triton_score.block_scores`; off by default: not yet timed)."""
    q, meta, consts = score_meta(q, meta, seq_start, seq_end, page_size, gqa_reduction)
    check(num_select >= 1, f"num_select={num_select} must be >= 1")
    check(sink_pages >= 0 and recent_pages >= 0, "sink_pages / recent_pages must be >= 0")
    ways = check_ways(SELECT_WAYS if ways is None else ways)
    finish = check_finish(SELECT_FINISH if finish is None else finish)
    b, hkv, pages, _, d = meta.shape
    block = check_select_pages(pages)
    out = torch.empty((b, hkv, num_select), dtype=torch.int32, device=meta.device)
    if b * hkv == 0:
        return out
    tma = use_tma(meta, consts["BLOCK_D"], bool(tma))
    walk = plan_walk(consts, pages, b * hkv, meta.device, meta.dtype, block_p, blocks_per_program,
                     num_warps or select_num_warps(block), num_stages)
    per = walk.pop("blocks_per_program")
    nprog = walk.pop("programs_per_row")
    ws = torch.empty((b * hkv, pages), dtype=torch.float32, device=meta.device)
    counters = ws
    if nprog > 1:
        counters = ticket_counters(meta.device, b * hkv)
        if counters is None:  # first launch inside a CUDA-graph capture: a zeroed buffer of its own
            counters = torch.zeros(b * hkv, dtype=torch.int32, device=meta.device)
    pdl = use_pdl(meta.device)
    _fused_kernel[(nprog, b * hkv)](
        q, meta, meta_descriptor(meta, walk["BLOCK_P"]) if tma else meta, seq_start, seq_end, ws, counters, out,
        pages, num_select, hkv, d, per, nprog,
        q.stride(0), q.stride(1), meta.stride(0), meta.stride(1), meta.stride(2), meta.stride(3),
        page_size, sink_pages, recent_pages, out if flags is None else flags,
        out if trace is None else trace.region("score_select", nprog * b * hkv, meta.device),
        BLOCK=block, WAYS=ways, FINISH=finish, SINGLE=nprog == 1, CHAIN=flags is not None, TRACE=trace is not None,
        PDL=pdl, TMA=tma, PAGES_MAJOR=bool(pages_major), launch_pdl=pdl, **({} if maxnreg is None else {"maxnreg": maxnreg}), **launch_prefetch(pdl, walk["num_warps"], q, meta, consts["G"], prefetch, head=False),
        **walk, **consts,
    )
    return out
