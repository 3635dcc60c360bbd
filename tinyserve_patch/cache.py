"""TinyServeCache: a preallocated, page-aligned KV cache that keeps per-page key bounding boxes.

Per decoder layer (one :class:`TinyServeLayer`), allocated lazily on the layer's own device at the first
update (so ``device_map="auto"`` places each layer's cache beside its weights):

* ``keys``, ``values``: ``[batch, kv_heads, capacity, head_dim]``, ``capacity`` a multiple of ``page_size``
  (the paged view ``[batch, kv_heads, pages, page_size, head_dim]`` is free), in the model's dtype or,
  with ``SparseConfig.kv_cache_dtype="fp8_e4m3"``, in ``float8_e4m3fn`` (``dtype`` stays the model's);
* ``meta``: ``[batch, kv_heads, pages, 2, head_dim]`` element-wise min / max of each page's keys, updated
  in the same kernel that appends the keys (``torch.ops.tinyserve.append_kv``), in the model's dtype or,
  with ``SparseConfig.page_meta_dtype="fp8_e4m3"``, in ``float8_e4m3fn`` rounded outward;
* ``cumulative_length``: 0-d int64 device tensor, the number of positions the model has fed (padding
  included: HF's positions);
* ``row_start``: ``[batch]`` int32, each row's left padding, read off the first forward's attention mask.

Rows are stored left-aligned: row ``b``'s token at HF position ``t`` lives at ``t - row_start[b]``, so a
row's pages start at its first real token and a padded row is laid out exactly as if it ran alone (its
pages, metadata and selections are the same). Row ``b`` holds ``cumulative_length - row_start[b]`` tokens.

Every buffer has a static address, so a decode step replays under CUDA graphs and ``generate()``
auto-compiles it as it does for HF's static cache.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import ops
from .ops import reference
from .stats import LayerStats


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


class TinyServeLayer(CacheLayerMixin):
    """One decoder layer's KV cache with page metadata (see the module docstring for layouts)."""

    is_compileable = True
    is_sliding = False
    is_croppable = True
    supports_early_init = True

    def __init__(
        self, capacity: int, page_size: int, kv_dtype: torch.dtype | None = None, meta_dtype: torch.dtype | None = None, **kwargs
    ):
        super().__init__()
        self.kv_dtype = kv_dtype  # storage of keys / values; None: the model's dtype
        self.meta_dtype = meta_dtype  # storage of the page min / max; None: the model's dtype
        if capacity <= 0:
            raise ValueError(f"cache capacity must be positive, got {capacity}")
        self.page_size = page_size
        self.capacity = math.ceil(capacity / page_size) * page_size
        self.max_cache_len = self.capacity
        self.cumulative_length = torch.tensor(0, dtype=torch.int64)
        self.meta: torch.Tensor | None = None
        self.row_start: torch.Tensor | None = None
        self.stats: LayerStats | None = None
        self._host_length = 0  # exact while running eagerly; only used for eager overflow checks
        self.observed = False  # row_start read off the first forward's mask yet
        self.first_forward = False  # the last update was the first (its attention sees only its own keys)

    # -------------------------------------------------------------------------------- allocation
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[-1] != value_states.shape[-1]:
            raise ValueError("tinyserve needs equal key and value head dims")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.head_dim = key_states.shape[-1]
        shape = (self.batch_size, self.num_heads, self.capacity, self.head_dim)
        storage = self.kv_dtype or self.dtype
        self.keys = torch.zeros(shape, dtype=storage, device=self.device)
        self.values = torch.zeros(shape, dtype=storage, device=self.device)
        pages = self.capacity // self.page_size
        self.meta = torch.zeros(
            (self.batch_size, self.num_heads, pages, 2, self.head_dim), dtype=self.meta_dtype or self.dtype, device=self.device
        )
        self.cumulative_length = self.cumulative_length.to(self.device)
        if self.row_start is None:  # no mask was observed (the layer was fed directly): no padding
            self.row_start = torch.zeros(self.batch_size, dtype=torch.int32, device=self.device)
        self.row_start = self.row_start.to(self.device)
        self.stats = LayerStats(self.batch_size, self.num_heads, pages, self.device)
        if not _is_compiling():
            for t in (self.keys, self.values, self.meta, self.cumulative_length, self.row_start, *self.stats.tensors()):
                torch._dynamo.mark_static_address(t)
            # the decode kernels' counters, now: a first decode step run by a CUDA-graph warm-up must not allocate
            ops.reserve_counters(self.device, self.batch_size * self.num_heads)
        self.is_initialized = True

    # -------------------------------------------------------------------------------- writes
    def observe_padding(self, attention_mask: torch.Tensor | None, batch: int, q_len: int, device) -> None:
        """Read the rows' left padding off a prefill (chunk)'s mask, before its keys are written.

        ``attention_mask``: HF's 4D mask ``[batch, 1, q, kv]`` (bool, or additive float) of this forward,
        whose queries sit at HF positions ``cumulative_length + i``; ``None`` means no padding. Token ``i``
        is real iff it attends to itself (the diagonal). A row keeps its ``row_start`` once it has a real
        token; a row that so far held only padding (left padding longer than a prefill chunk) takes the
        first real position of this chunk, or the chunk's end if it has none yet."""
        offset = self.cumulative_length.to(device)
        pos = torch.arange(q_len, device=device) + offset
        if attention_mask is None:
            first = offset.expand(batch)
        else:
            mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
            if mask.dim() == 4:  # [batch, 1, q, kv]: the diagonal at each query's own position
                real = mask[:, 0, torch.arange(q_len, device=device), pos.clamp(max=mask.shape[-1] - 1)]
            else:  # a 2D padding mask [batch, positions]
                real = mask[:, -q_len:].bool()
            none = pos.new_full((), 1 << 30)
            first = torch.where(real.to(device), pos, none).amin(dim=-1)
            first = torch.where(first == none, offset + q_len, first)
        if self.row_start is None:
            self.row_start = torch.zeros(batch, dtype=torch.int32, device=device)
        pending = self.row_start >= offset  # rows with no real token so far
        # in place: the buffer keeps its static address (CUDA graphs) across prefill chunks
        self.row_start.copy_(torch.where(pending, first.to(torch.int32), self.row_start))
        self.observed = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[batch, kv_heads, n, head_dim]`` keys/values (each row at its own left-aligned position).

        Returns the incoming keys/values at the first forward (the prefill attends to them alone, as with
        HF's dynamic cache), afterwards the full ``keys``/``values`` buffers."""
        first_forward = not self.is_initialized
        self.first_forward = first_forward
        if first_forward:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if not _is_compiling():
            if self._host_length + n > self.capacity:
                raise ValueError(
                    f"TinyServeCache overflow: {self._host_length} + {n} tokens > capacity {self.capacity}; "
                    "create the cache with a larger max_length"
                )
            self._host_length += n
        pos = (self.cumulative_length - self.row_start).to(torch.int32)
        ops.append_kv(self.keys, self.values, self.meta, key_states.to(self.dtype), value_states.to(self.dtype), pos)
        self.cumulative_length.add_(n)
        if first_forward:
            return key_states, value_states
        return self.keys, self.values

    def row_lengths(self) -> torch.Tensor:
        """``[batch]`` int32: tokens held by each row (at least 1 once anything was written)."""
        return (self.cumulative_length - self.row_start).clamp(min=1).to(torch.int32)

    def row_ranges(self, sliding_window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(seq_start, seq_end)`` ``[batch]`` int32: the tokens a decode query attends to (the last
        ``sliding_window`` of them for a sliding-window layer)."""
        end = self.row_lengths()
        start = torch.zeros_like(end)
        if sliding_window:
            start = (end - int(sliding_window)).clamp(min=0)
        return start, end

    def attention_mask(
        self, q_len: int, sliding_window: int | None = None, rows: tuple[int, int] | None = None, kv_len: int | None = None
    ) -> torch.Tensor:
        """``[batch, 1, q_len, kv_len]`` bool over the left-aligned buffers (their first ``kv_len`` positions,
        default the capacity) for the last ``q_len`` tokens (causal; sliding window if given);
        ``rows=(s, e)``: only queries ``s:e`` of them."""
        s, e = rows or (0, q_len)
        end = self.row_lengths()[:, None, None]  # [b, 1, 1]
        q_pos = end - q_len + torch.arange(s, e, device=end.device)[None, :, None]  # [b, e - s, 1]
        k_pos = torch.arange(self.capacity if kv_len is None else kv_len, device=end.device)[None, None, :]
        mask = k_pos <= q_pos
        if sliding_window:
            mask &= k_pos > q_pos - int(sliding_window)
        # a padding query of a chunk (negative position) attends to position 0 rather than to nothing
        # (an all-masked row is NaN in SDPA); its output is never used
        mask |= (q_pos < 0) & (k_pos == 0)
        return mask[:, None]

    # -------------------------------------------------------------------------------- HF Cache API
    def get_mask_sizes(self, query_length: int = 0, *args, **kwargs) -> tuple[int, int]:
        # The first forward attends to its own keys (HF builds a [q, q] mask, as for a dynamic cache);
        # later masks are not read (the left-aligned layout brings its own), only sized statically.
        return (self.capacity, 0) if self.is_initialized else (int(query_length), 0)

    def get_seq_length(self, *args, **kwargs):
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.capacity

    def get_max_cache_shape(self) -> int:  # transformers < 5.20 name
        return self.capacity

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
            self.meta.zero_()
            self.stats.reset()
        self.cumulative_length.zero_()
        self._host_length = 0
        self.observed = False
        self.row_start = None
        self.is_initialized = False

    def _select_rows(self, index: torch.Tensor) -> None:
        index = index.to(self.device)
        for name in ("keys", "values", "meta", "row_start"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.batch_size = self.keys.shape[0]
        self.stats = LayerStats(self.batch_size, self.num_heads, self.meta.shape[2], self.device)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: rows follow their beams (same batch size, buffers updated in place)."""
        if not self.is_initialized:
            return
        index = beam_idx.to(self.device)
        for t in (self.keys, self.values, self.meta, self.row_start, self.stats.prev_selected, self.stats.has_prev):
            t.copy_(t.index_select(0, index))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_rows(torch.arange(self.batch_size, device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._select_rows(indices)

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` HF positions (negative: drop that many); each row's last kept page
        has its metadata rebuilt from its remaining keys."""
        if not self.is_initialized:
            return
        length = int(self.cumulative_length)
        keep = length + max_length if max_length < 0 else min(max_length, length)
        if keep >= length:
            return
        self.cumulative_length.fill_(keep)
        self._host_length = keep
        for row, n in enumerate(self.row_lengths().tolist()):
            if n % self.page_size:
                page = n // self.page_size
                block = self.keys[row, :, page * self.page_size : n]
                self.meta[row, :, page, 0], self.meta[row, :, page, 1] = reference.page_bounds(block, 1, self.meta.dtype)


class TinyServeCache(Cache):
    """A :class:`transformers.Cache` of :class:`TinyServeLayer`, one per decoder layer.

    Args:
        num_layers: decoder layers of the model.
        max_length: the most tokens a row will hold (prompt + new tokens, padding included).
        page_size: tokens per page (from the model's :class:`SparseConfig`).
        kv_dtype: storage dtype of keys / values (``SparseConfig.kv_storage_dtype``); None: the model's.
        meta_dtype: storage dtype of the page min / max (``SparseConfig.meta_storage_dtype``); None: the model's.
    """

    def __init__(
        self, num_layers: int, max_length: int, page_size: int, kv_dtype: torch.dtype | None = None, meta_dtype: torch.dtype | None = None
    ):
        super().__init__(layers=[TinyServeLayer(max_length, page_size, kv_dtype, meta_dtype) for _ in range(num_layers)])
        self.page_size = page_size
        self.capacity = self.layers[0].capacity if self.layers else 0

    def get_seq_length(self, layer_idx: int = 0):
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    def get_mask_sizes(self, query_length: int = 0, layer_idx: int = 0, *args, **kwargs) -> tuple[int, int]:
        layer = self.layers[min(layer_idx, len(self.layers) - 1)]
        return layer.get_mask_sizes(query_length)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.capacity

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.capacity

    @property
    def max_cache_len(self) -> int:
        return self.capacity

    @property
    def max_batch_size(self) -> int:
        return self.layers[0].batch_size if self.layers and self.layers[0].is_initialized else -1

    @property
    def is_compileable(self) -> bool:
        return True


def num_decoder_layers(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


def make_cache(model, batch_size: int | None = None, max_length: int = 0, page_size: int | None = None) -> TinyServeCache:
    """A :class:`TinyServeCache` for ``model`` holding up to ``max_length`` tokens per row.

    ``batch_size`` is informative (buffers are sized at the first forward); ``page_size`` defaults to the
    patched model's config."""
    from .patch import get_config

    config = get_config(model)
    if page_size is None:
        page_size = config.page_size if config is not None else 16
    if max_length <= 0:
        raise ValueError(f"make_cache needs max_length > 0 (prompt + new tokens), got {max_length}")
    kv_dtype = config.kv_storage_dtype if config is not None else None
    meta_dtype = config.meta_storage_dtype if config is not None else None
    cache = TinyServeCache(num_decoder_layers(model), max_length, page_size, kv_dtype, meta_dtype)
    state = getattr(model, "_tinyserve_state", None)
    if state is not None:
        state.last_cache = cache
    return cache
