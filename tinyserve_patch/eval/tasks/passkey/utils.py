"""Task functions of this folder. Importing ``tinyserve_patch.eval`` also registers the lm-eval model
``tinyserve`` (so ``lm_eval --tasks <this folder's yaml>`` finds it, see docs/EVAL.md)."""

import tinyserve_patch.eval  # noqa: F401  (registers --model tinyserve)
from tinyserve_patch.eval.synthetic import *  # noqa: F401,F403
