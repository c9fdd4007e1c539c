"""Training checkpoints: the model in `save_pretrained` form plus everything needed to resume.

Layout of `root/`:
    step_0000500/   config.json, model.safetensors (loadable by PaLM.from_pretrained),
                    train_state.safetensors + train_state.json (optimizer, RNG of every
                    process, step), and any extra JSON the loop adds (its TrainConfig)
    latest.json     {"step": 500, "dir": "step_0000500"}, replaced atomically after the
                    directory is complete

A process killed at any moment leaves `latest.json` pointing at a complete checkpoint: the new
directory is built under a temporary name and renamed into place before the pointer moves.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..storage.atomic import read_json, write_bytes_atomic
from ..storage.checkpoint import latest_pointer, save_model_dir
from ..storage.safetensors import flatten_state, load_safetensors, unflatten_state
from .fsdp import saves_here, shard_optimizer_state

STATE_TENSORS = "train_state.safetensors"


STATE_JSON = "train_state.json"


class TrainingCheckpoints:
    def __init__(self, root: str | Path, keep: int = 2) -> None:
        self.root, self.keep = Path(root), keep

    def latest(self) -> Path | None:
        directory = latest_pointer(self.root)
        if directory is not None and not (directory / STATE_JSON).is_file():
            raise FileNotFoundError(
                f"{self.root / 'latest.json'} points at {directory}, which is incomplete"
            )
        return directory

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        accelerator: Accelerator,
        json_files: dict[str, Any] | None = None,
    ) -> Path:
        directory = self.root / f"step_{step:07d}"
        rng = gather_rng_states(accelerator)
        main, weights = accelerator.is_main_process, model.state_dict()
        if saves_here(weights.values(), accelerator):
            # A sharded model's weights, optimizer state and base digest are gathered a tensor
            # at a time on every process; the main process writes them.
            tensors, skeleton = flatten_state(
                {
                    "optimizer": optimizer.state_dict(),
                    **rng,
                    "step": step,
                    "num_processes": accelerator.num_processes,
                }
            )
            # The model's own JSON (config.json, ...) makes the directory loadable by its
            # from_pretrained.
            files = {**model.checkpoint_json(), STATE_JSON: skeleton, **(json_files or {})}
            save_model_dir(directory, weights, files, {STATE_TENSORS: tensors}, write=main)
        if main:
            pointer = {"step": step, "dir": directory.name}
            write_bytes_atomic(self.root / "latest.json", json.dumps(pointer).encode())
            self._prune(keep_name=directory.name)
        accelerator.wait_for_everyone()
        return directory

    def restore(
        self, directory: Path, optimizer: torch.optim.Optimizer, accelerator: Accelerator
    ) -> int:
        """Load optimizer and RNG state into this process (a sharded optimizer keeps its
        shard of each saved tensor); return the step to continue from."""
        state = unflatten_state(
            read_json(directory / STATE_JSON), load_safetensors(directory / STATE_TENSORS)
        )
        if state["num_processes"] != accelerator.num_processes:
            raise ValueError(
                f"{directory}: saved by {state['num_processes']} processes, resuming with "
                f"{accelerator.num_processes}; exact resume needs the same number"
            )
        optimizer.load_state_dict(shard_optimizer_state(optimizer, state["optimizer"]))
        restore_rng_states(state, accelerator)
        return int(state["step"])

    def _prune(self, keep_name: str) -> None:
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in steps[: max(0, len(steps) - self.keep)]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)


def gather_rng_states(accelerator: Accelerator) -> dict[str, torch.Tensor]:
    """Every process's RNG states, stacked by rank: the CPU generator's as "rng" and, on a CUDA
    device, that device's generator as "cuda_rng" (dropout and sampling on a GPU draw from it),
    so a resumed run continues the same random streams. A collective: call on every rank."""
    device = accelerator.device
    states = {"rng": accelerator.gather(torch.get_rng_state()[None].to(device)).cpu()}
    if device.type == "cuda":
        cuda = torch.cuda.get_rng_state(device)[None].to(device)
        states["cuda_rng"] = accelerator.gather(cuda).cpu()
    return states


def restore_rng_states(state: dict[str, Any], accelerator: Accelerator) -> None:
    """Set this process's RNG states from `gather_rng_states`' output (by process index). A
    checkpoint saved on CPU and resumed on a GPU has no CUDA state to restore: the run goes on
    with the device's current stream (it could not replay the CPU's draws anyway)."""
    rank = accelerator.process_index
    # clone, not a view: set_rng_state rejects a row that starts at an offset into its storage
    # ("Invalid mt19937 state" on every rank but 0).
    torch.set_rng_state(state["rng"][rank].clone())
    device = accelerator.device
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"][rank].clone(), device)
