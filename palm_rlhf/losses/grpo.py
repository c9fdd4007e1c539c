"""Pure maths of the critic-free policy-gradient methods: GRPO, Dr. GRPO, DAPO, GSPO, RLOO and
REINFORCE++ (`palm_rlhf.rl.grpo` runs them).

Shapes: b = responses, n = response tokens, g = groups. `group` (b,) long gives the prompt each
response answers (the G responses to one prompt form a group); `mask` (b, n) bool, True = a real
response token, as in `losses.ppo`. Everything at mask == False comes out as exactly 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .masked import masked_mean

SCALE_REWARDS = ("group", "batch", "none")


LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "gspo")


def _group_stats(scores: Tensor, group: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-response (mean, unbiased std, size) of its group, each (b,)."""
    _, inverse, counts = torch.unique(group, return_inverse=True, return_counts=True)
    scores = scores.float()
    sums = torch.zeros(len(counts), device=scores.device).index_add_(0, inverse, scores)
    mean = (sums / counts)[inverse]
    squares = torch.zeros_like(sums).index_add_(0, inverse, (scores - mean) ** 2)
    var = squares / (counts - 1).clamp(min=1)
    return mean, var.sqrt()[inverse], counts[inverse]


def group_advantages(
    scores: Tensor, group: Tensor, scale_rewards: str = "group", eps: float = 1e-4
) -> Tensor:
    """GRPO's outcome advantages (Shao et al. 2024, DeepSeekMath, section 4.1.2), (b,) -> (b,):

        A_i = (r_i - mean(r of i's group)) / (std + eps)

    with the unbiased std of i's group ("group"), of the whole batch ("batch": Hu et al.'s
    REINFORCE++-baseline and TRL's option), or no division at all ("none": Dr. GRPO, Liu et al.
    2025, who show the std division biases learning toward too-easy and too-hard prompts).
    A group whose rewards are all equal gets A = 0 for every response.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    mean, group_std, _ = _group_stats(scores, group)
    centred = scores.float() - mean
    if scale_rewards == "group":
        return centred / (group_std + eps)
    if scale_rewards == "batch":
        return centred / (scores.float().std() + eps)
    return centred


def leave_one_out_advantages(scores: Tensor, group: Tensor) -> Tensor:
    """RLOO's baseline (Kool et al. 2019; Ahmadian et al. 2024, eq. 6), (b,) -> (b,):

        A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r of the group))

    Every group needs at least 2 responses (ValueError otherwise).
    """
    mean, _, size = _group_stats(scores, group)
    if bool((size < 2).any()):
        raise ValueError("the leave-one-out baseline needs at least 2 responses per group")
    return (scores.float() - mean) * size / (size - 1)


def discounted_returns(
    scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float, gamma: float = 1.0
) -> Tensor:
    """REINFORCE++'s token returns (Hu et al. 2025, eqs. 4-5), (b,), (b, n) -> (b, n):

        r_t = -kl_coef * kl_t + [t is the last real token] * score
        G_t = sum_{s >= t} gamma^(s - t) r_s

    kl (b, n) is the per-token log-ratio to the reference (k1). 0 where masked.
    """
    mask = mask.bool()
    rewards = (-kl_coef * kl.float()).masked_fill(~mask, 0)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(dim=1)  # (b,)
    has_token = last >= 0
    rewards[has_token, last[has_token]] += scores.float()[has_token]
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(mask.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns.masked_fill(~mask, 0)


def overlong_penalty(lengths: Tensor, max_new_tokens: int, buffer: int, factor: float) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), lengths (b,) -> (b,):

        0 if L <= L_max - buffer,  ((L_max - buffer) - L) / buffer * factor up to L_max,
        -factor beyond

    where L_max = max_new_tokens: the penalty ramps linearly over the last `buffer` tokens.
    """
    if buffer < 1 or buffer > max_new_tokens:
        raise ValueError(f"buffer must be in [1, max_new_tokens={max_new_tokens}], got {buffer}")
    expected = max_new_tokens - buffer
    ramp = (expected - lengths.float()) / buffer * factor
    return ramp.clamp(min=-factor, max=0.0)


def informative_groups(scores: Tensor, group: Tensor) -> Tensor:
    """DAPO's dynamic sampling filter: (g,) bool over the sorted group ids, True where the
    group's rewards are not all equal (an all-equal group has zero advantage everywhere)."""
    ids, inverse = torch.unique(group, return_inverse=True)
    high = torch.full((len(ids),), float("-inf"), device=scores.device)
    low = torch.full((len(ids),), float("inf"), device=scores.device)
    high = high.scatter_reduce(0, inverse, scores.float(), "amax")
    low = low.scatter_reduce(0, inverse, scores.float(), "amin")
    return high > low


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy || reference) (Schulman 2020; DeepSeekMath eq. 4):

        exp(ref - logp) - (ref - logp) - 1 >= 0, unbiased, with gradient (1 - exp(ref - logp))

    (b, n) -> (b, n); 0 where masked.
    """
    mask = mask.bool()
    delta = (ref_logprobs - logprobs).masked_fill(~mask, 0)
    return (delta.exp() - delta - 1).masked_fill(~mask, 0)


def clipped_surrogate(
    log_ratio: Tensor, advantages: Tensor, mask: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate with separate bounds (DAPO's clip-higher, Yu et al. 2025, eq. 10):

        loss_t = -min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t),   r = exp(log_ratio)

    log_ratio (b, n) = logp - logp_old per token (or a sequence's ratio broadcast over its tokens
    for GSPO); advantages (b, n) or (b,) (broadcast over tokens). Returns the per-token loss
    (b, n), 0 where masked, and detached stats: clip_frac_low, the share of valid tokens whose
    ratio fell under 1 - clip_low with A < 0 (the clip stopped their gradient), clip_frac_high,
    above 1 + clip_high with A > 0.
    """
    mask = mask.bool()
    if advantages.ndim == 1:
        advantages = advantages[:, None].expand_as(log_ratio)
    ratio = log_ratio.masked_fill(~mask, 0).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    loss = (-torch.minimum(unclipped, clipped)).masked_fill(~mask, 0)
    with torch.no_grad():
        stats = {
            "clip_frac_low": masked_mean(((ratio < 1 - clip_low) & (advantages < 0)).float(), mask),
            "clip_frac_high": masked_mean(
                ((ratio > 1 + clip_high) & (advantages > 0)).float(), mask
            ),
        }
    return loss, stats


def sequence_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """GSPO's sequence-level log importance ratio (Zheng et al. 2025, eq. 7), broadcast back
    over the tokens: log s_i = mean over i's tokens of (logp - logp_old), (b, n) -> (b, n)."""
    mask = mask.bool()
    per_sequence = masked_mean(logprobs - old_logprobs, mask, dim=1)  # (b,)
    return per_sequence[:, None].expand_as(logprobs).masked_fill(~mask, 0)


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    loss_type: str,
    max_new_tokens: int | None = None,
    num_tokens: Tensor | float | None = None,
) -> Tensor:
    """Reduce a per-token loss (b, n) to a scalar, the way each method defines it:

    - "grpo" and "gspo": mean over each sequence's tokens, then mean over the sequences that
      have any (DeepSeekMath eq. 3); a short response's tokens weigh more than a long one's.
    - "dapo": sum over every token / num_tokens, the number of valid tokens in the whole
      optimizer step's batch across processes (DAPO eq. 12, token-level); defaults to this
      minibatch's count.
    - "dr_grpo": sum over every token / (b * max_new_tokens), a constant (Dr. GRPO): no length
      bias at all.
    """
    mask = mask.bool()
    per_token = per_token.masked_fill(~mask, 0)
    if loss_type in ("grpo", "gspo"):
        # A response with no loss token (masked out as truncated) is not a sequence of the mean.
        present = mask.any(dim=1)
        return masked_mean(per_token, mask, dim=1).sum() / present.sum().clamp(min=1)
    if loss_type == "dapo":
        count = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
        return per_token.sum() / count
    if loss_type == "dr_grpo":
        if max_new_tokens is None:
            raise ValueError("loss_type 'dr_grpo' needs max_new_tokens")
        return per_token.sum() / (per_token.shape[0] * max_new_tokens)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
