"""The language-model loss: next-token cross-entropy over the positions a mask keeps, with
PaLM's z-loss (Chowdhery et al. 2022, section 5) as an option.

einops legend: b batch, n sequence, v vocabulary. Masks: True = real token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .logprobs import TokenStats

IGNORE_INDEX = -100


def shift_targets(
    tokens: Tensor, mask: Tensor | None = None, loss_mask: Tensor | None = None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(b, n) tokens -> inputs (b, n-1), their mask, and next-token targets (b, n-1) with
    IGNORE_INDEX wherever the target is padding (mask False) or outside loss_mask."""
    if mask is not None and mask.shape != tokens.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match tokens {tuple(tokens.shape)}"
        )
    if loss_mask is not None and loss_mask.shape != tokens.shape:
        raise ValueError(
            f"loss_mask shape {tuple(loss_mask.shape)} does not match tokens {tuple(tokens.shape)}"
        )
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    keep = torch.ones_like(targets, dtype=torch.bool)
    if mask is not None:
        keep &= mask[:, 1:].bool()
    if loss_mask is not None:
        keep &= loss_mask[:, 1:].bool()
    targets[~keep] = IGNORE_INDEX
    return inputs, None if mask is None else mask[:, :-1], targets


def lm_loss_from_stats(
    stats: TokenStats, targets: Tensor, ignore_index: int = IGNORE_INDEX, z_loss_weight: float = 0.0
) -> Tensor:
    """`lm_loss` from per-token statistics (`token_stats_from_hidden`: log-probs and log Z of
    each target) instead of full logits: the mean of -log p over targets != ignore_index, plus
    z_loss_weight * mean(log(Z)^2)."""
    keep = targets != ignore_index
    if not bool(keep.any()):
        raise ValueError("no target tokens to compute a loss on (all are ignored/padding)")
    loss = -stats.logprobs[keep].mean()
    if z_loss_weight:
        loss = loss + z_loss_weight * stats.log_z[keep].pow(2).mean()
    return loss


def lm_loss(
    logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX, z_loss_weight: float = 0.0
) -> Tensor:
    """Mean cross-entropy over targets != ignore_index, plus PaLM's z-loss
    z_loss_weight * mean(log(Z)^2), where Z is the softmax normaliser (PaLM section 5)."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    targets = targets.reshape(-1)
    keep = targets != ignore_index
    if not bool(keep.any()):
        raise ValueError("no target tokens to compute a loss on (all are ignored/padding)")
    if z_loss_weight == 0:
        return F.cross_entropy(logits, targets, ignore_index=ignore_index)
    logits, targets = logits[keep], targets[keep]
    log_z = logits.logsumexp(dim=-1)
    nll = log_z - logits.gather(1, targets[:, None]).squeeze(1)
    return nll.mean() + z_loss_weight * log_z.pow(2).mean()
