"""Frozen, validated configuration dataclasses with a JSON round trip.

Every field carries a docstring (the string literal right after it); `field_docs` reads them so
the CLI can turn them into `--help` text. Unknown keys are rejected on load: a typo in a config
file must fail loudly, never fall back to a default silently.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field}: {message}")


@dataclass(frozen=True)
class PaLMConfig:
    """Hyper-parameters of the PaLM decoder (Chowdhery et al. 2022, section 2)."""

    num_tokens: int
    """Vocabulary size: token ids must lie in [0, num_tokens)."""
    dim: int = 512
    """Model width (residual stream size)."""
    depth: int = 8
    """Number of parallel attention + feed-forward blocks."""
    heads: int = 8
    """Number of query heads."""
    kv_heads: int = 1
    """Key/value heads. 1 is multi-query attention as in PaLM (a tiny KV cache); a divisor of
    `heads` above 1 gives grouped-query attention; `heads` gives standard multi-head."""
    dim_head: int = 64
    """Width of each attention head."""
    ff_mult: int = 4
    """SwiGLU hidden width as a multiple of dim (ignored when ff_inner is set)."""
    ff_inner: int | None = None
    """Explicit SwiGLU hidden width, for widths that are not a multiple of dim (Cohere's
    Command-R: 22528 for dim 8192); None means dim * ff_mult."""
    max_seq_len: int = 2048
    """Longest sequence (prompt + generated tokens) the model accepts."""
    rotary_base: float = 10000.0
    """Base of the rotary position embedding frequencies (RoFormer)."""
    use_xpos: bool = False
    """Scale rotary embeddings with xPos (Sun et al. 2022) for better length extrapolation."""
    xpos_scale_base: float = 512.0
    """xPos decay scale base (only used with use_xpos)."""
    qk_norm: bool = False
    """L2-normalise queries and keys per head with a learned temperature (stabilises training)."""
    qk_norm_scale: float = 10.0
    """Initial attention temperature used with qk_norm (replaces 1/sqrt(dim_head))."""
    dropout: float = 0.0
    """Dropout on the block output during training (RLHF turns all dropout off)."""
    z_loss_weight: float = 0.0
    """Weight of PaLM's auxiliary log(Z)^2 loss that keeps the softmax normaliser near 1 [1e-4]."""
    qk_layernorm: bool = False
    """LayerNorm (no bias) on each query and key head before rotary, with a learned weight per
    head and channel, as Cohere's use_qk_norm; an alternative to the cosine qk_norm."""
    norm_eps: float = 1e-5
    """Epsilon of every LayerNorm (Cohere's layer_norm_eps)."""
    logit_scale: float = 1.0
    """Multiplier on the output logits (Cohere's logit_scale, 0.0625 on Command-R)."""
    layer_types: tuple[str, ...] = ()
    """Attention of each layer, 'full' or 'sliding' (a window of sliding_window keys); empty
    means every layer is full. Cohere2 alternates three sliding layers and one full one."""
    sliding_window: int | None = None
    """Keys a query of a sliding layer attends to, itself included (only with layer_types)."""
    rotary_layers: tuple[bool, ...] = ()
    """Whether each layer rotates queries and keys; empty means every layer does. Cohere2
    rotates on its sliding layers only, so its full layers see no positions at all."""
    causal: bool = True
    """Causal (decoder) attention; False gives bidirectional attention (no generation)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of weights."""

    def __post_init__(self) -> None:
        for name in (
            "num_tokens",
            "dim",
            "depth",
            "heads",
            "kv_heads",
            "dim_head",
            "ff_mult",
            "max_seq_len",
        ):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and not isinstance(value, bool),
                name,
                f"must be an int, got {value!r}",
            )
            _check(value > 0, name, f"must be positive, got {value}")
        _check(
            self.heads % self.kv_heads == 0,
            "kv_heads",
            f"must divide heads={self.heads}, got {self.kv_heads}",
        )
        _check(self.dim_head % 2 == 0, "dim_head", f"must be even for rotary, got {self.dim_head}")
        _check(self.rotary_base > 0, "rotary_base", f"must be positive, got {self.rotary_base}")
        _check(
            self.xpos_scale_base > 0,
            "xpos_scale_base",
            f"must be positive, got {self.xpos_scale_base}",
        )
        _check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _check(
            self.z_loss_weight >= 0,
            "z_loss_weight",
            f"must be non-negative, got {self.z_loss_weight}",
        )
        _check(self.init_std > 0, "init_std", f"must be positive, got {self.init_std}")
        _check(
            self.qk_norm_scale > 0, "qk_norm_scale", f"must be positive, got {self.qk_norm_scale}"
        )
        self._check_cohere_options()

    def _check_cohere_options(self) -> None:
        _check(
            self.ff_inner is None or _positive_int(self.ff_inner),
            "ff_inner",
            f"must be a positive int or None, got {self.ff_inner!r}",
        )
        _check(
            not (self.qk_norm and self.qk_layernorm),
            "qk_layernorm",
            "excludes qk_norm (the cosine qk-norm): choose one",
        )
        _check(self.norm_eps > 0, "norm_eps", f"must be positive, got {self.norm_eps}")
        _check(self.logit_scale > 0, "logit_scale", f"must be positive, got {self.logit_scale}")
        # JSON brings lists back; the frozen config keeps tuples (hashable, immutable).
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "rotary_layers", tuple(self.rotary_layers))
        for name in ("layer_types", "rotary_layers"):
            length = len(getattr(self, name))
            _check(
                length in (0, self.depth),
                name,
                f"needs one entry per layer (depth={self.depth}) or none, got {length}",
            )
        unknown = sorted(set(self.layer_types) - {"full", "sliding"})
        _check(not unknown, "layer_types", f"entries must be 'full' or 'sliding', got {unknown}")
        bad = [v for v in self.rotary_layers if not isinstance(v, bool)]
        _check(not bad, "rotary_layers", f"entries must be true or false, got {bad}")
        sliding = "sliding" in self.layer_types
        _check(
            self.sliding_window is None or _positive_int(self.sliding_window),
            "sliding_window",
            f"must be a positive int or None, got {self.sliding_window!r}",
        )
        _check(not sliding or self.causal, "layer_types", "'sliding' layers need causal=True")
        _check(
            sliding == (self.sliding_window is not None),
            "sliding_window",
            "is required by 'sliding' layers and only allowed with them",
        )

    @property
    def ff_inner_dim(self) -> int:
        return self.ff_inner if self.ff_inner is not None else self.dim * self.ff_mult

    def layer_type(self, index: int) -> str:
        return self.layer_types[index] if self.layer_types else "full"

    def layer_has_rotary(self, index: int) -> bool:
        return self.rotary_layers[index] if self.rotary_layers else True

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: tuples become lists, as they come back from a config.json."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PaLMConfig:
        return config_from_dict(cls, data)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a config dataclass from a dict, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known keys are {sorted(known)}")
    return cls(**data)


def save_config(config: Any, path: str | Path) -> None:
    from .checkpoint import write_bytes_atomic

    text = json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(path, text.encode())


def load_config(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    try:
        return config_from_dict(cls, data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, for CLI help and documentation."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


LORA_TARGETS = ("fused_proj", "attn_out", "ff_out")


@dataclass(frozen=True)
class LoRAConfig:
    """A named scope of low-rank adapters (Hu et al. 2021): W x + (alpha / rank) B A x."""

    rank: int = 8
    """Rank r of each adapter."""
    alpha: float = 16.0
    """Scale numerator: the adapter output is multiplied by alpha / rank."""
    targets: tuple[str, ...] = LORA_TARGETS
    """Projections that get an adapter: fused_proj (q, k, v and the SwiGLU inputs), attn_out,
    ff_out."""

    def __post_init__(self) -> None:
        _check(
            isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
            "rank",
            f"must be a positive int, got {self.rank!r}",
        )
        _check(self.alpha > 0, "alpha", f"must be positive, got {self.alpha}")
        object.__setattr__(self, "targets", tuple(self.targets))
        _check(len(self.targets) > 0, "targets", "must name at least one projection")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        _check(not unknown, "targets", f"unknown projections {unknown}; choose from {LORA_TARGETS}")


@dataclass(frozen=True)
class TrainConfig:
    """Pretraining / SFT loop settings (`palm_rlhf.train_lm`)."""

    data: str = "stdlib"
    """Corpus: 'stdlib' (this Python's standard-library sources), a text file, a folder of text
    files, a .gz file or a .jsonl file (see jsonl_field). For SFT: a JSONL of prompt/response;
    for reward: a preference JSONL."""
    jsonl_field: str = "text"
    """Field holding each document's text in a .jsonl corpus."""
    seq_len: int = 256
    """Tokens per training sequence (documents are packed with eos between them)."""
    batch_size: int = 16
    """Sequences per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    steps: int = 1000
    """Optimizer steps to train for (total, including steps before a resume)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor as a fraction of lr."""
    warmup_steps: int = 100
    """Linear warmup steps before the cosine decay."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices; norms and embeddings are not decayed."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    mixed_precision: str = "no"
    """'no' or 'bf16' (autocast through accelerate, which fixes it once per process)."""
    eval_every: int = 200
    """Evaluate held-out bits per byte every N steps (0 disables; always at the end)."""
    eval_batches: int = 8
    """Held-out micro-batches per evaluation."""
    sample_every: int = 500
    """Print a sample every N steps (0 disables)."""
    sample_prompt: str = "def "
    """Prompt for periodic samples."""
    log_every: int = 10
    """Write a metrics line every N steps."""
    checkpoint_every: int = 500
    """Save model + full training state every N steps (and always at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    seed: int = 0
    """Seed for initialisation, data order and dropout."""
    time_limit_s: float = 0.0
    """Stop (with a checkpoint) after this many seconds of training; 0 = no limit."""

    def __post_init__(self) -> None:
        for name in (
            "seq_len",
            "batch_size",
            "grad_accum",
            "steps",
            "eval_batches",
            "log_every",
            "keep_checkpoints",
        ):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                name,
                f"must be a positive int, got {value!r}",
            )
        for name in ("warmup_steps", "eval_every", "sample_every", "checkpoint_every", "seed"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                name,
                f"must be a non-negative int, got {value!r}",
            )
        _check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        _check(
            0 <= self.min_lr_ratio <= 1,
            "min_lr_ratio",
            f"must be in [0, 1], got {self.min_lr_ratio}",
        )
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.beta1 < 1, "beta1", f"must be in [0, 1), got {self.beta1}")
        _check(0 <= self.beta2 < 1, "beta2", f"must be in [0, 1), got {self.beta2}")
        _check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        _check(
            self.mixed_precision in ("no", "bf16"),
            "mixed_precision",
            f"must be 'no' or 'bf16', got {self.mixed_precision!r}",
        )
        _check(self.time_limit_s >= 0, "time_limit_s", f"must be >= 0, got {self.time_limit_s}")


# Named model sizes for the CLI. `tiny` trains in minutes on a laptop CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=256, depth=4, heads=4, dim_head=64, max_seq_len=512),
    "small": dict(dim=512, depth=8, heads=8, dim_head=64, max_seq_len=1024),
    "base": dict(dim=1024, depth=16, heads=16, dim_head=64, max_seq_len=2048),
}


def preset_config(name: str, num_tokens: int, **overrides: Any) -> PaLMConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PaLMConfig(num_tokens=num_tokens, **{**PRESETS[name], **overrides})


@dataclass(frozen=True)
class PPOConfig:
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
    no_eos_penalty: float = -1.0
    """Score given to a response that never emits eos instead of its reward (checklist 6);
    set to nan to keep the reward's score."""
    score_clip: float = 0.0
    """Clip scores to [-score_clip, score_clip]; 0 disables."""
    lora_rank: int = 8
    """Rank of the actor and critic LoRA scopes."""
    lora_alpha: float = 16.0
    """Alpha of the actor and critic LoRA scopes."""
    full_finetune: bool = False
    """Train every policy weight instead of an actor adapter (the reference is then a frozen
    copy, and the critic gets its own copy of the trunk)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (0 disables)."""
    seed: int = 0
    """Seed for prompt order, sampling and minibatch shuffling."""

    def __post_init__(self) -> None:
        for name in (
            "rollout_batch_size",
            "max_new_tokens",
            "max_prompt_tokens",
            "ppo_epochs",
            "minibatch_size",
            "grad_accum",
            "lora_rank",
            "kl_horizon",
        ):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                name,
                f"must be a positive int, got {value!r}",
            )
        _check(
            self.minibatch_size <= self.rollout_batch_size,
            "minibatch_size",
            f"must be <= rollout_batch_size={self.rollout_batch_size}",
        )
        _check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        for name in ("lr", "critic_lr", "clip", "value_clip", "lora_alpha", "kl_target"):
            _check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        for name in ("value_coef", "entropy_coef", "kl_coef", "score_clip", "grad_clip"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _check(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        _check(0 <= self.lam <= 1, "lam", f"must be in [0, 1], got {self.lam}")
