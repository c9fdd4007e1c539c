"""The supervised stages' configs: `TrainConfig` (pretrain, SFT, reward model) and `DPOConfig`.
Frozen, validated on creation, saved as train_config.json in every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import TrainingMemory, check, check_choice, check_ints


@dataclass(frozen=True)
class TrainConfig(TrainingMemory):
    """Pretraining / SFT loop settings (`palm_rlhf.training.lm.train_lm`)."""

    jsonl_field: str = "text"
    """Field holding each document's text in a .jsonl pretraining corpus."""
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
    lora_rank: int = 0
    """Pretrain/SFT from --init: 0 trains every weight; > 0 freezes the base and trains a LoRA
    scope named 'sft' of this rank (the checkpoint holds it; later stages fold it in)."""
    lora_alpha: float = 16.0
    """Alpha of the 'sft' LoRA scope (its output is multiplied by alpha / rank)."""
    fsdp: bool = False
    """Shard the models over the processes with torch's FSDP2 (one unit per block): weights,
    gradients and optimizer state split across processes, gathered a block at a time. Launch
    with `accelerate launch`; a --sample-every text gathers the model whole while it decodes."""
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
        super().__post_init__()
        check_ints(
            self,
            ("seq_len", "batch_size", "grad_accum", "steps", "eval_batches", "log_every"),
        )
        check_ints(self, ("keep_checkpoints",))
        check_ints(
            self,
            ("warmup_steps", "eval_every", "sample_every", "checkpoint_every", "seed"),
            minimum=0,
        )
        check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        check(
            0 <= self.min_lr_ratio <= 1,
            "min_lr_ratio",
            f"must be in [0, 1], got {self.min_lr_ratio}",
        )
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(0 <= self.beta1 < 1, "beta1", f"must be in [0, 1), got {self.beta1}")
        check(0 <= self.beta2 < 1, "beta2", f"must be in [0, 1), got {self.beta2}")
        check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        check_choice(self, "mixed_precision", ("no", "bf16"))
        check_ints(self, ("lora_rank",), minimum=0)
        check(self.lora_alpha > 0, "lora_alpha", f"must be positive, got {self.lora_alpha}")
        check(self.time_limit_s >= 0, "time_limit_s", f"must be >= 0, got {self.time_limit_s}")


DPO_LOSSES = ("sigmoid", "ipo", "plackett_luce")


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
        check_choice(self, "loss_type", DPO_LOSSES)
        check(self.beta > 0 and math.isfinite(self.beta), "beta", f"must be > 0, got {self.beta}")
        check(
            0 <= self.label_smoothing < 0.5,
            "label_smoothing",
            f"must be in [0, 0.5), got {self.label_smoothing}",
        )
        check(
            self.label_smoothing == 0 or self.loss_type == "sigmoid",
            "label_smoothing",
            f"only applies to loss_type 'sigmoid', not {self.loss_type!r}",
        )
        check_ints(self, ("lora_rank",))
        check(self.lora_alpha > 0, "lora_alpha", f"must be positive, got {self.lora_alpha}")
