"""The name of the cache argument of HF models, which transformers renamed from ``past_key_values`` to
``cache`` (5.24; the old name stays a deprecated alias until 5.40, for the forward argument and the
output attribute alike). Everything that passes or reads a cache goes through here, so the package runs
on both sides of the rename (5.17 on the lent GPU, the newest on CPU machines)."""

from __future__ import annotations

from dataclasses import fields

from transformers.modeling_outputs import CausalLMOutputWithPast

#: ``"cache"`` on transformers >= 5.24, ``"past_key_values"`` before: the keyword of a model's forward,
#: of ``generate()``'s model kwargs, and the attribute of its outputs.
CACHE_KWARG = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


def cache_in(kwargs: dict):
    """The cache in a forward's (or ``generate()``'s model) keyword arguments under either name, else None."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def output_cache(outputs):
    """The cache a model's forward returned (``outputs.cache`` / ``outputs.past_key_values``)."""
    return getattr(outputs, CACHE_KWARG)
