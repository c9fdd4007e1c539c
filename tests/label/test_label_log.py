"""The rankings log: durable appends, idempotent retries, torn tails, and the hand-off to the
reward model's reader."""

import json

import pytest

from palm_rlhf.data.preferences import load_preferences
from palm_rlhf.label.log import (
    RankingLog,
    Submission,
    SubmissionConflict,
    check_submission,
    ranking_row,
    read_log,
    retraction_row,
)
from palm_rlhf.label.tasks import Task, load_tasks, write_tasks

TASKS = [
    Task(f"t{i}", f"prompt {i}\n", [f"a{i}", f"b{i}", f"c{i}"], [True, False, True])
    for i in range(4)
]


def submission(sid, task="t0", labeler="ana", ranking=(0, 1, 2), not_rankable=False):
    return Submission(sid, task, labeler, list(ranking), not_rankable, [[], [], []], 3.5)


def row(sub, task=TASKS[0]):
    return ranking_row(task, sub, [2, 0, 1])


def test_rows_round_trip_into_the_reward_models_reader(tmp_path):
    log = RankingLog(tmp_path / "r.jsonl")
    assert log.append(row(submission("s1", ranking=[1, [0, 2]])))
    assert log.append(row(submission("s2", ranking=[[0, 1, 2]])))  # all tied
    assert log.append(row(submission("s3", ranking=[], not_rankable=True)))
    assert log.append(row(submission("s4", ranking=[2, 1, 0])))
    assert log.append(retraction_row("s5", log.get("s4")))
    log.close()
    data = load_preferences(tmp_path / "r.jsonl")
    [group] = data.groups
    assert group.responses == ["a0", "b0", "c0"] and group.ranks == [1, 0, 1]
    assert data.skipped == {"all_tied": 1, "not_rankable": 1, "retracted": 1}
    first = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])
    assert first["display_order"] == [2, 0, 1] and first["labeler"] == "ana"
    assert {"task_id", "duration_s", "created_at", "flags", "policy", "generation"} <= set(first)


def test_a_retry_writes_nothing_and_a_reused_id_is_a_conflict(tmp_path):
    log = RankingLog(tmp_path / "r.jsonl")
    assert log.append(row(submission("s1")))
    assert not log.append(row(submission("s1")))  # the client retried after a lost reply
    with pytest.raises(SubmissionConflict, match="s1"):
        log.append(row(submission("s1", ranking=[2, 1, 0])))
    log.close()
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 1


def test_a_torn_tail_is_moved_aside_and_the_log_continues(tmp_path):
    path = tmp_path / "r.jsonl"
    log = RankingLog(path)
    log.append(row(submission("s1")))
    log.close()
    complete = path.read_bytes()
    path.write_bytes(complete + b'{"prompt": "p", "respo')  # a crash mid-write
    with pytest.raises(ValueError, match="torn write"):
        load_preferences(path)
    log = RankingLog(path)
    assert log.repaired and "r.jsonl:2" in log.repaired
    assert path.read_bytes() == complete
    assert (tmp_path / "r.jsonl.torn").read_bytes() == b'{"prompt": "p", "respo\n'
    log.append(row(submission("s2", task="t1"), TASKS[1]))
    log.close()
    assert [r["submission_id"] for _, r in read_log(path)] == ["s1", "s2"]


def test_a_second_writer_is_refused(tmp_path):
    log = RankingLog(tmp_path / "r.jsonl")
    with pytest.raises(RuntimeError, match="another process"):
        RankingLog(tmp_path / "r.jsonl")
    log.close()
    RankingLog(tmp_path / "r.jsonl").close()  # free again once closed


def test_invalid_submissions_are_refused_by_name():
    task = TASKS[0]
    with pytest.raises(ValueError, match="index 1 appears more than once"):
        check_submission(submission("s", ranking=[0, 1, 1]), task)
    with pytest.raises(ValueError, match="missing \\[2\\]"):
        check_submission(submission("s", ranking=[0, 1]), task)
    with pytest.raises(ValueError, match="carries no ranking"):
        check_submission(submission("s", ranking=[0, 1, 2], not_rankable=True), task)
    with pytest.raises(ValueError, match="flags must be 3 lists"):
        check_submission(Submission("s", "t0", "ana", [0, 1, 2], False, [[]], 1.0), task)
    with pytest.raises(ValueError, match="labeler"):
        check_submission(submission("s", labeler="  "), task)


def test_aggregate_merges_the_labelers_of_a_task(tmp_path):
    log = RankingLog(tmp_path / "r.jsonl")
    log.append(row(submission("s1", labeler="ana", ranking=[0, 1, 2])))
    log.append(row(submission("s2", labeler="bo", ranking=[0, 2, 1])))
    log.append(row(submission("s3", labeler="cy", ranking=[0, 1, 2])))
    log.close()
    every = load_preferences(tmp_path / "r.jsonl")
    assert [g.ranks for g in every.groups] == [[0, 1, 2], [0, 2, 1], [0, 1, 2]]
    merged = load_preferences(tmp_path / "r.jsonl", aggregate="borda")
    assert [g.ranks for g in merged.groups] == [[0, 1, 2]]  # 2 of 3 put b above c
    with pytest.raises(ValueError, match="aggregate must be one of"):
        load_preferences(tmp_path / "r.jsonl", aggregate="mean")


def test_a_retraction_of_nothing_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"retracts": "nope", "submission_id": "x"}) + "\n")
    with pytest.raises(ValueError, match="r.jsonl:1: retracts 'nope'"):
        load_preferences(path)
    # The training reader and `label stats` share one rule: a ranking is undone at most once.
    rows = [row(submission("s1")), {"retracts": "s1", "submission_id": "u1"},
            {"retracts": "s1", "submission_id": "u2"}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for reader in (load_preferences, read_log):
        with pytest.raises(ValueError, match="r.jsonl:3: retracts 's1'"):
            reader(path)


def test_tasks_round_trip_and_bad_task_files_name_the_line(tmp_path):
    write_tasks(TASKS, tmp_path / "tasks.jsonl")
    assert load_tasks(tmp_path / "tasks.jsonl") == TASKS
    lines = (tmp_path / "tasks.jsonl").read_text().splitlines()
    (tmp_path / "dup.jsonl").write_text(lines[0] + "\n" + lines[0] + "\n")
    with pytest.raises(ValueError, match="dup.jsonl:2: task_id 't0' repeats line 1"):
        load_tasks(tmp_path / "dup.jsonl")
    bad = json.loads(lines[0]) | {"responses": ["only one"], "finished": [True]}
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: .*2 to 9 responses"):
        load_tasks(tmp_path / "bad.jsonl")


def test_rows_survive_line_separators_in_model_output(tmp_path):
    # Bug caught: U+2028 / U+0085 in a response (the byte tokenizer can sample them) split a
    # row in two for str.splitlines, and the whole log stopped parsing.
    task = Task("t9", "p\u2028q", ["a\u0085b", "c\u2029d", "e\r\nf"], [True] * 3)
    log = RankingLog(tmp_path / "r.jsonl")
    log.append(ranking_row(task, submission("s1", task="t9"), [0, 1, 2]))
    log.close()
    assert (tmp_path / "r.jsonl").read_bytes().count(b"\n") == 1
    [group] = load_preferences(tmp_path / "r.jsonl").groups
    assert group.prompt == "p\u2028q" and group.responses == task.responses
    assert len(RankingLog(tmp_path / "r.jsonl").active_rankings()) == 1


def test_a_row_cut_before_its_newline_was_never_acknowledged(tmp_path):
    path = tmp_path / "r.jsonl"
    log = RankingLog(path)
    log.append(row(submission("s1")))
    log.append(row(submission("s2", task="t1"), TASKS[1]))
    log.close()
    path.write_bytes(path.read_bytes()[:-1])  # the crash took only the last newline
    data = load_preferences(path)
    assert len(data.groups) == 1 and data.skipped == {"unacknowledged_last_row": 1}


def test_a_failed_write_keeps_nothing_of_the_row(tmp_path, monkeypatch):
    import os as os_module

    import palm_rlhf.label.log as log_module

    log = RankingLog(tmp_path / "r.jsonl")
    log.append(row(submission("s1")))
    before = (tmp_path / "r.jsonl").read_bytes()

    real_write = os_module.write

    def half_then_fail(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(log_module.os, "write", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        log.append(row(submission("s2", task="t1"), TASKS[1]))
    monkeypatch.undo()
    assert (tmp_path / "r.jsonl").read_bytes() == before  # the half row was cut off
    assert log.get("s2") is None  # and not taken for saved: a retry writes it
    assert log.append(row(submission("s2", task="t1"), TASKS[1]))
    log.close()
    assert len(load_preferences(tmp_path / "r.jsonl").groups) == 2
