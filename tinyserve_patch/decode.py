"""Teacher-forced decoding: a prompt prefilled, then a continuation fed one token per forward.

A single forward over prompt + continuation is a prefill and never runs sparse decode attention. Here the
prompt is prefilled and the continuation fed one token per forward (``q_len == 1``), as ``generate()``
does, so a patched model's logits carry the effect of page selection. :func:`decode_steps` is the one
loop; :func:`decode_logits` (quick-start, tests) and the lm-eval decode-mode scoring
(:mod:`tinyserve_patch.eval.scoring`) read its logits.
"""

from __future__ import annotations

from typing import Callable

import torch

from .cache import make_cache
from .hf_compat import CACHE_KWARG, output_cache


@torch.no_grad()
def decode_steps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    feed: torch.Tensor,
    on_logits: Callable[[int, torch.Tensor], None],
) -> None:
    """Prefill ``input_ids`` ``[batch, p]`` (left-padded, ``attention_mask`` ``[batch, p]``; ``p`` may be 0),
    then feed ``feed`` ``[batch, m]`` one token per forward.

    ``on_logits(i, logits)`` gets each forward's last-position logits ``[batch, vocab]`` (model dtype), ``i``
    = feed tokens consumed so far: ``0`` after the prefill (only when ``p > 0``), ``j + 1`` after
    ``feed[:, j]``. Positions follow the mask, as in ``generate()``. A patched model decodes into
    ``make_cache(model, batch, p + m)``, an unpatched one into its default dense cache.
    """
    from .patch import is_patched

    batch, prompt = input_ids.shape
    cache = make_cache(model, batch, prompt + feed.shape[1]) if is_patched(model) else None
    mask = attention_mask
    if prompt > 0:
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **{CACHE_KWARG: cache},
                    use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        on_logits(0, out.logits[:, -1])
    seen = mask.sum(-1)  # real tokens so far per row: the position of the next one
    ones = torch.ones((batch, 1), dtype=mask.dtype, device=mask.device)
    for j in range(feed.shape[1]):
        mask = torch.cat([mask, ones], dim=1)
        out = model(input_ids=feed[:, j : j + 1], attention_mask=mask, position_ids=seen[:, None],
                    **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        on_logits(j + 1, out.logits[:, -1])
        seen = seen + 1


def decode_logits(
    model,
    input_ids: torch.Tensor,
    continuation: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits predicting each continuation token: ``[batch, n, vocab]`` (float32).

    ``input_ids`` ``[batch, prompt]`` left-padded prompts (``attention_mask`` marks the padding);
    ``continuation`` ``[batch, n]``: ``logits[:, i]`` is the distribution of ``continuation[:, i]`` given
    the prompt and ``continuation[:, :i]`` (:func:`decode_steps` with ``feed = continuation[:, :-1]``).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    logits: list[torch.Tensor] = []
    decode_steps(model, input_ids, attention_mask, continuation[:, :-1], lambda i, step: logits.append(step.float()))
    return torch.stack(logits, dim=1)


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(reference || other) of next-token distributions ``[..., vocab]``, in nats."""
    ref = torch.log_softmax(reference_logits.float(), dim=-1)
    other = torch.log_softmax(logits.float(), dim=-1)
    return max(0.0, float((ref.exp() * (ref - other)).sum(-1).mean()))  # >= 0 up to rounding
