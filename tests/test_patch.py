"""patch_model on tiny random-weight models of every supported family (CPU, reference ops)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tinyserve_patch as tp
from tinyserve_patch.cache import TinyServeCache
from tinyserve_patch.hf_compat import CACHE_KWARG

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=0,
)
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "phi3": {},
    "gemma": {"head_dim": 16},
    # Gemma 2: soft-capped logits, alternating sliding-window (32 tokens) and global layers
    "gemma2": {"head_dim": 16, "sliding_window": 32, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    # Gemma 3: sliding layers with a window larger than the budget, so they select pages within it
    "gemma3_text": {"head_dim": 16, "sliding_window": 48, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "gpt2": None,
}
PROMPT = 70
NEW = 12
GEN = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)


def tiny_model(family: str, dtype=torch.float32):
    torch.manual_seed(0)
    if family == "gpt2":
        config = AutoConfig.for_model(
            "gpt2", vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=512, eos_token_id=None, bos_token_id=None
        )
    else:
        config = AutoConfig.for_model(family, **COMMON, **FAMILIES[family])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def batch(pad: int = 9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


@torch.no_grad()
def test_family_full_budget_sparse_budget_unpatch(family):
    model = tiny_model(family)
    ids, mask = batch()
    dense = model.generate(ids, attention_mask=mask, **GEN)
    dense_logits = model(ids, attention_mask=mask).logits

    tp.patch_model(model, token_budget=2048, page_size=8, dense_layers=0)
    assert model.config._attn_implementation == "tinyserve"
    full = model.generate(ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True, **GEN)
    assert torch.equal(full.sequences, dense)
    real = mask.bool()  # padded positions' outputs are unspecified (HF's own differ between releases)
    torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], dense_logits[real])

    tp.patch_model(model, token_budget=40, page_size=8, dense_layers=0)
    sparse = model.generate(ids, attention_mask=mask, **GEN)
    assert sparse.shape == dense.shape
    stats = tp.stats(model)
    assert stats["budget_respected"]
    assert stats["sparse_layers"] >= 1
    assert 0.0 < stats["fraction_read"] < 1.0
    for layer in stats["layers"]:
        if layer["sparse_steps"]:
            assert layer["pages_attended"] <= 40 // 8

    tp.unpatch_model(model)
    assert model.config._attn_implementation != "tinyserve"
    assert torch.equal(model.generate(ids, attention_mask=mask, **GEN), dense)
    assert torch.equal(model(ids, attention_mask=mask).logits, dense_logits)


@torch.no_grad()
def test_family_padded_row_equals_row_alone(family):
    model = tp.patch_model(tiny_model(family), token_budget=40, page_size=8, dense_layers=0)
    ids, mask = batch(pad=9)
    both = model.generate(ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True, **GEN)
    alone = model.generate(ids[1:, 9:], output_logits=True, return_dict_in_generate=True, **GEN)
    assert torch.equal(both.sequences[1, PROMPT:], alone.sequences[0, PROMPT - 9 :])
    for step_both, step_alone in zip(both.logits, alone.logits):
        torch.testing.assert_close(step_both[1], step_alone[0], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_budget_within_capacity_row_is_exact():
    """A row whose length is within the budget selects every page: its logits equal dense ones even when
    the cache (sized by the longer row) exceeds the budget and the sparse kernels run."""
    model = tiny_model("llama")
    ids, mask = batch(pad=40)  # row 1: 30 real tokens + 12 new < 48
    dense = model.generate(ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True, **GEN)
    tp.patch_model(model, token_budget=48, page_size=8, dense_layers=0)
    sparse = model.generate(ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True, **GEN)
    assert tp.stats(model)["sparse_layers"] == 3
    for d, s in zip(dense.logits, sparse.logits):
        torch.testing.assert_close(s[1], d[1], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_policies_run_and_oracle_recall():
    model = tiny_model("qwen2")
    ids, mask = batch()
    for policy in ("quest", "oracle", "streaming", "random"):
        tp.patch_model(model, token_budget=32, page_size=8, dense_layers=1, policy=policy, track_recall=True)
        out = model.generate(ids, attention_mask=mask, **GEN)
        assert out.shape == (2, PROMPT + NEW)
        stats = tp.stats(model)
        assert stats["sparse_layers"] == 2 and stats["dense_layers"] == 1
        assert 0.0 <= stats["recall"] <= 1.0
        if policy == "oracle":
            assert stats["recall"] == pytest.approx(1.0)


@torch.no_grad()
def test_sampling_and_beam_search():
    model = tp.patch_model(tiny_model("llama"), token_budget=32, page_size=8, dense_layers=0)
    ids, mask = batch()
    torch.manual_seed(0)
    sampled = model.generate(ids, attention_mask=mask, do_sample=True, top_k=20, max_new_tokens=6, pad_token_id=0)
    assert sampled.shape == (2, PROMPT + 6)
    beams = model.generate(ids, attention_mask=mask, num_beams=3, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert beams.shape == (2, PROMPT + 6)
    # with every page in budget, beam search equals dense beam search
    tp.patch_model(model, token_budget=2048)
    full = model.generate(ids, attention_mask=mask, num_beams=3, max_new_tokens=6, do_sample=False, pad_token_id=0)
    tp.unpatch_model(model)
    dense = model.generate(ids, attention_mask=mask, num_beams=3, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(full, dense)


@torch.no_grad()
def test_bf16_model_runs_sparse():
    model = tp.patch_model(tiny_model("llama", torch.bfloat16), token_budget=32, page_size=8, dense_layers=0)
    ids, mask = batch()
    out = model.generate(ids, attention_mask=mask, **GEN)
    assert out.shape == (2, PROMPT + NEW)
    assert tp.stats(model)["sparse_layers"] == 3


def test_repatch_is_idempotent_and_replaces_config():
    model = tiny_model("llama")
    tp.patch_model(model, token_budget=64, page_size=8)
    handles = len(model._tinyserve_state.hook_handles)
    tp.patch_model(model, token_budget=128)
    assert len(model._tinyserve_state.hook_handles) == handles
    assert tp.get_config(model).token_budget == 128 and tp.get_config(model).page_size == 8
    assert model.config.tinyserve["token_budget"] == 128
    tp.unpatch_model(model)
    assert not tp.is_patched(model) and not hasattr(model.config, "tinyserve")


def test_unsupported_model_and_bad_config():
    config = AutoConfig.for_model("opt", vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="supported families: Llama"):
        tp.patch_model(model)
    with pytest.raises(TypeError):
        tp.patch_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="page_size"):
        tp.patch_model(tiny_model("llama"), page_size=12)
    with pytest.raises(ValueError, match="unknown SparseConfig field"):
        tp.patch_model(tiny_model("llama"), budget=12)


@torch.no_grad()
def test_from_pretrained_attn_implementation(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="tinyserve").eval()
    model.config.tinyserve = {"token_budget": 32, "page_size": 8, "dense_layers": 0}
    ids, mask = batch()
    out = model.generate(ids, attention_mask=mask, **GEN)
    assert out.shape == (2, PROMPT + NEW)
    assert tp.is_patched(model) and tp.get_config(model).token_budget == 32
    assert tp.stats(model)["sparse_layers"] == 3


@torch.no_grad()
def test_cache_overflow_and_foreign_cache():
    model = tp.patch_model(tiny_model("llama"), token_budget=32, page_size=8)
    ids, mask = batch()
    cache = tp.make_cache(model, 2, PROMPT)
    model(ids, attention_mask=mask, **{CACHE_KWARG: cache})
    with pytest.raises(ValueError, match="overflow"):
        model(ids[:, :3], **{CACHE_KWARG: cache})  # capacity 72 = 70 rounded up to a page
    # without a TinyServeCache (plain forward): exact dense attention
    out = model(ids, attention_mask=mask).logits
    tp.unpatch_model(model)
    torch.testing.assert_close(out, model(ids, attention_mask=mask).logits)
    with pytest.raises(ValueError, match="max_length"):
        tp.make_cache(model, 2, 0)


@torch.no_grad()
def test_compiled_decode_step_fullgraph():
    model = tp.patch_model(tiny_model("llama"), token_budget=32, page_size=8, dense_layers=1)
    ids, mask = batch()
    steps = 5
    cache = tp.make_cache(model, 2, PROMPT + steps + 8)
    eager_cache = tp.make_cache(model, 2, PROMPT + steps + 8)
    model(ids, attention_mask=mask, **{CACHE_KWARG: cache})
    model(ids, attention_mask=mask, **{CACHE_KWARG: eager_cache})
    torch._dynamo.reset()
    step = torch.compile(model.forward, fullgraph=True)
    token = torch.full((2, 1), 5)
    from torch._dynamo.utils import counters

    graphs = []
    for i in range(steps):
        am = torch.cat([mask, torch.ones(2, i + 1, dtype=mask.dtype)], dim=1)
        compiled = step(input_ids=token, attention_mask=am, **{CACHE_KWARG: cache}).logits
        eager = model(input_ids=token, attention_mask=am, **{CACHE_KWARG: eager_cache}).logits
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
        token = eager[:, -1].argmax(-1, keepdim=True)
        graphs.append(counters["stats"]["unique_graphs"])
    assert isinstance(cache, TinyServeCache)
    # the mask length turns dynamic on the second step (one recompile); none after that
    assert graphs[2:] == [graphs[1]] * (steps - 2), graphs


@torch.no_grad()
def test_chunked_prefill_with_padding_longer_than_a_chunk():
    """HF's prefill_chunk_size feeds the prompt in chunks; a row's left padding may span whole chunks."""
    model = tiny_model("llama")
    ids, mask = batch(pad=20)
    kwargs = dict(GEN, output_logits=True, return_dict_in_generate=True)
    dense = model.generate(ids, attention_mask=mask, **kwargs)
    tp.patch_model(model, token_budget=2048, page_size=8, dense_layers=0)
    chunked = model.generate(ids, attention_mask=mask, prefill_chunk_size=16, **kwargs)
    assert torch.equal(chunked.sequences, dense.sequences)
    for d, c in zip(dense.logits, chunked.logits):
        torch.testing.assert_close(c, d, atol=1e-5, rtol=1e-4)
    tp.patch_model(model, token_budget=32)
    whole = model.generate(ids, attention_mask=mask, **kwargs)
    chunked = model.generate(ids, attention_mask=mask, prefill_chunk_size=16, **kwargs)
    for w, c in zip(whole.logits, chunked.logits):
        torch.testing.assert_close(c, w, atol=1e-4, rtol=1e-4)
    # the same chunking as the config's default for generate(); a call's own prefill_chunk_size wins
    tp.patch_model(model, token_budget=32, prefill_chunk_size=16)
    by_config = model.generate(ids, attention_mask=mask, **kwargs)
    for c, b in zip(chunked.logits, by_config.logits):
        torch.testing.assert_close(b, c, atol=0, rtol=0)
    calls = []
    model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    model.generate(ids, attention_mask=mask, prefill_chunk_size=32, **GEN)
    assert calls[:3] == [32, 32, PROMPT - 64], calls


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_prefill_chunk_attends_in_query_blocks(family, monkeypatch):
    """A later prefill chunk attends over the cache QUERY_ROWS packed rows at a time (bounded mask memory):
    the same logits as one block (SDPA and Gemma 2's soft-capped path)."""
    from tinyserve_patch import attention

    model = tp.patch_model(tiny_model(family), token_budget=32, page_size=8, dense_layers=0)
    ids, mask = batch(pad=9)
    kwargs = dict(GEN, output_logits=True, return_dict_in_generate=True, prefill_chunk_size=24)
    whole = model.generate(ids, attention_mask=mask, **kwargs)
    monkeypatch.setattr(attention, "QUERY_ROWS", 5)
    blocked = model.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(blocked.sequences, whole.sequences)
    for w, b in zip(whole.logits, blocked.logits):
        torch.testing.assert_close(b, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "causal"])
def test_grouped_attention_equals_repeated_kv(groups, softcap, mask_kind):
    """Query heads packed as rows of their KV head == attention with K/V repeated per query head."""
    from tinyserve_patch.attention import _grouped_attention

    g = torch.Generator().manual_seed(groups)
    b, hkv, q_len, kv_len, d = 2, 2, 5, 13, 8
    q = torch.randn(b, hkv * groups, q_len, d, generator=g)
    k = torch.randn(b, hkv, kv_len, d, generator=g)
    v = torch.randn(b, hkv, kv_len, d, generator=g)
    causal = torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None] + (kv_len - q_len)
    keep = causal[None, None] & (torch.rand(b, 1, q_len, kv_len, generator=g) > 0.3) | (torch.arange(kv_len) == 0)
    mask = {"bool": keep, "additive": torch.zeros(keep.shape).masked_fill(~keep, float("-inf")), "causal": None}[mask_kind]
    want_keep = causal[None, None] if mask is None else keep
    kr, vr = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    logits = q @ kr.transpose(2, 3) * 0.3
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    want = (torch.softmax(logits.masked_fill(~want_keep, float("-inf")), dim=-1) @ vr).transpose(1, 2)
    got = _grouped_attention(q, k, v, mask, 0.0, 0.3, softcap)
    assert got.shape == (b, q_len, hkv * groups, d)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 13, 16, 40])
@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("impl", ["op", "triton"])
def test_dense_decode_paged_equals_masked_attention(window, kv_dtype, softcap, impl, monkeypatch):
    """A dense decode step over the cache (the path CUDA takes: every page of the row's range listed in order
    for the paged decode op) == the masked grouped attention over the same stored keys, for ragged rows
    (one left-padded, one with a partial last page), sliding windows shorter and longer than a page and
    than the rows, fp8 storage and soft-capping. ``op``: on CPU the op runs the reference; ``triton``: the
    Triton kernel itself (under the interpreter without CUDA), with its indices expanded over the heads."""
    from tinyserve_patch import attention
    from tinyserve_patch.attention import _dense_decode_paged, _grouped_attention
    from tinyserve_patch.cache import TinyServeLayer

    if impl == "triton":
        if window in (16, 40):
            pytest.skip("the interpreter is slow: two windows suffice for the kernel")
        from tinyserve_patch.ops.triton_decode import sparse_decode_attention_triton

        monkeypatch.setattr(attention.ops, "sparse_decode_attention", sparse_decode_attention_triton)

    g = torch.Generator().manual_seed(7)
    b, hkv, groups, d, page, prompt = 2, 2, 3, 8, 8, 37
    layer = TinyServeLayer(48, page, kv_dtype=kv_dtype)
    keys = torch.randn(b, hkv, prompt, d, generator=g)
    layer.observe_padding(torch.arange(prompt)[None, :] >= torch.tensor([[0], [5]]), b, prompt, "cpu")  # row 1: 5 pads
    layer.update(keys, torch.randn(b, hkv, prompt, d, generator=g))
    layer.update(torch.randn(b, hkv, 1, d, generator=g), torch.randn(b, hkv, 1, d, generator=g))  # the decode token
    q = torch.randn(b, hkv * groups, 1, d, generator=g)
    got = _dense_decode_paged(q, layer, window, 0.3, softcap)
    mask = layer.attention_mask(1, window)
    want = _grouped_attention(q, layer.keys.to(q.dtype), layer.values.to(q.dtype), mask, 0.0, 0.3, softcap)
    assert got.shape == want.shape == (b, 1, hkv * groups, d)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [None, 24])
def test_dense_cache_path_never_repeats_kv(chunk, monkeypatch):
    """Dense attention over the cache (later prefill chunks, dense layers' decode, within-budget decode)
    never copies K/V per query head: HF's repeat_kv is not called once the cache exists."""
    from transformers.integrations import sdpa_attention

    model = tp.patch_model(tiny_model("llama"), token_budget=2048, page_size=8, dense_layers=1)
    ids, mask = batch(pad=9)
    calls = []
    real = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda h, n: calls.append(h.shape[2]) or real(h, n))
    out = model.generate(ids, attention_mask=mask, prefill_chunk_size=chunk, **GEN)
    assert out.shape == (2, PROMPT + GEN["max_new_tokens"])
    first = chunk or PROMPT  # the first forward attends to its own keys through HF's SDPA path
    assert all(n <= first for n in calls), calls


@torch.no_grad()
def test_fp8_kv_cache_stores_fp8_bounds_the_stored_keys_and_stays_close():
    """kv_cache_dtype="fp8_e4m3": K/V stored as float8_e4m3fn, metadata in the model's dtype bounding the
    stored keys; a budget covering the context equals the dense fp8 run; logits stay near the exact cache's."""
    from tinyserve_patch.decode import decode_logits

    ids, mask = batch(pad=9)
    cont = torch.randint(1, 100, (2, GEN["max_new_tokens"]), generator=torch.Generator().manual_seed(3))
    model = tp.patch_model(tiny_model("llama"), token_budget=32, page_size=8, dense_layers=0)
    exact = decode_logits(model, ids, cont, mask)
    tp.patch_model(model, token_budget=32, page_size=8, dense_layers=0, kv_cache_dtype="fp8_e4m3")
    fp8 = decode_logits(model, ids, cont, mask)
    assert tp.stats(model)["sparse_layers"] == 3
    for layer in model._tinyserve_state.last_cache.layers:
        assert layer.keys.dtype == layer.values.dtype == torch.float8_e4m3fn and layer.meta.dtype == torch.float32
        n = int(layer.row_lengths().min()) // 8 * 8  # whole pages every row holds
        keys = layer.keys[:, :, :n].float().view(2, layer.num_heads, n // 8, 8, -1)
        assert torch.equal(layer.meta[:, :, : n // 8, 0], keys.amin(3)) and torch.equal(layer.meta[:, :, : n // 8, 1], keys.amax(3))
    assert ((fp8 - exact).norm() / exact.norm()).item() < 0.2
    tp.patch_model(model, token_budget=None, kv_cache_dtype="fp8_e4m3", dense_layers=0)
    dense_fp8 = decode_logits(model, ids, cont, mask)
    tp.patch_model(model, token_budget=4096, page_size=8, kv_cache_dtype="fp8_e4m3", dense_layers=0)
    torch.testing.assert_close(decode_logits(model, ids, cont, mask), dense_fp8, atol=1e-5, rtol=1e-5)
    out = model.generate(ids, attention_mask=mask, **GEN)
    assert out.shape == (2, PROMPT + GEN["max_new_tokens"])


@torch.no_grad()
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3"])
def test_fp8_page_meta_bounds_the_keys_and_full_budget_is_dense(kv_cache_dtype):
    """page_meta_dtype="fp8_e4m3": the page min / max are stored as float8_e4m3fn rounded outward, so
    every stored key lies inside its page's box; selection changes, attention over the chosen pages does
    not: a budget covering the context still equals dense; a small budget stays near the exact metadata's."""
    from tinyserve_patch.decode import decode_logits
    from tinyserve_patch.ops import reference

    ids, mask = batch(pad=9)
    cont = torch.randint(1, 100, (2, GEN["max_new_tokens"]), generator=torch.Generator().manual_seed(4))
    kw = dict(page_size=8, dense_layers=0, kv_cache_dtype=kv_cache_dtype)
    model = tp.patch_model(tiny_model("llama"), token_budget=32, **kw)
    exact_meta = decode_logits(model, ids, cont, mask)
    tp.patch_model(model, token_budget=32, page_meta_dtype="fp8_e4m3", **kw)
    fp8_meta = decode_logits(model, ids, cont, mask)
    fp8 = torch.float8_e4m3fn
    for layer in model._tinyserve_state.last_cache.layers:
        assert layer.meta.dtype == fp8 and layer.keys.dtype == (layer.dtype if kv_cache_dtype == "auto" else fp8)
        n = int(layer.row_lengths().min()) // 8 * 8  # whole pages every row holds
        keys = layer.keys[:, :, :n].float().view(2, layer.num_heads, n // 8, 8, -1)
        meta = layer.meta[:, :, : n // 8].float()
        assert (meta[:, :, :, 0, None] <= keys).all() and (keys <= meta[:, :, :, 1, None]).all()
        bulk = reference.build_meta(layer.keys, n, 8, dtype=fp8)[:, :, : n // 8]
        assert torch.equal(layer.meta[:, :, : n // 8].view(torch.uint8), bulk.view(torch.uint8))
    assert ((fp8_meta - exact_meta).norm() / exact_meta.norm()).item() < 0.2
    tp.patch_model(model, token_budget=None, **kw)
    dense = decode_logits(model, ids, cont, mask)
    tp.patch_model(model, token_budget=4096, page_meta_dtype="fp8_e4m3", **kw)
    torch.testing.assert_close(decode_logits(model, ids, cont, mask), dense, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_generate_within_budget_takes_the_dense_path():
    """generate() sizes the cache to prompt + new tokens; when that fits the budget no decode step runs
    the sparse ops (the same code path as a dense config, so within-budget decoding costs nothing extra)."""
    model = tp.patch_model(tiny_model("llama"), token_budget=64, page_size=16, dense_layers=0)
    ids = torch.randint(3, 100, (2, 32), generator=torch.Generator().manual_seed(5))
    model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0, disable_compile=True)
    st = tp.stats(model)
    assert all(layer.capacity == 64 for layer in model._tinyserve_state.last_cache.layers)
    assert st["sparse_layers"] == 0 and all(r["sparse_steps"] == 0 and r["dense_steps"] == 31 for r in st["layers"])
    model.generate(ids, max_new_tokens=33, min_new_tokens=33, do_sample=False, pad_token_id=0, disable_compile=True)
    assert tp.stats(model)["sparse_layers"] == 3  # one token past the budget: the sparse path


@torch.no_grad()
def test_later_prefill_chunks_attend_only_over_written_tokens(monkeypatch):
    """A later prefill chunk attends over the longest row written so far (keys and mask), not the whole
    capacity: chunk i of a prompt sees i + 1 chunks of keys; outputs equal the unchunked prefill's."""
    from tinyserve_patch import attention

    seen = []
    real = attention._grouped_attention
    monkeypatch.setattr(attention, "_grouped_attention", lambda q, k, v, m, *a: seen.append((k.shape[2], m.shape[-1])) or real(q, k, v, m, *a))
    ids, mask = batch(pad=0)
    model = tp.patch_model(tiny_model("llama"), token_budget=32, page_size=8, dense_layers=0)
    want = model.generate(ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True, **GEN)
    chunk = 8
    got = model.generate(ids, attention_mask=mask, prefill_chunk_size=chunk, output_logits=True, return_dict_in_generate=True, **GEN)
    prefill = sorted({s for s in seen if s[0] > 1})
    assert prefill and all(k == m for k, m in prefill)  # mask and keys trimmed alike
    assert {k for k, _ in prefill} == set(range(2 * chunk, PROMPT + 1, chunk)) | ({PROMPT} if PROMPT % chunk else set())
    for w, g in zip(want.logits, got.logits):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
