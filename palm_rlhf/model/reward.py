"""Reward model and its losses (InstructGPT, Ouyang et al. 2022, section 3.5).

A `RewardModel` is a PaLM trunk read at one position by a scalar head. Pooling convention
(RLHF checklist item 18): the score is read from the final hidden state of the LAST real token
of each row, i.e. the position of the last True in the mask. That works for left and right
padding alike, and for prompt + response + [eos] rows it is the eos token, which (causal
attention) has seen the whole prompt and response.

Losses are pure functions: Bradley-Terry pairs, the InstructGPT K-wise ranking loss (eq. 1) and
rating classification / regression for graded feedback (checklist item 19).

einops legend: b batch, n sequence, d model dim, N completions in a flat batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from beartype import beartype
from torch import Tensor, nn

from ..config import LoRAConfig, PaLMConfig, check, check_ints, check_numbers, config_from_dict
from ..storage.checkpoint import (
    WEIGHTS_NAME,
    load_model_dir,
    read_checkpoint_files,
    save_model_dir,
)
from ..storage.safetensors import load_safetensors
from ..tokenizers.files import TOKENIZER_FILES
from .lora import fold_policy_adapter, lora_parameters
from .palm import CHECKPOINT_JSON, PaLM

REWARD_SCOPE = "reward"


@dataclass(frozen=True)
class RewardConfig:
    """The reward head(s) and how the trunk is trained."""

    rating_bins: int = 0
    """0: no rating head. N >= 2: a classification head over ratings 0..N-1 on the same pooled
    hidden state (graded feedback)."""
    lora_rank: int = 0
    """0: fine-tune the whole trunk. > 0: freeze the trunk and train a LoRA scope named
    'reward' of this rank (plus the heads)."""
    lora_alpha: float = 16.0
    """LoRA scale numerator (the adapter output is multiplied by alpha / rank)."""
    pairwise_margin: float = 0.0
    """Margin m in the pairwise loss -log sigmoid(r_chosen - r_rejected - m) [0]."""
    max_seq_len: int = 0
    """Longest prompt + response row, in tokens, the model was trained on: `train_reward` sets
    it to the run's seq_len, and scoring (PPO, `palm-rlhf score`) cuts rows to it exactly as
    training did (`data.preferences.encode_completion`). 0: the trunk's max_seq_len."""

    def __post_init__(self) -> None:
        check_ints(self, ("rating_bins", "lora_rank", "max_seq_len"), minimum=0)
        check(self.rating_bins != 1, "rating_bins", "must be 0 (no head) or at least 2, got 1")
        check(self.max_seq_len != 1, "max_seq_len", "must be 0 (the trunk's) or at least 2, got 1")
        check_numbers(self, ("lora_alpha",))
        check_numbers(self, ("pairwise_margin",), strict=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RewardConfig:
        return config_from_dict(cls, data)


def pool_last(hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """hidden (b, n, d), mask (b, n) bool -> (b, d): the state at the last True of each row.

    With no mask every row ends at column n-1. A row with no real token is an error.
    """
    b, n, _ = hidden.shape
    if mask is None:
        return hidden[:, -1]
    if tuple(mask.shape) != (b, n):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match hidden {(b, n)}")
    columns = torch.arange(n, device=hidden.device).expand(b, n)
    last = torch.where(mask.bool(), columns, -1).amax(dim=1)  # (b,)
    if bool((last < 0).any()):
        raise ValueError("every row needs at least one real token (mask all False)")
    return hidden[torch.arange(b, device=hidden.device), last]  # (b, d)


class LinearHead(nn.Linear):
    """A trained linear head (score, rating, value) on a trunk of any precision: the head keeps
    float32 weights and reads the hidden states in its own dtype (a bf16 base stays bf16)."""

    def forward(self, hidden: Tensor) -> Tensor:
        return super().forward(hidden.to(self.weight.dtype))


def _new_head(dim: int, outputs: int, like: Tensor) -> nn.Linear:
    """A float32 head on the trunk's device, whatever the trunk's dtype."""
    head = LinearHead(dim, outputs, device=like.device, dtype=torch.float32)
    # std 1 / sqrt(d_model + 1), as in Ziegler et al. 2019 (lm-human-preferences) and
    # Stiennon et al. 2020: the initial scores have roughly unit variance.
    nn.init.normal_(head.weight, std=1.0 / math.sqrt(dim + 1))
    nn.init.zeros_(head.bias)
    return head


class RewardModel(nn.Module):
    """A PaLM trunk + scalar head, optional rating head, and score normalisation buffers.

    forward(tokens (b, n), mask (b, n) | None, normalized=False) -> scores (b,)

    `score_mean` / `score_std` (checklist item 11) are persistent buffers, saved with the
    weights; `normalized=True` returns (score - score_mean) / score_std.
    """

    @beartype
    def __init__(self, palm: PaLM, config: RewardConfig = RewardConfig()) -> None:
        super().__init__()
        if config.max_seq_len > palm.config.max_seq_len:
            raise ValueError(
                f"RewardConfig.max_seq_len={config.max_seq_len} exceeds the trunk's max_seq_len "
                f"{palm.config.max_seq_len}"
            )
        self.config = config
        self.trunk = palm
        if config.lora_rank > 0:
            self._attach_lora(palm, config)
        else:
            # Full fine-tune, even of a trunk that arrived frozen. Adapter scopes the trunk
            # brought along (an SFT or PPO adapter) are never applied here (lora_scope is None),
            # so they stay frozen: a trainable parameter that gets no gradient breaks DDP.
            for name, param in palm.named_parameters():
                param.requires_grad_(".adapters." not in name)
        dim, weight = palm.config.dim, palm.token_emb.weight  # heads follow the trunk's place
        self.head = _new_head(dim, 1, weight)
        self.rating_head = (
            _new_head(dim, config.rating_bins, weight) if config.rating_bins else None
        )
        self.register_buffer("score_mean", torch.tensor(0.0, device=weight.device))
        self.register_buffer("score_std", torch.tensor(1.0, device=weight.device))

    @staticmethod
    def _attach_lora(palm: PaLM, config: RewardConfig) -> None:
        """Add (or reuse, when loading) the 'reward' scope; freeze everything else."""
        wanted = LoRAConfig(rank=config.lora_rank, alpha=config.lora_alpha)
        existing = palm.lora_configs.get(REWARD_SCOPE)
        if existing is None:
            palm.add_lora(REWARD_SCOPE, wanted)
        elif (existing.rank, existing.alpha) != (wanted.rank, wanted.alpha):
            raise ValueError(
                f"the trunk already has a {REWARD_SCOPE!r} LoRA scope with rank={existing.rank}, "
                f"alpha={existing.alpha}; the reward config asks for rank={wanted.rank}, "
                f"alpha={wanted.alpha}"
            )
        for name, param in palm.named_parameters():
            param.requires_grad_(f".adapters.{REWARD_SCOPE}." in name)

    @property
    def max_row_len(self) -> int:
        """The length scoring rows are cut to: the training length, else the trunk's limit."""
        return self.config.max_seq_len or self.trunk.config.max_seq_len

    @property
    def lora_scope(self) -> str | None:
        return REWARD_SCOPE if self.config.lora_rank > 0 else None

    def pooled_hidden(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """(b, n) tokens -> (b, d): the trunk's final hidden state at each row's last real token.

        Call once and apply `head` / `rating_head` to share one trunk pass between losses.
        """
        hidden = self.trunk.forward_hidden(tokens, mask, lora_scope=self.lora_scope)  # (b, n, d)
        return pool_last(hidden, mask)

    def forward(
        self,
        tokens: Tensor,
        mask: Tensor | None = None,
        normalized: bool = False,
        with_rating_logits: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Scores (b,); with_rating_logits also returns the rating head's (b, bins) logits from
        the same trunk pass (through forward, so DDP's gradient hooks see both)."""
        pooled = self.pooled_hidden(tokens, mask)
        scores = self.head(pooled).squeeze(-1)  # (b,)
        if normalized:
            scores = (scores - self.score_mean) / self.score_std
        if with_rating_logits:
            if self.rating_head is None:
                raise ValueError(
                    "this reward model has no rating head (RewardConfig.rating_bins=0)"
                )
            return scores, self.rating_head(pooled)
        return scores

    def rating_logits(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """(b, n) tokens -> (b, rating_bins) logits over ratings 0..rating_bins-1."""
        if self.rating_head is None:
            raise ValueError("this reward model has no rating head (RewardConfig.rating_bins=0)")
        return self.rating_head(self.pooled_hidden(tokens, mask))

    @torch.no_grad()
    def set_normalization(self, scores: Tensor) -> None:
        """Set score_mean / score_std from raw scores on a reference set (e.g. samples of the
        initial policy), so normalised scores there average 0 with unit spread."""
        scores = scores.detach().float().reshape(-1)
        if scores.numel() == 0 or not bool(torch.isfinite(scores).all()):
            raise ValueError("set_normalization needs at least one score, all finite")
        self.score_mean.copy_(scores.mean())
        self.score_std.copy_(scores.std(correction=0).clamp(min=1e-6))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The 'reward' LoRA scope + heads under LoRA; every parameter that trains otherwise
        (adapter scopes brought in with the trunk stay frozen)."""
        if self.lora_scope is None:
            return [param for param in self.parameters() if param.requires_grad]
        heads = [*self.head.parameters()]
        if self.rating_head is not None:
            heads += [*self.rating_head.parameters()]
        return [*lora_parameters(self.trunk, REWARD_SCOPE), *heads]

    # ----------------------------------------------------------------------------- checkpoints

    def save_pretrained(self, directory: str | Path) -> None:
        """config.json (the trunk), reward_config.json, lora.json (if any) and model.safetensors
        (trunk + heads + normalisation buffers), written atomically."""
        save_model_dir(directory, self.state_dict(), self.checkpoint_json())

    def checkpoint_json(self) -> dict[str, Any]:
        """The JSON files of a checkpoint of this model (None = not written)."""
        return {**self.trunk.checkpoint_json(), "reward_config.json": self.config.to_dict()}

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, dtype: torch.dtype | None = None
    ) -> RewardModel:
        """Load a `save_pretrained` directory strictly; no pickle is ever read. The weights keep
        the file's dtype unless `dtype` is given."""

        def build(files: dict[str, Any]) -> RewardModel:
            if files["reward_config.json"] is None:
                raise ValueError(
                    "missing reward_config.json (a plain PaLM checkpoint? use "
                    "RewardModel.from_palm_checkpoint)"
                )
            palm = PaLM.from_checkpoint_files(files)
            return cls(palm, RewardConfig.from_dict(files["reward_config.json"]))

        names = (*CHECKPOINT_JSON, "reward_config.json")
        return load_model_dir(directory, build, names, dtype, TOKENIZER_FILES)

    @classmethod
    def from_pretrained_on(cls, directory: str | Path, trunk: PaLM) -> RewardModel:
        """The LoRA reward model saved in `directory`, on `trunk`, which must hold the same base
        weights (compare `read_base_digest(directory)` with `trunk.base_digest()` first): only
        the reward scope, the heads and the score normalisation are read from the file, so a
        policy and its reward model share one base in memory. The scope joins the trunk's
        others (a policy's actor); the trunk's tokenizer must be the checkpoint's."""
        names = (*CHECKPOINT_JSON, "reward_config.json")
        directory, files = read_checkpoint_files(directory, names, TOKENIZER_FILES)
        if files["reward_config.json"] is None:
            raise ValueError(f"{directory}: no reward_config.json (not a reward model)")
        config = RewardConfig.from_dict(files["reward_config.json"])
        if config.lora_rank == 0:
            raise ValueError(f"{directory}: a fully fine-tuned reward model has its own trunk")
        if PaLMConfig.from_dict(files["config.json"]) != trunk.config:
            raise ValueError(f"{directory}: the reward model's architecture is not the trunk's")
        saved_tokenizer = {n: files[n] for n in TOKENIZER_FILES if files[n] is not None}
        if saved_tokenizer != trunk.tokenizer_files:
            raise ValueError(f"{directory}: the reward model reads another tokenizer")
        saved_scope = (files.get("lora.json") or {}).get(REWARD_SCOPE) or {}
        if (saved_scope.get("rank"), saved_scope.get("alpha")) != (
            config.lora_rank,
            config.lora_alpha,
        ):
            raise ValueError(f"{directory}: lora.json does not describe the {REWARD_SCOPE!r} scope")
        model = cls(trunk, config)
        scope = f".adapters.{REWARD_SCOPE}."

        def own(name: str) -> bool:  # the reward model's tensors, not the shared base's
            return not name.startswith("trunk.") or scope in name

        state = load_safetensors(directory / WEIGHTS_NAME, keep=own)
        expected = {name for name in model.state_dict() if own(name)}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"{directory}: reward tensors missing {missing}, unexpected {extra}")
        model.load_state_dict(state, strict=False)  # copies into the trunk's device and dtypes
        return model

    @classmethod
    def from_palm_checkpoint(
        cls,
        directory: str | Path,
        config: RewardConfig = RewardConfig(),
        dtype: torch.dtype | None = None,
    ) -> RewardModel:
        """A reward model whose trunk starts from a pretrained / SFT PaLM checkpoint; the heads
        are freshly initialised. The one adapter scope the checkpoint may carry (a LoRA SFT's
        'sft') is merged into the trunk first, as every stage starting from a policy does:
        the reward model reads the model the checkpoint holds, not its bare base."""
        palm = PaLM.from_pretrained(directory, dtype)
        fold_policy_adapter(palm)
        return cls(palm, config)
