"""SparseConfig: defaults, validation (every invalid field names the field, the value and the allowed
range), string parsing of ``from_kwargs``, ``is_dense`` / ``budget_pages``."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve_patch.config import GQA_REDUCTIONS, PAGE_SIZES, POLICIES, SparseConfig

SETTINGS = settings(deadline=None, max_examples=40, derandomize=True, database=None)


def _raises_naming(field: str, value, allowed: str, **kwargs):
    """Construct with ``kwargs`` and expect ``ValueError`` naming ``field``, ``value`` and ``allowed``."""
    with pytest.raises(ValueError) as info:
        SparseConfig(**kwargs)
    msg = str(info.value)
    assert f"SparseConfig.{field}={value!r}" in msg, msg
    assert allowed in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------- defaults


def test_defaults():
    c = SparseConfig()
    assert c.token_budget == 2048
    assert c.page_size == 16
    assert (c.sink_pages, c.recent_pages, c.dense_layers) == (1, 1, 2)
    assert (c.policy, c.gqa_reduction) == ("quest", "max")
    assert (c.fused, c.seed, c.collect_stats, c.track_recall) == ("auto", 0, True, False)
    assert c.extra == {}
    assert not c.is_dense
    assert c.budget_pages == 128
    assert c.policy in POLICIES and c.gqa_reduction in GQA_REDUCTIONS and c.page_size in PAGE_SIZES


def test_frozen_and_to_dict():
    c = SparseConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.page_size = 32  # type: ignore[misc]
    d = c.to_dict()
    assert "extra" not in d
    assert d == {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "extra"}
    # extra does not take part in equality
    assert SparseConfig(extra={"a": 1}) == SparseConfig()


# ---------------------------------------------------------------------------------------------- invalid fields

# (field, value, fragment of the allowed range, other kwargs)
INVALID = [
    ("page_size", 4, "one of (8, 16, 32, 64, 128)", {}),
    ("page_size", 12, "one of (8, 16, 32, 64, 128)", {}),
    ("page_size", 256, "one of (8, 16, 32, 64, 128)", {}),
    ("page_size", 0, "one of (8, 16, 32, 64, 128)", {}),
    ("page_size", -16, "one of (8, 16, 32, 64, 128)", {}),
    ("page_size", True, "one of (8, 16, 32, 64, 128)", {}),
    ("page_size", "16", "one of (8, 16, 32, 64, 128)", {}),
    ("token_budget", 100, "a multiple of page_size=16", {}),
    ("token_budget", 2056, "a multiple of page_size=16", {}),
    ("token_budget", 200, "a multiple of page_size=64", {"page_size": 64, "sink_pages": 0}),
    ("token_budget", 32, ">= (sink_pages + recent_pages + 1) * page_size = 48", {}),
    ("token_budget", 0, ">= (sink_pages + recent_pages + 1) * page_size = 48", {}),
    ("token_budget", -16, ">= (sink_pages + recent_pages + 1) * page_size = 48", {}),
    ("token_budget", 96, ">= (sink_pages + recent_pages + 1) * page_size = 112", {"sink_pages": 4, "recent_pages": 2}),
    ("token_budget", True, "a positive integer or None (dense)", {}),
    ("token_budget", 2048.0, "a positive integer or None (dense)", {}),
    ("token_budget", "2048", "a positive integer or None (dense)", {}),
    ("sink_pages", -1, "an integer >= 0", {}),
    ("sink_pages", True, "an integer >= 0", {}),
    ("sink_pages", 1.0, "an integer >= 0", {}),
    ("recent_pages", -1, "an integer >= 0", {}),
    ("recent_pages", 0, "an integer >= 1", {}),
    ("recent_pages", False, "an integer >= 0", {}),
    ("dense_layers", -2, "an integer >= 0", {}),
    ("dense_layers", True, "an integer >= 0", {}),
    ("seed", -1, "an integer >= 0", {}),
    ("seed", None, "an integer >= 0", {}),
    ("policy", "topk", "one of ('quest', 'oracle', 'streaming', 'random')", {}),
    ("policy", "Quest", "one of ('quest', 'oracle', 'streaming', 'random')", {}),
    ("gqa_reduction", "mean", "one of ('max', 'sum')", {}),
    ("gqa_reduction", None, "one of ('max', 'sum')", {}),
    ("fused", 1, "True, False or 'auto'", {}),
    ("fused", "true", "True, False or 'auto'", {}),
    ("fused", None, "True, False or 'auto'", {}),
    ("collect_stats", 0, "True or False", {}),
    ("track_recall", None, "True or False", {}),
    ("prefill_chunk_size", 0, "a positive integer", {}),
    ("prefill_chunk_size", 1.5, "a positive integer", {}),
    ("prefill_chunk_size", True, "a positive integer", {}),
    ("kv_cache_dtype", "fp8", "one of", {}),
    ("kv_cache_dtype", "int8", "one of", {}),
]


@pytest.mark.parametrize("field,value,allowed,other", INVALID, ids=[f"{f}={v!r}" for f, v, _, _ in INVALID])
def test_invalid_field_message(field, value, allowed, other):
    _raises_naming(field, value, allowed, **{field: value, **other})


@pytest.mark.parametrize("value", [16.0, 8.0])
def test_float_page_size_rejected(value):
    _raises_naming("page_size", value, "one of", page_size=value)


@SETTINGS
@given(
    page_size=st.sampled_from(PAGE_SIZES),
    sink=st.integers(0, 4),
    recent=st.integers(1, 4),
    extra=st.integers(0, 64),
)
def test_budget_bounds(page_size, sink, recent, extra):
    """The smallest valid budget is (sink + recent + 1) pages; every whole number of pages above it is
    valid; a page less, or any non-multiple of the page size, is not."""
    min_pages = sink + recent + 1
    tb = (min_pages + extra) * page_size
    c = SparseConfig(token_budget=tb, page_size=page_size, sink_pages=sink, recent_pages=recent)
    assert c.budget_pages == min_pages + extra
    assert c.budget_pages * page_size == c.token_budget
    assert not c.is_dense
    too_small = (min_pages - 1) * page_size
    _raises_naming(
        "token_budget", too_small, f"= {min_pages * page_size}",
        token_budget=too_small, page_size=page_size, sink_pages=sink, recent_pages=recent,
    )
    ragged = tb + page_size // 2
    _raises_naming(
        "token_budget", ragged, f"a multiple of page_size={page_size}",
        token_budget=ragged, page_size=page_size, sink_pages=sink, recent_pages=recent,
    )


@SETTINGS
@given(page_size=st.integers(-300, 300).filter(lambda p: p not in PAGE_SIZES))
def test_page_size_only_powers_of_two_8_to_128(page_size):
    _raises_naming("page_size", page_size, "one of (8, 16, 32, 64, 128)", page_size=page_size)


@pytest.mark.parametrize("field", ["sink_pages", "recent_pages", "dense_layers", "seed"])
@SETTINGS
@given(value=st.integers(max_value=-1))
def test_negative_counts(field, value):
    _raises_naming(field, value, "an integer >= 0", **{field: value})


def test_replace_validates():
    c = SparseConfig()
    assert c.replace(page_size=32).budget_pages == 64
    with pytest.raises(ValueError, match=re.escape("SparseConfig.policy='nope'")):
        c.replace(policy="nope")


# ---------------------------------------------------------------------------------------------- dense


@pytest.mark.parametrize("text", ["dense", "none", "full", "DENSE", " Dense ", "None"])
def test_from_kwargs_dense(text):
    c = SparseConfig.from_kwargs(token_budget=text)
    assert c.token_budget is None and c.is_dense
    with pytest.raises(ValueError, match="dense"):
        c.budget_pages


def test_dense_skips_budget_checks():
    c = SparseConfig(token_budget=None, sink_pages=10, recent_pages=10)
    assert c.is_dense


# ---------------------------------------------------------------------------------------------- from_kwargs


def test_from_kwargs_parses_strings():
    c = SparseConfig.from_kwargs(
        token_budget="512", page_size="32", sink_pages=" 2 ", recent_pages="3", dense_layers="0",
        policy="streaming", gqa_reduction="sum", fused="true", seed="7", collect_stats="no", track_recall="1",
    )
    assert c == SparseConfig(
        token_budget=512, page_size=32, sink_pages=2, recent_pages=3, dense_layers=0, policy="streaming",
        gqa_reduction="sum", fused=True, seed=7, collect_stats=False, track_recall=True,
    )
    assert c.budget_pages == 16


@pytest.mark.parametrize("text,expected", [("true", True), ("True", True), ("YES", True), ("1", True),
                                           ("false", False), ("No", False), ("0", False)])
def test_from_kwargs_bools(text, expected):
    assert SparseConfig.from_kwargs(fused=text).fused is expected
    assert SparseConfig.from_kwargs(track_recall=text).track_recall is expected


def test_fused_auto():
    assert SparseConfig.from_kwargs(fused=" Auto ").fused == "auto"
    assert SparseConfig(fused=False).replace(fused="auto") == SparseConfig()
    with pytest.raises(ValueError, match=re.escape("SparseConfig.track_recall='auto' is invalid: allowed true or false")):
        SparseConfig.from_kwargs(track_recall="auto")


def test_prefill_chunk_size_parsing():
    assert SparseConfig().prefill_chunk_size is None
    assert SparseConfig.from_kwargs(prefill_chunk_size="4096").prefill_chunk_size == 4096
    assert SparseConfig.from_kwargs(prefill_chunk_size="none").prefill_chunk_size is None


def test_from_kwargs_bad_strings():
    with pytest.raises(ValueError, match=re.escape("SparseConfig.fused='maybe' is invalid: allowed true, false or auto")):
        SparseConfig.from_kwargs(fused="maybe")
    with pytest.raises(ValueError, match=re.escape("SparseConfig.page_size='sixteen' is invalid: allowed an integer")):
        SparseConfig.from_kwargs(page_size="sixteen")
    with pytest.raises(ValueError, match=re.escape("SparseConfig.token_budget='1.5k'")):
        SparseConfig.from_kwargs(token_budget="1.5k")
    # parsed values are validated like constructor arguments
    with pytest.raises(ValueError, match=re.escape("SparseConfig.token_budget=500")):
        SparseConfig.from_kwargs(token_budget="500")
    with pytest.raises(ValueError, match=re.escape("SparseConfig.policy='lru'")):
        SparseConfig.from_kwargs(policy="lru")


@pytest.mark.parametrize("name", ["budget", "token_budgets", "extra", "pagesize"])
def test_from_kwargs_unknown_field(name):
    with pytest.raises(ValueError, match="unknown SparseConfig field") as info:
        SparseConfig.from_kwargs(**{name: "1"})
    assert repr(name) in str(info.value)
    assert "token_budget" in str(info.value)  # the known fields are listed


def test_from_kwargs_keeps_base_and_non_strings():
    base = SparseConfig(token_budget=1024, page_size=32, policy="oracle")
    c = SparseConfig.from_kwargs(base, sink_pages=2, fused=True)
    assert (c.token_budget, c.page_size, c.policy, c.sink_pages, c.fused) == (1024, 32, "oracle", 2, True)
    assert SparseConfig.from_kwargs() == SparseConfig()


@st.composite
def valid_configs(draw):
    page_size = draw(st.sampled_from(PAGE_SIZES))
    sink = draw(st.integers(0, 3))
    recent = draw(st.integers(1, 3))
    dense = draw(st.booleans())
    budget = None if dense else (sink + recent + 1 + draw(st.integers(0, 40))) * page_size
    return SparseConfig(
        token_budget=budget, page_size=page_size, sink_pages=sink, recent_pages=recent,
        dense_layers=draw(st.integers(0, 8)), policy=draw(st.sampled_from(POLICIES)),
        gqa_reduction=draw(st.sampled_from(GQA_REDUCTIONS)), fused=draw(st.sampled_from([False, True, "auto"])),
        seed=draw(st.integers(0, 2**31)), collect_stats=draw(st.booleans()), track_recall=draw(st.booleans()),
    )


@SETTINGS
@given(cfg=valid_configs())
def test_from_kwargs_string_round_trip(cfg):
    """Every field written as a string (as on a command line) parses back to the same config."""
    as_strings = {k: str(v) for k, v in cfg.to_dict().items()}
    assert SparseConfig.from_kwargs(**as_strings) == cfg
    assert SparseConfig.from_kwargs(**cfg.to_dict()) == cfg
    assert cfg.is_dense == (cfg.token_budget is None)
    if not cfg.is_dense:
        assert cfg.budget_pages >= cfg.sink_pages + cfg.recent_pages + 1


def test_kv_cache_dtype_parsing():
    import torch

    assert SparseConfig().kv_cache_dtype == "auto" and SparseConfig().kv_storage_dtype is None
    cfg = SparseConfig.from_kwargs(kv_cache_dtype=" fp8_e4m3 ")
    assert cfg.kv_cache_dtype == "fp8_e4m3" and cfg.kv_storage_dtype == torch.float8_e4m3fn


def test_page_meta_dtype_parsing():
    import torch

    assert SparseConfig().page_meta_dtype == "auto" and SparseConfig().meta_storage_dtype is None
    cfg = SparseConfig.from_kwargs(page_meta_dtype=" fp8_e4m3 ")
    assert cfg.page_meta_dtype == "fp8_e4m3" and cfg.meta_storage_dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="page_meta_dtype"):
        SparseConfig(page_meta_dtype="int4")
