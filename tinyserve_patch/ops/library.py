"""``torch.ops.tinyserve.*``: custom-op definitions, fake (meta) implementations and per-device kernels.

CPU tensors run the pure-PyTorch reference (``reference.py``); CUDA tensors run the Triton kernels (one
file per kernel). The fake implementations give ``torch.compile(fullgraph=True)`` the output shapes, and
``append_kv`` and ``record_decode`` declare their in-place mutations, so the decode step traces with no graph break and replays
under CUDA graphs.
"""

from __future__ import annotations

import torch

from . import reference as ref

_NS = "tinyserve"


def _triton(name: str):
    """Import a Triton launcher lazily (Triton is only needed for CUDA tensors)."""
    if name == "append_kv":
        from .triton_append import append_kv_triton as fn
    elif name == "page_scores":
        from .triton_score import page_scores_triton as fn
    elif name == "select_pages":
        from .triton_select import select_pages_triton as fn
    elif name == "sparse_decode":
        from .triton_decode import sparse_decode_attention_triton as fn
    elif name == "score_select":
        from .triton_fused_select import score_and_select_triton as fn
    elif name == "quest_decode":
        from .triton_chain import quest_decode_triton as fn
    elif name == "record_decode":
        from .triton_record import record_decode_triton as fn
    else:  # pragma: no cover - programming error
        raise KeyError(name)
    return fn


# ---------------------------------------------------------------------------------------------- append_kv


@torch.library.custom_op(f"{_NS}::append_kv", mutates_args=("k_cache", "v_cache", "meta"))
def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    pos: torch.Tensor,
) -> None:
    ref.append_kv(k_cache, v_cache, meta, k_new, v_new, pos)


@append_kv.register_kernel("cuda")
def _append_kv_cuda(k_cache, v_cache, meta, k_new, v_new, pos) -> None:
    _triton("append_kv")(k_cache, v_cache, meta, k_new, v_new, pos)


@append_kv.register_fake
def _append_kv_fake(k_cache, v_cache, meta, k_new, v_new, pos) -> None:
    return None


# ---------------------------------------------------------------------------------------------- page_scores


@torch.library.custom_op(f"{_NS}::page_scores", mutates_args=())
def page_scores(
    q: torch.Tensor,
    meta: torch.Tensor,
    seq_start: torch.Tensor,
    seq_end: torch.Tensor,
    page_size: int,
    gqa_reduction: str,
) -> torch.Tensor:
    return ref.page_scores(q, meta, seq_start, seq_end, page_size, gqa_reduction)


@page_scores.register_kernel("cuda")
def _page_scores_cuda(q, meta, seq_start, seq_end, page_size, gqa_reduction):
    return _triton("page_scores")(q, meta, seq_start, seq_end, page_size, gqa_reduction)


@page_scores.register_fake
def _page_scores_fake(q, meta, seq_start, seq_end, page_size, gqa_reduction):
    b, hkv, pages = meta.shape[:3]
    return q.new_empty((b, hkv, pages), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- select_pages


@torch.library.custom_op(f"{_NS}::select_pages", mutates_args=())
def select_pages(
    scores: torch.Tensor,
    seq_start: torch.Tensor,
    seq_end: torch.Tensor,
    page_size: int,
    num_select: int,
    sink_pages: int,
    recent_pages: int,
) -> torch.Tensor:
    return ref.select_pages(scores, seq_start, seq_end, page_size, num_select, sink_pages, recent_pages)


@select_pages.register_kernel("cuda")
def _select_pages_cuda(scores, seq_start, seq_end, page_size, num_select, sink_pages, recent_pages):
    return _triton("select_pages")(scores, seq_start, seq_end, page_size, num_select, sink_pages, recent_pages)


@select_pages.register_fake
def _select_pages_fake(scores, seq_start, seq_end, page_size, num_select, sink_pages, recent_pages):
    b, hkv = scores.shape[:2]
    return scores.new_empty((b, hkv, num_select), dtype=torch.int32)


# ---------------------------------------------------------------------------------------------- score_select


@torch.library.custom_op(f"{_NS}::score_select", mutates_args=())
def score_select(
    q: torch.Tensor,
    meta: torch.Tensor,
    seq_start: torch.Tensor,
    seq_end: torch.Tensor,
    page_size: int,
    num_select: int,
    sink_pages: int,
    recent_pages: int,
    gqa_reduction: str,
) -> torch.Tensor:
    scores = ref.page_scores(q, meta, seq_start, seq_end, page_size, gqa_reduction)
    return ref.select_pages(scores, seq_start, seq_end, page_size, num_select, sink_pages, recent_pages)


@score_select.register_kernel("cuda")
def _score_select_cuda(q, meta, seq_start, seq_end, page_size, num_select, sink_pages, recent_pages, gqa_reduction):
    return _triton("score_select")(
        q, meta, seq_start, seq_end, page_size, num_select, sink_pages, recent_pages, gqa_reduction
    )


@score_select.register_fake
def _score_select_fake(q, meta, seq_start, seq_end, page_size, num_select, sink_pages, recent_pages, gqa_reduction):
    b, hkv = meta.shape[:2]
    return q.new_empty((b, hkv, num_select), dtype=torch.int32)


# ---------------------------------------------------------------------------------------------- sparse_decode


@torch.library.custom_op(f"{_NS}::sparse_decode", mutates_args=())
def sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indices: torch.Tensor,
    seq_start: torch.Tensor,
    seq_end: torch.Tensor,
    page_size: int,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    return ref.sparse_decode_attention(q, k_cache, v_cache, indices, seq_start, seq_end, page_size, scale, softcap)


@sparse_decode.register_kernel("cuda")
def _sparse_decode_cuda(q, k_cache, v_cache, indices, seq_start, seq_end, page_size, scale, softcap):
    return _triton("sparse_decode")(q, k_cache, v_cache, indices, seq_start, seq_end, page_size, scale, softcap)


@sparse_decode.register_fake
def _sparse_decode_fake(q, k_cache, v_cache, indices, seq_start, seq_end, page_size, scale, softcap):
    return torch.empty_like(q)


# ---------------------------------------------------------------------------------------------- dense_decode


@torch.library.custom_op(f"{_NS}::dense_decode", mutates_args=())
def dense_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_start: torch.Tensor,
    seq_end: torch.Tensor,
    page_size: int,
    slots: int,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    indices = ref.dense_page_list(seq_start, seq_end, page_size, slots, k_cache.shape[1])
    return ref.sparse_decode_attention(q, k_cache, v_cache, indices, seq_start, seq_end, page_size, scale, softcap)


@dense_decode.register_kernel("cuda")
def _dense_decode_cuda(q, k_cache, v_cache, seq_start, seq_end, page_size, slots, scale, softcap):
    return _triton("sparse_decode")(q, k_cache, v_cache, None, seq_start, seq_end, page_size, scale, softcap, slots=slots)


@dense_decode.register_fake
def _dense_decode_fake(q, k_cache, v_cache, seq_start, seq_end, page_size, slots, scale, softcap):
    return torch.empty_like(q)


# ---------------------------------------------------------------------------------------------- quest_decode


@torch.library.custom_op(f"{_NS}::quest_decode", mutates_args=())
def quest_decode(
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
    softcap: float,
    path: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = ref.page_scores(q, meta, seq_start, seq_end, page_size, gqa_reduction)
    indices = ref.select_pages(scores, seq_start, seq_end, page_size, num_select, sink_pages, recent_pages)
    out = ref.sparse_decode_attention(q, k_cache, v_cache, indices, seq_start, seq_end, page_size, scale, softcap)
    return out, indices


@quest_decode.register_kernel("cuda")
def _quest_decode_cuda(q, k_cache, v_cache, meta, seq_start, seq_end, page_size, num_select, sink_pages, recent_pages,
                       gqa_reduction, scale, softcap, path):
    return _triton("quest_decode")(q, k_cache, v_cache, meta, seq_start, seq_end, page_size, num_select, sink_pages,
                                   recent_pages, gqa_reduction, scale, softcap, path)


@quest_decode.register_fake
def _quest_decode_fake(q, k_cache, v_cache, meta, seq_start, seq_end, page_size, num_select, sink_pages, recent_pages,
                       gqa_reduction, scale, softcap, path):
    b, hkv = meta.shape[:2]
    return torch.empty_like(q), q.new_empty((b, hkv, num_select), dtype=torch.int32)


# ---------------------------------------------------------------------------------------------- record_decode


@torch.library.custom_op(f"{_NS}::record_decode", mutates_args=("counts", "prev_selected", "has_prev"))
def record_decode(
    counts: torch.Tensor,
    prev_selected: torch.Tensor,
    has_prev: torch.Tensor,
    indices: torch.Tensor,
    seq_start: torch.Tensor,
    seq_end: torch.Tensor,
    page_size: int,
    dense: bool,
) -> None:
    ref.record_decode(counts, prev_selected, has_prev, indices, seq_start, seq_end, page_size, dense)


@record_decode.register_kernel("cuda")
def _record_decode_cuda(counts, prev_selected, has_prev, indices, seq_start, seq_end, page_size, dense) -> None:
    _triton("record_decode")(counts, prev_selected, has_prev, indices, seq_start, seq_end, page_size, dense)


@record_decode.register_fake
def _record_decode_fake(counts, prev_selected, has_prev, indices, seq_start, seq_end, page_size, dense) -> None:
    return None
