"""Per-layer instrumentation of sparse decoding, kept on the device with in-place updates only
(so it runs inside compiled / CUDA-graph decode steps), read back by :func:`stats`.

Counters per layer (float64 ``counts``):
    0 sparse_steps    decode steps that selected pages
    1 dense_steps     decode steps that attended every token (dense layer, or within the budget)
    2 tokens_read     valid tokens attended, summed over rows and KV heads
    3 tokens_valid    valid tokens in the context, summed over rows and KV heads
    4 page_hits       selected pages that were also selected at the previous step
    5 pages_prev      selected pages at steps that had a previous step (hit-rate denominator)
    6 oracle_hits     selected pages that are among the oracle's top pages (recall, opt-in)
    7 oracle_pages    oracle pages counted (recall denominator)
    8 pages_selected  valid pages selected per row and KV head (mean over them), summed over steps
"""

from __future__ import annotations

import torch

_N = 9


def _tokens_in_pages(indices: torch.Tensor, seq_start: torch.Tensor, seq_end: torch.Tensor, page_size: int):
    """Valid tokens inside each selected page: ``[batch, kv_heads, n]`` (0 for ``-1`` slots)."""
    first = indices.long() * page_size
    lo = torch.maximum(first, seq_start.long()[:, None, None])
    hi = torch.minimum(first + page_size, seq_end.long()[:, None, None])
    return torch.where(indices >= 0, (hi - lo).clamp(min=0), torch.zeros_like(first))


class LayerStats:
    """Device counters of one cache layer; see the module docstring."""

    def __init__(self, batch: int, kv_heads: int, pages: int, device: torch.device):
        self.counts = torch.zeros(_N, dtype=torch.float64, device=device)
        self.prev_selected = torch.zeros(batch, kv_heads, pages, dtype=torch.bool, device=device)
        self.has_prev = torch.zeros((), dtype=torch.float64, device=device)

    def tensors(self):
        return (self.counts, self.prev_selected, self.has_prev)

    def reset(self) -> None:
        self.counts.zero_()
        self.prev_selected.zero_()
        self.has_prev.zero_()

    def record_dense(self, seq_start: torch.Tensor, seq_end: torch.Tensor, kv_heads: int) -> None:
        valid = (seq_end - seq_start).sum().to(torch.float64) * kv_heads
        update = torch.stack([valid.new_zeros(()), valid.new_ones(()), valid, valid])
        self.counts[:4].add_(update)

    def record_sparse(self, indices, seq_start, seq_end, page_size: int, oracle: torch.Tensor | None = None) -> None:
        chosen = indices >= 0
        safe = indices.long().clamp(min=0)
        read = _tokens_in_pages(indices, seq_start, seq_end, page_size).sum().to(torch.float64)
        valid = (seq_end - seq_start).sum().to(torch.float64) * indices.shape[1]
        n_chosen = chosen.sum().to(torch.float64)
        hits = (self.prev_selected.gather(-1, safe) & chosen).sum().to(torch.float64)
        self.prev_selected.zero_()
        self.prev_selected.scatter_(-1, safe, chosen)
        parts = [torch.ones_like(read), torch.zeros_like(read), read, valid, hits, n_chosen * self.has_prev]
        if oracle is not None:
            oracle_map = torch.zeros_like(self.prev_selected)
            oracle_ok = oracle >= 0
            oracle_map.scatter_(-1, oracle.long().clamp(min=0), oracle_ok)
            parts += [(oracle_map.gather(-1, safe) & chosen).sum().to(torch.float64), oracle_ok.sum().to(torch.float64)]
        else:
            parts += [torch.zeros_like(read), torch.zeros_like(read)]
        parts.append(n_chosen / (indices.shape[0] * indices.shape[1]))
        self.counts.add_(torch.stack(parts))
        self.has_prev.fill_(1.0)

    def summary(self) -> dict:
        c = self.counts.tolist()
        steps = c[0] + c[1]
        out = {
            "sparse_steps": int(c[0]),
            "dense_steps": int(c[1]),
            "fraction_read": (c[2] / c[3]) if c[3] else None,
            "pages_attended": (c[8] / c[0]) if c[0] else None,
            "page_hit_rate": (c[4] / c[5]) if c[5] else None,
            "recall": (c[6] / c[7]) if c[7] else None,
            "steps": int(steps),
        }
        return out


def model_stats(state) -> dict:
    """Summary of the last run of a patched model: per layer and overall (token-weighted)."""
    cache = getattr(state, "last_cache", None)
    if cache is None:
        return {"layers": [], "fraction_read": None, "note": "no decode has run since patching"}
    layers = []
    totals = torch.zeros(_N, dtype=torch.float64)
    for idx, layer in enumerate(cache.layers):
        if not getattr(layer, "is_initialized", False) or layer.stats is None:
            continue
        summary = layer.stats.summary()
        summary["layer"] = idx
        layers.append(summary)
        totals += layer.stats.counts.detach().cpu()
    t = totals.tolist()
    sparse_layers = [s for s in layers if s["sparse_steps"]]
    return {
        "layers": layers,
        "fraction_read": (t[2] / t[3]) if t[3] else None,
        "page_hit_rate": (t[4] / t[5]) if t[5] else None,
        "recall": (t[6] / t[7]) if t[7] else None,
        "sparse_layers": len(sparse_layers),
        "dense_layers": len(layers) - len(sparse_layers),
        "budget_respected": all(
            s["pages_attended"] is None or s["pages_attended"] <= state.config.budget_pages + 1e-9
            for s in layers
        )
        if not state.config.is_dense
        else True,
        "config": state.config.to_dict(),
    }
