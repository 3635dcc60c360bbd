"""The Triton kernels on CUDA vs the pure-PyTorch reference, up to 128K tokens and batch 16, plus a
CUDA-graph (torch.compile mode="reduce-overhead") decode loop (skipped without CUDA).

Outputs the launchers allocate are poisoned first: a NaN-filled block of the same size is freed just
before the call, so the caching allocator hands it back and any element left unwritten shows up as NaN.
"""

from __future__ import annotations

import pytest
import torch

from tinyserve_patch import ops
from tinyserve_patch.ops import reference as ref
from tinyserve_patch.ops.triton_append import append_kv_triton
from tinyserve_patch.ops.triton_decode import sparse_decode_attention_triton
from tinyserve_patch.ops.triton_fused_select import score_and_select_triton
from tinyserve_patch.ops.triton_score import page_scores_triton
from tinyserve_patch.ops.triton_select import select_pages_triton

pytestmark = pytest.mark.gpu
DEV = "cuda"
K = 1024
# (q_heads, kv_heads, head_dim): TinyLlama, Llama-3-8B
SHAPES = {"tinyllama": (32, 4, 64), "llama3": (32, 8, 128)}


def _poison(numel: int, dtype: torch.dtype) -> None:
    if dtype.is_floating_point:
        torch.full((numel,), float("nan"), dtype=dtype, device=DEV)
    else:
        torch.full((numel,), -7777, dtype=dtype, device=DEV)
    # freed at once: the next allocation of this size reuses the NaN block


def _rows(batch: int, length: int, g: torch.Generator, page_size: int):
    """Ragged rows: lengths from length/2 to length, the odd rows starting mid-page (sliding window)."""
    end = torch.randint(length // 2, length + 1, (batch,), generator=g)
    end[0] = length
    start = torch.zeros(batch, dtype=torch.long)
    start[1::2] = torch.randint(0, page_size * 5, (len(start[1::2]),), generator=g)
    return start.to(torch.int32).to(DEV), end.to(torch.int32).to(DEV)


def _meta(batch, hkv, pages, d, dtype, g, integer=False):
    shape = (batch, hkv, pages, d)
    if integer:
        a = torch.randint(-4, 5, shape, generator=g).to(dtype)
        b = torch.randint(-4, 5, shape, generator=g).to(dtype)
    else:
        a = torch.randn(shape, generator=g).to(dtype)
        b = torch.randn(shape, generator=g).to(dtype)
    return torch.stack([torch.minimum(a, b), torch.maximum(a, b)], dim=3).to(DEV)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


# ---------------------------------------------------------------------------------------------- append


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_size", [8, 16, 32, 64])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_append_prefill_then_decode_bit_exact(dtype, page_size, d):
    g = torch.Generator().manual_seed(page_size + d)
    b, h, cap = 4, 4, 2048
    k = torch.full((b, h, cap, d), float("nan"), dtype=dtype, device=DEV)  # unwritten slots stay NaN
    v = k.clone()
    meta = torch.full((b, h, cap // page_size, 2, d), float("nan"), dtype=dtype, device=DEV)
    _append_both((k, v, meta), page_size, dtype, g)


def _append_both(tri, page_size, dtype, g, key_scale=None) -> int:
    """A prefill of 1000 tokens with left padding 0/3/17/100 (dropped), then decode steps and page-sized
    appends, through Triton and the reference, bit for bit after every call; returns the shortest row."""
    b, h, _, d = tri[0].shape
    rb = tuple(t.clone() for t in tri)
    pos = -torch.tensor([0, 3, 17, 100])
    for n in (1000, 1, 1, 37, 1, page_size, 1):
        kn = torch.randn(b, n, h, d, generator=g)
        kn = (kn if key_scale is None else kn * key_scale).to(dtype).to(DEV).transpose(1, 2)  # HF's view
        vn = torch.randn(b, n, h, d, generator=g).to(dtype).to(DEV).transpose(1, 2)
        p = pos.to(torch.int32).to(DEV)
        append_kv_triton(*tri, kn, vn, p)
        ref.append_kv(*rb, kn, vn, p)
        for a, r in zip(tri, rb):
            assert torch.equal(_bits(a), _bits(r))
        pos = pos + n
    return int(pos.min())


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("page_size", [8, 16, 64])
def test_gpu_append_fp8_meta_bit_exact(kv_dtype, page_size):
    """fp8 page metadata (outward-rounded) over a bf16 or fp8 cache: Triton == reference bit for bit
    through a padded prefill and decode steps; every key inside its page's box."""
    g = torch.Generator().manual_seed(page_size)
    b, h, cap, d = 4, 4, 2048, 128
    tri = (torch.zeros((b, h, cap, d), dtype=kv_dtype, device=DEV), torch.zeros((b, h, cap, d), dtype=kv_dtype, device=DEV),
           torch.zeros((b, h, cap // page_size, 2, d), dtype=torch.float8_e4m3fn, device=DEV))
    filled = _append_both(tri, page_size, torch.bfloat16, g, key_scale=torch.logspace(-3, 1.5, d)) // page_size
    keys = tri[0][:, :, : filled * page_size].float().unflatten(2, (filled, page_size))
    meta = tri[2][:, :, :filled].float()
    assert (meta[:, :, :, 0, None] <= keys).all() and (keys <= meta[:, :, :, 1, None]).all()


# ---------------------------------------------------------------------------------------------- scores / select


# (model, tokens, batch, page_size): every page size, both models, up to 128K tokens and batch 16
SCORE_CASES = [
    ("tinyllama", 4 * K, 16, 8), ("tinyllama", 16 * K, 16, 16), ("tinyllama", 64 * K, 2, 32),
    ("tinyllama", 128 * K, 1, 64), ("tinyllama", 128 * K, 1, 8),
    ("llama3", 4 * K, 16, 16), ("llama3", 16 * K, 16, 8), ("llama3", 64 * K, 2, 16),
    ("llama3", 128 * K, 1, 32), ("llama3", 128 * K, 2, 16),
]


@pytest.mark.parametrize("name,length,batch,ps", SCORE_CASES)
def test_gpu_scores_and_select(name, length, batch, ps):
    hq, hkv, d = SHAPES[name]
    dtype = torch.bfloat16 if ps != 32 else torch.float16
    g = torch.Generator().manual_seed(length + ps)
    pages = length // ps
    meta = _meta(batch, hkv, pages, d, dtype, g)
    q = torch.randn(batch, hq, d, generator=g).to(dtype).to(DEV)
    start, end = _rows(batch, length - 3, g, ps)
    for red in ("max", "sum"):
        _poison(batch * hkv * pages, torch.float32)
        scores = page_scores_triton(q, meta, start, end, ps, red)
        expect = ref.page_scores(q, meta, start, end, ps, red)
        assert not torch.isnan(scores).any()
        assert torch.equal(torch.isneginf(scores), torch.isneginf(expect))
        fin = torch.isfinite(expect)
        torch.testing.assert_close(scores[fin], expect[fin], rtol=1e-5, atol=1e-3)
        # both reads of the metadata, whichever the default took (TMA from 32 MiB): the same bits (the row-chained
        # decode keeps cp.async and is compared bit for bit with the split chain)
        via_tma = page_scores_triton(q, meta, start, end, ps, red, tma=True)
        assert torch.equal(via_tma, page_scores_triton(q, meta, start, end, ps, red, tma=False))
        assert torch.equal(via_tma, scores)
        # the opt-in pages-major products (warpgroup MMAs): the reference's scores, both reads
        for tma in (False, True):
            pm = page_scores_triton(q, meta, start, end, ps, red, tma=tma, pages_major=True)
            assert torch.equal(torch.isneginf(pm), torch.isneginf(expect))
            torch.testing.assert_close(pm[fin], expect[fin], rtol=1e-5, atol=1e-3)
    # fp8 metadata (outward-rounded): the same scores as the reference on it, never below the exact ones
    meta8 = ref.meta_to_fp8(meta)
    s8 = page_scores_triton(q, meta8, start, end, ps, "max")
    e8 = ref.page_scores(q, meta8, start, end, ps, "max")
    exact = ref.page_scores(q, meta, start, end, ps, "max")
    assert torch.equal(torch.isneginf(s8), torch.isneginf(e8))
    torch.testing.assert_close(s8[fin], e8[fin], rtol=1e-5, atol=1e-3)
    assert (e8[fin] >= exact[fin] - 1e-3 * (1 + exact[fin].abs())).all()
    # selection is exact given the same scores, for every search: 1-4 thresholds per pass, the narrowing
    # search (ways=0), and the search ranking its bracket's last 16-128 keys directly (finish)
    tied = torch.randint(0, 4, scores.shape, generator=g).float().to(DEV)  # ties everywhere
    for plan in [dict(ways=w) for w in (0, 1, 2, 3, 4)] + [dict(finish=f) for f in (16, 64, 128)]:
        for budget in (1024, 2048, 4096):
            n = budget // ps
            _poison(batch * hkv * n, torch.int32)
            idx = select_pages_triton(scores, start, end, ps, n, 1, 1, **plan)
            assert torch.equal(idx, ref.select_pages(scores, start, end, ps, n, 1, 1)), plan
        got = select_pages_triton(tied, start, end, ps, 64, 2, 2, **plan)
        assert torch.equal(got, ref.select_pages(tied, start, end, ps, 64, 2, 2)), plan


@pytest.mark.parametrize("name,length,batch", [("tinyllama", 4 * K, 16), ("llama3", 16 * K, 8), ("tinyllama", 128 * K, 1), ("llama3", 128 * K, 2)])
@pytest.mark.parametrize("ps", [8, 16, 64])
def test_gpu_fused_select_exact_on_integer_data(name, length, batch, ps):
    """Integer q / metadata: every score is exact, so the fused kernel must equal the reference."""
    hq, hkv, d = SHAPES[name]
    g = torch.Generator().manual_seed(length * ps)
    pages = length // ps
    meta = _meta(batch, hkv, pages, d, torch.bfloat16, g, integer=True)
    q = torch.randint(-3, 4, (batch, hq, d), generator=g).to(torch.bfloat16).to(DEV)
    start, end = _rows(batch, length - 1, g, ps)
    for red, n in (("max", 2048 // ps), ("sum", 4096 // ps)):
        expect = ref.select_pages(ref.page_scores(q, meta, start, end, ps, red), start, end, ps, n, 1, 2)
        for _ in range(2):  # the second launch reuses the (re-zeroed) ticket counters
            _poison(batch * hkv * n, torch.int32)
            out = score_and_select_triton(q, meta, start, end, ps, n, 1, 2, red)
            assert torch.equal(out, expect)
        # the opt-in TMA read of the metadata and the opt-in pages-major products (off by default)
        assert torch.equal(score_and_select_triton(q, meta, start, end, ps, n, 1, 2, red, tma=True), expect)
        for tma in (False, True):
            assert torch.equal(score_and_select_triton(q, meta, start, end, ps, n, 1, 2, red, tma=tma, pages_major=True), expect)


def test_gpu_fused_select_random_data_up_to_ties():
    from tests.ops.test_triton_fused_select import assert_topk_up_to_ties

    hq, hkv, d = SHAPES["llama3"]
    g = torch.Generator().manual_seed(5)
    meta = _meta(2, hkv, 2048, d, torch.bfloat16, g)
    q = torch.randn(2, hq, d, generator=g).to(torch.bfloat16).to(DEV)
    start, end = _rows(2, 2048 * 16, g, 16)
    out = score_and_select_triton(q, meta, start, end, 16, 128, 1, 1, "max")
    assert_topk_up_to_ties(out.cpu(), q.cpu(), meta.cpu(), start.cpu(), end.cpu(), 16, 128, 1, 1, "max")


# ---------------------------------------------------------------------------------------------- attention


DECODE_CASES = [
    ("tinyllama", 4 * K, 16, 16, torch.bfloat16), ("tinyllama", 32 * K, 4, 8, torch.bfloat16),
    ("tinyllama", 128 * K, 1, 64, torch.float16), ("tinyllama", 128 * K, 2, 16, torch.bfloat16),
    ("llama3", 4 * K, 16, 8, torch.float16), ("llama3", 32 * K, 4, 16, torch.bfloat16),
    ("llama3", 128 * K, 1, 32, torch.bfloat16), ("llama3", 8 * K, 16, 64, torch.bfloat16),
]


@pytest.mark.parametrize("name,length,batch,ps,dtype", DECODE_CASES)
def test_gpu_sparse_decode(name, length, batch, ps, dtype):
    hq, hkv, d = SHAPES[name]
    g = torch.Generator(device=DEV).manual_seed(length + ps)
    k = torch.randn(batch, hkv, length, d, generator=g, device=DEV).to(dtype)
    v = torch.randn(batch, hkv, length, d, generator=g, device=DEV).to(dtype)
    q = (torch.randn(batch, hq, d, generator=g, device=DEV) * 2).to(dtype)
    start, end = _rows(batch, length - 5, torch.Generator().manual_seed(ps), ps)
    pages = length // ps
    for budget in (1024, 4096):
        n = budget // ps
        scores = torch.rand(batch, hkv, pages, generator=g, device=DEV)
        idx = ref.select_pages(scores, start, end, ps, n, 1, 1)
        idx[0, 0, -3:] = -1  # padding inside a row
        # the merge kernel over every split in one tile (default), in chunks of 4, and the inline merge
        # and two other attention plans (64- and 32-token blocks, 3 and 4 stages)
        for softcap, merge, chunk, plan in ((0.0, "kernel", None, {}), (30.0, "kernel", None, {}), (0.0, "kernel", 4, {}),
                                            (0.0, "inline", None, {}), (0.0, "kernel", None, dict(block_n=64, num_stages=3)),
                                            (0.0, "inline", None, dict(block_n=32, num_stages=4))):
            _poison(batch * hq * d, dtype)
            out = sparse_decode_attention_triton(q, k, v, idx, start, end, ps, d**-0.5, softcap, merge=merge, merge_chunk=chunk, **plan)
            expect = ref.sparse_decode_attention(q.float(), k.float(), v.float(), idx, start, end, ps, d**-0.5, softcap)
            assert not torch.isnan(out).any()
            err = ((out.float() - expect).norm() / expect.norm()).item()
            assert err < 1e-2, (err, merge)


@pytest.mark.parametrize("d", [80, 96, 256])
@pytest.mark.parametrize("g_size", [1, 4, 7])
def test_gpu_sparse_decode_odd_head_dims(d, g_size):
    g = torch.Generator(device=DEV).manual_seed(d)
    b, hkv, cap, ps = 3, 2, 4096, 16
    k = torch.randn(b, hkv, cap, d, generator=g, device=DEV).to(torch.bfloat16)
    v = torch.randn(b, hkv, cap, d, generator=g, device=DEV).to(torch.bfloat16)
    q = torch.randn(b, hkv * g_size, d, generator=g, device=DEV).to(torch.bfloat16)
    start = torch.tensor([0, 100, 50], dtype=torch.int32, device=DEV)
    end = torch.tensor([4000, 3000, 50], dtype=torch.int32, device=DEV)  # the last row is empty
    idx = ref.select_pages(torch.rand(b, hkv, cap // ps, generator=g, device=DEV), start, end, ps, 64, 1, 1)
    expect = ref.sparse_decode_attention(q.float(), k.float(), v.float(), idx, start, end, ps, d**-0.5)
    for merge in ("kernel", "inline"):  # inline at d=256, 7 heads: 32 splits; 64 splits: chunked merge tiles
        out = sparse_decode_attention_triton(q, k, v, idx, start, end, ps, d**-0.5, 0.0, merge=merge)
        assert ((out.float() - expect).norm() / expect.norm()).item() < 1e-2, merge
        assert (out[2] == 0).all()
        out = sparse_decode_attention_triton(q, k, v, idx, start, end, ps, d**-0.5, 0.0, merge=merge, num_splits=64, block_n=16)
        assert ((out.float() - expect).norm() / expect.norm()).item() < 1e-2, merge
        assert (out[2] == 0).all()


def test_gpu_fp32_paths():
    g = torch.Generator(device=DEV).manual_seed(3)
    b, hkv, hq, d, cap, ps = 2, 2, 8, 64, 1024, 16
    k = torch.randn(b, hkv, cap, d, generator=g, device=DEV)
    v = torch.randn(b, hkv, cap, d, generator=g, device=DEV)
    q = torch.randn(b, hq, d, generator=g, device=DEV)
    start = torch.tensor([0, 7], dtype=torch.int32, device=DEV)
    end = torch.tensor([1000, 900], dtype=torch.int32, device=DEV)
    meta = ref.build_meta(k, 1000, ps)
    s = page_scores_triton(q, meta, start, end, ps, "max")
    e = ref.page_scores(q, meta, start, end, ps, "max")
    fin = torch.isfinite(e)
    torch.testing.assert_close(s[fin], e[fin], rtol=1e-5, atol=1e-4)
    idx = select_pages_triton(s, start, end, ps, 16, 1, 1)
    out = sparse_decode_attention_triton(q, k, v, idx, start, end, ps, 0.125, 0.0)
    torch.testing.assert_close(out, ref.sparse_decode_attention(q, k, v, idx, start, end, ps, 0.125), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- CUDA graphs


def _decode_step(k_cache, v_cache, meta, pos, k_new, v_new, q, seq_start, path: str):
    """Append one token per row at ``pos``, advance ``pos`` in place, score, select, attend (``path``:
    ``split``, ``fused`` score + select, or ``one_op``: ``quest_decode`` as ``patch_model`` runs it)."""
    ops.append_kv(k_cache, v_cache, meta, k_new, v_new, pos)
    pos.add_(1)
    seq_end = pos.clone()
    if path == "one_op":
        return ops.quest_decode(q, k_cache, v_cache, meta, seq_start, seq_end, 16, 8, 1, 1, "max", 0.125, 0.0)
    if path == "fused":
        idx = ops.score_and_select(q, meta, seq_start, seq_end, 16, 8, 1, 1, "max")
    else:
        scores = ops.page_scores(q, meta, seq_start, seq_end, 16, "max")
        idx = ops.select_pages(scores, seq_start, seq_end, 16, 8, 1, 1)
    out = ops.sparse_decode_attention(q, k_cache, v_cache, idx, seq_start, seq_end, 16, 0.125, 0.0)
    return out, idx


@pytest.mark.parametrize("path", ["split", "fused", "one_op"])
def test_gpu_reduce_overhead_decode_loop_matches_eager(path):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator(device=DEV).manual_seed(11)
    b, hkv, hq, d, cap, ps = 2, 4, 16, 64, 1024, 16
    k = torch.zeros(b, hkv, cap, d, dtype=torch.bfloat16, device=DEV)
    v = torch.zeros_like(k)
    meta = torch.zeros(b, hkv, cap // ps, 2, d, dtype=torch.bfloat16, device=DEV)
    pos = torch.zeros(b, dtype=torch.int32, device=DEV)
    prompt = torch.randn(b, hkv, 200, d, generator=g, device=DEV).to(torch.bfloat16)
    ops.append_kv(k, v, meta, prompt, prompt, torch.tensor([0, -37], dtype=torch.int32, device=DEV))
    pos.copy_(torch.tensor([200, 163], dtype=torch.int32))
    seq_start = torch.tensor([0, 20], dtype=torch.int32, device=DEV)
    eager_bufs = [t.clone() for t in (k, v, meta, pos)]
    for t in (k, v, meta, pos):
        torch._dynamo.mark_static_address(t)
    step = torch.compile(_decode_step, mode="reduce-overhead", fullgraph=True)
    for i in range(20):
        k_new = torch.randn(b, hkv, 1, d, generator=g, device=DEV).to(torch.bfloat16)
        v_new = torch.randn(b, hkv, 1, d, generator=g, device=DEV).to(torch.bfloat16)
        q = torch.randn(b, hq, d, generator=g, device=DEV).to(torch.bfloat16)
        out, idx = step(k, v, meta, pos, k_new, v_new, q, seq_start, path)
        out, idx = out.clone(), idx.clone()
        e_out, e_idx = _decode_step(*eager_bufs, k_new, v_new, q, seq_start, path)
        assert torch.equal(idx, e_idx), i
        torch.testing.assert_close(out, e_out, rtol=0, atol=0)
    assert torch.equal(pos, eager_bufs[3]) and int(pos[0]) == 220
    for got, exp in zip((k, v, meta), eager_bufs[:3]):
        assert torch.equal(got, exp)
    assert counters["inductor"]["cudagraph_skips"] == 0


# ---------------------------------------------------------------------------------------------- row-chained


def test_gpu_chained_decode_equals_split_eager_and_graphed():
    """The row-chained decode (ops/triton_chain.py: per-row flags instead of grid-wide waits) returns the
    split chain's pages and output bit for bit, eagerly and from a replayed CUDA graph, and re-arms its
    counters. Run in a subprocess with a timeout: a wrong wait hangs the GPU instead of failing."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("chained_check.py")
    try:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the chained decode did not finish in 240 s (a wait that never passes?): {e.stdout!r}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "chained == split" in proc.stdout


# ---------------------------------------------------------------------------------------------- PDL


def _chain(k, v, meta, pos, k_new, v_new, q, seq_start, merge):
    """append -> score -> select -> attention (merge kernel or inline): every launch of the decode chain."""
    append_kv_triton(k, v, meta, k_new, v_new, pos)
    seq_end = pos + 1
    scores = page_scores_triton(q, meta, seq_start, seq_end, 16, "max")
    idx = select_pages_triton(scores, seq_start, seq_end, 16, 24, 1, 2)
    fused = score_and_select_triton(q, meta, seq_start, seq_end, 16, 24, 1, 2, "max", blocks_per_program=1)  # 4 programs per row
    out = sparse_decode_attention_triton(q, k, v, idx, seq_start, seq_end, 16, 0.125, merge=merge)
    return scores, idx, fused, out


@pytest.mark.parametrize("merge", ["kernel", "inline"])
def test_gpu_pdl_launches_equal_plain_launches_eager_and_graphed(monkeypatch, merge):
    """Programmatic dependent launch (on by default on Hopper) changes when a kernel may start, never its
    result: the chain with and without it, eagerly and replayed from a CUDA graph, is bit-identical."""
    from tinyserve_patch.ops._triton_common import use_pdl

    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert use_pdl(torch.device(DEV)) == hopper
    g = torch.Generator(device=DEV).manual_seed(5)
    b, hkv, hq, d, cap = 3, 8, 32, 128, 4096
    k0 = torch.randn(b, hkv, cap, d, generator=g, device=DEV).to(torch.bfloat16)
    v0 = torch.randn(b, hkv, cap, d, generator=g, device=DEV).to(torch.bfloat16)
    meta0 = torch.zeros(b, hkv, cap // 16, 2, d, dtype=torch.bfloat16, device=DEV)
    pos = torch.tensor([3000, 1777, 4000], dtype=torch.int32, device=DEV)
    append_kv_triton(k0, v0, meta0, k0, v0, torch.zeros(1, dtype=torch.int32, device=DEV))
    seq_start = torch.tensor([0, 100, 0], dtype=torch.int32, device=DEV)
    k_new = torch.randn(b, hkv, 1, d, generator=g, device=DEV).to(torch.bfloat16)
    q = torch.randn(b, hq, d, generator=g, device=DEV).to(torch.bfloat16)

    def run(pdl: str, graphed: bool):
        monkeypatch.setenv("TINYSERVE_PDL", pdl)
        bufs = [t.clone() for t in (k0, v0, meta0)]
        if not graphed:
            return bufs, _chain(*bufs, pos, k_new, k_new, q, seq_start, merge)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up compiles outside the capture
            _chain(*[t.clone() for t in bufs], pos, k_new, k_new, q, seq_start, merge)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            res = _chain(*bufs, pos, k_new, k_new, q, seq_start, merge)
        graph.replay()  # the append rewrites the same token: replay is idempotent
        torch.cuda.synchronize()
        return bufs, res

    base_bufs, base = run("0", False)
    for pdl, graphed in (("1", False), ("1", True), ("0", True)):
        bufs, res = run(pdl, graphed)
        for x, y in zip(bufs + list(res), base_bufs + list(base)):
            assert torch.equal(x, y), (pdl, graphed)


@pytest.mark.parametrize("fused,tma", [(False, False), (False, True), (True, False)])
def test_gpu_score_right_after_append_sees_the_appended_metadata(monkeypatch, fused, tma):
    """The score kernels prefetch their query and metadata into L2 before their PDL wait, while the append
    launched just before them may still be widening the last page's bounds. Step after step (no sync
    between the launches; a fresh query each step), every score / selection equals the one made with PDL
    off, where each launch starts after the previous one ended; the appended keys grow, so a stale bound
    would change both."""
    g = torch.Generator(device=DEV).manual_seed(9)
    b, hkv, hq, d, cap, ps, steps = 3, 8, 32, 128, 8192, 16, 24
    prompt = torch.randn(b, hkv, 3000, d, generator=g, device=DEV).to(torch.bfloat16)
    seq_start = torch.tensor([0, 40, 0], dtype=torch.int32, device=DEV)
    pos = [torch.tensor([3000 + i, 2500 + i, 4100 + 2 * i], dtype=torch.int32, device=DEV) for i in range(steps)]
    ends = [p + 1 for p in pos]
    k_new = [(torch.randn(b, hkv, 1, d, generator=g, device=DEV) * (4 + i)).to(torch.bfloat16) for i in range(steps)]
    qs = [torch.randn(b, hq, d, generator=g, device=DEV).to(torch.bfloat16) for _ in range(steps)]
    q = torch.empty_like(qs[0])

    def run(pdl: str):
        monkeypatch.setenv("TINYSERVE_PDL", pdl)
        k = torch.zeros(b, hkv, cap, d, dtype=torch.bfloat16, device=DEV)
        meta = torch.zeros(b, hkv, cap // ps, 2, d, dtype=torch.bfloat16, device=DEV)
        append_kv_triton(k, k, meta, prompt, prompt, torch.zeros(1, dtype=torch.int32, device=DEV))
        torch.cuda.synchronize()
        outs = []
        for i in range(steps):
            q.copy_(qs[i])
            append_kv_triton(k, k, meta, k_new[i], k_new[i], pos[i])
            if fused:
                outs.append(score_and_select_triton(q, meta, seq_start, ends[i], ps, 16, 0, 0, "max", blocks_per_program=1,
                                                    prefetch=True))
            else:
                outs.append(page_scores_triton(q, meta, seq_start, ends[i], ps, "max", prefetch=True, tma=tma))
        torch.cuda.synchronize()
        return outs, meta

    plain, meta = run("0")
    got, _ = run("1")
    for i, (x, y) in enumerate(zip(got, plain)):
        assert torch.equal(x, y), i
    last_page = (pos[-1] // ps).long()
    if fused:  # the widened last page is selected in every row: a stale bound would not have been
        assert all(bool((got[-1][r] == last_page[r]).any(dim=-1).all()) for r in range(b))
    else:
        expect = ref.page_scores(q, meta, seq_start, ends[-1], ps, "max")
        fin = torch.isfinite(expect)
        torch.testing.assert_close(got[-1][fin], expect[fin], rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------------------------------------- trace


@pytest.mark.parametrize("chained", [False, True])
def test_gpu_traced_launches_equal_untraced_and_stamp_every_program(chained):
    """A kernel trace (ops/trace.py: each program stores the global timer at start / ready / end and its
    SM) changes no result; every program of the four launches leaves start <= ready <= end stamps on a
    real SM, and each kernel's programs are ready no earlier than the previous kernel's first end."""
    from tinyserve_patch.ops.trace import KernelTrace
    from tinyserve_patch.ops.triton_chain import quest_decode_chained_triton

    g = torch.Generator().manual_seed(5)
    hq, hkv, d = SHAPES["llama3"]
    b, length, ps, n = 2, 4096, 16, 32
    k = torch.randn(b, hkv, length, d, generator=g).to(DEV, torch.bfloat16)
    v = torch.randn(b, hkv, length, d, generator=g).to(DEV, torch.bfloat16)
    q = torch.randn(b, hq, d, generator=g).to(DEV, torch.bfloat16)
    paged = k.view(b, hkv, length // ps, ps, d)
    meta = torch.stack([paged.amin(3), paged.amax(3)], dim=3).contiguous()
    start = torch.zeros(b, dtype=torch.int32, device=DEV)
    end = torch.tensor([length, length - 100], dtype=torch.int32, device=DEV)

    def run(trace=None):
        if chained:
            return quest_decode_chained_triton(q, k, v, meta, start, end, ps, n, 1, 1, "max", d**-0.5, trace=trace)
        s = page_scores_triton(q, meta, start, end, ps, "max", trace=trace)
        idx = select_pages_triton(s, start, end, ps, n, 1, 1, trace=trace)
        return sparse_decode_attention_triton(q, k, v, idx, start, end, ps, d**-0.5, trace=trace), idx

    plain_out, plain_idx = run()
    trace = KernelTrace(DEV)
    out, idx = run(trace)
    assert torch.equal(out, plain_out) and torch.equal(idx, plain_idx)
    recs = trace.records()
    assert [r["kernel"] for r in recs] == ["score", "select", "attention", "merge"]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    prev_first_end = None
    for r in recs:
        assert len(r["start"]) >= 1
        for s_, rd, e, sm in zip(r["start"], r["ready"], r["end"], r["sm"]):
            assert 0 < s_ <= rd <= e and 0 <= sm < sms
        if prev_first_end is not None:
            assert max(r["ready"]) >= prev_first_end
        prev_first_end = min(r["end"])
