"""The shipped code LM (tinyserve_patch/models/tinyserve-code-lm), its tokenizer, the held-out eval
texts, and examples/train_code_lm.py end to end (a tiny CPU run). CPU only, a few seconds each."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
import math

import pytest
import torch

from tinyserve_patch.models import default_model_path, has_default_model

MODEL_DIR = default_model_path()
HELDOUT = MODEL_DIR.parents[1] / "eval" / "tasks" / "code_ppl" / "heldout.jsonl"

needs_tokenizer = pytest.mark.skipif(
    not (MODEL_DIR / "tokenizer.json").is_file(), reason=f"no tokenizer in {MODEL_DIR}"
)
needs_model = pytest.mark.skipif(
    not has_default_model(), reason=f"{MODEL_DIR} has no trained model (config.json + weights): run examples/train_code_lm.py"
)

SAMPLES = [
    "def f(x):\n    return x + 1\n",
    "class A(Base):\n\t'''Tabs, unicode: héllo wörld ✓ 日本'''\r\n    pass\r\n",
    "    indented = {'a': [1, 2.5e-3, None]}  # trailing spaces   \n\n\n",
    "",
]


@needs_tokenizer
def test_tokenizer_loads_and_round_trips():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    assert len(tok) == 8192
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|endoftext|>", "<|pad|>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    for text in SAMPLES:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id  # training documents start with bos
        assert tok.decode(ids, skip_special_tokens=True) == text
        plain = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(plain) == text
    # code compresses: well under one token per 2 chars
    code = SAMPLES[0] * 20
    assert len(tok(code, add_special_tokens=False)["input_ids"]) < len(code) / 2


def test_heldout_jsonl_is_long_and_deterministic():
    if not HELDOUT.is_file():
        pytest.skip(f"{HELDOUT} not exported")
    rows = [json.loads(line) for line in HELDOUT.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) >= 5
    paths = [r["path"] for r in rows]
    assert paths == sorted(set(paths))
    assert sum(len(r["text"].encode("utf-8")) for r in rows) <= 2_100_000
    assert all(r["n_tokens"] >= 8192 and r["text"] for r in rows)
    from examples.train_code_lm import is_hash_heldout

    assert all(is_hash_heldout(p) for p in paths)


@needs_tokenizer
def test_heldout_token_counts_match_tokenizer():
    if not HELDOUT.is_file():
        pytest.skip(f"{HELDOUT} not exported")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    row = json.loads(HELDOUT.read_text(encoding="utf-8").splitlines()[0])
    assert len(tok.encode(row["text"], add_special_tokens=False).ids) == row["n_tokens"]


@needs_model
def test_shipped_model_generates_and_predicts_code():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads) == (8, 2, 64)
    assert cfg.max_position_embeddings == 8192 and cfg.vocab_size == len(tok)
    assert 10e6 <= sum(p.numel() for p in model.parameters()) <= 20e6

    enc = tok("def fibonacci(n):", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, enc["input_ids"].shape[1] + 8)
    assert isinstance(tok.decode(out[0], skip_special_tokens=True), str)

    # trained, not random: held-out code well below the unigram baseline (~7 nats) and log(8192) = 9.0
    if HELDOUT.is_file():
        text = json.loads(HELDOUT.read_text(encoding="utf-8").splitlines()[0])["text"]
    else:
        import inspect

        text = inspect.getsource(json)
    ids = tok(text, return_tensors="pt")["input_ids"][:, :1024]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert math.isfinite(loss) and loss < 4.0, loss


@needs_model
def test_training_report_is_complete():
    report = json.loads((MODEL_DIR / "training_report.json").read_text())
    for key in ("train_loss", "heldout_loss", "unigram_heldout_ce", "params", "tokens_seen", "seconds_total",
                "torch", "transformers", "device"):
        assert key in report, key
    assert report["heldout_loss"] < report["unigram_heldout_ce"]
    files = [p for p in MODEL_DIR.iterdir() if p.is_file()]
    assert len(files) <= 8 and all(p.stat().st_size < 16 * 1024 * 1024 for p in files)


@needs_tokenizer
def test_train_script_runs_end_to_end(tmp_path):
    """A few CPU steps of examples/train_code_lm.py: corpus, tokenizer reuse, training, eval, save, reload."""
    from examples.train_code_lm import main

    out = tmp_path / "model"
    report = main(["--smoke", "--max-steps", "3", "--site-chars", "0", "--out", str(out)])
    assert report["steps"] == 3 and report["tokenizer_round_trip"]
    assert math.isfinite(report["heldout_loss"]) and math.isfinite(report["unigram_heldout_ce"])
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "training_report.json"} <= names
    assert any(n.endswith(".safetensors") for n in names) and len(names) <= 8


@needs_model
@torch.no_grad()
def test_shipped_model_patched_full_budget_equals_dense_and_sparse_runs():
    import tinyserve_patch as tp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()[:6000]
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :600]
    gen = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    dense = model.generate(ids, **gen)
    tp.patch_model(model, token_budget=1024, page_size=16)  # cache (616 tokens) within the budget
    assert torch.equal(model.generate(ids, **gen), dense)
    from tinyserve_patch.decode import decode_logits

    continuation = dense[:, ids.shape[1] :]
    tp.unpatch_model(model)
    dense_logits = decode_logits(model, ids, continuation)
    tp.patch_model(model, token_budget=256, page_size=16)  # 4 of 6 layers sparse, 256 of ~600 tokens
    model.generate(ids, **gen)
    stats = tp.stats(model)
    assert stats["sparse_layers"] == 4 and stats["fraction_read"] < 0.75
    sparse_logits = decode_logits(model, ids, continuation)  # same prefixes, teacher-forced
    agree = (sparse_logits.argmax(-1) == dense_logits.argmax(-1)).float().mean()
    assert agree >= 0.75  # a trained model's top pages carry most of the attention
    tp.unpatch_model(model)
