"""What the online trainers (PPO, GRPO) share about running on several processes and resuming.

- `mean_over_processes`, `average_gradients`, `sum_over_processes`, `optimizer_step`: every
  rank logs the same numbers and takes the same optimizer step (the predecessor's adapters
  drifted apart under DDP). Unsharded, an explicit all-reduce of the trained gradients
  (adapters, a value head) replaces a DDP wrapper around a model whose scopes are used by
  turns; sharded (FSDP2), FSDP reduces them itself.
- `save_rl_state` / `load_rl_state`: trained tensors, optimizer, counters and every process's
  RNG states (torch, CUDA, the trainer's sampling and shuffling generators), so a resumed run on
  the same number of processes replays the uninterrupted one. The frozen base is not saved: it
  is the checkpoint the run started from.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..storage.atomic import read_json
from ..storage.checkpoint import WEIGHTS_NAME, save_model_dir
from ..storage.safetensors import flatten_state, load_safetensors, unflatten_state
from ..training.fsdp import clip_gradients, load_into, saves_here
from ..training.state import gather_rng_states, restore_rng_states


def mean_over_processes(metrics: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    """Each metric averaged over processes (every rank gets the same numbers); a "_max_"
    metric takes the maximum instead, so a worst case stays a worst case."""
    if accelerator.num_processes == 1:
        return metrics
    out = {}
    for reduction in ("mean", "max"):
        keys = sorted(k for k in metrics if ("_max_" in k) == (reduction == "max"))
        if not keys:
            continue
        values = torch.tensor([float(metrics[k]) for k in keys], device=accelerator.device)
        if reduction == "mean":
            values = accelerator.reduce(values, reduction="mean")
        else:
            values = accelerator.gather(values[None]).amax(dim=0)
        out.update(zip(keys, values.tolist(), strict=True))
    return out


def sum_over_processes(x: Tensor, accelerator: Accelerator) -> Tensor:
    """x summed over processes (x itself with one process)."""
    if accelerator.num_processes == 1:
        return x
    return accelerator.reduce(x.to(accelerator.device), reduction="sum").to(x.device)


def average_gradients(params: list[nn.Parameter], accelerator: Accelerator) -> None:
    """Average gradients over processes before an optimizer step (a missing grad counts 0).
    Sharded parameters (FSDP) are skipped: FSDP's reduce-scatter already averaged theirs."""
    if accelerator.num_processes == 1:
        return
    for param in params:
        if isinstance(param, DTensor):
            continue
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        param.grad = accelerator.reduce(grad, reduction="mean")


def optimizer_step(
    optimizer: torch.optim.Optimizer, accelerator: Accelerator, grad_clip: float
) -> None:
    """Average the gradients over processes, clip their global norm to grad_clip (0: no
    clipping), step and zero them: the update both online trainers make."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    average_gradients(params, accelerator)
    if grad_clip > 0:
        clip_gradients(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def accumulation_divisors(num_minibatches: int, grad_accum: int) -> list[int]:
    """What each minibatch's loss is divided by: the size of the accumulation group it falls
    in. Groups hold grad_accum minibatches; the last group of an epoch may hold fewer, and is
    averaged over the ones it has, so every optimizer step takes a mean gradient."""
    sizes = []
    for index in range(num_minibatches):
        start = index - index % grad_accum
        sizes.append(min(grad_accum, num_minibatches - start))
    return sizes


def save_rl_state(
    directory: str | Path,
    prefix: str,
    accelerator: Accelerator,
    config: Any,
    trainable: dict[str, Tensor],
    state: dict[str, Any],
    generators: dict[str, torch.Generator],
) -> None:
    """Write PREFIX_config.json, PREFIX_state.json/.safetensors and the trainable tensors as
    model.safetensors into `directory`, atomically. A collective: call on every rank."""
    rng = gather_rng_states(accelerator)
    for name, generator in generators.items():
        generator_state = generator.get_state()[None].to(accelerator.device)
        rng[name] = accelerator.gather(generator_state).cpu()
    main = accelerator.is_main_process
    if saves_here(trainable.values(), accelerator):
        # Sharded tensors (FSDP) are gathered one at a time on every process; main writes.
        tensors, skeleton = flatten_state(
            {**state, "num_processes": accelerator.num_processes, **rng}
        )
        save_model_dir(
            directory,
            trainable,
            {f"{prefix}_config.json": asdict(config), f"{prefix}_state.json": skeleton},
            {f"{prefix}_state.safetensors": tensors},
            write=main,
        )
    accelerator.wait_for_everyone()


# Fields that change how a step is computed but not its result (beyond float rounding): a resume
# may change them (turn on activation checkpointing or sharding to fit a longer run), and a
# state saved before they existed loads.
RESULT_NEUTRAL_FIELDS = ("activation_checkpointing", "fsdp", "sample_gathered")


def _results_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RESULT_NEUTRAL_FIELDS}


def load_rl_state(
    directory: str | Path,
    prefix: str,
    accelerator: Accelerator,
    config: Any,
    trainable: dict[str, Tensor],
    generators: dict[str, torch.Generator],
) -> dict[str, Any]:
    """Check a `save_rl_state` directory against this run (same config, trainable tensors and
    number of processes), copy the tensors in, restore every RNG, and return the saved state
    for the trainer's own fields (optimizer, counters)."""
    directory = Path(directory)
    if not (directory / f"{prefix}_state.json").is_file():
        raise FileNotFoundError(f"{directory}: no {prefix.upper()} state to resume")
    saved_config = read_json(directory / f"{prefix}_config.json")
    wanted = json.loads(json.dumps(asdict(config)))
    # A field added since the state was saved reads as its default: the run had that behaviour.
    defaults = json.loads(json.dumps(asdict(type(config)())))
    saved_config = {**{k: v for k, v in defaults.items() if k not in saved_config}, **saved_config}
    if _results_config(saved_config) != _results_config(wanted):
        name = type(config).__name__
        raise ValueError(f"{directory}: saved with a different {name}: {saved_config}")
    weights = load_safetensors(directory / WEIGHTS_NAME)
    if set(weights) != set(trainable):
        missing = sorted(set(trainable) - set(weights))
        extra = sorted(set(weights) - set(trainable))
        raise ValueError(
            f"{directory}: trainable tensors differ (missing {missing}, unexpected {extra})"
        )
    state = unflatten_state(
        read_json(directory / f"{prefix}_state.json"),
        load_safetensors(directory / f"{prefix}_state.safetensors"),
    )
    if any(name not in state for name in generators):
        raise ValueError(
            f"{directory}: saved by an older palm_rlhf without per-process RNG states; "
            "it cannot be resumed exactly, start a new run"
        )
    saved_world = state.get("num_processes", 1)
    if saved_world != accelerator.num_processes:
        raise ValueError(
            f"{directory}: saved by {saved_world} processes, resuming with "
            f"{accelerator.num_processes}; exact resume needs the same number"
        )
    rank = accelerator.process_index
    for name, generator in generators.items():
        if state[name][rank].numel() != generator.get_state().numel():
            raise ValueError(
                f"{directory}: its {name} generator was saved on another kind of device "
                f"(this run uses {generator.device}); exact resume needs the same"
            )
    for name, param in trainable.items():
        load_into(param, weights[name])  # a sharded parameter keeps its shard
    restore_rng_states(state, accelerator)
    for name, generator in generators.items():
        generator.set_state(state[name][rank].clone())
    return state
