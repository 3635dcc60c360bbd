"""SparseConfig: every knob of sparse decode attention, validated once, here.

Units: ``token_budget`` is in tokens; ``sink_pages`` / ``recent_pages`` are in pages of ``page_size``
tokens. The budget always contains the sink and recent pages: ``budget_pages = token_budget // page_size``
pages are attended per decode step, per batch row and KV head.

Exact-dense rule: a sequence whose valid length is within ``token_budget`` attends to every one of its
tokens (every valid page is selected), so attention is exact. When the whole KV cache can never exceed
the budget (its capacity is within it), decoding calls the dense SDPA path itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

POLICIES = ("quest", "oracle", "streaming", "random")
PAGE_SIZES = (8, 16, 32, 64, 128)
GQA_REDUCTIONS = ("max", "sum")
#: kv_cache_dtype / page_meta_dtype name -> storage dtype of the cached K/V or page metadata (None: the model's dtype)
KV_CACHE_DTYPES = {"auto": None, "fp8_e4m3": torch.float8_e4m3fn}


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"SparseConfig.{name}={value!r} is invalid: allowed {allowed}")


@dataclass(frozen=True)
class SparseConfig:
    """Configuration of query-aware page selection.

    Attributes:
        token_budget: tokens attended per decode step (per row and KV head), sink and recent included.
            Must be a multiple of ``page_size`` and hold at least ``sink_pages + recent_pages + 1`` pages.
            ``None`` means dense: the same code path with every page selected (the eval baseline).
        page_size: tokens per page; a power of two in 8..128.
        sink_pages: the first pages of each row, always attended (attention sinks).
        recent_pages: the last pages of each row, always attended; the current, possibly partial,
            page is the last of them.
        dense_layers: the first N decoder layers stay dense (Quest keeps 2).
        policy: page-selection policy: ``quest`` (min/max upper bound), ``oracle`` (exact top pages by
            max q.k, for measuring recall), ``streaming`` (sink + most recent pages), ``random``.
        gqa_reduction: how the scores of a KV head's query-head group become one selection:
            ``max`` (a page matters if it matters to any head of the group) or ``sum``.
        fused: which CUDA kernels run a ``quest`` decode step (never what it computes: the same pages and
            output either way). ``False``: score, select and attention kernels, one grid after another.
            ``True``: the fused row-chained decode (score and select in one kernel whose last program of a
            row selects it and releases that row's attention programs). ``"auto"`` (default): the fused
            chain where it was measured faster (head_dim 128, K/V and metadata in the model's dtype, a score
            grid of two waves or more: Llama-3-8B batch 8 at 64K tokens, 8.6x dense on the H100 against
            7.9x), else the three kernels (``ops/triton_chain.prefer_fused_chain``).
        seed: seed of the ``random`` policy.
        collect_stats: keep per-layer counters (pages attended, fraction read, page hit rate) on the
            device for :func:`tinyserve_patch.stats`; a few tiny kernels per layer and step.
        track_recall: also score every decode step with the oracle and count how many of the oracle's
            top pages were selected (reads every key: for measurement only).
        prefill_chunk_size: ``generate()`` prefills long prompts in chunks of this many tokens (HF's
            ``prefill_chunk_size``; a call that sets its own wins): the prefill's activations then scale
            with the chunk, not the prompt, so long-context peak memory is little more than weights +
            KV cache. ``None``: one prefill forward (HF's default). Outputs equal the unchunked prefill's
            up to floating-point summation order.
        kv_cache_dtype: storage of the cached keys and values. ``auto``: the model's dtype (exact).
            ``fp8_e4m3``: ``float8_e4m3fn`` (half the cache memory of bf16 and half the bytes a decode step
            reads), values saturated to +-448 and rounded to nearest, no scale factor (as vLLM's
            uncalibrated fp8 cache); attention computes in the model's dtype; page metadata stays in
            the model's dtype and bounds the stored (rounded) keys, so the Quest bound still holds.
            Lossy: its accuracy cost is measured by the eval (README).
        page_meta_dtype: storage of the per-page key min / max. ``auto``: the model's dtype (exact
            bounds). ``fp8_e4m3``: ``float8_e4m3fn`` with the minimum rounded down and the maximum
            rounded up (saturated at +-448), so every key stays inside its page's box and the score is
            still an upper bound, only a looser one: half the bytes the scoring pass reads (the largest
            read of a long-context decode step after the selected pages) and half the metadata memory.
            Changes which pages are selected, never the attention over them; its accuracy cost is
            measured by the eval (README).
    """

    token_budget: int | None = 2048
    page_size: int = 16
    sink_pages: int = 1
    recent_pages: int = 1
    dense_layers: int = 2
    policy: str = "quest"
    gqa_reduction: str = "max"
    fused: bool | str = "auto"
    seed: int = 0
    collect_stats: bool = True
    track_recall: bool = False
    prefill_chunk_size: int | None = None
    kv_cache_dtype: str = "auto"
    page_meta_dtype: str = "auto"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if type(self.page_size) is not int or self.page_size not in PAGE_SIZES:
            _fail("page_size", self.page_size, f"one of {PAGE_SIZES}")
        for name in ("sink_pages", "recent_pages", "dense_layers", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _fail(name, value, "an integer >= 0")
        if self.recent_pages < 1:
            _fail("recent_pages", self.recent_pages, "an integer >= 1 (the current page is always attended)")
        if self.token_budget is not None:
            tb = self.token_budget
            if not isinstance(tb, int) or isinstance(tb, bool):
                _fail("token_budget", tb, "a positive integer or None (dense)")
            min_pages = self.sink_pages + self.recent_pages + 1
            if tb < min_pages * self.page_size:
                _fail(
                    "token_budget",
                    tb,
                    f">= (sink_pages + recent_pages + 1) * page_size = {min_pages * self.page_size}",
                )
            if tb % self.page_size:
                _fail("token_budget", tb, f"a multiple of page_size={self.page_size}")
        if self.policy not in POLICIES:
            _fail("policy", self.policy, f"one of {POLICIES}")
        if self.gqa_reduction not in GQA_REDUCTIONS:
            _fail("gqa_reduction", self.gqa_reduction, f"one of {GQA_REDUCTIONS}")
        for name in ("collect_stats", "track_recall"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")
        if not (isinstance(self.fused, bool) or self.fused == "auto"):
            _fail("fused", self.fused, "True, False or 'auto'")
        pc = self.prefill_chunk_size
        if pc is not None and (not isinstance(pc, int) or isinstance(pc, bool) or pc < 1):
            _fail("prefill_chunk_size", pc, "a positive integer (tokens per prefill chunk) or None")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            _fail("kv_cache_dtype", self.kv_cache_dtype, f"one of {tuple(KV_CACHE_DTYPES)}")
        if self.page_meta_dtype not in KV_CACHE_DTYPES:
            _fail("page_meta_dtype", self.page_meta_dtype, f"one of {tuple(KV_CACHE_DTYPES)}")

    @property
    def kv_storage_dtype(self) -> torch.dtype | None:
        """The torch dtype of the cached K/V, ``None`` for the model's own."""
        return KV_CACHE_DTYPES[self.kv_cache_dtype]

    @property
    def meta_storage_dtype(self) -> torch.dtype | None:
        """The torch dtype of the page metadata, ``None`` for the model's own."""
        return KV_CACHE_DTYPES[self.page_meta_dtype]

    @property
    def is_dense(self) -> bool:
        return self.token_budget is None

    @property
    def budget_pages(self) -> int:
        """Pages attended per decode step; only meaningful when not dense."""
        if self.token_budget is None:
            raise ValueError("a dense SparseConfig has no page budget")
        return self.token_budget // self.page_size

    def replace(self, **overrides: Any) -> "SparseConfig":
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_kwargs(cls, base: "SparseConfig | None" = None, **overrides: Any) -> "SparseConfig":
        """Build from keyword overrides; strings are parsed (for CLI / lm-eval ``model_args``).

        ``token_budget`` accepts ``"dense"`` / ``"none"`` for the dense baseline.
        """
        base = base or cls()
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown SparseConfig field(s) {sorted(unknown)}; known: {sorted(names)}")
        parsed = {k: _parse(k, v) for k, v in overrides.items()}
        return dataclasses.replace(base, **parsed)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d


def _parse(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip()
    if name == "token_budget" and text.lower() in ("dense", "none", "full"):
        return None
    if name == "prefill_chunk_size" and text.lower() in ("none", "off", "0"):
        return None
    if name in ("policy", "gqa_reduction", "kv_cache_dtype", "page_meta_dtype"):
        return text
    if name == "fused" and text.lower() == "auto":
        return "auto"
    if name in ("fused", "collect_stats", "track_recall"):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        _fail(name, value, "true, false or auto" if name == "fused" else "true or false")
    try:
        return int(text)
    except ValueError:
        _fail(name, value, "an integer")
