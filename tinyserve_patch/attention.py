"""The HF attention function ``"tinyserve"``: one path for every supported model family.

transformers calls it (through ``AttentionInterface``) with the layer's query ``[batch, q_heads, q_len,
head_dim]`` and what :class:`~tinyserve_patch.cache.TinyServeLayer` returned. A forward pre-hook on each
attention module (installed by :func:`~tinyserve_patch.patch.patch_model`) adds that layer's cache as the
``tinyserve_layer`` keyword.

* Dense, through HF's SDPA attention (an eager soft-capped attention for Gemma 2): the first forward
  (prefill: its own keys, HF's mask), later chunks (``q_len > 1``), the first ``dense_layers`` layers,
  dense configs, caches whose capacity is within the budget (no row can exceed it), and caches that are
  not a TinyServeCache. Over the left-aligned cache the mask is the layer's own.
* Decode (``q_len == 1``): policy scores -> page selection -> sparse flash-decoding, all through
  ``torch.ops.tinyserve``. A sliding-window layer selects within its window.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import ops
from .policies import get_policy

_warned_foreign_cache = False


def _warn_foreign_cache() -> None:
    """Once per process: a patched model decoding without a TinyServeCache attends densely."""
    global _warned_foreign_cache
    if _warned_foreign_cache or torch.compiler.is_compiling():
        return
    _warned_foreign_cache = True
    import warnings

    warnings.warn(
        "tinyserve: a decode step ran without a TinyServeCache (e.g. a DynamicCache), so it attended densely; "
        "generate() allocates one itself, manual loops use tinyserve_patch.make_cache(model, batch, max_length)",
        stacklevel=3,
    )

ATTN_IMPLEMENTATION = "tinyserve"


def _softcapped_attention(module, query, key, value, attention_mask, scaling, softcap):
    """Dense attention with logit soft-capping (Gemma 2): ``[batch, q_len, q_heads, head_dim]``."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling
    logits = softcap * torch.tanh(logits / softcap)
    if attention_mask is None:  # HF dropped a plain causal mask (SDPA would use is_causal)
        q_len, kv_len = logits.shape[-2:]
        q_pos = torch.arange(q_len, device=logits.device)[:, None] + (kv_len - q_len)
        attention_mask = torch.arange(kv_len, device=logits.device)[None, :] <= q_pos
    if attention_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attention_mask, torch.finfo(logits.dtype).min)
    else:
        logits = logits + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(logits.float(), dim=-1).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


#: Queries per dense attention call over the whole cache (a later prefill chunk): its ``[batch, 1, q,
#: capacity]`` mask (and SDPA's additive copy of it) then stays small whatever the chunk size.
QUERY_BLOCK = 256


def _dense(module, query, key, value, attention_mask, dropout, scaling, softcap, sliding_window, layer, kwargs):
    """Dense attention: ``[batch, q_len, q_heads, head_dim]``. Over the left-aligned cache (any forward but
    the first) the mask is the layer's own, built and applied ``QUERY_BLOCK`` queries at a time."""
    def attend(q, mask):
        if softcap:
            return _softcapped_attention(module, q, key, value, mask, scaling, softcap)
        return sdpa_attention_forward(module, q, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)[0]

    if layer is None or layer.first_forward:
        return attend(query, attention_mask), None
    q_len = query.shape[2]
    blocks = [
        attend(query[:, :, s : s + QUERY_BLOCK], layer.attention_mask(q_len, sliding_window, (s, min(q_len, s + QUERY_BLOCK))))
        for s in range(0, q_len, QUERY_BLOCK)
    ]
    return (blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)), None


def _use_sparse(state, layer, module, q_len: int, sliding_window) -> bool:
    if state is None or layer is None or q_len != 1 or layer.first_forward:
        return False
    config = state.config
    if config.is_dense or getattr(module, "layer_idx", 0) < config.dense_layers:
        return False
    if layer.capacity <= config.token_budget:
        return False  # no row can ever exceed the budget: the exact dense path
    if sliding_window and int(sliding_window) <= config.token_budget:
        return False  # the window itself is within the budget
    return True


def tinyserve_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
):
    """HF attention interface: returns ``(attn_output [batch, q_len, q_heads, head_dim], None)``."""
    layer = kwargs.pop("tinyserve_layer", None)
    state = getattr(module, "_tinyserve_state", None)
    q_len = query.shape[2]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if layer is None and state is not None and q_len == 1:
        _warn_foreign_cache()
    if not _use_sparse(state, layer, module, q_len, sliding_window):
        out = _dense(module, query, key, value, attention_mask, dropout, scaling, softcap, sliding_window, layer, kwargs)
        if layer is not None and q_len == 1 and state is not None and state.config.collect_stats:
            start, end = layer.row_ranges(sliding_window)
            layer.stats.record_dense(start, end, layer.num_heads)
        return out

    config = state.config
    q = query[:, :, 0, :].to(layer.dtype).contiguous()  # [batch, q_heads, head_dim]
    seq_start, seq_end = layer.row_ranges(sliding_window)
    indices = get_policy(config.policy)(q, layer, seq_start, seq_end, config)
    out = ops.sparse_decode_attention(
        q, layer.keys, layer.values, indices, seq_start, seq_end, config.page_size, float(scaling), float(softcap or 0.0)
    )
    if config.collect_stats:
        oracle = get_policy("oracle")(q, layer, seq_start, seq_end, config) if config.track_recall else None
        layer.stats.record_sparse(indices, seq_start, seq_end, config.page_size, oracle)
    return out.to(query.dtype)[:, None], None


def register() -> None:
    """Register ``"tinyserve"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, tinyserve_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
