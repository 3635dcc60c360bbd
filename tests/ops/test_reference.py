"""Properties of the pure-PyTorch reference of Quest-style page selection, through the public wrappers of
:mod:`tinyserve_patch.ops` (CPU tensors dispatch to the reference via ``torch.ops.tinyserve.*``).

Layouts: see :mod:`tinyserve_patch.ops.reference`. Every expectation here is computed independently of the
code under test (page validity, per-page maxima, masked attention, SDPA)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyserve_patch import ops
from tinyserve_patch.ops import reference as ref

SETTINGS = settings(
    deadline=None, max_examples=40, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
I32 = torch.int32
BIG = torch.finfo(torch.float32).max


# ---------------------------------------------------------------------------------------------- helpers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, g, dtype=torch.float32):
    return torch.randn(shape, generator=g).to(dtype)


def randint(shape, g, lo=-3, hi=4, dtype=torch.float32):
    """Small integers: every product and sum of them is exact in fp32."""
    return torch.randint(lo, hi, shape, generator=g).to(dtype)


def i32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=I32)


def valid_pages_of(start: int, end: int, pages: int, page_size: int) -> list[int]:
    """Pages holding at least one token of ``[start, end)`` (computed independently of the reference)."""
    return [p for p in range(pages) if end > start and p * page_size < end and (p + 1) * page_size > start]


def token_mask(seq_start, seq_end, capacity) -> torch.Tensor:
    """``[batch, capacity]`` bool."""
    t = torch.arange(capacity)[None]
    return (t >= seq_start.long()[:, None]) & (t < seq_end.long()[:, None])


def masked_attention(q, k, v, mask, scale, softcap=0.0) -> torch.Tensor:
    """float64 attention; ``q`` ``[b, hq, d]``, ``k``/``v`` ``[b, hkv, t, d]``, ``mask`` ``[b, hq, t]`` or
    ``[b, t]``. KV heads are repeated HF-style (``repeat_interleave``)."""
    g = q.shape[1] // k.shape[1]
    kr = k.double().repeat_interleave(g, dim=1)
    vr = v.double().repeat_interleave(g, dim=1)
    logits = torch.einsum("bhd,bhtd->bht", q.double(), kr) * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if mask.dim() == 2:
        mask = mask[:, None, :]
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.einsum("bht,bhtd->bhd", torch.softmax(logits, dim=-1), vr)


def sdpa(q, k, v, seq_start, seq_end, scale) -> torch.Tensor:
    """torch SDPA with repeated KV heads and a boolean mask from ``seq_start`` / ``seq_end``."""
    g = q.shape[1] // k.shape[1]
    mask = token_mask(seq_start, seq_end, k.shape[2])[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), attn_mask=mask, scale=scale
    )
    return out[:, :, 0]


@st.composite
def row_range(draw, capacity: int, page_size: int, allow_empty: bool = False):
    """``(start, end)`` of one row with ``0 <= start <= end <= capacity``: from 0, mid-page, a single token,
    the full cache, anything (and empty if allowed)."""
    kinds = ["any", "from0", "single", "midpage", "full"] + (["empty"] if allow_empty else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "from0":
        return 0, draw(st.integers(1, capacity))
    if kind == "single":
        end = draw(st.integers(1, capacity))
        return end - 1, end
    if kind == "midpage":
        page = draw(st.integers(0, capacity // page_size - 1))
        start = page * page_size + draw(st.integers(1, page_size - 1))
        return start, draw(st.integers(start + 1, capacity))
    if kind == "full":
        return 0, capacity
    if kind == "empty":
        s = draw(st.integers(0, capacity))
        return s, s
    start = draw(st.integers(0, capacity - 1))
    return start, draw(st.integers(start + 1, capacity))


@st.composite
def problems(draw, max_batch=3, max_kv=2, groups=(1, 2, 3), max_pages=6, page_sizes=(8, 16), allow_empty=False,
             head_dims=(4, 8, 16)):
    """Shapes and ragged rows of one decode step."""
    b = draw(st.integers(1, max_batch))
    hkv = draw(st.integers(1, max_kv))
    g = draw(st.sampled_from(groups))
    d = draw(st.sampled_from(head_dims))
    ps = draw(st.sampled_from(page_sizes))
    pages = draw(st.integers(1, max_pages))
    cap = pages * ps
    rows = [draw(row_range(cap, ps, allow_empty)) for _ in range(b)]
    return dict(
        b=b, hkv=hkv, hq=hkv * g, g=g, d=d, ps=ps, pages=pages, cap=cap,
        seq_start=i32([r[0] for r in rows]), seq_end=i32([r[1] for r in rows]),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def tensors(p, dtype=torch.float32, integer=False):
    """q ``[b, hq, d]``, k/v ``[b, hkv, cap, d]`` and the bulk meta of the whole cache."""
    g = gen(p["seed"])
    make = randint if integer else randn
    q = make((p["b"], p["hq"], p["d"]), g, dtype=dtype)
    k = make((p["b"], p["hkv"], p["cap"], p["d"]), g, dtype=dtype)
    v = randn((p["b"], p["hkv"], p["cap"], p["d"]), g, dtype=dtype)
    meta = ref.build_meta(k, p["cap"], p["ps"])
    return q, k, v, meta


def check_selection(idx, scores, seq_start, seq_end, page_size, num_select, sink, recent):
    """Every documented invariant of ``select_pages`` output ``idx`` ``[b, hkv, num_select]``."""
    b, hkv, pages = scores.shape
    assert idx.dtype == I32 and idx.shape == (b, hkv, num_select)
    for r in range(b):
        start, end = int(seq_start[r]), int(seq_end[r])
        valid = valid_pages_of(start, end, pages, page_size)
        forced = set(valid[:sink]) | set(valid[max(0, len(valid) - recent):] if recent else [])
        for h in range(hkv):
            row = idx[r, h].tolist()
            n = min(num_select, len(valid))
            chosen, tail = row[:n], row[n:]
            assert all(c >= 0 for c in chosen) and all(t == -1 for t in tail), row
            assert all(a < c for a, c in zip(chosen, chosen[1:])), f"not strictly ascending: {row}"
            assert set(chosen) <= set(valid), f"invalid page chosen: {row}, valid {valid}"
            for c in chosen:  # no page past the row's end or before its start
                assert c * page_size < end and (c + 1) * page_size > start
            if len(valid) <= num_select:
                assert chosen == valid
            if len(forced) <= num_select:
                assert forced <= set(chosen), f"forced {sorted(forced)} missing from {row}"
            else:  # more forced pages than the budget: only forced pages, the lowest-numbered ones
                assert chosen == sorted(forced)[:num_select]
            # documented ranking: +inf is the largest finite score, -inf and NaN the lowest
            s = scores[r, h].nan_to_num(nan=-BIG, posinf=BIG, neginf=-BIG)
            picked = [c for c in chosen if c not in forced]
            rest = [u for u in valid if u not in forced and u not in chosen]
            for c in picked:
                for u in rest:  # higher score wins; ties go to the lower page number
                    sc, su = float(s[c]), float(s[u])
                    assert sc > su or (sc == su and c < u), (
                        f"page {c} (score {sc}) chosen over page {u} (score {su})"
                    )


# ---------------------------------------------------------------------------------------------- append_kv


@st.composite
def append_plans(draw):
    b = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 2))
    d = draw(st.sampled_from((4, 8)))
    ps = draw(st.sampled_from((8, 16)))
    prefill = draw(st.integers(1, 40))
    pads = [draw(st.integers(0, prefill - 1)) for _ in range(b)]
    if draw(st.booleans()):
        pads = [0] * b  # equal rows: a single shared pos
    chunks = draw(st.lists(st.one_of(st.just(1), st.integers(1, 2 * ps + 3)), max_size=8))
    total = prefill + sum(chunks)  # the longest row (no padding) ends here
    pages = -(-total // ps) + draw(st.integers(0, 1))
    dtype = draw(st.sampled_from((torch.float32, torch.bfloat16)))
    return dict(b=b, hkv=hkv, d=d, ps=ps, prefill=prefill, pads=pads, chunks=chunks, total=total, pages=pages,
                dtype=dtype, seed=draw(st.integers(0, 2**31 - 1)))


@SETTINGS
@given(plan=append_plans())
def test_append_incremental_matches_bulk(plan):
    """Left-padded prefill (negative pos drops the padding), then single tokens and multi-token chunks at
    per-row positions, across page boundaries: same cache contents and same meta as ``build_meta``."""
    b, hkv, d, ps, pages, dtype = plan["b"], plan["hkv"], plan["d"], plan["ps"], plan["pages"], plan["dtype"]
    cap = pages * ps
    g = gen(plan["seed"])
    full_k = randn((b, hkv, plan["total"], d), g)  # row r's real tokens: full_k[r, :, pads[r]:]
    full_v = randn((b, hkv, plan["total"], d), g)
    k_cache = torch.zeros(b, hkv, cap, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    meta = torch.zeros(b, hkv, pages, 2, d, dtype=dtype)
    pads = plan["pads"]
    same = all(p == 0 for p in pads)
    pos = i32([0]) if same else i32([-p for p in pads])
    ops.append_kv(k_cache, v_cache, meta, full_k[:, :, : plan["prefill"]], full_v[:, :, : plan["prefill"]], pos)
    lengths = [plan["prefill"] - p for p in pads]
    offset = plan["prefill"]
    for n in plan["chunks"]:
        pos = i32([lengths[0]]) if same else i32(lengths)
        ops.append_kv(k_cache, v_cache, meta, full_k[:, :, offset : offset + n], full_v[:, :, offset : offset + n], pos)
        lengths = [length + n for length in lengths]
        offset += n
    for r in range(b):
        length = lengths[r]
        assert torch.equal(k_cache[r, :, :length], full_k[r, :, pads[r] :].to(dtype))
        assert torch.equal(v_cache[r, :, :length], full_v[r, :, pads[r] :].to(dtype))
        assert not k_cache[r, :, length:].any() and not v_cache[r, :, length:].any()
        assert torch.equal(meta[r : r + 1], ref.build_meta(k_cache[r : r + 1], length, ps))
        # the meta really is the min/max of the written tokens of every page
        for page in range(-(-length // ps)):
            block = k_cache[r, :, page * ps : min((page + 1) * ps, length)]
            assert torch.equal(meta[r, :, page, 0], block.amin(1))
            assert torch.equal(meta[r, :, page, 1], block.amax(1))


@SETTINGS
@given(ps=st.sampled_from((8, 16)), pages=st.integers(1, 4), fill=st.integers(0, 64), n=st.integers(1, 20))
def test_append_overflow_raises_and_leaves_cache_untouched(ps, pages, fill, n):
    cap = pages * ps
    fill = min(fill, cap)
    k_cache = torch.zeros(2, 1, cap, 4)
    v_cache = torch.zeros_like(k_cache)
    meta = torch.zeros(2, 1, pages, 2, 4)
    g = gen(fill * 131 + n)
    if fill:
        ops.append_kv(k_cache, v_cache, meta, randn((2, 1, fill, 4), g), randn((2, 1, fill, 4), g), i32([0]))
    before = [t.clone() for t in (k_cache, v_cache, meta)]
    k_new, v_new = randn((2, 1, n, 4), g), randn((2, 1, n, 4), g)
    if fill + n > cap:
        # row 0 fits, row 1 overflows: nothing at all is written (regression: row 0 used to be written)
        with pytest.raises(ValueError, match=re.escape(f"overflows the cache capacity {cap}")):
            ops.append_kv(k_cache, v_cache, meta, k_new, v_new, i32([max(0, cap - n), fill]))
        for t, t0 in zip((k_cache, v_cache, meta), before):
            assert torch.equal(t, t0)
    else:
        ops.append_kv(k_cache, v_cache, meta, k_new, v_new, i32([fill]))
        assert torch.equal(k_cache[:, :, fill : fill + n], k_new)


def test_append_padding_beyond_capacity_is_dropped():
    """A prefill longer than the cache fits when its left padding is dropped; a fully padded row is skipped."""
    k_cache = torch.zeros(2, 1, 16, 4)
    v_cache = torch.zeros_like(k_cache)
    meta = torch.zeros(2, 1, 2, 2, 4)
    k_new = torch.arange(2 * 20 * 4, dtype=torch.float32).reshape(2, 1, 20, 4)
    ops.append_kv(k_cache, v_cache, meta, k_new, k_new, i32([-4, -20]))
    assert torch.equal(k_cache[0, 0], k_new[0, 0, 4:])
    assert not k_cache[1].any() and not meta[1].any()
    with pytest.raises(ValueError, match="overflows"):
        ops.append_kv(k_cache, v_cache, meta, k_new, k_new, i32([-3, -20]))


# ---------------------------------------------------------------------------------------------- upper bound


@SETTINGS
@given(p=problems(allow_empty=True), integer=st.booleans())
def test_quest_score_is_an_upper_bound(p, integer):
    """Per head (G=1 calls), the bound is >= max q.k over the page's valid tokens; the group's max-reduced
    score is the max of the per-head bounds and >= every head's true max; the sum-reduced score is the sum of
    the per-head bounds and >= the sum of the heads' true maxima. Invalid pages score -inf."""
    q, k, _, meta = tensors(p, integer=integer)
    b, hkv, g, pages, ps = p["b"], p["hkv"], p["g"], p["pages"], p["ps"]
    s0, s1 = p["seq_start"], p["seq_end"]
    logits = torch.einsum("bhgd,bhtd->bhgt", q.view(b, hkv, g, -1).double(), k.double())
    logits = logits.masked_fill(~token_mask(s0, s1, p["cap"])[:, None, None], float("-inf"))
    true_max = logits.view(b, hkv, g, pages, ps).amax(-1)  # [b, hkv, g, pages]
    tol = 0.0 if integer else 1e-4

    per_head = torch.stack(
        [ops.page_scores(q.view(b, hkv, g, -1)[:, :, i].contiguous(), meta, s0, s1, ps) for i in range(g)], dim=2
    )  # [b, hkv, g, pages]: G=1 calls, q_heads == kv_heads
    max_red = ops.page_scores(q, meta, s0, s1, ps, "max")
    sum_red = ops.page_scores(q, meta, s0, s1, ps, "sum")
    for t in (per_head, max_red, sum_red):
        assert t.dtype == torch.float32
    for r in range(b):
        valid = valid_pages_of(int(s0[r]), int(s1[r]), pages, ps)
        invalid = [x for x in range(pages) if x not in valid]
        assert torch.isinf(max_red[r][:, invalid]).all() and (max_red[r][:, invalid] < 0).all()
        assert torch.isinf(sum_red[r][:, invalid]).all() and (sum_red[r][:, invalid] < 0).all()
        if not valid:
            continue
        tm = true_max[r][:, :, valid]  # [hkv, g, nv]
        ph = per_head[r][:, :, valid].double()
        assert torch.isfinite(ph).all()
        assert (ph >= tm - tol * (1 + tm.abs())).all()
        mr, sr = max_red[r][:, valid].double(), sum_red[r][:, valid].double()
        assert (mr[:, None] >= tm - tol * (1 + tm.abs())).all()
        assert torch.equal(mr, ph.amax(1))
        tsum = tm.sum(1)
        assert (sr >= tsum - tol * (1 + tm.abs().sum(1))).all()
        torch.testing.assert_close(sr, ph.sum(1), atol=1e-4, rtol=1e-5)


@SETTINGS
@given(x=st.lists(st.floats(-500, 500, allow_subnormal=True, width=32), min_size=1, max_size=64))
def test_fp8_round_directed_is_the_nearest_outward_fp8_value(x):
    """Down <= x <= up (inside +-448), both on the fp8 grid, and no fp8 value lies strictly between x and
    either; zeros come out as +0.0."""
    xs = torch.tensor(x, dtype=torch.float32)
    grid = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()  # sorted, -0.0 folded into 0.0
    xc = xs.clamp(-448, 448)
    down = ref.fp8_round_directed(xs, up=False).float()
    up = ref.fp8_round_directed(xs, up=True).float()
    assert (down <= xc).all() and (xc <= up).all()
    between = (grid[None] > down[:, None]) & (grid[None] < up[:, None])
    assert not between.any()  # consecutive grid values (or both == x on the grid)
    assert ((up == down) == torch.isin(xc, grid)).all()
    zero = xs == 0
    for r in (ref.fp8_round_directed(xs, up=False), ref.fp8_round_directed(xs, up=True)):
        assert (r.view(torch.uint8)[zero] == 0).all()


@SETTINGS
@given(p=problems(allow_empty=True))
def test_fp8_meta_score_bounds_the_exact_score(p):
    """Outward-rounded fp8 metadata holds every key, so its score is still an upper bound: never below
    the exact metadata's score (hence the true max q.k) on a valid page; invalid pages stay -inf."""
    q, k, _, meta = tensors(p)
    s0, s1, ps = p["seq_start"], p["seq_end"], p["ps"]
    meta8 = ref.meta_to_fp8(meta)
    assert ((meta8[:, :, :, 0].float() <= meta[:, :, :, 0]) & (meta8[:, :, :, 1].float() >= meta[:, :, :, 1])).all()
    for red in ("max", "sum"):
        exact = ops.page_scores(q, meta, s0, s1, ps, red)
        loose = ops.page_scores(q, meta8, s0, s1, ps, red)
        assert torch.equal(torch.isneginf(loose), torch.isneginf(exact))
        fin = torch.isfinite(exact)
        assert (loose[fin] >= exact[fin] - 1e-4 * (1 + exact[fin].abs())).all()


def test_quest_bound_is_tight_for_single_token_pages():
    """A page holding one written token has min == max == k, so the bound is exactly q.k."""
    g = gen(3)
    k = randint((1, 2, 16, 8), g)
    q = randint((1, 2, 8), g)
    meta = ref.build_meta(k, 9, 8)  # page 1 holds token 8 only
    s = ops.page_scores(q, meta, i32([0]), i32([9]), 8)
    assert torch.equal(s[0, :, 1], torch.einsum("hd,hd->h", q[0], k[0, :, 8]))


# ---------------------------------------------------------------------------------------------- full budget


@SETTINGS
@given(p=problems(), extra=st.integers(0, 3), softcap=st.sampled_from((0.0, 0.0, 2.0, 30.0)),
       scale=st.floats(0.05, 1.5), fused=st.booleans())
def test_full_budget_equals_dense(p, extra, softcap, scale, fused):
    """num_select >= pages: sparse attention == reference dense == SDPA (or a manual soft-capped dense);
    the one-op ``quest_decode`` gives the same pages and output as its three ops."""
    q, k, v, meta = tensors(p)
    s0, s1, ps = p["seq_start"], p["seq_end"], p["ps"]
    num_select = p["pages"] + extra
    if fused:
        idx = ops.score_and_select(q, meta, s0, s1, ps, num_select, 1, 1)
    else:
        idx = ops.select_pages(ops.page_scores(q, meta, s0, s1, ps), s0, s1, ps, num_select, 1, 1)
    one_op_out, one_op_idx = ops.quest_decode(q, k, v, meta, s0, s1, ps, num_select, 1, 1, "max", scale, softcap, fused)
    assert torch.equal(one_op_idx, idx)
    for r in range(p["b"]):  # every valid page selected
        valid = valid_pages_of(int(s0[r]), int(s1[r]), p["pages"], ps)
        for h in range(p["hkv"]):
            assert idx[r, h].tolist() == valid + [-1] * (num_select - len(valid))
    out = ops.sparse_decode_attention(q, k, v, idx, s0, s1, ps, scale, softcap)
    assert torch.equal(one_op_out, out)
    dense = ref.dense_decode_attention(q, k, v, s0, s1, scale, softcap)
    assert out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    if softcap:
        expected = masked_attention(q, k, v, token_mask(s0, s1, p["cap"]), scale, softcap).float()
    else:
        expected = sdpa(q, k, v, s0, s1, scale)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_empty_row_gives_zeros():
    g = gen(0)
    q, k, v = randn((2, 2, 8), g), randn((2, 1, 16, 8), g), randn((2, 1, 16, 8), g)
    s0, s1 = i32([0, 5]), i32([16, 5])
    idx = ops.score_and_select(q, ref.build_meta(k, 16, 8), s0, s1, 8, 2, 1, 1)
    assert idx[1].eq(-1).all()
    out = ops.sparse_decode_attention(q, k, v, idx, s0, s1, 8, 0.3)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- selection


@SETTINGS
@given(p=problems(max_batch=4, max_pages=12, allow_empty=True), data=st.data(),
       sink=st.integers(0, 3), recent=st.integers(0, 3), kind=st.sampled_from(("quest", "ties", "neginf")))
def test_selection_invariants(p, data, sink, recent, kind):
    """Exactly min(num_select, n_valid) ascending valid pages then -1; forced pages present when they fit;
    all valid pages when they fit; the chosen non-forced pages outscore (ties: lower page) the others."""
    s0, s1, ps = p["seq_start"], p["seq_end"], p["ps"]
    num_select = data.draw(st.integers(1, p["pages"] + 1), label="num_select")
    q, _, _, meta = tensors(p)
    g = gen(p["seed"] + 1)
    if kind == "quest":
        scores = ops.page_scores(q, meta, s0, s1, ps, "max")
    else:  # small integers (many ties); invalid pages get arbitrary, even huge, scores
        scores = randint((p["b"], p["hkv"], p["pages"]), g, 0, 3)
        scores[torch.rand(scores.shape, generator=g) < 0.2] = float("inf")  # must not displace forced pages
        if kind == "neginf":  # valid pages scored -inf / NaN must still beat invalid pages (regression)
            scores[torch.rand(scores.shape, generator=g) < 0.3] = float("-inf")
            scores[torch.rand(scores.shape, generator=g) < 0.1] = float("nan")
    idx = ops.select_pages(scores, s0, s1, ps, num_select, sink, recent)
    if kind != "quest":  # re-mask invalid pages for the ranking check (their scores never matter)
        valid = ref.page_valid_mask(s0, s1, p["pages"], ps)[:, None]
        scores = scores.masked_fill(~valid, float("-inf"))
    check_selection(idx, scores, s0, s1, ps, num_select, sink, recent)
    if kind == "quest":
        assert torch.equal(idx, ops.score_and_select(q, meta, s0, s1, ps, num_select, sink, recent))


def test_selection_never_picks_invalid_page_over_neginf_valid_page():
    """Regression: a valid page scored -inf tied with the invalid pages' -inf and lost to a lower-numbered
    invalid page, which was then selected (and the valid page dropped)."""
    scores = torch.tensor([[[0.0, float("-inf"), 5.0, 0.0]]])
    idx = ops.select_pages(scores, i32([8]), i32([24]), 8, 4, 0, 0)  # pages 1 and 2 valid
    assert idx.tolist() == [[[1, 2, -1, -1]]]
    idx = ops.select_pages(scores, i32([8]), i32([24]), 8, 1, 0, 0)
    assert idx.tolist() == [[[2]]]


def test_selection_forced_pages_beat_inf_and_nan_scores():
    """Regression: a non-forced page scored +inf (or NaN) tied with (or outranked) the forced pages and could
    push the current (recent) page out of the selection."""
    s0, s1 = i32([0]), i32([24])  # pages 0..2 valid, page 2 is the recent page
    for bad in (float("inf"), float("nan")):
        scores = torch.tensor([[[bad, 1.0, 0.0]]])
        assert ops.select_pages(scores, s0, s1, 8, 1, 0, 1).tolist() == [[[2]]]
        assert ops.select_pages(scores, s0, s1, 8, 2, 0, 1).tolist() == [[[0 if bad > 0 else 1, 2]]]


def test_selection_ties_and_forced_order():
    scores = torch.tensor([[[1.0, 7.0, 7.0, 7.0, 2.0, 0.0]]])
    # no forced pages: the two best (tie among pages 1..3 goes to the lower numbers)
    assert ops.select_pages(scores, i32([0]), i32([48]), 8, 2, 0, 0).tolist() == [[[1, 2]]]
    # sink page 0 and recent page 5 forced, one free slot: page 1
    assert ops.select_pages(scores, i32([0]), i32([48]), 8, 3, 1, 1).tolist() == [[[0, 1, 5]]]
    # forced pages computed from the row's own start (page 2 is its first page) and end (page 4 its last)
    assert ops.select_pages(scores, i32([20]), i32([33]), 8, 2, 1, 1).tolist() == [[[2, 4]]]


# ---------------------------------------------------------------------------------------------- oracle


@SETTINGS
@given(p=problems(groups=(1,), max_pages=8), k_pages=st.integers(1, 8), scale=st.floats(0.1, 1.0))
def test_oracle_topk_equals_attention_over_true_topk_pages(p, k_pages, scale):
    """MHA: oracle scores + select_pages(k, sink=0, recent=0) attend exactly to the tokens of the k pages with
    the largest max q.k (computed here in float64) and match a dense attention masked to those tokens."""
    q, k, v, _ = tensors(p)
    b, hkv, pages, ps, cap = p["b"], p["hkv"], p["pages"], p["ps"], p["cap"]
    s0, s1 = p["seq_start"], p["seq_end"]
    scores = ref.oracle_page_scores(q, k, s0, s1, ps)
    idx = ops.select_pages(scores, s0, s1, ps, k_pages, 0, 0)
    tok = token_mask(s0, s1, cap)
    logits = torch.einsum("bhd,bhtd->bht", q.double(), k.double()).masked_fill(~tok[:, None], float("-inf"))
    page_max = logits.view(b, hkv, pages, ps).amax(-1)
    mask = torch.zeros(b, hkv, cap, dtype=torch.bool)
    for r in range(b):
        valid = valid_pages_of(int(s0[r]), int(s1[r]), pages, ps)
        for h in range(hkv):
            top = sorted(valid, key=lambda x: -float(page_max[r, h, x]))[:k_pages]
            assert idx[r, h].tolist() == sorted(top) + [-1] * (k_pages - len(top))
            for x in top:
                mask[r, h, x * ps : (x + 1) * ps] = True
    mask &= tok[:, None]
    out = ops.sparse_decode_attention(q, k, v, idx, s0, s1, ps, scale)
    torch.testing.assert_close(out, masked_attention(q, k, v, mask, scale).float(), atol=1e-5, rtol=1e-5)


def test_oracle_scores_are_page_maxima_and_group_reduced():
    g = gen(7)
    q, k = randint((2, 4, 8), g), randint((2, 2, 32, 8), g)
    s0, s1 = i32([3, 0]), i32([29, 32])
    per = torch.einsum("bhgd,bhtd->bhgt", q.view(2, 2, 2, 8), k).masked_fill(
        ~token_mask(s0, s1, 32)[:, None, None], float("-inf")).view(2, 2, 2, 4, 8).amax(-1)
    assert torch.equal(ref.oracle_page_scores(q, k, s0, s1, 8, "max"), per.amax(2))
    assert torch.equal(ref.oracle_page_scores(q, k, s0, s1, 8, "sum"), per.sum(2))


# ---------------------------------------------------------------------------------------------- rows


@SETTINGS
@given(p=problems(max_batch=4, max_pages=8), num_select=st.integers(1, 5), data=st.data())
def test_rows_are_independent(p, num_select, data):
    """Row r's selection and output do not change when every other row's range and contents change."""
    q, k, v, meta = tensors(p)
    s0, s1, ps = p["seq_start"], p["seq_end"], p["ps"]
    r = data.draw(st.integers(0, p["b"] - 1))

    def run(q, k, v, s0, s1):
        meta = ref.build_meta(k, p["cap"], ps)
        idx = ops.score_and_select(q, meta, s0, s1, ps, num_select, 1, 1)
        return idx, ops.sparse_decode_attention(q, k, v, idx, s0, s1, ps, 0.25)

    idx, out = run(q, k, v, s0, s1)
    q2, k2, v2, _ = tensors({**p, "seed": p["seed"] + 1})
    q2[r], k2[r], v2[r] = q[r], k[r], v[r]
    others = [data.draw(row_range(p["cap"], ps)) for _ in range(p["b"])]
    s0b, s1b = i32([o[0] for o in others]), i32([o[1] for o in others])
    s0b[r], s1b[r] = s0[r], s1[r]
    idx2, out2 = run(q2, k2, v2, s0b, s1b)
    assert torch.equal(idx2[r], idx[r])
    assert torch.equal(out2[r], out[r])
    idx1, out1 = run(q[r : r + 1], k[r : r + 1], v[r : r + 1], s0[r : r + 1], s1[r : r + 1])
    assert torch.equal(idx1[0], idx[r])
    torch.testing.assert_close(out1[0], out[r], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- baselines


@SETTINGS
@given(p=problems(max_batch=4, max_pages=12, allow_empty=True), num_select=st.integers(1, 8),
       sink=st.integers(0, 2), recent=st.integers(1, 2))
def test_streaming_selects_sink_and_most_recent(p, num_select, sink, recent):
    s0, s1, ps, pages = p["seq_start"], p["seq_end"], p["ps"], p["pages"]
    scores = ref.streaming_page_scores(s0, s1, p["hkv"], pages, ps)
    idx = ops.select_pages(scores, s0, s1, ps, num_select, sink, recent)
    check_selection(idx, scores, s0, s1, ps, num_select, sink, recent)
    for r in range(p["b"]):
        valid = valid_pages_of(int(s0[r]), int(s1[r]), pages, ps)
        if len(valid) <= num_select:
            expected = valid
        elif sink + recent > num_select:
            expected = sorted(set(valid[:sink]) | set(valid[-recent:]))[:num_select]
        else:
            expected = sorted(set(valid[:sink]) | set(valid[len(valid) - (num_select - sink):]))
        for h in range(p["hkv"]):
            assert idx[r, h].tolist() == expected + [-1] * (num_select - len(expected))


@SETTINGS
@given(p=problems(max_batch=4, max_pages=12, allow_empty=True), num_select=st.integers(1, 8),
       sink=st.integers(0, 2), recent=st.integers(1, 2), seed=st.integers(0, 1000))
def test_random_policy_deterministic_and_valid(p, num_select, sink, recent, seed):
    s0, s1, ps, pages, hkv = p["seq_start"], p["seq_end"], p["ps"], p["pages"], p["hkv"]
    torch.manual_seed(p["seed"])  # the global generator plays no part
    scores = ref.random_page_scores(s0, s1, hkv, pages, ps, seed)
    torch.manual_seed(p["seed"] + 1)
    torch.rand(3)
    again = ref.random_page_scores(s0, s1, hkv, pages, ps, seed)
    assert torch.equal(scores, again)
    valid = ref.page_valid_mask(s0, s1, pages, ps)[:, None].expand_as(scores)
    assert ((scores[valid] >= 0) & (scores[valid] < 1)).all()
    assert torch.isneginf(scores[~valid]).all()
    idx = ops.select_pages(scores, s0, s1, ps, num_select, sink, recent)
    assert torch.equal(idx, ops.select_pages(again, s0, s1, ps, num_select, sink, recent))
    check_selection(idx, scores, s0, s1, ps, num_select, sink, recent)


def test_random_policy_depends_on_seed_and_step():
    s0, s1 = i32([0, 0]), i32([1024, 1024])
    a = ref.random_page_scores(s0, s1, 2, 64, 16, seed=0)
    assert not torch.equal(a, ref.random_page_scores(s0, s1, 2, 64, 16, seed=1))
    assert not torch.equal(a, ref.random_page_scores(s0, s1 - 1, 2, 64, 16, seed=0))
    assert not torch.equal(a[:, 0], a[:, 1])  # KV heads differ


# ---------------------------------------------------------------------------------------------- dtypes


@SETTINGS
@given(p=problems(), dtype=st.sampled_from((torch.bfloat16, torch.float16)), num_select=st.integers(1, 6),
       softcap=st.sampled_from((0.0, 20.0)))
def test_low_precision_close_to_fp32(p, dtype, num_select, softcap):
    """bf16/fp16 caches: outputs keep the dtype and match the fp32 computation on the same (rounded)
    values; the selection from low-precision meta equals the fp32 selection wherever scores are not tied."""
    q32, k32, v32, _ = tensors(p)
    q, k, v = q32.to(dtype), k32.to(dtype), v32.to(dtype)
    s0, s1, ps = p["seq_start"], p["seq_end"], p["ps"]
    meta = torch.zeros(p["b"], p["hkv"], p["pages"], 2, p["d"], dtype=dtype)
    kc, vc = torch.zeros(p["b"], p["hkv"], p["cap"], p["d"], dtype=dtype), None
    vc = torch.zeros_like(kc)
    ops.append_kv(kc, vc, meta, k32, v32, i32([0]))  # fp32 input converted to the cache dtype
    assert torch.equal(kc, k) and torch.equal(vc, v)
    scores = ops.page_scores(q, meta, s0, s1, ps)
    assert scores.dtype == torch.float32
    # exact: the fp32 bound of the same (rounded) keys
    torch.testing.assert_close(scores, ops.page_scores(q.float(), meta.float(), s0, s1, ps), atol=0, rtol=0)
    idx = ops.score_and_select(q, meta, s0, s1, ps, num_select, 1, 1)
    out = ops.sparse_decode_attention(q, k, v, idx, s0, s1, ps, 0.3, softcap)
    assert out.dtype == dtype and out.shape == q.shape
    out32 = ops.sparse_decode_attention(q.float(), k.float(), v.float(), idx, s0, s1, ps, 0.3, softcap)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.float(), out32, atol=tol, rtol=tol)
    # and against the unrounded fp32 inputs, within the rounding of the inputs
    full = ops.sparse_decode_attention(q32, k32, v32, idx, s0, s1, ps, 0.3, softcap)
    torch.testing.assert_close(out.float(), full, atol=5 * tol, rtol=5 * tol)


# ---------------------------------------------------------------------------------------------- bad inputs


def _inputs():
    g = gen(11)
    q = randn((2, 4, 8), g)
    k = randn((2, 2, 32, 8), g)
    v = randn((2, 2, 32, 8), g)
    meta = ref.build_meta(k, 32, 16)
    s0, s1 = i32([0, 3]), i32([32, 20])
    scores = ops.page_scores(q, meta, s0, s1, 16)
    idx = ops.select_pages(scores, s0, s1, 16, 2)
    return dict(q=q, k=k, v=v, meta=meta, s0=s0, s1=s1, scores=scores, idx=idx)


BAD = {
    "seq_start int64 (page_scores)": (
        lambda t: ops.page_scores(t["q"], t["meta"], t["s0"].long(), t["s1"], 16), "seq_start must be int32"),
    "seq_end int64 (select_pages)": (
        lambda t: ops.select_pages(t["scores"], t["s0"], t["s1"].long(), 16, 2), "seq_end must be int32"),
    "seq_start int64 (sparse_decode)": (
        lambda t: ops.sparse_decode_attention(t["q"], t["k"], t["v"], t["idx"], t["s0"].long(), t["s1"], 16, 1.0),
        "seq_start must be int32"),
    "seq_start wrong length": (
        lambda t: ops.score_and_select(t["q"], t["meta"], t["s0"][:1], t["s1"], 16, 2), "seq_start must be int32 [batch=2]"),
    "head_dim mismatch (page_scores)": (
        lambda t: ops.page_scores(t["q"][..., :4], t["meta"], t["s0"], t["s1"], 16), "q head_dim 4 != cache head_dim 8"),
    "head_dim mismatch (sparse_decode)": (
        lambda t: ops.sparse_decode_attention(t["q"][..., :4].contiguous(), t["k"], t["v"], t["idx"], t["s0"], t["s1"], 16, 1.0),
        "q head_dim 4 != cache head_dim 8"),
    "q_heads not a multiple (page_scores)": (
        lambda t: ops.page_scores(t["q"][:, :3], t["meta"], t["s0"], t["s1"], 16), "q_heads 3 is not a multiple of kv_heads 2"),
    "q_heads not a multiple (sparse_decode)": (
        lambda t: ops.sparse_decode_attention(t["q"][:, :3], t["k"], t["v"], t["idx"], t["s0"], t["s1"], 16, 1.0),
        "q_heads 3 is not a multiple of kv_heads 2"),
    "q dtype != cache dtype": (
        lambda t: ops.page_scores(t["q"].half(), t["meta"], t["s0"], t["s1"], 16), "q dtype torch.float16 != cache dtype"),
    "cache dtype int (sparse_decode)": (
        lambda t: ops.sparse_decode_attention(t["q"], t["k"].int(), t["v"].int(), t["idx"], t["s0"], t["s1"], 16, 1.0),
        "cache dtype torch.int32 unsupported"),
    "cache dtype int (append_kv)": (
        lambda t: ops.append_kv(t["k"].int(), t["v"].int(), t["meta"].int(), t["k"][:, :, :1], t["v"][:, :, :1], i32([0])),
        "cache dtype torch.int32 unsupported"),
    "cache dtype float64 (sparse_decode)": (
        lambda t: ops.sparse_decode_attention(t["q"].double(), t["k"].double(), t["v"].double(), t["idx"], t["s0"], t["s1"], 16, 1.0),
        "cache dtype torch.float64 unsupported"),
    "meta dtype int (page_scores, regression)": (
        lambda t: ops.page_scores(t["q"].int(), t["meta"].int(), t["s0"], t["s1"], 16), "dtype torch.int32 unsupported"),
    "meta dtype int (score_and_select, regression)": (
        lambda t: ops.score_and_select(t["q"].int(), t["meta"].int(), t["s0"], t["s1"], 16, 2), "dtype torch.int32 unsupported"),
    "meta shape (page_scores)": (
        lambda t: ops.page_scores(t["q"], t["meta"][:, :, :, :1], t["s0"], t["s1"], 16),
        "meta must be [batch, kv_heads, pages, 2, head_dim]"),
    "meta rank (score_and_select)": (
        lambda t: ops.score_and_select(t["q"], t["meta"][..., 0, :], t["s0"], t["s1"], 16, 2),
        "meta must be [batch, kv_heads, pages, 2, head_dim]"),
    "meta shape (append_kv)": (
        lambda t: ops.append_kv(t["k"], t["v"], t["meta"][..., :4], t["k"][:, :, :1], t["v"][:, :, :1], i32([0])),
        "meta must be [batch, kv_heads, pages, 2, head_dim] matching the cache"),
    "meta page size (append_kv)": (
        lambda t: ops.append_kv(t["k"], t["v"], torch.zeros(2, 2, 8, 2, 8), t["k"][:, :, :1], t["v"][:, :, :1], i32([0])),
        "page_size 4 must be a power of two in 8..128"),
    "indices int64": (
        lambda t: ops.sparse_decode_attention(t["q"], t["k"], t["v"], t["idx"].long(), t["s0"], t["s1"], 16, 1.0),
        "indices must be int32 [batch, kv_heads, n], got torch.int64"),
    "indices wrong heads": (
        lambda t: ops.sparse_decode_attention(t["q"], t["k"], t["v"], t["idx"][:, :1], t["s0"], t["s1"], 16, 1.0),
        "indices must be int32 [batch, kv_heads, n]"),
    "capacity not whole pages": (
        lambda t: ops.sparse_decode_attention(t["q"], t["k"], t["v"], t["idx"], t["s0"], t["s1"], 64, 1.0),
        "capacity 32 is not a multiple of page_size 64"),
    "v_cache shape": (
        lambda t: ops.sparse_decode_attention(t["q"], t["k"], t["v"][:, :, :16], t["idx"], t["s0"], t["s1"], 16, 1.0),
        "v_cache (2, 2, 16, 8) != k_cache (2, 2, 32, 8)"),
    "scores float64": (
        lambda t: ops.select_pages(t["scores"].double(), t["s0"], t["s1"], 16, 2), "scores must be float32"),
    "num_select 0": (
        lambda t: ops.select_pages(t["scores"], t["s0"], t["s1"], 16, 0), "num_select=0 must be >= 1"),
    "negative sink_pages (regression)": (
        lambda t: ops.select_pages(t["scores"], t["s0"], t["s1"], 16, 2, -1, 1), "sink_pages=-1 / recent_pages=1 must be >= 0"),
    "negative recent_pages (regression)": (
        lambda t: ops.score_and_select(t["q"], t["meta"], t["s0"], t["s1"], 16, 2, 1, -2), "recent_pages=-2 must be >= 0"),
    "gqa_reduction": (
        lambda t: ops.page_scores(t["q"], t["meta"], t["s0"], t["s1"], 16, "mean"), "gqa_reduction='mean': allowed 'max' or 'sum'"),
    "pos float": (
        lambda t: ops.append_kv(t["k"], t["v"], t["meta"], t["k"][:, :, :1], t["v"][:, :, :1], torch.zeros(1)),
        "pos must be an integer tensor of 1 or batch=2 elements"),
    "pos wrong length": (
        lambda t: ops.append_kv(t["k"], t["v"], t["meta"], t["k"][:, :, :1], t["v"][:, :, :1], i32([0, 0, 0])),
        "pos must be an integer tensor of 1 or batch=2 elements"),
    "k_new heads": (
        lambda t: ops.append_kv(t["k"], t["v"], t["meta"], t["k"][:, :1, :1], t["v"][:, :1, :1], i32([0])),
        "k_new (2, 1, 1, 8) does not fit the cache (2, 2, 32, 8)"),
    "k_new / v_new shapes": (
        lambda t: ops.append_kv(t["k"], t["v"], t["meta"], t["k"][:, :, :1], t["v"][:, :, :2], i32([0])),
        "k_new and v_new shapes differ"),
    "quest_decode page size": (
        lambda t: ops.quest_decode(t["q"], t["k"], t["v"], t["meta"], t["s0"], t["s1"], 8, 2),
        "page_size=8 but the cache holds pages of 16 tokens"),
    "quest_decode fused": (
        lambda t: ops.quest_decode(t["q"], t["k"], t["v"], t["meta"], t["s0"], t["s1"], 16, 2, fused="yes"),
        "fused='yes': allowed True, False or 'auto'"),
    "quest_decode fused 1": (
        lambda t: ops.quest_decode(t["q"], t["k"], t["v"], t["meta"], t["s0"], t["s1"], 16, 2, fused=1),
        "fused=1: allowed True, False or 'auto'"),
    "quest_decode num_select 0": (
        lambda t: ops.quest_decode(t["q"], t["k"], t["v"], t["meta"], t["s0"], t["s1"], 16, 0), "num_select=0 must be >= 1"),
    "quest_decode gqa_reduction": (
        lambda t: ops.quest_decode(t["q"], t["k"], t["v"], t["meta"], t["s0"], t["s1"], 16, 2, gqa_reduction="mean"),
        "gqa_reduction='mean': allowed 'max' or 'sum'"),
    "quest_decode q heads": (
        lambda t: ops.quest_decode(t["q"][:, :3], t["k"], t["v"], t["meta"], t["s0"], t["s1"], 16, 2),
        "q_heads 3 is not a multiple of kv_heads 2"),
    "dense_decode page size": (
        lambda t: ops.dense_decode_attention(t["q"], t["k"], t["v"], t["s0"], t["s1"], 5, 0.3),
        "capacity 32 is not a multiple of page_size 5"),
    "dense_decode window": (
        lambda t: ops.dense_decode_attention(t["q"], t["k"], t["v"], t["s0"], t["s1"], 16, 0.3, window=0),
        "window=0 must be >= 1"),
    "dense_decode q heads": (
        lambda t: ops.dense_decode_attention(t["q"][:, :3], t["k"], t["v"], t["s0"], t["s1"], 16, 0.3),
        "q_heads 3 is not a multiple of kv_heads 2"),
    "append overflow": (
        lambda t: ops.append_kv(t["k"], t["v"], t["meta"], t["k"][:, :, :2], t["v"][:, :, :2], i32([31])),
        "append of 2 tokens at 31 overflows the cache capacity 32"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_value_error(case):
    fn, message = BAD[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        fn(_inputs())


def test_group_helper_rejects_bad_heads_and_reduction():
    with pytest.raises(ValueError, match="q_heads=3 is not a multiple of kv_heads=2"):
        ref.page_scores(torch.zeros(1, 3, 4), torch.zeros(1, 2, 1, 2, 4), i32([0]), i32([8]), 8)
    with pytest.raises(ValueError, match="gqa_reduction='avg'"):
        ref.oracle_page_scores(torch.zeros(1, 2, 4), torch.zeros(1, 2, 8, 4), i32([0]), i32([8]), 8, "avg")
