"""Settings of the critic-free trainer (`GRPOConfig`) and of offline DPO (`DPOConfig`).

Frozen dataclasses, validated on creation, saved with every checkpoint; the CLI builds one
--option per field from these docstrings. Names match `PPOConfig` where the concept is the
same (kl_coef, clip, minibatch_size, grad_accum, no_eos_penalty, lora_rank, ...), so switching
trainers changes as little as possible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import _check

ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
DPO_LOSSES = ("sigmoid", "ipo", "plackett_luce")


def _positive_ints(config: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        _check(
            isinstance(value, int) and not isinstance(value, bool) and value > 0,
            name,
            f"must be a positive int, got {value!r}",
        )


@dataclass(frozen=True)
class GRPOConfig:
    """Critic-free RL settings (`palm_rlhf.rl.grpo.GRPOTrainer`): GRPO and its variants (Dr.
    GRPO, DAPO, GSPO), RLOO and REINFORCE++. Defaults follow DeepSeekMath's GRPO at toy scale."""

    prompts_per_iteration: int = 16
    """Prompts sampled per iteration on each process; each gets group_size responses."""
    group_size: int = 8
    """Responses sampled per prompt (G)."""
    max_new_tokens: int = 64
    """Longest response."""
    max_prompt_tokens: int = 128
    """Prompts are cut to their last this-many tokens."""
    temperature: float = 1.0
    """Sampling temperature; every log-prob divides logits by it (checklist 3). Unfiltered."""
    estimator: str = "grpo"
    """Advantage estimator: grpo (group-normalised, KL as a k3 loss term), rloo (leave-one-out
    baseline, sequence KL in the reward), reinforce_pp (per-token KL in the reward, returns
    whitened over the global batch) or reinforce_pp_baseline (group mean subtracted first)."""
    scale_rewards: str = "group"
    """grpo only: divide centred rewards by the std of the group, of the batch, or none (Dr.
    GRPO)."""
    loss_type: str = "grpo"
    """Loss aggregation: grpo (per-sequence mean, then mean), dapo (token mean over the
    optimizer step's batch across processes), dr_grpo (token sum / max_new_tokens per
    response) or gspo (sequence-level importance ratio, per-sequence mean)."""
    epochs: int = 1
    """Passes over each rollout batch (1: one on-policy update per minibatch)."""
    minibatch_size: int = 32
    """Responses per forward/backward pass."""
    grad_accum: int = 1
    """Minibatches whose gradients are accumulated into one optimizer step."""
    lr: float = 3e-4
    """AdamW learning rate of the actor's adapters (or of every weight with full_finetune)."""
    clip: float = 0.2
    """Lower clip epsilon of the ratio: clip(r, 1 - clip, 1 + clip_high)."""
    clip_high: float = 0.2
    """Upper clip epsilon (DAPO's clip-higher uses 0.28); GSPO uses tiny ones (3e-4/4e-4)."""
    kl_coef: float = 0.04
    """KL coefficient beta against the reference (adapters off); 0 skips the reference pass."""
    gamma: float = 1.0
    """reinforce_pp: discount of the token returns."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and sample more prompts until the batch
    is full (all processes decide together)."""
    max_sampling_rounds: int = 4
    """Cap on sampling rounds per iteration with dynamic_sampling; a batch still short is
    topped up with dropped groups (zero advantage), and the count is logged."""
    overlong_buffer: int = 0
    """DAPO's soft overlong penalty over the last this-many tokens of max_new_tokens; 0
    disables."""
    overlong_penalty: float = 1.0
    """Largest overlong penalty (reached at max_new_tokens)."""
    mask_truncated: bool = False
    """Leave responses that never emitted eos out of the loss (DAPO's overlong filtering)."""
    no_eos_penalty: float = -1.0
    """Score given to a response that never emits eos instead of its reward (checklist 6);
    nan keeps the reward's score."""
    score_clip: float = 0.0
    """Clip scores to [-score_clip, score_clip]; 0 disables."""
    lora_rank: int = 8
    """Rank of the actor LoRA scope."""
    lora_alpha: float = 16.0
    """Alpha of the actor LoRA scope."""
    full_finetune: bool = False
    """Train every policy weight (the reference is then a frozen copy)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (0 disables)."""
    log_samples: int = 2
    """Completions written to grpo_samples.jsonl per iteration (rank 0)."""
    seed: int = 0
    """Seed for prompt order, sampling and minibatch shuffling."""

    def __post_init__(self) -> None:
        _positive_ints(
            self,
            (
                "prompts_per_iteration",
                "group_size",
                "max_new_tokens",
                "max_prompt_tokens",
                "epochs",
                "minibatch_size",
                "grad_accum",
                "max_sampling_rounds",
                "lora_rank",
            ),
        )
        _check(
            self.estimator in ESTIMATORS,
            "estimator",
            f"must be one of {ESTIMATORS}, got {self.estimator!r}",
        )
        _check(
            self.scale_rewards in ("group", "batch", "none"),
            "scale_rewards",
            f"must be group, batch or none, got {self.scale_rewards!r}",
        )
        _check(
            self.loss_type in ("grpo", "dapo", "dr_grpo", "gspo"),
            "loss_type",
            f"must be grpo, dapo, dr_grpo or gspo, got {self.loss_type!r}",
        )
        _check(
            self.estimator not in ("rloo", "reinforce_pp_baseline") or self.group_size > 1,
            "group_size",
            f"must be >= 2 for estimator {self.estimator!r} (it needs a group baseline)",
        )
        _check(
            self.minibatch_size <= self.prompts_per_iteration * self.group_size,
            "minibatch_size",
            f"must be <= prompts_per_iteration * group_size = "
            f"{self.prompts_per_iteration * self.group_size}",
        )
        _check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        for name in ("lr", "clip", "clip_high", "lora_alpha"):
            _check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        for name in ("kl_coef", "score_clip", "grad_clip", "overlong_penalty"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _check(self.clip < 1, "clip", f"must be < 1, got {self.clip}")
        _check(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        _check(
            0 <= self.overlong_buffer <= self.max_new_tokens,
            "overlong_buffer",
            f"must be in [0, max_new_tokens={self.max_new_tokens}], got {self.overlong_buffer}",
        )
        _check(self.log_samples >= 0, "log_samples", f"must be >= 0, got {self.log_samples}")


@dataclass(frozen=True)
class DPOConfig:
    """Offline preference optimisation settings (`palm_rlhf.rl.dpo.train_dpo`)."""

    loss_type: str = "sigmoid"
    """sigmoid (DPO; K-wise rankings use every untied pair, each weighted 1/C(K,2)), ipo, or
    plackett_luce (listwise over the ranking's tiers; equals sigmoid for K=2)."""
    beta: float = 0.1
    """Strength of the implicit KL constraint to the reference (adapters off)."""
    label_smoothing: float = 0.0
    """Conservative DPO: the share of labels assumed flipped (sigmoid only), in [0, 0.5)."""
    lora_rank: int = 8
    """Rank of the policy's LoRA scope."""
    lora_alpha: float = 16.0
    """Alpha of the policy's LoRA scope."""
    full_finetune: bool = False
    """Train every weight instead of an adapter (the reference is then a frozen copy)."""

    def __post_init__(self) -> None:
        _check(
            self.loss_type in DPO_LOSSES,
            "loss_type",
            f"must be one of {DPO_LOSSES}, got {self.loss_type!r}",
        )
        _check(self.beta > 0 and math.isfinite(self.beta), "beta", f"must be > 0, got {self.beta}")
        _check(
            0 <= self.label_smoothing < 0.5,
            "label_smoothing",
            f"must be in [0, 0.5), got {self.label_smoothing}",
        )
        _check(
            self.label_smoothing == 0 or self.loss_type == "sigmoid",
            "label_smoothing",
            f"only applies to loss_type 'sigmoid', not {self.loss_type!r}",
        )
        _positive_ints(self, ("lora_rank",))
        _check(self.lora_alpha > 0, "lora_alpha", f"must be positive, got {self.lora_alpha}")
