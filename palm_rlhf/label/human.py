"""People in place of the simulated labeler: the demo's labeling stage with `--human`.

The demo samples its K responses per training prompt into `tasks.jsonl`, serves the ranking
page, and waits until someone presses "Done labeling" (or `target` rankings are in); the log
it wrote, `rankings.jsonl`, is then what the reward model trains on, as with the rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.preferences import PreferenceGroup, describe_skipped, load_preferences
from ..data.prompts import PromptRecord
from ..model.palm import PaLM
from ..tokenizers.base import Tokenizer
from .log import RankingLog
from .server import serve_until_done
from .session import LabelSession
from .tasks import sample_tasks, write_tasks


@dataclass(frozen=True)
class HumanLabeling:
    """Where the page is served, and when labeling ends."""

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    """None: a fresh random token, printed with the URL."""
    target: int | None = None
    """Continue once this many rankings are in (None: when a labeler presses "Done")."""
    per_task: int = 1


def rank_by_people(
    policy: PaLM,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    k: int,
    max_new_tokens: int,
    seed: int,
    out_dir: Path,
    options: HumanLabeling,
    announce: Callable[[str], None] = print,
) -> list[PreferenceGroup]:
    tasks = sample_tasks(
        policy,
        tokenizer,
        [PromptRecord(p) for p in prompts],
        k,
        max_new_tokens,
        seed=seed,
        policy_name=str(out_dir / "pretrain"),
        show_progress=False,
    )
    write_tasks(tasks, out_dir / "tasks.jsonl")
    log = RankingLog(out_dir / "rankings.jsonl")
    try:
        session = LabelSession(tasks, log, options.per_task, target=options.target)
        serve_until_done(session, options.host, options.port, options.token, announce=announce)
        ranked = len(log.active_rankings())
    finally:
        log.close()
    if not ranked:
        raise ValueError(f"no rankings were submitted to {out_dir / 'rankings.jsonl'}")
    data = load_preferences(out_dir / "rankings.jsonl")
    skipped = describe_skipped(data.skipped) or "none"
    announce(f"{len(data.groups)} rankings to train on; skipped: {skipped}")
    return data.groups
