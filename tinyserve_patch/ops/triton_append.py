"""Triton KV append with page metadata: writes ``k_new``/``v_new`` ``[B, Hkv, n, D]`` (any strides, e.g.
HF's transposed views) into ``k_cache``/``v_cache`` ``[B, Hkv, cap, D]`` at ``pos[b] .. pos[b]+n-1`` and
refreshes ``meta`` ``[B, Hkv, P, 2, D]`` (min at ``[..., 0, :]``, max at ``[..., 1, :]``) of every page
touched, in place.

Grid ``(B * Hkv, cdiv(n, page_size) + 1)``: program ``(bh, s)`` owns page ``max(pos, 0) // page_size + s``
(the first page may start before ``pos``, so ``n`` tokens touch at most ``cdiv(n, ps) + 1`` pages); a
slot past the last touched page, or past the capacity, does nothing. ``pos`` (1 or B elements) is read on
the device, so the launch is static for a given ``n`` (CUDA-graph and ``torch.compile`` safe). Tokens
before position 0 are skipped; tokens past the capacity are dropped (never written out of bounds).

Metadata = min/max of the page's tokens from its start to the last written one, as in
:func:`reference.append_kv`: the page's tokens already in the cache before ``pos`` (at most
``page_size - 1``, re-read from the cache) combined with the new ones; exact in the model's dtype,
rounded outward in fp8 metadata (:func:`reference.page_bounds`). Bit-exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import FLOAT_DTYPES, check, check_head_dim, pdl_enter, use_pdl, round_to_fp8_e4m3, round_to_fp8_e4m3_directed
from . import reference
from .reference import FP8_DTYPES

@triton.jit
def _append_kernel(
    k_cache,
    v_cache,
    meta,
    k_new,
    v_new,
    pos_ptr,
    n,
    capacity,
    kv_heads,
    D,
    stride_pos,
    stride_cb,
    stride_ch,
    stride_ct,
    stride_mb,
    stride_mh,
    stride_mp,
    stride_mm,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    PAGE_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FP8: tl.constexpr,
    META_FP8: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    bh = tl.program_id(0)
    slot = tl.program_id(1)
    b = bh // kv_heads
    h = bh % kv_heads
    p0 = tl.load(pos_ptr + b * stride_pos).to(tl.int32)
    lo = tl.maximum(p0, 0)  # first position written (earlier ones are dropped padding)
    hi = tl.minimum(p0 + n, capacity)  # one past the last position written
    page = lo // PAGE_SIZE + slot
    t = page * PAGE_SIZE + tl.arange(0, PAGE_SIZE)  # the page's positions
    offs_d = tl.arange(0, BLOCK_D)
    dmask = (offs_d < D)[None, :]
    is_new = (t >= lo) & (t < hi)
    # earlier tokens of a page that gets new ones (tl.where, not `&`, with a scalar: the CPU interpreter
    # mistypes `tensor & scalar` masks)
    is_old = tl.where(page * PAGE_SIZE < hi, t < lo, False)
    new_m = is_new[:, None] & dmask
    i = (t - p0).to(tl.int64)  # index into k_new / v_new

    cache_off = b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch + t[:, None].to(tl.int64) * stride_ct + offs_d[None, :]
    kn = tl.load(
        k_new + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + i[:, None] * stride_kt + offs_d[None, :] * stride_kd,
        mask=new_m,
    )
    vn = tl.load(
        v_new + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + i[:, None] * stride_vt + offs_d[None, :] * stride_vd,
        mask=new_m,
    )
    if FP8:  # saturate, then round to nearest (as reference.to_storage); the metadata bounds the rounded keys
        kn = round_to_fp8_e4m3(kn.to(tl.float32)).to(k_cache.dtype.element_ty)
        vn = round_to_fp8_e4m3(vn.to(tl.float32)).to(v_cache.dtype.element_ty)
    tl.store(k_cache + cache_off, kn, mask=new_m)
    tl.store(v_cache + cache_off, vn, mask=new_m)

    ko = tl.load(k_cache + cache_off, mask=is_old[:, None] & dmask)  # disjoint from the positions written
    keys = tl.where(is_new[:, None], kn.to(tl.float32), ko.to(tl.float32))  # exact (fp32 holds fp16/bf16)
    present = (is_new | is_old)[:, None]
    mn = tl.min(tl.where(present, keys, float("inf")), axis=0)
    mx = tl.max(tl.where(present, keys, float("-inf")), axis=0)
    active = tl.sum(is_new.to(tl.int32), axis=0) > 0
    meta_off = meta + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + page.to(tl.int64) * stride_mp + offs_d
    dm = tl.where(active, offs_d < D, False)
    if META_FP8:  # outward, so the box still holds every key
        mn = round_to_fp8_e4m3_directed(mn, False)
        mx = round_to_fp8_e4m3_directed(mx, True)
    tl.store(meta_off, mn.to(meta.dtype.element_ty), mask=dm)
    tl.store(meta_off + stride_mm, mx.to(meta.dtype.element_ty), mask=dm)


def append_kv_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    pos: torch.Tensor,
) -> None:
    """In-place append (see module docstring). ``pos``: int tensor of 1 or B elements on the cache's
    device (never read on the host)."""
    check(k_cache.dim() == 4 and v_cache.shape == k_cache.shape, "k_cache / v_cache must be [B, Hkv, cap, D] alike")
    fp8, meta_fp8 = k_cache.dtype in FP8_DTYPES, meta.dtype in FP8_DTYPES
    model_dtype = reference.model_dtype(k_cache.dtype, meta.dtype, k_new.dtype)
    check(
        model_dtype in FLOAT_DTYPES and v_cache.dtype == k_cache.dtype and (meta.dtype in (k_cache.dtype, *FP8_DTYPES) or fp8),
        f"k_cache / v_cache / meta / k_new dtypes {k_cache.dtype} / {v_cache.dtype} / {meta.dtype} / {k_new.dtype}: "
        "K/V and meta each in the model's dtype (fp16 / bf16 / fp32) or float8_e4m3fn",
    )
    b, hkv, cap, d = k_cache.shape
    check_head_dim(d)
    check(meta.dim() == 5 and meta.shape[:2] == (b, hkv) and meta.shape[3:] == (2, d), f"meta {tuple(meta.shape)} does not match the cache")
    pages = meta.shape[2]
    check(pages > 0 and cap % pages == 0, f"capacity {cap} is not a whole number of pages ({pages})")
    page_size = cap // pages
    check(page_size & (page_size - 1) == 0 and 1 <= page_size <= 128, f"page_size {page_size} must be a power of two <= 128")
    check(k_new.dim() == 4 and k_new.shape == v_new.shape, "k_new / v_new must be [B, Hkv, n, D] alike")
    check(k_new.shape[:2] == (b, hkv) and k_new.shape[3] == d, f"k_new {tuple(k_new.shape)} does not fit the cache {tuple(k_cache.shape)}")
    check(pos.numel() in (1, b) and not pos.is_floating_point(), f"pos must be an integer tensor of 1 or {b} elements")
    check(k_cache.stride(-1) == 1 and v_cache.stride() == k_cache.stride(), "k_cache / v_cache must be alike with a contiguous head_dim")
    check(meta.stride(-1) == 1, "meta must have a contiguous head_dim")
    if k_new.dtype != model_dtype:  # the kernel rounds to an fp8 cache / metadata itself
        k_new = k_new.to(model_dtype)
    if v_new.dtype != model_dtype:
        v_new = v_new.to(model_dtype)
    n = k_new.shape[2]
    if n == 0 or b * hkv == 0:
        return
    pos = pos.reshape(-1)
    grid = (b * hkv, triton.cdiv(n, page_size) + 1)
    pdl = use_pdl(k_cache.device)
    _append_kernel[grid](
        k_cache, v_cache, meta, k_new, v_new, pos,
        n, cap, hkv, d, pos.stride(0) if pos.numel() > 1 else 0,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        meta.stride(0), meta.stride(1), meta.stride(2), meta.stride(3),
        *k_new.stride(), *v_new.stride(),
        PAGE_SIZE=page_size, BLOCK_D=triton.next_power_of_2(d), FP8=fp8, META_FP8=meta_fp8,
        num_warps=4 if page_size * d <= 4096 else 8, PDL=pdl, launch_pdl=pdl,
    )
