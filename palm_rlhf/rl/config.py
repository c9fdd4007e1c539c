"""The online stages' configs: `PPOConfig` and `GRPOConfig` (GRPO, Dr. GRPO, DAPO, GSPO, RLOO,
REINFORCE++). Frozen, validated on creation, saved with every run's state.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainingMemory, check, check_choice, check_ints, check_numbers
from ..losses.grpo import LOSS_TYPES, SCALE_REWARDS


@dataclass(frozen=True)
class OnlineMechanics(TrainingMemory):
    """How an online run computes (precision, memory, sharding, clipping): the fields PPOConfig
    and GRPOConfig share, with the same meaning in both."""

    grad_clip: float = 1.0
    """Clip the global gradient norm (0 disables)."""
    mixed_precision: str = "no"
    """'no' or 'bf16': sampling, scoring and the training passes under bf16 autocast (through
    accelerate, which fixes it once per process)."""
    fsdp: bool = False
    """Shard the models over the processes with torch's FSDP2 (one unit per block): weights,
    gradients and optimizer state split across processes, gathered a block at a time. Launch
    with `accelerate launch`; sampling gathers the policy whole unless sample_gathered is off."""
    sample_gathered: bool = True
    """With fsdp: gather the whole policy once per rollout and decode with no collective, each
    process to its own rows' eos (fast; every process holds the whole model while sampling).
    False: decode sharded, a block gathered at a time at every step (the whole model crosses
    the network once per new token; two blocks held), the processes stopping together once
    every row of every process has ended."""

    def __post_init__(self) -> None:
        check_numbers(self, ("grad_clip",), strict=False)
        super().__post_init__()
        check_choice(self, "mixed_precision", ("no", "bf16"))


@dataclass(frozen=True)
class PPOConfig(OnlineMechanics):
    """PPO fine-tuning settings (`palm_rlhf.rl.ppo.PPOTrainer`). Defaults follow "The N
    Implementation Details of RLHF with PPO" (Huang et al.) scaled to toy models."""

    rollout_batch_size: int = 16
    """Prompts sampled per iteration (one response each)."""
    max_new_tokens: int = 64
    """Longest response."""
    max_prompt_tokens: int = 128
    """Prompts are cut to their last this-many tokens."""
    temperature: float = 1.0
    """Sampling temperature; log-probs everywhere divide logits by it (checklist 3). Sampling is
    unfiltered (no top-k/top-p) so the PPO ratio compares the distribution actually sampled."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    minibatch_size: int = 8
    """Responses per forward/backward pass."""
    grad_accum: int = 1
    """Minibatches whose gradients are accumulated into one optimizer step."""
    lr: float = 3e-4
    """AdamW learning rate of the actor's adapters."""
    critic_lr: float = 3e-4
    """AdamW learning rate of the critic's adapters and value head."""
    clip: float = 0.2
    """PPO ratio clip epsilon."""
    value_clip: float = 0.2
    """Value clip epsilon around the rollout's values."""
    value_coef: float = 0.1
    """Weight of the value loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (a bonus lowers the loss when entropy rises)."""
    kl_coef: float = 0.05
    """Initial per-token KL penalty beta against the reference policy."""
    adaptive_kl: bool = False
    """Adapt beta towards kl_target (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target KL (nats per response) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten advantages over valid tokens of the rollout batch."""
    no_eos_penalty: float = float("nan")
    """Score given instead of its reward to a response that never emits eos (checklist 6), e.g.
    -1; nan (the default) keeps the reward's score, so the reward given is what PPO optimises.
    A young policy rarely ends within max_new_tokens: the penalty then replaces most scores and
    PPO learns to stop rather than to raise the reward (README, "Shaping")."""
    score_clip: float = 0.0
    """Clip scores to [-score_clip, score_clip]; 0 disables."""
    lora_rank: int = 8
    """Rank of the actor and critic LoRA scopes."""
    lora_alpha: float = 16.0
    """Alpha of the actor and critic LoRA scopes."""
    full_finetune: bool = False
    """Train every policy weight instead of an actor adapter (the reference is then a frozen
    copy, and the critic gets its own copy of the trunk)."""
    seed: int = 0
    """Seed for prompt order, sampling and minibatch shuffling."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(
            self,
            (
                "rollout_batch_size",
                "max_new_tokens",
                "max_prompt_tokens",
                "ppo_epochs",
                "minibatch_size",
                "grad_accum",
                "lora_rank",
                "kl_horizon",
            ),
        )
        check(
            self.minibatch_size <= self.rollout_batch_size,
            "minibatch_size",
            f"must be <= rollout_batch_size={self.rollout_batch_size}",
        )
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check_numbers(self, ("lr", "critic_lr", "clip", "value_clip", "lora_alpha", "kl_target"))
        check_numbers(self, ("value_coef", "entropy_coef", "kl_coef", "score_clip"), strict=False)
        check(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        check(0 <= self.lam <= 1, "lam", f"must be in [0, 1], got {self.lam}")


ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")


@dataclass(frozen=True)
class GRPOConfig(OnlineMechanics):
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
    recompute_old_logprobs: bool = False
    """Compute the old log-probs with a forward pass over the batch after sampling. Off: take
    them from the sampler, which drew each token from the very distribution the ratio needs
    (logits / temperature, unfiltered), so the first minibatch's ratio is 1 within float
    rounding and one forward over the batch is saved. Always recomputed under bf16 mixed
    precision, where the cached decode and a full forward round differently."""
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
    no_eos_penalty: float = float("nan")
    """Score given instead of its reward to a response that never emits eos (checklist 6), e.g.
    -1; nan (the default) keeps the reward's score, so the rewards given are what GRPO
    optimises (README, "Shaping")."""
    score_clip: float = 0.0
    """Clip scores to [-score_clip, score_clip]; 0 disables."""
    lora_rank: int = 8
    """Rank of the actor LoRA scope."""
    lora_alpha: float = 16.0
    """Alpha of the actor LoRA scope."""
    full_finetune: bool = False
    """Train every policy weight (the reference is then a frozen copy)."""
    log_samples: int = 2
    """Completions written to grpo_samples.jsonl per iteration (rank 0)."""
    seed: int = 0
    """Seed for prompt order, sampling and minibatch shuffling."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(
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
        check_choice(self, "estimator", ESTIMATORS)
        check_choice(self, "scale_rewards", SCALE_REWARDS)
        check_choice(self, "loss_type", LOSS_TYPES)
        check(
            self.estimator not in ("rloo", "reinforce_pp_baseline") or self.group_size > 1,
            "group_size",
            f"must be >= 2 for estimator {self.estimator!r} (it needs a group baseline)",
        )
        check(
            self.minibatch_size <= self.prompts_per_iteration * self.group_size,
            "minibatch_size",
            f"must be <= prompts_per_iteration * group_size = "
            f"{self.prompts_per_iteration * self.group_size}",
        )
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check_numbers(self, ("lr", "clip", "clip_high", "lora_alpha"))
        check_numbers(self, ("kl_coef", "score_clip", "overlong_penalty"), strict=False)
        check(self.clip < 1, "clip", f"must be < 1, got {self.clip}")
        check(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        check(
            0 <= self.overlong_buffer <= self.max_new_tokens,
            "overlong_buffer",
            f"must be in [0, max_new_tokens={self.max_new_tokens}], got {self.overlong_buffer}",
        )
        check(self.log_samples >= 0, "log_samples", f"must be >= 0, got {self.log_samples}")
