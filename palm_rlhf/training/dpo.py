"""Direct preference optimisation, offline, from the preference JSONL the reward loop reads.

DPO (Rafailov et al. 2023) trains the policy on the rankings themselves, with no reward model
and no sampling: the implicit reward of a response is beta * (log pi(y|x) - log pi_ref(y|x)),
summed over its tokens, and the losses of `losses.dpo` ask the better response's implicit reward
to exceed the worse one's. K-wise rankings enter whole: as every untied pair weighted 1/C(K,2)
(sigmoid, IPO, conservative DPO), or through the listwise Plackett-Luce likelihood of the
ranking's tiers.

The policy trains a "dpo" LoRA scope on its frozen base, so the reference is the same weights
with adapters off; with full_finetune it is a frozen copy of the starting checkpoint. Either way
the reference log-probs are computed once per completion, before training, in fixed batches,
and cached: training then runs one forward per completion per step.

The loop follows `train_reward`'s conventions: batches are a pure function of (seed, step,
rank), checkpoints (adapters/model + optimizer + RNG, no pickle) make a resumed run replay the
uninterrupted one, the held-out split is by prompt, and every rank takes the same step (DDP).
Rows are `data.sft.sft_example`'s: [bos] + prompt + response + [eos], scored on response and eos.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from ..config import LoRAConfig, load_config, save_config
from ..data.preferences import PreferenceData, PreferenceGroup, describe_skipped, load_preferences
from ..data.sft import sft_example
from ..losses.dpo import plackett_luce_loss, preference_metrics, ranking_dpo_loss, sequence_logprobs
from ..model.lora import fold_policy_adapter, lora_parameters
from ..model.palm import PaLM
from ..tokenizers.base import Tokenizer, pad_sequences
from ..tokenizers.files import checkpoint_tokenizer
from .config import DPOConfig, TrainConfig
from .fsdp import in_lockstep, shard_models
from .reward import refuse_unused_fields, split_preferences
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

SCOPE = "dpo"


def encode_policy_rows(
    groups: list[PreferenceGroup], tokenizer: Tokenizer, seq_len: int
) -> dict[str, Tensor]:
    """Every completion of `groups` as one flat, right-padded batch of policy rows: tokens,
    mask, loss_mask (N, n) and ranks, group (N,) in `losses.preference.ranking_loss`'s layout."""
    rows, loss_masks, ranks, group = [], [], [], []
    for index, item in enumerate(groups):
        prompt = tokenizer.encode(item.prompt)
        for response, rank in zip(item.responses, item.ranks, strict=True):
            tokens, loss_mask = sft_example(tokenizer, prompt, tokenizer.encode(response), seq_len)
            rows.append(tokens)
            loss_masks.append(loss_mask)
            ranks.append(rank)
            group.append(index)
    tokens, mask = pad_sequences(rows, tokenizer.pad_id, "right")
    loss_mask = torch.zeros_like(mask)
    for row, flags in enumerate(loss_masks):
        loss_mask[row, : len(flags)] = torch.tensor(flags)
    return {
        "tokens": tokens,
        "mask": mask,
        "loss_mask": loss_mask,
        "ranks": torch.tensor(ranks),
        "group": torch.tensor(group),
    }


def response_logprobs(model: nn.Module, batch: dict[str, Tensor], scope: str | None) -> Tensor:
    """(N,) log pi(response + eos | prompt) of each row, summed over its loss tokens."""
    tokens, mask = batch["tokens"], batch["mask"]
    # Each position predicts the next token; chunked, so no (N, n, v) logits are built.
    stats = model(tokens[:, :-1], mask=mask[:, :-1], lora_scope=scope, targets=tokens[:, 1:])
    return sequence_logprobs(stats.logprobs, batch["loss_mask"][:, 1:])  # (N, n - 1) summed


@torch.no_grad()
def reference_logprobs(
    reference: PaLM,
    groups: list[PreferenceGroup],
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
) -> list[Tensor]:
    """Per group, (K,) reference log-probs of its completions, adapters off, computed once in
    batches of batch_size groups in list order (so a resumed run computes the same bits)."""
    reference.eval()
    device = reference.token_emb.weight.device
    out: list[Tensor] = []
    for start in range(0, len(groups), batch_size):
        chunk = groups[start : start + batch_size]
        batch = to_device(encode_policy_rows(chunk, tokenizer, seq_len), device)
        logps = response_logprobs(reference, batch, None).cpu()
        out.extend(logps[batch["group"].cpu() == i] for i in range(len(chunk)))
    return out


def dpo_loss(logratios: Tensor, batch: dict[str, Tensor], config: DPOConfig) -> Tensor:
    """The configured objective over a flat batch of completions (`losses.dpo`)."""
    if config.loss_type == "plackett_luce":
        return plackett_luce_loss(logratios, batch["ranks"], batch["group"], config.beta)
    return ranking_dpo_loss(
        logratios,
        batch["ranks"],
        batch["group"],
        config.beta,
        config.loss_type,
        config.label_smoothing,
    )


STATISTICS = (
    "chosen_logp",
    "chosen_reward",
    "rejected_logp",
    "rejected_reward",
    "reward_accuracy",
    "reward_margin",
)


def batch_statistics(
    logps: Tensor, batch: dict[str, Tensor], config: DPOConfig
) -> dict[str, Tensor]:
    """The logged statistics of one micro-batch: implicit-reward accuracy, margin and chosen /
    rejected rewards (beta * log-ratio), and the chosen / rejected log-probs themselves."""
    logps = logps.detach()
    ranks, group = batch["ranks"], batch["group"]
    stats = preference_metrics(logps - batch["ref_logps"], ranks, group, config.beta)
    plain = preference_metrics(logps, ranks, group, 1.0)
    stats["chosen_logp"], stats["rejected_logp"] = plain["chosen_reward"], plain["rejected_reward"]
    return {key: stats[key] for key in STATISTICS}


def _batch(
    groups: list[PreferenceGroup],
    refs: list[Tensor],
    tokenizer: Tokenizer,
    seq_len: int,
    device: torch.device,
) -> dict[str, Tensor]:
    batch = encode_policy_rows(groups, tokenizer, seq_len)
    batch["ref_logps"] = torch.cat(refs)
    return to_device(batch, device)


@torch.no_grad()
def evaluate_preferences(
    model: PaLM,
    groups: list[PreferenceGroup],
    refs: list[Tensor],
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    config: DPOConfig,
    accelerator: Accelerator,
    scope: str | None,
) -> dict[str, float]:
    """Held-out implicit-reward accuracy and margin over untied pairs: each process scores its
    share of the groups and the sums are reduced over processes."""
    rank, world = accelerator.process_index, accelerator.num_processes
    sums = torch.zeros(3, device=accelerator.device)  # correct, margin sum, pairs
    starts = range(rank * batch_size, len(groups), world * batch_size)
    # A sharded forward is a collective: every process makes as many (`in_lockstep`).
    for start, counts in in_lockstep(starts, 0, model, accelerator):
        batch = _batch(
            groups[start : start + batch_size],
            refs[start : start + batch_size],
            tokenizer,
            seq_len,
            accelerator.device,
        )
        logratios = response_logprobs(model, batch, scope)
        stats = preference_metrics(
            logratios - batch["ref_logps"], batch["ranks"], batch["group"], config.beta
        )
        pairs = stats["num_pairs"]
        if counts:
            sums += torch.stack(
                [stats["reward_accuracy"] * pairs, stats["reward_margin"] * pairs, pairs]
            )
    sums = accelerator.reduce(sums, reduction="sum") if world > 1 else sums
    pairs = sums[2].clamp(min=1)
    return {
        "eval_reward_accuracy": (sums[0] / pairs).item(),
        "eval_reward_margin": (sums[1] / pairs).item(),
    }


def _starting_policy(init: str | Path, dtype: torch.dtype | None) -> PaLM:
    """init as the policy it holds: an adapter it carries (a PPO/GRPO run's "actor") merged."""
    policy = PaLM.from_pretrained(init, dtype=dtype)
    fold_policy_adapter(policy)
    return policy


def _policy(
    init: str | Path, latest: Path | None, config: DPOConfig, train: TrainConfig
) -> tuple[PaLM, PaLM]:
    """(policy, reference): the policy from the latest checkpoint when resuming, else from init;
    with LoRA the reference is the policy itself (adapters off), else a frozen copy of init.
    Both in eval mode: dropout stays off, as it was for the cached reference (checklist 5).
    A full fine-tune trains float32 master weights; LoRA keeps the base as stored (or in
    base_dtype) and its adapter in float32."""
    if config.full_finetune:
        reference = _starting_policy(init, torch.float32)
        policy = (
            PaLM.from_pretrained(latest, dtype=torch.float32)
            if latest is not None
            else copy.deepcopy(reference)
        )
        return policy.requires_grad_(True).eval(), reference.requires_grad_(False).eval()
    if latest is not None:
        # its base is init's, merged; its adapter is ours
        policy = PaLM.from_pretrained(latest)
    else:
        policy = _starting_policy(init, None)
        policy.add_lora(SCOPE, LoRAConfig(rank=config.lora_rank, alpha=config.lora_alpha))
    policy.requires_grad_(False)
    adapter = lora_parameters(policy, SCOPE)
    for param in adapter:
        param.requires_grad_(True)
    set_training_dtypes(policy, adapter, train.base_dtype, train.mixed_precision)
    return policy.eval(), policy


def train_dpo(
    init: str | Path,
    data: str | Path | PreferenceData,
    config: TrainConfig,
    dpo_config: DPOConfig | None = None,
    out_dir: str | Path = "runs/dpo",
    resume: bool = False,
    heldout_fraction: float = 0.1,
    aggregate: str = "none",
    accelerator: Accelerator | None = None,
    tokenizer: Tokenizer | None = None,
    log_with: str | list[str] | None = None,
    show_progress: bool = True,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """DPO from the PaLM checkpoint `init` on preference data; returns the logged metrics (also
    out_dir/metrics.jsonl: step, loss, lr, grad_norm, tokens_per_s, reward_accuracy,
    reward_margin, chosen/rejected rewards and log-probs, and eval_reward_accuracy/margin every
    eval_every steps and at the end). `config.batch_size` counts
    prompt groups per micro-batch and process; `config.seq_len` cuts each row. The trained
    policy is out_dir (a run directory PaLM.from_pretrained reads; sample it with
    lora_scope="dpo" unless full_finetune)."""
    # step 1. processes, seeds, output, options
    refuse_unused_fields(config, "DPO")
    dpo_config = dpo_config or DPOConfig()
    owns_accelerator = accelerator is None
    accelerator = accelerator or make_loop_accelerator(config, log_with, out_dir)
    out_dir = Path(out_dir)
    if not Path(init).exists():
        raise FileNotFoundError(f"{init}: no such checkpoint to start DPO from")
    tokenizer = checkpoint_tokenizer(init, tokenizer)
    torch.manual_seed(config.seed)

    # step 2. data: rankings split by prompt; ratings carry no ordering DPO can use. Read
    # before the run directory is claimed, so a bad file costs nothing already written.
    prefs = data if isinstance(data, PreferenceData) else load_preferences(data, aggregate)
    skipped = describe_skipped(prefs.skipped)
    if accelerator.is_main_process and (skipped or prefs.ratings):
        ignored = f"; {len(prefs.ratings)} rating records ignored" if prefs.ratings else ""
        print(f"{data}: skipped records that carry no ordering: {skipped or 'none'}{ignored}")
    train_groups, heldout_groups, _ = split_preferences(prefs, heldout_fraction, config.seed)
    if not train_groups:
        raise ValueError(f"{data}: no rankings or pairs to train DPO on")
    schedule = WindowSchedule(len(train_groups), config.seed)
    claim_run_dir(out_dir, RUN_MARKERS, resume, overwrite, accelerator)
    checkpoints = TrainingCheckpoints(out_dir / "checkpoints", config.keep_checkpoints)

    # step 3. policy and reference; the reference log-probs, once, before any update
    latest = checkpoints.latest() if resume else None
    if latest is not None:
        saved = load_config(DPOConfig, latest / "dpo_config.json")
        if saved != dpo_config:
            raise ValueError(f"{latest}: saved with a different DPOConfig: {saved}")
    if dpo_config.full_finetune and config.base_dtype != "stored":
        raise ValueError(FULL_FINETUNE_BASE_DTYPE)
    policy, reference = _policy(init, latest, dpo_config, config)
    if config.fsdp:  # sharded before the reference pass, which then runs sharded too
        shard_models([policy, reference], accelerator)
    else:
        policy.to(accelerator.device)
        reference.to(accelerator.device)
    rows = config.batch_size
    # Under the precision training runs at, so that policy == reference gives log-ratios of 0.
    with accelerator.autocast():
        train_refs = reference_logprobs(reference, train_groups, tokenizer, config.seq_len, rows)
        heldout_refs = reference_logprobs(
            reference, heldout_groups, tokenizer, config.seq_len, rows
        )
    if reference is not policy:
        del reference  # a full copy: free it, its log-probs are cached
    scope = None if dpo_config.full_finetune else SCOPE
    policy.set_activation_checkpointing(config.activation_checkpointing)
    model, optimizer, start_step = prepare_training(
        policy, config, accelerator, checkpoints, latest
    )
    metrics_path = start_run(
        out_dir,
        config,
        start_step,
        accelerator,
        log_with,
        asdict(dpo_config),
        {"data": data, "init": init},
    )
    if accelerator.is_main_process:
        save_config(dpo_config, out_dir / "dpo_config.json")

    # step 4. the loop (mechanics in training/step.py): accumulate micro-batches, clip, step
    bar = progress_bar(config, start_step, "dpo", show_progress and accelerator.is_main_process)
    window, history = MetricWindow(accelerator.device), []
    began, step = time.perf_counter(), start_step
    while step < config.steps:
        lr = set_lr(optimizer, step, config)
        for first, forward_context in micro_batches(step, config, accelerator, model):
            picked = schedule.items(first, rows)
            batch = _batch(
                [train_groups[i] for i in picked],
                [train_refs[i] for i in picked],
                tokenizer,
                config.seq_len,
                accelerator.device,
            )
            with forward_context:
                logps = response_logprobs(model, batch, scope)
                logratios = logps - batch["ref_logps"]
                loss = dpo_loss(logratios, batch, dpo_config)
            accelerator.backward(loss / config.grad_accum)
            window.add(loss, int(batch["mask"].sum()), **batch_statistics(logps, batch, dpo_config))
        grad_norm = clip_and_step(model, optimizer, config, accelerator)
        step += 1
        bar.update(1)
        stop = out_of_time(began, config, accelerator)
        final = step == config.steps or stop

        # step 5. log (and evaluate) every log_every steps and at the end
        if due(step, config.log_every, final):
            record, totals = window.close(step, lr, grad_norm, accelerator)
            # each statistic's mean over the window's micro-batches and the processes
            record.update({k: totals[k] / totals["micro_batches"] for k in STATISTICS})
            if heldout_groups and config.eval_every and due(step, config.eval_every, final):
                record.update(
                    evaluate_preferences(
                        accelerator.unwrap_model(model),
                        heldout_groups,
                        heldout_refs,
                        tokenizer,
                        config.seq_len,
                        rows,
                        dpo_config,
                        accelerator,
                        scope,
                    )
                )
            history.append(record)
            write_record(record, metrics_path, accelerator, bar, "reward_accuracy")

        # step 6. checkpoints (the policy with its adapter, optimizer, RNG)
        if due(step, config.checkpoint_every, final):
            files = {"train_config.json": asdict(config), "dpo_config.json": asdict(dpo_config)}
            checkpoints.save(step, accelerator.unwrap_model(model), optimizer, accelerator, files)
        if stop:
            break
    bar.close()
    finish_run(accelerator, owns_accelerator)
    return history
