"""patch_model on CUDA: bf16 models through the Triton kernels, compiled decode under CUDA graphs,
and a two-GPU device_map (skipped without CUDA / without two GPUs)."""

from __future__ import annotations

import pytest
import torch

import tinyserve_patch as tp
from tinyserve_patch.decode import decode_logits
from tinyserve_patch.hf_compat import CACHE_KWARG
from tests.test_patch import FAMILIES, GEN, PROMPT, batch, tiny_model

pytestmark = pytest.mark.gpu


def _cuda_model(family: str):
    return tiny_model(family, torch.bfloat16).cuda()


def _cuda_batch(pad: int = 9):
    ids, mask = batch(pad)
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_gpu_family_bf16(family):
    model = _cuda_model(family)
    ids, mask = _cuda_batch()
    kwargs = dict(GEN, disable_compile=True)
    dense = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)
    # teacher-forced on the dense tokens: a bf16 near-tie that flips one greedy token would otherwise make
    # every later step's logits differ (seen on the H100 for qwen2 once dense attention changed its order)
    cont = dense.sequences[:, PROMPT:]
    want = decode_logits(model, ids, cont, mask)
    tp.patch_model(model, token_budget=2048, page_size=8, dense_layers=0)
    torch.testing.assert_close(decode_logits(model, ids, cont, mask), want, atol=2e-2, rtol=2e-2)
    tp.patch_model(model, token_budget=32, page_size=8, dense_layers=0)
    out = model.generate(ids, attention_mask=mask, **kwargs)
    assert out.shape == (2, PROMPT + GEN["max_new_tokens"])
    st = tp.stats(model)
    assert st["sparse_layers"] >= 1 and st["budget_respected"]
    tp.unpatch_model(model)
    assert torch.equal(model.generate(ids, attention_mask=mask, **kwargs), dense.sequences)


@pytest.mark.parametrize("kv_cache_dtype,page_meta_dtype", [("auto", "auto"), ("fp8_e4m3", "auto"), ("auto", "fp8_e4m3")])
@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_gpu_sparse_decode_equals_cpu_reference(family, kv_cache_dtype, page_meta_dtype):
    """The same fp32 model patched with a small budget: the Triton kernels on the GPU give the CPU
    reference ops' teacher-forced decode logits (same pages selected, same attention); with fp8 K/V or
    fp8 page metadata the two round identically."""
    _gpu_logits_equal_cpu(family, kv_cache_dtype, page_meta_dtype, fused="auto", seed=3)


def _gpu_logits_equal_cpu(family, kv_cache_dtype, page_meta_dtype, fused, seed):
    """fp32 ``family`` patched with a 32-token budget on the CPU (reference ops) and on the GPU (``fused``):
    the same teacher-forced decode logits on random continuation tokens drawn with ``seed``."""
    cfg = dict(token_budget=32, page_size=8, dense_layers=0, kv_cache_dtype=kv_cache_dtype, page_meta_dtype=page_meta_dtype)
    cpu = tp.patch_model(tiny_model(family, torch.float32), **cfg)
    gpu = tp.patch_model(tiny_model(family, torch.float32).cuda(), fused=fused, **cfg)
    ids, mask = batch(pad=9)
    cont = torch.randint(1, 100, (2, GEN["max_new_tokens"]), generator=torch.Generator().manual_seed(seed))
    want = decode_logits(cpu, ids, cont, mask)
    got = decode_logits(gpu, ids.cuda(), cont.cuda(), mask.cuda())
    assert tp.stats(gpu)["sparse_layers"] >= 1
    torch.testing.assert_close(got.cpu(), want, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("family,kv_cache_dtype,page_meta_dtype", [
    ("llama", "auto", "auto"), ("llama", "fp8_e4m3", "auto"), ("llama", "auto", "fp8_e4m3"),
    ("gemma2", "auto", "auto"), ("gemma3_text", "auto", "auto"), ("gpt2", "auto", "auto"),
])
@torch.no_grad()
def test_gpu_fused_chain_decode_equals_cpu_reference(family, kv_cache_dtype, page_meta_dtype):
    """``fused=True`` (the fused row-chained decode; what ``"auto"`` picks at large shapes) through
    patch_model: the CPU reference's teacher-forced logits, soft-capping, sliding windows and fp8 storage
    included."""
    _gpu_logits_equal_cpu(family, kv_cache_dtype, page_meta_dtype, fused=True, seed=4)


@torch.no_grad()
def test_gpu_padded_row_equals_row_alone():
    model = tp.patch_model(_cuda_model("llama"), token_budget=32, page_size=8, dense_layers=0)
    ids, mask = _cuda_batch(pad=9)
    kwargs = dict(GEN, disable_compile=True, output_logits=True, return_dict_in_generate=True)
    both = model.generate(ids, attention_mask=mask, **kwargs)
    alone = model.generate(ids[1:, 9:], **kwargs)
    for b, a in zip(both.logits, alone.logits):
        torch.testing.assert_close(b[1].float(), a[0].float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("fused", ["auto", True])
@torch.no_grad()
def test_gpu_generate_auto_compile_cuda_graphs_matches_eager(fused, monkeypatch):
    """generate() auto-compiles the decode step (reduce-overhead: CUDA graphs) for the static TinyServeCache;
    ``fused=True``: with the fused row-chained decode in the captured graphs. The compiled run comes first,
    with no kernel counters allocated yet (as in a fresh process): the cache allocates them eagerly, so the
    first decode step, which cudagraph trees run as a warm-up inside the graph's memory pool, allocates
    nothing there (it did before 2026-12-02: "tensors in the cudagraph pool not tracked as outputs")."""
    from tinyserve_patch.ops import _triton_common

    monkeypatch.setattr(_triton_common, "_TICKETS", {})
    torch._dynamo.reset()
    model = tp.patch_model(_cuda_model("llama"), token_budget=32, page_size=8, dense_layers=1, fused=fused)
    ids, mask = _cuda_batch()
    compiled = model.generate(ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True, **GEN)
    again = model.generate(ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True, **GEN)
    eager = model.generate(ids, attention_mask=mask, disable_compile=True, output_logits=True, return_dict_in_generate=True, **GEN)
    for e, c, a in zip(eager.logits, compiled.logits, again.logits):
        torch.testing.assert_close(c.float(), e.float(), atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(a.float(), c.float(), atol=0, rtol=0)


@torch.no_grad()
def test_gpu_chunked_prefill_then_compiled_decode():
    """prefill_chunk_size with generate()'s auto-compiled (CUDA-graph) decode: chunks run eagerly, the
    decode compiles, and the logits match an eager unchunked run."""
    model = tp.patch_model(_cuda_model("llama"), token_budget=32, page_size=8, dense_layers=1, prefill_chunk_size=16)
    ids, mask = _cuda_batch(pad=20)
    kwargs = dict(GEN, output_logits=True, return_dict_in_generate=True)
    eager = model.generate(ids, attention_mask=mask, disable_compile=True, prefill_chunk_size=4096, **kwargs)
    for _ in range(2):  # the second call replays the captured graphs
        compiled = model.generate(ids, attention_mask=mask, **kwargs)
        for e, c in zip(eager.logits, compiled.logits):
            torch.testing.assert_close(c.float(), e.float(), atol=3e-2, rtol=3e-2)


@torch.no_grad()
def test_gpu_compiled_forward_reduce_overhead_no_recompile():
    model = tp.patch_model(_cuda_model("llama"), token_budget=32, page_size=8, dense_layers=1)
    ids, mask = _cuda_batch()
    steps = 8
    # room beyond the last step, as generate() sizes it: a mask as long as the cache would be a new shape
    cache = tp.make_cache(model, 2, PROMPT + steps + 8)
    eager_cache = tp.make_cache(model, 2, PROMPT + steps + 8)
    model(ids, attention_mask=mask, **{CACHE_KWARG: cache})
    model(ids, attention_mask=mask, **{CACHE_KWARG: eager_cache})
    torch._dynamo.reset()
    step = torch.compile(model.forward, fullgraph=True, mode="reduce-overhead")
    full_mask = torch.cat([mask, torch.ones(2, steps, dtype=mask.dtype, device="cuda")], dim=1)
    token = torch.full((2, 1), 5, device="cuda")
    from torch._dynamo.utils import counters

    graphs = []
    for i in range(steps):
        am = full_mask[:, : PROMPT + i + 1].contiguous()  # as generate() passes it (a slice is strided until the last step)
        compiled = step(input_ids=token, attention_mask=am, **{CACHE_KWARG: cache}).logits.clone()
        eager = model(input_ids=token, attention_mask=am, **{CACHE_KWARG: eager_cache}).logits
        torch.testing.assert_close(compiled.float(), eager.float(), atol=3e-2, rtol=3e-2)
        token = eager[:, -1].argmax(-1, keepdim=True)
        graphs.append(counters["stats"]["unique_graphs"])
    # the mask length turns dynamic on the second step (one recompile); no compile after that
    assert graphs[2:] == [graphs[1]] * (steps - 2), graphs


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@torch.no_grad()
def test_two_gpu_device_map(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("llama", torch.bfloat16).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="balanced").eval()
    tp.patch_model(model, token_budget=32, page_size=8, dense_layers=0)
    ids, mask = _cuda_batch()
    out = model.generate(ids, attention_mask=mask, disable_compile=True, **GEN)
    assert out.shape == (2, PROMPT + GEN["max_new_tokens"])
    cache = model._tinyserve_state.last_cache
    devices = {layer.keys.device for layer in cache.layers}
    assert len(devices) == 2


@torch.no_grad()
def test_gpu_cpu_layer_split_keeps_each_cache_on_its_layer():
    """A model split over two devices on one GPU machine: layer 1 runs on the CPU (accelerate hook), the
    rest on the GPU. Each layer's cache and metadata live on that layer's device (Triton on the GPU, the
    reference ops on the CPU), and the teacher-forced sparse logits equal the all-CPU reference model's."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    cfg = dict(token_budget=32, page_size=8, dense_layers=0)
    cpu = tp.patch_model(tiny_model("llama", torch.float32), **cfg)
    split = tiny_model("llama", torch.float32).cuda()
    layer = split.model.layers[1].cpu()
    add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu", io_same_device=True, skip_keys=CACHE_KWARG))
    tp.patch_model(split, **cfg)
    ids, mask = batch(pad=9)
    cont = torch.randint(1, 100, (2, GEN["max_new_tokens"]), generator=torch.Generator().manual_seed(4))
    want = decode_logits(cpu, ids, cont, mask)
    got = decode_logits(split, ids.cuda(), cont.cuda(), mask.cuda())
    layers = split._tinyserve_state.last_cache.layers
    assert [lay.keys.device.type for lay in layers] == ["cuda", "cpu", "cuda"]
    assert [lay.meta.device.type for lay in layers] == ["cuda", "cpu", "cuda"]
    assert tp.stats(split)["sparse_layers"] == 3
    torch.testing.assert_close(got.cpu(), want, atol=1e-3, rtol=1e-3)
