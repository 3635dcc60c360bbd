"""The lm-eval model ``tinyserve``: HFLM with the model patched for sparse decode attention.

    lm_eval-style: --model tinyserve --model_args pretrained=PATH,token_budget=1024,page_size=16,score_mode=decode

``model_args``: every HFLM argument (``pretrained``, ``dtype``, ``device``, ``batch_size``, ...), every
:class:`~tinyserve_patch.SparseConfig` field (``token_budget`` -- ``dense`` for the baseline --,
``page_size``, ``sink_pages``, ``recent_pages``, ``dense_layers``, ``policy``, ``gqa_reduction``,
``fused``, ``seed``, ``collect_stats``, ``track_recall``) and ``score_mode=decode|prefill``.

Scoring modes of the log-likelihood requests (``loglikelihood``, ``loglikelihood_rolling``, hence
multiple-choice and perplexity tasks):

* ``decode`` (default): the context but its last token is prefilled (dense) into a
  :class:`~tinyserve_patch.TinyServeCache`, then the last context token and every continuation token
  but the last are fed one per forward (``q_len == 1``): each continuation token's log-probability comes
  from a sparse decode step, exactly as if the model had generated up to it. A rolling-perplexity window
  (context = one prefix token) is decoded token by token from its first token.
* ``prefill``: HFLM's own single dense forward (no decode step runs; sparse attention has no effect).

``generate_until`` is HFLM's (``model.generate``, which the patch makes sparse). What ran is recorded in
:attr:`TinyServeLM.tinyserve_modes` and, with per-task context lengths, tokens/s and KV fraction read,
in :attr:`TinyServeLM.tinyserve_task_stats`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM, eval_logger
from lm_eval.models.utils import Collator
from tqdm import tqdm

import tinyserve_patch as tp
from tinyserve_patch.config import SparseConfig

from .scoring import decode_score, kv_read_counts

SCORE_MODES = ("decode", "prefill")
SPARSE_FIELDS = tuple(f.name for f in dataclasses.fields(SparseConfig) if f.name != "extra")
# transformers ``from_pretrained`` keywords HFLM forwards (its **kwargs); anything else is rejected
# as a probable typo rather than silently handed to from_pretrained.
FROM_PRETRAINED_KWARGS = (
    "attn_implementation", "device_map", "low_cpu_mem_usage", "load_in_8bit", "load_in_4bit",
    "bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant", "cache_dir",
    "local_files_only", "use_safetensors", "token", "torch_dtype", "offload_state_dict", "max_memory",
    "rope_scaling", "use_auth_token",
)


def _hflm_params() -> set[str]:
    names = set()
    for fn in (HFLM.__init__, HFLM._create_model):
        for name, p in inspect.signature(fn).parameters.items():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name != "self":
                names.add(name)
    return names


def accepted_model_args() -> list[str]:
    return sorted(_hflm_params() | set(SPARSE_FIELDS) | {"score_mode"} | set(FROM_PRETRAINED_KWARGS))


def split_model_args(kwargs: dict) -> tuple[dict, dict, str]:
    """``(hflm_kwargs, sparse_kwargs, score_mode)``; a ValueError names any unknown argument."""
    accepted = set(accepted_model_args())
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, accepted, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"--model tinyserve: unknown model_args {', '.join(hints)}. Sparse attention args: "
            f"{', '.join(SPARSE_FIELDS)}; score_mode=decode|prefill; plus HFLM's args (pretrained, dtype, "
            f"device, batch_size, max_length, ...) and from_pretrained's {', '.join(FROM_PRETRAINED_KWARGS)}"
        )
    sparse = {k: kwargs[k] for k in SPARSE_FIELDS if k in kwargs}
    score_mode = str(kwargs.get("score_mode", "decode")).strip().lower()
    if score_mode not in SCORE_MODES:
        raise ValueError(f"--model tinyserve: score_mode={kwargs['score_mode']!r} is invalid: use decode or prefill")
    hflm = {k: v for k, v in kwargs.items() if k not in sparse and k != "score_mode"}
    return hflm, sparse, score_mode


@dataclasses.dataclass
class TaskStats:
    """What one task's requests of one type cost (filled while they run)."""

    request_type: str
    mode: str = ""
    requests: int = 0
    context_tokens: list = dataclasses.field(default_factory=list)
    tokens: int = 0  # tokens through the model: prefill + decode steps (padding excluded)
    decode_tokens: int = 0  # of which fed by q_len == 1 steps (rows x steps, real rows only)
    seconds: float = 0.0
    tokens_read: float = 0.0  # KV tokens attended by decode steps, summed over layers, rows, KV heads
    tokens_valid: float = 0.0  # KV tokens those steps could have attended

    def summary(self) -> dict:
        ctx = self.context_tokens
        return {
            "request_type": self.request_type,
            "mode": self.mode,
            "requests": self.requests,
            "context_tokens": {
                "min": min(ctx) if ctx else None,
                "mean": (sum(ctx) / len(ctx)) if ctx else None,
                "max": max(ctx) if ctx else None,
            },
            "tokens": self.tokens,
            "decode_tokens": self.decode_tokens,
            "seconds": self.seconds,
            "tokens_per_s": (self.tokens / self.seconds) if self.seconds else None,
            "decode_tokens_per_s": (self.decode_tokens / self.seconds) if self.seconds and self.decode_tokens else None,
            "fraction_read": (self.tokens_read / self.tokens_valid) if self.tokens_valid else None,
        }


@register_model("tinyserve")
class TinyServeLM(HFLM):
    """HFLM whose model is patched by :func:`tinyserve_patch.patch_model`; see the module docstring."""

    def __init__(self, pretrained="", **kwargs):
        if isinstance(pretrained, str) and not pretrained:
            raise ValueError("--model tinyserve needs model_args pretrained=<HF model name or local path>")
        hflm_kwargs, sparse_kwargs, score_mode = split_model_args(kwargs)
        SparseConfig.from_kwargs(**sparse_kwargs)  # validate before loading any weights
        super().__init__(pretrained=pretrained, **hflm_kwargs)
        if self.backend != "causal":
            raise ValueError("--model tinyserve supports decoder-only (causal) models only")
        self.score_mode = score_mode
        self.tinyserve_modes: dict[str, str] = {}
        self.tinyserve_task_stats: dict[str, dict[str, TaskStats]] = defaultdict(dict)
        self._current: TaskStats | None = None
        tp.patch_model(self.model, **sparse_kwargs)

    # ------------------------------------------------------------------------------------ config
    @property
    def sparse_config(self) -> SparseConfig:
        return tp.get_config(self.model)

    def set_sparse_config(self, config: SparseConfig | None = None, **overrides) -> SparseConfig:
        """Re-patch the loaded model (e.g. the next budget of a sweep) and clear the recorded stats."""
        tp.patch_model(self.model, config, **overrides)
        self.reset_tinyserve_stats()
        return self.sparse_config

    @torch.no_grad()
    def warmup(self, tokens: int, steps: int = 4) -> None:
        """One decode-mode scoring and one short generate at about ``tokens`` tokens (kernel compilation,
        allocator, CUDA graphs), so the timed run that follows does not pay for them; nothing recorded."""
        from .synthetic import REPEAT_FILLER

        tokens = max(2, min(int(tokens), self.max_length - steps - 1))
        unit = self.tok_encode(" " + REPEAT_FILLER, add_special_tokens=False) or [self.prefix_token_id]
        ids = (unit * (tokens // len(unit) + 1))[:tokens]
        previous, self._current = self._current, None
        try:
            self._decode_score_batch([(ids[:-steps], ids[-steps:])])
            context = torch.tensor([ids[:-steps]], device=self.device)
            pad = self.tokenizer.pad_token_id
            self.model.generate(context, attention_mask=torch.ones_like(context), max_new_tokens=steps,
                                do_sample=False, pad_token_id=0 if pad is None else pad)
        finally:
            self._current = previous
            kv_read_counts(self.model)  # forget the warm-up's cache

    def reset_tinyserve_stats(self) -> None:
        self.tinyserve_modes = {}
        self.tinyserve_task_stats = defaultdict(dict)

    def tinyserve_summary(self) -> dict:
        """``{"config", "score_mode", "modes", "tasks": {task: {request_type: summary}}}``."""
        return {
            "config": self.sparse_config.to_dict(),
            "score_mode": self.score_mode,
            "modes": dict(self.tinyserve_modes),
            "tasks": {t: {r: s.summary() for r, s in per.items()} for t, per in self.tinyserve_task_stats.items()},
        }

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["tinyserve"] = {"config": self.sparse_config.to_dict(), "score_mode": self.score_mode,
                             "modes": dict(self.tinyserve_modes)}
        return info

    def _mode_of(self, request_type: str) -> str:
        """``generate`` (HF generate: dense prefill, then decode steps through the patch), ``decode``
        (log-likelihoods from decode steps) or ``prefill`` (HFLM's single dense forward)."""
        if request_type == "generate_until":
            return "generate"
        return self.score_mode

    # ------------------------------------------------------------------------------------ per-task bookkeeping
    @contextmanager
    def _recording(self, request_type: str, task_name: str | None):
        stats = self.tinyserve_task_stats[task_name or "?"].setdefault(request_type, TaskStats(request_type))
        stats.mode = self._mode_of(request_type)
        self.tinyserve_modes[request_type] = stats.mode
        previous, self._current = self._current, stats
        start = time.perf_counter()
        try:
            yield stats
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stats.seconds += time.perf_counter() - start
            self._current = previous

    def _per_task(self, request_type: str, requests, run):
        """Run ``run(requests_of_one_task)`` per task (keeping each task's order), reassemble results."""
        groups: dict[str | None, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(getattr(req, "task_name", None), []).append(i)
        results: list = [None] * len(requests)
        for task_name, idx in groups.items():
            with self._recording(request_type, task_name) as stats:
                stats.requests += len(idx)
                out = run([requests[i] for i in idx])
            for i, r in zip(idx, out):
                results[i] = r
        return results

    def _accumulate_kv_stats(self) -> None:
        """Add the last cache's decode counters (tokens read / valid) to the current task's stats."""
        read, valid = kv_read_counts(self.model)
        if self._current is not None:
            self._current.tokens_read += read
            self._current.tokens_valid += valid

    # ------------------------------------------------------------------------------------ request types
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._per_task(
            "loglikelihood", requests, lambda reqs: super(TinyServeLM, self).loglikelihood(reqs, disable_tqdm=disable_tqdm)
        )

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._per_task(
            "loglikelihood_rolling",
            requests,
            lambda reqs: super(TinyServeLM, self).loglikelihood_rolling(reqs, disable_tqdm=disable_tqdm),
        )

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._per_task(
            "generate_until", requests, lambda reqs: super(TinyServeLM, self).generate_until(reqs, disable_tqdm=disable_tqdm)
        )

    def _model_generate(self, context, max_length: int, stop, **generation_kwargs):
        out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        stats = self._current
        if stats is not None:
            mask = generation_kwargs.get("attention_mask")
            lengths = mask.sum(-1).tolist() if mask is not None else [context.shape[1]] * context.shape[0]
            new = (out.shape[1] - context.shape[1]) * context.shape[0]
            stats.context_tokens.extend(int(n) for n in lengths)
            stats.tokens += int(sum(lengths)) + new
            stats.decode_tokens += new
            self._accumulate_kv_stats()
        return out

    # ------------------------------------------------------------------------------------ decode-mode scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.score_mode != "decode":
            if self._current is not None:
                for _, ctx, cont in requests:
                    total = min(len(ctx) + len(cont), self.max_length + 1) - 1
                    self._current.context_tokens.append(total)
                    self._current.tokens += total
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        return self._decode_loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def _decode_loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """HFLM's ``_loglikelihood_tokens`` contract (same ordering, grouping, caching and truncation),
        scored through decode steps: returns ``[(sum logprob, is_greedy)]`` in the requests' order."""
        res = []

        def _collate(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        def _lookup_one_token_cont(req):
            return req[-2] + req[-1][:-1]

        re_ord = Collator(
            requests,
            sort_fn=_collate,
            group_by="contexts" if self.logits_cache else None,
            group_fn=_lookup_one_token_cont,
        )
        # batch sizes as HFLM (auto: detected with dense forwards at the longest length, an upper bound
        # of the prefill's memory; decode steps hold one token per row)
        n_reordered = len(re_ord)
        batch_size = self.batch_size if self.batch_size != "auto" else override_bs if override_bs is not None else 0
        batch_fn = self._batch_scheduler if self.batch_size == "auto" and n_reordered > 0 and not override_bs else None
        if batch_fn is not None:
            self.batch_sizes = {}
        chunks = re_ord.get_batched(n=batch_size, batch_fn=batch_fn)
        pbar = tqdm(total=len(requests), disable=(disable_tqdm or (self.rank != 0)), desc="Running loglikelihood requests (decode mode)")
        dummy = torch.zeros(1, 1, 1)
        for chunk in chunks:
            scored = self._decode_score_batch([(ctx, cont) for _, ctx, cont in chunk])
            for (request_str, ctx_tokens, cont_toks), (target_lp, greedy_ok, last_logp) in zip(chunk, scored):
                n = len(cont_toks)
                for member_str, member_cont, _ in re_ord.get_cache(
                    req_str=request_str, cxt_toks=ctx_tokens, cont_toks=cont_toks, logits=dummy
                ):
                    m = len(member_cont)
                    last = member_cont[-1]
                    logprob = float(target_lp[n - m : n - 1].sum()) + float(last_logp[last])
                    is_greedy = bool(greedy_ok[n - m : n - 1].all()) and int(last_logp.argmax()) == last
                    answer = (logprob, is_greedy)
                    res.append(answer)
                    if member_str is not None:
                        self.cache_hook.add_partial("loglikelihood", member_str, answer)
                    pbar.update(1)
        pbar.close()
        return re_ord.get_original(res)

    def _decode_score_batch(self, rows: list[tuple[list[int], list[int]]]):
        """Score a batch through decode steps (:func:`~tinyserve_patch.eval.scoring.decode_score`); returns
        per row ``(target_logprobs [n], greedy_matches [n], last_step_logprobs [vocab])``."""
        scored = decode_score(
            self.model, rows, max_length=self.max_length, pad_token_id=self.tokenizer.pad_token_id,
            device=self.device, softmax_dtype=self.softmax_dtype, autocast_dtype=self.mixed_precision_dtype,
        )
        for (ctx, cont), row in zip(rows, scored):
            if row.truncated:
                eval_logger.warning(
                    f"Combined length of context ({len(ctx)}) and continuation ({len(cont)}) exceeds model's "
                    f"maximum length ({self.max_length}). Truncating {row.truncated} tokens from the left."
                )
        stats = self._current
        if stats is not None:
            for row in scored:
                stats.context_tokens.append(row.prefill + row.steps)
                stats.tokens += row.prefill + row.steps
                stats.decode_tokens += row.steps
            self._accumulate_kv_stats()
        return [(row.target_logprobs, row.greedy, row.last_logprobs) for row in scored]
