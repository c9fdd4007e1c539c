import csv
import json
import struct

from palm_rlhf import ByteTokenizer, PaLM
from palm_rlhf.cli import main
from palm_rlhf.demo import SETTINGS, rule_eval
from palm_rlhf.labeler import stdlib_prompts
from palm_rlhf.train_state import TrainingCheckpoints


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
    prompts = stdlib_prompts(settings.eval_prompts, "heldout", 1)
    base = PaLM.from_pretrained(TrainingCheckpoints(out / "pretrain" / "checkpoints").latest())
    before, _ = rule_eval(base, tok, prompts, settings.response_tokens, None, 1 + 2)
    assert summary["rule_score_before"] == before
    after, texts = rule_eval(
        PaLM.from_pretrained(out / "policy"), tok, prompts, settings.response_tokens, "actor", 3
    )
    assert summary["rule_score_after"] == after
    assert [s["after"] for s in summary["samples"]] == texts[:3]

    metrics = [json.loads(line) for line in (out / "ppo_metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == list(range(1, settings.ppo_iterations + 1))
    assert summary["ppo_iterations"] == len(metrics)
    # No budgets in the smoke preset: every stage ran the steps it was asked for.
    assert summary["steps_run"] == summary["steps_asked"] == {
        "pretrain": settings.pretrain_steps,
        "reward": settings.reward_steps,
        "ppo": settings.ppo_iterations,
    }
    with open(out / "ppo_curves.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["kl_ref"]) for r in rows] == [m["kl_ref"] for m in metrics]
    assert png_size(out / "ppo_curves.png") == (800, 600)
    assert summary["machine"]["cpu"] and summary["seed"] == 1
    printed = capsys.readouterr().out
    assert f"{summary['rule_score_before']:.3f} -> {summary['rule_score_after']:.3f}" in printed

    # A second demo into the same directory would mix two runs: refused, nothing touched.
    stamp = (out / "summary.json").stat().st_mtime_ns
    assert main(["demo", "--smoke", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "summary.json").stat().st_mtime_ns == stamp
