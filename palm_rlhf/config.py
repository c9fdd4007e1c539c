"""The model configs (`PaLMConfig`, `LoRAConfig`, the presets) and the validation helpers every
config uses, with a JSON round trip.

Every field carries a docstring (the string literal right after it); `field_docs` reads them so
the CLI can turn them into `--help` text. Unknown keys are rejected on load: a typo in a config
file must fail loudly, never fall back to a default silently.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from .storage.atomic import write_bytes_atomic

T = TypeVar("T")


# Validation helpers, written once for every config dataclass: errors name the field.


# The dtypes a LoRA stage can keep its frozen base in; "stored" keeps the checkpoint's.
BASE_DTYPE_CHOICES = ("stored", "float32", "bfloat16", "float16")


def check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field}: {message}")


def is_int(value: Any) -> bool:
    """An int, and not a bool (True would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_ints(config: object, names: Sequence[str], minimum: int = 1) -> None:
    """Each named field is an int >= minimum (1: positive, 0: non-negative)."""
    bound = {1: "positive", 0: ">= 0"}.get(minimum, f">= {minimum}")
    for name in names:
        value = getattr(config, name)
        check(is_int(value), name, f"must be an int, got {value!r}")
        check(value >= minimum, name, f"must be {bound}, got {value}")


def check_numbers(
    config: object, names: Sequence[str], minimum: float = 0.0, strict: bool = True
) -> None:
    """Each named field is a finite number above minimum (or at least it, with strict=False)."""
    for name in names:
        value = getattr(config, name)
        check(
            isinstance(value, int | float) and not isinstance(value, bool),
            name,
            f"must be a number, got {value!r}",
        )
        above = value > minimum if strict else value >= minimum
        bound = (
            ("positive" if strict else ">= 0")
            if minimum == 0
            else f"{'>' if strict else '>='} {minimum}"
        )
        check(math.isfinite(value) and above, name, f"must be {bound}, got {value}")


def check_choice(config: object, name: str, choices: Sequence[Any]) -> None:
    value = getattr(config, name)
    check(value in choices, name, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


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
        check_ints(
            self,
            (
                "num_tokens",
                "dim",
                "depth",
                "heads",
                "kv_heads",
                "dim_head",
                "ff_mult",
                "max_seq_len",
            ),
        )
        check(
            self.heads % self.kv_heads == 0,
            "kv_heads",
            f"must divide heads={self.heads}, got {self.kv_heads}",
        )
        check(self.dim_head % 2 == 0, "dim_head", f"must be even for rotary, got {self.dim_head}")
        check(self.rotary_base > 0, "rotary_base", f"must be positive, got {self.rotary_base}")
        check(
            self.xpos_scale_base > 0,
            "xpos_scale_base",
            f"must be positive, got {self.xpos_scale_base}",
        )
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(
            self.z_loss_weight >= 0,
            "z_loss_weight",
            f"must be non-negative, got {self.z_loss_weight}",
        )
        check(self.init_std > 0, "init_std", f"must be positive, got {self.init_std}")
        check(
            self.qk_norm_scale > 0, "qk_norm_scale", f"must be positive, got {self.qk_norm_scale}"
        )
        self._check_cohere_options()

    def _check_cohere_options(self) -> None:
        check(
            self.ff_inner is None or positive_int(self.ff_inner),
            "ff_inner",
            f"must be a positive int or None, got {self.ff_inner!r}",
        )
        check(
            not (self.qk_norm and self.qk_layernorm),
            "qk_layernorm",
            "excludes qk_norm (the cosine qk-norm): choose one",
        )
        check(self.norm_eps > 0, "norm_eps", f"must be positive, got {self.norm_eps}")
        check(self.logit_scale > 0, "logit_scale", f"must be positive, got {self.logit_scale}")
        # JSON brings lists back; the frozen config keeps tuples (hashable, immutable).
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "rotary_layers", tuple(self.rotary_layers))
        for name in ("layer_types", "rotary_layers"):
            length = len(getattr(self, name))
            check(
                length in (0, self.depth),
                name,
                f"needs one entry per layer (depth={self.depth}) or none, got {length}",
            )
        unknown = sorted(set(self.layer_types) - {"full", "sliding"})
        check(not unknown, "layer_types", f"entries must be 'full' or 'sliding', got {unknown}")
        bad = [v for v in self.rotary_layers if not isinstance(v, bool)]
        check(not bad, "rotary_layers", f"entries must be true or false, got {bad}")
        sliding = "sliding" in self.layer_types
        check(
            self.sliding_window is None or positive_int(self.sliding_window),
            "sliding_window",
            f"must be a positive int or None, got {self.sliding_window!r}",
        )
        check(not sliding or self.causal, "layer_types", "'sliding' layers need causal=True")
        check(
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


def positive_int(value: Any) -> bool:
    return is_int(value) and value > 0


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
    """The docstring under each field of a dataclass (and of the dataclasses it extends), for
    CLI help and documentation."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
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
        check(
            isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
            "rank",
            f"must be a positive int, got {self.rank!r}",
        )
        check(self.alpha > 0, "alpha", f"must be positive, got {self.alpha}")
        object.__setattr__(self, "targets", tuple(self.targets))
        check(len(self.targets) > 0, "targets", "must name at least one projection")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        check(not unknown, "targets", f"unknown projections {unknown}; choose from {LORA_TARGETS}")


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
class TrainingMemory:
    """The precision and memory settings every training stage shares (TrainConfig, PPOConfig
    and GRPOConfig extend it)."""

    base_dtype: str = "stored"
    """LoRA stages: the frozen base's dtype, 'stored' (as the checkpoint holds it: bf16 stays
    bf16), float32, bfloat16 or float16; adapters and heads train in float32. Full fine-tunes
    (pretrain/SFT without --lora-rank, --full-finetune) always train float32 master weights."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them: activation
    memory of one block instead of all, for about a third more compute; same gradients."""

    def __post_init__(self) -> None:
        check_choice(self, "base_dtype", BASE_DTYPE_CHOICES)
