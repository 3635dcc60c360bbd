"""Row-chained decode: the score, select and attention kernels synchronised per (row, KV head) instead of
grid by grid, and :func:`quest_decode_triton`, the CUDA side of ``torch.ops.tinyserve.quest_decode``, which
picks the split chain or the fused row-chained decode per shape (:func:`prefer_fused_chain`). The unfused
row-chained decode stays an option: on the H200 (commit 2a4f45d) it gained 1.4 us at Llama-3-8B
B=8/64K/2048 (67.9 vs 69.3 us) and lost 2.5-3.5 us at batch 1
(``benchmarks/results/kernels_h200_chained_2a4f45d.json``).

Inputs as the split chain's: ``q`` ``[B, Hq, D]``, ``k_cache`` / ``v_cache`` ``[B, Hkv, cap, D]``, ``meta``
``[B, Hkv, P, 2, D]``, ``seq_start`` / ``seq_end`` ``[B]``. Returns the attention ``[B, Hq, D]`` (q's dtype)
and the selected pages int32 ``[B, Hkv, num_select]``, equal bit for bit to the split chain's (the same
kernels, the same launch plans; only the waits differ).

In the split chain each kernel waits for the whole previous grid (``griddepcontrol.wait``), so the
selection (latency-bound, ~8 us) and the attention's start-up run while the memory system idles. Here,
with the same three launches (the ``CHAIN`` mode of each kernel):

* the score grid is row-major (a row's programs adjacent, so rows finish in order); each program adds the
  number of pages it scored to its row's counter after its stores (CTA barrier + release add);
* each selection program waits until its row's counter reaches the row's page count (acquire spin: no
  launch plan to share with the score kernel), zeroes it, reads the scores past L1 (``.cg``), selects,
  and adds 1 to its row's flag;
* each attention program (grid ``(num_splits, rows)``) waits for its row's flag, reads the pages past L1,
  and the row's last program to finish zeroes the flag (a done ticket); the merge kernel waits for the
  whole attention grid as before.

So early rows' selection and attention run beside later rows' scoring. The selection and attention
programs trigger the next launch at once and never wait for the previous grid: everything older than
the score grid was complete before its programs triggered. The waits cannot deadlock: a PDL launch may
start only once every program of the previous grid has triggered or exited, so every score program is
scheduled before any selection program takes an SM, and every selection program before any attention
program; a spinning program only waits for programs already resident or finished. Without PDL (before
Hopper, ``TINYSERVE_PDL=0``, the CPU interpreter) the grids run one after another and every wait passes at
once. The counters are a persistent per-device buffer (:func:`_triton_common.ticket_counters`, pool
``"chain"``) that every launch leaves zeroed; where it cannot exist (first allocation inside a CUDA-graph
capture) the split chain runs instead.
"""

from __future__ import annotations

import torch
import triton

from ._triton_common import check, select_num_warps, sm_count, ticket_counters, use_pdl
from .triton_decode import default_block_n, plan_splits, sparse_decode_attention_triton
from .triton_fused_select import score_and_select_triton
from .trace import KernelTrace
from .triton_score import page_scores_triton, plan_walk, score_meta
from .triton_select import select_pages_triton


def fused_chain_plan(rows: int, pages: int, num_select: int, page_size: int, head_dim: int, device: torch.device,
                     num_warps: int | None = None) -> dict:
    """Launch defaults of the fused row-chained decode: ``maxnreg``, the fused kernel's register cap that
    keeps the score kernel's 3 CTAs per SM (``65536 / (3 * threads)``, a multiple of 8: 80 at 8 warps);
    ``num_splits``, twice the split chain's attention programs (shorter programs: the last rows' attention
    is the step's tail); ``merge``, inline up to 8 splits (no merge grid after the last row). From the
    H200 timeline sweep at Llama-3-8B B=8 / 64K / 2048 (``benchmarks/results/timeline_h200_sweep_*.json``,
    ``timeline_h200_fused_plan_1848585.*``)."""
    warps = num_warps or select_num_warps(triton.next_power_of_2(pages))
    splits, _ = plan_splits(rows, num_select, page_size, default_block_n(head_dim), 2 * sm_count(device))
    return dict(maxnreg=65536 // (3 * 32 * warps) // 8 * 8, num_splits=splits, merge="inline" if splits <= 8 else "kernel")


#: Fused score + select programs resident on one SM under :func:`fused_chain_plan`'s register cap.
FUSED_CHAIN_PROGRAMS_PER_SM = 3
#: Decode paths of :func:`quest_decode_triton` (``torch.ops.tinyserve.quest_decode``).
DECODE_PATHS = ("auto", "split", "fused")


def prefer_fused_chain(rows: int, pages: int, head_dim: int, q_dtype: torch.dtype, kv_dtype: torch.dtype,
                       meta_dtype: torch.dtype, device: torch.device) -> bool:
    """The ``"auto"`` rule of :func:`quest_decode_triton`: the fused row-chained decode where it was measured
    faster than the split chain, the split chain everywhere else (both give the same pages and output).

    The fused chain wins only where its score grid runs at least two waves (rows then finish scoring one
    after another, so early rows' selection and attention run under later rows' scoring) with head_dim
    128. On the H100 (``kernels_h100_9c08c6f.json``, 48 shapes, CUDA graphs): Llama-3-8B B=8 / 64K
    (1024 programs, 2.6 waves) 80.5 vs 87.4 us at budget 2048, 72.5 vs 74.4 at 1024, 102.9 vs 111.6 at
    4096; B=8 / 128K (5.2 waves) 132.7 vs 135.8, 149.4 vs 163.3, 126.4 vs 125.8 (1024). Under two waves
    it loses up to 41% (batch 1) and at head_dim 64 up to 22% even with 2.6 waves (TinyLlama B=8 / 128K:
    half the metadata bytes per page to hide a selection over 8192 pages); the H200 runs agree
    (``kernels_h200_chained_fused_ead825d.json``, ``kernels_h200_d7a1b95_subset.json``). Measured with
    K/V and metadata in the model's dtype on Hopper (PDL), so fp8 storage, other head dims and GPUs
    without PDL (where the chain's waits cannot overlap anything) keep the split chain."""
    if not use_pdl(device) or head_dim != 128 or not (kv_dtype == meta_dtype == q_dtype):
        return False
    walk = plan_walk({"BLOCK_D": head_dim}, pages, rows, device, meta_dtype)  # the fused launch's score walk
    return rows * walk["programs_per_row"] >= 2 * FUSED_CHAIN_PROGRAMS_PER_SM * sm_count(device)


def quest_decode_triton(
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
    path: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Quest decode step on CUDA, ``(out [B, Hq, D], indices int32 [B, Hkv, num_select])``, by ``path``:
    ``"split"``: the score, select and attention kernels, each waiting for the whole previous grid (PDL);
    ``"fused"``: the fused row-chained decode (:func:`quest_decode_chained_triton` with ``fused=True``);
    ``"auto"``: :func:`prefer_fused_chain` picks one. The same pages and output either way."""
    check(path in DECODE_PATHS, f"path={path!r}: allowed {DECODE_PATHS}")
    if path == "auto":
        b, hkv, pages, _, d = meta.shape
        path = "fused" if prefer_fused_chain(b * hkv, pages, d, q.dtype, k_cache.dtype, meta.dtype, q.device) else "split"
    if path == "fused":
        return quest_decode_chained_triton(q, k_cache, v_cache, meta, seq_start, seq_end, page_size, num_select,
                                           sink_pages, recent_pages, gqa_reduction, scale, softcap, fused=True)
    scores = page_scores_triton(q, meta, seq_start, seq_end, page_size, gqa_reduction)
    idx = select_pages_triton(scores, seq_start, seq_end, page_size, num_select, sink_pages, recent_pages)
    return sparse_decode_attention_triton(q, k_cache, v_cache, idx, seq_start, seq_end, page_size, scale, softcap), idx


def quest_decode_chained_triton(
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
    merge: str | None = None,
    trace: KernelTrace | None = None,
    fused: bool = False,
    num_splits: int | None = None,
    fused_options: dict | None = None,
    attention_options: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, D], indices int32 [B, Hkv, num_select])``: the split chain's results, row-chained
    (see module docstring). ``fused``: score and select in the fused kernel (:mod:`triton_fused_select`:
    the last score program of a row selects it at once, so no selection waits for a grid launch), which
    flags the row for its attention programs. ``num_splits`` and ``merge``: the attention's splits per row
    and how they merge; ``fused_options``: overrides of the fused launch (``num_warps``, ``maxnreg``,
    ``blocks_per_program``, ``finish``, ``ways``, ``num_stages``, ``block_p``; tuning). With ``fused`` the
    unset ones default to :func:`fused_chain_plan`. ``attention_options``: overrides of the attention
    launch (``block_n``, ``num_warps``, ``num_stages``; tuning). ``trace``: record every program's timestamps
    (:mod:`trace`)."""
    q, meta, _ = score_meta(q, meta, seq_start, seq_end, page_size, gqa_reduction)
    check(num_select >= 1, f"num_select={num_select} must be >= 1")
    b, hkv, pages = meta.shape[:3]
    rows = b * hkv
    if fused:
        fused_options = dict(fused_options or {})
        plan = fused_chain_plan(rows, pages, num_select, page_size, q.shape[2], q.device, fused_options.get("num_warps"))
        fused_options.setdefault("maxnreg", plan["maxnreg"])
        num_splits = plan["num_splits"] if num_splits is None else num_splits
        merge = plan["merge"] if merge is None else merge
    # no persistent counters (nothing to chain, or a first call inside a capture): the split chain
    buf = ticket_counters(q.device, 3 * rows, pool="chain") if rows * pages * q.shape[1] > 0 else None
    counts, flags, done = (None,) * 3 if buf is None else (buf[:rows], buf[rows : 2 * rows], buf[2 * rows : 3 * rows])
    try:
        if fused:
            idx = score_and_select_triton(q, meta, seq_start, seq_end, page_size, num_select, sink_pages, recent_pages,
                                          gqa_reduction, flags=flags, trace=trace, **fused_options)
        else:
            scores = page_scores_triton(q, meta, seq_start, seq_end, page_size, gqa_reduction, signal=counts, trace=trace)
            idx = select_pages_triton(scores, seq_start, seq_end, page_size, num_select, sink_pages, recent_pages,
                                      chain=None if buf is None else (counts, flags), trace=trace)
        out = sparse_decode_attention_triton(q, k_cache, v_cache, idx, seq_start, seq_end, page_size, scale, softcap,
                                             num_splits=num_splits, merge=merge, chain=None if buf is None else (flags, done),
                                             trace=trace, **(attention_options or {}))
    except BaseException:
        if buf is not None:  # a launch that failed part-way must not leave a row armed for the next call
            buf[: 3 * rows].zero_()
        raise
    return out, idx
