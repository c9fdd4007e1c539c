import json
import random
import shutil

import pytest
import torch
from conftest import assert_same_run, count_checkpointed_blocks

from palm_rlhf import ByteTokenizer, PaLM, PaLMConfig
from palm_rlhf.model.reward import RewardConfig, RewardModel
from palm_rlhf.training.config import TrainConfig
from palm_rlhf.training.reward import train_reward
from palm_rlhf.training.runs import read_metrics
from palm_rlhf.training.state import TrainingCheckpoints

TOK = ByteTokenizer()


def write_groups(path, shuffle_labels: bool, count: int = 240, seed: int = 0):
    """Prompts with 4 responses of a's and b's; the rule prefers more a's. With shuffle_labels
    the same responses get a random ranking: nothing is learnable."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for i in range(count):
            responses = ["".join(rng.choice("ab") for _ in range(12)) for _ in range(4)]
            counts = [r.count("a") for r in responses]
            if len(set(counts)) < 2:
                continue
            order = sorted(range(4), key=lambda j: -counts[j])
            if shuffle_labels:
                rng.shuffle(order)
            record = {"prompt": f"q{i}:", "responses": responses, "ranking": order}
            handle.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def trunk(tmp_path_factory):
    torch.manual_seed(0)
    model = PaLM(
        PaLMConfig(num_tokens=TOK.vocab_size, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64)
    )
    path = tmp_path_factory.mktemp("trunk") / "ckpt"
    model.save_pretrained(path)
    return path


def config(data, **overrides) -> TrainConfig:
    values = dict(
        seq_len=32,
        batch_size=8,
        steps=60,
        lr=3e-3,
        warmup_steps=5,
        eval_every=60,
        log_every=10,
        checkpoint_every=30,
        weight_decay=0.0,
        seed=0,
    )
    return TrainConfig(**{**values, **overrides})


def test_learns_the_rule_and_the_metric_is_honest(trunk, tmp_path):
    real = write_groups(tmp_path / "real.jsonl", shuffle_labels=False)
    shuffled = write_groups(tmp_path / "shuffled.jsonl", shuffle_labels=True)
    learned = train_reward(
        trunk,
        real,
        config(real),
        out_dir=tmp_path / "real",
        heldout_fraction=0.3,
        show_progress=False,
    )
    control = train_reward(
        trunk,
        shuffled,
        config(shuffled),
        out_dir=tmp_path / "shuffled",
        heldout_fraction=0.3,
        show_progress=False,
    )
    assert learned[-1]["eval_accuracy"] > 0.85
    # Same responses, labels shuffled: held-out accuracy stays at chance.
    assert 0.35 < control[-1]["eval_accuracy"] < 0.65
    metrics = read_metrics(tmp_path / "real" / "metrics.jsonl")
    # The core record of every supervised loop (training/step.py), and the final evaluation.
    for record in metrics:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "accuracy"} <= set(record)
    assert "eval_accuracy" in metrics[-1]


def test_final_checkpoint_scores_and_is_normalised(trunk, tmp_path):
    data = write_groups(tmp_path / "real.jsonl", shuffle_labels=False, count=60)
    train_reward(trunk, data, config(data, steps=20), out_dir=tmp_path / "run", show_progress=False)
    model = RewardModel.from_pretrained(
        TrainingCheckpoints(tmp_path / "run" / "checkpoints").latest()
    ).eval()
    assert model.score_std.item() > 0 and model.score_mean.item() != 0
    tokens = torch.tensor([[TOK.bos_id, *TOK.encode("q1:aaaa"), TOK.eos_id]])
    raw, normalised = model(tokens), model(tokens, normalized=True)
    expected = (raw - model.score_mean) / model.score_std
    torch.testing.assert_close(normalised, expected)


def test_resume_replays_the_same_losses(trunk, tmp_path):
    torch.set_num_threads(1)
    data = write_groups(tmp_path / "real.jsonl", shuffle_labels=False, count=80)
    full = train_reward(
        trunk,
        data,
        config(data, steps=40, log_every=5, checkpoint_every=20, keep_checkpoints=5),
        out_dir=tmp_path / "full",
        show_progress=False,
    )
    target = tmp_path / "resumed" / "checkpoints"
    target.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_0000020", target / "step_0000020")
    (target / "latest.json").write_text(json.dumps({"step": 20, "dir": "step_0000020"}))
    resumed = train_reward(
        trunk,
        data,
        config(data, steps=40, log_every=5, checkpoint_every=20, keep_checkpoints=5),
        out_dir=tmp_path / "resumed",
        resume=True,
        show_progress=False,
    )
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full if h["step"] > 20]


@pytest.mark.parametrize("bins", [0, 5])
def test_ratings_train_a_rating_head_or_a_regression(trunk, tmp_path, bins):
    path = tmp_path / "ratings.jsonl"
    rng = random.Random(0)
    with open(path, "w") as handle:
        for i in range(120):
            response = "".join(rng.choice("ab") for _ in range(8))
            rating = response.count("a") * 4 // 9 if bins else response.count("a") / 8
            handle.write(
                json.dumps({"prompt": f"r{i}:", "response": response, "rating": rating}) + "\n"
            )
    history = train_reward(
        trunk,
        path,
        config(path, steps=40, eval_every=0),
        RewardConfig(rating_bins=bins),
        out_dir=tmp_path / "run",
        show_progress=False,
    )
    assert history[-1]["loss"] < history[0]["loss"]


def test_bad_preference_data_names_the_line(trunk, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        train_reward(trunk, path, config(path), out_dir=tmp_path / "run", show_progress=False)


def test_normalization_reference_is_an_evenly_spaced_subset(trunk):
    from palm_rlhf.data.preferences import PreferenceGroup
    from palm_rlhf.training.reward import normalization_scores

    model = RewardModel.from_palm_checkpoint(trunk, RewardConfig())
    groups = [PreferenceGroup(f"q{i}:", ["a" * (i % 7), "b" * (i % 5)], [0, 1]) for i in range(40)]
    every = normalization_scores(model, groups, TOK, 32, batch_size=8)
    assert every.shape == (80,)
    subset = normalization_scores(model, groups, TOK, 32, batch_size=8, max_groups=10)
    # groups 0, 4, 8, ... 36: their two completions each, in order
    expected = every.view(40, 2)[::4].reshape(-1)
    torch.testing.assert_close(subset, expected)


def test_heldout_split_covers_ratings_too(tmp_path):
    # Bug caught: every rating record trained, including ratings of prompts whose comparison
    # groups were held out, which leaked held-out prompts into training.
    from palm_rlhf.data.preferences import PreferenceData, PreferenceGroup, RatedExample
    from palm_rlhf.training.reward import split_preferences

    prompts = [f"prompt {i}" for i in range(200)]
    data = PreferenceData(
        [PreferenceGroup(p, ["a", "b"], [0, 1]) for p in prompts],
        [RatedExample(p, "a", 1) for p in prompts],
    )
    train, heldout, train_ratings = split_preferences(data, 0.2, seed=0)
    held = {g.prompt for g in heldout}
    assert held and train
    assert not held & {r.prompt for r in train_ratings}
    assert {r.prompt for r in train_ratings} == {g.prompt for g in train}


def test_activation_checkpointing_trains_the_same_run(trunk, tmp_path, monkeypatch):
    data = write_groups(tmp_path / "groups.jsonl", shuffle_labels=False, count=40)
    calls = count_checkpointed_blocks(monkeypatch)
    runs = []
    for enabled in (False, True):
        settings = config(data, steps=3, log_every=1, activation_checkpointing=enabled)
        out = tmp_path / f"run{enabled}"
        runs.append(train_reward(trunk, data, settings, out_dir=out, show_progress=False))
        assert bool(calls) == enabled
    assert_same_run(*runs, keys=("loss", "grad_norm"))
