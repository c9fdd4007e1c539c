"""Checkpoint directories: JSON configs + safetensors weights, written in one atomic swap and
loaded on the meta device in the file's dtype. A training run's directory stands for its latest
checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from .atomic import read_json, replace_dir_atomic
from .safetensors import TensorPlan, load_safetensors, planned, write_safetensors

WEIGHTS_NAME = "model.safetensors"


M = TypeVar("M", bound=nn.Module)


def save_model_dir(
    directory: str | Path,
    state_dict: dict[str, torch.Tensor],
    json_files: dict[str, Any],
    extra_tensor_files: dict[str, dict[str, torch.Tensor]] | None = None,
    write: bool = True,
) -> None:
    """Write `json_files` (name -> JSON-able object, or a str written as it is; None skips
    it), the weights as model.safetensors and any `extra_tensor_files` (name -> tensors), all
    in one atomic swap. Sharded tensors are gathered one at a time as they are written, a
    collective: every process calls this, one with write=True; the others (write=False) take
    part in the same gathers, in the same order, and write nothing."""
    tensor_files = {WEIGHTS_NAME: state_dict, **(extra_tensor_files or {})}
    plans = {
        name: {key: planned(t) for key, t in tensors.items()}
        for name, tensors in tensor_files.items()
    }
    if write:
        save_planned_dir(directory, plans, json_files)
        return
    for file_plans in plans.values():  # the order save_planned_dir writes them in
        for plan in file_plans.values():
            plan.produce()


def save_planned_dir(
    directory: str | Path,
    tensor_files: dict[str, dict[str, TensorPlan]],
    files: dict[str, Any],
    owned_names: Iterable[str] = (),
) -> None:
    """`save_model_dir` for tensors that are computed as they are written (`TensorPlan`);
    `owned_names` are more names an existing `directory` may hold and still be replaced."""

    def fill(tmp: Path) -> None:
        for name, obj in files.items():
            if isinstance(obj, str):
                (tmp / name).write_text(obj, encoding="utf-8")
            elif obj is not None:
                (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        for name, plans in tensor_files.items():
            with open(tmp / name, "wb") as handle:
                write_safetensors(handle, plans)

    replace_dir_atomic(directory, fill, [*files, *tensor_files, *owned_names])


def load_state_strict(
    model: nn.Module, state: dict[str, torch.Tensor], source: Path, assign: bool = False
) -> None:
    """load_state_dict with an error that lists every missing, unexpected or misshapen tensor.
    assign=True adopts the given tensors (and their dtype) instead of copying into the
    model's: the way to fill a model built on the meta device."""
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    for name in sorted(set(expected) & set(state)):
        if expected[name].shape != state[name].shape:
            problems.append(
                f"{name}: shape {tuple(state[name].shape)} in the file, "
                f"{tuple(expected[name].shape)} in the model"
            )
    if problems:
        raise ValueError(f"{source}: weights do not match the config: " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=assign)


def latest_pointer(root: Path) -> Path | None:
    """The checkpoint directory that `root/latest.json` names (as `TrainingCheckpoints` writes
    it), or None when there is no pointer."""
    pointer = root / "latest.json"
    if not pointer.is_file():
        return None
    data = read_json(pointer)
    name = data.get("dir") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise ValueError(f"{pointer}: 'dir' must name a checkpoint directory, got {name!r}")
    return root / name


def resolve_run_dir(directory: Path) -> Path:
    """A training run's directory (holding checkpoints/latest.json, as the training loops write
    it) stands for its latest checkpoint, so `from_pretrained("runs/tiny")` works; any other
    path comes back unchanged."""
    if (directory / "config.json").is_file():
        return directory
    return latest_pointer(directory / "checkpoints") or directory


def read_checkpoint_files(
    directory: str | Path, json_names: Iterable[str], text_names: Iterable[str] = ()
) -> tuple[Path, dict[str, Any]]:
    """(the checkpoint directory a run directory stands for, {name: parsed JSON, or text for
    text_names, None where absent}); the first JSON file is required."""
    directory = resolve_run_dir(Path(directory))
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    names = list(json_names)
    files: dict[str, Any] = {}
    for name in names:
        path = directory / name
        files[name] = read_json(path) if path.is_file() else None
    if files[names[0]] is None:
        raise FileNotFoundError(f"{directory / names[0]}: missing")
    for name in text_names:
        path = directory / name
        files[name] = path.read_text(encoding="utf-8") if path.is_file() else None
    return directory, files


def load_model_dir(
    directory: str | Path,
    build: Callable[[dict[str, Any]], M],
    json_names: Iterable[str],
    dtype: torch.dtype | None = None,
    text_names: Iterable[str] = (),
) -> M:
    """Read the JSON files (the first is required) and the text files that are there, `build`
    the model from them (JSON parsed, text as str, None where absent), load weights. A run
    directory stands for its latest checkpoint (`resolve_run_dir`).

    The model is built on the meta device (no memory, no initialisation) and takes the file's
    tensors as its own (assign=True): loading holds one copy of the weights, in the file's
    dtype, or in `dtype` when one is given (cast tensor by tensor). Non-persistent buffers,
    which no file holds, are rebuilt by each module's `rebuild_buffers()`.
    """
    directory, files = read_checkpoint_files(directory, json_names, text_names)
    try:
        with torch.device("meta"):
            model = build(files)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{directory}: bad config: {error}") from None
    weights = directory / WEIGHTS_NAME
    load_state_strict(model, load_safetensors(weights, dtype), weights, assign=True)
    for module in model.modules():
        if hasattr(module, "rebuild_buffers"):
            module.rebuild_buffers()
    still_meta = [
        name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta
    ]
    if still_meta:
        raise RuntimeError(f"{directory}: tensors left unloaded after loading: {still_meta}")
    return model
