"""Who ranks what next: the state of one labeling session over a task list and its log.

The page and the HTTP API are thin layers over `LabelSession`; everything that decides what a
labeler sees, and what is written, is here and is tested without a server.

- Each labeler sees each task's responses in their own shuffled order, fixed by (task,
  labeler): a reload shows the same order, and the order is stored in the row.
- A task is served to `per_task` distinct labelers. A served task is held for its labeler for
  `hold_s` seconds (so two labelers working at once are not both given the last slot), and a
  restart resumes from the log: a labeler is never served a task they already ranked.
- Undo retracts the labeler's last ranking and serves that task again next.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

from .log import (
    RankingLog,
    Submission,
    SubmissionConflict,
    check_submission,
    ranking_row,
    retraction_row,
)
from .tasks import Task


class UnknownTask(LookupError):
    """A task id that is not in the session (HTTP 404)."""


def display_order(task_id: str, labeler: str, k: int) -> list[int]:
    """The order (indices into the task's responses) this labeler sees; stable across runs."""
    seed = int.from_bytes(hashlib.sha256(f"{task_id}\0{labeler}".encode()).digest()[:8], "big")
    order = list(range(k))
    random.Random(seed).shuffle(order)
    return order


class LabelSession:
    def __init__(
        self,
        tasks: Sequence[Task],
        log: RankingLog,
        per_task: int = 1,
        hold_s: float = 900.0,
        target: int | None = None,
    ) -> None:
        if per_task < 1:
            raise ValueError(f"per_task must be >= 1, got {per_task}")
        self.tasks = {task.task_id: task for task in tasks}
        if len(self.tasks) != len(tasks):
            raise ValueError("task ids must be unique")
        self.order = [task.task_id for task in tasks]
        self.log, self.per_task, self.hold_s, self.target = log, per_task, hold_s, target
        self._lock = threading.Lock()
        self._held: dict[str, tuple[str, float]] = {}  # labeler -> (task_id, since)
        self._skipped: dict[str, set[str]] = {}
        self._again: dict[str, str] = {}  # labeler -> task to serve next (after an undo)
        self.done = threading.Event()  # set by the page's "done" button or the target count
        self.sampling = False  # a background sampler is still adding tasks
        unknown = {r["task_id"] for r in log.active_rankings()} - self.tasks.keys()
        if unknown:
            raise ValueError(
                f"{log.path} holds rankings of {len(unknown)} tasks that are not in the task "
                f"file (e.g. {sorted(unknown)[0]!r}); use the task file it was made from"
            )

    def add_tasks(self, tasks: Sequence[Task]) -> None:
        """Tasks sampled while the session runs join the end of the queue."""
        with self._lock:
            for task in tasks:
                if task.task_id in self.tasks:
                    raise ValueError(f"task id {task.task_id!r} is already in the session")
                self.tasks[task.task_id] = task
                self.order.append(task.task_id)

    # --------------------------------------------------------------------- serving

    def _rankers(self) -> dict[str, set[str]]:
        rankers: dict[str, set[str]] = {task_id: set() for task_id in self.order}
        for row in self.log.active_rankings():
            rankers[row["task_id"]].add(row["labeler"])
        return rankers

    def _holders(self, task_id: str, now: float) -> set[str]:
        return {
            who
            for who, (held, since) in self._held.items()
            if held == task_id and now - since < self.hold_s
        }

    def next_task(self, labeler: str) -> dict[str, Any] | None:
        """The task this labeler should rank now, as the page shows it, or None when none is
        left for them."""
        with self._lock:
            now, rankers = time.monotonic(), self._rankers()

            def open_to(task_id: str) -> bool:
                if labeler in rankers[task_id]:
                    return False
                others = self._holders(task_id, now) - {labeler}
                return len(rankers[task_id]) + len(others) < self.per_task

            candidates = [self._again.get(labeler), self._held.get(labeler, (None,))[0]]
            skipped = self._skipped.get(labeler, set())
            candidates += [t for t in self.order if t not in skipped]
            chosen = next((t for t in candidates if t is not None and open_to(t)), None)
            if chosen is None:
                self._held.pop(labeler, None)
                return None
            self._held[labeler] = (chosen, now)
            self._again.pop(labeler, None)
        task = self.tasks[chosen]
        order = display_order(task.task_id, labeler, len(task.responses))
        return {
            "task_id": task.task_id,
            "prompt": task.prompt,
            # Shown in display order; each carries its index into the task's responses.
            "responses": [{"id": i, "text": task.responses[i]} for i in order],
            "display_order": order,
        }

    def skip(self, labeler: str, task_id: str) -> None:
        self._task(task_id)
        with self._lock:
            self._skipped.setdefault(labeler, set()).add(task_id)
            if self._held.get(labeler, (None,))[0] == task_id:
                del self._held[labeler]

    # --------------------------------------------------------------------- writing

    def submit(self, submission: Submission) -> bool:
        """Validate and append; False when it is a retry of a submission already written."""
        task = self._task(submission.task_id)
        check_submission(submission, task)
        order = display_order(task.task_id, submission.labeler, len(task.responses))
        row = ranking_row(task, submission, order)
        with self._lock:  # the check and the write together: one ranking per labeler and task
            active = {(r["task_id"], r["labeler"]): r for r in self.log.active_rankings()}
            earlier = active.get((task.task_id, submission.labeler))
            if earlier is not None and earlier["submission_id"] != submission.submission_id:
                raise ValueError(
                    f"{submission.labeler!r} already ranked task {task.task_id!r} (undo it first)"
                )
            written = self.log.append(row)
            if self._held.get(submission.labeler, (None,))[0] == task.task_id:
                del self._held[submission.labeler]
        if self.target is not None and len(self.log.active_rankings()) >= self.target:
            self.done.set()
        return written

    def undo(self, labeler: str, submission_id: str) -> dict[str, Any] | None:
        """Retract this labeler's last ranking (a retry with the same id retracts nothing more);
        returns the retraction row, or None when there is nothing to undo."""
        with self._lock:
            earlier = self.log.get(submission_id)
            if earlier is not None:
                if "retracts" not in earlier or earlier["labeler"] != labeler:
                    raise SubmissionConflict(
                        f"submission_id {submission_id!r} was already used for another submission"
                    )
                return earlier  # a retry of an undo already written
            last = self.log.last_active(labeler)
            if last is None:
                return None
            row = retraction_row(submission_id, last)
            self.log.append(row)
            self._again[labeler] = last["task_id"]
        return row

    # --------------------------------------------------------------------- progress

    def progress(self, labeler: str | None = None) -> dict[str, Any]:
        rankers = self._rankers()
        result: dict[str, Any] = {
            "overall_done": sum(min(len(r), self.per_task) for r in rankers.values()),
            "overall_total": len(self.order) * self.per_task,
            "rankings": len(self.log.active_rankings()),
            "done": self.done.is_set(),
            "sampling": self.sampling,
        }
        if labeler is not None:
            result["labeler_done"] = sum(labeler in r for r in rankers.values())
            result["labeler_total"] = len(self.order)
        return result

    def _task(self, task_id: str) -> Task:
        if task_id not in self.tasks:
            raise UnknownTask(f"unknown task {task_id!r}")
        return self.tasks[task_id]
