"""Critic-free online RL on one frozen base: GRPO, Dr. GRPO, DAPO, GSPO, RLOO and REINFORCE++.

No value model: each prompt gets G responses and the advantages come from the group (or the
whole batch). The policy trains an "actor" LoRA scope (or every weight with full_finetune); the
reference is the base with adapters off. `GRPOConfig.estimator` picks the advantages,
`loss_type` the aggregation (formulas in `losses.grpo` and the README).

One iteration (`GRPOTrainer.step`):
    step 1. take the next prompts_per_iteration prompts on each process, sample group_size
            responses to each and score them (`RolloutEngine`: KV cache, eval mode, eos
            truncation, reward model and/or weighted reward functions, no_eos_penalty), then
            add DAPO's overlong penalty if overlong_buffer > 0
    step 2. dynamic sampling (optional): drop groups whose scores are all equal and sample
            more prompts until every process has prompts_per_iteration informative groups;
            the processes decide together, so they run the same number of rounds
    step 3. once, without gradients, in the first epoch's minibatches: reference log-probs
            unless kl_coef == 0 (then no reference pass runs); the old log-probs are the
            sampler's (a forward pass only with recompute_old_logprobs, or under bf16)
    step 4. advantages over the whole batch across processes (gathered: batch std, global
            whitening and the token normaliser all see every process's rows)
    step 5. epochs over shuffled minibatches: clipped surrogate with clip / clip_high (+ the k3
            KL term for grpo), aggregated by loss_type; gradients averaged over processes
    step 6. metrics over every process's rows: each reward source (reward/<name>) first, then
            the score optimised; a warning, once, if shaping changed more than a fifth of the
            scores (`online.ShapingAlarm`); a few completions to grpo_samples.jsonl

KL: grpo puts beta * k3(policy, reference) in the loss (DeepSeekMath eq. 3); rloo subtracts
beta * the response's summed log-ratio from its score (Ahmadian et al. 2024); reinforce_pp and
reinforce_pp_baseline subtract beta * the log-ratio at every token (Hu et al. 2025).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from ..config import LoRAConfig
from ..data.prompts import PromptRecord
from ..losses.grpo import (
    aggregate_loss,
    clipped_surrogate,
    discounted_returns,
    group_advantages,
    informative_groups,
    k3_kl,
    leave_one_out_advantages,
    overlong_penalty,
    sequence_log_ratio,
)
from ..losses.masked import masked_mean, masked_whiten
from ..model.palm import PaLM
from ..model.reward import RewardModel
from ..tokenizers.base import Tokenizer
from ..training.fsdp import shard_optimizer_state
from ..training.step import WindowSchedule
from .config import GRPOConfig
from .online import (
    OnlineRun,
    RewardSpec,
    ShapingAlarm,
    gather_rows,
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
from .rollout import (
    Samples,
    Trajectory,
    as_records,
    concat_samples,
    select_groups,
)
from .run_state import (
    accumulation_divisors,
    mean_over_processes,
    optimizer_step,
    sum_over_processes,
)

METRICS_NAME = "grpo_metrics.jsonl"
SAMPLES_NAME = "grpo_samples.jsonl"


class GRPOTrainer:
    """Critic-free RL (module docstring). `train(num_iterations)` returns per-iteration metrics."""

    def __init__(
        self,
        policy: PaLM,
        tokenizer: Tokenizer,
        prompts: Sequence[str | PromptRecord],
        reward_model: RewardModel | None = None,
        reward_fns: Sequence[RewardSpec] = (),
        config: GRPOConfig | None = None,
        accelerator: Accelerator | None = None,
        out_dir: str | Path | None = None,
        show_progress: bool = True,
        overwrite: bool = False,
        reward_model_weight: float = 1.0,
    ) -> None:
        if not prompts:
            raise ValueError("prompts is empty")
        self.config = config = config or GRPOConfig()
        self.tokenizer, self.prompts = tokenizer, as_records(prompts)
        rewards = reward_sources(reward_model, reward_model_weight, reward_fns)
        self.accelerator = online_accelerator(accelerator, config.mixed_precision)
        self.show_progress = show_progress
        files = [METRICS_NAME, SAMPLES_NAME]
        self.run = OnlineRun("grpo", files, self.accelerator, out_dir, overwrite)
        torch.manual_seed(config.seed)
        place_models([policy, reward_model], config, self.accelerator)
        if reward_model is not None:
            reward_model.eval().requires_grad_(False)
        self.policy = policy
        lora = LoRAConfig(rank=config.lora_rank, alpha=config.lora_alpha)
        actor = setup_actor(policy, config.full_finetune, lora, reward_model)
        policy.set_activation_checkpointing(config.activation_checkpointing)
        self.reference, self.actor_scope, self.actor_params = actor
        models = [policy, self.reference, reward_model]
        set_online_dtypes(models, self.actor_params, config)
        if config.fsdp:
            self.actor_params = shard_online_models(models, policy, actor, self.accelerator)
        self.optimizer = torch.optim.AdamW(self.actor_params, lr=config.lr, weight_decay=0.0)
        self.prompt_schedule = WindowSchedule(len(self.prompts), config.seed)
        self.iteration, self.prompt_cursor = 0, 0
        self.generator, self.shuffle_generator = make_generators(config.seed, self.accelerator)
        self.engine = make_engine(
            policy, actor, tokenizer, rewards, self.generator, config, self.accelerator
        )
        self.shaping = ShapingAlarm("grpo", config, self.accelerator)
        # The sampler's log-probs serve as the old ones in float32 (GRPOConfig docstring).
        self.recompute_old_logprobs = (
            config.recompute_old_logprobs or self.accelerator.mixed_precision != "no"
        )
        self.history: list[dict[str, Any]] = []

    # ----------------------------------------------------------------------------- sampling

    def _next_prompts(self) -> list[PromptRecord]:
        """This process's share of the next world * prompts_per_iteration scheduled prompts."""
        count, world = self.config.prompts_per_iteration, self.accelerator.num_processes
        first = self.prompt_cursor + self.accelerator.process_index * count
        self.prompt_cursor += world * count
        return [self.prompts[i] for i in self.prompt_schedule.items(first, count)]

    def _sample_round(self) -> Samples:
        config = self.config
        samples = self.engine.sample(self._next_prompts(), config.group_size)
        if config.overlong_buffer:
            lengths = samples.response_mask.sum(dim=1)
            penalty = overlong_penalty(
                lengths, config.max_new_tokens, config.overlong_buffer, config.overlong_penalty
            )
            samples = samples._replace(scores=samples.scores + penalty)
        return samples

    def collect(self) -> tuple[Samples, dict[str, float]]:
        """Steps 1-2: this process's batch of prompts_per_iteration groups, and its counts."""
        config, wanted = self.config, self.config.prompts_per_iteration
        rounds = [self._sample_round()]
        have = 0  # informative groups so far; a round's groups are its own, so counts add up
        while config.dynamic_sampling and len(rounds) < config.max_sampling_rounds:
            have += int(informative_groups(rounds[-1].scores, rounds[-1].group).sum())
            # Every process must run the same number of rounds: the one with the fewest
            # informative groups decides.
            if self._min_over_processes(have) >= wanted:
                break
            rounds.append(self._sample_round())
        pooled = concat_samples(rounds, self.tokenizer.pad_id)
        if not config.dynamic_sampling:
            return pooled, {"groups_uninformative": self._uninformative_share(pooled)}
        keep = informative_groups(pooled.scores, pooled.group).tolist()
        kept = [g for g, informative in enumerate(keep) if informative]
        dropped = [g for g, informative in enumerate(keep) if not informative]
        chosen = (kept + dropped)[:wanted]  # topped up with dropped groups when still short
        metrics = {
            "groups_dropped": len(dropped) / len(keep),
            "groups_topped_up": float(max(0, wanted - len(kept))),
            "sampling_rounds": float(len(rounds)),
        }
        return select_groups(pooled, chosen), metrics

    def _min_over_processes(self, value: int) -> int:
        if self.accelerator.num_processes == 1:
            return value
        values = self.accelerator.gather(torch.tensor([value], device=self.accelerator.device))
        return int(values.min())

    @staticmethod
    def _uninformative_share(samples: Samples) -> float:
        keep = informative_groups(samples.scores, samples.group)
        return 1.0 - keep.float().mean().item()

    # ----------------------------------------------------------------------------- advantages

    def advantages(self, trajectory: Trajectory, loss_mask: Tensor) -> Tensor:
        """Step 4: (b, n) advantages for this process's rows, computed over the global batch."""
        config, samples = self.config, trajectory.samples
        mask = samples.response_mask
        b, rank = len(samples.prompts), self.accelerator.process_index
        kl = (
            (trajectory.old_logprobs - trajectory.ref_logprobs).masked_fill(~mask, 0)
            if trajectory.ref_logprobs is not None
            else torch.zeros_like(trajectory.old_logprobs)
        )
        scores = samples.scores
        if config.estimator in ("grpo", "rloo"):
            if config.estimator == "rloo":
                scores = scores - config.kl_coef * kl.sum(dim=1)
            # Groups are numbered per process; offset them so they stay distinct when gathered.
            group = samples.group + rank * (int(samples.group.max()) + 1)
            all_scores = gather_rows(scores, self.accelerator)
            all_groups = gather_rows(group, self.accelerator)
            if config.estimator == "grpo":
                sequence = group_advantages(all_scores, all_groups, config.scale_rewards)
            else:
                sequence = leave_one_out_advantages(all_scores, all_groups)
            sequence = sequence[rank * b : (rank + 1) * b]
            return sequence[:, None].expand_as(kl).masked_fill(~mask, 0)
        if config.estimator == "reinforce_pp_baseline":
            scores = group_advantages(scores, samples.group, "none")
        returns = discounted_returns(scores, kl, mask, config.kl_coef, config.gamma)
        # Global whitening over every loss token of every process (Hu et al. 2025, eq. 6).
        count = sum_over_processes(loss_mask.sum().float(), self.accelerator)
        total = sum_over_processes(returns.masked_fill(~loss_mask, 0).sum(), self.accelerator)
        mean = total / count.clamp(min=1)
        squares = ((returns - mean) ** 2).masked_fill(~loss_mask, 0).sum()
        var = sum_over_processes(squares, self.accelerator) / (count - 1).clamp(min=1)
        return masked_whiten(returns, mask, stats=(mean, var))

    # ----------------------------------------------------------------------------- update

    def learn(
        self, trajectory: Trajectory, advantages: Tensor, loss_mask: Tensor, first_order: Tensor
    ) -> dict[str, float]:
        """Step 5: epochs of clipped-surrogate updates over shuffled minibatches."""
        config, samples = self.config, trajectory.samples
        p, b = samples.prompt_len, len(samples.prompts)
        world = self.accelerator.num_processes
        stats: dict[str, list[float]] = {}
        for epoch in range(config.epochs):
            order = (
                first_order if epoch == 0 else torch.randperm(b, generator=self.shuffle_generator)
            )
            chunks = order.split(config.minibatch_size)
            divisors = accumulation_divisors(len(chunks), config.grad_accum)
            step_tokens = (
                self._step_token_counts(chunks, loss_mask) if config.loss_type == "dapo" else None
            )
            for index, chunk in enumerate(chunks):
                seq, seq_mask = samples.sequences[chunk], samples.sequence_mask[chunk]
                mask, old = loss_mask[chunk], trajectory.old_logprobs[chunk]
                logprobs, _ = self.engine.policy_logprobs(seq, seq_mask, p)
                if config.loss_type == "gspo":
                    log_ratio = sequence_log_ratio(logprobs, old, mask)
                else:
                    log_ratio = logprobs - old
                per_token, clip_stats = clipped_surrogate(
                    log_ratio, advantages[chunk], mask, config.clip, config.clip_high
                )
                record = {k: v.item() for k, v in clip_stats.items()}
                if config.estimator == "grpo" and trajectory.ref_logprobs is not None:
                    kl = k3_kl(logprobs, trajectory.ref_logprobs[chunk], mask)
                    per_token = per_token + config.kl_coef * kl
                    record["kl_k3"] = masked_mean(kl.detach(), mask).item()
                if step_tokens is not None:
                    # Gradients are averaged over processes, so scale by world: the step then
                    # takes sum(all tokens) / (all tokens of the step on every process).
                    loss = aggregate_loss(
                        per_token, mask, "dapo", num_tokens=step_tokens[index] / world
                    )
                else:
                    loss = (
                        aggregate_loss(per_token, mask, config.loss_type, config.max_new_tokens)
                        / divisors[index]
                    )
                self.accelerator.backward(loss)
                if (index + 1) % config.grad_accum == 0 or index == len(chunks) - 1:
                    optimizer_step(self.optimizer, self.accelerator, config.grad_clip)
                record["policy_loss"] = loss.item() * (
                    divisors[index] if step_tokens is None else 1
                )
                if epoch == 0 and not stats:
                    ratio = (logprobs.detach() - old).exp()
                    record["first_ratio_max_dev"] = (
                        (ratio - 1).masked_fill(~mask, 0).abs().max().item()
                    )
                for key, value in record.items():
                    stats.setdefault(key, []).append(value)
        return {key: sum(values) / len(values) for key, values in stats.items()}

    def _step_token_counts(self, chunks: Sequence[Tensor], loss_mask: Tensor) -> list[Tensor]:
        """For DAPO: per minibatch, the loss tokens of its whole optimizer step on every process."""
        accum, counts = self.config.grad_accum, []
        for start in range(0, len(chunks), accum):
            group = chunks[start : start + accum]
            local = sum(loss_mask[c].sum() for c in group).float()
            total = sum_over_processes(local, self.accelerator).clamp(min=1)
            counts.extend([total] * len(group))
        return counts

    # ----------------------------------------------------------------------------- one iteration

    def step(self) -> dict[str, Any]:
        """One iteration (module docstring). Returns its metrics, the same on every process."""
        config = self.config
        self.policy.eval()  # dropout off for sampling and for every log-prob (checklist 5)
        # steps 1-2. sample, score, dynamic sampling
        samples, sampling = self.collect()
        # step 3. old and reference log-probs, in the first epoch's minibatches
        b = len(samples.prompts)
        order = torch.randperm(b, generator=self.shuffle_generator)
        trajectory = self.engine.logprobs(
            samples,
            order,
            config.minibatch_size,
            reference=config.kl_coef > 0,
            recompute=self.recompute_old_logprobs,
        )
        loss_mask = samples.response_mask
        if config.mask_truncated:
            loss_mask = loss_mask & samples.ended[:, None]
        # step 4. advantages
        advantages = self.advantages(trajectory, loss_mask)
        # step 5. update
        metrics = {**sampling, **self._rollout_metrics(trajectory)}
        metrics.update(self.learn(trajectory, advantages, loss_mask, order))
        # step 6. metrics (each reward source first, then the shaped score) and samples
        metrics = {
            **score_metrics(samples, self.engine.rewards, self.accelerator),
            **mean_over_processes(metrics, self.accelerator),
        }
        self.iteration += 1
        metrics["iteration"] = self.iteration
        self.shaping.check(metrics)
        self.history.append(metrics)
        self.run.append(METRICS_NAME, metrics)
        for i in range(min(config.log_samples, b)):
            row = {
                "iteration": self.iteration,
                "prompt": samples.prompts[i],
                "response": samples.responses[i],
                "score": samples.scores[i].item(),
            }
            self.run.append(SAMPLES_NAME, row)
        return metrics

    def _rollout_metrics(self, trajectory: Trajectory) -> dict[str, float]:
        samples = trajectory.samples
        mask = samples.response_mask
        out = {
            "response_len": mask.sum(dim=1).float().mean().item(),
            "eos_rate": samples.ended.float().mean().item(),
            "kl_coef": self.config.kl_coef,
        }
        if trajectory.ref_logprobs is not None:
            kl = (trajectory.old_logprobs - trajectory.ref_logprobs).masked_fill(~mask, 0)
            out["kl_ref"] = kl.sum(dim=1).mean().item()
        else:
            out["kl_ref"] = 0.0
        return out

    # ----------------------------------------------------------------------------- checkpoints

    def claim_run(self) -> None:
        """A fresh run never appends to another run's metrics (refused unless overwrite=True,
        which deletes them); a resumed one (`load`) continues its own."""
        self.run.claim()

    def trainable_state(self) -> dict[str, Tensor]:
        """The trained tensors a saved run holds: the actor's adapter (or every weight)."""
        return trainable_tensors({"policy": (self.policy, self.actor_params)})

    def generators(self) -> dict[str, torch.Generator]:
        return {"generator": self.generator, "shuffle": self.shuffle_generator}

    def save(self, directory: str | Path) -> None:
        """Adapters (or the full policy), optimizer, counters and every process's RNG states
        (`run_state.save_rl_state`). A collective: call on every rank."""
        state = {
            "optimizer": self.optimizer.state_dict(),
            "iteration": self.iteration,
            "prompt_cursor": self.prompt_cursor,
            "rewards": self.engine.rewards.setup(),
        }
        self.run.save(directory, self.config, self.trainable_state(), state, self.generators())

    def load(self, directory: str | Path) -> None:
        """Restore a `save` directory into a trainer built the same way; metric and sample
        lines logged after the saved iteration are dropped, so none appears twice."""
        state = self.run.load(directory, self.config, self.trainable_state(), self.generators())
        self.engine.rewards.check_setup(state.get("rewards"), directory)
        self.optimizer.load_state_dict(shard_optimizer_state(self.optimizer, state["optimizer"]))
        self.iteration = int(state["iteration"])
        self.prompt_cursor = int(state["prompt_cursor"])

    def train(
        self,
        num_iterations: int,
        time_limit_s: float = 0.0,
        checkpoint_every: int = 0,
        checkpoint_dir: str | Path | None = None,
    ) -> list[dict[str, Any]]:
        """`num_iterations` MORE iterations; see `online.run_iterations`."""
        return run_iterations(
            self, num_iterations, time_limit_s, checkpoint_every, checkpoint_dir, desc="grpo"
        )
