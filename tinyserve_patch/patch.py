"""patch_model / unpatch_model: switch a loaded HF causal LM to sparse decode attention and back.

Patching (1) sets the model's attention implementation to ``"tinyserve"`` (registered with transformers'
AttentionInterface), (2) puts a forward pre-hook on every self-attention module that hands the module its
:class:`~tinyserve_patch.cache.TinyServeLayer`, and (3) stores the :class:`SparseConfig`. ``generate()``
then allocates a :class:`~tinyserve_patch.cache.TinyServeCache` itself (see :func:`install_generate_hook`).
Nothing of the model's own forward code is replaced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import SparseConfig
from .hf_compat import CACHE_KWARG, cache_in

SUPPORTED_FAMILIES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gpt2": "GPT-2",
    "phi3": "Phi-3",
    "gemma": "Gemma",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3",
}


@dataclass
class PatchState:
    """What patching added to a model; shared by its attention modules."""

    config: SparseConfig
    original_attn_implementation: str | None
    hook_handles: list = field(default_factory=list)
    modules: list = field(default_factory=list)
    last_cache: object = None


def model_family(model) -> str:
    """The model's ``model_type`` if supported, else a ValueError listing the supported families."""
    config = getattr(model, "config", None)
    if config is None or not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch_model needs a loaded transformers PreTrainedModel, got {type(model).__name__}")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for model_type in (getattr(config, "model_type", None), getattr(text, "model_type", None)):
        if model_type in SUPPORTED_FAMILIES:
            return model_type
    supported = ", ".join(f"{v} ({k})" for k, v in SUPPORTED_FAMILIES.items())
    raise ValueError(
        f"tinyserve does not support model_type={getattr(config, 'model_type', None)!r} "
        f"({type(model).__name__}); supported families: {supported}"
    )


def _attention_modules(model) -> list:
    """Self-attention modules: the ones transformers gives a ``layer_idx`` (cross-attention excluded)."""
    found = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("Attention")
        and isinstance(getattr(m, "layer_idx", None), int)
        and not getattr(m, "is_cross_attention", False)
    ]
    if not found:
        raise ValueError(f"no self-attention modules with a layer_idx found in {type(model).__name__}")
    return found


def _inject_cache_layer(module, args, kwargs):
    """Forward pre-hook: pass the module its TinyServeLayer as the ``tinyserve_layer`` keyword; at the
    layer's first forward and every prefill chunk, read the rows' left padding off the mask before the
    keys are written."""
    from .cache import TinyServeCache

    cache = cache_in(kwargs)
    if not isinstance(cache, TinyServeCache):
        return None
    layer = cache.layers[module.layer_idx]
    hidden = args[0] if args else kwargs["hidden_states"]
    if not layer.observed or hidden.shape[1] > 1:  # the first forward and every prefill chunk
        layer.observe_padding(kwargs.get("attention_mask"), hidden.shape[0], hidden.shape[1], hidden.device)
    kwargs["tinyserve_layer"] = layer
    return args, kwargs


def _set_attn_implementation(model, name: str | None) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = name


def get_config(model) -> SparseConfig | None:
    state = getattr(model, "_tinyserve_state", None)
    return state.config if state is not None else None


def is_patched(model) -> bool:
    return getattr(model, "_tinyserve_state", None) is not None


def _config_from_model(model) -> SparseConfig:
    saved = getattr(model.config, "tinyserve", None)
    return SparseConfig.from_kwargs(**saved) if isinstance(saved, dict) else SparseConfig()


def patch_model(model, config: SparseConfig | None = None, **overrides):
    """Patch ``model`` in place for sparse decode attention and return it.

    Args:
        model: a loaded transformers causal LM of a supported family (see ``SUPPORTED_FAMILIES``).
        config: a :class:`SparseConfig`; defaults to the one saved in ``model.config.tinyserve`` (if any)
            or ``SparseConfig()``.
        **overrides: SparseConfig fields to change (e.g. ``token_budget=1024``; ``"dense"`` for None).

    Idempotent: patching a patched model replaces its config and keeps one set of hooks.
    """
    from .attention import ATTN_IMPLEMENTATION, register

    model_family(model)
    if config is not None and not isinstance(config, SparseConfig):
        raise TypeError(f"config must be a SparseConfig, got {type(config).__name__}")
    state = getattr(model, "_tinyserve_state", None)
    base = config or (state.config if state is not None else _config_from_model(model))
    sparse_config = SparseConfig.from_kwargs(base, **overrides)
    register()
    install_generate_hook()
    if state is None:
        original = getattr(model.config, "_attn_implementation", None)
        state = PatchState(config=sparse_config, original_attn_implementation=original)
        for module in _attention_modules(model):
            module._tinyserve_state = state
            state.modules.append(module)
            state.hook_handles.append(module.register_forward_pre_hook(_inject_cache_layer, with_kwargs=True))
        model._tinyserve_state = state
        _set_attn_implementation(model, ATTN_IMPLEMENTATION)
    else:
        state.config = sparse_config
    model.config.tinyserve = sparse_config.to_dict()
    return model


def unpatch_model(model):
    """Undo :func:`patch_model`: hooks removed, the original attention implementation restored."""
    state = getattr(model, "_tinyserve_state", None)
    if state is None:
        return model
    for handle in state.hook_handles:
        handle.remove()
    for module in state.modules:
        if hasattr(module, "_tinyserve_state"):
            del module._tinyserve_state
    _set_attn_implementation(model, state.original_attn_implementation)
    if hasattr(model.config, "tinyserve"):
        del model.config.tinyserve
    del model._tinyserve_state
    return model


# ---------------------------------------------------------------------------------------------- generate()

_GENERATE_HOOK_INSTALLED = False


def install_generate_hook() -> None:
    """Make ``generate()`` of any model whose attention implementation is ``"tinyserve"`` allocate a
    :class:`TinyServeCache` sized for the prompt plus ``max_new_tokens`` (unless the caller passed a cache),
    apply ``SparseConfig.prefill_chunk_size``, and run chunked prefills eagerly.

    A model loaded with ``attn_implementation="tinyserve"`` is patched here, with the config saved in
    ``model.config.tinyserve`` or the defaults."""
    global _GENERATE_HOOK_INSTALLED
    if _GENERATE_HOOK_INSTALLED:
        return
    from transformers.generation.utils import GenerationMixin

    from .attention import ATTN_IMPLEMENTATION
    from .cache import make_cache

    original = GenerationMixin._prepare_cache_for_generation

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs):
        if getattr(self.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            return original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs)
        if not is_patched(self):
            patch_model(self)
        if generation_config.prefill_chunk_size is None:  # the config's chunking, unless the call sets its own
            generation_config.prefill_chunk_size = self._tinyserve_state.config.prefill_chunk_size
        if cache_in(model_kwargs) is not None:
            return original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs)
        if generation_config.cache_implementation is not None:
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} cannot be combined with tinyserve, "
                "which brings its own static, page-aligned cache"
            )
        model_kwargs[CACHE_KWARG] = make_cache(self, batch_size, int(max_cache_length) + 1)
        return None

    GenerationMixin._prepare_cache_for_generation = _prepare_cache_for_generation

    original_prefill = GenerationMixin._prefill

    def _prefill(self, input_ids, generation_config, *args, **kwargs):
        # HF compiles the forward of each prefill chunk when it auto-compiles decoding; its unchunked
        # prefill runs eagerly. Chunks of a tinyserve model run eagerly too (a compute-bound step that
        # compiling does not speed up, and whose graphs would not fit the decode step's CUDA graphs);
        # the decode steps after it still compile.
        chunked = generation_config.prefill_chunk_size is not None and not generation_config.disable_compile
        if not chunked or getattr(self.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            return original_prefill(self, input_ids, generation_config, *args, **kwargs)
        generation_config.disable_compile = True
        try:
            return original_prefill(self, input_ids, generation_config, *args, **kwargs)
        finally:
            generation_config.disable_compile = False

    GenerationMixin._prefill = _prefill
    _GENERATE_HOOK_INSTALLED = True
