"""Input builders shared by the Triton kernel tests (CPU interpreter in CI, CUDA where available)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinyserve_patch.ops import reference as ref
from tinyserve_patch.ops import triton_persistent

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, g: torch.Generator, device=DEVICE) -> torch.Tensor:
    return torch.randn(shape, generator=g).to(dtype).to(device)


def randint(lo: int, hi: int, shape, dtype, g: torch.Generator, device=DEVICE) -> torch.Tensor:
    """Small integers: products and sums of them are exact in fp32 (no rounding ties)."""
    return torch.randint(lo, hi, shape, generator=g).to(dtype).to(device)


def rows(batch: int, capacity: int, g: torch.Generator, empty_row: bool = False, device=DEVICE):
    """Ragged ``(seq_start, seq_end)`` int32 ``[batch]``: row ends anywhere in ``[1, capacity]``, starts
    before them (row 0 starts at 0, the others mid-page); optionally the last row empty."""
    end = torch.randint(1, capacity + 1, (batch,), generator=g)
    start = (torch.rand(batch, generator=g) * end.float()).long()
    start[0] = 0
    if empty_row and batch > 1:
        start[-1] = end[-1]
    return start.to(torch.int32).to(device), end.to(torch.int32).to(device)


def cache(batch, kv_heads, capacity, head_dim, page_size, dtype, g, length=None, integer=False, device=DEVICE):
    """``(k_cache, v_cache, meta)`` with ``meta`` built from the first ``length`` keys."""
    shape = (batch, kv_heads, capacity, head_dim)
    if integer:
        k = randint(-4, 5, shape, dtype, g, device)
    else:
        k = randn(shape, dtype, g, device)
    v = randn(shape, dtype, g, device)
    meta = ref.build_meta(k, capacity if length is None else length, page_size)
    return k, v, meta


def random_indices(batch, kv_heads, pages, num_select, g, pad: int = 0, device=DEVICE) -> torch.Tensor:
    """Ascending distinct page numbers per (row, head), ``-1`` padded (the last ``pad`` slots at least)."""
    out = torch.full((batch, kv_heads, num_select), -1, dtype=torch.int32)
    take = max(0, min(pages, num_select - pad))
    for b in range(batch):
        for h in range(kv_heads):
            out[b, h, :take] = torch.sort(torch.randperm(pages, generator=g)[:take]).values.to(torch.int32)
    return out.to(device)


def rel_err(out: torch.Tensor, expect: torch.Tensor) -> float:
    return ((out.float() - expect.float()).norm() / expect.float().norm().clamp(min=1e-6)).item()


@triton.jit
def _queue_order_kernel(out_ptr, rows, lag, score_items, num_splits, total):
    for i in range(total):
        s, r, sub = triton_persistent._item(i, rows, lag, score_items, num_splits)
        tl.store(out_ptr + 3 * i, s.to(tl.int32))
        tl.store(out_ptr + 3 * i + 1, r)
        tl.store(out_ptr + 3 * i + 2, sub)


def queue_order(rows: int, lag: int, score_items: int, num_splits: int) -> list[tuple[int, int, int]]:
    """The persistent decode's queue, item by item, as its device function maps it: ``(is_score, row, sub)``
    (run on the CPU: the interpreter must be on, as in ``tests/conftest.py`` without CUDA)."""
    total = rows * (score_items + num_splits)
    got = torch.zeros(3 * total, dtype=torch.int32)
    _queue_order_kernel[(1,)](got, rows, lag, score_items, num_splits, total)
    return [tuple(x) for x in got.view(total, 3).tolist()]
