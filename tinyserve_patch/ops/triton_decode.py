"""Triton sparse decode attention over selected pages (split-K flash-decoding).

Inputs: ``q`` ``[B, Hq, D]``; ``k_cache``/``v_cache`` ``[B, Hkv, cap, D]``; ``indices`` int32
``[B, Hkv, S]`` (page numbers, ``-1`` = none); ``seq_start``/``seq_end`` ``[B]``. Output ``[B, Hq, D]`` in
q's dtype: softmax attention of each query head over the tokens of its KV head's selected pages that lie
in ``[seq_start, seq_end)`` (zeros for a row with none), as :func:`reference.sparse_decode_attention`.

Kernel 1, grid ``(B * Hkv, num_splits)``: a program takes a contiguous chunk of the ``S * page_size``
selected-token list (token ``j`` -> page slot ``j // ps``, cache position ``indices[slot] * ps + j % ps``)
and walks it ``BLOCK_N`` tokens at a time, all ``G`` query heads of the KV head together (``G`` padded to
16 rows for ``tl.dot``), online softmax in fp32 with ``exp2`` (log2(e) folded into the scale), optional
soft-capping ``cap * tanh(s / cap)``. With one split it writes the output directly; otherwise it writes
the normalised partial output and the log2-sum-exp to an fp32 workspace and kernel 2, grid ``(B * Hq,)``,
merges the splits (or, with ``merge="inline"``, the last split of each (row, KV head) to finish merges
them, found with an atomic counter that it resets). ``num_splits`` depends on shapes only (``~2 x`` SM
count programs), so the launch is static and CUDA-graph safe. K/V may be stored as float8_e4m3fn: loads
are upcast to q's dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_common import check, check_float_dtype, check_head_dim, check_page_size, check_rows, f32_dot, mm, pdl_enter, pdl_trigger, scaled_f16, scaled_f16_query, sm_count, ticket_counters, trace_mark, use_pdl, wait_row
from .reference import FP8_DTYPES
from .trace import KernelTrace

LOG2E = 1.4426950408889634


@triton.jit
def attend_chunk(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    b,
    h,
    start,
    end,
    tok0,
    tok_end,
    qk_scale,
    softcap,
    stride_qb,
    stride_qh,
    stride_cb,
    stride_ch,
    stride_ct,
    stride_ib,
    stride_ih,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    F32: tl.constexpr,
    SCALED_F16: tl.constexpr,
    CG: tl.constexpr,
    DENSE: tl.constexpr,
):
    """Online-softmax attention of KV head ``h``'s query group over selected tokens ``[tok0, tok_end)`` of
    row ``b`` (token ``j``: page slot ``j // PAGE_SIZE`` of the row's indices): ``(acc [G_PAD, BLOCK_D],
    m [G_PAD], l [G_PAD])``, fp32, the unnormalised output, running max and sum in log2 units. ``CG``:
    the page numbers were written by a grid still running (read past L1). ``DENSE``: no page list; slot
    ``i`` is the row's first page ``start // PAGE_SIZE`` + ``i``, and blocks past the row's end are skipped."""
    rows = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    row_mask = rows < G
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + (h * G + rows)[:, None].to(tl.int64) * stride_qh + offs_d[None, :],
        mask=row_mask[:, None] & dmask[None, :],
        other=0.0,
    )
    if SCALED_F16:
        q, inv_scale = scaled_f16_query(q)
        qk_scale = qk_scale * inv_scale  # (a power of two: the logits are the unscaled ones exactly)
    cache_bh = b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
    k_base = k_ptr + cache_bh
    v_base = v_ptr + cache_bh
    idx_base = idx_ptr + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    if DENSE:
        first_page = tl.maximum(start, 0) // PAGE_SIZE  # no position lies below 0
        tok_end = tl.minimum(tok_end, end - first_page * PAGE_SIZE)
    # (loading the next block's page numbers one iteration ahead measured no faster on the H100: the
    # pipeliner already hides them; benchmarks/results/tune_decode_h100_prefetch.json)
    for j0 in range(tok0, tok_end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        if DENSE:
            page = tl.where(j < tok_end, first_page + j // PAGE_SIZE, -1)
        elif CG:  # written by a grid still running: past L1
            page = tl.load(idx_base + j // PAGE_SIZE, mask=j < tok_end, other=-1, cache_modifier=".cg")
        else:
            page = tl.load(idx_base + j // PAGE_SIZE, mask=j < tok_end, other=-1)
        pos = page * PAGE_SIZE + j % PAGE_SIZE
        valid = (page >= 0) & (pos >= start) & (pos < end)
        k_t = tl.load(
            k_base + pos[None, :].to(tl.int64) * stride_ct + offs_d[:, None],
            mask=valid[None, :] & dmask[:, None],
            other=0.0,
        ).to(q.dtype)  # [BLOCK_D, BLOCK_N] (an fp8 cache upcast to q's dtype)
        s = mm(q, k_t, None, F32)  # [G_PAD, BLOCK_N] raw q.k
        if SOFTCAP:
            # cap * tanh(scale * s / cap) in log2 units (qk_scale = scale / cap, softcap = cap * log2(e));
            # tanh(y) = 1 - 2 / (exp(2y) + 1), saturating cleanly to +-1
            y = s * qk_scale
            s = softcap * (1.0 - 2.0 / (tl.exp2(y * (2.0 * 1.4426950408889634)) + 1.0))
        else:
            s = s * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + pos[:, None].to(tl.int64) * stride_ct + offs_d[None, :],
            mask=valid[:, None] & dmask[None, :],
            other=0.0,
        ).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        acc = mm(p.to(v.dtype), v, acc * alpha[:, None], F32)
        m_i = m_new

    return acc, m_i, l_i


@triton.jit
def store_partial(o_ws_ptr, lse_ws_ptr, ws_row, o, m_i, l_i, row_mask, dmask, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """One split's normalised output ``o`` ``[G_PAD, BLOCK_D]`` and log2-sum-exp (from :func:`attend_chunk`'s
    ``m`` / ``l``; ``-inf`` for a split without tokens) to the fp32 workspace rows ``ws_row`` ``[G_PAD]``."""
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(o_ws_ptr + ws_row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=row_mask[:, None] & dmask[None, :])
    has = l_i > 0.0
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(lse_ws_ptr + ws_row, lse, mask=row_mask)


@triton.jit
def merge_partials(o_ws_ptr, lse_ws_ptr, ws0, num_splits, out_ptrs, row_mask, dmask, G: tl.constexpr, G_PAD: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge one (row, KV head)'s ``num_splits`` partial outputs (workspace rows ``ws0 + s * G``, ``ws0``
    ``[G_PAD]``: normalised ``[G, HEAD_DIM]`` fp32 partials and their log2-sum-exp, written by programs
    still running, so read past L1) in split order, and store the result at ``out_ptrs`` ``[G_PAD,
    BLOCK_D]`` in the output's dtype."""
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    for s in range(0, num_splits):
        ls = tl.load(lse_ws_ptr + ws0 + s * G, mask=row_mask, other=float("-inf"), cache_modifier=".cg")
        m = tl.maximum(m, ls)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w_sum = tl.zeros([G_PAD], tl.float32)
    merged = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    for s in range(0, num_splits):
        ls = tl.load(lse_ws_ptr + ws0 + s * G, mask=row_mask, other=float("-inf"), cache_modifier=".cg")
        w = tl.exp2(ls - m_use)
        o_s = tl.load(
            o_ws_ptr + (ws0 + s * G)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=row_mask[:, None] & dmask[None, :], other=0.0, cache_modifier=".cg",
        )
        merged += w[:, None] * o_s
        w_sum += w
    res = tl.where(w_sum[:, None] > 0.0, merged / tl.where(w_sum > 0.0, w_sum, 1.0)[:, None], 0.0)
    tl.store(out_ptrs, res.to(out_ptrs.dtype.element_ty), mask=row_mask[:, None] & dmask[None, :])


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    start_ptr,
    end_ptr,
    out_ptr,
    o_ws_ptr,
    lse_ws_ptr,
    counter_ptr,
    num_select,
    kv_heads,
    num_splits,
    tokens_per_split,
    qk_scale,
    softcap,
    stride_qb,
    stride_qh,
    stride_cb,
    stride_ch,
    stride_ct,
    stride_ib,
    stride_ih,
    stride_ob,
    stride_oh,
    flag_ptr,
    done_ptr,
    trace_ptr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SINGLE: tl.constexpr,
    F32: tl.constexpr,
    INLINE_MERGE: tl.constexpr,
    CHAIN: tl.constexpr,
    SCALED_F16: tl.constexpr,
    PDL: tl.constexpr,
    TRACE: tl.constexpr,
    DENSE: tl.constexpr,
):
    trace_mark(trace_ptr, 0, TRACE)
    if CHAIN:  # row-chained (triton_chain): grid (num_splits, B * Hkv); wait for this row's selection only
        pdl_trigger(PDL)
        split = tl.program_id(0)
        bh = tl.program_id(1)
        wait_row(flag_ptr + bh, 1)
    else:
        pdl_enter(PDL)
        bh = tl.program_id(0)
        split = tl.program_id(1)
    trace_mark(trace_ptr, 1, TRACE)
    b = bh // kv_heads
    h = bh % kv_heads
    start = tl.load(start_ptr + b).to(tl.int32)
    end = tl.load(end_ptr + b).to(tl.int32)

    rows = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    row_mask = rows < G
    acc, m_i, l_i = attend_chunk(
        q_ptr, k_ptr, v_ptr, idx_ptr, b, h, start, end, split * tokens_per_split,
        tl.minimum(split * tokens_per_split + tokens_per_split, num_select * PAGE_SIZE), qk_scale, softcap,
        stride_qb, stride_qh, stride_cb, stride_ch, stride_ct, stride_ib, stride_ih,
        G, G_PAD, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, SOFTCAP, F32, SCALED_F16, CHAIN, DENSE,
    )
    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if SINGLE:
        out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + (h * G + rows)[:, None].to(tl.int64) * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dmask[None, :])
    else:
        store_partial(o_ws_ptr, lse_ws_ptr, (bh.to(tl.int64) * num_splits + split) * G + rows, o, m_i, l_i, row_mask, dmask,
                      HEAD_DIM, BLOCK_D)
        if INLINE_MERGE:
            # the last split of (row, KV head) to finish merges them all (no second kernel); it resets the
            # counter for the next call, so the launch stays CUDA-graph safe
            tl.debug_barrier()
            done = tl.atomic_add(counter_ptr + bh, 1, sem="acq_rel")
            if done == num_splits - 1:
                out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + (h * G + rows)[:, None].to(tl.int64) * stride_oh + offs_d[None, :]
                merge_partials(o_ws_ptr, lse_ws_ptr, bh.to(tl.int64) * num_splits * G + rows, num_splits, out_ptrs,
                               row_mask, dmask, G, G_PAD, HEAD_DIM, BLOCK_D)
                tl.atomic_xchg(counter_ptr + bh, 0)
    if CHAIN:  # the last program of the row re-arms its flag for the next launch
        tl.debug_barrier()
        done = tl.atomic_add(done_ptr + bh, 1, sem="acq_rel", scope="gpu")
        if done == num_splits - 1:
            tl.atomic_xchg(done_ptr + bh, 0)
            tl.atomic_xchg(flag_ptr + bh, 0)
    trace_mark(trace_ptr, 2, TRACE)


@triton.jit
def _decode_merge_kernel(
    o_ws_ptr,
    lse_ws_ptr,
    out_ptr,
    q_heads,
    kv_heads,
    num_splits,
    stride_ob,
    stride_oh,
    trace_ptr,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CHUNK_S: tl.constexpr,
    PDL: tl.constexpr,
    TRACE: tl.constexpr,
):
    trace_mark(trace_ptr, 0, TRACE)
    pdl_enter(PDL)
    trace_mark(trace_ptr, 1, TRACE)
    pid = tl.program_id(0)
    b = pid // q_heads
    hq = pid % q_heads
    bh = b * kv_heads + hq // G
    g = hq % G
    splits = tl.arange(0, BLOCK_S)
    smask = splits < num_splits
    row0 = bh.to(tl.int64) * num_splits * G + g  # workspace row of split 0; split s at + s * G
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    if CHUNK_S == BLOCK_S:  # every split in one tile, loaded beside the lse: one memory round trip
        o = tl.load(o_ws_ptr + (row0 + splits[:, None] * G) * HEAD_DIM + offs_d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    lse = tl.load(lse_ws_ptr + row0 + splits * G, mask=smask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w_sum = tl.sum(tl.exp2(lse - m_use), axis=0)
    if CHUNK_S == BLOCK_S:
        acc = tl.sum(tl.exp2(lse - m_use)[:, None] * o, axis=0)
    else:  # [CHUNK_S, BLOCK_D] tiles, one round trip each
        acc = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, num_splits, CHUNK_S):
            s = s0 + tl.arange(0, CHUNK_S)
            cmask = s < num_splits
            ls = tl.load(lse_ws_ptr + row0 + s * G, mask=cmask, other=float("-inf"))
            w = tl.exp2(ls - m_use)
            oc = tl.load(
                o_ws_ptr + (row0 + s[:, None] * G) * HEAD_DIM + offs_d[None, :],
                mask=cmask[:, None] & dmask[None, :],
                other=0.0,
            )
            acc += tl.sum(w[:, None] * oc, axis=0)
    res = tl.where(w_sum > 0.0, acc / tl.where(w_sum > 0.0, w_sum, 1.0), 0.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty), mask=dmask)
    trace_mark(trace_ptr, 2, TRACE)


#: How several splits are merged by default: ``"kernel"`` (a second launch) or ``"inline"`` (the last split
#: of each (row, KV head) merges, found by an atomic counter; one launch). The H100 sweep
#: (``benchmarks/tune_decode.py``, 2026-11-23) measured them equal (30.7 vs 30.8 us at Llama-3-8B B=8 / 64K),
#: so the simpler second kernel stays the default and inline stays a tuning option.
DEFAULT_MERGE = "kernel"


def default_block_n(head_dim: int) -> int:
    """Tokens per attention block: 128 up to head_dim 128, else 32 (H100: 128 tokens, 4 warps, 2 stages were best)."""
    return 128 if max(16, triton.next_power_of_2(head_dim)) <= 128 else 32


def default_stages(block_d: int, dense: bool) -> int:
    """Pipeline stages of the attention loop: 2 (H100 sweep, 2026-11-23), but 3 for the dense decode at
    head_dim <= 64, whose pages run contiguously (H200 sweep ``tune_decode_h200_dense_1a0ef7f.json``, same
    splits and blocks: TinyLlama B=8/16K 43.0 -> 37.9 us, B=8/64K 144.1 -> 139.3, B=1/64K 24.0 -> 21.5,
    B=8/2K 10.9 -> 10.0, B=1/16K level at 9.9; at head_dim 128 no stage count beat the default's
    splits and blocks)."""
    return 3 if dense and block_d <= 64 else 2


def plan_splits(batch_heads: int, num_select: int, page_size: int, block_n: int, sm_count: int) -> tuple[int, int]:
    """``(num_splits, tokens_per_split)``: about two programs per SM, at least ``block_n`` tokens each;
    ``tokens_per_split`` is a multiple of ``block_n``. Shapes only (no data), so launches are static."""
    total = num_select * page_size
    max_splits = triton.cdiv(total, block_n)
    want = triton.cdiv(2 * sm_count, max(1, batch_heads))
    return split_tokens(total, max(1, min(want, max_splits)), block_n)


def split_tokens(total: int, num_splits: int, block_n: int) -> tuple[int, int]:
    """``(num_splits, tokens_per_split)`` of ``total`` selected tokens in at most ``num_splits`` chunks of a
    multiple of ``block_n`` tokens (fewer splits where the last ones would be empty)."""
    per = triton.cdiv(triton.cdiv(total, num_splits), block_n) * block_n
    return triton.cdiv(total, per), per


#: Elements of the merge kernel's partial-output tile (fp32, 4 warps: 64 registers a thread at most).
MERGE_TILE_ELEMS = 8192


def merge_tile(splits: int, block_d: int, chunk: int | None = None) -> int:
    """Splits the merge kernel loads per tile: all of them (one memory round trip, the lse beside the
    partials) while ``[splits, block_d]`` fp32 fits :data:`MERGE_TILE_ELEMS`, else chunks of that size
    (one round trip each); ``chunk`` overrides (tuning). A power of two ``<= next_pow2(splits)``."""
    block_s = triton.next_power_of_2(splits)
    want = chunk if chunk is not None else max(1, MERGE_TILE_ELEMS // block_d)
    check(want >= 1, f"merge_chunk={chunk} must be >= 1")
    return min(block_s, triton.next_power_of_2(want))


def check_attention(q, k_cache, v_cache, seq_start, seq_end, page_size: int, scale: float, softcap: float):
    """Checks of an attention launch over ``q`` ``[B, Hq, D]`` and the ``[B, Hkv, cap, D]`` cache; returns
    ``(q, k_cache, v_cache)`` with the last dim contiguous and K / V strided alike."""
    check(k_cache.dim() == 4 and v_cache.shape == k_cache.shape, "k_cache / v_cache must be [B, Hkv, cap, D] alike")
    check_float_dtype(q, "q")
    check(
        v_cache.dtype == k_cache.dtype and (k_cache.dtype == q.dtype or k_cache.dtype in FP8_DTYPES),
        f"q / k_cache / v_cache dtypes {q.dtype} / {k_cache.dtype} / {v_cache.dtype}: K/V in q's dtype or float8_e4m3fn",
    )
    b, hkv, cap, d = k_cache.shape
    check_head_dim(d)
    check_page_size(page_size)
    check(cap % page_size == 0, f"capacity {cap} is not a multiple of page_size {page_size}")
    check(q.dim() == 3 and q.shape[0] == b and q.shape[2] == d, f"q {tuple(q.shape)} does not match the cache {tuple(k_cache.shape)}")
    check(q.shape[1] % hkv == 0, f"q_heads {q.shape[1]} is not a multiple of kv_heads {hkv}")
    check_rows(seq_start, seq_end, b)
    check(math.isfinite(scale) and math.isfinite(softcap) and softcap >= 0, f"bad scale {scale} / softcap {softcap}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    return q, k_cache, v_cache


def sparse_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indices: torch.Tensor,
    seq_start: torch.Tensor,
    seq_end: torch.Tensor,
    page_size: int,
    scale: float,
    softcap: float = 0.0,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    merge: str | None = None,
    chain: tuple[torch.Tensor, torch.Tensor] | None = None,
    merge_chunk: int | None = None,
    trace: KernelTrace | None = None,
    out: torch.Tensor | None = None,
    slots: int | None = None,
) -> torch.Tensor:
    """``[B, Hq, D]`` attention over the selected pages (see module docstring). ``num_splits``,
    ``block_n``, ``num_warps``, ``num_stages`` and ``merge`` (``"kernel"`` / ``"inline"``, see
    :data:`DEFAULT_MERGE`) override the tuned defaults (tests, tuning); so does ``merge_chunk``, the splits the
    merge kernel reads per tile (default: all of them in one tile, see :func:`merge_tile`). ``chain``: ``(flags, done)``, the
    row-chained mode (:mod:`triton_chain`): a row's programs wait until its flag is set (by its selection)
    instead of waiting for the previous grid, and the row's last program zeroes its flag again. ``trace``:
    record each program's timestamps, of the split kernel and of the merge kernel (:mod:`trace`). ``out``: write
    the result there (``[B, Hq, D]`` in q's dtype on q's device, last dim contiguous; e.g. a slice of a
    larger batch's output) instead of a new tensor. ``indices=None`` with ``slots``: dense decode, every
    token of each row's ``[seq_start, seq_end)`` over ``slots`` page slots from the row's first page (the
    range must fit them), with no page list to build or read."""
    merge = merge or DEFAULT_MERGE
    check(merge in ("kernel", "inline"), f"merge={merge!r}: allowed 'kernel' or 'inline'")
    q, k_cache, v_cache = check_attention(q, k_cache, v_cache, seq_start, seq_end, page_size, scale, softcap)
    b, hkv, cap, d = k_cache.shape
    dense = indices is None
    if dense:
        check(slots is not None and 0 <= slots <= cap // page_size and chain is None,
              f"dense decode needs 0 <= slots <= {cap // page_size} and no chain, got slots={slots}")
        n_sel, idx_strides = slots, (0, 0)
    else:
        check(indices.dim() == 3 and indices.shape[:2] == (b, hkv) and indices.dtype == torch.int32, "indices must be int32 [B, Hkv, S]")
        if indices.stride(-1) != 1:
            indices = indices.contiguous()
        n_sel, idx_strides = indices.shape[2], (indices.stride(0), indices.stride(1))
    hq = q.shape[1]
    g = hq // hkv
    if out is None:
        out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    else:
        check(out.shape == (b, hq, d) and out.dtype == q.dtype and out.device == q.device and out.stride(-1) == 1,
              f"out {tuple(out.shape)} {out.dtype} on {out.device} (stride {out.stride()}): need {(b, hq, d)} {q.dtype} "
              f"on {q.device}, last dim contiguous")
    if out.numel() == 0:
        return out
    if n_sel == 0:
        return out.zero_()

    block_d = max(16, triton.next_power_of_2(d))
    block_n = block_n or default_block_n(d)
    num_stages = num_stages or default_stages(block_d, dense)
    check(block_n >= 16 and block_n & (block_n - 1) == 0, f"block_n={block_n}: a power of two >= 16 (tl.dot's smallest K)")
    if num_splits is None:
        splits, per = plan_splits(b * hkv, n_sel, page_size, block_n, sm_count(q.device))
    else:
        splits, per = split_tokens(n_sel * page_size, num_splits, block_n)
    single = splits == 1
    counters = ticket_counters(q.device, b * hkv) if merge == "inline" and not single else None
    inline = counters is not None
    if single:
        o_ws = lse_ws = out  # unused
    else:
        o_ws = torch.empty((b * hkv * splits * g, d), dtype=torch.float32, device=q.device)
        lse_ws = torch.empty((b * hkv * splits * g,), dtype=torch.float32, device=q.device)
    pdl = use_pdl(q.device)
    flags, done = chain if chain is not None else (out, out)
    traced = trace is not None
    _decode_split_kernel[(splits, b * hkv) if chain is not None else (b * hkv, splits)](
        q, k_cache, v_cache, seq_start if dense else indices, seq_start, seq_end, out, o_ws, lse_ws, counters if inline else out,
        n_sel, hkv, splits, per,
        float(scale) / softcap if softcap else float(scale) * LOG2E, float(softcap) * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *idx_strides, out.stride(0), out.stride(1), flags, done,
        trace.region("attention", splits * b * hkv, q.device) if traced else out,
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=block_n,
        PAGE_SIZE=page_size, SOFTCAP=bool(softcap), SINGLE=single, F32=f32_dot(q.dtype), INLINE_MERGE=inline,
        CHAIN=chain is not None, SCALED_F16=scaled_f16(q.dtype, k_cache.dtype), TRACE=traced, DENSE=dense,
        num_warps=num_warps or (4 if block_d <= 128 else 8), num_stages=num_stages, PDL=pdl, launch_pdl=pdl,
    )
    if not single and not inline:
        _decode_merge_kernel[(b * hq,)](
            o_ws, lse_ws, out, hq, hkv, splits, out.stride(0), out.stride(1),
            trace.region("merge", b * hq, q.device) if traced else out, TRACE=traced,
            G=g, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits),
            CHUNK_S=merge_tile(splits, block_d, merge_chunk), num_warps=4, PDL=pdl, launch_pdl=pdl,
        )
    return out
