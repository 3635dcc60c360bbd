"""The shipped offline tasks: deterministic data, sizes within the target, every task config loads."""

from __future__ import annotations

import json
import re

import pytest

from tinyserve_patch.eval import TASKS_DIR
from tinyserve_patch.eval import synthetic as S


def test_passkey_docs_deterministic_sized_and_depth_swept(tiny_model_dir):
    rows = S.passkey_docs(4096, pretrained=tiny_model_dir, context_tokens=300, samples_per_depth=2)
    again = S.passkey_docs(4096, pretrained=tiny_model_dir, context_tokens=300, samples_per_depth=2)
    assert rows == again
    assert [r["depth"] for r in rows] == [0, 25, 50, 75, 100] * 2
    assert all(r["exact_tokens"] and 250 < r["n_tokens"] <= 300 for r in rows)
    for r in rows:
        assert r["input"].count(r["target"]) == 2 and r["input"].endswith("The pass key is")
    # the key sits at its depth: first and last depths right after the intro / before the question
    assert rows[0]["input"].index(rows[0]["target"]) < rows[4]["input"].index(rows[4]["target"])
    other = S.passkey_docs(4096, pretrained=tiny_model_dir, context_tokens=300, samples_per_depth=2, data_seed=1)
    assert [r["target"] for r in other] != [r["target"] for r in rows]


def test_passkey_without_tokenizer_estimates_chars():
    rows = S.passkey_docs(1000, samples_per_depth=1, _quiet=True)
    assert all(not r["exact_tokens"] and 900 < len(r["input"]) / 4 <= 1000 for r in rows)


@pytest.mark.parametrize("variant,values", [("single", 1), ("multikey", 1), ("multivalue", 4)])
def test_needle_variants(tiny_model_dir, variant, values):
    rows = S.niah_docs(variant, 4096, pretrained=tiny_model_dir, context_tokens=600, num_samples=3)
    assert len(rows) == 3 and all(500 < r["n_tokens"] <= 600 for r in rows)
    for r in rows:
        assert len(r["outputs"]) == values
        for v in r["outputs"]:
            assert f"for {r['query']} is: {v}." in r["input"]
        needles = re.findall(r"special magic numbers? for ([a-z]+-[a-z]+) is: (\d+)", r["input"])
        assert len(needles) == (4 if variant != "single" else 1)
    score = S.niah_process_results(rows[0], [" " + ", ".join(rows[0]["outputs"][:1])])
    assert score["score"] == pytest.approx(1 / values) and score["all_found"] == float(values == 1)


def test_passkey_metrics():
    doc = {"target": "12345", "depth": 25}
    gen = S.passkey_process_generate(doc, [" 12345. Remember"])
    assert gen["exact_match"] == 1.0 and gen["depth_25"] == 1.0 and gen["depth_0"] == -1.0
    assert S.passkey_process_generate(doc, [" 1234"])["exact_match"] == 0.0
    ll = S.passkey_process_loglikelihood(doc, [(-1.5, True)])
    assert ll == {"acc": 1.0, "logprob": -1.5, "depth_0": -1.0, "depth_25": 1.0, "depth_50": -1.0,
                  "depth_75": -1.0, "depth_100": -1.0}
    assert S.mean_valid([-1.0, 1.0, 0.0]) == 0.5 and S.mean_valid([-1.0]) == -1.0


def test_code_ppl_docs(tmp_path):
    path = tmp_path / "code.jsonl"
    lines = [30, 60, 60, 10]  # 6 characters a line: f0 and f3 are shorter than 64 * 4 characters
    records = [{"path": f"f{i}.py", "text": f"# file {i}\n" + "x = 1\n" * n} for i, n in enumerate(lines)]
    path.write_text("\n".join(json.dumps(r) for r in records))
    rows = S.code_ppl_docs(64, code_ppl_file=str(path), num_docs=10)
    assert all(len(r["text"]) <= 256 for r in rows)
    assert rows[0]["source"] == "f0.py + f1.py"  # a short file continues with the next one
    assert len(rows) == 3  # the last record alone is too short
    with pytest.raises(FileNotFoundError, match="code_ppl_file"):
        S.code_ppl_docs(64, code_ppl_file=str(tmp_path / "missing.jsonl"))


def test_every_shipped_task_config_is_indexed():
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    names = set(tm.all_tasks)
    for length in ("4k", "8k", "16k", "32k", "64k"):
        assert {f"tinyserve_passkey_{length}", f"tinyserve_passkey_ll_{length}"} <= names
        for variant in ("single", "multikey", "multivalue"):
            assert f"tinyserve_niah_{variant}_{length}" in names
    assert {"tinyserve_code_ppl_2k", "tinyserve_code_ppl_4k", "tinyserve_code_ppl_8k"} <= names
    assert {"tinyserve_passkey", "tinyserve_passkey_ll", "tinyserve_niah", "tinyserve_code_ppl"} <= set(tm.all_groups)
    assert all(n.startswith("tinyserve_") for n in names)
