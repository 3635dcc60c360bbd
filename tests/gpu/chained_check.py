"""Row-chained decode vs the split chain, ``quest_decode`` (every path, and the fused one compiled with
``mode="reduce-overhead"`` over a growing cache) vs the same, and the persistent decode vs the fused
row-chained decode, on a GPU, eager and replayed from a CUDA graph (run by
``test_gpu_kernels.py::test_gpu_chained_decode_equals_split_eager_and_graphed`` in a subprocess with a
timeout: a wrong wait hangs the GPU rather than failing). Prints one line per case, exits non-zero on a
mismatch."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tinyserve_patch import ops  # noqa: E402
from tinyserve_patch.ops import reference as ref  # noqa: E402
from tinyserve_patch.ops._triton_common import ticket_counters, use_pdl  # noqa: E402
from tinyserve_patch.ops.triton_chain import fused_chain_plan, prefer_fused_chain, quest_decode_chained_triton  # noqa: E402
from tinyserve_patch.ops.triton_decode import sparse_decode_attention_triton  # noqa: E402
from tinyserve_patch.ops.triton_fused_select import score_and_select_triton  # noqa: E402
from tinyserve_patch.ops.triton_persistent import persistent_plan, quest_decode_persistent_triton  # noqa: E402
from tinyserve_patch.ops.triton_score import page_scores_triton  # noqa: E402
from tinyserve_patch.ops.triton_select import select_pages_triton  # noqa: E402

CASES = [  # q heads, kv heads, head_dim, batch, tokens, budget, page, softcap, ragged
    (32, 8, 128, 8, 65536, 2048, 16, 0.0, False),
    (32, 4, 64, 1, 16384, 4096, 16, 0.0, False),
    (32, 8, 128, 3, 4096, 1024, 8, 30.0, True),
    (32, 4, 64, 16, 32768, 2048, 64, 0.0, True),
]


def split(q, k, v, meta, start, end, ps, n, scale, softcap, fused=False, attention=None, fused_options=None):
    plan = dict(attention or {})
    if fused:  # with the fused chain's attention plan (splits, merge): the same rounding
        idx = score_and_select_triton(q, meta, start, end, ps, n, 1, 1, "max", **(fused_options or {}))
        chain_plan = fused_chain_plan(k.shape[0] * k.shape[1], meta.shape[2], n, ps, k.shape[3], k.device)
        plan.update(num_splits=chain_plan["num_splits"], merge=chain_plan["merge"])
    else:
        scores = page_scores_triton(q, meta, start, end, ps, "max")
        idx = select_pages_triton(scores, start, end, ps, n, 1, 1)
    return sparse_decode_attention_triton(q, k, v, idx, start, end, ps, scale, softcap, **plan), idx


def replays_equal(fn, want_out, want_idx, pool: str, label: str, bitwise: bool = True) -> bool:
    """``fn()`` equals ``(want_out, want_idx)`` three times eagerly and five times replayed from a CUDA graph,
    leaving the counters of ``pool`` zeroed. Not ``bitwise``: the pages equal, the output within 1e-2
    relative (norm) of ``want_out`` and every call's output equal to the first eager one's."""
    for call in range(3):
        out, idx = fn()
        torch.cuda.synchronize()
        if not bitwise and call == 0:
            err = ((out.float() - want_out.float()).norm() / want_out.float().norm()).item()
            if not (torch.equal(idx, want_idx) and err < 1e-2):
                print(f"MISMATCH eager {label}: pages equal {torch.equal(idx, want_idx)}, output relative error {err:.2e}")
                return False
            want_out = out.clone()
        if not (torch.equal(idx, want_idx) and torch.equal(out, want_out)):
            print(f"MISMATCH eager {label}: pages equal {torch.equal(idx, want_idx)}")
            return False
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_idx = fn()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    if not (torch.equal(g_idx, want_idx) and torch.equal(g_out, want_out)):
        print(f"MISMATCH graphed {label}")
        return False
    if int(ticket_counters(torch.device("cuda"), 1, pool=pool).count_nonzero()):
        print(f"counters left armed: {label}")
        return False
    print(f"ok {label}: eager x3, graph x5")
    return True


def main() -> int:
    dev = torch.device("cuda")
    print(f"PDL {use_pdl(dev)}")
    g = torch.Generator(device="cuda").manual_seed(0)
    for hq, hkv, d, b, length, budget, ps, softcap, ragged in CASES:
        k = torch.randn(b, hkv, length, d, device=dev, generator=g).to(torch.bfloat16)
        v = torch.randn(b, hkv, length, d, device=dev, generator=g).to(torch.bfloat16)
        q = torch.randn(b, hq, d, device=dev, generator=g).to(torch.bfloat16)
        meta = ref.build_meta(k, length, ps)
        end = torch.full((b,), length, dtype=torch.int32, device=dev)
        start = torch.zeros(b, dtype=torch.int32, device=dev)
        if ragged:
            end[1::2] = length // 2 + 3
            start[1::2] = ps * 2 + 1
        n, scale = budget // ps, d**-0.5
        # against the same kernels run one grid after another; the fused chain also with another attention
        # plan and another score walk (their options reach the attention and fused launches)
        for fused, attn, walk in ((False, None, None), (True, None, None), (True, dict(block_n=64, num_stages=3), None),
                                  (True, None, dict(blocks_per_program=8))):
            want_out, want_idx = split(q, k, v, meta, start, end, ps, n, scale, softcap, fused, attn, walk)
            label = f"fused={fused} attention={attn} walk={walk} {hq}/{hkv}/{d} B={b} L={length} budget={budget} page={ps}"
            if not replays_equal(lambda: quest_decode_chained_triton(q, k, v, meta, start, end, ps, n, 1, 1, "max", scale, softcap,
                                                                     fused=fused, attention_options=attn, fused_options=walk),
                                 want_out, want_idx, "chain", label):
                return 1
        # the one-op decode (what patch_model runs): each path gives its chain's bits, "auto" the one it picks
        auto = prefer_fused_chain(b * hkv, meta.shape[2], d, q.dtype, k.dtype, meta.dtype, dev)
        for fused in (False, True, "auto"):
            want_out, want_idx = split(q, k, v, meta, start, end, ps, n, scale, softcap, fused is True or (fused == "auto" and auto))
            label = f"quest_decode fused={fused} (auto: {'fused' if auto else 'split'}) {hq}/{hkv}/{d} B={b} L={length} budget={budget}"
            if not replays_equal(lambda fused=fused: ops.quest_decode(q, k, v, meta, start, end, ps, n, 1, 1, "max", scale, softcap, fused),
                                 want_out, want_idx, "chain", label):
                return 1
        # the persistent decode against the fused row-chained decode with its splits merged inline (the same
        # pages; the same output bits where the persistent program has the attention kernel's 4 warps, else
        # within rounding: other warps reduce the softmax sums in another order): by default, all score items
        # first (lag = rows), attention right after each row (lag 0), and a quarter of a wave
        rows = b * hkv
        splits = persistent_plan(rows, meta.shape[2], n, ps, d, dev)["num_splits"]
        want_out, want_idx = quest_decode_chained_triton(q, k, v, meta, start, end, ps, n, 1, 1, "max", scale, softcap, fused=True,
                                                         merge="inline", num_splits=splits)
        # two grids (attention programs of 4 warps: the same bits) by default and with small grids
        for opts in ({}, {"lag": rows}, {"lag": 0}, {"programs": 33}, {"grids": 2}, {"grids": 2, "programs": 33, "attention_programs": 7}):
            label = f"persistent {opts} {hq}/{hkv}/{d} B={b} L={length} budget={budget} page={ps}"
            if not replays_equal(lambda opts=opts: quest_decode_persistent_triton(q, k, v, meta, start, end, ps, n, 1, 1, "max",
                                                                                  scale, softcap, **opts),
                                 want_out, want_idx, "persistent", label, bitwise=meta.shape[2] <= 2048 or "grids" in opts):
                return 1
    if not compiled_loop_equals_eager():
        return 1
    print("chained == split")
    return 0


def _step(k, v, meta, pos, k_new, v_new, q, start, fused):
    """Append a token per row at ``pos`` (advanced in place), then one ``quest_decode`` step."""
    ops.append_kv(k, v, meta, k_new, v_new, pos)
    pos.add_(1)
    return ops.quest_decode(q, k, v, meta, start, pos.clone(), 16, 8, 1, 1, "max", 0.125, 0.0, fused)


def compiled_loop_equals_eager() -> bool:
    """``quest_decode`` with the fused row-chained decode, compiled with ``mode="reduce-overhead"`` (CUDA
    graphs, no graph break), over 20 steps of a growing cache: the eager steps' pages and bits."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(5)
    b, hkv, hq, d, cap, ps = 4, 8, 32, 128, 4096, 16
    k = torch.zeros(b, hkv, cap, d, dtype=torch.bfloat16, device=dev)
    v = torch.zeros_like(k)
    meta = torch.zeros(b, hkv, cap // ps, 2, d, dtype=torch.bfloat16, device=dev)
    prompt = torch.randn(b, hkv, 2000, d, generator=g, device=dev).to(torch.bfloat16)
    ops.append_kv(k, v, meta, prompt, prompt, torch.tensor([0, -37, 0, -500], dtype=torch.int32, device=dev))
    pos = torch.tensor([2000, 1963, 2000, 1500], dtype=torch.int32, device=dev)
    start = torch.tensor([0, 20, 0, 33], dtype=torch.int32, device=dev)
    eager = [t.clone() for t in (k, v, meta, pos)]
    for t in (k, v, meta, pos):
        torch._dynamo.mark_static_address(t)
    step = torch.compile(_step, mode="reduce-overhead", fullgraph=True)
    for i in range(20):
        k_new, v_new, q = (torch.randn(*shape, generator=g, device=dev).to(torch.bfloat16)
                           for shape in ((b, hkv, 1, d), (b, hkv, 1, d), (b, hq, d)))
        out, idx = (t.clone() for t in step(k, v, meta, pos, k_new, v_new, q, start, True))
        e_out, e_idx = _step(*eager, k_new, v_new, q, start, True)
        if not (torch.equal(idx, e_idx) and torch.equal(out, e_out)):
            print(f"MISMATCH compiled quest_decode step {i}: pages equal {torch.equal(idx, e_idx)}")
            return False
    if counters["inductor"]["cudagraph_skips"] or int(ticket_counters(dev, 1, pool="chain").count_nonzero()):
        print(f"compiled quest_decode: cudagraph skips {counters['inductor']['cudagraph_skips']} or counters left armed")
        return False
    print("ok quest_decode fused, reduce-overhead: 20 steps equal eager")
    return True


if __name__ == "__main__":
    raise SystemExit(main())
