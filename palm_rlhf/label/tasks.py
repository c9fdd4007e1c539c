"""Labeling tasks: K sampled responses to one prompt, the unit a labeler ranks.

`palm-rlhf sample` writes tasks JSONL, one task per line:

    {"task_id": str, "prompt": str, "responses": [str, ...], "finished": [bool, ...],
     "policy": str, "generation": {...}, "fields": {...}}

`finished[i]` says response i ended with eos; `policy` and `generation` record what produced
the responses (every ranking row repeats them); `fields` are the prompt row's other JSONL
fields. Sampling can run on one machine and labeling on another: the file is all it needs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..data.prompts import PromptRecord
from ..model.palm import PaLM
from ..storage.atomic import write_bytes_atomic
from ..storage.text_files import decode_utf8, parse_jsonl, read_bytes, string_field
from ..tokenizers.base import Tokenizer
from .simulated import sample_completions

MAX_RESPONSES = 9  # the page ranks by number keys 1-9


@dataclass(frozen=True)
class Task:
    task_id: str
    prompt: str
    responses: list[str]
    finished: list[bool]
    policy: str = ""
    generation: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 2 <= len(self.responses) <= MAX_RESPONSES:
            raise ValueError(
                f"task {self.task_id!r}: needs 2 to {MAX_RESPONSES} responses, got "
                f"{len(self.responses)}"
            )
        if len(self.finished) != len(self.responses):
            raise ValueError(f"task {self.task_id!r}: one 'finished' flag per response")


def task_id_for(index: int, prompt: str, responses: Sequence[str]) -> str:
    """Stable across re-runs of the same file; the index keeps repeated prompts apart."""
    digest = hashlib.sha256(json.dumps([prompt, list(responses)]).encode()).hexdigest()
    return f"t{index:05d}-{digest[:8]}"


def sample_tasks(
    policy: PaLM,
    tokenizer: Tokenizer,
    prompts: Sequence[PromptRecord],
    k: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
    policy_name: str = "",
    lora_scope: str | None = None,
    first_index: int = 0,
    show_progress: bool = True,
) -> list[Task]:
    """K responses per prompt, sampled in batches of `batch_size` rows with the KV cache.
    `first_index` numbers the tasks (and offsets the seed) when sampling a file in chunks."""
    if not 2 <= k <= MAX_RESPONSES:
        raise ValueError(f"k must be 2 to {MAX_RESPONSES} (the page ranks by keys 1-9), got {k}")
    rows = [record.prompt for record in prompts for _ in range(k)]
    completions = sample_completions(
        policy,
        tokenizer,
        rows,
        max_new_tokens,
        temperature,
        seed + first_index * k,
        batch_size,
        lora_scope=lora_scope,
        show_progress=show_progress,
        top_p=top_p,
    )
    generation = {
        "k": k,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "lora_scope": lora_scope,
        "batch_size": batch_size,
    }
    tasks = []
    for index, record in enumerate(prompts):
        chunk = completions[index * k : (index + 1) * k]
        responses = [text for text, _ in chunk]
        tasks.append(
            Task(
                task_id=task_id_for(first_index + index, record.prompt, responses),
                prompt=record.prompt,
                responses=responses,
                finished=[done for _, done in chunk],
                policy=policy_name,
                generation=generation,
                fields=dict(record.fields),
            )
        )
    return tasks


def _task_lines(tasks: Sequence[Task]) -> bytes:
    return "".join(json.dumps(asdict(task)) + "\n" for task in tasks).encode()  # ASCII escapes


def write_tasks(tasks: Sequence[Task], path: str | Path) -> None:
    write_bytes_atomic(path, _task_lines(tasks))


def append_tasks(tasks: Sequence[Task], path: str | Path) -> None:
    """Add tasks to the end of a tasks file, synced before returning (labelers may be served
    them next, so a restart must find them)."""
    with open(path, "ab") as handle:
        handle.write(_task_lines(tasks))
        handle.flush()
        os.fsync(handle.fileno())


def load_tasks(path: str | Path) -> list[Task]:
    """Read tasks JSONL; every error names file:line. Task ids must be unique."""
    path = Path(path)
    text = decode_utf8(path, read_bytes(path))
    tasks: list[Task] = []
    seen: dict[str, int] = {}
    for lineno, obj in parse_jsonl(path, text):
        where = f"{path}:{lineno}"
        task_id = string_field(path, lineno, obj, "task_id")
        if task_id in seen:
            raise ValueError(f"{where}: task_id {task_id!r} repeats line {seen[task_id]}")
        seen[task_id] = lineno
        prompt = string_field(path, lineno, obj, "prompt")
        responses = obj.get("responses")
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise ValueError(f"{where}: field 'responses' must be a list of strings")
        finished = obj.get("finished", [False] * len(responses))
        if not isinstance(finished, list) or not all(isinstance(f, bool) for f in finished):
            raise ValueError(f"{where}: field 'finished' must be a list of booleans")
        for name in ("generation", "fields"):
            if not isinstance(obj.get(name, {}), dict):
                raise ValueError(f"{where}: field {name!r} must be an object")
        policy = obj.get("policy", "")
        if not isinstance(policy, str):
            raise ValueError(f"{where}: field 'policy' must be a string")
        try:
            task = Task(
                task_id,
                prompt,
                responses,
                finished,
                policy,
                obj.get("generation", {}),
                obj.get("fields", {}),
            )
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        tasks.append(task)
    if not tasks:
        raise ValueError(f"{path}: no tasks (the file is empty)")
    return tasks
