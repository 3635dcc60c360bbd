"""Teacher-forced decoding: next-token logits of a continuation computed through the decode path.

A single forward over prompt + continuation is a prefill and never runs sparse decode attention. Here the
prompt is prefilled and the continuation fed one token per forward (``q_len == 1``), exactly as
``generate()`` would, so a patched model's logits carry the effect of page selection. Used by the
quick-start (dense-vs-sparse agreement) and the lm-eval decode-mode scoring.
"""

from __future__ import annotations

import torch

from .cache import make_cache


@torch.no_grad()
def decode_logits(
    model,
    input_ids: torch.Tensor,
    continuation: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits predicting each continuation token: ``[batch, n, vocab]`` (float32).

    Args:
        input_ids: ``[batch, prompt]`` left-padded prompts (``attention_mask`` marks the padding).
        continuation: ``[batch, n]`` tokens fed one by one after the prompt; ``logits[:, i]`` is the
            distribution of ``continuation[:, i]`` given the prompt and ``continuation[:, :i]``.

    The model's own cache is used when it is patched (sparse decode); an unpatched model runs its
    default dense decoding.
    """
    from .patch import is_patched

    batch, prompt = input_ids.shape
    n = continuation.shape[1]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    cache = make_cache(model, batch, prompt + n) if is_patched(model) else None
    out = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    cache = out.past_key_values
    logits = [out.logits[:, -1].float()]
    mask = attention_mask
    ones = torch.ones(batch, 1, dtype=attention_mask.dtype, device=attention_mask.device)
    for i in range(n - 1):
        mask = torch.cat([mask, ones], dim=1)
        out = model(input_ids=continuation[:, i : i + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits, dim=1)


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(reference || other) of next-token distributions, in nats."""
    ref = torch.log_softmax(reference_logits.float(), dim=-1)
    other = torch.log_softmax(logits.float(), dim=-1)
    return max(0.0, float((ref.exp() * (ref - other)).sum(-1).mean()))  # >= 0 up to rounding
