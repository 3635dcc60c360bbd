"""The public ops chain (append -> score -> select -> attend, the fused score+select, and the one-op
``quest_decode``) traces with torch.compile(fullgraph=True) as one graph, with no graph break, and gives the
reference's numbers."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from tinyserve_patch import ops
from tinyserve_patch.ops import reference as ref
from tests.ops.kernel_cases import DEVICE, gen, randn

B, HKV, G, D, PS, CAP, SEL = 2, 2, 2, 16, 8, 64, 3


def decode_step(k_cache, v_cache, meta, k_new, v_new, pos, q, seq_start, seq_end, path: str):
    """``path``: ``split`` (score, select, attend), ``fused`` (score_and_select, attend), ``one_op``
    (quest_decode)."""
    ops.append_kv(k_cache, v_cache, meta, k_new, v_new, pos)
    if path == "one_op":
        return ops.quest_decode(q, k_cache, v_cache, meta, seq_start, seq_end, PS, SEL, 1, 1, "max", D**-0.5)
    if path == "fused":
        idx = ops.score_and_select(q, meta, seq_start, seq_end, PS, SEL, 1, 1, "max")
    else:
        scores = ops.page_scores(q, meta, seq_start, seq_end, PS, "max")
        idx = ops.select_pages(scores, seq_start, seq_end, PS, SEL, 1, 1)
    out = ops.sparse_decode_attention(q, k_cache, v_cache, idx, seq_start, seq_end, PS, D**-0.5)
    return out, idx


def _inputs(seed: int, dtype=torch.float32):
    g = gen(seed)
    k = randn((B, HKV, CAP, D), dtype, g)
    v = randn((B, HKV, CAP, D), dtype, g)
    length = 37
    meta = ref.build_meta(k, length, PS)
    k[:, :, length:] = 0
    v[:, :, length:] = 0
    pos = torch.tensor([length, length - 5], dtype=torch.int32, device=DEVICE)
    k_new = randn((B, HKV, 1, D), dtype, g)
    v_new = randn((B, HKV, 1, D), dtype, g)
    q = randn((B, HKV * G, D), dtype, g)
    seq_start = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)
    seq_end = pos + 1
    return [k, v, meta, k_new, v_new, pos, q, seq_start, seq_end]


def _reference(args):
    k, v, meta, k_new, v_new, pos, q, start, end = [a.clone() for a in args]
    ref.append_kv(k, v, meta, k_new, v_new, pos)
    idx = ref.select_pages(ref.page_scores(q, meta, start, end, PS), start, end, PS, SEL, 1, 1)
    return ref.sparse_decode_attention(q, k, v, idx, start, end, PS, D**-0.5), idx, (k, v, meta)


@pytest.mark.parametrize("path", ["split", "fused", "one_op"])
def test_decode_step_is_one_graph(path):
    torch._dynamo.reset()
    args = _inputs(0)
    explain = torch._dynamo.explain(decode_step)(*[a.clone() for a in args], path)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(decode_step, backend=backend, fullgraph=True)
    compiled(*[a.clone() for a in args], path)
    compiled(*[a.clone() for a in args], path)  # no recompilation
    assert len(graphs) == 1
    names = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any("tinyserve.append_kv" in n for n in names)
    assert any(f"tinyserve.{'quest_decode' if path == 'one_op' else 'sparse_decode'}" in n for n in names)


@pytest.mark.parametrize("path", ["split", "one_op"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_matches_reference(backend, path):
    torch._dynamo.reset()
    args = _inputs(1)
    expect_out, expect_idx, expect_bufs = _reference(args)
    compiled = torch.compile(decode_step, backend=backend, fullgraph=True)
    work = [a.clone() for a in args]
    out, idx = compiled(*work, path)
    assert torch.equal(idx, expect_idx)
    torch.testing.assert_close(out, expect_out, rtol=1e-5, atol=1e-5)
    for got, exp in zip(work[:3], expect_bufs):  # the in-place append reached the caller's buffers
        assert torch.equal(got, exp)


@pytest.mark.parametrize("window", [None, 9])
def test_dense_decode_compiles_and_equals_every_page_listed(window):
    """ops.dense_decode_attention (the dense decode step over the cache) traces as one graph with no break
    and equals the reference attention with every page listed, over each row's [start, end); a window of 9
    tokens needs only 9 // 8 + 2 = 3 slots."""
    torch._dynamo.reset()
    k, v, _, _, _, pos, q, start, end = _inputs(2)
    if window:
        start = (end - window).clamp(min=0)
    every = torch.arange(CAP // PS, dtype=torch.int32, device=DEVICE).expand(B, HKV, CAP // PS)
    want = ref.sparse_decode_attention(q, k, v, every, start, end, PS, D**-0.5)

    def step(q, k, v, start, end):
        return ops.dense_decode_attention(q, k, v, start, end, PS, D**-0.5, window=window)

    explain = torch._dynamo.explain(step)(q, k, v, start, end)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, start, end)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step(q, k, v, start, end), want, rtol=1e-5, atol=1e-5)
