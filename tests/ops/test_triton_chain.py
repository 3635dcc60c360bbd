"""quest_decode_chained_triton == the split chain (score -> select -> attention), bit for bit, and leaves its
row counters zeroed (re-armed) after every call, a failed one included.

Under the CPU interpreter the three grids run one after another, so every wait passes at once: these
tests pin the results and the counter protocol; the overlap itself is a GPU matter
(``tests/gpu/test_gpu_kernels.py``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve_patch.ops import reference as ref
from tinyserve_patch.ops import triton_chain
from tinyserve_patch.ops._triton_common import ticket_counters
from tinyserve_patch.ops.triton_chain import fused_chain_plan, quest_decode_chained_triton
from tinyserve_patch.ops.triton_decode import sparse_decode_attention_triton
from tinyserve_patch.ops.triton_fused_select import score_and_select_triton
from tinyserve_patch.ops.triton_score import page_scores_triton
from tinyserve_patch.ops.triton_select import select_pages_triton
from tests.ops.kernel_cases import cache, gen, randn, rows

# The interpreter runs only where there is no CUDA (tests/conftest.py); on a GPU machine the chained
# kernels are tested in tests/gpu, in a subprocess with a timeout (a wrong wait hangs rather than fails).
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter only; GPU runs: tests/gpu")


def _split(q, k, v, meta, start, end, ps, n, sink, recent, red, scale, softcap=0.0, merge=None, fused=False):
    splits = None
    if fused:  # the fused score + select kernel, then the attention with the fused chain's splits
        idx = score_and_select_triton(q, meta, start, end, ps, n, sink, recent, red)
        splits = fused_chain_plan(k.shape[0] * k.shape[1], meta.shape[2], n, ps, k.shape[3], k.device)["num_splits"]
    else:
        scores = page_scores_triton(q, meta, start, end, ps, red)
        idx = select_pages_triton(scores, start, end, ps, n, sink, recent)
    return sparse_decode_attention_triton(q, k, v, idx, start, end, ps, scale, softcap, merge=merge, num_splits=splits), idx


def _case(b, h, g, d, ps, cap, dtype, seed, meta_dtype=None):
    gn = gen(seed)
    k, v, _ = cache(b, h, cap, d, ps, dtype, gn, device="cpu")
    start, end = rows(b, cap, gn, empty_row=b > 2, device="cpu")
    meta = ref.build_meta(k, cap, ps, dtype=meta_dtype) if meta_dtype else ref.build_meta(k, cap, ps)
    return randn((b, h * g, d), dtype, gn, device="cpu"), k, v, meta, start, end


def _armed(device) -> int:
    """Non-zero chain counters left behind (0: every row re-armed)."""
    return int(ticket_counters(torch.device(device), 1, pool="chain").count_nonzero())


@pytest.mark.parametrize("b,h,g,d,ps,cap,n", [
    (3, 2, 4, 32, 8, 256, 5), (1, 2, 2, 64, 16, 96, 2), (2, 1, 1, 16, 64, 512, 3),
    (2, 1, 2, 16, 8, 2048, 10),  # 256 pages: 4 score programs per row, each counted before the selection
])
@pytest.mark.parametrize("merge,fused", [("kernel", False), ("inline", False), ("kernel", True)])
def test_chained_equals_split_chain(b, h, g, d, ps, cap, n, merge, fused):
    """Fused: the fused score + select kernel flags each row as it selects it (the last score program of
    the row selects), against the fused kernel followed by the plain attention."""
    q, k, v, meta, start, end = _case(b, h, g, d, ps, cap, torch.float32, 3 + n)
    for _ in range(2):  # a second call on the re-armed counters
        out, idx = quest_decode_chained_triton(q, k, v, meta, start, end, ps, n, 1, 1, "max", d**-0.5, merge=merge, fused=fused)
        expect_out, expect_idx = _split(q, k, v, meta, start, end, ps, n, 1, 1, "max", d**-0.5, merge=merge, fused=fused)
        assert torch.equal(idx, expect_idx)
        assert torch.equal(out, expect_out)
        assert _armed(q.device) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chained_half_precision_sum_softcap_fp8_meta(dtype):
    for meta_dtype in (None, torch.float8_e4m3fn):
        q, k, v, meta, start, end = _case(3, 2, 2, 32, 8, 128, dtype, 11, meta_dtype)
        out, idx = quest_decode_chained_triton(q, k, v, meta, start, end, 8, 4, 1, 2, "sum", 0.2, softcap=30.0)
        expect_out, expect_idx = _split(q, k, v, meta, start, end, 8, 4, 1, 2, "sum", 0.2, 30.0)
        assert torch.equal(idx, expect_idx) and torch.equal(out, expect_out)
        assert _armed(q.device) == 0


@settings(max_examples=8, deadline=None)
@given(
    b=st.integers(1, 3), h=st.integers(1, 3), g=st.sampled_from([1, 2, 4]), pages=st.integers(2, 40),
    n=st.integers(1, 14), seed=st.integers(0, 2**16),
)
def test_chained_equals_split_chain_random_shapes(b, h, g, pages, n, seed):
    q, k, v, meta, start, end = _case(b, h, g, 16, 8, pages * 8, torch.float32, seed)
    out, idx = quest_decode_chained_triton(q, k, v, meta, start, end, 8, n, 1, 1, "max", 0.25)
    expect_out, expect_idx = _split(q, k, v, meta, start, end, 8, n, 1, 1, "max", 0.25)
    assert torch.equal(idx, expect_idx) and torch.equal(out, expect_out)
    assert _armed(q.device) == 0


def test_chained_failure_part_way_leaves_no_row_armed(monkeypatch):
    """A launch that fails after the score grid counted its rows must not leave a counter set (the next
    call's selection would pass its wait too early)."""
    q, k, v, meta, start, end = _case(2, 2, 2, 16, 8, 128, torch.float32, 7)

    def broken_select(*args, **kwargs):
        raise RuntimeError("launch failed")

    monkeypatch.setattr(triton_chain, "select_pages_triton", broken_select)
    with pytest.raises(RuntimeError, match="launch failed"):
        quest_decode_chained_triton(q, k, v, meta, start, end, 8, 3, 1, 1, "max", 0.25)
    assert _armed(q.device) == 0
    monkeypatch.undo()
    out, idx = quest_decode_chained_triton(q, k, v, meta, start, end, 8, 3, 1, 1, "max", 0.25)
    expect_out, expect_idx = _split(q, k, v, meta, start, end, 8, 3, 1, 1, "max", 0.25)
    assert torch.equal(idx, expect_idx) and torch.equal(out, expect_out)


def test_chained_without_counters_runs_the_split_chain(monkeypatch):
    """No persistent counters (a first call inside a CUDA-graph capture): the split chain, same results."""
    q, k, v, meta, start, end = _case(2, 2, 2, 16, 8, 128, torch.float32, 9)
    monkeypatch.setattr(triton_chain, "ticket_counters", lambda *args, **kwargs: None)
    out, idx = quest_decode_chained_triton(q, k, v, meta, start, end, 8, 3, 1, 1, "max", 0.25)
    expect_out, expect_idx = _split(q, k, v, meta, start, end, 8, 3, 1, 1, "max", 0.25)
    assert torch.equal(idx, expect_idx) and torch.equal(out, expect_out)


def test_chain_counters_are_their_own_pool():
    dev = torch.device("cpu")
    assert ticket_counters(dev, 8, pool="chain").data_ptr() != ticket_counters(dev, 8).data_ptr()


def test_fused_chain_plan_keeps_score_occupancy_and_doubles_splits():
    """The fused chain's defaults: a register cap that fits 3 CTAs per SM, twice the split chain's
    attention programs, the inline merge up to 8 splits (from the H200 timeline sweep)."""
    from tinyserve_patch.ops.triton_decode import plan_splits

    dev = torch.device("cpu")  # 132 SMs (an H100's) for the interpreter
    big = fused_chain_plan(64, 4096, 128, 16, 128, dev)  # Llama-3-8B B=8 / 64K / 2048: 8 warps
    assert big["maxnreg"] == 80 and 3 * 256 * 80 <= 65536
    assert big["num_splits"] == 2 * plan_splits(64, 128, 16, 128, 132)[0] == 8 and big["merge"] == "inline"
    small = fused_chain_plan(4, 1024, 256, 16, 64, dev)  # TinyLlama B=1 / 16K / 4096: 4 warps, 32 splits
    assert small["maxnreg"] == 168 and small["num_splits"] == 32 and small["merge"] == "kernel"


def test_fused_chain_options_reach_the_fused_kernel():
    """fused_options (tuning) change the fused launch, not the answer: 1 block per program and the finish
    step give the fused chain's pages and output."""
    q, k, v, meta, start, end = _case(2, 1, 2, 16, 8, 2048, torch.float32, 21)
    want_out, want_idx = _split(q, k, v, meta, start, end, 8, 10, 1, 1, "max", 0.25, fused=True)
    out, idx = quest_decode_chained_triton(q, k, v, meta, start, end, 8, 10, 1, 1, "max", 0.25, fused=True,
                                           merge="kernel", fused_options={"blocks_per_program": 1, "finish": 16})
    assert torch.equal(idx, want_idx) and torch.equal(out, want_out)
    assert _armed(q.device) == 0
    with pytest.raises(TypeError):
        quest_decode_chained_triton(q, k, v, meta, start, end, 8, 10, 1, 1, "max", 0.25, fused=True,
                                    fused_options={"no_such_option": 1})


# ------------------------------------------------------------------------------- quest_decode_triton (one op)


@pytest.mark.parametrize("path", ["split", "fused", "auto"])
def test_quest_decode_paths_give_their_chains_bits(path):
    """Each path of the one-op decode gives its chain's pages and output; ``auto`` on a device without PDL
    (the interpreter) is the split chain."""
    q, k, v, meta, start, end = _case(3, 2, 2, 32, 8, 256, torch.float32, 31)
    out, idx = triton_chain.quest_decode_triton(q, k, v, meta, start, end, 8, 5, 1, 1, "max", 0.2, 0.0, path)
    want_out, want_idx = _split(q, k, v, meta, start, end, 8, 5, 1, 1, "max", 0.2, fused=path == "fused")
    assert torch.equal(idx, want_idx) and torch.equal(out, want_out)
    expect_idx = ref.select_pages(ref.page_scores(q, meta, start, end, 8, "max"), start, end, 8, 5, 1, 1)
    assert torch.equal(idx, expect_idx)
    torch.testing.assert_close(out, ref.sparse_decode_attention(q, k, v, idx, start, end, 8, 0.2), rtol=1e-5, atol=1e-5)
    assert _armed(q.device) == 0
    with pytest.raises(ValueError, match="path='chained'"):
        triton_chain.quest_decode_triton(q, k, v, meta, start, end, 8, 5, 1, 1, "max", 0.2, 0.0, "chained")


LLAMA3, TINYLLAMA = (8, 128), (4, 64)  # (kv_heads, head_dim)


@pytest.mark.parametrize("model,batch,tokens,fused", [
    # the fused chain where it was faster on the H100 (kernels_h100_9c08c6f.json): Llama-3-8B B=8 at 64K / 128K
    (LLAMA3, 8, 65536, True), (LLAMA3, 8, 131072, True), (LLAMA3, 16, 65536, True),
    # a score grid under two waves: batch 1, or B=8 at 16K
    (LLAMA3, 1, 65536, False), (LLAMA3, 1, 131072, False), (LLAMA3, 8, 16384, False), (LLAMA3, 4, 65536, False),
    # head_dim 64 loses even with 2.6 waves (TinyLlama B=8 / 128K)
    (TINYLLAMA, 8, 131072, False), (TINYLLAMA, 8, 65536, False),
])
def test_prefer_fused_chain_rule(monkeypatch, model, batch, tokens, fused):
    """The ``auto`` rule on a Hopper-like device (PDL, 132 SMs): the shapes measured, and what keeps the
    split chain (no PDL, fp8 storage)."""
    monkeypatch.setattr(triton_chain, "use_pdl", lambda device: True)
    monkeypatch.setattr(triton_chain, "sm_count", lambda device: 132)
    monkeypatch.setattr("tinyserve_patch.ops.triton_score.sm_count", lambda device: 132)  # plan_walk's
    hkv, d = model
    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn
    dev = torch.device("cuda")
    assert triton_chain.prefer_fused_chain(batch * hkv, tokens // 16, d, bf16, bf16, bf16, dev) is fused
    assert not triton_chain.prefer_fused_chain(batch * hkv, tokens // 16, d, bf16, bf16, fp8, dev)
    assert not triton_chain.prefer_fused_chain(batch * hkv, tokens // 16, d, bf16, fp8, bf16, dev)
    monkeypatch.setattr(triton_chain, "use_pdl", lambda device: False)
    assert not triton_chain.prefer_fused_chain(batch * hkv, tokens // 16, d, bf16, bf16, bf16, dev)
