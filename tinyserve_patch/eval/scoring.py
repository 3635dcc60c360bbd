"""Decode-mode scoring: log-probabilities of continuations computed through decode steps.

A single forward over context + continuation is a prefill and never runs sparse decode attention. Here,
per batch of ``(context, continuation)`` token lists:

1. every row is cut from the left to ``max_length + 1`` tokens, as lm-eval's HFLM does;
2. the context but its last token is left-padded and prefilled in one dense forward into a
   :class:`~tinyserve_patch.TinyServeCache` (skipped when every context is a single token, e.g. the
   windows of rolling perplexity);
3. the last context token and then each continuation token but the last are fed one per forward
   (``q_len == 1``: the sparse decode path), every row at its own position (``position_ids`` from the
   padding mask, as ``generate()`` computes them); the step fed token ``i`` gives the distribution of
   token ``i + 1``. Rows with shorter continuations are fed padding afterwards, and those steps ignored.

Steps 2-3 are :func:`tinyserve_patch.decode.decode_steps`; each step's ``[batch, vocab]`` logits are reduced
to log-probabilities as they come, so no ``[batch, n, vocab]`` tensor is held.

No dependency on lm-eval (the lm-eval model :class:`~tinyserve_patch.eval.TinyServeLM` wraps it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..decode import decode_steps


@dataclass
class ScoredRow:
    """One row's result: ``target_logprobs[i]`` = log p(continuation[i]); ``greedy[i]`` = whether it was the
    argmax; ``last_logprobs`` = the whole distribution of the last step (``[vocab]``); ``prefill`` /
    ``steps`` = tokens it fed by the prefill / by decode steps."""

    target_logprobs: torch.Tensor
    greedy: torch.Tensor
    last_logprobs: torch.Tensor
    prefill: int
    steps: int
    truncated: int = 0


@torch.no_grad()
def decode_score(
    model,
    rows: list[tuple[list[int], list[int]]],
    *,
    max_length: int,
    pad_token_id: int | None = 0,
    device: torch.device | str | None = None,
    softmax_dtype: torch.dtype | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> list[ScoredRow]:
    """Score ``(context, continuation)`` token lists (both non-empty) through decode steps of ``model``
    (a model patched with :func:`tinyserve_patch.patch_model`); see the module docstring."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prefixes, steps, targets, truncated = [], [], [], []
    for ctx, cont in rows:
        if not ctx or not cont or len(cont) > max_length:
            raise ValueError(f"decode_score needs a non-empty context and 1..{max_length} continuation tokens")
        full = (list(ctx) + list(cont))[-(max_length + 1) :]
        split = len(full) - len(cont) - 1  # prefill | last context token + continuation[:-1]
        prefixes.append(full[:split])
        steps.append(full[split:-1])
        targets.append(list(cont))
        truncated.append(max(0, len(ctx) + len(cont) - max_length - 1))
    batch = len(rows)
    p_max = max(len(p) for p in prefixes)
    c_max = max(len(s) for s in steps)
    pad = 0 if pad_token_id is None else int(pad_token_id)

    ids = torch.full((batch, p_max), pad, dtype=torch.long)
    mask = torch.zeros((batch, p_max), dtype=torch.long)
    step_ids = torch.full((batch, c_max), pad, dtype=torch.long)
    target_ids = torch.zeros((batch, c_max), dtype=torch.long)
    for b, (p, s, t) in enumerate(zip(prefixes, steps, targets)):
        if p:
            ids[b, p_max - len(p) :] = torch.tensor(p)
            mask[b, p_max - len(p) :] = 1
        step_ids[b, : len(s)] = torch.tensor(s)
        target_ids[b, : len(t)] = torch.tensor(t)
    ids, mask, step_ids, target_ids = (t.to(device) for t in (ids, mask, step_ids, target_ids))
    last_step = torch.tensor([len(s) - 1 for s in steps], device=device)

    target_lp = torch.zeros((batch, c_max), dtype=torch.float32, device=device)
    greedy = torch.zeros((batch, c_max), dtype=torch.bool, device=device)
    last_logp = None

    def on_logits(i: int, logits: torch.Tensor) -> None:  # logits [batch, vocab] after i fed tokens
        nonlocal last_logp
        if i == 0:
            return  # the prefill's: the last context token is fed as the first step
        j = i - 1
        logp = F.log_softmax(logits, dim=-1, dtype=softmax_dtype)
        target_lp[:, j] = logp.gather(1, target_ids[:, j : j + 1]).squeeze(1).float()
        greedy[:, j] = logp.argmax(-1) == target_ids[:, j]
        if last_logp is None:
            last_logp = torch.zeros_like(logp)
        done = last_step == j
        if bool(done.any()):
            last_logp[done] = logp[done]

    with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        decode_steps(model, ids, mask, step_ids, on_logits)
    target_lp, greedy, last_logp = target_lp.cpu(), greedy.cpu(), last_logp.float().cpu()
    return [
        ScoredRow(target_lp[b, : len(targets[b])], greedy[b, : len(targets[b])], last_logp[b],
                  len(prefixes[b]), len(steps[b]), truncated[b])
        for b in range(batch)
    ]


def kv_read_counts(model) -> tuple[float, float]:
    """``(tokens_read, tokens_valid)`` of the decode steps of the model's last cache (summed over layers,
    rows and KV heads), then forgets that cache so it is counted once; ``(0, 0)`` if none."""
    state = getattr(model, "_tinyserve_state", None)
    cache = getattr(state, "last_cache", None) if state is not None else None
    if cache is None:
        return 0.0, 0.0
    read = valid = 0.0
    for layer in getattr(cache, "layers", []):
        counts = getattr(getattr(layer, "stats", None), "counts", None)
        if getattr(layer, "is_initialized", False) and counts is not None:
            c = counts.detach().double().cpu()
            read += float(c[2])
            valid += float(c[3])
    state.last_cache = None
    return read, valid
