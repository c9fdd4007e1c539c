"""Who is served what: shuffled order, labelers per task, restart, undo, skip."""

import pytest

from palm_rlhf.label.log import RankingLog, Submission
from palm_rlhf.label.session import LabelSession, UnknownTask, display_order
from palm_rlhf.label.tasks import Task

TASKS = [Task(f"t{i}", f"p{i}", ["a", "b", "c", "d"], [False] * 4) for i in range(3)]


def rank(session, labeler, sid, ranking=(0, 1, 2, 3)):
    task = session.next_task(labeler)
    session.submit(Submission(sid, task["task_id"], labeler, list(ranking), False, [[]] * 4, 1.0))
    return task


def test_each_labeler_sees_their_own_stable_shuffle(tmp_path):
    session = LabelSession(TASKS, RankingLog(tmp_path / "r.jsonl"), per_task=2)
    ana, bo = session.next_task("ana"), session.next_task("bo")
    assert ana["task_id"] == bo["task_id"] == "t0"
    assert sorted(ana["display_order"]) == [0, 1, 2, 3]
    assert [r["id"] for r in ana["responses"]] == ana["display_order"]
    assert ana["display_order"] == display_order("t0", "ana", 4)  # a reload shows the same
    orders = {tuple(display_order(f"t{i}", "ana", 4)) for i in range(20)}
    assert len(orders) > 5  # it is shuffled, not one fixed order


def test_per_task_serves_each_task_to_that_many_distinct_labelers(tmp_path):
    session = LabelSession(TASKS, RankingLog(tmp_path / "r.jsonl"), per_task=2)
    assert rank(session, "ana", "a0")["task_id"] == "t0"
    assert session.next_task("ana")["task_id"] == "t1"  # never t0 again
    assert session.next_task("bo")["task_id"] == "t0"
    # t0: ranked by ana, held by bo (full); t1 held by ana (one slot left).
    assert session.next_task("cy")["task_id"] == "t1"
    assert session.next_task("dee")["task_id"] == "t2"
    assert session.progress("ana") == {
        "overall_done": 1, "overall_total": 6, "rankings": 1, "done": False,
        "sampling": False, "labeler_done": 1, "labeler_total": 3,
    }  # fmt: skip


def test_a_restart_never_serves_a_task_the_labeler_ranked(tmp_path):
    log = RankingLog(tmp_path / "r.jsonl")
    session = LabelSession(TASKS, log)
    rank(session, "ana", "a0")
    rank(session, "ana", "a1")
    log.close()
    again = LabelSession(TASKS, RankingLog(tmp_path / "r.jsonl"))
    assert again.next_task("ana")["task_id"] == "t2"
    assert again.next_task("bo") is None  # per_task 1: t0, t1 done, t2 held for ana


def test_undo_serves_the_task_again_and_a_second_ranking_is_refused(tmp_path):
    session = LabelSession(TASKS, RankingLog(tmp_path / "r.jsonl"))
    rank(session, "ana", "a0")
    rank(session, "ana", "a1")
    with pytest.raises(ValueError, match="already ranked task 't1'"):
        session.submit(Submission("a9", "t1", "ana", [0, 1, 2, 3], False, [[]] * 4, 1.0))
    undone = session.undo("ana", "u1")
    assert undone["retracts"] == "a1"
    assert session.undo("ana", "u1") == undone  # a retried undo undoes nothing more
    assert session.next_task("ana")["task_id"] == "t1"
    assert session.progress("ana")["labeler_done"] == 1


def test_skip_moves_on_and_an_unknown_task_is_refused(tmp_path):
    session = LabelSession(TASKS, RankingLog(tmp_path / "r.jsonl"))
    session.next_task("ana")
    session.skip("ana", "t0")
    assert session.next_task("ana")["task_id"] == "t1"
    assert session.next_task("bo")["task_id"] == "t0"  # skipping frees the task for others
    with pytest.raises(UnknownTask, match="unknown task 'nope'"):
        session.skip("ana", "nope")


def test_a_log_of_other_tasks_is_refused(tmp_path):
    log = RankingLog(tmp_path / "r.jsonl")
    rank(LabelSession(TASKS, log), "ana", "a0")
    with pytest.raises(ValueError, match="not in the task file"):
        LabelSession(TASKS[1:], log)


def test_target_count_ends_the_session(tmp_path):
    session = LabelSession(TASKS, RankingLog(tmp_path / "r.jsonl"), target=2)
    rank(session, "ana", "a0")
    assert not session.done.is_set()
    rank(session, "bo", "b0")
    assert session.done.is_set()
