"""Pretraining and supervised fine-tuning of a PaLM on `accelerate`.

One loop serves both: pretraining reads packed windows of a corpus, SFT reads prompt/response
pairs and counts response tokens only. The same code runs on one CPU process or many GPUs under
`accelerate launch`.

Exact resume: which windows a step reads is a pure function of (seed, step, micro-batch, rank),
the learning rate a pure function of the step, and a checkpoint holds the optimizer state and
every process's RNG state. Resuming at step N therefore replays steps N+1.. bit for bit.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from . import data as corpus
from .checkpoint import write_bytes_atomic
from .config import PaLMConfig, TrainConfig, save_config
from .generation import generate
from .palm import IGNORE_INDEX, PaLM, lm_loss, shift_targets
from .tokenizer import ByteTokenizer, Tokenizer
from .train_state import TrainingCheckpoints


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


def load_datasets(
    config: TrainConfig, tokenizer: Tokenizer, cache_dir: Path, sft: bool, max_seq_len: int
):
    """(train, heldout) datasets whose items are dicts of tokens / mask / loss_mask."""
    if sft:
        dataset = corpus.SFTDataset(Path(config.data), tokenizer, max_seq_len=config.seq_len + 1)
        heldout_ids = [i for i in range(len(dataset)) if corpus.is_heldout(f"example-{i}")]
        if not heldout_ids:
            heldout_ids = [len(dataset) - 1]
        held = set(heldout_ids)
        train_ids = [i for i in range(len(dataset)) if i not in held] or heldout_ids
        # With a byte tokenizer every response token but eos is one byte, so 1.0 is close.
        return Subset(dataset, train_ids), Subset(dataset, heldout_ids), 1.0
    sources = corpus.resolve_corpus(config.data, jsonl_field=config.jsonl_field)
    splits = {}
    for split in ("train", "heldout"):
        path = corpus.build_token_file(sources, tokenizer, cache_dir, split)
        splits[split] = corpus.TokenFile.open(path)
    train = corpus.PackedDataset(splits["train"].tokens, config.seq_len)
    heldout = corpus.PackedDataset(splits["heldout"].tokens, config.seq_len)
    held = splits["heldout"]
    tokens_per_byte = len(held.tokens) / max(1, held.num_bytes)
    return train, heldout, tokens_per_byte


def collate(items: list, pad_id: int) -> dict[str, Tensor]:
    if isinstance(items[0], dict):
        return corpus.collate_sft(items, pad_id)
    tokens = torch.stack(items)
    return {"tokens": tokens, "mask": None, "loss_mask": None}


def micro_batch_loss(model: nn.Module, batch: dict[str, Tensor], z_loss_weight: float) -> Tensor:
    """Calls the (possibly DDP-wrapped) model's forward, so gradient sync hooks run."""
    inputs, input_mask, targets = shift_targets(batch["tokens"], batch["mask"], batch["loss_mask"])
    return lm_loss(model(inputs, mask=input_mask), targets, z_loss_weight=z_loss_weight)


@torch.no_grad()
def evaluate_bpb(
    model: nn.Module,
    dataset,
    config: TrainConfig,
    accelerator: Accelerator,
    pad_id: int,
    tokens_per_byte: float,
) -> float:
    """Held-out bits per byte: summed next-token nats / ln 2 / bytes, over a fixed set of
    held-out batches shared out across processes."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    count = min(len(dataset), config.eval_batches * config.batch_size)
    mine = list(range(accelerator.process_index, count, accelerator.num_processes))
    for start in range(0, len(mine), config.batch_size):
        batch = collate([dataset[i] for i in mine[start : start + config.batch_size]], pad_id)
        batch = {k: (v.to(accelerator.device) if v is not None else None) for k, v in batch.items()}
        inputs, input_mask, targets = shift_targets(
            batch["tokens"], batch["mask"], batch["loss_mask"]
        )
        with accelerator.autocast():
            logits = model(inputs, mask=input_mask)
        nats = F.cross_entropy(
            logits.float().flatten(0, 1),
            targets.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += torch.stack((nats.double(), (targets != IGNORE_INDEX).sum().double()))
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    nats_per_token = (total[0] / total[1].clamp(min=1)).item()
    return nats_per_token / math.log(2) * tokens_per_byte


def train_lm(
    model_config: PaLMConfig,
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    init_checkpoint: str | Path | None = None,
    sft: bool = False,
    accelerator: Accelerator | None = None,
    tokenizer: Tokenizer | None = None,
    log_with: str | list[str] | None = None,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Train and return the logged metric dicts (also written to out_dir/metrics.jsonl)."""
    # step 1. processes, output folder, seeds
    accelerator = accelerator or Accelerator(
        mixed_precision=config.mixed_precision, log_with=log_with, project_dir=str(out_dir)
    )
    tokenizer = tokenizer or ByteTokenizer()
    out_dir = Path(out_dir)
    checkpoints = TrainingCheckpoints(out_dir / "checkpoints", config.keep_checkpoints)
    if model_config.num_tokens != tokenizer.vocab_size:
        raise ValueError(
            f"model num_tokens={model_config.num_tokens} but the tokenizer has "
            f"{tokenizer.vocab_size} tokens"
        )
    if config.seq_len + 1 > model_config.max_seq_len:
        raise ValueError(
            f"seq_len {config.seq_len} + 1 exceeds the model's max_seq_len "
            f"{model_config.max_seq_len}"
        )
    torch.manual_seed(config.seed)

    # step 2. data (tokenized once into a cache; the main process builds it first)
    with accelerator.main_process_first():
        train_set, heldout_set, tokens_per_byte = load_datasets(
            config, tokenizer, out_dir / "cache", sft, model_config.max_seq_len
        )
    schedule = WindowSchedule(len(train_set), config.seed)

    # step 3. model and optimizer: fresh, from an init checkpoint, or resumed
    start_step, latest = 0, checkpoints.latest() if resume else None
    if resume and latest is None and accelerator.is_main_process:
        tqdm.write(f"no checkpoint in {checkpoints.root}; starting from scratch")
    if latest is not None:
        model = PaLM.from_pretrained(latest)
        if model.config != model_config:
            raise ValueError(
                f"{latest}: checkpoint config {model.config} does not match the "
                f"requested model config {model_config}"
            )
    elif init_checkpoint is not None:
        model = PaLM.from_pretrained(init_checkpoint)
        if model.config.num_tokens != model_config.num_tokens:
            raise ValueError(
                f"{init_checkpoint}: vocabulary {model.config.num_tokens} does not "
                f"match {model_config.num_tokens}"
            )
        model_config = model.config
    else:
        model = PaLM(model_config)
    model.train()
    optimizer = make_optimizer(model, config)
    if latest is not None:
        start_step = checkpoints.restore(latest, optimizer, accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    metrics_path = start_run(
        out_dir, config, start_step, accelerator, log_with, asdict(model_config)
    )

    # step 4. the loop: accumulate micro-batches, clip, step, log, evaluate, checkpoint
    history: list[dict[str, Any]] = []
    world, rows = accelerator.num_processes, config.batch_size
    bar = tqdm(
        total=config.steps,
        initial=start_step,
        disable=not (show_progress and accelerator.is_main_process),
        desc="sft" if sft else "pretrain",
    )
    began, window_start, window_tokens = time.perf_counter(), time.perf_counter(), 0
    step = start_step
    while step < config.steps:
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=accelerator.device)
        for micro in range(config.grad_accum):
            first = ((step * config.grad_accum + micro) * world + accelerator.process_index) * rows
            batch = collate([train_set[i] for i in schedule.items(first, rows)], tokenizer.pad_id)
            batch = {
                k: (v.to(accelerator.device) if v is not None else None) for k, v in batch.items()
            }
            last = micro == config.grad_accum - 1
            with nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
                loss = micro_batch_loss(model, batch, model_config.z_loss_weight)
            accelerator.backward(loss / config.grad_accum)
            loss_sum += loss.detach()
            window_tokens += int((batch["tokens"].shape[1] - 1) * batch["tokens"].shape[0])
        grad_norm = (
            accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
            if config.grad_clip > 0
            else None
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        if step % config.log_every == 0 or step == config.steps:
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens * world / max(elapsed, 1e-9)
            record = {
                "step": step,
                "loss": accelerator.reduce(loss_sum, "mean").item() / config.grad_accum,
                "lr": lr,
                "tokens_per_s": round(tokens_per_s, 1),
            }
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
                record["eval_bpb"] = evaluate_bpb(
                    model, heldout_set, config, accelerator, tokenizer.pad_id, tokens_per_byte
                )
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_s:.0f}")
            if accelerator.is_main_process:
                append_jsonl(metrics_path, record)
            accelerator.log(record, step=step)
            window_start, window_tokens = time.perf_counter(), 0
        if accelerator.is_main_process and config.sample_every and step % config.sample_every == 0:
            bar.write(sample_text(accelerator.unwrap_model(model), tokenizer, config))
        out_of_time = config.time_limit_s and time.perf_counter() - began > config.time_limit_s
        periodic = config.checkpoint_every and step % config.checkpoint_every == 0
        if periodic or step == config.steps or out_of_time:
            checkpoints.save(
                step,
                accelerator.unwrap_model(model),
                optimizer,
                accelerator,
                {"train_config.json": asdict(config)},
            )
        if out_of_time:
            break

    # step 5. wrap up
    bar.close()
    if history and "eval_bpb" not in history[-1] and config.eval_every:
        history[-1]["eval_bpb"] = evaluate_bpb(
            model, heldout_set, config, accelerator, tokenizer.pad_id, tokens_per_byte
        )
        if accelerator.is_main_process:
            append_jsonl(metrics_path, {"step": step, "eval_bpb": history[-1]["eval_bpb"]})
    accelerator.end_training()
    return history


def sample_text(model: PaLM, tokenizer: Tokenizer, config: TrainConfig) -> str:
    prompt = tokenizer.encode(config.sample_prompt, add_bos=True)
    out = generate(
        model,
        [prompt],
        max_new_tokens=128,
        temperature=0.8,
        top_p=0.95,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        seed=0,
    )
    text = config.sample_prompt + tokenizer.decode(out.tokens[0][out.mask[0]])
    return f"--- sample ---\n{text}\n--------------"


def start_run(
    out_dir: Path,
    config: TrainConfig,
    start_step: int,
    accelerator: Accelerator,
    log_with: str | list[str] | None,
    extra_config: dict[str, Any],
) -> Path:
    """Prepare a run directory: save the TrainConfig, cut metrics.jsonl back to the step the run
    (re)starts from, start any trackers. Returns the metrics file's path."""
    metrics_path = out_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "train_config.json")
        truncate_metrics(metrics_path, start_step)
    if log_with:
        accelerator.init_trackers("palm_rlhf", config={**asdict(config), **extra_config})
    return metrics_path


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines logged after the checkpoint the run restarts from, so the
    file reads as one uninterrupted run."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    write_bytes_atomic(path, "".join(line + "\n" for line in kept).encode())


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
