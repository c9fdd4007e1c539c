"""Reward-model losses (InstructGPT, Ouyang et al. 2022, section 3.5), as pure functions on
scores: Bradley-Terry pairs, the K-wise ranking loss (eq. 1) over the untied pairs of each
ranking, and rating classification / regression for graded feedback (RLHF checklist item 19).

Rankings are tiers: `ranks[i]` = completion i's tier (0 = best, ties share a tier), `group[i]` =
the ranking it belongs to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pairwise_loss(chosen: Tensor, rejected: Tensor, margin: float | Tensor = 0.0) -> Tensor:
    """Bradley-Terry loss mean(-log sigmoid(r_chosen - r_rejected - margin)) over pairs (b,).

    A margin (scalar or per pair, as in Llama 2's rating-gap margins) asks the chosen score to
    lead by at least that much before the loss flattens out.
    """
    if chosen.shape != rejected.shape or chosen.ndim != 1 or chosen.numel() == 0:
        raise ValueError(
            f"chosen and rejected must be equal non-empty (b,) tensors, got "
            f"{tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
    return -F.logsigmoid(chosen.float() - rejected.float() - margin).mean()


def better_than(ranks: Tensor, group: Tensor) -> Tensor:
    """(N,) ranks and group ids -> (N, N) bool: [i, j] is True when i and j answer the same
    prompt and i is ranked strictly better (lower rank). Tied pairs are False both ways."""
    if ranks.shape != group.shape or ranks.ndim != 1:
        raise ValueError(
            f"ranks and group must be (N,) tensors of one shape, got {tuple(ranks.shape)} "
            f"and {tuple(group.shape)}"
        )
    if ranks.is_floating_point() or group.is_floating_point():
        raise ValueError("ranks and group must be integer tensors")
    same = group[:, None] == group[None, :]  # (N, N)
    return same & (ranks[:, None] < ranks[None, :])


def _check_scores(scores: Tensor, ranks: Tensor) -> None:
    if scores.ndim != 1 or scores.shape != ranks.shape:
        raise ValueError(
            f"scores must be (N,) like ranks {tuple(ranks.shape)}, got {tuple(scores.shape)}"
        )


def ranking_loss(
    scores: Tensor, ranks: Tensor, group: Tensor, margin: float | Tensor = 0.0
) -> Tensor:
    """InstructGPT's K-wise loss (Ouyang et al. 2022, eq. 1) over a flat batch of completions.

    scores (N,) one per completion (each completion is forwarded once); ranks (N,) int, lower is
    better, ties share a rank; group (N,) int, the prompt each completion answers. For a prompt
    with K completions, every pair ranked y_w above y_l contributes
        -log sigmoid(r(x, y_w) - r(x, y_l) - margin) / C(K, 2);
    tied pairs contribute nothing. The loss is the sum over prompts divided by the number of
    prompts that have at least one untied pair, so each prompt counts once however large K is.
    With K=2 everywhere this equals `pairwise_loss`. margin: a float, or a tensor broadcastable
    to the (N, N) pair matrix [i, j].
    """
    _check_scores(scores, ranks)
    better = better_than(ranks, group)  # (N, N)
    scores = scores.float()
    diff = scores[:, None] - scores[None, :] - margin  # (N, N): s_i - s_j - m
    k = (group[:, None] == group[None, :]).sum(dim=1)  # (N,) completions of row i's prompt
    pairs = (k * (k - 1) // 2).clamp(min=1).to(scores.dtype)  # C(K, 2)
    terms = torch.where(better, -F.logsigmoid(diff) / pairs[:, None], 0.0)
    num_groups = torch.unique(group[better.any(dim=1)]).numel()
    if num_groups == 0:  # nothing to compare: a zero that still belongs to the graph
        return scores.sum() * 0.0
    return terms.sum() / num_groups


@torch.no_grad()
def pairwise_accuracy(scores: Tensor, ranks: Tensor, group: Tensor) -> tuple[int, int]:
    """(correct, total) over all untied pairs within a prompt: correct when the better-ranked
    completion scores strictly higher (checklist item 20: report it on held-out comparisons)."""
    _check_scores(scores, ranks)
    better = better_than(ranks, group)
    correct = better & (scores[:, None] > scores[None, :])
    return int(correct.sum()), int(better.sum())


def rating_loss(logits: Tensor, ratings: Tensor) -> Tensor:
    """Cross-entropy of rating logits (b, bins) against integer ratings (b,) in [0, bins)."""
    if logits.ndim != 2 or ratings.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be (b, bins) and ratings (b,), got {tuple(logits.shape)} and "
            f"{tuple(ratings.shape)}"
        )
    if ratings.numel() and (int(ratings.min()) < 0 or int(ratings.max()) >= logits.shape[1]):
        raise ValueError(f"ratings must lie in [0, {logits.shape[1]}), got {ratings.tolist()}")
    return F.cross_entropy(logits.float(), ratings.long())


def rating_regression_loss(scores: Tensor, ratings: Tensor) -> Tensor:
    """Mean squared error between scalar scores (b,) and numeric ratings (b,)."""
    if scores.ndim != 1 or scores.shape != ratings.shape:
        raise ValueError(
            f"scores and ratings must be (b,) of one shape, got {tuple(scores.shape)} and "
            f"{tuple(ratings.shape)}"
        )
    return F.mse_loss(scores.float(), ratings.float())
