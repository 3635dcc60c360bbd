"""append_kv_triton == reference.append_kv, bit for bit (cache and page min/max)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import triton
import triton.language as tl

from tinyserve_patch.ops import reference as ref
from tinyserve_patch.ops._triton_common import round_to_fp8_e4m3, round_to_fp8_e4m3_directed
from tinyserve_patch.ops.triton_append import append_kv_triton

from tests.ops.kernel_cases import DEVICE, gen, randn


def _buffers(b, h, cap, d, ps, dtype):
    k = torch.zeros(b, h, cap, d, dtype=dtype, device=DEVICE)
    meta = torch.zeros(b, h, cap // ps, 2, d, dtype=dtype, device=DEVICE)
    return k, k.clone(), meta


def _new(b, h, n, d, dtype, g, transposed):
    if transposed:  # HF's [b, n, h, d] -> [b, h, n, d] view
        return randn((b, n, h, d), dtype, g).transpose(1, 2), randn((b, n, h, d), dtype, g).transpose(1, 2)
    return randn((b, h, n, d), dtype, g), randn((b, h, n, d), dtype, g)


def _run_both(tri, refb, k_new, v_new, pos):
    append_kv_triton(*tri, k_new, v_new, pos)
    ref.append_kv(*refb, k_new, v_new, pos)
    for a, r in zip(tri, refb):
        assert torch.equal(a, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,d,ps,cap", [(2, 2, 64, 8, 64), (1, 2, 16, 16, 64), (2, 1, 80, 8, 48)])
def test_append_sequence_matches_reference(dtype, b, h, d, ps, cap):
    """Prefill with per-row left padding (negative pos), then decode steps and chunks across pages."""
    g = gen(0)
    tri = _buffers(b, h, cap, d, ps, dtype)
    refb = tuple(t.clone() for t in tri)
    cur = torch.tensor([-3, 0][:b], device=DEVICE)
    for step, n in enumerate((7, 1, 1, 9, 16, 1)):
        k_new, v_new = _new(b, h, n, d, dtype, g, transposed=step % 2 == 0)
        _run_both(tri, refb, k_new, v_new, cur.to(torch.int32))
        cur = cur + n


def test_append_single_pos_and_int64():
    g = gen(1)
    tri = _buffers(2, 2, 32, 16, 8, torch.bfloat16)
    refb = tuple(t.clone() for t in tri)
    for p0, n in ((0, 5), (5, 3), (8, 1), (9, 12)):
        k_new, v_new = _new(2, 2, n, 16, torch.bfloat16, g, transposed=False)
        _run_both(tri, refb, k_new, v_new, torch.tensor([p0], dtype=torch.int64, device=DEVICE))


def test_append_fully_padded_row_and_overflow_is_masked():
    g = gen(2)
    k, v, meta = _buffers(2, 1, 32, 16, 8, torch.float32)
    k.fill_(float("nan"))
    v.fill_(float("nan"))
    meta.fill_(float("nan"))
    k_new, v_new = _new(2, 1, 6, 16, torch.float32, g, transposed=False)
    # row 0: every token lands before 0 (all padding, nothing written); row 1: 2 tokens past capacity
    append_kv_triton(k, v, meta, k_new, v_new, torch.tensor([-6, 28], dtype=torch.int32, device=DEVICE))
    assert torch.isnan(k[0]).all() and torch.isnan(meta[0]).all()
    assert torch.equal(k[1, :, 28:], k_new[1, :, :4]) and torch.equal(v[1, :, 28:], v_new[1, :, :4])
    assert torch.isnan(k[1, :, :28]).all()
    assert torch.equal(meta[1, :, 3, 0], k_new[1, :, :4].amin(1)) and torch.equal(meta[1, :, 3, 1], k_new[1, :, :4].amax(1))
    assert torch.isnan(meta[1, :, :3]).all()


def test_append_rejects_bad_input():
    k, v, meta = _buffers(1, 1, 32, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        kk = torch.zeros(1, 1, 32, 272, device=DEVICE)
        append_kv_triton(kk, kk.clone(), torch.zeros(1, 1, 4, 2, 272, device=DEVICE), kk[:, :, :1], kk[:, :, :1], torch.zeros(1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        ki = k.to(torch.int32)
        append_kv_triton(ki, ki.clone(), meta.to(torch.int32), ki[:, :, :1], ki[:, :, :1], torch.zeros(1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="pos"):
        append_kv_triton(k, v, meta, k[:, :, :1], v[:, :, :1], torch.zeros(1, device=DEVICE))


@settings(max_examples=10, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 2),
    d=st.sampled_from([16, 32, 48]),
    ps=st.sampled_from([8, 16]),
    pages=st.integers(2, 6),
    chunks=st.lists(st.integers(1, 20), min_size=1, max_size=3),
    pad=st.integers(0, 5),
    seed=st.integers(0, 1000),
)
def test_append_hypothesis(b, h, d, ps, pages, chunks, pad, seed):
    cap = pages * ps
    g = gen(seed)
    tri = _buffers(b, h, cap, d, ps, torch.bfloat16)
    refb = tuple(t.clone() for t in tri)
    cur = -torch.arange(b, device=DEVICE) * pad
    for n in chunks:
        if int(cur.max()) + n > cap:
            break
        k_new, v_new = _new(b, h, n, d, torch.bfloat16, g, transposed=bool(seed % 2))
        _run_both(tri, refb, k_new, v_new, cur.to(torch.int32))
        cur = cur + n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_append_fp8_cache_matches_reference(dtype):
    """An fp8 cache: K/V saturated at +-448 and rounded to nearest, metadata (model dtype) bounds the
    stored keys; Triton == reference bit for bit, through prefill with padding, decode and page crossings."""
    g = gen(5)
    b, h, cap, d, ps = 2, 2, 64, 16, 8
    tri = (torch.zeros(b, h, cap, d, dtype=torch.float8_e4m3fn, device=DEVICE),
           torch.zeros(b, h, cap, d, dtype=torch.float8_e4m3fn, device=DEVICE),
           torch.zeros(b, h, cap // ps, 2, d, dtype=dtype, device=DEVICE))
    refb = tuple(t.clone() for t in tri)
    cur = torch.tensor([-3, 0], device=DEVICE)
    for n in (11, 1, 1, 9, 1):
        k_new, v_new = _new(b, h, n, d, dtype, g, transposed=False)
        k_new = k_new * 200  # some beyond +-448: saturated, never NaN
        _run_both(tri, refb, k_new, v_new, cur.to(torch.int32))
        cur = cur + n
    keys = tri[0].float()
    assert torch.isfinite(keys).all() and keys.abs().max() == 448.0
    # the metadata is the min / max of the stored keys
    expect = ref.build_meta(tri[0], int(cur.min()), ps, dtype=dtype)
    filled = int(cur.min()) // ps
    assert torch.equal(tri[2][:, :, :filled], expect[:, :, :filled])


@triton.jit
def _fp8_cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(y_ptr + o, round_to_fp8_e4m3(tl.load(x_ptr + o)).to(y_ptr.dtype.element_ty))


def test_round_to_fp8_grid_matches_torch_cast():
    """The kernel's fp8 rounding (saturate, nearest-even, subnormals, signed zeros) == torch's cast."""
    g = gen(6)
    n = 2048
    x = torch.cat([
        torch.randn(n + n // 2, generator=g) * torch.logspace(-4, 3, n + n // 2),  # every binade, subnormals to saturation
        torch.randint(-8000, 8000, (n // 2 - 12,), generator=g) / 16.0,  # exact ties of the fp8 grid
        torch.tensor([0.0, -0.0, 448.0, -448.0, 460.0, 1e6, -1e6, 2.0**-9, 2.0**-10, -(2.0**-10), 1.96875, 0.01562]),
    ])
    x = x.to(DEVICE)  # 2 * n elements: one power-of-two block
    y = torch.empty(x.numel(), dtype=torch.float8_e4m3fn, device=DEVICE)
    _fp8_cast_kernel[(1,)](x, y, N=x.numel())
    want = ref.to_storage(x, torch.float8_e4m3fn)
    assert torch.equal(y.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_append_fp8_meta_matches_reference(kv_dtype, model_dtype):
    """fp8 page metadata (min rounded down, max rounded up on the fp8 grid) over a model-dtype or fp8
    cache: Triton == reference bit for bit through prefill with padding, decode and page crossings, and
    every stored key lies inside its page's box."""
    if kv_dtype == torch.bfloat16:
        kv_dtype = model_dtype
    g = gen(7)
    b, h, cap, d, ps = 2, 2, 64, 16, 8
    fp8 = torch.float8_e4m3fn
    tri = (torch.zeros(b, h, cap, d, dtype=kv_dtype, device=DEVICE),
           torch.zeros(b, h, cap, d, dtype=kv_dtype, device=DEVICE),
           torch.zeros(b, h, cap // ps, 2, d, dtype=fp8, device=DEVICE))
    refb = tuple(t.clone() for t in tri)
    cur = torch.tensor([-3, 0], device=DEVICE)
    for i, n in enumerate((11, 1, 1, 9, 1)):
        k_new, v_new = _new(b, h, n, d, model_dtype, g, transposed=bool(i % 2))
        k_new = k_new * torch.logspace(-3, 1.5, d, device=DEVICE)  # subnormal range to ~30
        _run_both(tri, refb, k_new.to(model_dtype), v_new, cur.to(torch.int32))
        cur = cur + n
    filled = int(cur.min()) // ps
    expect = ref.build_meta(tri[0], int(cur.min()), ps, dtype=fp8)
    assert torch.equal(tri[2][:, :, :filled].view(torch.uint8), expect[:, :, :filled].view(torch.uint8))
    keys = tri[0][:, :, : filled * ps].float().unflatten(2, (filled, ps))  # [b, h, pages, ps, d]
    meta = tri[2][:, :, :filled].float()
    assert (meta[:, :, :, 0, None] <= keys).all() and (keys <= meta[:, :, :, 1, None]).all()
    # outward rounding is loose by less than one fp8 step: never more than 1/8 of a normal value
    exact = ref.build_meta(tri[0], int(cur.min()), ps, dtype=torch.float32)[:, :, :filled]
    assert ((meta - exact).abs() <= exact.abs() / 8 + 2.0**-9).all()


@triton.jit
def _fp8_directed_kernel(x_ptr, up_ptr, down_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    x = tl.load(x_ptr + o)
    tl.store(up_ptr + o, round_to_fp8_e4m3_directed(x, True).to(up_ptr.dtype.element_ty))
    tl.store(down_ptr + o, round_to_fp8_e4m3_directed(x, False).to(down_ptr.dtype.element_ty))


def test_round_to_fp8_directed_matches_reference():
    """The kernel's outward fp8 rounding == reference.fp8_round_directed bit for bit: every binade,
    exact grid points and their neighbours, subnormals, signed zeros, saturation."""
    g = gen(8)
    grid = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)]  # 254 finite values, both zeros
    n = 2048
    x = torch.cat([
        grid, grid * (1 + 2.0**-12), grid * (1 - 2.0**-12), grid + 2.0**-13, grid - 2.0**-13,
        torch.tensor([1e-30, -1e-30, 460.0, -460.0, 1e6, -1e6, 2.0**-10, -(2.0**-10), 447.99, -447.99]),
    ])
    x = torch.cat([x, torch.randn(2 * n - x.numel(), generator=g) * torch.logspace(-4, 3, 2 * n - x.numel())]).to(DEVICE)
    up = torch.empty(x.numel(), dtype=torch.float8_e4m3fn, device=DEVICE)
    down = torch.empty_like(up)
    _fp8_directed_kernel[(1,)](x, up, down, N=x.numel())
    assert torch.equal(up.view(torch.uint8), ref.fp8_round_directed(x, up=True).view(torch.uint8))
    assert torch.equal(down.view(torch.uint8), ref.fp8_round_directed(x, up=False).view(torch.uint8))
