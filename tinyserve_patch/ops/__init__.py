"""Public entry points of the sparse-decode ops (``torch.ops.tinyserve.*``), with input checks.

Layouts are documented in :mod:`tinyserve_patch.ops.reference`. Every function works on CPU (reference)
and CUDA (Triton) tensors and traces under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

from . import library as _lib  # noqa: F401 (imported for its side effect: registers torch.ops.tinyserve.*)
from . import reference

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: K/V and page-metadata storage besides the model's dtype (queries stay in the model's dtype)
KV_STORAGE_DTYPES = reference.FP8_DTYPES
MAX_HEAD_DIM = 256

__all__ = [
    "append_kv",
    "page_scores",
    "select_pages",
    "score_and_select",
    "sparse_decode_attention",
    "dense_decode_attention",
    "quest_decode",
    "record_decode",
    "reserve_counters",
    "check_cache",
    "reference",
]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def reserve_counters(device: torch.device | str, rows: int) -> None:
    """Allocate the persistent program counters the CUDA kernels of a decode step over ``rows`` (batch x KV
    heads) rows count through (fused selection, the row-chained decode), outside any CUDA graph. Needed once
    per device before a decode step is first run under ``torch.compile(mode="reduce-overhead")`` or CUDA-graph
    capture, where allocating them would put them in the graph's memory pool; a
    :class:`~tinyserve_patch.cache.TinyServeCache` does it when it allocates its buffers, so only direct
    callers of these ops under CUDA graphs need it. A no-op off CUDA."""
    device = torch.device(device)
    _check(rows >= 0, f"rows={rows} must be >= 0")
    if device.type != "cuda":
        return
    if device.index is None:  # the kernels key the counters by their tensors' device, which has an index
        device = torch.device("cuda", torch.cuda.current_device())
    from ._triton_common import reserve_ticket_counters

    reserve_ticket_counters(device, rows)


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, meta: torch.Tensor | None = None) -> int:
    """Validate the cache layout; returns ``page_size``. K/V and meta are each in the model's dtype or fp8."""
    _check(k_cache.dim() == 4, f"k_cache must be [batch, kv_heads, capacity, head_dim], got {tuple(k_cache.shape)}")
    _check(v_cache.shape == k_cache.shape, f"v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    _check(
        k_cache.dtype in SUPPORTED_DTYPES + KV_STORAGE_DTYPES,
        f"cache dtype {k_cache.dtype} unsupported: {SUPPORTED_DTYPES + KV_STORAGE_DTYPES}",
    )
    _check(v_cache.dtype == k_cache.dtype, "k_cache and v_cache dtypes differ")
    _check(k_cache.device == v_cache.device, "k_cache and v_cache are on different devices")
    _check(k_cache.shape[-1] <= MAX_HEAD_DIM, f"head_dim {k_cache.shape[-1]} > {MAX_HEAD_DIM} is not supported")
    if meta is None:
        return 0
    b, h, cap, d = k_cache.shape
    _check(
        meta.dim() == 5 and meta.shape[:2] == (b, h) and meta.shape[3:] == (2, d),
        f"meta must be [batch, kv_heads, pages, 2, head_dim] matching the cache, got {tuple(meta.shape)}",
    )
    _check(meta.dtype in SUPPORTED_DTYPES + KV_STORAGE_DTYPES, f"meta dtype {meta.dtype} unsupported: {SUPPORTED_DTYPES + KV_STORAGE_DTYPES}")
    _check(
        meta.dtype == k_cache.dtype or k_cache.dtype in KV_STORAGE_DTYPES or meta.dtype in KV_STORAGE_DTYPES,
        f"meta dtype {meta.dtype} != cache dtype {k_cache.dtype} (only an fp8 cache or fp8 meta may differ)",
    )
    _check(meta.device == k_cache.device, "meta must be on the cache's device")
    pages = meta.shape[2]
    _check(pages > 0 and cap % pages == 0, f"capacity {cap} is not a whole number of pages ({pages})")
    page_size = cap // pages
    _check(page_size in (8, 16, 32, 64, 128), f"page_size {page_size} must be a power of two in 8..128")
    return page_size


def _check_rows(seq_start: torch.Tensor, seq_end: torch.Tensor, batch: int, device: torch.device) -> None:
    for name, t in (("seq_start", seq_start), ("seq_end", seq_end)):
        _check(t.dtype == torch.int32 and t.shape == (batch,), f"{name} must be int32 [batch={batch}], got {t.dtype} {tuple(t.shape)}")
        _check(t.device == device, f"{name} is on {t.device}, the cache on {device}")


def _check_query(q: torch.Tensor, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
    """``q`` against the cache / metadata: its dtype must be ``dtype`` (an fp8 cache takes any model dtype)."""
    _check(dtype in SUPPORTED_DTYPES + KV_STORAGE_DTYPES, f"cache/meta dtype {dtype} unsupported: {SUPPORTED_DTYPES}")
    _check(q.dtype in SUPPORTED_DTYPES, f"q dtype {q.dtype} unsupported: {SUPPORTED_DTYPES}")
    _check(q.dim() == 3, f"q must be [batch, q_heads, head_dim], got {tuple(q.shape)}")
    _check(q.shape[-1] == head_dim, f"q head_dim {q.shape[-1]} != cache head_dim {head_dim}")
    _check(q.shape[1] % kv_heads == 0, f"q_heads {q.shape[1]} is not a multiple of kv_heads {kv_heads}")
    _check(q.dtype == dtype or dtype in KV_STORAGE_DTYPES, f"q dtype {q.dtype} != cache dtype {dtype}")
    _check(q.device == device, f"q is on {q.device}, the cache on {device}")


def append_kv(k_cache, v_cache, meta, k_new, v_new, pos) -> None:
    """Write ``k_new``/``v_new`` ``[batch, kv_heads, n, head_dim]`` at ``pos[b] .. pos[b]+n-1`` and update the
    min/max metadata of the touched pages, in place. ``pos``: int tensor of 1 or ``batch`` elements on the
    cache's device; tokens landing before position 0 are skipped (dropped left padding)."""
    check_cache(k_cache, v_cache, meta)
    _check(k_new.shape == v_new.shape, "k_new and v_new shapes differ")
    _check(
        k_new.dim() == 4 and k_new.shape[:2] == k_cache.shape[:2] and k_new.shape[3] == k_cache.shape[3],
        f"k_new {tuple(k_new.shape)} does not fit the cache {tuple(k_cache.shape)}",
    )
    _check(
        pos.numel() in (1, k_cache.shape[0]) and not pos.is_floating_point(),
        f"pos must be an integer tensor of 1 or batch={k_cache.shape[0]} elements, got {tuple(pos.shape)}",
    )
    _check(pos.device == k_cache.device and k_new.device == k_cache.device, "pos/k_new must be on the cache's device")
    # new K/V arrive in the model's dtype; the op rounds them into an fp8 cache / fp8 metadata itself
    dtype = reference.model_dtype(k_cache.dtype, meta.dtype, k_new.dtype)
    _check(dtype in SUPPORTED_DTYPES, f"k_new dtype {dtype} unsupported: {SUPPORTED_DTYPES}")
    torch.ops.tinyserve.append_kv(k_cache, v_cache, meta, k_new.to(dtype), v_new.to(dtype), pos)


def page_scores(q, meta, seq_start, seq_end, page_size: int, gqa_reduction: str = "max") -> torch.Tensor:
    """Quest upper-bound scores ``[batch, kv_heads, pages]`` float32 (``-inf`` for invalid pages)."""
    _check(meta.dim() == 5 and meta.shape[3] == 2, f"meta must be [batch, kv_heads, pages, 2, head_dim], got {tuple(meta.shape)}")
    _check_query(q, meta.shape[1], meta.shape[-1], meta.dtype, meta.device)
    _check_rows(seq_start, seq_end, q.shape[0], q.device)
    _check(gqa_reduction in ("max", "sum"), f"gqa_reduction={gqa_reduction!r}: allowed 'max' or 'sum'")
    return torch.ops.tinyserve.page_scores(q, meta, seq_start, seq_end, page_size, gqa_reduction)


def select_pages(scores, seq_start, seq_end, page_size: int, num_select: int, sink_pages: int = 1, recent_pages: int = 1) -> torch.Tensor:
    """Top ``num_select`` pages ``[batch, kv_heads, num_select]`` int32, ascending, ``-1`` padded."""
    _check(scores.dim() == 3 and scores.dtype == torch.float32, "scores must be float32 [batch, kv_heads, pages]")
    _check_rows(seq_start, seq_end, scores.shape[0], scores.device)
    _check(num_select >= 1, f"num_select={num_select} must be >= 1")
    _check(sink_pages >= 0 and recent_pages >= 0, f"sink_pages={sink_pages} / recent_pages={recent_pages} must be >= 0")
    return torch.ops.tinyserve.select_pages(scores, seq_start, seq_end, page_size, num_select, sink_pages, recent_pages)


def score_and_select(q, meta, seq_start, seq_end, page_size: int, num_select: int, sink_pages: int = 1, recent_pages: int = 1, gqa_reduction: str = "max") -> torch.Tensor:
    """Fused ``page_scores`` + ``select_pages`` (one kernel on CUDA)."""
    _check(meta.dim() == 5 and meta.shape[3] == 2, f"meta must be [batch, kv_heads, pages, 2, head_dim], got {tuple(meta.shape)}")
    _check_query(q, meta.shape[1], meta.shape[-1], meta.dtype, meta.device)
    _check_rows(seq_start, seq_end, q.shape[0], q.device)
    _check(num_select >= 1, f"num_select={num_select} must be >= 1")
    _check(sink_pages >= 0 and recent_pages >= 0, f"sink_pages={sink_pages} / recent_pages={recent_pages} must be >= 0")
    return torch.ops.tinyserve.score_select(q, meta, seq_start, seq_end, page_size, num_select, sink_pages, recent_pages, gqa_reduction)


def sparse_decode_attention(q, k_cache, v_cache, indices, seq_start, seq_end, page_size: int, scale: float, softcap: float = 0.0) -> torch.Tensor:
    """Attention over the selected pages: ``[batch, q_heads, head_dim]`` in ``q``'s dtype."""
    check_cache(k_cache, v_cache)
    _check(k_cache.shape[2] % page_size == 0, f"capacity {k_cache.shape[2]} is not a multiple of page_size {page_size}")
    _check_query(q, k_cache.shape[1], k_cache.shape[-1], k_cache.dtype, k_cache.device)
    _check_rows(seq_start, seq_end, q.shape[0], q.device)
    _check(
        indices.dtype == torch.int32 and indices.dim() == 3 and indices.shape[:2] == k_cache.shape[:2],
        f"indices must be int32 [batch, kv_heads, n], got {indices.dtype} {tuple(indices.shape)}",
    )
    return torch.ops.tinyserve.sparse_decode(q, k_cache, v_cache, indices, seq_start, seq_end, page_size, float(scale), float(softcap or 0.0))


def dense_decode_attention(q, k_cache, v_cache, seq_start, seq_end, page_size: int, scale: float, softcap: float = 0.0,
                           window: int | None = None) -> torch.Tensor:
    """Attention of each row's query over every token of its ``[seq_start, seq_end)``: ``[batch, q_heads,
    head_dim]`` in ``q``'s dtype. The paged flash-decoding kernel of :func:`sparse_decode_attention` walking the
    row's pages in order from its first (``reference.dense_page_list``: no page list is built or read), over
    ``S`` slots: the capacity's pages, or, with ``window`` (the most tokens a range spans, e.g. a sliding
    window), ``window // page_size + 2`` of them (a window rarely starts on a page boundary). On CUDA it
    splits each row's keys over programs, skips blocks past the row's end and reads fp8 storage as stored."""
    check_cache(k_cache, v_cache)
    _check(page_size >= 1 and k_cache.shape[2] % page_size == 0, f"capacity {k_cache.shape[2]} is not a multiple of page_size {page_size}")
    _check(window is None or int(window) >= 1, f"window={window} must be >= 1")
    _check_query(q, k_cache.shape[1], k_cache.shape[-1], k_cache.dtype, k_cache.device)
    _check_rows(seq_start, seq_end, q.shape[0], q.device)
    pages = k_cache.shape[2] // page_size
    slots = pages if window is None else min(pages, int(window) // page_size + 2)
    return torch.ops.tinyserve.dense_decode(q, k_cache, v_cache, seq_start, seq_end, int(page_size), slots, float(scale),
                                            float(softcap or 0.0))


#: ``fused`` values of :func:`quest_decode` -> ``path`` of ``torch.ops.tinyserve.quest_decode``
_DECODE_PATH = {"auto": "auto", False: "split", True: "fused"}


def quest_decode(q, k_cache, v_cache, meta, seq_start, seq_end, page_size: int, num_select: int, sink_pages: int = 1,
                 recent_pages: int = 1, gqa_reduction: str = "max", scale: float | None = None, softcap: float = 0.0,
                 fused: bool | str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One Quest decode step: ``page_scores`` -> ``select_pages`` -> ``sparse_decode_attention`` as one op.
    Returns ``(out [batch, q_heads, head_dim] in q's dtype, indices int32 [batch, kv_heads, num_select])``.

    ``fused`` picks the CUDA kernels, never the result: ``False``, the three kernels one grid after another;
    ``True``, the fused row-chained decode (score and select in one kernel whose last program of a row
    selects it and releases that row's attention programs, so early rows' selection and attention run
    under later rows' scoring); ``"auto"``, the fused chain where it was measured faster (head_dim 128,
    model-dtype storage, a score grid of two waves or more, e.g. Llama-3-8B batch 8 at 64K tokens: see
    ``triton_chain.prefer_fused_chain``), else the three kernels. CPU tensors run the reference."""
    page = check_cache(k_cache, v_cache, meta)
    _check(page == page_size, f"page_size={page_size} but the cache holds pages of {page} tokens")
    _check_query(q, k_cache.shape[1], k_cache.shape[-1], k_cache.dtype, k_cache.device)
    _check_query(q, meta.shape[1], meta.shape[-1], meta.dtype, meta.device)
    _check_rows(seq_start, seq_end, q.shape[0], q.device)
    _check(num_select >= 1, f"num_select={num_select} must be >= 1")
    _check(sink_pages >= 0 and recent_pages >= 0, f"sink_pages={sink_pages} / recent_pages={recent_pages} must be >= 0")
    _check(gqa_reduction in ("max", "sum"), f"gqa_reduction={gqa_reduction!r}: allowed 'max' or 'sum'")
    _check(fused in _DECODE_PATH and isinstance(fused, (bool, str)), f"fused={fused!r}: allowed True, False or 'auto'")
    scale = reference.default_scale(q.shape[-1]) if scale is None else float(scale)
    return torch.ops.tinyserve.quest_decode(q, k_cache, v_cache, meta, seq_start, seq_end, page_size, num_select,
                                            sink_pages, recent_pages, gqa_reduction, scale, float(softcap or 0.0),
                                            _DECODE_PATH[fused])


def record_decode(counts, prev_selected, has_prev, indices, seq_start, seq_end, page_size: int, dense: bool = False) -> None:
    """Add one decode step of a layer to its counters, in place (see :func:`reference.record_decode` for the
    fields): ``counts`` float64 ``[9]``, ``prev_selected`` bool ``[batch, kv_heads, pages]``, ``has_prev`` int32
    ``[batch, kv_heads]``, ``indices`` int32 ``[batch, kv_heads, S]`` (ignored when ``dense``), ``seq_start`` /
    ``seq_end`` int32 ``[batch]``. One kernel on CUDA (:mod:`triton_record`)."""
    _check(counts.dtype == torch.float64 and counts.shape == (len(reference.DECODE_COUNTS),),
           f"counts must be float64 [{len(reference.DECODE_COUNTS)}], got {counts.dtype} {tuple(counts.shape)}")
    _check(prev_selected.dtype == torch.bool and prev_selected.dim() == 3, "prev_selected must be bool [batch, kv_heads, pages]")
    b, h, pages = prev_selected.shape
    _check(has_prev.dtype == torch.int32 and has_prev.shape == (b, h), f"has_prev must be int32 [{b}, {h}]")
    _check(indices.dtype == torch.int32 and indices.dim() == 3 and indices.shape[:2] == (b, h),
           f"indices must be int32 [{b}, {h}, S], got {indices.dtype} {tuple(indices.shape)}")
    _check_rows(seq_start, seq_end, b, counts.device)
    _check(page_size >= 1, f"page_size={page_size} must be >= 1")
    for name, t in (("prev_selected", prev_selected), ("has_prev", has_prev), ("indices", indices)):
        _check(t.device == counts.device, f"{name} is on {t.device}, counts on {counts.device}")
    torch.ops.tinyserve.record_decode(counts, prev_selected, has_prev, indices, seq_start, seq_end, int(page_size), bool(dense))
