"""Persistent decode: Quest scoring, top-k selection and sparse attention in one grid that takes work items
from a queue. Experimental and off by default: on the H200 (commits aed1a72, c4c68ec) it is correct
(eager and from CUDA graphs) and slower than the split and fused row-chained decodes at every shape
measured: Llama-3-8B B=8/64K/2048 79-103 us by queue order against 62.0 (fused chain) and 67.5 (split),
69.1 at best (every score item first, 4 warps); batch 1 7-19 us slower
(``benchmarks/results/kernels_h200_persistent_*.json``, ``benchmarks/NOTES.md``). One grid has one warp
count and one register cap for three phases: the 4096-key selection wants 8 warps, the attention 4 (the
whole grid at 4 warps was 9 us faster than at 8, 77.0 vs 86.1 us, its selection slower included), and
attention items taken before their row is selected spin in slots the scoring needs (queueing them right
after their row's scoring, lag 0: 102.9 us).

Inputs as the split chain's: ``q`` ``[B, Hq, D]``, ``k_cache`` / ``v_cache`` ``[B, Hkv, cap, D]``, ``meta``
``[B, Hkv, P, 2, D]``, ``seq_start`` / ``seq_end`` ``[B]``. Returns the attention ``[B, Hq, D]`` (q's dtype)
and the selected pages int32 ``[B, Hkv, num_select]``: the pages of the fused row-chained decode
(:func:`triton_chain.quest_decode_chained_triton` with ``fused=True``) and, at the same splits merged
inline, its output bit for bit where the program has the attention kernel's warps (4: up to 2048 pages),
else within rounding (8 warps reduce the softmax sums in another order): the same device functions, only
the scheduling differs.

Why: in the row-chained decodes the attention is a second grid, and a PDL grid is scheduled only once every
program of the previous grid has started, so the attention programs become resident during the score
grid's last wave and most rows' attention bytes stream after the scoring instead of beside it
(``benchmarks/NOTES.md``). Here ``programs`` resident programs (about one wave) each loop: take the next
item index from a queue counter (``atomic_add``), do the item, repeat. The items are, per (row, KV head)
``r = b * Hkv + h``, ``score_items`` score items (``blocks_per_program`` page blocks each, as the fused
kernel's programs) and ``num_splits`` attention items (one split of the selected tokens each), in the
order

    score items of rows 0 .. lag-1, then for r = 0 .. rows-lag-1: [score items of row r + lag,
    attention items of row r], then the attention items of rows rows-lag .. rows-1

so a row's attention is queued ``lag`` rows of scoring after its own, and early rows' attention bytes
stream beside later rows' scoring. The last score item of a row to finish (a ticket counter) selects the
row and releases its flag; an attention item spins on its row's flag (acquire), reads the pages past L1,
writes its partial output, and the row's last split to finish merges the partials in split order and
re-arms the row's counters. The waits cannot deadlock: a row's score items are queued before its
attention items, so a spinning item only waits for items already taken by running programs that wait for
nothing. The program that takes the queue's last index (``total + programs - 1``: every program takes one
index past the end) zeroes the queue, so every launch leaves the counters zeroed (CUDA graphs).

Two grids (``grids=2``, commit fae97b0): the score items in a grid of their own (2 programs an SM, row-major
queue, its own register cap), whose selecting item appends the row to a ready list (``row + 1`` per slot,
release), and the attention items in a second grid (one program an SM, 4 warps, 128 registers), a PDL
launch that is resident beside the scoring as soon as every score program has started; its item ``i`` is
split ``i % num_splits`` of the ``i // num_splits``-th row selected. Its program that takes the attention
queue's last index waits until every score program has left its loop, then clears both queues and the
ready list. No wait can deadlock: the score grid waits for nothing, and the attention grid is launched only
once every score program is resident. The same bits as the fused chain at the same splits (4-warp
attention). Measured (H200, ``kernels_h200_two_grids_fae97b0.*``, graphed timeline
``persistent_timeline_h200_664aadd.*``): the overlap happens (the first rows' attention from 20 us instead
of 29 in the fused chain) but the scoring, with one SM slot and part of the bandwidth given to the
attention, ends at 46 us instead of 39 and the last row is selected at 57 instead of 50: Llama-3-8B
B=8/64K/2048 74.2-86.3 us against 62.1. An SM cannot hold the score's 3 programs and the attention's 2.

Counters: a persistent per-device int32 buffer (:func:`_triton_common.ticket_counters`, pool
``"persistent"``): the queue, the attention grid's queue and the ready list's length (two grids), then per
row the score tickets, the selection flags (two grids: the ready list) and the attention tickets. Where it
cannot exist (first allocation inside a CUDA-graph capture) the fused row-chained decode runs instead (the
same pages; the output as above).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import (SELECT_FINISH, SELECT_WAYS, check, check_select_pages, pdl_enter, pdl_trigger, scaled_f16,
                             select_num_warps, sm_count, ticket_counters, use_pdl, wait_row)
from .trace import KernelTrace
from .triton_chain import fused_chain_plan, quest_decode_chained_triton
from .triton_decode import LOG2E, attend_chunk, check_attention, default_block_n, merge_partials, split_tokens, store_partial
from .triton_fused_select import score_part, select_if_last
from .triton_score import plan_walk, score_meta


@triton.jit
def _item(i, rows, lag, score_items, num_splits):
    """Queue index ``i`` -> ``(is_score, row, sub)``: the order of the module docstring."""
    lead = lag * score_items
    per_round = score_items + num_splits
    mid = rows - lag
    j = i - lead
    rnd = j // per_round
    w = j - rnd * per_round
    tail = j - mid * per_round
    is_score = (i < lead) | ((rnd < mid) & (w < score_items))
    row = tl.where(i < lead, i // score_items,
                   tl.where(rnd < mid, tl.where(w < score_items, rnd + lag, rnd), mid + tail // num_splits))
    sub = tl.where(i < lead, i % score_items,
                   tl.where(rnd < mid, tl.where(w < score_items, w, w - score_items), tail % num_splits))
    return is_score, row, sub


@triton.jit
def _stamp(trace_ptr, i, field: tl.constexpr, TRACE: tl.constexpr):
    """With ``TRACE`` (a :class:`trace.KernelTrace` region ``[items, 4]``): the global timer (ns) in item
    ``i``'s ``field`` (0 taken, 1 scored / its row selected, 2 done), its SM in field 3 when taken."""
    if TRACE:
        tl.store(trace_ptr + i.to(tl.int64) * 4 + field, tl.extra.cuda.globaltimer())
        if field == 0:
            tl.store(trace_ptr + i.to(tl.int64) * 4 + 3, tl.extra.cuda.smid().to(tl.int64))


@triton.jit
def _persistent_kernel(
    q_ptr,
    meta_ptr,
    k_ptr,
    v_ptr,
    start_ptr,
    end_ptr,
    ws_ptr,
    idx_ptr,
    o_ws_ptr,
    lse_ws_ptr,
    out_ptr,
    sync_ptr,
    num_pages,
    num_select,
    kv_heads,
    rows,
    lag,
    score_items,
    blocks_per_program,
    num_splits,
    tokens_per_split,
    total_items,
    num_programs,
    score_queue_end,
    qk_scale,
    softcap,
    stride_qb,
    stride_qh,
    stride_mb,
    stride_mh,
    stride_mp,
    stride_mm,
    stride_cb,
    stride_ch,
    stride_ct,
    stride_ob,
    stride_oh,
    page_size,
    sink,
    recent,
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
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    KV_SCALED_F16: tl.constexpr,
    PHASE: tl.constexpr,
    PDL: tl.constexpr,
    TRACE: tl.constexpr,
):
    # PHASE 0: one grid, score and attention items; 1: the score grid of two; 2: their attention grid
    if PHASE == 2:
        pdl_trigger(PDL)  # launched behind the score grid: its inputs are flagged per row (the ready list)
    else:
        pdl_enter(PDL)
    queue = sync_ptr  # the grid's own queue counter: sync_ptr[1] for the attention grid
    if PHASE == 2:
        queue = sync_ptr + 1
    ready_n = sync_ptr + 2
    tickets = sync_ptr + 3
    flags = tickets + rows  # one grid: a flag per row; two grids: the ready list (row + 1, in selection order)
    splits_done = flags + rows
    NOTIFY: tl.constexpr = 1 if PHASE == 0 else 2  # how the selecting item tells the attention (select_if_last)
    offs = tl.arange(0, BLOCK)
    rows_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = rows_g < G
    dmask = offs_d < HEAD_DIM
    i = tl.atomic_add(queue, 1, sem="relaxed")
    while i < total_items:
        _stamp(trace_ptr, i, 0, TRACE)
        if PHASE == 0:
            is_score, bh, sub = _item(i, rows, lag, score_items, num_splits)
        elif PHASE == 1:  # row-major: a row's score items adjacent, so rows finish one after another
            is_score = True
            bh = i // score_items
            sub = i % score_items
        else:  # item i: split i % num_splits of the (i // num_splits)-th row selected
            is_score = False
            bh = wait_row(flags + i // num_splits, 1) - 1
            sub = i % num_splits
        b = bh // kv_heads
        h = bh % kv_heads
        start = tl.load(start_ptr + b).to(tl.int32)
        end = tl.load(end_ptr + b).to(tl.int32)
        if is_score:  # blocks [sub * per, ...) of the row; the row's last item to finish selects it
            ws = score_part(q_ptr, meta_ptr, ws_ptr, b, h, bh, sub, blocks_per_program, num_pages, start, end, stride_qb,
                            stride_qh, stride_mb, stride_mh, stride_mp, stride_mm, HEAD_DIM, page_size, G, G_PAD, BLOCK_D,
                            BLOCK_P, GQA_SUM, F32, SCALED_F16, STAGES, WALK)
            _stamp(trace_ptr, i, 1, TRACE)
            notify = flags  # two grids: the ready list (row + 1 appended)
            if PHASE == 0:
                notify = flags + bh  # one grid: the row's flag
            select_if_last(tickets + bh, score_items, ws, offs, num_pages, start, end, idx_ptr + bh.to(tl.int64) * num_select,
                           num_select, page_size, sink, recent, notify, ready_n, bh + 1, BLOCK, WAYS, FINISH, NOTIFY)
        else:  # split `sub` of the row's selected tokens, once the row is selected
            if PHASE == 0:
                wait_row(flags + bh, 1)
            _stamp(trace_ptr, i, 1, TRACE)
            tok0 = sub * tokens_per_split
            acc, m_i, l_i = attend_chunk(
                q_ptr, k_ptr, v_ptr, idx_ptr, b, h, start, end, tok0,
                tl.minimum(tok0 + tokens_per_split, num_select * PAGE_SIZE), qk_scale, softcap,
                stride_qb, stride_qh, stride_cb, stride_ch, stride_ct, kv_heads * num_select, num_select,
                G, G_PAD, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, SOFTCAP, F32, KV_SCALED_F16, True, False,
            )
            o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
            store_partial(o_ws_ptr, lse_ws_ptr, (bh.to(tl.int64) * num_splits + sub) * G + rows_g, o, m_i, l_i, row_mask,
                          dmask, HEAD_DIM, BLOCK_D)
            tl.debug_barrier()
            done = tl.atomic_add(splits_done + bh, 1, sem="acq_rel", scope="gpu")
            if done == num_splits - 1:  # every split stored: merge, then re-arm the row
                out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + (h * G + rows_g)[:, None].to(tl.int64) * stride_oh + offs_d[None, :]
                merge_partials(o_ws_ptr, lse_ws_ptr, bh.to(tl.int64) * num_splits * G + rows_g, num_splits, out_ptrs,
                               row_mask, dmask, G, G_PAD, HEAD_DIM, BLOCK_D)
                tl.atomic_xchg(splits_done + bh, 0)
                if PHASE == 0:
                    tl.atomic_xchg(flags + bh, 0)
        _stamp(trace_ptr, i, 2, TRACE)
        if PHASE == 2:  # the item's reads of the ready list ordered before its next take (the finisher clears it)
            tl.debug_barrier()
            i = tl.atomic_add(queue, 1, sem="acq_rel", scope="gpu")
        else:
            i = tl.atomic_add(queue, 1, sem="relaxed")
    if i == total_items + num_programs - 1:  # the queue's last index: every program has left the loop
        if PHASE == 0:
            tl.atomic_xchg(queue, 0)
        elif PHASE == 2:  # re-arm both grids once every score program has left its loop too
            wait_row(sync_ptr, score_queue_end)
            r = tl.arange(0, 128)
            for r0 in range(0, rows, 128):
                tl.store(flags + r0 + r, 0, mask=r0 + r < rows)
            tl.atomic_xchg(sync_ptr, 0)
            tl.atomic_xchg(ready_n, 0)
            tl.atomic_xchg(queue, 0, sem="release", scope="gpu")


def persistent_plan(rows: int, pages: int, num_select: int, page_size: int, head_dim: int, device: torch.device,
                    num_warps: int | None = None, grids: int = 1, attention_warps: int | None = None) -> dict:
    """Launch defaults. One grid: the fused row-chained decode's (:func:`triton_chain.fused_chain_plan`:
    register cap for 3 CTAs per SM at the selection's warps, its attention splits, merged inline),
    ``programs`` = 3 per SM (the resident grid), ``lag`` = half the rows. Two grids: a score grid of 2
    programs per SM whose register cap leaves room beside them for one attention program of
    :data:`ATTENTION_WARPS` warps capped at :data:`ATTENTION_REGS` registers, and an attention grid of one
    program per SM."""
    plan = fused_chain_plan(rows, pages, num_select, page_size, head_dim, device, num_warps)
    if grids == 1:
        return dict(maxnreg=plan["maxnreg"], num_splits=plan["num_splits"], programs=3 * sm_count(device), lag=rows // 2)
    warps = num_warps or select_num_warps(check_select_pages(pages))
    attention_warps = attention_warps or ATTENTION_WARPS
    cap = max(8, (65536 - ATTENTION_REGS * 32 * attention_warps) // (2 * 32 * warps) // 8 * 8)
    return dict(maxnreg=cap, num_splits=plan["num_splits"], programs=2 * sm_count(device), lag=0,
                attention_programs=sm_count(device), attention_warps=attention_warps)


#: Warps of the two-grid decode's attention programs (the split attention kernel's at head_dim <= 128) and
#: their register cap (uncapped they take 155 at Llama-3-8B's shape, sm_90: with two score programs of 8
#: warps at 96 that no longer fits one SM's 64K registers).
ATTENTION_WARPS = 4
ATTENTION_REGS = 128


def queue_plan(consts: dict, rows: int, pages: int, num_select: int, page_size: int, head_dim: int, device: torch.device,
               meta_dtype: torch.dtype, num_splits: int | None = None, lag: int | None = None, programs: int | None = None,
               blocks_per_program: int | None = None, num_warps: int | None = None, maxnreg: int | None = None,
               block_n: int | None = None, grids: int = 1, attention_programs: int | None = None,
               attention_warps: int | None = None) -> dict:
    """The queue and launch of one persistent decode (defaults :func:`persistent_plan`, overrides checked):
    ``lag``, ``score_items`` and ``blocks_per_program`` per row, ``num_splits`` and ``tokens_per_split``
    (:func:`triton_decode.split_tokens`), ``total`` items, ``programs``, ``maxnreg``, ``block_n``, and
    ``walk``, the score walk's launch constants (:func:`triton_score.plan_walk`). Two grids (``grids=2``):
    ``total`` and ``programs`` are the score grid's, ``attention_total``, ``attention_programs`` and
    ``attention_warps`` the attention grid's."""
    check(grids in (1, 2), f"grids={grids}: 1 (one grid) or 2 (a score grid and an attention grid)")
    check(lag is None or lag >= 0, f"lag={lag} must be >= 0")
    check(lag is None or grids == 1, "lag orders the one-grid queue; with grids=2 the attention takes rows as they are selected")
    check(grids == 2 or (attention_programs is None and attention_warps is None),
          "attention_programs / attention_warps are options of the two-grid decode (grids=2)")
    check(num_splits is None or num_splits >= 1, f"num_splits={num_splits} must be >= 1")
    check(programs is None or programs >= 1, f"programs={programs} must be >= 1")
    check(attention_programs is None or attention_programs >= 1, f"attention_programs={attention_programs} must be >= 1")
    check(attention_warps is None or attention_warps in (1, 2, 4, 8, 16), f"attention_warps={attention_warps}: 1, 2, 4, 8 or 16")
    plan = persistent_plan(rows, pages, num_select, page_size, head_dim, device, num_warps, grids, attention_warps)
    walk = plan_walk(consts, pages, rows, device, meta_dtype, None, blocks_per_program,
                     num_warps or select_num_warps(check_select_pages(pages)))
    per = walk.pop("blocks_per_program")
    score_items = walk.pop("programs_per_row")
    block_n = block_n or default_block_n(head_dim)
    splits, tokens_per_split = split_tokens(num_select * page_size, plan["num_splits"] if num_splits is None else num_splits, block_n)
    total = rows * (score_items + splits) if grids == 1 else rows * score_items
    out = dict(lag=plan["lag"] if lag is None else min(lag, rows), score_items=score_items, blocks_per_program=per,
               num_splits=splits, tokens_per_split=tokens_per_split, total=total,
               programs=min(programs or plan["programs"], total), maxnreg=plan["maxnreg"] if maxnreg is None else maxnreg,
               block_n=block_n, walk=walk)
    if grids == 2:
        out.update(attention_total=rows * splits,
                   attention_programs=min(attention_programs or plan["attention_programs"], rows * splits),
                   attention_warps=plan["attention_warps"])
    return out


def quest_decode_persistent_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: torch.Tensor,
    seq_start: torch.Tensor,
    seq_end: torch.Tensor,
    page_size: int,
    num_select: int,
    sink_pages: int,
    recent_pages: int,
    gqa_reduction: str,
    scale: float,
    softcap: float = 0.0,
    num_splits: int | None = None,
    lag: int | None = None,
    programs: int | None = None,
    blocks_per_program: int | None = None,
    num_warps: int | None = None,
    maxnreg: int | None = None,
    block_n: int | None = None,
    trace: KernelTrace | None = None,
    grids: int = 1,
    attention_programs: int | None = None,
    attention_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, D], indices int32 [B, Hkv, num_select])`` in one persistent launch, or with
    ``grids=2`` in a score grid and an attention grid (see module docstring). Tuning overrides: ``num_splits``
    (attention items per row), ``lag`` (one grid: rows of scoring queued between a row's score and attention
    items; ``>= rows``: every score item first), ``programs`` (the grid; two grids: the score grid),
    ``blocks_per_program``, ``num_warps`` and ``maxnreg`` (of the grid that scores), ``block_n`` (attention
    tokens per block), ``attention_programs`` and ``attention_warps`` (two grids: the attention grid).
    ``trace``: record every item's timestamps (:mod:`trace`; one "row" per item in queue order: taken,
    scored or its row selected, done, SM; two grids: a region per grid)."""
    q, meta, consts = score_meta(q, meta, seq_start, seq_end, page_size, gqa_reduction)
    q, k_cache, v_cache = check_attention(q, k_cache, v_cache, seq_start, seq_end, page_size, scale, softcap)
    check(num_select >= 1, f"num_select={num_select} must be >= 1")
    check(sink_pages >= 0 and recent_pages >= 0, "sink_pages / recent_pages must be >= 0")
    b, hkv, pages, _, d = meta.shape
    check(k_cache.shape[:2] == (b, hkv) and k_cache.shape[2] == pages * page_size,
          f"meta {tuple(meta.shape)} does not cover the cache {tuple(k_cache.shape)} at page_size {page_size}")
    rows = b * hkv
    hq = q.shape[1]
    out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    if rows == 0 or hq == 0:
        return out, torch.empty((b, hkv, num_select), dtype=torch.int32, device=q.device)
    block = check_select_pages(pages)
    plan = queue_plan(consts, rows, pages, num_select, page_size, d, q.device, meta.dtype, num_splits, lag, programs,
                      blocks_per_program, num_warps, maxnreg, block_n, grids, attention_programs, attention_warps)
    sync = ticket_counters(q.device, 3 + 3 * rows, pool="persistent")
    if sync is None:  # first launch inside a CUDA-graph capture: the fused row-chained decode (same pages)
        return quest_decode_chained_triton(q, k_cache, v_cache, meta, seq_start, seq_end, page_size, num_select, sink_pages,
                                           recent_pages, gqa_reduction, scale, softcap, merge="inline", fused=True,
                                           num_splits=plan["num_splits"])
    idx = torch.empty((b, hkv, num_select), dtype=torch.int32, device=q.device)
    ws = torch.empty((rows, pages), dtype=torch.float32, device=q.device)
    o_ws = torch.empty((rows * plan["num_splits"] * (hq // hkv), d), dtype=torch.float32, device=q.device)
    lse_ws = torch.empty((rows * plan["num_splits"] * (hq // hkv),), dtype=torch.float32, device=q.device)
    pdl = use_pdl(q.device)
    score_end = plan["total"] + plan["programs"]  # the score queue's value once every program has left its loop

    def launch(phase: int, total: int, nprog: int, name: str, **compile_options):
        _persistent_kernel[(nprog,)](
            q, meta, k_cache, v_cache, seq_start, seq_end, ws, idx, o_ws, lse_ws, out, sync,
            pages, num_select, hkv, rows, plan["lag"], plan["score_items"], plan["blocks_per_program"], plan["num_splits"],
            plan["tokens_per_split"], total, nprog, score_end,
            float(scale) / softcap if softcap else float(scale) * LOG2E, float(softcap) * LOG2E,
            q.stride(0), q.stride(1), meta.stride(0), meta.stride(1), meta.stride(2), meta.stride(3),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1),
            page_size, sink_pages, recent_pages, out if trace is None else trace.region(name, total, q.device),
            TRACE=trace is not None, BLOCK=block, WAYS=SELECT_WAYS, FINISH=SELECT_FINISH, HEAD_DIM=d, BLOCK_N=plan["block_n"],
            PAGE_SIZE=page_size, SOFTCAP=bool(softcap), KV_SCALED_F16=scaled_f16(q.dtype, k_cache.dtype), PHASE=phase,
            PDL=pdl, launch_pdl=pdl,
            num_stages=2,  # the attention loop's (the score walk pipelines over its own STAGES)
            **compile_options, **consts,
        )

    score_options = {**plan["walk"], **({"maxnreg": plan["maxnreg"]} if plan["maxnreg"] else {})}
    try:
        if grids == 1:
            launch(0, plan["total"], plan["programs"], "persistent", **score_options)
        else:  # the attention grid, a PDL launch, is resident beside the score grid's programs as soon as they all started
            launch(1, plan["total"], plan["programs"], "persistent_score", **score_options)
            walk = dict(plan["walk"], num_warps=plan["attention_warps"])  # (the score constants unused in this phase)
            launch(2, plan["attention_total"], plan["attention_programs"], "persistent_attention", maxnreg=ATTENTION_REGS, **walk)
    except BaseException:
        sync[: 3 + 3 * rows].zero_()  # a launch that failed part-way must not leave the queue or a row armed
        raise
    return out, idx
