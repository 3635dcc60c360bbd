"""page_scores_triton vs reference.page_scores (fp32 sums in another order: ulp-level tolerance)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve_patch.ops import reference as ref
from tinyserve_patch.ops.triton_score import page_scores_triton
from tests.ops.kernel_cases import DEVICE, cache, gen, randint, randn, rows


def _check(q, meta, start, end, ps, red, exact=False, **launch):
    out = page_scores_triton(q, meta, start, end, ps, red, **launch)
    expect = ref.page_scores(q, meta, start, end, ps, red)
    assert out.dtype == torch.float32 and out.shape == expect.shape
    assert torch.equal(torch.isneginf(out), torch.isneginf(expect))
    finite = torch.isfinite(expect)
    if exact:
        assert torch.equal(out[finite], expect[finite])
    else:
        torch.testing.assert_close(out[finite], expect[finite], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,g,d,ps,cap", [(2, 2, 4, 64, 8, 128), (1, 2, 1, 16, 16, 64), (2, 1, 2, 32, 8, 96), (1, 1, 3, 80, 8, 64)])
@pytest.mark.parametrize("red", ["max", "sum"])
def test_scores_match_reference(dtype, b, h, g, d, ps, cap, red):
    gn = gen(3)
    _, _, meta = cache(b, h, cap, d, ps, dtype, gn, length=cap - 5)
    q = randn((b, h * g, d), dtype, gn)
    start, end = rows(b, cap - 5, gn, empty_row=True)
    _check(q, meta, start, end, ps, red)


def test_scores_exact_on_integer_inputs():
    gn = gen(4)
    _, _, meta = cache(2, 2, 128, 32, 8, torch.bfloat16, gn, integer=True)
    q = randint(-3, 4, (2, 8, 32), torch.bfloat16, gn)
    start, end = rows(2, 128, gn)
    for red in ("max", "sum"):
        _check(q, meta, start, end, 8, red, exact=True)


def test_scores_many_pages_multiple_programs():
    """P > BLOCK_P: several page blocks per (row, head); noncontiguous q."""
    gn = gen(5)
    _, _, meta = cache(1, 2, 1024, 16, 8, torch.float16, gn)
    q = randn((1, 16, 4), torch.float16, gn).transpose(1, 2)  # [1, 4, 16] view, stride(-1) != 1
    start = torch.tensor([100], dtype=torch.int32, device=DEVICE)
    end = torch.tensor([1000], dtype=torch.int32, device=DEVICE)
    _check(q, meta, start, end, 8, "max")


@pytest.mark.parametrize("per", [1, 2, 3, 5, 100])
def test_scores_blocks_per_program(per):
    """A program walking ``per`` page blocks (a ragged last program too) gives every page's score once."""
    gn = gen(7)
    _, _, meta = cache(2, 2, 1024, 16, 8, torch.bfloat16, gn)  # 128 pages: 8 blocks of 16 per (row, head)
    q = randn((2, 4, 16), torch.bfloat16, gn)
    start, end = rows(2, 1000, gn)
    _check(q, meta, start, end, 8, "max", block_p=16, blocks_per_program=per)


def test_default_launch():
    """About one program per SM, at most 4 blocks each, 4 warps; pipelined over 3 stages (2 over fp8
    metadata or for one block); 8 blocks where 4 would fill between half and all of one
    wave (model-dtype metadata)."""
    from tinyserve_patch.ops.triton_score import default_launch, resident_programs, score_shared_bytes, walk_stages

    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn
    assert default_launch(64, 132, bf16) == (1, 4, 2)  # TinyLlama B=1 / 16K: a one-iteration pipelined walk
    assert default_launch(256, 132, bf16) == (2, 4, 3)  # TinyLlama B=1 / 64K
    assert default_launch(512, 132, bf16) == (4, 4, 3)  # Llama-3-8B B=1 / 64K
    assert default_launch(4096, 132, fp8) == (4, 4, 2)  # Llama-3-8B B=8 / 64K
    assert default_launch(64, 132, fp8) == (1, 4, 2)
    assert default_launch(1024, 132, bf16, 64, 128) == (8, 4, 3)  # Llama-3-8B B=1 / 128K, B=8 / 16K: 256 of 396 slots
    assert default_launch(2048, 132, bf16, 64, 64) == (8, 4, 3)  # TinyLlama B=8 / 64K: 512 of 792
    assert default_launch(4096, 132, bf16, 64, 64) == (4, 4, 3)  # TinyLlama B=8 / 128K: 1.3 waves
    assert default_launch(1024, 132, fp8, 64, 128) == (4, 4, 2)  # fp8 metadata keeps the rule
    assert score_shared_bytes(64, 128, 2, 3) == 73984 and score_shared_bytes(64, 64, 2, 3) == 37120  # the sm_90 compile
    assert resident_programs(132, 73984, 4) == 396
    for n in range(1, 20000, 37):
        per = default_launch(n, 132, bf16, 64, 128)[0]
        assert 1 <= per <= 8
        if per == 8:  # only where 4 blocks a program would fill more than half of one wave, not more
            assert 396 < 2 * -(-n // 4) <= 792
    assert [walk_stages(per, bf16) for per in (1, 2, 8)] == [2, 3, 3]  # an override of the walk keeps the rule


def test_prefetch_plan():
    """L2 prefetches only on a PDL launch (the interpreter never gets one: it runs no inline PTX): one
    prefetch a warp of its share of the walk, over at most 8 MiB of metadata, or of its walk's first 4 KB
    above (the fused kernel: none above); and the query group (where its rows are compact); forced to whole
    walks or off."""
    from tinyserve_patch.ops._triton_common import use_pdl
    from tinyserve_patch.ops.triton_score import PREFETCH_BYTES, PREFETCH_HEAD_BYTES, launch_prefetch, prefetch_plan

    tiny_b1_128k, llama_b1_64k = 4 * 8192 * 2 * 64 * 2, 8 * 4096 * 2 * 128 * 2  # 8 MiB, 16 MiB
    assert PREFETCH_HEAD_BYTES == 4096 and PREFETCH_BYTES == 65536
    assert prefetch_plan(True, 4, tiny_b1_128k) == dict(PREFETCH=4, PREFETCH_BYTES=PREFETCH_BYTES, PREFETCH_Q=True)
    assert prefetch_plan(True, 4, llama_b1_64k) == dict(PREFETCH=4, PREFETCH_BYTES=PREFETCH_HEAD_BYTES, PREFETCH_Q=True)
    assert prefetch_plan(True, 8, llama_b1_64k, head=False)["PREFETCH"] == 0  # the fused kernel's plan
    assert not prefetch_plan(True, 8, llama_b1_64k, head=False)["PREFETCH_Q"]
    assert prefetch_plan(True, 8, tiny_b1_128k, head=False)["PREFETCH"] == 8
    assert prefetch_plan(True, 8, llama_b1_64k, prefetch=True) == dict(PREFETCH=8, PREFETCH_BYTES=PREFETCH_BYTES, PREFETCH_Q=True)
    assert prefetch_plan(True, 4, 1024, prefetch=False)["PREFETCH"] == 0
    assert not prefetch_plan(True, 4, 1024, prefetch=False)["PREFETCH_Q"]
    assert prefetch_plan(True, 4, 1024, query_compact=False) == dict(PREFETCH=4, PREFETCH_BYTES=PREFETCH_BYTES, PREFETCH_Q=False)
    for forced in (None, True, False):
        plan = prefetch_plan(False, 4, 1024, prefetch=forced)
        assert plan["PREFETCH"] == 0 and not plan["PREFETCH_Q"]
    assert not use_pdl(torch.device("cpu"))
    # a launch's query group: compact when its G rows lie within twice their bytes
    meta = torch.empty(1, 8, 1024, 2, 128, dtype=torch.bfloat16, device="meta")
    q = torch.empty(1, 32, 128, dtype=torch.bfloat16, device="meta")
    assert launch_prefetch(True, 4, q, meta, 4, None)["PREFETCH_Q"]
    spread = torch.empty(1, 32, 1024, dtype=torch.bfloat16, device="meta")[..., :128]  # heads 1024 apart
    assert not launch_prefetch(True, 4, spread, meta, 4, None)["PREFETCH_Q"]


def test_scores_reject_bad_input():
    gn = gen(6)
    _, _, meta = cache(1, 1, 32, 16, 8, torch.float32, gn)
    q = randn((1, 2, 16), torch.float32, gn)
    se = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        page_scores_triton(q.half(), meta, se, se, 8, "max")
    with pytest.raises(ValueError, match="gqa_reduction"):
        page_scores_triton(q, meta, se, se, 8, "mean")
    with pytest.raises(ValueError, match="page_size"):
        page_scores_triton(q, meta, se, se, 12, "max")
    big = torch.zeros(1, 1, 4, 2, 512, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        page_scores_triton(torch.zeros(1, 1, 512, device=DEVICE), big, se, se, 8, "max")


@settings(max_examples=12, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 2),
    g=st.sampled_from([1, 2, 4]),
    d=st.sampled_from([16, 32, 64]),
    ps=st.sampled_from([8, 16]),
    pages=st.integers(1, 8),
    red=st.sampled_from(["max", "sum"]),
    seed=st.integers(0, 10_000),
    pages_major=st.booleans(),
)
def test_scores_hypothesis(b, h, g, d, ps, pages, red, seed, pages_major):
    gn = gen(seed)
    cap = pages * ps
    _, _, meta = cache(b, h, cap, d, ps, torch.bfloat16, gn)
    q = randn((b, h * g, d), torch.bfloat16, gn)
    start, end = rows(b, cap, gn, empty_row=seed % 3 == 0)
    _check(q, meta, start, end, ps, red, pages_major=pages_major)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("red", ["max", "sum"])
def test_scores_fp8_meta_match_reference(dtype, red):
    """fp8 metadata (outward-rounded) is upcast exactly to q's dtype on load: the same scores as the
    reference on the same fp8 metadata."""
    gn = gen(11)
    k, _, _ = cache(2, 2, 128, 64, 8, dtype, gn)
    meta = ref.build_meta(k, 120, 8, dtype=torch.float8_e4m3fn)
    q = randn((2, 8, 64), dtype, gn)
    start, end = rows(2, 120, gn, empty_row=True)
    _check(q, meta, start, end, 8, red)


@pytest.mark.parametrize("red", ["max", "sum"])
def test_scores_fp8_meta_bf16_query_any_magnitude(red):
    """A bfloat16 query against fp8 metadata is scored in fp16 scaled by a power of two per query group
    (the cheap fp8 -> fp16 upcast): groups whose |q| span 2^-40 .. 2^40, including bf16 subnormals and
    an all-zero group (scores exactly 0), give the reference's scores."""
    gn = gen(12)
    k, _, _ = cache(2, 2, 128, 64, 8, torch.bfloat16, gn)
    meta = ref.build_meta(k, 128, 8, dtype=torch.float8_e4m3fn)
    q = randn((2, 8, 64), torch.float32, gn)
    q = q * torch.exp2(torch.randint(-12, 12, q.shape, generator=gn).float()).to(q.device)  # per-element magnitudes
    q[0, :4] *= 2.0**28  # group (0, 0) near the top of fp16's range after no scaling
    q[0, 4:] *= 2.0**-28
    q[1, :4] = 0.0  # group (1, 0): all zero
    q[1, 4:, :8] = 1e-39  # bf16 subnormals beside normal values
    q = q.to(torch.bfloat16)
    start = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    end = torch.full((2,), 128, dtype=torch.int32, device=DEVICE)
    out = page_scores_triton(q, meta, start, end, 8, red)
    expect = ref.page_scores(q, meta, start, end, 8, red)
    assert torch.equal(out[1, 0], torch.zeros_like(out[1, 0]))
    scale = ref.page_scores(q.abs(), meta.float().abs(), start, end, 8, "sum")  # sum of |terms|: the rounding's scale
    assert ((out - expect).abs() <= 1e-6 * scale + 1e-30).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("meta_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_scores_query_inf_nan(meta_dtype):
    """A non-finite query element gives the reference's inf / NaN pattern: a NaN query scores every page
    NaN under both head reductions (relu / min and the group's max keep it), and an infinite one passes
    through the power-of-two scaling of a bf16 query against fp8 metadata."""
    gn = gen(13)
    k, _, _ = cache(1, 2, 64, 32, 8, torch.bfloat16, gn)
    meta = ref.build_meta(k, 64, 8, dtype=meta_dtype)
    q = randn((1, 4, 32), torch.bfloat16, gn)
    q[0, 0, 3] = float("inf")  # KV group 0: an infinite element
    q[0, 2, 5] = float("nan")  # KV group 1: a NaN element
    start = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    end = torch.full((1,), 64, dtype=torch.int32, device=DEVICE)
    for red in ("max", "sum"):
        out = page_scores_triton(q, meta, start, end, 8, red)
        expect = ref.page_scores(q, meta, start, end, 8, red)
        assert torch.equal(torch.isnan(out), torch.isnan(expect))
        assert torch.equal(torch.isposinf(out), torch.isposinf(expect))
        assert torch.equal(torch.isneginf(out), torch.isneginf(expect))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per", [None, 1, 3])
@pytest.mark.parametrize("red", ["max", "sum"])
def test_scores_tma_match_reference(dtype, per, red):
    """The metadata read through a TMA descriptor (``tma=True``; emulated by the interpreter on CPU):
    the same scores, with a walk of one or several blocks, over a view whose pages are strided past the
    slice (the descriptor takes the tensor's own strides; pages past its end come back as zeros and are
    masked), ragged rows and a noncontiguous query."""
    gn = gen(11)
    _, _, full = cache(2, 2, 1024, 16, 8, dtype, gn)  # 128 pages a (row, head)
    meta = full[:, :, :117]  # a view: 117 of the 128 pages
    q = randn((2, 16, 4), dtype, gn).transpose(1, 2)
    start = torch.tensor([3, 100], dtype=torch.int32, device=DEVICE)
    end = torch.tensor([117 * 8 - 5, 600], dtype=torch.int32, device=DEVICE)
    _check(q, meta, start, end, 8, red, tma=True, block_p=16, blocks_per_program=per)


def test_use_tma():
    """Never by default off a CUDA device; forced where the descriptor cannot describe the metadata, a
    clear error; off when told."""
    from tinyserve_patch.ops.triton_score import TMA_MIN_LAUNCH_BYTES, tma_supported, use_tma

    gn = gen(12)
    _, _, meta = cache(1, 2, 256, 64, 16, torch.bfloat16, gn)
    assert meta.nbytes < TMA_MIN_LAUNCH_BYTES
    assert use_tma(meta, 64, None) is (DEVICE == "cuda" and meta.nbytes >= TMA_MIN_LAUNCH_BYTES)
    assert use_tma(meta, 64, False) is False and use_tma(meta, 64, 0) is False  # (0 / 1 from a bench plan)
    if tma_supported(meta, 64):
        assert use_tma(meta, 64, True) is True
    _, _, meta80 = cache(1, 2, 64, 80, 8, torch.bfloat16, gn)  # head_dim 80: a 128-wide tile
    assert not tma_supported(meta80, 128)
    with pytest.raises(ValueError, match="tma=True"):
        page_scores_triton(randn((1, 4, 80), torch.bfloat16, gn), meta80, *rows(1, 60, gn), 8, "max", tma=True)


@pytest.mark.parametrize("q_dtype,fp8", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True)])
def test_scores_tma_equal_cp_async_bitwise(q_dtype, fp8):
    """The two reads of the metadata feed the same products in the same order: equal bits (fp8 metadata
    too, upcast after the copy either way)."""
    gn = gen(13)
    _, _, meta = cache(2, 2, 512, 32, 8, q_dtype, gn)
    if fp8:
        meta = ref.meta_to_fp8(meta)
    q = randn((2, 8, 32), q_dtype, gn)
    start, end = rows(2, 500, gn)
    for per in (1, 2):
        a = page_scores_triton(q, meta, start, end, 8, "max", tma=True, block_p=16, blocks_per_program=per)
        b = page_scores_triton(q, meta, start, end, 8, "max", tma=False, block_p=16, blocks_per_program=per)
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="at most 256 pages"):
        page_scores_triton(q, meta, start, end, 8, "max", tma=True, block_p=512)


def test_row_chained_scores_keep_cp_async_by_default(monkeypatch):
    """The row-chained mode (``signal``) measured slower through the TMA: by default it asks for none,
    while a plain launch leaves the choice to the size rule."""
    from tinyserve_patch.ops import triton_score

    asked = []
    real = triton_score.use_tma
    monkeypatch.setattr(triton_score, "use_tma", lambda meta, block_d, tma: asked.append(tma) or real(meta, block_d, tma))
    gn = gen(14)
    _, _, meta = cache(1, 2, 256, 16, 8, torch.bfloat16, gn)
    q = randn((1, 4, 16), torch.bfloat16, gn)
    start, end = rows(1, 250, gn)
    signal = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    chained = page_scores_triton(q, meta, start, end, 8, "max", signal=signal)
    plain = page_scores_triton(q, meta, start, end, 8, "max")
    assert asked == [False, None]
    assert torch.equal(chained, plain) and signal.tolist() == [32, 32]


@pytest.mark.parametrize("meta_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("red", ["max", "sum"])
def test_scores_pages_major_match_reference(meta_dtype, tma, red):
    """The opt-in pages-major products (``[pages, D] x [D, G]``, warpgroup MMAs on sm_90) give the reference's
    scores over every metadata dtype and both reads, walks of one and several blocks, and a NaN query
    head keeps its pages' scores NaN under ``max``."""
    if tma and meta_dtype == torch.float32:
        pytest.skip("the TMA read is measured and offered for fp16 / bf16 / fp8 metadata")
    gn = gen(21)
    q_dtype = torch.bfloat16 if meta_dtype == torch.float8_e4m3fn else meta_dtype
    k, _, _ = cache(2, 2, 256, 64, 8, q_dtype, gn)
    meta = ref.build_meta(k, 250, 8, dtype=meta_dtype if meta_dtype == torch.float8_e4m3fn else None)
    q = randn((2, 8, 64), q_dtype, gn)
    start, end = rows(2, 250, gn, empty_row=True)
    for per in (1, 2):
        _check(q, meta, start, end, 8, red, block_p=8, blocks_per_program=per, tma=tma, pages_major=True)
    if red == "max":
        q[0, 5, 3] = float("nan")  # (row 0 has pages; row 1 is the empty one)
        out = page_scores_triton(q, meta, start, end, 8, red, block_p=8, tma=tma, pages_major=True)
        assert torch.isnan(out[0, 1]).any()
        assert torch.equal(torch.isnan(out), torch.isnan(ref.page_scores(q, meta, start, end, 8, red)))
