"""The HF attention function ``"tinyserve"``: one path for every supported model family.

transformers calls it (through ``AttentionInterface``) with the layer's query ``[batch, q_heads, q_len,
head_dim]`` and what :class:`~tinyserve_patch.cache.TinyServeLayer` returned. A forward pre-hook on each
attention module (installed by :func:`~tinyserve_patch.patch.patch_model`) adds that layer's cache as the
``tinyserve_layer`` keyword.

* Dense: the first forward (prefill: its own keys, HF's mask, HF's SDPA attention), later chunks
  (``q_len > 1``), the first ``dense_layers`` layers, dense configs, caches whose capacity is within the
  budget (no row can exceed it), and caches that are not a TinyServeCache. A decode step over a CUDA
  cache runs the paged flash-decoding op over every page of the row (the sparse path's kernel, all pages
  listed); otherwise, over the left-aligned cache, the mask is the layer's own and the query heads of a KV
  head attend as packed rows (no K/V copy per query head); Gemma 2's soft-capped logits go through the
  same function, eagerly.
* Decode (``q_len == 1``): policy scores -> page selection -> sparse flash-decoding, all through
  ``torch.ops.tinyserve`` (``quest``: one op, ``quest_decode``, whose CUDA kernels ``config.fused``
  picks; :func:`~tinyserve_patch.policies.decode`). A sliding-window layer selects within its window.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import ops
from .policies import decode as sparse_decode, get_policy

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


def _grouped_attention(query, key, value, mask, dropout, scaling, softcap):
    """Dense attention without a copy of K/V per query head: ``[batch, q_len, q_heads, head_dim]``.

    The ``G`` query heads of each KV head are packed as rows, ``query`` ``[batch, kv_heads, G * q_len,
    head_dim]`` (row ``j * q_len + i``: head ``j`` of the group, query ``i``) against ``key`` / ``value``
    ``[batch, kv_heads, kv_len, head_dim]``, and ``mask`` (bool or additive ``[batch | 1, 1, q_len, kv_len]``;
    ``None``: causal, bottom-right aligned) is repeated ``G`` times along the rows. HF's SDPA path would
    instead repeat K/V to every query head whenever there is a mask: ``G x`` the cache, per layer, per call.
    ``softcap``: logits ``softcap * tanh(s / softcap)`` (Gemma 2), computed eagerly in fp32."""
    b, hq, q_len, d = query.shape
    hkv, kv_len = key.shape[1], key.shape[2]
    g = hq // hkv
    if mask is None:
        q_pos = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
        mask = (torch.arange(kv_len, device=query.device)[None, :] <= q_pos)[None, None]
    mask = mask[..., :kv_len]
    rows = query.reshape(b, hkv, g * q_len, d)
    mb = mask.shape[0]
    row_mask = mask[:, :, None].expand(mb, 1, g, q_len, kv_len).reshape(mb, 1, g * q_len, kv_len)
    if softcap:
        logits = torch.matmul(rows, key.transpose(2, 3)).float() * scaling
        logits = softcap * torch.tanh(logits / softcap)
        if row_mask.dtype == torch.bool:
            logits = logits.masked_fill(~row_mask, torch.finfo(logits.dtype).min)
        else:
            logits = logits + row_mask.float()
        out = torch.matmul(torch.softmax(logits, dim=-1).to(value.dtype), value)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            rows, key, value, attn_mask=row_mask, dropout_p=dropout, scale=scaling
        )
    return out.reshape(b, hq, q_len, value.shape[-1]).transpose(1, 2).contiguous()


#: Packed query rows (``G * queries``) per attention call over the whole cache (a later prefill chunk):
#: the ``[batch, 1, rows, capacity]`` mask (and SDPA's additive copy of it) stays small whatever the chunk.
QUERY_ROWS = 512


def _dense_decode_paged(query, layer, sliding_window, scaling, softcap):
    """One query per row (``query`` ``[batch, q_heads, 1, head_dim]``) over every token of the row's range in
    the cache (the last ``sliding_window`` of them for a sliding-window layer), through
    :func:`ops.dense_decode_attention` (the paged flash-decoding op with the row's pages listed):
    ``[batch, 1, q_heads, head_dim]``. SDPA with the layer's mask took a kernel that does not split a row's
    keys (and upcast an fp8 cache whole): at Llama-3-8B B=8/64K on an H200 a dense decode step took 50.7 ms
    that way, 23.6 this way (``benchmarks/results/e2e_h200_synthetic_*.json``)."""
    start, end = layer.row_ranges(sliding_window)
    q = query[:, :, 0, :].to(layer.dtype).contiguous()
    out = ops.dense_decode_attention(q, layer.keys, layer.values, start, end, layer.page_size, float(scaling),
                                     float(softcap or 0.0), window=sliding_window or None)
    return out.to(query.dtype)[:, None]


def _dense(module, query, key, value, attention_mask, dropout, scaling, softcap, sliding_window, layer, kwargs):
    """Dense attention: ``[batch, q_len, q_heads, head_dim]``. The first forward (its own keys, HF's mask)
    goes through HF's SDPA attention (flash with ``is_causal`` when there is no padding); a decode step over a
    CUDA cache through :func:`_dense_decode_paged`; any other forward over the left-aligned cache (a later
    prefill chunk, a CPU decode step) with the layer's own mask, :func:`_grouped_attention` running
    ``QUERY_ROWS // G`` queries at a time."""
    if layer is None or layer.first_forward:
        if softcap:
            return _grouped_attention(query, key, value, attention_mask, dropout, scaling, softcap), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    q_len = query.shape[2]
    if q_len == 1 and query.is_cuda and not dropout:
        return _dense_decode_paged(query, layer, sliding_window, scaling, softcap), None
    kv_len = None
    if q_len > 1 and not torch.compiler.is_compiling():
        # a later prefill chunk (eager): attend over the longest row written so far, not the whole capacity
        # (one host sync per layer and chunk; halves a chunked prefill's attention work on average)
        kv_len = int(layer.row_lengths().max())
        key, value = key[:, :, :kv_len], value[:, :, :kv_len]
    if key.dtype != query.dtype:  # an fp8 cache: attend in the model's dtype (only the rows' written part)
        key, value = key.to(query.dtype), value.to(query.dtype)
    step = max(1, QUERY_ROWS // (query.shape[1] // key.shape[1]))
    blocks = [
        _grouped_attention(
            query[:, :, s : s + step], key, value,
            layer.attention_mask(q_len, sliding_window, (s, min(q_len, s + step)), kv_len), dropout, scaling, softcap,
        )
        for s in range(0, q_len, step)
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
            layer.stats.record_dense(start, end)
        return out

    config = state.config
    q = query[:, :, 0, :].to(layer.dtype).contiguous()  # [batch, q_heads, head_dim]
    seq_start, seq_end = layer.row_ranges(sliding_window)
    out, indices = sparse_decode(q, layer, seq_start, seq_end, config, float(scaling), float(softcap or 0.0))
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
