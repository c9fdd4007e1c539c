"""PPO maths: KL-shaped rewards, GAE, the clipped policy and value losses, the entropy bonus,
KL control.

Shapes: b = batch, n = response length. `mask` (b, n) bool, True = keep (losses/masked.py).

Losses average per token over the whole minibatch: the sum over every valid token divided by the
number of valid tokens, so a long response weighs more than a short one (as in TRL and
torchtune), rather than averaging each sequence first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .masked import masked_mean


def kl_penalty_rewards(
    logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, scores: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Per-token rewards with a KL penalty to the reference (Stiennon et al. 2020 eq. 2;
    InstructGPT, Ouyang et al. 2022; checklist item 8).

    logprobs, ref_logprobs (b, n): log-probs of the sampled tokens under the policy and the
    frozen reference; mask (b, n); scores (b,): the reward model's score of each response.

    Returns (rewards (b, n), kl (b, n)). kl = logprobs - ref_logprobs, the per-token log-ratio
    (a one-sample KL estimate). rewards = -kl_coef * kl, plus the score added at the LAST real
    response token of each row (the highest index where mask is True: the EOS token when the
    response ended, else its final token). Both are 0 where masked; a row with no real token
    gets nothing, not even its score.
    """
    mask = mask.bool()
    kl = (logprobs - ref_logprobs).masked_fill(~mask, 0)  # (b, n)
    rewards = -kl_coef * kl
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)  # (b, n)
    last = torch.where(mask, positions, -1).amax(dim=-1)  # (b,) -1 for an empty row
    has_token = last >= 0
    score_at_end = torch.zeros_like(rewards)
    score_at_end[has_token, last[has_token]] = scores[has_token].to(rewards.dtype)
    return rewards + score_at_end, kl


@torch.no_grad()
def gae_advantages(
    values: Tensor, rewards: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), backwards over tokens:

        delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = delta_t + gamma * lam * A_{t+1}

    values, rewards, mask (b, n). The real tokens of each row must be contiguous (typically a
    prefix of True then False; rows may end at different positions), else ValueError. The
    episode ends after a row's last real token, so the value and advantage after it are 0.

    Returns (advantages (b, n), returns (b, n)) in float32, 0 where masked. returns = advantages
    + values, computed here before any whitening of the advantages (checklist item 12): they are
    the value targets. Run without gradients: both are targets, never differentiated through.
    """
    mask = mask.bool()
    starts = mask[:, :1].sum(-1) + (mask[:, 1:] & ~mask[:, :-1]).sum(-1)  # (b,) runs of True
    if bool((starts > 1).any()):
        raise ValueError("each row of mask must hold one contiguous run of real tokens")
    # Zeroing padding makes V_{t+1} = 0 after the last real token and keeps garbage out.
    values = values.float().masked_fill(~mask, 0)
    rewards = rewards.float().masked_fill(~mask, 0)
    n = values.shape[-1]
    advantages = torch.zeros_like(values)  # (b, n)
    next_value = torch.zeros_like(values[:, 0])  # (b,)
    next_advantage = torch.zeros_like(values[:, 0])  # (b,)
    for t in reversed(range(n)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Padding has r = V = 0, so A stays 0 there and the recursion restarts at the last token.
        next_advantage = (delta + gamma * lam * next_advantage).masked_fill(~mask[:, t], 0)
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = (advantages + values).masked_fill(~mask, 0)
    return advantages, returns


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss (Schulman et al. 2017, eq. 7), negated to minimise:

        r = exp(logprobs - old_logprobs),   loss = -min(r A, clip(r, 1 - clip, 1 + clip) A)

    All inputs (b, n); averaged per token over the whole minibatch (module docstring).

    Returns (loss (), stats) with detached scalars: clip_frac, the fraction of valid tokens where
    the clipped objective is the smaller one (their gradient is 0); approx_kl, the mean of
    (r - 1) - log r, the k3 estimator of KL(old || new) (Schulman, "Approximating KL
    Divergence", 2020); ratio_mean.
    """
    mask = mask.bool()
    log_ratio = (logprobs - old_logprobs).masked_fill(~mask, 0)  # (b, n)
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    loss = masked_mean(-torch.minimum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped < unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (as in OpenAI baselines' PPO2; checklist item 14):

        0.5 * mean(max((V - R)^2, (clip(V, V_old - clip, V_old + clip) - R)^2))

    All inputs (b, n); averaged per token over the whole minibatch. Returns (loss (), stats) with
    detached scalars: value_clip_frac, the fraction of valid tokens where the clipped term is
    the larger one; value_error, the mean of (V - R)^2.
    """
    mask = mask.bool()
    values_clipped = old_values + (values - old_values).clamp(-clip, clip)
    error = (values - returns) ** 2  # (b, n)
    error_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, error_clipped), mask)
    with torch.no_grad():
        stats = {
            "value_clip_frac": masked_mean((error_clipped > error).float(), mask),
            "value_error": masked_mean(error, mask),
        }
    return loss, stats


def entropy_bonus_loss(entropy: Tensor, mask: Tensor, coef: float) -> Tensor:
    """-coef * mean entropy over valid tokens, entropy (b, n) -> (). Added to the loss, it
    lowers the loss as entropy rises: a bonus for exploring when coef > 0."""
    return -coef * masked_mean(entropy, mask)


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, section 2.2; checklist item 10):

        e = clip(KL / target - 1, -0.2, 0.2),   beta <- beta * (1 + e * n_steps / horizon)

    so beta grows while the policy's KL to the reference exceeds target and shrinks below it.
    """

    def __init__(self, init_kl_coef: float, target: float = 6.0, horizon: int = 10000) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target} and {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: the measured KL to the reference (summed over a response's tokens, as
        the target is); n_steps: samples (episodes) seen since the last update."""
        error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


class FixedKLController:
    """A constant KL coefficient with AdaptiveKLController's interface."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: the coefficient stays fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
