"""A run directory: who may write into it, its metrics file, and decisions all ranks share.

Every stage (pretrain, SFT, reward, PPO) writes into an `--out` directory. A fresh run into a
directory that already holds a run is refused unless the caller resumes it or asks to
overwrite it: a second run must never truncate or interleave with the first one's metrics.
Metrics are JSONL, one record per logged step (or PPO iteration), cut back to the resumed step
on resume so the file reads as one uninterrupted run.

Under several processes, anything that decides whether to stop (a time limit) is decided on
rank 0 and broadcast: each rank's clock differs, and ranks that disagree about stopping hang
in the next collective.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast

from ..config import save_config
from ..storage.atomic import write_bytes_atomic


def claim_run_dir(
    out_dir: str | Path,
    markers: Iterable[str],
    resume: bool,
    overwrite: bool,
    accelerator: Accelerator | None = None,
    inputs: Iterable[str | Path] = (),
) -> None:
    """Refuse a fresh run into a directory that holds a run (any of `markers`, relative paths
    such as "metrics.jsonl" or "checkpoints"), unless resuming; with overwrite, delete those
    markers first (only them: other files in the directory are the user's), but never one that
    holds an input of the run (`inputs`, e.g. the checkpoint it starts from).

    Called before anything is written, on every process (a collective when an accelerator is
    given): all ranks look before the main process deletes, so they all take the same branch.
    """
    if resume and overwrite:
        raise ValueError("give --resume or --overwrite, not both")
    out_dir = Path(out_dir)
    found = [name for name in markers if (out_dir / name).exists()]
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not found or resume:
        return
    for source in inputs:
        for name in found:
            if Path(source).resolve().is_relative_to((out_dir / name).resolve()):
                raise ValueError(
                    f"--overwrite would delete {out_dir / name}, which holds this run's input "
                    f"{source}; copy it elsewhere first"
                )
    if not overwrite:
        raise ValueError(
            f"{out_dir} already holds a run ({', '.join(found)}); pass --resume to continue "
            "it or --overwrite to start over (Python: resume=True / overwrite=True)"
        )
    if accelerator is None or accelerator.is_main_process:
        for name in found:
            path = out_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    if accelerator is not None:
        accelerator.wait_for_everyone()


def start_run(
    out_dir: Path,
    config: Any,
    start_step: int,
    accelerator: Accelerator,
    log_with: str | list[str] | None,
    extra_config: dict[str, Any],
    inputs: dict[str, Any] | None = None,
    config_name: str = "train_config.json",
) -> Path:
    """Prepare a run directory: save the loop's config, and what it reads (`inputs`: its data
    and starting checkpoint, passed as arguments rather than config fields) as inputs.json; cut
    metrics.jsonl back to the step the run (re)starts from; start any trackers. Returns the
    metrics file's path."""
    metrics_path = out_dir / "metrics.jsonl"
    described = {key: describe_input(value) for key, value in (inputs or {}).items()}
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / config_name)
        write_bytes_atomic(out_dir / INPUTS_NAME, (json.dumps(described, indent=2) + "\n").encode())
        truncate_metrics(metrics_path, start_step)
    if log_with:
        tracked = {**asdict(config), **extra_config, **described}
        accelerator.init_trackers("palm_rlhf", config=tracked)
    return metrics_path


INPUTS_NAME = "inputs.json"


def describe_input(value: Any) -> str | None:
    """A path or spec as text; data handed over in memory (a PreferenceData) by its type."""
    if value is None or isinstance(value, str | Path):
        return None if value is None else str(value)
    return f"<{type(value).__name__} in memory>"


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int, key: str = "step") -> None:
    """On resume, drop metric lines logged after the checkpoint the run restarts from (their
    `key`, "step" or "iteration", is past `step`), so the file reads as one uninterrupted run."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get(key, 0) <= step]
    write_bytes_atomic(path, "".join(line + "\n" for line in kept).encode())


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def rank0_decides(flag: bool, accelerator: Accelerator) -> bool:
    """Rank 0's value of `flag` on every rank (for stopping rules such as a time limit)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    value = torch.tensor([int(bool(flag))], device=accelerator.device)
    return bool(broadcast(value, from_process=0).item())


def finish_run(accelerator: Accelerator, owned: bool) -> None:
    """Close the run's trackers; tear down the process group only if the loop created the
    accelerator. A caller that passed its own keeps using it (the next stage in the same
    processes needs the group: `end_training` would destroy it)."""
    if owned:
        accelerator.end_training()
        return
    for tracker in accelerator.trackers:
        tracker.finish()
