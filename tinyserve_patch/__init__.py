"""tinyserve-patch: drop-in query-aware sparse decode attention for HuggingFace causal LMs."""

from .config import SparseConfig

__version__ = "0.1.0"

__all__ = ["SparseConfig", "__version__"]
