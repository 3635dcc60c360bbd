"""Page-selection policies behind one interface.

A policy maps the decode query and a layer's cache to selected pages ``[batch, kv_heads, budget_pages]``
(int32, ascending, ``-1`` padded). Every policy forces the sink and recent pages and selects every page of
a row whose valid length is within the budget (exact attention); they differ only in how the remaining
pages are ranked.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import ops
from .config import SparseConfig
from .ops import reference

# (q [b, hq, d], layer, seq_start [b], seq_end [b], config) -> indices [b, hkv, n]
Policy = Callable[[torch.Tensor, object, torch.Tensor, torch.Tensor, SparseConfig], torch.Tensor]


def _select(scores, seq_start, seq_end, config: SparseConfig) -> torch.Tensor:
    return ops.select_pages(
        scores, seq_start, seq_end, config.page_size, config.budget_pages, config.sink_pages, config.recent_pages
    )


def quest(q, layer, seq_start, seq_end, config: SparseConfig) -> torch.Tensor:
    """Upper bound sum_d max(q_d*min_d, q_d*max_d) from the page metadata (Quest)."""
    if config.fused is True:
        return ops.score_and_select(
            q, layer.meta, seq_start, seq_end, config.page_size, config.budget_pages,
            config.sink_pages, config.recent_pages, config.gqa_reduction,
        )
    scores = ops.page_scores(q, layer.meta, seq_start, seq_end, config.page_size, config.gqa_reduction)
    return _select(scores, seq_start, seq_end, config)


def oracle(q, layer, seq_start, seq_end, config: SparseConfig) -> torch.Tensor:
    """Exact top pages by max q.k (reads every key: a yardstick, not a speed-up)."""
    scores = reference.oracle_page_scores(q, layer.keys.to(layer.dtype), seq_start, seq_end, config.page_size, config.gqa_reduction)
    return _select(scores, seq_start, seq_end, config)


def streaming(q, layer, seq_start, seq_end, config: SparseConfig) -> torch.Tensor:
    """StreamingLLM: sink pages plus the most recent pages that fit the budget."""
    scores = reference.streaming_page_scores(seq_start, seq_end, layer.meta.shape[1], layer.meta.shape[2], config.page_size)
    return _select(scores, seq_start, seq_end, config)


def random(q, layer, seq_start, seq_end, config: SparseConfig) -> torch.Tensor:
    """Random pages (seeded hash), sink and recent pages kept."""
    scores = reference.random_page_scores(
        seq_start, seq_end, layer.meta.shape[1], layer.meta.shape[2], config.page_size, config.seed
    )
    return _select(scores, seq_start, seq_end, config)


POLICIES: dict[str, Policy] = {"quest": quest, "oracle": oracle, "streaming": streaming, "random": random}


def decode(q, layer, seq_start, seq_end, config: SparseConfig, scale: float, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One sparse decode step of ``config.policy`` over ``layer``'s cache: ``(attention [b, hq, d] in q's
    dtype, selected pages [b, hkv, n])``. ``quest`` runs as one op (``ops.quest_decode``: scoring,
    selection and attention, whose CUDA kernels ``config.fused`` picks); the other policies select, then
    attend."""
    if config.policy == "quest":
        return ops.quest_decode(
            q, layer.keys, layer.values, layer.meta, seq_start, seq_end, config.page_size, config.budget_pages,
            config.sink_pages, config.recent_pages, config.gqa_reduction, scale, softcap, config.fused,
        )
    indices = get_policy(config.policy)(q, layer, seq_start, seq_end, config)
    out = ops.sparse_decode_attention(q, layer.keys, layer.values, indices, seq_start, seq_end, config.page_size, scale, softcap)
    return out, indices


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}") from None
