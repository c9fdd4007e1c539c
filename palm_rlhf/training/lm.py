"""Pretraining and supervised fine-tuning of a PaLM on `accelerate`.

One loop serves both: pretraining reads packed windows of a corpus, SFT reads prompt/response
pairs and counts response tokens only. The same code runs on one CPU process or many GPUs under
`accelerate launch`.

Exact resume: which windows a step reads is a pure function of (seed, step, micro-batch, rank),
the learning rate a pure function of the step, and a checkpoint holds the optimizer state and
every process's RNG state. Resuming at step N therefore replays steps N+1.. bit for bit.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from ..config import LoRAConfig, PaLMConfig
from ..data import corpus
from ..data.sft import SFTDataset, collate_sft
from ..generation import generate
from ..losses.lm import IGNORE_INDEX, lm_loss_from_stats, shift_targets
from ..model.lora import fold_policy_adapter, lora_parameters
from ..model.palm import PaLM
from ..storage.atomic import read_json
from ..storage.checkpoint import resolve_run_dir
from ..tokenizers.base import ByteTokenizer, Tokenizer, check_vocabulary, encode_prompt, stop_ids
from ..tokenizers.files import checkpoint_tokenizer, tokenizer_files
from .config import TrainConfig
from .fsdp import gathered, in_lockstep
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

SFT_SCOPE = "sft"  # the LoRA scope a pretrain/SFT run with lora_rank > 0 trains


def load_datasets(
    data: str | Path,
    config: TrainConfig,
    tokenizer: Tokenizer,
    cache_dir: Path,
    sft: bool,
    max_seq_len: int,
):
    """(train, heldout) datasets whose items are dicts of tokens / mask / loss_mask."""
    if sft:
        dataset = SFTDataset(Path(data), tokenizer, max_seq_len=config.seq_len + 1)
        heldout_ids = [i for i in range(len(dataset)) if corpus.is_heldout(f"example-{i}")]
        if not heldout_ids:
            heldout_ids = [len(dataset) - 1]
        held = set(heldout_ids)
        train_ids = [i for i in range(len(dataset)) if i not in held] or heldout_ids
        # The loss counts response tokens and eos; bits per byte divides by the responses' text.
        scored = sum(sum(dataset.examples[i][1]) for i in heldout_ids)
        tokens_per_byte = scored / max(1, sum(dataset.response_bytes[i] for i in heldout_ids))
        return Subset(dataset, train_ids), Subset(dataset, heldout_ids), tokens_per_byte
    sources = corpus.resolve_corpus(str(data), jsonl_field=config.jsonl_field)
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
        return collate_sft(items, pad_id)
    tokens = torch.stack(items)
    return {"tokens": tokens, "mask": None, "loss_mask": None}


def micro_batch_loss(
    model: nn.Module,
    batch: dict[str, Tensor],
    z_loss_weight: float,
    lora_scope: str | None = None,
) -> Tensor:
    """Calls the (possibly DDP-wrapped) model's forward, so gradient sync hooks run; the loss
    comes from per-token statistics computed in chunks, never from (b, n, v) logits."""
    inputs, input_mask, targets = shift_targets(batch["tokens"], batch["mask"], batch["loss_mask"])
    stats = model(inputs, mask=input_mask, targets=targets, lora_scope=lora_scope)
    return lm_loss_from_stats(stats, targets, z_loss_weight=z_loss_weight)


@torch.no_grad()
def evaluate_bpb(
    model: nn.Module,
    dataset,
    config: TrainConfig,
    accelerator: Accelerator,
    pad_id: int,
    tokens_per_byte: float,
    lora_scope: str | None = None,
) -> float:
    """Held-out bits per byte: summed next-token nats / ln 2 / bytes, over a fixed set of
    held-out batches shared out across processes."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    count = min(len(dataset), config.eval_batches * config.batch_size)
    mine = list(range(accelerator.process_index, count, accelerator.num_processes))
    batches = [mine[i : i + config.batch_size] for i in range(0, len(mine), config.batch_size)]
    for rows, counts in in_lockstep(batches, [0], model, accelerator):
        batch = to_device(collate([dataset[i] for i in rows], pad_id), accelerator.device)
        inputs, input_mask, targets = shift_targets(
            batch["tokens"], batch["mask"], batch["loss_mask"]
        )
        with accelerator.autocast():
            stats = model(inputs, mask=input_mask, targets=targets, lora_scope=lora_scope)
        keep = targets != IGNORE_INDEX
        nats = -stats.logprobs[keep].sum()
        if counts:
            total += torch.stack((nats.double(), keep.sum().double()))
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    nats_per_token = (total[0] / total[1].clamp(min=1)).item()
    return nats_per_token / math.log(2) * tokens_per_byte


def train_lm(
    model_config: PaLMConfig | None,
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    init_checkpoint: str | Path | None = None,
    sft: bool = False,
    accelerator: Accelerator | None = None,
    tokenizer: Tokenizer | None = None,
    log_with: str | list[str] | None = None,
    show_progress: bool = True,
    overwrite: bool = False,
    data: str | Path = "stdlib",
) -> list[dict[str, Any]]:
    """Train and return the logged metric dicts (also written to out_dir/metrics.jsonl: step,
    loss, lr, grad_norm, tokens_per_s, and eval_bpb every eval_every steps and at the end).

    data: the corpus: 'stdlib' (this Python's standard-library sources), a text file, a folder
    of text files, a .gz file or a .jsonl file (its `config.jsonl_field`); with sft, a JSONL of
    {"prompt", "response"} pairs.

    model_config: the architecture of a fresh model. With init_checkpoint the architecture is
    the checkpoint's: pass None (or the same config). A fresh run into an out_dir that already
    holds a run is refused unless resume (continue it) or overwrite (delete its metrics and
    checkpoints first).
    """
    # step 1. processes, output folder, seeds
    lora = config.lora_rank > 0
    if config.base_dtype != "stored" and not lora:
        raise ValueError(f"{FULL_FINETUNE_BASE_DTYPE} (give --lora-rank for a LoRA SFT)")
    if lora and init_checkpoint is None and not resume:
        raise ValueError("lora_rank: a LoRA scope fine-tunes a pretrained model; give --init")
    owns_accelerator = accelerator is None
    accelerator = accelerator or make_loop_accelerator(config, log_with, out_dir)
    out_dir = Path(out_dir)
    claim_run_dir(out_dir, RUN_MARKERS, resume, overwrite, accelerator)
    checkpoints = TrainingCheckpoints(out_dir / "checkpoints", config.keep_checkpoints)
    latest = checkpoints.latest() if resume else None
    if init_checkpoint is not None:
        model_config = _init_architecture(init_checkpoint, model_config)
    # The tokenizer the model reads: its checkpoint's (a resumed run's, or the init's).
    if latest is not None or init_checkpoint is not None:
        tokenizer = checkpoint_tokenizer(latest or init_checkpoint, tokenizer)
    if model_config is None:
        raise ValueError("train_lm needs a model_config, or an init_checkpoint to start from")
    tokenizer = tokenizer or ByteTokenizer()
    check_vocabulary(tokenizer, model_config.num_tokens)
    if config.seq_len + 1 > model_config.max_seq_len:
        raise ValueError(
            f"seq_len {config.seq_len} + 1 exceeds the model's max_seq_len "
            f"{model_config.max_seq_len}"
        )
    torch.manual_seed(config.seed)

    # step 2. data (tokenized once into a cache; the main process builds it first)
    with accelerator.main_process_first():
        train_set, heldout_set, tokens_per_byte = load_datasets(
            data, config, tokenizer, out_dir / "cache", sft, model_config.max_seq_len
        )
    schedule = WindowSchedule(len(train_set), config.seed)

    # step 3. model and optimizer: fresh, from an init checkpoint, or resumed
    if resume and latest is None and accelerator.is_main_process:
        tqdm.write(f"no checkpoint in {checkpoints.root}; starting from scratch")
    # A full fine-tune trains float32 master weights whatever the checkpoint stores (optimizer
    # steps in bf16 lose small updates; --mixed-precision bf16 autocasts). LoRA keeps the base
    # as stored (or in base_dtype) and trains the 'sft' scope in float32.
    load_dtype = None if lora else torch.float32
    if latest is not None:
        model = PaLM.from_pretrained(latest, dtype=load_dtype)
        if model.config != model_config:
            raise ValueError(
                f"{latest}: checkpoint config {model.config} does not match the "
                f"requested model config {model_config}"
            )
    elif init_checkpoint is not None:
        model = PaLM.from_pretrained(init_checkpoint, dtype=load_dtype)
        if lora:  # the policy the checkpoint holds (its one adapter folded in), then ours
            fold_policy_adapter(model)
            model.add_lora(SFT_SCOPE, LoRAConfig(rank=config.lora_rank, alpha=config.lora_alpha))
    else:
        model = PaLM(model_config)
        model.tokenizer_files = tokenizer_files(tokenizer)  # saved with every checkpoint
    scope = SFT_SCOPE if lora else None
    if lora:
        if SFT_SCOPE not in model.lora_configs:
            raise ValueError(f"{latest}: holds no {SFT_SCOPE!r} LoRA scope to resume")
        adapter = lora_parameters(model, SFT_SCOPE)
        for name, param in model.named_parameters():
            param.requires_grad_(f".adapters.{SFT_SCOPE}." in name)
        set_training_dtypes(model, adapter, config.base_dtype, config.mixed_precision)
    model.train()
    model.set_activation_checkpointing(config.activation_checkpointing)
    model, optimizer, start_step = prepare_training(model, config, accelerator, checkpoints, latest)
    metrics_path = start_run(
        out_dir,
        config,
        start_step,
        accelerator,
        log_with,
        asdict(model_config),
        {"data": data, "init_checkpoint": init_checkpoint},
    )

    # step 4. the loop (mechanics in training/step.py): accumulate micro-batches, clip, step
    bar = progress_bar(
        config,
        start_step,
        "sft" if sft else "pretrain",
        show_progress and accelerator.is_main_process,
    )
    window, history = MetricWindow(accelerator.device), []
    began, step = time.perf_counter(), start_step
    while step < config.steps:
        lr = set_lr(optimizer, step, config)
        for first, forward_context in micro_batches(step, config, accelerator, model):
            rows = [train_set[i] for i in schedule.items(first, config.batch_size)]
            batch = collate(rows, tokenizer.pad_id)
            batch = to_device(batch, accelerator.device)
            with forward_context:
                loss = micro_batch_loss(model, batch, model_config.z_loss_weight, scope)
            accelerator.backward(loss / config.grad_accum)
            window.add(loss, (batch["tokens"].shape[1] - 1) * batch["tokens"].shape[0])
        grad_norm = clip_and_step(model, optimizer, config, accelerator)
        step += 1
        bar.update(1)
        stop = out_of_time(began, config, accelerator)
        final = step == config.steps or stop

        # step 5. log (and evaluate) every log_every steps and at the end; sample; checkpoint
        if due(step, config.log_every, final):
            record, _ = window.close(step, lr, grad_norm, accelerator)
            if config.eval_every and due(step, config.eval_every, final):
                record["eval_bpb"] = evaluate_bpb(
                    model, heldout_set, config, accelerator, tokenizer.pad_id, tokens_per_byte,
                    scope,
                )  # fmt: skip
            history.append(record)
            write_record(record, metrics_path, accelerator, bar, "eval_bpb")
        if config.sample_every and step % config.sample_every == 0:
            with gathered(model):  # the main process decodes alone: no collective inside
                if accelerator.is_main_process:
                    unwrapped = accelerator.unwrap_model(model)
                    bar.write(sample_text(unwrapped, tokenizer, config, scope))
        if due(step, config.checkpoint_every, final):
            unwrapped = accelerator.unwrap_model(model)
            files = {"train_config.json": asdict(config)}
            checkpoints.save(step, unwrapped, optimizer, accelerator, files)
        if stop:
            break

    # step 6. wrap up
    bar.close()
    finish_run(accelerator, owns_accelerator)
    return history


def sample_text(
    model: PaLM, tokenizer: Tokenizer, config: TrainConfig, lora_scope: str | None = None
) -> str:
    prompt = encode_prompt(tokenizer, config.sample_prompt)
    out = generate(
        model,
        [prompt],
        max_new_tokens=128,
        temperature=0.8,
        top_p=0.95,
        eos_id=stop_ids(tokenizer),
        pad_id=tokenizer.pad_id,
        seed=0,
        lora_scope=lora_scope,
    )
    text = config.sample_prompt + tokenizer.decode(out.tokens[0][out.mask[0]])
    return f"--- sample ---\n{text}\n--------------"


def _init_architecture(init_checkpoint: str | Path, requested: PaLMConfig | None) -> PaLMConfig:
    """The architecture of an init checkpoint (read from its config.json, no weights), which a
    run from it (and its resume) uses; a different requested config is an error, not ignored."""
    directory = resolve_run_dir(Path(init_checkpoint))
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (is {init_checkpoint} a PaLM checkpoint?)")
    found = PaLMConfig.from_dict(read_json(path))
    if requested is not None and requested != found:
        differ = sorted(
            name for name, value in requested.to_dict().items() if getattr(found, name) != value
        )
        raise ValueError(
            f"{init_checkpoint}: the architecture comes from the init checkpoint, but the "
            f"requested model config differs in {differ}; leave the model options out"
        )
    return found
