"""Reward-model training on human (or simulated) rankings, pairs and ratings, on `accelerate`.

The loop follows `train_lm`'s conventions: batches are a pure function of (seed, step, rank),
the learning rate a function of the step, and checkpoints (model + optimizer + RNG, no pickle)
make a resumed run replay the uninterrupted one exactly.

Each step takes `batch_size` prompt groups; every completion of a group is forwarded once and all
its untied pairs enter InstructGPT's K-wise loss (`reward.ranking_loss`). Rating records, if the
data has any, add a rating loss on `batch_size` of them: cross-entropy over the rating head when
`RewardConfig.rating_bins` > 0, else regression of the scalar score onto the rating.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor
from tqdm.auto import tqdm

from .config import TrainConfig
from .preferences import (
    PreferenceData,
    PreferenceGroup,
    encode_groups,
    encode_ratings,
    load_preferences,
    split_groups,
)
from .reward import (
    RewardConfig,
    RewardModel,
    pairwise_accuracy,
    ranking_loss,
    rating_loss,
    rating_regression_loss,
)
from .tokenizer import ByteTokenizer, Tokenizer
from .train_lm import WindowSchedule, append_jsonl, lr_at, make_optimizer, start_run
from .train_state import TrainingCheckpoints


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def step_loss(
    model: torch.nn.Module,
    groups: dict[str, Tensor] | None,
    ratings: dict[str, Tensor] | None,
    reward_config: RewardConfig,
) -> tuple[Tensor, int, int]:
    """(loss, correct pairs, total pairs) of one micro-batch. Calls the wrapped model's forward
    so DDP's gradient hooks run."""
    loss, correct, total = torch.zeros(()), 0, 0
    if groups is not None:
        scores = model(groups["tokens"], groups["mask"])  # (N,)
        loss = ranking_loss(
            scores, groups["ranks"], groups["group"], margin=reward_config.pairwise_margin
        )
        correct, total = pairwise_accuracy(scores.detach(), groups["ranks"], groups["group"])
    if ratings is not None:
        if reward_config.rating_bins > 0:
            _, logits = model(ratings["tokens"], ratings["mask"], with_rating_logits=True)
            loss = loss + rating_loss(logits, ratings["ratings"].long())
        else:
            scores = model(ratings["tokens"], ratings["mask"])
            loss = loss + rating_regression_loss(scores, ratings["ratings"].float())
    return loss, correct, total


def scored_batches(
    model: torch.nn.Module,
    groups: list[PreferenceGroup],
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    device: torch.device,
) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    """(scores (N,), encoded batch) for `groups`, `batch_size` groups at a time; call it under
    no_grad with the model in eval mode."""
    for start in range(0, len(groups), batch_size):
        batch = _to(encode_groups(groups[start : start + batch_size], tokenizer, seq_len), device)
        yield model(batch["tokens"], batch["mask"]), batch


@torch.no_grad()
def accuracy_counts(
    model: torch.nn.Module,
    groups: list[PreferenceGroup],
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    device: torch.device,
) -> tuple[int, int]:
    """(correct, total) over the untied pairs of `groups`; the model is left in eval mode."""
    model.eval()
    correct = total = 0
    for scores, batch in scored_batches(model, groups, tokenizer, seq_len, batch_size, device):
        c, t = pairwise_accuracy(scores, batch["ranks"], batch["group"])
        correct, total = correct + c, total + t
    return correct, total


def heldout_accuracy(
    model: RewardModel,
    groups: list[PreferenceGroup],
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int = 16,
) -> float:
    """Pairwise accuracy of a reward model on held-out groups, in one process: the share of
    untied pairs whose better completion scores strictly higher (checklist item 20)."""
    device = model.head.weight.device
    correct, total = accuracy_counts(model, groups, tokenizer, seq_len, batch_size, device)
    return correct / max(1, total)


def evaluate_accuracy(
    model: torch.nn.Module,
    groups: list[PreferenceGroup],
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    accelerator: Accelerator,
) -> float:
    """`heldout_accuracy` inside the loop: each process scores its share of the groups (the
    model may be DDP-wrapped) and the counts are summed over processes."""
    mine = groups[accelerator.process_index :: accelerator.num_processes]
    counts = accuracy_counts(model, mine, tokenizer, seq_len, batch_size, accelerator.device)
    summed = accelerator.reduce(torch.tensor(counts, device=accelerator.device), reduction="sum")
    model.train()
    return summed[0].item() / max(1, summed[1].item())


@torch.no_grad()
def normalization_scores(
    model: RewardModel,
    groups: list[PreferenceGroup],
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    max_groups: int = 1024,
) -> Tensor:
    """Raw scores of the training completions: the reference set that normalised scores are
    centred on (checklist item 11). Past `max_groups` groups an evenly spaced subset is used:
    a mean and spread over thousands of completions are already stable to a few percent, and a
    full extra pass over a large dataset would cost minutes."""
    if len(groups) > max_groups:
        stride = len(groups) / max_groups
        groups = [groups[int(i * stride)] for i in range(max_groups)]
    model.eval()
    device = model.head.weight.device
    batches = scored_batches(model, groups, tokenizer, seq_len, batch_size, device)
    scores = torch.cat([scores for scores, _ in batches])
    model.train()
    return scores


def train_reward(
    init: str | Path,
    data: str | Path | PreferenceData,
    config: TrainConfig,
    reward_config: RewardConfig | None = None,
    out_dir: str | Path = "runs/reward",
    resume: bool = False,
    heldout_fraction: float = 0.1,
    accelerator: Accelerator | None = None,
    tokenizer: Tokenizer | None = None,
    log_with: str | list[str] | None = None,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Train a reward model from a PaLM checkpoint `init` on preference data; return the logged
    metrics (also in out_dir/metrics.jsonl: step, loss, accuracy, lr, tokens_per_s,
    eval_accuracy when evaluated)."""
    # step 1. processes, seeds, output
    reward_config = reward_config or RewardConfig()
    accelerator = accelerator or Accelerator(
        mixed_precision=config.mixed_precision, log_with=log_with, project_dir=str(out_dir)
    )
    tokenizer = tokenizer or ByteTokenizer()
    out_dir = Path(out_dir)
    checkpoints = TrainingCheckpoints(out_dir / "checkpoints", config.keep_checkpoints)
    torch.manual_seed(config.seed)

    # step 2. data: groups split by prompt into train / held-out, plus any rating records
    prefs = data if isinstance(data, PreferenceData) else load_preferences(data)
    train_groups, heldout_groups = (
        split_groups(prefs.groups, heldout_fraction, config.seed)
        if len(prefs.groups) >= 2
        else (list(prefs.groups), [])
    )
    if not train_groups and not prefs.ratings:
        raise ValueError(f"{data}: no preference groups or ratings to train on")
    group_schedule = WindowSchedule(len(train_groups), config.seed) if train_groups else None
    rating_schedule = WindowSchedule(len(prefs.ratings), config.seed + 1) if prefs.ratings else None

    # step 3. model and optimizer: from the PaLM checkpoint, or resumed
    latest = checkpoints.latest() if resume else None
    model = (
        RewardModel.from_pretrained(latest)
        if latest is not None
        else RewardModel.from_palm_checkpoint(init, reward_config)
    )
    if latest is not None and model.config != reward_config:
        raise ValueError(
            f"{latest}: reward config {model.config} does not match the requested {reward_config}"
        )
    max_len = model.trunk.config.max_seq_len
    if config.seq_len > max_len:
        raise ValueError(f"seq_len {config.seq_len} exceeds the trunk's max_seq_len {max_len}")
    model.train()
    optimizer = make_optimizer(model, config)
    start_step = checkpoints.restore(latest, optimizer, accelerator) if latest else 0
    model, optimizer = accelerator.prepare(model, optimizer)
    metrics_path = start_run(
        out_dir, config, start_step, accelerator, log_with, asdict(reward_config)
    )

    # step 4. the loop
    history: list[dict[str, Any]] = []
    world, rows = accelerator.num_processes, config.batch_size
    bar = tqdm(
        total=config.steps,
        initial=start_step,
        desc="reward",
        disable=not (show_progress and accelerator.is_main_process),
    )
    window_start, window_tokens, correct_sum, pair_sum = time.perf_counter(), 0, 0, 0
    step = start_step
    while step < config.steps:
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        first = (step * world + accelerator.process_index) * rows
        groups = ratings = None
        if group_schedule is not None:
            batch = [train_groups[i] for i in group_schedule.items(first, rows)]
            groups = _to(encode_groups(batch, tokenizer, config.seq_len), accelerator.device)
            window_tokens += int(groups["mask"].sum())
        if rating_schedule is not None:
            batch = [prefs.ratings[i] for i in rating_schedule.items(first, rows)]
            ratings = _to(encode_ratings(batch, tokenizer, config.seq_len), accelerator.device)
            window_tokens += int(ratings["mask"].sum())
        with accelerator.autocast():
            loss, correct, total = step_loss(model, groups, ratings, reward_config)
        accelerator.backward(loss)
        if config.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        correct_sum, pair_sum = correct_sum + correct, pair_sum + total
        step += 1
        bar.update(1)

        if step % config.log_every == 0 or step == config.steps:
            counts = accelerator.reduce(
                torch.tensor([correct_sum, pair_sum], device=accelerator.device), "sum"
            )
            elapsed = time.perf_counter() - window_start
            record = {
                "step": step,
                "loss": accelerator.reduce(loss.detach(), "mean").item(),
                "accuracy": counts[0].item() / max(1, counts[1].item()),
                "lr": lr,
                "tokens_per_s": round(window_tokens * world / max(elapsed, 1e-9), 1),
            }
            evaluate = config.eval_every and (step % config.eval_every == 0 or step == config.steps)
            if evaluate and heldout_groups:
                record["eval_accuracy"] = evaluate_accuracy(
                    model, heldout_groups, tokenizer, config.seq_len, rows, accelerator
                )
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}")
            if accelerator.is_main_process:
                append_jsonl(metrics_path, record)
            accelerator.log(record, step=step)
            window_start, window_tokens, correct_sum, pair_sum = time.perf_counter(), 0, 0, 0

        # step 5. checkpoints; the last one also stores score normalisation statistics
        if step == config.steps and train_groups:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.set_normalization(
                normalization_scores(unwrapped, train_groups, tokenizer, config.seq_len, rows)
            )
        periodic = config.checkpoint_every and step % config.checkpoint_every == 0
        if periodic or step == config.steps:
            checkpoints.save(
                step,
                accelerator.unwrap_model(model),
                optimizer,
                accelerator,
                {"train_config.json": asdict(config)},
            )
    bar.close()
    accelerator.end_training()
    return history
