"""Per-layer instrumentation of sparse decoding, kept on the device with in-place updates only
(so it runs inside compiled / CUDA-graph decode steps), read back by :func:`stats`.

Counters per layer (float64 ``counts``, fields as ``ops.reference.DECODE_COUNTS``):
    0 sparse_steps    decode steps that selected pages
    1 dense_steps     decode steps that attended every token (dense layer, or within the budget)
    2 tokens_read     valid tokens attended, summed over rows and KV heads
    3 tokens_valid    valid tokens in the context, summed over rows and KV heads
    4 page_hits       selected pages that were also selected at the previous step
    5 pages_prev      selected pages at steps that had a previous step (hit-rate denominator)
    6 oracle_hits     selected pages that are among the oracle's top pages (recall, opt-in)
    7 oracle_pages    oracle pages counted (recall denominator)
    8 pages_selected  selected pages, summed over rows, KV heads and steps

Every step but the oracle's recall is one ``ops.record_decode`` (one kernel on CUDA).
"""

from __future__ import annotations

import torch

from . import ops

_N = len(ops.reference.DECODE_COUNTS)


class LayerStats:
    """Device counters of one cache layer; see the module docstring."""

    def __init__(self, batch: int, kv_heads: int, pages: int, device: torch.device):
        self.rows = batch * kv_heads
        self.counts = torch.zeros(_N, dtype=torch.float64, device=device)
        self.prev_selected = torch.zeros(batch, kv_heads, pages, dtype=torch.bool, device=device)
        self.has_prev = torch.zeros(batch, kv_heads, dtype=torch.int32, device=device)
        self._no_indices = torch.zeros(batch, kv_heads, 0, dtype=torch.int32, device=device)

    def tensors(self):
        return (self.counts, self.prev_selected, self.has_prev)

    def reset(self) -> None:
        self.counts.zero_()
        self.prev_selected.zero_()
        self.has_prev.zero_()

    def record_dense(self, seq_start: torch.Tensor, seq_end: torch.Tensor) -> None:
        ops.record_decode(self.counts, self.prev_selected, self.has_prev, self._no_indices, seq_start, seq_end, 1, dense=True)

    def record_sparse(self, indices, seq_start, seq_end, page_size: int, oracle: torch.Tensor | None = None) -> None:
        ops.record_decode(self.counts, self.prev_selected, self.has_prev, indices, seq_start, seq_end, page_size)
        if oracle is not None:  # opt-in (track_recall): plain PyTorch, beside a full scoring pass anyway
            oracle_map = ops.reference.selected_page_mask(oracle, self.prev_selected.shape[-1])
            hits = (oracle_map.gather(-1, indices.long().clamp(min=0)) & (indices >= 0)).sum().to(torch.float64)
            self.counts[6:8].add_(torch.stack([hits, (oracle >= 0).sum().to(torch.float64)]))

    def summary(self) -> dict:
        c = self.counts.tolist()
        steps = c[0] + c[1]
        out = {
            "sparse_steps": int(c[0]),
            "dense_steps": int(c[1]),
            "fraction_read": (c[2] / c[3]) if c[3] else None,
            "pages_attended": (c[8] / (c[0] * self.rows)) if c[0] else None,
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
