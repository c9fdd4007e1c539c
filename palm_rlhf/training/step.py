"""The mechanics every supervised loop (LM/SFT, reward model, DPO) shares: the optimizer
(AdamW, no decay on norms), the learning rate as a pure function of the step (warmup then
cosine), which examples a step reads as a pure function of (seed, step) (the reason resume
replays a run bit for bit), and the pieces of a step: its micro-batches (indexing, no_sync,
autocast), clipping and the optimizer step, the rank-0 stop decision, when to log, evaluate and
save, and the metric window every loop logs (loss, lr, grad_norm, tokens_per_s). Each loop
keeps its own numbered steps and calls these; nothing here calls back into a loop.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..model.palm import PaLM
from ..progress import progress_kwargs
from .config import TrainConfig
from .fsdp import clip_gradients, shard_models
from .runs import append_jsonl, rank0_decides
from .state import TrainingCheckpoints

RUN_MARKERS = ("metrics.jsonl", "checkpoints")


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: norms, scalars and the (tied) embedding are left undecayed."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.ndim >= 2 and "token_emb" not in name
        (decay if is_matrix else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


BASE_DTYPES = {
    "stored": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


FULL_FINETUNE_BASE_DTYPE = (
    "base_dtype: a full fine-tune trains every weight, in float32 master weights; base_dtype "
    "is the frozen base's dtype in a LoRA stage"
)


AUTOCAST_COPIES = (
    "the frozen base is float16 and bf16 autocast computes in bfloat16: every training pass "
    "casts each base weight and keeps the copy for backward (about the base's size again); "
    "--base-dtype bfloat16 converts the base once instead"
)


def set_training_dtypes(
    model: nn.Module,
    trained: Iterable[nn.Parameter],
    base_dtype: str = "stored",
    mixed_precision: str = "no",
) -> None:
    """Trained parameters in float32 (master weights: an optimizer step in bf16 loses small
    updates), and the frozen base of every PaLM in `model` (its weights but the adapters) in
    `base_dtype` ("stored": as the checkpoint holds it, so a bf16 base stays bf16 and is never
    copied to float32). Frozen adapters and heads (a reward model's) keep their own dtype. Cast
    tensor by tensor, in place of the old one; parameters keep their identity (an optimizer
    may already hold them). Warns (AUTOCAST_COPIES) when bf16 autocast would train over a
    float16 base: a cost the user can avoid with base_dtype="bfloat16"."""
    if base_dtype not in BASE_DTYPES:
        raise ValueError(f"base_dtype: {base_dtype!r} is not one of {sorted(BASE_DTYPES)}")
    trained = list(trained)
    trained_ids = {id(p) for p in trained}
    base_dtype_wanted = BASE_DTYPES[base_dtype]
    if base_dtype_wanted is not None:
        for palm in (m for m in model.modules() if isinstance(m, PaLM)):
            for name, param in palm.named_parameters():
                if ".adapters." not in name and id(param) not in trained_ids:
                    param.data = param.data.to(base_dtype_wanted)
    for param in trained:
        if param.dtype != torch.float32:
            param.data = param.data.float()
    if mixed_precision == "bf16" and _trains_over_float16(model, trained_ids):
        warnings.warn(AUTOCAST_COPIES, stacklevel=2)


def _trains_over_float16(model: nn.Module, trained_ids: set[int]) -> bool:
    """Whether a PaLM in `model` trains something (adapters) over a float16 frozen base."""
    for palm in (m for m in model.modules() if isinstance(m, PaLM)):
        params = list(palm.parameters())
        if any(id(p) in trained_ids for p in params) and any(
            p.dtype == torch.float16 and id(p) not in trained_ids for p in params
        ):
            return True
    return False


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    groups = param_groups(model, config.weight_decay)
    betas = (config.beta1, config.beta2)
    # The fused kernel does one pass per tensor instead of a dozen; fall back where unsupported.
    try:
        return torch.optim.AdamW(groups, lr=config.lr, betas=betas, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=config.lr, betas=betas)


class WindowSchedule:
    """Sample order over `num_items` items: a fresh seeded permutation for every epoch.

    Global sample position p (counting over steps, micro-batches, processes and rows) maps to
    item perm_{p // n}[p % n], so any process can find its batch for any step without state.
    """

    def __init__(self, num_items: int, seed: int) -> None:
        self.num_items, self.seed = num_items, seed
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.num_items, generator=generator)}
        return self._perms[epoch]

    def items(self, start: int, count: int) -> list[int]:
        return [
            int(self._perm(p // self.num_items)[p % self.num_items])
            for p in range(start, start + count)
        ]


def to_device(batch: dict[str, Tensor | None], device: torch.device) -> dict[str, Tensor | None]:
    """A collated batch on the device its loop trains on (None entries, e.g. a packed LM batch's
    absent masks, stay None)."""
    return {key: None if value is None else value.to(device) for key, value in batch.items()}


def make_loop_accelerator(
    config: TrainConfig, log_with: str | list[str] | None, out_dir: str | Path
) -> Accelerator:
    """The accelerator a loop builds when the caller passes none."""
    return Accelerator(
        mixed_precision=config.mixed_precision, log_with=log_with, project_dir=str(out_dir)
    )


def progress_bar(config: TrainConfig, start_step: int, desc: str, show: bool) -> tqdm:
    """A bar over the run's steps, on the main process only."""
    return tqdm(total=config.steps, initial=start_step, desc=desc, **progress_kwargs(show))


def set_lr(optimizer: torch.optim.Optimizer, step: int, config: TrainConfig) -> float:
    """The step's learning rate, a function of the step alone: resume needs no scheduler."""
    lr = lr_at(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def micro_batches(
    step: int, config: TrainConfig, accelerator: Accelerator, model: nn.Module
) -> Iterator[tuple[int, AbstractContextManager]]:
    """(first, context) for each of the step's grad_accum micro-batches on this process.

    `first` is the global sample position of the micro-batch's first row: rows first ..
    first + batch_size - 1 of the loop's `WindowSchedule`, laid out step-major, then by
    micro-batch, then by process, so any process finds its rows for any step without state.
    Run the forward under `context`: autocast, and DDP's no_sync on all but the last micro-batch
    (the flag is read at forward time, so the backward after it need not be inside).
    """
    world, rows = accelerator.num_processes, config.batch_size
    for micro in range(config.grad_accum):
        first = ((step * config.grad_accum + micro) * world + accelerator.process_index) * rows
        last = micro == config.grad_accum - 1
        yield first, _forward_context(accelerator, model, sync=last)


@contextmanager
def _forward_context(accelerator: Accelerator, model: nn.Module, sync: bool) -> Iterator[None]:
    with nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
        yield


def prepare_training(
    model: nn.Module,
    config: TrainConfig,
    accelerator: Accelerator,
    checkpoints: TrainingCheckpoints,
    latest: Path | None,
) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    """(model, optimizer, first step): the model sharded with FSDP2 (config.fsdp) or handed to
    accelerate (DDP across processes), its optimizer built after sharding (which replaces the
    parameters), and the state of the latest checkpoint restored into it when resuming."""
    if config.fsdp:
        shard_models([model], accelerator)
    optimizer = make_optimizer(model, config)
    start_step = checkpoints.restore(latest, optimizer, accelerator) if latest is not None else 0
    if not config.fsdp:
        model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, start_step


def clip_and_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    accelerator: Accelerator,
) -> float:
    """Clip to config.grad_clip (0: no clipping), step, zero the gradients; return the gradient
    norm before clipping. With no clipping the bound is infinite: the norm is measured and the
    gradients are multiplied by exactly 1. Sharded gradients are clipped by their global norm."""
    bound = config.grad_clip if config.grad_clip > 0 else math.inf
    if config.fsdp:  # (prepare_training sharded the model)
        grad_norm = clip_gradients(model.parameters(), bound)
    else:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), bound))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def out_of_time(began: float, config: TrainConfig, accelerator: Accelerator) -> bool:
    """Past config.time_limit_s (0: never)? Rank 0's clock decides for everyone: ranks that
    disagreed would hang in the next collective. A collective when a limit is set."""
    if not config.time_limit_s:
        return False
    return rank0_decides(time.perf_counter() - began > config.time_limit_s, accelerator)


def due(step: int, every: int, final: bool) -> bool:
    """Whether something done every `every` steps (0: only at the end) happens after `step`."""
    return final or (every > 0 and step % every == 0)


class MetricWindow:
    """What the loops log: the mean loss over the micro-batches since the last log line, the
    tokens per second over that time, and any sums a loop adds (correct pairs, ...), all
    summed over processes when the window closes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.tokens, self.started = 0, time.perf_counter()

    def add(self, loss: Tensor, tokens: int, **sums: Tensor | float) -> None:
        for key, value in {"loss": loss, **sums, "micro_batches": 1}.items():
            value = torch.as_tensor(value, device=self.device).detach().float()
            self.sums[key] = self.sums.get(key, 0) + value
        self.tokens += tokens

    def close(
        self, step: int, lr: float, grad_norm: float, accelerator: Accelerator
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """(record, totals): the core record (step, loss, lr, grad_norm, tokens_per_s) and the
        window's sums over processes (with its micro-batch count); then start a new window.
        A collective: call on every rank."""
        # Tokens and elapsed time travel with the sums, so every rank logs the same rate:
        # all processes' tokens over their mean wall time.
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        sums = {**self.sums, "tokens": self.tokens, "elapsed_s": elapsed}
        keys = sorted(sums)
        values = torch.stack([torch.as_tensor(sums[k], device=self.device).float() for k in keys])
        totals = dict(zip(keys, accelerator.reduce(values, "sum").tolist(), strict=True))
        mean_elapsed = totals.pop("elapsed_s") / accelerator.num_processes
        record = {
            "step": step,
            "loss": totals["loss"] / totals["micro_batches"],
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": round(totals.pop("tokens") / mean_elapsed, 1),
        }
        self.reset()
        return record, totals


def write_record(
    record: dict[str, Any], metrics_path: Path, accelerator: Accelerator, bar: tqdm, shown: str
) -> None:
    """Append the record to metrics.jsonl (main process), send it to the trackers and show the
    loss (and `shown`, when the record has it) on the bar."""
    extra = {shown: f"{record[shown]:.3g}"} if shown in record else {}
    bar.set_postfix(loss=f"{record['loss']:.3f}", **extra)
    if accelerator.is_main_process:
        append_jsonl(metrics_path, record)
    accelerator.log(record, step=record["step"])
