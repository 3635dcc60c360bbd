"""lm-eval integration: the model ``tinyserve`` (registered on import), offline long-context tasks,
the ``tinyserve-eval`` CLI and its dense-vs-sparse ``compare`` sweep. See docs/EVAL.md.

Needs the ``eval`` extra (``pip install -e ".[eval]"``: lm-eval, matplotlib, tqdm). Without lm-eval
the package still imports, and :mod:`tinyserve_patch.eval.scoring` (decode-mode scoring) and
:mod:`tinyserve_patch.eval.synthetic` (task data) work on their own.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

try:
    from .lm_model import SCORE_MODES, TinyServeLM, accepted_model_args  # registers --model tinyserve
except ModuleNotFoundError as _err:  # lm-eval (or one of its dependencies) is not installed
    if not (_err.name or "").split(".")[0] in ("lm_eval", "datasets", "evaluate", "tqdm"):
        raise
    _MISSING = _err

    def __getattr__(name):
        if name in ("TinyServeLM", "SCORE_MODES", "accepted_model_args"):
            raise ImportError(
                f"tinyserve_patch.eval.{name} needs lm-eval: pip install -e '.[eval]' ({_MISSING})"
            ) from _MISSING
        raise AttributeError(name)


__all__ = ["TinyServeLM", "TASKS_DIR", "SCORE_MODES", "accepted_model_args"]
