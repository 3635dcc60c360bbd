"""tinyserve-patch: drop-in query-aware sparse decode attention for HuggingFace causal LMs.

    import tinyserve_patch
    tinyserve_patch.patch_model(model, token_budget=2048)   # generate() now decodes sparse
    tinyserve_patch.stats(model)                              # what the last run read
    tinyserve_patch.unpatch_model(model)                      # dense again, exactly

Importing the package registers ``attn_implementation="tinyserve"`` with transformers.
"""

from .config import SparseConfig
from .attention import register as _register_attention
from .cache import TinyServeCache, make_cache
from .patch import SUPPORTED_FAMILIES, get_config, install_generate_hook, is_patched, patch_model, unpatch_model

__version__ = "0.1.0"


def stats(model) -> dict:
    """Per-layer instrumentation of the model's last sparse run (see :mod:`tinyserve_patch.stats`)."""
    from .stats import model_stats

    state = getattr(model, "_tinyserve_state", None)
    if state is None:
        raise ValueError("stats() needs a model patched with tinyserve_patch.patch_model")
    return model_stats(state)


_register_attention()
install_generate_hook()

__all__ = [
    "SparseConfig",
    "TinyServeCache",
    "make_cache",
    "patch_model",
    "unpatch_model",
    "get_config",
    "is_patched",
    "stats",
    "SUPPORTED_FAMILIES",
    "__version__",
]
