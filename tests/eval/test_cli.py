"""``tinyserve-eval`` end to end, in process, on the shipped tasks with tiny contexts (tiny random Llama)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinyserve_patch.eval import cli

TASKS = "tinyserve_passkey_4k,tinyserve_passkey_ll_4k,tinyserve_niah_single_4k,tinyserve_code_ppl_2k"
SPARSE = "page_size=8,dense_layers=0"


@pytest.fixture(scope="module")
def code_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("code") / "heldout.jsonl"
    text = "def main(argv):\n    config = Config()\n    return parse(argv, config)\n\n"
    path.write_text("\n".join(json.dumps({"path": f"f{i}.py", "text": f"# f{i}\n" + text * 8}) for i in range(3)))
    return str(path)


def _metadata(code_file: str) -> str:
    # tiny contexts: 120-token prompts; code documents of 120 characters (chars_per_token only sizes the
    # code documents here: the prompts are sized with the model's tokenizer)
    return json.dumps({"context_tokens": 120, "chars_per_token": 1, "code_ppl_file": code_file})


def _run(tmp_path: Path, model_dir: str, budget: str, code_file: str, tasks: str = TASKS, extra=()) -> tuple[dict, dict]:
    out = tmp_path / f"budget_{budget}"
    cli.main([
        "--model_args", f"pretrained={model_dir},dtype=float32,token_budget={budget},{SPARSE}",
        "--tasks", tasks, "--limit", "2", "--device", "cpu", "--batch_size", "2",
        "--metadata", _metadata(code_file), "--output_path", str(out), "--log_samples",
        "--gen_kwargs", "max_gen_toks=6", *extra,
    ])
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        for line in path.read_text().splitlines():
            doc = json.loads(line)
            samples[(path.name.split("_20")[0], doc["doc_id"])] = doc["filtered_resps"]
    return results, samples


def _metrics(results: dict) -> dict:
    return {
        (task, key): value
        for task, metrics in results["results"].items()
        for key, value in metrics.items()
        if key != "alias" and "_stderr" not in key
    }


def test_dense_budget_covering_context_and_sparse(tmp_path, tiny_model_dir, code_file):
    dense, dense_samples = _run(tmp_path, tiny_model_dir, "dense", code_file)
    full, full_samples = _run(tmp_path, tiny_model_dir, "4096", code_file)
    sparse, sparse_samples = _run(tmp_path, tiny_model_dir, "32", code_file)

    assert set(dense["results"]) == set(TASKS.split(","))
    assert all(n == 2 for n in (v["effective"] for v in dense["n-samples"].values()))
    # a budget that covers every context reproduces the dense baseline exactly: scores and outputs
    assert _metrics(full) == _metrics(dense)
    assert full_samples == dense_samples and len(dense_samples) == 8
    # a 32-token budget over ~120-token contexts changes log-likelihoods (decode mode) and perplexity
    d, s = _metrics(dense), _metrics(sparse)
    assert s[("tinyserve_passkey_ll_4k", "logprob,none")] != d[("tinyserve_passkey_ll_4k", "logprob,none")]
    assert s[("tinyserve_code_ppl_2k", "bits_per_byte,none")] != d[("tinyserve_code_ppl_2k", "bits_per_byte,none")]
    info = sparse["config"]["tinyserve"]
    assert info["config"]["token_budget"] == 32 and info["score_mode"] == "decode"
    assert info["modes"] == {"generate_until": "generate", "loglikelihood": "decode", "loglikelihood_rolling": "decode"}


MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""


def test_multiple_choice_task_like_hellaswag(tmp_path, tiny_model_dir, code_file):
    """A standard-style multiple-choice task (local data): decode mode equals HFLM's prefill scoring."""
    data = tmp_path / "mc.jsonl"
    question = "The grass is green. The sky is blue. The sun is yellow. Here we go. " * 2
    rows = [{"question": question + f"Item {i}:", "choices": [" green", " blue sky", " yellow sun again"], "label": i % 3}
            for i in range(3)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    task_dir = tmp_path / "mc_task"
    task_dir.mkdir()
    (task_dir / "tiny_mc.yaml").write_text(MC_TASK.format(data=data))
    extra = ("--include_path", str(task_dir))
    prefill, prefill_samples = _run(tmp_path / "p", tiny_model_dir, "dense,score_mode=prefill", code_file, "tiny_mc", extra)
    decode, decode_samples = _run(tmp_path / "d", tiny_model_dir, "dense", code_file, "tiny_mc", extra)
    assert prefill["config"]["tinyserve"]["modes"] == {"loglikelihood": "prefill"}
    assert decode["config"]["tinyserve"]["modes"] == {"loglikelihood": "decode"}
    for key, value in _metrics(prefill).items():
        assert _metrics(decode)[key] == pytest.approx(value, abs=1e-6)
    for key, resps in prefill_samples.items():
        for (lp_p, greedy_p), (lp_d, greedy_d) in zip(resps, decode_samples[key]):
            assert float(lp_d) == pytest.approx(float(lp_p), abs=1e-4) and greedy_d == greedy_p


def test_compare_writes_table_json_and_plot(tmp_path, tiny_model_dir, code_file):
    out = tmp_path / "cmp"
    cli.main([
        "compare", "--model_args", f"pretrained={tiny_model_dir},dtype=float32,{SPARSE}",
        "--tasks", "tinyserve_passkey_ll_4k,tinyserve_code_ppl_2k", "--budgets", "32,dense,4096",
        "--limit", "2", "--device", "cpu", "--batch_size", "2", "--metadata", _metadata(code_file),
        "--output_path", str(out),
    ])
    report = json.loads((out / "compare.json").read_text())
    assert report["budgets"] == ["dense", "32", "4096"]
    assert [r["budget"] for r in report["runs"]] == [None, 32, 4096]
    rows = {(r["task"], r["metric"]): r for r in report["table"]}
    logprob = rows[("tinyserve_passkey_ll_4k", "logprob")]
    assert logprob["drop_vs_dense"]["4096"] == 0.0 and logprob["drop_vs_dense"]["32"] != 0.0
    assert logprob["mode"]["32"] == "decode"
    assert logprob["context_tokens"]["min"] > 32 and logprob["tokens_per_s"]["32"] > 0
    assert 0 < logprob["fraction_read"]["32"] < 1 and logprob["fraction_read"]["4096"] == 1.0
    assert ("tinyserve_code_ppl_2k", "bits_per_byte") in rows
    table = (out / "compare.md").read_text()
    assert "| tinyserve_passkey_ll_4k | logprob |" in table and "32 (Δ vs dense)" in table and "KV read" in table
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_bad_model_arg_is_a_clear_error(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match=r"unknown model_args 'token_budgett' \(did you mean 'token_budget'\?\)"):
        cli.main(["--model_args", f"pretrained={tiny_model_dir},token_budgett=32", "--tasks", "tinyserve_passkey_4k",
                  "--limit", "1", "--device", "cpu"])
    with pytest.raises(ValueError, match=r"--budgets: '100'.*multiple of page_size=8"):
        cli.main(["compare", "--model_args", f"pretrained={tiny_model_dir},page_size=8", "--tasks", "tinyserve_passkey_4k",
                  "--budgets", "dense,100", "--output_path", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="policy"):
        cli.main(["compare", "--model_args", f"pretrained={tiny_model_dir},policy=best", "--tasks", "tinyserve_passkey_4k",
                  "--output_path", str(tmp_path / "y")])


@pytest.mark.slow
def test_plain_lm_eval_with_a_task_yaml_path(tmp_path, tiny_model_dir):
    """The documented plain route: `lm_eval --model tinyserve --tasks <yaml path>` in a fresh interpreter
    (the task folder's utils.py imports tinyserve_patch.eval, which registers the model)."""
    import os
    import subprocess
    import sys

    from tinyserve_patch.eval import TASKS_DIR

    out = tmp_path / "plain"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "tinyserve",
         "--model_args", f"pretrained={tiny_model_dir},dtype=float32,token_budget=32,{SPARSE}",
         "--tasks", str(TASKS_DIR / "passkey" / "tinyserve_passkey_ll_4k.yaml"), "--limit", "1",
         "--device", "cpu", "--metadata", '{"context_tokens": 100}', "--output_path", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["config"]["tinyserve"]["modes"] == {"loglikelihood": "decode"}
