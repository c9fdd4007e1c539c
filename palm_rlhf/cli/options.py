"""Options shared by every `palm-rlhf` subcommand: one --flag per config field (its docstring
is the help), the accelerator, --resume/--overwrite, and the closing line."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import field_docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_dataclass_options(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str,
    skip: Sequence[str] = (),
    defaults_from_preset: bool = False,
) -> None:
    """One --option per dataclass field, typed from its default, documented by its docstring."""
    group = parser.add_argument_group(title)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        default = field.default
        help_text = docs.get(field.name, "")
        if defaults_from_preset:
            help_text += " (default: from --preset)"
        else:
            help_text += f" (default: {default})"
        # A bool option given alone means true (--fsdp); --fsdp false still reads a value.
        bare = {"nargs": "?", "const": True} if isinstance(default, bool) else {}
        group.add_argument(
            _flag(field.name),
            dest=field.name,
            default=None,
            type=_option_type(field),
            help=help_text,
            **bare,
        )


def _option_type(field: dataclasses.Field) -> Any:
    """The argparse type of a config field: from its default, or from its annotation where
    the default (None, an empty tuple) does not say. Tuples are given comma-separated."""
    annotation = str(field.type)
    if annotation == "tuple[str, ...]":
        return lambda text: tuple(item.strip() for item in text.split(","))
    if annotation == "tuple[bool, ...]":
        return lambda text: tuple(_parse_bool(item.strip()) for item in text.split(","))
    if annotation == "int | None" or field.default is dataclasses.MISSING:
        return int
    if annotation == "float | None":
        return float
    kind = type(field.default)
    if kind not in (bool, int, float, str):
        raise TypeError(f"{field.name}: no command-line type for {annotation}")
    return _parse_bool if kind is bool else kind


def given_options(cls: type, args: argparse.Namespace, skip: Sequence[str] = ()) -> list[str]:
    """The --flags of `cls`'s fields that the user actually gave (each defaults to None)."""
    return [
        _flag(field.name)
        for field in dataclasses.fields(cls)
        if field.name not in skip and getattr(args, field.name, None) is not None
    ]


def check_launcher_precision(mixed_precision: str) -> None:
    """The stage's --mixed-precision decides (its config records it in every checkpoint);
    accelerate's would be overridden without a word, so a launcher that asks for another one
    (`accelerate launch --mixed_precision`, or a launch config's `mixed_precision`) is refused
    before anything runs."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher is not None and launcher != mixed_precision:
        raise ValueError(
            f"the launcher asks for mixed precision {launcher!r}, the stage for "
            f"{mixed_precision!r} (its --mixed-precision); give the stage "
            f"--mixed-precision {launcher} or launch with --mixed_precision {mixed_precision}"
        )


def make_accelerator(args: argparse.Namespace, mixed_precision: str = "no") -> Any:
    """The one Accelerator a subcommand runs under (--cpu, the precision, --log-with).

    Launched as several processes on a machine without CUDA, the processes join on the CPU
    even without --cpu: otherwise each would set up a world of one and train alone, all of
    them writing into the same --out.
    """
    from accelerate import Accelerator

    check_launcher_precision(mixed_precision)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        cpu=args.cpu or (launched > 1 and not torch.cuda.is_available()),
        mixed_precision=mixed_precision,
        log_with=getattr(args, "log_with", None),
        project_dir=str(args.out),
    )
    if accelerator.num_processes != launched:
        raise ValueError(
            f"launched as {launched} processes, but accelerate set up a world of "
            f"{accelerator.num_processes}; check the launch config (see examples/accelerate)"
        )
    return accelerator


def add_run_options(parser: argparse.ArgumentParser, resume_help: str) -> None:
    """--resume / --overwrite, the same on every stage that writes a run directory."""
    parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start a fresh run in --out even if it holds one (its metrics and checkpoints "
        "are deleted); without it (or --resume) such a run is refused",
    )


def dataclass_from_args(
    cls: type, args: argparse.Namespace, skip: Sequence[str] = (), **base: Any
) -> Any:
    """`cls` from `base` and the flags given; a field the config refuses is named by its flag.
    skip: fields left at their defaults (a flag of the same name belongs to another config)."""
    values = dict(base)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = value
    try:
        return cls(**values)
    except ValueError as error:
        field, _, reason = str(error).partition(": ")
        if field in values and hasattr(args, field):  # a value that came with a flag
            raise ValueError(f"{_flag(field)}: {reason}") from None
        raise


def print_done(last: dict[str, Any], out: Path, accelerator: Any) -> None:
    """The last logged record, on every process: each machine of a multi-machine run shows
    how its processes ended (the record is reduced over processes, so the lines agree)."""
    summary = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()
    )
    world = accelerator.num_processes
    who = "" if accelerator.is_main_process else f" (process {accelerator.process_index})"
    print(f"done{who}: {summary}; processes={world}; checkpoints in {out / 'checkpoints'}")
