"""TinyServeLM: model_args validation and decode-mode scoring against HFLM's own dense forward."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

from tinyserve_patch.eval.lm_model import TinyServeLM, split_model_args

CTX = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def _ll(context: str, continuation: str, task: str = "t") -> Instance:
    return Instance("loglikelihood", {}, (context, continuation), 0, metadata=(task, 0, 1))


def _rolling(text: str, task: str = "r") -> Instance:
    return Instance("loglikelihood_rolling", {}, (text,), 0, metadata=(task, 0, 1))


def _requests() -> list[Instance]:
    """Ragged contexts and continuations in one batch: one-token contexts (empty prefill), one-token
    continuations sharing a context (HFLM's logits-cache grouping), and multi-token continuations."""
    return [
        _ll(CTX * 3, " The pass key is 12345."),
        _ll(CTX, " 67890"),
        _ll("The", " grass"),
        _ll("The", " sky"),
        _ll(CTX * 2, " T"),
        _ll(CTX * 2, " H"),
        _ll(CTX * 2, " There and back again. The grass"),
    ]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return TinyServeLM(
        pretrained=tiny_model_dir, device="cpu", dtype="float32", batch_size=3,
        token_budget="dense", page_size=8, dense_layers=0,
    )


def _score(lm, requests, mode="decode", **config):
    lm.score_mode = mode
    lm.set_sparse_config(**config)
    fn = lm.loglikelihood_rolling if requests[0].request_type == "loglikelihood_rolling" else lm.loglikelihood
    return fn(requests, disable_tqdm=True)


def test_decode_mode_dense_matches_hflm_forward(lm):
    requests = _requests()
    prefill = _score(lm, requests, "prefill", token_budget=None)
    decode = _score(lm, requests, "decode", token_budget=None)
    assert lm.tinyserve_modes == {"loglikelihood": "decode"}
    for (lp_d, greedy_d), (lp_p, greedy_p) in zip(decode, prefill):
        assert lp_d == pytest.approx(lp_p, abs=1e-4)
        assert greedy_d == greedy_p


def test_budget_covering_the_context_is_exactly_dense(lm):
    requests = _requests()
    dense = _score(lm, requests, token_budget=None)
    assert _score(lm, requests, token_budget=4096) == dense


def test_small_budget_decodes_sparse(lm):
    requests = _requests()
    dense = _score(lm, requests, token_budget=None)
    sparse = _score(lm, requests, token_budget=32)
    assert sparse != dense
    # the requests whose context + continuation fits in the budget are unaffected (exact-dense rule)
    assert sparse[2] == dense[2] and sparse[3] == dense[3]
    stats = lm.tinyserve_summary()["tasks"]["t"]["loglikelihood"]
    assert stats["mode"] == "decode" and stats["requests"] == len(requests)
    assert 0 < stats["fraction_read"] < 1
    assert stats["context_tokens"]["max"] > 32 and stats["decode_tokens"] > 0


def test_rolling_loglikelihood_in_decode_mode(lm):
    requests = [_rolling(CTX * 2), _rolling(CTX), _rolling("def main(argv):\n    return parse(argv)\n")]
    prefill = _score(lm, requests, "prefill", token_budget=None)
    dense = _score(lm, requests, "decode", token_budget=None)
    assert dense == pytest.approx(prefill, rel=1e-6, abs=1e-4)  # sums over ~100 tokens
    assert _score(lm, requests, token_budget=4096) == dense
    sparse = _score(lm, requests, token_budget=32)
    assert sparse[0] != dense[0]
    assert lm.tinyserve_modes == {"loglikelihood_rolling": "decode"}


def test_left_truncation_matches_hflm(lm):
    old = lm._max_length
    lm._max_length = 48  # contexts longer than this are cut from the left, as HFLM does
    try:
        requests = [_ll(CTX * 3, " The pass key is 12345."), _ll(CTX, " 67890")]
        prefill = _score(lm, requests, "prefill", token_budget=None)
        decode = _score(lm, requests, "decode", token_budget=None)
        assert [d[0] for d in decode] == pytest.approx([p[0] for p in prefill], abs=1e-4)
    finally:
        lm._max_length = old


def test_model_args_errors_name_the_argument(tiny_model_dir):
    with pytest.raises(ValueError, match=r"'token_budgett' \(did you mean 'token_budget'\?\)"):
        TinyServeLM(pretrained=tiny_model_dir, device="cpu", token_budgett=32)
    with pytest.raises(ValueError, match="page_size"):
        TinyServeLM(pretrained=tiny_model_dir, device="cpu", page_size=12)
    with pytest.raises(ValueError, match="score_mode"):
        TinyServeLM(pretrained=tiny_model_dir, device="cpu", score_mode="fast")
    hflm, sparse, mode = split_model_args(
        {"dtype": "float32", "token_budget": "dense", "policy": "oracle", "score_mode": "prefill", "attn_implementation": "sdpa"}
    )
    assert sparse == {"token_budget": "dense", "policy": "oracle"} and mode == "prefill"
    assert hflm == {"dtype": "float32", "attn_implementation": "sdpa"}


def test_model_is_patched_and_repatched(lm):
    import tinyserve_patch as tp

    assert tp.is_patched(lm.model)
    config = lm.set_sparse_config(token_budget=64)
    assert config.token_budget == 64 and config.page_size == 8 and config.dense_layers == 0
    assert lm.get_model_info()["tinyserve"]["config"]["token_budget"] == 64
    with torch.no_grad():
        out = lm.model.generate(torch.tensor([[5, 6, 7, 8] * 30]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 123)
