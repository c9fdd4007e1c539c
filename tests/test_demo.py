import csv
import json
import struct

from palm_rlhf import ByteTokenizer, PaLM
from palm_rlhf.cli import main
from palm_rlhf.data.docstrings import stdlib_docstring_pairs
from palm_rlhf.demo import SETTINGS, demo_prompts, rule_eval
from palm_rlhf.training.state import TrainingCheckpoints


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_smoke_demo_reports_what_its_saved_models_do(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--smoke", "--out", str(out), "--seed", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    settings, tok = SETTINGS["smoke"], ByteTokenizer()

    # Every figure is recomputed from what the run saved (bugs caught: a summary figure taken
    # from the wrong model, split or seed, or counts that disagree with the files).
    rankings = (out / "rankings.jsonl").read_text().splitlines()
    assert summary["ranked_groups"] == len(rankings) >= 2
    _, _, pairs = demo_prompts(settings, 1)
    heldout_files = {p.prompt for p in stdlib_docstring_pairs(10_000, "heldout")}
    assert {p.prompt for p in pairs} <= heldout_files  # evaluation only on held-out prompts
    base = PaLM.from_pretrained(TrainingCheckpoints(out / "pretrain" / "checkpoints").latest())
    before = rule_eval(base, tok, pairs, settings.response_tokens, None, 1 + 2)
    assert summary["rule_score_before"] == before.score
    assert summary["distinct_share"]["before"] == before.distinct_share
    assert summary["mean_chars"]["before"] == before.mean_chars
    assert summary["parse_share"]["before"] == before.parse_share
    sft = PaLM.from_pretrained(TrainingCheckpoints(out / "sft" / "checkpoints").latest())
    assert summary["rule_score_sft"] == rule_eval(sft, tok, pairs, settings.response_tokens,
                                                  None, 3).score  # fmt: skip
    sft_rows = [json.loads(x) for x in (out / "sft.jsonl").read_text().splitlines()]
    assert len(sft_rows) == settings.sft_examples
    assert not {r["prompt"] for r in sft_rows} & heldout_files
    assert not {r["prompt"] for r in sft_rows} & {json.loads(x)["prompt"] for x in rankings}
    after = rule_eval(
        PaLM.from_pretrained(out / "policy"), tok, pairs, settings.response_tokens, "actor", 3
    )
    assert summary["rule_score_after"] == after.score
    assert summary["distinct_share"]["after"] == after.distinct_share
    assert [s["after"] for s in summary["samples"]] == after.texts[:3]

    metrics = [json.loads(line) for line in (out / "ppo_metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == list(range(1, settings.ppo_iterations + 1))
    assert summary["ppo_iterations"] == len(metrics)
    # No budgets in the smoke preset: every stage ran the steps it was asked for.
    assert (
        summary["steps_run"]
        == summary["steps_asked"]
        == {
            "pretrain": settings.pretrain_steps,
            "sft": settings.sft_steps,
            "reward": settings.reward_steps,
            "ppo": settings.ppo_iterations,
        }
    )
    with open(out / "ppo_curves.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["kl_ref"]) for r in rows] == [m["kl_ref"] for m in metrics]
    assert png_size(out / "ppo_curves.png") == (800, 600)
    assert summary["machine"]["cpu"] and summary["seed"] == 1
    printed = capsys.readouterr().out
    assert (
        f"{summary['rule_score_before']:.3f} -> {summary['rule_score_sft']:.3f} -> "
        f"{summary['rule_score_after']:.3f}" in printed
    )

    # A second demo into the same directory would mix two runs: refused, nothing touched.
    stamp = (out / "summary.json").stat().st_mtime_ns
    assert main(["demo", "--smoke", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "summary.json").stat().st_mtime_ns == stamp


def test_human_demo_waits_for_people_and_trains_on_what_they_ranked(tmp_path):
    # `demo --human`: the labeling stage serves the page; a scripted person ranks through the
    # HTTP API (shortest response first, its own rule) and presses done; the reward model then
    # trains on exactly those rankings.
    import http.client
    import threading
    import time

    from conftest import free_port

    from palm_rlhf.demo import run_demo
    from palm_rlhf.label.human import HumanLabeling

    port, out, result = free_port(), tmp_path / "demo", {}
    human = HumanLabeling(port=port, token="t0k")
    thread = threading.Thread(
        target=lambda: result.update(run_demo(out, "smoke", 2, show_progress=False, human=human))
    )
    thread.start()

    def call(method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Host": f"127.0.0.1:{port}", "Authorization": "Bearer t0k"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = conn.getresponse()
        data = json.loads(response.read())
        conn.close()
        assert response.status == 200, data
        return data

    deadline = time.monotonic() + 120
    while True:
        try:
            task = call("GET", "/api/next?labeler=script")["task"]
            break
        except OSError:
            assert time.monotonic() < deadline and thread.is_alive(), "the page never came up"
            time.sleep(0.2)
    ranked = 0
    while task is not None:
        texts = {r["id"]: r["text"] for r in task["responses"]}
        by_length = sorted(texts, key=lambda i: (len(texts[i]), i))
        call("POST", "/api/submit", {
            "submission_id": f"s{ranked}", "task_id": task["task_id"], "labeler": "script",
            "ranking": by_length, "not_rankable": False, "flags": [[]] * len(texts),
            "duration_s": 0.5,
        })  # fmt: skip
        ranked += 1
        task = call("GET", "/api/next?labeler=script")["task"]
    call("POST", "/api/done", {})
    thread.join(timeout=300)
    assert not thread.is_alive() and result, "the demo did not continue after 'done'"
    assert ranked == SETTINGS["smoke"].label_prompts
    rows = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    assert {r["labeler"] for r in rows} == {"script"} and len(rows) == ranked
    assert result["ranked_groups"] == ranked  # strict rankings: every one trains
    assert result["labeler"] == "people (ranking page)"
    assert (out / "tasks.jsonl").exists() and (out / "summary.json").exists()


def test_ppo_gives_way_to_the_run_budget():
    """PPO's limit is its own budget until the run's budget minus the final evaluation (twice
    the SFT rule evaluation's time) is shorter; past the run's budget it still runs one
    iteration (a limit of 0 would mean none at all)."""
    from dataclasses import replace

    from palm_rlhf.demo import SETTINGS, ppo_time_limit

    full = SETTINGS["full"]
    assert full.total_budget_s <= 15 * 60 - 20  # room for PPO's overrun of one iteration
    settings = replace(full, ppo_budget_s=185.0, total_budget_s=870.0)
    assert ppo_time_limit(settings, elapsed_s=600.0, rule_eval_s=15.0) == 185.0
    assert ppo_time_limit(settings, elapsed_s=700.0, rule_eval_s=15.0) == 140.0
    assert 0 < ppo_time_limit(settings, elapsed_s=900.0, rule_eval_s=15.0) < 0.01
    assert ppo_time_limit(replace(settings, ppo_budget_s=0.0), 700.0, 15.0) == 140.0
    assert ppo_time_limit(replace(settings, total_budget_s=0.0), 900.0, 15.0) == 185.0
    assert ppo_time_limit(SETTINGS["smoke"], 900.0, 15.0) == 0.0  # no budgets: no limit
