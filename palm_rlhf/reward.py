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
import torch.nn.functional as F
from beartype import beartype
from torch import Tensor, nn

from .checkpoint import load_model_dir, save_model_dir
from .config import LoRAConfig, _check, config_from_dict
from .lora import lora_parameters
from .palm import CHECKPOINT_JSON, PaLM
from .tokenizer import TOKENIZER_FILES

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
    training did (`preferences.encode_completion`). 0: the trunk's max_seq_len."""

    def __post_init__(self) -> None:
        for name in ("rating_bins", "lora_rank", "max_seq_len"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                name,
                f"must be a non-negative int, got {value!r}",
            )
        _check(self.rating_bins != 1, "rating_bins", "must be 0 (no head) or at least 2, got 1")
        _check(self.max_seq_len != 1, "max_seq_len", "must be 0 (the trunk's) or at least 2, got 1")
        for name in ("lora_alpha", "pairwise_margin"):
            value = getattr(self, name)
            _check(
                isinstance(value, int | float) and not isinstance(value, bool),
                name,
                f"must be a number, got {value!r}",
            )
            _check(math.isfinite(value), name, f"must be finite, got {value}")
        _check(self.lora_alpha > 0, "lora_alpha", f"must be positive, got {self.lora_alpha}")
        _check(
            self.pairwise_margin >= 0,
            "pairwise_margin",
            f"must be non-negative, got {self.pairwise_margin}",
        )

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


def _new_head(dim: int, outputs: int, like: Tensor) -> nn.Linear:
    head = nn.Linear(dim, outputs, device=like.device, dtype=like.dtype)
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
    def from_palm_checkpoint(
        cls,
        directory: str | Path,
        config: RewardConfig = RewardConfig(),
        dtype: torch.dtype | None = None,
    ) -> RewardModel:
        """A reward model whose trunk starts from a pretrained / SFT PaLM checkpoint; the heads
        are freshly initialised. LoRA scopes in the checkpoint other than 'reward' are loaded
        but never applied (merge an SFT adapter into the base first if the trunk should use it)."""
        return cls(PaLM.from_pretrained(directory, dtype), config)


# ----------------------------------------------------------------------------- losses


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


def _better_than(ranks: Tensor, group: Tensor) -> Tensor:
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
    better = _better_than(ranks, group)  # (N, N)
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
    better = _better_than(ranks, group)
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
