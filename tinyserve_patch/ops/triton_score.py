"""Triton Quest page scores: ``q`` ``[B, Hq, D]`` + ``meta`` ``[B, Hkv, P, 2, D]`` (q's dtype or fp8, upcast
exactly on load) -> float32 ``[B, Hkv, P]``.

Per query head the upper bound ``sum_d max(q_d * min_d, q_d * max_d) = relu(q) . max + min(q, 0) . min``,
computed as two tensor-core products ``[G_PAD, D] x [D, BLOCK_P]`` (G query heads of the KV head, padded
to 16 rows; fp32 accumulation; exact products for fp16/bf16, IEEE fp32 for fp32), reduced over the group
by ``max`` or ``sum``; ``-inf`` for pages without a valid token. Grid ``(B * Hkv, cdiv(blocks, per))``:
a program walks ``per`` consecutive blocks of ``BLOCK_P`` pages (``BLOCK_P * 2 * D`` contiguous metadata
elements each), software-pipelined over ``STAGES`` (:func:`score_blocks`); :func:`default_launch` picks
``per``, the warps and the stages from the H100 and H200 sweeps. Launches of 32 MiB of fp16 / bf16
metadata and more read each block through the tensor-memory accelerator, one block a program
(:func:`use_tma`: two bulk copies a block instead of per-thread ``cp.async``).

The summation order differs from the reference's, so a score may differ from it in the last ulp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import _cuda_props, check, check_float_dtype, check_head_dim, check_page_size, check_rows, f32_dot, interpreting, mm, page_valid, pdl_enter, prefetch_l2, scaled_f16, scaled_f16_query, signal_row, sm_count, trace_mark, use_pdl
from .reference import FP8_DTYPES
from .trace import KernelTrace


@triton.jit
def _relu_halves(x, dtype: tl.constexpr):
    """``(max(x, 0), min(x, 0))`` in ``dtype``, a NaN kept in both (the reference's products propagate it;
    a plain max / min would drop it and score the pages as if that element were 0)."""
    pos = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    neg = tl.minimum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return pos.to(dtype), neg.to(dtype)


@triton.jit
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def load_group_query(q_ptr, b, h, stride_qb, stride_qh, G: tl.constexpr, G_PAD: tl.constexpr, D, BLOCK_D: tl.constexpr,
                     SCALED_F16: tl.constexpr):
    """``(relu(q), min(q, 0), inv_scale)`` of KV head ``h``'s query group, the halves ``[G_PAD, BLOCK_D]`` in
    q's dtype and ``inv_scale`` 1.0; with ``SCALED_F16`` (a bfloat16 q against fp8 metadata) the halves
    in float16 scaled by ``2^k`` and ``inv_scale = 2^-k`` (:func:`_triton_common.scaled_f16_query`), so the
    metadata needs only the exact fp8 -> fp16 upcast and the scores times ``inv_scale`` are unchanged."""
    rows = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = q_ptr + b.to(tl.int64) * stride_qb + (h * G + rows)[:, None].to(tl.int64) * stride_qh + offs_d[None, :]
    q = tl.load(ptrs, mask=(rows[:, None] < G) & (offs_d[None, :] < D), other=0.0)
    qf = q.to(tl.float32)  # (exact; also keeps the CPU interpreter off bfloat16 arithmetic)
    if SCALED_F16:
        qs, inv_scale = scaled_f16_query(qf, tl.float32)
        pos, neg = _relu_halves(qs, tl.float16)
        return pos, neg, inv_scale
    else:
        pos, neg = _relu_halves(qf, q.dtype)
        return pos, neg, 1.0


@triton.jit
def load_meta_block(meta_bh, pages, num_pages, stride_mp, stride_mm, D, BLOCK_D: tl.constexpr, PAGES_MAJOR: tl.constexpr = False):
    """The stored min / max metadata of ``pages`` ``[BLOCK_P]`` of one (row, KV head) as ``[BLOCK_D,
    BLOCK_P]`` tiles (``[BLOCK_P, BLOCK_D]`` with ``PAGES_MAJOR``; zeros past ``num_pages``); ``meta_bh``
    points at that head's ``[P, 2, D]`` metadata (innermost stride 1)."""
    offs_d = tl.arange(0, BLOCK_D)
    if PAGES_MAJOR:
        mask = (pages < num_pages)[:, None] & (offs_d[None, :] < D)
        ptrs = meta_bh + pages[:, None].to(tl.int64) * stride_mp + offs_d[None, :]  # [BLOCK_P, BLOCK_D]
    else:
        mask = (pages < num_pages)[None, :] & (offs_d[:, None] < D)
        ptrs = meta_bh + pages[None, :].to(tl.int64) * stride_mp + offs_d[:, None]  # [BLOCK_D, BLOCK_P]
    return tl.load(ptrs, mask=mask, other=0.0), tl.load(ptrs + stride_mm, mask=mask, other=0.0)


@triton.jit
def load_meta_block_tma(desc, b, h, first_page, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, PAGES_MAJOR: tl.constexpr = False):
    """:func:`load_meta_block` through the tensor-memory accelerator: ``desc`` describes the whole metadata
    ``[B, Hkv, P, 2, D]`` with box ``[1, 1, BLOCK_P, 1, D]`` (:func:`meta_descriptor`), so each of the two
    tiles is one bulk copy into shared memory, and pages past ``P`` come back as zeros."""
    mn = desc.load([b, h, first_page, 0, 0]).reshape(BLOCK_P, BLOCK_D)
    mx = desc.load([b, h, first_page, 1, 0]).reshape(BLOCK_P, BLOCK_D)
    if not PAGES_MAJOR:
        mn = tl.trans(mn)
        mx = tl.trans(mx)
    return mn, mx


@triton.jit
def block_scores(
    q_pos,
    q_neg,
    inv_scale,
    mn_t,
    mx_t,
    pages,
    num_pages,
    start,
    end,
    page_size,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    GQA_SUM: tl.constexpr,
    F32: tl.constexpr,
    SCALED_F16: tl.constexpr,
    PAGES_MAJOR: tl.constexpr = False,
):
    """float32 scores ``[BLOCK_P]`` of ``pages`` (``-inf`` where invalid) from their metadata tiles
    (:func:`load_meta_block`) and the query group's halves (:func:`load_group_query`). ``PAGES_MAJOR``:
    the tiles are ``[BLOCK_P, BLOCK_D]`` and the products ``[BLOCK_P, BLOCK_D] x [BLOCK_D, G_PAD]``, whose
    64+ rows let the sm_90 compile use warpgroup MMAs (``HGMMA``) straight from the tiles in shared memory,
    where the ``[G_PAD, BLOCK_D] x [BLOCK_D, BLOCK_P]`` form runs ``mma.sync`` (M = 16) on register copies
    of them, as one chain of 16 dependent ``HMMA`` a warp tile at head_dim 128."""
    heads = tl.arange(0, G_PAD)
    if PAGES_MAJOR:
        s = mm(mx_t.to(q_pos.dtype), tl.trans(q_pos), None, F32)  # [BLOCK_P, G_PAD]
        s = mm(mn_t.to(q_pos.dtype), tl.trans(q_neg), s, F32)
        in_group = (heads < G)[None, :]
    else:
        s = mm(q_pos, mx_t.to(q_pos.dtype), None, F32)  # [G_PAD, BLOCK_P]; fp8 metadata: exact upcast
        s = mm(q_neg, mn_t.to(q_pos.dtype), s, F32)
        in_group = (heads < G)[:, None]
    HEAD_AXIS: tl.constexpr = 1 if PAGES_MAJOR else 0
    if GQA_SUM:
        red = tl.sum(tl.where(in_group, s, 0.0), axis=HEAD_AXIS)
    else:
        red = tl.reduce(tl.where(in_group, s, float("-inf")), HEAD_AXIS, _max_keep_nan)  # a NaN head's score stays NaN
    if SCALED_F16:
        red = red * inv_scale
    valid = page_valid(pages, start, end, page_size) & (pages < num_pages)
    return tl.where(valid, red, float("-inf"))


@triton.jit
def score_blocks(
    q_ptr,
    b,
    h,
    stride_qb,
    stride_qh,
    meta_bh,
    out_row,
    first,
    last,
    num_pages,
    start,
    end,
    stride_mp,
    stride_mm,
    D,
    page_size,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    GQA_SUM: tl.constexpr,
    F32: tl.constexpr,
    SCALED_F16: tl.constexpr,
    STAGES: tl.constexpr,
    WALK: tl.constexpr,
    desc=None,
    TMA: tl.constexpr = False,
    PAGES_MAJOR: tl.constexpr = False,
):
    """Score page blocks ``[first, last)`` (``BLOCK_P`` pages each) of (row ``b``, KV head ``h``) into
    ``out_row`` (float32 ``[P]``), software-pipelined over ``STAGES``; with ``TMA`` each block's tiles come
    through the tensor descriptor ``desc`` (:func:`load_meta_block_tma`). ``WALK`` (several blocks): the
    query group's halves are made once, before the loop. Else (one block) a one-iteration loop that loads
    the query group inside it, so that its prologue issues the metadata and the query as asynchronous
    copies together: made before the loop, the query's load is waited on before the first metadata copy
    is issued (two memory latencies in series; same-run A/B on the H200, ``benchmarks/NOTES.md``: the
    score at one block a program 2.6 -> 2.2 us, while loading the query inside a walk of several blocks
    slowed it by up to 1 us, 3-4 us over fp8 metadata)."""
    if WALK or TMA:  # (with TMA as measured: the query before the loop whatever the walk's length)
        q_pos, q_neg, inv_scale = load_group_query(q_ptr, b, h, stride_qb, stride_qh, G, G_PAD, D, BLOCK_D, SCALED_F16)
    for blk in tl.range(first, last, num_stages=STAGES):
        pages = blk * BLOCK_P + tl.arange(0, BLOCK_P)
        if TMA:
            mn_t, mx_t = load_meta_block_tma(desc, b, h, blk * BLOCK_P, BLOCK_P, BLOCK_D, PAGES_MAJOR)
        else:
            mn_t, mx_t = load_meta_block(meta_bh, pages, num_pages, stride_mp, stride_mm, D, BLOCK_D, PAGES_MAJOR)
        if not (WALK or TMA):
            q_pos, q_neg, inv_scale = load_group_query(q_ptr, b, h, stride_qb, stride_qh, G, G_PAD, D, BLOCK_D, SCALED_F16)
        s = block_scores(q_pos, q_neg, inv_scale, mn_t, mx_t, pages, num_pages, start, end, page_size, G, G_PAD,
                         GQA_SUM, F32, SCALED_F16, PAGES_MAJOR)
        tl.store(out_row + pages, s, mask=pages < num_pages)


@triton.jit
def prefetch_meta(meta_ptr, b, h, part, blocks_per_program, num_pages, stride_mb, stride_mh, stride_mp, stride_mm, D,
                  BLOCK_P: tl.constexpr, PREFETCH: tl.constexpr, PREFETCH_BYTES: tl.constexpr):
    """Before the grid's wait (:func:`pdl_enter`): an L2 prefetch of (the first ``PREFETCH_BYTES`` of) the
    metadata that program ``part`` of (row ``b``, KV head ``h``) walks, its blocks ``[part * blocks_per_program,
    ...)``, split over ``PREFETCH`` warps (0: none; :func:`prefetch_plan`), from its first page's min row to
    its last page's max row (no byte past them, whatever the strides). It needs no data from earlier grids
    (the range follows from the grid and ``num_pages``), and L2 keeps the lines coherent with the previous
    grid's metadata writes (the append's)."""
    if PREFETCH > 0:
        lo = part * blocks_per_program * BLOCK_P
        hi = tl.minimum(lo + blocks_per_program * BLOCK_P, num_pages)
        elt_bytes = meta_ptr.dtype.element_ty.primitive_bitwidth // 8
        span = (hi - lo - 1).to(tl.int64) * stride_mp + stride_mm + D  # to the end of the last page's max row
        nbytes = tl.minimum(span * elt_bytes, PREFETCH_BYTES)
        meta_lo = meta_ptr + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + lo.to(tl.int64) * stride_mp
        prefetch_l2(meta_lo, nbytes, PREFETCH)


@triton.jit
def prefetch_query(q_ptr, b, h, stride_qb, stride_qh, D, G: tl.constexpr, PREFETCH_Q: tl.constexpr):
    """Before the grid's wait: an L2 prefetch of KV head ``h``'s query group of row ``b`` (its ``G`` rows, from
    the first's start to the last's end), issued by the program's first warp. A walk of several blocks
    makes the query's halves before its pipeline issues the first metadata copy (:func:`score_blocks`), so
    the query's load is a memory latency of its own at the start of every program: from L2 it is the
    shorter one. Like the metadata's, the prefetch is only a hint that L2 keeps coherent with the writes
    of the grids before."""
    if PREFETCH_Q:
        elt_bytes = q_ptr.dtype.element_ty.primitive_bitwidth // 8
        q_lo = q_ptr + b.to(tl.int64) * stride_qb + (h * G).to(tl.int64) * stride_qh
        prefetch_l2(q_lo, ((G - 1) * stride_qh + D) * elt_bytes, 1)


@triton.jit
def _score_kernel(
    q_ptr,
    meta_ptr,
    desc,
    start_ptr,
    end_ptr,
    out_ptr,
    num_pages,
    kv_heads,
    D,
    stride_qb,
    stride_qh,
    stride_mb,
    stride_mh,
    stride_mp,
    stride_mm,
    page_size,
    blocks_per_program,
    signal_ptr,
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
    if CHAIN:  # grid (programs_per_row, B * Hkv): a row's programs adjacent, rows finish in order
        pb = tl.program_id(0)
        bh = tl.program_id(1)
    else:
        bh = tl.program_id(0)
        pb = tl.program_id(1)
    b = bh // kv_heads
    h = bh % kv_heads
    prefetch_meta(meta_ptr, b, h, pb, blocks_per_program, num_pages, stride_mb, stride_mh, stride_mp, stride_mm, D, BLOCK_P,
                  PREFETCH, PREFETCH_BYTES)
    prefetch_query(q_ptr, b, h, stride_qb, stride_qh, D, G, PREFETCH_Q)
    pdl_enter(PDL)
    trace_mark(trace_ptr, 1, TRACE)
    start = tl.load(start_ptr + b).to(tl.int32)
    end = tl.load(end_ptr + b).to(tl.int32)
    meta_bh = meta_ptr + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    first = pb * blocks_per_program
    last = tl.minimum(first + blocks_per_program, tl.cdiv(num_pages, BLOCK_P))
    score_blocks(
        q_ptr, b, h, stride_qb, stride_qh, meta_bh, out_ptr + bh.to(tl.int64) * num_pages, first, last, num_pages, start, end,
        stride_mp, stride_mm, D, page_size, G, G_PAD, BLOCK_D, BLOCK_P, GQA_SUM, F32, SCALED_F16, STAGES, WALK, desc, TMA,
        PAGES_MAJOR,
    )
    if CHAIN:  # count the pages scored: the row's selection waits until all num_pages are
        signal_row(signal_ptr + bh, tl.minimum(last * BLOCK_P, num_pages) - first * BLOCK_P)
    trace_mark(trace_ptr, 2, TRACE)


def score_meta(q: torch.Tensor, meta: torch.Tensor, seq_start, seq_end, page_size: int, gqa_reduction: str):
    """Checks shared by the score launchers; returns the launch constants and contiguous q / meta."""
    check(q.dim() == 3 and meta.dim() == 5 and meta.shape[3] == 2, "q must be [B, Hq, D] and meta [B, Hkv, P, 2, D]")
    check_float_dtype(q, "q")
    check(q.dtype == meta.dtype or meta.dtype in FP8_DTYPES, f"q dtype {q.dtype} != meta dtype {meta.dtype} (meta: q's dtype or fp8)")
    b, hkv, pages, _, d = meta.shape
    check(q.shape[0] == b and q.shape[2] == d, f"q {tuple(q.shape)} does not match meta {tuple(meta.shape)}")
    check(q.shape[1] % hkv == 0, f"q_heads {q.shape[1]} is not a multiple of kv_heads {hkv}")
    check_head_dim(d)
    check_page_size(page_size)
    check_rows(seq_start, seq_end, b)
    check(gqa_reduction in ("max", "sum"), f"gqa_reduction={gqa_reduction!r}: allowed 'max' or 'sum'")
    g = q.shape[1] // hkv
    if q.stride(-1) != 1:
        q = q.contiguous()
    if meta.stride(-1) != 1:
        meta = meta.contiguous()
    consts = dict(
        G=g,
        G_PAD=max(16, triton.next_power_of_2(g)),
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        GQA_SUM=gqa_reduction == "sum",
        F32=f32_dot(q.dtype),
        SCALED_F16=scaled_f16(q.dtype, meta.dtype),
    )
    return q, meta, consts


def default_block_p(block_d: int) -> int:
    """Pages per block: 64 (H100: 64 beat 16/32/128 for d 64 and 128, at batch 1 and 8, 16K-128K tokens)."""
    return 64 if block_d <= 128 else 32


#: Shared memory and threads of one SM (sm_90) for :func:`resident_programs`.
SM_SHARED_BYTES = 227 * 1024
SM_THREADS = 2048


def score_shared_bytes(block_p: int, block_d: int, meta_bytes: int, stages: int) -> int:
    """Shared memory of one score program: ``stages - 1`` pipelined metadata blocks ``[BLOCK_P, 2, BLOCK_D]``
    plus a ``[BLOCK_P, BLOCK_D]`` byte tile and 256 bytes of scratch. Equal to the sm_90 compile
    (``benchmarks/resource_report.py``, Triton 3.9) at head_dim 64 and 128, bf16 and fp8, 1-4 stages
    (e.g. 73984 bytes at d 128 / bf16 / 3 stages); at head_dim 256 it is low by 8 KB (an estimate)."""
    return max(1, stages - 1) * block_p * 2 * block_d * meta_bytes + block_p * block_d + 256


def resident_programs(sms: int, shared: int, num_warps: int) -> int:
    """Score programs resident at once on ``sms`` SMs (shared memory and threads bound; 40-60 registers a
    thread never do)."""
    return sms * max(1, min(SM_SHARED_BYTES // shared, SM_THREADS // (32 * num_warps), 32))


def default_launch(blocks: int, sms: int, meta_dtype: torch.dtype, block_p: int = 64, block_d: int = 128) -> tuple[int, int, int]:
    """``(blocks_per_program, num_warps, num_stages)`` of a launch walking ``blocks`` page blocks of
    ``block_p`` pages x ``block_d`` (all rows x KV heads) on ``sms`` SMs: about one program per SM, walking
    at most 4 blocks each, software-pipelined over 3 stages (2 when a program has one block: :func:`walk_stages`), 4 warps.
    Chosen on the decode chain (score -> select -> attention with PDL), where it counts, over three H100
    runs of ``bench_kernels.py`` (2026-11-23, ``kernels_h100.json`` and ``kernels_h100_score_plan_old*.json``):
    against the earlier ~2 programs per SM with up to 8 blocks each, Llama-3-8B B=8 / 16K 58.7 -> 48.4 us,
    B=8 / 64K 89.0-92.1 -> 87.4, B=1 / 64K 30.3 -> 25.1, TinyLlama B=8 / 128K 55.3 -> 52.1 (a score grid of
    1-2 waves followed by a PDL launch loses up to 9 us). The fused score + select kernel (same walk)
    measured best at 4 blocks too (``tune_decode_h100_fused.json``).

    One exception over the model's dtype, 8 blocks a program: when the 4-block grid fills more than half
    of one wave but not all of it (``resident_programs``). There the score launched back to back with itself ran at 57-58%
    of its byte floor on the H200 (Llama-3-8B B=1 / 128K and B=8 / 16K, TinyLlama B=8 / 64K: 13.7-13.8
    us) and at 8 blocks at 73-77% (10.3-10.8 us), while the decode chain was level (30.9 vs 31.2, 31.8
    vs 31.3, 39.0 vs 38.8 us; ``kernels_h200_score_plan_ba01a82.json``, same run). The 4-block grid is
    also fast there alone at 4 stages (2 programs an SM: 70-72%), but 7 us slower in the chain at
    Llama-3-8B B=8 / 16K; and every other shape keeps the rule (8 blocks at 0.16-0.32 or 1.3-2.6 waves:
    up to 2.5x slower alone, up to 4.1 us slower in the chain; same run).
    fp8 metadata: 2 stages (the fp16 products of :func:`load_group_query`): over the H200 grid of
    ``kernels_h200.json`` (48 shapes) the chain is up to 5.7 us faster than with the 8 warps / 3 stages
    chosen when its upcast went through fp32 (Llama-3-8B B=8 / 128K 81.2 -> 75.6 us, TinyLlama B=8 / 64K
    32.2 -> 28.6), 38 us less over the grid in all, and at most 1.6 us slower (TinyLlama B=1 / 128K;
    Llama-3-8B B=8 / 64K / 2048 +1.0)."""
    warps = 4
    per = min(4, triton.cdiv(blocks, sms))
    if per == 4 and meta_dtype not in FP8_DTYPES:  # (measured over the model's dtype only)
        slots = resident_programs(sms, score_shared_bytes(block_p, block_d, meta_dtype.itemsize, walk_stages(4, meta_dtype)), warps)
        if slots < 2 * triton.cdiv(blocks, 4) <= 2 * slots:
            per = 8
    return per, warps, walk_stages(per, meta_dtype)


def walk_stages(per: int, meta_dtype: torch.dtype) -> int:
    """Pipeline stages of a walk of ``per`` blocks: 2 for one block or over fp8 metadata, else 3
    (:func:`default_launch`). One block runs as a one-iteration pipelined loop, whose prologue issues the
    metadata and the query as asynchronous copies before waiting on any (:func:`score_blocks`)."""
    return 2 if per == 1 or meta_dtype in FP8_DTYPES else 3


#: Metadata bytes a score program prefetches into L2 before its wait (:func:`prefetch_meta`): its whole walk
#: at the default plans of head_dim 64 (<= 4 blocks of 16 KB), the first two blocks at head_dim 128.
PREFETCH_BYTES = 64 * 1024
#: Largest launch (metadata bytes of all its rows and heads) that prefetches its programs' walks by default (:func:`prefetch_plan`).
PREFETCH_MAX_LAUNCH_BYTES = 8 * 2**20
#: Metadata bytes a score program prefetches before its wait on a larger launch: the head of its walk, which
#: takes its first address translation and DRAM latency ahead of the wait for almost no bytes.
PREFETCH_HEAD_BYTES = 4096


def prefetch_plan(pdl: bool, num_warps: int, meta_bytes: int, prefetch: bool | None = None, query_compact: bool = True,
                  head: bool = True) -> dict:
    """The L2 prefetch constants of a score launch over ``meta_bytes`` of metadata, before its PDL wait
    (:func:`prefetch_meta`, :func:`prefetch_query`): ``PREFETCH`` warps each prefetch their share of the
    program's walk (up to ``PREFETCH_BYTES``), and with ``PREFETCH_Q`` the first warp the program's query
    group too, where the group's rows lie within twice their bytes (``query_compact``). Only a PDL launch
    can start beside the previous grid, which is what the prefetch overlaps (so never the interpreter).
    By default a launch of up to :data:`PREFETCH_MAX_LAUNCH_BYTES` prefetches its programs' walks (up to
    :data:`PREFETCH_BYTES` each), a larger one the head of each walk (:data:`PREFETCH_HEAD_BYTES`) and the
    query with ``head`` (the score kernel), nothing without (the fused score + select, where it lost);
    ``prefetch`` True forces the walks, False nothing. Same-run A/Bs on the H200 (the score launched back
    to back, and the decode chain):

    * the metadata (``benchmarks/results/kernels_h200_prefetch_*``): at 1-8 MB (batch 1 to 128K at head_dim
      64, to 16K at 128) the score 2.1 -> 1.8 us (TinyLlama B=1 / 16K), 3.2 -> 2.7 (B=1 / 64K), 2.6 -> 2.4
      (Llama-3-8B B=1 / 16K), its chains 0.2-0.6 us faster; at 17-67 MB, where the score streams near its
      byte floor, the early requests only compete with the running grid's: the score 4-20% slower, the
      chains up to 4.5 us (Llama-3-8B B=8 / 128K).
    * the query (``kernels_h200_prefetchq_*``): a walk makes the query's halves before its first metadata
      copy, so the query's load is a memory latency of its own in every program; from L2 the score at
      TinyLlama B=1 / 64K and 128K 2.7 -> 2.5 and 4.6 -> 4.4 us, the default chains over the ten launches
      of <= 8 MiB 3.1 us faster in all (at most +0.01 us). The same run tried the larger launches with the
      walk's first blocks prefetched right after the wait instead (what the pipeline's prologue copies,
      moved ahead of the query's load): 1.6-2.1 us slower at 32-134 MB (Llama-3-8B B=8 / 64K 34.2 -> 36.0
      us), so those launches prefetched nothing.
    * the head of a walk at larger launches (``score_floor_probe_h200_7fa1482.*``, the score back to back):
      forced prefetches of 256 B / 4 KB / 64 KB a program took Llama-3-8B B=1 / 64K from 6.57 us to 6.34 /
      6.21 / 7.07, B=1 / 128K 10.57 -> 10.33 / 10.17 / 11.10, B=8 / 64K 34.34 -> 33.99 / 33.81 / 35.77: the
      first lines (and their page's address translation) ahead of the wait pay, the bulk competes. In the
      chains (``kernels_h200_walkq_*``, on top of a query placement that was then reverted) the split chain
      gained 0.2-1.3 us at every launch over 8 MiB and the fused chain lost up to 2.7 us (Llama-3-8B B=8 /
      128K): so the score kernel's launches over 8 MiB prefetch :data:`PREFETCH_HEAD_BYTES` a program and
      the query, the fused kernel's nothing. Same-run A/B of that against no prefetch there
      (``kernels_h200_headpf_*``): the score faster at all 7 such launches (Llama-3-8B B=1 / 64K 6.54 ->
      6.36 us, B=8 / 64K 34.86 -> 34.34, TinyLlama B=8 / 128K 20.06 -> 18.83), the split chain at all 7
      (3.3 us in all)."""
    whole = prefetch is True or meta_bytes <= PREFETCH_MAX_LAUNCH_BYTES
    on = pdl and prefetch is not False and (whole or head)
    # PREFETCH_BYTES only matters with PREFETCH on: kept at one value otherwise, so that launches which
    # prefetch nothing share one compiled kernel whatever their size
    return dict(PREFETCH=num_warps if on else 0, PREFETCH_BYTES=PREFETCH_BYTES if whole or not on else PREFETCH_HEAD_BYTES,
                PREFETCH_Q=on and query_compact)


def launch_prefetch(pdl: bool, num_warps: int, q: torch.Tensor, meta: torch.Tensor, g: int, prefetch: bool | None,
                    head: bool = True) -> dict:
    """:func:`prefetch_plan` of a launch over ``meta`` ``[B, Hkv, P, 2, D]`` with query ``q`` ``[B, Hq, D]``
    in groups of ``g`` heads."""
    d = meta.shape[-1]
    return prefetch_plan(pdl, num_warps, meta.nbytes, prefetch, (g - 1) * q.stride(1) + d <= 2 * g * d, head)


#: Smallest launch (metadata bytes of all its rows and heads) whose score reads its blocks through the
#: tensor-memory accelerator by default (:func:`use_tma`).
TMA_MIN_LAUNCH_BYTES = 32 * 2**20


def tma_supported(meta: torch.Tensor, block_d: int) -> bool:
    """Whether ``meta`` ``[B, Hkv, P, 2, D]`` can be read through a TMA descriptor (:func:`meta_descriptor`):
    on a CUDA device of compute capability >= 9 (or under the interpreter, which emulates it), ``D`` equal
    to its power-of-two tile and at most 128, a 16-byte aligned base and 16-byte multiples for every
    stride but the innermost (1)."""
    if meta.device.type == "cuda":
        if torch.version.hip or _cuda_props(meta.device).major < 9:
            return False
    elif not interpreting():
        return False
    es = meta.element_size()
    return (meta.shape[-1] == block_d <= 128 and meta.stride(-1) == 1 and meta.data_ptr() % 16 == 0
            and all(st * es % 16 == 0 for st in meta.stride()[:-1]))


def use_tma(meta: torch.Tensor, block_d: int, tma: bool | None) -> bool:
    """Whether a score launch reads its metadata through the tensor-memory accelerator, one block a
    program (``tma`` True forces it, with an error where :func:`tma_supported` says no; False never).

    By default on a CUDA device for launches of at least :data:`TMA_MIN_LAUNCH_BYTES` of fp16 / bf16
    metadata. Same run on the H200 (``benchmarks/results/score_tma_probe_h200_96071733.*``, the score back
    to back over rotating copies): at the five launches of 32-134 MB the TMA walk of one block a program was
    the fastest plan, 3-7% under the default walk (Llama-3-8B B=8 / 64K 34.28 -> 32.95 us, 92% -> 96% of
    floor; B=1 / 128K 10.37 -> 9.59; B=8 / 16K 10.42 -> 9.71; TinyLlama B=8 / 64K 10.14 -> 9.46, B=8 /
    128K 18.87 -> 17.58) and 1-4% under the best ``cp.async`` plan of each; at the 4-17 MB launches (batch
    1, 64K) it was slower (TinyLlama B=1 / 64K 2.45 -> 2.69, Llama-3-8B B=1 / 64K 6.35 -> 6.79).
    Same-run A/B of the decode chains against the package without it (``kernels_h200_tma_{old_9607173,3b48f95}.*``,
    12 shapes, budget 2048): at the six launches of >= 32 MiB the score alone 0.3-1.7 us faster; the default
    chain -1.8 us at Llama-3-8B B=1 / 128K, -1.7 / -0.5 at TinyLlama B=8 / 128K / 64K, +0.4 at Llama-3-8B B=8 /
    16K (the other two take the fused chain); but the row-chained split decode (the score's ``signal`` mode)
    +1.6 to +4.0 us at four of the six, so that mode keeps the ``cp.async`` walk unless told. Both walks give
    the same bits: the same tiles and tensor-core layout (the sm_90 TTGIR: MMA v2, ``[16, 8]``, 4 warps in
    both)."""
    if tma is None:  # the default: the cheap tests first (every launch on the hot path asks)
        return (meta.device.type == "cuda" and meta.dtype in (torch.float16, torch.bfloat16)
                and meta.nbytes >= TMA_MIN_LAUNCH_BYTES and tma_supported(meta, block_d))
    if tma:
        check(tma_supported(meta, block_d), f"tma=True needs a CUDA device of compute capability >= 9, head_dim a power of two <= 128 and "
                  f"16-byte aligned metadata (got {meta.device}, head_dim {meta.shape[-1]}, strides {tuple(meta.stride())})")
        return True
    return False


def meta_descriptor(meta: torch.Tensor, block_p: int):
    """The host-side TMA descriptor of ``meta`` ``[B, Hkv, P, 2, D]`` (its own shape and strides), box
    ``[1, 1, block_p, 1, D]``: one (row, KV head)'s min or max rows of ``block_p`` (<= 256) pages."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    check(block_p <= 256, f"block_p={block_p}: a TMA box holds at most 256 pages")

    return TensorDescriptor(meta, list(meta.shape), list(meta.stride()), [1, 1, block_p, 1, meta.shape[-1]])


def plan_walk(
    consts: dict,
    pages: int,
    batch_heads: int,
    device: torch.device,
    meta_dtype: torch.dtype,
    block_p: int | None = None,
    blocks_per_program: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> dict:
    """How a launch walks ``pages`` pages of each of ``batch_heads`` (row, KV head) pairs: ``BLOCK_P``,
    ``blocks_per_program``, ``programs_per_row``, ``num_warps``, ``STAGES`` and ``WALK`` (tuned defaults
    unless overridden; shared by the score and the fused score + select launches)."""
    block_p = block_p or default_block_p(consts["BLOCK_D"])
    blocks = triton.cdiv(pages, block_p)
    per, warps, _ = default_launch(batch_heads * blocks, sm_count(device), meta_dtype, block_p, consts["BLOCK_D"])
    per = blocks_per_program or per
    check(per >= 1, f"blocks_per_program={per} must be >= 1")
    return dict(
        BLOCK_P=block_p, blocks_per_program=per, programs_per_row=triton.cdiv(blocks, per),
        num_warps=num_warps or warps, STAGES=num_stages or walk_stages(per, meta_dtype), WALK=per > 1,
    )


def score_walk(consts: dict, meta: torch.Tensor, chain: bool = False, tma: bool | None = None, block_p: int | None = None,
               blocks_per_program: int | None = None, num_warps: int | None = None, num_stages: int | None = None) -> dict:
    """The walk of a score launch over ``meta`` ``[B, Hkv, P, 2, D]`` (:func:`plan_walk`'s keys plus ``TMA``):
    one block a program where it reads through the TMA (:func:`use_tma`) unless ``blocks_per_program`` says
    otherwise; ``chain``: the row-chained mode."""
    b, hkv, pages, _, _ = meta.shape
    tma = use_tma(meta, consts["BLOCK_D"], False if tma is None and chain else tma)  # (row-chained: see use_tma)
    if tma:
        blocks_per_program = blocks_per_program or 1
    walk = plan_walk(consts, pages, b * hkv, meta.device, meta.dtype, block_p, blocks_per_program, num_warps, num_stages)
    return dict(walk, TMA=tma)


def page_scores_triton(
    q: torch.Tensor,
    meta: torch.Tensor,
    seq_start: torch.Tensor,
    seq_end: torch.Tensor,
    page_size: int,
    gqa_reduction: str,
    block_p: int | None = None,
    num_warps: int | None = None,
    blocks_per_program: int | None = None,
    num_stages: int | None = None,
    signal: torch.Tensor | None = None,
    trace: KernelTrace | None = None,
    prefetch: bool | None = None,
    tma: bool | None = None,
    pages_major: bool = False,
) -> torch.Tensor:
    """float32 ``[B, Hkv, P]`` Quest upper bounds (see module docstring). ``block_p``, ``num_warps``,
    ``blocks_per_program`` and ``num_stages`` override the tuned defaults. ``signal`` (int32 ``[>= B * Hkv]``,
    zeroed): row-chained mode (:mod:`triton_chain`), each program adds the number of pages it scored to
    its row's counter once their scores are stored. ``trace``: record each program's timestamps
    (:mod:`trace`). ``prefetch``: force the L2 prefetch of the metadata and the query before the wait on / off (:func:`prefetch_plan`).
    ``tma``: force the metadata's reads through the tensor-memory accelerator on / off (:func:`use_tma`).
    The walk: :func:`score_walk`. ``pages_major``: the products as ``[pages, D] x [D, G]`` (:func:`block_scores`;
    off by default: not yet timed)."""
    q, meta, consts = score_meta(q, meta, seq_start, seq_end, page_size, gqa_reduction)
    b, hkv, pages, _, d = meta.shape
    out = torch.empty((b, hkv, pages), dtype=torch.float32, device=meta.device)
    if b * hkv * pages == 0:
        return out
    chain = signal is not None
    pdl = use_pdl(meta.device)
    walk = score_walk(consts, meta, chain, tma, block_p, blocks_per_program, num_warps, num_stages)
    tma = walk.pop("TMA")
    per = walk.pop("blocks_per_program")
    nprog = walk.pop("programs_per_row")
    grid = (nprog, b * hkv) if chain else (b * hkv, nprog)
    _score_kernel[grid](
        q, meta, meta_descriptor(meta, walk["BLOCK_P"]) if tma else meta, seq_start, seq_end, out, pages, hkv, d,
        q.stride(0), q.stride(1), meta.stride(0), meta.stride(1), meta.stride(2), meta.stride(3), page_size,
        per, signal if chain else out, out if trace is None else trace.region("score", grid[0] * grid[1], meta.device),
        CHAIN=chain, PDL=pdl, TRACE=trace is not None, TMA=tma, PAGES_MAJOR=bool(pages_major), launch_pdl=pdl, **launch_prefetch(pdl, walk["num_warps"], q, meta, consts["G"], prefetch),
        **walk, **consts,
    )
    return out
