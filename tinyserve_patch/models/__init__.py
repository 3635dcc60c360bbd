"""Models that ship with tinyserve-patch (package data, offline).

``tinyserve-code-lm``: a 12.85M-parameter GQA Llama (6 layers, hidden 512, 8 query / 2 KV heads of 64,
rope_theta 1e5, 8192 positions, bf16 safetensors) with an 8192-token byte-level BPE tokenizer, trained
by ``examples/train_code_lm.py`` on Python source (the CPython stdlib plus installed packages' code).
Its ``training_report.json`` holds the losses; the held-out eval texts are
``tinyserve_patch/eval/tasks/code_ppl/heldout.jsonl``.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tinyserve_patch.models import default_model_path
    model = AutoModelForCausalLM.from_pretrained(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_MODEL_NAME = "tinyserve-code-lm"


def default_model_path() -> Path:
    """The directory of the shipped model (it may hold only the tokenizer: see has_default_model)."""
    return Path(__file__).resolve().parent / DEFAULT_MODEL_NAME


def _weight_files(d: Path) -> list[Path] | None:
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    index = d / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, OSError):
        return None
    return [d / s for s in shards]


def has_default_model() -> bool:
    """True when the shipped model is complete: config.json, every weight file and the tokenizer."""
    d = default_model_path()
    files = _weight_files(d)
    return (
        (d / "config.json").is_file()
        and (d / "tokenizer.json").is_file()
        and bool(files)
        and all(f.is_file() and f.stat().st_size > 0 for f in files)
    )


__all__ = ["DEFAULT_MODEL_NAME", "default_model_path", "has_default_model"]
