"""The examples are wiring, but wiring rots: each runs end to end here at toy size."""

import json
import runpy
import sys
from pathlib import Path

import pytest

from palm_rlhf import ByteTokenizer, PaLMConfig
from palm_rlhf.data.preferences import load_preferences
from palm_rlhf.model.reward import RewardModel
from palm_rlhf.training.config import TrainConfig
from palm_rlhf.training.lm import train_lm
from palm_rlhf.training.reward import heldout_accuracy
from palm_rlhf.training.runs import read_metrics
from palm_rlhf.training.state import TrainingCheckpoints

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, monkeypatch) -> dict:
    monkeypatch.setattr(sys, "argv", [name, *args])
    return runpy.run_path(str(EXAMPLES / name), run_name="__main__")


@pytest.fixture(scope="module")
def micro_lm(tmp_path_factory):
    """A few steps of stdlib pretraining: enough that samples contain lines, some of which
    parse, so the simulated labeler finds preferences."""
    out = tmp_path_factory.mktemp("micro_lm")
    config = PaLMConfig(
        num_tokens=ByteTokenizer().vocab_size, dim=32, depth=1, heads=2, dim_head=16,
        max_seq_len=256,
    )  # fmt: skip
    train = TrainConfig(
        seq_len=64, batch_size=8, steps=40, lr=3e-3, warmup_steps=5,
        eval_every=0, sample_every=0, checkpoint_every=0, log_every=20,
    )  # fmt: skip
    train_lm(config, train, out, show_progress=False, data="stdlib")
    return TrainingCheckpoints(out / "checkpoints").latest()


def test_reward_quality_reports_real_and_shuffled_accuracy(micro_lm, tmp_path, monkeypatch):
    out = tmp_path / "q"
    common = [
        "--out", str(out), "--init", str(micro_lm), "--train-prompts", "40",
        "--heldout-prompts", "12", "--response-tokens", "32", "--steps", "8", "--seq-len", "96",
    ]  # fmt: skip
    run_example("reward_quality.py", *common, monkeypatch=monkeypatch)
    results = json.loads((out / "results.json").read_text())
    assert results["ranked_groups"]["train"] >= 2 and results["ranked_groups"]["heldout"] >= 1
    real = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    assert results["ranked_groups"]["train"] == len(real)
    # The reported figures are the saved models' real accuracies: recomputed here from the
    # checkpoints and the held-out file (bug caught: a figure from the wrong model or set).
    heldout = load_preferences(out / "heldout.jsonl").groups
    assert results["ranked_groups"]["heldout"] == len(heldout)
    for run in ("real", "shuffled"):
        model = RewardModel.from_pretrained(out / f"rm_{run}")
        recomputed = heldout_accuracy(model, heldout, ByteTokenizer(), model.max_row_len)
        assert results[run]["heldout_files_accuracy"] == recomputed
        metrics = read_metrics(out / f"rm_{run}" / "metrics.jsonl")
        assert results[run]["heldout_prompts_accuracy"] == metrics[-1]["eval_accuracy"]
        assert results[run]["train_accuracy_last"] == metrics[-1]["accuracy"]
    # The control trains on the same responses: only the ranks moved, within each group.
    shuffled = [
        json.loads(line) for line in (out / "rankings_shuffled.jsonl").read_text().splitlines()
    ]
    assert [r["responses"] for r in real] == [r["responses"] for r in shuffled]

    # A second run with the same labelling settings reuses the labels instead of sampling.
    stamp = (out / "rankings.jsonl").stat().st_mtime_ns
    run_example("reward_quality.py", *common, "--skip-shuffled", monkeypatch=monkeypatch)
    assert (out / "rankings.jsonl").stat().st_mtime_ns == stamp
    assert "shuffled" not in json.loads((out / "results.json").read_text())
