"""Reward-model training on human (or simulated) rankings, pairs and ratings, on `accelerate`.

The loop follows `train_lm`'s conventions: batches are a pure function of (seed, step, rank),
the learning rate a function of the step, and checkpoints (model + optimizer + RNG, no pickle)
make a resumed run replay the uninterrupted one exactly.

Each micro-batch takes `batch_size` prompt groups; every completion of a group is forwarded once
and all its untied pairs enter InstructGPT's K-wise loss (`losses.preference.ranking_loss`). Rating
records, if the data has any, add a rating loss on `batch_size` of them: cross-entropy over the
rating head when `RewardConfig.rating_bins` > 0, else regression of the scalar score onto the
rating. Groups and ratings go through the trunk in ONE forward, and a head the data never
trains (the rating head on ranking-only data) is frozen: under DDP every trained parameter must
get a gradient in every step.

The held-out split is by prompt over groups and ratings together, so no held-out prompt's
ratings train the model. Rows are built by `data.preferences.encode_completion`, cut to `seq_len`,
which the saved RewardConfig records (`max_seq_len`) so scoring cuts rows the same way.

TrainConfig fields that do not apply here (corpus and sampling options: jsonl_field,
eval_batches, sample_every, sample_prompt) must keep their defaults; anything else is refused.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor

from ..data.preferences import (
    PreferenceData,
    PreferenceGroup,
    describe_skipped,
    encode_groups,
    encode_ratings,
    load_preferences,
    split_groups,
)
from ..losses.preference import pairwise_accuracy, ranking_loss, rating_loss, rating_regression_loss
from ..model.reward import RewardConfig, RewardModel
from ..tokenizers.base import Tokenizer
from ..tokenizers.files import checkpoint_tokenizer
from .config import TrainConfig
from .fsdp import in_lockstep
from .runs import claim_run_dir, finish_run, start_run
from .state import TrainingCheckpoints
from .step import (
    FULL_FINETUNE_BASE_DTYPE,
    RUN_MARKERS,
    MetricWindow,
    WindowSchedule,
    clip_and_step,
    due,
    make_loop_accelerator,
    micro_batches,
    out_of_time,
    prepare_training,
    progress_bar,
    set_lr,
    set_training_dtypes,
    to_device,
    write_record,
)

NOT_FOR_REWARD = (
    "jsonl_field", "eval_batches", "sample_every", "sample_prompt", "lora_rank", "lora_alpha",
)  # fmt: skip
"""TrainConfig fields the reward loop has no use for; the CLI does not offer them (reward and
DPO take their LoRA settings from RewardConfig and DPOConfig)."""


def refuse_unused_fields(config: TrainConfig, stage: str) -> None:
    """The preference loops (reward, DPO) refuse the LM-only TrainConfig fields they would
    otherwise ignore silently."""
    unused = [f for f in NOT_FOR_REWARD if getattr(config, f) != getattr(TrainConfig(), f)]
    if unused:
        raise ValueError(f"{stage} does not use TrainConfig fields {unused}; leave them out")


def join_rows(
    groups: dict[str, Tensor] | None, ratings: dict[str, Tensor] | None, pad_id: int
) -> tuple[Tensor, Tensor, int]:
    """Stack group rows and rating rows (each right-padded) into one (N, n) batch for a single
    trunk pass; returns tokens, mask and the number of group rows (they come first)."""
    parts = [part for part in (groups, ratings) if part is not None]
    width = max(part["tokens"].shape[1] for part in parts)
    tokens = torch.cat(
        [
            F.pad(part["tokens"], (0, width - part["tokens"].shape[1]), value=pad_id)
            for part in parts
        ]
    )
    mask = torch.cat([F.pad(part["mask"], (0, width - part["mask"].shape[1])) for part in parts])
    return tokens, mask, 0 if groups is None else len(groups["tokens"])


def step_loss(
    model: torch.nn.Module,
    groups: dict[str, Tensor] | None,
    ratings: dict[str, Tensor] | None,
    reward_config: RewardConfig,
    pad_id: int,
) -> tuple[Tensor, int, int]:
    """(loss, correct pairs, total pairs) of one micro-batch: one call of the (possibly
    DDP-wrapped) model's forward over groups and ratings together, so DDP's hooks run once."""
    tokens, mask, num_group_rows = join_rows(groups, ratings, pad_id)
    with_ratings = ratings is not None and reward_config.rating_bins > 0
    out = model(tokens, mask, with_rating_logits=with_ratings)
    scores, rating_logits = out if with_ratings else (out, None)
    loss, correct, total = scores.sum() * 0.0, 0, 0
    if groups is not None:
        group_scores = scores[:num_group_rows]  # (N,)
        loss = ranking_loss(
            group_scores, groups["ranks"], groups["group"], margin=reward_config.pairwise_margin
        )
        correct, total = pairwise_accuracy(group_scores.detach(), groups["ranks"], groups["group"])
    if ratings is not None:
        if rating_logits is not None:
            logits = rating_logits[num_group_rows:]
            loss = loss + rating_loss(logits, ratings["ratings"].long())
        else:
            rated = scores[num_group_rows:]
            loss = loss + rating_regression_loss(rated, ratings["ratings"].float())
    return loss, correct, total


def freeze_untrained_heads(model: RewardModel, has_groups: bool, has_ratings: bool) -> None:
    """A head the data never trains gets no gradient; under DDP an unused trainable parameter
    fails the second step ("Expected to have finished reduction in the prior iteration"), and
    an optimizer would decay it for nothing. Frozen heads keep their initial weights."""
    if model.rating_head is not None and not has_ratings:
        model.rating_head.requires_grad_(False)
    if model.rating_head is not None and not has_groups:
        model.head.requires_grad_(False)  # ratings-only data trains the rating head alone


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
        batch = to_device(
            encode_groups(groups[start : start + batch_size], tokenizer, seq_len), device
        )
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
    model may be DDP-wrapped or sharded) and the counts are summed over processes."""
    mine = groups[accelerator.process_index :: accelerator.num_processes]
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    # The unwrapped model: a DDP forward is a collective (it syncs buffers), and a rank with no
    # held-out group left would skip it while the others wait. A sharded forward is one too:
    # every process makes as many (`in_lockstep`).
    unwrapped, counts = accelerator.unwrap_model(model), [0, 0]
    for batch, kept in in_lockstep(batches, groups[:1], unwrapped, accelerator):
        correct, total = accuracy_counts(
            unwrapped, batch, tokenizer, seq_len, batch_size, accelerator.device
        )
        if kept:
            counts = [counts[0] + correct, counts[1] + total]
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
    aggregate: str = "none",
    accelerator: Accelerator | None = None,
    tokenizer: Tokenizer | None = None,
    log_with: str | list[str] | None = None,
    show_progress: bool = True,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Train a reward model from a PaLM checkpoint `init` on preference data; return the logged
    metrics (also in out_dir/metrics.jsonl: step, loss, lr, grad_norm, tokens_per_s, accuracy,
    and eval_accuracy every eval_every steps and at the end). A fresh run into an out_dir
    holding a run is refused unless resume or overwrite. `aggregate` merges several labelers'
    rankings of one task (see `load_preferences`)."""
    # step 1. processes, seeds, output, options
    refuse_unused_fields(config, "reward training")
    reward_config = reward_config or RewardConfig()
    if reward_config.max_seq_len not in (0, config.seq_len):
        raise ValueError(
            f"RewardConfig.max_seq_len={reward_config.max_seq_len} differs from seq_len "
            f"{config.seq_len}; the loop records seq_len there, leave it at 0"
        )
    reward_config = dataclasses.replace(reward_config, max_seq_len=config.seq_len)
    owns_accelerator = accelerator is None
    accelerator = accelerator or make_loop_accelerator(config, log_with, out_dir)
    tokenizer = checkpoint_tokenizer(init, tokenizer)
    out_dir = Path(out_dir)
    claim_run_dir(out_dir, RUN_MARKERS, resume, overwrite, accelerator)
    checkpoints = TrainingCheckpoints(out_dir / "checkpoints", config.keep_checkpoints)
    torch.manual_seed(config.seed)

    # step 2. data: split by prompt (groups and ratings together) into train / held-out
    prefs = data if isinstance(data, PreferenceData) else load_preferences(data, aggregate)
    skipped = describe_skipped(prefs.skipped)
    if skipped and accelerator.is_main_process:
        print(f"{data}: skipped records that carry no ordering: {skipped}", flush=True)
    train_groups, heldout_groups, train_ratings = split_preferences(
        prefs, heldout_fraction, config.seed
    )
    if not train_groups and not train_ratings:
        raise ValueError(
            f"{data}: no preference groups or ratings to train on"
            + (f" (skipped: {skipped})" if skipped else "")
        )
    group_schedule = WindowSchedule(len(train_groups), config.seed) if train_groups else None
    rating_schedule = WindowSchedule(len(train_ratings), config.seed + 1) if train_ratings else None

    # step 3. model and optimizer: from the PaLM checkpoint, or resumed
    latest = checkpoints.latest() if resume else None
    # float32 master weights whatever the checkpoint stores (mixed_precision bf16 autocasts)
    # A full fine-tune trains float32 master weights; LoRA keeps the frozen base as stored
    # (bf16 stays bf16, no float32 copy), or in base_dtype; adapters and heads train in float32.
    full = reward_config.lora_rank == 0
    if full and config.base_dtype != "stored":
        raise ValueError(FULL_FINETUNE_BASE_DTYPE)
    load_dtype = torch.float32 if full else None
    model = (
        RewardModel.from_pretrained(latest, dtype=load_dtype)
        if latest is not None
        else RewardModel.from_palm_checkpoint(init, reward_config, dtype=load_dtype)
    )
    if latest is not None and model.config != reward_config:
        raise ValueError(
            f"{latest}: reward config {model.config} does not match the requested {reward_config}"
        )
    freeze_untrained_heads(model, bool(train_groups), bool(train_ratings))
    set_training_dtypes(
        model, model.trainable_parameters(), config.base_dtype, config.mixed_precision
    )
    model.train()
    model.trunk.set_activation_checkpointing(config.activation_checkpointing)
    model, optimizer, start_step = prepare_training(model, config, accelerator, checkpoints, latest)
    metrics_path = start_run(
        out_dir,
        config,
        start_step,
        accelerator,
        log_with,
        asdict(reward_config),
        {"data": data, "init": init},
    )

    # step 4. the loop (mechanics in training/step.py): accumulate micro-batches, clip, step
    rows = config.batch_size
    bar = progress_bar(config, start_step, "reward", show_progress and accelerator.is_main_process)
    window, history = MetricWindow(accelerator.device), []
    began, step = time.perf_counter(), start_step
    while step < config.steps:
        lr = set_lr(optimizer, step, config)
        for first, forward_context in micro_batches(step, config, accelerator, model):
            groups = ratings = None
            if group_schedule is not None:
                batch = [train_groups[i] for i in group_schedule.items(first, rows)]
                groups = to_device(
                    encode_groups(batch, tokenizer, config.seq_len), accelerator.device
                )
            if rating_schedule is not None:
                batch = [train_ratings[i] for i in rating_schedule.items(first, rows)]
                ratings = to_device(
                    encode_ratings(batch, tokenizer, config.seq_len), accelerator.device
                )
            with forward_context:
                loss, correct, pairs = step_loss(
                    model, groups, ratings, reward_config, tokenizer.pad_id
                )
            accelerator.backward(loss / config.grad_accum)
            tokens = sum(int(part["mask"].sum()) for part in (groups, ratings) if part is not None)
            window.add(loss, tokens, correct=correct, pairs=pairs)
        grad_norm = clip_and_step(model, optimizer, config, accelerator)
        step += 1
        bar.update(1)
        stop = out_of_time(began, config, accelerator)
        final = step == config.steps or stop

        # step 5. log (and evaluate) every log_every steps and at the end
        if due(step, config.log_every, final):
            record, totals = window.close(step, lr, grad_norm, accelerator)
            record["accuracy"] = totals["correct"] / max(1.0, totals["pairs"])
            if heldout_groups and config.eval_every and due(step, config.eval_every, final):
                record["eval_accuracy"] = evaluate_accuracy(
                    model, heldout_groups, tokenizer, config.seq_len, rows, accelerator
                )
            history.append(record)
            write_record(record, metrics_path, accelerator, bar, "accuracy")

        # step 6. checkpoints; the last one also stores score normalisation statistics
        if final and train_groups:
            unwrapped = accelerator.unwrap_model(model)
            # (every process scores the same groups: as many passes, sharded or not)
            unwrapped.set_normalization(
                normalization_scores(unwrapped, train_groups, tokenizer, config.seq_len, rows)
            )
        if due(step, config.checkpoint_every, final):
            unwrapped = accelerator.unwrap_model(model)
            files = {"train_config.json": asdict(config)}
            checkpoints.save(step, unwrapped, optimizer, accelerator, files)
        if stop:
            break
    bar.close()
    finish_run(accelerator, owns_accelerator)
    return history


def split_preferences(
    prefs: PreferenceData, heldout_fraction: float, seed: int
) -> tuple[list[PreferenceGroup], list[PreferenceGroup], list]:
    """(train groups, held-out groups, train ratings). Groups are split by prompt (both sides
    non-empty with two or more prompts); the ratings of a held-out prompt are held out too, so
    it trains nothing. Prompts that only have ratings all train: nothing evaluates them."""
    if len(prefs.groups) < 2:
        return list(prefs.groups), [], list(prefs.ratings)
    train_groups, heldout_groups = split_groups(prefs.groups, heldout_fraction, seed)
    held_prompts = {group.prompt for group in heldout_groups}
    train_ratings = [r for r in prefs.ratings if r.prompt not in held_prompts]
    return train_groups, heldout_groups, train_ratings
