"""Inputs and output of the CPU studies on real keys (``fp8_prefilter_study.py``, ``threshold_hint_study.py``):
the shipped code model's queries and keys over CPython source, and the JSON they write."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_kernels import _commit, _versions  # noqa: E402

DEFAULT_MODEL = str(ROOT / "tinyserve_patch/models/tinyserve-code-lm")


def study_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every study on the code model takes (``--model``, ``--tokens``, ``--budgets``,
    ``--dense-layers``, ``--out``), described by the first paragraph of the study's ``doc``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--budgets", nargs="+", type=int, default=[128, 256, 512, 1024])
    p.add_argument("--dense-layers", type=int, default=2)
    p.add_argument("--out", default=None)
    return p


def capture_qk(model, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(q [q_heads, T, D], k [kv_heads, T, D])`` after RoPE, from one dense causal forward."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture(module, query, key, value, attention_mask, **kwargs):
        seen.append((query[0].detach().float(), key[0].detach().float()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("tinyserve_capture", capture)
    model.set_attn_implementation("tinyserve_capture")
    with torch.no_grad():
        model(input_ids)
    return seen


def code_model_qk(model_path: str, tokens: int, source: str | None = None):
    """``(qk, n)``: :func:`capture_qk` of the model at ``model_path`` (fp32) over the first ``tokens``
    tokens of ``source`` (a text file; default: the first 40 of CPython's ``[a-m]*.py`` files), and the
    number of tokens read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    if source:
        text = Path(source).read_text(encoding="utf-8")
    else:
        import sysconfig

        stdlib = Path(sysconfig.get_paths()["stdlib"])
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in sorted(stdlib.glob("[a-m]*.py"))[:40])
    ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
    return capture_qk(model, ids), ids.shape[1]


def write_study(out: str | None, args, tokens: int, summary: dict, rows: list[dict]) -> None:
    """The study's JSON (date, model, tokens, versions, commit, arguments, summary, rows) at ``out`` if given."""
    doc = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device": "cpu",
           "model": Path(args.model).name, "tokens": tokens, "versions": _versions(), "commit": _commit(),
           "args": vars(args), "summary": summary, "rows": rows}
    if out:
        Path(out).write_text(json.dumps(doc, indent=1))
        print(f"wrote {out}")
