"""Human preference data for the reward model: JSONL readers, encoding and a prompt-level split.

One JSON object per line; the format is told apart per line by its keys, so one file may mix
them (other keys, e.g. an id, are ignored):

- pair:    {"prompt": str, "chosen": str, "rejected": str}
- ranking: {"prompt": str, "responses": [str, ...] (K >= 2), "ranking": [...]} where ranking
           lists response indices best first and an element may be a list of tied indices,
           e.g. [[0, 2], 1]: responses 0 and 2 tie for best, 1 is worst.
- rating:  {"prompt": str, "response": str, "rating": int | float}

Pairs and rankings become `PreferenceGroup`s (a pair is K=2 with ranks [0, 1]); ratings become
`RatedExample`s. Every error names file:line and the field.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..storage.text_files import decode_utf8, parse_jsonl, read_bytes, string_field
from ..tokenizers.base import Tokenizer, pad_sequences
from .rank_stats import AGGREGATES

# The keys that identify each record format.
_MARKERS = {
    "pair": {"chosen", "rejected"},
    "ranking": {"responses", "ranking"},
    "rating": {"response", "rating"},
}


@dataclass(frozen=True)
class PreferenceGroup:
    """K >= 2 responses to one prompt; ranks[i] is response i's rank, lower is better, ties
    share a rank (ranks are tier numbers: [[0, 2], 1] gives [0, 1, 0])."""

    prompt: str
    responses: list[str]
    ranks: list[int]

    def __post_init__(self) -> None:
        if len(self.responses) < 2 or len(self.ranks) != len(self.responses):
            raise ValueError(
                f"a preference group needs K >= 2 responses and one rank each, got "
                f"{len(self.responses)} responses and {len(self.ranks)} ranks"
            )


@dataclass(frozen=True)
class RatedExample:
    """One response with a graded score (for a rating head or regression)."""

    prompt: str
    response: str
    rating: int | float


@dataclass(frozen=True)
class PreferenceData:
    """What a preference file holds: comparison groups and rated examples, in file order."""

    groups: list[PreferenceGroup]
    ratings: list[RatedExample]
    skipped: dict[str, int] = field(default_factory=dict)
    """Valid records that carry no ordering, so train nothing, by reason: `not_rankable`,
    `all_tied`, `retracted` (undone on the ranking page), `unacknowledged_last_row` (a log
    row cut off before its newline)."""


AGGREGATE_CHOICES = ("none", "borda", "ranked_pairs")


def load_preferences(path: str | Path, aggregate: str = "none") -> PreferenceData:
    """Read a JSONL (or .jsonl.gz) preference file; see the module docstring for formats.

    Rows of a rankings log (`label.log`) are read as written: a retraction drops the ranking it
    names, not-rankable and all-tied rankings are counted in `skipped`. Every labeler's ranking
    of a task trains, unless `aggregate` ('borda' or 'ranked_pairs') merges the rankings that
    share a `task_id` into one.
    """
    if aggregate not in AGGREGATE_CHOICES:
        raise ValueError(f"aggregate must be one of {AGGREGATE_CHOICES}, got {aggregate!r}")
    path = Path(path)
    text = decode_utf8(path, read_bytes(path))
    last_line = text.count("\n") + 1
    cut_off = bool(text) and not text.endswith("\n")
    records = list(_parse_jsonl_reporting_torn_tail(path, text, last_line if cut_off else 0))
    skipped: Counter[str] = Counter()
    if cut_off and records and records[-1][0] == last_line and "submission_id" in records[-1][1]:
        # A log row whose newline never reached the disk was never acknowledged (the labeling
        # server answers only after the whole line is synced).
        records.pop()
        skipped["unacknowledged_last_row"] += 1
    records, retracted = drop_retracted(path, records)
    if retracted:
        skipped["retracted"] = retracted
    groups: list[PreferenceGroup] = []
    task_of: list[str | None] = []  # per group, for aggregation
    ratings: list[RatedExample] = []
    for lineno, obj in records:
        kind = _detect(f"{path}:{lineno}", obj)
        if kind == "rating":
            ratings.append(_read_rating(path, lineno, obj))
            continue
        if kind == "pair":
            prompt, chosen, rejected = (
                string_field(path, lineno, obj, f) for f in ("prompt", "chosen", "rejected")
            )
            group: PreferenceGroup | str = PreferenceGroup(prompt, [chosen, rejected], [0, 1])
        else:
            group = _read_ranking(path, lineno, obj)
        if isinstance(group, str):
            skipped[group] += 1
            continue
        groups.append(group)
        task_of.append(obj.get("task_id") if isinstance(obj.get("task_id"), str) else None)
    if aggregate != "none":
        groups = _aggregate(path, groups, task_of, aggregate, skipped)
    if not groups and not ratings and not skipped:
        raise ValueError(f"{path}: no preference records (empty file)")
    return PreferenceData(groups, ratings, dict(skipped))


def describe_skipped(skipped: dict[str, int]) -> str:
    """`PreferenceData.skipped` for people: '2 not rankable, 1 retracted' ('' when none)."""
    return ", ".join(f"{count} {why.replace('_', ' ')}" for why, count in skipped.items())


def _parse_jsonl_reporting_torn_tail(
    path: Path, text: str, torn_line: int
) -> Iterator[tuple[int, dict[str, Any]]]:
    """parse_jsonl; an error on `torn_line` (the last line, without a newline; 0: none) says
    it is a torn write."""
    try:
        yield from parse_jsonl(path, text)
    except ValueError as error:
        if torn_line and f"{path}:{torn_line}:" in str(error):
            raise ValueError(
                f"{error}; it is the last line and has no newline: a torn write from a crash. "
                "Opening the log with `palm-rlhf label` moves it aside"
            ) from None
        raise


def drop_retracted(
    path: Path, records: list[tuple[int, dict[str, Any]]]
) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """The records without retraction rows (`{"retracts": submission_id}`, appended by undo on
    the ranking page) and without the rankings they retract, and how many those were. A
    retraction must name an earlier ranking that is still in force (errors name file:line)."""
    kept: list[tuple[int, dict[str, Any]]] = []
    position: dict[str, int] = {}  # submission_id -> index into kept, while in force
    dropped: set[int] = set()
    for lineno, obj in records:
        if "retracts" in obj:
            target = obj["retracts"]
            if not isinstance(target, str) or target not in position:
                raise ValueError(
                    f"{path}:{lineno}: retracts {target!r}, which names no earlier ranking "
                    "still in force"
                )
            dropped.add(position.pop(target))
            continue
        if isinstance(obj.get("submission_id"), str):
            position[obj["submission_id"]] = len(kept)
        kept.append((lineno, obj))
    return [record for i, record in enumerate(kept) if i not in dropped], len(dropped)


def _aggregate(
    path: Path,
    groups: list[PreferenceGroup],
    task_of: list[str | None],
    how: str,
    skipped: Counter[str],
) -> list[PreferenceGroup]:
    """One group per task_id (rows without one pass through), at its first row's position."""
    members: dict[str, list[PreferenceGroup]] = {}
    for group, task in zip(groups, task_of, strict=True):
        if task is not None:
            members.setdefault(task, []).append(group)
    merged, done = [], set()
    for group, task in zip(groups, task_of, strict=True):
        if task is None:
            merged.append(group)
            continue
        if task in done:
            continue
        done.add(task)
        rows = members[task]
        if any(r.prompt != group.prompt or r.responses != group.responses for r in rows):
            raise ValueError(f"{path}: task {task!r} has rows with different prompts or responses")
        ranks = AGGREGATES[how]([r.ranks for r in rows])
        if len(set(ranks)) < 2:
            skipped["all_tied"] += 1
            continue
        merged.append(PreferenceGroup(group.prompt, group.responses, ranks))
    return merged


def _detect(where: str, obj: dict[str, Any]) -> str:
    kinds = [kind for kind, keys in _MARKERS.items() if keys & obj.keys()]
    if len(kinds) == 1:
        return kinds[0]
    expected = "; ".join(f"{kind}: {sorted(keys)}" for kind, keys in _MARKERS.items())
    problem = "mixes the keys of" if kinds else "matches none of"
    raise ValueError(f"{where}: record with keys {sorted(obj)} {problem} the formats ({expected})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_rating(path: Path, lineno: int, obj: dict[str, Any]) -> RatedExample:
    prompt = string_field(path, lineno, obj, "prompt")
    response = string_field(path, lineno, obj, "response")
    if "rating" not in obj:
        raise ValueError(f"{path}:{lineno}: missing field 'rating' (has {sorted(obj)})")
    rating = obj["rating"]
    if not (_is_int(rating) or isinstance(rating, float)) or not math.isfinite(rating):
        raise ValueError(f"{path}:{lineno}: field 'rating' must be a finite number, got {rating!r}")
    return RatedExample(prompt, response, rating)


def _read_ranking(path: Path, lineno: int, obj: dict[str, Any]) -> PreferenceGroup | str:
    """The group, or why a valid record trains nothing ('not_rankable', 'all_tied')."""
    where = f"{path}:{lineno}"
    prompt = string_field(path, lineno, obj, "prompt")
    for field_name in ("responses", "ranking"):
        if field_name not in obj:
            raise ValueError(f"{where}: missing field {field_name!r} (has {sorted(obj)})")
    responses = obj["responses"]
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise ValueError(f"{where}: field 'responses' must be a list of strings")
    if len(responses) < 2:
        raise ValueError(
            f"{where}: field 'responses' must hold K >= 2 responses, got {len(responses)}"
        )
    not_rankable = obj.get("not_rankable", False)
    if not isinstance(not_rankable, bool):
        raise ValueError(f"{where}: field 'not_rankable' must be true or false")
    if not_rankable:
        if obj["ranking"] not in ([], None):
            raise ValueError(f"{where}: a not_rankable record carries no ranking (use [])")
        return "not_rankable"
    ranks = parse_ranking(where, obj["ranking"], len(responses))
    return PreferenceGroup(prompt, responses, ranks) if len(set(ranks)) > 1 else "all_tied"


def parse_ranking(where: str, ranking: Any, k: int) -> list[int]:
    """[[0, 2], 1] -> ranks [0, 1, 0]: each response's tier; every index exactly once (one
    tier holding all of them is valid: an all-tied ranking). Errors start with `where`."""
    if not isinstance(ranking, list) or not ranking:
        raise ValueError(
            f"{where}: field 'ranking' must be a non-empty list of response indices, best "
            f"first, got {ranking!r}"
        )
    ranks: list[int | None] = [None] * k
    for tier, entry in enumerate(ranking):
        members = entry if isinstance(entry, list) else [entry]
        if not members:
            raise ValueError(f"{where}: field 'ranking': empty tie list at position {tier}")
        for index in members:
            if not _is_int(index):
                raise ValueError(
                    f"{where}: field 'ranking': expected a response index or a list of tied "
                    f"indices, got {index!r}"
                )
            if not 0 <= index < k:
                raise ValueError(
                    f"{where}: field 'ranking': index {index} is out of range for {k} responses"
                )
            if ranks[index] is not None:
                raise ValueError(f"{where}: field 'ranking': index {index} appears more than once")
            ranks[index] = tier
    missing = [i for i, rank in enumerate(ranks) if rank is None]
    if missing:
        raise ValueError(
            f"{where}: field 'ranking' must list every response index 0..{k - 1} exactly once; "
            f"missing {missing}"
        )
    return [int(rank) for rank in ranks]  # type: ignore[arg-type]


def encode_completion(
    tokenizer: Tokenizer, prompt: list[int], response: list[int], max_seq_len: int
) -> list[int]:
    """The reward model's row for one (prompt, response): [bos] + prompt + response + [eos], at
    most max_seq_len tokens. The one owner of this layout: reward training, `score` and PPO all
    build their rows here, from token ids (PPO passes the ids it sampled, never re-encoded text).

    `prompt` holds the prompt's tokens without bos, `response` the response's without eos.

    Unfinished responses: the row ends with eos whether or not the response did. The reward is
    read at the last token (reward.py), and rankings are of texts, which carry no "finished"
    flag, so every row the model trains on ends in eos; scoring an unfinished response anywhere
    else would read a position it never learned. Whether not finishing should cost anything is
    the RL loop's decision (PPOConfig.no_eos_penalty), not the layout's.

    Truncation: the end of the response and its eos are never cut. An overlong row loses prompt
    tokens from the left first; only if the response + eos alone do not fit is the prompt gone
    and the response loses its start. bos always stays.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2 (bos + eos), got {max_seq_len}")
    tail = [*response, tokenizer.eos_id]
    if len(tail) + 1 > max_seq_len:
        return [tokenizer.bos_id, *tail[len(tail) - (max_seq_len - 1) :]]
    keep = max_seq_len - 1 - len(tail)
    return [tokenizer.bos_id, *prompt[max(0, len(prompt) - keep) :], *tail]


def encode_reward_rows(
    tokenizer: Tokenizer,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_seq_len: int,
) -> tuple[Tensor, Tensor]:
    """(prompt ids, response ids) pairs -> tokens (b, n) right-padded and mask (b, n), each row
    built by `encode_completion`."""
    rows = [
        encode_completion(tokenizer, list(prompt), list(response), max_seq_len)
        for prompt, response in pairs
    ]
    return pad_sequences(rows, tokenizer.pad_id, "right")


def encode_groups(
    groups: Sequence[PreferenceGroup], tokenizer: Tokenizer, max_seq_len: int
) -> dict[str, Tensor]:
    """Flatten a batch of groups into N completions, each appearing once (InstructGPT forwards
    each of the K completions once and compares all C(K, 2) pairs of their scores).

    Returns tokens (N, n) long, right-padded; mask (N, n) bool (True = real token); ranks (N,)
    long; group (N,) long, the index in `groups` of each completion's prompt.
    """
    if not groups:
        raise ValueError("encode_groups needs at least one group")
    pairs, ranks, group_ids = [], [], []
    for index, group in enumerate(groups):
        prompt = tokenizer.encode(group.prompt)
        for response, rank in zip(group.responses, group.ranks, strict=True):
            pairs.append((prompt, tokenizer.encode(response)))
            ranks.append(rank)
            group_ids.append(index)
    tokens, mask = encode_reward_rows(tokenizer, pairs, max_seq_len)
    return {
        "tokens": tokens,  # (N, n)
        "mask": mask,  # (N, n)
        "ranks": torch.tensor(ranks, dtype=torch.long),  # (N,)
        "group": torch.tensor(group_ids, dtype=torch.long),  # (N,)
    }


def encode_ratings(
    examples: Sequence[RatedExample], tokenizer: Tokenizer, max_seq_len: int
) -> dict[str, Tensor]:
    """tokens (b, n) right-padded, mask (b, n), ratings (b,): long if every rating is an int
    (for a rating head), float otherwise (for regression)."""
    if not examples:
        raise ValueError("encode_ratings needs at least one example")
    pairs = [(tokenizer.encode(ex.prompt), tokenizer.encode(ex.response)) for ex in examples]
    tokens, mask = encode_reward_rows(tokenizer, pairs, max_seq_len)
    return {"tokens": tokens, "mask": mask, "ratings": torch.tensor([ex.rating for ex in examples])}


G = TypeVar("G", PreferenceGroup, RatedExample)


def _unit_hash(prompt: str, seed: int) -> float:
    """A point in [0, 1) from sha256 (not Python's salted hash()): the same on every machine."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_groups(
    items: Sequence[G], heldout_fraction: float = 0.1, seed: int = 0
) -> tuple[list[G], list[G]]:
    """(train, heldout), deterministic and split by prompt, so no prompt lands in both.

    A prompt is held out when the hash of (seed, prompt) falls below heldout_fraction. With two
    or more distinct prompts neither side is left empty: if hashing puts all of them on one
    side, the prompt with the extreme hash moves over (held-out accuracy needs something to
    measure, checklist item 20). Works on `RatedExample`s too.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    points = {item.prompt: _unit_hash(item.prompt, seed) for item in items}
    heldout = {prompt for prompt, u in points.items() if u < heldout_fraction}
    if len(points) >= 2 and not heldout:
        heldout = {min(points, key=points.__getitem__)}
    if len(points) >= 2 and len(heldout) == len(points):
        heldout.discard(max(points, key=points.__getitem__))
    train = [item for item in items if item.prompt not in heldout]
    return train, [item for item in items if item.prompt in heldout]
