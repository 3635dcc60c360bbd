"""Pure-PyTorch reference of every step of query-aware page selection: the ground truth and the CPU path.

Layouts (shared by the Triton kernels):

* ``k_cache``, ``v_cache``: ``[batch, kv_heads, capacity, head_dim]``; ``capacity`` is a multiple of
  ``page_size``, so the paged view is ``[batch, kv_heads, pages, page_size, head_dim]`` with no copy.
* ``meta``: ``[batch, kv_heads, pages, 2, head_dim]``; ``meta[..., 0, :]`` is the element-wise minimum
  and ``meta[..., 1, :]`` the maximum of the keys written to that page so far, in the model's dtype
  (exact) or in ``float8_e4m3fn`` (:func:`page_bounds`: the minimum rounded down and the maximum rounded
  up on the fp8 grid, so the box still contains every key and the Quest score stays an upper bound).
  The cache holds K/V in the model's dtype or in ``float8_e4m3fn`` (:func:`to_storage`: saturated,
  rounded to nearest); the metadata then bounds the stored, rounded keys, and attention upcasts.
* ``q``: the decode query, ``[batch, q_heads, head_dim]``; query head ``h`` reads KV head
  ``h // (q_heads // kv_heads)`` (HF ``repeat_kv`` order).
* ``seq_start``, ``seq_end``: ``[batch]`` int32; row ``b`` holds valid tokens at positions
  ``seq_start[b] <= t < seq_end[b]`` (left padding sits before ``seq_start``; positions start at 0, so a
  negative ``seq_start`` counts as 0). A page is valid for a row when it holds at least one valid token.
* ``indices``: ``[batch, kv_heads, num_select]`` int32 page numbers, ascending, ``-1`` padded.

GQA rule: each KV head makes one selection shared by its group of query heads. The group's per-head
scores are reduced with ``max`` (default: a page is kept if it matters to any head of the group) or
``sum`` (the upper bound of the group's summed logits).
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


#: Storage dtypes of a quantised K/V cache or page metadata.
FP8_DTYPES = (torch.float8_e4m3fn,)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def to_storage(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in the cache's storage ``dtype``; fp8: saturated to +-448 first, then rounded to nearest."""
    if dtype in FP8_DTYPES:
        return x.float().clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


def fp8_round_directed(x: torch.Tensor, up: bool) -> torch.Tensor:
    """``x`` (any float dtype) as ``float8_e4m3fn``, rounded up (toward +inf) or down (toward -inf) on the
    fp8 grid after saturation to +-448: the nearest fp8 value ``>= x`` (``up``) or ``<= x``. Values beyond
    +-448 saturate (the only case where the result does not bound ``x``; keys that large are not seen in
    practice). A zero becomes +0.0 (so a min or max that is a zero of either sign, whichever a reduction
    returned, gives the same bits); a value that rounds toward zero from below becomes -0.0."""
    xf = x.float().clamp(-FP8_MAX, FP8_MAX)
    xf = torch.where(xf == 0, 0.0, xf)
    r = xf.to(torch.float8_e4m3fn)  # nearest (even); then one step if it went the wrong way
    rf = r.float()
    bits = r.view(torch.uint8).to(torch.int16)
    sign, mag = bits & 0x80, bits & 0x7F
    if up:
        wrong = rf < xf
        # from a negative value one step toward zero (-2^-9 -> -0.0), from a zero to +2^-9, else one up
        stepped = torch.where(sign.bool() & (mag > 0), bits - 1, torch.where(mag == 0, torch.ones_like(bits), bits + 1))
    else:
        wrong = rf > xf
        # from a positive value one step toward zero (2^-9 -> +0.0), from a zero to -2^-9, else one down
        stepped = torch.where(~sign.bool() & (mag > 0), bits - 1, torch.where(mag == 0, torch.full_like(bits, 0x81), bits + 1))
    out = torch.where(wrong, stepped, bits)
    return out.to(torch.uint8).view(torch.float8_e4m3fn)


def page_bounds(keys: torch.Tensor, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise ``(min, max)`` of ``keys`` over ``dim`` as page metadata of ``dtype``: exact in a float
    dtype holding the keys, outward-rounded (:func:`fp8_round_directed`) in fp8."""
    mn, mx = keys.float().amin(dim=dim), keys.float().amax(dim=dim)
    if dtype in FP8_DTYPES:
        return fp8_round_directed(mn, up=False), fp8_round_directed(mx, up=True)
    return mn.to(dtype), mx.to(dtype)


def meta_to_fp8(meta: torch.Tensor) -> torch.Tensor:
    """Exact metadata ``[..., 2, head_dim]`` as fp8 metadata of the same pages: min rounded down, max up
    (the same bits :func:`page_bounds` gives from the keys, as rounding is monotonic)."""
    return torch.stack([fp8_round_directed(meta[..., 0, :], up=False), fp8_round_directed(meta[..., 1, :], up=True)], dim=-2)


def model_dtype(k_cache_dtype: torch.dtype, meta_dtype: torch.dtype, new_dtype: torch.dtype) -> torch.dtype:
    """The dtype new keys / values arrive in before an append rounds them into fp8 storage: the cache's
    or the metadata's, whichever is not fp8, else the new keys' own."""
    if k_cache_dtype not in FP8_DTYPES:
        return k_cache_dtype
    return meta_dtype if meta_dtype not in FP8_DTYPES else new_dtype


def gather_tokens(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``torch.gather(cache, 2, index)``, also for fp8 caches (gathered as bytes: CPU has no fp8 gather)."""
    if cache.dtype in FP8_DTYPES:
        return torch.gather(cache.view(torch.uint8), 2, index).view(cache.dtype)
    return torch.gather(cache, 2, index)


def num_pages(capacity: int, page_size: int) -> int:
    return capacity // page_size


# ----------------------------------------------------------------------------------------------
# metadata


def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    pos: torch.Tensor,
) -> None:
    """Write ``k_new``/``v_new`` (``[batch, kv_heads, n, head_dim]``) and refresh the min/max of every page
    they touch (in place).

    ``pos`` is an integer tensor of 1 (all rows alike) or ``batch`` elements: row ``b`` writes its token
    ``i`` at position ``pos[b] + i``. Tokens that land before position 0 are skipped (that is how the
    left padding of a prefill is dropped: rows are stored left-aligned, each from position 0); a token past
    the capacity is an error. A page's metadata covers the tokens from the page's start up to the last
    written one: a partial last page included.
    """
    b, h, n, d = k_new.shape
    capacity = k_cache.shape[2]
    page_size = capacity // meta.shape[2]
    starts = pos.reshape(-1).long().expand(b).tolist() if pos.numel() == 1 else pos.reshape(-1).long().tolist()
    for p0 in starts:  # check every row before writing any: a failed append leaves the cache untouched
        if max(0, -p0) < n and p0 + n > capacity:
            raise ValueError(f"append of {n} tokens at {p0} overflows the cache capacity {capacity}")
    for row, p0 in enumerate(starts):
        first = max(0, -p0)  # tokens before position 0 are padding
        if first >= n:
            continue
        lo_pos, end = p0 + first, p0 + n
        k_cache[row, :, lo_pos:end] = to_storage(k_new[row, :, first:], k_cache.dtype)
        v_cache[row, :, lo_pos:end] = to_storage(v_new[row, :, first:], v_cache.dtype)
        for page in range(lo_pos // page_size, (end - 1) // page_size + 1):
            lo = page * page_size
            hi = min(lo + page_size, end)
            # bounds of the stored (possibly rounded) keys
            meta[row, :, page, 0], meta[row, :, page, 1] = page_bounds(k_cache[row, :, lo:hi], 1, meta.dtype)


def build_meta(k_cache: torch.Tensor, length: int, page_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Bulk metadata of the first ``length`` tokens of ``k_cache``: ``[batch, kv_heads, pages, 2, head_dim]``
    in ``dtype`` (default the cache's; required for an fp8 cache: the model's dtype or fp8, see
    :func:`page_bounds`).

    Pages past ``length`` are left as zeros (they are never valid)."""
    b, h, capacity, d = k_cache.shape
    if dtype is None:
        if k_cache.dtype in FP8_DTYPES:
            raise ValueError("build_meta of an fp8 cache needs dtype= (the model's dtype)")
        dtype = k_cache.dtype
    pages = capacity // page_size
    meta = torch.zeros(b, h, pages, 2, d, dtype=dtype, device=k_cache.device)
    for page in range(0, (length + page_size - 1) // page_size):
        lo = page * page_size
        hi = min(lo + page_size, length)
        meta[:, :, page, 0], meta[:, :, page, 1] = page_bounds(k_cache[:, :, lo:hi], 2, dtype)
    return meta


# ----------------------------------------------------------------------------------------------
# page validity


def row_starts(seq_start: torch.Tensor) -> torch.Tensor:
    """``seq_start`` as int64 with a negative start counted as 0 (no position lies below 0)."""
    return seq_start.long().clamp(min=0)


def page_valid_mask(
    seq_start: torch.Tensor, seq_end: torch.Tensor, pages: int, page_size: int
) -> torch.Tensor:
    """``[batch, pages]`` bool: the page holds at least one token of ``[seq_start, seq_end)``."""
    first = torch.arange(pages, device=seq_start.device) * page_size
    start = seq_start.long()[:, None]
    end = seq_end.long()[:, None]
    return (first[None] < end) & (first[None] + page_size > start) & (end > start)


def token_valid_mask(seq_start: torch.Tensor, seq_end: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``positions`` ``[batch, ...]`` -> bool of the same shape: inside ``[seq_start, seq_end)``."""
    shape = (-1,) + (1,) * (positions.dim() - 1)
    return (positions >= seq_start.long().view(shape)) & (positions < seq_end.long().view(shape))


def _group(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[batch, q_heads, d]`` -> ``[batch, kv_heads, group, d]``."""
    b, hq, d = q.shape
    if hq % kv_heads:
        raise ValueError(f"q_heads={hq} is not a multiple of kv_heads={kv_heads}")
    return q.reshape(b, kv_heads, hq // kv_heads, d)


def _reduce_group(scores: torch.Tensor, gqa_reduction: str) -> torch.Tensor:
    """``[batch, kv_heads, group, pages]`` -> ``[batch, kv_heads, pages]``."""
    if gqa_reduction == "max":
        return scores.amax(dim=2)
    if gqa_reduction == "sum":
        return scores.sum(dim=2)
    raise ValueError(f"gqa_reduction={gqa_reduction!r}: allowed 'max' or 'sum'")


# ----------------------------------------------------------------------------------------------
# page scores (one function per policy; all return [batch, kv_heads, pages] float32, -inf if invalid)


def page_scores(
    q: torch.Tensor,
    meta: torch.Tensor,
    seq_start: torch.Tensor,
    seq_end: torch.Tensor,
    page_size: int,
    gqa_reduction: str = "max",
) -> torch.Tensor:
    """Quest upper bound: per query head, ``sum_d max(q_d * min_d, q_d * max_d)`` for every page; the
    group's scores are reduced by ``gqa_reduction``; invalid pages get ``-inf``.

    The bound is ``>= max over the page's tokens of q.k`` for every head (each term bounds q_d * k_d)."""
    b, hkv, pages, _, d = meta.shape
    qg = _group(q, hkv).float()  # [b, hkv, g, d]
    mn = meta[:, :, :, 0].float()  # [b, hkv, p, d]
    mx = meta[:, :, :, 1].float()
    per_head = torch.maximum(qg[:, :, :, None, :] * mn[:, :, None], qg[:, :, :, None, :] * mx[:, :, None]).sum(-1)
    scores = _reduce_group(per_head, gqa_reduction)
    valid = page_valid_mask(seq_start, seq_end, pages, page_size)
    return scores.masked_fill(~valid[:, None, :], NEG_INF)


def oracle_page_scores(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    seq_start: torch.Tensor,
    seq_end: torch.Tensor,
    page_size: int,
    gqa_reduction: str = "max",
) -> torch.Tensor:
    """Exact page importance: per query head, the max of q.k over the page's valid tokens (reads all keys;
    for measuring the recall of cheaper policies)."""
    b, hkv, capacity, d = k_cache.shape
    pages = capacity // page_size
    qg = _group(q, hkv).float()
    logits = torch.einsum("bhgd,bhtd->bhgt", qg, k_cache.float())  # [b, hkv, g, capacity]
    positions = torch.arange(capacity, device=q.device).expand(b, capacity)
    tok_valid = token_valid_mask(seq_start, seq_end, positions)  # [b, capacity]
    logits = logits.masked_fill(~tok_valid[:, None, None, :], NEG_INF)
    per_head = logits.view(b, hkv, -1, pages, page_size).amax(-1)
    return _reduce_group(per_head, gqa_reduction)


def streaming_page_scores(
    seq_start: torch.Tensor, seq_end: torch.Tensor, kv_heads: int, pages: int, page_size: int
) -> torch.Tensor:
    """StreamingLLM baseline: the score is the page number, so the budget goes to the most recent pages
    (the sink pages are forced by the selection)."""
    scores = torch.arange(pages, device=seq_start.device, dtype=torch.float32)
    scores = scores.expand(seq_start.shape[0], kv_heads, pages).clone()
    valid = page_valid_mask(seq_start, seq_end, pages, page_size)
    return scores.masked_fill(~valid[:, None, :], NEG_INF)


def random_page_scores(
    seq_start: torch.Tensor,
    seq_end: torch.Tensor,
    kv_heads: int,
    pages: int,
    page_size: int,
    seed: int = 0,
) -> torch.Tensor:
    """Random baseline: a hash of (seed, row length, KV head, page) in [0, 1), so it is deterministic,
    differs from step to step as the row grows, and needs no generator state (compile-safe). Sink and
    recent pages are still forced by the selection."""
    b = seq_start.shape[0]
    page = torch.arange(pages, device=seq_start.device, dtype=torch.float32)[None, None, :]
    head = torch.arange(kv_heads, device=seq_start.device, dtype=torch.float32)[None, :, None]
    step = seq_end.to(torch.float32)[:, None, None]
    x = torch.sin(page * 12.9898 + head * 4.1414 + step * 78.233 + float(seed) * 0.618) * 43758.5453
    scores = (x - torch.floor(x)).expand(b, kv_heads, pages)
    valid = page_valid_mask(seq_start, seq_end, pages, page_size)
    return scores.masked_fill(~valid[:, None, :], NEG_INF)


# ----------------------------------------------------------------------------------------------
# selection


def forced_page_mask(
    seq_start: torch.Tensor,
    seq_end: torch.Tensor,
    pages: int,
    page_size: int,
    sink_pages: int,
    recent_pages: int,
) -> torch.Tensor:
    """``[batch, pages]`` bool: the first ``sink_pages`` and last ``recent_pages`` valid pages of each row."""
    idx = torch.arange(pages, device=seq_start.device)[None]
    first = (row_starts(seq_start) // page_size)[:, None]
    last = ((seq_end.long() - 1) // page_size)[:, None]
    valid = page_valid_mask(seq_start, seq_end, pages, page_size)
    return valid & ((idx < first + sink_pages) | (idx > last - recent_pages))


def select_pages(
    scores: torch.Tensor,
    seq_start: torch.Tensor,
    seq_end: torch.Tensor,
    page_size: int,
    num_select: int,
    sink_pages: int,
    recent_pages: int,
) -> torch.Tensor:
    """Top pages per row and KV head: ``[batch, kv_heads, num_select]`` int32, ascending, ``-1`` padded.

    Forced (sink + recent) pages rank first, then valid pages by descending score (``+inf`` counts as the
    largest finite score, ``-inf`` and NaN as the lowest); ties go to the lower page number. Invalid pages
    are never selected; a row with ``<= num_select`` valid pages gets all of
    them (exact attention)."""
    b, hkv, pages = scores.shape
    valid = page_valid_mask(seq_start, seq_end, pages, page_size)[:, None, :].expand(b, hkv, pages)
    forced = forced_page_mask(seq_start, seq_end, pages, page_size, sink_pages, recent_pages)[:, None, :]
    # scores are made finite first, so forced pages (+inf) rank strictly above every score and invalid
    # pages (-inf) strictly below: a valid page scored -inf or NaN ranks lowest among the valid ones
    big = torch.finfo(torch.float32).max
    ranked = scores.float().nan_to_num(nan=-big, posinf=big, neginf=-big)
    ranked = ranked.masked_fill(forced, float("inf")).masked_fill(~valid, NEG_INF)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :num_select]
    n_valid = valid.sum(-1, keepdim=True)  # [b, hkv, 1]
    keep = torch.arange(order.shape[-1], device=scores.device)[None, None] < n_valid
    chosen = torch.where(keep, order, torch.full_like(order, pages))
    chosen = torch.sort(chosen, dim=-1).values
    chosen = torch.where(chosen == pages, torch.full_like(chosen, -1), chosen)
    if chosen.shape[-1] < num_select:  # fewer pages than the budget exist at all
        pad = torch.full((b, hkv, num_select - chosen.shape[-1]), -1, dtype=chosen.dtype, device=chosen.device)
        chosen = torch.cat([chosen, pad], dim=-1)
    return chosen.to(torch.int32)


# ----------------------------------------------------------------------------------------------
# attention


def _softcap(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    return logits if not softcap else softcap * torch.tanh(logits / softcap)


def _attend(qg, keys, values, valid, scale, softcap):
    """qg ``[b, hkv, g, d]``, keys/values ``[b, hkv, t, d]``, valid ``[b, hkv, t]`` -> ``[b, hkv, g, d]``
    float32; rows with no valid token give zeros."""
    logits = torch.einsum("bhgd,bhtd->bhgt", qg.float(), keys.float()) * scale
    logits = _softcap(logits, softcap).masked_fill(~valid[:, :, None, :], NEG_INF)
    any_valid = valid.any(-1)[:, :, None, None]
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgt,bhtd->bhgd", probs, values.float())
    return torch.where(any_valid, out, torch.zeros_like(out))


def sparse_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indices: torch.Tensor,
    seq_start: torch.Tensor,
    seq_end: torch.Tensor,
    page_size: int,
    scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Softmax attention of each query head over exactly the tokens of its KV head's selected pages that
    lie in ``[seq_start, seq_end)``: ``[batch, q_heads, head_dim]`` in ``q``'s dtype."""
    b, hkv, capacity, d = k_cache.shape
    k_sel = indices.shape[-1]
    offs = torch.arange(page_size, device=q.device)
    idx = indices.long()
    positions = (idx.clamp(min=0)[..., None] * page_size + offs).reshape(b, hkv, k_sel * page_size)
    valid = (idx >= 0)[..., None].expand(b, hkv, k_sel, page_size).reshape(b, hkv, -1)
    valid = valid & token_valid_mask(seq_start, seq_end, positions)
    gather = positions[..., None].expand(-1, -1, -1, d)
    keys = gather_tokens(k_cache, gather)
    values = gather_tokens(v_cache, gather)
    out = _attend(_group(q, hkv), keys, values, valid, scale, softcap)
    return out.reshape(b, -1, d).to(q.dtype)


def dense_page_list(seq_start: torch.Tensor, seq_end: torch.Tensor, page_size: int, slots: int, kv_heads: int) -> torch.Tensor:
    """Every page of each row's ``[seq_start, seq_end)`` as a selection: int32 ``[batch, kv_heads, slots]``, slot
    ``j`` = the row's first page + ``j`` while it starts before ``seq_end``, else ``-1`` (the same for every KV
    head). What the dense decode kernel walks without building it; a range longer than ``slots`` pages is cut."""
    first = (row_starts(seq_start) // page_size)[:, None]
    idx = first + torch.arange(slots, device=seq_start.device)[None, :]
    idx = torch.where(idx * page_size < seq_end.long()[:, None], idx, -1).to(torch.int32)
    return idx[:, None, :].expand(idx.shape[0], kv_heads, slots)


def dense_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_start: torch.Tensor,
    seq_end: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Exact attention over every valid token: ``[batch, q_heads, head_dim]`` in ``q``'s dtype."""
    b, hkv, capacity, d = k_cache.shape
    positions = torch.arange(capacity, device=q.device).expand(b, capacity)
    valid = token_valid_mask(seq_start, seq_end, positions)[:, None, :].expand(b, hkv, capacity)
    out = _attend(_group(q, hkv), k_cache, v_cache, valid, scale, softcap)
    return out.reshape(b, -1, d).to(q.dtype)


def selected_page_mask(indices: torch.Tensor, pages: int) -> torch.Tensor:
    """bool ``[batch, kv_heads, pages]``: the pages listed in ``indices`` ``[batch, kv_heads, S]`` (``-1`` =
    none). A spare column takes the ``-1`` slots, so they never clear a listed page."""
    b, h = indices.shape[:2]
    mask = torch.zeros(b, h, pages + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, torch.where(indices >= 0, indices.long(), pages), True)
    return mask[..., :pages]


#: Fields of the ``counts`` vector of :func:`record_decode` (float64, exact integers below 2**53).
DECODE_COUNTS = ("sparse_steps", "dense_steps", "tokens_read", "tokens_valid", "page_hits", "pages_prev",
                 "oracle_hits", "oracle_pages", "pages_selected")


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
    """Add one decode step of a layer to its instrumentation counters, in place.

    ``counts``: float64 ``[len(DECODE_COUNTS)]``; ``prev_selected``: bool ``[batch, kv_heads, pages]``, the
    pages each (row, KV head) selected at its previous sparse step; ``has_prev``: int32 ``[batch, kv_heads]``,
    1 once it had one; ``indices``: the step's int32 ``[batch, kv_heads, S]`` selection (``-1`` = none).

    A dense step (every token attended; ``indices`` ignored) adds 1 to ``dense_steps`` and every valid
    token (``seq_end - seq_start`` per row, times kv_heads) to ``tokens_read`` and ``tokens_valid``. A sparse
    step adds 1 to ``sparse_steps``, the valid tokens inside the selected pages to ``tokens_read``, the valid
    tokens to ``tokens_valid``, the selected pages (slots ``>= 0``) to ``pages_selected``, those also selected
    at the previous step to ``page_hits`` and, where there was a previous step, the selected pages to
    ``pages_prev``; then ``prev_selected`` becomes this step's selection and ``has_prev`` 1. The oracle
    fields are left to the caller."""
    b, h = prev_selected.shape[:2]
    start = row_starts(seq_start)
    valid = (seq_end.long() - start).clamp(min=0).sum().to(torch.float64) * h
    if dense:
        counts[1:4].add_(torch.stack([valid.new_ones(()), valid, valid]))
        return
    chosen = indices >= 0
    first = indices.long() * page_size
    lo = torch.maximum(first, start[:, None, None])
    hi = torch.minimum(first + page_size, seq_end.long()[:, None, None])
    read = torch.where(chosen, (hi - lo).clamp(min=0), 0).sum().to(torch.float64)
    safe = indices.long().clamp(min=0)
    n_chosen = chosen.sum(-1)  # [batch, kv_heads]
    hits = (prev_selected.gather(-1, safe) & chosen).sum().to(torch.float64)
    prev_pages = (n_chosen * (has_prev != 0)).sum().to(torch.float64)
    prev_selected.copy_(selected_page_mask(indices, prev_selected.shape[-1]))
    has_prev.fill_(1)
    zero = valid.new_zeros(())
    counts.add_(torch.stack([valid.new_ones(()), zero, read, valid, hits, prev_pages, zero, zero,
                             n_chosen.sum().to(torch.float64)]))


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
