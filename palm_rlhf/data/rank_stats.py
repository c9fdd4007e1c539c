"""What labelers did: agreement between two rankings of one task, and one ranking from several.

Rankings here are tier lists, `ranks[i]` = response i's tier (0 = best, ties share a tier), as
`preferences.PreferenceGroup` holds them. Pure functions; `summarise` builds the report that
`palm-rlhf label stats` prints.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from itertools import combinations
from typing import Any


def _sign(x: int | float) -> int:
    return (x > 0) - (x < 0)


def kendall_tau_b(a: Sequence[int], b: Sequence[int]) -> float:
    """Kendall's tau-b between two tier lists of the same responses (ties are corrected for,
    Kendall 1945); nan when either ranking is all one tier."""
    if len(a) != len(b):
        raise ValueError(f"rankings of {len(a)} and {len(b)} responses")
    concordant = discordant = ties_a = ties_b = 0
    for i, j in combinations(range(len(a)), 2):
        sa, sb = _sign(a[i] - a[j]), _sign(b[i] - b[j])
        if sa == 0 and sb == 0:
            continue
        if sa == 0:
            ties_a += 1
        elif sb == 0:
            ties_b += 1
        elif sa == sb:
            concordant += 1
        else:
            discordant += 1
    n_a = concordant + discordant + ties_b  # pairs a orders
    n_b = concordant + discordant + ties_a
    if n_a == 0 or n_b == 0:
        return math.nan
    return (concordant - discordant) / math.sqrt(n_a * n_b)


def pairwise_agreement(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """(agreeing, compared) over the response pairs both rankings order strictly."""
    agree = compared = 0
    for i, j in combinations(range(len(a)), 2):
        sa, sb = _sign(a[i] - a[j]), _sign(b[i] - b[j])
        if sa and sb:
            compared += 1
            agree += sa == sb
    return agree, compared


def _tiers_from_scores(scores: Sequence[float]) -> list[int]:
    """Higher score = better; equal scores share a tier."""
    order = sorted(set(scores), reverse=True)
    return [order.index(s) for s in scores]


def borda_ranks(rankings: Sequence[Sequence[int]]) -> list[int]:
    """Borda count: each ranking gives a response one point per response it beats and half a
    point per response it ties with; tiers by total points."""
    k = len(rankings[0])
    points = [0.0] * k
    for ranks in rankings:
        for i in range(k):
            points[i] += sum(
                (ranks[i] < ranks[j]) + 0.5 * (ranks[i] == ranks[j]) for j in range(k) if j != i
            )
    return _tiers_from_scores(points)


def ranked_pairs_ranks(rankings: Sequence[Sequence[int]]) -> list[int]:
    """Tideman's ranked pairs: margins of pairwise majorities, locked largest first unless a
    pair would close a cycle (equal margins: the lower response indices first, so the result
    is deterministic); then tiers by peeling off the responses nothing locked beats."""
    k = len(rankings[0])
    margin = [[0] * k for _ in range(k)]
    for ranks in rankings:
        for i, j in combinations(range(k), 2):
            s = _sign(ranks[j] - ranks[i])  # +1: i is better
            margin[i][j] += s
            margin[j][i] -= s
    pairs = sorted(
        ((margin[i][j], i, j) for i in range(k) for j in range(k) if margin[i][j] > 0),
        key=lambda item: (-item[0], item[1], item[2]),
    )
    beats: dict[int, set[int]] = defaultdict(set)

    def reaches(start: int, goal: int) -> bool:
        stack, seen = [start], set()
        while stack:
            node = stack.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                stack.extend(beats[node])
        return False

    for _, winner, loser in pairs:
        if not reaches(loser, winner):
            beats[winner].add(loser)
    ranks, remaining, tier = [0] * k, set(range(k)), 0
    while remaining:
        beaten = {loser for w in remaining for loser in beats[w] if loser in remaining}
        top = remaining - beaten
        for i in top:
            ranks[i] = tier
        remaining -= top
        tier += 1
    return ranks


AGGREGATES = {"borda": borda_ranks, "ranked_pairs": ranked_pairs_ranks}


def summarise(rows: Sequence[dict[str, Any]], aggregate: str = "ranked_pairs") -> dict[str, Any]:
    """Counts, time per task and agreement for the active ranking rows of a rankings log
    (`ranks` already parsed into each row by the caller)."""
    per_labeler: dict[str, list[float]] = defaultdict(list)
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        per_labeler[row["labeler"]].append(row["duration_s"])
        by_task[row["task_id"]].append(row)
    agree = compared = 0
    taus: list[float] = []
    disagreements = []
    for task_id, task_rows in by_task.items():
        ranked = [r for r in task_rows if r["ranks"] is not None]
        for a, b in combinations(ranked, 2):
            got, of = pairwise_agreement(a["ranks"], b["ranks"])
            agree, compared = agree + got, compared + of
            tau = kendall_tau_b(a["ranks"], b["ranks"])
            if not math.isnan(tau):
                taus.append(tau)
        if len({tuple(r["ranks"]) for r in ranked}) > 1:
            disagreements.append(
                {
                    "task_id": task_id,
                    "labelers": [r["labeler"] for r in ranked],
                    "rankings": [r["ranks"] for r in ranked],
                    aggregate: AGGREGATES[aggregate]([r["ranks"] for r in ranked]),
                }
            )
    return {
        "labelers": {
            name: {
                "tasks": len(times),
                "median_s_per_task": statistics.median(times),
                "total_s": round(sum(times), 1),
            }
            for name, times in sorted(per_labeler.items())
        },
        "tasks_ranked": len(by_task),
        "tasks_ranked_more_than_once": sum(len(r) > 1 for r in by_task.values()),
        "pairwise_agreement": agree / compared if compared else math.nan,
        "pairs_compared": compared,
        "kendall_tau_b_mean": statistics.fmean(taus) if taus else math.nan,
        "disagreements": disagreements,
    }
