"""The rankings log: the file `palm-rlhf label` appends to and `palm-rlhf reward` trains on.

One JSON line per event, never rewritten:

- a ranking row, with the fields `preferences.load_preferences` reads (`prompt`, `responses` in
  the task's order, `ranking` as indices into that order, best first, ties as nested lists)
  and what says who ranked what, how: `submission_id`, `task_id`, `labeler`, `display_order`
  (the shuffled order the labeler saw, as indices into `responses`), `duration_s`,
  `created_at`, `not_rankable` (then `ranking` is []), `flags` (a list of flag names per
  response, in the task's order), `policy`, `generation`, and the prompt's `fields`;
- a retraction row, `{"retracts": <submission_id>, ...}`, written by undo: the reader drops
  the retracted ranking, the file stays append-only.

Each row is written with one `write`, flushed and fsynced under a lock before the server
acknowledges it, so an acknowledged ranking survives a crash, and a crash mid-write leaves at
most a torn last line without its newline. Opening the log detects such a line, moves its bytes
to `<log>.torn` (nothing is lost) and cuts the log back to its last complete row. A second
process that opens the same log is refused (an exclusive `flock`).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.preferences import drop_retracted, parse_ranking
from ..storage.text_files import parse_jsonl
from .tasks import Task


class SubmissionConflict(ValueError):
    """A submission id that is already in the log with different content (HTTP 409)."""


@dataclass(frozen=True)
class Submission:
    """What a labeler sends for one task. `ranking` holds indices into the task's responses,
    best first, a nested list for a tie; [] when `not_rankable`."""

    submission_id: str
    task_id: str
    labeler: str
    ranking: list[Any]
    not_rankable: bool
    flags: list[list[str]]
    duration_s: float


def check_submission(submission: Submission, task: Task) -> None:
    """Raise ValueError naming the problem; nothing is written for an invalid submission."""
    k = len(task.responses)
    if not submission.submission_id or len(submission.submission_id) > 128:
        raise ValueError("submission_id must be a non-empty string of at most 128 characters")
    if not submission.labeler.strip() or len(submission.labeler) > 100:
        raise ValueError("labeler must be a non-empty name of at most 100 characters")
    if submission.not_rankable:
        if submission.ranking:
            raise ValueError("a not-rankable submission carries no ranking (send [])")
    else:
        parse_ranking("ranking", submission.ranking, k)
    if len(submission.flags) != k or not all(
        isinstance(f, list) and all(isinstance(name, str) and 0 < len(name) <= 40 for name in f)
        for f in submission.flags
    ):
        raise ValueError(f"flags must be {k} lists (one per response) of short flag names")
    if not 0 <= submission.duration_s < 86400 * 7:
        raise ValueError(f"duration_s must be between 0 and a week, got {submission.duration_s}")


def ranking_row(task: Task, submission: Submission, display_order: list[int]) -> dict[str, Any]:
    """The one builder of a ranking row (see the module docstring)."""
    return {
        "prompt": task.prompt,
        "responses": task.responses,
        "ranking": submission.ranking,
        "submission_id": submission.submission_id,
        "task_id": task.task_id,
        "labeler": submission.labeler,
        "display_order": display_order,
        "duration_s": round(submission.duration_s, 3),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "not_rankable": submission.not_rankable,
        "flags": submission.flags,
        "policy": task.policy,
        "generation": task.generation,
        "fields": task.fields,
    }


def retraction_row(submission_id: str, retracted: dict[str, Any]) -> dict[str, Any]:
    return {
        "retracts": retracted["submission_id"],
        "submission_id": submission_id,
        "task_id": retracted["task_id"],
        "labeler": retracted["labeler"],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _same_content(row: dict[str, Any], other: dict[str, Any]) -> bool:
    keys = ("retracts", "task_id", "labeler", "ranking", "not_rankable", "flags")
    return all(row.get(key) == other.get(key) for key in keys)


def _log_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, row in parse_jsonl(path, text):
        if not isinstance(row.get("submission_id"), str):
            raise ValueError(
                f"{path}:{lineno}: not a row of a rankings log (no 'submission_id'); give "
                "`palm-rlhf label --out` a new file"
            )
        yield lineno, row


def read_log(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for each ranking row of a log that was not undone, without opening
    it for writing (a server may be appending). A torn last line is left out with a warning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such rankings log")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines[-1]:
        print(f"warning: {path}:{len(lines)}: torn last line left out", file=sys.stderr)
    rows, _ = drop_retracted(path, list(_log_rows(path, "\n".join(lines[:-1]))))
    return rows


def cut_torn_tail(path: Path, keep: Path | None = None) -> tuple[int, bytes] | None:
    """Cut a last line that lacks its newline (a write a crash interrupted) off the file,
    after appending it (synced) to `keep` if given, so nothing is lost; return its line
    number and bytes, or None when the file ends with a whole line."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return None
    cut = data.rfind(b"\n") + 1
    if keep is not None:
        with open(keep, "ab") as side:
            side.write(data[cut:] + b"\n")
            side.flush()
            os.fsync(side.fileno())
    os.truncate(path, cut)
    return data.count(b"\n") + 1, data[cut:]


class RankingLog:
    """The open log of one labeling session; thread-safe. Keeps an index of what is in it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Unbuffered, O_APPEND: each row is one os.write loop, nothing waits in a buffer.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._broken = False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise RuntimeError(
                f"{self.path}: another process is writing this rankings log (a second "
                "`palm-rlhf label` on the same --out?)"
            ) from None
        self.repaired = self._repair_torn_tail()
        self._rows: dict[str, dict[str, Any]] = {}  # submission_id -> row, in file order
        self._retracted: set[str] = set()
        for lineno, row in self._read_rows():
            self._index(row, f"{self.path}:{lineno}")

    # --------------------------------------------------------------------- opening

    def _repair_torn_tail(self) -> str | None:
        torn = cut_torn_tail(self.path, keep=Path(f"{self.path}.torn"))
        if torn is None:
            return None
        line, data = torn
        return (
            f"{self.path}:{line}: torn last line ({len(data)} bytes without a newline, left by "
            f"a crash mid-write; never acknowledged) moved to {self.path}.torn"
        )

    def _read_rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        return _log_rows(self.path, self.path.read_text(encoding="utf-8"))

    def _index(self, row: dict[str, Any], where: str) -> None:
        sid = row["submission_id"]
        if sid in self._rows:
            raise ValueError(f"{where}: submission_id {sid!r} appears twice")
        if "retracts" in row:
            target = self._rows.get(row["retracts"])
            if target is None or "retracts" in target:
                raise ValueError(f"{where}: retracts {row['retracts']!r}, no earlier ranking")
            self._retracted.add(row["retracts"])
        self._rows[sid] = row

    # --------------------------------------------------------------------- writing

    def append(self, row: dict[str, Any]) -> bool:
        """Write `row` durably; False (and nothing written) when the same submission is already
        in the log, SubmissionConflict when its id is taken by different content."""
        # ASCII escapes: no byte of a row can be read as a line break by any reader.
        line = (json.dumps(row) + "\n").encode("ascii")
        with self._lock:
            earlier = self._rows.get(row["submission_id"])
            if earlier is not None:
                if _same_content(earlier, row):
                    return False
                raise SubmissionConflict(
                    f"submission_id {row['submission_id']!r} was already used for a different "
                    "submission"
                )
            if "retracts" in row:
                target = self._rows.get(row["retracts"])
                if target is None or "retracts" in target:
                    raise ValueError(f"retracts {row['retracts']!r}, no earlier ranking")
                if row["retracts"] in self._retracted:
                    raise ValueError(f"submission {row['retracts']!r} is already undone")
            if self._broken:
                raise OSError(f"{self.path}: an earlier write failed; restart `palm-rlhf label`")
            size = os.fstat(self._fd).st_size
            try:
                written = 0
                while written < len(line):
                    written += os.write(self._fd, line[written:])
                os.fsync(self._fd)
            except OSError:
                # Not acknowledged, so not kept: cut the partial row off, and stop writing if
                # even that fails (a later row must never follow half a row).
                try:
                    os.ftruncate(self._fd, size)
                    os.fsync(self._fd)
                except OSError:
                    self._broken = True
                raise
            self._index(row, "new row")
        return True

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # --------------------------------------------------------------------- reading the index

    def active_rankings(self) -> list[dict[str, Any]]:
        """Ranking rows not undone, in file order."""
        with self._lock:
            return [
                row
                for sid, row in self._rows.items()
                if "retracts" not in row and sid not in self._retracted
            ]

    def get(self, submission_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._rows.get(submission_id)

    def last_active(self, labeler: str) -> dict[str, Any] | None:
        rows = [row for row in self.active_rankings() if row["labeler"] == labeler]
        return rows[-1] if rows else None
