"""Token log-probs and entropy from logits, temperature-scaled the way the sampler was.

Shapes: b = batch, n = response length, v = vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) at tokens: logits (b, n, v), tokens (b, n) -> (b, n).

    The math runs in float32 whatever the logits' dtype. Divide by the temperature used for
    sampling, on the old, reference and new policy alike (checklist item 3).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = (logits.float() / temperature).log_softmax(dim=-1)  # (b, n, v)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy -sum_v p log p of softmax(logits / temperature): (b, n, v) -> (b, n), float32.

    Logits of -inf (filtered tokens) contribute 0, with finite gradients.
    """
    logp = (logits.float() / temperature).log_softmax(dim=-1)  # (b, n, v)
    # 0 * -inf is nan; replacing -inf before the product keeps the value and the gradient finite.
    safe_logp = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
    return -(logp.exp() * safe_logp).sum(dim=-1)
