"""PPO fine-tuning of a PaLM policy against a reward model and/or weighted Python reward
functions (the score is their weighted sum, as in GRPO).

Models (memory-light, RLHF checklist items 9 and 16):
- policy = the pretrained PaLM, base frozen, plus an "actor" LoRA scope (or a full fine-tune);
- reference = the same PaLM with adapters off: no copy of the weights (with full_finetune, a
  frozen copy);
- critic = `ValueModel`: a trunk with its own "critic" LoRA scope and a value head. With a reward
  model it starts as a copy of the reward model (so initial values are its scores); with
  reward functions alone it shares the policy's frozen base. The scopes never share gradients.

One iteration (`PPOTrainer.step`):
    step 1. sample prompts and generate responses with the KV cache (eval mode, dropout off)
    step 2. score the sampled ids; the reward model reads exactly the rows it was trained on
            (`data.preferences.encode_completion`: [bos] + prompt + response + [eos], cut to its
            training length); a response without eos gets no_eos_penalty instead, if set
    step 3. once, without gradients: old log-probs, reference log-probs and values, all from a
            full forward at the sampling temperature, in the minibatches of the first epoch
            (so the first minibatch's PPO ratio is exactly 1)
    step 4. per-token KL penalty + score at the last real token, GAE, whitened advantages
    step 5. PPO epochs over shuffled minibatches: clipped policy + value losses
    step 6. update the KL controller from the KL averaged over processes, so every rank keeps
            the same coefficient, and return the iteration's metrics (averaged over processes)
Losses average over valid tokens of a minibatch (`losses.ppo`).

Devices: the trainer puts the policy and reward model on the accelerator's device (with fsdp,
sharding puts each unit there; `training.fsdp`); sampling draws from a generator on that
device, minibatch shuffling from one on the CPU. Each process has its own pair (seeded by
rank), and `save` keeps every rank's states, so a resumed run on the same number of processes
replays the uninterrupted one.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from ..config import LoRAConfig
from ..data.prompts import PromptRecord
from ..losses.masked import masked_mean, masked_whiten
from ..losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    entropy_bonus_loss,
    gae_advantages,
    kl_penalty_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)
from ..model.lora import copy_scope, lora_parameters, merge_lora, remove_lora
from ..model.palm import PaLM
from ..model.reward import LinearHead, RewardModel
from ..tokenizers.base import Tokenizer
from ..training.fsdp import shard_optimizer_state
from ..training.step import WindowSchedule
from .config import PPOConfig
from .online import (
    OnlineRun,
    RewardSpec,
    ShapingAlarm,
    make_engine,
    make_generators,
    online_accelerator,
    place_models,
    reward_sources,
    run_iterations,
    score_metrics,
    set_online_dtypes,
    setup_actor,
    shard_online_models,
    trainable_tensors,
)
from .rollout import RewardFn, Samples, Trajectory, as_records, response_logits
from .run_state import (
    accumulation_divisors,
    mean_over_processes,
    optimizer_step,
)

CRITIC = "critic"
METRICS_NAME = "ppo_metrics.jsonl"


class ValueModel(nn.Module):
    """Critic: a PaLM trunk under its own LoRA scope + a linear value head on every position."""

    def __init__(self, trunk: PaLM, head: nn.Linear, lora: LoRAConfig) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head
        self.trunk.add_lora(CRITIC, lora, freeze_base=False)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        hidden = self.trunk.forward_hidden(tokens, mask, lora_scope=CRITIC)  # (b, n, d)
        return self.head(hidden).squeeze(-1).float()  # (b, n)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*lora_parameters(self.trunk, CRITIC), *self.head.parameters()]


class Experience(NamedTuple):
    """One batch of PPO experience: the engine's trajectory (samples, old and reference
    log-probs) plus what the critic and GAE add; b responses, n response tokens."""

    trajectory: Trajectory
    values: Tensor  # (b, n) critic values before each response token
    advantages: Tensor  # (b, n) whitened GAE advantages
    returns: Tensor  # (b, n) advantages + values, before whitening
    kl: Tensor  # (b, n) per-token log-ratio to the reference

    @property
    def samples(self) -> Samples:
        return self.trajectory.samples


class PPOTrainer:
    """PPO on one frozen base. `train(num_iterations)` returns per-iteration metric dicts."""

    def __init__(
        self,
        policy: PaLM,
        tokenizer: Tokenizer,
        prompts: Sequence[str | PromptRecord],
        reward_model: RewardModel | None = None,
        reward_fn: RewardFn | None = None,
        config: PPOConfig | None = None,
        accelerator: Accelerator | None = None,
        out_dir: str | Path | None = None,
        show_progress: bool = True,
        overwrite: bool = False,
        reward_fns: Sequence[RewardSpec] = (),
        reward_model_weight: float = 1.0,
    ) -> None:
        if not prompts:
            raise ValueError("prompts is empty")
        self.config = config = config or PPOConfig()
        self.tokenizer, self.prompts = tokenizer, as_records(prompts)
        # `reward_fn` (the form the README shows) is one more function, weight 1, named so.
        functions = [
            *([("reward_fn", reward_fn, 1.0)] if reward_fn is not None else []),
            *reward_fns,
        ]
        rewards = reward_sources(reward_model, reward_model_weight, functions)
        self.reward_model = reward_model
        self.accelerator = online_accelerator(accelerator, config.mixed_precision)
        self.show_progress = show_progress
        self.run = OnlineRun("ppo", [METRICS_NAME], self.accelerator, out_dir, overwrite)
        torch.manual_seed(config.seed)
        lora = LoRAConfig(rank=config.lora_rank, alpha=config.lora_alpha)
        # The loop places the models (they know nothing about devices, STYLE habit 2).
        device = self.accelerator.device
        place_models([policy, reward_model], config, self.accelerator)

        # Policy and reference: one base; the reference is the base with adapters off.
        self.policy = policy
        actor = setup_actor(policy, config.full_finetune, lora, reward_model)
        self.reference, self.actor_scope = actor.reference, actor.scope
        # Critic: from the reward model where there is one, else on the policy's frozen base.
        # One base for every role when the reward model is a scope on the policy's own base
        # (`online.load_reward_model`): the critic is one more scope there, a copy of the
        # reward scope, with the reward's head; no second trunk exists.
        self.shared_base = reward_model is not None and reward_model.trunk is policy
        if reward_model is not None:  # frozen; the trained parameters are re-enabled below
            reward_model.eval().requires_grad_(False)
        if self.shared_base:  # (setup_actor refused a full fine-tune of the shared base)
            trunk = policy
            lora = policy.lora_configs[reward_model.lora_scope]  # the copy keeps its rank
            head = normalized_head(reward_model)
        elif reward_model is not None:
            trunk = copy.deepcopy(reward_model.trunk)
            # The critic computes what the reward model computes: its own scope folded in,
            # any other scope the trunk carries (never applied by the reward model) dropped.
            for scope in list(trunk.lora_configs):
                if scope == reward_model.lora_scope:
                    merge_lora(trunk, scope)
                else:
                    remove_lora(trunk, scope)
            head = normalized_head(reward_model)
        else:
            trunk = copy.deepcopy(policy) if config.full_finetune else policy
            head = LinearHead(policy.config.dim, 1, device=device, dtype=torch.float32)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        if trunk is not policy:
            trunk.requires_grad_(False)
        self.critic = ValueModel(trunk, head, lora)
        if self.shared_base:
            copy_scope(policy, reward_model.lora_scope, CRITIC)
        for model in (policy, trunk):  # the reward model runs without gradients
            model.set_activation_checkpointing(config.activation_checkpointing)
        self.actor_params, self.critic_params = actor.params, self.critic.trainable_parameters()
        # Only the actor's and the critic's own parameters train, in float32; a shared base
        # stays frozen, in the dtype it was stored in (or base_dtype).
        trained = [*self.actor_params, *self.critic_params]
        for param in trained:
            param.requires_grad_(True)
        models = [policy, self.reference, self.critic, reward_model]
        set_online_dtypes(models, trained, config)
        if config.fsdp:
            self.actor_params = shard_online_models(models, policy, actor, self.accelerator)
            self.critic_params = self.critic.trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            [
                {"params": self.actor_params, "lr": config.lr},
                {"params": self.critic_params, "lr": config.critic_lr},
            ],
            weight_decay=0.0,
        )
        self.kl_controller = (
            AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
            if config.adaptive_kl
            else FixedKLController(config.kl_coef)
        )
        self.prompt_schedule = WindowSchedule(len(self.prompts), config.seed)
        self.iteration = 0
        self.generator, self.shuffle_generator = make_generators(config.seed, self.accelerator)
        self.history: list[dict[str, Any]] = []
        self.shaping = ShapingAlarm("ppo", config, self.accelerator)
        self.engine = make_engine(
            policy, actor, tokenizer, rewards, self.generator, config, self.accelerator
        )

    # ----------------------------------------------------------------------------- rollout

    @torch.no_grad()
    def rollout(self, prompts: list[PromptRecord]) -> tuple[Experience, dict[str, float], Tensor]:
        """Steps 1-4 of an iteration. Returns the experience, its metrics and the epoch-0 order."""
        config = self.config
        self.policy.eval()
        self.critic.eval()
        # steps 1-2. generate (left-padded prompts, KV cache, sampling unfiltered) and score
        samples = self.engine.sample(prompts)
        # step 3. old/reference log-probs and values, in epoch 0's minibatches
        p, b = samples.prompt_len, len(prompts)
        order = torch.randperm(b, generator=self.shuffle_generator)
        trajectory = self.engine.logprobs(samples, order, config.minibatch_size)
        sequences, sequence_mask = samples.sequences, samples.sequence_mask
        values = torch.zeros_like(trajectory.old_logprobs)
        for chunk in order.split(config.minibatch_size):
            with self.accelerator.autocast():
                critic_out = self.critic(sequences[chunk], sequence_mask[chunk])[..., None]
            values[chunk] = response_logits(critic_out, p)[..., 0]
        # step 4. rewards, advantages
        mask, scores = samples.response_mask, samples.scores
        rewards, kl = kl_penalty_rewards(
            trajectory.old_logprobs,
            trajectory.ref_logprobs,
            mask,
            scores,
            self.kl_controller.value,
        )
        advantages, returns = gae_advantages(values, rewards, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        experience = Experience(trajectory, values, advantages, returns, kl)
        lengths = mask.sum(dim=1).float()
        metrics = {
            "kl_ref": kl.sum(dim=1).mean().item(),
            "response_len": lengths.mean().item(),
            "eos_rate": samples.ended.float().mean().item(),
            "kl_coef": self.kl_controller.value,
        }
        # Each reward source first, then the shaped score RL optimises, over every process.
        metrics = {
            **score_metrics(samples, self.engine.rewards, self.accelerator),
            **self._mean_over_processes(metrics),
        }
        return experience, metrics, order

    # ----------------------------------------------------------------------------- learning

    def learn(self, experience: Experience, first_order: Tensor) -> dict[str, float]:
        """Step 5: PPO epochs over shuffled minibatches. Policy and critic stay in eval mode:
        dropout is off everywhere during RL (checklist 5)."""
        config = self.config
        samples, old_logprobs = experience.samples, experience.trajectory.old_logprobs
        p, b = samples.prompt_len, len(samples.prompts)
        stats: dict[str, list[float]] = {}
        for epoch in range(config.ppo_epochs):
            order = (
                first_order if epoch == 0 else torch.randperm(b, generator=self.shuffle_generator)
            )
            chunks = order.split(config.minibatch_size)
            divisors = accumulation_divisors(len(chunks), config.grad_accum)
            for index, chunk in enumerate(chunks):
                seq, seq_mask = samples.sequences[chunk], samples.sequence_mask[chunk]
                mask = samples.response_mask[chunk]
                logprobs, entropy = self.engine.policy_logprobs(seq, seq_mask, p, entropy=True)
                policy_loss, policy_stats = ppo_policy_loss(
                    logprobs,
                    old_logprobs[chunk],
                    experience.advantages[chunk],
                    mask,
                    config.clip,
                )
                with self.accelerator.autocast():
                    critic_out = self.critic(seq, seq_mask)[..., None]
                values = response_logits(critic_out, p)[..., 0]
                value_loss, value_stats = ppo_value_loss(
                    values,
                    experience.values[chunk],
                    experience.returns[chunk],
                    mask,
                    config.value_clip,
                )
                loss = (
                    policy_loss
                    + config.value_coef * value_loss
                    + entropy_bonus_loss(entropy, mask, config.entropy_coef)
                )
                self.accelerator.backward(loss / divisors[index])
                if (index + 1) % config.grad_accum == 0 or index == len(chunks) - 1:
                    optimizer_step(self.optimizer, self.accelerator, config.grad_clip)
                record = {
                    **{k: v.item() for k, v in policy_stats.items()},
                    **{k: v.item() for k, v in value_stats.items()},
                    "policy_loss": policy_loss.item(),
                    "value_loss": value_loss.item(),
                    "entropy": masked_mean(entropy.detach(), mask).item(),
                }
                if epoch == 0 and not stats:
                    record["first_ratio_max_dev"] = (
                        ((logprobs.detach() - old_logprobs[chunk]).exp() - 1).abs().max().item()
                    )
                for key, value in record.items():
                    stats.setdefault(key, []).append(value)
        means = {key: sum(values) / len(values) for key, values in stats.items()}
        return self._mean_over_processes(means)

    def _mean_over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        """What is logged, and the KL the adaptive controller sees, describe the whole batch."""
        return mean_over_processes(metrics, self.accelerator)

    # ----------------------------------------------------------------------------- checkpoints

    def trainable_state(self) -> dict[str, Tensor]:
        """The trained tensors a saved run holds: the actor's and the critic's."""
        return trainable_tensors(
            {
                "policy": (self.policy, self.actor_params),
                "critic": (self.critic, self.critic_params),
            }
        )

    def generators(self) -> dict[str, torch.Generator]:
        return {"generator": self.generator, "shuffle": self.shuffle_generator}

    def save(self, directory: str | Path) -> None:
        """Everything needed to continue exactly (`run_state.save_rl_state`): trained adapters
        (or the full policy), the critic's adapter and head, optimizer, KL controller,
        iteration and every process's RNG states. A collective: call on every rank."""
        state = {
            "optimizer": self.optimizer.state_dict(),
            "kl": self.kl_controller.state_dict(),
            "iteration": self.iteration,
            "rewards": self.engine.rewards.setup(),
        }
        self.run.save(directory, self.config, self.trainable_state(), state, self.generators())

    def load(self, directory: str | Path) -> None:
        """Restore a `save` directory into a trainer built the same way (same base policy,
        reward sources, config and number of processes). Metric lines logged after the saved
        iteration are dropped from ppo_metrics.jsonl, so none appears twice."""
        state = self.run.load(directory, self.config, self.trainable_state(), self.generators())
        self.engine.rewards.check_setup(state.get("rewards"), directory)
        self.optimizer.load_state_dict(shard_optimizer_state(self.optimizer, state["optimizer"]))
        self.kl_controller.load_state_dict(state["kl"])
        self.iteration = int(state["iteration"])

    def step(self) -> dict[str, Any]:
        """One PPO iteration on the next rollout_batch_size prompts."""
        config = self.config
        world = self.accelerator.num_processes
        first = (
            self.iteration * world + self.accelerator.process_index
        ) * config.rollout_batch_size
        prompts = [
            self.prompts[i] for i in self.prompt_schedule.items(first, config.rollout_batch_size)
        ]
        rollout, metrics, order = self.rollout(prompts)
        metrics.update(self.learn(rollout, order))
        # step 6. adapt the KL coefficient to the KL measured on this rollout, averaged over
        # processes (rollout() already reduced it), so every rank keeps the same coefficient
        self.kl_controller.update(metrics["kl_ref"], config.rollout_batch_size * world)
        self.iteration += 1
        metrics["iteration"] = self.iteration
        self.shaping.check(metrics)
        self.history.append(metrics)
        self.run.append(METRICS_NAME, metrics)
        return metrics

    def train(
        self,
        num_iterations: int,
        time_limit_s: float = 0.0,
        checkpoint_every: int = 0,
        checkpoint_dir: str | Path | None = None,
    ) -> list[dict[str, Any]]:
        """`num_iterations` MORE iterations; see `online.run_iterations`."""
        return run_iterations(
            self, num_iterations, time_limit_s, checkpoint_every, checkpoint_dir, desc="ppo"
        )

    def claim_run(self) -> None:
        """A fresh run never appends to another run's ppo_metrics.jsonl (refused unless
        overwrite=True, which deletes it); a resumed one (`load`) continues its own."""
        self.run.claim()


def normalized_head(reward_model: RewardModel) -> nn.Linear:
    """A copy of the reward model's scalar head that outputs the NORMALISED score, (w.h + b -
    mean) / std, so a critic initialised from it starts out predicting the scores PPO's rewards
    are made of (the reward is read with normalized=True)."""
    head = copy.deepcopy(reward_model.head)
    with torch.no_grad():
        std = reward_model.score_std.to(head.weight.dtype)
        mean = reward_model.score_mean.to(head.weight.dtype)
        head.weight.div_(std)
        head.bias.sub_(mean).div_(std)
    return head
