"""PPO fine-tuning of a PaLM policy against a reward model or a Python reward function.

Models (memory-light, RLHF checklist items 9 and 16):
- policy = the pretrained PaLM, base frozen, plus an "actor" LoRA scope (or a full fine-tune);
- reference = the same PaLM with adapters off: no copy of the weights (with full_finetune, a
  frozen copy);
- critic = `ValueModel`: a trunk with its own "critic" LoRA scope and a value head. With a reward
  model it starts as a copy of the reward model (so initial values are its scores); with a
  reward function it shares the policy's frozen base. The scopes never share gradients.

One iteration (`PPOTrainer.step`):
    step 1. sample prompts and generate responses with the KV cache (eval mode, dropout off)
    step 2. score the responses; a response without eos gets no_eos_penalty instead
    step 3. once, without gradients: old log-probs, reference log-probs and values, all from a
            full forward at the sampling temperature, in the minibatches of the first epoch
            (so the first minibatch's PPO ratio is exactly 1)
    step 4. per-token KL penalty + score at the last real token, GAE, whitened advantages
    step 5. PPO epochs over shuffled minibatches: clipped policy + value losses
    step 6. update the KL controller and return the iteration's metrics
Losses average over valid tokens of a minibatch (rl_math).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoint import (
    WEIGHTS_NAME,
    flatten_state,
    load_safetensors,
    read_json,
    save_model_dir,
    unflatten_state,
)
from .config import LoRAConfig, PPOConfig
from .generation import generate
from .lora import lora_parameters, merge_lora
from .palm import PaLM
from .reward import RewardModel
from .rl_math import (
    AdaptiveKLController,
    FixedKLController,
    entropy_bonus_loss,
    entropy_from_logits,
    gae_advantages,
    kl_penalty_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from .tokenizer import Tokenizer, pad_sequences
from .train_lm import WindowSchedule, append_jsonl

ACTOR, CRITIC = "actor", "critic"
RewardFn = Callable[[list[str], list[str]], Sequence[float]]


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


class Rollout(NamedTuple):
    """One batch of experience; b responses, p prompt tokens, n response tokens."""

    sequences: Tensor  # (b, p + n) long: left-padded prompt + response
    sequence_mask: Tensor  # (b, p + n) bool
    response_mask: Tensor  # (b, n) bool: real response tokens (through eos)
    old_logprobs: Tensor  # (b, n) under the sampling policy, from a full forward
    ref_logprobs: Tensor  # (b, n) under the reference policy
    values: Tensor  # (b, n) critic values before each response token
    advantages: Tensor  # (b, n) whitened GAE advantages
    returns: Tensor  # (b, n) advantages + values, before whitening
    scores: Tensor  # (b,) the scores that entered the rewards
    kl: Tensor  # (b, n) per-token log-ratio to the reference


def response_logits(logits: Tensor, prompt_len: int) -> Tensor:
    """Logits (b, p + n, v) -> (b, n, v): the ones that predicted each response token."""
    return logits[:, prompt_len - 1 : -1]


class PPOTrainer:
    """PPO on one frozen base. `train(num_iterations)` returns per-iteration metric dicts."""

    def __init__(
        self,
        policy: PaLM,
        tokenizer: Tokenizer,
        prompts: Sequence[str],
        reward_model: RewardModel | None = None,
        reward_fn: RewardFn | None = None,
        config: PPOConfig | None = None,
        accelerator: Accelerator | None = None,
        out_dir: str | Path | None = None,
        show_progress: bool = True,
    ) -> None:
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("give exactly one of reward_model or reward_fn")
        if not prompts:
            raise ValueError("prompts is empty")
        self.config = config = config or PPOConfig()
        self.tokenizer, self.prompts = tokenizer, list(prompts)
        self.reward_model, self.reward_fn = reward_model, reward_fn
        self.accelerator = accelerator or Accelerator()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.show_progress = show_progress
        torch.manual_seed(config.seed)
        lora = LoRAConfig(rank=config.lora_rank, alpha=config.lora_alpha)

        # Policy and reference: one base; the reference is the base with adapters off.
        self.policy = policy
        if config.full_finetune:
            self.reference = copy.deepcopy(policy).requires_grad_(False)
            policy.requires_grad_(True)
            actor_params = list(policy.parameters())
            self.actor_scope = None
        else:
            actor_params = policy.add_lora(ACTOR, lora)  # freezes the base
            self.reference = policy
            self.actor_scope = ACTOR
        # Critic: from the reward model where there is one, else on the policy's frozen base.
        if reward_model is not None:
            trunk = copy.deepcopy(reward_model.trunk)
            for scope in list(trunk.lora_configs):
                merge_lora(trunk, scope)
            head = copy.deepcopy(reward_model.head)
            reward_model.eval().requires_grad_(False)
        else:
            trunk = copy.deepcopy(policy) if config.full_finetune else policy
            head = nn.Linear(policy.config.dim, 1)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        if trunk is not policy:
            trunk.requires_grad_(False)
        self.critic = ValueModel(trunk, head, lora)
        critic_params = self.critic.trainable_parameters()
        # Only the actor's and the critic's own parameters train; a shared base stays frozen.
        for param in [*actor_params, *critic_params]:
            param.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": actor_params, "lr": config.lr},
                {"params": critic_params, "lr": config.critic_lr},
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
        self.generator = torch.Generator().manual_seed(config.seed + self.accelerator.process_index)
        self.history: list[dict[str, Any]] = []

    # ----------------------------------------------------------------------------- rollout

    @torch.no_grad()
    def score(
        self,
        prompts: list[str],
        responses: list[str],
        response_tokens: Tensor,
        response_mask: Tensor,
        prompt_tokens: list[list[int]],
    ) -> Tensor:
        """Scores (b,) of prompt + response; responses without eos get no_eos_penalty."""
        config = self.config
        if self.reward_fn is not None:
            raw = torch.tensor([float(s) for s in self.reward_fn(prompts, responses)])
            if raw.shape != (len(prompts),):
                raise ValueError(
                    f"reward_fn returned {raw.numel()} scores for {len(prompts)} responses"
                )
        else:
            limit = self.reward_model.trunk.config.max_seq_len
            rows = []
            for prompt, tokens, mask in zip(
                prompt_tokens, response_tokens, response_mask, strict=True
            ):
                row = [self.tokenizer.bos_id, *prompt, *tokens[mask].tolist()]
                rows.append(row[-limit:])
            tokens, mask = pad_sequences(rows, self.tokenizer.pad_id, "right")
            device = self.reward_model.head.weight.device
            raw = self.reward_model(tokens.to(device), mask.to(device), normalized=True).cpu()
        raw = raw.float()
        if config.score_clip > 0:
            raw = raw.clamp(-config.score_clip, config.score_clip)
        ended = (response_tokens == self.tokenizer.eos_id).any(dim=1)
        if not math.isnan(config.no_eos_penalty):
            raw = torch.where(ended, raw, torch.full_like(raw, config.no_eos_penalty))
        return raw

    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> tuple[Rollout, dict[str, float], Tensor]:
        """Steps 1-4 of an iteration. Returns the rollout, its metrics and the epoch-0 order."""
        config, tok = self.config, self.tokenizer
        device = self.policy.token_emb.weight.device
        self.policy.eval()
        self.critic.eval()
        # step 1. generate (left-padded prompts, KV cache, sampling unfiltered)
        prompt_tokens = [tok.encode(p, add_bos=True)[-config.max_prompt_tokens :] for p in prompts]
        out = generate(
            self.policy,
            prompt_tokens,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
            generator=self.generator,
            lora_scope=self.actor_scope,
        )
        response_mask = out.mask
        responses = [tok.decode(t[m]) for t, m in zip(out.tokens, response_mask, strict=True)]
        # step 2. score
        scores = self.score(prompts, responses, out.tokens, response_mask, prompt_tokens)
        # step 3. old/reference log-probs and values, in epoch 0's minibatches
        sequences = torch.cat((out.prompt_tokens, out.tokens), dim=1).to(device)
        sequence_mask = torch.cat((out.prompt_mask, response_mask), dim=1).to(device)
        p, b = out.prompt_tokens.shape[1], len(prompts)
        order = torch.randperm(b, generator=self.generator)
        old_logprobs = torch.zeros(response_mask.shape, device=device)
        ref_logprobs, values = torch.zeros_like(old_logprobs), torch.zeros_like(old_logprobs)
        for chunk in order.split(config.minibatch_size):
            seq, seq_mask = sequences[chunk], sequence_mask[chunk]
            old_logprobs[chunk] = self._policy_logprobs(seq, seq_mask, p, self.actor_scope)[0]
            ref_logprobs[chunk] = logprobs_from_logits(
                response_logits(self.reference(seq, mask=seq_mask), p),
                seq[:, p:],
                config.temperature,
            )
            values[chunk] = response_logits(self.critic(seq, seq_mask)[..., None], p)[..., 0]
        # step 4. rewards, advantages
        mask = response_mask.to(device)
        rewards, kl = kl_penalty_rewards(
            old_logprobs, ref_logprobs, mask, scores.to(device), self.kl_controller.value
        )
        advantages, returns = gae_advantages(values, rewards, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        rollout = Rollout(
            sequences,
            sequence_mask,
            mask,
            old_logprobs,
            ref_logprobs,
            values,
            advantages,
            returns,
            scores.to(device),
            kl,
        )
        lengths = mask.sum(dim=1).float()
        metrics = {
            "score_mean": scores.mean().item(),
            "kl_ref": kl.sum(dim=1).mean().item(),
            "response_len": lengths.mean().item(),
            "eos_rate": (out.tokens == tok.eos_id).any(dim=1).float().mean().item(),
            "kl_coef": self.kl_controller.value,
        }
        return rollout, metrics, order

    def _policy_logprobs(
        self, seq: Tensor, seq_mask: Tensor, prompt_len: int, scope: str | None
    ) -> tuple[Tensor, Tensor]:
        logits = response_logits(self.policy(seq, mask=seq_mask, lora_scope=scope), prompt_len)
        return (
            logprobs_from_logits(logits, seq[:, prompt_len:], self.config.temperature),
            entropy_from_logits(logits, self.config.temperature),
        )

    # ----------------------------------------------------------------------------- learning

    def learn(self, rollout: Rollout, first_order: Tensor) -> dict[str, float]:
        """Step 5: PPO epochs over shuffled minibatches. Policy and critic stay in eval mode:
        dropout is off everywhere during RL (checklist 5)."""
        config = self.config
        p = rollout.sequences.shape[1] - rollout.response_mask.shape[1]
        b = rollout.sequences.shape[0]
        stats: dict[str, list[float]] = {}
        for epoch in range(config.ppo_epochs):
            order = first_order if epoch == 0 else torch.randperm(b, generator=self.generator)
            chunks = order.split(config.minibatch_size)
            for index, chunk in enumerate(chunks):
                seq, seq_mask = rollout.sequences[chunk], rollout.sequence_mask[chunk]
                mask = rollout.response_mask[chunk]
                logprobs, entropy = self._policy_logprobs(seq, seq_mask, p, self.actor_scope)
                policy_loss, policy_stats = ppo_policy_loss(
                    logprobs,
                    rollout.old_logprobs[chunk],
                    rollout.advantages[chunk],
                    mask,
                    config.clip,
                )
                values = response_logits(self.critic(seq, seq_mask)[..., None], p)[..., 0]
                value_loss, value_stats = ppo_value_loss(
                    values, rollout.values[chunk], rollout.returns[chunk], mask, config.value_clip
                )
                loss = (
                    policy_loss
                    + config.value_coef * value_loss
                    + entropy_bonus_loss(entropy, mask, config.entropy_coef)
                )
                # Gradient accumulation: grad_accum minibatches per optimizer step (the last
                # step of an epoch may take fewer).
                self.accelerator.backward(loss / config.grad_accum)
                if (index + 1) % config.grad_accum == 0 or index == len(chunks) - 1:
                    self._average_gradients()
                    if config.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(self._trainable(), config.grad_clip)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                record = {
                    **{k: v.item() for k, v in policy_stats.items()},
                    **{k: v.item() for k, v in value_stats.items()},
                    "policy_loss": policy_loss.item(),
                    "value_loss": value_loss.item(),
                    "entropy": masked_mean(entropy.detach(), mask).item(),
                }
                if epoch == 0 and not stats:
                    record["first_ratio_max_dev"] = (
                        ((logprobs.detach() - rollout.old_logprobs[chunk]).exp() - 1)
                        .abs()
                        .max()
                        .item()
                    )
                for key, value in record.items():
                    stats.setdefault(key, []).append(value)
        return {key: sum(values) / len(values) for key, values in stats.items()}

    def _trainable(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _average_gradients(self) -> None:
        """Average gradients over processes before every optimizer step, so each rank's actor
        and critic stay identical (the predecessor's adapters drifted apart under DDP). Only
        the adapters and value head train, so an explicit all-reduce of those small tensors
        replaces a DDP wrapper around a model whose scopes are used by turns."""
        if self.accelerator.num_processes == 1:
            return
        for param in self._trainable():
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            param.grad = self.accelerator.reduce(grad, reduction="mean")

    # ----------------------------------------------------------------------------- checkpoints

    def _trainable_state(self) -> dict[str, Tensor]:
        actor, critic = ({id(p) for p in g["params"]} for g in self.optimizer.param_groups)
        state = {f"policy.{n}": p for n, p in self.policy.named_parameters() if id(p) in actor}
        state.update(
            {f"critic.{n}": p for n, p in self.critic.named_parameters() if id(p) in critic}
        )
        return state

    def save(self, directory: str | Path) -> None:
        """Everything needed to continue exactly: trained adapters (or the full policy), the
        critic's adapter and head, optimizer, KL controller, RNG states and iteration. The
        frozen base is not saved: it is the checkpoint the run started from."""
        if self.accelerator.is_main_process:
            tensors, skeleton = flatten_state(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "kl": self.kl_controller.state_dict(),
                    "iteration": self.iteration,
                    "torch_rng": torch.get_rng_state(),
                    "generator": self.generator.get_state(),
                }
            )
            save_model_dir(
                directory,
                self._trainable_state(),
                {"ppo_config.json": asdict(self.config), "ppo_state.json": skeleton},
                {"ppo_state.safetensors": tensors},
            )
        self.accelerator.wait_for_everyone()

    def load(self, directory: str | Path) -> None:
        """Restore a `save` directory into a trainer built the same way (same base policy,
        reward model or function, and config)."""
        directory = Path(directory)
        saved_config = read_json(directory / "ppo_config.json")
        if saved_config != json.loads(json.dumps(asdict(self.config))):
            raise ValueError(f"{directory}: saved with a different PPOConfig: {saved_config}")
        weights = load_safetensors(directory / WEIGHTS_NAME)
        current = self._trainable_state()
        if set(weights) != set(current):
            missing = sorted(set(current) - set(weights))
            extra = sorted(set(weights) - set(current))
            raise ValueError(
                f"{directory}: trainable tensors differ (missing {missing}, unexpected {extra})"
            )
        with torch.no_grad():
            for name, param in current.items():
                param.copy_(weights[name])
        state = unflatten_state(
            read_json(directory / "ppo_state.json"),
            load_safetensors(directory / "ppo_state.safetensors"),
        )
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_controller.load_state_dict(state["kl"])
        self.iteration = int(state["iteration"])
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator"])

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
        # step 6. adapt the KL coefficient to the KL measured on this rollout
        self.kl_controller.update(metrics["kl_ref"], config.rollout_batch_size * world)
        self.iteration += 1
        metrics["iteration"] = self.iteration
        self.history.append(metrics)
        if self.out_dir is not None and self.accelerator.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            append_jsonl(self.out_dir / "ppo_metrics.jsonl", metrics)
        return metrics

    def train(self, num_iterations: int) -> list[dict[str, Any]]:
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
        bar = tqdm(
            range(num_iterations),
            desc="ppo",
            disable=not (self.show_progress and self.accelerator.is_main_process),
        )
        results = []
        for _ in bar:
            metrics = self.step()
            results.append(metrics)
            bar.set_postfix(score=f"{metrics['score_mean']:.3f}", kl=f"{metrics['kl_ref']:.2f}")
        return results
