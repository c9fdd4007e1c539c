"""The rollout engine every online trainer shares (PPO, GRPO, RLOO, REINFORCE++).

For a batch of prompts it
    1. samples `group_size` responses per prompt in one batched, left-padded, KV-cached
       generation (eval mode, unfiltered sampling at the trainer's temperature), truncated after
       each response's first eos;
    2. scores them with any mix of a reward model and weighted Python reward functions; a
       response that never emitted eos gets `no_eos_penalty` instead of its score (checklist 6);
    3. computes the old and reference log-probs once, without gradients, from a full forward at
       the sampling temperature, in the minibatches the first epoch will use, so the first
       minibatch's importance ratio is exactly 1 (checklist 3 and 4); or takes the old ones
       from the sampler, which drew each token from that same distribution (GRPO's default in
       float32: one forward less, and a first ratio of 1 within float rounding).

A reward function is called as `fn(prompts, responses, **columns)`: lists of b strings, and one
list of b values per extra field of the prompts' JSONL rows (None where a row lacks it), the way
TRL passes dataset columns. A function for text prompts may take just (prompts, responses).

Shapes: b responses, p padded prompt tokens, n response tokens, k reward sources.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from ..data.preferences import encode_reward_rows
from ..data.prompts import PromptRecord
from ..generation import generate
from ..losses.logprobs import TokenStats
from ..model.palm import PaLM
from ..model.reward import RewardModel
from ..tokenizers.base import Tokenizer, encode_prompt, stop_ids
from ..training.fsdp import gathered

RewardFn = Callable[..., Sequence[float]]


@dataclass(frozen=True)
class RewardSources:
    """What scores a response: a reward model and/or weighted reward functions. The score is
    sum_i weight_i * source_i; each source's raw value is kept too, for the metrics."""

    reward_model: RewardModel | None = None
    reward_model_weight: float = 1.0
    functions: tuple[tuple[str, RewardFn, float], ...] = field(default_factory=tuple)
    """(name, function, weight) triples."""

    def __post_init__(self) -> None:
        if self.reward_model is None and not self.functions:
            raise ValueError("give a reward model, at least one reward function, or both")
        if not math.isfinite(self.reward_model_weight):
            raise ValueError(f"the reward model's weight is {self.reward_model_weight}")
        for name, fn, weight in self.functions:
            if not callable(fn):
                raise TypeError(f"reward function {name!r} is not callable")
            if not math.isfinite(weight):
                raise ValueError(f"reward function {name!r} has weight {weight}")

    @property
    def names(self) -> list[str]:
        """One name per source, in the column order of `Samples.reward_parts`."""
        head = ["reward_model"] if self.reward_model is not None else []
        return head + [name for name, _, _ in self.functions]

    @property
    def weights(self) -> list[float]:
        head = [self.reward_model_weight] if self.reward_model is not None else []
        return head + [weight for _, _, weight in self.functions]

    def setup(self) -> list[list]:
        """[name, weight] per source: what a resumed run must match."""
        return [[name, weight] for name, weight in zip(self.names, self.weights, strict=True)]

    def check_setup(self, saved: list[list] | None, where: object) -> None:
        if saved is not None and saved != self.setup():
            raise ValueError(
                f"{where}: saved with rewards {saved}, resuming with {self.setup()}; exact "
                "resume needs the same rewards and weights"
            )


class Samples(NamedTuple):
    """Sampled, scored responses, before any log-prob pass."""

    sequences: Tensor  # (b, p + n) long: left-padded prompt + response, pad after eos
    sequence_mask: Tensor  # (b, p + n) bool: real tokens
    response_mask: Tensor  # (b, n) bool: real response tokens, through eos
    ended: Tensor  # (b,) bool: the response emitted eos
    reward_parts: Tensor  # (b, k) float32: each source's raw score, `RewardSources.names` order
    scores: Tensor  # (b,) float32: weighted sum, clipped, no_eos_penalty applied
    group: Tensor  # (b,) long: which prompt of the batch each response answers
    prompts: list[str]  # b prompt texts
    responses: list[str]  # b decoded responses (eos not included)
    sampled_logprobs: Tensor  # (b, n) float32: each token's log-prob under the distribution
    # it was drawn from (the cached decode, logits / temperature, unfiltered); 0 where masked

    @property
    def prompt_len(self) -> int:
        return self.sequences.shape[1] - self.response_mask.shape[1]


class Trajectory(NamedTuple):
    """`Samples` plus the log-probs an update needs, computed once without gradients."""

    samples: Samples
    # (b, n) float32 under the sampling policy: from a full forward, or the sampler's own
    old_logprobs: Tensor
    ref_logprobs: Tensor | None  # (b, n) float32 under the reference, None if not needed


def response_logits(logits: Tensor, prompt_len: int) -> Tensor:
    """Logits (b, p + n, v) -> (b, n, v): the ones that predicted each response token."""
    return logits[:, prompt_len - 1 : -1]


def as_records(prompts: Sequence[str | PromptRecord]) -> list[PromptRecord]:
    """Plain strings become records without extra fields."""
    return [p if isinstance(p, PromptRecord) else PromptRecord(p) for p in prompts]


def prompt_columns(records: Sequence[PromptRecord]) -> dict[str, list]:
    """The extra JSONL fields as columns: {field: [value or None per record]}."""
    keys = sorted({key for record in records for key in record.fields})
    return {key: [record.fields.get(key) for record in records] for key in keys}


class RolloutEngine:
    """Samples, scores and log-probs responses for one policy (see the module docstring).

    policy: the PaLM that samples, under `actor_scope` (None: its own weights); reference: the
    frozen model the KL is measured against (the same PaLM when the actor is a LoRA scope: the
    reference is then the base with adapters off). The generator drives sampling on the
    policy's device.
    """

    def __init__(
        self,
        policy: PaLM,
        reference: PaLM,
        actor_scope: str | None,
        tokenizer: Tokenizer,
        rewards: RewardSources,
        generator: torch.Generator,
        max_new_tokens: int,
        max_prompt_tokens: int,
        temperature: float,
        no_eos_penalty: float = float("nan"),
        score_clip: float = 0.0,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
        stop_together: Callable[[bool], bool] | None = None,
    ) -> None:
        reward_model = rewards.reward_model
        if (
            reward_model is not None
            and reward_model.trunk.tokenizer_files != policy.tokenizer_files
        ):
            # The reward model reads the policy's token ids: one vocabulary for both.
            raise ValueError("the reward model reads another tokenizer than the policy")
        self.policy, self.reference, self.actor_scope = policy, reference, actor_scope
        self.tokenizer, self.rewards, self.generator = tokenizer, rewards, generator
        self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
        self.temperature = temperature
        self.no_eos_penalty, self.score_clip = no_eos_penalty, score_clip
        # Every forward pass (sampling, scoring, log-probs) runs under this: the trainer's
        # mixed precision (accelerator.autocast), or nothing.
        self.autocast = autocast
        # A sharded policy (FSDP2) decodes gathered whole, each process to its own rows' eos;
        # given stop_together, it decodes sharded instead, every process stopping at the step
        # where all processes' rows have ended (`generate`).
        self.stop_together = stop_together
        # A response ends at eos or at any other stop id (a chat model's end-of-turn token).
        self.stop_ids = stop_ids(tokenizer)
        self._stops = torch.tensor(self.stop_ids, device=policy.token_emb.weight.device)

    def stopped(self, response_tokens: Tensor) -> Tensor:
        """(b, n) sampled tokens -> (b, n) bool: the token is a stop id (where a response
        ends; `.any(dim=1)` says which responses ended)."""
        return torch.isin(response_tokens, self._stops.to(response_tokens.device))

    # --------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample(self, records: Sequence[str | PromptRecord], group_size: int = 1) -> Samples:
        """group_size responses to each record, grouped: rows g*G .. g*G + G-1 answer record g."""
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        tok = self.tokenizer
        records = [r for r in as_records(records) for _ in range(group_size)]
        prompts = [r.prompt for r in records]
        prompt_rows = [encode_prompt(tok, p, self.max_prompt_tokens) for p in prompts]
        # Sharded (FSDP2): the policy is gathered once for the whole decode, so each process
        # decodes to its own rows' eos with no collective between steps; or, with
        # stop_together, stays sharded and the processes stop together.
        gather = gathered(self.policy) if self.stop_together is None else nullcontext()
        with self.autocast(), gather:
            out = generate(
                self.policy,
                prompt_rows,
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                eos_id=self.stop_ids,
                pad_id=tok.pad_id,
                generator=self.generator,
                lora_scope=self.actor_scope,
                stop_together=self.stop_together,
            )
        mask = out.mask
        stopped = self.stopped(out.tokens)
        ended = stopped.any(dim=1)
        text = mask & ~stopped
        responses = [tok.decode(t[m]) for t, m in zip(out.tokens, text, strict=True)]
        with self.autocast():
            parts, scores = self.score(records, responses, out.tokens, mask, prompt_rows)
        device = self.policy.token_emb.weight.device
        group = torch.arange(len(records) // group_size, device=device).repeat_interleave(
            group_size
        )
        return Samples(
            sequences=torch.cat((out.prompt_tokens, out.tokens), dim=1).to(device),
            sequence_mask=torch.cat((out.prompt_mask, mask), dim=1).to(device),
            response_mask=mask.to(device),
            ended=ended.to(device),
            reward_parts=parts,
            scores=scores,
            group=group,
            prompts=prompts,
            responses=responses,
            sampled_logprobs=out.logprobs.float().masked_fill(~mask, 0).to(device),
        )

    @torch.no_grad()
    def score(
        self,
        records: Sequence[str | PromptRecord],
        responses: list[str],
        response_tokens: Tensor,
        response_mask: Tensor,
        prompt_rows: list[list[int]],
    ) -> tuple[Tensor, Tensor]:
        """(raw scores (b, k), scores (b,)) on the policy's device; `combine` makes the second."""
        device = self.policy.token_emb.weight.device
        records = as_records(records)
        parts = self.score_parts(records, responses, prompt_rows, response_tokens, response_mask)
        ended = self.stopped(response_tokens).any(dim=1)
        parts = parts.to(device)
        return parts, self.combine(parts, ended.to(device))

    @torch.no_grad()
    def score_parts(
        self,
        records: Sequence[PromptRecord],
        responses: list[str],
        prompt_rows: list[list[int]],
        response_tokens: Tensor,
        response_mask: Tensor,
    ) -> Tensor:
        """(b, k) raw scores, one column per reward source."""
        prompts = [r.prompt for r in records]
        columns: list[Tensor] = []
        if self.rewards.reward_model is not None:
            model = self.rewards.reward_model
            tokens, mask = self.reward_rows(prompt_rows, response_tokens, response_mask)
            device = model.head.weight.device
            columns.append(model(tokens.to(device), mask.to(device), normalized=True).float().cpu())
        extra = prompt_columns(records)
        reserved = sorted({"prompts", "responses"} & set(extra))
        if reserved:
            raise ValueError(
                f"prompt rows carry fields named {reserved}, which reward functions receive "
                "as their first two arguments; rename those fields"
            )
        for name, fn, _ in self.rewards.functions:
            try:
                inspect.signature(fn).bind(prompts, responses, **extra)
            except TypeError as error:
                raise TypeError(
                    f"reward function {name!r} cannot be called as fn(prompts, responses"
                    + "".join(f", {key}=..." for key in sorted(extra))
                    + f") ({error}); the prompts' extra fields {sorted(extra)} are passed as "
                    "keyword arguments: accept them, or **kwargs"
                ) from None
            values = [float(v) for v in fn(prompts, responses, **extra)]
            if len(values) != len(prompts):
                raise ValueError(
                    f"reward function {name!r} returned {len(values)} scores for "
                    f"{len(prompts)} responses"
                )
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"reward function {name!r} returned a non-finite score")
            columns.append(torch.tensor(values, dtype=torch.float32))
        return torch.stack(columns, dim=1)  # (b, k)

    def combine(self, parts: Tensor, ended: Tensor) -> Tensor:
        """(b, k) raw scores -> (b,) the score RL optimises: weighted sum, optionally clipped,
        and no_eos_penalty for responses that never ended (unless it is nan)."""
        weights = torch.tensor(self.rewards.weights, dtype=parts.dtype, device=parts.device)
        scores = parts @ weights
        if self.score_clip > 0:
            scores = scores.clamp(-self.score_clip, self.score_clip)
        if not math.isnan(self.no_eos_penalty):
            scores = torch.where(ended, scores, torch.full_like(scores, self.no_eos_penalty))
        return scores

    def reward_rows(
        self, prompt_rows: list[list[int]], response_tokens: Tensor, response_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The reward model's input for sampled responses: tokens and mask (b, m), built by
        `encode_completion` (the layout it was trained on) from the ids the policy saw and
        sampled (prompt rows without their bos, responses without their eos), cut to the
        model's training length."""
        model = self.rewards.reward_model
        if model is None:
            raise ValueError("reward_rows needs a reward model")
        pairs = []
        for prompt, tokens, mask in zip(prompt_rows, response_tokens, response_mask, strict=True):
            if not prompt or prompt[0] != self.tokenizer.bos_id:
                raise ValueError("prompt rows must start with bos (tokenizer.encode_prompt)")
            response = tokens[mask].tolist()
            if response and response[-1] in self.stop_ids:  # the row's own eos goes there
                response = response[:-1]
            pairs.append((prompt[1:], response))
        return encode_reward_rows(self.tokenizer, pairs, model.max_row_len)

    # --------------------------------------------------------------------------- log-probs

    def policy_logprobs(
        self, sequences: Tensor, sequence_mask: Tensor, prompt_len: int, entropy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Log-probs (b, n) of the response tokens under the current policy, with gradients,
        and their entropies (b, n) when asked: from the hidden states in chunks, never from
        (b, p + n, v) logits."""
        stats = self._response_stats(
            self.policy, sequences, sequence_mask, prompt_len, self.actor_scope, entropy
        )
        return stats.logprobs, stats.entropy

    def _response_stats(
        self,
        model: PaLM,
        sequences: Tensor,
        sequence_mask: Tensor,
        prompt_len: int,
        scope: str | None,
        entropy: bool = False,
    ) -> TokenStats:
        # The last position predicts nothing: positions p - 1 .. p + n - 2 predict the response.
        with self.autocast():
            return model(
                sequences[:, :-1],
                mask=sequence_mask[:, :-1],
                lora_scope=scope,
                targets=sequences[:, prompt_len:],
                temperature=self.temperature,
                entropy=entropy,
            )

    @torch.no_grad()
    def logprobs(
        self,
        samples: Samples,
        order: Tensor,
        minibatch_size: int,
        reference: bool = True,
        recompute: bool = True,
    ) -> Trajectory:
        """Old (and, if `reference`, reference) log-probs of every response, computed in the
        chunks of `order` of minibatch_size rows: the first epoch's minibatches. recompute=False
        takes the old log-probs from the sampler instead (`Samples.sampled_logprobs`): the same
        distribution, since sampling is unfiltered at the same temperature, computed by the
        cached decode rather than a full forward, so they agree within float rounding and one
        forward over the batch is saved."""
        p, seq, seq_mask = samples.prompt_len, samples.sequences, samples.sequence_mask
        old = (
            torch.zeros(samples.response_mask.shape, device=seq.device)
            if recompute
            else samples.sampled_logprobs
        )
        ref = torch.zeros_like(old) if reference else None
        for chunk in order.split(minibatch_size):
            if recompute:
                old[chunk] = self.policy_logprobs(seq[chunk], seq_mask[chunk], p)[0]
            if ref is not None:
                stats = self._response_stats(self.reference, seq[chunk], seq_mask[chunk], p, None)
                ref[chunk] = stats.logprobs
        return Trajectory(samples, old, ref)


def _pad_to(x: Tensor, width: int, fill: int | bool, left: bool) -> Tensor:
    missing = width - x.shape[1]
    if missing == 0:
        return x
    pad = torch.full((x.shape[0], missing), fill, dtype=x.dtype, device=x.device)
    return torch.cat((pad, x) if left else (x, pad), dim=1)


def concat_samples(parts: Sequence[Samples], pad_id: int) -> Samples:
    """Several `sample` batches as one: prompts re-padded on the left, responses on the right,
    group ids renumbered so groups stay distinct."""
    if not parts:
        raise ValueError("nothing to concatenate")
    p = max(s.prompt_len for s in parts)
    n = max(s.response_mask.shape[1] for s in parts)
    sequences, masks, response_masks, groups, offset = [], [], [], [], 0
    for s in parts:
        q = s.prompt_len
        sequences.append(
            torch.cat(
                (
                    _pad_to(s.sequences[:, :q], p, pad_id, left=True),
                    _pad_to(s.sequences[:, q:], n, pad_id, left=False),
                ),
                dim=1,
            )
        )
        masks.append(
            torch.cat(
                (
                    _pad_to(s.sequence_mask[:, :q], p, False, left=True),
                    _pad_to(s.sequence_mask[:, q:], n, False, left=False),
                ),
                dim=1,
            )
        )
        response_masks.append(_pad_to(s.response_mask, n, False, left=False))
        groups.append(s.group + offset)
        offset += int(s.group.max()) + 1 if s.group.numel() else 0
    return Samples(
        torch.cat(sequences),
        torch.cat(masks),
        torch.cat(response_masks),
        torch.cat([s.ended for s in parts]),
        torch.cat([s.reward_parts for s in parts]),
        torch.cat([s.scores for s in parts]),
        torch.cat(groups),
        [x for s in parts for x in s.prompts],
        [x for s in parts for x in s.responses],
        torch.cat([_pad_to(s.sampled_logprobs, n, 0, left=False) for s in parts]),
    )


def select_groups(samples: Samples, groups: Sequence[int]) -> Samples:
    """The rows of the given groups, in that order, renumbered 0..len(groups)-1."""
    rows = [torch.nonzero(samples.group == g).flatten() for g in groups]
    index = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    index = index.to(samples.sequences.device)
    new_group = torch.cat(
        [torch.full((len(r),), i, dtype=torch.long) for i, r in enumerate(rows)]
    ).to(samples.group.device)
    picked = index.tolist()
    return Samples(
        samples.sequences[index],
        samples.sequence_mask[index],
        samples.response_mask[index],
        samples.ended[index],
        samples.reward_parts[index],
        samples.scores[index],
        new_group,
        [samples.prompts[i] for i in picked],
        [samples.responses[i] for i in picked],
        samples.sampled_logprobs[index],
    )
