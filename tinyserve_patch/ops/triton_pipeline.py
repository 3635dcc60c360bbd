"""Triton staged decode chain: Quest scores -> page selection -> sparse attention in ``groups + 2`` launches
whose grids overlap the three kernels of different row groups.

Inputs as the split chain's: ``q`` ``[B, Hq, D]``, ``k_cache`` / ``v_cache`` ``[B, Hkv, cap, D]``, ``meta``
``[B, Hkv, P, 2, D]``, ``seq_start`` / ``seq_end`` ``[B]``. Outputs: the attention ``[B, Hq, D]`` (q's dtype)
and the selected pages int32 ``[B, Hkv, num_select]``.

Why: in the split chain (score -> select -> attention) the selection is latency-bound (one program per
(row, KV head), ~9 us at 4096 pages on an H100) and the memory system idles while it runs. Here the
``B * Hkv`` (row, KV head) pairs are cut into ``groups`` consecutive ranges and launch ``s`` runs, as one
grid, the selection programs of group ``s - 1`` (first in the grid, so they get SMs first), the score
programs of group ``s`` and the attention programs of group ``s - 2``: the bandwidth-bound programs of
one group cover the selection of another. Every input of launch ``s`` was written by an earlier launch,
so stream order (with PDL: the wait at program start, :func:`pdl_enter`) is all the synchronisation
there is; no flags, no spin-waits. The split merge (one kernel over all rows) follows.

The programs run the split kernels' own bodies (:func:`triton_score.score_program`,
:func:`triton_select.select_row`, :func:`triton_decode.attend_split`) on the same launch plans, so the
results equal the split chain's bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import SELECT_WAYS, check, check_select_pages, check_ways, pdl_enter, use_pdl
from .triton_decode import attend_split, plan_attention
from .triton_score import plan_walk, score_args, score_meta, score_program
from .triton_select import select_row

#: Row groups of the staged chain (``groups + 2`` launches).
DEFAULT_GROUPS = 2


@triton.jit
def _stage_kernel(
    q_ptr,
    meta_ptr,
    start_ptr,
    end_ptr,
    scores_ptr,
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
    idx_ptr,
    num_select,
    sink,
    recent,
    k_ptr,
    v_ptr,
    out_ptr,
    o_ws_ptr,
    lse_ws_ptr,
    counter_ptr,
    num_splits,
    tokens_per_split,
    qk_scale,
    softcap,
    stride_cb,
    stride_ch,
    stride_ct,
    stride_ob,
    stride_oh,
    sel_bh0,
    sel_rows,
    score_bh0,
    score_rows,
    programs_per_row,
    attn_bh0,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    GQA_SUM: tl.constexpr,
    F32: tl.constexpr,
    STAGES: tl.constexpr,
    WALK: tl.constexpr,
    SEL_BLOCK: tl.constexpr,
    WAYS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SINGLE: tl.constexpr,
    INLINE_MERGE: tl.constexpr,
    HAS_SELECT: tl.constexpr,
    HAS_SCORE: tl.constexpr,
    HAS_ATTN: tl.constexpr,
    PDL: tl.constexpr,
):
    """1-D grid: ``sel_rows`` selection programs (rows ``sel_bh0 + i``), then ``score_rows *
    programs_per_row`` score programs, then the attention programs (``num_splits`` per row from
    ``attn_bh0``); a part whose ``HAS_*`` is off is not compiled in."""
    pdl_enter(PDL)
    pid = tl.program_id(0)
    n_sel = sel_rows * HAS_SELECT
    n_score = score_rows * programs_per_row * HAS_SCORE
    if HAS_SELECT:
        if pid < n_sel:
            select_row(
                sel_bh0 + pid, scores_ptr, start_ptr, end_ptr, idx_ptr, num_pages, num_select, kv_heads,
                kv_heads * num_pages, num_pages, 1, page_size, sink, recent, SEL_BLOCK, WAYS,
            )
    if HAS_SCORE:
        if (pid >= n_sel) & (pid < n_sel + n_score):
            local = pid - n_sel
            score_program(
                score_bh0 + local // programs_per_row, local % programs_per_row, q_ptr, meta_ptr, start_ptr,
                end_ptr, scores_ptr, num_pages, kv_heads, D, stride_qb, stride_qh, stride_mb, stride_mh,
                stride_mp, stride_mm, page_size, blocks_per_program, G, G_PAD, BLOCK_D, BLOCK_P, GQA_SUM, F32,
                STAGES, WALK,
            )
    if HAS_ATTN:
        if pid >= n_sel + n_score:
            local = pid - n_sel - n_score
            attend_split(
                attn_bh0 + local // num_splits, local % num_splits, q_ptr, k_ptr, v_ptr, idx_ptr, start_ptr,
                end_ptr, out_ptr, o_ws_ptr, lse_ws_ptr, counter_ptr, num_select, kv_heads, num_splits,
                tokens_per_split, qk_scale, softcap, stride_qb, stride_qh, stride_cb, stride_ch, stride_ct,
                kv_heads * num_select, num_select, stride_ob, stride_oh, G, G_PAD, HEAD_DIM, BLOCK_D, BLOCK_N,
                PAGE_SIZE, SOFTCAP, SINGLE, F32, INLINE_MERGE,
            )


def group_bounds(pairs: int, groups: int) -> list[int]:
    """Boundaries of ``groups`` consecutive, near-equal ranges of ``pairs`` (row, KV head) pairs (``groups``
    capped at ``pairs``): group ``i`` is ``[bounds[i], bounds[i + 1])``."""
    groups = max(1, min(groups, pairs))
    return [pairs * i // groups for i in range(groups + 1)]


def quest_decode_staged_triton(
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
    groups: int | None = None,
    num_warps: int | None = None,
    merge: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, D], indices int32 [B, Hkv, num_select])``: the split chain's results (see module
    docstring). ``groups`` (default :data:`DEFAULT_GROUPS`), ``num_warps`` (one value for every program of
    a launch; default the larger of the score's and the attention's) and ``merge`` override the defaults."""
    check(num_select >= 1, f"num_select={num_select} must be >= 1")
    check(sink_pages >= 0 and recent_pages >= 0, "sink_pages / recent_pages must be >= 0")
    groups = DEFAULT_GROUPS if groups is None else groups
    check(groups >= 1, f"groups={groups} must be >= 1")
    q, meta, consts = score_meta(q, meta, seq_start, seq_end, page_size, gqa_reduction)
    b, hkv, pages = meta.shape[:3]
    sel_block = check_select_pages(pages)
    ways = check_ways(SELECT_WAYS)
    check(k_cache.dim() == 4 and k_cache.shape[:2] == (b, hkv), f"k_cache {tuple(k_cache.shape)} does not match meta {tuple(meta.shape)}")
    check(k_cache.shape[2] == pages * page_size, f"cache capacity {k_cache.shape[2]} != pages {pages} x page_size {page_size}")
    scores = torch.empty((b, hkv, pages), dtype=torch.float32, device=q.device)
    indices = torch.empty((b, hkv, num_select), dtype=torch.int32, device=q.device)
    bounds = group_bounds(b * hkv, groups)
    largest = max(hi - lo for lo, hi in zip(bounds, bounds[1:])) if b * hkv else 0
    attn = plan_attention(
        q, k_cache, v_cache, indices, seq_start, seq_end, page_size, scale, softcap, merge=merge,
        plan_rows=max(1, largest),
    )
    if attn.splits == 0 or pages == 0:
        return attn.out, indices.fill_(-1)
    walk = plan_walk(consts, pages, largest, q.device, meta.dtype)
    ppr = walk.pop("programs_per_row")
    score_warps = walk.pop("num_warps")
    warps = num_warps or max(score_warps, attn.num_warps)
    s_args = score_args(q, meta, seq_start, seq_end, scores, page_size, walk.pop("blocks_per_program"))
    attn_names = (
        "k", "v", "out", "o_ws", "lse_ws", "counters", "num_splits", "tokens_per_split", "qk_scale", "softcap",
        "stride_cb", "stride_ch", "stride_ct", "stride_ob", "stride_oh",
    )
    k_args = (*s_args, indices, num_select, sink_pages, recent_pages, *(attn.arg(n) for n in attn_names))
    consts_all = dict(
        consts, **walk, SEL_BLOCK=sel_block, WAYS=ways, HEAD_DIM=attn.consts["HEAD_DIM"],
        BLOCK_N=attn.consts["BLOCK_N"], PAGE_SIZE=page_size, SOFTCAP=attn.consts["SOFTCAP"],
        SINGLE=attn.consts["SINGLE"], INLINE_MERGE=attn.consts["INLINE_MERGE"],
    )
    pdl = use_pdl(q.device)
    n_groups = len(bounds) - 1

    def rows(g):  # (first pair, pairs) of group g, (0, 0) outside 0..n_groups-1
        return (bounds[g], bounds[g + 1] - bounds[g]) if 0 <= g < n_groups else (0, 0)

    for s in range(n_groups + 2):
        (sel0, n_sel), (sc0, n_sc), (at0, n_at) = rows(s - 1), rows(s), rows(s - 2)
        grid = (n_sel + n_sc * ppr + n_at * attn.splits,)
        _stage_kernel[grid](
            *k_args, sel0, n_sel, sc0, n_sc, ppr, at0, **consts_all,
            HAS_SELECT=n_sel > 0, HAS_SCORE=n_sc > 0, HAS_ATTN=n_at > 0,
            num_warps=warps, num_stages=attn.num_stages, PDL=pdl, launch_pdl=pdl,
        )
    attn.merge(pdl)
    return attn.out, indices
