"""`palm-rlhf sample`, `label stats`, `label export`, and the hand-off of a labeled log to
`palm-rlhf reward`, run as a user runs them."""

import json

import pytest
from conftest import tiny_model

from palm_rlhf.cli import main
from palm_rlhf.data.prompts import read_prompts
from palm_rlhf.label.log import RankingLog, Submission
from palm_rlhf.label.session import LabelSession
from palm_rlhf.label.tasks import load_tasks
from palm_rlhf.tokenizers.base import ByteTokenizer

TOK = ByteTokenizer()


@pytest.fixture
def policy(tmp_path):
    tiny_model(num_tokens=TOK.vocab_size, max_seq_len=192).save_pretrained(tmp_path / "policy")
    return tmp_path / "policy"


def test_prompts_come_from_text_or_jsonl_with_their_fields(tmp_path):
    (tmp_path / "p.txt").write_text("def f():\n\nclass A:\n")
    assert [r.prompt for r in read_prompts(str(tmp_path / "p.txt"))] == ["def f():", "class A:"]
    rows = [{"prompt": "def f(x):\n    '''Twice x.'''\n", "answer": "return 2 * x"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    [record] = read_prompts(str(tmp_path / "p.jsonl"))
    assert record.prompt == rows[0]["prompt"] and record.fields == {"answer": "return 2 * x"}
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: missing field 'prompt'"):
        read_prompts(str(tmp_path / "bad.jsonl"))


def test_sample_writes_k_responses_per_prompt_with_settings(tmp_path, policy, capsys):
    rows = [{"prompt": "def f(x):\n    return", "id": 7}, {"prompt": "import os\n", "id": 8}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "sample",
        "--policy",
        str(policy),
        "--prompts",
        str(tmp_path / "p.jsonl"),
        "--k",
        "3",
        "--max-new-tokens",
        "12",
        "--seed",
        "5",
        "--out",
        str(tmp_path / "tasks.jsonl"),
    ]
    assert main(argv) == 0
    tasks = load_tasks(tmp_path / "tasks.jsonl")
    assert [t.prompt for t in tasks] == [r["prompt"] for r in rows]
    assert [t.fields for t in tasks] == [{"id": 7}, {"id": 8}]
    assert all(len(t.responses) == 3 and len(set(t.responses)) > 1 for t in tasks)
    assert tasks[0].policy == str(policy) and tasks[0].generation["seed"] == 5
    assert tasks[0].generation["max_new_tokens"] == 12
    assert all(len(r) <= 12 for t in tasks for r in t.responses)  # <= 1 character a token
    first = (tmp_path / "tasks.jsonl").read_bytes()
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err  # nothing is replaced
    assert main([*argv, "--overwrite"]) == 0
    assert (tmp_path / "tasks.jsonl").read_bytes() == first  # seeded: the same tasks again
    assert main([*argv[:-2], "--k", "12", "--out", str(tmp_path / "t2.jsonl"), "--overwrite"]) == 2
    assert "k must be 2 to 9" in capsys.readouterr().err


def label_two_labelers(tmp_path, policy):
    """24 tasks, each ranked by ana and bo: both rank [0, 1, 2] except that bo reverses every
    4th task (6 tasks) and both find the 6th task not rankable."""
    assert (
        main(
            [
                "sample",
                "--policy",
                str(policy),
                "--prompts",
                "stdlib",
                "--num-prompts",
                "24",
                "--k",
                "3",
                "--max-new-tokens",
                "16",
                "--out",
                str(tmp_path / "tasks.jsonl"),
            ]
        )
        == 0
    )
    tasks = load_tasks(tmp_path / "tasks.jsonl")
    log = RankingLog(tmp_path / "rankings.jsonl")
    session = LabelSession(tasks, log, per_task=2)
    for labeler in ("ana", "bo"):
        for n in range(len(tasks)):
            task_id = session.next_task(labeler)["task_id"]
            assert task_id == tasks[n].task_id
            ranking = [2, 1, 0] if labeler == "bo" and n % 4 == 0 else [0, 1, 2]
            submission = Submission(
                f"{labeler}{n}",
                task_id,
                labeler,
                [] if n == 5 else ranking,
                n == 5,
                [[], [], []],
                1.0 + n,
            )
            session.submit(submission)
    log.close()
    return tasks


def test_label_stats_and_export_read_the_log(tmp_path, policy, capsys):
    tasks = label_two_labelers(tmp_path, policy)
    capsys.readouterr()
    assert main(["label", "stats", str(tmp_path / "rankings.jsonl"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["labelers"]["ana"]["tasks"] == report["labelers"]["bo"]["tasks"] == 24
    assert report["tasks_ranked_more_than_once"] == 24
    # 23 tasks ranked by both, 3 pairs each; the 6 reversed tasks disagree on all 3.
    assert report["pairs_compared"] == 69
    assert report["pairwise_agreement"] == pytest.approx((69 - 18) / 69)
    assert len(report["disagreements"]) == 6
    assert main(["label", "stats", str(tmp_path / "rankings.jsonl")]) == 0
    text = capsys.readouterr().out
    assert "pairwise agreement" in text and "ana" in text and "ranked_pairs" in text
    out = tmp_path / "pairs.jsonl"
    assert (
        main(
            [
                "label",
                "export",
                str(tmp_path / "rankings.jsonl"),
                "--to",
                "pairs",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(pairs) == 46 * 3  # 48 rows less the 2 not-rankable ones, 3 pairs each
    assert set(pairs[0]) == {"prompt", "chosen", "rejected"}
    by_prompt = {t.prompt: t.responses for t in tasks}
    assert all({p["chosen"], p["rejected"]} <= set(by_prompt[p["prompt"]]) for p in pairs)
    assert "skipped: 2 not rankable" in capsys.readouterr().out


def test_reward_trains_on_the_log_as_written(tmp_path, policy, capsys):
    # The hand-off: the file the labeling session wrote is `palm-rlhf reward --data` input.
    label_two_labelers(tmp_path, policy)
    capsys.readouterr()
    argv = [
        "reward",
        "--init",
        str(policy),
        "--data",
        str(tmp_path / "rankings.jsonl"),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--out",
        str(tmp_path / "rm"),
    ]
    assert main(argv) == 0
    assert "skipped records that carry no ordering: 2 not rankable" in capsys.readouterr().out
    assert main([*argv[:-2], "--aggregate", "borda", "--out", str(tmp_path / "rm2")]) == 0


def test_label_samples_ahead_of_the_labelers_and_a_restart_reuses_the_tasks(tmp_path, policy):
    # `label --policy --prompts`: tasks are sampled in the background into
    # rankings.jsonl.tasks.jsonl; --target ends the session; a restart samples only what is
    # missing and never serves a ranked task again.
    import http.client
    import re
    import subprocess
    import sys
    import time

    (tmp_path / "p.txt").write_text("".join(f"x{i} = {i}\n" for i in range(6)))
    out = tmp_path / "rankings.jsonl"

    def session(target):
        proc = subprocess.Popen(
            [sys.executable, "-m", "palm_rlhf.cli", "label", "--policy", str(policy),
             "--prompts", str(tmp_path / "p.txt"), "--k", "2", "--max-new-tokens", "8",
             "--batch-size", "4", "--out", str(out), "--port", "0", "--target", str(target)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        lines = [proc.stdout.readline() for _ in range(2)]
        match = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=(\S+)", "".join(lines))
        assert match, "".join(lines) + proc.stderr.read()
        port, token = int(match[1]), match[2]

        def call(method, path, body=None):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            headers = {"Host": f"127.0.0.1:{port}", "Authorization": f"Bearer {token}"}
            if body is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, path, json.dumps(body) if body else None, headers)
            data = json.loads(conn.getresponse().read())
            conn.close()
            return data

        return proc, lines, call

    proc, lines, call = session(target=2)
    assert "sampling 6 more tasks" in "".join(lines)
    served = []
    while len(served) < 2:
        task = call("GET", "/api/next?labeler=ana")["task"]
        if task is None:  # the first chunk is still being sampled
            time.sleep(0.1)
            continue
        served.append(task["task_id"])
        call("POST", "/api/submit", {
            "submission_id": task["task_id"], "task_id": task["task_id"], "labeler": "ana",
            "ranking": [0, 1], "not_rankable": False, "flags": [[], []], "duration_s": 1.0,
        })  # fmt: skip
    assert proc.wait(timeout=60) == 0  # the target ended the session
    tasks = load_tasks(f"{out}.tasks.jsonl")
    assert tasks[0].policy == str(policy) and tasks[0].generation["k"] == 2

    proc, lines, call = session(target=3)
    try:
        while call("GET", "/api/progress")["sampling"]:
            time.sleep(0.1)
        assert "sampling 6 more tasks" not in "".join(lines)
        task = call("GET", "/api/next?labeler=ana")["task"]
        assert task["task_id"] not in served
        assert [t.task_id for t in load_tasks(f"{out}.tasks.jsonl")][: len(tasks)] == [
            t.task_id for t in tasks
        ]
        assert len(load_tasks(f"{out}.tasks.jsonl")) == 6
    finally:
        proc.kill()
        proc.wait()
