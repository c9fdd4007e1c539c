"""Sharding a stage's models over processes with torch's FSDP2 (`fully_shard`).

`accelerate launch` starts and joins the processes; this module shards. accelerate's own FSDP
plugin is not used: it prepares one model per call and does nothing on CPU processes, where
the multi-process tests run. Units: one per `ParallelBlock` (its LoRA adapters inside it,
frozen bf16 base and trainable float32 adapters in one all-gather), one per PaLM for the
embedding and final norm (so the tied embedding is gathered through the logits, which are
computed inside `forward`), and one per trained head outside a PaLM (reward, rating and value
heads). `forward_hidden`, the entry point heads read, is registered so it gathers like
`forward`; the chunked log-probs run inside `forward`. Gradients are reduce-scattered (averaged)
by FSDP; frozen heads stay whole on every process.

Forward calls are collectives: every process must make the same calls in the same order.
Held-out evaluation, where processes hold different numbers of batches, runs `in_lockstep`
(processes that ran out repeat a batch whose result is dropped). Decoding, where each process
stops at its own rows' eos, runs inside `gathered`, which all-gathers every unit once and makes
no collective until it exits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from ..model.palm import PaLM

FORWARD_METHODS = ("forward_hidden",)  # PaLM entry points besides forward
T = TypeVar("T")


def check_fsdp(accelerator: Accelerator) -> None:
    """FSDP trains in float32 master weights with bf16 autocast or none: fp16's loss scaler
    belongs to accelerate's prepared optimizer, which a sharded model does not use."""
    if accelerator.mixed_precision == "fp16":
        raise ValueError("fsdp: use mixed_precision 'bf16' or 'no' (fp16 needs a loss scaler)")


def device_mesh(accelerator: Accelerator) -> DeviceMesh:
    """A 1-D mesh over every process. One process without a launcher gets a process group of
    its own (world size 1), so a sharded run needs no launcher to test."""
    if not dist.is_initialized():
        backend = "nccl" if accelerator.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(accelerator.device.type, (dist.get_world_size(),))


def is_sharded(model: nn.Module | None) -> bool:
    return model is not None and any(isinstance(m, FSDPModule) for m in model.modules())


def saves_here(tensors: Iterable[Tensor], accelerator: Accelerator) -> bool:
    """Whether this process takes part in saving `tensors` (a state dict's values): the main
    process writes, and every process gathers the sharded ones with it (non-main processes of
    an unsharded run skip the work)."""
    return accelerator.is_main_process or any(isinstance(t, DTensor) for t in tensors)


def shard_models(models: Iterable[nn.Module | None], accelerator: Accelerator) -> None:
    """`fully_shard` every PaLM found in `models` (blocks, then the PaLM) and every module
    outside a PaLM that owns trained parameters (heads). Models that share a PaLM (a reward
    model or critic on the policy's base) shard it once. Call after the dtypes are set
    (`set_training_dtypes`) and before building the optimizer: sharding replaces every
    parameter, so collect the trained ones again afterwards. Models may come on the CPU: each
    unit moves to the device as it is sharded, so no process ever holds a whole model there."""
    check_fsdp(accelerator)
    mesh = device_mesh(accelerator)
    models = [m for m in models if m is not None]
    palms = {id(p): p for m in models for p in m.modules() if isinstance(p, PaLM)}
    for palm in palms.values():
        if isinstance(palm, FSDPModule):
            continue
        for block in palm.blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        fully_shard(palm, mesh=mesh, reshard_after_forward=True)
        for method in FORWARD_METHODS:
            register_fsdp_forward_method(palm, method)
    for model in models:
        for module in _outside_palms(model):
            owns_trained = any(p.requires_grad for p in module.parameters(recurse=False))
            if owns_trained and not isinstance(module, FSDPModule):
                fully_shard(module, mesh=mesh, reshard_after_forward=True)
        model.to(accelerator.device)  # what no unit moved: frozen heads, a reward's statistics


def _outside_palms(module: nn.Module) -> Iterator[nn.Module]:
    if isinstance(module, PaLM):
        return
    yield module
    for child in module.children():
        yield from _outside_palms(child)


@contextmanager
def gathered(*models: nn.Module | None) -> Iterator[None]:
    """Every unit of the sharded `models` all-gathered once on entry and kept whole until exit:
    inside, forwards make no collective, so each process may run as many as it needs (decoding
    to its own rows' eos). Costs the whole model's memory while inside. Without sharding,
    nothing happens. A collective on entry and exit."""
    units = list({id(m): m for model in models if model is not None
                  for m in model.modules() if isinstance(m, FSDPModule)}.values())  # fmt: skip
    if not units:
        yield
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def in_lockstep(
    batches: Sequence[T], fallback: T, model: nn.Module, accelerator: Accelerator
) -> Iterator[tuple[T, bool]]:
    """(batch, counts) for each of this process's batches; then, when `model` is sharded, the
    fallback batch again with counts False until this process has made as many passes as the
    process with the most batches. Each pass through a sharded model is a collective, so a
    process that ran out of held-out batches still takes part, and its extra results are
    dropped (counts False). Unsharded, only the process's own batches."""
    most = len(batches)
    if is_sharded(model) and accelerator.num_processes > 1:  # (agreed before any pass)
        counts = accelerator.gather(torch.tensor([len(batches)], device=accelerator.device))
        most = int(counts.max())
    yield from ((batch, True) for batch in batches)
    for _ in range(most - len(batches)):
        yield fallback, False


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """Clip the gradients' global norm to max_norm (inf: measure only) and return the norm
    before clipping. Sharded gradients are DTensors: their norm is reduced over processes, so
    every process clips by the same factor."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def shard_like(full: Tensor, param: Tensor) -> Tensor:
    """`full` (a whole tensor read from a checkpoint) placed like `param`: this process's
    shard when param is sharded, else full itself. No communication: every process holds
    the whole tensor and keeps its part."""
    if not isinstance(param, DTensor):
        return full
    full = full.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)


def load_into(param: Tensor, full: Tensor) -> None:
    """Copy a whole tensor from a checkpoint into a (possibly sharded) parameter in place."""
    with torch.no_grad():
        if isinstance(param, DTensor):
            param.to_local().copy_(shard_like(full, param).to_local())
        else:
            param.copy_(full)


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """An optimizer state dict whose tensors are whole (as a checkpoint stores them), with each
    parameter-shaped tensor placed like its parameter, ready for `load_state_dict`."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    indices = [i for group in state["param_groups"] for i in group["params"]]
    per_param = dict(state["state"])
    for index, param in zip(indices, params, strict=True):
        if isinstance(param, DTensor) and index in per_param:
            per_param[index] = {
                key: shard_like(value, param)
                if isinstance(value, Tensor) and value.shape == param.shape
                else value
                for key, value in per_param[index].items()
            }
    return {**state, "state": per_param}
