"""Agreement and aggregation of rankings, against hand-computed values."""

import math

import pytest

from palm_rlhf.data.rank_stats import (
    borda_ranks,
    kendall_tau_b,
    pairwise_agreement,
    ranked_pairs_ranks,
    summarise,
)


def test_kendall_tau_b_hand_computed():
    assert kendall_tau_b([0, 1, 2, 3], [0, 1, 2, 3]) == 1.0
    assert kendall_tau_b([0, 1, 2, 3], [3, 2, 1, 0]) == -1.0
    # 6 pairs; swapping the last two gives 5 concordant, 1 discordant: (5 - 1) / 6.
    assert kendall_tau_b([0, 1, 2, 3], [0, 1, 3, 2]) == pytest.approx(4 / 6)
    # a = [0, 0, 1] ties pair (0, 1); b = [0, 1, 2] orders all 3 pairs.
    # concordant 2, discordant 0, a orders 2 pairs, b orders 3: 2 / sqrt(2 * 3).
    assert kendall_tau_b([0, 0, 1], [0, 1, 2]) == pytest.approx(2 / math.sqrt(6))
    assert math.isnan(kendall_tau_b([0, 0, 0], [0, 1, 2]))


def test_pairwise_agreement_counts_only_pairs_both_order():
    # pairs: (0,1) a ties -> not compared; (0,2) both say 0 better; (1,2) a: 1 better, b: 2.
    assert pairwise_agreement([0, 0, 1], [0, 2, 1]) == (1, 2)


def test_borda_with_ties_hand_computed():
    # Points (beat = 1, tie = 0.5): ranking 1 [0,1,2] gives 2,1,0; ranking 2 [1,0,0]
    # gives 0,1.5,1.5; ranking 3 [0,0,1] gives 1.5,1.5,0. Totals 3.5, 4, 1.5.
    assert borda_ranks([[0, 1, 2], [1, 0, 0], [0, 0, 1]]) == [1, 0, 2]
    assert borda_ranks([[0, 1], [1, 0]]) == [0, 0]  # a perfect split is a tie


def test_ranked_pairs_breaks_a_condorcet_cycle_at_its_weakest_link():
    # 5 voters A>B>C, 4 voters B>C>A, 2 voters C>A>B. Margins: A>B 7-4 (+3), B>C 9-2 (+7),
    # C>A 6-5 (+1). Lock B>C (7), then A>B (3); C>A (1) would close a cycle: A>B>C.
    votes = [[0, 1, 2]] * 5 + [[2, 0, 1]] * 4 + [[1, 2, 0]] * 2
    assert ranked_pairs_ranks(votes) == [0, 1, 2]
    # Borda on the same votes: A 5*2+0+2*1 = 12, B 5+8+0 = 13, C 0+4+4 = 8: B > A > C.
    assert borda_ranks(votes) == [1, 0, 2]


def test_ranked_pairs_keeps_unordered_responses_tied():
    assert ranked_pairs_ranks([[0, 1, 1], [0, 1, 1]]) == [0, 1, 1]


def test_summarise_reports_labelers_agreement_and_the_aggregate():
    rows = [
        {"labeler": "ana", "task_id": "t1", "duration_s": 4.0, "ranks": [0, 1, 2]},
        {"labeler": "bo", "task_id": "t1", "duration_s": 8.0, "ranks": [0, 2, 1]},
        {"labeler": "ana", "task_id": "t2", "duration_s": 6.0, "ranks": None},
    ]
    report = summarise(rows, "borda")
    assert report["labelers"]["ana"] == {"tasks": 2, "median_s_per_task": 5.0, "total_s": 10.0}
    assert report["tasks_ranked"] == 2 and report["tasks_ranked_more_than_once"] == 1
    assert (report["pairwise_agreement"], report["pairs_compared"]) == (2 / 3, 3)
    assert report["kendall_tau_b_mean"] == pytest.approx(1 / 3)
    [item] = report["disagreements"]
    assert item["task_id"] == "t1" and item["borda"] == [0, 1, 1]
